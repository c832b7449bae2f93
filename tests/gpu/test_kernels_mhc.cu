// GPU tests of the mHC kernels (kernels/cuda/mhc.cu) through their public entry points, of their
// scalar math (kernels/cuda/mhc_math.h's sigmoid, and kernels/cuda/libm.h's libm_expf, which every
// bitwise kernel shares: its one exhaustive check lives here), and of kernels/cuda/port.h on the
// hardware.
//
// hc_pre / hc_post / hc_head run on host tensors and on device copies of the same tensors; the device
// outputs must equal the host outputs bit for bit: the kernels perform the host's operations in the
// host's order, their expf is glibc's algorithm, and their f64 exp inside the sigmoid differs from
// glibc's only in ways that f32 rounding hides (both checked over all 2^32 f32 inputs below). Shapes
// cover T = 0, 1, 2, 7, 8 and 64, hc = 1, 2, 4, widths with a dot-product tail, Sinkhorn with 1 and 20
// iterations; ten reruns are bitwise identical; a CUDA graph capture replays them. The contracts refuse
// strided inputs (every mHC tensor must be contiguous), mixed devices and an aliased output. One shape
// is compared with the reference (quant-sim) bit for bit, as the host unit tests do.
//
// port.h: the hardware shuffle equals the host lane model (ModelLanes) for every mask and width, so
// the model the CPU tests run is the hardware's; the device collectives equal the model's bit for bit;
// and the FP8 e4m3fn intrinsic path equals the software path on all 2^32 f32 inputs.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include <gtest/gtest.h>

#include "tests/gpu/gpu_test.h"

#include "engine/config/model_config.h"
#include "engine/core/allocator.h"
#include "engine/core/error.h"
#include "engine/core/formats.h"
#include "engine/core/tensor.h"
#include "kernels/cuda/port.h"
#include "kernels/cuda/libm.h"
#include "kernels/cuda/mhc_math.h"
#include "kernels/device.h"
#include "kernels/mhc.h"
#include "reference/context.h"
#include "reference/mhc.h"
#include "tests/unit/reference_fixtures.h"

