// GPU tests of the GEMM and quantization kernels: kernels/quant_gemm.h (act_quant_fp8,
// gemm_fp8_block_scaled, gemm_fp4_weights, linear_fp8, linear_projection), kernels/int8_gemm.h
// (act_quant_int8, gemm_int8_per_channel, linear_projection's int8 path) and moe_gate_logits
// (kernels/moe.h).
//
// The CUDA kernels sum every output element in one thread, in the host kernels' order (per K-block
// partial sums in ascending k, then the scaled accumulation; or one fp32 accumulator in ascending k;
// or an exact int32 sum), with separately rounded multiplies and adds where a product can be
// inexact. So every comparison with the host here is bitwise, over token counts 0, 1, 2, an odd
// count and the capture buckets 8 and 64 (both tile shapes: <= 16 tokens and more), strided inputs
// and outputs equal to the contiguous ones (with the output's row padding left untouched), ten
// reruns, and one CUDA graph replay. Each op is also compared once with the scalar reference
// (reference/, quant-sim) under the host unit tests' tolerances. Inputs are finite wherever an
// output is a sum: a NaN's payload and sign are not portable between the host and the GPU (the
// quantizers, whose NaN handling is a rule of their own, do get NaN and infinity inputs).
//
// The FP8 x FP8 GEMM has two CUDA paths (kernels/cuda/fp8_gemm_cublaslt.h). Every bitwise test here
// runs the portable kernel: this binary sets the process-wide switch to portable before any test
// (whatever DSV4_FP8_GEMM says). The GpuFp8Cublaslt tests switch to cuBLASLt explicitly and compare it
// with the host within a stated tolerance: per element |got - host| <= 2^-11 · Σ_k |x̂_k ŵ_k| +
// 2^-7 · |host| (the tensor cores' partial sums of a 128-deep block keep fewer bits than the host's
// fp32 sums, plus one bf16 rounding), and the cosine distance over the whole output below 1e-5.
// Seen on an H100 (cuBLASLt 13.0): ~92% of outputs bitwise equal to the host, ~99% within one bf16
// ulp, cosine distance ~5e-7, the worst element at 1.02 x 2^-12 · Σ|x̂ŵ|.
#include <algorithm>
#include <cstdio>
#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "tests/gpu/gpu_test.h"

#include "engine/config/model_config.h"
#include "engine/core/allocator.h"
#include "engine/core/error.h"
#include "engine/core/formats.h"
#include "engine/core/tensor.h"
#include "kernels/attn_output.h"
#include "kernels/cuda/dense_gemm_cublaslt.h"
#include "kernels/cuda/fp8_gemm_cublaslt.h"
#include "kernels/cuda/port.h"
#include "kernels/device.h"
#include "kernels/int8_gemm.h"
#include "kernels/moe.h"
#include "kernels/quant_gemm.h"
#include "reference/context.h"
#include "reference/linear.h"
#include "reference/quant.h"

namespace dsv4::kernels {
namespace {

using ref::Mat;
using Bytes = std::vector<uint8_t>;

// Token counts: empty, one, two, odd, and the capture buckets 8 and 64, and one above 128.
constexpr int64_t kTokenCounts[] = {0, 1, 2, 7, 8, 64, 130};
bool strided_case(int64_t T) { return T == 7 || T == 130; }

void sync() { ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess); }

// The bytes of a tensor's elements in row-major order (device tensors are copied to the host).
Bytes bytes_of(const Tensor& t) {
  Tensor h = t.contiguous();
  if (h.device().kind != DeviceKind::host) h = h.to(default_host_allocator());
  Bytes b(static_cast<size_t>(dtype_storage_bytes(h.dtype(), h.numel())));
  if (!b.empty()) std::memcpy(b.data(), h.data_ptr(), b.size());
  return b;
}

void expect_same_bytes(const Tensor& got, const Tensor& want, const std::string& what) {
  const Bytes g = bytes_of(got), w = bytes_of(want);
  ASSERT_EQ(g.size(), w.size()) << what;
  size_t bad = 0, first = 0;
  for (size_t i = 0; i < g.size(); ++i) {
    if (g[i] != w[i] && bad++ == 0) first = i;
  }
  EXPECT_EQ(bad, 0u) << what << ": " << bad << " of " << g.size() << " bytes differ, first at byte " << first
                     << " (" << int(g[first]) << " vs " << int(w[first]) << ")";
}

Mat to_mat(const Tensor& t, int64_t rows, int64_t cols) {
  Mat m(rows, cols);
  const std::vector<double> v = t.values();
  for (size_t i = 0; i < v.size(); ++i) m.data[i] = static_cast<float>(v[i]);
  return m;
}

// [rows, cols] activations, N(0, 1) rounded to bf16, with a different kind of row by r % 7:
// 1 = the first 64 columns zero (the amax floors), 2 = tiny, 3 = large, 4 = 448 and an e4m3 tie,
// 5 = a NaN and a -inf (only with `non_finite`), 6 = int8 rounding ties (amax 127/64, values
// (2j + 1)/128). `bf16_values = false` leaves the N(0, 1) values unrounded (f32 inputs).
std::vector<float> activations(int64_t rows, int64_t cols, unsigned seed, bool non_finite = false,
                               bool bf16_values = true) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> v(static_cast<size_t>(rows * cols));
  for (int64_t r = 0; r < rows; ++r) {
    float* row = v.data() + r * cols;
    for (int64_t k = 0; k < cols; ++k) {
      const float x = normal(rng);
      row[k] = bf16_values ? round_bf16(x) : x;
    }
    switch (r % 7) {
      case 1:
        for (int64_t k = 0; k < std::min<int64_t>(cols, 64); ++k) row[k] = 0.0f;
        break;
      case 2:
        for (int64_t k = 0; k < cols; ++k) row[k] = round_bf16(row[k] * 1e-6f);
        break;
      case 3:
        for (int64_t k = 0; k < cols; ++k) row[k] = round_bf16(row[k] * 3e4f);
        break;
      case 4:
        row[0] = 448.0f;
        if (cols > 1) row[1] = -17.0f;
        break;
      case 5:
        if (non_finite) {
          row[0] = std::numeric_limits<float>::quiet_NaN();  // positive: see the file comment
          if (cols > 2) row[cols / 2] = -std::numeric_limits<float>::infinity();
        }
        break;
      case 6:
        for (int64_t k = 0; k < cols; ++k) {
          const int64_t j = (k * 37) % 127;
          row[k] = static_cast<float>((2 * j + 1) * ((k % 2) ? -1 : 1)) / 128.0f;
        }
        row[0] = 127.0f / 64.0f;
        break;
      default: break;
    }
  }
  return v;
}

Mat mat_of(const std::vector<float>& v, int64_t rows, int64_t cols) {
  Mat m(rows, cols);
  std::copy(v.begin(), v.end(), m.data.begin());
  return m;
}

// A host tensor and the same tensor on the device. With pad > 0 both are views of [rows, cols + pad]
// buffers (rows cols + pad elements apart), the pad columns holding `pad_value`.
struct Pair {
  Tensor host, dev;
};

Pair make_pair(int64_t rows, int64_t cols, DType dtype, const std::vector<float>& v, Allocator& device, int64_t pad,
               const std::string& name) {
  std::vector<double> wide(static_cast<size_t>(rows * (cols + pad)), 5.0);
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < cols; ++c) wide[static_cast<size_t>(r * (cols + pad) + c)] = v[static_cast<size_t>(r * cols + c)];
  }
  const Tensor base = Tensor::from_values({rows, cols + pad}, dtype, wide, name);
  Tensor dev = base.to(device);
  if (pad == 0) return {base, dev};
  return {base.narrow(1, 0, cols), dev.narrow(1, 0, cols)};
}

// Random bytes in [lo, hi] as a [rows, cols (+ pad)] tensor of a one-byte dtype (e4m3: no NaN codes),
// on the host and the device; with pad > 0, views of the first `cols` columns.
Pair make_codes(int64_t rows, int64_t cols, DType dtype, unsigned seed, int lo, int hi, Allocator& device,
                int64_t pad = 0, const std::string& name = "codes") {
  std::mt19937 rng(seed);
  Tensor base = Tensor::empty({rows, cols + pad}, dtype, name);
  auto* b = static_cast<uint8_t*>(base.data_ptr());
  for (int64_t i = 0; i < rows * (cols + pad); ++i) {
    uint8_t c = static_cast<uint8_t>(lo + static_cast<int>(rng() % static_cast<unsigned>(hi - lo + 1)));
    if (dtype == DType::f8_e4m3fn && (c & 0x7F) == 0x7F) c ^= 1;  // 0x7E / 0xFE: the largest finite values
    b[i] = c;
  }
  Tensor dev = base.to(device);
  if (pad == 0) return {base, dev};
  return {base.narrow(1, 0, cols), dev.narrow(1, 0, cols)};
}

// f32 values uniform in [lo, hi), shape [n], on both sides.
Pair make_f32(int64_t n, unsigned seed, float lo, float hi, Allocator& device, const std::string& name) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> u(lo, hi);
  std::vector<double> v(static_cast<size_t>(n));
  for (double& x : v) x = u(rng);
  const Tensor h = Tensor::from_values({n}, DType::f32, v, name);
  return {h, h.to(device)};
}

// An output on both sides. pad == 0: fresh tensors (the device one poisoned by the testing
// allocator, so an unwritten element shows). pad > 0: views of [rows, cols + pad] buffers filled with
// a sentinel on both sides; `base` compares the whole buffers, pad included.
struct Out {
  Tensor host, dev, host_base, dev_base;
};

