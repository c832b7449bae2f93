// "Schedule consumer/producer agree" (bug-classes A3) for the indexer logits kernel's schedule:
// for generated context lens (zeros, block multiples ± 1, all equal, all zero), next_n 1..4, both
// layouts ((B, next_n) and the (N_total, 1) normalisation) and 1..132 SMs, the schedule's ranges
// partition Σ ceil(len / block_kv) exactly, in near-equal contiguous pieces, and a scalar model of
// the kernel's work loop reaches every SM's end. And the kernel's design, modelled: for any
// monotone schedule (stale, another layout's, random), the kernel's counters either see every key
// block exactly once or never reach their targets (a hang), so a wrong schedule is never silent.
//
// The generator and the scalar model are the indexer-schedule suite's (properties/schedule_case.h);
// this test drives them without the kernel, so it stays cheap enough for a thousand cases.
#include <gtest/gtest.h>
#include <rapidcheck.h>
#include <rapidcheck/gtest.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "engine/core/tensor.h"
#include "kernels/indexer_logits.h"
#include "properties/schedule_case.h"

namespace dsv4::kernels {
namespace {

using props::ScheduleEntry;
using props::ScheduleSpec;
using props::ScheduleWalks;
using props::ScheduleWork;

ScheduleWork native_work(const ScheduleSpec& s) {
  return props::schedule_work(s.context_lens, s.rows, s.next_n, s.block_kv);
}
ScheduleWork per_token_work(const ScheduleSpec& s) {
  return props::schedule_work(s.context_lens, s.rows * s.next_n, 1, s.block_kv);
}

// The schedule's own guarantees for the layout it was built from.
void check_partition(const ScheduleWork& w, const std::vector<ScheduleEntry>& e, int64_t sms) {
  if (const std::optional<std::string> error = props::schedule_partition_error(w, e, sms)) RC_FAIL(*error);
}

RC_GTEST_PROP(IndexerScheduleProperty, PartitionsTheWorkInBothLayoutsAndTheLoopTerminates, ()) {
  const ScheduleSpec spec = *props::gen_schedule_spec();
  RC_LOG() << props::describe(spec) << "\n";
  const Tensor native = props::schedule_context_lens(spec, "native");
  const Tensor per_token = to_2d_context_lens(native);
  RC_ASSERT(per_token.size(0) == spec.rows * spec.next_n);
  RC_ASSERT(per_token.size(1) == 1);
  check_partition(native_work(spec), props::schedule_entries(build_indexer_schedule(native, spec.block_kv, spec.num_sms)),
                  spec.num_sms);
  check_partition(per_token_work(spec),
                  props::schedule_entries(build_indexer_schedule(per_token, spec.block_kv, spec.num_sms)), spec.num_sms);
}

// The kernel's soundness, modelled: whatever monotone schedule it is given, it either does every
// key block exactly once (so its logits are right) or its counters never reach their targets.
RC_GTEST_PROP(IndexerScheduleProperty, AnyMonotoneScheduleEitherCoversExactlyOrHangs, ()) {
  const ScheduleSpec spec = *props::gen_schedule_spec();
  const int64_t sms = *rc::gen::inRange<int64_t>(1, 9);
  const ScheduleWork w = spec.layout == "per-token" ? per_token_work(spec) : native_work(spec);
  const int64_t max_row_blocks = w.row_blocks.empty() ? 0 : *std::max_element(w.row_blocks.begin(), w.row_blocks.end());
  std::vector<ScheduleEntry> e;
  for (int64_t s = 0; s <= sms; ++s) {
    e.push_back(ScheduleEntry{*rc::gen::inRange<int64_t>(0, w.rows + 2), *rc::gen::inRange<int64_t>(0, max_row_blocks + 2)});
  }
  std::sort(e.begin(), e.end());
  RC_LOG() << props::describe(spec) << ", schedule on " << sms << " SMs\n";
  const ScheduleWalks walks = props::model_schedule_walks(w, e);
  RC_ASSERT(walks.within_bound);
  const bool completes = props::schedule_counters_complete(w, walks);
  RC_CLASSIFY(completes, "completes");
  RC_CLASSIFY(!completes, "hangs");
  if (completes) RC_ASSERT(props::every_block_once(walks));
}

// The seed bug's mismatch: one layout's schedule launched on the other layout's work is either
// harmless (it still covers every key block once) or a hang; never a silent wrong answer.
RC_GTEST_PROP(IndexerScheduleProperty, ALayoutMismatchedScheduleIsNeverSilentlyWrong, ()) {
  const ScheduleSpec spec = *props::gen_schedule_spec(2);
  const int64_t sms = spec.num_sms;
  RC_LOG() << props::describe(spec) << "\n";
  const Tensor native = props::schedule_context_lens(spec, "native");
  const ScheduleWork native_w = native_work(spec);
  const ScheduleWork per_token_w = per_token_work(spec);
  const std::vector<ScheduleEntry> native_schedule =
      props::schedule_entries(build_indexer_schedule(native, spec.block_kv, sms));
  const std::vector<ScheduleEntry> per_token_schedule =
      props::schedule_entries(build_indexer_schedule(to_2d_context_lens(native), spec.block_kv, sms));
  const ScheduleWalks a = props::model_schedule_walks(per_token_w, native_schedule);  // sglang's A3: (B, next_n) schedule, per-token run
  const ScheduleWalks b = props::model_schedule_walks(native_w, per_token_schedule);  // the other way round
  RC_ASSERT(a.within_bound);
  RC_ASSERT(b.within_bound);
  const bool a_completes = props::schedule_counters_complete(per_token_w, a);
  const bool b_completes = props::schedule_counters_complete(native_w, b);
  if (a_completes) RC_ASSERT(props::every_block_once(a));
  if (b_completes) RC_ASSERT(props::every_block_once(b));
  RC_CLASSIFY(!a_completes, "A3 direction hangs");
  // With every token holding work, the rows past B are reached only by a walk that misses its end,
  // and on one SM nothing does: the A3 direction always hangs there.
  const bool all_positive = !spec.context_lens.empty() &&
                            std::all_of(spec.context_lens.begin(), spec.context_lens.end(), [](int32_t v) { return v > 0; });
  if (all_positive && sms == 1) RC_ASSERT(!a_completes);
}

}  // namespace
}  // namespace dsv4::kernels