namespace dsv4::kernels {
namespace {

constexpr int kReruns = 10;
const std::vector<int64_t> kTokenCounts = {0, 1, 2, 7, 8, 64};

// ---- tensors ----------------------------------------------------------------------------------------

// The bytes of a contiguous tensor's elements (host or device).
std::vector<uint8_t> element_bytes(const Tensor& t) {
  std::vector<uint8_t> out(static_cast<size_t>(t.numel() * dtype_bits(t.dtype()) / 8));
  if (!out.empty()) t.storage()->space().copy_to_host(out.data(), t.data_ptr(), out.size());
  return out;
}

void expect_same_bytes(const Tensor& device, const Tensor& host, const std::string& what) {
  const std::vector<uint8_t> got = element_bytes(device), want = element_bytes(host);
  ASSERT_EQ(got.size(), want.size()) << what;
  const size_t elem = static_cast<size_t>(dtype_bits(host.dtype()) / 8);
  int64_t mismatches = 0;
  for (size_t i = 0; i < got.size(); i += elem) {
    if (std::memcmp(got.data() + i, want.data() + i, elem) != 0 && ++mismatches <= 5) {
      const double g = host.dtype() == DType::bf16 ? bf16_to_f32(static_cast<uint16_t>(got[i] | (got[i + 1] << 8)))
                                                   : [&] { float f; std::memcpy(&f, got.data() + i, 4); return f; }();
      const double w = host.dtype() == DType::bf16 ? bf16_to_f32(static_cast<uint16_t>(want[i] | (want[i + 1] << 8)))
                                                   : [&] { float f; std::memcpy(&f, want.data() + i, 4); return f; }();
      ADD_FAILURE() << what << ": element " << i / elem << " device " << g << " host " << w;
    }
  }
  EXPECT_EQ(mismatches, 0) << what;
}

// bf16 [rows, cols], one magnitude (2^-6 .. 2^6) per 16 columns, so the f64 sums see a spread of
// exponents.
Tensor random_bf16(std::mt19937_64& rng, int64_t rows, int64_t cols, const std::string& name) {
  Tensor t = Tensor::empty({rows, cols}, DType::bf16, name);
  auto* p = t.data<uint16_t>();
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  for (int64_t r = 0; r < rows; ++r) {
    float mag = 1.0f;
    for (int64_t c = 0; c < cols; ++c) {
      if (c % 16 == 0) mag = std::ldexp(1.0f, static_cast<int>(rng() % 13) - 6);
      p[r * cols + c] = f32_to_bf16(u(rng) * mag);
    }
  }
  return t;
}

Tensor random_f32(std::mt19937_64& rng, const Shape& shape, float lo, float hi, const std::string& name) {
  Tensor t = Tensor::empty(shape, DType::f32, name);
  std::uniform_real_distribution<float> u(lo, hi);
  for (int64_t i = 0; i < t.numel(); ++i) t.data<float>()[i] = u(rng);
  return t;
}

struct Shape2 {
  int64_t hc, dim, iters;
};
// n = hc * dim: 256, 13, 74 and 1200 (dot-product tails of 0, 5, 2 and 0; dim 300 > a block's threads).
const std::vector<Shape2> kShapes = {{4, 64, 20}, {1, 13, 1}, {2, 37, 3}, {4, 300, 20}};

struct MixInputs {
  Tensor R, fn, base, scale;
};

MixInputs mix_inputs(std::mt19937_64& rng, int64_t tokens, int64_t hc, int64_t dim, int64_t mixes, int64_t scales) {
  const int64_t n = hc * dim;
  const float w = 2.0f / std::sqrt(static_cast<float>(n));
  return {random_bf16(rng, tokens, n, "R"), random_f32(rng, {mixes, n}, -w, w, "fn"),
          random_f32(rng, {mixes}, -1.0f, 1.0f, "base"), random_f32(rng, {scales}, 0.5f, 2.0f, "scale")};
}

constexpr double kHcEps = 1e-6;
constexpr double kNormEps = 1e-6;

struct PreOut {
  Tensor x, post, comb;
};

PreOut run_pre(const MixInputs& in, int64_t hc, int64_t dim, int64_t iters, Allocator& where) {
  const int64_t tokens = in.R.size(0);
  PreOut out{Tensor::empty({tokens, dim}, DType::bf16, where, "x"), Tensor::empty({tokens, hc}, DType::f32, where, "post"),
             Tensor::empty({tokens, hc, hc}, DType::f32, where, "comb")};
  hc_pre(in.R, in.fn, in.base, in.scale, kHcEps, kNormEps, iters, out.x, out.post, out.comb);
  return out;
}

MixInputs on(const MixInputs& in, Allocator& device) {
  return {in.R.to(device), in.fn.to(device), in.base.to(device), in.scale.to(device)};
}

void sync() { ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess); }

// ---- hc_pre ------------------------------------------------------------------------------------------

TEST(GpuMhc, HcPreMatchesTheHostBitwise) {
  DSV4_REQUIRE_GPU();
  Allocator device(*cuda_memory(0), AllocatorMode::testing);
  std::mt19937_64 rng(11);
  for (const Shape2& s : kShapes) {
    for (int64_t tokens : kTokenCounts) {
      SCOPED_TRACE("hc " + std::to_string(s.hc) + " dim " + std::to_string(s.dim) + " T " + std::to_string(tokens));
      const MixInputs in = mix_inputs(rng, tokens, s.hc, s.dim, (2 + s.hc) * s.hc, 3);
      const PreOut want = run_pre(in, s.hc, s.dim, s.iters, default_host_allocator());
      const PreOut got = run_pre(on(in, device), s.hc, s.dim, s.iters, device);
      sync();
      expect_same_bytes(got.x, want.x, "x");
      expect_same_bytes(got.post, want.post, "post");
      expect_same_bytes(got.comb, want.comb, "comb");
    }
  }
}

TEST(GpuMhc, HcPreRerunsAreBitwiseIdentical) {
  DSV4_REQUIRE_GPU();
  Allocator device(*cuda_memory(0), AllocatorMode::testing);
  std::mt19937_64 rng(12);
  const MixInputs in = on(mix_inputs(rng, 64, 4, 300, 24, 3), device);
  const PreOut first = run_pre(in, 4, 300, 20, device);
  sync();
  for (int r = 0; r < kReruns; ++r) {
    const PreOut again = run_pre(in, 4, 300, 20, device);
    sync();
    EXPECT_EQ(element_bytes(again.x), element_bytes(first.x)) << "rerun " << r;
    EXPECT_EQ(element_bytes(again.post), element_bytes(first.post)) << "rerun " << r;
    EXPECT_EQ(element_bytes(again.comb), element_bytes(first.comb)) << "rerun " << r;
  }
}

// ---- hc_post -----------------------------------------------------------------------------------------

TEST(GpuMhc, HcPostMatchesTheHostBitwise) {
  DSV4_REQUIRE_GPU();
  Allocator device(*cuda_memory(0), AllocatorMode::testing);
  std::mt19937_64 rng(13);
  for (const Shape2& s : kShapes) {
    for (int64_t tokens : kTokenCounts) {
      SCOPED_TRACE("hc " + std::to_string(s.hc) + " dim " + std::to_string(s.dim) + " T " + std::to_string(tokens));
      // post and comb as hc_pre makes them (a doubly stochastic comb), F a layer output.
      const MixInputs in = mix_inputs(rng, tokens, s.hc, s.dim, (2 + s.hc) * s.hc, 3);
      const PreOut mix = run_pre(in, s.hc, s.dim, s.iters, default_host_allocator());
      const Tensor F = random_bf16(rng, tokens, s.dim, "F");
      Tensor want = Tensor::empty({tokens, s.hc * s.dim}, DType::bf16, "R_out");
      hc_post(F, in.R, mix.post, mix.comb, want);
      Tensor got = Tensor::empty({tokens, s.hc * s.dim}, DType::bf16, device, "R_out");
      hc_post(F.to(device), in.R.to(device), mix.post.to(device), mix.comb.to(device), got);
      sync();
      expect_same_bytes(got, want, "R_out");
    }
  }
}

TEST(GpuMhc, HcPostRerunsAreBitwiseIdentical) {
  DSV4_REQUIRE_GPU();
  Allocator device(*cuda_memory(0), AllocatorMode::testing);
  std::mt19937_64 rng(14);
  const MixInputs in = mix_inputs(rng, 64, 4, 300, 24, 3);
  const PreOut mix = run_pre(in, 4, 300, 20, default_host_allocator());
  const Tensor F = random_bf16(rng, 64, 300, "F").to(device);
  const Tensor R = in.R.to(device), post = mix.post.to(device), comb = mix.comb.to(device);
  Tensor first = Tensor::empty({64, 1200}, DType::bf16, device, "R_out");
  hc_post(F, R, post, comb, first);
  sync();
  for (int r = 0; r < kReruns; ++r) {
    Tensor again = Tensor::empty({64, 1200}, DType::bf16, device, "R_out");
    hc_post(F, R, post, comb, again);
    sync();
    EXPECT_EQ(element_bytes(again), element_bytes(first)) << "rerun " << r;
  }
}

// ---- hc_head -----------------------------------------------------------------------------------------

TEST(GpuMhc, HcHeadMatchesTheHostBitwiseAndRerunsIdentically) {
  DSV4_REQUIRE_GPU();
  Allocator device(*cuda_memory(0), AllocatorMode::testing);
  std::mt19937_64 rng(15);
  for (const Shape2& s : kShapes) {
    for (int64_t tokens : kTokenCounts) {
      SCOPED_TRACE("hc " + std::to_string(s.hc) + " dim " + std::to_string(s.dim) + " T " + std::to_string(tokens));
      const MixInputs in = mix_inputs(rng, tokens, s.hc, s.dim, s.hc, 1);
      Tensor want = Tensor::empty({tokens, s.dim}, DType::bf16, "y");
      hc_head(in.R, in.fn, in.base, in.scale, kHcEps, kNormEps, want);
      const MixInputs d = on(in, device);
      Tensor got = Tensor::empty({tokens, s.dim}, DType::bf16, device, "y");
      hc_head(d.R, d.fn, d.base, d.scale, kHcEps, kNormEps, got);
      sync();
      expect_same_bytes(got, want, "y");
      if (tokens == 64) {
        for (int r = 0; r < kReruns; ++r) {
          Tensor again = Tensor::empty({tokens, s.dim}, DType::bf16, device, "y");
          hc_head(d.R, d.fn, d.base, d.scale, kHcEps, kNormEps, again);
          sync();
          EXPECT_EQ(element_bytes(again), element_bytes(got)) << "rerun " << r;
        }
      }
    }
  }
}

// ---- a CUDA graph ------------------------------------------------------------------------------------

TEST(GpuMhc, CapturedIntoAGraphTheOpsReplayLikeTheHost) {
  DSV4_REQUIRE_GPU();
  Allocator device(*cuda_memory(0), AllocatorMode::testing);
  std::mt19937_64 rng(16);
  const int64_t tokens = 8, hc = 4, dim = 64;
  const MixInputs in = mix_inputs(rng, tokens, hc, dim, 24, 3);
  const MixInputs head_in = mix_inputs(rng, tokens, hc, dim, hc, 1);
  const Tensor F = random_bf16(rng, tokens, dim, "F");
  const PreOut want = run_pre(in, hc, dim, 20, default_host_allocator());
  Tensor want_out = Tensor::empty({tokens, hc * dim}, DType::bf16, "R_out");
  hc_post(F, in.R, want.post, want.comb, want_out);
  Tensor want_y = Tensor::empty({tokens, dim}, DType::bf16, "y");
  hc_head(head_in.R, head_in.fn, head_in.base, head_in.scale, kHcEps, kNormEps, want_y);

  const MixInputs d = on(in, device), dh = on(head_in, device);
  const Tensor dF = F.to(device);
  PreOut got{Tensor::empty({tokens, dim}, DType::bf16, device, "x"), Tensor::empty({tokens, hc}, DType::f32, device, "post"),
             Tensor::empty({tokens, hc, hc}, DType::f32, device, "comb")};
  Tensor got_out = Tensor::empty({tokens, hc * dim}, DType::bf16, device, "R_out");
  Tensor got_y = Tensor::empty({tokens, dim}, DType::bf16, device, "y");
  sync();
  cudaStream_t stream = nullptr;
  ASSERT_EQ(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), cudaSuccess);
  cudaGraph_t graph = nullptr;
  ASSERT_EQ(cudaStreamBeginCapture(stream, cudaStreamCaptureModeGlobal), cudaSuccess);
  {
    StreamScope scope(stream);
    hc_pre(d.R, d.fn, d.base, d.scale, kHcEps, kNormEps, 20, got.x, got.post, got.comb);
    hc_post(dF, d.R, got.post, got.comb, got_out);
    hc_head(dh.R, dh.fn, dh.base, dh.scale, kHcEps, kNormEps, got_y);
  }
  ASSERT_EQ(cudaStreamEndCapture(stream, &graph), cudaSuccess);
  cudaGraphExec_t exec = nullptr;
  ASSERT_EQ(cudaGraphInstantiate(&exec, graph, 0), cudaSuccess);
  for (int replay = 0; replay < 2; ++replay) {
    ASSERT_EQ(cudaGraphLaunch(exec, stream), cudaSuccess);
    ASSERT_EQ(cudaStreamSynchronize(stream), cudaSuccess);
    expect_same_bytes(got.x, want.x, "x");
    expect_same_bytes(got.post, want.post, "post");
    expect_same_bytes(got.comb, want.comb, "comb");
    expect_same_bytes(got_out, want_out, "R_out");
    expect_same_bytes(got_y, want_y, "y");
  }
  cudaGraphExecDestroy(exec);
  cudaGraphDestroy(graph);
  cudaStreamDestroy(stream);
}

