# engine/serving scheduler: requests, continuous batching, the forward batch and its metadata.

dsv4_add_gtest(test_serving_scheduler DISCOVER
  SOURCES ${CMAKE_CURRENT_LIST_DIR}/test_serving_scheduler.cpp
  LIBS dsv4_serving
  LABELS unit)

# Random request mixes over random valid options; 200 cases take a few seconds at most.
dsv4_add_gtest(test_serving_scheduler_property
  SOURCES ${CMAKE_CURRENT_LIST_DIR}/test_serving_scheduler_property.cpp
  LIBS dsv4_serving rapidcheck
  LABELS unit property
  TIMEOUT 120)
dsv4_rapidcheck_cases(test_serving_scheduler_property 200 50)
