// GPU tests of the norm / RoPE / q path / attention output kernels (kernels/cuda/norm_rope.cu,
// q_path.cu, attn_output.cu) and the dispatching cast entry, all through their public entry points;
// store_kv_model1 (prefill CP's store) too, and its identity with the fused store on normed rows.
//
// Every op runs on host tensors and on device copies of the same tensors; the device buffers must
// equal the host buffers byte for byte (outputs, untouched bytes and inputs alike). The GPU kernels
// replay the host's arithmetic (kernels/cuda/libm.h: glibc's sinf / cosf, no fused
// multiply-adds, grouped_wo_a's f32 accumulator in k order); the one order that differs, the f64 sum
// of squares of the RMS norms, changes an f32 inverse rms only about once in 2^28 rows, so these
// comparisons are exact too. Shapes cover T = 0, 1, 2, an odd T and the capture buckets 8 and 64;
// strided inputs where the contract allows them, a ContractError where it does not; ten reruns are
// bitwise identical. One shape per op is also compared with the reference (quant-sim), with the
// tolerance the host unit tests use.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
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
#include "engine/faults/faults.h"
#include "kernels/attn_output.h"
#include "kernels/cast.h"
#include "kernels/cuda/libm.h"
#include "kernels/cuda/norm_rope_math.h"
#include "kernels/device.h"
#include "kernels/cuda/port.h"
#include "kernels/norm_rope.h"
#include "kernels/q_path.h"
#include "kernels/token_ops.h"
#include "reference/compressor.h"
#include "reference/context.h"
#include "reference/hadamard.h"
#include "reference/linear.h"
#include "reference/norm.h"
#include "reference/quant.h"
#include "reference/rope.h"

namespace dsv4::kernels {
namespace {

constexpr uint8_t kPoison = 0xA5;
constexpr int kReruns = 10;
const std::vector<int64_t> kTokenCounts = {0, 1, 2, 5, 8, 64};

// ---- tensors ------------------------------------------------------------------------------------

// Every byte of t's storage (host or device).
std::vector<uint8_t> storage_bytes(const Tensor& t) {
  std::vector<uint8_t> out(t.storage()->bytes());
  if (!out.empty()) t.storage()->space().copy_to_host(out.data(), t.storage()->data(), out.size());
  return out;
}

float rand_bf16(std::mt19937_64& rng, float lo, float hi) {
  return round_bf16(std::uniform_real_distribution<float>(lo, hi)(rng));
}

// bf16 [rows, cols] with one magnitude (2^-4 .. 2^4) per `block` columns, so norms, block scales and
// rotations see a spread of exponents.
Tensor random_bf16(std::mt19937_64& rng, int64_t rows, int64_t cols, const std::string& name, int64_t block = 64) {
  Tensor t = Tensor::empty({rows, cols}, DType::bf16, name);
  auto* p = t.data<uint16_t>();
  for (int64_t r = 0; r < rows; ++r) {
    float mag = 1.0f;
    for (int64_t c = 0; c < cols; ++c) {
      if (c % block == 0) mag = std::ldexp(1.0f, static_cast<int>(rng() % 9) - 4);
      p[r * cols + c] = f32_to_bf16(rand_bf16(rng, -mag, mag));
    }
  }
  return t;
}

Tensor f32_tensor(const std::vector<float>& v, const std::string& name) {
  Tensor t = Tensor::empty({static_cast<int64_t>(v.size())}, DType::f32, name);
  if (!v.empty()) std::memcpy(t.data<float>(), v.data(), v.size() * sizeof(float));
  return t;
}

Tensor random_weight(std::mt19937_64& rng, int64_t n, const std::string& name) {
  std::vector<float> w(static_cast<size_t>(n));
  for (float& x : w) x = std::uniform_real_distribution<float>(0.25f, 2.0f)(rng);
  return f32_tensor(w, name);
}

// Positions in [0, 200000), the first few replaced by edge values: 0, small angles, and positions
// whose angles take libm's large-argument reduction (|angle| >= 120) up to 2^31 - 1.
Tensor positions_tensor(std::mt19937_64& rng, int64_t rows) {
  static const int32_t kEdges[] = {0, 2147483647, 1, 16777217, 1048576, 119, 3};
  Tensor t = Tensor::empty({rows}, DType::i32, "positions");
  for (int64_t i = 0; i < rows; ++i) {
    t.data<int32_t>()[i] = i < 7 ? kEdges[i] : static_cast<int32_t>(rng() % 200000);
  }
  return t;
}

Tensor freqs_tensor(const ref::RopeTable& table) { return f32_tensor(table.freqs, "freqs"); }

Tensor filled(const Shape& shape, DType dtype, uint8_t byte, const std::string& name) {
  Tensor t = Tensor::empty(shape, dtype, name);
  if (t.storage()->bytes() > 0) std::memset(t.storage()->data(), byte, t.storage()->bytes());
  return t;
}

template <class T>
Tensor int_tensor(DType dtype, const std::vector<T>& values, const std::string& name) {
  Tensor t = Tensor::empty({static_cast<int64_t>(values.size())}, dtype, name);
  std::copy(values.begin(), values.end(), t.data<T>());
  return t;
}

// ---- host vs device -------------------------------------------------------------------------------

using Op = std::function<void(std::vector<Tensor>&)>;

// Expects equal byte vectors; reports the first difference.
void expect_same_bytes(const std::vector<uint8_t>& got, const std::vector<uint8_t>& want, const std::string& what) {
  ASSERT_EQ(got.size(), want.size()) << what;
  int64_t count = 0;
  size_t first = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    if (got[i] != want[i]) {
      if (count == 0) first = i;
      ++count;
    }
  }
  EXPECT_EQ(count, 0) << what << ": " << count << " bytes differ, first at byte " << first << " (device 0x" << std::hex
                      << (count ? int(got[first]) : 0) << ", host 0x" << (count ? int(want[first]) : 0) << ")";
}

// Runs `op` on clones of the host buffers `inputs` and on device copies of them, then kReruns - 1
// times more on fresh device copies. Every device buffer must equal the host run's bytes, and every
// rerun the first device run's bytes. The device allocator is in testing mode (fresh memory
// poisoned, guards checked afterwards).
void expect_device_equals_host(const std::vector<Tensor>& inputs, const Op& op, const std::string& what) {
  Allocator device(*cuda_memory(0), AllocatorMode::testing);
  std::vector<Tensor> host;
  for (const Tensor& t : inputs) host.push_back(t.clone(t.name()));
  op(host);
  std::vector<std::vector<uint8_t>> want, first;
  for (const Tensor& t : host) want.push_back(storage_bytes(t));
  for (int run = 0; run < kReruns; ++run) {
    std::vector<Tensor> dev;
    for (const Tensor& t : inputs) dev.push_back(t.to(device));
    op(dev);
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess) << what;
    for (size_t i = 0; i < dev.size(); ++i) {
      const std::vector<uint8_t> got = storage_bytes(dev[i]);
      if (run == 0) {
        expect_same_bytes(got, want[i], what + ", buffer '" + inputs[i].name() + "' vs host");
        first.push_back(got);
      } else {
        expect_same_bytes(got, first[i], what + ", buffer '" + inputs[i].name() + "' rerun " + std::to_string(run));
      }
    }
    if (::testing::Test::HasFailure()) return;
  }
  const auto damage = device.check_guards();
  EXPECT_TRUE(damage.empty()) << what << ": " << (damage.empty() ? "" : damage[0].describe());
}

