// GPU tests of sparse_attention (kernels/sparse_attention.h, kernels/cuda/sparse_attention.cu): the
// same random inputs through the entry point on host tensors and on device tensors, over T in
// {0, 1, 2, 7, 64}, Flash geometry (D 512, rope 64, scale block 64) and micro geometry (D 64, rope
// 16, scale block 16), window-only, c4-like (large compressed pages, a top-k list) and c128-like
// (pages of 2 entries, every compressed entry) layers; windows and compressed lists padded with -1
// and with valid-looking indices past each length (which must not be read); rows with no valid key
// (output 0). Also: the quant-sim reference, reruns bitwise identical, bad device indices and
// lengths skipped without reading out of bounds, sinks at the extremes, a non-default stream and a
// CUDA graph capture, and the contract on device tensors.
//
// Against the host (expect_matches_host) the comparison is exact: the kernel performs the host's f32
// operations in the host's order, and its exp is glibc's expf (kernels/cuda/libm.h's libm_expf), so
// every bf16 output code equals the host's. The tensor-core path (GpuSparseAttentionTensorCore) is
// held to a stated bound instead, and shown to be taken (its call counter) or, where a shape does not
// fit it, to fall back to the exact kernel.
#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <functional>
#include <limits>
#include <random>
#include <utility>
#include <stdexcept>
#include <string>
#include <tuple>
#include <vector>

#include <gtest/gtest.h>

#include "tests/gpu/gpu_test.h"

#include "engine/config/model_config.h"
#include "engine/core/allocator.h"
#include "engine/core/error.h"
#include "engine/core/formats.h"
#include "engine/core/tensor.h"
#include "kernels/cuda/port.h"
#include "kernels/cuda/sparse_attention_tc.h"
#include "kernels/device.h"
#include "kernels/norm_rope.h"
#include "kernels/sparse_attention.h"
#include "reference/attention.h"
#include "reference/context.h"

namespace dsv4::kernels {
namespace {

constexpr int64_t kTokenCounts[] = {0, 1, 2, 7, 64};

struct Geometry {
  std::string preset;
  int64_t dim = 0, rope = 0, block = 0;
  Model1Layout layout() const { return model1_layout(kSparseAttentionOp, dim, rope, block, "kv_block"); }
};

Geometry geometry(const std::string& preset) {
  const ModelConfig c = load_model_config(preset);
  return Geometry{preset, c.head_dim, c.rope_head_dim, c.kv_block_size};
}

struct CacheSpec {
  int64_t pages = 0, page_size = 0, topk = 0;  // pages == 0: no such cache
};

float rand_bf16(std::mt19937_64& rng, float lo, float hi) {
  return round_bf16(std::uniform_real_distribution<float>(lo, hi)(rng));
}

// One MODEL1 cache, its dequantized entries (by location) and the per-token index rows.
struct Pool {
  int64_t page_size = 0;
  Tensor bytes;                          // u8 [pages, page_bytes]
  std::vector<std::vector<float>> keys;  // model1_unpack of every location
  Tensor indices, lens;                  // i32 [T, topk], i32 [T]
};

// Entries from random rows with one magnitude per `block` dims (distinct FP8 scales); rows of
// indices with a length in [1, topk], -1 inside it, and -1 or valid-looking indices past it. Tokens
// with t % 5 == 4 have no valid index inside their length.
Pool make_pool(const Geometry& g, const CacheSpec& s, int64_t tokens, std::mt19937_64& rng, const std::string& name) {
  const Model1Layout l = g.layout();
  Pool p;
  p.page_size = s.page_size;
  p.bytes = Tensor::empty({s.pages, l.page_bytes(s.page_size)}, DType::u8, name);
  auto* raw = p.bytes.data<uint8_t>();
  std::fill(raw, raw + p.bytes.numel(), uint8_t{0x5A});  // page padding: garbage the kernel must not use
  const int64_t entries = s.pages * s.page_size;
  std::vector<float> row(static_cast<size_t>(g.dim));
  for (int64_t loc = 0; loc < entries; ++loc) {
    for (int64_t b = 0; b < g.dim / g.block; ++b) {
      const float mag = std::ldexp(1.0f, static_cast<int>(rng() % 9) - 4);
      for (int64_t i = 0; i < g.block; ++i) row[static_cast<size_t>(b * g.block + i)] = rand_bf16(rng, -mag, mag);
    }
    model1_pack(l, s.page_size, row.data(), raw, loc);
    std::vector<float> key(static_cast<size_t>(g.dim));
    model1_unpack(l, s.page_size, raw, loc, key.data());
    p.keys.push_back(std::move(key));
  }
  p.indices = Tensor::empty({tokens, s.topk}, DType::i32, name + "_indices");
  p.lens = Tensor::empty({tokens}, DType::i32, name + "_lens");
  auto* idx = p.indices.data<int32_t>();
  auto* len = p.lens.data<int32_t>();
  for (int64_t t = 0; t < tokens; ++t) {
    len[t] = static_cast<int32_t>(1 + rng() % static_cast<uint64_t>(s.topk));
    for (int64_t j = 0; j < s.topk; ++j) {
      const bool pad = t % 5 == 4 && j < len[t] ? true : (j < len[t] ? rng() % 5 == 0 : rng() % 2 == 0);
      idx[t * s.topk + j] = pad ? -1 : static_cast<int32_t>(rng() % static_cast<uint64_t>(entries));
    }
  }
  return p;
}

struct Case {
  Geometry g;
  int64_t tokens = 0, heads = 0;
  std::vector<float> q;     // [T, H, D] bf16 values
  std::vector<float> sink;  // [H]
  Tensor q_t, sink_t;
  Pool swa, extra;
  bool with_extra = false;

