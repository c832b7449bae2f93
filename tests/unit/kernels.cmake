dsv4_add_gtest(test_cast_host SOURCES ${CMAKE_CURRENT_LIST_DIR}/test_cast_host.cpp
               LIBS dsv4_kernels LABELS unit DISCOVER)
# kernels/cuda/port.h on the host: the warp collectives on the lane model of 32- and 64-lane warps,
# and the software FP8 encoder against the formats oracle.
dsv4_add_gtest(test_port_collectives SOURCES ${CMAKE_CURRENT_LIST_DIR}/test_port_collectives.cpp
               LIBS dsv4_core dsv4_reference LABELS unit DISCOVER)
# kernels/token_ops.h's speculative-scrub copies on the host: contracts and a backup -> scrub round trip.
dsv4_add_gtest(test_token_ops SOURCES ${CMAKE_CURRENT_LIST_DIR}/test_token_ops.cpp
               LIBS dsv4_kernels LABELS unit DISCOVER)
