// The compressor's entry points (kernels/compressor.h) on a GPU: compressor_pool, compressor_write_state
// and compressor_store read the encoded plan from device memory and must equal the host
// implementations bit for bit (the kernels replay the host's operation order, and their exp / sin /
// cos reproduce glibc's, which the host calls), on plans from build_compress_plan for ratio 4 and 128:
// several requests, blocks completing mid-batch, T = 0, 1, 2, odd, 8 and 64, large positions (the
// RoPE's large-argument reduction), unaligned state rows, every post-processing variant. A chunked
// run through the GPU entry points also equals the reference Compressor bit for bit (the host unit
// test's criterion). The encode/decode round trip and the host entry points' plan rules are plain
// host tests (they run without a GPU).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include <gtest/gtest.h>

#include "tests/gpu/gpu_test.h"

#include "engine/config/model_config.h"
#include "engine/config/runtime_options.h"
#include "engine/core/allocator.h"
#include "engine/core/error.h"
#include "engine/core/tensor.h"
#include "engine/serving/compress_state_pool.h"
#include "kernels/compressor.h"
#include "kernels/cuda/port.h"
#include "kernels/device.h"
#include "kernels/norm_rope.h"
#include "reference/compressor.h"
#include "reference/context.h"
#include "reference/rope.h"
#include "tests/unit/reference_fixtures.h"