  // Host arguments writing a fresh host `out`.
  SparseAttentionArgs args() const {
    SparseAttentionArgs a;
    a.q = q_t;
    a.attn_sink = sink_t;
    a.swa_cache = swa.bytes;
    a.swa_page_size = swa.page_size;
    a.swa_indices = swa.indices;
    a.swa_lens = swa.lens;
    if (with_extra) {
      a.extra_cache = extra.bytes;
      a.extra_page_size = extra.page_size;
      a.extra_indices = extra.indices;
      a.extra_lens = extra.lens;
    }
    a.scale = 1.0f / std::sqrt(static_cast<float>(g.dim));
    a.rope_dim = g.rope;
    a.kv_block = g.block;
    a.out = Tensor::empty({tokens, heads, g.dim}, DType::bf16, "out");
    return a;
  }

  // The valid keys of token t in the kernel's order (window, then compressed), as floats.
  std::vector<const float*> keys(int64_t t) const {
    std::vector<const float*> out;
    auto add = [&](const Pool& p) {
      const int64_t topk = p.indices.size(1);
      const int32_t len = p.lens.data<int32_t>()[t];
      for (int64_t j = 0; j < len; ++j) {
        const int32_t i = p.indices.data<int32_t>()[t * topk + j];
        if (i >= 0) out.push_back(p.keys[static_cast<size_t>(i)].data());
      }
    };
    add(swa);
    if (with_extra) add(extra);
    return out;
  }
};

Case make_case(const Geometry& g, uint64_t seed, int64_t tokens, int64_t heads, const CacheSpec& swa,
               const CacheSpec& extra = {}) {
  std::mt19937_64 rng(seed);
  Case c;
  c.g = g;
  c.tokens = tokens;
  c.heads = heads;
  for (int64_t i = 0; i < tokens * heads * c.g.dim; ++i) c.q.push_back(rand_bf16(rng, -3.0f, 3.0f));
  for (int64_t h = 0; h < heads; ++h) c.sink.push_back(std::uniform_real_distribution<float>(-2.0f, 4.0f)(rng));
  c.q_t = Tensor::empty({tokens, heads, c.g.dim}, DType::bf16, "q");
  for (size_t i = 0; i < c.q.size(); ++i) c.q_t.data<uint16_t>()[i] = f32_to_bf16(c.q[i]);
  c.sink_t = Tensor::empty({heads}, DType::f32, "attn_sink");
  std::copy(c.sink.begin(), c.sink.end(), c.sink_t.data<float>());
  c.swa = make_pool(c.g, swa, tokens, rng, "swa_cache");
  c.with_extra = extra.pages > 0;
  if (c.with_extra) c.extra = make_pool(c.g, extra, tokens, rng, "extra_cache");
  return c;
}

Case make_case(const std::string& preset, uint64_t seed, int64_t tokens, int64_t heads, const CacheSpec& swa,
               const CacheSpec& extra = {}) {
  return make_case(geometry(preset), seed, tokens, heads, swa, extra);
}

Tensor on(Allocator& device, const Tensor& t) { return t.defined() ? t.to(device) : Tensor(); }

// The same arguments with every tensor copied to `device` and a fresh (poisoned) device `out`.
SparseAttentionArgs to_device(const SparseAttentionArgs& h, Allocator& device) {
  SparseAttentionArgs d = h;
  d.q = on(device, h.q);
  d.attn_sink = on(device, h.attn_sink);
  d.swa_cache = on(device, h.swa_cache);
  d.swa_indices = on(device, h.swa_indices);
  d.swa_lens = on(device, h.swa_lens);
  d.extra_cache = on(device, h.extra_cache);
  d.extra_indices = on(device, h.extra_indices);
  d.extra_lens = on(device, h.extra_lens);
  d.out = Tensor::empty(h.out.shape(), DType::bf16, device, "out");
  return d;
}

std::vector<uint16_t> codes(const Tensor& t) {
  const Tensor h = t.device().kind == DeviceKind::host ? t : t.to(default_host_allocator());
  const auto* p = h.data<const uint16_t>();
  return std::vector<uint16_t>(p, p + h.numel());
}

std::vector<uint16_t> run_host(const SparseAttentionArgs& a) {
  sparse_attention(a);
  return codes(a.out);
}

std::vector<uint16_t> run_device(const SparseAttentionArgs& d) {
  sparse_attention(d);
  EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  return codes(d.out);
}

// Every bf16 output code equals the host's (see the file comment); reports the first differences.
void expect_matches_host(const Case& c, const std::vector<uint16_t>& got, const std::vector<uint16_t>& want,
                         const std::string& what) {
  ASSERT_EQ(got.size(), want.size()) << what;
  const int64_t D = c.g.dim;
  int64_t differing = 0;
  for (size_t e = 0; e < want.size(); ++e) {
    const uint16_t g = got[e], w = want[e];
    if (g == w) continue;
    if (differing++ < 5) {
      const auto i = static_cast<int64_t>(e);
      ADD_FAILURE() << what << ": token " << i / (c.heads * D) << " head " << (i / D) % c.heads << " dim " << i % D
                    << " GPU " << bf16_to_f32(g) << " (0x" << std::hex << g << ") host " << bf16_to_f32(w) << " (0x"
                    << w << std::dec << ")";
    }
  }
  EXPECT_EQ(differing, 0) << what << ": " << differing << " of " << want.size()
                          << " bf16 outputs differ from the host";
}

// The host and the GPU on one case; the device allocator's guards intact afterwards.
void check_case(const Case& c, const std::string& what) {
  Allocator device(*cuda_memory(0), AllocatorMode::testing);
  const SparseAttentionArgs h = c.args();
  const std::vector<uint16_t> want = run_host(h);
  const SparseAttentionArgs d = to_device(h, device);
  const std::vector<uint16_t> got = run_device(d);
  expect_matches_host(c, got, want, what);
  EXPECT_TRUE(device.check_guards().empty()) << what;
}

void sweep(const std::string& preset, int64_t heads, const CacheSpec& swa, const CacheSpec& extra, uint64_t seed,
           const std::string& what) {
  for (int64_t tokens : kTokenCounts) {
    const Case c = make_case(preset, seed + static_cast<uint64_t>(tokens), tokens, heads, swa, extra);
    check_case(c, what + " T=" + std::to_string(tokens));
  }
}

// Captures sparse_attention(d) on `stream` into a CUDA graph, then replays it `replays` times,
// synchronizing and calling check(replay) after each.
void replay_in_a_graph(cudaStream_t stream, const SparseAttentionArgs& d, int replays,
                       const std::function<void(int)>& check) {
  cudaGraph_t graph = nullptr;
  cudaGraphExec_t exec = nullptr;
  ASSERT_EQ(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal), cudaSuccess);
  {
    StreamScope scope(stream);
    sparse_attention(d);
  }
  ASSERT_EQ(cudaStreamEndCapture(stream, &graph), cudaSuccess);
  ASSERT_EQ(cudaGraphInstantiate(&exec, graph, 0), cudaSuccess);
  for (int replay = 0; replay < replays; ++replay) {
    ASSERT_EQ(cudaGraphLaunch(exec, stream), cudaSuccess);
    ASSERT_EQ(cudaStreamSynchronize(stream), cudaSuccess);
    check(replay);
  }
  EXPECT_EQ(cudaGraphExecDestroy(exec), cudaSuccess);
  EXPECT_EQ(cudaGraphDestroy(graph), cudaSuccess);
}

// ---- host vs GPU ----------------------------------------------------------------------------------

TEST(GpuSparseAttention, FlashWindowOnlyMatchesHost) {
  DSV4_REQUIRE_GPU();
  // A window of 128 over pages of 64 entries.
  sweep("flash", 4, {4, 64, 128}, {}, 100, "flash window");
}

TEST(GpuSparseAttention, FlashC4MatchesHost) {
  DSV4_REQUIRE_GPU();
  // c4-like: a top-k list of 64 over a compressed pool of 4 pages of 64 entries; three heads (a
  // partial head group).
  sweep("flash", 3, {3, 16, 32}, {4, 64, 64}, 200, "flash c4");
}

TEST(GpuSparseAttention, FlashC128MatchesHost) {
  DSV4_REQUIRE_GPU();
  // c128-like: pages of 2 compressed entries, every one of them listed.
  sweep("flash", 5, {2, 64, 128}, {5, 2, 10}, 300, "flash c128");
}

TEST(GpuSparseAttention, FlashAllHeadsMatchesHost) {
  DSV4_REQUIRE_GPU();
  // Flash's 64 heads: full groups of 8 heads at T = 64, smaller groups at small T.
  for (int64_t tokens : {1, 8, 64}) {
    const Case c = make_case("flash", 400 + static_cast<uint64_t>(tokens), tokens, 64, {3, 16, 32}, {2, 64, 48});
    check_case(c, "flash 64 heads T=" + std::to_string(tokens));
  }
}

TEST(GpuSparseAttention, MicroMatchesHost) {
  DSV4_REQUIRE_GPU();
  ASSERT_EQ(geometry("micro").block, 16);
  ASSERT_EQ(geometry("micro").dim, 64);
  sweep("micro", 4, {2, 32, 64}, {}, 500, "micro window");
  sweep("micro", 4, {2, 32, 64}, {2, 16, 16}, 600, "micro c4");
  sweep("micro", 4, {2, 32, 64}, {5, 4, 20}, 700, "micro c16");
  // Many micro heads: groups of 64 heads per block (D 64; T = 256 keeps the full group size), the
  // last group partial.
  const Case c = make_case("micro", 800, 256, 70, {2, 32, 64}, {2, 16, 16});
  check_case(c, "micro 70 heads");
}

TEST(GpuSparseAttention, SinksAtTheExtremesMatchHost) {
  DSV4_REQUIRE_GPU();
  Case c = make_case("flash", 900, 7, 4, {3, 16, 32}, {5, 2, 10});
  // -inf (no sink), a dominant sink, a tiny one, 0.
  const float sinks[] = {-std::numeric_limits<float>::infinity(), 60.0f, -60.0f, 0.0f};
  std::copy(std::begin(sinks), std::end(sinks), c.sink_t.data<float>());
  check_case(c, "extreme sinks");
}

// ---- against the quant-sim reference ---------------------------------------------------------------

// The unit test's tolerance (tests/unit/test_kernels_attention.cpp expect_close): fp32 against the
// reference's f64 sums, so a bf16 rounding of P or of an output may flip by one ulp.
void expect_close_to_reference(const Case& c, const std::vector<uint16_t>& got, const std::string& what) {
  const ModelConfig config = load_model_config(c.g.preset);
  const ref::Context ctx{config, ref::Numerics{ref::Mode::quant_sim}};
  const int64_t D = c.g.dim;
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  std::vector<float> want(static_cast<size_t>(D));
  double max_rel = 0;
  int64_t differing = 0, total = 0;
  for (int64_t t = 0; t < c.tokens; ++t) {
    const std::vector<const float*> keys = c.keys(t);
    for (int64_t h = 0; h < c.heads; ++h) {
      ref::attention_head(ctx, c.q.data() + (t * c.heads + h) * D, keys, D, c.sink[static_cast<size_t>(h)], scale,
                          want.data());
      double peak = 0;
      for (float w : want) peak = std::max(peak, static_cast<double>(std::fabs(w)));
      for (int64_t i = 0; i < D; ++i) {
        const uint16_t g = got[static_cast<size_t>((t * c.heads + h) * D + i)];
        const float w = want[static_cast<size_t>(i)];
        ++total;
        if (g != f32_to_bf16(w)) ++differing;
        const double err = std::fabs(static_cast<double>(bf16_to_f32(g)) - w);
        max_rel = std::max(max_rel, peak > 0 ? err / peak : err);
      }
    }
  }
  std::printf("%s: max rel err %.3g, %lld of %lld bf16 outputs differ from the reference\n", what.c_str(), max_rel,
              static_cast<long long>(differing), static_cast<long long>(total));
  EXPECT_LE(max_rel, 1.0 / 128) << what;
  EXPECT_LE(differing * 100, total) << what << ": more than 1% of the bf16 outputs differ";
}

TEST(GpuSparseAttention, MatchesReference) {
  DSV4_REQUIRE_GPU();
  Allocator device(*cuda_memory(0), AllocatorMode::testing);
  struct Shape {
    std::string preset;
    int64_t tokens, heads;
    CacheSpec swa, extra;
  };
  const Shape shapes[] = {{"flash", 7, 4, {3, 16, 32}, {4, 64, 64}},
                          {"flash", 7, 4, {3, 16, 32}, {}},
                          {"micro", 7, 4, {2, 32, 64}, {5, 4, 20}}};
  uint64_t seed = 1000;
  for (const Shape& s : shapes) {
    const Case c = make_case(s.preset, ++seed, s.tokens, s.heads, s.swa, s.extra);
    const std::vector<uint16_t> got = run_device(to_device(c.args(), device));
    expect_close_to_reference(c, got, s.preset + (s.extra.pages > 0 ? " with compressed entries" : " window only"));
  }
}

// ---- determinism, streams, graphs ----------------------------------------------------------------

TEST(GpuSparseAttention, RerunsAreBitwiseIdentical) {
  DSV4_REQUIRE_GPU();
  Allocator device(*cuda_memory(0), AllocatorMode::testing);
  for (const char* preset : {"flash", "micro"}) {
    const Case c = make_case(preset, 1100, 64, 16, {3, 16, 32}, {4, 16, 24});
    const SparseAttentionArgs d = to_device(c.args(), device);
    const std::vector<uint16_t> first = run_device(d);
    for (int run = 1; run < 10; ++run) {
      d.out.storage()->space().copy_from_host(d.out.data_ptr(), std::vector<uint8_t>(d.out.storage()->bytes(), 0xFF).data(),
                                              d.out.storage()->bytes());
      ASSERT_EQ(run_device(d), first) << preset << " run " << run;
    }
  }
}

TEST(GpuSparseAttention, RunsOnTheCurrentStreamAndInAGraph) {
  DSV4_REQUIRE_GPU();
  Allocator device(*cuda_memory(0), AllocatorMode::testing);
  const Case c = make_case("flash", 1200, 7, 8, {3, 16, 32}, {4, 64, 64});
  const std::vector<uint16_t> want = run_host(c.args());
  cudaStream_t stream = nullptr;
  ASSERT_EQ(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), cudaSuccess);
  {
    // Enqueued on the current stream.
    const SparseAttentionArgs d = to_device(c.args(), device);
    {
      StreamScope scope(stream);
      sparse_attention(d);
    }
    ASSERT_EQ(cudaStreamSynchronize(stream), cudaSuccess);
    expect_matches_host(c, codes(d.out), want, "on a stream");
  }
  {
    // Captured into a graph (no allocation, no synchronization inside the entry point).
    const SparseAttentionArgs d = to_device(c.args(), device);
    replay_in_a_graph(stream, d, 1, [&](int) { expect_matches_host(c, codes(d.out), want, "graph replay"); });
  }
  EXPECT_EQ(cudaStreamDestroy(stream), cudaSuccess);
}

