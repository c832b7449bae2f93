# properties/: crash isolation, the op-level suites, the scenario format, and the property suites.
foreach(t isolation view_ops conversion scenario_json schedule_case)
  if(EXISTS ${CMAKE_CURRENT_SOURCE_DIR}/test_${t}.cpp)
    dsv4_add_gtest(test_${t} DISCOVER
      SOURCES ${CMAKE_CURRENT_SOURCE_DIR}/test_${t}.cpp
      LIBS dsv4_properties_base
      LABELS unit)
  endif()
endforeach()
# The isolation tests' subject is what the sanitizers do to a crashing child (their crashes are in the
# test's own code), so its sources stay instrumented under DSV4_SANITIZE_TEST_SOURCES=OFF.
set_target_properties(test_isolation PROPERTIES DSV4_UNSANITIZED_SOURCES OFF)

# The case format's schema against the loader, and the checked-in cases.
dsv4_add_gtest(test_case_schema DISCOVER
  SOURCES ${CMAKE_CURRENT_SOURCE_DIR}/test_case_schema.cpp
  LIBS dsv4_properties_base nlohmann_json::nlohmann_json
  LABELS unit)
target_compile_definitions(test_case_schema PRIVATE DSV4_SOURCE_DIR="${PROJECT_SOURCE_DIR}")

# repros/: shrinking and replay.
dsv4_add_gtest(test_repro DISCOVER
  SOURCES ${CMAKE_CURRENT_SOURCE_DIR}/test_repro.cpp
  LIBS dsv4_repro
  LABELS unit)
target_compile_definitions(test_repro PRIVATE DSV4_SOURCE_DIR="${PROJECT_SOURCE_DIR}")
if(DSV4_SANITIZE)
  target_compile_definitions(test_repro PRIVATE DSV4_SANITIZED_BUILD=1)
endif()