// ---- the reference -----------------------------------------------------------------------------------

const ref::testing::Model& tiny() {
  static const ref::testing::Model model("tiny", 7);
  return model;
}

Tensor mat_f32(const ref::Mat& m, const Shape& shape, const std::string& name) {
  Tensor t = Tensor::empty(shape, DType::f32, name);
  std::memcpy(t.data<float>(), m.data.data(), m.data.size() * sizeof(float));
  return t;
}

Tensor mat_bf16(const ref::Mat& m, const std::string& name) {
  Tensor t = Tensor::empty({m.rows, m.cols}, DType::bf16, name);
  for (int64_t i = 0; i < m.size(); ++i) t.data<uint16_t>()[i] = f32_to_bf16(m.data[static_cast<size_t>(i)]);
  return t;
}

// Expects a device bf16 tensor to hold the reference's values rounded to bf16 (or f32 ones exactly).
void expect_reference(const Tensor& device, const ref::Mat& want, bool bf16, const std::string& what) {
  const Tensor got = device.to(default_host_allocator());
  ASSERT_EQ(got.numel(), want.size()) << what;
  int64_t mismatches = 0;
  for (int64_t i = 0; i < want.size(); ++i) {
    const float w = want.data[static_cast<size_t>(i)];
    const bool same = bf16 ? got.data<uint16_t>()[i] == f32_to_bf16(w)
                           : std::memcmp(got.data<float>() + i, &w, sizeof(float)) == 0;
    if (!same && ++mismatches <= 5) ADD_FAILURE() << what << ": element " << i << " reference " << w;
  }
  EXPECT_EQ(mismatches, 0) << what;
}

