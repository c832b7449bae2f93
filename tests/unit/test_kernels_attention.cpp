// The attention path's host kernels: fused norm + RoPE against the reference's rms_norm + apply_rope
// bit for bit; bug class A1 (a strided qkv_a[..., q_lora:] slice is a ContractError naming `kv` for
// the contiguous-only kernel, while the stride-aware store variant reads it correctly); the MODEL1
// cache bytes against serving's pack_kv_entry; sparse attention against reference attention_head
// (quant-sim numerics) and its length / index contracts. The same at the micro preset's scale block
// of 16 (head_dim 64, rope 16, nope 48), where the cache values are checked against the reference's
// fp8_quant_dequant in blocks of 16, and the scale-block contracts (`scale_block`, `kv_block`).
// store_kv_model1 (prefill CP's store of rows already normed and rotated): model1_pack per row, the
// fused store's bytes when given the rows fused_norm_rope_inplace leaves, -1 skipped, a repeated
// location keeping the later row, and its contracts.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <random>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include <gtest/gtest.h>

#include "engine/config/model_config.h"
#include "engine/core/error.h"
#include "engine/core/formats.h"
#include "engine/serving/kv_cache_layout.h"
#include "kernels/norm_rope.h"
#include "kernels/sparse_attention.h"
#include "reference/attention.h"
#include "reference/context.h"
#include "reference/norm.h"
#include "reference/quant.h"
#include "reference/rope.h"

namespace dsv4::kernels {
namespace {

constexpr int64_t kQLora = 1536;  // Pro's q_lora_rank: qkv_a rows are 2048 wide (bug-classes A1)
constexpr uint8_t kPoison = 0xA5;

struct Fixture {
  explicit Fixture(const char* preset = "flash") : config(load_model_config(preset)) {}
  Fixture(const Fixture&) = delete;  // ctx refers to config
  Fixture& operator=(const Fixture&) = delete;
  ModelConfig config;
  ref::Context ctx{config, ref::Numerics{ref::Mode::quant_sim}};
  ref::RopeTable rope = ref::make_rope_table(config, 4);  // YaRN table: non-trivial frequencies
  int64_t dim() const { return config.head_dim; }
  int64_t nope() const { return config.nope_head_dim(); }
  int64_t block() const { return config.kv_block_size; }
};

// micro: head_dim 64, rope 16, nope 48, kv_block_size 16 (three scales per entry).
void expect_micro_geometry(const Fixture& f) {
  ASSERT_EQ(f.dim(), 64);
  ASSERT_EQ(f.config.rope_head_dim, 16);
  ASSERT_EQ(f.block(), 16);
}

float rand_bf16(std::mt19937_64& rng, float lo, float hi) {
  return round_bf16(std::uniform_real_distribution<float>(lo, hi)(rng));
}

Tensor bf16_tensor(const Shape& shape, const std::vector<float>& values, const std::string& name) {
  Tensor t = Tensor::empty(shape, DType::bf16, name);
  auto* p = t.data<uint16_t>();
  for (size_t i = 0; i < values.size(); ++i) p[i] = f32_to_bf16(values[i]);
  return t;
}

Tensor f32_tensor(const std::vector<float>& values, const std::string& name) {
  Tensor t = Tensor::empty({static_cast<int64_t>(values.size())}, DType::f32, name);
  std::copy(values.begin(), values.end(), t.data<float>());
  return t;
}

template <class T>
Tensor int_tensor(const Shape& shape, DType dtype, const std::vector<T>& values, const std::string& name) {
  Tensor t = Tensor::empty(shape, dtype, name);
  std::copy(values.begin(), values.end(), t.data<T>());
  return t;
}

// Row t of a bf16 [T, D] view (any row stride) as floats.
std::vector<float> row_values(const Tensor& t, int64_t row) {
  const auto* p = t.data<const uint16_t>() + row * t.stride(0);
  std::vector<float> out(static_cast<size_t>(t.size(1)));
  for (size_t i = 0; i < out.size(); ++i) out[i] = bf16_to_f32(p[i]);
  return out;
}

// Per-row inputs with a magnitude per `block` dims, so the FP8 blocks get different scales.
std::vector<float> random_rows(std::mt19937_64& rng, int64_t rows, int64_t dim, int64_t block = 64) {
  std::vector<float> v(static_cast<size_t>(rows * dim));
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t b = 0; b < dim / block; ++b) {
      const float mag = std::ldexp(1.0f, static_cast<int>(rng() % 9) - 4);
      for (int64_t i = 0; i < block; ++i) v[static_cast<size_t>(r * dim + b * block + i)] = rand_bf16(rng, -mag, mag);
    }
  }
  return v;
}

// The reference's cached view of one KV row (reference/attention.cpp key_value): the nope dims FP8
// quant-dequant in blocks of `block`, the rope dims bf16.
std::vector<float> reference_cached(std::vector<float> kv, int64_t nope, int64_t block) {
  ref::fp8_quant_dequant(kv.data(), nope, block);
  for (size_t i = static_cast<size_t>(nope); i < kv.size(); ++i) kv[i] = round_bf16(kv[i]);
  return kv;
}

// Bitwise float comparison (NaN-safe, -0 vs +0 distinguished); the index of the first difference or -1.
int64_t first_bit_difference(const float* got, const std::vector<float>& want) {
  for (size_t i = 0; i < want.size(); ++i) {
    if (f32_bits(got[i]) != f32_bits(want[i])) return static_cast<int64_t>(i);
  }
  return -1;
}

// The reference KV path on one bf16 row: rms_norm with weight, RoPE, bf16 (no FP8 step).
std::vector<float> reference_norm_rope(const Fixture& f, const std::vector<float>& x, const std::vector<float>& weight,
                                       int32_t pos) {
  ref::Mat in(1, f.dim());
  ref::Mat w(1, f.dim());
  std::copy(x.begin(), x.end(), in.data.begin());
  std::copy(weight.begin(), weight.end(), w.data.begin());
  ref::Mat y = ref::rms_norm(f.ctx, in, w);
  float* rope_part = y.row(0) + f.nope();
  ref::apply_rope(rope_part, pos, f.rope, /*inverse=*/false);
  for (int64_t i = 0; i < f.config.rope_head_dim; ++i) rope_part[i] = f.ctx.act(rope_part[i]);
  return y.data;
}

struct NormInputs {
  std::vector<float> weight;
  Tensor weight_t, freqs_t, positions_t;
  std::vector<int32_t> positions;
};

NormInputs norm_inputs(const Fixture& f, std::mt19937_64& rng, int64_t rows) {
  NormInputs in;
  for (int64_t i = 0; i < f.dim(); ++i) in.weight.push_back(std::uniform_real_distribution<float>(0.25f, 2.0f)(rng));
  for (int64_t t = 0; t < rows; ++t) in.positions.push_back(static_cast<int32_t>(rng() % 200000));
  in.weight_t = f32_tensor(in.weight, "kv_norm.weight");
  in.freqs_t = f32_tensor(f.rope.freqs, "freqs");
  in.positions_t = int_tensor<int32_t>({rows}, DType::i32, in.positions, "positions");
  return in;
}

void expect_row_bits(const std::vector<float>& got, const std::vector<float>& want, const std::string& what) {
  ASSERT_EQ(got.size(), want.size()) << what;
  int64_t mismatches = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    if (f32_to_bf16(got[i]) != f32_to_bf16(want[i])) ++mismatches;
  }
  EXPECT_EQ(mismatches, 0) << what;
}

// ---- fused_norm_rope_inplace -------------------------------------------------------------------