namespace dsv4::kernels {
namespace {

using Kind = CompressSource::Kind;

Allocator& host_allocator() {
  static Allocator a(host_memory());
  return a;
}

// Deterministic xorshift values.
struct Rng {
  uint64_t s;
  explicit Rng(uint64_t seed) : s(seed * 0x9E3779B97F4A7C15ull + 1) {}
  uint64_t next() {
    s ^= s << 13;
    s ^= s >> 7;
    s ^= s << 17;
    return s;
  }
  float uniform(float lo, float hi) {
    return lo + static_cast<float>(static_cast<double>(next() >> 11) * 0x1.0p-53) * (hi - lo);
  }
};

Tensor random_f32(const Shape& shape, Rng& rng, float lo, float hi, const std::string& name) {
  Tensor t = Tensor::empty(shape, DType::f32, name);
  float* p = t.data<float>();
  for (int64_t i = 0; i < t.numel(); ++i) p[i] = rng.uniform(lo, hi);
  return t;
}

Tensor random_bytes(const Shape& shape, Rng& rng, const std::string& name) {
  Tensor t = Tensor::empty(shape, DType::u8, name);
  uint8_t* p = t.data<uint8_t>();
  for (int64_t i = 0; i < t.numel(); ++i) p[i] = static_cast<uint8_t>(rng.next() >> 56);
  return t;
}

Tensor i64_tensor(const std::vector<int64_t>& v, const std::string& name) {
  Tensor t = Tensor::empty({static_cast<int64_t>(v.size())}, DType::i64, name);
  if (!v.empty()) std::memcpy(t.data<int64_t>(), v.data(), v.size() * 8);
  return t;
}

// A tensor's bytes, copied to the host.
std::vector<uint8_t> bytes_of(const Tensor& t) {
  const Tensor h = t.device().kind == DeviceKind::host ? t.contiguous() : t.to(host_allocator());
  std::vector<uint8_t> out(static_cast<size_t>(dtype_storage_bytes(h.dtype(), h.numel())));
  if (!out.empty()) std::memcpy(out.data(), h.data_ptr(), out.size());
  return out;
}

void expect_same_bytes(const std::vector<uint8_t>& got, const std::vector<uint8_t>& want, const std::string& what) {
  ASSERT_EQ(got.size(), want.size()) << what;
  for (size_t i = 0; i < want.size(); ++i) {
    ASSERT_EQ(got[i], want[i]) << what << ": byte " << i << " differs";
  }
}

// f32 rows [0, rows) of a [capacity, dims] tensor, bit for bit.
void expect_same_rows(const Tensor& got, const Tensor& want, int64_t rows, int64_t dims, const std::string& what) {
  const std::vector<uint8_t> g = bytes_of(got), w = bytes_of(want);
  ASSERT_GE(g.size(), static_cast<size_t>(rows * dims * 4)) << what;
  ASSERT_GE(w.size(), static_cast<size_t>(rows * dims * 4)) << what;
  for (int64_t i = 0; i < rows * dims; ++i) {
    float a, b;
    std::memcpy(&a, g.data() + 4 * i, 4);
    std::memcpy(&b, w.data() + 4 * i, 4);
    ASSERT_EQ(std::memcmp(&a, &b, 4), 0) << what << ": entry " << i / dims << " dim " << i % dims << " got " << a
                                         << " want " << b;
  }
}

// ---- plans ------------------------------------------------------------------------------------------

struct Req {
  int64_t start;
  int64_t tokens;
};

// A plan over `reqs` with state rows scattered over [0, state_rows) (request q, position p ->
// (37 q + 5 p + 3) mod rows; rows may repeat across requests), its destinations and its words.
struct Built {
  CompressPlan plan;
  std::vector<int64_t> dest;
  std::vector<int64_t> words;
  int64_t T = 0, B = 0;
};

Built build(int64_t ratio, const std::vector<Req>& reqs, int64_t state_rows, int64_t locations, bool every_row = false,
            int64_t spare_words = 0) {
  std::vector<std::vector<int64_t>> rows(reqs.size());
  std::vector<CompressRequestBatch> batch;
  for (size_t q = 0; q < reqs.size(); ++q) {
    for (int64_t p = compress_history_start(reqs[q].start, ratio); p < reqs[q].start + reqs[q].tokens; ++p) {
      rows[q].push_back((37 * static_cast<int64_t>(q) + 5 * p + 3) % state_rows);
    }
  }
  for (size_t q = 0; q < reqs.size(); ++q) batch.push_back({reqs[q].start, reqs[q].tokens, rows[q]});
  Built b;
  b.plan = build_compress_plan(batch, ratio, state_rows, every_row);
  for (const CompressPlanBlock& blk : b.plan.blocks) b.dest.push_back((blk.request * 37 + blk.block * 5) % locations);
  b.words = encode_compress_plan(b.plan, b.dest);
  // A plan buffer is usually longer than the plan (its capacity): junk past the words is ignored.
  for (int64_t i = 0; i < spare_words; ++i) b.words.push_back(-7777 - i);
  b.T = b.plan.num_tokens();
  b.B = static_cast<int64_t>(b.plan.blocks.size());
  return b;
}

// ---- the host round trip and the host entry points (no GPU needed) -----------------------------

void expect_same_plan(const CompressPlan& got, const CompressPlan& want) {
  EXPECT_EQ(got.ratio, want.ratio);
  EXPECT_EQ(got.coff, want.coff);
  EXPECT_EQ(got.positions, want.positions);
  EXPECT_EQ(got.write_rows, want.write_rows);
  ASSERT_EQ(got.blocks.size(), want.blocks.size());
  for (size_t k = 0; k < want.blocks.size(); ++k) {
    EXPECT_EQ(got.blocks[k].request, want.blocks[k].request) << k;
    EXPECT_EQ(got.blocks[k].block, want.blocks[k].block) << k;
    EXPECT_EQ(got.blocks[k].buffer_len, want.blocks[k].buffer_len) << k;
  }
  ASSERT_EQ(got.sources.size(), want.sources.size());
  for (size_t i = 0; i < want.sources.size(); ++i) {
    EXPECT_EQ(got.sources[i].kind, want.sources[i].kind) << i;
    EXPECT_EQ(got.sources[i].index, want.sources[i].index) << i;
  }
}

TEST(CompressPlanWords, EncodeDecodeRoundTrip) {
  const std::vector<std::pair<int64_t, std::vector<Req>>> cases = {
      {4, {}},
      {4, {{5, 0}}},
      {4, {{7, 1}}},
      {4, {{0, 5}, {6, 3}, {101, 5}}},
      {4, {{0, 30}, {17, 34}}},
      {128, {{127, 1}}},
      {128, {{120, 9}, {383, 2}, {0, 300}}},
  };
  for (const auto& [ratio, reqs] : cases) {
    for (const bool every_row : {false, true}) {
      const Built b = build(ratio, reqs, 64, 128, every_row);
      const int64_t S = b.plan.sources_per_block();
      EXPECT_EQ(static_cast<int64_t>(b.words.size()), compress_plan_words(b.T, b.B, S));
      EXPECT_EQ(b.words[0], b.T);
      EXPECT_EQ(b.words[1], b.B);
      EXPECT_EQ(b.words[2], S);
      std::vector<int64_t> dest = {99, 98};
      const CompressPlan back = decode_compress_plan(b.words.data(), ratio, dest);
      expect_same_plan(back, b.plan);
      EXPECT_EQ(dest, b.dest);
      EXPECT_NO_THROW(check_compress_plan(back, b.T, 64));
      // The words name their kinds by CompressSource::Kind's values.
      for (int64_t i = 0; i < b.B * S; ++i) {
        EXPECT_EQ(b.words[static_cast<size_t>(3 + 2 * b.T + 3 * b.B + 2 * i)],
                  static_cast<int64_t>(b.plan.sources[static_cast<size_t>(i)].kind));
      }
    }
  }
}

TEST(CompressPlanWords, RefusesMismatchedRatioAndDest) {
  const Built b = build(4, {{0, 9}}, 64, 128);
  std::vector<int64_t> dest;
  EXPECT_THROW(decode_compress_plan(b.words.data(), 128, dest), ContractError);  // S = 8 is not 1 * 128
  EXPECT_THROW(decode_compress_plan(b.words.data(), 0, dest), ContractError);
  const std::vector<int64_t> short_dest(b.dest.begin(), b.dest.end() - 1);
  EXPECT_THROW(encode_compress_plan(b.plan, short_dest), ContractError);
  std::vector<int64_t> negative = b.words;
  negative[1] = -1;
  EXPECT_THROW(decode_compress_plan(negative.data(), 4, dest), ContractError);
}

// Inputs of one batch: kv, score, state, weights, in host memory.
struct Inputs {
  CompressStateLayout layout;
  Tensor kv, score, state, norm, freqs;
};

// A state layout of `dims` floats per part, with `pad` bytes after each row (2: rows lose their
// 4-byte alignment) and a gap of 8 bytes before the scores.
CompressStateLayout make_layout(int64_t ratio, int64_t dims, int64_t pad) {
  CompressStateLayout l;
  l.coff = ratio == 4 ? 2 : 1;
  l.dims = dims;
  int64_t at = 0;
  for (int64_t p = 0; p < l.coff; ++p, at += 4 * dims) l.kv_offset_bytes[p] = at;
  at += 8;
  for (int64_t p = 0; p < l.coff; ++p, at += 4 * dims) l.score_offset_bytes[p] = at;
  l.row_bytes = at + pad;
  return l;
}

Inputs make_inputs(int64_t ratio, int64_t T, int64_t dims, int64_t rope_dims, int64_t state_rows, int64_t pad,
                   uint64_t seed) {
  Rng rng(seed);
  Inputs in;
  in.layout = make_layout(ratio, dims, pad);
  const int64_t width = in.layout.coff * dims;
  in.kv = random_f32({T, width}, rng, -2.0f, 2.0f, "kv");
  in.score = random_f32({T, width}, rng, -3.0f, 3.0f, "score");
  // Random bytes, with finite floats wherever a part lives (a pooled row must have finite scores).
  in.state = random_bytes({state_rows, in.layout.row_bytes}, rng, "state");
  for (int64_t r = 0; r < state_rows; ++r) {
    uint8_t* row = in.state.data<uint8_t>() + r * in.layout.row_bytes;
    for (int64_t p = 0; p < in.layout.coff; ++p) {
      for (int64_t j = 0; j < dims; ++j) {
        const float v = rng.uniform(-2.0f, 2.0f), s = rng.uniform(-3.0f, 3.0f);
        std::memcpy(row + in.layout.kv_offset_bytes[p] + 4 * j, &v, 4);
        std::memcpy(row + in.layout.score_offset_bytes[p] + 4 * j, &s, 4);
      }
    }
  }
  in.norm = random_f32({dims}, rng, 0.5f, 1.5f, "norm");
  in.freqs = Tensor::empty({rope_dims / 2}, DType::f32, "freqs");
  for (int64_t j = 0; j < rope_dims / 2; ++j) {
    in.freqs.data<float>()[j] = static_cast<float>(std::pow(10000.0, -2.0 * static_cast<double>(j) / static_cast<double>(rope_dims)));
  }
  return in;
}

TEST(CompressorHostEntryPoints, EqualTheHostImplementations) {
  const Built b = build(4, {{2, 7}, {13, 4}}, 32, 128, false, 5);
  Inputs in = make_inputs(4, b.T, 16, 8, 32, 0, 3);
  CompressPostprocess post;
  post.bf16_act = true;
  post.quant = CompressQuant::fp8_nope;
  post.quant_block = 8;
  const Tensor plan = i64_tensor(b.words, "plan");
  Tensor entries = Tensor::empty({b.B + 2, 16}, DType::f32, "entries");
  entries.fill(5.0);
  compressor_pool(plan, 4, in.kv, in.score, in.state, in.layout, in.norm, in.freqs, post, entries);
  Tensor want = Tensor::empty({b.B, 16}, DType::f32, "want");
  compressor_pool_host(b.plan, in.kv, in.score, in.state, in.layout, in.norm, in.freqs, post, want);
  expect_same_rows(entries, want, b.B, 16, "pool");
  EXPECT_EQ(entries.get({b.B, 0}), 5.0) << "rows past B untouched";

  Tensor state2 = in.state.clone("state2");
  compressor_write_state(plan, 4, in.kv, in.score, in.state, in.layout);
  compressor_write_state_host(in.kv, in.score, i64_tensor(b.plan.write_rows, "rows"), state2, in.layout);
  expect_same_bytes(bytes_of(in.state), bytes_of(state2), "state");

  Tensor keys = Tensor::empty({2, 64, 16}, DType::f32, "keys");
  keys.fill(0.0);
  compressor_store(plan, 4, entries, keys);
  for (int64_t k = 0; k < b.B; ++k) {
    for (int64_t j = 0; j < 16; ++j) {
      const int64_t loc = b.dest[static_cast<size_t>(k)];
      EXPECT_EQ(keys.get({loc / 64, loc % 64, j}), entries.get({k, j}));
    }
  }
  const Model1Layout m1 = model1_layout("test", 16, 8, 8);
  Tensor cache = Tensor::empty({32, m1.page_bytes(4)}, DType::u8, "cache");
  cache.fill(0.0);
  compressor_store(plan, 4, entries, cache, m1, 4);
  std::vector<uint8_t> want_cache(static_cast<size_t>(cache.numel()), 0);
  for (int64_t k = 0; k < b.B; ++k) model1_pack(m1, 4, entries.data<float>() + k * 16, want_cache.data(), b.dest[static_cast<size_t>(k)]);
  expect_same_bytes(bytes_of(cache), want_cache, "MODEL1 cache");
}

TEST(CompressorHostEntryPoints, RefuseBadPlanWords) {
  const Built b = build(4, {{0, 9}}, 32, 128);
  Inputs in = make_inputs(4, b.T, 16, 8, 32, 0, 4);
  Tensor entries = Tensor::empty({b.B, 16}, DType::f32, "entries");
  auto pool = [&](const Tensor& plan, int64_t ratio, Tensor& out) {
    compressor_pool(plan, ratio, in.kv, in.score, in.state, in.layout, in.norm, in.freqs, {}, out);
  };
  // A buffer shorter than its header says.
  const std::vector<int64_t> cut(b.words.begin(), b.words.end() - 1);
  EXPECT_THROW(pool(i64_tensor(cut, "plan"), 4, entries), ContractError);
  EXPECT_THROW(pool(i64_tensor({0, 0}, "plan"), 4, entries), ContractError);
  // The ratio disagrees with the layout's coff, or with the words' S.
  EXPECT_THROW(pool(i64_tensor(b.words, "plan"), 128, entries), ContractError);
  EXPECT_THROW(compressor_write_state(i64_tensor(b.words, "plan"), 16, in.kv, in.score, in.state, in.layout),
               ContractError);
  // Fewer entry rows than blocks.
  Tensor small = Tensor::empty({b.B - 1, 16}, DType::f32, "entries");
  EXPECT_THROW(pool(i64_tensor(b.words, "plan"), 4, small), ContractError);
  // Not i64.
  Tensor f = Tensor::empty({static_cast<int64_t>(b.words.size())}, DType::f32, "plan");
  EXPECT_THROW(pool(f, 4, entries), ContractError);
  // A destination outside the cache.
  std::vector<int64_t> far = b.words;
  far.back() = 128;
  Tensor keys = Tensor::empty({2, 64, 16}, DType::f32, "keys");
  pool(i64_tensor(b.words, "plan"), 4, entries);
  EXPECT_THROW(compressor_store(i64_tensor(far, "plan"), 4, entries, keys), ContractError);
  // A MODEL1 cache needs its geometry.
  Tensor cache = Tensor::empty({32, 64}, DType::u8, "cache");
  EXPECT_THROW(compressor_store(i64_tensor(b.words, "plan"), 4, entries, cache), ContractError);
  // The plan's T must be kv's rows (the write rows index the tokens).
  const Built other = build(4, {{0, 8}}, 32, 128);
  EXPECT_THROW(compressor_write_state(i64_tensor(other.words, "plan"), 4, in.kv, in.score, in.state, in.layout),
               ContractError);
}

// ---- GPU equals host ----------------------------------------------------------------------------

struct Post {
  const char* name;
  int64_t dims;
  int64_t rope_dims;
  CompressPostprocess post;
};

std::vector<Post> posts() {
  std::vector<Post> v;
  CompressPostprocess p;
  v.push_back({"exact", 128, 64, p});
  p.bf16_act = true;
  p.quant = CompressQuant::fp8_nope;
  p.quant_block = 64;
  v.push_back({"attn_fp8", 128, 64, p});
  v.push_back({"attn_fp8_flash_dims", 512, 64, p});
  p.fp8_rounding = false;
  v.push_back({"attn_fp8_clamp_only", 128, 64, p});
  CompressPostprocess q;
  q.bf16_act = true;
  q.rotate = true;
  q.quant = CompressQuant::fp4;
  q.quant_block = 32;
  v.push_back({"indexer_fp4", 128, 64, q});
  q.quant = CompressQuant::fp8_vector;
  q.quant_block = 128;
  v.push_back({"indexer_fp8_vector", 128, 64, q});
  return v;
}

struct Scenario {
  const char* name;
  int64_t ratio;
  std::vector<Req> reqs;
  bool every_row = false;
};

std::vector<Scenario> scenarios() {
  return {
      {"c4_empty", 4, {}},
      {"c4_T0", 4, {{5, 0}}},
      {"c4_T1_decode_completes", 4, {{7, 1}}},
      {"c4_T1_block0", 4, {{3, 1}}},
      {"c4_T2_mid_block", 4, {{2, 2}}},
      {"c4_T13_three_requests", 4, {{0, 5}, {6, 3}, {101, 5}}},
      {"c4_T8", 4, {{3, 8}}},
      {"c4_T64_two_requests", 4, {{0, 30}, {17, 34}}},
      {"c4_T7_verify_every_row", 4, {{9, 7}}, true},
      {"c4_large_positions", 4, {{1048573, 5}, {70001, 6}}},
      {"c128_T0", 128, {{100, 0}}},
      {"c128_T1_completes", 128, {{127, 1}}},
      {"c128_T2", 128, {{255, 1}, {0, 1}}},
      {"c128_T11_odd", 128, {{120, 9}, {383, 2}}},
      {"c128_T8", 128, {{124, 8}}},
      {"c128_T64", 128, {{100, 64}}},
      {"c128_T300_two_blocks", 128, {{0, 300}}},
      {"c128_large_positions", 128, {{131000, 80}}},
  };
}

constexpr int64_t kStateRows = 64;
constexpr int64_t kKeyPages = 2, kKeysPerPage = 64;  // f32 key cache [2, 64, dims]: 128 locations
constexpr int64_t kPageSize = 4, kPages = 32;        // MODEL1: 128 locations

// Runs pool, write_state and both store forms on `device` tensors and on host tensors; everything
// must agree bit for bit. unaligned: state rows of an odd length.
void check_gpu_equals_host(const Scenario& sc, const Post& pp, bool unaligned, uint64_t seed) {
  const std::string what = std::string(sc.name) + "/" + pp.name + (unaligned ? "/unaligned" : "");
  SCOPED_TRACE(what);
  Allocator device(*cuda_memory(0), AllocatorMode::testing);
  const int64_t locations = kKeyPages * kKeysPerPage;
  const Built b = build(sc.ratio, sc.reqs, kStateRows, locations, sc.every_row, 11);
  const Inputs in = make_inputs(sc.ratio, b.T, pp.dims, pp.rope_dims, kStateRows, unaligned ? 2 : 0, seed);
  const int64_t hd = pp.dims, capacity = b.B + 3;
  const Model1Layout m1 = model1_layout("test", hd, pp.rope_dims, 64);
  Rng rng(seed + 100);
  const Tensor keys0 = random_f32({kKeyPages, kKeysPerPage, hd}, rng, -1.0f, 1.0f, "keys");
  const Tensor cache0 = random_bytes({kPages, m1.page_bytes(kPageSize)}, rng, "cache");

  // Host.
  const Tensor plan_h = i64_tensor(b.words, "plan");
  Tensor entries_h = Tensor::empty({capacity, hd}, DType::f32, "entries");
  entries_h.fill(0.0);
  Tensor state_h = in.state.clone("state_h"), keys_h = keys0.clone("keys_h"), cache_h = cache0.clone("cache_h");
  compressor_pool(plan_h, sc.ratio, in.kv, in.score, state_h, in.layout, in.norm, in.freqs, pp.post, entries_h);
  compressor_write_state(plan_h, sc.ratio, in.kv, in.score, state_h, in.layout);
  compressor_store(plan_h, sc.ratio, entries_h, keys_h);
  compressor_store(plan_h, sc.ratio, entries_h, cache_h, m1, kPageSize);

  // GPU.
  const Tensor plan_d = plan_h.to(device), kv_d = in.kv.to(device), score_d = in.score.to(device);
  const Tensor norm_d = in.norm.to(device), freqs_d = in.freqs.to(device);
  Tensor state_d = in.state.to(device), keys_d = keys0.to(device), cache_d = cache0.to(device);
  Tensor entries_d = Tensor::empty({capacity, hd}, DType::f32, device, "entries_d");  // poisoned: NaN
  compressor_pool(plan_d, sc.ratio, kv_d, score_d, state_d, in.layout, norm_d, freqs_d, pp.post, entries_d);
  compressor_write_state(plan_d, sc.ratio, kv_d, score_d, state_d, in.layout);
  compressor_store(plan_d, sc.ratio, entries_d, keys_d);
  compressor_store(plan_d, sc.ratio, entries_d, cache_d, m1, kPageSize);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);

