dsv4_add_gtest(test_tensor SOURCES ${CMAKE_CURRENT_LIST_DIR}/test_tensor.cpp
               LIBS dsv4_core LABELS unit DISCOVER)
dsv4_add_gtest(test_allocator SOURCES ${CMAKE_CURRENT_LIST_DIR}/test_allocator.cpp
               LIBS dsv4_core LABELS unit DISCOVER)
dsv4_add_gtest(test_contract SOURCES ${CMAKE_CURRENT_LIST_DIR}/test_contract.cpp
               LIBS dsv4_core LABELS unit DISCOVER)
