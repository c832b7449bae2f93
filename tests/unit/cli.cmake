dsv4_add_gtest(test_cli SOURCES ${CMAKE_CURRENT_LIST_DIR}/test_cli.cpp
               LIBS dsv4_cli nlohmann_json::nlohmann_json LABELS unit DISCOVER)
target_compile_definitions(test_cli PRIVATE DSV4_SOURCE_DIR="${PROJECT_SOURCE_DIR}")
