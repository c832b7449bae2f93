// GPU tests of the MoE kernels (kernels/moe.h): moe_gate, swiglu_clamp, moe_combine and moe_experts
// on device tensors against the same entry points on host tensors, fed the same random inputs. The
// CUDA kernels follow the host loops' arithmetic order, so the comparisons are bitwise. The one
// operation that is not the host's is the exponential: the host calls glibc's expf (within 0.502
// ulp) and log1p/exp in double, the GPU exp/log1p in double rounded to fp32. They give the same
// fp32 value except within ~1e-3 ulp of a rounding boundary, and a bf16 output (or a top-k choice)
// changes only when that also crosses a bf16 rounding (or ranking) boundary: about 1e-8 per element,
// never on these fixed inputs. Every test also reruns the GPU path and requires bitwise identical
// outputs, and one tiny-config layer goes end to end against the reference MoE (quant-sim).
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <initializer_list>
#include <map>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "tests/gpu/gpu_test.h"

#include "engine/checkpoint/checkpoint_layout.h"
#include "engine/checkpoint/synthetic_weights.h"
#include "engine/config/model_config.h"
#include "engine/core/allocator.h"
#include "engine/core/error.h"
#include "engine/core/formats.h"
#include "engine/core/tensor.h"
#include "kernels/cuda/moe_tc.h"
#include "kernels/cuda/port.h"
#include "kernels/device.h"
#include "kernels/moe.h"
#include "kernels/quant_gemm.h"
#include "reference/context.h"
#include "reference/linear.h"
#include "reference/moe.h"
#include "reference/weights.h"

namespace dsv4::kernels {
namespace {

constexpr int kReruns = 10;

// The bitwise tests run the exact expert kernels; the tensor-core test switches explicitly.
const bool kExactMoeByDefault = [] {
  cuda::set_moe_gemm_path(cuda::MoeGemmPath::exact);
  return true;
}();

Tensor to_host(const Tensor& t) { return t.to(default_host_allocator()); }

std::vector<uint8_t> bytes_of(const Tensor& t) {
  const Tensor h = to_host(t);
  const auto* p = static_cast<const uint8_t*>(h.data_ptr());
  return std::vector<uint8_t>(p, p + dtype_storage_bytes(h.dtype(), h.numel()));
}

void sync() { ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess); }

// Bitwise equality of two tensors' elements (any devices), naming the first differing byte.
void expect_same_bytes(const Tensor& got, const Tensor& want, const std::string& what) {
  ASSERT_EQ(got.shape(), want.shape()) << what;
  const std::vector<uint8_t> g = bytes_of(got), w = bytes_of(want);
  ASSERT_EQ(g.size(), w.size()) << what;
  for (size_t i = 0; i < g.size(); ++i) {
    if (g[i] != w[i]) {
      ADD_FAILURE() << what << ": byte " << i << " (element " << i * 8 / static_cast<size_t>(dtype_bits(got.dtype()))
                    << ") is 0x" << std::hex << int(g[i]) << " on the GPU, 0x" << int(w[i]) << " on the host";
      return;
    }
  }
}

template <class F>
void expect_contract_error(F&& f, const std::string& argument) {
  try {
    f();
    ADD_FAILURE() << "no ContractError (expected one naming '" << argument << "')";
  } catch (const ContractError& e) {
    EXPECT_EQ(e.argument(), argument) << e.what();
  }
}

// A host tensor of N(0, sigma) values rounded to the dtype.
Tensor random_tensor(const Shape& shape, DType dtype, std::mt19937& rng, float sigma = 1.0f, const char* name = "x") {
  std::normal_distribution<float> normal(0.0f, sigma);
  std::vector<double> v(static_cast<size_t>(shape_numel(shape)));
  for (double& x : v) x = normal(rng);
  return Tensor::from_values(shape, dtype, v, name);
}

// A [rows, cols] view with padded rows (row stride cols + pad) over a host tensor, and the same view
// over its device copy.
struct Padded {
  Tensor host;
  Tensor dev;
};
Padded padded(const Tensor& dense, int64_t pad, Allocator& device) {
  const int64_t rows = dense.size(0), cols = dense.size(1);
  Tensor wide = Tensor::empty({rows, cols + pad}, dense.dtype(), "wide");
  wide.fill(0.0);
  Tensor view = wide.narrow(1, 0, cols);
  const std::vector<double> v = dense.values();
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < cols; ++c) view.set({r, c}, v[static_cast<size_t>(r * cols + c)]);
  }
  return {view, wide.to(device).narrow(1, 0, cols)};
}

// ---- moe_gate ------------------------------------------------------------------------------------

struct GateCase {
  int64_t E, k;
  bool bias, hash;
  DType ids;
};

void run_gate_case(const GateCase& c, int64_t T, Allocator& device, unsigned seed) {
  SCOPED_TRACE("E " + std::to_string(c.E) + " k " + std::to_string(c.k) + " T " + std::to_string(T) +
               (c.hash ? " hash" : c.bias ? " bias" : " plain"));
  std::mt19937 rng(seed);
  Tensor logits = random_tensor({T, c.E}, DType::f32, rng, 2.0f, "logits");
  // Ties: in every third row, pairs of equal logits (equal keys where the bias is equal too), and a
  // row of all-equal logits.
  for (int64_t t = 0; t < T; ++t) {
    if (t % 3 == 0) {
      for (int64_t e = 0; e + 1 < c.E; e += 2) logits.set({t, e + 1}, logits.get({t, e}));
    }
    if (t == 4) {
      for (int64_t e = 0; e < c.E; ++e) logits.set({t, e}, 0.5);
    }
  }
  Tensor bias, table, ids, ids_wide;
  const float route_scale = 1.5f;
  if (c.bias) {
    std::vector<double> b(static_cast<size_t>(c.E));
    for (double& x : b) x = (static_cast<int>(rng() % 3) - 1) * 0.25;  // few values: equal keys happen
    bias = Tensor::from_values({c.E}, DType::f32, b, "bias");
  }
  if (c.hash) {
    const int64_t V = 1000;
    table = Tensor::empty({V, c.k}, DType::i32, "tid2eid");
    std::vector<int32_t> perm(static_cast<size_t>(c.E));
    for (int64_t v = 0; v < V; ++v) {
      std::iota(perm.begin(), perm.end(), 0);
      std::shuffle(perm.begin(), perm.end(), rng);
      for (int64_t j = 0; j < c.k; ++j) table.data<int32_t>()[v * c.k + j] = perm[static_cast<size_t>(j)];
    }
    // Strided token ids (column 0 of [T, 2]).
    ids_wide = Tensor::empty({T, 2}, c.ids, "ids");
    for (int64_t t = 0; t < T; ++t) {
      ids_wide.set({t, 0}, static_cast<double>(rng() % V));
      ids_wide.set({t, 1}, -5.0);
    }
    ids = ids_wide.select(1, 0);
  }
  Tensor experts = Tensor::empty({T, c.k}, DType::i32, "experts");
  Tensor weights = Tensor::empty({T, c.k}, DType::f32, "weights");
  moe_gate(logits, bias, table, ids, c.k, route_scale, experts, weights);

  auto dev = [&](const Tensor& t) { return t.defined() ? t.to(device) : Tensor(); };
  const Tensor d_logits = dev(logits), d_bias = dev(bias), d_table = dev(table);
  const Tensor d_ids = c.hash ? ids_wide.to(device).select(1, 0) : Tensor();  // strided on the device too
  std::vector<uint8_t> first_e, first_w;
  for (int run = 0; run < kReruns; ++run) {
    Tensor d_experts = Tensor::empty({T, c.k}, DType::i32, device, "experts");
    Tensor d_weights = Tensor::empty({T, c.k}, DType::f32, device, "weights");
    moe_gate(d_logits, d_bias, d_table, d_ids, c.k, route_scale, d_experts, d_weights);
    sync();
    if (run == 0) {
      expect_same_bytes(d_experts, experts, "experts");
      expect_same_bytes(d_weights, weights, "weights");
      first_e = bytes_of(d_experts);
      first_w = bytes_of(d_weights);
    } else {
      EXPECT_EQ(bytes_of(d_experts), first_e) << "rerun " << run;
      EXPECT_EQ(bytes_of(d_weights), first_w) << "rerun " << run;
    }
  }
}