TEST(GpuMhc, MatchesTheQuantSimReferenceBitwise) {
  DSV4_REQUIRE_GPU();
  Allocator device(*cuda_memory(0), AllocatorMode::testing);
  const auto& c = tiny().config;
  const auto& w = tiny().weights;
  const ref::Context ctx{c, ref::Numerics{ref::Mode::quant_sim}};
  const int64_t tokens = 7, hc = c.hc_mult, d = c.dim;
  const ref::Mat R = ref::testing::make_input(tokens, hc * d, 8, ref::Mode::quant_sim);
  const ref::Mat F = ref::testing::make_input(tokens, d, 9, ref::Mode::quant_sim);
  const std::string prefix = "layers.1.hc_attn";
  const ref::Mat& fn = w.get(prefix + "_fn");
  const ref::Mat& base = w.get(prefix + "_base");
  const ref::Mat& scale = w.get(prefix + "_scale");
  ref::HcMix mix;
  const ref::Mat x_ref = ref::hc_pre(ctx, R, fn, base, scale, &mix);

  const Tensor dR = mat_bf16(R, "R").to(device);
  Tensor x = Tensor::empty({tokens, d}, DType::bf16, device, "x");
  Tensor post = Tensor::empty({tokens, hc}, DType::f32, device, "post");
  Tensor comb = Tensor::empty({tokens, hc, hc}, DType::f32, device, "comb");
  hc_pre(dR, mat_f32(fn, {fn.rows, fn.cols}, "fn").to(device), mat_f32(base, {base.size()}, "base").to(device),
         mat_f32(scale, {scale.size()}, "scale").to(device), c.hc_eps, c.norm_eps, c.hc_sinkhorn_iters, x, post, comb);
  Tensor R_out = Tensor::empty({tokens, hc * d}, DType::bf16, device, "R_out");
  hc_post(mat_bf16(F, "F").to(device), dR, post, comb, R_out);
  sync();
  expect_reference(x, x_ref, true, "hc_pre x");
  expect_reference(post, mix.post, false, "hc_pre post");
  expect_reference(comb, mix.comb, false, "hc_pre comb");
  expect_reference(R_out, ref::hc_post(ctx, F, R, mix), true, "hc_post");

  const ref::Mat& hfn = w.get("hc_head_fn");
  const ref::Mat& hbase = w.get("hc_head_base");
  const ref::Mat& hscale = w.get("hc_head_scale");
  Tensor y = Tensor::empty({tokens, d}, DType::bf16, device, "y");
  hc_head(dR, mat_f32(hfn, {hfn.rows, hfn.cols}, "fn").to(device), mat_f32(hbase, {hbase.size()}, "base").to(device),
          mat_f32(hscale, {hscale.size()}, "scale").to(device), c.hc_eps, c.norm_eps, y);
  sync();
  expect_reference(y, ref::hc_head(ctx, R, hfn, hbase, hscale), true, "hc_head");
}