// The ContractError `call` throws on device copies of `inputs` (its argument, or "" for none), and
// that the buffers were left untouched.
std::string device_contract_argument(const std::vector<Tensor>& inputs, const Op& op) {
  Allocator device(*cuda_memory(0), AllocatorMode::plain);
  std::vector<Tensor> dev;
  for (const Tensor& t : inputs) dev.push_back(t.to(device));
  std::string argument;
  try {
    op(dev);
  } catch (const ContractError& e) {
    argument = e.argument();
  }
  EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  for (size_t i = 0; i < dev.size(); ++i) {
    expect_same_bytes(storage_bytes(dev[i]), storage_bytes(inputs[i]), "untouched '" + inputs[i].name() + "'");
  }
  return argument;
}

const ModelConfig& flash() {
  static const ModelConfig config = load_model_config("flash");
  return config;
}
const ModelConfig& micro() {
  static const ModelConfig config = load_model_config("micro");
  return config;
}

ref::Context quant_ctx(const ModelConfig& config) { return ref::Context{config, ref::Numerics{ref::Mode::quant_sim}}; }

// The reference's view of row t of a host bf16 tensor (any row stride) as floats.
std::vector<float> row_floats(const Tensor& t, int64_t row) {
  const auto* p = t.data<const uint16_t>() + row * t.stride(0);
  std::vector<float> out(static_cast<size_t>(t.size(1)));
  for (size_t i = 0; i < out.size(); ++i) out[i] = bf16_to_f32(p[i]);
  return out;
}

ref::Mat mat_of(const Tensor& t) {
  ref::Mat m(t.size(0), t.size(1));
  for (int64_t r = 0; r < m.rows; ++r) {
    const std::vector<float> row = row_floats(t, r);
    std::copy(row.begin(), row.end(), m.row(r));
  }
  return m;
}

// Every bf16 code of the (device) tensor t against the reference values rounded to bf16.
void expect_bf16_equals(const Tensor& t, const ref::Mat& want, const std::string& what) {
  const Tensor h = t.to(default_host_allocator());
  ASSERT_EQ(h.numel(), want.size()) << what;
  int64_t mismatches = 0, first = -1;
  for (int64_t i = 0; i < want.size(); ++i) {
    if (h.data<uint16_t>()[i] != f32_to_bf16(want.data[static_cast<size_t>(i)])) {
      if (first < 0) first = i;
      ++mismatches;
    }
  }
  EXPECT_EQ(mismatches, 0) << what << ": first at " << first;
}

// ---- glibc's sinf / cosf on the device -------------------------------------------------------------

__global__ void sincos_kernel(const float* angles, float* s, float* c, long long n) {
  const long long i = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const gpu_math::SinCos sc = gpu_math::libm_sincosf(angles[i]);
  s[i] = sc.sin;
  c[i] = sc.cos;
}

// The RoPE kernels (and the compressor's) are bitwise equal to the host only while libm.h's
// libm_sincosf returns what this host's std::sin / std::cos return; a failure here means the host's
// libm is not the one libm.h replays (another glibc, or no FMA hardware), not a kernel bug. The one
// check of the device sinf / cosf against the host library.
TEST(GpuRopeMath, LibmSinCosEqualsTheHostsStdSinCos) {
  DSV4_REQUIRE_GPU();
  std::vector<float> angles;
  // Every 251st f32 bit pattern (all exponents, both signs), then RoPE's own angles f32(pos) * f_j
  // for the YaRN table at every position below 2^16 and a stride of positions up to 2^31.
  for (uint64_t b = 0; b < (1ull << 32); b += 251) {
    const float x = f32_from_bits(static_cast<uint32_t>(b));
    if (std::isfinite(x)) angles.push_back(x);
  }
  const ref::RopeTable table = ref::make_rope_table(flash(), 4);
  for (int64_t pos = 0; pos < (int64_t{1} << 31); pos += pos < 65536 ? 1 : 65521) {
    for (float f : table.freqs) angles.push_back(gpu::rope_angle(static_cast<int32_t>(pos), f));
  }
  const auto n = static_cast<long long>(angles.size());
  Allocator device(*cuda_memory(0), AllocatorMode::plain);
  Tensor in = f32_tensor(angles, "angles").to(device);
  Tensor s = Tensor::empty({n}, DType::f32, device, "sin");
  Tensor c = Tensor::empty({n}, DType::f32, device, "cos");
  sincos_kernel<<<gpu::blocks_for(n, 256), 256>>>(in.data<float>(), s.data<float>(), c.data<float>(), n);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  const Tensor sh = s.to(default_host_allocator());
  const Tensor ch = c.to(default_host_allocator());
  int64_t mismatches = 0;
  for (long long i = 0; i < n; ++i) {
    const float x = angles[static_cast<size_t>(i)];
    const float want_s = std::sin(x), want_c = std::cos(x);
    if (f32_bits(sh.data<float>()[i]) != f32_bits(want_s) || f32_bits(ch.data<float>()[i]) != f32_bits(want_c)) {
      if (++mismatches <= 5) {
        ADD_FAILURE() << "angle " << x << " (0x" << std::hex << f32_bits(x) << std::dec << "): device sin "
                      << sh.data<float>()[i] << " cos " << ch.data<float>()[i] << ", host sin " << want_s << " cos "
                      << want_c;
      }
    }
  }
  EXPECT_EQ(mismatches, 0) << "of " << n << " angles";
}

// ---- fused_norm_rope_inplace ------------------------------------------------------------------------

struct NormCase {
  const ModelConfig* config;
  const char* name;
};

std::vector<NormCase> norm_cases() { return {{&flash(), "flash"}, {&micro(), "micro"}}; }

TEST(GpuNormRope, InplaceEqualsHost) {
  DSV4_REQUIRE_GPU();
  for (const NormCase& nc : norm_cases()) {
    const ModelConfig& c = *nc.config;
    const ref::RopeTable rope = ref::make_rope_table(c, 4);
    for (int64_t T : kTokenCounts) {
      std::mt19937_64 rng(100 + T);
      const std::vector<Tensor> inputs = {random_bf16(rng, T, c.head_dim, "kv", c.kv_block_size),
                                          random_weight(rng, c.head_dim, "kv_norm.weight"), freqs_tensor(rope),
                                          positions_tensor(rng, T)};
      expect_device_equals_host(
          inputs, [&](std::vector<Tensor>& b) { fused_norm_rope_inplace(b[0], b[1], c.norm_eps, b[2], b[3]); },
          std::string(nc.name) + " T " + std::to_string(T));
    }
  }
}