Out make_out(int64_t rows, int64_t cols, DType dtype, Allocator& device, int64_t pad = 0) {
  if (pad == 0) {
    Tensor h = Tensor::empty({rows, cols}, dtype, "out");
    Tensor d = Tensor::empty({rows, cols}, dtype, device, "out");
    return {h, d, h, d};
  }
  Tensor hb = Tensor::empty({rows, cols + pad}, dtype, "out_base");
  hb.fill(-3.0);
  Tensor db = hb.to(device);
  return {hb.narrow(1, 0, cols), db.narrow(1, 0, cols), hb, db};
}

// Runs `run` (which enqueues device work and returns the device output) ten times; every run's
// bytes equal the first's.
template <class F>
void expect_reruns_identical(F&& run) {
  const Tensor t0 = run();
  sync();
  const Bytes first = bytes_of(t0);
  for (int i = 1; i < 10; ++i) {
    const Tensor t = run();
    sync();
    EXPECT_EQ(bytes_of(t), first) << "rerun " << i;
  }
}

template <class F>
void expect_contract_error(F&& f, const std::string& argument) {
  try {
    f();
    ADD_FAILURE() << "no ContractError for " << argument;
  } catch (const ContractError& e) {
    EXPECT_EQ(e.argument(), argument) << e.what();
  }
}

const ModelConfig& config() {
  static const ModelConfig c{};  // the reference's linear reads act_block_size (128) only
  return c;
}
ref::Context quant_ctx() { return ref::Context{config(), ref::Numerics{ref::Mode::quant_sim}, nullptr, nullptr}; }

// Against the reference's linear (fp64 sums of the products, rounded once): per element
// |got - want| <= gamma · Σ_k |x̂_k ŵ_k| + rel · |want| (the recursive-summation bound of the
// kernels' fp32 sums, plus one rounding of the output format: 2^-7 for bf16, 2^-24 for f32).
// Returns the share of elements that are identical.
double expect_near_reference(const Mat& got, const Mat& want, const Mat& x_hat, const Mat& w_hat, double gamma,
                             double rel) {
  int64_t exact = 0;
  for (int64_t t = 0; t < want.rows; ++t) {
    for (int64_t n = 0; n < want.cols; ++n) {
      double abs_sum = 0.0;
      for (int64_t k = 0; k < x_hat.cols; ++k) abs_sum += std::abs(static_cast<double>(x_hat.at(t, k)) * w_hat.at(n, k));
      const double r = want.at(t, n);
      EXPECT_LE(std::abs(got.at(t, n) - r), gamma * abs_sum + rel * std::abs(r) + 1e-30) << "t " << t << " n " << n;
      exact += got.at(t, n) == want.at(t, n) ? 1 : 0;
    }
  }
  return want.size() == 0 ? 1.0 : static_cast<double>(exact) / static_cast<double>(want.size());
}

// The bitwise tests run the portable FP8 and bf16 GEMMs; the cuBLASLt tests below switch explicitly.
const bool kPortableGemmsByDefault = [] {
  cuda::set_fp8_gemm_path(cuda::Fp8GemmPath::portable);
  cuda::set_dense_gemm_path(cuda::DenseGemmPath::portable);
  return true;
}();

// ---- act_quant_fp8 --------------------------------------------------------------------------------

TEST(GpuActQuantFp8, EqualsHostBitForBit) {
  DSV4_REQUIRE_GPU();
  Allocator device(*cuda_memory(0), AllocatorMode::testing);
  struct Case {
    int64_t K, block;
  };
  for (const DType dtype : {DType::bf16, DType::f32}) {
    for (const Case c : {Case{256, 128}, Case{192, 64}, Case{96, 32}}) {
      for (const int64_t T : kTokenCounts) {
        for (const int64_t pad : {int64_t{0}, int64_t{32}}) {
          if (pad != 0 && !strided_case(T)) continue;
          SCOPED_TRACE(std::string(dtype_name(dtype)) + " K " + std::to_string(c.K) + " block " +
                       std::to_string(c.block) + " T " + std::to_string(T) + " pad " + std::to_string(pad));
          const std::vector<float> v = activations(T, c.K, 11 + static_cast<unsigned>(T), dtype == DType::f32,
                                                   dtype == DType::bf16);
          const Pair x = make_pair(T, c.K, dtype, v, device, pad, "x");
          Out q = make_out(T, c.K, DType::f8_e4m3fn, device, pad / 2);
          Out s = make_out(T, c.K / c.block, DType::ue8m0, device);
          act_quant_fp8(x.host, c.block, q.host, s.host);
          act_quant_fp8(x.dev, c.block, q.dev, s.dev);
          sync();
          expect_same_bytes(q.dev_base, q.host_base, "q");
          expect_same_bytes(s.dev_base, s.host_base, "scales");
        }
      }
    }
  }
  EXPECT_TRUE(device.check_guards().empty());
}

TEST(GpuActQuantFp8, DequantizedEqualsReferenceAndRerunsAreIdentical) {
  DSV4_REQUIRE_GPU();
  Allocator device(*cuda_memory(0), AllocatorMode::testing);
  const int64_t T = 7, K = 512;
  const std::vector<float> v = activations(T, K, 21);
  const Pair x = make_pair(T, K, DType::bf16, v, device, 0, "x");
  auto run = [&] {
    Tensor q = Tensor::empty({T, K}, DType::f8_e4m3fn, device, "q");
    Tensor s = Tensor::empty({T, K / 128}, DType::ue8m0, device, "s");
    act_quant_fp8(x.dev, 128, q, s);
    return q;
  };
  expect_reruns_identical(run);
  Tensor q = Tensor::empty({T, K}, DType::f8_e4m3fn, device, "q");
  Tensor s = Tensor::empty({T, K / 128}, DType::ue8m0, device, "s");
  act_quant_fp8(x.dev, 128, q, s);
  sync();
  const Bytes qb = bytes_of(q), sb = bytes_of(s);
  Mat want = mat_of(v, T, K);
  ref::fp8_quant_dequant_rows(want, 128);
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t k = 0; k < K; ++k) {
      const float got = e4m3fn_to_f32(qb[static_cast<size_t>(t * K + k)]) * ue8m0_to_f32(sb[static_cast<size_t>(t * 4 + k / 128)]);
      ASSERT_EQ(f32_bits(got), f32_bits(want.at(t, k))) << "t " << t << " k " << k;
    }
  }
}

TEST(GpuActQuantFp8, ContractsOnDevice) {
  DSV4_REQUIRE_GPU();
  Allocator device(*cuda_memory(0), AllocatorMode::testing);
  const Tensor wide = Tensor::empty({2, 512}, DType::bf16, device, "wide");
  const Tensor x_strided = wide.slice(1, 0, 512, 2);  // [2, 256], inner stride 2
  Tensor q = Tensor::empty({2, 256}, DType::f8_e4m3fn, device, "q");
  Tensor s = Tensor::empty({2, 2}, DType::ue8m0, device, "s");
  expect_contract_error([&] { act_quant_fp8(x_strided, 128, q, s); }, "x");
  const Tensor x = Tensor::empty({2, 256}, DType::bf16, device, "x");
  Tensor s_wrong = Tensor::empty({2, 4}, DType::ue8m0, device, "s_wrong");
  expect_contract_error([&] { act_quant_fp8(x, 128, q, s_wrong); }, "scales");
  expect_contract_error([&] { act_quant_fp8(x, 0, q, s); }, "block");
  // Every tensor on one device: a host x with device outputs is refused, naming the first mismatch.
  const Tensor x_host = Tensor::empty({2, 256}, DType::bf16, "x_host");
  expect_contract_error([&] { act_quant_fp8(x_host, 128, q, s); }, "q");
}

// ---- gemm_fp8_block_scaled --------------------------------------------------------------------------

TEST(GpuGemmFp8, EqualsHostBitForBit) {
  DSV4_REQUIRE_GPU();
  Allocator device(*cuda_memory(0), AllocatorMode::testing);
  struct Case {
    int64_t N, K, block;
  };
  // N = 200: a partial last 128-row weight block; K = 384: three K-blocks; a 32-block case too.
  for (const Case c : {Case{200, 384, 128}, Case{128, 256, 128}, Case{72, 96, 32}}) {
    const int64_t nb = c.K / c.block;
    const Pair w = make_codes(c.N, c.K, DType::f8_e4m3fn, 31, 0, 255, device, 0, "w");
    const Pair ws = make_codes((c.N + c.block - 1) / c.block, nb, DType::ue8m0, 32, 117, 130, device, 0, "ws");
    for (const int64_t T : kTokenCounts) {
      for (const int64_t pad : {int64_t{0}, int64_t{64}}) {
        if (pad != 0 && !strided_case(T)) continue;
        SCOPED_TRACE("N " + std::to_string(c.N) + " K " + std::to_string(c.K) + " T " + std::to_string(T) + " pad " +
                     std::to_string(pad));
        const Pair q = make_codes(T, c.K, DType::f8_e4m3fn, 33 + static_cast<unsigned>(T), 0, 255, device, pad, "q");
        const Pair sa = make_codes(T, nb, DType::ue8m0, 34, 117, 130, device, 0, "sa");
        Out out = make_out(T, c.N, DType::bf16, device, pad / 8);
        gemm_fp8_block_scaled(q.host, sa.host, w.host, ws.host, out.host, c.block);
        gemm_fp8_block_scaled(q.dev, sa.dev, w.dev, ws.dev, out.dev, c.block);
        sync();
        expect_same_bytes(out.dev_base, out.host_base, "out");
        if (T == 64 && pad == 0) {
          expect_reruns_identical([&] {
            Tensor o = Tensor::empty({T, c.N}, DType::bf16, device, "o");
            gemm_fp8_block_scaled(q.dev, sa.dev, w.dev, ws.dev, o, c.block);
            return o;
          });
        }
      }
    }
  }
  EXPECT_TRUE(device.check_guards().empty());
}