  expect_same_rows(entries_d, entries_h, b.B, hd, "entries");
  const std::vector<double> all = entries_d.values();
  for (int64_t i = b.B * hd; i < capacity * hd; ++i) {
    ASSERT_TRUE(std::isnan(all[static_cast<size_t>(i)])) << "row " << i / hd << " past B was written";
  }
  expect_same_bytes(bytes_of(state_d), bytes_of(state_h), "state");
  expect_same_bytes(bytes_of(keys_d), bytes_of(keys_h), "f32 key cache");
  expect_same_bytes(bytes_of(cache_d), bytes_of(cache_h), "MODEL1 cache");

  // Ten reruns of the pool on the state written above: each equals the host's pool of that state.
  Tensor again_h = Tensor::empty({capacity, hd}, DType::f32, "again_h");
  compressor_pool(plan_h, sc.ratio, in.kv, in.score, state_h, in.layout, in.norm, in.freqs, pp.post, again_h);
  std::vector<uint8_t> first;
  for (int run = 0; run < 10; ++run) {
    compressor_pool(plan_d, sc.ratio, kv_d, score_d, state_d, in.layout, norm_d, freqs_d, pp.post, entries_d);
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    if (run == 0) {
      expect_same_rows(entries_d, again_h, b.B, hd, "pool of the written state");
      first = bytes_of(entries_d);
    } else {
      expect_same_bytes(bytes_of(entries_d), first, "rerun " + std::to_string(run));
    }
  }
  EXPECT_TRUE(device.check_guards().empty());
}

class GpuCompressor : public ::testing::TestWithParam<Scenario> {};

TEST_P(GpuCompressor, EqualsHostForEveryPostprocess) {
  DSV4_REQUIRE_GPU();
  uint64_t seed = 1;
  for (const Post& pp : posts()) check_gpu_equals_host(GetParam(), pp, false, seed++);
}

TEST_P(GpuCompressor, EqualsHostWithUnalignedStateRows) {
  DSV4_REQUIRE_GPU();
  check_gpu_equals_host(GetParam(), posts()[1], true, 77);
}

INSTANTIATE_TEST_SUITE_P(Plans, GpuCompressor, ::testing::ValuesIn(scenarios()),
                         [](const ::testing::TestParamInfo<Scenario>& info) { return std::string(info.param.name); });

// Ten reruns of each entry point give the same bytes.
TEST(GpuCompressorDeterminism, TenRerunsBitwiseIdentical) {
  DSV4_REQUIRE_GPU();
  Allocator device(*cuda_memory(0), AllocatorMode::testing);
  const Built b = build(128, {{0, 300}, {120, 9}}, kStateRows, 128);
  const Post pp = posts()[4];
  const Inputs in = make_inputs(128, b.T, pp.dims, pp.rope_dims, kStateRows, 0, 9);
  const Tensor plan_d = i64_tensor(b.words, "plan").to(device);
  const Tensor kv_d = in.kv.to(device), score_d = in.score.to(device), norm_d = in.norm.to(device),
               freqs_d = in.freqs.to(device);
  const Model1Layout m1 = model1_layout("test", pp.dims, pp.rope_dims, 64);
  std::vector<uint8_t> ref_entries, ref_state, ref_cache;
  for (int run = 0; run < 10; ++run) {
    Tensor state_d = in.state.to(device);
    Tensor entries_d = Tensor::empty({b.B + 1, pp.dims}, DType::f32, device, "entries");
    Tensor cache_d = Tensor::empty({kPages, m1.page_bytes(kPageSize)}, DType::u8, device, "cache");
    compressor_pool(plan_d, 128, kv_d, score_d, state_d, in.layout, norm_d, freqs_d, pp.post, entries_d);
    compressor_write_state(plan_d, 128, kv_d, score_d, state_d, in.layout);
    compressor_store(plan_d, 128, entries_d, cache_d, m1, kPageSize);
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    if (run == 0) {
      ref_entries = bytes_of(entries_d);
      ref_state = bytes_of(state_d);
      ref_cache = bytes_of(cache_d);
      continue;
    }
    expect_same_bytes(bytes_of(entries_d), ref_entries, "entries run " + std::to_string(run));
    expect_same_bytes(bytes_of(state_d), ref_state, "state run " + std::to_string(run));
    expect_same_bytes(bytes_of(cache_d), ref_cache, "cache run " + std::to_string(run));
  }
}

// The launches read the plan when they run: a CUDA graph captured once replays batches whose plans
// (T, B, sources, destinations) are uploaded into the same buffer afterwards.
TEST(GpuCompressorGraph, ReplaysWithPlansUploadedAfterCapture) {
  DSV4_REQUIRE_GPU();
  Allocator device(*cuda_memory(0), AllocatorMode::testing);
  const int64_t ratio = 4, hd = 128, rd = 64, t_max = 24, capacity = 12;
  const Post pp = posts()[1];
  const std::vector<std::vector<Req>> batches = {{{0, 9}, {3, 6}}, {{9, 1}, {9, 2}}, {{20, 4}, {1, 0}, {30, 17}}};
  std::vector<Built> plans;
  int64_t words = 0;
  for (const auto& reqs : batches) {
    plans.push_back(build(ratio, reqs, kStateRows, 128));
    words = std::max<int64_t>(words, static_cast<int64_t>(plans.back().words.size()));
  }
  const Inputs in = make_inputs(ratio, t_max, hd, rd, kStateRows, 0, 21);
  const Model1Layout m1 = model1_layout("test", hd, rd, 64);
  Tensor plan_d = Tensor::empty({words}, DType::i64, device, "plan");
  const Tensor kv_d = in.kv.to(device), score_d = in.score.to(device), norm_d = in.norm.to(device),
               freqs_d = in.freqs.to(device);
  Tensor state_d = in.state.to(device);
  Tensor entries_d = Tensor::empty({capacity, hd}, DType::f32, device, "entries");
  Tensor cache0 = Tensor::empty({kPages, m1.page_bytes(kPageSize)}, DType::u8, "cache");
  cache0.fill(0.0);
  Tensor cache_d = cache0.to(device);

  cudaStream_t stream;
  ASSERT_EQ(cudaStreamCreate(&stream), cudaSuccess);
  cudaGraph_t graph;
  {
    StreamScope scope(stream);
    ASSERT_EQ(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal), cudaSuccess);
    compressor_pool(plan_d, ratio, kv_d, score_d, state_d, in.layout, norm_d, freqs_d, pp.post, entries_d);
    compressor_write_state(plan_d, ratio, kv_d, score_d, state_d, in.layout);
    compressor_store(plan_d, ratio, entries_d, cache_d, m1, kPageSize);
    ASSERT_EQ(cudaStreamEndCapture(stream, &graph), cudaSuccess);
  }
  cudaGraphExec_t exec;
  ASSERT_EQ(cudaGraphInstantiate(&exec, graph, 0), cudaSuccess);

