# engine/model: the engine on one rank on sim (construction, metamorphic relations, bookkeeping,
# the reference comparison of the micro mix).
dsv4_add_gtest(test_engine_model DISCOVER
  SOURCES ${CMAKE_CURRENT_LIST_DIR}/test_engine_model.cpp
  LIBS dsv4_engine dsv4_oracle
  LABELS unit
  TIMEOUT 300)

# The acceptance sweep: tiny and micro mixes, four modes, many schedules (minutes; label slow).
dsv4_add_gtest(test_engine_sweep DISCOVER
  SOURCES ${CMAKE_CURRENT_LIST_DIR}/test_engine_sweep.cpp
  LIBS dsv4_engine dsv4_oracle
  LABELS unit slow property
  TIMEOUT 900)

# Pipeline and context parallelism on simulated devices against one rank; the w8a8-int8 path.
dsv4_add_gtest(test_engine_parallel DISCOVER
  SOURCES ${CMAKE_CURRENT_LIST_DIR}/test_engine_parallel.cpp
  LIBS dsv4_engine dsv4_oracle
  LABELS unit slow
  TIMEOUT 900)