// A [T, D] slice of a qkv_a buffer [T, q_lora + D] (bug class A1).
TEST(GpuNormRope, InplaceStridedSliceIsContractErrorNamingKvAndSingleRowSliceRuns) {
  DSV4_REQUIRE_GPU();
  const ModelConfig& c = flash();
  const int64_t q_lora = c.q_lora_rank;
  const ref::RopeTable rope = ref::make_rope_table(c, 4);
  std::mt19937_64 rng(7);
  for (int64_t T : {2, 5}) {
    const std::vector<Tensor> inputs = {random_bf16(rng, T, q_lora + c.head_dim, "qkv_a"),
                                        random_weight(rng, c.head_dim, "kv_norm.weight"), freqs_tensor(rope),
                                        positions_tensor(rng, T)};
    const std::string argument = device_contract_argument(inputs, [&](std::vector<Tensor>& b) {
      Tensor kv = b[0].narrow(1, q_lora, c.head_dim);
      fused_norm_rope_inplace(kv, b[1], c.norm_eps, b[2], b[3]);
    });
    EXPECT_EQ(argument, "kv") << "T " << T;
  }
  // PyTorch's rule: a one-row slice is contiguous whatever its row stride; only the kv part changes.
  const std::vector<Tensor> one = {random_bf16(rng, 1, q_lora + c.head_dim, "qkv_a"),
                                   random_weight(rng, c.head_dim, "kv_norm.weight"), freqs_tensor(rope),
                                   positions_tensor(rng, 1)};
  expect_device_equals_host(
      one,
      [&](std::vector<Tensor>& b) {
        Tensor kv = b[0].narrow(1, q_lora, c.head_dim);
        fused_norm_rope_inplace(kv, b[1], c.norm_eps, b[2], b[3]);
      },
      "T = 1 slice");
}

// Fault norm-rope-contiguity-unchecked: both devices accept the strided slice and write dense rows
// from its first element, the same wrong bytes.
TEST(GpuNormRope, ContiguityFaultMisreadsTheSliceLikeTheHost) {
  DSV4_REQUIRE_GPU();
  const ModelConfig& c = flash();
  const int64_t q_lora = c.q_lora_rank;
  const ref::RopeTable rope = ref::make_rope_table(c, 4);
  std::mt19937_64 rng(8);
  const int64_t T = 3;
  const std::vector<Tensor> inputs = {random_bf16(rng, T, q_lora + c.head_dim, "qkv_a"),
                                      random_weight(rng, c.head_dim, "kv_norm.weight"), freqs_tensor(rope),
                                      positions_tensor(rng, T)};
  faults::ScopedFaults fault({faults::Fault::norm_rope_contiguity_unchecked});
  expect_device_equals_host(
      inputs,
      [&](std::vector<Tensor>& b) {
        Tensor kv = b[0].narrow(1, q_lora, c.head_dim);
        fused_norm_rope_inplace(kv, b[1], c.norm_eps, b[2], b[3]);
      },
      "faulty strided slice");
}

// The reference KV path on one row: rms_norm with weight, RoPE, bf16.
std::vector<float> reference_norm_rope(const ModelConfig& c, const ref::RopeTable& rope, const std::vector<float>& x,
                                       const std::vector<float>& weight, int32_t pos) {
  const ref::Context ctx = quant_ctx(c);
  ref::Mat in(1, c.head_dim), w(1, c.head_dim);
  std::copy(x.begin(), x.end(), in.data.begin());
  std::copy(weight.begin(), weight.end(), w.data.begin());
  ref::Mat y = ref::rms_norm(ctx, in, w);
  float* part = y.row(0) + c.nope_head_dim();
  ref::apply_rope(part, pos, rope, /*inverse=*/false);
  for (int64_t i = 0; i < c.rope_head_dim; ++i) part[i] = ctx.act(part[i]);
  return y.data;
}

std::vector<float> floats_of(const Tensor& t) {
  return std::vector<float>(t.data<const float>(), t.data<const float>() + t.numel());
}

TEST(GpuNormRope, InplaceEqualsReference) {
  DSV4_REQUIRE_GPU();
  const ModelConfig& c = flash();
  const ref::RopeTable rope = ref::make_rope_table(c, 4);
  std::mt19937_64 rng(9);
  const int64_t T = 7;
  const Tensor x = random_bf16(rng, T, c.head_dim, "kv");
  const Tensor w = random_weight(rng, c.head_dim, "kv_norm.weight");
  const Tensor pos = positions_tensor(rng, T);
  Allocator device(*cuda_memory(0), AllocatorMode::testing);
  Tensor kv = x.to(device);
  fused_norm_rope_inplace(kv, w.to(device), c.norm_eps, freqs_tensor(rope).to(device), pos.to(device));
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  ref::Mat want(T, c.head_dim);
  for (int64_t t = 0; t < T; ++t) {
    const std::vector<float> r = reference_norm_rope(c, rope, row_floats(x, t), floats_of(w), pos.data<int32_t>()[t]);
    std::copy(r.begin(), r.end(), want.row(t));
  }
  expect_bf16_equals(kv, want, "fused_norm_rope_inplace vs reference");
}

TEST(GpuDevices, MixedHostAndDeviceArgumentsAreContractErrors) {
  DSV4_REQUIRE_GPU();
  const ModelConfig& c = flash();
  const ref::RopeTable rope = ref::make_rope_table(c, 4);
  std::mt19937_64 rng(10);
  Allocator device(*cuda_memory(0), AllocatorMode::plain);
  Tensor kv = random_bf16(rng, 2, c.head_dim, "kv").to(device);
  const Tensor w = random_weight(rng, c.head_dim, "kv_norm.weight");  // left on the host
  try {
    fused_norm_rope_inplace(kv, w, c.norm_eps, freqs_tensor(rope).to(device), positions_tensor(rng, 2).to(device));
    FAIL() << "a host weight with a device kv was accepted";
  } catch (const ContractError& e) {
    EXPECT_EQ(e.argument(), "weight") << e.what();
  }
  Tensor out = Tensor::empty({2, c.head_dim}, DType::bf16, "out");  // host
  try {
    rms_norm(kv, w.to(device), c.norm_eps, out);
    FAIL() << "a host out with a device x was accepted";
  } catch (const ContractError& e) {
    EXPECT_EQ(e.argument(), "out") << e.what();
  }
}

// ---- fused_norm_rope_store_kv ---------------------------------------------------------------------------

struct StoreInputs {
  std::vector<Tensor> buffers;  // kv (or its wider buffer), weight, freqs, positions, swa_locs, cache
  int64_t page_size = 0;
};

// T rows, every third row padding (-1), the others distinct locations spread over the pages.
StoreInputs store_inputs(const ModelConfig& c, const ref::RopeTable& rope, int64_t T, int64_t extra_cols,
                         int64_t page_size, uint64_t seed) {
  std::mt19937_64 rng(seed);
  StoreInputs in;
  in.page_size = page_size;
  const int64_t entries = std::max<int64_t>(T, 1) * 2;
  const int64_t pages = (entries + page_size - 1) / page_size;
  std::vector<int64_t> free_locs(static_cast<size_t>(pages * page_size));
  for (size_t i = 0; i < free_locs.size(); ++i) free_locs[i] = static_cast<int64_t>(i);
  std::shuffle(free_locs.begin(), free_locs.end(), rng);
  std::vector<int64_t> locs;
  for (int64_t t = 0; t < T; ++t) locs.push_back(t % 3 == 1 ? -1 : free_locs[static_cast<size_t>(t)]);
  const Model1Layout l = model1_layout(kNormRopeStoreOp, c.head_dim, c.rope_head_dim, c.kv_block_size);
  Tensor kv = random_bf16(rng, T, extra_cols + c.head_dim, "qkv_a", c.kv_block_size);
  if (T > 0) {
    // Edge blocks in row 0: a zero block (amax clamped to 1e-4); a large value beside tiny ones.
    auto* p = kv.data<uint16_t>() + extra_cols;
    for (int64_t i = 0; i < c.kv_block_size; ++i) p[i] = f32_to_bf16(0.0f);
    p[c.kv_block_size + 2] = f32_to_bf16(448.0f);
    p[c.kv_block_size + 3] = f32_to_bf16(-1e30f);
  }
  in.buffers = {kv,
                random_weight(rng, c.head_dim, "kv_norm.weight"),
                freqs_tensor(rope),
                positions_tensor(rng, T),
                int_tensor<int64_t>(DType::i64, locs, "swa_locs"),
                filled({pages, l.page_bytes(page_size)}, DType::u8, kPoison, "swa_cache")};
  return in;
}