TEST(GpuMoeGate, MatchesTheHostBitForBit) {
  DSV4_REQUIRE_GPU();
  Allocator device(*cuda_memory(0), AllocatorMode::testing);
  const std::vector<GateCase> cases = {
      {8, 2, true, false, DType::i32},    {8, 2, false, false, DType::i32}, {8, 2, false, true, DType::i32},
      {8, 2, false, true, DType::i64},    {256, 6, true, false, DType::i32}, {256, 6, false, true, DType::i64},
      {384, 8, true, false, DType::i32},  {5, 5, true, false, DType::i32},
  };
  unsigned seed = 11;
  for (const GateCase& c : cases) {
    for (int64_t T : {0, 1, 2, 7, 8, 64, 131}) run_gate_case(c, T, device, seed++);
  }
  EXPECT_TRUE(device.check_guards().empty()) << "a kernel wrote past an output";
}

TEST(GpuMoeGate, BadIdsAndTableEntriesBecomeMinusOneOnTheGpu) {
  DSV4_REQUIRE_GPU();
  Allocator device(*cuda_memory(0), AllocatorMode::testing);
  const int64_t E = 8, k = 2;
  const Tensor logits = Tensor::from_values({3, E}, DType::f32, std::vector<double>(3 * E, 0.25), "logits");
  // Row 0 fine, row 1 holds an expert past E, row 2 repeats one (kept on the GPU).
  const Tensor table = Tensor::from_values({3, k}, DType::i32, {1, 2, E + 3, 5, 4, 4}, "tid2eid");
  const Tensor ids = Tensor::from_values({3}, DType::i32, {1, 7, -1}, "ids");  // 7 and -1 outside [0, 3)
  const Tensor ids_ok = Tensor::from_values({3}, DType::i32, {0, 1, 2}, "ids");
  for (const Tensor* id : {&ids, &ids_ok}) {
    Tensor experts = Tensor::empty({3, k}, DType::i32, device, "experts");
    Tensor weights = Tensor::empty({3, k}, DType::f32, device, "weights");
    moe_gate(logits.to(device), Tensor(), table.to(device), id->to(device), k, 1.5f, experts, weights);
    sync();
    if (id == &ids) {
      EXPECT_EQ(experts.values(), (std::vector<double>{-1, 5, -1, -1, -1, -1}));
      EXPECT_EQ(weights.values(), (std::vector<double>{0, 1.5, 0, 0, 0, 0}));
    } else {
      EXPECT_EQ(experts.values(), (std::vector<double>{1, 2, -1, 5, 4, 4}));
      EXPECT_EQ(weights.values(), (std::vector<double>{0.75, 0.75, 0, 1.5, 0.75, 0.75}));
    }
  }
  // The host refuses both.
  Tensor experts = Tensor::empty({3, k}, DType::i32, "experts");
  Tensor weights = Tensor::empty({3, k}, DType::f32, "weights");
  expect_contract_error([&] { moe_gate(logits, Tensor(), table, ids_ok, k, 1.5f, experts, weights); }, "tid2eid");
  // One device for all.
  Tensor d_experts = Tensor::empty({3, k}, DType::i32, device, "experts");
  expect_contract_error([&] { moe_gate(logits, Tensor(), Tensor(), Tensor(), k, 1.5f, d_experts, weights); },
                        "experts");
}

// ---- swiglu_clamp --------------------------------------------------------------------------------

TEST(GpuSwigluClamp, MatchesTheHostBitForBit) {
  DSV4_REQUIRE_GPU();
  Allocator device(*cuda_memory(0), AllocatorMode::testing);
  unsigned seed = 101;
  for (DType gt : {DType::bf16, DType::f32}) {
    for (DType ut : {DType::bf16, DType::f32}) {
      for (float limit : {0.0f, 0.5f, 10.0f}) {
        for (bool weighted : {false, true}) {
          for (int64_t R : {0, 1, 2, 7, 8, 64}) {
            for (int64_t I : {1, 64, 130}) {
              SCOPED_TRACE(std::string(dtype_name(gt)) + " " + std::string(dtype_name(ut)) + " limit " +
                           std::to_string(limit) + " R " + std::to_string(R) + " I " + std::to_string(I));
              std::mt19937 rng(seed++);
              const Tensor g = random_tensor({R, I}, gt, rng, 4.0f, "g");
              const Tensor u = random_tensor({R, I}, ut, rng, 2.0f, "u");
              const Tensor w = weighted ? random_tensor({R}, DType::f32, rng, 1.0f, "w") : Tensor();
              Tensor h = Tensor::empty({R, I}, DType::bf16, "h");
              swiglu_clamp(g, u, limit, w, h);
              // Contiguous and row-padded device operands give the host's bytes.
              const Padded gp = padded(g, 3, device), up = padded(u, 5, device);
              const Tensor dw = weighted ? w.to(device) : Tensor();
              std::vector<uint8_t> first;
              for (int run = 0; run < (R == 7 ? kReruns : 1); ++run) {
                Tensor dh = Tensor::empty({R, I}, DType::bf16, device, "h");
                swiglu_clamp(g.to(device), u.to(device), limit, dw, dh);
                sync();
                expect_same_bytes(dh, h, "h");
                if (run == 0) first = bytes_of(dh);
                EXPECT_EQ(bytes_of(dh), first) << "rerun " << run;
              }
              Tensor wide = Tensor::empty({R, I + 2}, DType::bf16, device, "h_wide");
              Tensor dh = wide.narrow(1, 0, I);
              swiglu_clamp(gp.dev, up.dev, limit, dw, dh);
              sync();
              expect_same_bytes(dh, h, "h (padded rows)");
            }
          }
        }
      }
    }
  }
  // Inner dims must be contiguous on the device too.
  Tensor g = Tensor::empty({4, 4}, DType::f32, device, "g");
  Tensor h = Tensor::empty({4, 4}, DType::bf16, device, "h");
  expect_contract_error([&] { swiglu_clamp(g.transpose(0, 1), g, 1.0f, Tensor(), h); }, "g");
  expect_contract_error([&] { swiglu_clamp(g, g, std::nanf(""), Tensor(), h); }, "limit");
  EXPECT_TRUE(device.check_guards().empty()) << "a kernel wrote past an output";
}

