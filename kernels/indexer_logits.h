// The lightning indexer's logits path (dsv4-model §2.5, sglang/DeepGEMM realisation): a persistent
// kernel whose per-SM work ranges come from a schedule built from context_lens, and the top-k that
// reads its rows. Host implementations (the `sim` backend's): the kernel is a cooperative launch whose
// blocks hand partial rows over through shared counters, as the real one's CTAs do. CUDA
// implementations (kernels/cuda/indexer_logits.cu, the `cuda` backend's): the same persistent kernel,
// its blocks spinning on global-memory counters, and a block-per-row top-k; the entry points
// indexer_logits and indexer_topk pick the device from their tensors (kernels/device.h).
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
// that never reaches its target, which the sim backend reports as a HangError naming the kernel. On
// a GPU every wait is bounded: when no block has made progress for about 2 s, the waiting block
// prints "hang in indexer_logits: block B waited on row R" (or on the exit barrier) and traps, so the
// launch fails with an error (and the context is lost) instead of hanging the device forever.
//
// Contracts (ContractError naming the argument and the rule):
//   schedule builder: context_lens contiguous int32 rank 2 with values >= 0; block_kv >= 1;
//     num_sms >= 1; host tensors.
//   logits kernel: q [N, next_n, Hi, D] f32; kv_pages [pages, 64, D] f32; block_table [N, max_pages]
//     int32 with values in [0, pages); weights [N * next_n, Hi] f32; context_lens [N, next_n] int32
//     with values in [0, min(max_context, 64 * max_pages)]; logits [N * next_n, max_context] f32;
//     schedule [num_sms + 1, 2] int32, values >= 0, entries non-decreasing (lexicographically);
//     block_kv >= 1; num_sms >= 1; every tensor contiguous and all on one device. The launch must
//     have num_sms blocks; on a GPU all of them must be co-resident (num_sms at most what the device
//     holds at once, else a ContractError). The value rules (block_table, context_lens, schedule)
//     are checked for host tensors only; the GPU kernel given bad values never reads or writes out
//     of bounds: a length is clamped to [0, min(max_context, 64 * max_pages)], a key whose page is
//     outside [0, pages) scores NaN, a negative schedule entry gives its block no work (the launch
//     then fails as a hang unless the range was empty).
//   top-k (indexer_topk): logits [T, C] f32; block_table [T, P] int32 with C <= 64 * P; topk and
//     kv_index [T, k] int32; lengths [T] int32; k >= 0; every tensor contiguous and on one device.
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
// flight); the launch checks them again when it runs. They are skipped for GPU tensors regardless
// (reading them would read device memory). Tensors on different devices are a ContractError.
void check_indexer_logits_contract(const IndexerLogitsArgs& args, Contract::Values values = Contract::Values::check);

// One coroutine per block (SM): the cooperative form of the kernel, for rt::Launch::cooperative with
// blocks = num_sms. Checks the contract's shapes now and all of it (values too) each time the launch
// runs; reads every tensor when the launch runs (so a graph
// replay sees in-place updates of context_lens and a stale schedule alike). Each run starts from fresh
// counters. logits(row, t) = Σ_h w[row, h] · ReLU(q_h · k_t) for t < len, -inf for t >= len.
// Host tensors only (the coroutines read host memory).
std::function<rt::BlockTask(rt::BlockContext&)> make_indexer_logits_launch(const IndexerLogitsArgs& args);

// The whole launch, on the device of its tensors. Host tensors: the cooperative form's num_sms blocks
// run to completion in this thread (resumed in turn, lowest block first); a schedule that does not
// partition the work throws std::runtime_error("hang in 'indexer_logits': ...") naming the waiting
// blocks. GPU tensors: the persistent CUDA kernel on current_stream() (asynchronous; a non-partition
// makes the kernel trap, so the stream's next synchronization reports a launch failure). Both give
// bitwise the same logits.
void indexer_logits(const IndexerLogitsArgs& args);

// ---- top-k --------------------------------------------------------------------------------------

// The k best entries of a logits row by score, ties to the lower index, returned in ascending index
// order and padded with -1 to k; every valid entry when fewer than k are valid (-inf is invalid).
// A NaN score is a ContractError. k >= 0.
std::vector<int32_t> topk_indices(std::span<const float> row, int64_t k);
// Row `row` of a contiguous f32 [rows, cols] logits tensor on the host.
std::vector<int32_t> topk_indices(const Tensor& logits, int64_t row, int64_t k);

inline constexpr const char* kIndexerTopkOp = "indexer_topk";

// The engine's indexer top-k for every row t of logits [T, C]: topk[t] = topk_indices(row t, k) (the
// selection in ascending index order, -1 padded); kv_index[t, i] = the selected key's slot in the
// paged key cache, page * 64 + e % 64 with page = block_table[t, e / 64] (computed in 32 bits, no
// range check: the page value is not dereferenced), -1 where topk is -1; lengths[t] = max(1, number
// of selected keys). On the device of its tensors (kernels/device.h), bitwise the same on both.
// A NaN score: a ContractError on the host; the GPU kernel, which cannot throw, treats it as
// invalid like -inf.
void indexer_topk(const Tensor& logits, const Tensor& block_table, int64_t k, Tensor& topk, Tensor& kv_index,
                  Tensor& lengths);

}  // namespace dsv4::kernels

#if defined(DSV4_WITH_CUDA)
namespace dsv4::kernels::cuda {
// The CUDA implementations on `stream` (a cudaStream_t; nullptr is the default stream); the entry
// points above have checked the contracts. Asynchronous and capturable (no synchronization, scratch
// from gpu::Scratch). indexer_logits raises a ContractError when num_sms blocks cannot all be resident.
void indexer_logits(const IndexerLogitsArgs& args, void* stream);
void indexer_topk(const Tensor& logits, const Tensor& block_table, int64_t k, Tensor& topk, Tensor& kv_index,
                  Tensor& lengths, void* stream);
// The number of blocks of the logits kernel the current device holds at once (queried once per
// device): the largest num_sms a launch may ask for.
int64_t indexer_logits_max_blocks();
}  // namespace dsv4::kernels::cuda
#endif
