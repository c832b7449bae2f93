// What one case of a property came to: the verdict kinds of the design (pass, mismatch,
// contract-error, race, hang, crash, bad-input) with a signature that names where it failed (the op
// and argument of a contract error, the buffer of a race, the first divergent layer and op, the
// signal of a crash) and a human-readable detail.
#pragma once

#include <string>

namespace dsv4::props {

enum class VerdictKind { pass, mismatch, contract_error, race, hang, crash, bad_input };

const char* verdict_kind_name(VerdictKind kind);  // "pass", "mismatch", "contract-error", ...
// The kind called `name`, or false.
bool parse_verdict_kind(const std::string& name, VerdictKind& kind);

struct Verdict {
  VerdictKind kind = VerdictKind::pass;
  std::string signature;  // stable across shrinking where possible, e.g. "indexer_logits" or "SIGFPE"
  std::string detail;     // one or a few lines for the report

  bool passed() const { return kind == VerdictKind::pass; }
  static Verdict pass() { return {}; }
  static Verdict fail(VerdictKind kind, std::string signature, std::string detail) {
    return Verdict{kind, std::move(signature), std::move(detail)};
  }
};

}  // namespace dsv4::props
