# The layer's remaining host kernels (kernels/mhc.h, q_path.h, attn_output.h) against the reference's
# helpers in quant-sim numerics on tiny's synthetic weights, and their contracts.
dsv4_add_gtest(test_kernels_layer DISCOVER
  SOURCES ${CMAKE_CURRENT_LIST_DIR}/test_kernels_layer.cpp
  LIBS dsv4_kernels dsv4_reference_model
  LABELS unit)
