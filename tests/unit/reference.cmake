# The scalar reference: one test file per concept.
include(${CMAKE_CURRENT_LIST_DIR}/reference_compressor.cmake OPTIONAL)
include(${CMAKE_CURRENT_LIST_DIR}/reference_moe.cmake OPTIONAL)
include(${CMAKE_CURRENT_LIST_DIR}/reference_model.cmake OPTIONAL)
