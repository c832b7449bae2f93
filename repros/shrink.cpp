#include "repros/shrink.h"

#include <algorithm>
#include <chrono>

#include "properties/scenario_json.h"
#include "properties/suites.h"

namespace dsv4::repro {

using props::EngineSpec;
using props::Scenario;

namespace {

// Adds `s` with its engine spec changed by `edit`, when the edit changed anything.
template <class Edit>
void with_engine(std::vector<Scenario>& out, const Scenario& s, Edit edit) {
  Scenario c = s;
  edit(*c.engine);
  const bool changed = props::scenario_to_json(c) != props::scenario_to_json(s);
  if (changed) out.push_back(std::move(c));
}

void engine_candidates(const Scenario& s, std::vector<Scenario>& out) {
  const EngineSpec& e = *s.engine;
  const size_t n = e.requests.size();
  // Whole requests first (the biggest cut), keeping at least one.
  for (size_t i = 0; n > 1 && i < n; ++i) {
    with_engine(out, s, [i](EngineSpec& x) { x.requests.erase(x.requests.begin() + static_cast<std::ptrdiff_t>(i)); });
  }
  for (size_t i = 0; i < n; ++i) {
    const size_t len = e.requests[i].prompt.size();
    // Prompts: half, then one token less (from the end; the first tokens matter least to a window).
    if (len > 1) with_engine(out, s, [i, len](EngineSpec& x) { x.requests[i].prompt.resize((len + 1) / 2); });
    if (len > 1) with_engine(out, s, [i, len](EngineSpec& x) { x.requests[i].prompt.resize(len - 1); });
    if (e.requests[i].max_new_tokens > 1) {
      with_engine(out, s, [i](EngineSpec& x) { x.requests[i].max_new_tokens = 1; });
      with_engine(out, s, [i](EngineSpec& x) { --x.requests[i].max_new_tokens; });
    }
    if (e.requests[i].arrival_step > 0) with_engine(out, s, [i](EngineSpec& x) { x.requests[i].arrival_step = 0; });
  }
  // Fewer stages: merge each pair of neighbours.
  for (size_t k = 0; k + 1 < e.pp_partition.size(); ++k) {
    with_engine(out, s, [k](EngineSpec& x) {
      x.pp_partition[k] += x.pp_partition[k + 1];
      x.pp_partition.erase(x.pp_partition.begin() + static_cast<std::ptrdiff_t>(k) + 1);
      if (x.pp_partition.size() == 1) x.pp_partition.clear();
    });
  }
  if (e.cp > 1) with_engine(out, s, [](EngineSpec& x) { x.cp = x.cp > 2 ? 2 : 1; });
  with_engine(out, s, [](EngineSpec& x) { x.schedule = "in-order"; });
  with_engine(out, s, [](EngineSpec& x) { x.graphs = false; });
  with_engine(out, s, [](EngineSpec& x) {
    x.mtp = false;
    x.draft_tokens = 0;
  });
  with_engine(out, s, [](EngineSpec& x) { x.multi_stream = false; });
  with_engine(out, s, [](EngineSpec& x) { x.quant = "fp8"; });
  with_engine(out, s, [](EngineSpec& x) { x.indexer_sms = 1; });
  with_engine(out, s, [](EngineSpec& x) { x.chunked_prefill_tokens = 512; });
  with_engine(out, s, [](EngineSpec& x) { x.weight_seed = 1; });
}

// Halves, then single elements removed, of a list inside a section.
template <class Get>
void list_candidates(std::vector<Scenario>& out, const Scenario& s, Get get) {
  const auto& list = get(const_cast<Scenario&>(s));
  const size_t n = list.size();
  if (n <= 1) return;
  for (const bool front : {true, false}) {
    Scenario c = s;
    auto& l = get(c);
    if (front) l.erase(l.begin() + static_cast<std::ptrdiff_t>(n / 2), l.end());
    else l.erase(l.begin(), l.begin() + static_cast<std::ptrdiff_t>(n / 2));
    out.push_back(std::move(c));
  }
  for (size_t i = 0; i < n && i < 64; ++i) {
    Scenario c = s;
    auto& l = get(c);
    l.erase(l.begin() + static_cast<std::ptrdiff_t>(i));
    out.push_back(std::move(c));
  }
}

}  // namespace

std::vector<Scenario> shrink_candidates(const Scenario& s) {
  std::vector<Scenario> out;
  if (s.engine) engine_candidates(s, out);
  if (s.view) {
    for (int64_t t : {int64_t{0}, int64_t{1}, int64_t{2}, s.view->tokens / 2, s.view->tokens - 1}) {
      if (t >= 0 && t < s.view->tokens) {
        Scenario c = s;
        c.view->tokens = t;
        out.push_back(std::move(c));
      }
    }
    if (s.view->pad > 1) {
      Scenario c = s;
      c.view->pad = 1;
      out.push_back(std::move(c));
    }
  }
  if (s.translation) list_candidates(out, s, [](Scenario& x) -> auto& { return x.translation->swa_locs; });
  if (s.conversion) list_candidates(out, s, [](Scenario& x) -> auto& { return x.conversion->inputs; });
  if (s.schedule_case && s.schedule_case->rows > 1) {
    // Whole rows of next_n lengths: the first half, the second half, each row alone removed.
    const auto& sc = *s.schedule_case;
    const int64_t rows = sc.rows, w = sc.next_n;
    auto keep_rows = [&](int64_t from, int64_t to) {
      Scenario c = s;
      c.schedule_case->rows = to - from;
      c.schedule_case->context_lens.assign(sc.context_lens.begin() + from * w, sc.context_lens.begin() + to * w);
      out.push_back(std::move(c));
    };
    keep_rows(0, rows / 2);
    keep_rows(rows / 2, rows);
    for (int64_t r = 0; r < rows && r < 32; ++r) {
      Scenario c = s;
      c.schedule_case->rows = rows - 1;
      c.schedule_case->context_lens.erase(c.schedule_case->context_lens.begin() + r * w,
                                          c.schedule_case->context_lens.begin() + (r + 1) * w);
      out.push_back(std::move(c));
    }
  }
  // Fewer faults, keeping at least one (a case without its fault is what --without-faults runs).
  for (size_t i = 0; s.faults.size() > 1 && i < s.faults.size(); ++i) {
    Scenario c = s;
    c.faults.erase(c.faults.begin() + static_cast<std::ptrdiff_t>(i));
    out.push_back(std::move(c));
  }
  return out;
}

bool same_failure(const props::Verdict& a, const props::Verdict& b) {
  return a.kind == b.kind && a.signature == b.signature;
}

ShrinkResult shrink_scenario(const Scenario& start, const props::Verdict& target, const props::RunLimits& limits,
                             double budget_s, const std::function<void(const ShrinkResult&)>& on_step) {
  const auto t0 = std::chrono::steady_clock::now();
  auto elapsed = [&] { return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(); };
  ShrinkResult r;
  r.scenario = start;
  r.verdict = target;
  bool progressed = true;
  while (progressed && elapsed() < budget_s) {
    progressed = false;
    for (const Scenario& c : shrink_candidates(r.scenario)) {
      if (elapsed() >= budget_s) break;
      ++r.tried;
      const props::Verdict v = props::run_case(c, limits);
      if (!same_failure(v, target)) continue;
      r.scenario = c;
      r.verdict = v;
      ++r.steps;
      progressed = true;
      if (on_step) on_step(r);
      break;  // candidates of the smaller scenario next
    }
  }
  r.seconds = elapsed();
  return r;
}

}  // namespace dsv4::repro