TEST(GpuGemmFp8, MatchesReferenceLinear) {
  DSV4_REQUIRE_GPU();
  Allocator device(*cuda_memory(0), AllocatorMode::testing);
  const int64_t T = 7, N = 200, K = 384;
  const Pair w = make_codes(N, K, DType::f8_e4m3fn, 41, 0, 255, device, 0, "w");
  const Pair ws = make_codes(2, 3, DType::ue8m0, 42, 117, 130, device, 0, "ws");
  Mat w_hat(N, K);
  const auto* wb = static_cast<const uint8_t*>(w.host.data_ptr());
  const auto* sb = static_cast<const uint8_t*>(ws.host.data_ptr());
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t k = 0; k < K; ++k) w_hat.at(n, k) = e4m3fn_to_f32(wb[n * K + k]) * ue8m0_to_f32(sb[(n / 128) * 3 + k / 128]);
  }
  const std::vector<float> v = activations(T, K, 43);
  const Pair x = make_pair(T, K, DType::bf16, v, device, 0, "x");
  Tensor q = Tensor::empty({T, K}, DType::f8_e4m3fn, device, "q");
  Tensor s = Tensor::empty({T, 3}, DType::ue8m0, device, "s");
  Tensor out = Tensor::empty({T, N}, DType::bf16, device, "out");
  act_quant_fp8(x.dev, 128, q, s);
  gemm_fp8_block_scaled(q, s, w.dev, ws.dev, out);
  sync();
  const Mat x_mat = mat_of(v, T, K);
  Mat x_hat = x_mat;
  ref::fp8_quant_dequant_rows(x_hat, 128);
  const Mat want = ref::linear(quant_ctx(), x_mat, w_hat, ref::LinearKind::fp8);
  // The host unit test's bound: (block + K / block + 1) fp32 roundings of Σ|x̂ŵ|, then one bf16 ulp.
  const double exact = expect_near_reference(to_mat(out, T, N), want, x_hat, w_hat, (128 + 3 + 1) * 0x1.0p-24, 0x1.0p-7);
  EXPECT_GE(exact, 0.99);
}

TEST(GpuGemmFp8, ContractsOnDevice) {
  DSV4_REQUIRE_GPU();
  Allocator device(*cuda_memory(0), AllocatorMode::testing);
  const Tensor q = Tensor::empty({2, 256}, DType::f8_e4m3fn, device, "q");
  const Tensor s = Tensor::empty({2, 2}, DType::ue8m0, device, "s");
  const Tensor w = Tensor::empty({128, 256}, DType::f8_e4m3fn, device, "w");
  const Tensor ws = Tensor::empty({1, 2}, DType::ue8m0, device, "ws");
  Tensor out = Tensor::empty({2, 128}, DType::bf16, device, "out");
  const Tensor wt = Tensor::empty({256, 128}, DType::f8_e4m3fn, device, "wt").transpose(0, 1);
  expect_contract_error([&] { gemm_fp8_block_scaled(q, s, wt, ws, out); }, "w");
  const Tensor per_row = Tensor::empty({128, 2}, DType::ue8m0, device, "per_row");
  expect_contract_error([&] { gemm_fp8_block_scaled(q, s, w, per_row, out); }, "w_scales");
  const Tensor q_strided = Tensor::empty({2, 512}, DType::f8_e4m3fn, device, "q_wide").slice(1, 0, 512, 2);
  expect_contract_error([&] { gemm_fp8_block_scaled(q_strided, s, w, ws, out); }, "q_act");
  Tensor out_host = Tensor::empty({2, 128}, DType::bf16, "out_host");
  expect_contract_error([&] { gemm_fp8_block_scaled(q, s, w, ws, out_host); }, "out");
}

// ---- gemm_fp4_weights -------------------------------------------------------------------------------

TEST(GpuGemmFp4, EqualsHostBitForBit) {
  DSV4_REQUIRE_GPU();
  Allocator device(*cuda_memory(0), AllocatorMode::testing);
  struct Case {
    int64_t N, K, act_block, w_block;
    DType w_dtype;
  };
  for (const Case c : {Case{96, 256, 128, 32, DType::u8}, Case{130, 128, 128, 32, DType::i8},
                       Case{40, 192, 64, 16, DType::u8}}) {
    const Pair w = make_codes(c.N, c.K / 2, c.w_dtype, 51, 0, 255, device, 0, "w");
    const Pair ws = make_codes(c.N, c.K / c.w_block, DType::ue8m0, 52, 117, 130, device, 0, "ws");
    for (const int64_t T : kTokenCounts) {
      for (const int64_t pad : {int64_t{0}, int64_t{64}}) {
        if (pad != 0 && !strided_case(T)) continue;
        SCOPED_TRACE("N " + std::to_string(c.N) + " K " + std::to_string(c.K) + " T " + std::to_string(T) + " pad " +
                     std::to_string(pad));
        const Pair q = make_codes(T, c.K, DType::f8_e4m3fn, 53 + static_cast<unsigned>(T), 0, 255, device, pad, "q");
        const Pair sa = make_codes(T, c.K / c.act_block, DType::ue8m0, 54, 117, 130, device, 0, "sa");
        Out out = make_out(T, c.N, DType::bf16, device, pad / 8);
        gemm_fp4_weights(q.host, sa.host, w.host, ws.host, out.host, c.act_block, c.w_block);
        gemm_fp4_weights(q.dev, sa.dev, w.dev, ws.dev, out.dev, c.act_block, c.w_block);
        sync();
        expect_same_bytes(out.dev_base, out.host_base, "out");
        if (T == 64 && pad == 0) {
          expect_reruns_identical([&] {
            Tensor o = Tensor::empty({T, c.N}, DType::bf16, device, "o");
            gemm_fp4_weights(q.dev, sa.dev, w.dev, ws.dev, o, c.act_block, c.w_block);
            return o;
          });
        }
      }
    }
  }
  // Contracts: the FP8 block layout for FP4 weights, and unpacked weights.
  const Tensor q = Tensor::empty({2, 256}, DType::f8_e4m3fn, device, "q");
  const Tensor s = Tensor::empty({2, 2}, DType::ue8m0, device, "s");
  Tensor out = Tensor::empty({2, 128}, DType::bf16, device, "out");
  const Tensor w4 = Tensor::empty({128, 128}, DType::u8, device, "w4");
  expect_contract_error([&] { gemm_fp4_weights(q, s, w4, Tensor::empty({1, 2}, DType::ue8m0, device, "x"), out); },
                        "w_scales");
  expect_contract_error(
      [&] { gemm_fp4_weights(q, s, Tensor::empty({128, 256}, DType::u8, device, "w"), Tensor::empty({128, 8}, DType::ue8m0, device, "s4"), out); },
      "w");
  EXPECT_TRUE(device.check_guards().empty());
}

TEST(GpuGemmFp4, MatchesReferenceLinear) {
  DSV4_REQUIRE_GPU();
  Allocator device(*cuda_memory(0), AllocatorMode::testing);
  const int64_t T = 7, N = 96, K = 256;
  const Pair w = make_codes(N, K / 2, DType::u8, 61, 0, 255, device, 0, "w");
  const Pair ws = make_codes(N, K / 32, DType::ue8m0, 62, 120, 130, device, 0, "ws");
  Mat w_hat(N, K);
  const auto* wb = static_cast<const uint8_t*>(w.host.data_ptr());
  const auto* sb = static_cast<const uint8_t*>(ws.host.data_ptr());
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t k = 0; k < K; ++k) {
      w_hat.at(n, k) = e2m1_to_f32(fp4_get(wb + n * (K / 2), k)) * ue8m0_to_f32(sb[n * (K / 32) + k / 32]);
    }
  }
  const std::vector<float> v = activations(T, K, 63);
  const Pair x = make_pair(T, K, DType::bf16, v, device, 0, "x");
  Tensor q = Tensor::empty({T, K}, DType::f8_e4m3fn, device, "q");
  Tensor s = Tensor::empty({T, 2}, DType::ue8m0, device, "s");
  Tensor out = Tensor::empty({T, N}, DType::bf16, device, "out");
  act_quant_fp8(x.dev, 128, q, s);
  gemm_fp4_weights(q, s, w.dev, ws.dev, out);
  sync();
  const Mat x_mat = mat_of(v, T, K);
  Mat x_hat = x_mat;
  ref::fp8_quant_dequant_rows(x_hat, 128);
  const Mat want = ref::linear(quant_ctx(), x_mat, w_hat, ref::LinearKind::fp4);
  const double exact = expect_near_reference(to_mat(out, T, N), want, x_hat, w_hat, (32 + 8 + 1) * 0x1.0p-24, 0x1.0p-7);
  EXPECT_GE(exact, 0.99);
}

// ---- linear_fp8 / linear_projection: FP8 weights --------------------------------------------------