Op store_op(const ModelConfig& c, int64_t extra_cols, int64_t page_size) {
  return [&c, extra_cols, page_size](std::vector<Tensor>& b) {
    const Tensor kv = extra_cols > 0 ? b[0].narrow(1, extra_cols, c.head_dim) : b[0];
    fused_norm_rope_store_kv(kv, b[1], c.norm_eps, b[2], b[3], b[4], b[5], page_size, c.kv_block_size);
  };
}

TEST(GpuNormRopeStore, CacheBytesEqualHost) {
  DSV4_REQUIRE_GPU();
  for (const NormCase& nc : norm_cases()) {
    const ModelConfig& c = *nc.config;
    const ref::RopeTable rope = ref::make_rope_table(c, 4);
    for (int64_t T : kTokenCounts) {
      for (int64_t extra : {int64_t{0}, c.q_lora_rank}) {  // dense kv, and a strided slice of qkv_a
        for (int64_t page_size : {int64_t{3}, int64_t{64}}) {
          const StoreInputs in = store_inputs(c, rope, T, extra, page_size, 200 + T);
          expect_device_equals_host(in.buffers, store_op(c, extra, page_size),
                                    std::string(nc.name) + " T " + std::to_string(T) + " extra cols " +
                                        std::to_string(extra) + " page size " + std::to_string(page_size));
        }
      }
    }
  }
}

TEST(GpuNormRopeStore, RepeatedLocationKeepsTheLastRowLikeTheHost) {
  DSV4_REQUIRE_GPU();
  const ModelConfig& c = flash();
  const ref::RopeTable rope = ref::make_rope_table(c, 4);
  StoreInputs in = store_inputs(c, rope, 9, 0, 4, 300);
  const std::vector<int64_t> locs = {5, 2, 5, -1, 7, 2, 5, 0, 7};
  std::copy(locs.begin(), locs.end(), in.buffers[4].data<int64_t>());
  expect_device_equals_host(in.buffers, store_op(c, 0, 4), "repeated locations");
}

// The GPU cannot check location values at issue time: one outside the cache writes nothing.
TEST(GpuNormRopeStore, LocationOutsideTheCacheWritesNothingOnTheGpu) {
  DSV4_REQUIRE_GPU();
  const ModelConfig& c = flash();
  const ref::RopeTable rope = ref::make_rope_table(c, 4);
  StoreInputs in = store_inputs(c, rope, 3, 0, 4, 301);
  const int64_t entries = in.buffers[5].size(0) * in.page_size;
  const std::vector<int64_t> locs = {entries, -7, entries + 100};
  std::copy(locs.begin(), locs.end(), in.buffers[4].data<int64_t>());
  Allocator device(*cuda_memory(0), AllocatorMode::testing);
  std::vector<Tensor> dev;
  for (const Tensor& t : in.buffers) dev.push_back(t.to(device));
  store_op(c, 0, in.page_size)(dev);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  expect_same_bytes(storage_bytes(dev[5]), storage_bytes(in.buffers[5]), "cache");
  EXPECT_TRUE(device.check_guards().empty());
}

// The reference's cached view of one row: the nope dims FP8 quant-dequant in blocks, rope bf16.
std::vector<float> reference_cached(std::vector<float> kv, int64_t nope, int64_t block) {
  ref::fp8_quant_dequant(kv.data(), nope, block);
  for (size_t i = static_cast<size_t>(nope); i < kv.size(); ++i) kv[i] = round_bf16(kv[i]);
  return kv;
}

TEST(GpuNormRopeStore, EntriesDecodeToTheReference) {
  DSV4_REQUIRE_GPU();
  for (const NormCase& nc : norm_cases()) {
    const ModelConfig& c = *nc.config;
    const ref::RopeTable rope = ref::make_rope_table(c, 4);
    const int64_t T = 6, page_size = 4;
    StoreInputs in = store_inputs(c, rope, T, c.q_lora_rank, page_size, 302);
    Allocator device(*cuda_memory(0), AllocatorMode::testing);
    std::vector<Tensor> dev;
    for (const Tensor& t : in.buffers) dev.push_back(t.to(device));
    store_op(c, c.q_lora_rank, page_size)(dev);
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    const Tensor cache = dev[5].to(default_host_allocator());
    const Model1Layout l = model1_layout(kNormRopeStoreOp, c.head_dim, c.rope_head_dim, c.kv_block_size);
    const Tensor kv = in.buffers[0].narrow(1, c.q_lora_rank, c.head_dim);
    std::vector<float> got(static_cast<size_t>(c.head_dim));
    for (int64_t t = 0; t < T; ++t) {
      const int64_t loc = in.buffers[4].data<int64_t>()[t];
      if (loc < 0) continue;
      const std::vector<float> normed =
          reference_norm_rope(c, rope, row_floats(kv, t), floats_of(in.buffers[1]), in.buffers[3].data<int32_t>()[t]);
      const std::vector<float> want = reference_cached(normed, c.nope_head_dim(), c.kv_block_size);
      model1_unpack(l, page_size, cache.data<uint8_t>(), loc, got.data());
      for (size_t i = 0; i < want.size(); ++i) {
        ASSERT_EQ(f32_bits(got[i]), f32_bits(want[i])) << nc.name << " row " << t << " dim " << i;
      }
    }
  }
}

// ---- store_kv_model1: the store half alone (prefill CP) ------------------------------------------------

// T rows of kv (the last D columns of a wider buffer when extra_cols > 0, as the CP path's slice),
// every fourth row padding (-1), the rest random locations over just enough pages, so that rows
// repeat locations (the last row always repeats row 0's), and a poisoned cache.
std::vector<Tensor> store_model1_inputs(const ModelConfig& c, int64_t T, int64_t extra_cols, int64_t page_size,
                                        uint64_t seed) {
  std::mt19937_64 rng(seed);
  const int64_t pages = std::max<int64_t>((T + page_size - 1) / page_size, 1);
  std::vector<int64_t> locs;
  for (int64_t t = 0; t < T; ++t) locs.push_back(t % 4 == 1 ? -1 : static_cast<int64_t>(rng() % (pages * page_size)));
  if (T >= 3) locs.back() = locs.front();
  Tensor kv = random_bf16(rng, T, extra_cols + c.head_dim, "kv", c.kv_block_size);
  if (T > 0) {
    // Edge blocks in row 0: a zero block (amax clamped to 1e-4); a large value beside tiny ones.
    auto* p = kv.data<uint16_t>() + extra_cols;
    for (int64_t i = 0; i < c.kv_block_size; ++i) p[i] = f32_to_bf16(0.0f);
    p[c.kv_block_size + 2] = f32_to_bf16(448.0f);
    p[c.kv_block_size + 3] = f32_to_bf16(-1e30f);
  }
  const Model1Layout l = model1_layout(kStoreKvModel1Op, c.head_dim, c.rope_head_dim, c.kv_block_size);
  return {kv, int_tensor<int64_t>(DType::i64, locs, "locs"),
          filled({pages, l.page_bytes(page_size)}, DType::u8, kPoison, "swa_cache")};
}

