# engine/serving pools: request slots, paged full and SWA token allocators, compressed locations,
# compress-state rows, and the KV / indexer-key byte layouts.

dsv4_add_gtest(test_serving_pools DISCOVER
  SOURCES ${CMAKE_CURRENT_LIST_DIR}/test_serving_pools.cpp
  LIBS dsv4_serving dsv4_reference_model
  LABELS unit)

# Random request traffic over random valid runtime options: 500 cases take about 0.5 s plain and
# 8 s under ASan/UBSan, where 100 do. Run the binary with RC_PARAMS="max_success=100000" to search
# longer.
dsv4_add_gtest(test_serving_pools_property
  SOURCES ${CMAKE_CURRENT_LIST_DIR}/test_serving_pools_property.cpp
  LIBS dsv4_serving rapidcheck
  LABELS unit property
  TIMEOUT 120)
dsv4_rapidcheck_cases(test_serving_pools_property 500 100)
