// Oracles 1 and 2 of design.md: the engine's steps against reference/ on the same weights, with
// tie-aware discrete decisions and the first divergence.
//
// The ReferenceOracle keeps one ref::Model per request and replays each engine row on it, at the
// row's start position, with the engine's probed decisions forced into it:
//
//  * Forcing. For every (layer, position) of a row, the indexer selection is read from the engine's
//    "<prefix>.attn.indexer.topk" row (entries >= 0) and the routed experts from
//    "<prefix>.ffn.gate.experts", prefix "layers.L" (or "mtp.M" for layer n_layers + M). A decision
//    key the engine did not probe is left to the reference. A malformed engine decision (wrong count,
//    repeated or out-of-range index, an entry the position cannot see) is a mismatch and is not
//    forced. A well-formed one is always forced, accepted or not, so that every later value is
//    compared against a reference that made the engine's choices (a rejected decision is itself the
//    divergence; what follows it is then not blamed on it a second time).
//  * Decisions, tie-aware. The reference's own unforced choice is recomputed from its recorded
//    scores: the indexer's top min(index_topk, visible) of "<prefix>.attn.indexer.scores", ties to
//    the lower index; the experts' top-k of "<prefix>.ffn.gate.scores" + gate.bias on score layers.
//    Sets are compared (order-free). A different engine set is accepted when every swapped pair
//    (a the reference's, b the engine's) passes DecisionTolerance::accepts(s_a, s_b), and then
//    counts as a forced decision. Hash-routed layers must match tid2eid exactly. The greedy token:
//    the engine's sampled id b is accepted against the reference's argmax a when
//    accepts(logit_a, logit_b); it must also be an argmax of the engine's own logits. The reference
//    continues with the engine's token because the next row feeds it.
//  * Values. Every engine-probed key that the reference trace also has, with one row per token of
//    the call, is compared on the row's block [first_token, first_token + num_tokens) under the
//    rules of compare.h. Widths must agree, except "<prefix>.attn.indexer.scores" whose columns past
//    the narrower side must be -inf on the wider one (masked padding). Keys the reference does not
//    record per token (compressor entries, logits of a multi-token call) or does not record at all
//    are listed in the report as unchecked. When the row samples, row.logits is compared with the
//    reference's [1, vocab] logits under the logits tolerance.
//  * MTP. When the engine probes any "mtp.*" key, a sampling row also runs the reference's MTP block
//    on the row's final residuals with the next tokens (the row's inputs shifted by one, then the
//    engine's sampled token), as generate_greedy does. The MTP block needs contiguous positions: once
//    a row cannot run it (a prefill chunk that does not sample), that request's MTP keys stay
//    unchecked.
//  * Rows. Each row must continue its request (start_pos = tokens so far), feed the prompt while in
//    the prompt and the previously sampled token after a sampling row, and hold num_tokens valid ids.
//    A row that fails these cannot be replayed; its request is not checked further.
//
// First divergence: within a step, the failures are ordered by key_order (compare.h); the first
// divergence of a request is the first failing key of the first step in which it has any, and the
// global one the first failing key (batch order on equal keys) of the first step in which anything
// fails. Checking continues after a failure, so every request gets its report.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "engine/config/model_config.h"
#include "engine/model/step_record.h"
#include "engine/oracle/compare.h"
#include "reference/context.h"
#include "reference/model.h"
#include "reference/weights.h"

namespace dsv4::engine {

// Starting points for bf16 data through the 5 micro/tiny layers with f32 (engine) against f64
// (reference) accumulation; calibrate against clean engine runs.
struct OracleTolerances {
  // bf16 activations (also the fp32 intermediates that sit on bf16 inputs: gate scores and weights,
  // compressor projections): 1/32 relative (4-8 bf16 ulps), 1/64 absolute (RMS-normed values are O(1)).
  ValueTolerance activations{1.0 / 32, 1.0 / 64, 1e-3, 16.0};
  // fp32 logits: a GEMM on one bf16-rounded normed row; the noise is the bf16 input's.
  ValueTolerance logits{1.0 / 64, 1.0 / 64, 1e-3, 16.0};
  // Per-op overrides by op name (the key without its layer prefix, "attn.indexer.q"). The indexer's
  // q goes through FP4 (e2m1, block scales): one rounding step is up to a third of the block's amax,
  // so a single flip moves a one-token calc_diff by ~3e-3; its scores inherit that.
  std::map<std::string, ValueTolerance> op_overrides = {
      {"attn.indexer.q", ValueTolerance{1.0 / 32, 1.0 / 16, 2e-2, std::numeric_limits<double>::infinity()}},
      {"attn.indexer.scores", ValueTolerance{1.0 / 16, 1.0 / 16, 1e-2, 16.0}},
  };
  // Discrete decisions: the swapped candidates' reference scores may differ by atol + rtol·|score|.
  DecisionTolerance indexer{1e-3, 1.0 / 64};   // bf16 indexer scores: 2-4 ulps
  DecisionTolerance experts{1e-3, 1.0 / 64};   // fp32 gate scores (+ bias) on bf16 inputs
  DecisionTolerance greedy{1e-3, 1.0 / 64};    // fp32 logits