TEST(GpuLinearFp8, FusedEqualsHostAndTheTwoStepsOnDevice) {
  DSV4_REQUIRE_GPU();
  Allocator device(*cuda_memory(0), AllocatorMode::testing);
  struct Case {
    int64_t N, K, block;
  };
  for (const Case c : {Case{200, 384, 128}, Case{100, 192, 64}}) {
    const int64_t nb = c.K / c.block;
    const Pair w = make_codes(c.N, c.K, DType::f8_e4m3fn, 71, 0, 255, device, 0, "w");
    const Pair ws = make_codes((c.N + c.block - 1) / c.block, nb, DType::ue8m0, 72, 117, 130, device, 0, "ws");
    for (const DType dtype : {DType::bf16, DType::f32}) {
      for (const int64_t T : kTokenCounts) {
        for (const int64_t pad : {int64_t{0}, int64_t{64}}) {
          if (pad != 0 && !strided_case(T)) continue;
          SCOPED_TRACE(std::string(dtype_name(dtype)) + " N " + std::to_string(c.N) + " T " + std::to_string(T) +
                       " pad " + std::to_string(pad));
          const std::vector<float> v = activations(T, c.K, 73 + static_cast<unsigned>(T), false, dtype == DType::bf16);
          const Pair x = make_pair(T, c.K, dtype, v, device, pad, "x");
          Out out = make_out(T, c.N, DType::bf16, device, pad / 8);
          Out proj = make_out(T, c.N, DType::bf16, device, pad / 8);
          if (c.block == kFp8Block) {
            linear_fp8(x.host, w.host, ws.host, out.host);
            linear_fp8(x.dev, w.dev, ws.dev, out.dev);
          }
          linear_projection(x.host, w.host, BlockScales{ws.host, c.block}, proj.host);
          linear_projection(x.dev, w.dev, BlockScales{ws.dev, c.block}, proj.dev);
          // The two steps on the device.
          Tensor q = Tensor::empty({T, c.K}, DType::f8_e4m3fn, device, "q");
          Tensor s = Tensor::empty({T, nb}, DType::ue8m0, device, "s");
          Tensor steps = Tensor::empty({T, c.N}, DType::bf16, device, "steps");
          act_quant_fp8(x.dev, c.block, q, s);
          gemm_fp8_block_scaled(q, s, w.dev, ws.dev, steps, c.block);
          sync();
          if (c.block == kFp8Block) expect_same_bytes(out.dev_base, out.host_base, "linear_fp8");
          expect_same_bytes(proj.dev_base, proj.host_base, "linear_projection");
          expect_same_bytes(proj.dev, steps, "linear_projection vs act_quant_fp8 + gemm_fp8_block_scaled");
          if (T == 8 && pad == 0 && dtype == DType::bf16) {
            expect_reruns_identical([&] {
              Tensor o = Tensor::empty({T, c.N}, DType::bf16, device, "o");
              linear_projection(x.dev, w.dev, BlockScales{ws.dev, c.block}, o);
              return o;
            });
          }
        }
      }
    }
  }
  EXPECT_TRUE(device.check_guards().empty());
}

// ---- linear_fp8 / linear_projection: bf16 weights -----------------------------------------------

TEST(GpuLinearBf16, EqualsHostAndReference) {
  DSV4_REQUIRE_GPU();
  Allocator device(*cuda_memory(0), AllocatorMode::testing);
  const int64_t N = 150, K = 96;
  const std::vector<float> wv = activations(N, K, 81);
  const Pair w = make_pair(N, K, DType::bf16, wv, device, 0, "w");
  for (const DType dtype : {DType::bf16, DType::f32}) {
    for (const int64_t T : kTokenCounts) {
      for (const int64_t pad : {int64_t{0}, int64_t{16}}) {
        if (pad != 0 && !strided_case(T)) continue;
        SCOPED_TRACE(std::string(dtype_name(dtype)) + " T " + std::to_string(T) + " pad " + std::to_string(pad));
        // f32 inputs that are not bf16 values: inexact products, where an FMA would differ.
        const std::vector<float> v = activations(T, K, 82 + static_cast<unsigned>(T), false, dtype == DType::bf16);
        const Pair x = make_pair(T, K, dtype, v, device, pad, "x");
        Out a = make_out(T, N, DType::bf16, device, pad);
        Out b = make_out(T, N, DType::bf16, device, pad);
        linear_fp8(x.host, w.host, kNoWeightScale, a.host);
        linear_fp8(x.dev, w.dev, kNoWeightScale, a.dev);
        linear_projection(x.host, w.host, kNoWeightScale, b.host);
        linear_projection(x.dev, w.dev, kNoWeightScale, b.dev);
        sync();
        expect_same_bytes(a.dev_base, a.host_base, "linear_fp8");
        expect_same_bytes(b.dev_base, b.host_base, "linear_projection");
        if (T == 64 && pad == 0) {
          expect_reruns_identical([&] {
            Tensor o = Tensor::empty({T, N}, DType::bf16, device, "o");
            linear_fp8(x.dev, w.dev, kNoWeightScale, o);
            return o;
          });
        }
      }
    }
  }
  // Against the reference's bf16 linear: fp32 sums of exact products vs fp64, then one bf16 rounding.
  const int64_t T = 7;
  const std::vector<float> v = activations(T, K, 83);
  const Pair x = make_pair(T, K, DType::bf16, v, device, 0, "x");
  Tensor out = Tensor::empty({T, N}, DType::bf16, device, "out");
  linear_fp8(x.dev, w.dev, kNoWeightScale, out);
  sync();
  const Mat x_mat = mat_of(v, T, K), w_mat = mat_of(wv, N, K);
  const Mat want = ref::linear(quant_ctx(), x_mat, w_mat, ref::LinearKind::bf16);
  const double exact = expect_near_reference(to_mat(out, T, N), want, x_mat, w_mat, (K + 2) * 0x1.0p-24, 0x1.0p-7);
  EXPECT_GE(exact, 0.95);
  EXPECT_TRUE(device.check_guards().empty());
}

// ---- linear_projection's contract on device tensors (A5 included) ----------------------------------

TEST(GpuLinearProjection, ContractsOnDevice) {
  DSV4_REQUIRE_GPU();
  Allocator device(*cuda_memory(0), AllocatorMode::testing);
  const Tensor x = Tensor::empty({2, 64}, DType::bf16, device, "x");
  Tensor out = Tensor::empty({2, 64}, DType::bf16, device, "out");
  const Tensor wi = Tensor::empty({64, 64}, DType::i8, device, "wi");
  const Tensor channels = Tensor::empty({64}, DType::f32, device, "channels");
  // Fault quant-scale-scalar's refusal: one element where the per-channel scales belong, by name and
  // with the message its recorded repro carries.
  try {
    linear_projection(x, wi, ChannelScales{channels.narrow(0, 0, 1)}, out);
    ADD_FAILURE() << "a one-element ChannelScales was accepted";
  } catch (const ContractError& e) {
    EXPECT_EQ(e.argument(), "w_scale");
    EXPECT_EQ(std::string(e.what()), "linear_projection: argument 'w_scale': shape[0] == w.shape[0]: got [1] and w [64, 64]");
  }
  const Tensor w8 = Tensor::empty({128, 256}, DType::f8_e4m3fn, device, "w8");
  const Tensor x256 = Tensor::empty({2, 256}, DType::bf16, device, "x256");
  Tensor out128 = Tensor::empty({2, 128}, DType::bf16, device, "out128");
  expect_contract_error([&] { linear_projection(x256, w8, BlockScales{Tensor::empty({1, 1}, DType::ue8m0, device, "one")}, out128); },
                        "w_scale");
  expect_contract_error([&] { linear_projection(x256, w8, kNoWeightScale, out128); }, "w_scale");
  expect_contract_error([&] { linear_fp8(x256, w8, Tensor(), out128); }, "w_scale");
  const Tensor blocks = Tensor::empty({1, 2}, DType::ue8m0, device, "blocks");
  Tensor out_wide = Tensor::empty({2, 129}, DType::bf16, device, "out_wide");
  expect_contract_error([&] { linear_projection(x256, w8, BlockScales{blocks}, out_wide); }, "out");
  expect_contract_error([&] { linear_projection(x, wi, ChannelScales{channels}, out_wide); }, "out");
  const Tensor x_strided = Tensor::empty({2, 128}, DType::bf16, device, "x_wide").slice(1, 0, 128, 2);
  expect_contract_error([&] { linear_projection(x_strided, wi, ChannelScales{channels}, out); }, "x");
  const Tensor wb_t = Tensor::empty({64, 64}, DType::bf16, device, "wb").transpose(0, 1);  // column-major
  expect_contract_error([&] { linear_projection(x, wb_t, kNoWeightScale, out); }, "w");
  // Mixed devices: a host weight with device activations.
  const Tensor w_host = Tensor::empty({64, 64}, DType::bf16, "w_host");
  expect_contract_error([&] { linear_projection(x, w_host, kNoWeightScale, out); }, "w");
}

// ---- the w8a8-int8 path ----------------------------------------------------------------------------

TEST(GpuInt8, ActQuantEqualsHostBitForBit) {
  DSV4_REQUIRE_GPU();
  Allocator device(*cuda_memory(0), AllocatorMode::testing);
  for (const DType dtype : {DType::bf16, DType::f32}) {
    for (const int64_t K : {int64_t{200}, int64_t{7}, int64_t{1000}}) {
      for (const int64_t T : kTokenCounts) {
        for (const int64_t pad : {int64_t{0}, int64_t{24}}) {
          if (pad != 0 && !strided_case(T)) continue;
          SCOPED_TRACE(std::string(dtype_name(dtype)) + " K " + std::to_string(K) + " T " + std::to_string(T) + " pad " +
                       std::to_string(pad));
          const std::vector<float> v = activations(T, K, 91 + static_cast<unsigned>(T + K), dtype == DType::f32,
                                                   dtype == DType::bf16);
          const Pair x = make_pair(T, K, dtype, v, device, pad, "x");
          Out q = make_out(T, K, DType::i8, device, pad / 2);
          Tensor s_host = Tensor::empty({T}, DType::f32, "s");
          Tensor s_dev = Tensor::empty({T}, DType::f32, device, "s");
          act_quant_int8(x.host, q.host, s_host);
          act_quant_int8(x.dev, q.dev, s_dev);
          sync();
          expect_same_bytes(q.dev_base, q.host_base, "q");
          expect_same_bytes(s_dev, s_host, "scales");
        }
      }
    }
  }
  // Contracts on device tensors.
  const Tensor x = Tensor::empty({2, 64}, DType::bf16, device, "x");
  Tensor q = Tensor::empty({2, 64}, DType::i8, device, "q");
  Tensor s2 = Tensor::empty({2, 1}, DType::f32, device, "s2");
  expect_contract_error([&] { act_quant_int8(x, q, s2); }, "scales");
  Tensor s_host = Tensor::empty({2}, DType::f32, "s_host");
  expect_contract_error([&] { act_quant_int8(x, q, s_host); }, "scales");
  EXPECT_TRUE(device.check_guards().empty());
}

