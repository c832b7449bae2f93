// The scheduler, forward batch and forward metadata by example, on the tiny model (window 128,
// ratios 4 and 128): a hand-worked pair of requests whose prefill chunks end inside a ratio-4 and a
// ratio-128 block, then decode with IDLE padding rows; completion, stop ids and abort giving back
// slots and pages; admission waiting for slots and memory; the upgrade running once per batch; and
// frozen metadata keeping its storage across batches.
#include <gtest/gtest.h>

#include <cstdint>
#include <memory>
#include <vector>

#include "engine/config/model_config.h"
#include "engine/config/runtime_options.h"
#include "engine/core/error.h"
#include "engine/serving/compress_state_pool.h"
#include "engine/serving/forward_batch.h"
#include "engine/serving/forward_metadata.h"
#include "engine/serving/req_to_token_pool.h"
#include "engine/serving/request.h"
#include "engine/serving/scheduler.h"
#include "engine/serving/swa_token_allocator.h"
#include "engine/serving/token_allocator.h"

namespace dsv4::serving {
namespace {

// tiny: layers 0..4 have ratios 0, 4, 128, 4, 128 (the MTP layer 5 has 0).
struct Engine {
  ModelConfig model = load_model_config("tiny");
  RuntimeOptions options;
  std::unique_ptr<ReqToTokenPool> slots;
  std::unique_ptr<TokenAllocator> full;
  std::unique_ptr<SwaTokenAllocator> swa;
  std::vector<std::unique_ptr<CompressStatePool>> pools;  // layers 1..4
  std::unique_ptr<Scheduler> scheduler;

  Engine(int64_t full_pages, int64_t swa_pages, int64_t max_running, std::vector<int32_t> stop_ids = {}) {
    options.page_size = 256;
    options.swa_page_size = 128;
    options.c4_ring_size = 8;
    options.batch_buckets = max_running >= 4 ? std::vector<int64_t>{1, 4} : std::vector<int64_t>{max_running};
    options.max_running_requests = max_running;
    options.chunked_prefill_tokens = 130;
    const int64_t max_seq_len = 512;
    slots = std::make_unique<ReqToTokenPool>(max_running, max_seq_len);
    full = std::make_unique<TokenAllocator>(model, options, full_pages, max_seq_len);
    swa = std::make_unique<SwaTokenAllocator>(model, options, swa_pages, full->capacity_tokens());
    for (int64_t layer = 1; layer <= 4; ++layer) {
      pools.push_back(std::make_unique<CompressStatePool>(model, options, layer, CompressStateOwner::attention, swa_pages));
    }
    scheduler = std::make_unique<Scheduler>(model, options, *slots, *full, *swa, stop_ids);
  }

