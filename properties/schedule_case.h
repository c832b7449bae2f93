// The indexer-schedule suite (bug class A3, "schedule consumer/producer agree"): for context lengths
// on the corners (zeros, block multiples ± 1, all equal, all zero), next_n 1..4, either layout and
// 1..132 SMs, the schedule of kernels/indexer_logits.h partitions the launched work exactly in
// near-equal contiguous pieces, and the real cooperative kernel, run on the sim backend, completes
// with the right logits. A schedule built from another layout or from stale lengths never passes.
//
// Also the scalar model of the kernel's work loop (ScheduleWork, model_schedule_walks, ...), shared
// with tests/unit/test_indexer_schedule_property.cpp so the model lives in one place.
#pragma once

#include <rapidcheck.h>

#include <compare>
#include <cstdint>
#include <optional>
#include <ostream>
#include <string>
#include <vector>

#include "engine/core/tensor.h"
#include "properties/scenario.h"
#include "properties/verdict.h"

namespace dsv4::props {

// ---- the scalar model --------------------------------------------------------------------------

// Where SM s starts: key block `offset_blocks` of schedule row `row` (a schedule tensor's entry s).
struct ScheduleEntry {
  int64_t row = 0;
  int64_t offset_blocks = 0;
  bool operator==(const ScheduleEntry&) const = default;
  auto operator<=>(const ScheduleEntry&) const = default;  // lexicographic, as the kernel orders entries
};

// The work as the kernel sees it in one layout: `rows` schedule rows of `next_n` tokens each.
struct ScheduleWork {
  int64_t rows = 0;
  int64_t next_n = 1;
  std::vector<int64_t> token_blocks;       // rows * next_n: ceil(len / block_kv)
  std::vector<int64_t> row_blocks;         // rows: the sum over the row's tokens
  std::vector<int64_t> before_row_blocks;  // rows + 1: prefix sums of row_blocks
  int64_t total_blocks() const { return before_row_blocks.back(); }
};

// `lens` holds rows * next_n values, row-major.
ScheduleWork schedule_work(const std::vector<int32_t>& lens, int64_t rows, int64_t next_n, int64_t block_kv);

// The entries of an int32 [num_sms + 1, 2] schedule tensor.
std::vector<ScheduleEntry> schedule_entries(const Tensor& schedule);

// What the kernel's loop does with a schedule, modelled from kernels/indexer_logits.h: each SM
// walks from its entry towards the next one; a step does a key block or moves to the next row; a
// walk that passes the last row stops there.
struct ScheduleWalks {
  std::vector<int64_t> visits;    // per key block of the work, row-major: how many SMs did it
  std::vector<bool> reached_end;  // per SM: it met the next entry
  bool within_bound = true;       // every walk stopped within W + rows + 1 steps
};
ScheduleWalks model_schedule_walks(const ScheduleWork& work, const std::vector<ScheduleEntry>& entries);

// The kernel's counters after the walks: every token's last block done and its counter at target,
// and the done-block counter equal to the work. False means a block waits forever (a hang).
bool schedule_counters_complete(const ScheduleWork& work, const ScheduleWalks& walks);
bool every_block_once(const ScheduleWalks& walks);

// The first way `entries` is not the schedule of `work` on `num_sms` SMs: a wrong entry count, a
// start that names no work, ranges that do not cut W into num_sms contiguous pieces whose sizes
// differ by at most one (the longer ones first), or a modelled walk that misses its end, does a
// block twice or leaves a counter short. nullopt when it is that schedule (which is unique).
std::optional<std::string> schedule_partition_error(const ScheduleWork& work,
                                                    const std::vector<ScheduleEntry>& entries, int64_t num_sms);

// ---- the suite -----------------------------------------------------------------------------------

// "per-token", "native": the values of ScheduleSpec::layout, in generator order.
const std::vector<std::string>& schedule_layouts();

// InputError("scenario", "schedule_case.<field>", ...) for a spec the property cannot run: sizes that
// disagree, next_n outside 1..4, an unknown layout, block_kv or num_sms < 1, a negative length, or
// sizes past the bounds that keep a case small (lengths <= 16384, rows <= 256, block_kv and num_sms
// <= 1024).
void validate_schedule_spec(const ScheduleSpec& spec);

// The spec's context lengths as the kernel sees them in `layout`: int32 [rows, next_n] (native) or
// [rows * next_n, 1] (per-token). `lens` replaces spec.context_lens when given (same count).
Tensor schedule_context_lens(const ScheduleSpec& spec, const std::string& layout,
                             const std::optional<std::vector<int32_t>>& lens = std::nullopt);

// How a run departs from the correct one, for tests that build a broken case on purpose (the
// generated cases never do). Unset members take the correct value.
struct ScheduleCaseRun {
  std::optional<std::string> kernel_layout;          // the layout the kernel runs (the schedule is built in spec.layout)
  std::optional<std::vector<int32_t>> schedule_lens;  // the lengths the schedule is built from (stale ones: a replay without a refresh)
};

// The property: build_indexer_schedule from the lens in spec.layout; that schedule must partition
// the launched work (schedule_partition_error); the cooperative kernel (make_indexer_logits_launch)
// on a sim runtime, with small random q, keys and weights derived from the spec, must complete with
// the logits of a direct computation. Verdicts: `hang` (signature "indexer_logits") for a HangError;
// `mismatch` for wrong logits ("indexer_logits") or a wrong partition ("indexer_schedule");
// `contract-error` ("op:argument") for a ContractError on valid input. A hang or wrong logits is
// reported ahead of a wrong partition, with the partition's problem in the detail.
// InputError as validate_schedule_spec (and "schedule_case.kernel_layout" /
// "schedule_case.schedule_lens" for a bad `run`).
Verdict check_schedule_case(const ScheduleSpec& spec);
Verdict check_schedule_case(const ScheduleSpec& spec, const ScheduleCaseRun& run);

// Specs on the corners on purpose: rows 0..10, next_n min_next_n..4, block_kv in {64, 1, 2, 3, 16},
// lengths mixed (zeros, block multiples ± 1, anything up to 6 blocks), all near multiples, all equal
// or all zero; either layout; 1..132 SMs, weighted to 1..8 and to real SM counts. Composed with
// mapcat and tuple so a case shrinks as one value (fewer rows, zeros, smaller SM counts).
rc::Gen<ScheduleSpec> gen_schedule_spec();
rc::Gen<ScheduleSpec> gen_schedule_spec(int64_t min_next_n);

// "native rows 2 next_n 3 block_kv 64 sms 4 lens [..]", for reports and RapidCheck's counterexamples.
std::string describe(const ScheduleSpec& spec);
void showValue(const ScheduleSpec& spec, std::ostream& os);

}  // namespace dsv4::props