TEST(NormRopeInplace, MatchesReferenceBitForBit) {
  const Fixture f;
  std::mt19937_64 rng(11);
  const int64_t rows = 7;
  const std::vector<float> x = random_rows(rng, rows, f.dim());
  NormInputs in = norm_inputs(f, rng, rows);
  Tensor kv = bf16_tensor({rows, f.dim()}, x, "kv");
  fused_norm_rope_inplace(kv, in.weight_t, f.config.norm_eps, in.freqs_t, in.positions_t);
  for (int64_t t = 0; t < rows; ++t) {
    const std::vector<float> row(x.begin() + t * f.dim(), x.begin() + (t + 1) * f.dim());
    expect_row_bits(row_values(kv, t), reference_norm_rope(f, row, in.weight, in.positions[static_cast<size_t>(t)]),
                    "row " + std::to_string(t));
  }
}

// A [T, 512] view of a qkv_a buffer [T, q_lora + 512] filled with `x` in the kv part and poison bits
// in the q part.
struct QkvA {
  Tensor buffer;
  Tensor kv;
};

QkvA qkv_a_slice(const Fixture& f, int64_t rows, const std::vector<float>& x) {
  QkvA s;
  const int64_t width = kQLora + f.dim();
  std::vector<float> all(static_cast<size_t>(rows * width), 7.0f);
  for (int64_t t = 0; t < rows; ++t) {
    std::copy(x.begin() + t * f.dim(), x.begin() + (t + 1) * f.dim(), all.begin() + t * width + kQLora);
  }
  s.buffer = bf16_tensor({rows, width}, all, "qkv_a");
  s.kv = s.buffer.narrow(1, kQLora, f.dim());
  return s;
}

TEST(NormRopeInplace, StridedQkvSliceIsContractErrorNamingKv) {
  const Fixture f;
  std::mt19937_64 rng(12);
  const int64_t rows = 3;
  const std::vector<float> x = random_rows(rng, rows, f.dim());
  NormInputs in = norm_inputs(f, rng, rows);
  QkvA s = qkv_a_slice(f, rows, x);
  ASSERT_FALSE(s.kv.is_contiguous());
  const std::vector<double> before = s.buffer.values();
  try {
    fused_norm_rope_inplace(s.kv, in.weight_t, f.config.norm_eps, in.freqs_t, in.positions_t);
    FAIL() << "a strided slice reached the contiguous-only kernel";
  } catch (const ContractError& e) {
    EXPECT_EQ(e.op(), kNormRopeOp);
    EXPECT_EQ(e.argument(), "kv");
    EXPECT_NE(e.rule().find("contiguous"), std::string::npos) << e.what();
  }
  EXPECT_EQ(s.buffer.values(), before) << "rejected before touching memory";
}

TEST(NormRopeInplace, SingleRowSlicePassesAndTouchesOnlyKv) {
  const Fixture f;
  std::mt19937_64 rng(13);
  const std::vector<float> x = random_rows(rng, 1, f.dim());
  NormInputs in = norm_inputs(f, rng, 1);
  QkvA s = qkv_a_slice(f, 1, x);
  ASSERT_TRUE(s.kv.is_contiguous()) << "PyTorch's rule: a size-1 dim ignores its stride";
  fused_norm_rope_inplace(s.kv, in.weight_t, f.config.norm_eps, in.freqs_t, in.positions_t);
  expect_row_bits(row_values(s.kv, 0), reference_norm_rope(f, x, in.weight, in.positions[0]), "T = 1 slice");
  const auto* q_part = s.buffer.data<const uint16_t>();
  for (int64_t i = 0; i < kQLora; ++i) ASSERT_EQ(q_part[i], f32_to_bf16(7.0f)) << "q part dim " << i;
}

TEST(NormRopeInplace, ContiguousCopyOfSliceEqualsDense) {
  const Fixture f;
  std::mt19937_64 rng(14);
  const int64_t rows = 4;
  const std::vector<float> x = random_rows(rng, rows, f.dim());
  NormInputs in = norm_inputs(f, rng, rows);
  QkvA s = qkv_a_slice(f, rows, x);
  Tensor copy = s.kv.contiguous();  // the fix of PR 25396
  Tensor dense = bf16_tensor({rows, f.dim()}, x, "dense");
  fused_norm_rope_inplace(copy, in.weight_t, f.config.norm_eps, in.freqs_t, in.positions_t);
  fused_norm_rope_inplace(dense, in.weight_t, f.config.norm_eps, in.freqs_t, in.positions_t);
  EXPECT_EQ(copy.values(), dense.values());
}

TEST(NormRopeInplace, ContractRejectsBadArguments) {
  const Fixture f;
  std::mt19937_64 rng(15);
  NormInputs in = norm_inputs(f, rng, 2);
  Tensor kv = bf16_tensor({2, f.dim()}, random_rows(rng, 2, f.dim()), "kv");
  Tensor short_positions = int_tensor<int32_t>({1}, DType::i32, std::vector<int32_t>{0}, "positions");
  try {
    fused_norm_rope_inplace(kv, in.weight_t, 1e-6, in.freqs_t, short_positions);
    FAIL();
  } catch (const ContractError& e) {
    EXPECT_EQ(e.argument(), "positions");
  }
  Tensor negative = int_tensor<int32_t>({2}, DType::i32, std::vector<int32_t>{0, -3}, "positions");
  try {
    fused_norm_rope_inplace(kv, in.weight_t, 1e-6, in.freqs_t, negative);
    FAIL();
  } catch (const ContractError& e) {
    EXPECT_EQ(e.argument(), "positions");
  }
  Tensor f32_kv = Tensor::empty({2, f.dim()}, DType::f32, "kv");
  try {
    fused_norm_rope_inplace(f32_kv, in.weight_t, 1e-6, in.freqs_t, in.positions_t);
    FAIL();
  } catch (const ContractError& e) {
    EXPECT_EQ(e.argument(), "kv");
  }
}

// ---- fused_norm_rope_store_kv and the MODEL1 entry ----------------------------------------------

struct SwaCache {
  serving::KvPageLayout layout;
  Tensor bytes;
};

SwaCache make_cache(const Fixture& f, int64_t pages, int64_t page_size, const std::string& name) {
  SwaCache c;
  c.layout = serving::kv_page_layout(f.config, page_size);
  c.bytes = Tensor::empty({pages, c.layout.page_bytes}, DType::u8, name);
  std::memset(c.bytes.data_ptr(), kPoison, static_cast<size_t>(pages * c.layout.page_bytes));
  return c;
}

std::span<uint8_t> page_span(SwaCache& c, int64_t page) {
  return {c.bytes.data<uint8_t>() + page * c.layout.page_bytes, static_cast<size_t>(c.layout.page_bytes)};
}

void serving_pack(SwaCache& c, const float* kv, int64_t loc) {
  const int64_t ps = c.layout.page_tokens;
  auto spans = serving::split_kv_page(c.layout, page_span(c, loc / ps));
  serving::pack_kv_entry(c.layout.entry, kv, spans.values, spans.scales, loc % ps);
}

std::vector<float> serving_unpack(SwaCache& c, int64_t loc) {
  const int64_t ps = c.layout.page_tokens;
  std::vector<float> kv(static_cast<size_t>(c.layout.entry.head_dim()));
  auto page = page_span(c, loc / ps);
  auto spans = serving::view_kv_page(c.layout, std::span<const uint8_t>(page.data(), page.size()));
  serving::unpack_kv_entry(c.layout.entry, spans.values, spans.scales, loc % ps, kv.data());
  return kv;
}

bool same_bytes(const Tensor& a, const Tensor& b) {
  return a.numel() == b.numel() && std::memcmp(a.data_ptr(), b.data_ptr(), static_cast<size_t>(a.numel())) == 0;
}

