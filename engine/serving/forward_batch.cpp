#include "engine/serving/forward_batch.h"

#include <algorithm>
#include <limits>
#include <string>

#include "engine/core/error.h"

namespace dsv4::serving {

std::string_view forward_mode_name(ForwardMode mode) {
  switch (mode) {
    case ForwardMode::extend: return "extend";
    case ForwardMode::decode: return "decode";
    case ForwardMode::idle: return "idle";
    case ForwardMode::target_verify: return "target_verify";
  }
  DSV4_ASSERT(false, "unknown forward mode");
  return "";
}

int64_t ForwardBatch::real_row_count() const {
  int64_t count = 0;
  for (const ForwardRow& row : rows) count += row.is_padding() ? 0 : 1;
  return count;
}

int64_t ForwardBatch::real_token_count() const {
  int64_t count = 0;
  for (const ForwardRow& row : rows) count += row.is_padding() ? 0 : row.extend_len();
  return count;
}

int64_t batch_bucket(std::span<const int64_t> buckets, int64_t rows) {
  DSV4_ASSERT(rows >= 0, "negative row count");
  int64_t best = std::numeric_limits<int64_t>::max();
  for (const int64_t bucket : buckets) {
    if (bucket >= rows && bucket >= 1 && bucket < best) best = bucket;
  }
  if (best == std::numeric_limits<int64_t>::max()) {
    throw ContractError("batch_bucket", "rows",
                        "no CUDA-graph bucket holds " + std::to_string(rows) + " rows");
  }
  return best;
}

void append_row(ForwardBatch& batch, const ForwardRow& row, std::span<const int64_t> out_cache_loc,
                std::span<const int32_t> input_ids) {
  DSV4_ASSERT(row.seq_len_before >= 0, "negative cached length");
  DSV4_ASSERT(row.extend_len() >= 1, "a row feeds at least one token");
  DSV4_ASSERT(static_cast<int64_t>(out_cache_loc.size()) == row.extend_len(), "one location per new token");
  DSV4_ASSERT(static_cast<int64_t>(input_ids.size()) == row.extend_len(), "one input id per new token");
  batch.rows.push_back(row);
  for (int64_t i = 0; i < row.extend_len(); ++i) {
    batch.positions.push_back(row.seq_len_before + i);
    batch.out_cache_loc.push_back(out_cache_loc[static_cast<size_t>(i)]);
    batch.input_ids.push_back(input_ids[static_cast<size_t>(i)]);
  }
}

void pad_to_bucket(ForwardBatch& batch, std::span<const int64_t> buckets) {
  DSV4_ASSERT(batch.mode != ForwardMode::extend, "EXTEND runs without a graph bucket");
  DSV4_ASSERT(batch.bucket_rows == 0, "a batch is padded once");
  // IDLE still replays the smallest graph: every row of it is padding.
  batch.bucket_rows = batch_bucket(buckets, std::max<int64_t>(batch.row_count(), 1));
  const int64_t padding_rows = batch.bucket_rows - batch.row_count();
  DSV4_ASSERT(padding_rows >= 0, "the bucket holds the rows");
  const std::vector<int64_t> null_loc(static_cast<size_t>(batch.tokens_per_row), 0);
  const std::vector<int32_t> null_id(static_cast<size_t>(batch.tokens_per_row), 0);
  for (int64_t i = 0; i < padding_rows; ++i) {
    append_row(batch, ForwardRow{ForwardRow::kPaddingRequest, 0, 0, batch.tokens_per_row}, null_loc, null_id);
  }
  DSV4_ASSERT(batch.row_count() == batch.bucket_rows, "padded to the bucket");
}

void check_forward_batch(const ForwardBatch& batch) {
  int64_t token = 0;
  bool seen_padding = false;
  for (const ForwardRow& row : batch.rows) {
    DSV4_ASSERT(row.extend_len() >= 1, "a row feeds at least one token");
    DSV4_ASSERT(row.seq_len_before >= 0, "negative cached length");
    if (row.is_padding()) {
      seen_padding = true;
      DSV4_ASSERT(batch.mode != ForwardMode::extend, "EXTEND has no padding rows");
      DSV4_ASSERT(row.req_slot == 0, "a padding row uses the null slot");
      DSV4_ASSERT(row.seq_len_before == 0 && row.seq_len_after == batch.tokens_per_row,
                  "a padding row has seq_len 1 (1 + draft tokens in TARGET_VERIFY)");
    } else {
      DSV4_ASSERT(!seen_padding, "real rows come before padding rows");
      DSV4_ASSERT(batch.mode != ForwardMode::idle, "IDLE has padding rows only");
      DSV4_ASSERT(row.req_slot >= 1, "a real row holds a live slot");
      DSV4_ASSERT(batch.mode != ForwardMode::decode || row.extend_len() == 1, "DECODE feeds one token per row");
      DSV4_ASSERT(batch.mode != ForwardMode::target_verify || row.extend_len() == batch.tokens_per_row,
                  "TARGET_VERIFY feeds 1 + draft tokens per row");
    }
    for (int64_t i = 0; i < row.extend_len(); ++i, ++token) {
      DSV4_ASSERT(token < batch.token_count(), "fewer tokens than the rows feed");
      DSV4_ASSERT(batch.positions[static_cast<size_t>(token)] == row.seq_len_before + i, "positions run in order");
      DSV4_ASSERT(!row.is_padding() || batch.out_cache_loc[static_cast<size_t>(token)] == 0,
                  "a padding row writes the null location");
      DSV4_ASSERT(row.is_padding() || batch.out_cache_loc[static_cast<size_t>(token)] > 0,
                  "a real token has a real location");
    }
  }
  DSV4_ASSERT(token == batch.token_count(), "more tokens than the rows feed");
  DSV4_ASSERT(batch.out_cache_loc.size() == batch.positions.size(), "one location per token");
  DSV4_ASSERT(batch.input_ids.size() == batch.positions.size(), "one input id per token");
  if (batch.mode == ForwardMode::extend) {
    DSV4_ASSERT(batch.bucket_rows == 0, "EXTEND has no bucket");
  } else {
    DSV4_ASSERT(batch.row_count() == batch.bucket_rows, "DECODE and IDLE are padded to their bucket");
  }
}

}  // namespace dsv4::serving
