// engine/serving pools by example: byte layouts against the numbers of dsv4-model §5 and
// engine/config/cache_geometry.h, pack -> unpack against the reference quantizer bit for bit,
// index translations worked by hand, the construction guard (page size 0 and friends), and the
// reserved null slot that IDLE padding rows use.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "engine/config/cache_geometry.h"
#include "engine/config/model_config.h"
#include "engine/config/runtime_options.h"
#include "engine/core/error.h"
#include "engine/core/formats.h"
#include "engine/serving/compress_state_pool.h"
#include "engine/serving/compressed_locations.h"
#include "engine/serving/indexer_key_layout.h"
#include "engine/serving/kv_cache_layout.h"
#include "engine/serving/req_to_token_pool.h"
#include "engine/serving/swa_token_allocator.h"
#include "engine/serving/token_allocator.h"
#include "reference/quant.h"

namespace dsv4::serving {
namespace {

constexpr int64_t kInt64Min = std::numeric_limits<int64_t>::min();
constexpr int64_t kInt64Max = std::numeric_limits<int64_t>::max();

// Flash's layers: 0, 1 SWA only; then 4, 128 alternating; the MTP layer 43 SWA only.
constexpr int64_t kFlashC4Layer = 2;
constexpr int64_t kFlashC128Layer = 3;
constexpr int64_t kFlashSwaLayer = 0;

uint32_t bits_of(float x) { return f32_bits(x); }

// A KV vector whose blocks span many magnitudes: a zero block (amax clamped to 1e-4), tiny and huge
// values, exact powers of two, and a value past 448 x scale.
std::vector<float> varied_vector(int64_t dims, int64_t block_dims, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> v(static_cast<size_t>(dims));
  for (int64_t d = 0; d < dims; ++d) {
    const int64_t block = d / block_dims;
    const float magnitude = std::ldexp(1.0f, static_cast<int>((block * 7) % 40) - 20);
    v[static_cast<size_t>(d)] = block == 1 ? 0.0f : normal(rng) * magnitude;
  }
  if (dims > 3) {
    v[2] = 448.0f;
    v[3] = -1e30f;
  }
  return v;
}

// The reference's view of a cached KV vector: nope dims FP8 quant-dequant in blocks, rope bf16.
std::vector<float> reference_kv(const KvEntryLayout& l, std::vector<float> kv) {
  ref::fp8_quant_dequant(kv.data(), l.nope_dims, l.block_dims);
  for (int64_t i = l.nope_dims; i < l.head_dim(); ++i) kv[static_cast<size_t>(i)] = round_bf16(kv[static_cast<size_t>(i)]);
  return kv;
}

void expect_input_error(auto construct, const std::string& field) {
  try {
    construct();
    FAIL() << "accepted; expected an InputError naming " << field;
  } catch (const InputError& e) {
    EXPECT_EQ(e.field(), field) << e.what();
  }
}

// ---- KV entry and page layout --------------------------------------------------------------------

TEST(KvCacheLayout, FlashEntryIs584Bytes) {
  const ModelConfig flash = load_model_config("flash");
  const KvEntryLayout e = kv_entry_layout(flash);
  EXPECT_EQ(e.nope_dims, 448);
  EXPECT_EQ(e.rope_dims, 64);
  EXPECT_EQ(e.scale_count, 7);
  EXPECT_EQ(e.value_bytes, 576);
  EXPECT_EQ(e.scale_bytes, 8);
  EXPECT_EQ(e.entry_bytes(), 584);

  const CacheGeometry g = cache_geometry(flash, RuntimeOptions{});
  EXPECT_EQ(e.entry_bytes(), g.kv_entry_bytes);
  EXPECT_EQ(e.value_bytes, g.kv_value_bytes);
  EXPECT_EQ(e.scale_bytes, g.kv_scale_bytes);

  // SWA / full pages of 256 tokens: 256 x 576 values, then 256 x 8 scales, padded to 260 x 576.
  const KvPageLayout p256 = kv_page_layout(flash, 256);
  EXPECT_EQ(p256.scales_offset_bytes, 256 * 576);
  EXPECT_EQ(p256.page_bytes, 260 * 576);
  EXPECT_EQ(p256.page_bytes, 149760);
  // c4 pages of 64 entries: 64 x 584 = 37376 -> 65 x 576.
  const KvPageLayout p64 = kv_page_layout(flash, 64);
  EXPECT_EQ(p64.page_bytes, 37440);
  // c128 pages of 2 entries: 1168 -> 3 x 576.
  EXPECT_EQ(kv_page_layout(flash, 2).page_bytes, 1728);
}

TEST(KvCacheLayout, TinyEntryIs200Bytes) {
  const ModelConfig tiny = load_model_config("tiny");
  const KvEntryLayout e = kv_entry_layout(tiny);
  EXPECT_EQ(e.value_bytes, 64 + 128);
  EXPECT_EQ(e.scale_bytes, 8);
  EXPECT_EQ(e.entry_bytes(), 200);
  EXPECT_EQ(e.entry_bytes(), cache_geometry(tiny, RuntimeOptions{}).kv_entry_bytes);
  // 256 x 192 + 256 x 8 = 51200 = 266.67 x 192 -> 267 x 192.
  EXPECT_EQ(kv_page_layout(tiny, 256).page_bytes, 267 * 192);
}

TEST(KvCacheLayout, PackUnpackEqualsReferenceQuantDequantBitForBit) {
  for (const char* name : {"flash", "tiny", "micro"}) {
    const ModelConfig model = load_model_config(name);
    const KvPageLayout p = kv_page_layout(model, 16);
    std::vector<uint8_t> page(static_cast<size_t>(p.page_bytes), 0);
    const KvPageSpans<uint8_t> spans = split_kv_page(p, page);
    for (int64_t slot : {int64_t{0}, int64_t{1}, int64_t{15}}) {
      const std::vector<float> kv = varied_vector(p.entry.head_dim(), p.entry.block_dims, static_cast<uint32_t>(slot + 7));
      pack_kv_entry(p.entry, kv.data(), spans.values, spans.scales, slot);
      std::vector<float> unpacked(kv.size(), std::nanf(""));
      const KvPageSpans<const uint8_t> read = view_kv_page(p, page);
      unpack_kv_entry(p.entry, read.values, read.scales, slot, unpacked.data());
      const std::vector<float> expected = reference_kv(p.entry, kv);
      for (size_t d = 0; d < kv.size(); ++d) {
        ASSERT_EQ(bits_of(unpacked[d]), bits_of(expected[d]))
            << name << " slot " << slot << " dim " << d << ": " << unpacked[d] << " vs " << expected[d];
      }
    }
  }
}

TEST(KvCacheLayout, PackTouchesOnlyItsOwnEntry) {
  const ModelConfig flash = load_model_config("flash");
  const KvPageLayout p = kv_page_layout(flash, 4);
  std::vector<uint8_t> page(static_cast<size_t>(p.page_bytes), 0xAB);
  const KvPageSpans<uint8_t> spans = split_kv_page(p, page);
  const std::vector<float> kv = varied_vector(p.entry.head_dim(), p.entry.block_dims, 3);
  const int64_t slot = 2;
  pack_kv_entry(p.entry, kv.data(), spans.values, spans.scales, slot);
  const int64_t value_begin = slot * p.entry.value_bytes;
  const int64_t scale_begin = p.scales_offset_bytes + slot * p.entry.scale_bytes;
  for (int64_t b = 0; b < p.page_bytes; ++b) {
    const bool in_values = b >= value_begin && b < value_begin + p.entry.value_bytes;
    const bool in_scales = b >= scale_begin && b < scale_begin + p.entry.scale_bytes;
    if (!in_values && !in_scales) {
      ASSERT_EQ(page[static_cast<size_t>(b)], 0xAB) << "byte " << b;
    }
  }
  EXPECT_EQ(page[static_cast<size_t>(scale_begin + 7)], 0) << "the pad byte is written as 0";
  // The block scales of a zero block are the clamp's: 2^ceil(log2(1e-4 / 448)) = 2^-22.
  EXPECT_EQ(page[static_cast<size_t>(scale_begin + 1)], 127 - 22);
}

// ---- indexer key layout --------------------------------------------------------------------------

TEST(IndexerKeyLayout, Fp8KeyIs132BytesInPagesOf64) {
  ModelConfig flash = load_model_config("flash");
  flash.indexer_quant = "fp8";
  const IndexerKeyLayout l = indexer_key_layout(flash, RuntimeOptions{}.page_size / 4);
  EXPECT_EQ(l.entry_bytes(), 132);
  EXPECT_EQ(l.entry_bytes(), cache_geometry(flash, RuntimeOptions{}).indexer_key_bytes);
  EXPECT_EQ(l.page_entries, 64);
  EXPECT_EQ(l.scales_offset_bytes, 64 * 128);
  EXPECT_EQ(l.page_bytes, 64 * 128 + 64 * 4);
}

TEST(IndexerKeyLayout, Fp4IsRefusedNotGuessed) {
  ModelConfig flash = load_model_config("flash");
  flash.indexer_quant = "fp4";
  EXPECT_THROW(indexer_key_layout(flash, 64), ContractError);
}

TEST(IndexerKeyLayout, PackUnpackEqualsReferenceQuantDequantBitForBit) {
  ModelConfig flash = load_model_config("flash");
  flash.indexer_quant = "fp8";
  const IndexerKeyLayout l = indexer_key_layout(flash, 64);
  std::vector<uint8_t> page(static_cast<size_t>(l.page_bytes), 0xCD);
  std::span<uint8_t> values = std::span<uint8_t>(page).first(static_cast<size_t>(l.scales_offset_bytes));
  std::span<uint8_t> scales = std::span<uint8_t>(page).subspan(static_cast<size_t>(l.scales_offset_bytes));
  for (int64_t slot : {int64_t{0}, int64_t{5}, int64_t{63}}) {
    std::vector<float> key = varied_vector(l.dims, 32, static_cast<uint32_t>(slot));
    pack_indexer_key(l, key.data(), values, scales, slot);
    std::vector<float> unpacked(key.size());
    unpack_indexer_key(l, values, scales, slot, unpacked.data());
    ref::fp8_quant_dequant(key.data(), l.dims, l.dims);  // one block over the whole key
    for (size_t d = 0; d < key.size(); ++d) ASSERT_EQ(bits_of(unpacked[d]), bits_of(key[d])) << "slot " << slot << " dim " << d;
  }
  EXPECT_EQ(page[static_cast<size_t>(l.scales_offset_bytes + 4)], 0xCD) << "slot 1's scale untouched";
}

// ---- compressed locations ------------------------------------------------------------------------

TEST(CompressedLocations, LocIsFullLocOverRatio) {
  EXPECT_EQ(compressed_loc(256, 4), 64);
  EXPECT_EQ(compressed_loc(259, 4), 64);
  EXPECT_EQ(compressed_loc(260, 4), 65);
  EXPECT_EQ(compressed_loc(511, 128), 3);
  EXPECT_EQ(compressed_loc(0, 4), 0) << "the null location stays null";
  EXPECT_EQ(compressed_loc(-1, 4), -1);
  EXPECT_EQ(compressed_loc(kInt64Min, 128), -1);
  // Written by the token that completes the block, and only then.
  EXPECT_EQ(compressed_write_loc(258, 2, 4), -1);
  EXPECT_EQ(compressed_write_loc(259, 3, 4), 64);
  EXPECT_EQ(compressed_write_loc(256 + 127, 127, 128), 2);
  EXPECT_EQ(compressed_write_loc(0, 3, 4), 0);  // a padding row of 1 + 3 draft tokens
  EXPECT_EQ(compressed_entry_count(7, 4), 1);
  EXPECT_EQ(compressed_entry_count(127, 128), 0);

  const CompressedPoolGeometry c4 = compressed_pool_geometry(4, 256, 10);
  EXPECT_EQ(c4.entries_per_page, 64);
  EXPECT_EQ(c4.entry_count, 640);
  const CompressedPoolGeometry c128 = compressed_pool_geometry(128, 256, 10);
  EXPECT_EQ(c128.entries_per_page, 2);
  EXPECT_EQ(c128.entry_count, 20);
  const CacheGeometry g = cache_geometry(load_model_config("flash"), RuntimeOptions{});
  EXPECT_EQ(c4.entries_per_page, g.c4_entries_per_page);
  EXPECT_EQ(c128.entries_per_page, g.c128_entries_per_page);
}

TEST(CompressedLocations, EntriesFollowTheRequestsPages) {
  const ModelConfig flash = load_model_config("flash");
  const RuntimeOptions o;
  ReqToTokenPool reqs(o.max_running_requests, 1024);
  TokenAllocator full(flash, o, 8, 1024);
  const int64_t a = *reqs.alloc();
  const int64_t b = *reqs.alloc();
  ASSERT_TRUE(full.extend(a, 10).ok);
  ASSERT_TRUE(full.extend(b, 300).ok);  // pages 2, 3
  ASSERT_TRUE(full.extend(a, 300).ok);  // pages 1, 4
  full.write_locs(a, 0, 300, reqs.row(a));
  // Entry 70 of a covers positions 280..283, on a's second page (page 4): (4 * 256 + 24) / 4.
  EXPECT_EQ(compressed_entry_loc(reqs.row(a), 300, 70, 4), (4 * 256 + 24) / 4);
  // c128 entry 1 covers positions 128..255, on a's first page (page 1).
  EXPECT_EQ(compressed_entry_loc(reqs.row(a), 300, 1, 128), (1 * 256 + 128) / 128);
}

// ---- compress-state pool ---------------------------------------------------------------------------

TEST(CompressStatePool, TranslationByHand) {
  const ModelConfig flash = load_model_config("flash");
  const RuntimeOptions o;  // page 256, SWA page 256, rings 8 and 128
  const CompressStatePool c4(flash, o, kFlashC4Layer, CompressStateOwner::attention, 10);
  EXPECT_EQ(c4.ring_size(), 8);
  EXPECT_EQ(c4.translate_swa_loc_to_state_row(0), 0);
  EXPECT_EQ(c4.translate_swa_loc_to_state_row(7), 7);
  EXPECT_EQ(c4.translate_swa_loc_to_state_row(8), 0);
  EXPECT_EQ(c4.translate_swa_loc_to_state_row(13), 5);
  EXPECT_EQ(c4.translate_swa_loc_to_state_row(255), 7);
  EXPECT_EQ(c4.translate_swa_loc_to_state_row(256), 8);
  EXPECT_EQ(c4.translate_swa_loc_to_state_row(265), 9);
  EXPECT_EQ(c4.translate_swa_loc_to_state_row(2559), 9 * 8 + 7);
  EXPECT_EQ(c4.used_row_count(), 80);
  EXPECT_EQ(c4.row_count(), 84);  // 81 rounded up to a multiple of 4
  EXPECT_EQ(c4.clean_row(), 83);

  const CompressStatePool c128(flash, o, kFlashC128Layer, CompressStateOwner::attention, 10);
  EXPECT_EQ(c128.ring_size(), 128);
  EXPECT_EQ(c128.translate_swa_loc_to_state_row(127), 127);
  EXPECT_EQ(c128.translate_swa_loc_to_state_row(128), 0);
  EXPECT_EQ(c128.translate_swa_loc_to_state_row(300), 128 + 44);
  EXPECT_EQ(c128.row_count(), 1408);  // 1281 rounded up to a multiple of 128
  EXPECT_EQ(c128.clean_row(), 1407);

  RuntimeOptions spec;
  spec.speculative = true;  // rings 16 and 256
  const CompressStatePool c4_spec(flash, spec, kFlashC4Layer, CompressStateOwner::attention, 10);
  EXPECT_EQ(c4_spec.ring_size(), 16);
  EXPECT_EQ(c4_spec.translate_swa_loc_to_state_row(300), 16 + 300 % 16);
}

TEST(CompressStatePool, TranslationIsTotal) {
  const ModelConfig flash = load_model_config("flash");
  const CompressStatePool c4(flash, RuntimeOptions{}, kFlashC4Layer, CompressStateOwner::attention, 10);
  for (int64_t swa_loc : {int64_t{-1}, int64_t{-256}, int64_t{2560}, int64_t{2561}, int64_t{1} << 40, kInt64Min, kInt64Max}) {
    EXPECT_EQ(c4.translate_swa_loc_to_state_row(swa_loc), -1) << swa_loc;
  }
}

TEST(CompressStatePool, RowLayoutsMatchTheCacheGeometry) {
  const ModelConfig flash = load_model_config("flash");
  const RuntimeOptions o;
  const CacheGeometry g = cache_geometry(flash, o);
  const CompressStatePool c4(flash, o, kFlashC4Layer, CompressStateOwner::attention, 4);
  const CompressStatePool indexer(flash, o, kFlashC4Layer, CompressStateOwner::indexer, 4);
  const CompressStatePool c128(flash, o, kFlashC128Layer, CompressStateOwner::attention, 4);
  EXPECT_EQ(c4.row_layout().row_bytes, g.c4_state_row_bytes);
  EXPECT_EQ(indexer.row_layout().row_bytes, g.indexer_state_row_bytes);
  EXPECT_EQ(c128.row_layout().row_bytes, g.c128_state_row_bytes);
  // |kv A|kv B|score A|score B| and |kv|score|, fp32 x head_dim each.
  const StateRowLayout& l4 = c4.row_layout();
  EXPECT_EQ(l4.kv_offset_bytes(0), 0);
  EXPECT_EQ(l4.kv_offset_bytes(1), 2048);
  EXPECT_EQ(l4.score_offset_bytes(0), 4096);
  EXPECT_EQ(l4.score_offset_bytes(1), 6144);
  EXPECT_EQ(c128.row_layout().score_offset_bytes(0), 2048);
  EXPECT_EQ(c4.buffer_bytes(), c4.row_count() * 8192);

  std::vector<uint8_t> row(static_cast<size_t>(c128.row_layout().row_bytes), 0x5A);
  fill_clean_state_row(c128.row_layout(), row);
  float kv = 1.0f;
  float score = 1.0f;
  std::memcpy(&kv, row.data() + 4 * 511, 4);
  std::memcpy(&score, row.data() + 2048 + 4 * 511, 4);
  EXPECT_EQ(bits_of(kv), 0u);
  EXPECT_TRUE(std::isinf(score) && score < 0);
}

// ---- the construction guard ------------------------------------------------------------------------

TEST(ConstructionGuard, SwaPageSizeZeroIsRefusedNamingTheField) {
  const ModelConfig flash = load_model_config("flash");
  RuntimeOptions o;
  o.swa_page_size = 0;
  expect_input_error([&] { CompressStatePool(flash, o, kFlashC4Layer, CompressStateOwner::attention, 4); }, "swa_page_size");
  expect_input_error([&] { CompressStatePool(flash, o, kFlashC128Layer, CompressStateOwner::attention, 4); }, "swa_page_size");
  expect_input_error([&] { SwaTokenAllocator(flash, o, 4, 1024); }, "swa_page_size");
  expect_input_error([&] { TokenAllocator(flash, o, 4, 1024); }, "swa_page_size");
}

TEST(ConstructionGuard, SwaPageSizeThatRingsDoNotDivideIsRefused) {
  const ModelConfig flash = load_model_config("flash");
  RuntimeOptions one;
  one.swa_page_size = 1;  // divides page_size, but not the rings 8 and 128
  expect_input_error([&] { CompressStatePool(flash, one, kFlashC4Layer, CompressStateOwner::attention, 4); }, "swa_page_size");
  expect_input_error([&] { SwaTokenAllocator(flash, one, 4, 1024); }, "swa_page_size");
  RuntimeOptions ring12;
  ring12.c4_ring_size = 12;  // a valid c4 ring, but 256 % 12 != 0
  expect_input_error([&] { CompressStatePool(flash, ring12, kFlashC4Layer, CompressStateOwner::attention, 4); }, "swa_page_size");
  RuntimeOptions c128_ring;
  c128_ring.c128_ring_size = 64;  // not a multiple of the ratio 128
  expect_input_error([&] { CompressStatePool(flash, c128_ring, kFlashC128Layer, CompressStateOwner::attention, 4); }, "c128_ring_size");
}

TEST(ConstructionGuard, PageSizeBelowTheLargestRatioIsRefused) {
  const ModelConfig flash = load_model_config("flash");
  RuntimeOptions o;
  o.page_size = 64;  // c128 pages would hold 0 entries
  o.swa_page_size = 64;
  expect_input_error([&] { TokenAllocator(flash, o, 4, 1024); }, "page_size");
  expect_input_error([&] { CompressStatePool(flash, o, kFlashC4Layer, CompressStateOwner::attention, 4); }, "page_size");
}

TEST(ConstructionGuard, LayersWithoutThatStateAreRefused) {
  const ModelConfig flash = load_model_config("flash");
  const RuntimeOptions o;
  EXPECT_THROW(CompressStatePool(flash, o, kFlashSwaLayer, CompressStateOwner::attention, 4), ContractError);
  EXPECT_THROW(CompressStatePool(flash, o, kFlashC128Layer, CompressStateOwner::indexer, 4), ContractError);
  EXPECT_THROW(CompressStatePool(flash, o, 44, CompressStateOwner::attention, 4), ContractError);
  EXPECT_THROW(CompressStatePool(flash, o, -1, CompressStateOwner::attention, 4), ContractError);
}

// ---- request slots and the null slot ------------------------------------------------------------

TEST(ReqToTokenPool, SlotZeroIsReservedForIdlePadding) {
  ReqToTokenPool pool(3, 16);
  EXPECT_EQ(*pool.alloc(), 1);
  EXPECT_EQ(*pool.alloc(), 2);
  EXPECT_EQ(*pool.alloc(), 3);
  EXPECT_FALSE(pool.alloc().has_value()) << "3 requests, slot 0 never handed out";
  EXPECT_FALSE(pool.is_live(0));
  pool.free(2);
  EXPECT_EQ(*pool.alloc(), 2) << "the freed slot is reused first";
  for (int32_t loc : pool.null_row()) ASSERT_EQ(loc, 0);
  EXPECT_EQ(static_cast<int64_t>(pool.table().size()), 4 * 16);
}

TEST(ReqToTokenPoolDeathTest, FreeingSlotZeroOrAFreeSlotAsserts) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  ReqToTokenPool pool(2, 8);
  const int64_t slot = *pool.alloc();
  EXPECT_DEATH(pool.free(0), "null slot");
  pool.free(slot);
  EXPECT_DEATH(pool.free(slot), "freed twice");
  EXPECT_DEATH(pool.free(2), "freed twice");
  EXPECT_DEATH(pool.row(2), "not live");
}

TEST(NullSlot, IdleRowsResolveToRowsNoRequestOwns) {
  const ModelConfig tiny = load_model_config("tiny");
  RuntimeOptions o;  // page 256, SWA page 256
  const ReqToTokenPool reqs(o.max_running_requests, 64);
  const TokenAllocator full(tiny, o, 4, 64);
  const SwaTokenAllocator swa(tiny, o, 4, full.capacity_tokens());
  const CompressStatePool c4(tiny, o, 1, CompressStateOwner::attention, swa.page_count());
  // req_pool_index 0 -> out_cache_loc 0 -> SWA 0 -> state row 0 and c4 entry 0: all in page 0.
  const int64_t full_loc = reqs.null_row()[0];
  EXPECT_EQ(full_loc, TokenAllocator::kNullLoc);
  EXPECT_EQ(full.owner_of_page(0), PagePool::kNoOwner);
  EXPECT_EQ(swa.full_to_swa(full_loc), SwaTokenAllocator::kNullLoc);
  EXPECT_EQ(swa.owner_of_page(0), PagePool::kNoOwner);
  EXPECT_EQ(c4.translate_swa_loc_to_state_row(swa.full_to_swa(full_loc)), 0);
  EXPECT_LT(c4.translate_swa_loc_to_state_row(0), c4.ring_size()) << "a row of SWA page 0";
  EXPECT_EQ(compressed_loc(full_loc, 4), 0);
  // The rest of the null page maps nowhere.
  EXPECT_EQ(swa.full_to_swa(1), -1);
}

// ---- the full-token allocator ------------------------------------------------------------------

TEST(TokenAllocator, PositionsLiveInTheirPagesAndPageZeroIsNeverUsed) {
  const ModelConfig tiny = load_model_config("tiny");
  RuntimeOptions o;
  o.page_size = 128;
  o.swa_page_size = 128;
  TokenAllocator full(tiny, o, 5, 512);
  ASSERT_TRUE(full.extend(1, 1).ok);    // decode-like growth: page 1
  ASSERT_TRUE(full.extend(2, 200).ok);  // a chunk: pages 2, 3
  ASSERT_TRUE(full.extend(1, 129).ok);  // crosses a page: page 4
  EXPECT_EQ(full.loc(1, 0), 128);
  EXPECT_EQ(full.loc(1, 128), 4 * 128);
  EXPECT_EQ(full.loc(2, 199), 3 * 128 + 71);
  EXPECT_EQ(full.free_page_count(), 0);

  // Out of pages: a clear answer, nothing changes.
  const PageAllocation oom = full.extend(2, 300);
  EXPECT_FALSE(oom.ok);
  EXPECT_EQ(oom.pages_needed, 1);
  EXPECT_EQ(oom.pages_free, 0);
  EXPECT_EQ(oom.describe("full-token"), "out of full-token pages: needs 1, 0 free");
  EXPECT_EQ(full.seq_len(2), 200);

  full.release(1);  // finished: pages 1 and 4 come back, 4 on top
  EXPECT_EQ(full.free_page_count(), 2);
  ASSERT_TRUE(full.extend(2, 300).ok);
  EXPECT_EQ(full.pages(2)[2], 4) << "the most recently freed page is reused first";
}

// ---- the SWA allocator -------------------------------------------------------------------------

TEST(SwaTokenAllocator, KeepsOnlyTheWindowAndMapsFullLocations) {
  const ModelConfig tiny = load_model_config("tiny");  // window 128
  RuntimeOptions o;
  o.page_size = 256;
  o.swa_page_size = 128;
  ReqToTokenPool reqs(o.max_running_requests, 1024);
  TokenAllocator full(tiny, o, 4, 1024);
  SwaTokenAllocator swa(tiny, o, 5, full.capacity_tokens());
  const int64_t req = *reqs.alloc();
  auto grow = [&](int64_t new_len) {
    const int64_t old_len = full.seq_len(req);
    ASSERT_TRUE(full.extend(req, new_len).ok);
    full.write_locs(req, old_len, new_len, reqs.row(req));
    ASSERT_TRUE(swa.extend(req, new_len, reqs.row(req)).ok);
  };
  grow(300);  // one chunk: SWA pages 1, 2, 3 for positions 0..383
  EXPECT_EQ(swa.free_page_count(), 1);
  EXPECT_EQ(swa.loc(req, 0), 128);
  EXPECT_EQ(swa.loc(req, 299), 3 * 128 + 43);
  EXPECT_EQ(swa.full_to_swa(full.loc(req, 299)), 3 * 128 + 43);

  grow(301);  // the query at 300 sees 173..300: page index 0 (positions 0..127) goes back
  EXPECT_EQ(swa.first_held_pos(req), 128);
  EXPECT_FALSE(swa.is_held(req, 127));
  EXPECT_EQ(swa.full_to_swa(full.loc(req, 0)), -1);
  EXPECT_EQ(swa.full_to_swa(full.loc(req, 127)), -1);
  EXPECT_EQ(swa.full_to_swa(full.loc(req, 173)), 2 * 128 + 45);
  EXPECT_EQ(swa.free_page_count(), 2);

  for (int64_t len = 302; len <= 385; ++len) grow(len);  // decode across a page boundary
  EXPECT_EQ(swa.first_held_pos(req), 256) << "the query at 384 sees 257..384";
  EXPECT_EQ(swa.loc(req, 384), 2 * 128) << "the page given back last (page 2, by this very slide) is reused first";

  swa.release(req);
  full.release(req);
  reqs.free(req);
  EXPECT_EQ(swa.free_page_count(), 4);
  for (int64_t loc = 0; loc < full.capacity_tokens(); ++loc) ASSERT_EQ(swa.full_to_swa(loc), loc == 0 ? 0 : -1);
}

TEST(SwaTokenAllocator, FullToSwaIsTotal) {
  const ModelConfig tiny = load_model_config("tiny");
  const SwaTokenAllocator swa(tiny, RuntimeOptions{}, 3, 1024);
  for (int64_t full_loc : {int64_t{-1}, int64_t{1}, int64_t{1023}, int64_t{1024}, int64_t{1} << 40, kInt64Min, kInt64Max}) {
    EXPECT_EQ(swa.full_to_swa(full_loc), -1) << full_loc;
  }
}

TEST(SwaTokenAllocator, OutOfPagesIsAClearAnswerAndChangesNothing) {
  const ModelConfig tiny = load_model_config("tiny");
  RuntimeOptions o;
  o.swa_page_size = 128;
  ReqToTokenPool reqs(o.max_running_requests, 1024);
  TokenAllocator full(tiny, o, 4, 1024);
  SwaTokenAllocator swa(tiny, o, 4, full.capacity_tokens());  // three usable pages
  const int64_t req = *reqs.alloc();
  ASSERT_TRUE(full.extend(req, 400).ok);
  full.write_locs(req, 0, 400, reqs.row(req));
  EXPECT_FALSE(swa.can_extend(req, 400));
  const PageAllocation oom = swa.extend(req, 400, reqs.row(req));
  EXPECT_FALSE(oom.ok);
  EXPECT_EQ(oom.pages_needed, 4);
  EXPECT_EQ(oom.pages_free, 3);
  EXPECT_EQ(swa.seq_len(req), 0);
  EXPECT_EQ(swa.free_page_count(), 3);
  EXPECT_EQ(swa.full_to_swa(full.loc(req, 0)), -1);
  // Growing in chunks, the window slides and three pages suffice.
  for (int64_t len : {100, 200, 300, 400}) ASSERT_TRUE(swa.extend(req, len, reqs.row(req)).ok) << len;
}

}  // namespace
}  // namespace dsv4::serving