  Tensor state_h = in.state.clone("state_h"), cache_h = cache0.clone("cache_h");
  for (size_t i = 0; i < plans.size(); ++i) {
    SCOPED_TRACE("batch " + std::to_string(i));
    std::vector<int64_t> padded = plans[i].words;
    padded.resize(static_cast<size_t>(words), -1);
    ASSERT_EQ(cudaMemcpy(plan_d.data_ptr(), padded.data(), padded.size() * 8, cudaMemcpyHostToDevice), cudaSuccess);
    ASSERT_EQ(cudaGraphLaunch(exec, stream), cudaSuccess);
    ASSERT_EQ(cudaStreamSynchronize(stream), cudaSuccess);
    // The host runs the batch on its own T rows of the input.
    const Tensor plan_h = i64_tensor(padded, "plan");
    const int64_t T = plans[i].T, B = plans[i].B;
    ASSERT_LE(B, capacity);
    const Tensor kv_h = in.kv.narrow(0, 0, T).contiguous(), score_h = in.score.narrow(0, 0, T).contiguous();
    Tensor entries_h = Tensor::empty({capacity, hd}, DType::f32, "entries_h");
    compressor_pool(plan_h, ratio, kv_h, score_h, state_h, in.layout, in.norm, in.freqs, pp.post, entries_h);
    compressor_write_state(plan_h, ratio, kv_h, score_h, state_h, in.layout);
    compressor_store(plan_h, ratio, entries_h, cache_h, m1, kPageSize);
    expect_same_rows(entries_d, entries_h, B, hd, "entries");
    expect_same_bytes(bytes_of(state_d), bytes_of(state_h), "state");
    expect_same_bytes(bytes_of(cache_d), bytes_of(cache_h), "MODEL1 cache");
  }
  EXPECT_EQ(cudaGraphExecDestroy(exec), cudaSuccess);
  EXPECT_EQ(cudaGraphDestroy(graph), cudaSuccess);
  EXPECT_EQ(cudaStreamDestroy(stream), cudaSuccess);
  EXPECT_TRUE(device.check_guards().empty());
}