// ---- bad values on the device, and the contract ----------------------------------------------------

TEST(GpuSparseAttention, BadDeviceIndicesAndLengthsAreSkipped) {
  DSV4_REQUIRE_GPU();
  Allocator device(*cuda_memory(0), AllocatorMode::testing);
  const Case c = make_case("flash", 1300, 7, 4, {3, 16, 32}, {5, 2, 10});
  const SparseAttentionArgs h = c.args();
  // Device copies with values the host contract rejects: indices past the cache or below -1,
  // lengths of 0, below 0 and past the top-k.
  SparseAttentionArgs bad = h;
  bad.swa_indices = h.swa_indices.clone("swa_indices");
  bad.swa_lens = h.swa_lens.clone("swa_lens");
  bad.extra_indices = h.extra_indices.clone("extra_indices");
  bad.extra_lens = h.extra_lens.clone("extra_lens");
  int32_t* si = bad.swa_indices.data<int32_t>();
  int32_t* sl = bad.swa_lens.data<int32_t>();
  int32_t* ei = bad.extra_indices.data<int32_t>();
  int32_t* el = bad.extra_lens.data<int32_t>();
  si[0] = 48;  // 3 pages x 16 entries: one past the last
  si[1] = -7;
  si[2] = INT_MAX;
  si[32 + 3] = INT_MIN;
  sl[2] = 0;
  sl[3] = -5;
  sl[4] = 1000;
  el[0] = 0;
  el[1] = 11;
  ei[10 * 1 + 0] = 10;  // 5 pages x 2 entries: one past the last
  EXPECT_THROW(sparse_attention(bad), ContractError) << "the host checks the values";
  const SparseAttentionArgs d = to_device(bad, device);
  const std::vector<uint16_t> got = run_device(d);  // no ContractError: values are not read on the host
  EXPECT_TRUE(device.check_guards().empty());
  // The host on the sanitized values: bad indices become -1, lengths clamp to [0, topk] (a length
  // of 0 as a length of 1 over a -1).
  auto sanitize = [](Tensor& idx, Tensor& len, int64_t entries) {
    const int64_t topk = idx.size(1);
    for (int64_t t = 0; t < len.size(0); ++t) {
      int32_t& l = len.data<int32_t>()[t];
      int32_t* row = idx.data<int32_t>() + t * topk;
      for (int64_t j = 0; j < topk; ++j) {
        if (row[j] < 0 || row[j] >= entries) row[j] = -1;
      }
      if (l <= 0) {
        l = 1;
        row[0] = -1;
      }
      l = std::min<int32_t>(l, static_cast<int32_t>(topk));
    }
  };
  SparseAttentionArgs fixed = bad;
  fixed.out = Tensor::empty(h.out.shape(), DType::bf16, "out");
  sanitize(fixed.swa_indices, fixed.swa_lens, 48);
  sanitize(fixed.extra_indices, fixed.extra_lens, 10);
  expect_matches_host(c, got, run_host(fixed), "sanitized bad values");
}

