dsv4_add_gtest(test_cast_host SOURCES ${CMAKE_CURRENT_LIST_DIR}/test_cast_host.cpp
               LIBS dsv4_kernels LABELS unit DISCOVER)
