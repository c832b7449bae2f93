# Project-wide compile settings and the helper that registers a GoogleTest binary with ctest.

add_library(dsv4_warnings INTERFACE)
target_compile_options(dsv4_warnings INTERFACE
  $<$<COMPILE_LANGUAGE:CXX>:-Wall -Wextra -Wshadow=local -Wno-missing-field-initializers>)

# The sanitizer flags, for every target that links dsv4_sanitize (the libraries pass it on PUBLIC).
# A test binary whose DSV4_UNSANITIZED_SOURCES property is set compiles its own sources without
# them and still links the runtimes: the libraries it tests stay instrumented (see
# DSV4_SANITIZE_TEST_SOURCES).
add_library(dsv4_sanitize INTERFACE)
if(DSV4_SANITIZE)
  set(dsv4_sanitize_flags -fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined)
  target_compile_options(dsv4_sanitize INTERFACE
    "$<$<AND:$<COMPILE_LANGUAGE:CXX>,$<NOT:$<BOOL:$<TARGET_PROPERTY:DSV4_UNSANITIZED_SOURCES>>>>:${dsv4_sanitize_flags}>")
  target_link_options(dsv4_sanitize INTERFACE -fsanitize=address,undefined)
endif()
# OFF: under DSV4_SANITIZE, the test binaries' own sources (GoogleTest scaffolding, half the
# sanitizer build's compile time) are built without the sanitizers. CI's sanitizer step sets it.
option(DSV4_SANITIZE_TEST_SOURCES "Under DSV4_SANITIZE, instrument the test binaries' own sources too" ON)

# Extra flags for the test binaries' own C++ sources (CI passes -O1: they are mostly GoogleTest
# scaffolding and build a quarter faster, while the libraries they test keep the build's flags). The
# exhaustive sweeps keep the build's flags: their encoders inline into 2^32-iteration loops.
set(DSV4_TEST_CXX_FLAGS "" CACHE STRING "Extra compile flags for the test binaries' own C++ sources")

# dsv4_add_gtest(NAME SOURCES... LIBS... LABELS... [TIMEOUT s] [DISCOVER] [GPUS n])
# Without DISCOVER the binary is one ctest test; with it, every TEST() becomes its own ctest test.
# Tests labelled gpu or multigpu claim GPUS (default 1) GPUs as ctest resource groups, and their
# binary maps the GPUs ctest gave it to CUDA_VISIBLE_DEVICES (tests/gpu/resource_env.cpp).
function(dsv4_add_gtest name)
  cmake_parse_arguments(ARG "DISCOVER" "TIMEOUT;GPUS" "SOURCES;LIBS;LABELS" ${ARGN})
  # The sanitizer preset leaves the slow and exhaustive labels out of its runs, so it does not
  # build those binaries either (they are the most expensive to compile under ASan).
  if(DSV4_SANITIZE AND ("slow" IN_LIST ARG_LABELS OR "exhaustive" IN_LIST ARG_LABELS))
    return()
  endif()
  set(resources "")
  if("gpu" IN_LIST ARG_LABELS OR "multigpu" IN_LIST ARG_LABELS)
    if(NOT ARG_GPUS)
      set(ARG_GPUS 1)
    endif()
    list(APPEND ARG_SOURCES ${PROJECT_SOURCE_DIR}/tests/gpu/resource_env.cpp)
    set(resources "${ARG_GPUS},gpus:1")
  endif()
  add_executable(${name} ${ARG_SOURCES})
  if(DSV4_SANITIZE AND NOT DSV4_SANITIZE_TEST_SOURCES)
    set_target_properties(${name} PROPERTIES DSV4_UNSANITIZED_SOURCES ON)
  endif()
  target_link_libraries(${name} PRIVATE ${ARG_LIBS} GTest::gtest GTest::gtest_main dsv4_warnings dsv4_sanitize)
  if(DSV4_TEST_CXX_FLAGS AND NOT "exhaustive" IN_LIST ARG_LABELS)
    separate_arguments(test_flags UNIX_COMMAND "${DSV4_TEST_CXX_FLAGS}")
    target_compile_options(${name} PRIVATE "$<$<COMPILE_LANGUAGE:CXX>:${test_flags}>")
  endif()
  if(NOT ARG_TIMEOUT)
    set(ARG_TIMEOUT 120)
  endif()
  if(ARG_DISCOVER)
    # gtest_discover_tests flattens list-valued PROPERTIES, so labels and timeout are set by a
    # script that ctest runs after discovery has defined ${name}_TESTS.
    gtest_discover_tests(${name} TEST_LIST ${name}_TESTS DISCOVERY_TIMEOUT 60)
    set(script ${CMAKE_CURRENT_BINARY_DIR}/${name}_properties.cmake)
    file(WRITE ${script}
      "if(${name}_TESTS)\n"
      "  set_tests_properties(\${${name}_TESTS} PROPERTIES LABELS \"${ARG_LABELS}\" TIMEOUT ${ARG_TIMEOUT})\n"
      "  if(NOT \"${resources}\" STREQUAL \"\")\n"
      "    set_tests_properties(\${${name}_TESTS} PROPERTIES RESOURCE_GROUPS \"${resources}\")\n"
      "  endif()\n"
      "endif()\n")
    set_property(DIRECTORY APPEND PROPERTY TEST_INCLUDE_FILES ${script})
  else()
    add_test(NAME ${name} COMMAND ${name})
    set_tests_properties(${name} PROPERTIES LABELS "${ARG_LABELS}" TIMEOUT ${ARG_TIMEOUT})
    if(resources)
      set_tests_properties(${name} PROPERTIES RESOURCE_GROUPS "${resources}")
    endif()
  endif()
endfunction()

# dsv4_rapidcheck_cases(TEST PLAIN SANITIZED): bounds a RapidCheck test to PLAIN cases, or SANITIZED
# under DSV4_SANITIZE (a case costs ~20x more there). Run the binary with RC_PARAMS to search longer.
function(dsv4_rapidcheck_cases test plain sanitized)
  if(DSV4_SANITIZE)
    set(cases ${sanitized})
  else()
    set(cases ${plain})
  endif()
  set_tests_properties(${test} PROPERTIES ENVIRONMENT "RC_PARAMS=max_success=${cases}")
endfunction()