// ---- contracts ---------------------------------------------------------------------------------------

template <class F>
void expect_contract(F&& call, const std::string& argument) {
  try {
    call();
    ADD_FAILURE() << "no ContractError; expected one naming '" << argument << "'";
  } catch (const ContractError& e) {
    EXPECT_EQ(e.argument(), argument) << e.what();
  }
}

TEST(GpuMhc, ContractsRefuseStridedMixedAndAliasedTensors) {
  DSV4_REQUIRE_GPU();
  Allocator device(*cuda_memory(0), AllocatorMode::testing);
  std::mt19937_64 rng(17);
  const int64_t tokens = 4, hc = 4, dim = 64, n = hc * dim;
  const MixInputs in = on(mix_inputs(rng, tokens, hc, dim, 24, 3), device);
  PreOut out{Tensor::empty({tokens, dim}, DType::bf16, device, "x"), Tensor::empty({tokens, hc}, DType::f32, device, "post"),
             Tensor::empty({tokens, hc, hc}, DType::f32, device, "comb")};
  // Strided R (a column slice of a wider buffer): every mHC tensor must be contiguous.
  const Tensor wide = random_bf16(rng, tokens, n + 8, "wide").to(device);
  const Tensor strided = wide.narrow(1, 0, n);
  expect_contract([&] { hc_pre(strided, in.fn, in.base, in.scale, kHcEps, kNormEps, 1, out.x, out.post, out.comb); },
                  "R");
  const Tensor F = random_bf16(rng, tokens, dim, "F").to(device);
  Tensor R_out = Tensor::empty({tokens, n}, DType::bf16, device, "R_out");
  expect_contract([&] { hc_post(F, strided, out.post, out.comb, R_out); }, "R");
  // One tensor left on the host.
  const Tensor host_fn = in.fn.to(default_host_allocator());
  expect_contract([&] { hc_pre(in.R, host_fn, in.base, in.scale, kHcEps, kNormEps, 1, out.x, out.post, out.comb); },
                  "fn");
  // R_out aliasing R.
  Tensor alias = in.R;
  expect_contract([&] { hc_post(F, in.R, out.post, out.comb, alias); }, "R_out");
  // sinkhorn_iters < 1.
  expect_contract([&] { hc_pre(in.R, in.fn, in.base, in.scale, kHcEps, kNormEps, 0, out.x, out.post, out.comb); },
                  "sinkhorn_iters");
}