TEST(GpuInt8, GemmEqualsHostBitForBit) {
  DSV4_REQUIRE_GPU();
  Allocator device(*cuda_memory(0), AllocatorMode::testing);
  struct Case {
    int64_t N, K;
  };
  for (const Case c : {Case{72, 200}, Case{33, 1000}, Case{1, 1}, Case{130, 64}}) {
    const Pair w = make_codes(c.N, c.K, DType::i8, 101, 0, 255, device, 0, "w");
    const Pair ws = make_f32(c.N, 102, 1e-3f, 1e-1f, device, "ws");
    for (const int64_t T : kTokenCounts) {
      for (const int64_t pad : {int64_t{0}, int64_t{40}}) {
        if (pad != 0 && !strided_case(T)) continue;
        SCOPED_TRACE("N " + std::to_string(c.N) + " K " + std::to_string(c.K) + " T " + std::to_string(T) + " pad " +
                     std::to_string(pad));
        const Pair q = make_codes(T, c.K, DType::i8, 103 + static_cast<unsigned>(T), 0, 255, device, pad, "q");
        const Pair sa = make_f32(T, 104, 1e-3f, 1e-1f, device, "sa");
        Out out = make_out(T, c.N, DType::bf16, device, pad / 8);
        gemm_int8_per_channel(q.host, sa.host, w.host, ws.host, out.host);
        gemm_int8_per_channel(q.dev, sa.dev, w.dev, ws.dev, out.dev);
        sync();
        expect_same_bytes(out.dev_base, out.host_base, "out");
        if (T == 64 && pad == 0) {
          expect_reruns_identical([&] {
            Tensor o = Tensor::empty({T, c.N}, DType::bf16, device, "o");
            gemm_int8_per_channel(q.dev, sa.dev, w.dev, ws.dev, o);
            return o;
          });
        }
      }
    }
  }
  // K at the int32 limit with every code -128: the exact accumulation, then one rounding to f32.
  const int64_t K = kInt8MaxK;
  Tensor qh = Tensor::empty({1, K}, DType::i8, "q");
  Tensor wh = Tensor::empty({2, K}, DType::i8, "w");
  std::fill(qh.data<int8_t>(), qh.data<int8_t>() + K, int8_t{-128});
  std::fill(wh.data<int8_t>(), wh.data<int8_t>() + 2 * K, int8_t{-128});
  const Tensor sa = Tensor::from_values({1}, DType::f32, {0.5}, "sa");
  const Tensor sw = Tensor::from_values({2}, DType::f32, {0x1.0p-20, 3.0}, "sw");
  Tensor oh = Tensor::empty({1, 2}, DType::bf16, "o");
  Tensor od = Tensor::empty({1, 2}, DType::bf16, device, "o");
  gemm_int8_per_channel(qh, sa, wh, sw, oh);
  gemm_int8_per_channel(qh.to(device), sa.to(device), wh.to(device), sw.to(device), od);
  sync();
  expect_same_bytes(od, oh, "K = kInt8MaxK");
  // Contracts: a host weight among device tensors; a transposed weight.
  const Tensor qd = Tensor::empty({2, 64}, DType::i8, device, "qd");
  const Tensor sd = Tensor::empty({2}, DType::f32, device, "sd");
  const Tensor wsd = Tensor::empty({8}, DType::f32, device, "wsd");
  Tensor o8 = Tensor::empty({2, 8}, DType::bf16, device, "o8");
  expect_contract_error([&] { gemm_int8_per_channel(qd, sd, Tensor::empty({8, 64}, DType::i8, "w_host"), wsd, o8); }, "w");
  expect_contract_error(
      [&] { gemm_int8_per_channel(qd, sd, Tensor::empty({64, 8}, DType::i8, device, "wt").transpose(0, 1), wsd, o8); }, "w");
  EXPECT_TRUE(device.check_guards().empty());
}

TEST(GpuInt8, LinearProjectionEqualsHostAndReference) {
  DSV4_REQUIRE_GPU();
  Allocator device(*cuda_memory(0), AllocatorMode::testing);
  const int64_t N = 72, K = 200;
  const std::vector<float> wv = activations(N, K, 111);
  const Int8Weight wq = quantize_weight_int8(Tensor::from_values({N, K}, DType::f32, std::vector<double>(wv.begin(), wv.end()), "w"));
  const Tensor w_dev = wq.q.to(device), ws_dev = wq.scales.to(device);
  for (const DType dtype : {DType::bf16, DType::f32}) {
    for (const int64_t T : kTokenCounts) {
      for (const int64_t pad : {int64_t{0}, int64_t{40}}) {
        if (pad != 0 && !strided_case(T)) continue;
        SCOPED_TRACE(std::string(dtype_name(dtype)) + " T " + std::to_string(T) + " pad " + std::to_string(pad));
        const std::vector<float> v = activations(T, K, 112 + static_cast<unsigned>(T), false, dtype == DType::bf16);
        const Pair x = make_pair(T, K, dtype, v, device, pad, "x");
        Out out = make_out(T, N, DType::bf16, device, pad / 8);
        linear_projection(x.host, wq.q, ChannelScales{wq.scales}, out.host);
        linear_projection(x.dev, w_dev, ChannelScales{ws_dev}, out.dev);
        // The two steps on the device.
        Tensor q = Tensor::empty({T, K}, DType::i8, device, "q");
        Tensor s = Tensor::empty({T}, DType::f32, device, "s");
        Tensor steps = Tensor::empty({T, N}, DType::bf16, device, "steps");
        act_quant_int8(x.dev, q, s);
        gemm_int8_per_channel(q, s, w_dev, ws_dev, steps);
        sync();
        expect_same_bytes(out.dev_base, out.host_base, "linear_projection");
        expect_same_bytes(out.dev, steps, "linear_projection vs act_quant_int8 + gemm_int8_per_channel");
        if (T == 8 && pad == 0 && dtype == DType::bf16) {
          expect_reruns_identical([&] {
            Tensor o = Tensor::empty({T, N}, DType::bf16, device, "o");
            linear_projection(x.dev, w_dev, ChannelScales{ws_dev}, o);
            return o;
          });
        }
      }
    }
  }
  // The reference's w8a8-int8 linear, bit for bit (it requantizes the same f32 weight itself).
  const int64_t T = 7;
  const std::vector<float> v = activations(T, K, 113);
  const Pair x = make_pair(T, K, DType::bf16, v, device, 0, "x");
  Tensor out = Tensor::empty({T, N}, DType::bf16, device, "out");
  linear_projection(x.dev, w_dev, ChannelScales{ws_dev}, out);
  sync();
  const Mat want = ref::linear_w8a8_int8(mat_of(v, T, K), mat_of(wv, N, K));
  const Mat got = to_mat(out, T, N);
  for (int64_t i = 0; i < want.size(); ++i) {
    ASSERT_EQ(f32_bits(got.data[static_cast<size_t>(i)]), f32_bits(want.data[static_cast<size_t>(i)])) << "element " << i;
  }
  EXPECT_TRUE(device.check_guards().empty());
}

// ---- moe_gate_logits: the plain fp32 GEMM ----------------------------------------------------------

TEST(GpuMoeGateLogits, EqualsHostAndReference) {
  DSV4_REQUIRE_GPU();
  Allocator device(*cuda_memory(0), AllocatorMode::testing);
  struct Case {
    int64_t E, d;
    DType x_dtype, w_dtype;
  };
  for (const Case c : {Case{300, 256, DType::bf16, DType::bf16}, Case{40, 100, DType::f32, DType::bf16},
                       Case{17, 64, DType::f32, DType::f32}}) {
    const std::vector<float> wv = activations(c.E, c.d, 121, false, c.w_dtype == DType::bf16);
    const Pair w = make_pair(c.E, c.d, c.w_dtype, wv, device, 0, "gate_w");
    for (const int64_t T : kTokenCounts) {
      for (const int64_t pad : {int64_t{0}, int64_t{12}}) {
        if (pad != 0 && !strided_case(T)) continue;
        SCOPED_TRACE("E " + std::to_string(c.E) + " d " + std::to_string(c.d) + " T " + std::to_string(T) + " pad " +
                     std::to_string(pad));
        const std::vector<float> v = activations(T, c.d, 122 + static_cast<unsigned>(T), false, c.x_dtype == DType::bf16);
        const Pair x = make_pair(T, c.d, c.x_dtype, v, device, pad, "x");
        Out logits = make_out(T, c.E, DType::f32, device);
        moe_gate_logits(x.host, w.host, logits.host);
        moe_gate_logits(x.dev, w.dev, logits.dev);
        sync();
        expect_same_bytes(logits.dev, logits.host, "logits");
        if (T == 64 && pad == 0) {
          expect_reruns_identical([&] {
            Tensor o = Tensor::empty({T, c.E}, DType::f32, device, "o");
            moe_gate_logits(x.dev, w.dev, o);
            return o;
          });
        }
      }
    }
  }
  // Against the reference's f32 linear (fp64 sums of the fp32 products, rounded once).
  const int64_t T = 7, E = 300, d = 256;
  const std::vector<float> wv = activations(E, d, 121);
  const std::vector<float> v = activations(T, d, 123);
  const Pair w = make_pair(E, d, DType::bf16, wv, device, 0, "gate_w");
  const Pair x = make_pair(T, d, DType::bf16, v, device, 0, "x");
  Tensor logits = Tensor::empty({T, E}, DType::f32, device, "logits");
  moe_gate_logits(x.dev, w.dev, logits);
  sync();
  const Mat x_mat = mat_of(v, T, d), w_mat = mat_of(wv, E, d);
  const Mat want = ref::linear(quant_ctx(), x_mat, w_mat, ref::LinearKind::f32);
  expect_near_reference(to_mat(logits, T, E), want, x_mat, w_mat, (d + 2) * 0x1.0p-24, 0x1.0p-24);
  // Contracts on device tensors.
  Tensor wrong = Tensor::empty({T, E + 1}, DType::f32, device, "wrong");
  expect_contract_error([&] { moe_gate_logits(x.dev, w.dev, wrong); }, "logits");
  Tensor bf16_logits = Tensor::empty({T, E}, DType::bf16, device, "bf16_logits");
  expect_contract_error([&] { moe_gate_logits(x.dev, w.dev, bf16_logits); }, "logits");
  expect_contract_error([&] { moe_gate_logits(x.dev, w.host, logits); }, "gate_w");
  EXPECT_TRUE(device.check_guards().empty());
}

