// A small flag parser: `--flag value` or `--flag=value`, positionals, and per-command flag tables,
// so that an unknown or malformed flag is a usage error naming the flag (exit code 2).
#pragma once

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "engine/config/runtime_options.h"

namespace dsv4::cli {

struct FlagSpec {
  std::string name;   // "--config"
  std::string value;  // "NAME|PATH"; empty for a switch without a value
  std::string help;
  bool required = false;
};

class Args {
 public:
  // Parses argv[first..]; every flag must be in `flags` or, with `runtime` set, a runtime flag.
  Args(const std::string& command, const std::vector<std::string>& argv, const std::vector<FlagSpec>& flags,
       bool runtime);

  bool has(const std::string& flag) const { return values_.count(flag) != 0; }
  std::string str(const std::string& flag) const;  // InputError if absent
  std::optional<std::string> optional_str(const std::string& flag) const;
  uint64_t u64(const std::string& flag) const;
  int64_t i64(const std::string& flag, int64_t fallback) const;
  const std::vector<std::string>& positionals() const { return positionals_; }
  const RuntimeOptions& runtime() const { return runtime_; }
  bool help() const { return help_; }

 private:
  std::string command_;
  std::map<std::string, std::string> values_;
  std::vector<std::string> positionals_;
  RuntimeOptions runtime_;
  bool help_ = false;
};

// A flag's value as a positive number of seconds (`fallback` when absent); InputError naming the flag.
double positive_seconds(const Args& args, const std::string& flag, double fallback);

// "a,b,c" -> {"a", "b", "c"}; an empty item is an InputError naming `flag`.
std::vector<std::string> split_list(const std::string& text, const std::string& flag);

std::string usage(const std::string& command, const std::string& synopsis, const std::vector<FlagSpec>& flags,
                  bool runtime);

}  // namespace dsv4::cli