std::string contract_argument(const SparseAttentionArgs& a) {
  try {
    sparse_attention(a);
  } catch (const ContractError& e) {
    EXPECT_EQ(e.op(), kSparseAttentionOp);
    return e.argument();
  }
  return "";
}

TEST(GpuSparseAttention, ContractOnDeviceTensors) {
  DSV4_REQUIRE_GPU();
  Allocator device(*cuda_memory(0), AllocatorMode::testing);
  const Case c = make_case("flash", 1400, 3, 2, {3, 16, 32}, {4, 64, 64});
  const SparseAttentionArgs h = c.args();
  const SparseAttentionArgs d = to_device(h, device);
  EXPECT_EQ(contract_argument(d), "");
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  // No strided tensor is allowed: a transposed q or out is rejected.
  SparseAttentionArgs a = d;
  a.q = d.q.transpose(0, 1);
  EXPECT_EQ(contract_argument(a), "q");
  a = d;
  a.out = d.out.transpose(0, 1);
  EXPECT_EQ(contract_argument(a), "out");
  // One device for all: a host cache beside device tensors names the cache.
  a = d;
  a.swa_cache = h.swa_cache;
  EXPECT_EQ(contract_argument(a), "swa_cache");
  a = d;
  a.extra_lens = h.extra_lens;
  EXPECT_EQ(contract_argument(a), "extra_lens");
  // The shape rules hold on the device as on the host.
  a = d;
  a.swa_page_size = 8;
  EXPECT_EQ(contract_argument(a), "swa_cache");
  a = d;
  a.kv_block = 48;
  EXPECT_EQ(contract_argument(a), "kv_block");
  a = d;
  a.extra_lens = Tensor();
  EXPECT_EQ(contract_argument(a), "extra_lens");
  // Past the kernel's head_dim limit (D 4160 = nope 4096 + rope 64): a GPU-only rule.
  const int64_t big = kSparseAttentionGpuMaxDim + 64;
  const Model1Layout l = model1_layout(kSparseAttentionOp, big, 64, 64, "kv_block");
  SparseAttentionArgs b;
  b.q = Tensor::empty({1, 1, big}, DType::bf16, device, "q");
  b.out = Tensor::empty({1, 1, big}, DType::bf16, device, "out");
  b.attn_sink = Tensor::empty({1}, DType::f32, device, "attn_sink");
  b.swa_cache = Tensor::empty({1, l.page_bytes(1)}, DType::u8, device, "swa_cache");
  b.swa_page_size = 1;
  b.swa_indices = Tensor::empty({1, 1}, DType::i32, device, "swa_indices");
  b.swa_lens = Tensor::empty({1}, DType::i32, device, "swa_lens");
  b.scale = 1.0f;
  b.rope_dim = 64;
  b.kv_block = 64;
  EXPECT_EQ(contract_argument(b), "q");
}

