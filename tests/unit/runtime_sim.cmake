# The sim runtime backend: schedules, replay, graphs, cooperative kernels, collectives.
dsv4_add_gtest(test_runtime_sim SOURCES ${CMAKE_CURRENT_LIST_DIR}/test_runtime_sim.cpp
               LIBS dsv4_runtime LABELS unit DISCOVER)
