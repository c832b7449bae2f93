# The quantized linear and MoE host kernels (kernels/quant_gemm.h, kernels/moe.h) against the scalar
# reference (dsv4-model §2.9, §3) on the tiny config's synthetic checkpoint bytes; their contracts and
# the A5 compile-time check on the weight-scale argument.
dsv4_add_gtest(test_kernels_gemm DISCOVER
  SOURCES ${CMAKE_CURRENT_LIST_DIR}/test_kernels_gemm.cpp
  LIBS dsv4_kernels dsv4_reference_model dsv4_checkpoint
  LABELS unit)