// ---- moe_combine ---------------------------------------------------------------------------------

TEST(GpuMoeCombine, MatchesTheHostBitForBit) {
  DSV4_REQUIRE_GPU();
  Allocator device(*cuda_memory(0), AllocatorMode::testing);
  unsigned seed = 301;
  for (DType rt : {DType::bf16, DType::f32}) {
    for (int shared_kind : {0, 1, 2}) {  // none, bf16, f32
      for (int64_t k : {1, 2, 6}) {
        for (int64_t T : {0, 1, 2, 7, 8, 64}) {
          const int64_t d = 96;
          SCOPED_TRACE(std::string(dtype_name(rt)) + " shared " + std::to_string(shared_kind) + " k " +
                       std::to_string(k) + " T " + std::to_string(T));
          std::mt19937 rng(seed++);
          const Tensor routed = random_tensor({T, k, d}, rt, rng, 1.0f, "routed");
          const Tensor shared = shared_kind == 0
                                    ? Tensor()
                                    : random_tensor({T, d}, shared_kind == 1 ? DType::bf16 : DType::f32, rng, 1.0f,
                                                    "shared");
          Tensor out = Tensor::empty({T, d}, DType::bf16, "out");
          moe_combine(routed, shared, out);
          const Tensor d_routed = routed.to(device);
          std::vector<uint8_t> first;
          for (int run = 0; run < (T == 7 ? kReruns : 1); ++run) {
            Tensor d_out = Tensor::empty({T, d}, DType::bf16, device, "out");
            moe_combine(d_routed, shared.defined() ? shared.to(device) : Tensor(), d_out);
            sync();
            expect_same_bytes(d_out, out, "out");
            if (run == 0) first = bytes_of(d_out);
            EXPECT_EQ(bytes_of(d_out), first) << "rerun " << run;
          }
          if (shared.defined()) {  // row-padded shared and out
            const Padded sp = padded(shared, 4, device);
            Tensor wide = Tensor::empty({T, d + 8}, DType::bf16, device, "out_wide");
            Tensor d_out = wide.narrow(1, 0, d);
            moe_combine(d_routed, sp.dev, d_out);
            sync();
            expect_same_bytes(d_out, out, "out (padded rows)");
          }
        }
      }
    }
  }
  // routed must be contiguous on the device too.
  Tensor wide = Tensor::empty({2, 2, 10}, DType::f32, device, "routed");
  Tensor out = Tensor::empty({2, 8}, DType::bf16, device, "out");
  expect_contract_error([&] { moe_combine(wide.narrow(2, 0, 8), Tensor(), out); }, "routed");
  EXPECT_TRUE(device.check_guards().empty()) << "a kernel wrote past an output";
}

// ---- moe_experts ---------------------------------------------------------------------------------

const char* format_name(ExpertFormat f) {
  return f == ExpertFormat::fp4 ? "fp4" : f == ExpertFormat::fp8 ? "fp8" : "int8";
}

// E random experts of the format on the host, their device copies and the device pointer table.
struct ExpertSet {
  std::vector<ExpertWeights> host;
  std::vector<ExpertWeights> dev;
  Tensor table;
};

Tensor random_codes(const Shape& shape, DType dtype, std::mt19937& rng, int lo, int hi, bool avoid_e4m3_nan) {
  Tensor t = Tensor::empty(shape, dtype, "codes");
  auto* p = static_cast<uint8_t*>(t.data_ptr());
  for (int64_t i = 0; i < dtype_storage_bytes(dtype, t.numel()); ++i) {
    int c = lo + static_cast<int>(rng() % static_cast<unsigned>(hi - lo + 1));
    if (avoid_e4m3_nan && (c & 0x7F) == 0x7F) c ^= 1;
    p[i] = static_cast<uint8_t>(c);
  }
  return t;
}

Tensor random_uniform(const Shape& shape, std::mt19937& rng, float lo, float hi) {
  std::uniform_real_distribution<float> u(lo, hi);
  std::vector<double> v(static_cast<size_t>(shape_numel(shape)));
  for (double& x : v) x = u(rng);
  return Tensor::from_values(shape, DType::f32, v, "scales");
}

ExpertSet make_experts(const MoeExpertsConfig& c, int64_t E, int64_t d, int64_t I, Allocator& device, unsigned seed) {
  std::mt19937 rng(seed);
  ExpertSet set;
  for (int64_t e = 0; e < E; ++e) {
    ExpertWeights w;
    switch (c.format) {
      case ExpertFormat::fp4: {
        const DType packed = e % 2 == 0 ? DType::u8 : DType::i8;  // both spellings of packed e2m1
        const int64_t fb = c.fp4_block;
        w.w1 = random_codes({I, d / 2}, packed, rng, 0, 255, false);
        w.w3 = random_codes({I, d / 2}, packed, rng, 0, 255, false);
        w.w2 = random_codes({d, I / 2}, packed, rng, 0, 255, false);
        w.s1 = random_codes({I, d / fb}, DType::ue8m0, rng, 119, 123, false);
        w.s3 = random_codes({I, d / fb}, DType::ue8m0, rng, 119, 123, false);
        w.s2 = random_codes({d, I / fb}, DType::ue8m0, rng, 119, 123, false);
        break;
      }
      case ExpertFormat::fp8: {
        const int64_t wb = c.weight_block;
        w.w1 = random_codes({I, d}, DType::f8_e4m3fn, rng, 0, 255, true);
        w.w3 = random_codes({I, d}, DType::f8_e4m3fn, rng, 0, 255, true);
        w.w2 = random_codes({d, I}, DType::f8_e4m3fn, rng, 0, 255, true);
        w.s1 = random_codes({(I + wb - 1) / wb, d / wb}, DType::ue8m0, rng, 116, 120, false);
        w.s3 = random_codes({(I + wb - 1) / wb, d / wb}, DType::ue8m0, rng, 116, 120, false);
        w.s2 = random_codes({(d + wb - 1) / wb, I / wb}, DType::ue8m0, rng, 116, 120, false);
        break;
      }
      case ExpertFormat::int8: {
        w.w1 = random_codes({I, d}, DType::i8, rng, 0, 255, false);
        w.w3 = random_codes({I, d}, DType::i8, rng, 0, 255, false);
        w.w2 = random_codes({d, I}, DType::i8, rng, 0, 255, false);
        // -128 is not an int8 weight code (the quantizer clamps to ±127).
        for (Tensor* t : {&w.w1, &w.w3, &w.w2}) {
          auto* p = t->data<int8_t>();
          for (int64_t i = 0; i < t->numel(); ++i) p[i] = p[i] == -128 ? int8_t{-127} : p[i];
        }
        w.s1 = random_uniform({I}, rng, 1e-3f, 4e-3f);
        w.s3 = random_uniform({I}, rng, 1e-3f, 4e-3f);
        w.s2 = random_uniform({d}, rng, 1e-3f, 4e-3f);
        break;
      }
    }
    set.host.push_back(w);
    set.dev.push_back({w.w1.to(device), w.s1.to(device), w.w2.to(device), w.s2.to(device), w.w3.to(device),
                       w.s3.to(device)});
  }
  const std::vector<uint64_t> ptrs = expert_pointer_table(set.dev);
  Tensor table = Tensor::empty({E, 6}, DType::i64, "table");
  std::memcpy(table.data_ptr(), ptrs.data(), ptrs.size() * sizeof(uint64_t));
  set.table = table.to(device);
  return set;
}