// ---- the tensor-core path (DSV4_SPARSE_ATTENTION=tensor_core, kernels/cuda/sparse_attention_tc.h) ----
//
// Not bitwise with the host: the products are exact (bf16 keys and queries), the sums run in the
// tensor cores' order, and P is rounded to bf16 against the running max of its key tile instead of the
// final max. Each weight bf16(p) then differs by at most two bf16 roundings (2^-7 relative together)
// and the output by one rounding each side (up to 2^-7 |host|), so |GPU - host| <= 2^-7 * (max |v|
// over the token's keys + |host|) holds even when every error lines up; in practice the worst case is
// about a third of it (on the H100). A wrong key, scale, head or split shows far above it.

std::vector<uint16_t> run_tensor_core(const SparseAttentionArgs& d) {
  cuda::SparseAttentionPathScope tc(cuda::SparseAttentionPath::tensor_core);
  return run_device(d);
}

void expect_within_tensor_core_bound(const Case& c, const std::vector<uint16_t>& got,
                                     const std::vector<uint16_t>& want, const std::string& what) {
  ASSERT_EQ(got.size(), want.size()) << what;
  const int64_t D = c.g.dim;
  int64_t outside = 0;
  double worst = 0;  // the largest error as a fraction of its bound
  for (int64_t t = 0; t < c.tokens; ++t) {
    float vmax = 0.0f;
    for (const float* k : c.keys(t)) {
      for (int64_t i = 0; i < D; ++i) vmax = std::max(vmax, std::fabs(k[i]));
    }
    for (int64_t e = t * c.heads * D; e < (t + 1) * c.heads * D; ++e) {
      const float g = bf16_to_f32(got[static_cast<size_t>(e)]), w = bf16_to_f32(want[static_cast<size_t>(e)]);
      const float bound = std::ldexp(vmax + std::fabs(w), -7);
      const float err = std::fabs(g - w);
      const bool ok = err <= bound || (std::isnan(g) && std::isnan(w));
      worst = std::max(worst, bound > 0 ? static_cast<double>(err) / bound : (err > 0 ? 1e9 : 0.0));
      if (!ok && outside++ < 5) {
        ADD_FAILURE() << what << ": token " << t << " head " << (e / D) % c.heads << " dim " << e % D << " GPU " << g
                      << " host " << w << " bound " << bound;
      }
    }
  }
  EXPECT_EQ(outside, 0) << what << ": " << outside << " of " << want.size() << " outputs outside the bound";
  std::printf("%s: worst error %.3g of the bound\n", what.c_str(), worst);
}

