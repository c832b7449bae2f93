#include "properties/verdict.h"

namespace dsv4::props {

namespace {
constexpr struct {
  VerdictKind kind;
  const char* name;
} kKinds[] = {{VerdictKind::pass, "pass"},
              {VerdictKind::mismatch, "mismatch"},
              {VerdictKind::contract_error, "contract-error"},
              {VerdictKind::race, "race"},
              {VerdictKind::hang, "hang"},
              {VerdictKind::crash, "crash"},
              {VerdictKind::bad_input, "bad-input"}};
}  // namespace

const char* verdict_kind_name(VerdictKind kind) {
  for (const auto& k : kKinds) {
    if (k.kind == kind) return k.name;
  }
  return "unknown";
}

bool parse_verdict_kind(const std::string& name, VerdictKind& kind) {
  for (const auto& k : kKinds) {
    if (name == k.name) {
      kind = k.kind;
      return true;
    }
  }
  return false;
}

}  // namespace dsv4::props
