// The indexer logits kernel as a cooperative launch (one coroutine per SM) and the top-k of a row.
//
// How the blocks cooperate, as a persistent kernel's CTAs do through global-memory counters:
//   1. prologue: rows with no key blocks are written -inf (grid-stride; nobody waits for them);
//   2. walk: SM s processes the key blocks from schedule[s] to schedule[s + 1]; after each it bumps
//      its token row's completion counter and the grid's done-block counter;
//   3. hand-over: the SM that processes a row's last key block finishes the row (the -inf tail, the
//      row published as ready) once the row's counter shows every earlier SM's part is in;
//   4. exit barrier: every SM waits until all SMs arrived, the done-block counter equals the work
//      the launched context_lens define and every row is finished.
// When the schedule partitions the launched work, every wait is satisfied (a row's parts all lie in
// the same or earlier ranges). When it does not, a key block is missed (its row's counter or the
// finished-row count never reaches its target) or done twice (the done-block counter passes its
// target), and the kernel hangs: it has no other way to see the mismatch.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <numeric>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "engine/core/contract.h"
#include "engine/core/error.h"
#include "kernels/device.h"
#include "kernels/host/host_common.h"
#include "kernels/indexer_logits.h"

namespace dsv4::kernels {

using namespace host;  // the shared helpers of kernels/host/host_common.h
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The launch's fixed geometry; the tensors are read when the launch runs.
struct Plan {
  IndexerLogitsArgs args;
  int64_t rows = 0;  // schedule rows N (context_lens dim 0)
  int64_t next_n = 0;
  int64_t heads = 0;
  int64_t head_dim = 0;
  int64_t max_pages = 0;
  int64_t max_context = 0;
  int64_t block_kv = 0;
  int64_t num_sms = 0;
  int64_t tokens() const { return rows * next_n; }
};

// The kernel's global-memory workspace: zeroed before every launch, as a memset ahead of it would.
struct GridState {
  std::vector<int64_t> token_done_blocks;  // per token row: key blocks written so far
  std::vector<uint8_t> token_finished;     // per token row: tail written, row published
  int64_t done_blocks = 0;
  int64_t finished_rows = 0;
  int64_t arrived_sms = 0;
  int64_t total_blocks = 0;  // the work the launched context_lens define
};

int64_t token_blocks(const Plan& p, const int32_t* lens, int64_t token) { return ceil_div(lens[token], p.block_kv); }

std::shared_ptr<GridState> fresh_grid_state(const Plan& p) {
  auto grid = std::make_shared<GridState>();
  grid->token_done_blocks.assign(static_cast<size_t>(p.tokens()), 0);
  grid->token_finished.assign(static_cast<size_t>(p.tokens()), 0);
  const int32_t* lens = p.args.context_lens.data<int32_t>();
  for (int64_t t = 0; t < p.tokens(); ++t) grid->total_blocks += token_blocks(p, lens, t);
  return grid;
}

// q · k with f32 products accumulated in f64, rounded once to f32.
float dot_f32(const float* a, const float* b, int64_t n) {
  double acc = 0.0;
  for (int64_t i = 0; i < n; ++i) acc += static_cast<double>(a[i] * b[i]);
  return static_cast<float>(acc);
}

// Scores keys [first_key, end_key) of token (b, j) into its logits row.
void score_keys(const Plan& p, int64_t b, int64_t j, int64_t first_key, int64_t end_key) {
  const int64_t token = b * p.next_n + j;
  const int64_t page_keys = kIndexerPageKeys;
  const float* q = p.args.q.data<float>() + token * p.heads * p.head_dim;  // q[b, j] is token's slice
  const float* w = p.args.weights.data<float>() + token * p.heads;
  const int32_t* table = p.args.block_table.data<int32_t>() + b * p.max_pages;
  const float* pages = p.args.kv_pages.data<float>();
  float* out = p.args.logits.data<float>() + token * p.max_context;
  for (int64_t key = first_key; key < end_key; ++key) {
    const int64_t page = table[key / page_keys];
    const float* k = pages + (page * page_keys + key % page_keys) * p.head_dim;
    double sum = 0.0;
    for (int64_t h = 0; h < p.heads; ++h) {
      const float logit = dot_f32(q + h * p.head_dim, k, p.head_dim);
      sum += static_cast<double>(w[h] * std::max(logit, 0.0f));  // ReLU before the weighting
    }
    out[key] = static_cast<float>(sum);
  }
}

// The -inf tail [len, max_context) and the row published; a second finish (a key block done twice)
// publishes nothing new, so the finished-row count stays a count of distinct rows.
void finish_row(const Plan& p, GridState& grid, int64_t token, int64_t len) {
  float* out = p.args.logits.data<float>() + token * p.max_context;
  std::fill(out + len, out + p.max_context, kNegInf);
  if (grid.token_finished[static_cast<size_t>(token)] == 0) {
    grid.token_finished[static_cast<size_t>(token)] = 1;
    ++grid.finished_rows;
  }
}

std::string token_name(const Plan& p, int64_t token) {
  return "token row " + std::to_string(token) + " (b " + std::to_string(token / p.next_n) + ", j " +
         std::to_string(token % p.next_n) + ")";
}

rt::BlockTask logits_block(rt::BlockContext& ctx, std::shared_ptr<const Plan> plan, std::shared_ptr<GridState> grid) {
  const Plan& p = *plan;
  const int64_t sm = ctx.block();
  const int32_t* lens = p.args.context_lens.data<int32_t>();

  // 1. Rows without work: all -inf, no hand-over.
  for (int64_t t = sm; t < p.tokens(); t += p.num_sms) {
    if (token_blocks(p, lens, t) == 0) finish_row(p, *grid, t, 0);
  }

  // 2./3. The scheduled range, read in the launched layout's coordinates.
  const int32_t* schedule = p.args.schedule.data<int32_t>();
  int64_t b = schedule[2 * sm];
  int64_t offset_blocks = schedule[2 * sm + 1];
  const int64_t end_b = schedule[2 * sm + 2];
  const int64_t end_offset_blocks = schedule[2 * sm + 3];
  // Each step does one key block or moves to the next row: W + rows + 1 steps reach any end.
  const int64_t step_limit = grid->total_blocks + p.rows + 1;
  for (int64_t step = 0;; ++step) {
    DSV4_ASSERT(step <= step_limit, "indexer_logits: an SM's walk outran its step bound");
    if (b == end_b && offset_blocks == end_offset_blocks) break;
    if (b >= p.rows) break;  // walked past the launched rows: only an end it never meets gets here
    // Which token of row b holds this offset (the row's work is its tokens' key blocks, j-major).
    int64_t j = 0;
    int64_t o = offset_blocks;
    while (j < p.next_n && o >= token_blocks(p, lens, b * p.next_n + j)) {
      o -= token_blocks(p, lens, b * p.next_n + j);
      ++j;
    }
    if (j == p.next_n) {  // past row b's work
      ++b;
      offset_blocks = 0;
      continue;
    }
    const int64_t token = b * p.next_n + j;
    const int64_t len = lens[token];
    const int64_t need_blocks = token_blocks(p, lens, token);
    score_keys(p, b, j, o * p.block_kv, std::min(len, (o + 1) * p.block_kv));
    ++grid->token_done_blocks[static_cast<size_t>(token)];
    ++grid->done_blocks;
    if (o == need_blocks - 1) {
      // This SM owns the row's last block: the row is published only when every part is in.
      // Named awaitables: GCC 12 destroys non-trivial temporaries of a co_await expression twice.
      GridState* g = grid.get();
      auto row_complete = ctx.wait_until(
          [g, token, need_blocks] { return g->token_done_blocks[static_cast<size_t>(token)] >= need_blocks; },
          token_name(p, token) + ": done-block counter to reach " + std::to_string(need_blocks) +
              " (the earlier SMs' parts)");
      co_await row_complete;
      finish_row(p, *grid, token, len);
    }
    ++offset_blocks;
  }

  // 4. Exit barrier: all SMs in, the launched work done exactly once, every row finished.
  ++grid->arrived_sms;
  const int64_t sms = p.num_sms;
  const int64_t tokens = p.tokens();
  GridState* g = grid.get();
  auto all_done = ctx.wait_until(
      [g, sms, tokens] {
        return g->arrived_sms == sms && g->done_blocks == g->total_blocks && g->finished_rows == tokens;
      },
      "exit barrier: " + std::to_string(sms) + " SMs arrived, done-block counter == " +
          std::to_string(grid->total_blocks) + ", " + std::to_string(tokens) + " rows finished");
  co_await all_done;
}

}  // namespace