TEST(Model1Layout, MatchesServingGeometryOnFlash) {
  const Fixture f;
  const Model1Layout l = model1_layout(kNormRopeStoreOp, f.dim(), f.config.rope_head_dim);
  const serving::KvPageLayout s = serving::kv_page_layout(f.config, 256);
  EXPECT_EQ(l.value_bytes(), 576);
  EXPECT_EQ(l.value_bytes() + l.scale_bytes(), 584);
  EXPECT_EQ(l.value_bytes(), s.entry.value_bytes);
  EXPECT_EQ(l.scale_bytes(), s.entry.scale_bytes);
  EXPECT_EQ(l.page_bytes(256), s.page_bytes);
  EXPECT_EQ(l.page_bytes(256), 149760);
  for (int64_t ps : {1, 2, 3, 7, 64}) EXPECT_EQ(l.page_bytes(ps), serving::kv_page_layout(f.config, ps).page_bytes) << ps;
}

TEST(Model1Layout, UnpackEqualsServingUnpackBitForBit) {
  const Fixture f;
  std::mt19937_64 rng(21);
  const int64_t pages = 3, page_size = 5;
  SwaCache c = make_cache(f, pages, page_size, "cache");
  const std::vector<float> rows = random_rows(rng, pages * page_size, f.dim());
  for (int64_t loc = 0; loc < pages * page_size; ++loc) serving_pack(c, rows.data() + loc * f.dim(), loc);
  const Model1Layout l = model1_layout(kSparseAttentionOp, f.dim(), f.config.rope_head_dim);
  std::vector<float> mine(static_cast<size_t>(f.dim()));
  for (int64_t loc = 0; loc < pages * page_size; ++loc) {
    model1_unpack(l, page_size, c.bytes.data<uint8_t>(), loc, mine.data());
    const std::vector<float> want = serving_unpack(c, loc);
    ASSERT_EQ(std::memcmp(mine.data(), want.data(), mine.size() * sizeof(float)), 0) << "loc " << loc;
  }
}

TEST(NormRopeStore, StridedSliceWritesServingBytes) {
  const Fixture f;
  std::mt19937_64 rng(22);
  const int64_t rows = 6, pages = 3, page_size = 4;
  const std::vector<float> x = random_rows(rng, rows, f.dim());
  NormInputs in = norm_inputs(f, rng, rows);
  QkvA s = qkv_a_slice(f, rows, x);
  ASSERT_FALSE(s.kv.is_contiguous());
  // Distinct locations across page boundaries; rows 1 and 4 are padding (-1).
  const std::vector<int64_t> locs = {9, -1, 0, 4, -1, 11};
  Tensor locs_t = int_tensor<int64_t>({rows}, DType::i64, locs, "swa_locs");
  SwaCache got = make_cache(f, pages, page_size, "cache");
  SwaCache want = make_cache(f, pages, page_size, "expected");
  const std::vector<double> kv_before = s.buffer.values();
  fused_norm_rope_store_kv(s.kv, in.weight_t, f.config.norm_eps, in.freqs_t, in.positions_t, locs_t, got.bytes,
                           page_size);
  for (int64_t t = 0; t < rows; ++t) {
    if (locs[static_cast<size_t>(t)] < 0) continue;
    const std::vector<float> row(x.begin() + t * f.dim(), x.begin() + (t + 1) * f.dim());
    const std::vector<float> normed = reference_norm_rope(f, row, in.weight, in.positions[static_cast<size_t>(t)]);
    serving_pack(want, normed.data(), locs[static_cast<size_t>(t)]);
  }
  EXPECT_TRUE(same_bytes(got.bytes, want.bytes)) << "cache bytes differ from serving's pack_kv_entry";
  EXPECT_EQ(s.buffer.values(), kv_before) << "the store variant reads kv only";
}

TEST(NormRopeStore, SliceAndDenseWriteTheSameBytes) {
  const Fixture f;
  std::mt19937_64 rng(23);
  const int64_t rows = 5, pages = 2, page_size = 8;
  const std::vector<float> x = random_rows(rng, rows, f.dim());
  NormInputs in = norm_inputs(f, rng, rows);
  QkvA s = qkv_a_slice(f, rows, x);
  Tensor dense = bf16_tensor({rows, f.dim()}, x, "kv");
  Tensor locs_t = int_tensor<int64_t>({rows}, DType::i64, std::vector<int64_t>{3, 8, 15, 7, 0}, "swa_locs");
  SwaCache a = make_cache(f, pages, page_size, "a");
  SwaCache b = make_cache(f, pages, page_size, "b");
  fused_norm_rope_store_kv(s.kv, in.weight_t, f.config.norm_eps, in.freqs_t, in.positions_t, locs_t, a.bytes, page_size);
  fused_norm_rope_store_kv(dense, in.weight_t, f.config.norm_eps, in.freqs_t, in.positions_t, locs_t, b.bytes, page_size);
  EXPECT_TRUE(same_bytes(a.bytes, b.bytes));
}

TEST(NormRopeStore, AllPaddingWritesNothing) {
  const Fixture f;
  std::mt19937_64 rng(24);
  const int64_t rows = 3;
  NormInputs in = norm_inputs(f, rng, rows);
  Tensor kv = bf16_tensor({rows, f.dim()}, random_rows(rng, rows, f.dim()), "kv");
  Tensor locs_t = int_tensor<int64_t>({rows}, DType::i64, std::vector<int64_t>{-1, -1, -1}, "swa_locs");
  SwaCache c = make_cache(f, 1, 4, "cache");
  SwaCache untouched = make_cache(f, 1, 4, "poison");
  fused_norm_rope_store_kv(kv, in.weight_t, f.config.norm_eps, in.freqs_t, in.positions_t, locs_t, c.bytes, 4);
  EXPECT_TRUE(same_bytes(c.bytes, untouched.bytes));
}

TEST(NormRopeStore, ContractRejectsLocationsAndGeometry) {
  const Fixture f;
  std::mt19937_64 rng(25);
  const int64_t rows = 2;
  NormInputs in = norm_inputs(f, rng, rows);
  Tensor kv = bf16_tensor({rows, f.dim()}, random_rows(rng, rows, f.dim()), "kv");
  SwaCache c = make_cache(f, 2, 4, "cache");
  auto argument_of = [&](const std::vector<int64_t>& locs, int64_t page_size) -> std::string {
    Tensor locs_t = int_tensor<int64_t>({rows}, DType::i64, locs, "swa_locs");
    try {
      fused_norm_rope_store_kv(kv, in.weight_t, f.config.norm_eps, in.freqs_t, in.positions_t, locs_t, c.bytes,
                               page_size);
    } catch (const ContractError& e) {
      return e.argument();
    }
    return "";
  };
  EXPECT_EQ(argument_of({0, 8}, 4), "swa_locs") << "one past the last entry";
  EXPECT_EQ(argument_of({-2, 0}, 4), "swa_locs");
  EXPECT_EQ(argument_of({0, 1}, 5), "cache") << "page bytes of another page size";
  EXPECT_EQ(argument_of({0, 1}, 0), "page_size");
  EXPECT_EQ(argument_of({0, 7}, 4), "");
}

// ---- the MODEL1 entry at the micro preset's scale block of 16 -------------------------------------

