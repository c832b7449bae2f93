# The scalar reference's KV compressor and lightning indexer (dsv4-model §2.4, §2.5).
dsv4_add_gtest(test_reference_compressor
  SOURCES ${CMAKE_CURRENT_LIST_DIR}/test_reference_compressor.cpp
  LIBS dsv4_reference_model
  LABELS unit
  DISCOVER)
dsv4_add_gtest(test_reference_indexer
  SOURCES ${CMAKE_CURRENT_LIST_DIR}/test_reference_indexer.cpp
  LIBS dsv4_reference_model
  LABELS unit
  DISCOVER)