void check_indexer_logits_contract(const IndexerLogitsArgs& a, Contract::Values values) {
  // One device for all; the value rules read host memory only.
  const bool gpu = runs_on_gpu(kIndexerLogitsOp, {{"q", &a.q},
                                                  {"kv_pages", &a.kv_pages},
                                                  {"block_table", &a.block_table},
                                                  {"weights", &a.weights},
                                                  {"context_lens", &a.context_lens},
                                                  {"schedule", &a.schedule},
                                                  {"logits", &a.logits}});
  if (gpu) values = Contract::Values::skip;
  static const Contract contract = Contract(kIndexerLogitsOp)
                                       .arg("q").dtype(DType::f32).rank(4).contiguous()
                                       .arg("kv_pages").dtype(DType::f32).rank(3).contiguous()
                                       .dim(1, kIndexerPageKeys).same_size(2, "q", 3)
                                       .arg("block_table").dtype(DType::i32).rank(2).contiguous()
                                       .same_size(0, "q", 0).values_index_into(0, "kv_pages", 0)
                                       .arg("weights").dtype(DType::f32).rank(2).contiguous().same_size(1, "q", 2)
                                       .arg("context_lens").dtype(DType::i32).rank(2).contiguous()
                                       .same_size(0, "q", 0).same_size(1, "q", 1)
                                       .arg("schedule").dtype(DType::i32).rank(2).contiguous().dim(1, 2)
                                       .values_in(0, kInt32Max)
                                       .arg("logits").dtype(DType::f32).rank(2).contiguous();
  contract.check({{"q", &a.q},
                  {"kv_pages", &a.kv_pages},
                  {"block_table", &a.block_table},
                  {"weights", &a.weights},
                  {"context_lens", &a.context_lens},
                  {"schedule", &a.schedule},
                  {"logits", &a.logits}},
                 values);
  const char* op = kIndexerLogitsOp;
  if (a.block_kv < 1) throw ContractError(op, "block_kv", "must be >= 1, got " + std::to_string(a.block_kv));
  if (a.num_sms < 1) throw ContractError(op, "num_sms", "must be >= 1, got " + std::to_string(a.num_sms));
  const int64_t tokens = a.q.size(0) * a.q.size(1);
  if (a.weights.size(0) != tokens) {
    throw ContractError(op, "weights", "shape[0] must be N * next_n = " + std::to_string(tokens) + ", got " +
                                           shape_str(a.weights.shape()));
  }
  if (a.logits.size(0) != tokens) {
    throw ContractError(op, "logits", "shape[0] must be N * next_n = " + std::to_string(tokens) + ", got " +
                                          shape_str(a.logits.shape()));
  }
  if (a.schedule.size(0) != a.num_sms + 1) {
    throw ContractError(op, "schedule", "shape must be [num_sms + 1, 2] = [" + std::to_string(a.num_sms + 1) +
                                            ", 2], got " + shape_str(a.schedule.shape()));
  }
  if (values == Contract::Values::skip) return;
  // A length the output row or the block table cannot hold would write or read out of bounds.
  const int64_t max_len = std::min(a.logits.size(1), kIndexerPageKeys * a.block_table.size(1));
  const int32_t* lens = a.context_lens.data<int32_t>();
  for (int64_t t = 0; t < a.context_lens.numel(); ++t) {
    if (lens[t] < 0 || lens[t] > max_len) {
      throw ContractError(op, "context_lens",
                          "values in [0, min(max_context, 64 * max_pages) = " + std::to_string(max_len) +
                              "]: element " + std::to_string(t) + " is " + std::to_string(lens[t]));
    }
  }
  // The cheap schedule invariants a kernel can see; whether it partitions this launch's work it
  // cannot see (that is bug A3's nature), so a wrong one hangs instead.
  const int32_t* s = a.schedule.data<int32_t>();
  for (int64_t i = 0; i < a.num_sms; ++i) {
    const bool ordered = s[2 * i] < s[2 * i + 2] || (s[2 * i] == s[2 * i + 2] && s[2 * i + 1] <= s[2 * i + 3]);
    if (!ordered) {
      throw ContractError(op, "schedule",
                          "entries must be non-decreasing: entry " + std::to_string(i) + " (" + std::to_string(s[2 * i]) +
                              ", " + std::to_string(s[2 * i + 1]) + ") comes after entry " + std::to_string(i + 1) +
                              " (" + std::to_string(s[2 * i + 2]) + ", " + std::to_string(s[2 * i + 3]) + ")");
    }
  }
}