// ---- the cuBLASLt FP8 GEMM (the fast path) -----------------------------------------------------------

// The dequantized operand of an FP8 GEMM: codes [rows, K] (row stride ld) times their block scales.
Mat dequantize_fp8(const Tensor& codes_host, const Tensor& scales_host, int64_t rows, int64_t K, bool weight) {
  Mat m(rows, K);
  const Bytes c = bytes_of(codes_host), sc = bytes_of(scales_host);
  const int64_t nkb = K / 128;
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t k = 0; k < K; ++k) {
      const int64_t srow = weight ? r / 128 : r;
      m.at(r, k) = e4m3fn_to_f32(c[static_cast<size_t>(r * K + k)]) * ue8m0_to_f32(sc[static_cast<size_t>(srow * nkb + k / 128)]);
    }
  }
  return m;
}

struct Agreement {
  int64_t violations = 0;
  int64_t bitwise = 0;
  int64_t within_one_ulp = 0;
  int64_t count = 0;
  double worst_ratio = 0.0;  // max |got - want| / bound
  double cosine_distance = 0.0;
  bool finite = true;
};

// got and want [T, N] (bf16 values as f32); bound per element gamma · Σ_k |x̂ ŵ| + rel · |want|.
Agreement agreement(const Mat& got, const Mat& want, const Mat& x_hat, const Mat& w_hat, double gamma, double rel) {
  Agreement a;
  double dot = 0.0, gg = 0.0, ww = 0.0;
  for (int64_t t = 0; t < want.rows; ++t) {
    for (int64_t n = 0; n < want.cols; ++n) {
      double abs_sum = 0.0;
      for (int64_t k = 0; k < x_hat.cols; ++k) abs_sum += std::abs(static_cast<double>(x_hat.at(t, k)) * w_hat.at(n, k));
      const double g = got.at(t, n), w = want.at(t, n);
      a.finite = a.finite && std::isfinite(g);
      const double bound = gamma * abs_sum + rel * std::abs(w) + 1e-30;
      const double err = std::abs(g - w);
      a.worst_ratio = std::max(a.worst_ratio, err / bound);
      a.violations += err <= bound ? 0 : 1;
      a.bitwise += g == w ? 1 : 0;
      const double ulp = std::ldexp(1.0, std::max(-133, std::ilogb(std::max(std::abs(w), 1e-38)) - 7));
      a.within_one_ulp += err <= ulp ? 1 : 0;
      dot += g * w;
      gg += g * g;
      ww += w * w;
      ++a.count;
    }
  }
  a.cosine_distance = (gg == 0.0 && ww == 0.0) ? 0.0 : 1.0 - dot / std::sqrt(gg * ww);
  return a;
}

void expect_agreement(const Agreement& a, const std::string& what) {
  EXPECT_TRUE(a.finite) << what;
  EXPECT_EQ(a.violations, 0) << what << ": worst |err| / bound " << a.worst_ratio;
  EXPECT_LT(a.cosine_distance, 1e-5) << what;
  std::printf("[cublaslt] %s: %lld elements, %.4f bitwise equal to the host, %.4f within 1 bf16 ulp, worst err/bound %.3g, "
              "cosine distance %.3g\n",
              what.c_str(), static_cast<long long>(a.count), a.count ? double(a.bitwise) / double(a.count) : 1.0,
              a.count ? double(a.within_one_ulp) / double(a.count) : 1.0, a.worst_ratio, a.cosine_distance);
}

constexpr double kLtGamma = 0x1.0p-11;  // the tensor cores' partial sums (see the file comment)
constexpr double kLtRel = 0x1.0p-7;     // one bf16 rounding

// ---- the cuBLASLt bf16 GEMM (DSV4_DENSE_GEMM=cublaslt) ------------------------------------------------

// Both sides sum exact f32 products in f32, each in its own order: |got - want| <= 2 (K + 1) 2^-24
// Σ|x w| (two recursive-summation bounds), plus one rounding of the output format (rel).
double dense_gamma(int64_t K) { return 2.0 * static_cast<double>(K + 1) * 0x1.0p-24; }

TEST(GpuDenseCublaslt, GateLinearAndGroupedProjectionMatchTheHostWithinTheBound) {
  DSV4_REQUIRE_GPU();
  Allocator device(*cuda_memory(0), AllocatorMode::testing);
  cuda::DenseGemmPathScope lt(cuda::DenseGemmPath::cublaslt);
  const int64_t N = 64, K = 256, groups = 3;
  const std::vector<float> wv = activations(groups * N, K, 401);
  const Pair w = make_pair(groups * N, K, DType::bf16, wv, device, 0, "w");
  const Pair w1 = make_pair(N, K, DType::bf16, wv, device, 0, "w1");  // the first N rows
  const Mat w_mat = mat_of(wv, groups * N, K);
  const Mat w1_mat = mat_of(std::vector<float>(wv.begin(), wv.begin() + N * K), N, K);
  for (const int64_t T : kTokenCounts) {
    for (const int64_t pad : {int64_t{0}, int64_t{8}}) {
      if (pad != 0 && !strided_case(T)) continue;
      const std::string what = "T " + std::to_string(T) + " pad " + std::to_string(pad);
      SCOPED_TRACE(what);
      const std::vector<float> v = activations(T, groups * K, 402 + static_cast<unsigned>(T));
      const Pair x = make_pair(T, groups * K, DType::bf16, v, device, pad, "x");
      const Pair x1 = make_pair(T, K, DType::bf16, std::vector<float>(v.begin(), v.begin() + T * K), device, pad, "x1");
      const Mat x1_mat = mat_of(std::vector<float>(v.begin(), v.begin() + T * K), T, K);
      // moe_gate_logits: an f32 output.
      Out logits = make_out(T, N, DType::f32, device);
      Out linear = make_out(T, N, DType::bf16, device);
      Out grouped = make_out(T, groups * N, DType::bf16, device);
      {
        cuda::DenseGemmPathScope host_order(cuda::DenseGemmPath::portable);
        moe_gate_logits(x1.host, w1.host, logits.host);
        linear_fp8(x1.host, w1.host, kNoWeightScale, linear.host);
        grouped_wo_a(x.host, w.host, groups, grouped.host);
      }
      const uint64_t calls = cuda::dense_gemm_cublaslt_calls();
      moe_gate_logits(x1.dev, w1.dev, logits.dev);
      linear_fp8(x1.dev, w1.dev, kNoWeightScale, linear.dev);
      grouped_wo_a(x.dev, w.dev, groups, grouped.dev);
      sync();
      EXPECT_EQ(cuda::dense_gemm_cublaslt_calls(), calls + (T == 0 ? 0 : 3)) << "cuBLASLt did not take every problem";
      expect_agreement(agreement(to_mat(logits.dev, T, N), to_mat(logits.host, T, N), x1_mat, w1_mat, dense_gamma(K),
                                 0x1.0p-24),
                       "moe_gate_logits " + what);
      expect_agreement(agreement(to_mat(linear.dev, T, N), to_mat(linear.host, T, N), x1_mat, w1_mat, dense_gamma(K),
                                 0x1.0p-7),
                       "linear_fp8 (bf16 weight) " + what);
      // grouped_wo_a: group g's outputs against its slice of x and rows of w.
      const Mat got = to_mat(grouped.dev, T, groups * N), want = to_mat(grouped.host, T, groups * N);
      const Mat x_mat = mat_of(v, T, groups * K);
      for (int64_t g = 0; g < groups; ++g) {
        Mat got_g(T, N), want_g(T, N), x_g(T, K), w_g(N, K);
        for (int64_t t = 0; t < T; ++t) {
          for (int64_t n = 0; n < N; ++n) {
            got_g.at(t, n) = got.at(t, g * N + n);
            want_g.at(t, n) = want.at(t, g * N + n);
          }
          for (int64_t k = 0; k < K; ++k) x_g.at(t, k) = x_mat.at(t, g * K + k);
        }
        for (int64_t n = 0; n < N; ++n) {
          for (int64_t k = 0; k < K; ++k) w_g.at(n, k) = w_mat.at(g * N + n, k);
        }
        expect_agreement(agreement(got_g, want_g, x_g, w_g, dense_gamma(K), 0x1.0p-7),
                         "grouped_wo_a group " + std::to_string(g) + " " + what);
      }
      if (T == 64 && pad == 0) {
        expect_reruns_identical([&] {
          Tensor o = Tensor::empty({T, groups * N}, DType::bf16, device, "o");
          grouped_wo_a(x.dev, w.dev, groups, o);
          return o;
        });
      }
    }
  }
  EXPECT_TRUE(device.check_guards().empty());
}

