// "Schedule consumer/producer agree" (bug-classes A3) for the indexer logits kernel's schedule:
// for generated context lens (zeros, block multiples ± 1, all equal, all zero), next_n 1..4, both
// layouts ((B, next_n) and the (N_total, 1) normalisation) and 1..132 SMs, the schedule's ranges
// partition Σ ceil(len / block_kv) exactly, in near-equal contiguous pieces, and a scalar model of
// the kernel's work loop reaches every SM's end. And the kernel's design, modelled: for any
// monotone schedule (stale, another layout's, random), the kernel's counters either see every key
// block exactly once or never reach their targets (a hang), so a wrong schedule is never silent.
#include <gtest/gtest.h>
#include <rapidcheck.h>
#include <rapidcheck/gtest.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "engine/core/tensor.h"
#include "kernels/indexer_logits.h"

namespace dsv4::kernels {
namespace {

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

struct Entry {
  int64_t row = 0;
  int64_t offset_blocks = 0;
  bool operator==(const Entry&) const = default;
  bool operator<(const Entry& o) const {
    return row < o.row || (row == o.row && offset_blocks < o.offset_blocks);
  }
};

// The work as the kernel sees it in one layout: rows of next_n tokens, each with its key blocks.
struct Work {
  int64_t rows = 0;
  int64_t next_n = 0;
  std::vector<int64_t> token_blocks;  // rows * next_n
  std::vector<int64_t> row_blocks;    // rows
  std::vector<int64_t> before_row_blocks;  // rows + 1: prefix sums
  int64_t total_blocks() const { return before_row_blocks.back(); }
};

Work work_of(const std::vector<int32_t>& lens, int64_t rows, int64_t next_n, int64_t block_kv) {
  Work w;
  w.rows = rows;
  w.next_n = next_n;
  w.before_row_blocks.push_back(0);
  for (int64_t b = 0; b < rows; ++b) {
    int64_t sum = 0;
    for (int64_t j = 0; j < next_n; ++j) {
      const int64_t blocks = ceil_div(lens[static_cast<size_t>(b * next_n + j)], block_kv);
      w.token_blocks.push_back(blocks);
      sum += blocks;
    }
    w.row_blocks.push_back(sum);
    w.before_row_blocks.push_back(w.before_row_blocks.back() + sum);
  }
  return w;
}

std::vector<Entry> entries_of(const Tensor& schedule) {
  std::vector<Entry> e;
  for (int64_t s = 0; s < schedule.size(0); ++s) {
    e.push_back(Entry{static_cast<int64_t>(schedule.get({s, 0})), static_cast<int64_t>(schedule.get({s, 1}))});
  }
  return e;
}

// A scalar model of the kernel's work loop, written from the header's description: each SM walks
// from its entry to the next one; a step does a key block or moves to the next row; a walk that
// passes the last row stops there.
struct Walks {
  std::vector<int64_t> visits;  // per key block, in row-major order
  std::vector<bool> reached_end;  // per SM
  bool within_bound = true;
};

Walks model_walks(const Work& w, const std::vector<Entry>& e) {
  Walks out;
  out.visits.assign(static_cast<size_t>(w.total_blocks()), 0);
  const int64_t sms = static_cast<int64_t>(e.size()) - 1;
  const int64_t step_limit = w.total_blocks() + w.rows + 1;
  for (int64_t s = 0; s < sms; ++s) {
    Entry cur = e[static_cast<size_t>(s)];
    const Entry end = e[static_cast<size_t>(s + 1)];
    bool reached = false;
    int64_t step = 0;
    for (; step <= step_limit; ++step) {
      if (cur == end) {
        reached = true;
        break;
      }
      if (cur.row >= w.rows) break;
      if (cur.offset_blocks >= w.row_blocks[static_cast<size_t>(cur.row)]) {
        cur = Entry{cur.row + 1, 0};
        continue;
      }
      ++out.visits[static_cast<size_t>(w.before_row_blocks[static_cast<size_t>(cur.row)] + cur.offset_blocks)];
      ++cur.offset_blocks;
    }
    if (step > step_limit) out.within_bound = false;
    out.reached_end.push_back(reached);
  }
  return out;
}

// The kernel's counters at the end of the model's walks: every token row's last block done and its
// counter at target, and the grid's done-block counter equal to the work. False means a block would
// wait forever (the kernel hangs).
bool counters_complete(const Work& w, const Walks& walks) {
  int64_t done_total = 0;
  for (int64_t v : walks.visits) done_total += v;
  for (int64_t b = 0; b < w.rows; ++b) {
    int64_t first = w.before_row_blocks[static_cast<size_t>(b)];
    for (int64_t j = 0; j < w.next_n; ++j) {
      const int64_t blocks = w.token_blocks[static_cast<size_t>(b * w.next_n + j)];
      int64_t done = 0;
      for (int64_t o = 0; o < blocks; ++o) done += walks.visits[static_cast<size_t>(first + o)];
      if (blocks > 0 && walks.visits[static_cast<size_t>(first + blocks - 1)] == 0) return false;  // never finished
      if (done < blocks) return false;  // its finisher waits forever
      first += blocks;
    }
  }
  return done_total == w.total_blocks();
}

bool every_block_once(const Walks& walks) {
  return std::all_of(walks.visits.begin(), walks.visits.end(), [](int64_t v) { return v == 1; });
}

// ---- generators ----------------------------------------------------------------------------------

struct Lens {
  int64_t rows = 0;
  int64_t next_n = 1;
  int64_t block_kv = 1;
  std::vector<int32_t> values;  // rows * next_n, row-major
};

Lens gen_lens(int64_t min_next_n = 1) {
  Lens l;
  l.rows = *rc::gen::inRange<int64_t>(0, 10);
  l.next_n = *rc::gen::inRange<int64_t>(min_next_n, 5);
  l.block_kv = *rc::gen::elementOf(std::vector<int64_t>{1, 2, 3, 16, 64});
  const int64_t n = l.rows * l.next_n;
  const int shape = *rc::gen::inRange(0, 4);
  const auto near_multiple = [&l] {
    const int64_t k = *rc::gen::inRange<int64_t>(0, 5);
    const int64_t d = *rc::gen::inRange<int64_t>(-1, 2);
    return static_cast<int32_t>(std::max<int64_t>(0, k * l.block_kv + d));
  };
  if (shape == 0) {  // mixed: zeros, multiples ± 1, anything
    for (int64_t i = 0; i < n; ++i) {
      const int pick = *rc::gen::inRange(0, 3);
      l.values.push_back(pick == 0 ? 0 : pick == 1 ? near_multiple() : *rc::gen::inRange<int32_t>(0, 6 * static_cast<int32_t>(l.block_kv)));
    }
  } else if (shape == 1) {  // all near multiples, as MTP drafts crossing a block edge are
    for (int64_t i = 0; i < n; ++i) l.values.push_back(near_multiple());
  } else if (shape == 2) {  // all equal
    l.values.assign(static_cast<size_t>(n), near_multiple());
  } else {  // all zero
    l.values.assign(static_cast<size_t>(n), 0);
  }
  return l;
}

Tensor lens_tensor(const Lens& l, int64_t rows, int64_t next_n) {
  std::vector<double> v(l.values.begin(), l.values.end());
  return Tensor::from_values({rows, next_n}, DType::i32, v, "context_lens");
}

std::string describe(const Lens& l, int64_t sms) {
  std::string s = "rows " + std::to_string(l.rows) + " next_n " + std::to_string(l.next_n) + " block_kv " +
                  std::to_string(l.block_kv) + " sms " + std::to_string(sms) + " lens";
  for (int32_t v : l.values) s += " " + std::to_string(v);
  return s;
}

// The schedule's own guarantees for the layout it was built from.
void check_partition(const Work& w, const std::vector<Entry>& e, int64_t sms) {
  RC_ASSERT(static_cast<int64_t>(e.size()) == sms + 1);
  const int64_t total = w.total_blocks();
  std::vector<int64_t> at;  // linear position of each entry
  for (const Entry& x : e) {
    RC_ASSERT(x.row >= 0);
    RC_ASSERT(x.row <= w.rows);
    if (x.row == w.rows) {
      RC_ASSERT(x.offset_blocks == 0);
    } else {
      RC_ASSERT(x.offset_blocks >= 0);
      RC_ASSERT(x.offset_blocks < w.row_blocks[static_cast<size_t>(x.row)]);  // starts hold work
    }
    at.push_back(w.before_row_blocks[static_cast<size_t>(x.row)] + x.offset_blocks);
  }
  RC_ASSERT(at.front() == 0);
  RC_ASSERT(at.back() == total);
  for (int64_t s = 0; s < sms; ++s) {
    const int64_t size = at[static_cast<size_t>(s + 1)] - at[static_cast<size_t>(s)];
    // The first total % sms ranges are one block longer.
    RC_ASSERT(size == total / sms + (s < total % sms ? 1 : 0));
  }
  const Walks walks = model_walks(w, e);
  RC_ASSERT(walks.within_bound);
  RC_ASSERT(std::all_of(walks.reached_end.begin(), walks.reached_end.end(), [](bool r) { return r; }));
  RC_ASSERT(every_block_once(walks));
  RC_ASSERT(counters_complete(w, walks));
}

RC_GTEST_PROP(IndexerScheduleProperty, PartitionsTheWorkInBothLayoutsAndTheLoopTerminates, ()) {
  const Lens l = gen_lens();
  const int64_t sms = *rc::gen::inRange<int64_t>(1, 133);
  RC_LOG() << describe(l, sms) << "\n";
  const Tensor native = lens_tensor(l, l.rows, l.next_n);
  const Tensor per_token = to_2d_context_lens(native);
  RC_ASSERT(per_token.size(0) == l.rows * l.next_n);
  RC_ASSERT(per_token.size(1) == 1);
  check_partition(work_of(l.values, l.rows, l.next_n, l.block_kv), entries_of(build_indexer_schedule(native, l.block_kv, sms)), sms);
  check_partition(work_of(l.values, l.rows * l.next_n, 1, l.block_kv),
                  entries_of(build_indexer_schedule(per_token, l.block_kv, sms)), sms);
}

// The kernel's soundness, modelled: whatever monotone schedule it is given, it either does every
// key block exactly once (so its logits are right) or its counters never reach their targets.
RC_GTEST_PROP(IndexerScheduleProperty, AnyMonotoneScheduleEitherCoversExactlyOrHangs, ()) {
  const Lens l = gen_lens();
  const int64_t sms = *rc::gen::inRange<int64_t>(1, 9);
  const bool per_token = *rc::gen::arbitrary<bool>();
  const Work w = per_token ? work_of(l.values, l.rows * l.next_n, 1, l.block_kv)
                           : work_of(l.values, l.rows, l.next_n, l.block_kv);
  const int64_t max_row_blocks = w.row_blocks.empty() ? 0 : *std::max_element(w.row_blocks.begin(), w.row_blocks.end());
  std::vector<Entry> e;
  for (int64_t s = 0; s <= sms; ++s) {
    e.push_back(Entry{*rc::gen::inRange<int64_t>(0, w.rows + 2), *rc::gen::inRange<int64_t>(0, max_row_blocks + 2)});
  }
  std::sort(e.begin(), e.end());
  RC_LOG() << describe(l, sms) << (per_token ? " per-token" : " native") << "\n";
  const Walks walks = model_walks(w, e);
  RC_ASSERT(walks.within_bound);
  const bool completes = counters_complete(w, walks);
  RC_CLASSIFY(completes, "completes");
  RC_CLASSIFY(!completes, "hangs");
  if (completes) RC_ASSERT(every_block_once(walks));
}

// The seed bug's mismatch: one layout's schedule launched on the other layout's work is either
// harmless (it still covers every key block once) or a hang; never a silent wrong answer.
RC_GTEST_PROP(IndexerScheduleProperty, ALayoutMismatchedScheduleIsNeverSilentlyWrong, ()) {
  const Lens l = gen_lens(2);
  const int64_t sms = *rc::gen::inRange<int64_t>(1, 133);
  RC_LOG() << describe(l, sms) << "\n";
  const Tensor native = lens_tensor(l, l.rows, l.next_n);
  const Work native_work = work_of(l.values, l.rows, l.next_n, l.block_kv);
  const Work per_token_work = work_of(l.values, l.rows * l.next_n, 1, l.block_kv);
  const std::vector<Entry> native_schedule = entries_of(build_indexer_schedule(native, l.block_kv, sms));
  const std::vector<Entry> per_token_schedule =
      entries_of(build_indexer_schedule(to_2d_context_lens(native), l.block_kv, sms));
  const Walks a = model_walks(per_token_work, native_schedule);  // sglang's A3: (B, next_n) schedule, per-token run
  const Walks b = model_walks(native_work, per_token_schedule);  // the other way round
  RC_ASSERT(a.within_bound);
  RC_ASSERT(b.within_bound);
  const bool a_completes = counters_complete(per_token_work, a);
  const bool b_completes = counters_complete(native_work, b);
  if (a_completes) RC_ASSERT(every_block_once(a));
  if (b_completes) RC_ASSERT(every_block_once(b));
  RC_CLASSIFY(!a_completes, "A3 direction hangs");
  // With every token holding work, the rows past B are reached only by a walk that misses its end,
  // and on one SM nothing does: the A3 direction always hangs there.
  const bool all_positive = !l.values.empty() && std::all_of(l.values.begin(), l.values.end(), [](int32_t v) { return v > 0; });
  if (all_positive && sms == 1) RC_ASSERT(!a_completes);
}

}  // namespace
}  // namespace dsv4::kernels