// ---- libm.h's expf and mhc_math.h's sigmoid over every f32 input ------------------------------------

__global__ void fill_bits(float* out, unsigned long long first, long long n) {
  const long long i = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) out[i] = __uint_as_float(static_cast<uint32_t>(first + static_cast<unsigned long long>(i)));
}

__global__ void expf_kernel(const float* in, float* out, long long n) {
  const long long i = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) out[i] = gpu_math::libm_expf(in[i]);
}

__global__ void sigmoid_kernel(const float* in, float* out, long long n) {
  const long long i = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) out[i] = mhc_gpu::sigmoid(in[i]);
}

float host_sigmoid(float z) { return static_cast<float>(1.0 / (1.0 + std::exp(-static_cast<double>(z)))); }

// Every f32 input through a device function and its host twin; NaN results only need to be NaN.
template <class Launch, class Host>
void sweep_every_f32(const char* what, Launch launch, Host host) {
  constexpr long long kChunk = 1LL << 27;
  float* in = nullptr;
  float* out = nullptr;
  ASSERT_EQ(cudaMalloc(&in, kChunk * sizeof(float)), cudaSuccess);
  ASSERT_EQ(cudaMalloc(&out, kChunk * sizeof(float)), cudaSuccess);
  std::vector<float> got(kChunk);
  const unsigned threads = std::max(1u, std::min(16u, std::thread::hardware_concurrency()));
  std::vector<long long> mismatches(threads, 0);
  std::vector<std::string> first(threads);
  for (unsigned long long base = 0; base < (1ULL << 32); base += kChunk) {
    fill_bits<<<gpu::blocks_for(kChunk, 256), 256>>>(in, base, kChunk);
    launch(in, out, kChunk);
    ASSERT_EQ(cudaMemcpy(got.data(), out, kChunk * sizeof(float), cudaMemcpyDeviceToHost), cudaSuccess);
    std::vector<std::thread> pool;
    for (unsigned t = 0; t < threads; ++t) {
      pool.emplace_back([&, t] {
        const long long lo = kChunk / threads * t, hi = t + 1 == threads ? kChunk : kChunk / threads * (t + 1);
        for (long long i = lo; i < hi; ++i) {
          const uint32_t bits = static_cast<uint32_t>(base + static_cast<unsigned long long>(i));
          const float x = f32_from_bits(bits);
          const float want = host(x);
          const float g = got[static_cast<size_t>(i)];
          if (f32_bits(g) == f32_bits(want) || (std::isnan(g) && std::isnan(want))) continue;
          if (mismatches[t]++ == 0) {
            char line[160];
            std::snprintf(line, sizeof line, "x = %a (0x%08x): device %a, host %a", x, bits, g, want);
            first[t] = line;
          }
        }
      });
    }
    for (auto& th : pool) th.join();
  }
  cudaFree(in);
  cudaFree(out);
  long long total = 0;
  for (unsigned t = 0; t < threads; ++t) {
    total += mismatches[t];
    if (mismatches[t] > 0) ADD_FAILURE() << what << ": " << first[t];
  }
  EXPECT_EQ(total, 0) << what << " differs from the host on " << total << " of 2^32 inputs";
}

// libm.h's libm_expf, the exp of the compressor, mHC and sparse attention kernels: the one check of
// the device function against this host's std::exp(float), over every input.
TEST(GpuMhcMath, LibmExpfEqualsTheHostExpOnEveryF32) {
  DSV4_REQUIRE_GPU();
  sweep_every_f32(
      "libm_expf",
      [](const float* in, float* out, long long n) { expf_kernel<<<gpu::blocks_for(n, 256), 256>>>(in, out, n); },
      [](float x) { return std::exp(x); });
}