TEST(GpuDenseCublaslt, F32OperandsAndUnalignedRowsRunThePlainKernel) {
  DSV4_REQUIRE_GPU();
  Allocator device(*cuda_memory(0), AllocatorMode::testing);
  cuda::DenseGemmPathScope lt(cuda::DenseGemmPath::cublaslt);
  const int64_t T = 7;
  struct Case {
    int64_t N, K;
    DType x_dtype;
  };
  // f32 activations; K = 100 (200-byte rows); N = 6 (24-byte f32 output rows).
  for (const Case c : {Case{64, 256, DType::f32}, Case{64, 100, DType::bf16}, Case{6, 256, DType::bf16}}) {
    SCOPED_TRACE("N " + std::to_string(c.N) + " K " + std::to_string(c.K));
    const Pair w = make_pair(c.N, c.K, DType::bf16, activations(c.N, c.K, 411), device, 0, "w");
    const Pair x = make_pair(T, c.K, c.x_dtype, activations(T, c.K, 412, false, c.x_dtype == DType::bf16), device, 0, "x");
    Out logits = make_out(T, c.N, DType::f32, device);
    moe_gate_logits(x.host, w.host, logits.host);
    const uint64_t calls = cuda::dense_gemm_cublaslt_calls();
    moe_gate_logits(x.dev, w.dev, logits.dev);
    sync();
    EXPECT_EQ(cuda::dense_gemm_cublaslt_calls(), calls);
    expect_same_bytes(logits.dev, logits.host, "logits");
  }
  EXPECT_TRUE(device.check_guards().empty());
}

TEST(GpuFp8Cublaslt, GemmMatchesTheHostWithinTolerance) {
  DSV4_REQUIRE_GPU();
  Allocator device(*cuda_memory(0), AllocatorMode::testing);
  cuda::Fp8GemmPathScope lt(cuda::Fp8GemmPath::cublaslt);
  struct Case {
    int64_t N, K;
    std::vector<int64_t> tokens;
  };
  // N = 200: a partial last weight block; (1024, 4096): the small config's wq_a; (512, 1024)... the
  // token counts cover T % 4 != 0 (staged activations and output) and the capture buckets.
  const std::vector<Case> cases = {{200, 384, {1, 2, 3, 7, 8, 64, 130}}, {1024, 4096, {1, 64, 130}},
                                   {4096, 1024, {5, 64}}};
  for (const Case& c : cases) {
    const int64_t nkb = c.K / 128;
    const Pair w = make_codes(c.N, c.K, DType::f8_e4m3fn, 301, 0, 255, device, 0, "w");
    const Pair ws = make_codes((c.N + 127) / 128, nkb, DType::ue8m0, 302, 117, 130, device, 0, "ws");
    const Mat w_hat = dequantize_fp8(w.host, ws.host, c.N, c.K, true);
    for (const int64_t T : c.tokens) {
      for (const int64_t pad : {int64_t{0}, int64_t{64}}) {
        if (pad != 0 && T != 7 && T != 130) continue;
        const std::string what = "N " + std::to_string(c.N) + " K " + std::to_string(c.K) + " T " + std::to_string(T) +
                                 " pad " + std::to_string(pad);
        SCOPED_TRACE(what);
        const Pair q = make_codes(T, c.K, DType::f8_e4m3fn, 303 + static_cast<unsigned>(T), 0, 255, device, pad, "q");
        const Pair sa = make_codes(T, nkb, DType::ue8m0, 304, 117, 130, device, 0, "sa");
        Out out = make_out(T, c.N, DType::bf16, device, pad / 8);
        {
          cuda::Fp8GemmPathScope host_order(cuda::Fp8GemmPath::portable);
          gemm_fp8_block_scaled(q.host, sa.host, w.host, ws.host, out.host);
        }
        const uint64_t calls = cuda::fp8_gemm_cublaslt_calls();
        gemm_fp8_block_scaled(q.dev, sa.dev, w.dev, ws.dev, out.dev);
        sync();
        EXPECT_EQ(cuda::fp8_gemm_cublaslt_calls(), calls + 1) << "cuBLASLt did not take the problem";
        if (pad != 0) {
          // The row padding is untouched.
          const Bytes g = bytes_of(out.dev_base), h = bytes_of(out.host_base);
          for (int64_t t = 0; t < T; ++t) {
            for (int64_t j = c.N; j < c.N + pad / 8; ++j) {
              const size_t i = static_cast<size_t>((t * (c.N + pad / 8) + j) * 2);
              ASSERT_TRUE(g[i] == h[i] && g[i + 1] == h[i + 1]) << "padding of row " << t << " written";
            }
          }
        }
        const Mat x_hat = dequantize_fp8(q.host.contiguous(), sa.host, T, c.K, false);
        expect_agreement(agreement(to_mat(out.dev, T, c.N), to_mat(out.host, T, c.N), x_hat, w_hat, kLtGamma, kLtRel),
                         "gemm " + what);
      }
    }
  }
  EXPECT_TRUE(device.check_guards().empty());
}

TEST(GpuFp8Cublaslt, ProjectionMatchesTheHostAndRerunsAreIdentical) {
  DSV4_REQUIRE_GPU();
  Allocator device(*cuda_memory(0), AllocatorMode::testing);
  cuda::Fp8GemmPathScope lt(cuda::Fp8GemmPath::cublaslt);
  const int64_t N = 200, K = 384;
  const Pair w = make_codes(N, K, DType::f8_e4m3fn, 311, 0, 255, device, 0, "w");
  const Pair ws = make_codes(2, 3, DType::ue8m0, 312, 117, 130, device, 0, "ws");
  const Mat w_hat = dequantize_fp8(w.host, ws.host, N, K, true);
  for (const int64_t T : {int64_t{1}, int64_t{7}, int64_t{8}, int64_t{64}, int64_t{130}}) {
    for (const int64_t pad : {int64_t{0}, int64_t{64}}) {
      if (pad != 0 && T != 7 && T != 130) continue;
      const std::string what = "T " + std::to_string(T) + " pad " + std::to_string(pad);
      SCOPED_TRACE(what);
      const std::vector<float> v = activations(T, K, 313 + static_cast<unsigned>(T));
      const Pair x = make_pair(T, K, DType::bf16, v, device, pad, "x");
      Out proj = make_out(T, N, DType::bf16, device, pad / 8);
      Tensor qh = Tensor::empty({T, K}, DType::f8_e4m3fn, "q"), sh = Tensor::empty({T, 3}, DType::ue8m0, "s");
      {
        cuda::Fp8GemmPathScope host_order(cuda::Fp8GemmPath::portable);
        linear_projection(x.host, w.host, BlockScales{ws.host}, proj.host);
        act_quant_fp8(x.host, 128, qh, sh);
      }
      const uint64_t calls = cuda::fp8_gemm_cublaslt_calls();
      linear_projection(x.dev, w.dev, BlockScales{ws.dev}, proj.dev);
      sync();
      EXPECT_EQ(cuda::fp8_gemm_cublaslt_calls(), calls + 1) << "cuBLASLt did not take the problem";
      const Mat x_hat = dequantize_fp8(qh, sh, T, K, false);
      expect_agreement(agreement(to_mat(proj.dev, T, N), to_mat(proj.host, T, N), x_hat, w_hat, kLtGamma, kLtRel),
                       "linear_projection " + what);
      // The two steps on the device give the same bits as the fused projection.
      Tensor q = Tensor::empty({T, K}, DType::f8_e4m3fn, device, "q");
      Tensor s = Tensor::empty({T, 3}, DType::ue8m0, device, "s");
      Tensor steps = Tensor::empty({T, N}, DType::bf16, device, "steps");
      act_quant_fp8(x.dev, 128, q, s);
      gemm_fp8_block_scaled(q, s, w.dev, ws.dev, steps);
      sync();
      expect_same_bytes(proj.dev, steps, "fused vs two steps, " + what);
      if (pad == 0 && (T == 8 || T == 64)) {
        expect_reruns_identical([&] {
          Tensor o = Tensor::empty({T, N}, DType::bf16, device, "o");
          linear_projection(x.dev, w.dev, BlockScales{ws.dev}, o);
          return o;
        });
      }
    }
  }
  EXPECT_TRUE(device.check_guards().empty());
}

TEST(GpuFp8Cublaslt, ShapesItDoesNotTakeRunThePortableKernel) {
  DSV4_REQUIRE_GPU();
  Allocator device(*cuda_memory(0), AllocatorMode::testing);
  cuda::Fp8GemmPathScope lt(cuda::Fp8GemmPath::cublaslt);
  // Blocks of 64 (not cuBLASLt's 128): the portable kernel, bit for bit the host.
  const int64_t T = 7, N = 100, K = 192;
  const Pair w = make_codes(N, K, DType::f8_e4m3fn, 321, 0, 255, device, 0, "w");
  const Pair ws = make_codes(2, 3, DType::ue8m0, 322, 117, 130, device, 0, "ws");
  const Pair q = make_codes(T, K, DType::f8_e4m3fn, 323, 0, 255, device, 0, "q");
  const Pair sa = make_codes(T, 3, DType::ue8m0, 324, 117, 130, device, 0, "sa");
  Out out = make_out(T, N, DType::bf16, device);
  gemm_fp8_block_scaled(q.host, sa.host, w.host, ws.host, out.host, 64);
  const uint64_t calls = cuda::fp8_gemm_cublaslt_calls();
  gemm_fp8_block_scaled(q.dev, sa.dev, w.dev, ws.dev, out.dev, 64);
  sync();
  EXPECT_EQ(cuda::fp8_gemm_cublaslt_calls(), calls);
  expect_same_bytes(out.dev, out.host, "block 64 under the cublaslt switch");
}

