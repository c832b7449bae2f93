// GPU tests of engine/core and the cast kernels: device memory through the allocator (guards and
// poison work on device memory too) and the CUDA cast kernels bit-identical to the host ones over
// every f32 input and every narrow-float code.
#include <cmath>
#include <cstring>
#include <thread>
#include <vector>

#include <gtest/gtest.h>

#include "tests/gpu/gpu_test.h"

#include "engine/core/allocator.h"
#include "engine/core/error.h"
#include "engine/core/formats.h"
#include "engine/core/tensor.h"
#include "kernels/cast.h"
#include "kernels/cuda/port.h"

namespace dsv4 {
namespace {

__global__ void write_past_end(float* data, long long n) { data[n] = 1.0f; }

__global__ void fill_bits(float* out, unsigned long long first, long long n) {
  const long long i = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) out[i] = __uint_as_float(static_cast<uint32_t>(first + static_cast<unsigned long long>(i)));
}

TEST(GpuAllocator, DeviceTensorsRoundTripThroughTheHost) {
  DSV4_REQUIRE_GPU();
  Allocator device(*cuda_memory(0), AllocatorMode::plain);
  Tensor host = Tensor::from_values({2, 3}, DType::bf16, {1, 2, 3, 4, 5, 6}, "x");
  Tensor on_gpu = host.to(device);
  EXPECT_EQ(on_gpu.device().kind, DeviceKind::cuda);
  EXPECT_EQ(on_gpu.values(), host.values());
  // A strided device view is gathered correctly.
  EXPECT_EQ(on_gpu.transpose(0, 1).contiguous().values(), (std::vector<double>{1, 4, 2, 5, 3, 6}));
}

TEST(GpuAllocator, TestingModePoisonsDeviceMemory) {
  DSV4_REQUIRE_GPU();
  Allocator device(*cuda_memory(0), AllocatorMode::testing);
  Tensor t = Tensor::empty({5}, DType::f32, device, "fresh");
  for (double v : t.values()) EXPECT_TRUE(std::isnan(v));
}

TEST(GpuAllocator, GuardsCatchAKernelWritingPastTheEnd) {
  DSV4_REQUIRE_GPU();
  Allocator device(*cuda_memory(0), AllocatorMode::testing);
  Tensor t = Tensor::empty({64}, DType::f32, device, "layers.2.attn.c128_state");
  EXPECT_TRUE(device.check_guards().empty());
  write_past_end<<<1, 1>>>(t.data<float>(), 64);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  const auto damage = device.check_guards();
  ASSERT_EQ(damage.size(), 1u);
  EXPECT_EQ(damage[0].owner, "layers.2.attn.c128_state");
  EXPECT_EQ(damage[0].device.kind, DeviceKind::cuda);
  EXPECT_EQ(damage[0].first_offset, 256);
}

TEST(GpuCast, ContractRefusesStridedInput) {
  DSV4_REQUIRE_GPU();
  Allocator device(*cuda_memory(0), AllocatorMode::plain);
  Tensor wide = Tensor::empty({4, 640}, DType::f32, device, "qkv_a");
  Tensor kv = wide.narrow(1, 128, 512);
  Tensor out = Tensor::empty({4, 512}, DType::bf16, device, "kv_bf16");
  try {
    kernels::cast_cuda(kv, out, nullptr);
    FAIL() << "a strided src was accepted";
  } catch (const ContractError& e) {
    EXPECT_EQ(e.argument(), "src");
  }
}

class GpuCastEncode : public ::testing::TestWithParam<DType> {};

}  // namespace

// gtest prints parameters with PrintTo; ctest's discovery turns the printed value into the name.
void PrintTo(DType dtype, std::ostream* os) { *os << dtype_name(dtype); }