Op store_model1_op(const ModelConfig& c, int64_t extra_cols, int64_t page_size) {
  return [&c, extra_cols, page_size](std::vector<Tensor>& b) {
    const Tensor kv = extra_cols > 0 ? b[0].narrow(1, extra_cols, c.head_dim) : b[0];
    store_kv_model1(kv, c.rope_head_dim, b[1], b[2], page_size, c.kv_block_size);
  };
}

// Host vs GPU bit for bit (the whole cache: entries, padding and untouched poison), repeated locations
// and -1 included, dense and strided kv, two page sizes, ten reruns.
TEST(GpuStoreKvModel1, CacheBytesEqualHost) {
  DSV4_REQUIRE_GPU();
  for (const NormCase& nc : norm_cases()) {
    const ModelConfig& c = *nc.config;
    for (int64_t T : {0, 1, 2, 7, 8, 64}) {
      for (int64_t extra : {int64_t{0}, c.q_lora_rank}) {
        for (int64_t page_size : {int64_t{3}, int64_t{64}}) {
          expect_device_equals_host(store_model1_inputs(c, T, extra, page_size, 400 + T),
                                    store_model1_op(c, extra, page_size),
                                    std::string(nc.name) + " T " + std::to_string(T) + " extra cols " +
                                        std::to_string(extra) + " page size " + std::to_string(page_size));
        }
      }
    }
  }
}

// The CP path's identity on the device: norm + RoPE in place on a contiguous copy of the slice, then
// store_kv_model1, writes the bytes fused_norm_rope_store_kv writes from the slice (one packer).
TEST(GpuStoreKvModel1, OfNormedRowsEqualsTheFusedStore) {
  DSV4_REQUIRE_GPU();
  for (const NormCase& nc : norm_cases()) {
    const ModelConfig& c = *nc.config;
    const ref::RopeTable rope = ref::make_rope_table(c, 4);
    for (int64_t T : {1, 2, 7, 8, 64}) {
      const int64_t page_size = 4;
      const StoreInputs in = store_inputs(c, rope, T, c.q_lora_rank, page_size, 500 + T);
      Allocator device(*cuda_memory(0), AllocatorMode::testing);
      std::vector<Tensor> dev;
      for (const Tensor& t : in.buffers) dev.push_back(t.to(device));
      const Tensor slice = dev[0].narrow(1, c.q_lora_rank, c.head_dim);
      Tensor fused = dev[5].clone("fused");
      fused_norm_rope_store_kv(slice, dev[1], c.norm_eps, dev[2], dev[3], dev[4], fused, page_size, c.kv_block_size);
      Tensor normed = Tensor::empty({T, c.head_dim}, DType::bf16, device, "normed");
      copy_rows(slice, normed);
      fused_norm_rope_inplace(normed, dev[1], c.norm_eps, dev[2], dev[3]);
      Tensor split = dev[5].clone("split");
      store_kv_model1(normed, c.rope_head_dim, dev[4], split, page_size, c.kv_block_size);
      ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
      expect_same_bytes(storage_bytes(split), storage_bytes(fused), std::string(nc.name) + " T " + std::to_string(T));
      EXPECT_TRUE(device.check_guards().empty());
    }
  }
}

// A location outside the cache (unchecked on the GPU) writes nothing; the host refuses it.
TEST(GpuStoreKvModel1, LocationOutsideTheCacheWritesNothingOnTheGpu) {
  DSV4_REQUIRE_GPU();
  const ModelConfig& c = flash();
  std::vector<Tensor> in = store_model1_inputs(c, 3, 0, 4, 401);
  const int64_t entries = in[2].size(0) * 4;
  const std::vector<int64_t> locs = {entries, -7, entries + 100};
  std::copy(locs.begin(), locs.end(), in[1].data<int64_t>());
  EXPECT_THROW(store_model1_op(c, 0, 4)(in), ContractError);
  Allocator device(*cuda_memory(0), AllocatorMode::testing);
  std::vector<Tensor> dev;
  for (const Tensor& t : in) dev.push_back(t.to(device));
  store_model1_op(c, 0, 4)(dev);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  expect_same_bytes(storage_bytes(dev[2]), storage_bytes(in[2]), "cache");
  EXPECT_TRUE(device.check_guards().empty());
}

// The device entries decode to the reference's cached view of the rows (FP8 quant-dequant of the nope
// dims in blocks, the rope dims bf16), the tolerance of the host tests: none.
TEST(GpuStoreKvModel1, EntriesDecodeToTheReference) {
  DSV4_REQUIRE_GPU();
  for (const NormCase& nc : norm_cases()) {
    const ModelConfig& c = *nc.config;
    const int64_t T = 7, page_size = 4;
    std::vector<Tensor> in = store_model1_inputs(c, T, c.q_lora_rank, page_size, 402);
    // Distinct locations here, so that every row's entry survives.
    for (int64_t t = 0; t < T; ++t) in[1].data<int64_t>()[t] = t % 4 == 1 ? -1 : t;
    Allocator device(*cuda_memory(0), AllocatorMode::testing);
    std::vector<Tensor> dev;
    for (const Tensor& t : in) dev.push_back(t.to(device));
    store_model1_op(c, c.q_lora_rank, page_size)(dev);
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    const Tensor cache = dev[2].to(default_host_allocator());
    const Model1Layout l = model1_layout(kStoreKvModel1Op, c.head_dim, c.rope_head_dim, c.kv_block_size);
    const Tensor kv = in[0].narrow(1, c.q_lora_rank, c.head_dim);
    std::vector<float> got(static_cast<size_t>(c.head_dim));
    for (int64_t t = 0; t < T; ++t) {
      const int64_t loc = in[1].data<int64_t>()[t];
      if (loc < 0) continue;
      const std::vector<float> want = reference_cached(row_floats(kv, t), c.nope_head_dim(), c.kv_block_size);
      model1_unpack(l, page_size, cache.data<uint8_t>(), loc, got.data());
      for (size_t i = 0; i < want.size(); ++i) {
        ASSERT_EQ(f32_bits(got[i]), f32_bits(want[i])) << nc.name << " row " << t << " dim " << i;
      }
    }
  }
}

// ---- rms_norm ---------------------------------------------------------------------------------------

TEST(GpuRmsNorm, EqualsHost) {
  DSV4_REQUIRE_GPU();
  for (int64_t n : {int64_t{4096}, int64_t{1000}}) {
    for (int64_t T : kTokenCounts) {
      std::mt19937_64 rng(400 + T + n);
      // Dense x, x sliced out of a wider buffer (row stride 2n), and in place.
      const std::vector<Tensor> dense = {random_bf16(rng, T, n, "x"), random_weight(rng, n, "weight"),
                                         filled({T, n}, DType::bf16, kPoison, "out")};
      expect_device_equals_host(
          dense, [&](std::vector<Tensor>& b) { rms_norm(b[0], b[1], 1e-6, b[2]); },
          "n " + std::to_string(n) + " T " + std::to_string(T));
      const std::vector<Tensor> wide = {random_bf16(rng, T, 2 * n, "wide"), random_weight(rng, n, "weight"),
                                        filled({T, n}, DType::bf16, kPoison, "out")};
      expect_device_equals_host(
          wide, [&](std::vector<Tensor>& b) { rms_norm(b[0].narrow(1, n, n), b[1], 1e-6, b[2]); },
          "strided n " + std::to_string(n) + " T " + std::to_string(T));
      const std::vector<Tensor> inplace = {random_bf16(rng, T, n, "x"), random_weight(rng, n, "weight")};
      expect_device_equals_host(
          inplace, [&](std::vector<Tensor>& b) { rms_norm(b[0], b[1], 1e-6, b[0]); },
          "in place n " + std::to_string(n) + " T " + std::to_string(T));
    }
  }
}