std::function<rt::BlockTask(rt::BlockContext&)> make_indexer_logits_launch(const IndexerLogitsArgs& args) {
  check_indexer_logits_contract(args, Contract::Values::skip);
  // The coroutines read the tensors directly: host memory only.
  require_host(kIndexerLogitsOp, "q", args.q);
  require_host(kIndexerLogitsOp, "kv_pages", args.kv_pages);
  require_host(kIndexerLogitsOp, "block_table", args.block_table);
  require_host(kIndexerLogitsOp, "weights", args.weights);
  require_host(kIndexerLogitsOp, "context_lens", args.context_lens);
  require_host(kIndexerLogitsOp, "schedule", args.schedule);
  require_host(kIndexerLogitsOp, "logits", args.logits);
  auto plan = std::make_shared<Plan>();
  plan->args = args;
  plan->rows = args.q.size(0);
  plan->next_n = args.q.size(1);
  plan->heads = args.q.size(2);
  plan->head_dim = args.q.size(3);
  plan->max_pages = args.block_table.size(1);
  plan->max_context = args.logits.size(1);
  plan->block_kv = args.block_kv;
  plan->num_sms = args.num_sms;
  // Blocks of one launch are created together before any runs; every num_sms-th creation starts a
  // launch and gets a zeroed workspace (graph replays re-run the same closure).
  struct Launches {
    int64_t created_blocks = 0;
    std::shared_ptr<GridState> current;
  };
  auto launches = std::make_shared<Launches>();
  std::shared_ptr<const Plan> fixed = plan;
  return [fixed, launches](rt::BlockContext& ctx) -> rt::BlockTask {
    if (ctx.blocks() != fixed->num_sms) {
      throw ContractError(kIndexerLogitsOp, "blocks",
                          "the launch must have num_sms = " + std::to_string(fixed->num_sms) + " blocks, got " +
                              std::to_string(ctx.blocks()));
    }
    if (launches->created_blocks % fixed->num_sms == 0) {
      check_indexer_logits_contract(fixed->args);  // the values as this run sees them
      launches->current = fresh_grid_state(*fixed);
    }
    ++launches->created_blocks;
    return logits_block(ctx, fixed, launches->current);
  };
}

