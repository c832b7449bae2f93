dsv4_add_gtest(test_reference_ops SOURCES ${CMAKE_CURRENT_LIST_DIR}/test_reference_ops.cpp
               LIBS dsv4_reference_model LABELS unit DISCOVER)
dsv4_add_gtest(test_reference_model SOURCES ${CMAKE_CURRENT_LIST_DIR}/test_reference_model.cpp
               LIBS dsv4_reference_model LABELS unit DISCOVER TIMEOUT 600)
# The tiny-config decode-equals-prefill cases, as their own binary: `slow`, left out under ASan.
dsv4_add_gtest(test_reference_model_tiny SOURCES ${CMAKE_CURRENT_LIST_DIR}/test_reference_model.cpp
               LIBS dsv4_reference_model LABELS unit slow DISCOVER TIMEOUT 600)
if(TARGET test_reference_model_tiny)
  target_compile_definitions(test_reference_model_tiny PRIVATE DSV4_REFERENCE_TINY_CASES=1)
endif()