TEST(GpuRmsNorm, StridedOutIsContractError) {
  DSV4_REQUIRE_GPU();
  std::mt19937_64 rng(401);
  const std::vector<Tensor> inputs = {random_bf16(rng, 4, 256, "x"), random_weight(rng, 256, "weight"),
                                      filled({4, 512}, DType::bf16, kPoison, "wide_out")};
  EXPECT_EQ(device_contract_argument(
                inputs,
                [](std::vector<Tensor>& b) {
                  Tensor out = b[2].narrow(1, 0, 256);
                  rms_norm(b[0], b[1], 1e-6, out);
                }),
            "out");
}

TEST(GpuRmsNorm, EqualsReference) {
  DSV4_REQUIRE_GPU();
  const ModelConfig& c = flash();
  std::mt19937_64 rng(402);
  const int64_t T = 5;
  const Tensor x = random_bf16(rng, T, c.dim, "x");
  const Tensor w = random_weight(rng, c.dim, "attn_norm.weight");
  Allocator device(*cuda_memory(0), AllocatorMode::testing);
  Tensor out = Tensor::empty({T, c.dim}, DType::bf16, device, "out");
  rms_norm(x.to(device), w.to(device), c.norm_eps, out);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  ref::Mat wm(1, c.dim);
  wm.data = floats_of(w);
  expect_bf16_equals(out, ref::rms_norm(quant_ctx(c), mat_of(x), wm), "rms_norm vs reference");
}

// ---- q_norm_rope_inplace and indexer_q ---------------------------------------------------------------

struct HeadsCase {
  int64_t heads, head_dim, rope_dim;
};

TEST(GpuQNormRope, EqualsHost) {
  DSV4_REQUIRE_GPU();
  const ModelConfig& c = flash();
  for (const HeadsCase hc : {HeadsCase{c.n_heads, c.head_dim, c.rope_head_dim}, HeadsCase{3, 96, 32}}) {
    ref::RopeTable rope = ref::make_rope_table(c, 4);
    rope.freqs.resize(static_cast<size_t>(hc.rope_dim / 2));
    for (int64_t T : kTokenCounts) {
      std::mt19937_64 rng(500 + T + hc.heads);
      const std::vector<Tensor> inputs = {random_bf16(rng, T, hc.heads * hc.head_dim, "q"), freqs_tensor(rope),
                                          positions_tensor(rng, T)};
      expect_device_equals_host(
          inputs,
          [&](std::vector<Tensor>& b) { q_norm_rope_inplace(b[0], hc.heads, hc.head_dim, c.norm_eps, b[1], b[2]); },
          "heads " + std::to_string(hc.heads) + " T " + std::to_string(T));
    }
  }
}

TEST(GpuQNormRope, StridedQIsContractError) {
  DSV4_REQUIRE_GPU();
  const ModelConfig& c = flash();
  std::mt19937_64 rng(501);
  const int64_t H = 4, D = c.head_dim;
  const std::vector<Tensor> inputs = {random_bf16(rng, 3, 2 * H * D, "wide_q"),
                                      freqs_tensor(ref::make_rope_table(c, 4)), positions_tensor(rng, 3)};
  EXPECT_EQ(device_contract_argument(inputs,
                                     [&](std::vector<Tensor>& b) {
                                       Tensor q = b[0].narrow(1, H * D, H * D);
                                       q_norm_rope_inplace(q, H, D, c.norm_eps, b[1], b[2]);
                                     }),
            "q");
  EXPECT_EQ(device_contract_argument(inputs,
                                     [&](std::vector<Tensor>& b) {
                                       Tensor q = b[0].narrow(1, H * D, H * D);
                                       indexer_q(q, 4 * H, D / 4, b[1], b[2], IndexerQuant::fp4, 32);
                                     }),
            "q");
}

TEST(GpuQNormRope, EqualsReference) {
  DSV4_REQUIRE_GPU();
  const ModelConfig& c = flash();
  const ref::Context ctx = quant_ctx(c);
  const ref::RopeTable rope = ref::make_rope_table(c, 4);
  std::mt19937_64 rng(502);
  const int64_t T = 5;
  const Tensor q = random_bf16(rng, T, c.n_heads * c.head_dim, "q");
  const Tensor pos = positions_tensor(rng, T);
  Allocator device(*cuda_memory(0), AllocatorMode::testing);
  Tensor qd = q.to(device);
  q_norm_rope_inplace(qd, c.n_heads, c.head_dim, c.norm_eps, freqs_tensor(rope).to(device), pos.to(device));
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  ref::Mat want = mat_of(q);
  ref::head_rms_norm_inplace(ctx, want, c.n_heads, c.head_dim);
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t h = 0; h < c.n_heads; ++h) {
      float* part = want.row(t) + h * c.head_dim + c.nope_head_dim();
      ref::apply_rope(part, pos.data<int32_t>()[t], rope, /*inverse=*/false);
      for (int64_t i = 0; i < c.rope_head_dim; ++i) part[i] = ctx.act(part[i]);
    }
  }
  expect_bf16_equals(qd, want, "q_norm_rope_inplace vs reference");
}

TEST(GpuIndexerQ, EqualsHost) {
  DSV4_REQUIRE_GPU();
  const ModelConfig& c = flash();
  const int64_t H = c.index_n_heads, D = c.index_head_dim;
  const Tensor freqs = freqs_tensor(ref::make_rope_table(c, 4));
  for (const IndexerQuant quant : {IndexerQuant::fp4, IndexerQuant::fp8}) {
    for (const int64_t block : {int64_t{32}, D}) {
      for (int64_t T : kTokenCounts) {
        std::mt19937_64 rng(600 + T + block);
        const std::vector<Tensor> inputs = {random_bf16(rng, T, H * D, "index_q", 32), freqs, positions_tensor(rng, T)};
        expect_device_equals_host(
            inputs, [&](std::vector<Tensor>& b) { indexer_q(b[0], H, D, b[1], b[2], quant, block); },
            std::string(quant == IndexerQuant::fp4 ? "fp4" : "fp8") + " block " + std::to_string(block) + " T " +
                std::to_string(T));
      }
    }
  }
}