TEST(GpuMhcMath, SigmoidEqualsTheHostSigmoidOnEveryF32) {
  DSV4_REQUIRE_GPU();
  sweep_every_f32(
      "sigmoid",
      [](const float* in, float* out, long long n) { sigmoid_kernel<<<gpu::blocks_for(n, 256), 256>>>(in, out, n); },
      host_sigmoid);
}

// ---- port.h on the hardware --------------------------------------------------------------------------

constexpr int kMasks = 64;
constexpr int kWidths = 6;  // 1, 2, 4, 8, 16, 32 (CUDA's warp)

__global__ void shuffle_kernel(const int* in, int* out) {
  const int lane = static_cast<int>(threadIdx.x);
  const int v = in[lane];
  for (int mask = 0; mask < kMasks; ++mask) {
    for (int w = 0; w < kWidths; ++w) out[(mask * kWidths + w) * gpu::kWarpSize + lane] = gpu::shfl_xor(v, mask, 1 << w);
  }
}

__global__ void collectives_kernel(const float* in, float* sums, float* maxes, float* warp) {
  const int lane = static_cast<int>(threadIdx.x);
  const float v = in[lane];
  for (int w = 0; w < kWidths; ++w) {
    sums[w * gpu::kWarpSize + lane] = gpu::group_sum(v, 1 << w);
    maxes[w * gpu::kWarpSize + lane] = gpu::group_max(v, 1 << w);
  }
  warp[lane] = gpu::warp_sum(v);
  warp[gpu::kWarpSize + lane] = gpu::warp_max(v);
}

TEST(GpuPort, HardwareShuffleIsTheLaneModel) {
  DSV4_REQUIRE_GPU();
  constexpr int W = gpu::kWarpSize;
  int* in = nullptr;
  int* out = nullptr;
  ASSERT_EQ(cudaMalloc(&in, W * sizeof(int)), cudaSuccess);
  ASSERT_EQ(cudaMalloc(&out, kMasks * kWidths * W * sizeof(int)), cudaSuccess);
  gpu::LaneArray<int, W> v;
  for (int i = 0; i < W; ++i) v.lane[i] = 1000 + i;
  ASSERT_EQ(cudaMemcpy(in, v.lane, sizeof v.lane, cudaMemcpyHostToDevice), cudaSuccess);
  shuffle_kernel<<<1, W>>>(in, out);
  std::vector<int> got(static_cast<size_t>(kMasks * kWidths * W));
  ASSERT_EQ(cudaMemcpy(got.data(), out, got.size() * sizeof(int), cudaMemcpyDeviceToHost), cudaSuccess);
  for (int mask = 0; mask < kMasks; ++mask) {
    for (int w = 0; w < kWidths; ++w) {
      const auto want = gpu::ModelLanes<W>::shfl_xor(v, mask, 1 << w);
      for (int lane = 0; lane < W; ++lane) {
        EXPECT_EQ(got[static_cast<size_t>((mask * kWidths + w) * W + lane)], want.lane[lane])
            << "mask " << mask << " width " << (1 << w) << " lane " << lane;
      }
    }
  }
  cudaFree(in);
  cudaFree(out);
}

TEST(GpuPort, DeviceCollectivesEqualTheModelBitwise) {
  DSV4_REQUIRE_GPU();
  constexpr int W = gpu::kWarpSize;
  std::mt19937_64 rng(18);
  gpu::LaneArray<float, W> v;
  for (float& x : v.lane) x = std::ldexp(std::uniform_real_distribution<float>(-1, 1)(rng), static_cast<int>(rng() % 41) - 20);
  float* in = nullptr;
  float* out = nullptr;
  ASSERT_EQ(cudaMalloc(&in, W * sizeof(float)), cudaSuccess);
  ASSERT_EQ(cudaMalloc(&out, (2 * kWidths + 2) * W * sizeof(float)), cudaSuccess);
  ASSERT_EQ(cudaMemcpy(in, v.lane, sizeof v.lane, cudaMemcpyHostToDevice), cudaSuccess);
  collectives_kernel<<<1, W>>>(in, out, out + kWidths * W, out + 2 * kWidths * W);
  std::vector<float> got(static_cast<size_t>((2 * kWidths + 2) * W));
  ASSERT_EQ(cudaMemcpy(got.data(), out, got.size() * sizeof(float), cudaMemcpyDeviceToHost), cudaSuccess);
  for (int w = 0; w < kWidths; ++w) {
    const auto sum = gpu::group_sum(v, 1 << w);
    const auto mx = gpu::group_max(v, 1 << w);
    for (int lane = 0; lane < W; ++lane) {
      EXPECT_EQ(f32_bits(got[static_cast<size_t>(w * W + lane)]), f32_bits(sum.lane[lane])) << "width " << (1 << w);
      EXPECT_EQ(f32_bits(got[static_cast<size_t>((kWidths + w) * W + lane)]), f32_bits(mx.lane[lane]))
          << "width " << (1 << w);
    }
  }
  const auto ws = gpu::warp_sum(v);
  const auto wm = gpu::warp_max(v);
  for (int lane = 0; lane < W; ++lane) {
    EXPECT_EQ(f32_bits(got[static_cast<size_t>(2 * kWidths * W + lane)]), f32_bits(ws.lane[lane]));
    EXPECT_EQ(f32_bits(got[static_cast<size_t>((2 * kWidths + 1) * W + lane)]), f32_bits(wm.lane[lane]));
  }
  cudaFree(in);
  cudaFree(out);
}

