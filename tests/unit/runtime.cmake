# The runtime end to end on the sim backend: the hazard detector, launch contracts and the caching
# allocator observed through real programs.
dsv4_add_gtest(test_runtime_detectors SOURCES ${CMAKE_CURRENT_LIST_DIR}/test_runtime_detectors.cpp
               LIBS dsv4_runtime LABELS unit DISCOVER)