// Experts [T, k]: a popular expert (so that one expert gets more than a 64-row tile), experts 1 and
// E - 1 never chosen, and in every fifth token slot 1 repeating slot 0.
Tensor random_routing(int64_t T, int64_t k, int64_t E, std::mt19937& rng) {
  Tensor ex = Tensor::empty({T, k}, DType::i32, "experts");
  auto* p = ex.data<int32_t>();
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t j = 0; j < k; ++j) {
      int32_t e = rng() % 2 == 0 ? 0 : static_cast<int32_t>(rng() % static_cast<unsigned>(E));
      if (E > 3 && (e == 1 || e == E - 1)) e = 2;
      p[t * k + j] = e;
    }
    if (k >= 2 && t % 5 == 2) p[t * k + 1] = p[t * k];
  }
  return ex;
}

struct ExpertsShape {
  int64_t E, k, d, I;
  int64_t act_block, fp4_block, weight_block;
  float limit;
};

MoeExpertsConfig experts_config(const ExpertsShape& s, ExpertFormat f) {
  MoeExpertsConfig cfg;
  cfg.format = f;
  cfg.act_block = s.act_block;
  cfg.fp4_block = s.fp4_block;
  cfg.weight_block = s.weight_block;
  cfg.swiglu_limit = s.limit;
  return cfg;
}

// One T's random inputs (from seed * 31 + T) and the host's routed output for them.
struct ExpertsCase {
  Tensor xn, experts, weights, routed;
};

ExpertsCase host_experts_case(const ExpertsShape& s, const MoeExpertsConfig& cfg, const ExpertSet& set, unsigned seed,
                              int64_t T) {
  std::mt19937 rng(seed * 31 + static_cast<unsigned>(T));
  ExpertsCase c;
  c.xn = random_tensor({T, s.d}, DType::bf16, rng, 1.0f, "xn");
  c.experts = random_routing(T, s.k, s.E, rng);
  c.weights = random_uniform({T, s.k}, rng, 0.1f, 1.5f);
  c.routed = Tensor::empty({T, s.k, s.d}, DType::bf16, "routed");
  moe_experts(c.xn, c.experts, c.weights, set.host, Tensor(), cfg, c.routed);
  return c;
}

// Every T of `Ts` through the host and the GPU (bitwise, reruns bitwise), and through the GPU with a
// row-padded xn and a flat routed.
void run_experts_case(const ExpertsShape& s, ExpertFormat f, Allocator& device, unsigned seed,
                      std::initializer_list<int64_t> Ts = {0, 1, 2, 7, 8, 32, 64, 150}) {
  const MoeExpertsConfig cfg = experts_config(s, f);
  const ExpertSet set = make_experts(cfg, s.E, s.d, s.I, device, seed);
  for (int64_t T : Ts) {
    SCOPED_TRACE(std::string(format_name(f)) + " E " + std::to_string(s.E) + " k " + std::to_string(s.k) + " d " +
                 std::to_string(s.d) + " I " + std::to_string(s.I) + " T " + std::to_string(T));
    const ExpertsCase host = host_experts_case(s, cfg, set, seed, T);
    const Tensor& xn = host.xn;
    const Tensor& routed = host.routed;
    const Tensor d_xn = xn.to(device), d_experts = host.experts.to(device), d_weights = host.weights.to(device);
    std::vector<uint8_t> first;
    const int runs = T == 64 ? kReruns : 1;
    for (int run = 0; run < runs; ++run) {
      Tensor d_routed = Tensor::empty({T, s.k, s.d}, DType::bf16, device, "routed");
      moe_experts(d_xn, d_experts, d_weights, set.dev, set.table, cfg, d_routed);
      sync();
      expect_same_bytes(d_routed, routed, "routed");
      if (run == 0) first = bytes_of(d_routed);
      EXPECT_EQ(bytes_of(d_routed), first) << "rerun " << run;
    }
    // Row-padded xn and the flat [T * k, d] routed give the same bytes.
    const Padded xp = padded(xn, 16, device);
    Tensor d_flat = Tensor::empty({T * s.k, s.d}, DType::bf16, device, "routed_flat");
    moe_experts(xp.dev, d_experts, d_weights, set.dev, set.table, cfg, d_flat);
    sync();
    expect_same_bytes(d_flat, routed.view({T * s.k, s.d}), "routed (padded xn, flat routed)");
  }
  EXPECT_TRUE(device.check_guards().empty()) << "a kernel wrote past an output";
}

TEST(GpuMoeExperts, Fp4MatchesTheHostBitForBit) {
  DSV4_REQUIRE_GPU();
  Allocator device(*cuda_memory(0), AllocatorMode::testing);
  // The tiny config's shapes and blocks; micro-like blocks with ragged N tiles; blocks whose stage is
  // 16 wide; and a small clamp limit that fires.
  run_experts_case({8, 2, 128, 128, 128, 32, 128, 10.0f}, ExpertFormat::fp4, device, 1);
  run_experts_case({5, 3, 96, 160, 32, 16, 32, 0.5f}, ExpertFormat::fp4, device, 2);
  run_experts_case({6, 2, 96, 144, 48, 16, 48, 0.0f}, ExpertFormat::fp4, device, 3);
}

