// kernels/cuda/port.h on the host: the warp collectives run on ModelLanes, the lane-array model of a
// warp of 32 (CUDA) or 64 (CDNA wave64) lanes with __shfl_xor's width semantics, against plain loops;
// a butterfly that mixes two 32-lane groups on a 64-lane wavefront is caught by the model; and the
// software FP8 e4m3fn encoder against the oracle of reference/formats_oracle.h on every
// bf16-representable f32, every tie and its neighbours, and the boundaries. (Every one of the 2^32
// f32 inputs goes through the same encoder, formats.h's f32_to_e4m3fn, in test_formats_exhaustive,
// labelled `exhaustive`; tests/gpu/test_kernels_mhc.cu compares the CUDA intrinsic path with it on
// all 2^32 inputs.)
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <random>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "engine/core/error.h"
#include "engine/core/formats.h"
#include "kernels/cuda/path_switch.h"
#include "kernels/cuda/port.h"
#include "reference/formats_oracle.h"

namespace dsv4 {
namespace {

using gpu::LaneArray;
using gpu::ModelLanes;

template <class T, int W>
LaneArray<T, W> random_lanes(std::mt19937& rng) {
  LaneArray<T, W> v;
  if constexpr (std::is_floating_point_v<T>) {
    // Mixed magnitudes, so that a different summation order gives different bits.
    std::uniform_real_distribution<double> mant(-1.0, 1.0);
    std::uniform_int_distribution<int> exp(-20, 20);
    for (int i = 0; i < W; ++i) v.lane[i] = static_cast<T>(std::ldexp(mant(rng), exp(rng)));
  } else {
    std::uniform_int_distribution<int> d(-1000000, 1000000);
    for (int i = 0; i < W; ++i) v.lane[i] = static_cast<T>(d(rng));
  }
  return v;
}

template <class T>
bool same_bits(T a, T b) {
  return std::memcmp(&a, &b, sizeof(T)) == 0;
}

// The butterfly's order as a plain loop: the segment's values folded in halves, element i combined
// with element i + len/2, until one is left.
template <class T, class Op>
T halving_fold(std::vector<T> x, Op op) {
  for (size_t len = x.size(); len > 1; len /= 2) {
    for (size_t i = 0; i < len / 2; ++i) x[i] = op(x[i], x[i + len / 2]);
  }
  return x[0];
}

template <class T>
class PortCollectives : public ::testing::Test {};
using ElementTypes = ::testing::Types<float, double, int>;
TYPED_TEST_SUITE(PortCollectives, ElementTypes);

template <class T, int W>
void check_group_sums_and_maxes() {
  std::mt19937 rng(1234 + W);
  for (int rep = 0; rep < 20; ++rep) {
    const LaneArray<T, W> v = random_lanes<T, W>(rng);
    for (int width = 1; width <= W; width *= 2) {
      const LaneArray<T, W> sum = gpu::group_sum(v, width);
      const LaneArray<T, W> mx = gpu::group_max(v, width);
      for (int seg = 0; seg < W; seg += width) {
        std::vector<T> part(v.lane + seg, v.lane + seg + width);
        // The sum in the butterfly's order, bit for bit; for integers, also the sequential sum.
        const T want_sum = halving_fold(part, [](T a, T b) { return a + b; });
        T sequential = T{0};
        for (T x : part) sequential += x;
        T want_max = part[0];
        for (T x : part) want_max = std::max(want_max, x);
        for (int lane = seg; lane < seg + width; ++lane) {
          EXPECT_TRUE(same_bits(sum.lane[lane], want_sum))
              << "warp " << W << " width " << width << " lane " << lane << ": " << sum.lane[lane] << " vs " << want_sum;
          if constexpr (!std::is_floating_point_v<T>) {
            EXPECT_EQ(sum.lane[lane], sequential);
          }
          EXPECT_EQ(mx.lane[lane], want_max) << "warp " << W << " width " << width << " lane " << lane;
        }
      }
      if (width == W) {
        const LaneArray<T, W> ws = gpu::warp_sum(v);
        const LaneArray<T, W> wm = gpu::warp_max(v);
        for (int lane = 0; lane < W; ++lane) {
          EXPECT_TRUE(same_bits(ws.lane[lane], sum.lane[lane]));
          EXPECT_EQ(wm.lane[lane], mx.lane[lane]);
        }
      }
    }
  }
}

TYPED_TEST(PortCollectives, GroupSumMaxAndWarpSumMatchPlainLoopsOn32Lanes) {
  check_group_sums_and_maxes<TypeParam, 32>();
}

TYPED_TEST(PortCollectives, GroupSumMaxAndWarpSumMatchPlainLoopsOn64Lanes) {
  check_group_sums_and_maxes<TypeParam, 64>();
}

// The floats of a butterfly sum differ from a sequential sum in general: the comparison above is
// about order, not only value.
TEST(PortCollectivesModel, ButterflyOrderIsNotTheSequentialOrder) {
  // 1 + 31 * 2^-24: added one by one every tiny term rounds away; the butterfly adds most of them
  // to each other first.
  LaneArray<float, 32> v;
  for (int i = 0; i < 32; ++i) v.lane[i] = i == 0 ? 1.0f : 0x1p-24f;
  float sequential = 0.0f;
  for (float x : v.lane) sequential += x;
  EXPECT_EQ(sequential, 1.0f);
  EXPECT_EQ(gpu::warp_sum(v).lane[0], 1.0f + 15 * 0x1p-23f);
}

TEST(PortCollectivesModel, ShuffleFromALaterSegmentReturnsTheCallersValue) {
  LaneArray<int, 64> v;
  for (int i = 0; i < 64; ++i) v.lane[i] = 100 + i;
  // Inside the segment: the partner's value.
  const auto in_segment = gpu::shfl_xor(v, 4, 8);
  for (int i = 0; i < 64; ++i) EXPECT_EQ(in_segment.lane[i], 100 + (i ^ 4));
  // Mask 32 with width 32: lanes 0..31 would read a later segment and keep their own value; lanes
  // 32..63 read an earlier one, which __shfl_xor allows.
  const auto across = gpu::shfl_xor(v, 32, 32);
  for (int i = 0; i < 32; ++i) EXPECT_EQ(across.lane[i], 100 + i);
  for (int i = 32; i < 64; ++i) EXPECT_EQ(across.lane[i], 100 + (i ^ 32));
  // A mask reaching past the wavefront: HIP gives the caller's own value.
  const auto past64 = gpu::shfl_xor(v, 64 + 1, 64);
  for (int i = 0; i < 64; ++i) EXPECT_EQ(past64.lane[i], 100 + i);
  // CUDA's shfl.bfly takes the mask's low 5 bits: 32 is 0 (the caller's own value), 33 is 1.
  LaneArray<int, 32> w;
  for (int i = 0; i < 32; ++i) w.lane[i] = i;
  const auto own = gpu::shfl_xor(w, 32, 32);
  for (int i = 0; i < 32; ++i) EXPECT_EQ(own.lane[i], i);
  const auto low_bits = gpu::shfl_xor(w, 33, 32);
  for (int i = 0; i < 32; ++i) EXPECT_EQ(low_bits.lane[i], i ^ 1);
}

TEST(PortCollectivesModel, WidthsThatAreNotAPowerOfTwoUpToTheWarpAreRefused) {
  LaneArray<float, 32> v{};
  EXPECT_THROW(gpu::shfl_xor(v, 1, 64), std::logic_error);
  EXPECT_THROW(gpu::shfl_xor(v, 1, 12), std::logic_error);
  LaneArray<float, 64> w{};
  EXPECT_NO_THROW(gpu::shfl_xor(w, 1, 64));
}

// Code meant to reduce 32-lane groups (a warp on NVIDIA) but written as a butterfly from offset 32
// with width 64, i.e. a whole-wavefront reduction: on a 32-lane warp it cannot be told apart, on a
// 64-lane wavefront it mixes the two groups and the model shows it.
template <int W>
LaneArray<float, W> wrong_32_lane_group_sum(const LaneArray<float, W>& v) {
  return gpu::detail::butterfly<ModelLanes<W>>(v, /*first_offset=*/32, /*width=*/64, gpu::detail::SumOp{});
}

TEST(PortCollectivesModel, ButterflyMixingTwo32LaneGroupsIsCaughtOnWave64) {
  LaneArray<float, 64> v;
  for (int i = 0; i < 64; ++i) v.lane[i] = static_cast<float>(i < 32 ? 1 : 1000);
  const LaneArray<float, 64> wanted = gpu::group_sum(v, 32);  // the 32-lane group sums
  EXPECT_EQ(wanted.lane[0], 32.0f);
  EXPECT_EQ(wanted.lane[63], 32000.0f);
  const LaneArray<float, 64> got = wrong_32_lane_group_sum(v);
  int wrong_lanes = 0;
  for (int i = 0; i < 64; ++i) wrong_lanes += got.lane[i] != wanted.lane[i] ? 1 : 0;
  EXPECT_EQ(wrong_lanes, 64) << "the model did not catch a butterfly that mixes two 32-lane groups";
  // The same code on a 32-lane warp: width 64 does not exist there, the model refuses it.
  LaneArray<float, 32> u;
  for (int i = 0; i < 32; ++i) u.lane[i] = 1.0f;
  EXPECT_THROW(wrong_32_lane_group_sum(u), std::logic_error);
}

TEST(PortCollectivesModel, WarpSumWhereA32LaneGroupWasMeantPassesOnlyOn32Lanes) {
  // gpu::warp_sum used for a 32-lane group sum: right where kWarpSize is 32, wrong on wave64.
  LaneArray<int, 32> a;
  LaneArray<int, 64> b;
  for (int i = 0; i < 64; ++i) {
    if (i < 32) a.lane[i] = i;
    b.lane[i] = i;
  }
  EXPECT_EQ(gpu::warp_sum(a).lane[0], gpu::group_sum(a, 32).lane[0]);
  EXPECT_NE(gpu::warp_sum(b).lane[0], gpu::group_sum(b, 32).lane[0]);
}

// First offset = width (an off-by-one in the loop start): every partner of that step lies outside
// the lane's segment, so it adds each lane to itself.
template <int W>
void expect_doubled_by_a_step_outside_the_segment() {
  LaneArray<int, W> v;
  for (int i = 0; i < W; ++i) v.lane[i] = 1;
  const auto got = gpu::detail::butterfly<ModelLanes<W>>(v, /*first_offset=*/32, /*width=*/32, gpu::detail::SumOp{});
  for (int i = 0; i < W; ++i) EXPECT_EQ(got.lane[i], 64) << "warp " << W << " lane " << i;  // 2 * 32, not 32
}

TEST(PortCollectivesModel, AButterflyStartingAtTheWidthDoublesInsteadOfReducing) {
  expect_doubled_by_a_step_outside_the_segment<32>();
  expect_doubled_by_a_step_outside_the_segment<64>();
}

// ---- software FP8 e4m3fn ---------------------------------------------------------------------------

float from_bits(uint32_t b) {
  float x;
  std::memcpy(&x, &b, sizeof x);
  return x;
}
uint32_t to_bits(float x) {
  uint32_t b;
  std::memcpy(&b, &x, sizeof b);
  return b;
}

// Every input a test of the software path covers, each with both signs.
std::vector<float> fp8_inputs(const FormatOracle& oracle) {
  std::vector<uint32_t> mags;
  for (uint32_t hi = 0; hi < 0x8000u; ++hi) mags.push_back(hi << 16);  // every bf16 magnitude (NaNs too)
  const auto around = [&](float v) {
    const uint32_t b = to_bits(v) & 0x7FFFFFFFu;
    for (int d = -2; d <= 2; ++d) {
      const int64_t m = static_cast<int64_t>(b) + d;
      if (m >= 0 && m <= 0x7FFFFFFF) mags.push_back(static_cast<uint32_t>(m));
    }
  };
  for (float t : oracle.ties()) around(t);
  for (const SpecValue& v : oracle.values()) around(static_cast<float>(v.value));
  for (float b : {0.0f, oracle.min_subnormal(), oracle.min_subnormal() / 2, oracle.min_normal(), 448.0f, 464.0f,
                  std::numeric_limits<float>::max(), std::numeric_limits<float>::infinity(),
                  std::numeric_limits<float>::denorm_min(), std::numeric_limits<float>::min()}) {
    around(b);
  }
  for (uint32_t nan : {0x7F800001u, 0x7FC00000u, 0x7FFFFFFFu, 0x7FA5A5A5u}) mags.push_back(nan);
  for (uint64_t m = 0; m < 0x80000000ull; m += 65521) mags.push_back(static_cast<uint32_t>(m));  // a sparse sweep
  std::vector<float> inputs;
  for (uint32_t m : mags) {
    inputs.push_back(from_bits(m));
    inputs.push_back(from_bits(m | 0x80000000u));
  }
  return inputs;
}

TEST(PortFp8, SoftwareE4m3fnMatchesTheOracleOnBf16ValuesTiesAndBoundaries) {
  const FormatOracle oracle(DType::f8_e4m3fn);
  const std::vector<float> inputs = fp8_inputs(oracle);
  ASSERT_GT(inputs.size(), 120000u);
  int64_t mismatches = 0;
  for (float x : inputs) {
    const uint32_t sw = gpu::e4m3fn_software(x);
    const uint32_t chosen = gpu::to_e4m3fn(x);  // the host side of the switch: the software path
    if (!oracle.accepts(x, sw) || chosen != sw || sw != f32_to_e4m3fn(x)) {
      if (++mismatches <= 8) {
        ADD_FAILURE() << std::hex << "f32 0x" << to_bits(x) << ": software 0x" << sw << ", to_e4m3fn 0x" << chosen
                      << ", oracle 0x" << oracle.expected(x);
      }
    }
  }
  EXPECT_EQ(mismatches, 0);
}

TEST(PortFp8, TiesGoToEvenAndOverflowSaturates) {
  EXPECT_EQ(gpu::e4m3fn_software(1.0625f), 0x38u);   // between 1 (0x38) and 1.125 (0x39)
  EXPECT_EQ(gpu::e4m3fn_software(1.1875f), 0x3Au);   // between 0x39 and 0x3A
  EXPECT_EQ(gpu::e4m3fn_software(-1.0625f), 0xB8u);
  EXPECT_EQ(gpu::e4m3fn_software(464.0f), 0x7Eu);    // the overflow tie saturates to 448
  EXPECT_EQ(gpu::e4m3fn_software(-1e30f), 0xFEu);
  EXPECT_EQ(gpu::e4m3fn_software(std::numeric_limits<float>::infinity()), 0x7Eu);
  EXPECT_EQ(gpu::e4m3fn_software(0x1p-10f), 0x00u);  // half the smallest subnormal: ties to even 0
  EXPECT_EQ(gpu::e4m3fn_software(-std::nanf("")), 0xFFu);
}

// ---- the fast-path switch (DSV4_FP8_GEMM, DSV4_SPARSE_ATTENTION) ------------------------------------

TEST(PathSwitch, ReadsTheVariableOnceAtFirstUseAndSetOverridesIt) {
  constexpr const char* kVar = "DSV4_TEST_PATH_SWITCH";
  ::unsetenv(kVar);
  kernels::cuda::PathSwitch unset(kVar, {"exact", "fast"});
  EXPECT_EQ(unset.get(), 0);  // unset: the first name
  ::setenv(kVar, "fast", 1);
  EXPECT_EQ(unset.get(), 0);  // read once: a later change of the environment is not seen
  kernels::cuda::PathSwitch from_env(kVar, {"exact", "fast"});
  EXPECT_EQ(from_env.get(), 1);
  from_env.set(0);
  EXPECT_EQ(from_env.get(), 0);
  EXPECT_STREQ(from_env.name(1), "fast");
  EXPECT_STREQ(from_env.name(7), "?");
  ::setenv(kVar, "", 1);
  kernels::cuda::PathSwitch empty(kVar, {"exact", "fast"});
  EXPECT_EQ(empty.get(), 0);
  ::unsetenv(kVar);
}

TEST(PathSwitch, AnUnknownValueNamesTheVariableAndTheAcceptedValues) {
  constexpr const char* kVar = "DSV4_TEST_PATH_SWITCH_BAD";
  ::setenv(kVar, "tensorcore", 1);
  kernels::cuda::PathSwitch s(kVar, {"exact", "tensor_core", "other"});
  try {
    s.get();
    ADD_FAILURE() << "accepted an unknown value";
  } catch (const InputError& e) {
    EXPECT_EQ(e.source(), kVar);
    EXPECT_EQ(std::string(e.what()), "DSV4_TEST_PATH_SWITCH_BAD: expected exact, tensor_core or other, got 'tensorcore'");
  }
  ::unsetenv(kVar);
}

}  // namespace
}  // namespace dsv4