TEST(Model1Layout, ScaleBlock16GeometryMatchesServing) {
  const Fixture f("micro");
  expect_micro_geometry(f);
  const Model1Layout l = model1_layout(kNormRopeStoreOp, f.dim(), f.config.rope_head_dim, f.block());
  EXPECT_EQ(l.scale_block, 16);
  EXPECT_EQ(l.scale_count(), 3);
  EXPECT_EQ(l.value_bytes(), 48 + 2 * 16);
  EXPECT_EQ(l.scale_bytes(), 8) << "three scales, padded to 8 bytes";
  const serving::KvEntryLayout e = serving::kv_entry_layout(f.config);
  EXPECT_EQ(l.scale_count(), e.scale_count);
  EXPECT_EQ(l.value_bytes(), e.value_bytes);
  EXPECT_EQ(l.scale_bytes(), e.scale_bytes);
  for (int64_t ps : {1, 2, 3, 7, 64, 256}) {
    EXPECT_EQ(l.page_bytes(ps), serving::kv_page_layout(f.config, ps).page_bytes) << ps;
  }
  // Flash's geometry at a block of 16: 28 scales, padded to 32 bytes.
  ModelConfig flash16 = load_model_config("flash");
  flash16.kv_block_size = 16;
  const Model1Layout l16 = model1_layout(kNormRopeStoreOp, flash16.head_dim, flash16.rope_head_dim, 16);
  EXPECT_EQ(l16.scale_count(), 28);
  EXPECT_EQ(l16.scale_bytes(), 32);
  EXPECT_EQ(l16.scale_bytes(), serving::kv_entry_layout(flash16).scale_bytes);
  for (int64_t ps : {1, 2, 64, 256}) {
    EXPECT_EQ(l16.page_bytes(ps), serving::kv_page_layout(flash16, ps).page_bytes) << ps;
  }
}

TEST(Model1Layout, PackUnpackAtScaleBlock16EqualsReferenceQuantDequant) {
  const Fixture f("micro");
  expect_micro_geometry(f);
  std::mt19937_64 rng(26);
  const int64_t pages = 3, page_size = 5, entries = pages * page_size;
  std::vector<float> rows = random_rows(rng, entries, f.dim(), f.block());
  // Edge blocks: a zero block (amax clamped to 1e-4); 448 beside -1e30 in one block (clamped codes);
  // in entry 2, blocks 2^12 apart, which one scale over the 48 nope dims would flush towards 0.
  std::fill(rows.begin() + 16, rows.begin() + 32, 0.0f);
  rows[static_cast<size_t>(f.dim() + 2)] = 448.0f;
  rows[static_cast<size_t>(f.dim() + 3)] = -1e30f;
  for (int64_t i = 0; i < 16; ++i) {
    rows[static_cast<size_t>(2 * f.dim() + i)] = rand_bf16(rng, -1024.0f, 1024.0f);
    rows[static_cast<size_t>(2 * f.dim() + 16 + i)] = rand_bf16(rng, -0.25f, 0.25f);
  }
  SwaCache c = make_cache(f, pages, page_size, "cache");
  const Model1Layout l = model1_layout(kNormRopeStoreOp, f.dim(), f.config.rope_head_dim, f.block());
  for (int64_t loc = 0; loc < entries; ++loc) model1_pack(l, page_size, rows.data() + loc * f.dim(), c.bytes.data<uint8_t>(), loc);
  std::vector<float> mine(static_cast<size_t>(f.dim()));
  int64_t entries_with_distinct_scales = 0;
  for (int64_t loc = 0; loc < entries; ++loc) {
    const std::vector<float> row(rows.begin() + loc * f.dim(), rows.begin() + (loc + 1) * f.dim());
    model1_unpack(l, page_size, c.bytes.data<uint8_t>(), loc, mine.data());
    ASSERT_EQ(first_bit_difference(mine.data(), reference_cached(row, f.nope(), 16)), -1) << "loc " << loc;
    // Three scale bytes, each the reference's ue8m0 scale of its 16 dims, then a pad of 0.
    const uint8_t* scales = c.bytes.data<uint8_t>() + (loc / page_size) * l.page_bytes(page_size) +
                            page_size * l.value_bytes() + (loc % page_size) * l.scale_bytes();
    for (int64_t b = 0; b < 3; ++b) {
      float amax = 0.0f;
      for (int64_t i = 0; i < 16; ++i) amax = std::max(amax, std::fabs(row[static_cast<size_t>(b * 16 + i)]));
      ASSERT_EQ(scales[b], f32_to_ue8m0_ceil(ref::fp8_block_scale(amax))) << "loc " << loc << " block " << b;
    }
    for (int64_t b = 3; b < 8; ++b) ASSERT_EQ(scales[b], 0) << "loc " << loc << " pad byte " << b;
    if (scales[0] != scales[1] || scales[1] != scales[2]) ++entries_with_distinct_scales;
  }
  EXPECT_GT(entries_with_distinct_scales, entries / 2);
  // One scale over all 48 nope dims would read entry 2 differently: the test sees the block size.
  model1_unpack(l, page_size, c.bytes.data<uint8_t>(), 2, mine.data());
  const std::vector<float> row2(rows.begin() + 2 * f.dim(), rows.begin() + 3 * f.dim());
  EXPECT_GE(first_bit_difference(mine.data(), reference_cached(row2, f.nope(), f.nope())), 0);
  // serving's unpack reads the same bytes (one codec).
  for (int64_t loc = 0; loc < entries; ++loc) {
    model1_unpack(l, page_size, c.bytes.data<uint8_t>(), loc, mine.data());
    ASSERT_EQ(first_bit_difference(mine.data(), serving_unpack(c, loc)), -1) << "loc " << loc;
  }
}

TEST(Model1Layout, ScaleBlockNotDividingNopeIsContractErrorNamingIt) {
  auto argument_of = [](int64_t head_dim, int64_t rope_dim, int64_t block) -> std::string {
    try {
      model1_layout(kNormRopeStoreOp, head_dim, rope_dim, block);
    } catch (const ContractError& e) {
      EXPECT_EQ(e.op(), kNormRopeStoreOp);
      EXPECT_NE(e.rule().find(std::to_string(block)), std::string::npos) << e.what();
      return e.argument();
    }
    return "";
  };
  EXPECT_EQ(argument_of(64, 16, 32), "scale_block") << "48 % 32";
  EXPECT_EQ(argument_of(64, 16, 64), "scale_block") << "micro at the released block of 64";
  EXPECT_EQ(argument_of(64, 16, 0), "scale_block");
  EXPECT_EQ(argument_of(64, 16, -16), "scale_block");
  EXPECT_EQ(argument_of(64, 16, 16), "");
  EXPECT_EQ(argument_of(64, 16, 48), "");
  EXPECT_EQ(argument_of(512, 64, 64), "");
  EXPECT_EQ(argument_of(512, 64, 16), "");
  try {
    model1_layout(kSparseAttentionOp, 64, 16, 32, "kv_block");
    FAIL() << "48 % 32 accepted";
  } catch (const ContractError& e) {
    EXPECT_EQ(e.argument(), "kv_block");
  }
}

TEST(NormRopeStore, ScaleBlock16MatchesReferenceQuantDequant) {
  const Fixture f("micro");
  expect_micro_geometry(f);
  std::mt19937_64 rng(27);
  const int64_t rows = 6, pages = 3, page_size = 4;
  const std::vector<float> x = random_rows(rng, rows, f.dim(), f.block());
  NormInputs in = norm_inputs(f, rng, rows);
  QkvA s = qkv_a_slice(f, rows, x);
  ASSERT_FALSE(s.kv.is_contiguous());
  const std::vector<int64_t> locs = {9, -1, 0, 4, -1, 11};
  Tensor locs_t = int_tensor<int64_t>({rows}, DType::i64, locs, "swa_locs");
  SwaCache got = make_cache(f, pages, page_size, "cache");
  SwaCache want = make_cache(f, pages, page_size, "expected");
  fused_norm_rope_store_kv(s.kv, in.weight_t, f.config.norm_eps, in.freqs_t, in.positions_t, locs_t, got.bytes,
                           page_size, f.block());
  const Model1Layout l = model1_layout(kNormRopeStoreOp, f.dim(), f.config.rope_head_dim, f.block());
  std::vector<float> mine(static_cast<size_t>(f.dim()));
  for (int64_t t = 0; t < rows; ++t) {
    const int64_t loc = locs[static_cast<size_t>(t)];
    if (loc < 0) continue;
    const std::vector<float> row(x.begin() + t * f.dim(), x.begin() + (t + 1) * f.dim());
    const std::vector<float> normed = reference_norm_rope(f, row, in.weight, in.positions[static_cast<size_t>(t)]);
    model1_unpack(l, page_size, got.bytes.data<uint8_t>(), loc, mine.data());
    EXPECT_EQ(first_bit_difference(mine.data(), reference_cached(normed, f.nope(), 16)), -1) << "row " << t;
    serving_pack(want, normed.data(), loc);
  }
  EXPECT_TRUE(same_bytes(got.bytes, want.bytes)) << "cache bytes differ from serving's layout for micro";
}

