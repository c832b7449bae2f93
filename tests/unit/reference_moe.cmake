# The scalar reference's mHC (dsv4-model §4.1, §4.2) and MoE (§3).
dsv4_add_gtest(test_reference_mhc
  SOURCES ${CMAKE_CURRENT_LIST_DIR}/test_reference_mhc.cpp
  LIBS dsv4_reference_model
  LABELS unit
  DISCOVER)
dsv4_add_gtest(test_reference_moe
  SOURCES ${CMAKE_CURRENT_LIST_DIR}/test_reference_moe.cpp
  LIBS dsv4_reference_model
  LABELS unit
  DISCOVER)