TEST(GpuFp8Cublaslt, RowsAcrossTokenCountsAndGraphReplay) {
  DSV4_REQUIRE_GPU();
  Allocator device(*cuda_memory(0), AllocatorMode::testing);
  cuda::Fp8GemmPathScope lt(cuda::Fp8GemmPath::cublaslt);
  const int64_t N = 1024, K = 4096, Tmax = 64;
  const Pair w = make_codes(N, K, DType::f8_e4m3fn, 331, 0, 255, device, 0, "w");
  const Pair ws = make_codes(8, 32, DType::ue8m0, 332, 117, 130, device, 0, "ws");
  const Pair q = make_codes(Tmax, K, DType::f8_e4m3fn, 333, 0, 255, device, 0, "q");
  const Pair sa = make_codes(Tmax, 32, DType::ue8m0, 334, 117, 130, device, 0, "sa");
  Tensor full = Tensor::empty({Tmax, N}, DType::bf16, device, "full");
  gemm_fp8_block_scaled(q.dev, sa.dev, w.dev, ws.dev, full);
  sync();
  const Bytes all = bytes_of(full);
  // Whether a row's bits depend on how many rows share the call (the algorithm is chosen per shape):
  // reported, not required (the engine runs one shape per batch bucket, so eager and graph agree).
  for (const int64_t T : {int64_t{1}, int64_t{4}, int64_t{8}, int64_t{16}, int64_t{32}}) {
    Tensor part = Tensor::empty({T, N}, DType::bf16, device, "part");
    gemm_fp8_block_scaled(q.dev.narrow(0, 0, T), sa.dev.narrow(0, 0, T), w.dev, ws.dev, part);
    sync();
    const Bytes b = bytes_of(part);
    const bool same = std::equal(b.begin(), b.end(), all.begin());
    std::printf("[cublaslt] N %lld K %lld: the first %lld rows of a %lld-row call %s the %lld-row call's\n",
                static_cast<long long>(N), static_cast<long long>(K), static_cast<long long>(T),
                static_cast<long long>(Tmax), same ? "equal" : "differ from", static_cast<long long>(T));
  }
  // Captured into a graph and replayed: the eager bits.
  cudaStream_t stream = nullptr;
  ASSERT_EQ(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), cudaSuccess);
  Tensor replayed = Tensor::empty({Tmax, N}, DType::bf16, device, "replayed");
  ASSERT_EQ(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal), cudaSuccess);
  {
    StreamScope scope(stream);
    gemm_fp8_block_scaled(q.dev, sa.dev, w.dev, ws.dev, replayed);
  }
  cudaGraph_t graph = nullptr;
  ASSERT_EQ(cudaStreamEndCapture(stream, &graph), cudaSuccess);
  cudaGraphExec_t exec = nullptr;
  ASSERT_EQ(cudaGraphInstantiate(&exec, graph, 0), cudaSuccess);
  for (int replay = 0; replay < 2; ++replay) {
    ASSERT_EQ(cudaMemset(replayed.data_ptr(), 0xFF, static_cast<size_t>(Tmax * N * 2)), cudaSuccess);
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    ASSERT_EQ(cudaGraphLaunch(exec, stream), cudaSuccess);
    ASSERT_EQ(cudaStreamSynchronize(stream), cudaSuccess);
    EXPECT_EQ(bytes_of(replayed), all) << "graph replay " << replay;
  }
  EXPECT_EQ(cudaGraphExecDestroy(exec), cudaSuccess);
  EXPECT_EQ(cudaGraphDestroy(graph), cudaSuccess);
  EXPECT_EQ(cudaStreamDestroy(stream), cudaSuccess);
  EXPECT_TRUE(device.check_guards().empty());
}

// ---- streams and graphs -------------------------------------------------------------------------------

TEST(GpuGemmGraphs, ProjectionsRunOnTheCurrentStreamAndReplayFromAGraph) {
  DSV4_REQUIRE_GPU();
  Allocator device(*cuda_memory(0), AllocatorMode::testing);
  const int64_t T = 8, K = 256, N = 200, E = 40;
  const std::vector<float> v = activations(T, K, 131);
  const Pair x = make_pair(T, K, DType::bf16, v, device, 0, "x");
  const Pair w8 = make_codes(N, K, DType::f8_e4m3fn, 132, 0, 255, device, 0, "w8");
  const Pair ws8 = make_codes(2, 2, DType::ue8m0, 133, 117, 130, device, 0, "ws8");
  const Pair w4 = make_codes(N, K / 2, DType::u8, 134, 0, 255, device, 0, "w4");
  const Pair ws4 = make_codes(N, K / 32, DType::ue8m0, 135, 117, 130, device, 0, "ws4");
  const Int8Weight wi = quantize_weight_int8(
      Tensor::from_values({N, K}, DType::f32, [&] {
        const std::vector<float> f = activations(N, K, 136);
        return std::vector<double>(f.begin(), f.end());
      }(), "wi"));
  const Tensor wi_dev = wi.q.to(device), wis_dev = wi.scales.to(device);
  const std::vector<float> gv = activations(E, K, 137);
  const Pair gate = make_pair(E, K, DType::bf16, gv, device, 0, "gate_w");

  // The host results.
  Tensor fp8_h = Tensor::empty({T, N}, DType::bf16, "fp8"), int8_h = Tensor::empty({T, N}, DType::bf16, "int8");
  Tensor fp4_h = Tensor::empty({T, N}, DType::bf16, "fp4"), logits_h = Tensor::empty({T, E}, DType::f32, "logits");
  Tensor q_h = Tensor::empty({T, K}, DType::f8_e4m3fn, "q"), s_h = Tensor::empty({T, 2}, DType::ue8m0, "s");
  linear_projection(x.host, w8.host, BlockScales{ws8.host}, fp8_h);
  linear_projection(x.host, wi.q, ChannelScales{wi.scales}, int8_h);
  act_quant_fp8(x.host, 128, q_h, s_h);
  gemm_fp4_weights(q_h, s_h, w4.host, ws4.host, fp4_h);
  moe_gate_logits(x.host, gate.host, logits_h);

  cudaStream_t stream = nullptr;
  ASSERT_EQ(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), cudaSuccess);
  Tensor fp8_d = Tensor::empty({T, N}, DType::bf16, device, "fp8"), int8_d = Tensor::empty({T, N}, DType::bf16, device, "int8");
  Tensor fp4_d = Tensor::empty({T, N}, DType::bf16, device, "fp4"), logits_d = Tensor::empty({T, E}, DType::f32, device, "logits");
  Tensor q_d = Tensor::empty({T, K}, DType::f8_e4m3fn, device, "q"), s_d = Tensor::empty({T, 2}, DType::ue8m0, device, "s");
  auto enqueue = [&] {
    StreamScope scope(stream);
    linear_projection(x.dev, w8.dev, BlockScales{ws8.dev}, fp8_d);
    linear_projection(x.dev, wi_dev, ChannelScales{wis_dev}, int8_d);
    act_quant_fp8(x.dev, 128, q_d, s_d);
    gemm_fp4_weights(q_d, s_d, w4.dev, ws4.dev, fp4_d);
    moe_gate_logits(x.dev, gate.dev, logits_d);
  };
  auto expect_all = [&](const std::string& what) {
    expect_same_bytes(fp8_d, fp8_h, what + ": fp8 projection");
    expect_same_bytes(int8_d, int8_h, what + ": int8 projection");
    expect_same_bytes(fp4_d, fp4_h, what + ": fp4 GEMM");
    expect_same_bytes(logits_d, logits_h, what + ": gate logits");
  };
  // 1. Enqueued on a non-blocking stream set by StreamScope.
  enqueue();
  ASSERT_EQ(cudaStreamSynchronize(stream), cudaSuccess);
  expect_all("stream");

  // 2. Captured into a graph (scratch becomes the graph's own allocations), replayed twice into
  // outputs poisoned again in between.
  ASSERT_EQ(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal), cudaSuccess);
  enqueue();
  cudaGraph_t graph = nullptr;
  ASSERT_EQ(cudaStreamEndCapture(stream, &graph), cudaSuccess);
  cudaGraphExec_t exec = nullptr;
  ASSERT_EQ(cudaGraphInstantiate(&exec, graph, 0), cudaSuccess);
  for (int replay = 0; replay < 2; ++replay) {
    for (Tensor* t : {&fp8_d, &int8_d, &fp4_d}) ASSERT_EQ(cudaMemset(t->data_ptr(), 0xFF, static_cast<size_t>(t->numel()) * 2), cudaSuccess);
    ASSERT_EQ(cudaMemset(logits_d.data_ptr(), 0xFF, static_cast<size_t>(logits_d.numel()) * 4), cudaSuccess);
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    ASSERT_EQ(cudaGraphLaunch(exec, stream), cudaSuccess);
    ASSERT_EQ(cudaStreamSynchronize(stream), cudaSuccess);
    expect_all("graph replay " + std::to_string(replay));
  }
  EXPECT_EQ(cudaGraphExecDestroy(exec), cudaSuccess);
  EXPECT_EQ(cudaGraphDestroy(graph), cudaSuccess);
  EXPECT_EQ(cudaStreamDestroy(stream), cudaSuccess);
  EXPECT_TRUE(device.check_guards().empty());
}

}  // namespace
}  // namespace dsv4::kernels