// The tensor-core path on one case: within the bound of the host, taken (not the fallback), and the
// device allocator's guards intact.
void check_tensor_core_case(const Case& c, const std::string& what) {
  Allocator device(*cuda_memory(0), AllocatorMode::testing);
  const SparseAttentionArgs h = c.args();
  const std::vector<uint16_t> want = run_host(h);
  const SparseAttentionArgs d = to_device(h, device);
  const uint64_t calls = cuda::sparse_attention_tensor_core_calls();
  const std::vector<uint16_t> got = run_tensor_core(d);
  EXPECT_EQ(cuda::sparse_attention_tensor_core_calls(), calls + (c.tokens > 0 ? 1 : 0)) << what;
  expect_within_tensor_core_bound(c, got, want, what);
  EXPECT_TRUE(device.check_guards().empty()) << what;
}

TEST(GpuSparseAttentionTensorCore, MatchesHostWithinTheBound) {
  DSV4_REQUIRE_GPU();
  struct Shape {
    std::string preset;
    int64_t heads;
    CacheSpec swa, extra;
  };
  // D 512 (flash) with 4 and 64 heads (one and several head blocks), D 128 (tiny), D 64 (micro) with a
  // partial last head block; window only, c4-like and c128-like. Where tokens x head blocks leave SMs
  // idle (small T, few heads) the keys are split across blocks (the combine kernel); flash with 64
  // heads at T = 64 is not split.
  const Shape shapes[] = {{"flash", 4, {4, 64, 128}, {}},          {"flash", 4, {3, 16, 32}, {4, 64, 64}},
                          {"flash", 64, {3, 16, 32}, {2, 64, 48}}, {"flash", 5, {2, 64, 128}, {5, 2, 10}},
                          {"tiny", 8, {2, 64, 128}, {4, 16, 64}},  {"micro", 4, {2, 32, 64}, {5, 4, 20}},
                          {"micro", 70, {2, 32, 64}, {2, 16, 16}}};
  uint64_t seed = 2000;
  for (const Shape& s : shapes) {
    for (int64_t tokens : kTokenCounts) {
      const Case c = make_case(s.preset, ++seed, tokens, s.heads, s.swa, s.extra);
      check_tensor_core_case(c, "tensor core " + s.preset + " H=" + std::to_string(s.heads) +
                                    (s.extra.pages > 0 ? " with compressed" : " window") + " T=" + std::to_string(tokens));
    }
  }
  // Flash's 64 heads at T = 70 and 256: head blocks of 32 and 64 rows (D 512, 16 and 32 output tiles
  // per warp), as large-batch decode and prefill take them.
  for (int64_t tokens : {70, 256}) {
    const Case c = make_case("flash", ++seed, tokens, 64, {3, 16, 32}, {2, 64, 48});
    check_tensor_core_case(c, "tensor core flash H=64 T=" + std::to_string(tokens));
  }
  // Sinks at the extremes, split (T = 7, 4 heads: the combine kernel adds the sink) and not (T = 64,
  // 64 heads: the main kernel does).
  const float extremes[] = {-std::numeric_limits<float>::infinity(), 60.0f, -60.0f, 0.0f};
  for (const auto& [tokens, heads] : {std::pair<int64_t, int64_t>{7, 4}, std::pair<int64_t, int64_t>{64, 64}}) {
    Case sinks = make_case("flash", ++seed, tokens, heads, {3, 16, 32}, {5, 2, 10});
    for (int64_t h = 0; h < heads; ++h) sinks.sink_t.data<float>()[h] = extremes[h % 4];
    check_tensor_core_case(sinks, "tensor core, extreme sinks, T=" + std::to_string(tokens));
  }
}

