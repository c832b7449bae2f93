// The lightning indexer's logits path (dsv4-model §2.5, sglang/DeepGEMM realisation): a persistent
// kernel whose per-SM work ranges come from a schedule built from context_lens, and the top-k that
// reads its rows. Host implementations (the `sim` backend's); the kernel is a cooperative launch whose
// blocks hand partial rows over through shared counters, as the real one's CTAs do.
//
// Work model. context_lens is [R, next_n]: R "schedule rows" (requests in DeepGEMM's native layout,
// tokens after the (N_total, 1) normalisation) of next_n query tokens each. Token (b, j) has
// ceil(context_lens[b, j] / block_kv) key blocks of work (0 for a length of 0). The work of schedule
// row b is its tokens' key blocks, j-major; rows are walked in order and the total work W is cut into
// num_sms contiguous ranges whose sizes differ by at most one.
//
// Schedule ([num_sms + 1, 2] int32). Entry s = (row b, block offset o within row b's work) where SM s
// starts; entry num_sms = the end, (R, 0). A start always names a row that has work at that offset
// (empty rows are skipped forward), as DeepGEMM's get_paged_mqa_logits_metadata does.
//
// Seed bug A3. The kernel reads entries in the coordinates of the context_lens it is launched with.
// A schedule built from another layout ((B, next_n) while the launch runs per token (N_total, 1), or
// the other way round) or from stale lengths (graph replay without a refresh) then does not
// partition the launched work. The kernel cannot see that: it validates only what a kernel can (the
// schedule's shape, monotone entries), and a non-partition shows up as a block waiting on a counter
// that never reaches its target, which the sim backend reports as a HangError naming the kernel.
//
// Contracts (ContractError naming the argument and the rule):
//   schedule builder: context_lens contiguous int32 rank 2 with values >= 0; block_kv >= 1;
//     num_sms >= 1; host tensors.
//   logits kernel: q [N, next_n, Hi, D] f32; kv_pages [pages, 64, D] f32; block_table [N, max_pages]
//     int32 with values in [0, pages); weights [N * next_n, Hi] f32; context_lens [N, next_n] int32
//     with values in [0, min(max_context, 64 * max_pages)]; logits [N * next_n, max_context] f32;
//     schedule [num_sms + 1, 2] int32, values >= 0, entries non-decreasing (lexicographically);
//     block_kv >= 1; num_sms >= 1; every tensor contiguous and on the host. The launch must have
//     num_sms blocks.
#pragma once

#include <cstdint>
#include <functional>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "engine/core/contract.h"
#include "engine/core/cooperative.h"
#include "engine/core/tensor.h"

namespace dsv4::kernels {

// The op name a launch of the logits kernel should carry (HangError and ContractError name it).
inline constexpr const char* kIndexerLogitsOp = "indexer_logits";
inline constexpr const char* kIndexerScheduleOp = "indexer_schedule";
// Keys per page of the indexer key cache (sglang's page size for the c4 indexer cache).
inline constexpr int64_t kIndexerPageKeys = 64;

// ---- schedule -----------------------------------------------------------------------------------

void check_indexer_schedule_contract(const Tensor& context_lens, int64_t block_kv, int64_t num_sms);

// The persistent kernel's work split (see the header comment): int32 [num_sms + 1, 2].
Tensor build_indexer_schedule(const Tensor& context_lens, int64_t block_kv, int64_t num_sms);

// The (N_total, 1) normalisation (sglang `_to_2d_context_lens`): a (B, next_n) tensor becomes a
// contiguous (B * next_n, 1) one, a 1-D (N) tensor (N, 1). int32, rank 1 or 2.
Tensor to_2d_context_lens(const Tensor& lens);

// The per-token block table: row b of [B, max_pages] repeated next_n times, [B * next_n, max_pages].
Tensor expand_block_table_per_token(const Tensor& block_table, int64_t next_n);

// A harness-side freshness check, not the kernel's: the first difference between `schedule` and the
// schedule built from `context_lens`, or nullopt when they are equal. It catches a stale schedule that
// happens to still partition the work (which the kernel runs correctly, only unbalanced).
std::optional<std::string> indexer_schedule_mismatch(const Tensor& schedule, const Tensor& context_lens,
                                                     int64_t block_kv, int64_t num_sms);

// ---- logits kernel ------------------------------------------------------------------------------

struct IndexerLogitsArgs {
  Tensor q;             // [N, next_n, Hi, D] f32, already rotated and quantised
  Tensor kv_pages;      // [pages, 64, D] f32, the indexer's compressed keys in pages
  Tensor block_table;   // [N, max_pages] int32: page of key t for row b is block_table[b, t / 64]
  Tensor weights;       // [N * next_n, Hi] f32 head weights
  Tensor context_lens;  // [N, next_n] int32 visible keys per query token
  Tensor schedule;      // [num_sms + 1, 2] int32 from build_indexer_schedule
  Tensor logits;        // [N * next_n, max_context] f32 output; -inf beyond each row's length
  int64_t block_kv = kIndexerPageKeys;
  int64_t num_sms = 1;
};

// `values`: skip the rules that read index and length values (at issue time they may still be in
// flight); the launch checks them again when it runs.
void check_indexer_logits_contract(const IndexerLogitsArgs& args, Contract::Values values = Contract::Values::check);

// One coroutine per block (SM): the cooperative form of the kernel, for rt::Launch::cooperative with
// blocks = num_sms. Checks the contract's shapes now and all of it (values too) each time the launch
// runs; reads every tensor when the launch runs (so a graph
// replay sees in-place updates of context_lens and a stale schedule alike). Each run starts from fresh
// counters. logits(row, t) = Σ_h w[row, h] · ReLU(q_h · k_t) for t < len, -inf for t >= len.
std::function<rt::BlockTask(rt::BlockContext&)> make_indexer_logits_launch(const IndexerLogitsArgs& args);

// ---- top-k --------------------------------------------------------------------------------------

// The k best entries of a logits row by score, ties to the lower index, returned in ascending index
// order and padded with -1 to k; every valid entry when fewer than k are valid (-inf is invalid).
// A NaN score is a ContractError. k >= 0.
std::vector<int32_t> topk_indices(std::span<const float> row, int64_t k);
// Row `row` of a contiguous f32 [rows, cols] logits tensor on the host.
std::vector<int32_t> topk_indices(const Tensor& logits, int64_t row, int64_t k);

}  // namespace dsv4::kernels