// The contracts hold on device tensors too; bad words never touch memory out of bounds.
TEST(GpuCompressorContract, RefusesStridedAndMixedDevices) {
  DSV4_REQUIRE_GPU();
  Allocator device(*cuda_memory(0), AllocatorMode::testing);
  const Built b = build(4, {{0, 9}}, kStateRows, 128);
  const Inputs in = make_inputs(4, b.T, 16, 8, kStateRows, 0, 5);
  const Tensor plan_d = i64_tensor(b.words, "plan").to(device);
  const Tensor score_d = in.score.to(device), norm_d = in.norm.to(device), freqs_d = in.freqs.to(device);
  Tensor state_d = in.state.to(device);
  Tensor entries_d = Tensor::empty({b.B, 16}, DType::f32, device, "entries");
  // kv as a column slice of a wider buffer: strided, refused (the kernels index rows densely).
  Tensor wide = Tensor::empty({b.T, 48}, DType::f32, device, "wide");
  const Tensor kv_strided = wide.narrow(1, 0, 32);
  try {
    compressor_pool(plan_d, 4, kv_strided, score_d, state_d, in.layout, norm_d, freqs_d, {}, entries_d);
    FAIL() << "a strided kv was accepted";
  } catch (const ContractError& e) {
    EXPECT_EQ(e.argument(), "kv");
  }
  EXPECT_THROW(compressor_write_state(plan_d, 4, kv_strided, score_d, state_d, in.layout), ContractError);
  // A host plan with device tensors.
  const Tensor kv_d = in.kv.to(device);
  EXPECT_THROW(compressor_pool(i64_tensor(b.words, "plan"), 4, kv_d, score_d, state_d, in.layout, norm_d, freqs_d, {},
                               entries_d),
               ContractError);
  // A strided entries tensor for the store.
  Tensor wide_entries = Tensor::empty({b.B, 32}, DType::f32, device, "wide_entries");
  Tensor keys_d = Tensor::empty({128, 16}, DType::f32, device, "keys");
  EXPECT_THROW(compressor_store(plan_d, 4, wide_entries.narrow(1, 0, 16), keys_d), ContractError);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  EXPECT_TRUE(device.check_guards().empty());
}

