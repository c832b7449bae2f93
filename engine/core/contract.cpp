#include "engine/core/contract.h"

#include <algorithm>

#include "engine/core/error.h"

namespace dsv4 {

namespace {

const Tensor* find(const Contract::Args& args, const std::string& name) {
  for (const auto& [n, t] : args) {
    if (n == name) return t;
  }
  return nullptr;
}

std::string dims_text(const Tensor& t) { return shape_str(t.shape()); }

}  // namespace

Contract::Contract(std::string op) : op_(std::move(op)) {}

Contract& Contract::arg(std::string name) {
  DSV4_ASSERT(std::find(arguments_.begin(), arguments_.end(), name) == arguments_.end(), "argument declared twice: " + name);
  current_ = name;
  arguments_.push_back(std::move(name));
  return *this;
}

Contract& Contract::optional() {
  DSV4_ASSERT(!current_.empty(), "optional() before arg()");
  optional_.push_back(current_);
  return *this;
}

void Contract::add(std::string description, std::function<std::optional<std::string>(const Tensor&, const Args&)> test,
                   bool reads_values) {
  DSV4_ASSERT(!current_.empty(), "a rule needs an arg() first");
  rules_.push_back(Rule{current_, std::move(description), std::move(test), reads_values});
}

Contract& Contract::dtype(DType expected) {
  add("dtype " + std::string(dtype_name(expected)), [expected](const Tensor& t, const Args&) -> std::optional<std::string> {
    if (t.dtype() == expected) return std::nullopt;
    return "got " + std::string(dtype_name(t.dtype()));
  });
  return *this;
}

Contract& Contract::dtype_in(std::vector<DType> allowed) {
  std::string names;
  for (DType d : allowed) names += (names.empty() ? "" : "|") + std::string(dtype_name(d));
  add("dtype in {" + names + "}", [allowed](const Tensor& t, const Args&) -> std::optional<std::string> {
    if (std::find(allowed.begin(), allowed.end(), t.dtype()) != allowed.end()) return std::nullopt;
    return "got " + std::string(dtype_name(t.dtype()));
  });
  return *this;
}

Contract& Contract::rank(int64_t expected) {
  add("rank " + std::to_string(expected), [expected](const Tensor& t, const Args&) -> std::optional<std::string> {
    if (t.dim() == expected) return std::nullopt;
    return "got shape " + dims_text(t);
  });
  return *this;
}

Contract& Contract::dim(int64_t d, int64_t size) {
  add("shape[" + std::to_string(d) + "] == " + std::to_string(size), [d, size](const Tensor& t, const Args&) -> std::optional<std::string> {
    if (d < t.dim() && t.size(d) == size) return std::nullopt;
    return "got shape " + dims_text(t);
  });
  return *this;
}

Contract& Contract::dim_multiple_of(int64_t d, int64_t multiple) {
  add("shape[" + std::to_string(d) + "] % " + std::to_string(multiple) + " == 0",
      [d, multiple](const Tensor& t, const Args&) -> std::optional<std::string> {
        if (d < t.dim() && t.size(d) % multiple == 0) return std::nullopt;
        return "got shape " + dims_text(t);
      });
  return *this;
}

Contract& Contract::same_size(int64_t d, std::string other, int64_t other_d) {
  references_.push_back(other);
  const std::string desc = "shape[" + std::to_string(d) + "] == " + other + ".shape[" + std::to_string(other_d) + "]";
  add(desc, [d, other, other_d](const Tensor& t, const Args& args) -> std::optional<std::string> {
    const Tensor* o = find(args, other);
    if (o == nullptr || !o->defined()) return std::nullopt;  // the other argument's own rules report it
    if (d < t.dim() && other_d < o->dim() && t.size(d) == o->size(other_d)) return std::nullopt;
    return "got " + dims_text(t) + " and " + other + " " + dims_text(*o);
  });
  return *this;
}

Contract& Contract::contiguous() {
  add("contiguous", [](const Tensor& t, const Args&) -> std::optional<std::string> {
    if (t.is_contiguous()) return std::nullopt;
    return "shape " + dims_text(t) + " has strides " + shape_str(t.strides());
  });
  return *this;
}

Contract& Contract::inner_contiguous() {
  add("last-dim stride 1", [](const Tensor& t, const Args&) -> std::optional<std::string> {
    if (t.dim() == 0 || t.numel() == 0 || t.size(-1) == 1 || t.stride(-1) == 1) return std::nullopt;
    return "strides " + shape_str(t.strides());
  });
  return *this;
}

Contract& Contract::aligned(int64_t bytes) {
  add(std::to_string(bytes) + "-byte aligned", [bytes](const Tensor& t, const Args&) -> std::optional<std::string> {
    if (t.numel() == 0) return std::nullopt;
    const auto address = reinterpret_cast<uintptr_t>(t.data_ptr());
    if (address % static_cast<uintptr_t>(bytes) == 0) return std::nullopt;
    return "address % " + std::to_string(bytes) + " = " + std::to_string(address % static_cast<uintptr_t>(bytes));
  });
  return *this;
}

Contract& Contract::same_device(std::string other) {
  references_.push_back(other);
  add("same device as " + other, [other](const Tensor& t, const Args& args) -> std::optional<std::string> {
    const Tensor* o = find(args, other);
    if (o == nullptr || !o->defined() || t.device() == o->device()) return std::nullopt;
    return "on " + t.device().str() + ", " + other + " on " + o->device().str();
  });
  return *this;
}

namespace {

// The first element outside [lo, hi], for host tensors; device tensors are copied to the host.
std::optional<std::string> first_outside(const Tensor& t, int64_t lo, int64_t hi) {
  if (!dtype_is_integer(t.dtype())) return "needs an integer tensor, got " + std::string(dtype_name(t.dtype()));
  const std::vector<double> values = t.values();
  for (size_t i = 0; i < values.size(); ++i) {
    const auto v = static_cast<int64_t>(values[i]);
    if (v < lo || v > hi) {
      return "element " + std::to_string(i) + " is " + std::to_string(v) + ", outside [" + std::to_string(lo) + ", " +
             std::to_string(hi) + "]";
    }
  }
  return std::nullopt;
}

}  // namespace

Contract& Contract::values_in(int64_t lo, int64_t hi) {
  add("values in [" + std::to_string(lo) + ", " + std::to_string(hi) + "]",
      [lo, hi](const Tensor& t, const Args&) { return first_outside(t, lo, hi); }, /*reads_values=*/true);
  return *this;
}

Contract& Contract::values_index_into(int64_t lo, std::string other, int64_t other_d) {
  references_.push_back(other);
  add("values in [" + std::to_string(lo) + ", " + other + ".shape[" + std::to_string(other_d) + "])",
      [lo, other, other_d](const Tensor& t, const Args& args) -> std::optional<std::string> {
        const Tensor* o = find(args, other);
        if (o == nullptr || !o->defined() || other_d >= o->dim()) return std::nullopt;
        return first_outside(t, lo, o->size(other_d) - 1);
      },
      /*reads_values=*/true);
  return *this;
}
void Contract::check(const Args& args, Values values) const {
  // A relation to an undeclared argument would be skipped silently: a bug in the contract itself.
  for (const std::string& name : references_) {
    DSV4_ASSERT(std::find(arguments_.begin(), arguments_.end(), name) != arguments_.end(),
                op_ + ": a rule refers to '" + name + "', which the contract does not declare");
  }
  for (const auto& [name, tensor] : args) {
    if (std::find(arguments_.begin(), arguments_.end(), name) == arguments_.end()) {
      throw ContractError(op_, name, "not an argument of this op");
    }
  }
  for (const std::string& name : arguments_) {
    const Tensor* t = find(args, name);
    const bool present = t != nullptr && t->defined();
    const bool is_optional = std::find(optional_.begin(), optional_.end(), name) != optional_.end();
    if (!present && !is_optional) throw ContractError(op_, name, "required but missing");
  }
  for (const Rule& rule : rules_) {
    const Tensor* t = find(args, rule.argument);
    if (t == nullptr || !t->defined()) continue;
    if (rule.reads_values && values == Values::skip) continue;
    if (auto detail = rule.test(*t, args)) throw ContractError(op_, rule.argument, rule.description + ": " + *detail);
  }
}

}  // namespace dsv4