TEST(GpuSparseAttentionTensorCore, EveryForcedHeadBlockMatchesHostWithinTheBound) {
  DSV4_REQUIRE_GPU();
  EXPECT_THROW(cuda::set_sparse_attention_tc_head_block(8), std::invalid_argument);
  EXPECT_THROW(cuda::set_sparse_attention_tc_head_block(-1), std::invalid_argument);
  EXPECT_EQ(cuda::sparse_attention_tc_head_block(), 0);
  // Flash's 64 heads (D 512: 8, 16 and 32 output tiles per warp), T = 3 (split keys) and 64 (the
  // decode batch); micro's 70 heads with a partial last block.
  struct Reset {  // back to the launch's own choice however the test ends
    ~Reset() { cuda::set_sparse_attention_tc_head_block(0); }
  } reset;
  uint64_t seed = 2100;
  for (const int hb : {16, 32, 64}) {
    cuda::set_sparse_attention_tc_head_block(hb);
    for (const auto& [preset, heads, tokens] : {std::tuple<const char*, int64_t, int64_t>{"flash", 64, 3},
                                                std::tuple<const char*, int64_t, int64_t>{"flash", 64, 64},
                                                std::tuple<const char*, int64_t, int64_t>{"micro", 70, 7}}) {
      const Case c = make_case(preset, ++seed, tokens, heads, {3, 16, 32}, {2, 64, 48});
      check_tensor_core_case(c, std::string("tensor core, head block ") + std::to_string(hb) + ", " + preset +
                                    " T=" + std::to_string(tokens));
    }
  }
}