TEST(GpuCompressorContract, BadWordsStayInBounds) {
  DSV4_REQUIRE_GPU();
  Allocator device(*cuda_memory(0), AllocatorMode::testing);
  const Built b = build(4, {{0, 9}}, kStateRows, 128);
  const Inputs in = make_inputs(4, b.T, 16, 8, kStateRows, 0, 6);
  const int64_t T = b.T, B = b.B, S = b.plan.sources_per_block();
  std::vector<int64_t> bad = b.words;
  ASSERT_EQ(B, 2);
  const int64_t src = 3 + 2 * T + 3 * B;  // (kind, index) of source i at src + 2i
  bad[static_cast<size_t>(3 + T)] = kStateRows + 5;       // a write row past the state
  bad[static_cast<size_t>(3 + T + 1)] = -9;               // a negative write row
  bad[static_cast<size_t>(src + 2 * 4 + 1)] = 1000;       // block 0 slot 4: an input row past kv
  bad[static_cast<size_t>(src + 2 * (S + 1) + 1)] = -100;  // block 1 slot 1: a negative input row
  bad[static_cast<size_t>(src + 2 * (S + 2))] = 1;        // block 1 slot 2: a state row past the state
  bad[static_cast<size_t>(src + 2 * (S + 2) + 1)] = kStateRows;
  bad[static_cast<size_t>(src + 2 * (S + 3))] = 9;        // block 1 slot 3: an unknown kind
  bad[static_cast<size_t>(src + 2 * B * S)] = 1 << 30;    // a destination past the cache
  const Tensor plan_d = i64_tensor(bad, "plan").to(device);
  const Tensor kv_d = in.kv.to(device), score_d = in.score.to(device), norm_d = in.norm.to(device),
               freqs_d = in.freqs.to(device);
  Tensor state_d = in.state.to(device);
  Tensor entries_d = Tensor::empty({B, 16}, DType::f32, device, "entries");
  Tensor keys_h = Tensor::empty({128, 16}, DType::f32, "keys");
  keys_h.fill(0.0);
  Tensor keys_d = keys_h.to(device);
  const Model1Layout m1 = model1_layout("test", 16, 8, 8);
  Tensor cache_d = Tensor::empty({kPages, m1.page_bytes(kPageSize)}, DType::u8, device, "cache");
  compressor_pool(plan_d, 4, kv_d, score_d, state_d, in.layout, norm_d, freqs_d, {}, entries_d);
  compressor_write_state(plan_d, 4, kv_d, score_d, state_d, in.layout);
  compressor_store(plan_d, 4, entries_d, keys_d);
  compressor_store(plan_d, 4, entries_d, cache_d, m1, kPageSize);
  // A header that does not fit the buffer: nothing is written at all.
  std::vector<int64_t> huge = b.words;
  huge[1] = 1000000;
  const Tensor huge_d = i64_tensor(huge, "plan").to(device);
  Tensor untouched = Tensor::empty({B, 16}, DType::f32, device, "untouched");
  compressor_pool(huge_d, 4, kv_d, score_d, state_d, in.layout, norm_d, freqs_d, {}, untouched);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  for (const double v : untouched.values()) ASSERT_TRUE(std::isnan(v));
  // The rows whose write row was bad kept their old bytes; the good ones equal the host's writes.
  std::vector<int64_t> fixed_rows = b.plan.write_rows;
  fixed_rows[0] = -1;
  fixed_rows[1] = -1;
  Tensor state_h = in.state.clone("state_h");
  compressor_write_state_host(in.kv, in.score, i64_tensor(fixed_rows, "rows"), state_h, in.layout);
  expect_same_bytes(bytes_of(state_d), bytes_of(state_h), "state after bad write rows");
  // Block 0's destination was bad: only block 1's row of the key cache changed.
  const std::vector<double> keys = keys_d.values(), entries = entries_d.values();
  const int64_t loc1 = b.dest[1];
  for (int64_t r = 0; r < 128; ++r) {
    for (int64_t j = 0; j < 16; ++j) {
      const double want = r == loc1 ? entries[static_cast<size_t>(16 + j)] : 0.0;
      ASSERT_EQ(keys[static_cast<size_t>(r * 16 + j)], want) << "key row " << r;
    }
  }
  EXPECT_TRUE(device.check_guards().empty());
}