void indexer_logits(const IndexerLogitsArgs& args) {
  check_indexer_logits_contract(args);  // values too, for host tensors
  if (on_gpu(args.q)) {  // check_indexer_logits_contract has put every tensor on q's device
    DSV4_GPU_OR_FAIL(kIndexerLogitsOp, cuda::indexer_logits(args, current_stream()));
  }
  // The cooperative form, its blocks resumed in turn (lowest first) until all finish; a round in
  // which no unfinished block can resume is a hang (the schedule does not partition the work).
  const auto launch = make_indexer_logits_launch(args);
  const auto n = static_cast<size_t>(args.num_sms);
  std::vector<rt::BlockContext> ctx;
  ctx.reserve(n);  // the coroutines hold references: no reallocation after this
  for (size_t b = 0; b < n; ++b) ctx.emplace_back(static_cast<int>(b), static_cast<int>(n));
  std::vector<rt::BlockTask> tasks;
  tasks.reserve(n);
  for (size_t b = 0; b < n; ++b) tasks.push_back(launch(ctx[b]));
  std::vector<bool> finished(n, false);
  size_t left = n;
  while (left > 0) {
    bool resumed = false;
    for (size_t b = 0; b < n; ++b) {
      if (finished[b] || !ctx[b].can_resume()) continue;
      const auto h = tasks[b].handle();
      h.resume();
      resumed = true;
      if (h.done()) {
        finished[b] = true;
        --left;
        if (h.promise().error) std::rethrow_exception(h.promise().error);
      }
    }
    if (!resumed) {
      std::string detail = "every unfinished block waits on a condition that is false:";
      for (size_t b = 0; b < n; ++b) {
        if (!finished[b]) detail += " block " + std::to_string(b) + " waits for '" + ctx[b].waiting_what() + "';";
      }
      throw std::runtime_error(std::string("hang in '") + kIndexerLogitsOp + "': " + detail + " " +
                               std::to_string(n - left) + " of " + std::to_string(n) + " blocks finished");
    }
  }
}

