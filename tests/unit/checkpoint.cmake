dsv4_add_gtest(test_checkpoint SOURCES ${CMAKE_CURRENT_LIST_DIR}/test_checkpoint.cpp
               LIBS dsv4_checkpoint LABELS unit DISCOVER)
