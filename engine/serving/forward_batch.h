// One step's work for the model (dsv4-model §6, sglang's ForwardBatch): EXTEND runs prefill chunks,
// DECODE one new token per request, IDLE nothing. Each row is a request with its slot, its cached
// length before and after the step, and the positions and full-token locations (out_cache_loc) of
// its new tokens, flattened in row order. DECODE and IDLE run as a CUDA graph of a fixed batch
// size: the rows are padded up to the bucket with IDLE padding rows (slot 0, seq_len 1, position 0,
// out_cache_loc 0), which read and write only the reserved null slot, page and state row.
#pragma once

#include <cstdint>
#include <span>
#include <string_view>
#include <vector>

namespace dsv4::serving {

// TARGET_VERIFY (speculative decoding): each decoding request feeds its newest token and its k draft
// tokens, 1 + k tokens at consecutive positions; padded like DECODE with null rows of 1 + k tokens.
enum class ForwardMode { extend, decode, idle, target_verify };

std::string_view forward_mode_name(ForwardMode mode);

struct ForwardRow {
  static constexpr int64_t kPaddingRequest = -1;

  int64_t request_id = kPaddingRequest;
  int64_t req_slot = 0;
  int64_t seq_len_before = 0;
  int64_t seq_len_after = 0;

  int64_t extend_len() const { return seq_len_after - seq_len_before; }
  bool is_padding() const { return request_id == kPaddingRequest; }
};

struct ForwardBatch {
  ForwardMode mode = ForwardMode::idle;
  int64_t step = 0;
  int64_t bucket_rows = 0;             // DECODE, TARGET_VERIFY and IDLE: the graph's batch size; EXTEND: 0
  int64_t tokens_per_row = 1;          // TARGET_VERIFY: 1 + draft tokens; 1 otherwise
  std::vector<ForwardRow> rows;        // real rows, then padding rows
  std::vector<int64_t> positions;      // one per new token, in row order
  std::vector<int64_t> out_cache_loc;  // the full-token location of each new token
  std::vector<int32_t> input_ids;      // the token each new position feeds (0 for padding)

  int64_t row_count() const { return static_cast<int64_t>(rows.size()); }
  int64_t real_row_count() const;
  int64_t token_count() const { return static_cast<int64_t>(positions.size()); }
  int64_t real_token_count() const;
};

// The smallest bucket >= rows (buckets need not be sorted). ContractError when none is.
int64_t batch_bucket(std::span<const int64_t> buckets, int64_t rows);
// Appends a row and its new tokens (positions seq_len_before .. seq_len_after - 1).
void append_row(ForwardBatch& batch, const ForwardRow& row, std::span<const int64_t> out_cache_loc,
                std::span<const int32_t> input_ids);
// Sets bucket_rows and appends IDLE padding rows up to it. DECODE or IDLE batches only.
void pad_to_bucket(ForwardBatch& batch, std::span<const int64_t> buckets);
// Asserts the batch's internal shape: token arrays agree with the rows, real rows come first,
// padding rows are the null row, and a padded batch has exactly bucket_rows rows.
void check_forward_batch(const ForwardBatch& batch);

}  // namespace dsv4::serving
