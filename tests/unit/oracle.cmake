# engine/oracle: the reference comparison of engine steps, against StepRecords built by a second
# reference model playing the engine (micro preset; a few seconds).
dsv4_add_gtest(test_oracle DISCOVER
  SOURCES ${CMAKE_CURRENT_LIST_DIR}/test_oracle.cpp
  LIBS dsv4_oracle
  LABELS unit)