// ---- a chunked run through the GPU entry points equals the reference ----------------------------

struct RefCase {
  const char* name;
  int64_t layer;
  bool indexer;
};

class GpuCompressorReference : public ::testing::TestWithParam<RefCase> {};

TEST_P(GpuCompressorReference, ChunkedRunEqualsReference) {
  DSV4_REQUIRE_GPU();
  using ref::Mat;
  const RefCase& k = GetParam();
  static const ref::testing::Model m("tiny", 7);
  const ModelConfig& c = m.config;
  const int64_t ratio = c.ratio(k.layer);
  const int64_t hd = k.indexer ? c.index_head_dim : c.head_dim;
  const std::string prefix =
      "layers." + std::to_string(k.layer) + ".attn." + (k.indexer ? "indexer." : "") + "compressor";
  const ref::RopeTable rope = ref::make_rope_table(c, ratio);
  const ref::Numerics numerics{ref::Mode::quant_sim};
  Allocator device(*cuda_memory(0), AllocatorMode::testing);

  const RuntimeOptions options;
  const serving::CompressStatePool pool(c, options, k.layer,
                                        k.indexer ? serving::CompressStateOwner::indexer : serving::CompressStateOwner::attention,
                                        /*swa_page_count=*/8);
  const CompressStateLayout layout = pool.row_layout().kernel_layout();
  Tensor state_h = Tensor::empty({pool.row_count(), layout.row_bytes}, DType::u8, "state");
  std::memset(state_h.data<uint8_t>(), 0xFF, static_cast<size_t>(pool.buffer_bytes()));
  serving::fill_clean_state_row(pool.row_layout(),
                                std::span<uint8_t>(state_h.data<uint8_t>() + pool.clean_row() * layout.row_bytes,
                                                   static_cast<size_t>(layout.row_bytes)));
  Tensor state_d = state_h.to(device);

  Tensor norm = Tensor::empty({hd}, DType::f32, "norm");
  const Mat& nw = m.weights.get(prefix + ".norm.weight");
  std::memcpy(norm.data<float>(), nw.data.data(), static_cast<size_t>(hd) * 4);
  Tensor freqs = Tensor::empty({static_cast<int64_t>(rope.freqs.size())}, DType::f32, "freqs");
  std::memcpy(freqs.data<float>(), rope.freqs.data(), rope.freqs.size() * 4);
  const Tensor norm_d = norm.to(device), freqs_d = freqs.to(device);
  CompressPostprocess post;
  post.bf16_act = true;
  post.rotate = k.indexer;
  post.norm_eps = c.norm_eps;
  post.quant = !k.indexer ? CompressQuant::fp8_nope
                          : (c.indexer_quant == "fp8" ? CompressQuant::fp8_vector : CompressQuant::fp4);
  post.quant_block = k.indexer ? c.fp4_block_size : c.kv_block_size;

  struct Stream {
    Mat x;
    std::vector<int64_t> swa_pages;
    std::vector<int64_t> schedule;
    ref::Compressor comp;
    int64_t pos = 0;
    size_t step = 0;
    Mat expected{};
    Mat got{};
  };
  auto make_comp = [&] { return ref::Compressor(c, m.weights, prefix, ratio, hd, k.indexer, rope); };
  std::vector<Stream> reqs;
  reqs.push_back({ref::testing::make_input(300, c.dim, 11, ref::Mode::quant_sim), {5, 2}, {1, 3, 5, 127, 129}, make_comp()});
  reqs.push_back({ref::testing::make_input(280, c.dim, 12, ref::Mode::quant_sim), {3, 6}, {3, 130, 2, 64, 7}, make_comp()});
  auto append = [](Mat& dst, const float* src, int64_t rows, int64_t cols) {
    if (dst.cols == 0) dst.cols = cols;
    dst.data.insert(dst.data.end(), src, src + rows * cols);
    dst.rows += rows;
  };

  const int64_t sps = options.swa_page_size;
  ref::Trace trace;
  const ref::Context ctx{c, numerics, &trace, nullptr};
  int64_t batches = 0;
  while (true) {
    Mat kv_in(0, 0), score_in(0, 0);
    std::vector<std::vector<int64_t>> rows_storage;
    std::vector<CompressRequestBatch> batch;
    std::vector<Stream*> active;
    for (Stream& r : reqs) {
      if (r.pos >= r.x.rows) continue;
      const int64_t n = std::min(r.step < r.schedule.size() ? r.schedule[r.step] : int64_t{1}, r.x.rows - r.pos);
      ++r.step;
      const ref::Compressor::Output out = r.comp.forward(ctx, ref::rows_of(r.x, r.pos, n), r.pos);
      append(r.expected, out.entries.data.data(), out.entries.rows, hd);
      const Mat& kv = trace.values.at(prefix + ".kv");
      const Mat& sc = trace.values.at(prefix + ".score");
      append(kv_in, kv.data.data(), kv.rows, kv.cols);
      append(score_in, sc.data.data(), sc.rows, sc.cols);
      std::vector<int64_t> rows;
      for (int64_t p = compress_history_start(r.pos, ratio); p < r.pos + n; ++p) {
        rows.push_back(pool.translate_swa_loc_to_state_row(r.swa_pages[static_cast<size_t>(p / sps)] * sps + p % sps));
      }
      rows_storage.push_back(std::move(rows));
      batch.push_back({r.pos, n, {}});
      active.push_back(&r);
      r.pos += n;
    }
    if (batch.empty()) break;
    for (size_t i = 0; i < batch.size(); ++i) batch[i].state_rows = rows_storage[i];
    ++batches;
    const CompressPlan plan = build_compress_plan(batch, ratio, pool.row_count());
    const int64_t B = static_cast<int64_t>(plan.blocks.size());
    const std::vector<int64_t> dest(static_cast<size_t>(B), 0);
    const Tensor plan_d = i64_tensor(encode_compress_plan(plan, dest), "plan").to(device);
    Tensor kv_h = Tensor::empty({kv_in.rows, kv_in.cols}, DType::f32, "kv");
    Tensor score_h = Tensor::empty({score_in.rows, score_in.cols}, DType::f32, "score");
    std::memcpy(kv_h.data<float>(), kv_in.data.data(), kv_in.data.size() * 4);
    std::memcpy(score_h.data<float>(), score_in.data.data(), score_in.data.size() * 4);
    const Tensor kv_d = kv_h.to(device), score_d = score_h.to(device);
    Tensor entries_d = Tensor::empty({B + 1, hd}, DType::f32, device, "entries");
    compressor_pool(plan_d, ratio, kv_d, score_d, state_d, layout, norm_d, freqs_d, post, entries_d);
    compressor_write_state(plan_d, ratio, kv_d, score_d, state_d, layout);
    const Tensor entries = entries_d.to(host_allocator());
    for (int64_t b = 0; b < B; ++b) {
      Stream& r = *active[static_cast<size_t>(plan.blocks[static_cast<size_t>(b)].request)];
      append(r.got, entries.data<float>() + b * hd, 1, hd);
    }
  }
  EXPECT_GT(batches, 30);
  for (size_t i = 0; i < reqs.size(); ++i) {
    const Stream& r = reqs[i];
    ASSERT_EQ(r.got.rows, r.expected.rows) << "request " << i;
    for (int64_t e = 0; e < r.expected.size(); ++e) {
      const float g = r.got.data[static_cast<size_t>(e)], w = r.expected.data[static_cast<size_t>(e)];
      ASSERT_EQ(std::memcmp(&g, &w, 4), 0) << "request " << i << " entry " << e / hd << " dim " << e % hd << " got " << g
                                           << " want " << w;
    }
  }
  EXPECT_TRUE(device.check_guards().empty());
}

INSTANTIATE_TEST_SUITE_P(Tiny, GpuCompressorReference,
                         ::testing::Values(RefCase{"L1_attention_c4", 1, false}, RefCase{"L1_indexer_c4", 1, true},
                                           RefCase{"L2_attention_c128", 2, false}),
                         [](const ::testing::TestParamInfo<RefCase>& info) { return std::string(info.param.name); });

}  // namespace
}  // namespace dsv4::kernels
