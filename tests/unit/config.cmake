dsv4_add_gtest(test_config SOURCES ${CMAKE_CURRENT_LIST_DIR}/test_config.cpp
               LIBS dsv4_config LABELS unit DISCOVER)