  std::vector<const CompressStatePool*> pool_list() const {
    std::vector<const CompressStatePool*> out;
    for (const auto& p : pools) out.push_back(p.get());
    return out;
  }
};

std::vector<int32_t> prompt(int64_t len, int32_t first) {
  std::vector<int32_t> ids;
  for (int64_t i = 0; i < len; ++i) ids.push_back(first + static_cast<int32_t>(i));
  return ids;
}

void expect_row(const ForwardRow& row, int64_t id, int64_t slot, int64_t before, int64_t after) {
  EXPECT_EQ(row.request_id, id);
  EXPECT_EQ(row.req_slot, slot);
  EXPECT_EQ(row.seq_len_before, before);
  EXPECT_EQ(row.seq_len_after, after);
}

// Every upgraded field of token t at position p, full location loc and SWA location s, by the rules
// worked out in the tests below: c4 rows (s / 128) * 8 + s % 8, c128 rows (s / 128) * 128 + s % 128.
void expect_token(const UpgradedForwardMetadata& m, int64_t t, int64_t p, int64_t loc, int64_t s) {
  SCOPED_TRACE("token " + std::to_string(t) + " position " + std::to_string(p));
  const auto i = static_cast<size_t>(t);
  EXPECT_EQ(m.positions[i], p);
  EXPECT_EQ(m.swa_loc[i], s);
  EXPECT_EQ(m.indexer_context_lens[i], (p + 1) / 4);
  const int64_t ratios[4] = {4, 128, 4, 128};
  for (size_t l = 0; l < 4; ++l) {
    const int64_t r = ratios[l];
    EXPECT_EQ(m.layers[l].ratio, r);
    EXPECT_EQ(m.layers[l].write_loc[i], p % r == r - 1 ? loc / r : -1);
    EXPECT_EQ(m.layers[l].state_row[i], r == 4 ? (s / 128) * 8 + s % 8 : (s / 128) * 128 + s % 128);
    EXPECT_EQ(m.layers[l].visible_entries[i], (p + 1) / r);
  }
}

// A: 134 prompt tokens, 3 new; B: 7 prompt tokens, 2 new; budget 130 tokens a step.
//   step 0  EXTEND  A [0, 130)                 ends inside the c4 block [128, 132) and the c128 block [128, 256)
//   step 1  EXTEND  A [130, 134), B [0, 7)     B ends inside the c4 block [4, 8)
//   step 2  DECODE  A pos 134, B pos 7 (+2 padding rows: bucket 4); B finishes
//   step 3  DECODE  A pos 135 (bucket 1); A finishes
//   step 4  IDLE    one padding row (bucket 1)
// Slots and pages are handed out lowest first: A slot 1, full page 1 (locations 256 + p), SWA pages
// 1, 2 (128 + p); B slot 2, full page 2 (512 + p), SWA page 3 (384 + p).
TEST(ServingScheduler, HandWorkedChunksAcrossBlocksThenDecodeThenIdle) {
  Engine e(/*full_pages=*/5, /*swa_pages=*/9, /*max_running=*/4);
  Scheduler& s = *e.scheduler;
  s.add_request(10, prompt(134, 100), 3, 0);
  s.add_request(11, prompt(7, 500), 2, 0);
  ForwardMetadata meta(*e.swa, e.pool_list());

  // Step 0.
  ForwardBatch b0 = s.schedule(0);
  EXPECT_EQ(b0.mode, ForwardMode::extend);
  EXPECT_EQ(b0.bucket_rows, 0);
  ASSERT_EQ(b0.row_count(), 1);
  expect_row(b0.rows[0], 10, 1, 0, 130);
  ASSERT_EQ(b0.token_count(), 130);
  for (int64_t p = 0; p < 130; ++p) {
    EXPECT_EQ(b0.positions[static_cast<size_t>(p)], p);
    EXPECT_EQ(b0.out_cache_loc[static_cast<size_t>(p)], 256 + p);
    EXPECT_EQ(b0.input_ids[static_cast<size_t>(p)], 100 + p);
  }
  EXPECT_EQ(s.request(10).state, RequestState::prefilling);
  EXPECT_EQ(s.request(11).state, RequestState::waiting);
  meta.set_raw(raw_forward_metadata(b0));
  EXPECT_EQ(meta.raw().req_slots, (std::vector<int64_t>{1}));
  EXPECT_EQ(meta.raw().seq_lens, (std::vector<int64_t>{130}));
  EXPECT_EQ(meta.raw().extend_lens, (std::vector<int64_t>{130}));
  ASSERT_TRUE(meta.upgrade());
  const UpgradedForwardMetadata& m0 = meta.upgraded();
  EXPECT_EQ(m0.indexer_context_lens_shape(), (std::array<int64_t, 2>{130, 1}));
  for (int64_t p = 0; p < 130; ++p) expect_token(m0, p, p, 256 + p, 128 + p);
  // Spot values worked by hand: the c4 block [124, 128) completes at 127 -> entry (256 + 127) / 4 = 95;
  // the first c128 block completes at 127 -> entry 383 / 128 = 2; 129 is mid-block in both.
  EXPECT_EQ(m0.layers[0].write_loc[127], 95);
  EXPECT_EQ(m0.layers[1].write_loc[127], 2);
  EXPECT_EQ(m0.layers[0].write_loc[129], -1);
  EXPECT_EQ(m0.layers[1].write_loc[129], -1);
  EXPECT_EQ(m0.swa_loc[129], 257);           // SWA page 2, offset 1
  EXPECT_EQ(m0.layers[0].state_row[129], 17);  // 2 * 8 + 257 % 8
  EXPECT_EQ(m0.layers[1].state_row[129], 257);
  EXPECT_EQ(m0.indexer_context_lens[129], 32);
  EXPECT_EQ(m0.layers[1].visible_entries[129], 1);
  s.commit(b0, std::vector<int32_t>{7});
  EXPECT_TRUE(s.request(10).generated_ids.empty());  // a chunk inside the prompt samples nothing
  EXPECT_EQ(s.request(10).prefilled_len, 130);

  // Step 1.
  ForwardBatch b1 = s.schedule(1);
  EXPECT_EQ(b1.mode, ForwardMode::extend);
  ASSERT_EQ(b1.row_count(), 2);
  expect_row(b1.rows[0], 10, 1, 130, 134);
  expect_row(b1.rows[1], 11, 2, 0, 7);
  EXPECT_EQ(b1.positions, (std::vector<int64_t>{130, 131, 132, 133, 0, 1, 2, 3, 4, 5, 6}));
  EXPECT_EQ(b1.out_cache_loc, (std::vector<int64_t>{386, 387, 388, 389, 512, 513, 514, 515, 516, 517, 518}));
  meta.set_raw(raw_forward_metadata(b1));
  EXPECT_EQ(meta.raw().extend_lens, (std::vector<int64_t>{4, 7}));
  ASSERT_TRUE(meta.upgrade());
  for (int64_t i = 0; i < 4; ++i) expect_token(meta.upgraded(), i, 130 + i, 386 + i, 258 + i);
  for (int64_t i = 0; i < 7; ++i) expect_token(meta.upgraded(), 4 + i, i, 512 + i, 384 + i);
  EXPECT_EQ(meta.upgraded().layers[0].write_loc[1], 96);  // A completes c4 block [128, 132): 387 / 4
  EXPECT_EQ(meta.upgraded().layers[2].write_loc[7], 128); // B completes [0, 4): 515 / 4
  EXPECT_EQ(meta.upgraded().layers[0].write_loc[10], -1); // B's chunk ends at 7, inside [4, 8)
  s.commit(b1, std::vector<int32_t>{21, 31});
  EXPECT_EQ(s.request(10).state, RequestState::decoding);
  EXPECT_EQ(s.request(10).generated_ids, (std::vector<int32_t>{21}));
  EXPECT_EQ(s.request(11).generated_ids, (std::vector<int32_t>{31}));

  // Step 2: DECODE, two rows padded to bucket 4.
  ForwardBatch b2 = s.schedule(2);
  EXPECT_EQ(b2.mode, ForwardMode::decode);
  EXPECT_EQ(b2.bucket_rows, 4);
  EXPECT_EQ(b2.real_row_count(), 2);
  ASSERT_EQ(b2.row_count(), 4);
  expect_row(b2.rows[0], 10, 1, 134, 135);
  expect_row(b2.rows[1], 11, 2, 7, 8);
  expect_row(b2.rows[2], ForwardRow::kPaddingRequest, 0, 0, 1);
  expect_row(b2.rows[3], ForwardRow::kPaddingRequest, 0, 0, 1);
  EXPECT_EQ(b2.positions, (std::vector<int64_t>{134, 7, 0, 0}));
  EXPECT_EQ(b2.out_cache_loc, (std::vector<int64_t>{390, 519, 0, 0}));
  EXPECT_EQ(b2.input_ids, (std::vector<int32_t>{21, 31, 0, 0}));
  meta.set_raw(raw_forward_metadata(b2));
  EXPECT_EQ(meta.raw().req_slots, (std::vector<int64_t>{1, 2, 0, 0}));
  EXPECT_EQ(meta.raw().seq_lens, (std::vector<int64_t>{135, 8, 1, 1}));
  ASSERT_TRUE(meta.upgrade());
  expect_token(meta.upgraded(), 0, 134, 390, 262);
  expect_token(meta.upgraded(), 1, 7, 519, 391);
  expect_token(meta.upgraded(), 2, 0, 0, 0);  // padding: null location, SWA 0, state row 0, nothing written
  expect_token(meta.upgraded(), 3, 0, 0, 0);
  EXPECT_EQ(meta.upgraded().layers[0].write_loc[1], 129);  // B completes [4, 8): 519 / 4
  s.commit(b2, std::vector<int32_t>{22, 32});
  EXPECT_EQ(s.request(11).state, RequestState::finished);
  EXPECT_EQ(s.request(11).slot, Request::kNoSlot);
  EXPECT_FALSE(e.slots->is_live(2));
  EXPECT_EQ(e.full->seq_len(2), 0);
  EXPECT_EQ(e.swa->seq_len(2), 0);

  // Step 3: A alone, bucket 1.
  ForwardBatch b3 = s.schedule(3);
  EXPECT_EQ(b3.mode, ForwardMode::decode);
  EXPECT_EQ(b3.bucket_rows, 1);
  ASSERT_EQ(b3.row_count(), 1);
  expect_row(b3.rows[0], 10, 1, 135, 136);
  meta.set_raw(raw_forward_metadata(b3));
  ASSERT_TRUE(meta.upgrade());
  expect_token(meta.upgraded(), 0, 135, 391, 263);
  EXPECT_EQ(meta.upgraded().layers[0].write_loc[0], 97);  // [132, 136): 391 / 4
  s.commit(b3, std::vector<int32_t>{23});
  EXPECT_EQ(s.request(10).state, RequestState::finished);
  EXPECT_EQ(s.request(10).generated_ids, (std::vector<int32_t>{21, 22, 23}));
  EXPECT_FALSE(s.has_unfinished());
  EXPECT_EQ(e.full->free_page_count(), 4);
  EXPECT_EQ(e.swa->free_page_count(), 8);
  EXPECT_EQ(e.slots->free_slot_count(), 4);
  EXPECT_EQ(s.reserved_full_pages(), 0);
  EXPECT_EQ(s.reserved_swa_pages(), 0);

  // Step 4: IDLE replays the smallest graph with one padding row.
  ForwardBatch b4 = s.schedule(4);
  EXPECT_EQ(b4.mode, ForwardMode::idle);
  EXPECT_EQ(b4.bucket_rows, 1);
  ASSERT_EQ(b4.row_count(), 1);
  expect_row(b4.rows[0], ForwardRow::kPaddingRequest, 0, 0, 1);
  EXPECT_EQ(b4.out_cache_loc, (std::vector<int64_t>{0}));
  EXPECT_EQ(meta.upgrade_count(), 4);
  s.commit(b4, {});
}

TEST(ServingScheduler, DecodeBucketIsTheSmallestThatHoldsTheRows) {
  const std::vector<int64_t> buckets = {8, 1, 2, 4};
  EXPECT_EQ(batch_bucket(buckets, 1), 1);
  EXPECT_EQ(batch_bucket(buckets, 3), 4);
  EXPECT_EQ(batch_bucket(buckets, 5), 8);
  EXPECT_THROW(batch_bucket(buckets, 9), ContractError);
  ForwardBatch batch;
  batch.mode = ForwardMode::decode;
  const int64_t loc[1] = {300};
  const int32_t id[1] = {9};
  for (int64_t r = 0; r < 3; ++r) append_row(batch, ForwardRow{r, r + 1, 4, 5}, loc, id);
  pad_to_bucket(batch, buckets);
  EXPECT_EQ(batch.bucket_rows, 4);
  ASSERT_EQ(batch.row_count(), 4);
  EXPECT_TRUE(batch.rows[3].is_padding());
  EXPECT_EQ(batch.rows[3].req_slot, 0);
  EXPECT_EQ(batch.rows[3].seq_len_after, 1);
  EXPECT_EQ(batch.out_cache_loc.back(), 0);
  EXPECT_EQ(batch.positions.back(), 0);
  check_forward_batch(batch);
}

TEST(ServingScheduler, StopIdFinishesEarlyAndReleases) {
  Engine e(5, 9, 4, /*stop_ids=*/{2});
  Scheduler& s = *e.scheduler;
  s.add_request(1, prompt(5, 0), 50, 0);
  ForwardBatch b = s.schedule(0);
  s.commit(b, std::vector<int32_t>{9});
  b = s.schedule(1);
  EXPECT_EQ(b.mode, ForwardMode::decode);
  s.commit(b, std::vector<int32_t>{2});
  EXPECT_EQ(s.request(1).state, RequestState::finished);
  EXPECT_EQ(s.request(1).generated_ids, (std::vector<int32_t>{9, 2}));
  EXPECT_EQ(e.full->free_page_count(), 4);
  EXPECT_EQ(e.swa->free_page_count(), 8);
  EXPECT_EQ(e.slots->free_slot_count(), 4);
}

TEST(ServingScheduler, AbortReleasesSlotAndPagesAtEveryStage) {
  Engine e(5, 9, 4);
  Scheduler& s = *e.scheduler;
  s.add_request(1, prompt(200, 0), 4, 0);  // two chunks
  s.add_request(2, prompt(3, 0), 4, 5);    // arrives later
  ForwardBatch b = s.schedule(0);
  ASSERT_EQ(b.row_count(), 1);
  EXPECT_EQ(e.slots->free_slot_count(), 3);
  // Aborted between schedule and commit: its row is skipped and everything comes back.
  EXPECT_TRUE(s.abort(1));
  s.commit(b, std::vector<int32_t>{0});
  EXPECT_EQ(s.request(1).state, RequestState::aborted);
  EXPECT_EQ(e.slots->free_slot_count(), 4);
  EXPECT_EQ(e.full->free_page_count(), 4);
  EXPECT_EQ(e.swa->free_page_count(), 8);
  EXPECT_FALSE(s.abort(1));
  EXPECT_TRUE(s.abort(2));  // still waiting: nothing held, nothing to give back
  EXPECT_FALSE(s.has_unfinished());
  b = s.schedule(6);
  EXPECT_EQ(b.mode, ForwardMode::idle);
  s.commit(b, {});
  EXPECT_THROW(s.abort(99), ContractError);
}

TEST(ServingScheduler, WaitsForSlotsAndMemoryFirstComeFirstServed) {
  // One usable full page of 256 tokens: two requests of at most 200 tokens cannot run together.
  Engine e(/*full_pages=*/2, /*swa_pages=*/9, /*max_running=*/4);
  Scheduler& s = *e.scheduler;
  s.add_request(1, prompt(100, 0), 2, 0);
  s.add_request(2, prompt(100, 0), 2, 0);
  ForwardBatch b = s.schedule(0);
  ASSERT_EQ(b.row_count(), 1);  // 2 waits for memory, though the budget has 30 tokens left
  EXPECT_EQ(s.request(2).state, RequestState::waiting);
  s.commit(b, std::vector<int32_t>{1});
  b = s.schedule(1);
  EXPECT_EQ(b.mode, ForwardMode::decode);
  s.commit(b, std::vector<int32_t>{1});
  EXPECT_EQ(s.request(1).state, RequestState::finished);
  b = s.schedule(2);
  ASSERT_EQ(b.row_count(), 1);
  EXPECT_EQ(b.rows[0].request_id, 2);
  EXPECT_EQ(b.rows[0].req_slot, 1);  // the freed slot is reused
  s.commit(b, std::vector<int32_t>{1});
  // A request that could never fit is refused up front.
  EXPECT_THROW(s.add_request(3, prompt(300, 0), 1, 0), ContractError);
  EXPECT_THROW(s.add_request(2, prompt(3, 0), 1, 0), ContractError);  // duplicate id

  // One slot: the second request waits for it.
  Engine one(5, 9, /*max_running=*/1);
  one.scheduler->add_request(1, prompt(3, 0), 1, 0);
  one.scheduler->add_request(2, prompt(3, 0), 1, 0);
  b = one.scheduler->schedule(0);
  ASSERT_EQ(b.row_count(), 1);
  one.scheduler->commit(b, std::vector<int32_t>{1});  // max_new_tokens 1: finished
  b = one.scheduler->schedule(1);
  ASSERT_EQ(b.row_count(), 1);
  EXPECT_EQ(b.rows[0].request_id, 2);
  one.scheduler->commit(b, std::vector<int32_t>{1});
}

TEST(ServingScheduler, UpgradeRunsExactlyOncePerBatch) {
  Engine e(5, 9, 4);
  e.scheduler->add_request(1, prompt(9, 0), 4, 0);
  ForwardBatch b = e.scheduler->schedule(0);
  ForwardMetadata meta(*e.swa, e.pool_list());
  meta.set_raw(raw_forward_metadata(b));
  EXPECT_FALSE(meta.is_upgraded());
  EXPECT_TRUE(meta.upgrade());
  // The forward, the compressor and the indexer all ask; only the first builds.
  EXPECT_FALSE(meta.upgrade());
  EXPECT_FALSE(meta.upgrade());
  EXPECT_EQ(meta.upgrade_count(), 1);
  e.scheduler->commit(b, std::vector<int32_t>{1});
  b = e.scheduler->schedule(1);
  meta.assign_from(raw_forward_metadata(b));
  EXPECT_FALSE(meta.is_upgraded());  // a new batch is due its own upgrade
  EXPECT_TRUE(meta.upgrade());
  EXPECT_FALSE(meta.upgrade());
  EXPECT_EQ(meta.upgrade_count(), 2);
  e.scheduler->commit(b, std::vector<int32_t>{1});
}

void expect_same(const UpgradedForwardMetadata& a, const UpgradedForwardMetadata& b) {
  EXPECT_EQ(a.positions, b.positions);
  EXPECT_EQ(a.swa_loc, b.swa_loc);
  EXPECT_EQ(a.indexer_context_lens, b.indexer_context_lens);
  ASSERT_EQ(a.layers.size(), b.layers.size());
  for (size_t l = 0; l < a.layers.size(); ++l) {
    EXPECT_EQ(a.layers[l].ratio, b.layers[l].ratio);
    EXPECT_EQ(a.layers[l].write_loc, b.layers[l].write_loc);
    EXPECT_EQ(a.layers[l].state_row, b.layers[l].state_row);
    EXPECT_EQ(a.layers[l].visible_entries, b.layers[l].visible_entries);
  }
}

std::vector<const void*> addresses(const ForwardMetadata& m) {
  std::vector<const void*> out = {m.raw().req_slots.data(), m.raw().seq_lens.data(), m.raw().extend_lens.data(),
                                  m.raw().out_cache_loc.data(), m.upgraded().positions.data(),
                                  m.upgraded().swa_loc.data(), m.upgraded().indexer_context_lens.data()};
  for (const CompressedLayerMetadata& l : m.upgraded().layers) {
    out.push_back(l.write_loc.data());
    out.push_back(l.state_row.data());
    out.push_back(l.visible_entries.data());
  }
  return out;
}

TEST(ServingScheduler, FrozenMetadataCopiesInPlaceAndNeverRebinds) {
  Engine e(5, 9, 4);
  Scheduler& s = *e.scheduler;
  s.add_request(1, prompt(5, 0), 10, 0);
  s.add_request(2, prompt(9, 0), 10, 0);
  s.add_request(3, prompt(3, 0), 10, 2);
  ForwardBatch b = s.schedule(0);
  s.commit(b, std::vector<int32_t>{1, 1});
  b = s.schedule(1);  // DECODE, 2 rows in bucket 4: the graph is captured here
  ASSERT_EQ(b.bucket_rows, 4);
  ForwardMetadata captured(*e.swa, e.pool_list());
  captured.set_raw(raw_forward_metadata(b));
  ASSERT_TRUE(captured.upgrade());
  captured.freeze();
  const std::vector<const void*> before = addresses(captured);
  const std::vector<int64_t> seq_lens_before = captured.raw().seq_lens;
  s.commit(b, std::vector<int32_t>{1, 1});
  b = s.schedule(2);  // EXTEND request 3
  s.commit(b, std::vector<int32_t>{1});
  b = s.schedule(3);  // DECODE, 3 rows of other lengths, same bucket 4
  ASSERT_EQ(b.mode, ForwardMode::decode);
  ASSERT_EQ(b.real_row_count(), 3);
  ASSERT_EQ(b.bucket_rows, 4);

  const RawForwardMetadata raw = raw_forward_metadata(b);
  EXPECT_THROW(captured.set_raw(raw), ContractError);  // rebinding is refused
  captured.assign_from(raw);
  EXPECT_FALSE(captured.is_upgraded());
  ASSERT_TRUE(captured.upgrade());
  EXPECT_EQ(addresses(captured), before);
  EXPECT_NE(captured.raw().seq_lens, seq_lens_before);
  EXPECT_EQ(captured.raw().seq_lens, raw.seq_lens);
  EXPECT_EQ(captured.raw().req_slots, raw.req_slots);

  ForwardMetadata fresh(*e.swa, e.pool_list());
  fresh.set_raw(raw);
  ASSERT_TRUE(fresh.upgrade());
  expect_same(captured.upgraded(), fresh.upgraded());

  // A batch of another shape cannot be copied into the captured storage.
  RawForwardMetadata wider = raw;
  wider.req_slots.push_back(0);
  wider.seq_lens.push_back(1);
  wider.extend_lens.push_back(1);
  wider.out_cache_loc.push_back(0);
  EXPECT_THROW(captured.assign_from(wider), ContractError);
  EXPECT_EQ(addresses(captured), before);
  s.commit(b, std::vector<int32_t>{1, 1, 1});
}

}  // namespace
}  // namespace dsv4::serving
