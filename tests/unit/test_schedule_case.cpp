// The indexer-schedule suite's building blocks (properties/schedule_case.h): generated specs pass on
// the real kernel; the generator reaches its corners; a schedule built from the other layout than
// the kernel runs (seed bug A3) or from stale lengths (a graph replay without a refresh) is caught
// as a hang or a mismatch, never passed; malformed specs are refused naming their field.
#include <gtest/gtest.h>
#include <rapidcheck.h>

#include <algorithm>
#include <cstdint>
#include <functional>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include <rapidcheck/detail/Configuration.h>

#include "engine/core/error.h"
#include "kernels/indexer_logits.h"
#include "properties/schedule_case.h"

namespace dsv4::props {
namespace {

std::string other_layout(const std::string& layout) { return layout == "native" ? "per-token" : "native"; }

std::string verdict_str(const Verdict& v) {
  return std::string(verdict_kind_name(v.kind)) + " " + v.signature + ": " + v.detail;
}

// Runs `property` for at least `min_cases` generated cases (RC_PARAMS may ask for more and sets the
// seed) and fails the calling test with RapidCheck's report if a case fails.
void check_cases(const std::string& id, int min_cases, const std::function<void()>& property) {
  rc::detail::TestParams params = rc::detail::configuration().testParams;
  params.maxSuccess = std::max(params.maxSuccess, min_cases);
  rc::detail::TestMetadata metadata;
  metadata.id = metadata.description = id;
  const auto result = rc::detail::checkTestable(property, metadata, params);
  if (!result.template is<rc::detail::SuccessResult>()) {
    std::ostringstream ss;
    rc::detail::printResultMessage(result, ss);
    ADD_FAILURE() << ss.str();
  }
}

ScheduleSpec spec_of(std::vector<int32_t> lens, int64_t rows, int64_t next_n, const std::string& layout,
                     int64_t block_kv, int64_t num_sms) {
  ScheduleSpec s;
  s.context_lens = std::move(lens);
  s.rows = rows;
  s.next_n = next_n;
  s.layout = layout;
  s.block_kv = block_kv;
  s.num_sms = num_sms;
  return s;
}

// MTP target-verify: request b's draft tokens j see seq_len_b + j + 1 keys, so the lengths differ per
// token and cross block edges.
ScheduleSpec target_verify(const std::string& layout, int64_t num_sms) {
  std::vector<int32_t> lens;
  for (int32_t seq : {62, 126, 199}) {
    for (int32_t j = 0; j < 3; ++j) lens.push_back(seq + j + 1);
  }
  return spec_of(lens, 3, 3, layout, 64, num_sms);
}

// ---- the correct cases -----------------------------------------------------------------------------

TEST(ScheduleCase, GeneratedSpecsPass) {
  check_cases("ScheduleCase/GeneratedSpecsPass", 300, [] {
    const ScheduleSpec spec = *gen_schedule_spec();
    RC_TAG(spec.layout);
    const Verdict v = check_schedule_case(spec);
    if (!v.passed()) RC_FAIL(verdict_str(v));
  });
}

TEST(ScheduleCase, HandPickedCornersPass) {
  for (const std::string& layout : schedule_layouts()) {
    for (int64_t sms : {1, 3, 8, 132}) {
      for (const ScheduleSpec& s : {target_verify(layout, sms),
                                    spec_of({0, 0, 0, 0}, 2, 2, layout, 64, sms),           // all zero
                                    spec_of({63, 64, 65, 127, 128, 129}, 3, 2, layout, 64, sms),  // edges ± 1
                                    spec_of({}, 0, 4, layout, 64, sms),                     // no rows
                                    spec_of({5, 5, 5, 5}, 1, 4, layout, 1, sms)}) {          // block_kv 1
        const Verdict v = check_schedule_case(s);
        EXPECT_TRUE(v.passed()) << describe(s) << ": " << verdict_str(v);
      }
    }
  }
}

// The corners the suite exists for must come up in a few thousand draws at full size.
TEST(ScheduleCase, GeneratorReachesItsCorners) {
  const rc::Gen<ScheduleSpec> gen = gen_schedule_spec();
  std::set<int64_t> next_ns;
  std::set<std::string> layouts;
  std::set<int64_t> sms;
  constexpr int kDraws = 3000;
  int all_zero = 0, all_equal_nonzero = 0;
  bool block_minus_one = false, block_plus_one = false, no_rows = false;
  for (uint64_t i = 0; i < kDraws; ++i) {
    const ScheduleSpec s = gen(rc::Random(i), 100).value();
    ASSERT_NO_THROW(validate_schedule_spec(s)) << describe(s);
    next_ns.insert(s.next_n);
    layouts.insert(s.layout);
    sms.insert(s.num_sms);
    const auto& l = s.context_lens;
    no_rows |= s.rows == 0;
    // Four or more tokens: a list that long is rarely all zero or all equal by chance, so these
    // counts come from the generator's dedicated shapes.
    all_zero += l.size() >= 4 && std::all_of(l.begin(), l.end(), [](int32_t v) { return v == 0; });
    all_equal_nonzero += l.size() >= 4 && l[0] > 0 && std::all_of(l.begin(), l.end(), [&](int32_t v) { return v == l[0]; });
    for (int32_t v : l) {
      block_minus_one |= s.block_kv > 1 && v > 0 && (v + 1) % s.block_kv == 0;
      block_plus_one |= s.block_kv > 1 && v > 1 && (v - 1) % s.block_kv == 0;
    }
  }
  EXPECT_EQ(next_ns, (std::set<int64_t>{1, 2, 3, 4}));
  EXPECT_EQ(layouts, (std::set<std::string>{"per-token", "native"}));
  EXPECT_TRUE(sms.count(1) && sms.count(132)) << "SM counts 1 and 132";
  EXPECT_GE(*sms.begin(), 1);
  EXPECT_LE(*sms.rbegin(), 132);
  EXPECT_GT(all_zero, kDraws / 10) << "all zero";
  EXPECT_GT(all_equal_nonzero, kDraws / 20) << "all equal";
  EXPECT_TRUE(block_minus_one);
  EXPECT_TRUE(block_plus_one);
  EXPECT_TRUE(no_rows);
}

// ---- seed bug A3: the schedule's layout is not the kernel's ------------------------------------------

TEST(ScheduleCase, BNextNScheduleOnThePerTokenKernelHangs) {
  // sglang issue 24571: the schedule from the (B, next_n) view, the kernel per token.
  for (int64_t sms : {1, 3, 8}) {
    const Verdict v = check_schedule_case(target_verify("native", sms), ScheduleCaseRun{"per-token", std::nullopt});
    EXPECT_EQ(v.kind, VerdictKind::hang) << verdict_str(v);
    EXPECT_EQ(v.signature, kernels::kIndexerLogitsOp);
    EXPECT_NE(v.detail.find("hang in 'indexer_logits'"), std::string::npos) << v.detail;
    EXPECT_NE(v.detail.find("kernel runs per-token"), std::string::npos) << v.detail;
  }
}

TEST(ScheduleCase, AScheduleFromTheOtherLayoutNeverPasses) {
  int hangs = 0, mismatches = 0;
  check_cases("ScheduleCase/AScheduleFromTheOtherLayoutNeverPasses", 200, [&] {
    // With no rows both layouts are the same empty work; from one row on they differ.
    const ScheduleSpec spec = *rc::gen::suchThat(gen_schedule_spec(2), [](const ScheduleSpec& s) { return s.rows >= 1; });
    const std::string kernel_layout = other_layout(spec.layout);
    RC_TAG(spec.layout + " schedule, " + kernel_layout + " kernel");
    const Verdict v = check_schedule_case(spec, ScheduleCaseRun{kernel_layout, std::nullopt});
    RC_ASSERT(v.kind == VerdictKind::hang || v.kind == VerdictKind::mismatch);
    (v.kind == VerdictKind::hang ? hangs : mismatches) += 1;
  });
  // The real kernel does hang on some (the A3 direction), and some wrong schedules run to the right
  // logits and only the partition check sees them.
  EXPECT_GT(hangs, 0);
  EXPECT_GT(mismatches, 0);
}

// ---- a stale schedule (graph replay without a refresh) ---------------------------------------------

TEST(ScheduleCase, StaleScheduleThatNoLongerPartitionsHangs) {
  // Captured with 192, 64 keys (3 + 1 blocks: entries (0,0) (0,2) (2,0)), replayed with 64, 64.
  const ScheduleSpec spec = spec_of({64, 64}, 2, 1, "per-token", 64, 2);
  const Verdict v = check_schedule_case(spec, ScheduleCaseRun{std::nullopt, std::vector<int32_t>{192, 64}});
  EXPECT_EQ(v.kind, VerdictKind::hang) << verdict_str(v);
  EXPECT_EQ(v.signature, kernels::kIndexerLogitsOp);
  EXPECT_NE(v.detail.find("schedule from other lengths"), std::string::npos) << v.detail;
}

TEST(ScheduleCase, StaleScheduleThatStillRunsRightIsAMismatch) {
  // Captured with 64, 64 (split at row 1), replayed with 192, 64: every block is done once and the
  // logits are right, but SM 0 does 3 of 4 blocks; only the partition check sees it.
  const ScheduleSpec spec = spec_of({192, 64}, 2, 1, "per-token", 64, 2);
  const Verdict v = check_schedule_case(spec, ScheduleCaseRun{std::nullopt, std::vector<int32_t>{64, 64}});
  EXPECT_EQ(v.kind, VerdictKind::mismatch) << verdict_str(v);
  EXPECT_EQ(v.signature, kernels::kIndexerScheduleOp);
  EXPECT_NE(v.detail.find("SM 0 has 3 blocks, want 2"), std::string::npos) << v.detail;
}

TEST(ScheduleCase, GeneratedStaleSchedulesAreCaughtExactlyWhenTheyDiffer) {
  int caught = 0;
  check_cases("ScheduleCase/GeneratedStaleSchedulesAreCaughtExactlyWhenTheyDiffer", 200, [&] {
    const ScheduleSpec spec = *gen_schedule_spec();
    // The capture-time lengths: each length the same, one key more, or a block more or less.
    std::vector<int32_t> stale;
    for (int32_t len : spec.context_lens) {
      const int64_t delta = *rc::gen::elementOf(std::vector<int64_t>{0, 1, spec.block_kv, -spec.block_kv});
      stale.push_back(static_cast<int32_t>(std::max<int64_t>(0, len + delta)));
    }
    const auto built = [&spec](const std::vector<int32_t>& lens) {
      return schedule_entries(
          kernels::build_indexer_schedule(schedule_context_lens(spec, spec.layout, lens), spec.block_kv, spec.num_sms));
    };
    const bool differs = built(stale) != built(spec.context_lens);
    RC_CLASSIFY(differs, "stale schedule differs");
    const Verdict v = check_schedule_case(spec, ScheduleCaseRun{std::nullopt, stale});
    // A stale schedule equal to the fresh one is no fault; any other must not pass.
    if (differs) {
      RC_ASSERT(v.kind == VerdictKind::hang || v.kind == VerdictKind::mismatch);
      ++caught;
    } else if (!v.passed()) {
      RC_FAIL(verdict_str(v));
    }
  });
  EXPECT_GT(caught, 20);
}

// ---- malformed specs --------------------------------------------------------------------------------

// The field of the InputError that `f` throws ("" when it throws none).
std::string field_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const InputError& e) {
    EXPECT_EQ(e.source(), "scenario") << e.what();
    return e.field();
  }
  return "";
}