TEST(NormRopeStore, ScaleBlockNotDividingNopeIsContractErrorNamingIt) {
  const Fixture f("micro");
  expect_micro_geometry(f);
  std::mt19937_64 rng(28);
  const int64_t rows = 2;
  NormInputs in = norm_inputs(f, rng, rows);
  Tensor kv = bf16_tensor({rows, f.dim()}, random_rows(rng, rows, f.dim(), f.block()), "kv");
  Tensor locs_t = int_tensor<int64_t>({rows}, DType::i64, std::vector<int64_t>{0, 5}, "swa_locs");
  SwaCache c = make_cache(f, 2, 4, "cache");
  SwaCache untouched = make_cache(f, 2, 4, "poison");
  auto argument_of = [&](const Tensor& x, const NormInputs& n, SwaCache& cache, int64_t block) -> std::string {
    try {
      fused_norm_rope_store_kv(x, n.weight_t, 1e-6, n.freqs_t, n.positions_t, locs_t, cache.bytes, 4, block);
    } catch (const ContractError& e) {
      EXPECT_EQ(e.op(), kNormRopeStoreOp);
      return e.argument();
    }
    return "";
  };
  EXPECT_EQ(argument_of(kv, in, c, 32), "scale_block") << "48 % 32";
  EXPECT_EQ(argument_of(kv, in, c, 0), "scale_block");
  EXPECT_EQ(argument_of(kv, in, c, kKvScaleBlock), "scale_block") << "micro at the default block of 64";
  try {
    fused_norm_rope_store_kv(kv, in.weight_t, 1e-6, in.freqs_t, in.positions_t, locs_t, c.bytes, 4);
    FAIL() << "the default scale block accepted micro's nope of 48";
  } catch (const ContractError& e) {
    EXPECT_EQ(e.argument(), "scale_block");
  }
  EXPECT_TRUE(same_bytes(c.bytes, untouched.bytes)) << "rejected before touching the cache";
  EXPECT_EQ(argument_of(kv, in, c, 16), "");
  // Flash rows into a cache laid out for blocks of 64: a block of 16 needs 32 scale bytes per entry,
  // which pages of 32 entries do not absorb in their padding.
  const Fixture flash;
  NormInputs flash_in = norm_inputs(flash, rng, rows);
  Tensor flash_kv = bf16_tensor({rows, flash.dim()}, random_rows(rng, rows, flash.dim()), "kv");
  SwaCache flash_cache = make_cache(flash, 1, 32, "cache");
  ASSERT_NE(model1_layout(kNormRopeStoreOp, flash.dim(), flash.config.rope_head_dim, 16).page_bytes(32),
            flash_cache.layout.page_bytes);
  auto flash_argument_of = [&](int64_t block) -> std::string {
    try {
      fused_norm_rope_store_kv(flash_kv, flash_in.weight_t, 1e-6, flash_in.freqs_t, flash_in.positions_t, locs_t,
                               flash_cache.bytes, 32, block);
    } catch (const ContractError& e) {
      return e.argument();
    }
    return "";
  };
  EXPECT_EQ(flash_argument_of(16), "cache") << "page bytes of another scale block";
  EXPECT_EQ(flash_argument_of(64), "");
}

// ---- store_kv_model1: the store half alone (prefill CP) ------------------------------------------

// The cache model1_pack writes for rows of a bf16 view (any row stride), row by row in order.
void pack_rows_by_hand(const Model1Layout& l, int64_t page_size, const Tensor& kv, const std::vector<int64_t>& locs,
                       SwaCache& c) {
  for (size_t t = 0; t < locs.size(); ++t) {
    if (locs[t] < 0) continue;
    model1_pack(l, page_size, row_values(kv, static_cast<int64_t>(t)).data(), c.bytes.data<uint8_t>(), locs[t]);
  }
}

TEST(StoreKvModel1, EqualsModel1PackPerRow) {
  for (const char* preset : {"flash", "micro"}) {
    const Fixture f(preset);
    std::mt19937_64 rng(31);
    const int64_t rows = 7, pages = 3, page_size = 4;
    const std::vector<float> x = random_rows(rng, rows, f.dim(), f.block());
    const Model1Layout l = model1_layout(kStoreKvModel1Op, f.dim(), f.config.rope_head_dim, f.block());
    const std::vector<int64_t> locs = {9, -1, 0, 4, 3, -1, 11};  // across page boundaries; two padding rows
    const Tensor locs_t = int_tensor<int64_t>({rows}, DType::i64, locs, "locs");
    // A dense kv and the strided qkv_a[:, q_lora:] slice of the same rows write the same bytes.
    QkvA s = qkv_a_slice(f, rows, x);
    const Tensor dense = bf16_tensor({rows, f.dim()}, x, "kv");
    for (const Tensor& kv : {dense, s.kv}) {
      SwaCache got = make_cache(f, pages, page_size, "cache");
      SwaCache want = make_cache(f, pages, page_size, "expected");
      const std::vector<double> kv_before = kv.values();
      store_kv_model1(kv, f.config.rope_head_dim, locs_t, got.bytes, page_size, f.block());
      pack_rows_by_hand(l, page_size, kv, locs, want);
      EXPECT_TRUE(same_bytes(got.bytes, want.bytes)) << preset << (kv.is_contiguous() ? " dense" : " slice");
      EXPECT_EQ(kv.values(), kv_before) << "kv is read only";
    }
  }
}

// The identity the CP path relies on: norm + RoPE in place on a contiguous copy, then store_kv_model1,
// writes fused_norm_rope_store_kv's bytes for the same rows.
TEST(StoreKvModel1, OfNormedRowsEqualsTheFusedStore) {
  for (const char* preset : {"flash", "micro"}) {
    const Fixture f(preset);
    std::mt19937_64 rng(32);
    for (int64_t rows : {1, 2, 7, 8}) {
      const int64_t pages = 4, page_size = 4;
      const std::vector<float> x = random_rows(rng, rows, f.dim(), f.block());
      NormInputs in = norm_inputs(f, rng, rows);
      QkvA s = qkv_a_slice(f, rows, x);
      std::vector<int64_t> locs;
      for (int64_t t = 0; t < rows; ++t) locs.push_back(t % 3 == 1 ? -1 : (5 * t + 3) % (pages * page_size));
      const Tensor locs_t = int_tensor<int64_t>({rows}, DType::i64, locs, "locs");
      SwaCache fused = make_cache(f, pages, page_size, "fused");
      fused_norm_rope_store_kv(s.kv, in.weight_t, f.config.norm_eps, in.freqs_t, in.positions_t, locs_t, fused.bytes,
                               page_size, f.block());
      Tensor normed = s.kv.contiguous();
      fused_norm_rope_inplace(normed, in.weight_t, f.config.norm_eps, in.freqs_t, in.positions_t);
      SwaCache split = make_cache(f, pages, page_size, "split");
      store_kv_model1(normed, f.config.rope_head_dim, locs_t, split.bytes, page_size, f.block());
      EXPECT_TRUE(same_bytes(split.bytes, fused.bytes)) << preset << " rows " << rows;
    }
  }
}

