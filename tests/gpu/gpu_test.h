// Shared by the GPU tests (label gpu): the skip every test begins with, so that the cuda preset's
// ctest passes on machines without a GPU and runs the tests for real on a GPU runner.
#pragma once

#include <gtest/gtest.h>

#include "engine/core/allocator.h"

#define DSV4_REQUIRE_GPU()                                                      \
  do {                                                                          \
    if (::dsv4::cuda_device_count() == 0) GTEST_SKIP() << "no CUDA device";     \
  } while (0)

#define DSV4_REQUIRE_GPUS(n)                                                                          \
  do {                                                                                                \
    if (::dsv4::cuda_device_count() < (n)) GTEST_SKIP() << "needs " << (n) << " CUDA device(s)";       \
  } while (0)