TEST(GpuIndexerQ, EqualsReference) {
  DSV4_REQUIRE_GPU();
  for (const std::string quant : {"fp4", "fp8"}) {
    ModelConfig c = flash();
    c.indexer_quant = quant;
    const ref::Context ctx = quant_ctx(c);
    const ref::RopeTable rope = ref::make_rope_table(c, 4);
    const int64_t H = c.index_n_heads, D = c.index_head_dim, rd = c.rope_head_dim, T = 5;
    std::mt19937_64 rng(601);
    const Tensor q = random_bf16(rng, T, H * D, "index_q", 32);
    const Tensor pos = positions_tensor(rng, T);
    Allocator device(*cuda_memory(0), AllocatorMode::testing);
    Tensor qd = q.to(device);
    const bool fp8 = quant == "fp8";
    indexer_q(qd, H, D, freqs_tensor(rope).to(device), pos.to(device), fp8 ? IndexerQuant::fp8 : IndexerQuant::fp4,
              fp8 ? D : c.fp4_block_size);
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    ref::Mat want = mat_of(q);
    for (int64_t t = 0; t < T; ++t) {
      for (int64_t h = 0; h < H; ++h) {
        float* qh = want.row(t) + h * D;
        ref::apply_rope(qh + D - rd, pos.data<int32_t>()[t], rope, false);
        for (int64_t i = D - rd; i < D; ++i) qh[i] = ctx.act(qh[i]);
        ref::hadamard_inplace(qh, D);
        for (int64_t i = 0; i < D; ++i) qh[i] = ctx.act(qh[i]);
        ref::simulate_indexer_quant(ctx, qh, D);
      }
    }
    expect_bf16_equals(qd, want, "indexer_q " + quant + " vs reference");
  }
}

// ---- inverse_rope_inplace and grouped_wo_a -------------------------------------------------------------

TEST(GpuInverseRope, EqualsHost) {
  DSV4_REQUIRE_GPU();
  const ModelConfig& c = flash();
  for (const HeadsCase hc : {HeadsCase{c.n_heads, c.head_dim, c.rope_head_dim}, HeadsCase{3, 96, 32}}) {
    ref::RopeTable rope = ref::make_rope_table(c, 4);
    rope.freqs.resize(static_cast<size_t>(hc.rope_dim / 2));
    for (int64_t T : kTokenCounts) {
      std::mt19937_64 rng(700 + T + hc.heads);
      const std::vector<Tensor> inputs = {random_bf16(rng, T, hc.heads * hc.head_dim, "o"), freqs_tensor(rope),
                                          positions_tensor(rng, T)};
      expect_device_equals_host(
          inputs, [&](std::vector<Tensor>& b) { inverse_rope_inplace(b[0], hc.heads, hc.head_dim, b[1], b[2]); },
          "heads " + std::to_string(hc.heads) + " T " + std::to_string(T));
    }
  }
}

TEST(GpuInverseRope, StridedOIsContractErrorAndResultEqualsReference) {
  DSV4_REQUIRE_GPU();
  const ModelConfig& c = flash();
  const ref::Context ctx = quant_ctx(c);
  const ref::RopeTable rope = ref::make_rope_table(c, 4);
  std::mt19937_64 rng(701);
  const int64_t H = c.n_heads, D = c.head_dim, T = 5;
  const std::vector<Tensor> wide = {random_bf16(rng, T, 2 * H * D, "wide_o"), freqs_tensor(rope),
                                    positions_tensor(rng, T)};
  EXPECT_EQ(device_contract_argument(wide,
                                     [&](std::vector<Tensor>& b) {
                                       Tensor o = b[0].narrow(1, 0, H * D);
                                       inverse_rope_inplace(o, H, D, b[1], b[2]);
                                     }),
            "o");
  const Tensor o = random_bf16(rng, T, H * D, "o");
  const Tensor pos = positions_tensor(rng, T);
  Allocator device(*cuda_memory(0), AllocatorMode::testing);
  Tensor od = o.to(device);
  inverse_rope_inplace(od, H, D, freqs_tensor(rope).to(device), pos.to(device));
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  ref::Mat want = mat_of(o);
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t h = 0; h < H; ++h) {
      float* part = want.row(t) + h * D + c.nope_head_dim();
      ref::apply_rope(part, pos.data<int32_t>()[t], rope, /*inverse=*/true);
      for (int64_t i = 0; i < c.rope_head_dim; ++i) part[i] = ctx.act(part[i]);
    }
  }
  expect_bf16_equals(od, want, "inverse_rope_inplace vs reference");
}

struct WoACase {
  int64_t groups, rank, width;
};

TEST(GpuGroupedWoA, EqualsHost) {
  DSV4_REQUIRE_GPU();
  // Ragged tiles (rank 96, width 328), and a realistic group shape.
  for (const WoACase wc : {WoACase{4, 96, 328}, WoACase{8, 128, 1024}}) {
    for (int64_t T : kTokenCounts) {
      std::mt19937_64 rng(800 + T + wc.groups);
      const int64_t cols = wc.groups * wc.width;
      const Tensor w = random_bf16(rng, wc.groups * wc.rank, wc.width, "wo_a");
      const std::vector<Tensor> dense = {random_bf16(rng, T, cols, "o"), w,
                                         filled({T, wc.groups * wc.rank}, DType::bf16, kPoison, "u")};
      expect_device_equals_host(
          dense, [&](std::vector<Tensor>& b) { grouped_wo_a(b[0], b[1], wc.groups, b[2]); },
          "groups " + std::to_string(wc.groups) + " T " + std::to_string(T));
      // o sliced out of a wider buffer (unit last-dim stride is all the contract asks).
      const std::vector<Tensor> wide = {random_bf16(rng, T, cols + 8, "wide_o"), w,
                                        filled({T, wc.groups * wc.rank}, DType::bf16, kPoison, "u")};
      expect_device_equals_host(
          wide, [&](std::vector<Tensor>& b) { grouped_wo_a(b[0].narrow(1, 8, cols), b[1], wc.groups, b[2]); },
          "strided o, groups " + std::to_string(wc.groups) + " T " + std::to_string(T));
    }
  }
}

TEST(GpuGroupedWoA, StridedWeightIsContractError) {
  DSV4_REQUIRE_GPU();
  std::mt19937_64 rng(801);
  const std::vector<Tensor> inputs = {random_bf16(rng, 3, 4 * 64, "o"), random_bf16(rng, 4 * 16, 128, "wide_wo_a"),
                                      filled({3, 4 * 16}, DType::bf16, kPoison, "u")};
  EXPECT_EQ(device_contract_argument(
                inputs, [](std::vector<Tensor>& b) { grouped_wo_a(b[0], b[1].narrow(1, 0, 64), 4, b[2]); }),
            "wo_a");
}

// Within the host unit test's bound: the reference sums in f64, the kernels in f32.
TEST(GpuGroupedWoA, WithinTheF32AccumulationBoundOfTheReference) {
  DSV4_REQUIRE_GPU();
  const ModelConfig& c = flash();
  const ref::Context ctx = quant_ctx(c);
  const int64_t G = c.o_groups, r = 128, W = c.n_heads * c.head_dim / G, T = 5;
  std::mt19937_64 rng(802);
  const Tensor o = random_bf16(rng, T, G * W, "o");
  const Tensor w = random_bf16(rng, G * r, W, "wo_a");
  Allocator device(*cuda_memory(0), AllocatorMode::testing);
  Tensor out = Tensor::empty({T, G * r}, DType::bf16, device, "u");
  grouped_wo_a(o.to(device), w.to(device), G, out);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  const Tensor got = out.to(default_host_allocator());
  const ref::Mat om = mat_of(o), wm = mat_of(w);
  int64_t exact = 0;
  for (int64_t g = 0; g < G; ++g) {
    const ref::Mat og = ref::cols_of(om, g * W, W);
    const ref::Mat wg = ref::rows_of(wm, g * r, r);
    const ref::Mat u = ref::linear(ctx, og, wg, ref::LinearKind::bf16);
    for (int64_t t = 0; t < T; ++t) {
      for (int64_t i = 0; i < r; ++i) {
        const float value = bf16_to_f32(got.data<uint16_t>()[t * G * r + g * r + i]);
        const float want = u.at(t, i);
        double abs_sum = 0.0;
        for (int64_t k = 0; k < W; ++k) abs_sum += std::fabs(static_cast<double>(og.at(t, k)) * wg.at(i, k));
        const double tol = static_cast<double>(W) * 0x1.0p-24 * abs_sum + std::ldexp(std::fabs(want), -7);
        EXPECT_LE(std::fabs(static_cast<double>(value) - want), tol) << "t " << t << " g " << g << " i " << i;
        exact += value == want;
      }
    }
  }
  EXPECT_GE(exact, T * G * r * 9 / 10);
}

