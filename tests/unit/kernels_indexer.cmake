# The indexer logits path (kernels/indexer_logits.h): the schedule's hand-worked examples and
# contracts, the cooperative kernel on the sim backend against a plain recomputation, the seed bug A3
# (layout-mismatched and stale schedules hang), top-k.
dsv4_add_gtest(test_indexer_logits DISCOVER
  SOURCES ${CMAKE_CURRENT_LIST_DIR}/test_indexer_logits.cpp
  LIBS dsv4_kernels dsv4_runtime
  LABELS unit)

# "Schedule consumer/producer agree" (bug-classes A3): generated context lens in both layouts, the
# ranges partition the work and a scalar model of the kernel's loop terminates; any monotone
# schedule either partitions the work or makes the kernel's counters hang. Run the binary with
# RC_PARAMS="max_success=100000" to search longer.
dsv4_add_gtest(test_indexer_schedule_property
  SOURCES ${CMAKE_CURRENT_LIST_DIR}/test_indexer_schedule_property.cpp
  LIBS dsv4_properties_base
  LABELS unit property
  TIMEOUT 120)
set_tests_properties(test_indexer_schedule_property PROPERTIES ENVIRONMENT "RC_PARAMS=max_success=1000")