TEST(GpuSparseAttentionTensorCore, RerunsAndAGraphReplayAreBitwiseIdentical) {
  DSV4_REQUIRE_GPU();
  Allocator device(*cuda_memory(0), AllocatorMode::testing);
  cuda::SparseAttentionPathScope tc(cuda::SparseAttentionPath::tensor_core);
  cudaStream_t stream = nullptr;
  ASSERT_EQ(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), cudaSuccess);
  for (int64_t tokens : {1, 64}) {  // with the split combine (T = 1) and without (64 heads at T = 64)
    const Case c = make_case("flash", 2200 + static_cast<uint64_t>(tokens), tokens, 64, {3, 16, 32}, {4, 64, 64});
    const SparseAttentionArgs d = to_device(c.args(), device);
    const std::vector<uint16_t> first = run_device(d);
    for (int run = 1; run < 10; ++run) {
      d.out.storage()->space().copy_from_host(d.out.data_ptr(), std::vector<uint8_t>(d.out.storage()->bytes(), 0xFF).data(),
                                              d.out.storage()->bytes());
      ASSERT_EQ(run_device(d), first) << "T=" << tokens << " run " << run;
    }
    const SparseAttentionArgs g = to_device(c.args(), device);
    replay_in_a_graph(stream, g, 2, [&](int replay) {
      EXPECT_EQ(codes(g.out), first) << "T=" << tokens << " graph replay " << replay;
    });
  }
  EXPECT_EQ(cudaStreamDestroy(stream), cudaSuccess);
}

TEST(GpuSparseAttentionTensorCore, ShapesItDoesNotTakeRunTheExactKernel) {
  DSV4_REQUIRE_GPU();
  // head_dim 96 is not a multiple of 64: the switch says tensor_core, the exact kernel runs, bitwise.
  const Case c = make_case(Geometry{"custom", 96, 32, 16}, 2300, 7, 4, {2, 32, 64}, {3, 8, 16});
  Allocator device(*cuda_memory(0), AllocatorMode::testing);
  const std::vector<uint16_t> want = run_host(c.args());
  const uint64_t calls = cuda::sparse_attention_tensor_core_calls();
  const std::vector<uint16_t> got = run_tensor_core(to_device(c.args(), device));
  EXPECT_EQ(cuda::sparse_attention_tensor_core_calls(), calls);
  expect_matches_host(c, got, want, "head_dim 96 under tensor_core");
}

}  // namespace
}  // namespace dsv4::kernels