// ---- cast ---------------------------------------------------------------------------------------------

TEST(GpuCastEntry, DispatchesToTheDeviceAndEqualsHost) {
  DSV4_REQUIRE_GPU();
  std::mt19937_64 rng(900);
  for (const DType narrow : {DType::bf16, DType::f8_e4m3fn, DType::f4_e2m1}) {
    for (int64_t n : {int64_t{0}, int64_t{1}, int64_t{2}, int64_t{5}, int64_t{8}, int64_t{64}, int64_t{1000}}) {
      std::vector<float> v(static_cast<size_t>(n));
      for (float& x : v) x = std::uniform_real_distribution<float>(-500.0f, 500.0f)(rng);
      const int64_t storage = n + n % 2;  // fp4: whole bytes
      const std::vector<Tensor> encode = {f32_tensor(v, "x"), filled({storage}, narrow, 0, "codes")};
      expect_device_equals_host(
          encode,
          [n](std::vector<Tensor>& b) {
            Tensor codes = b[1].narrow(0, 0, n);
            cast(b[0], codes);
          },
          "encode " + std::string(dtype_name(narrow)) + " n " + std::to_string(n));
      Tensor codes = filled({storage}, narrow, 0, "codes");
      Tensor head = codes.narrow(0, 0, n);
      cast(f32_tensor(v, "x"), head);
      const std::vector<Tensor> decode = {codes, filled({n}, DType::f32, kPoison, "y")};
      expect_device_equals_host(
          decode, [n](std::vector<Tensor>& b) { cast(b[0].narrow(0, 0, n), b[1]); },
          "decode " + std::string(dtype_name(narrow)) + " n " + std::to_string(n));
    }
  }
}

TEST(GpuCastEntry, MixedDevicesAndStridesAreContractErrors) {
  DSV4_REQUIRE_GPU();
  Allocator device(*cuda_memory(0), AllocatorMode::plain);
  Tensor src = Tensor::from_values({4}, DType::f32, {1, 2, 3, 4}, "x");
  Tensor dst = Tensor::empty({4}, DType::bf16, device, "y");
  try {
    cast(src, dst);
    FAIL() << "a host src with a device dst was accepted";
  } catch (const ContractError& e) {
    EXPECT_EQ(e.argument(), "dst");
  }
  Tensor wide = Tensor::empty({4, 8}, DType::f32, device, "wide");
  Tensor out = Tensor::empty({4, 4}, DType::bf16, device, "out");
  try {
    cast(wide.narrow(1, 2, 4), out);
    FAIL() << "a strided src was accepted";
  } catch (const ContractError& e) {
    EXPECT_EQ(e.argument(), "src");
  }
}

// ---- graph capture ----------------------------------------------------------------------------------

// Every entry point enqueues on current_stream() without synchronizing or allocating outside the
// stream, so a sequence of them captures into a CUDA graph whose replay writes what eager runs write.
TEST(GpuCapture, EntryPointsCaptureIntoAGraphThatReplaysTheEagerBytes) {
  DSV4_REQUIRE_GPU();
  const ModelConfig& c = flash();
  const ref::RopeTable rope = ref::make_rope_table(c, 4);
  const int64_t T = 8, H = 4, n = 1000;
  const StoreInputs store = store_inputs(c, rope, T, c.q_lora_rank, 4, 1000);
  std::mt19937_64 rng(1001);
  // store (6 buffers), then rms_norm x, weight, out; q; index_q; o; wo_a, u; cast x, codes; the cache
  // of store_kv_model1.
  std::vector<Tensor> inputs = store.buffers;
  for (const Tensor& t : {random_bf16(rng, T, n, "x"), random_weight(rng, n, "weight"),
                          filled({T, n}, DType::bf16, kPoison, "out"), random_bf16(rng, T, H * c.head_dim, "q"),
                          random_bf16(rng, T, H * c.index_head_dim, "index_q", 32),
                          random_bf16(rng, T, H * c.head_dim, "o"),
                          random_bf16(rng, 2 * 96, H * c.head_dim / 2, "wo_a"),
                          filled({T, 2 * 96}, DType::bf16, kPoison, "u"),
                          f32_tensor(std::vector<float>(77, 3.7f), "xc"), filled({77}, DType::f8_e4m3fn, 0, "codes"),
                          filled(store.buffers[5].shape(), DType::u8, kPoison, "model1_cache")}) {
    inputs.push_back(t);
  }
  const Op all = [&](std::vector<Tensor>& b) {
    store_op(c, c.q_lora_rank, 4)(b);
    rms_norm(b[6], b[7], c.norm_eps, b[8]);
    q_norm_rope_inplace(b[9], H, c.head_dim, c.norm_eps, b[2], b[3]);
    indexer_q(b[10], H, c.index_head_dim, b[2], b[3], IndexerQuant::fp4, 32);
    inverse_rope_inplace(b[11], H, c.head_dim, b[2], b[3]);
    grouped_wo_a(b[11], b[12], 2, b[13]);
    cast(b[14], b[15]);
    store_kv_model1(b[0].narrow(1, c.q_lora_rank, c.head_dim), c.rope_head_dim, b[4], b[16], 4, c.kv_block_size);
  };
  Allocator device(*cuda_memory(0), AllocatorMode::testing);
  cudaStream_t stream = nullptr;
  ASSERT_EQ(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), cudaSuccess);
  std::vector<Tensor> eager, replay;
  for (const Tensor& t : inputs) {
    eager.push_back(t.to(device));
    replay.push_back(t.to(device));
  }
  {
    StreamScope scope(stream);
    all(eager);
  }
  ASSERT_EQ(cudaStreamSynchronize(stream), cudaSuccess);
  cudaGraph_t graph = nullptr;
  cudaGraphExec_t exec = nullptr;
  ASSERT_EQ(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal), cudaSuccess);
  {
    StreamScope scope(stream);
    all(replay);
  }
  ASSERT_EQ(cudaStreamEndCapture(stream, &graph), cudaSuccess);
  ASSERT_EQ(cudaGraphInstantiate(&exec, graph, 0), cudaSuccess);
  ASSERT_EQ(cudaGraphLaunch(exec, stream), cudaSuccess);
  ASSERT_EQ(cudaStreamSynchronize(stream), cudaSuccess);
  for (size_t i = 0; i < inputs.size(); ++i) {
    expect_same_bytes(storage_bytes(replay[i]), storage_bytes(eager[i]),
                      "graph replay, buffer '" + inputs[i].name() + "'");
  }
  EXPECT_EQ(cudaGraphExecDestroy(exec), cudaSuccess);
  EXPECT_EQ(cudaGraphDestroy(graph), cudaSuccess);
  EXPECT_EQ(cudaStreamDestroy(stream), cudaSuccess);
  EXPECT_TRUE(device.check_guards().empty());
}

}  // namespace
}  // namespace dsv4::kernels