TEST(StoreKvModel1, RepeatedLocationKeepsTheLaterRowAndPaddingWritesNothing) {
  const Fixture f("micro");
  std::mt19937_64 rng(33);
  const int64_t page_size = 4;
  const Model1Layout l = model1_layout(kStoreKvModel1Op, f.dim(), f.config.rope_head_dim, f.block());
  const std::vector<int64_t> locs = {5, 2, 5, -1, 7, 2, 5, 0, 7};
  const int64_t rows = static_cast<int64_t>(locs.size());
  const Tensor kv = bf16_tensor({rows, f.dim()}, random_rows(rng, rows, f.dim(), f.block()), "kv");
  SwaCache got = make_cache(f, 2, page_size, "cache");
  store_kv_model1(kv, f.config.rope_head_dim, int_tensor<int64_t>({rows}, DType::i64, locs, "locs"), got.bytes,
                  page_size, f.block());
  // Location 5 holds row 6, 2 row 5, 7 row 8, 0 row 7: the later row of each pair.
  SwaCache want = make_cache(f, 2, page_size, "expected");
  for (const auto& [row, loc] : std::vector<std::pair<int64_t, int64_t>>{{6, 5}, {5, 2}, {8, 7}, {7, 0}}) {
    model1_pack(l, page_size, row_values(kv, row).data(), want.bytes.data<uint8_t>(), loc);
  }
  EXPECT_TRUE(same_bytes(got.bytes, want.bytes));
  // Every row padding: nothing written.
  SwaCache c = make_cache(f, 2, page_size, "cache");
  SwaCache untouched = make_cache(f, 2, page_size, "poison");
  const Tensor padding = int_tensor<int64_t>({rows}, DType::i64, std::vector<int64_t>(9, -1), "locs");
  store_kv_model1(kv, f.config.rope_head_dim, padding, c.bytes, page_size, f.block());
  EXPECT_TRUE(same_bytes(c.bytes, untouched.bytes));
  // No rows at all.
  store_kv_model1(Tensor::empty({0, f.dim()}, DType::bf16, "kv"), f.config.rope_head_dim,
                  Tensor::empty({0}, DType::i64, "locs"), c.bytes, page_size, f.block());
  EXPECT_TRUE(same_bytes(c.bytes, untouched.bytes));
}

TEST(StoreKvModel1, ContractsNameTheArgument) {
  const Fixture f("micro");
  std::mt19937_64 rng(34);
  const int64_t rows = 2, page_size = 4, rope = f.config.rope_head_dim;
  const Tensor kv = bf16_tensor({rows, f.dim()}, random_rows(rng, rows, f.dim(), f.block()), "kv");
  const Tensor locs = int_tensor<int64_t>({rows}, DType::i64, std::vector<int64_t>{0, 7}, "locs");
  SwaCache c = make_cache(f, 2, page_size, "cache");
  SwaCache untouched = make_cache(f, 2, page_size, "poison");
  auto argument_of = [&](const Tensor& k, int64_t rope_dim, const Tensor& l, Tensor& cache, int64_t ps,
                         int64_t block) -> std::string {
    try {
      store_kv_model1(k, rope_dim, l, cache, ps, block);
    } catch (const ContractError& e) {
      EXPECT_EQ(e.op(), kStoreKvModel1Op);
      return e.argument();
    }
    return "";
  };
  auto locs_of = [](const std::vector<int64_t>& v) {
    return int_tensor<int64_t>({static_cast<int64_t>(v.size())}, DType::i64, v, "locs");
  };
  const int64_t block = f.block();
  EXPECT_EQ(argument_of(Tensor::empty({rows, f.dim()}, DType::f32, "kv"), rope, locs, c.bytes, page_size, block), "kv");
  EXPECT_EQ(argument_of(Tensor::empty({f.dim(), rows}, DType::bf16, "kv").transpose(0, 1), rope, locs, c.bytes,
                        page_size, block),
            "kv")
      << "last-dim stride";
  EXPECT_EQ(argument_of(kv, rope, int_tensor<int32_t>({rows}, DType::i32, std::vector<int32_t>{0, 1}, "locs"), c.bytes,
                        page_size, block),
            "locs");
  EXPECT_EQ(argument_of(kv, rope, locs_of({0}), c.bytes, page_size, block), "locs") << "one location per row";
  EXPECT_EQ(argument_of(kv, rope, locs_of({0, 8}), c.bytes, page_size, block), "locs") << "one past the last entry";
  EXPECT_EQ(argument_of(kv, rope, locs_of({-2, 0}), c.bytes, page_size, block), "locs");
  EXPECT_EQ(argument_of(kv, rope, locs, c.bytes, 5, block), "cache") << "page bytes of another page size";
  Tensor f32_cache = Tensor::empty({2, c.layout.page_bytes / 4}, DType::f32, "cache");
  EXPECT_EQ(argument_of(kv, rope, locs, f32_cache, page_size, block), "cache");
  EXPECT_EQ(argument_of(kv, rope, locs, c.bytes, 0, block), "page_size");
  EXPECT_EQ(argument_of(kv, rope - 1, locs, c.bytes, page_size, block), "rope_dim") << "odd";
  EXPECT_EQ(argument_of(kv, -2, locs, c.bytes, page_size, block), "rope_dim");
  EXPECT_EQ(argument_of(kv, f.dim(), locs, c.bytes, page_size, block), "rope_dim");
  EXPECT_EQ(argument_of(kv, rope, locs, c.bytes, page_size, 32), "scale_block") << "48 % 32";
  EXPECT_EQ(argument_of(kv, rope, locs, c.bytes, page_size, kKvScaleBlock), "scale_block") << "the default of 64";
  EXPECT_TRUE(same_bytes(c.bytes, untouched.bytes)) << "refused before touching the cache";
  EXPECT_EQ(argument_of(kv, rope, locs, c.bytes, page_size, block), "");
}

// ---- sparse_attention ---------------------------------------------------------------------------

// A cache whose every entry is packed by serving from random rows, with the dequantized keys kept
// for the reference.
struct KeyCache {
  SwaCache cache;
  std::vector<std::vector<float>> keys;  // by location
  int64_t entries() const { return static_cast<int64_t>(keys.size()); }
};

KeyCache make_key_cache(const Fixture& f, std::mt19937_64& rng, int64_t pages, int64_t page_size,
                        const std::string& name) {
  KeyCache k;
  k.cache = make_cache(f, pages, page_size, name);
  const std::vector<float> rows = random_rows(rng, pages * page_size, f.dim(), f.block());
  for (int64_t loc = 0; loc < pages * page_size; ++loc) {
    serving_pack(k.cache, rows.data() + loc * f.dim(), loc);
    k.keys.push_back(serving_unpack(k.cache, loc));
    // The reference's keys are its own quant-dequant in kv_block_size blocks; the cache must hold them.
    const std::vector<float> row(rows.begin() + loc * f.dim(), rows.begin() + (loc + 1) * f.dim());
    EXPECT_EQ(first_bit_difference(k.keys.back().data(), reference_cached(row, f.nope(), f.block())), -1)
        << name << " loc " << loc;
  }
  return k;
}

struct IndexSet {
  std::vector<int32_t> indices;  // [T, topk]
  std::vector<int32_t> lens;     // [T]
  int64_t topk = 0;
};