TEST(ScheduleCase, MalformedSpecsThrowInputErrorNamingTheField) {
  const ScheduleSpec good = spec_of({1, 2, 3, 4}, 2, 2, "native", 64, 4);
  EXPECT_EQ(field_of([&] { check_schedule_case(good); }), "");
  const auto with = [&good](const std::function<void(ScheduleSpec&)>& change) {
    ScheduleSpec s = good;
    change(s);
    return field_of([s] { check_schedule_case(s); });
  };
  EXPECT_EQ(with([](ScheduleSpec& s) { s.next_n = 0; }), "schedule_case.next_n");
  EXPECT_EQ(with([](ScheduleSpec& s) { s.next_n = 5; }), "schedule_case.next_n");
  EXPECT_EQ(with([](ScheduleSpec& s) { s.rows = 3; }), "schedule_case.context_lens");  // 4 lens for 3 * 2
  EXPECT_EQ(with([](ScheduleSpec& s) { s.context_lens.pop_back(); }), "schedule_case.context_lens");
  EXPECT_EQ(with([](ScheduleSpec& s) { s.context_lens[1] = -1; }), "schedule_case.context_lens");
  EXPECT_EQ(with([](ScheduleSpec& s) { s.rows = -1; }), "schedule_case.rows");
  EXPECT_EQ(with([](ScheduleSpec& s) { s.layout = "(N_total, 1)"; }), "schedule_case.layout");
  EXPECT_EQ(with([](ScheduleSpec& s) { s.block_kv = 0; }), "schedule_case.block_kv");
  EXPECT_EQ(with([](ScheduleSpec& s) { s.num_sms = 0; }), "schedule_case.num_sms");
  EXPECT_EQ(with([](ScheduleSpec& s) { s.num_sms = -3; }), "schedule_case.num_sms");
  // The overrides of a hand-built run are checked too.
  EXPECT_EQ(field_of([&] { check_schedule_case(good, ScheduleCaseRun{"per token", std::nullopt}); }),
            "schedule_case.kernel_layout");
  EXPECT_EQ(field_of([&] { check_schedule_case(good, ScheduleCaseRun{std::nullopt, std::vector<int32_t>{1, 2}}); }),
            "schedule_case.schedule_lens");
}

TEST(ScheduleCase, DescribeNamesEveryField) {
  EXPECT_EQ(describe(spec_of({0, 65}, 1, 2, "native", 64, 132)), "native rows 1 next_n 2 block_kv 64 sms 132 lens [0 65]");
}

}  // namespace
}  // namespace dsv4::props
