dsv4_add_gtest(test_reference_ops SOURCES ${CMAKE_CURRENT_LIST_DIR}/test_reference_ops.cpp
               LIBS dsv4_reference_model LABELS unit DISCOVER)
dsv4_add_gtest(test_reference_model SOURCES ${CMAKE_CURRENT_LIST_DIR}/test_reference_model.cpp
               LIBS dsv4_reference_model LABELS unit DISCOVER TIMEOUT 600)