// Per token a length in [1, topk]; inside it a mix of valid locations and -1; past it -1 or a
// valid-looking location the kernel must not read.
IndexSet random_indices(std::mt19937_64& rng, int64_t tokens, int64_t topk, int64_t entries) {
  IndexSet s;
  s.topk = topk;
  for (int64_t t = 0; t < tokens; ++t) {
    const auto len = static_cast<int32_t>(1 + rng() % static_cast<uint64_t>(topk));
    s.lens.push_back(len);
    for (int64_t j = 0; j < topk; ++j) {
      const bool pad = j < len ? rng() % 5 == 0 : rng() % 2 == 0;
      s.indices.push_back(pad ? -1 : static_cast<int32_t>(rng() % static_cast<uint64_t>(entries)));
    }
  }
  return s;
}

struct AttentionCase {
  int64_t tokens = 0, heads = 0;
  std::vector<float> q;     // [T, H, D] bf16 values
  std::vector<float> sink;  // [H]
  KeyCache swa, extra;
  IndexSet swa_idx, extra_idx;
  bool with_extra = false;
  Tensor q_t, out_t, sink_t, swa_i, swa_l, extra_i, extra_l;

  SparseAttentionArgs args(const Fixture& f) const {
    SparseAttentionArgs a;
    a.q = q_t;
    a.out = out_t;
    a.attn_sink = sink_t;
    a.swa_cache = swa.cache.bytes;
    a.swa_page_size = swa.cache.layout.page_tokens;
    a.swa_indices = swa_i;
    a.swa_lens = swa_l;
    if (with_extra) {
      a.extra_cache = extra.cache.bytes;
      a.extra_page_size = extra.cache.layout.page_tokens;
      a.extra_indices = extra_i;
      a.extra_lens = extra_l;
    }
    a.scale = 1.0f / std::sqrt(static_cast<float>(f.dim()));
    a.rope_dim = f.config.rope_head_dim;
    a.kv_block = f.config.kv_block_size;
    return a;
  }
};

AttentionCase make_case(const Fixture& f, uint64_t seed, int64_t tokens, int64_t heads, bool with_extra) {
  std::mt19937_64 rng(seed);
  AttentionCase c;
  c.tokens = tokens;
  c.heads = heads;
  c.with_extra = with_extra;
  for (int64_t i = 0; i < tokens * heads * f.dim(); ++i) c.q.push_back(rand_bf16(rng, -3.0f, 3.0f));
  for (int64_t h = 0; h < heads; ++h) c.sink.push_back(std::uniform_real_distribution<float>(-2.0f, 4.0f)(rng));
  c.swa = make_key_cache(f, rng, 3, 8, "swa_cache");
  c.swa_idx = random_indices(rng, tokens, 16, c.swa.entries());
  c.q_t = bf16_tensor({tokens, heads, f.dim()}, c.q, "q");
  c.out_t = Tensor::empty({tokens, heads, f.dim()}, DType::bf16, "out");
  c.sink_t = f32_tensor(c.sink, "attn_sink");
  c.swa_i = int_tensor<int32_t>({tokens, c.swa_idx.topk}, DType::i32, c.swa_idx.indices, "swa_indices");
  c.swa_l = int_tensor<int32_t>({tokens}, DType::i32, c.swa_idx.lens, "swa_lens");
  if (with_extra) {
    c.extra = make_key_cache(f, rng, 5, 2, "extra_cache");  // c128-style pages of 2 entries
    c.extra_idx = random_indices(rng, tokens, 6, c.extra.entries());
    c.extra_i = int_tensor<int32_t>({tokens, c.extra_idx.topk}, DType::i32, c.extra_idx.indices, "extra_indices");
    c.extra_l = int_tensor<int32_t>({tokens}, DType::i32, c.extra_idx.lens, "extra_lens");
  }
  return c;
}

// The reference's keys of token t: the window part first, then the compressed entries.
std::vector<const float*> reference_keys(const AttentionCase& c, int64_t t) {
  std::vector<const float*> keys;
  auto add = [&](const KeyCache& k, const IndexSet& s) {
    for (int64_t j = 0; j < s.lens[static_cast<size_t>(t)]; ++j) {
      const int32_t idx = s.indices[static_cast<size_t>(t * s.topk + j)];
      if (idx >= 0) keys.push_back(k.keys[static_cast<size_t>(idx)].data());
    }
  };
  add(c.swa, c.swa_idx);
  if (c.with_extra) add(c.extra, c.extra_idx);
  return keys;
}

struct Diff {
  double max_rel = 0;      // max |got - want| / max |want| of the head
  int64_t differing = 0;   // elements whose bf16 codes differ
  int64_t total = 0;
};

Diff compare_to_reference(const Fixture& f, const AttentionCase& c) {
  Diff d;
  const auto* out = c.out_t.data<const uint16_t>();
  std::vector<float> want(static_cast<size_t>(f.dim()));
  const float scale = 1.0f / std::sqrt(static_cast<float>(f.dim()));
  for (int64_t t = 0; t < c.tokens; ++t) {
    const std::vector<const float*> keys = reference_keys(c, t);
    for (int64_t h = 0; h < c.heads; ++h) {
      const float* q = c.q.data() + (t * c.heads + h) * f.dim();
      ref::attention_head(f.ctx, q, keys, f.dim(), c.sink[static_cast<size_t>(h)], scale, want.data());
      double peak = 0;
      for (float w : want) peak = std::max(peak, static_cast<double>(std::fabs(w)));
      for (int64_t i = 0; i < f.dim(); ++i) {
        const float got = bf16_to_f32(out[(t * c.heads + h) * f.dim() + i]);
        const float w = want[static_cast<size_t>(i)];
        ++d.total;
        if (f32_to_bf16(got) != f32_to_bf16(w)) ++d.differing;
        const double err = std::fabs(static_cast<double>(got) - w);
        d.max_rel = std::max(d.max_rel, peak > 0 ? err / peak : err);
      }
    }
  }
  return d;
}

// fp32 vs the reference's f64 accumulation: a bf16 rounding of P or of the output may flip by one
// ulp, nothing more.
void expect_close(const Diff& d, const std::string& what) {
  std::printf("%s: max rel err %.3g, %lld of %lld bf16 outputs differ\n", what.c_str(), d.max_rel,
              static_cast<long long>(d.differing), static_cast<long long>(d.total));
  EXPECT_LE(d.max_rel, 1.0 / 128) << what;
  EXPECT_LE(d.differing * 100, d.total) << what << ": more than 1% of the bf16 outputs differ";
}

TEST(SparseAttention, MatchesReferenceWindowOnly) {
  const Fixture f;
  for (uint64_t seed : {31, 32, 33}) {
    AttentionCase c = make_case(f, seed, 6, 4, /*with_extra=*/false);
    sparse_attention(c.args(f));
    const Diff d = compare_to_reference(f, c);
    expect_close(d, "seed " + std::to_string(seed));
  }
}

TEST(SparseAttention, MatchesReferenceWithCompressedEntries) {
  const Fixture f;
  for (uint64_t seed : {41, 42, 43}) {
    AttentionCase c = make_case(f, seed, 6, 4, /*with_extra=*/true);
    sparse_attention(c.args(f));
    expect_close(compare_to_reference(f, c), "seed " + std::to_string(seed));
  }
}