  // The tolerance of a probe key ("logits" gets `logits`).
  const ValueTolerance& for_key(const std::string& key) const;
};

struct Divergence {
  int64_t step = 0;
  int64_t request_id = 0;
  std::string key;    // "layers.2.attn.o", "layers.1.attn.indexer.topk", "logits", "sample", "input"
  std::string layer;  // "layers.2", "mtp.0", or "" for logits / sample / input
  std::string op;     // "attn.o", "logits", "sample", "input"
  double max_abs = 0.0;
  double max_rel = 0.0;
  double calc_diff = 0.0;
  std::string detail;

  std::string summary() const;  // "step S request R layers.2.attn.o: detail"
};

struct ErrorStats {
  double max_abs = 0.0;
  double max_rel = 0.0;
  double max_calc_diff = 0.0;
  void add(double abs_err, double rel_err, double cdiff);
};

struct RequestReport {
  int64_t request_id = 0;
  int64_t prompt_length = 0;
  int64_t steps_checked = 0;      // steps with a replayed row of this request
  int64_t tokens_checked = 0;     // tokens replayed
  int64_t tokens_sampled = 0;     // sampling rows checked
  ErrorStats logits;              // over row.logits
  ErrorStats activations;         // over every compared probe key
  int64_t values_checked = 0;     // (row, key) blocks compared
  int64_t decisions_checked = 0;  // (layer, token) decisions and greedy tokens compared
  int64_t forced_decisions = 0;   // of those, engine choices that differ from the reference's and were accepted
  std::vector<std::string> unchecked_keys;  // engine keys never compared (sorted, unique)
  bool aborted = false;
  bool stopped = false;           // a row could not be replayed; later rows are not checked
  std::optional<Divergence> first_divergence;

  bool ok() const { return !first_divergence.has_value(); }
};

class ReferenceOracle {
 public:
  // `weights` must outlive the oracle.
  ReferenceOracle(const ModelConfig& config, const ref::Weights& weights, ref::Numerics numerics,
                  OracleTolerances tolerances = {});
  ~ReferenceOracle();
  ReferenceOracle(const ReferenceOracle&) = delete;
  ReferenceOracle& operator=(const ReferenceOracle&) = delete;
  ReferenceOracle(ReferenceOracle&&) noexcept;
  ReferenceOracle& operator=(ReferenceOracle&&) noexcept;

  // A new request; its rows may then appear in steps. ContractError if the id is known already.
  void add_request(int64_t id, std::vector<int32_t> prompt_ids);
  // Replays and compares every row of the step. ContractError for a row of an unknown request id.
  void check(const StepRecord& step);
  // Frees the request's reference model; its report stays. A later row of it is a divergence.
  void abort_request(int64_t id);

  bool ok() const { return !first_.has_value(); }
  const std::vector<RequestReport>& reports() const { return reports_; }
  const RequestReport* report(int64_t id) const;
  std::optional<Divergence> first_divergence() const { return first_; }
  // One line per request: id, prompt, generated, logits max abs / max rel / cos diff, activations
  // cos diff, forced, status ("ok" or "DIVERGED step S <key> ...").
  std::string table() const;

  const OracleTolerances& tolerances() const { return tol_; }

 private:
  struct Request;
  struct Failure;

  void check_row(const StepRecord& step, const StepRow& row, Request& req, std::vector<Failure>& failures);

  std::unique_ptr<const ModelConfig> config_;  // on the heap: the models keep a reference
  const ref::Weights* weights_;
  ref::Numerics numerics_;
  OracleTolerances tol_;
  std::map<int64_t, std::unique_ptr<Request>> requests_;
  std::vector<RequestReport> reports_;
  std::optional<Divergence> first_;
};

}  // namespace dsv4::engine
