#include "engine/oracle/oracle.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <numeric>
#include <set>
#include <tuple>
#include <utility>

#include "engine/core/error.h"
#include "reference/generate.h"

namespace dsv4::engine {

namespace {

// The indexer always pools overlapping ratio-4 blocks: position p sees floor((p + 1) / 4) entries.
constexpr int64_t kIndexerRatio = 4;

const std::string kTopkOp = "attn.indexer.topk";
const std::string kExpertsOp = "ffn.gate.experts";
const std::string kScoresOp = "attn.indexer.scores";

std::string fmt(const char* format, double a, double b = 0.0, double c = 0.0) {
  char buf[200];
  std::snprintf(buf, sizeof buf, format, a, b, c);
  return buf;
}

std::string list(const std::vector<int64_t>& v) {
  std::string out = "{";
  for (size_t i = 0; i < v.size(); ++i) out += (i ? "," : "") + std::to_string(v[i]);
  return out + "}";
}

bool starts_with(const std::string& s, const std::string& prefix) { return s.rfind(prefix, 0) == 0; }

// "layers.3" -> 3, "mtp.0" -> n_layers; -1 for anything else.
int64_t layer_id_of(const std::string& prefix, int64_t n_layers) {
  if (starts_with(prefix, "layers.")) return std::stoll(prefix.substr(7));
  if (starts_with(prefix, "mtp.") && prefix.size() > 4) return n_layers + std::stoll(prefix.substr(4));
  return -1;
}

std::string layer_prefix(int64_t layer, int64_t n_layers) {
  return layer < n_layers ? "layers." + std::to_string(layer) : "mtp." + std::to_string(layer - n_layers);
}

// An engine decision row parsed into indices, or why it is malformed.
struct Parsed {
  std::vector<int64_t> picks;  // in the engine's order
  std::string error;           // empty when well-formed
};

// The indexer's selection: entries >= 0 of the row (negative ones are padding), integral, distinct,
// visible, exactly min(index_topk, visible) of them.
Parsed parse_selection(const float* row, int64_t width, int64_t topk, int64_t visible) {
  Parsed p;
  for (int64_t i = 0; i < width; ++i) {
    const float v = row[i];
    if (std::isnan(v)) {
      p.error = "NaN entry";
      return p;
    }
    if (v < 0) continue;
    if (v != std::floor(v)) {
      p.error = "non-integral entry " + fmt("%g", v);
      return p;
    }
    p.picks.push_back(static_cast<int64_t>(v));
  }
  const int64_t want = std::min(topk, visible);
  std::vector<int64_t> sorted = p.picks;
  std::sort(sorted.begin(), sorted.end());
  if (std::adjacent_find(sorted.begin(), sorted.end()) != sorted.end()) {
    p.error = "repeated entry in " + list(p.picks);
  } else if (!sorted.empty() && sorted.back() >= visible) {
    p.error = "entry " + std::to_string(sorted.back()) + " not visible (" + std::to_string(visible) + " visible) in " +
              list(p.picks);
  } else if (static_cast<int64_t>(sorted.size()) != want) {
    p.error = std::to_string(sorted.size()) + " entries " + list(p.picks) + ", expected " + std::to_string(want);
  }
  return p;
}

// The routed experts: k integral, distinct indices in [0, E), in routing order.
Parsed parse_experts(const float* row, int64_t width, int64_t k, int64_t E) {
  Parsed p;
  if (width != k) {
    p.error = "width " + std::to_string(width) + ", expected n_activated_experts " + std::to_string(k);
    return p;
  }
  for (int64_t i = 0; i < width; ++i) {
    const float v = row[i];
    if (std::isnan(v) || v != std::floor(v) || v < 0 || v >= static_cast<float>(E)) {
      p.error = "entry " + fmt("%g", v) + " is not an expert index in [0, " + std::to_string(E) + ")";
      return p;
    }
    p.picks.push_back(static_cast<int64_t>(v));
  }
  std::vector<int64_t> sorted = p.picks;
  std::sort(sorted.begin(), sorted.end());
  if (std::adjacent_find(sorted.begin(), sorted.end()) != sorted.end()) p.error = "repeated expert in " + list(p.picks);
  return p;
}

// The k best of `key[0 .. n)` (descending, ties to the lower index), returned sorted ascending.
std::vector<int64_t> top_k(const std::vector<double>& key, int64_t k) {
  std::vector<int64_t> order(key.size());
  std::iota(order.begin(), order.end(), int64_t{0});
  std::stable_sort(order.begin(), order.end(),
                   [&](int64_t a, int64_t b) { return key[static_cast<size_t>(a)] > key[static_cast<size_t>(b)]; });
  order.resize(static_cast<size_t>(std::min<int64_t>(k, static_cast<int64_t>(order.size()))));
  std::sort(order.begin(), order.end());
  return order;
}

// The outcome of one tie-aware set comparison.
struct SetVerdict {
  bool same = true;
  bool accepted = true;
  double gap = 0.0;    // the largest s_a - s_b over swapped pairs
  double scale = 0.0;  // the decision's score scale (compare.h)
  std::vector<int64_t> ref_only, engine_only;
};

// The largest finite |score|: the scale of a decision's tolerance.
double score_scale(const std::vector<double>& score) {
  double m = 0.0;
  for (const double v : score) {
    if (std::isfinite(v)) m = std::max(m, std::fabs(v));
  }
  return m;
}

SetVerdict compare_sets(std::vector<int64_t> ref, std::vector<int64_t> eng, const std::vector<double>& score,
                        const DecisionTolerance& tol) {
  std::sort(ref.begin(), ref.end());
  std::sort(eng.begin(), eng.end());
  SetVerdict v;
  std::set_difference(ref.begin(), ref.end(), eng.begin(), eng.end(), std::back_inserter(v.ref_only));
  std::set_difference(eng.begin(), eng.end(), ref.begin(), ref.end(), std::back_inserter(v.engine_only));
  if (v.ref_only.empty() && v.engine_only.empty()) return v;
  v.same = false;
  v.gap = -std::numeric_limits<double>::infinity();
  v.scale = score_scale(score);
  for (int64_t a : v.ref_only) {
    for (int64_t b : v.engine_only) {
      const double sa = score[static_cast<size_t>(a)], sb = score[static_cast<size_t>(b)];
      if (!tol.accepts(sa, sb, v.scale)) v.accepted = false;
      if (sa - sb > v.gap || std::isnan(sa - sb)) v.gap = sa - sb;
    }
  }
  return v;
}

}  // namespace

// ---------------------------------------------------------------------------------------------

const ValueTolerance& OracleTolerances::for_key(const std::string& key) const {
  const auto [prefix, op] = split_key(key);
  if (op == "logits") return prefix == "mtp" ? mtp_logits : logits;
  if (op == "chain_logits") return mtp_chain_logits;
  auto it = op_overrides.find(op);
  return it == op_overrides.end() ? activations : it->second;
}

std::string Divergence::summary() const {
  return "step " + std::to_string(step) + " request " + std::to_string(request_id) + " " + key + ": " + detail;
}

void ErrorStats::add(double abs_err, double rel_err, double cdiff, double bound_ratio) {
  max_abs = std::max(max_abs, abs_err);
  max_rel = std::max(max_rel, rel_err);
  max_calc_diff = std::max(max_calc_diff, cdiff);
  max_bound_ratio = std::max(max_bound_ratio, bound_ratio);
}

void GapStats::add(double gap, double scale) {
  ++count;
  max_gap = std::max(max_gap, gap);
  if (scale > 0) max_rel_gap = std::max(max_rel_gap, gap / scale);
}

struct ReferenceOracle::Request {
  int64_t id = 0;
  std::vector<int32_t> prompt;
  std::unique_ptr<ref::Model> model;
  size_t report = 0;
  int64_t next_pos = 0;                 // tokens replayed so far
  std::optional<int32_t> expect_input;  // the token the next row must start with (after a sampling row)
  int64_t mtp_next_pos = 0;
  bool mtp_lost = false;
  std::set<std::string> unchecked;
};

struct ReferenceOracle::Failure {
  std::tuple<int64_t, int64_t, std::string> order;
  Divergence divergence;
};

ReferenceOracle::ReferenceOracle(const ModelConfig& config, const ref::Weights& weights, ref::Numerics numerics,
                                 OracleTolerances tolerances)
    : config_(std::make_unique<const ModelConfig>(config)),
      weights_(&weights),
      numerics_(numerics),
      tol_(std::move(tolerances)) {}

ReferenceOracle::~ReferenceOracle() = default;
ReferenceOracle::ReferenceOracle(ReferenceOracle&&) noexcept = default;
ReferenceOracle& ReferenceOracle::operator=(ReferenceOracle&&) noexcept = default;

void ReferenceOracle::add_request(int64_t id, std::vector<int32_t> prompt_ids) {
  if (requests_.count(id) != 0) {
    throw ContractError("ReferenceOracle::add_request", "id", "request " + std::to_string(id) + " added twice");
  }
  auto req = std::make_unique<Request>();
  req->id = id;
  req->prompt = std::move(prompt_ids);
  req->model = std::make_unique<ref::Model>(*config_, *weights_);
  req->report = reports_.size();
  RequestReport rep;
  rep.request_id = id;
  rep.prompt_length = static_cast<int64_t>(req->prompt.size());
  reports_.push_back(std::move(rep));
  requests_[id] = std::move(req);
}

void ReferenceOracle::abort_request(int64_t id) {
  auto it = requests_.find(id);
  if (it == requests_.end()) {
    throw ContractError("ReferenceOracle::abort_request", "id", "unknown request " + std::to_string(id));
  }
  it->second->model.reset();
  reports_[it->second->report].aborted = true;
}

const RequestReport* ReferenceOracle::report(int64_t id) const {
  auto it = requests_.find(id);
  return it == requests_.end() ? nullptr : &reports_[it->second->report];
}

void ReferenceOracle::check(const StepRecord& step) {
  std::vector<Failure> step_failures;  // the first failure of each row, in batch order
  for (const StepRow& row : step.rows) {
    auto it = requests_.find(row.request_id);
    if (it == requests_.end()) {
      throw ContractError("ReferenceOracle::check", "rows",
                          "row of unknown request " + std::to_string(row.request_id) + " in step " +
                              std::to_string(step.step));
    }
    Request& req = *it->second;
    std::vector<Failure> failures;
    check_row(step, row, req, failures);
    if (failures.empty()) continue;
    const auto first = std::min_element(failures.begin(), failures.end(),
                                        [](const Failure& a, const Failure& b) { return a.order < b.order; });
    RequestReport& rep = reports_[req.report];
    if (!rep.first_divergence) rep.first_divergence = first->divergence;
    step_failures.push_back(*first);
  }
  if (!first_ && !step_failures.empty()) {
    // min_element keeps the earliest row among equal keys.
    first_ = std::min_element(step_failures.begin(), step_failures.end(), [](const Failure& a, const Failure& b) {
               return a.order < b.order;
             })->divergence;
  }
}

void ReferenceOracle::check_row(const StepRecord& step, const StepRow& row, Request& req,
                                std::vector<Failure>& failures) {
  const ModelConfig& cfg = *config_;
  RequestReport& rep = reports_[req.report];
  // A TARGET_VERIFY row is replayed up to its accepted tokens: the positions of rejected drafts
  // are not kept, and the reference must not see them.
  const int64_t T = row.checked_tokens();

  auto fail = [&](const std::string& key, const std::string& detail, double abs_err = 0.0, double rel_err = 0.0,
                  double cdiff = 0.0) {
    Failure f;
    f.order = key_order(key, cfg.n_layers);
    Divergence& d = f.divergence;
    d.step = step.step;
    d.request_id = req.id;
    d.key = key;
    const auto [prefix, op] = split_key(key);
    d.layer = prefix;
    d.op = op;
    d.max_abs = abs_err;
    d.max_rel = rel_err;
    d.calc_diff = cdiff;
    d.detail = detail;
    failures.push_back(std::move(f));
  };

  // --- The row itself.
  if (rep.aborted) {
    fail("input", "row of an aborted request");
    return;
  }
  if (rep.stopped) return;
  auto stop = [&](const std::string& detail) {
    fail("input", detail);
    rep.stopped = true;
  };
  if (T <= 0 || T > row.num_tokens || static_cast<int64_t>(row.input_ids.size()) != row.num_tokens) {
    stop("num_tokens " + std::to_string(row.num_tokens) + " (" + std::to_string(T) + " checked) with " +
         std::to_string(row.input_ids.size()) + " input ids");
    return;
  }
  if (row.start_pos != req.next_pos) {
    stop("start_pos " + std::to_string(row.start_pos) + " does not continue the request at " +
         std::to_string(req.next_pos));
    return;
  }
  if (row.start_pos + T > cfg.max_seq_len) {
    stop("positions up to " + std::to_string(row.start_pos + T) + " exceed max_seq_len " +
         std::to_string(cfg.max_seq_len));
    return;
  }
  if (row.first_token < 0) {
    stop("negative first_token");
    return;
  }
  for (int64_t t = 0; t < T; ++t) {
    const int32_t id = row.input_ids[static_cast<size_t>(t)];
    if (id < 0 || id >= cfg.vocab_size) {
      stop("input id " + std::to_string(id) + " at position " + std::to_string(row.start_pos + t) +
           " outside the vocabulary");
      return;
    }
  }
  for (int64_t t = 0; t < T; ++t) {
    const int64_t p = row.start_pos + t;
    if (p >= static_cast<int64_t>(req.prompt.size())) break;
    if (row.input_ids[static_cast<size_t>(t)] != req.prompt[static_cast<size_t>(p)]) {
      fail("input", "position " + std::to_string(p) + " feeds " + std::to_string(row.input_ids[static_cast<size_t>(t)]) +
                        ", the prompt has " + std::to_string(req.prompt[static_cast<size_t>(p)]));
      break;
    }
  }
  if (row.accepted_tokens >= 0) {
    // Greedy acceptance: each kept draft is the target's own token at the position before it, the
    // last token committed is the sampled one, and a shorter row stopped at a real rejection.
    const auto& nt = row.new_tokens;
    bool consistent = static_cast<int64_t>(nt.size()) == T && !nt.empty() && nt.back() == row.sampled_id;
    for (int64_t t = 0; consistent && t + 1 < T; ++t) consistent = row.input_ids[static_cast<size_t>(t + 1)] == nt[static_cast<size_t>(t)];
    if (consistent && T < row.num_tokens) consistent = row.input_ids[static_cast<size_t>(T)] != nt.back();
    if (!consistent) fail("input", "the verify row's accepted drafts do not follow the target's own tokens");
  }
  if (req.expect_input && row.input_ids[0] != *req.expect_input) {
    fail("input", "position " + std::to_string(row.start_pos) + " feeds " + std::to_string(row.input_ids[0]) +
                      ", the previous step sampled " + std::to_string(*req.expect_input));
  }

  // --- Forcing: the engine's well-formed decisions, read from its probes.
  std::map<std::pair<std::string, int64_t>, std::string> malformed;  // (key, position) -> why
  auto engine_row = [&](const std::string& key, int64_t position, const ref::Mat*& mat) -> const float* {
    auto it = step.values.find(key);
    if (it == step.values.end()) return nullptr;
    mat = &it->second;
    const int64_t r = row.first_token + position - row.start_pos;
    if (r < 0 || r >= mat->rows) {
      malformed[{key, position}] = "the engine value has " + std::to_string(mat->rows) + " rows, the token needs row " +
                                   std::to_string(r);
      return nullptr;
    }
    return mat->row(r);
  };
  ref::Forcing forcing;
  forcing.indexer_topk = [&](int64_t layer, int64_t position) -> std::optional<std::vector<int64_t>> {
    const std::string key = layer_prefix(layer, cfg.n_layers) + "." + kTopkOp;
    const ref::Mat* mat = nullptr;
    const float* r = engine_row(key, position, mat);
    if (r == nullptr) return std::nullopt;
    Parsed p = parse_selection(r, mat->cols, cfg.index_topk, (position + 1) / kIndexerRatio);
    if (!p.error.empty()) {
      malformed[{key, position}] = p.error;
      return std::nullopt;
    }
    return p.picks;
  };
  forcing.experts = [&](int64_t layer, int64_t position) -> std::optional<std::vector<int64_t>> {
    const std::string key = layer_prefix(layer, cfg.n_layers) + "." + kExpertsOp;
    const ref::Mat* mat = nullptr;
    const float* r = engine_row(key, position, mat);
    if (r == nullptr) return std::nullopt;
    Parsed p = parse_experts(r, mat->cols, cfg.n_activated_experts, cfg.n_routed_experts);
    if (!p.error.empty()) {
      malformed[{key, position}] = p.error;
      return std::nullopt;
    }
    return p.picks;
  };

  // --- The reference forward (and the MTP block when the engine probes it).
  ref::Trace trace;
  const ref::Context ctx{cfg, numerics_, &trace, &forcing};
  std::vector<ref::Mat> chain_ref;  // the reference's chained draft logits (drafts 2..k)
  std::vector<int64_t> tokens(row.input_ids.begin(), row.input_ids.begin() + T);
  bool want_mtp = false;
  for (const auto& [key, value] : step.values) {
    if (starts_with(key, "mtp.")) want_mtp = true;
  }
  // Under resync: the engine's residual rows of this row's tokens for `key`, when it probed the key
  // with the residual's width, enough rows and finite values only (a damaged residual fails its own
  // key below; the reference then keeps its own value).
  auto engine_residual = [&](const std::string& key) -> std::optional<ref::Mat> {
    if (!tol_.resync_layers) return std::nullopt;
    auto it = step.values.find(key);
    if (it == step.values.end()) return std::nullopt;
    const ref::Mat& E = it->second;
    if (E.cols != cfg.hc_mult * cfg.dim || row.first_token + T > E.rows) return std::nullopt;
    ref::Mat m = ref::rows_of(E, row.first_token, T);
    for (const float v : m.data) {
      if (!std::isfinite(v)) return std::nullopt;
    }
    return m;
  };
  try {
    ref::Model& model = *req.model;
    ref::Mat R = model.embed(tokens);
    for (int64_t l = 0; l < model.n_blocks(); ++l) {
      if (l > 0) {
        if (std::optional<ref::Mat> e = engine_residual("layers." + std::to_string(l - 1) + ".residual")) {
          R = std::move(*e);
          ++rep.resynced_inputs;
        }
      }
      R = model.block(l).forward(ctx, R, tokens, row.start_pos);
    }
    if (std::optional<ref::Mat> e = engine_residual("layers." + std::to_string(model.n_blocks() - 1) + ".residual")) {
      R = std::move(*e);
      ++rep.resynced_inputs;
    }
    model.head_logits(ctx, R);
    if (want_mtp && cfg.n_mtp_layers > 0 && !req.mtp_lost) {
      // The token after the row's last: the sampled one, or the next prompt token for a chunk
      // that ends inside the prompt.
      const int64_t end = row.start_pos + T;
      const bool in_prompt = !row.samples && end < static_cast<int64_t>(req.prompt.size());
      const bool can = (in_prompt || (row.samples && row.sampled_id >= 0 && row.sampled_id < cfg.vocab_size)) &&
                       req.mtp_next_pos == row.start_pos;
      if (can) {
        std::vector<int64_t> next(tokens.begin() + 1, tokens.end());
        next.push_back(in_prompt ? req.prompt[static_cast<size_t>(end)] : row.sampled_id);
        ref::Mat mtp_out;
        model.mtp_forward(ctx, R, next, row.start_pos, &mtp_out);
        req.mtp_next_pos = row.start_pos + T;
        const size_t chain = row.chain_logits.size();
        if (chain > 0 && row.draft_ids.size() == chain + 1) {
          // The chain on its own trace: its keys must not replace the MTP block's of this row.
          ref::Trace chain_trace;
          const ref::Context chain_ctx{cfg, numerics_, &chain_trace, nullptr};
          std::vector<int64_t> drafts(row.draft_ids.begin(), row.draft_ids.end() - 1);
          chain_ref = model.mtp_chain(chain_ctx, ref::rows_of(mtp_out, T - 1, 1), drafts, end);
        }
      } else {
        req.mtp_lost = true;
      }
    }
  } catch (const std::exception& e) {
    stop(std::string("the reference rejected the row: ") + e.what());
    return;
  }
  req.next_pos = row.start_pos + T;
  req.expect_input.reset();
  ++rep.steps_checked;
  rep.tokens_checked += T;

  // --- Values.
  for (const auto& [key, E] : step.values) {
    const auto [prefix, op] = split_key(key);
    if (op == kTopkOp || op == kExpertsOp) continue;  // decisions, below
    auto rt = trace.values.find(key);
    if (rt == trace.values.end()) {
      req.unchecked.insert(key);  // not recorded by the reference (or an MTP key with the block not run)
      continue;
    }
    ref::Mat R = rt->second;
    ref::Mat E_last;
    int64_t first = row.first_token;
    if (R.rows == 1 && T > 1 && (key == "logits" || key == "mtp.logits")) {
      // Logits of a multi-token call are the last position's; the engine's row holds them at the
      // row's last token.
      if (row.first_token + T > E.rows) {
        fail(key, "the engine value has " + std::to_string(E.rows) + " rows, the row ends at " +
                      std::to_string(row.first_token + T));
        continue;
      }
      E_last = ref::rows_of(E, row.first_token + T - 1, 1);
      first = 0;
    } else if (R.rows != T) {
      req.unchecked.insert(key);  // not one row per token of the call
      continue;
    }
    const ref::Mat& Ev = E_last.rows > 0 ? E_last : E;
    const int64_t Tn = R.rows;
    if (first + Tn > Ev.rows) {
      fail(key, "the engine value has " + std::to_string(E.rows) + " rows, the row needs [" +
                    std::to_string(row.first_token) + ", " + std::to_string(row.first_token + T) + ")");
      continue;
    }
    int64_t cols = R.cols;
    if (op == kScoresOp) {
      // Masked padding: past the narrower side, the wider one must hold -inf only.
      cols = std::min(E.cols, R.cols);
      bool padded = true;
      std::string why;
      for (int64_t t = 0; t < T && padded; ++t) {
        const float* e = E.row(row.first_token + t);
        const float* r = R.row(t);
        for (int64_t c = cols; c < E.cols && padded; ++c) {
          if (!(std::isinf(e[c]) && e[c] < 0)) {
            padded = false;
            why = "engine column " + std::to_string(c) + " of position " + std::to_string(row.start_pos + t) +
                  " is " + fmt("%g", e[c]) + " where the reference has no entry (expected -inf)";
          }
        }
        for (int64_t c = cols; c < R.cols && padded; ++c) {
          if (!(std::isinf(r[c]) && r[c] < 0)) {
            padded = false;
            why = "the engine value has " + std::to_string(E.cols) + " columns, position " +
                  std::to_string(row.start_pos + t) + " scores entry " + std::to_string(c);
          }
        }
      }
      if (!padded) {
        fail(key, "mask: " + why);
        continue;
      }
    } else if (Ev.cols != R.cols) {
      fail(key, "width: engine " + std::to_string(Ev.cols) + ", reference " + std::to_string(R.cols));
      continue;
    }
    std::vector<float> e_block(static_cast<size_t>(Tn * cols)), r_block(static_cast<size_t>(Tn * cols));
    for (int64_t t = 0; t < Tn; ++t) {
      std::copy(Ev.row(first + t), Ev.row(first + t) + cols, e_block.begin() + t * cols);
      std::copy(R.row(t), R.row(t) + cols, r_block.begin() + t * cols);
    }
    const ValueComparison c = compare_values(e_block.data(), r_block.data(), Tn * cols, tol_.for_key(key));
    rep.activations.add(c.max_abs, c.max_rel, c.calc_diff, c.worst_ratio);
    rep.ops[op].add(c.max_abs, c.max_rel, c.calc_diff, c.worst_ratio);
    ++rep.values_checked;
    if (c.failed) {
      std::string where;
      if (c.first_mask_mismatch >= 0 || c.worst_index >= 0) {
        const int64_t i = c.mask_mismatches > 0 ? c.first_mask_mismatch : c.worst_index;
        const int64_t shift = E_last.rows > 0 ? T - 1 : 0;  // the last-row comparison of a logits key
        where = " (position " + std::to_string(row.start_pos + shift + i / cols) + ", column " +
                std::to_string(i % cols) + ")";
      }
      fail(key, c.reason + fmt("; max abs %.3g, max rel %.3g", c.max_abs, c.max_rel) + where, c.max_abs, c.max_rel,
           c.calc_diff);
    }
  }

  // --- The EAGLE chain's draft logits (drafts 2..k).
  if (!row.chain_logits.empty()) {
    const std::string key = "mtp.chain_logits";
    if (chain_ref.size() != row.chain_logits.size()) {
      req.unchecked.insert(key);
    } else {
      for (size_t j = 0; j < chain_ref.size(); ++j) {
        const ref::Mat& r = chain_ref[j];
        const std::vector<float>& e = row.chain_logits[j];
        if (static_cast<int64_t>(e.size()) != r.cols) {
          fail(key, "draft " + std::to_string(j + 2) + " width: engine " + std::to_string(e.size()) + ", reference " +
                        std::to_string(r.cols));
          break;
        }
        const ValueComparison c = compare_values(e.data(), r.data.data(), r.cols, tol_.for_key(key));
        rep.activations.add(c.max_abs, c.max_rel, c.calc_diff, c.worst_ratio);
        rep.ops["chain_logits"].add(c.max_abs, c.max_rel, c.calc_diff, c.worst_ratio);
        ++rep.values_checked;
        if (c.failed) {
          fail(key, "draft " + std::to_string(j + 2) + " (position " + std::to_string(row.start_pos + T + 2 + static_cast<int64_t>(j)) +
                        "): " + c.reason + fmt("; max abs %.3g, max rel %.3g", c.max_abs, c.max_rel),
               c.max_abs, c.max_rel, c.calc_diff);
          break;
        }
      }
    }
  }

  // --- Decisions.
  for (const auto& [key, E] : step.values) {
    const auto [prefix, op] = split_key(key);
    if (op != kTopkOp && op != kExpertsOp) continue;
    const int64_t layer = layer_id_of(prefix, cfg.n_layers);
    const bool indexer = op == kTopkOp;
    const std::string scores_key = prefix + (indexer ? "." + kScoresOp : ".ffn.gate.scores");
    auto rs = trace.values.find(scores_key);
    if (layer < 0 || rs == trace.values.end()) {
      req.unchecked.insert(key);
      continue;
    }
    const ref::Mat& S = rs->second;
    int64_t bad = 0;
    std::string first_bad;
    double bad_gap = 0.0, bad_rel = 0.0;
    for (int64_t t = 0; t < T; ++t) {
      const int64_t p = row.start_pos + t;
      auto m = malformed.find({key, p});
      const std::string at = "position " + std::to_string(p) + ": ";
      if (m != malformed.end()) {
        if (bad++ == 0) first_bad = at + "malformed: " + m->second;
        continue;
      }
      const int64_t r = row.first_token + t;
      if (r >= E.rows) continue;  // reported through `malformed`
      ++rep.decisions_checked;
      std::vector<double> score;
      std::vector<int64_t> own;
      Parsed eng;
      const DecisionTolerance* dtol = nullptr;
      bool exact = false;
      if (indexer) {
        const int64_t visible = (p + 1) / kIndexerRatio;
        score.assign(S.row(t), S.row(t) + std::min(visible, S.cols));
        own = top_k(score, cfg.index_topk);
        eng = parse_selection(E.row(r), E.cols, cfg.index_topk, visible);
        dtol = &tol_.indexer;
      } else {
        score.assign(S.row(t), S.row(t) + S.cols);
        eng = parse_experts(E.row(r), E.cols, cfg.n_activated_experts, cfg.n_routed_experts);
        if (cfg.is_hash_layer(layer)) {
          const ref::Mat& table = weights_->get(prefix + ".ffn.gate.tid2eid");
          const int64_t tok = tokens[static_cast<size_t>(t)];
          for (int64_t j = 0; j < table.cols; ++j) own.push_back(static_cast<int64_t>(table.at(tok, j)));
          exact = true;
        } else {
          const ref::Mat& bias = weights_->get(prefix + ".ffn.gate.bias");
          for (size_t e = 0; e < score.size(); ++e) score[e] += static_cast<double>(bias.data[e]);
          own = top_k(score, cfg.n_activated_experts);
        }
        dtol = &tol_.experts;
      }
      const SetVerdict v = compare_sets(own, eng.picks, score, *dtol);
      if (v.same) continue;
      if (!exact) (v.accepted ? rep.swaps_accepted : rep.swaps_rejected)[op].add(v.gap, v.scale);
      if (!exact && v.accepted) {
        ++rep.forced_decisions;
        continue;
      }
      if (bad++ == 0) {
        std::vector<int64_t> eng_sorted = eng.picks, own_sorted = own;
        std::sort(eng_sorted.begin(), eng_sorted.end());
        std::sort(own_sorted.begin(), own_sorted.end());
        first_bad = at + "engine chose " + list(eng_sorted) + ", the reference " + list(own_sorted);
        if (exact) {
          first_bad += " (hash-routed: tid2eid of token " + std::to_string(tokens[static_cast<size_t>(t)]) + ")";
        } else {
          first_bad += fmt("; score gap %.6g > tolerance %.3g", v.gap, dtol->atol + dtol->rtol * v.scale);
          bad_gap = v.gap;
          bad_rel = v.scale > 0 ? v.gap / v.scale : 0.0;
        }
      }
    }
    if (bad > 0) {
      fail(key, first_bad + (bad > 1 ? " (and " + std::to_string(bad - 1) + " more)" : ""), bad_gap, bad_rel);
    }
  }

  // --- Logits and the greedy token.
  if (row.samples) {
    rep.tokens_sampled += row.new_tokens.empty() ? 1 : static_cast<int64_t>(row.new_tokens.size());
    const ref::Mat& ref_logits = trace.values.at("logits");
    const int64_t V = ref_logits.cols;
    bool logits_ok = true;
    if (static_cast<int64_t>(row.logits.size()) != V) {
      fail("logits", "width: engine " + std::to_string(row.logits.size()) + ", reference " + std::to_string(V));
      logits_ok = false;
    } else {
      const ValueComparison c = compare_values(row.logits.data(), ref_logits.data.data(), V, tol_.logits);
      rep.logits.add(c.max_abs, c.max_rel, c.calc_diff, c.worst_ratio);
      rep.ops["logits"].add(c.max_abs, c.max_rel, c.calc_diff, c.worst_ratio);
      if (c.failed) {
        fail("logits", c.reason + fmt("; max abs %.3g, max rel %.3g", c.max_abs, c.max_rel), c.max_abs, c.max_rel,
             c.calc_diff);
      }
    }
    const int32_t b = row.sampled_id;
    ++rep.decisions_checked;
    if (b < 0 || b >= V) {
      fail("sample", "sampled id " + std::to_string(b) + " outside the vocabulary");
    } else {
      if (logits_ok) {
        const float own = row.logits[static_cast<size_t>(b)];
        const float best = *std::max_element(row.logits.begin(), row.logits.end());
        if (!(own >= best)) {
          fail("sample", "sampled id " + std::to_string(b) + " is not an argmax of the engine's own logits" +
                             fmt(" (%.6g < %.6g)", own, best));
        }
      }
      const int64_t a = ref::argmax(ref_logits);
      if (a != b) {
        const double la = ref_logits.data[static_cast<size_t>(a)], lb = ref_logits.data[static_cast<size_t>(b)];
        double scale = 0.0;
        for (const float v : ref_logits.data) {
          if (std::isfinite(v)) scale = std::max(scale, static_cast<double>(std::fabs(v)));
        }
        const bool accepted = tol_.greedy.accepts(la, lb, scale);
        (accepted ? rep.swaps_accepted : rep.swaps_rejected)["sample"].add(la - lb, scale);
        if (accepted) {
          ++rep.forced_decisions;
        } else {
          fail("sample",
               "engine sampled " + std::to_string(b) + ", the reference's argmax is " + std::to_string(a) +
                   fmt("; logit gap %.6g > tolerance %.3g", la - lb, tol_.greedy.atol + tol_.greedy.rtol * scale),
               la - lb, scale > 0 ? (la - lb) / scale : 0.0);
        }
      }
      req.expect_input = b;
    }
  }

  rep.unchecked_keys.assign(req.unchecked.begin(), req.unchecked.end());
}

std::string ReferenceOracle::table() const {
  std::string out;
  char line[512];
  std::snprintf(line, sizeof line, "%-8s %7s %9s %10s %10s %10s %10s %7s  %s\n", "request", "prompt", "generated",
                "max_abs", "max_rel", "cos_diff", "act_cos", "forced", "status");
  out += line;
  for (const RequestReport& r : reports_) {
    std::string status = "ok";
    if (r.first_divergence) {
      const Divergence& d = *r.first_divergence;
      status = "DIVERGED step " + std::to_string(d.step) + " " + d.key + ": " + d.detail;
    }
    if (r.aborted) status += " (aborted)";
    std::snprintf(line, sizeof line, "%-8lld %7lld %9lld %10.3g %10.3g %10.3g %10.3g %7lld  ",
                  static_cast<long long>(r.request_id), static_cast<long long>(r.prompt_length),
                  static_cast<long long>(r.tokens_sampled), r.logits.max_abs, r.logits.max_rel, r.logits.max_calc_diff,
                  r.activations.max_calc_diff, static_cast<long long>(r.forced_decisions));
    out += line + status + "\n";
  }
  return out;
}

std::string ReferenceOracle::op_table() const {
  std::map<std::string, std::pair<ErrorStats, int64_t>> ops;  // op -> (worst, requests seen)
  std::map<std::string, std::pair<GapStats, GapStats>> swaps;  // op -> (accepted, rejected)
  for (const RequestReport& r : reports_) {
    for (const auto& [op, e] : r.ops) {
      auto& [worst, n] = ops[op];
      worst.add(e.max_abs, e.max_rel, e.max_calc_diff, e.max_bound_ratio);
      ++n;
    }
    for (int k = 0; k < 2; ++k) {
      for (const auto& [op, g] : k == 0 ? r.swaps_accepted : r.swaps_rejected) {
        GapStats& into = k == 0 ? swaps[op].first : swaps[op].second;
        into.count += g.count;
        into.max_gap = std::max(into.max_gap, g.max_gap);
        into.max_rel_gap = std::max(into.max_rel_gap, g.max_rel_gap);
      }
    }
  }
  std::string out;
  char line[512];
  std::snprintf(line, sizeof line, "%-32s %10s %10s %10s %10s %9s %9s\n", "op", "calc_diff", "limit", "max_abs",
                "max_rel", "x_bound", "limit");
  out += line;
  for (const auto& [op, v] : ops) {
    const ErrorStats& e = v.first;
    const ValueTolerance& t = tol_.for_key(op);
    std::snprintf(line, sizeof line, "%-32s %10.3g %10.3g %10.3g %10.3g %9.3g %9.3g\n", op.c_str(), e.max_calc_diff,
                  t.max_calc_diff, e.max_abs, e.max_rel, e.max_bound_ratio, t.gross_factor);
    out += line;
  }
  for (const auto& [op, v] : swaps) {
    std::snprintf(line, sizeof line, "%-32s accepted %lld (max gap %.4g, rel %.4g), rejected %lld (max gap %.4g, rel %.4g)\n",
                  op.c_str(), static_cast<long long>(v.first.count), v.first.max_gap, v.first.max_rel_gap,
                  static_cast<long long>(v.second.count), v.second.max_gap, v.second.max_rel_gap);
    out += line;
  }
  return out;
}

}  // namespace dsv4::engine