namespace {

// All 2^32 f32 inputs, in chunks: the device kernel against the host encoder, bit for bit.
TEST_P(GpuCastEncode, MatchesTheHostEncoderOnEveryF32) {
  DSV4_REQUIRE_GPU();
  const DType to = GetParam();
  Allocator device(*cuda_memory(0), AllocatorMode::plain);
  constexpr long long kChunk = 1LL << 28;
  Tensor in = Tensor::empty({kChunk}, DType::f32, device, "bits");
  Tensor out = Tensor::empty({kChunk}, to, device, "codes");
  const size_t out_bytes = out.storage()->bytes();
  std::vector<uint8_t> got(out_bytes), want(out_bytes);
  const unsigned threads = std::max(1u, std::min(16u, std::thread::hardware_concurrency()));
  long long mismatches = 0;
  for (unsigned long long first = 0; first < (1ULL << 32); first += kChunk) {
    fill_bits<<<gpu::blocks_for(kChunk, 256), 256>>>(in.data<float>(), first, kChunk);
    kernels::cast_cuda(in, out, nullptr);
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    out.storage()->space().copy_to_host(got.data(), out.data_ptr(), out_bytes);
    // The host reference for the same chunk, split over threads on byte-aligned ranges.
    std::vector<std::thread> pool;
    for (unsigned t = 0; t < threads; ++t) {
      pool.emplace_back([&, t] {
        const long long lo = kChunk / threads * t, hi = t + 1 == threads ? kChunk : kChunk / threads * (t + 1);
        for (long long i = lo; i < hi; ++i) {
          store_code(to, want.data(), i, encode_narrow(to, f32_from_bits(static_cast<uint32_t>(first + i))));
        }
      });
    }
    for (auto& th : pool) th.join();
    if (got != want) {
      for (size_t b = 0; b < out_bytes && mismatches < 5; ++b) {
        if (got[b] != want[b]) {
          ++mismatches;
          ADD_FAILURE() << dtype_name(to) << ": chunk at 0x" << std::hex << first << " byte " << std::dec << b
                        << " device 0x" << std::hex << int(got[b]) << " host 0x" << int(want[b]);
        }
      }
    }
  }
  EXPECT_EQ(mismatches, 0);
}

INSTANTIATE_TEST_SUITE_P(Formats, GpuCastEncode,
                         ::testing::Values(DType::f8_e4m3fn, DType::f8_e4m3fnuz, DType::f8_e5m2, DType::f4_e2m1,
                                           DType::bf16, DType::f16, DType::ue8m0));

TEST(GpuCast, DecodesEveryCodeLikeTheHost) {
  DSV4_REQUIRE_GPU();
  Allocator device(*cuda_memory(0), AllocatorMode::plain);
  for (DType from : {DType::f8_e4m3fn, DType::f8_e4m3fnuz, DType::f8_e5m2, DType::f4_e2m1, DType::bf16, DType::f16,
                     DType::ue8m0}) {
    const int64_t codes = int64_t{1} << dtype_bits(from);
    Tensor host_codes = Tensor::empty({codes}, from, "codes");
    auto* raw = host_codes.data<uint8_t>();
    for (int64_t c = 0; c < codes; ++c) store_code(from, raw, c, static_cast<uint32_t>(c));
    Tensor want = Tensor::empty({codes}, DType::f32, "want");
    kernels::cast_host(host_codes, want);
    Tensor on_gpu = host_codes.to(device);
    Tensor got = Tensor::empty({codes}, DType::f32, device, "got");
    kernels::cast_cuda(on_gpu, got, nullptr);
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    const Tensor got_host = got.to(default_host_allocator());
    EXPECT_EQ(std::memcmp(got_host.data<float>(), want.data<float>(), static_cast<size_t>(codes) * 4), 0)
        << dtype_name(from);
  }
}

TEST(GpuCast, OddLengthFp4KeepsTheLastNibble) {
  DSV4_REQUIRE_GPU();
  Allocator device(*cuda_memory(0), AllocatorMode::plain);
  Tensor src = Tensor::from_values({3}, DType::f32, {0.5, -6, 3}, "x").to(device);
  Tensor dst = Tensor::empty({3}, DType::f4_e2m1, device, "q");
  kernels::cast_cuda(src, dst, nullptr);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  EXPECT_EQ(dst.values(), (std::vector<double>{0.5, -6, 3}));
}

}  // namespace
}  // namespace dsv4