// Decode batches (T * k <= 8 * E) of fp4 experts with 16- or 32-wide weight blocks and K a multiple
// of 32 take the small-batch kernel; the tests above cover both kernels only if this holds.
TEST(GpuMoeExperts, Fp4DecodeBatchesTakeTheSmallBatchKernel) {
  DSV4_REQUIRE_GPU();
  Allocator device(*cuda_memory(0), AllocatorMode::testing);
  const auto gemms = [&](const ExpertsShape& shape, int64_t T, unsigned seed) {
    const uint64_t before = cuda::moe_small_batch_gemms();
    run_experts_case(shape, ExpertFormat::fp4, device, seed, {T});
    return cuda::moe_small_batch_gemms() - before;
  };
  const ExpertsShape tiny{8, 2, 128, 128, 128, 32, 128, 10.0f};
  // T = 32: 64 slots for 8 experts, expert 0 with about half of them (several passes of 8 rows).
  // Per T: one run (T != 64) and one padded run, two GEMMs each.
  EXPECT_EQ(gemms(tiny, 32, 11), 4u);
  EXPECT_EQ(gemms(tiny, 1, 12), 4u);
  EXPECT_EQ(gemms(tiny, 33, 13), 0u) << "66 slots for 8 experts: the tiled kernel";
  // 16-wide blocks; I = 144 is not a multiple of 32, so w2 runs tiled and w1/w3 small-batch.
  EXPECT_EQ(gemms({5, 3, 96, 160, 32, 16, 32, 0.5f}, 7, 14), 4u);
  EXPECT_EQ(gemms({6, 2, 96, 144, 48, 16, 48, 0.0f}, 7, 15), 2u);
}

// The tensor-core path (DSV4_MOE_GEMM=tensor_core) against the host: its block partials are summed
// in the tensor cores' order, and the h between the GEMMs is re-quantized, so a last-bit difference
// can move one of h's e4m3 codes. Required: every output finite where the host's is, at least 90%
// of them within one bf16 ulp of the host's, the largest difference at most 5% of the largest
// output, and a cosine distance below 1e-4 (a wrong k pairing or scale gives about 1). Reruns are
// bitwise identical. Shapes the path does not take (16-wide weight blocks) run the exact kernels.
TEST(GpuMoeExperts, Fp4TensorCorePathAgreesWithTheHostAndRerunsIdentically) {
  DSV4_REQUIRE_GPU();
  Allocator device(*cuda_memory(0), AllocatorMode::testing);
  cuda::MoeGemmPathScope tc(cuda::MoeGemmPath::tensor_core);
  struct Case {
    ExpertsShape shape;
    std::vector<int64_t> tokens;
  };
  // The tiny config's experts; d 512 and I 256 with 6 of 16 experts per token; d 192 (the down GEMM's
  // last 128-column tile half full) with I 320 (10 weight blocks: the byte-load path) and 64-wide
  // activation blocks.
  const std::vector<Case> cases = {{{8, 2, 128, 128, 128, 32, 128, 10.0f}, {1, 2, 7, 32}},
                                   {{16, 6, 512, 256, 128, 32, 128, 10.0f}, {1, 8, 21}},
                                   {{16, 6, 192, 320, 64, 32, 64, 0.0f}, {5, 21}}};
  unsigned seed = 60;
  for (const Case& c : cases) {
    const ExpertsShape& s = c.shape;
    const MoeExpertsConfig cfg = experts_config(s, ExpertFormat::fp4);
    const ExpertSet set = make_experts(cfg, s.E, s.d, s.I, device, ++seed);
    for (const int64_t T : c.tokens) {
      const std::string what = "E " + std::to_string(s.E) + " d " + std::to_string(s.d) + " I " +
                               std::to_string(s.I) + " T " + std::to_string(T);
      SCOPED_TRACE(what);
      const ExpertsCase host = host_experts_case(s, cfg, set, seed, T);
      const Tensor& want = host.routed;
      const Tensor d_xn = host.xn.to(device), d_experts = host.experts.to(device), d_weights = host.weights.to(device);
      std::vector<uint8_t> first;
      for (int run = 0; run < 3; ++run) {
        Tensor got = Tensor::empty({T, s.k, s.d}, DType::bf16, device, "routed");
        const uint64_t before = cuda::moe_tensor_core_gemms();
        moe_experts(d_xn, d_experts, d_weights, set.dev, set.table, cfg, got);
        sync();
        EXPECT_EQ(cuda::moe_tensor_core_gemms() - before, 2u) << "the tensor-core path did not take both GEMMs";
        if (run > 0) {
          EXPECT_EQ(bytes_of(got), first) << "rerun " << run;
          continue;
        }
        first = bytes_of(got);
        const Tensor g = to_host(got);
        const auto* gp = g.data<uint16_t>();
        const auto* wp = want.data<uint16_t>();
        double dot = 0.0, gg = 0.0, ww = 0.0, max_want = 0.0, max_err = 0.0;
        int64_t close = 0;
        const int64_t n = want.numel();
        for (int64_t i = 0; i < n; ++i) {
          const double a = bf16_to_f32(gp[i]), b = bf16_to_f32(wp[i]);
          ASSERT_EQ(std::isfinite(a), std::isfinite(b)) << "element " << i;
          if (!std::isfinite(b)) continue;
          const double ulp = std::ldexp(1.0, std::max(-133, std::ilogb(std::max(std::abs(b), 1e-38)) - 7));
          close += std::abs(a - b) <= ulp ? 1 : 0;
          max_err = std::max(max_err, std::abs(a - b));
          max_want = std::max(max_want, std::abs(b));
          dot += a * b;
          gg += a * a;
          ww += b * b;
        }
        const double cosine = (gg == 0.0 && ww == 0.0) ? 0.0 : 1.0 - dot / std::sqrt(gg * ww);
        EXPECT_GE(static_cast<double>(close), 0.9 * static_cast<double>(n));
        EXPECT_LE(max_err, 0.05 * max_want);
        EXPECT_LT(cosine, 1e-4);
        std::printf("[moe tensor cores] %s: %lld outputs, %.4f within 1 bf16 ulp of the host, max |err| %.3g of "
                    "max |out| %.3g, cosine distance %.3g\n",
                    what.c_str(), static_cast<long long>(n), n ? double(close) / double(n) : 1.0, max_err, max_want,
                    cosine);
      }
    }
  }
  // 16-wide weight blocks: the exact kernels, bit for bit the host.
  const uint64_t before = cuda::moe_tensor_core_gemms();
  run_experts_case({5, 3, 96, 160, 32, 16, 32, 0.5f}, ExpertFormat::fp4, device, 70, {7});
  EXPECT_EQ(cuda::moe_tensor_core_gemms(), before);
  EXPECT_TRUE(device.check_guards().empty()) << "a kernel wrote past an output";
}

