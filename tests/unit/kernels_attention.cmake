# The attention path's host kernels (kernels/norm_rope.h, kernels/sparse_attention.h): norm + RoPE
# against the reference bit for bit, bug class A1 (a strided qkv_a slice is a ContractError for the
# contiguous-only kernel, correct for the stride-aware one), the MODEL1 cache bytes against serving's
# layout functions, sparse attention against the reference attention_head, and the length/index
# contracts.
dsv4_add_gtest(test_kernels_attention DISCOVER
  SOURCES ${CMAKE_CURRENT_LIST_DIR}/test_kernels_attention.cpp
  LIBS dsv4_kernels dsv4_serving dsv4_reference_model
  LABELS unit)
