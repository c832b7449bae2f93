# properties/: crash isolation, the op-level suites, the scenario format, and the property suites.
foreach(t isolation view_ops conversion scenario_json schedule_case)
  if(EXISTS ${CMAKE_CURRENT_SOURCE_DIR}/test_${t}.cpp)
    dsv4_add_gtest(test_${t} DISCOVER
      SOURCES ${CMAKE_CURRENT_SOURCE_DIR}/test_${t}.cpp
      LIBS dsv4_properties_base
      LABELS unit)
  endif()
endforeach()