TEST(GpuMoeExperts, Fp8MatchesTheHostBitForBit) {
  DSV4_REQUIRE_GPU();
  Allocator device(*cuda_memory(0), AllocatorMode::testing);
  run_experts_case({8, 2, 128, 128, 128, 32, 128, 10.0f}, ExpertFormat::fp8, device, 4);
  run_experts_case({5, 3, 96, 160, 32, 16, 32, 0.5f}, ExpertFormat::fp8, device, 5);
  run_experts_case({6, 2, 96, 144, 48, 16, 48, 0.0f}, ExpertFormat::fp8, device, 6);
}

TEST(GpuMoeExperts, Int8MatchesTheHostBitForBit) {
  DSV4_REQUIRE_GPU();
  Allocator device(*cuda_memory(0), AllocatorMode::testing);
  run_experts_case({8, 2, 128, 128, 128, 32, 128, 10.0f}, ExpertFormat::int8, device, 7);
  run_experts_case({5, 3, 96, 100, 32, 16, 32, 0.5f}, ExpertFormat::int8, device, 8);  // K, N not tile multiples
}

TEST(GpuMoeExperts, AnExpertOutsideTheTableWritesZerosOnTheGpu) {
  DSV4_REQUIRE_GPU();
  Allocator device(*cuda_memory(0), AllocatorMode::testing);
  MoeExpertsConfig cfg;
  cfg.swiglu_limit = 10.0f;
  const int64_t E = 4, T = 5, k = 2, d = 128, I = 128;
  const ExpertSet set = make_experts(cfg, E, d, I, device, 21);
  std::mt19937 rng(22);
  const Tensor xn = random_tensor({T, d}, DType::bf16, rng, 1.0f, "xn");
  Tensor experts = random_routing(T, k, E, rng);
  const Tensor weights = random_uniform({T, k}, rng, 0.1f, 1.5f);
  Tensor routed = Tensor::empty({T, k, d}, DType::bf16, "routed");
  moe_experts(xn, experts, weights, set.host, Tensor(), cfg, routed);
  // Slots 3 and 6 name experts E and -1: the host refuses, the GPU writes zero rows there and the
  // other rows as before.
  Tensor bad = experts.clone("experts_bad");
  bad.data<int32_t>()[3] = static_cast<int32_t>(E);
  bad.data<int32_t>()[6] = -1;
  Tensor h_routed = Tensor::empty({T, k, d}, DType::bf16, "routed");
  expect_contract_error([&] { moe_experts(xn, bad, weights, set.host, Tensor(), cfg, h_routed); }, "experts");
  Tensor d_routed = Tensor::empty({T, k, d}, DType::bf16, device, "routed");
  moe_experts(xn.to(device), bad.to(device), weights.to(device), set.dev, set.table, cfg, d_routed);
  sync();
  const Tensor got = to_host(d_routed).view({T * k, d});
  const Tensor want = routed.view({T * k, d});
  for (int64_t slot = 0; slot < T * k; ++slot) {
    if (slot == 3 || slot == 6) {
      for (double v : got.select(0, slot).values()) EXPECT_EQ(v, 0.0) << "slot " << slot;
    } else {
      expect_same_bytes(got.select(0, slot), want.select(0, slot), "slot " + std::to_string(slot));
    }
  }
  EXPECT_TRUE(device.check_guards().empty()) << "a kernel wrote past an output";
}

TEST(GpuMoeExperts, Contract) {
  DSV4_REQUIRE_GPU();
  Allocator device(*cuda_memory(0), AllocatorMode::testing);
  MoeExpertsConfig cfg;
  const int64_t E = 2, T = 3, k = 2, d = 128, I = 128;
  const ExpertSet set = make_experts(cfg, E, d, I, device, 31);
  const Tensor xn = Tensor::empty({T, d}, DType::bf16, device, "xn");
  const Tensor experts = Tensor::from_values({T, k}, DType::i32, {0, 1, 1, 0, 0, 0}, "experts").to(device);
  const Tensor weights = Tensor::empty({T, k}, DType::f32, device, "weights");
  Tensor routed = Tensor::empty({T, k, d}, DType::bf16, device, "routed");
  // The table is required on the device, with one row per expert.
  expect_contract_error([&] { moe_experts(xn, experts, weights, set.dev, Tensor(), cfg, routed); }, "table");
  const Tensor short_table = set.table.narrow(0, 0, 1);
  expect_contract_error([&] { moe_experts(xn, experts, weights, set.dev, short_table, cfg, routed); }, "table");
  // Host expert weights with device activations.
  expect_contract_error([&] { moe_experts(xn, experts, weights, set.host, set.table, cfg, routed); },
                        "experts_w[0].w1");
  // Columns of xn must be contiguous; routed contiguous.
  const Tensor xt = Tensor::empty({d, T}, DType::bf16, device, "xt").transpose(0, 1);
  expect_contract_error([&] { moe_experts(xt, experts, weights, set.dev, set.table, cfg, routed); }, "xn");
  Tensor wide = Tensor::empty({T, k, d + 2}, DType::bf16, device, "routed_wide");
  Tensor strided = wide.narrow(2, 0, d);
  expect_contract_error([&] { moe_experts(xn, experts, weights, set.dev, set.table, cfg, strided); }, "routed");
  // The format must agree with the weights.
  MoeExpertsConfig fp8 = cfg;
  fp8.format = ExpertFormat::fp8;
  expect_contract_error([&] { moe_experts(xn, experts, weights, set.dev, set.table, fp8, routed); },
                        "experts_w[0].w1");
}

// ---- the pipeline on a stream and captured into a CUDA graph ------------------------------------

