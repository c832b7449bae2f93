# The compressor's serving kernels (kernels/compressor.h): chunked prefill and decode through the
# state ring equal the reference Compressor bit for bit; the plan's sources and contracts.
dsv4_add_gtest(test_kernels_compressor DISCOVER
  SOURCES ${CMAKE_CURRENT_LIST_DIR}/test_kernels_compressor.cpp
  LIBS dsv4_kernels dsv4_serving dsv4_reference_model
  LABELS unit)
