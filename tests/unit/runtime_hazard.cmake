# The cross-stream hazard detector (engine/runtime/hazard_detector.*), driven by observer calls alone.
dsv4_add_gtest(test_hazard_detector
               SOURCES ${CMAKE_CURRENT_LIST_DIR}/test_hazard_detector.cpp
               LIBS dsv4_runtime LABELS unit DISCOVER)