std::vector<int32_t> topk_indices(std::span<const float> row, int64_t k) {
  const char* op = "topk_indices";
  if (k < 0) throw ContractError(op, "k", "must be >= 0, got " + std::to_string(k));
  if (k > kInt32Max) throw ContractError(op, "k", "must fit int32, got " + std::to_string(k));
  if (row.size() > static_cast<size_t>(kInt32Max)) throw ContractError(op, "row", "longer than int32 indices hold");
  std::vector<int32_t> valid;
  for (size_t i = 0; i < row.size(); ++i) {
    if (std::isnan(row[i])) throw ContractError(op, "row", "NaN score at index " + std::to_string(i));
    if (row[i] != kNegInf) valid.push_back(static_cast<int32_t>(i));
  }
  const size_t take = std::min(valid.size(), static_cast<size_t>(k));
  // Higher score first, ties to the lower index.
  std::partial_sort(valid.begin(), valid.begin() + static_cast<std::ptrdiff_t>(take), valid.end(),
                    [&row](int32_t x, int32_t y) {
                      const float sx = row[static_cast<size_t>(x)];
                      const float sy = row[static_cast<size_t>(y)];
                      return sx > sy || (sx == sy && x < y);
                    });
  valid.resize(take);
  std::sort(valid.begin(), valid.end());
  valid.resize(static_cast<size_t>(k), -1);
  return valid;
}

std::vector<int32_t> topk_indices(const Tensor& logits, int64_t row, int64_t k) {
  static const Contract contract = Contract("topk_indices").arg("logits").dtype(DType::f32).rank(2).contiguous();
  contract.check({{"logits", &logits}});
  if (logits.device().kind != DeviceKind::host) throw ContractError("topk_indices", "logits", "needs a host tensor");
  if (row < 0 || row >= logits.size(0)) {
    throw ContractError("topk_indices", "row", std::to_string(row) + " outside [0, " + std::to_string(logits.size(0)) + ")");
  }
  const int64_t cols = logits.size(1);
  return topk_indices(std::span<const float>(logits.data<float>() + row * cols, static_cast<size_t>(cols)), k);
}