TEST(SparseAttention, ShortWindowsAndAllPaddingRows) {
  const Fixture f;
  AttentionCase c = make_case(f, 51, 4, 2, /*with_extra=*/false);
  // Token 0: a window of one entry in a topk of 16; token 1: every column -1 (output 0); token 2:
  // length 3 with valid-looking indices past it, which must not be read.
  auto* idx = c.swa_i.data<int32_t>();
  auto* len = c.swa_l.data<int32_t>();
  std::fill(idx, idx + 4 * 16, -1);
  idx[0] = 5;
  len[0] = 1;
  len[1] = 16;
  for (int j = 0; j < 16; ++j) idx[2 * 16 + j] = j;
  len[2] = 3;
  c.swa_idx.indices.assign(idx, idx + 4 * 16);
  c.swa_idx.lens.assign(len, len + 4);
  sparse_attention(c.args(f));
  expect_close(compare_to_reference(f, c), "short windows");
  const auto* out = c.out_t.data<const uint16_t>();
  for (int64_t i = 0; i < 2 * f.dim(); ++i) ASSERT_EQ(bf16_to_f32(out[1 * 2 * f.dim() + i]), 0.0f) << i;
}

TEST(SparseAttention, SinkOnlyEnlargesTheDenominator) {
  const Fixture f;
  AttentionCase c = make_case(f, 61, 5, 3, /*with_extra=*/true);
  // Logits of a few units (q / 64, exact in bf16), so a sink of that size is visible.
  for (float& v : c.q) v *= 1.0f / 64;
  c.q_t = bf16_tensor({c.tokens, 3, f.dim()}, c.q, "q");
  std::fill(c.sink_t.data<float>(), c.sink_t.data<float>() + 3, -std::numeric_limits<float>::infinity());
  sparse_attention(c.args(f));
  const std::vector<double> no_sink = c.out_t.values();
  const std::vector<float> sinks = {-1.0f, 2.0f, 6.0f};
  std::copy(sinks.begin(), sinks.end(), c.sink_t.data<float>());
  sparse_attention(c.args(f));
  const std::vector<double> with_sink = c.out_t.values();
  c.sink = sinks;
  expect_close(compare_to_reference(f, c), "with sinks");
  for (int64_t t = 0; t < c.tokens; ++t) {
    for (int64_t h = 0; h < 3; ++h) {
      // One common factor in (0, 1) per (token, head): out_sink = out * D / (D + e^(sink - m)).
      const size_t base = static_cast<size_t>((t * 3 + h) * f.dim());
      size_t argmax = base;
      for (size_t i = base; i < base + static_cast<size_t>(f.dim()); ++i) {
        if (std::fabs(no_sink[i]) > std::fabs(no_sink[argmax])) argmax = i;
      }
      if (no_sink[argmax] == 0.0) continue;
      const double factor = with_sink[argmax] / no_sink[argmax];
      EXPECT_GT(factor, 0.0);
      EXPECT_LT(factor, 1.0);
      for (size_t i = base; i < base + static_cast<size_t>(f.dim()); ++i) {
        ASSERT_LE(std::fabs(with_sink[i]), std::fabs(no_sink[i]) * (1 + 1.0 / 128) + 1e-30) << i;
        ASSERT_NEAR(with_sink[i], no_sink[i] * factor, std::fabs(no_sink[argmax]) / 64) << i;
      }
    }
  }
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

TEST(SparseAttention, ZeroLengthsAreContractErrors) {
  const Fixture f;
  AttentionCase c = make_case(f, 71, 3, 2, /*with_extra=*/true);
  c.swa_l.data<int32_t>()[1] = 0;
  EXPECT_EQ(contract_argument(c.args(f)), "swa_lens");
  c.swa_l.data<int32_t>()[1] = -1;
  EXPECT_EQ(contract_argument(c.args(f)), "swa_lens");
  c.swa_l.data<int32_t>()[1] = 17;  // past the topk
  EXPECT_EQ(contract_argument(c.args(f)), "swa_lens");
  c.swa_l.data<int32_t>()[1] = 1;
  c.extra_l.data<int32_t>()[2] = 0;
  EXPECT_EQ(contract_argument(c.args(f)), "extra_lens");
  c.extra_l.data<int32_t>()[2] = 1;
  EXPECT_EQ(contract_argument(c.args(f)), "");
}

TEST(SparseAttention, IndicesPastTheCacheAreContractErrors) {
  const Fixture f;
  AttentionCase c = make_case(f, 72, 3, 2, /*with_extra=*/true);
  int32_t* swa = c.swa_i.data<int32_t>();
  const int32_t keep = swa[5];
  swa[5] = static_cast<int32_t>(c.swa.entries());  // one past the last entry (3 pages x 8)
  EXPECT_EQ(contract_argument(c.args(f)), "swa_indices");
  swa[5] = -2;
  EXPECT_EQ(contract_argument(c.args(f)), "swa_indices");
  swa[5] = keep;
  c.extra_i.data<int32_t>()[0] = static_cast<int32_t>(c.extra.entries());
  EXPECT_EQ(contract_argument(c.args(f)), "extra_indices");
  c.extra_i.data<int32_t>()[0] = 0;
  EXPECT_EQ(contract_argument(c.args(f)), "");
}

TEST(SparseAttention, ContractRejectsPartialExtraAndBadShapes) {
  const Fixture f;
  AttentionCase c = make_case(f, 73, 2, 2, /*with_extra=*/true);
  SparseAttentionArgs a = c.args(f);
  a.extra_lens = Tensor();
  EXPECT_EQ(contract_argument(a), "extra_lens");
  a = c.args(f);
  a.attn_sink = f32_tensor({0.0f, 0.0f, 0.0f}, "attn_sink");
  EXPECT_EQ(contract_argument(a), "attn_sink");
  a = c.args(f);
  a.swa_page_size = 4;  // the bytes were laid out for 8 entries per page
  EXPECT_EQ(contract_argument(a), "swa_cache");
  a = c.args(f);
  a.q = c.q_t.transpose(0, 1);
  EXPECT_EQ(contract_argument(a), "q");
}

// ---- sparse_attention at the micro preset's scale block of 16 --------------------------------------

TEST(SparseAttention, ScaleBlock16MatchesReference) {
  const Fixture f("micro");
  expect_micro_geometry(f);
  for (uint64_t seed : {81, 82, 83}) {
    for (bool with_extra : {false, true}) {
      AttentionCase c = make_case(f, seed, 6, f.config.n_heads, with_extra);
      ASSERT_EQ(c.args(f).kv_block, 16);
      sparse_attention(c.args(f));
      expect_close(compare_to_reference(f, c),
                   "micro seed " + std::to_string(seed) + (with_extra ? " with compressed entries" : " window only"));
    }
  }
}

TEST(SparseAttention, KvBlockNotDividingNopeIsContractErrorNamingIt) {
  const Fixture f("micro");
  expect_micro_geometry(f);
  AttentionCase c = make_case(f, 84, 3, 2, /*with_extra=*/true);
  SparseAttentionArgs a = c.args(f);
  a.kv_block = 32;  // 48 % 32
  EXPECT_EQ(contract_argument(a), "kv_block");
  a.kv_block = kKvScaleBlock;  // the default does not fit micro
  EXPECT_EQ(contract_argument(a), "kv_block");
  a.kv_block = 0;
  EXPECT_EQ(contract_argument(a), "kv_block");
  a.kv_block = 16;
  EXPECT_EQ(contract_argument(a), "");
  // A Flash cache laid out for blocks of 64 read at a block of 16: pages of 32 entries differ in
  // size (pages of 8 or 2 absorb the 24 extra scale bytes per entry in their padding).
  const Fixture flash;
  AttentionCase fc = make_case(flash, 85, 2, 2, /*with_extra=*/false);
  std::mt19937_64 rng(86);
  const KeyCache big = make_key_cache(flash, rng, 1, 32, "swa_cache");
  SparseAttentionArgs b = fc.args(flash);
  b.swa_cache = big.cache.bytes;
  b.swa_page_size = 32;
  EXPECT_EQ(contract_argument(b), "");
  b.kv_block = 16;
  EXPECT_EQ(contract_argument(b), "swa_cache");
}

}  // namespace
}  // namespace dsv4::kernels
