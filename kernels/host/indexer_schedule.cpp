// The indexer logits kernel's schedule (get_paged_mqa_logits_metadata's split) and the layout helpers
// around it. See kernels/indexer_logits.h for the work model.
#include <algorithm>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "engine/core/contract.h"
#include "engine/core/error.h"
#include "kernels/host/host_common.h"
#include "kernels/indexer_logits.h"

namespace dsv4::kernels {

using namespace host;  // the shared helpers of kernels/host/host_common.h
namespace {

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Key blocks of work per schedule row (its tokens' ceil(len / block_kv), summed j-major).
std::vector<int64_t> row_work_blocks(const Tensor& context_lens, int64_t block_kv) {
  const int64_t rows = context_lens.size(0);
  const int64_t next_n = context_lens.size(1);
  const int32_t* lens = context_lens.data<int32_t>();
  std::vector<int64_t> work(static_cast<size_t>(rows), 0);
  for (int64_t b = 0; b < rows; ++b) {
    int64_t sum = 0;
    for (int64_t j = 0; j < next_n; ++j) sum += ceil_div(lens[b * next_n + j], block_kv);
    // Entries store the offset within a row as int32.
    if (sum > kInt32Max) {
      throw ContractError(kIndexerScheduleOp, "context_lens",
                          "row " + std::to_string(b) + " has " + std::to_string(sum) +
                              " key blocks of work, more than an int32 schedule entry holds");
    }
    work[static_cast<size_t>(b)] = sum;
  }
  return work;
}

}  // namespace

void check_indexer_schedule_contract(const Tensor& context_lens, int64_t block_kv, int64_t num_sms) {
  static const Contract contract = Contract(kIndexerScheduleOp)
                                       .arg("context_lens")
                                       .dtype(DType::i32)
                                       .rank(2)
                                       .contiguous()
                                       .values_in(0, kInt32Max);
  contract.check({{"context_lens", &context_lens}});
  require_host(kIndexerScheduleOp, "context_lens", context_lens);
  if (block_kv < 1) throw ContractError(kIndexerScheduleOp, "block_kv", "must be >= 1, got " + std::to_string(block_kv));
  if (num_sms < 1) throw ContractError(kIndexerScheduleOp, "num_sms", "must be >= 1, got " + std::to_string(num_sms));
  // The schedule tensor is [num_sms + 1, 2] int32 and its row entries are int32.
  if (num_sms >= kInt32Max) throw ContractError(kIndexerScheduleOp, "num_sms", "too large for an int32 schedule");
  if (context_lens.size(0) >= kInt32Max) {
    throw ContractError(kIndexerScheduleOp, "context_lens", "more rows than an int32 schedule entry holds");
  }
}

Tensor build_indexer_schedule(const Tensor& context_lens, int64_t block_kv, int64_t num_sms) {
  check_indexer_schedule_contract(context_lens, block_kv, num_sms);
  const int64_t rows = context_lens.size(0);
  const std::vector<int64_t> work = row_work_blocks(context_lens, block_kv);
  int64_t total_blocks = 0;
  for (int64_t w : work) total_blocks += w;

  // Cut W into num_sms ranges, the first W % num_sms of them one block longer.
  const int64_t per_sm_blocks = total_blocks / num_sms;
  const int64_t extra_blocks = total_blocks % num_sms;
  Tensor schedule = Tensor::empty({num_sms + 1, 2}, DType::i32, "indexer_schedule");
  int32_t* out = schedule.data<int32_t>();
  int64_t b = 0;
  int64_t before_row_blocks = 0;  // the work of rows [0, b)
  for (int64_t s = 0; s <= num_sms; ++s) {
    const int64_t target = s * per_sm_blocks + std::min(s, extra_blocks);
    // Skip rows that end at or before the target: empty rows never hold a start. Bounded by rows.
    while (b < rows && before_row_blocks + work[static_cast<size_t>(b)] <= target) {
      before_row_blocks += work[static_cast<size_t>(b)];
      ++b;
    }
    out[2 * s] = static_cast<int32_t>(b);
    out[2 * s + 1] = static_cast<int32_t>(b < rows ? target - before_row_blocks : 0);
  }
  return schedule;
}

Tensor to_2d_context_lens(const Tensor& lens) {
  const char* op = "to_2d_context_lens";
  if (!lens.defined()) throw ContractError(op, "lens", "is undefined");
  if (lens.dtype() != DType::i32) throw ContractError(op, "lens", "must be int32, got " + std::string(dtype_name(lens.dtype())));
  if (lens.dim() != 1 && lens.dim() != 2) {
    throw ContractError(op, "lens", "must be rank 1 or 2, got shape " + shape_str(lens.shape()));
  }
  // A view of a persistent buffer when one exists, so a captured graph still sees in-place updates.
  Tensor flat = lens.reshape({lens.numel(), 1});
  return flat.is_contiguous() ? flat : flat.contiguous();
}

Tensor expand_block_table_per_token(const Tensor& block_table, int64_t next_n) {
  static const Contract contract =
      Contract("expand_block_table_per_token").arg("block_table").dtype(DType::i32).rank(2).contiguous();
  contract.check({{"block_table", &block_table}});
  require_host("expand_block_table_per_token", "block_table", block_table);
  if (next_n < 1) throw ContractError("expand_block_table_per_token", "next_n", "must be >= 1");
  const int64_t rows = block_table.size(0);
  const int64_t pages = block_table.size(1);
  Tensor out = Tensor::empty({rows * next_n, pages}, DType::i32, "block_table_per_token");
  const int32_t* in = block_table.data<int32_t>();
  int32_t* dst = out.data<int32_t>();
  for (int64_t b = 0; b < rows; ++b) {
    for (int64_t j = 0; j < next_n; ++j) std::copy_n(in + b * pages, pages, dst + (b * next_n + j) * pages);
  }
  return out;
}

std::optional<std::string> indexer_schedule_mismatch(const Tensor& schedule, const Tensor& context_lens,
                                                     int64_t block_kv, int64_t num_sms) {
  const Tensor fresh = build_indexer_schedule(context_lens, block_kv, num_sms);
  if (!schedule.defined()) return std::string("schedule is undefined");
  require_host("indexer_schedule_mismatch", "schedule", schedule);
  if (schedule.dtype() != DType::i32 || schedule.shape() != fresh.shape()) {
    return "schedule is " + std::string(dtype_name(schedule.dtype())) + " " + shape_str(schedule.shape()) +
           ", the fresh one int32 " + shape_str(fresh.shape());
  }
  const Tensor have = schedule.contiguous();
  for (int64_t s = 0; s <= num_sms; ++s) {
    const int32_t* a = have.data<int32_t>() + 2 * s;
    const int32_t* f = fresh.data<int32_t>() + 2 * s;
    if (a[0] != f[0] || a[1] != f[1]) {
      return "entry " + std::to_string(s) + " is (" + std::to_string(a[0]) + ", " + std::to_string(a[1]) +
             "), the fresh schedule has (" + std::to_string(f[0]) + ", " + std::to_string(f[1]) + ")";
    }
  }
  return std::nullopt;
}

}  // namespace dsv4::kernels