void indexer_topk(const Tensor& logits, const Tensor& block_table, int64_t k, Tensor& topk, Tensor& kv_index,
                  Tensor& lengths) {
  const char* op = kIndexerTopkOp;
  const bool gpu = runs_on_gpu(op, {{"logits", &logits},
                                    {"block_table", &block_table},
                                    {"topk", &topk},
                                    {"kv_index", &kv_index},
                                    {"lengths", &lengths}});
  if (k < 0) throw ContractError(op, "k", "must be >= 0, got " + std::to_string(k));
  if (k > kInt32Max) throw ContractError(op, "k", "must fit int32, got " + std::to_string(k));
  static const Contract contract = Contract(kIndexerTopkOp)
                                       .arg("logits").dtype(DType::f32).rank(2).contiguous()
                                       .arg("block_table").dtype(DType::i32).rank(2).contiguous().same_size(0, "logits", 0)
                                       .arg("topk").dtype(DType::i32).rank(2).contiguous().same_size(0, "logits", 0)
                                       .arg("kv_index").dtype(DType::i32).rank(2).contiguous().same_size(0, "logits", 0)
                                       .arg("lengths").dtype(DType::i32).rank(1).contiguous().same_size(0, "logits", 0);
  contract.check({{"logits", &logits},
                  {"block_table", &block_table},
                  {"topk", &topk},
                  {"kv_index", &kv_index},
                  {"lengths", &lengths}});
  if (topk.size(1) != k) throw ContractError(op, "topk", "shape must be [T, k = " + std::to_string(k) + "], got " + shape_str(topk.shape()));
  if (kv_index.size(1) != k) {
    throw ContractError(op, "kv_index", "shape must be [T, k = " + std::to_string(k) + "], got " + shape_str(kv_index.shape()));
  }
  const int64_t cols = logits.size(1), pages = block_table.size(1);
  if (cols > kIndexerPageKeys * pages) {
    throw ContractError(op, "block_table", "must cover every logits column: 64 * " + std::to_string(pages) + " < " +
                                               std::to_string(cols) + " columns");
  }
  if (cols > kInt32Max) throw ContractError(op, "logits", "more columns than int32 indices hold");
  if (gpu) {
    DSV4_GPU_OR_FAIL(op, cuda::indexer_topk(logits, block_table, k, topk, kv_index, lengths, current_stream()));
  }
  const int64_t rows = logits.size(0);
  const float* lg = logits.data<float>();
  const int32_t* bt = block_table.data<int32_t>();
  int32_t* tk = topk.data<int32_t>();
  int32_t* ix = kv_index.data<int32_t>();
  int32_t* ln = lengths.data<int32_t>();
  for (int64_t t = 0; t < rows; ++t) {
    const std::vector<int32_t> sel = topk_indices(std::span<const float>(lg + t * cols, static_cast<size_t>(cols)), k);
    int32_t count = 0;
    for (int64_t j = 0; j < k; ++j) {
      const int32_t e = sel[static_cast<size_t>(j)];
      tk[t * k + j] = e;
      int32_t loc = -1;
      if (e >= 0) {
        // In 32 bits with wrap-around, as the GPU kernel computes it (the page value is not checked).
        const auto page = static_cast<uint32_t>(bt[t * pages + e / kIndexerPageKeys]);
        loc = static_cast<int32_t>(page * static_cast<uint32_t>(kIndexerPageKeys) +
                                   static_cast<uint32_t>(e % kIndexerPageKeys));
        ++count;
      }
      ix[t * k + j] = loc;
    }
    ln[t] = std::max<int32_t>(1, count);
  }
}

}  // namespace dsv4::kernels
