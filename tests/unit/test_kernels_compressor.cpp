// The compressor's serving kernels (kernels/compressor.h) against the reference Compressor::forward:
// the same token streams fed in chunks that split blocks, then decode steps, two requests ragged in
// one batch, state rows from a serving CompressStatePool's translation of each request's SWA
// locations. The kernels replay the reference's arithmetic (fp32 exp, double sums, the same source
// order and post-processing), so the entries must be equal bit for bit, not merely close.
#include <gtest/gtest.h>

#include <cstring>
#include <ostream>
#include <string>
#include <vector>

#include "engine/config/model_config.h"
#include "engine/config/runtime_options.h"
#include "engine/core/error.h"
#include "engine/serving/compress_state_pool.h"
#include "kernels/compressor.h"
#include "reference/compressor.h"
#include "reference/context.h"
#include "reference/rope.h"
#include "tests/unit/reference_fixtures.h"

namespace dsv4::kernels {
namespace {

using ref::Mat;
using ref::Mode;
using Kind = CompressSource::Kind;

struct Case {
  const char* preset;
  int64_t layer;
  bool indexer;
  Mode mode;
  std::string indexer_quant = "fp4";
  bool fp8_rounding = true;
};

// gtest prints the parameter with PrintTo, and ctest's test discovery names each case after it.
void PrintTo(const Case& c, std::ostream* os) {
  *os << c.preset << "_L" << c.layer << (c.indexer ? "_indexer" : "_attn") << (c.mode == Mode::exact ? "_exact" : "_quant")
      << (c.indexer_quant == "fp8" ? "_fp8vec" : "") << (c.fp8_rounding ? "" : "_clamponly");
}

const ref::testing::Model& model(const std::string& preset, const std::string& indexer_quant) {
  static ref::testing::Model tiny("tiny", 7), micro("micro", 7), tiny_fp8("tiny", 7);
  tiny_fp8.config.indexer_quant = "fp8";
  if (preset == "micro") return micro;
  return indexer_quant == "fp8" ? tiny_fp8 : tiny;
}

Tensor f32_tensor(const std::vector<float>& v, Shape shape, const std::string& name) {
  Tensor t = Tensor::empty(shape, DType::f32, name);
  if (!v.empty()) std::memcpy(t.data<float>(), v.data(), v.size() * 4);
  return t;
}

Tensor i64_tensor(const std::vector<int64_t>& v, const std::string& name) {
  Tensor t = Tensor::empty({static_cast<int64_t>(v.size())}, DType::i64, name);
  if (!v.empty()) std::memcpy(t.data<int64_t>(), v.data(), v.size() * 8);
  return t;
}

// One request: its tokens, its SWA pages, its chunk schedule (then decode steps of 1) and the
// reference compressor it is checked against.
struct Request {
  Mat x;
  std::vector<int64_t> swa_pages;
  std::vector<int64_t> schedule;
  ref::Compressor comp;
  int64_t pos = 0;
  size_t step = 0;
  Mat expected, got;
};

void append_rows(Mat& dst, const float* src, int64_t rows, int64_t cols) {
  if (dst.cols == 0) dst.cols = cols;
  dst.data.insert(dst.data.end(), src, src + rows * cols);
  dst.rows += rows;
}

void expect_bitwise(const Mat& got, const Mat& want, const std::string& what) {
  ASSERT_EQ(got.rows, want.rows) << what;
  ASSERT_EQ(got.cols, want.cols) << what;
  for (int64_t i = 0; i < want.size(); ++i) {
    const float g = got.data[static_cast<size_t>(i)], w = want.data[static_cast<size_t>(i)];
    ASSERT_EQ(std::memcmp(&g, &w, 4), 0) << what << ": element " << i << " (entry " << i / want.cols
                                         << ") got " << g << " want " << w;
  }
}

class KernelsCompressor : public testing::TestWithParam<Case> {};

TEST_P(KernelsCompressor, ChunkedPrefillThenDecodeEqualsReference) {
  const Case& k = GetParam();
  const ref::testing::Model& m = model(k.preset, k.indexer_quant);
  const ModelConfig& c = m.config;
  const int64_t ratio = c.ratio(k.layer);
  const int64_t hd = k.indexer ? c.index_head_dim : c.head_dim;
  const std::string prefix = "layers." + std::to_string(k.layer) + ".attn." + (k.indexer ? "indexer." : "") + "compressor";
  const ref::RopeTable rope = ref::make_rope_table(c, ratio);
  ref::Numerics numerics{k.mode};
  numerics.kv_fp8_rounding = k.fp8_rounding;

  const RuntimeOptions options;  // swa_page_size 256, c4 ring 8, c128 ring = ratio
  const serving::CompressStatePool pool(c, options, k.layer,
                                        k.indexer ? serving::CompressStateOwner::indexer : serving::CompressStateOwner::attention,
                                        /*swa_page_count=*/8);
  const CompressStateLayout layout = pool.row_layout().kernel_layout();
  ASSERT_EQ(layout.coff, ratio == 4 ? 2 : 1);
  // Garbage (NaN bytes) everywhere but the clean row: a read of a row no token wrote poisons the entry.
  Tensor state = Tensor::empty({pool.row_count(), layout.row_bytes}, DType::u8, "state");
  std::memset(state.data<uint8_t>(), 0xFF, static_cast<size_t>(pool.buffer_bytes()));
  serving::fill_clean_state_row(pool.row_layout(),
                                std::span<uint8_t>(state.data<uint8_t>() + pool.clean_row() * layout.row_bytes,
                                                   static_cast<size_t>(layout.row_bytes)));

  const Tensor norm = f32_tensor(m.weights.get(prefix + ".norm.weight").data, {hd}, "norm");
  const Tensor freqs = f32_tensor(rope.freqs, {static_cast<int64_t>(rope.freqs.size())}, "freqs");
  CompressPostprocess post;
  post.bf16_act = k.mode == Mode::quant_sim;
  post.rotate = k.indexer;
  post.norm_eps = c.norm_eps;
  post.fp8_rounding = k.fp8_rounding;
  if (k.mode == Mode::quant_sim) {
    post.quant = !k.indexer ? CompressQuant::fp8_nope
                            : (c.indexer_quant == "fp8" ? CompressQuant::fp8_vector : CompressQuant::fp4);
    post.quant_block = k.indexer ? c.fp4_block_size : c.kv_block_size;
  }

  // Two requests on scattered SWA pages, with schedules that split blocks (sizes not multiples of
  // the ratio, one chunk longer than a c128 block) before their decode steps. micro stays within
  // its 256-token max_seq_len.
  const bool small = std::string(k.preset) == "micro";
  const int64_t len_a = small ? 200 : 300, len_b = small ? 180 : 280;
  auto make_comp = [&] {
    return ref::Compressor(c, m.weights, prefix, ratio, hd, k.indexer, rope);
  };
  std::vector<Request> reqs;
  const std::vector<int64_t> sched_a = small ? std::vector<int64_t>{1, 3, 5, 17, 127} : std::vector<int64_t>{1, 3, 5, 127, 129};
  const std::vector<int64_t> sched_b = small ? std::vector<int64_t>{3, 18, 2, 64, 7} : std::vector<int64_t>{3, 130, 2, 64, 7};
  reqs.push_back({ref::testing::make_input(len_a, c.dim, 11, k.mode), {5, 2}, sched_a, make_comp()});
  reqs.push_back({ref::testing::make_input(len_b, c.dim, 12, k.mode), {3, 6}, sched_b, make_comp()});

  const int64_t sps = options.swa_page_size;
  ref::Trace trace;
  const ref::Context ctx{c, numerics, &trace, nullptr};
  int64_t batches = 0;
  while (true) {
    Mat kv_in(0, 0), score_in(0, 0);
    std::vector<std::vector<int64_t>> rows_storage;
    std::vector<CompressRequestBatch> batch;
    std::vector<Request*> active;
    for (Request& r : reqs) {
      if (r.pos >= r.x.rows) continue;
      const int64_t n = std::min(r.step < r.schedule.size() ? r.schedule[r.step] : 1, r.x.rows - r.pos);
      ++r.step;
      // The reference's own pass over this chunk; its recorded kv / score are the kernels' input.
      const ref::Compressor::Output out = r.comp.forward(ctx, ref::rows_of(r.x, r.pos, n), r.pos);
      append_rows(r.expected, out.entries.data.data(), out.entries.rows, hd);
      const Mat& kv = trace.values.at(prefix + ".kv");
      const Mat& sc = trace.values.at(prefix + ".score");
      append_rows(kv_in, kv.data.data(), kv.rows, kv.cols);
      append_rows(score_in, sc.data.data(), sc.rows, sc.cols);
      // State rows of the positions the plan may touch, through the pool's SWA translation.
      std::vector<int64_t> rows;
      for (int64_t p = compress_history_start(r.pos, ratio); p < r.pos + n; ++p) {
        const int64_t swa_loc = r.swa_pages[static_cast<size_t>(p / sps)] * sps + p % sps;
        rows.push_back(pool.translate_swa_loc_to_state_row(swa_loc));
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
    const Tensor kv_t = f32_tensor(kv_in.data, {kv_in.rows, kv_in.cols}, "kv");
    const Tensor score_t = f32_tensor(score_in.data, {score_in.rows, score_in.cols}, "score");
    Tensor out = Tensor::empty({static_cast<int64_t>(plan.blocks.size()), hd}, DType::f32, "entries");
    // Pool first: this batch's writes may recycle ring rows that its own blocks still read.
    compressor_pool_host(plan, kv_t, score_t, state, layout, norm, freqs, post, out);
    compressor_write_state_host(kv_t, score_t, i64_tensor(plan.write_rows, "rows"), state, layout);
    for (size_t b = 0; b < plan.blocks.size(); ++b) {
      Request& r = *active[static_cast<size_t>(plan.blocks[b].request)];
      ASSERT_EQ(plan.blocks[b].block, r.got.rows) << "blocks come in order";
      append_rows(r.got, out.data<float>() + static_cast<int64_t>(b) * hd, 1, hd);
    }
  }
  EXPECT_GT(batches, 30);

  for (size_t i = 0; i < reqs.size(); ++i) {
    Request& r = reqs[i];
    ASSERT_EQ(r.got.rows, r.x.rows / ratio);
    expect_bitwise(r.got, r.expected, "request " + std::to_string(i) + " vs the reference's chunked run");
    // And against the reference's one-shot prefill of the whole sequence.
    ref::Compressor whole = make_comp();
    const ref::Compressor::Output full = whole.forward(ctx, r.x, 0);
    expect_bitwise(r.got, full.entries, "request " + std::to_string(i) + " vs the reference's prefill");
  }
}

INSTANTIATE_TEST_SUITE_P(
    Presets, KernelsCompressor,
    testing::Values(Case{"tiny", 1, false, Mode::exact}, Case{"tiny", 1, false, Mode::quant_sim},
                    Case{"tiny", 1, true, Mode::exact}, Case{"tiny", 1, true, Mode::quant_sim},
                    Case{"tiny", 2, false, Mode::exact}, Case{"tiny", 2, false, Mode::quant_sim},
                    Case{"tiny", 1, true, Mode::quant_sim, "fp8"}, Case{"tiny", 1, false, Mode::quant_sim, "fp4", false},
                    Case{"micro", 1, false, Mode::quant_sim}, Case{"micro", 1, true, Mode::quant_sim},
                    Case{"micro", 2, false, Mode::exact}, Case{"micro", 2, false, Mode::quant_sim}));

// --- the plan ---------------------------------------------------------------------------------

CompressPlan plan_for(int64_t ratio, int64_t start, int64_t n, int64_t row_count, std::vector<int64_t>& rows) {
  rows.clear();
  for (int64_t p = compress_history_start(start, ratio); p < start + n; ++p) rows.push_back(p % row_count);
  const CompressRequestBatch req{start, n, rows};
  return build_compress_plan(std::span<const CompressRequestBatch>(&req, 1), ratio, row_count);
}

TEST(KernelsCompressorPlan, C4BlockZeroHasNoOverlapRows) {
  std::vector<int64_t> rows;
  const CompressPlan fresh = plan_for(4, 0, 4, 16, rows);
  ASSERT_EQ(fresh.blocks.size(), 1u);
  EXPECT_EQ(fresh.blocks[0].block, 0);
  EXPECT_EQ(fresh.blocks[0].buffer_len, 4);
  for (int64_t i = 0; i < 4; ++i) {
    EXPECT_EQ(fresh.sources[static_cast<size_t>(i)].kind, Kind::none) << i;
    EXPECT_EQ(fresh.sources[static_cast<size_t>(i)].index, -1) << i;
    EXPECT_EQ(fresh.sources[static_cast<size_t>(4 + i)].kind, Kind::input) << i;
    EXPECT_EQ(fresh.sources[static_cast<size_t>(4 + i)].index, i) << i;
  }
  // Resumed after two tokens: no overlap, two buffered rows, two input rows.
  const CompressPlan resumed = plan_for(4, 2, 2, 16, rows);
  ASSERT_EQ(resumed.blocks.size(), 1u);
  EXPECT_EQ(resumed.blocks[0].buffer_len, 6);
  EXPECT_EQ(resumed.sources[4].kind, Kind::state);
  EXPECT_EQ(resumed.sources[4].index, 0);
  EXPECT_EQ(resumed.sources[5].index, 1);
  EXPECT_EQ(resumed.sources[6].kind, Kind::input);
  EXPECT_EQ(resumed.sources[6].index, 0);
  // Block 1 overlaps block 0 read from the state.
  const CompressPlan next = plan_for(4, 4, 4, 16, rows);
  ASSERT_EQ(next.blocks.size(), 1u);
  EXPECT_EQ(next.blocks[0].buffer_len, 4);
  EXPECT_EQ(next.sources[0].kind, Kind::state);
  EXPECT_EQ(next.sources[3].index, 3);
}

TEST(KernelsCompressorPlan, StoresOnlyRowsALaterBatchReads) {
  std::vector<int64_t> rows;
  // c4, 10 tokens: the last complete block (4..7, its A halves) and the unfinished one (8, 9).
  const CompressPlan c4 = plan_for(4, 0, 10, 16, rows);
  ASSERT_EQ(c4.write_rows.size(), 10u);
  for (int64_t t = 0; t < 4; ++t) EXPECT_EQ(c4.write_rows[static_cast<size_t>(t)], -1) << t;
  for (int64_t t = 4; t < 10; ++t) EXPECT_EQ(c4.write_rows[static_cast<size_t>(t)], t) << t;
  // c128, 130 tokens: only the unfinished block's two tokens.
  const CompressPlan c128 = plan_for(128, 0, 130, 256, rows);
  EXPECT_EQ(c128.blocks.size(), 1u);
  EXPECT_EQ(c128.write_rows[127], -1);
  EXPECT_EQ(c128.write_rows[128], 128);
  EXPECT_EQ(c128.write_rows[129], 129);
}

// A verify batch whose tail may be rejected stores every token's row: the block it completes at
// its last (draft) position is then pooled again by the next batch, from the state. The completing
// position's own row is not stored (a rejected one is fed again as input; an accepted one ends the
// block), as in a decode batch; on ratio 4 it is (the next block's overlap reads it).
TEST(KernelsCompressorPlan, StoreEveryRowForSpeculativeVerify) {
  std::vector<int64_t> rows;
  for (int64_t p = compress_history_start(14, 16); p < 16; ++p) rows.push_back(p);
  const CompressRequestBatch req{14, 2, rows};  // positions 14, 15: 15 completes block 0
  const CompressPlan plain = build_compress_plan(std::span<const CompressRequestBatch>(&req, 1), 16, 64);
  EXPECT_EQ(plain.write_rows, (std::vector<int64_t>{-1, -1}));
  const CompressPlan verify = build_compress_plan(std::span<const CompressRequestBatch>(&req, 1), 16, 64, true);
  EXPECT_EQ(verify.write_rows, (std::vector<int64_t>{14, -1}));
  std::vector<int64_t> rows4;
  for (int64_t p = compress_history_start(6, 4); p < 8; ++p) rows4.push_back(p);
  const CompressRequestBatch req4{6, 2, rows4};  // positions 6, 7: 7 completes block 1
  const CompressPlan verify4 = build_compress_plan(std::span<const CompressRequestBatch>(&req4, 1), 4, 64, true);
  EXPECT_EQ(verify4.write_rows, (std::vector<int64_t>{6, 7}));
  EXPECT_EQ(verify.blocks.size(), plain.blocks.size());
  EXPECT_EQ(verify.sources.size(), plain.sources.size());
}

TEST(KernelsCompressorPlan, HistoryStart) {
  EXPECT_EQ(compress_history_start(0, 4), 0);
  EXPECT_EQ(compress_history_start(7, 4), 0);
  EXPECT_EQ(compress_history_start(8, 4), 4);
  EXPECT_EQ(compress_history_start(130, 128), 128);
  EXPECT_THROW(compress_history_start(-1, 4), ContractError);
}

TEST(KernelsCompressorPlan, BuilderRefusesUnmappedOrShortRows) {
  std::vector<int64_t> rows = {0, 1, -1};  // position 2 has no state row
  const CompressRequestBatch req{1, 2, rows};
  EXPECT_THROW(build_compress_plan(std::span<const CompressRequestBatch>(&req, 1), 128, 256), ContractError);
  std::vector<int64_t> short_rows = {0};
  const CompressRequestBatch short_req{1, 2, short_rows};
  EXPECT_THROW(build_compress_plan(std::span<const CompressRequestBatch>(&short_req, 1), 128, 256), ContractError);
  std::vector<int64_t> big = {0, 1, 256};  // past the buffer
  const CompressRequestBatch big_req{1, 2, big};
  EXPECT_THROW(build_compress_plan(std::span<const CompressRequestBatch>(&big_req, 1), 128, 256), ContractError);
}

// --- the kernels' contracts ---------------------------------------------------------------------

struct Small {
  CompressStateLayout layout;
  Tensor state, kv, score, norm, freqs, out;
  CompressPlan plan;
  std::vector<int64_t> rows;
  Small() {
    const serving::StateRowLayout l = serving::state_row_layout(4, 8);
    layout = l.kernel_layout();
    state = Tensor::empty({16, layout.row_bytes}, DType::u8, "state");
    state.fill(0);
    kv = Tensor::empty({4, 16}, DType::f32, "kv");
    kv.fill(0.5);
    score = Tensor::empty({4, 16}, DType::f32, "score");
    score.fill(0.25);
    norm = Tensor::empty({8}, DType::f32, "norm");
    norm.fill(1.0);
    freqs = Tensor::empty({2}, DType::f32, "freqs");
    freqs.fill(0.5);
    out = Tensor::empty({1, 8}, DType::f32, "out");
    plan = plan_for(4, 0, 4, 16, rows);
  }
};

TEST(KernelsCompressorContract, WriteRowOutOfRange) {
  Small s;
  EXPECT_NO_THROW(compressor_write_state_host(s.kv, s.score, i64_tensor({0, 1, 2, -1}, "rows"), s.state, s.layout));
  EXPECT_THROW(compressor_write_state_host(s.kv, s.score, i64_tensor({0, 1, 16, -1}, "rows"), s.state, s.layout),
               ContractError);
  EXPECT_THROW(compressor_write_state_host(s.kv, s.score, i64_tensor({0, -2, 1, 2}, "rows"), s.state, s.layout),
               ContractError);
  CompressPlan bad = s.plan;
  bad.write_rows[1] = 16;
  EXPECT_THROW(check_compress_plan(bad, 4, 16), ContractError);
}

TEST(KernelsCompressorContract, PoolSourceOutOfRange) {
  Small s;
  EXPECT_NO_THROW(compressor_pool_host(s.plan, s.kv, s.score, s.state, s.layout, s.norm, s.freqs, {}, s.out));
  // A state source past the buffer.
  CompressPlan bad_state = s.plan;
  bad_state.sources[0] = {Kind::state, 16};
  EXPECT_THROW(compressor_pool_host(bad_state, s.kv, s.score, s.state, s.layout, s.norm, s.freqs, {}, s.out),
               ContractError);
  // An input source past the batch.
  CompressPlan bad_input = s.plan;
  bad_input.sources[7] = {Kind::input, 4};
  EXPECT_THROW(compressor_pool_host(bad_input, s.kv, s.score, s.state, s.layout, s.norm, s.freqs, {}, s.out),
               ContractError);
  // An input row holding the wrong position.
  CompressPlan wrong_pos = s.plan;
  wrong_pos.sources[7] = {Kind::input, 2};
  EXPECT_THROW(check_compress_plan(wrong_pos, 4, 16), ContractError);
  // buffer_len that does not split state from input.
  CompressPlan bad_split = s.plan;
  bad_split.blocks[0].buffer_len = 5;
  EXPECT_THROW(check_compress_plan(bad_split, 4, 16), ContractError);
  // An output with the wrong row count.
  Tensor out2 = Tensor::empty({2, 8}, DType::f32, "out");
  EXPECT_THROW(compressor_pool_host(s.plan, s.kv, s.score, s.state, s.layout, s.norm, s.freqs, {}, out2),
               ContractError);
}

TEST(KernelsCompressorContract, LayoutMustFitTheRow) {
  Small s;
  CompressStateLayout bad = s.layout;
  bad.score_offset_bytes[1] = bad.row_bytes - 4;
  EXPECT_THROW(compressor_write_state_host(s.kv, s.score, i64_tensor({0, 1, 2, 3}, "rows"), s.state, bad),
               ContractError);
}

}  // namespace
}  // namespace dsv4::kernels
