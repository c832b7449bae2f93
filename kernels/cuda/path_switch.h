// A process-wide choice between the paths of one kernel (the bitwise one that follows the host's
// order, a fast one): read once from an environment variable at first use, overridable by tests and
// benchmarks. Plain C++: shared by the FP8 GEMM (DSV4_FP8_GEMM) and the sparse attention
// (DSV4_SPARSE_ATTENTION) switches. Keep each instance a function-local static, constructed at first
// use: benchmarks name their registrations by path during static initialization.
#pragma once

#include <atomic>
#include <cstdlib>
#include <initializer_list>
#include <string>
#include <vector>

#include "engine/core/error.h"

namespace dsv4::kernels::cuda {

class PathSwitch {
 public:
  // names[i] is the environment value of path i; path 0 is the default (unset or empty variable).
  PathSwitch(const char* variable, std::initializer_list<const char*> names) : variable_(variable), names_(names) {}

  // The environment's choice at first use, or the last set(). Any other value of the variable is
  // an InputError naming it and the accepted values (the CLI's exit code 2).
  int get() {
    int p = value_.load(std::memory_order_relaxed);
    if (p < 0) {
      int expected = -1;
      value_.compare_exchange_strong(expected, from_env());
      p = value_.load(std::memory_order_relaxed);
    }
    return p;
  }
  void set(int path) { value_.store(path, std::memory_order_relaxed); }
  const char* name(int path) const {
    return path >= 0 && static_cast<size_t>(path) < names_.size() ? names_[static_cast<size_t>(path)] : "?";
  }

 private:
  int from_env() const {
    const char* v = std::getenv(variable_);
    if (v == nullptr || *v == '\0') return 0;
    std::string accepted;
    for (size_t i = 0; i < names_.size(); ++i) {
      if (names_[i] == std::string(v)) return static_cast<int>(i);
      accepted += (i == 0 ? "" : (i + 1 == names_.size() ? " or " : ", ")) + std::string(names_[i]);
    }
    throw InputError(variable_, "", "expected " + accepted + ", got '" + std::string(v) + "'");
  }

  const char* variable_;
  std::vector<const char*> names_;
  std::atomic<int> value_{-1};  // -1: not read yet
};

// Sets a switch's path for its lifetime (tests, benchmarks) and restores the previous one.
template <class Path, Path (*get)(), void (*set)(Path)>
class PathScope {
 public:
  explicit PathScope(Path path) : previous_(get()) { set(path); }
  ~PathScope() { set(previous_); }
  PathScope(const PathScope&) = delete;
  PathScope& operator=(const PathScope&) = delete;

 private:
  Path previous_;
};

}  // namespace dsv4::kernels::cuda
