#include "engine/oracle/compare.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <utility>
#include <vector>

namespace dsv4::engine {

namespace {

// NaN, +inf, -inf or finite.
int value_class(float v) {
  if (std::isnan(v)) return 1;
  if (std::isinf(v)) return v > 0 ? 2 : 3;
  return 0;
}

const char* class_name(int c) {
  switch (c) {
    case 1: return "NaN";
    case 2: return "+inf";
    case 3: return "-inf";
    default: return "finite";
  }
}

std::string fmt(const char* format, double a, double b = 0.0, double c = 0.0) {
  char buf[160];
  std::snprintf(buf, sizeof buf, format, a, b, c);
  return buf;
}

bool starts_with(const std::string& s, const std::string& prefix) { return s.rfind(prefix, 0) == 0; }

// The rank of an op within its layer, in forward order.
int64_t op_rank(const std::string& op) {
  static const std::vector<std::pair<std::string, int64_t>> exact = {
      {"attn_norm", 0},
      {"attn.qr", 10},
      {"attn.q", 11},
      {"attn.kv", 12},
      {"attn.compressor.kv", 20},
      {"attn.compressor.score", 21},
      {"attn.compressor.entries", 22},
      {"attn.indexer.compressor.kv", 30},
      {"attn.indexer.compressor.score", 31},
      {"attn.indexer.compressor.entries", 32},
      {"attn.indexer.q", 34},
      {"attn.indexer.weights", 35},
      {"attn.indexer.scores", 36},
      {"attn.indexer.topk", 37},
      {"attn.keys_attended", 40},
      {"attn.o", 41},
      {"attn.out", 42},
      {"ffn_norm", 50},
      {"ffn.gate.scores", 60},
      {"ffn.gate.experts", 61},
      {"ffn.gate.weights", 62},
      {"ffn.out", 70},
      {"residual", 80},
      {"logits", 0},
  };
  for (const auto& [name, rank] : exact) {
    if (op == name) return rank;
  }
  // Unknown ops of a known group go at the end of the group.
  static const std::vector<std::pair<std::string, int64_t>> groups = {
      {"attn.compressor.", 23}, {"attn.indexer.", 38}, {"attn.", 49}, {"ffn.gate.", 63}, {"ffn.", 79},
  };
  for (const auto& [prefix, rank] : groups) {
    if (starts_with(op, prefix)) return rank;
  }
  return 90;
}

}  // namespace

bool DecisionTolerance::accepts(double s_a, double s_b, double scale) const {
  if (std::isnan(s_a) || std::isnan(s_b)) return false;
  if (s_a <= s_b) return true;  // the engine's pick scores at least as well
  if (std::isinf(s_a) || std::isinf(s_b)) return false;
  return s_a - s_b <= atol + rtol * std::fabs(scale);
}

bool DecisionTolerance::accepts(double s_a, double s_b) const {
  return accepts(s_a, s_b, std::max(std::fabs(s_a), std::fabs(s_b)));
}

double calc_diff(const float* engine, const float* reference, int64_t n) {
  double dd = 0.0, sq = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    const double x = engine[i], y = reference[i];
    dd += (x - y) * (x - y);
    sq += x * x + y * y;
  }
  if (sq == 0.0) return 0.0;
  return dd / sq;
}

ValueComparison compare_values(const float* engine, const float* reference, int64_t n, const ValueTolerance& tol) {
  ValueComparison c;
  c.count = n;
  double dd = 0.0, sq = 0.0;
  int64_t finite = 0;
  for (int64_t i = 0; i < n; ++i) {
    const float e = engine[i], r = reference[i];
    const int ce = value_class(e), cr = value_class(r);
    if (ce != cr) {
      if (c.mask_mismatches++ == 0) c.first_mask_mismatch = i;
      continue;
    }
    if (ce != 0) continue;
    const double x = e, y = r;
    dd += (x - y) * (x - y);
    sq += x * x + y * y;
    ++finite;
    const double abs_err = std::fabs(x - y);
    const double bound = tol.atol + tol.rtol * std::fabs(y);
    c.max_abs = std::max(c.max_abs, abs_err);
    const double denom = std::max(std::fabs(y), tol.atol);
    if (denom > 0.0) {
      c.max_rel = std::max(c.max_rel, abs_err / denom);
    } else if (abs_err > 0.0) {
      c.max_rel = std::numeric_limits<double>::infinity();
    }
    if (abs_err > bound) ++c.outside;
    const double ratio = bound > 0.0 ? abs_err / bound : (abs_err > 0.0 ? std::numeric_limits<double>::infinity() : 0.0);
    if (ratio > c.worst_ratio) {
      c.worst_ratio = ratio;
      c.worst_index = i;
    }
  }
  const double denom = std::max(sq, 2.0 * static_cast<double>(finite) * tol.atol * tol.atol);
  c.calc_diff = denom == 0.0 ? 0.0 : dd / denom;

  if (c.mask_mismatches > 0) {
    const int64_t i = c.first_mask_mismatch;
    c.failed = true;
    c.reason = "mask: " + std::to_string(c.mask_mismatches) + " element(s) differ in class, first at " +
               std::to_string(i) + " (engine " + class_name(value_class(engine[i])) + ", reference " +
               class_name(value_class(reference[i])) + ")";
  } else if (c.calc_diff > tol.max_calc_diff) {
    c.failed = true;
    c.reason = fmt("calc_diff %.3g > %.3g", c.calc_diff, tol.max_calc_diff);
  } else if (c.worst_ratio > tol.gross_factor) {
    const int64_t i = c.worst_index;
    c.failed = true;
    c.reason = "elementwise: element " + std::to_string(i) +
               fmt(" engine %.6g reference %.6g, %.3g x the bound", engine[i], reference[i], c.worst_ratio) +
               fmt(" (limit %.3g x)", tol.gross_factor);
  }
  return c;
}

std::pair<std::string, std::string> split_key(const std::string& key) {
  for (const char* head : {"layers.", "mtp."}) {
    const std::string h = head;
    if (!starts_with(key, h)) continue;
    size_t end = h.size();
    while (end < key.size() && key[end] >= '0' && key[end] <= '9') ++end;
    if (end > h.size() && end < key.size() && key[end] == '.') return {key.substr(0, end), key.substr(end + 1)};
    if (end == h.size()) return {h.substr(0, h.size() - 1), key.substr(h.size())};  // "mtp.logits"
  }
  return {"", key};
}

std::tuple<int64_t, int64_t, std::string> key_order(const std::string& key, int64_t n_layers) {
  constexpr int64_t kEnd = int64_t{1} << 40;
  if (key == "input") return {-1, 0, key};
  if (key == "logits") return {kEnd, 0, key};
  if (key == "sample") return {kEnd, 1, key};
  const auto [prefix, op] = split_key(key);
  if (prefix == "mtp") return {kEnd - 1, op_rank(op), op};
  for (const auto& [head, base] : {std::pair<std::string, int64_t>{"layers.", 0}, {"mtp.", n_layers}}) {
    if (starts_with(prefix, head)) {
      const int64_t index = std::stoll(prefix.substr(head.size()));
      return {base + index, op_rank(op), op};
    }
  }
  return {kEnd - 2, op_rank(op), key};
}

}  // namespace dsv4::engine