TEST(GpuMoePipeline, RunsOnTheCurrentStreamAndInsideAGraphCapture) {
  DSV4_REQUIRE_GPU();
  Allocator device(*cuda_memory(0), AllocatorMode::testing);
  const int64_t T = 8, E = 8, k = 2, d = 128, I = 128;
  std::mt19937 rng(77);
  for (ExpertFormat f : {ExpertFormat::fp4, ExpertFormat::fp8}) {
    SCOPED_TRACE(format_name(f));
    MoeExpertsConfig cfg;
    cfg.format = f;
    cfg.swiglu_limit = 10.0f;
    const ExpertSet set = make_experts(cfg, E, d, I, device, 78);
    const Tensor logits = random_tensor({T, E}, DType::f32, rng, 2.0f, "logits");
    const Tensor bias = random_tensor({E}, DType::f32, rng, 0.1f, "bias");
    const Tensor xn = random_tensor({T, d}, DType::bf16, rng, 1.0f, "xn");
    const Tensor shared = random_tensor({T, d}, DType::bf16, rng, 1.0f, "shared");
    const Tensor g = random_tensor({T, I}, DType::bf16, rng, 3.0f, "g");
    const Tensor u = random_tensor({T, I}, DType::bf16, rng, 3.0f, "u");
    const Tensor w = random_uniform({T}, rng, 0.1f, 1.5f);

    // The host results.
    Tensor experts_h = Tensor::empty({T, k}, DType::i32, "experts"), weights_h = Tensor::empty({T, k}, DType::f32, "w");
    moe_gate(logits, bias, Tensor(), Tensor(), k, 1.5f, experts_h, weights_h);
    Tensor routed_h = Tensor::empty({T, k, d}, DType::bf16, "routed");
    moe_experts(xn, experts_h, weights_h, set.host, Tensor(), cfg, routed_h);
    Tensor out_h = Tensor::empty({T, d}, DType::bf16, "out");
    moe_combine(routed_h, shared, out_h);
    Tensor h_h = Tensor::empty({T, I}, DType::bf16, "h");
    swiglu_clamp(g, u, 0.5f, w, h_h);

    const Tensor logits_d = logits.to(device), bias_d = bias.to(device), xn_d = xn.to(device);
    const Tensor shared_d = shared.to(device), g_d = g.to(device), u_d = u.to(device), w_d = w.to(device);
    Tensor experts_d = Tensor::empty({T, k}, DType::i32, device, "experts");
    Tensor weights_d = Tensor::empty({T, k}, DType::f32, device, "weights");
    Tensor routed_d = Tensor::empty({T, k, d}, DType::bf16, device, "routed");
    Tensor out_d = Tensor::empty({T, d}, DType::bf16, device, "out");
    Tensor h_d = Tensor::empty({T, I}, DType::bf16, device, "h");
    cudaStream_t stream = nullptr;
    ASSERT_EQ(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), cudaSuccess);
    auto enqueue = [&] {
      StreamScope scope(stream);
      moe_gate(logits_d, bias_d, Tensor(), Tensor(), k, 1.5f, experts_d, weights_d);
      moe_experts(xn_d, experts_d, weights_d, set.dev, set.table, cfg, routed_d);
      moe_combine(routed_d, shared_d, out_d);
      swiglu_clamp(g_d, u_d, 0.5f, w_d, h_d);
    };
    auto expect_all = [&](const std::string& what) {
      expect_same_bytes(experts_d, experts_h, what + ": experts");
      expect_same_bytes(weights_d, weights_h, what + ": weights");
      expect_same_bytes(routed_d, routed_h, what + ": routed");
      expect_same_bytes(out_d, out_h, what + ": out");
      expect_same_bytes(h_d, h_h, what + ": h");
    };
    // 1. On a non-blocking stream set by StreamScope.
    enqueue();
    ASSERT_EQ(cudaStreamSynchronize(stream), cudaSuccess);
    expect_all("stream");

    // 2. Captured (scratch becomes the graph's own allocations), replayed into poisoned outputs.
    ASSERT_EQ(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal), cudaSuccess);
    enqueue();
    cudaGraph_t graph = nullptr;
    ASSERT_EQ(cudaStreamEndCapture(stream, &graph), cudaSuccess);
    cudaGraphExec_t exec = nullptr;
    ASSERT_EQ(cudaGraphInstantiate(&exec, graph, 0), cudaSuccess);
    for (int replay = 0; replay < 2; ++replay) {
      for (Tensor* t : {&experts_d, &weights_d, &routed_d, &out_d, &h_d}) {
        ASSERT_EQ(cudaMemset(t->data_ptr(), 0xFF, static_cast<size_t>(dtype_storage_bytes(t->dtype(), t->numel()))),
                  cudaSuccess);
      }
      ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
      ASSERT_EQ(cudaGraphLaunch(exec, stream), cudaSuccess);
      ASSERT_EQ(cudaStreamSynchronize(stream), cudaSuccess);
      expect_all("graph replay " + std::to_string(replay));
    }
    EXPECT_EQ(cudaGraphExecDestroy(exec), cudaSuccess);
    EXPECT_EQ(cudaGraphDestroy(graph), cudaSuccess);
    EXPECT_EQ(cudaStreamDestroy(stream), cudaSuccess);
  }
  EXPECT_TRUE(device.check_guards().empty());
}

// ---- one tiny-config layer end to end against the reference ---------------------------------------

constexpr uint64_t kSeed = 3;

const ModelConfig& tiny() {
  static const ModelConfig c = load_model_config("tiny");
  return c;
}
const ref::Weights& tiny_weights() {
  static const ref::Weights w = ref::Weights::synthetic(tiny(), kSeed);
  return w;
}
const Tensor& raw(const std::string& name) {
  static std::map<std::string, Tensor> cache;
  static const std::vector<TensorSpec> layout = checkpoint_layout(tiny());
  if (auto it = cache.find(name); it != cache.end()) return it->second;
  for (const TensorSpec& spec : layout) {
    if (spec.name != name) continue;
    const std::vector<uint8_t> bytes = synthetic_tensor_bytes(tiny(), spec, kSeed);
    Tensor t = Tensor::empty(spec.shape, spec.dtype, name);
    std::memcpy(t.data_ptr(), bytes.data(), bytes.size());
    return cache.emplace(name, t).first->second;
  }
  ADD_FAILURE() << "no tensor " << name << " in the tiny layout";
  static const Tensor none;
  return none;
}

ref::Mat to_mat(const Tensor& t) {
  const Tensor h = to_host(t);
  ref::Mat m(h.size(0), h.numel() / std::max<int64_t>(h.size(0), 1));
  const std::vector<double> v = h.values();
  for (size_t i = 0; i < v.size(); ++i) m.data[i] = static_cast<float>(v[i]);
  return m;
}

// The host unit tests' end-to-end tolerance (test_kernels_gemm.cpp, expect_moe_close): every step
// is bit-faithful except the fp32 summation order of the GEMMs against the reference's fp64 sums, so
// 2^-6 of the element plus 2^-8 of the row's largest magnitude, and 90% of elements identical.
void expect_moe_close(const ref::Mat& got, const ref::Mat& want) {
  int64_t exact = 0;
  for (int64_t t = 0; t < want.rows; ++t) {
    float row_max = 0.0f;
    for (int64_t i = 0; i < want.cols; ++i) row_max = std::max(row_max, std::fabs(want.at(t, i)));
    for (int64_t i = 0; i < want.cols; ++i) {
      const double tol = 0x1.0p-6 * std::abs(want.at(t, i)) + 0x1.0p-8 * row_max;
      EXPECT_LE(std::abs(got.at(t, i) - want.at(t, i)), tol) << "t " << t << " i " << i;
      exact += got.at(t, i) == want.at(t, i) ? 1 : 0;
    }
  }
  EXPECT_GE(exact * 10, want.size() * 9) << exact << " of " << want.size() << " identical";
}

