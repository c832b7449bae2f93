// The building blocks of the reference comparison (design.md, oracles 1 and 2): the tolerance of one
// continuous tensor and its verdict, the tie-aware tolerance of a discrete decision, and the order in
// which the forward computes its probe keys (for the first divergence).
//
// The rules, in one place:
//
//  * A continuous tensor (engine value e against reference value r, same shape) FAILS when
//      1. its special-value masks differ: every element must be in the same class on both sides
//         (NaN, +inf, -inf or finite); or
//      2. its cosine distance over the finite elements exceeds `max_calc_diff` (the primary rule):
//         DeepGEMM's calc_diff 1 - 2·Σ e·r / Σ (e² + r²) = Σ (e - r)² / Σ (e² + r²), computed in the
//         second form (no cancellation), with the denominator floored at 2·n·atol²:
//           Σ (e - r)² / max(Σ (e² + r²), 2·n·atol²).
//         The floor only acts on blocks whose RMS is below atol, where calc_diff stops meaning
//         anything: a one-token indexer score row of four visible entries, three of them ReLU'd to
//         0, reads calc_diff 0.045 for an absolute error of 7e-4 (micro, a clean engine run). Such
//         a block is judged by its error against atol instead; and
//      3. (the secondary, elementwise rule) some finite element is grossly off:
//         |e - r| > gross_factor · (atol + rtol·|r|).
//    The elementwise bound atol + rtol·|r| itself is not a pass/fail line: bf16 activations that went
//    through FP8 / FP4 quantize-dequantize points legitimately flip a rounding step here and there
//    (one FP8 step is 6-12 % of the value). Elements past it are counted (`outside`) and reported,
//    and only an error `gross_factor` times past it fails the tensor: that catches a single wrong
//    element of a large tensor, which moves calc_diff by ~1/n only. gross_factor = +inf disables it.
//  * max_rel is |e - r| / max(|r|, atol), so values near zero do not read as huge relative errors.
//  * A discrete choice that differs from the reference's is accepted when the reference's own scores
//    of the swapped candidates a (the reference's pick) and b (the engine's) satisfy
//      s_a - s_b <= atol + rtol · scale,
//    scale = the largest |score| among the decision's candidates (the visible entries of the
//    indexer row, the experts' biased scores, the vocabulary's logits). The noise of one score comes
//    from the magnitudes of the whole computation (the indexer's per-head products, an FP4 flip in
//    one key), not from the two swapped scores, which often sit near 0 (the indexer's ReLU).
//    The two-score overload uses scale = max(|s_a|, |s_b|).
#pragma once

#include <cstdint>
#include <limits>
#include <map>
#include <string>
#include <tuple>

namespace dsv4::engine {

struct ValueTolerance {
  double rtol = 0.0;
  double atol = 0.0;
  double max_calc_diff = 0.0;
  double gross_factor = std::numeric_limits<double>::infinity();
};

struct DecisionTolerance {
  double atol = 0.0;
  double rtol = 0.0;
  // Whether a choice of b over a (reference scores s_a >= s_b) is a near-tie, on the decision's
  // score scale (see above).
  bool accepts(double s_a, double s_b, double scale) const;
  bool accepts(double s_a, double s_b) const;
};

// The result of comparing one tensor (or one block of rows of it).
struct ValueComparison {
  int64_t count = 0;          // elements compared
  int64_t mask_mismatches = 0;
  int64_t first_mask_mismatch = -1;  // flat index, -1 if none
  int64_t outside = 0;        // finite elements past atol + rtol·|r|
  double max_abs = 0.0;       // over finite pairs
  double max_rel = 0.0;       // |e - r| / max(|r|, atol)
  int64_t worst_index = -1;   // flat index of the largest |e - r| / (atol + rtol·|r|)
  double worst_ratio = 0.0;   // that ratio (the elementwise rule fails past gross_factor)
  double calc_diff = 0.0;     // Σ(e - r)² / max(Σ(e² + r²), 2·n·atol²) over the n finite pairs; 0 when all are 0
  bool failed = false;
  std::string reason;         // empty when passed: "mask", "calc_diff" or "elementwise", with numbers
};

// DeepGEMM's calc_diff over n pairs (all finite), unfloored. 0 when Σ(e² + r²) is 0.
double calc_diff(const float* engine, const float* reference, int64_t n);

// Compares n elements (a flat block) under `tol`, following the rules above.
ValueComparison compare_values(const float* engine, const float* reference, int64_t n, const ValueTolerance& tol);

// Splits a probe key into its layer prefix and op: "layers.3.attn.q" -> ("layers.3", "attn.q"),
// "mtp.0.ffn.out" -> ("mtp.0", "ffn.out"), "logits" -> ("", "logits"), "mtp.logits" -> ("mtp",
// "logits").
std::pair<std::string, std::string> split_key(const std::string& key);

// The forward order of probe keys: layers.0 < layers.1 < ... < mtp.0 < mtp.logits < logits < sample,
// and within a layer attn_norm, attn.qr, attn.q, attn.kv, attn.compressor.*, attn.indexer.*
// (compressor, q, weights, scores, topk), attn.keys_attended, attn.o, attn.out, ffn_norm,
// ffn.gate.* (scores, experts, weights), ffn.out, residual; ops it does not know go last in their
// layer, by name. The pseudo-key "input" (the row itself: positions, token ids) precedes everything.
// `n_layers` places the MTP layers after the main ones.
std::tuple<int64_t, int64_t, std::string> key_order(const std::string& key, int64_t n_layers);

}  // namespace dsv4::engine