// counts[0]: to_e4m3fn != software; counts[1]: the raw intrinsic != software on a non-NaN input;
// counts[2]: the raw intrinsic not a NaN code on a NaN input; counts[3]: ... of those, sign differs.
__global__ void fp8_paths_kernel(unsigned long long first, long long n, unsigned long long* counts,
                                 unsigned long long* first_bad) {
  for (long long i = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<long long>(gridDim.x) * blockDim.x) {
    const auto bits = static_cast<uint32_t>(first + static_cast<unsigned long long>(i));
    const float x = __uint_as_float(bits);
    const uint8_t sw = gpu::e4m3fn_software(x);
    const uint8_t chosen = gpu::to_e4m3fn(x);
    const auto raw = static_cast<uint8_t>(__nv_cvt_float_to_fp8(x, __NV_SATFINITE, __NV_E4M3));
    const bool nan = (bits & 0x7FFFFFFFu) > 0x7F800000u;
    if (chosen != sw) {
      atomicAdd(&counts[0], 1ull);
      atomicMin(first_bad, static_cast<unsigned long long>(bits));
    }
    if (!nan && raw != sw) {
      atomicAdd(&counts[1], 1ull);
      atomicMin(first_bad, static_cast<unsigned long long>(bits));
    }
    if (nan && (raw & 0x7Fu) != 0x7Fu) atomicAdd(&counts[2], 1ull);
    if (nan && (raw & 0x80u) != (sw & 0x80u)) atomicAdd(&counts[3], 1ull);
  }
}

TEST(GpuPort, Fp8IntrinsicAndSoftwarePathsAgreeOnEveryF32) {
  DSV4_REQUIRE_GPU();
  unsigned long long* counts = nullptr;
  ASSERT_EQ(cudaMalloc(&counts, 5 * sizeof(unsigned long long)), cudaSuccess);
  ASSERT_EQ(cudaMemset(counts, 0, 4 * sizeof(unsigned long long)), cudaSuccess);
  ASSERT_EQ(cudaMemset(counts + 4, 0xFF, sizeof(unsigned long long)), cudaSuccess);
  constexpr long long kChunk = 1LL << 30;
  for (unsigned long long base = 0; base < (1ULL << 32); base += kChunk) {
    fp8_paths_kernel<<<4096, 256>>>(base, kChunk, counts, counts + 4);
    ASSERT_EQ(cudaGetLastError(), cudaSuccess);
  }
  unsigned long long c[5];
  ASSERT_EQ(cudaMemcpy(c, counts, sizeof c, cudaMemcpyDeviceToHost), cudaSuccess);
  cudaFree(counts);
  EXPECT_EQ(c[0], 0u) << "to_e4m3fn differs from the software encoder; first input 0x" << std::hex << c[4];
  EXPECT_EQ(c[1], 0u) << "the hardware conversion differs from the software encoder; first input 0x" << std::hex << c[4];
  EXPECT_EQ(c[2], 0u) << "the hardware conversion of a NaN is not a NaN code";
  // Informational: the hardware returns one NaN code for every NaN (to_e4m3fn restores the sign).
  std::printf("fp8: hardware NaN codes whose sign differs from the input's: %llu of 2^24 NaNs\n", c[3]);
}

}  // namespace
}  // namespace dsv4::kernels