TEST(GpuMoeLayer, TinyLayersMatchTheReferenceAndTheHost) {
  DSV4_REQUIRE_GPU();
  Allocator device(*cuda_memory(0), AllocatorMode::testing);
  const ModelConfig& c = tiny();
  const int64_t T = 8, d = c.dim, E = c.n_routed_experts, k = c.n_activated_experts, I = c.moe_inter_dim;
  for (int64_t layer : {int64_t{0}, int64_t{3}}) {
    SCOPED_TRACE("layer " + std::to_string(layer));
    const std::string p = "layers." + std::to_string(layer) + ".ffn";
    const bool hash = c.is_hash_layer(layer);
    std::mt19937 rng(91 + static_cast<unsigned>(layer));
    ref::Mat x(T, d);
    std::normal_distribution<float> normal(0.0f, 1.0f);
    for (float& v : x.data) v = round_bf16(normal(rng));
    std::vector<int64_t> ids;
    for (int64_t t = 0; t < T; ++t) ids.push_back((37 + t * 101) % c.vocab_size);
    ref::Trace trace;
    const ref::Context ctx{c, ref::Numerics{ref::Mode::quant_sim}, &trace, nullptr};
    const ref::Mat want = ref::MoE(c, tiny_weights(), p, layer).forward(ctx, x, ids, 0);

    // The gate from the reference's own logits: the reference's experts and weights, bit for bit.
    const ref::Mat ref_logits = ref::linear(ctx, x, tiny_weights().get(p + ".gate.weight"), ref::LinearKind::f32);
    const Tensor logits = Tensor::from_values({T, E}, DType::f32,
                                              std::vector<double>(ref_logits.data.begin(), ref_logits.data.end()),
                                              "logits");
    const Tensor token_ids = Tensor::from_values({T}, DType::i64, std::vector<double>(ids.begin(), ids.end()), "ids");
    const Tensor bias = hash ? Tensor() : raw(p + ".gate.bias");
    const Tensor table = hash ? raw(p + ".gate.tid2eid") : Tensor();
    const float route_scale = static_cast<float>(c.route_scale);
    Tensor d_experts = Tensor::empty({T, k}, DType::i32, device, "experts");
    Tensor d_weights = Tensor::empty({T, k}, DType::f32, device, "weights");
    moe_gate(logits.to(device), bias.defined() ? bias.to(device) : Tensor(), table.defined() ? table.to(device) : Tensor(),
             token_ids.to(device), k, route_scale, d_experts, d_weights);
    sync();
    EXPECT_EQ(to_mat(d_experts).data, trace.values.at(p + ".gate.experts").data);
    EXPECT_EQ(to_mat(d_weights).data, trace.values.at(p + ".gate.weights").data);

    // The routed experts on the GPU with the checkpoint's FP4 bytes.
    MoeExpertsConfig cfg;
    cfg.format = ExpertFormat::fp4;
    cfg.act_block = c.act_block_size;
    cfg.fp4_block = c.fp4_block_size;
    cfg.weight_block = c.weight_block_size;
    cfg.swiglu_limit = static_cast<float>(c.swiglu_limit);
    std::vector<ExpertWeights> host_w, dev_w;
    for (int64_t e = 0; e < E; ++e) {
      const std::string ep = p + ".experts." + std::to_string(e) + ".";
      ExpertWeights w{raw(ep + "w1.weight"), raw(ep + "w1.scale"), raw(ep + "w2.weight"),
                      raw(ep + "w2.scale"),  raw(ep + "w3.weight"), raw(ep + "w3.scale")};
      host_w.push_back(w);
      dev_w.push_back({w.w1.to(device), w.s1.to(device), w.w2.to(device), w.s2.to(device), w.w3.to(device),
                       w.s3.to(device)});
    }
    const std::vector<uint64_t> ptrs = expert_pointer_table(dev_w);
    Tensor table_h = Tensor::empty({E, 6}, DType::i64, "table");
    std::memcpy(table_h.data_ptr(), ptrs.data(), ptrs.size() * sizeof(uint64_t));
    const Tensor d_table = table_h.to(device);
    const Tensor xt = Tensor::from_values({T, d}, DType::bf16, std::vector<double>(x.data.begin(), x.data.end()), "x");
    const Tensor d_x = xt.to(device);
    Tensor d_routed = Tensor::empty({T, k, d}, DType::bf16, device, "routed");
    moe_experts(d_x, d_experts, d_weights, dev_w, d_table, cfg, d_routed);

    // The shared expert on the host (FP8, no routing weight), as the host unit test runs it.
    const std::string sh = p + ".shared_experts.";
    Tensor xq = Tensor::empty({T, d}, DType::f8_e4m3fn, "xq"), xs = Tensor::empty({T, d / 128}, DType::ue8m0, "xs");
    act_quant_fp8(xt, 128, xq, xs);
    Tensor g = Tensor::empty({T, I}, DType::bf16, "g"), u = Tensor::empty({T, I}, DType::bf16, "u");
    gemm_fp8_block_scaled(xq, xs, raw(sh + "w1.weight"), raw(sh + "w1.scale"), g);
    gemm_fp8_block_scaled(xq, xs, raw(sh + "w3.weight"), raw(sh + "w3.scale"), u);
    Tensor h = Tensor::empty({T, I}, DType::bf16, "h");
    swiglu_clamp(g, u, c.clamp_shared_expert ? static_cast<float>(c.swiglu_limit) : 0.0f, Tensor(), h);
    Tensor hq = Tensor::empty({T, I}, DType::f8_e4m3fn, "hq"), hs = Tensor::empty({T, I / 128}, DType::ue8m0, "hs");
    act_quant_fp8(h, 128, hq, hs);
    Tensor shared = Tensor::empty({T, d}, DType::bf16, "shared");
    gemm_fp8_block_scaled(hq, hs, raw(sh + "w2.weight"), raw(sh + "w2.scale"), shared);

    Tensor d_out = Tensor::empty({T, d}, DType::bf16, device, "out");
    moe_combine(d_routed, shared.to(device), d_out);
    sync();
    expect_moe_close(to_mat(d_out), want);

    // And the same pipeline on the host, bit for bit.
    Tensor experts_h = Tensor::empty({T, k}, DType::i32, "experts"), weights_h = Tensor::empty({T, k}, DType::f32, "w");
    moe_gate(logits, bias, table, token_ids, k, route_scale, experts_h, weights_h);
    Tensor routed_h = Tensor::empty({T, k, d}, DType::bf16, "routed");
    moe_experts(xt, experts_h, weights_h, host_w, Tensor(), cfg, routed_h);
    Tensor out_h = Tensor::empty({T, d}, DType::bf16, "out");
    moe_combine(routed_h, shared, out_h);
    expect_same_bytes(d_routed, routed_h, "routed");
    expect_same_bytes(d_out, out_h, "out");
  }
}

}  // namespace
}  // namespace dsv4::kernels
