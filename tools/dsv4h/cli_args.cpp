#include "tools/dsv4h/cli_args.h"

#include <charconv>
#include <cstdlib>

#include "engine/core/error.h"

namespace dsv4::cli {

Args::Args(const std::string& command, const std::vector<std::string>& argv, const std::vector<FlagSpec>& flags,
           bool runtime)
    : command_(command) {
  auto find = [&](const std::string& name) -> const FlagSpec* {
    for (const auto& f : flags) {
      if (f.name == name) return &f;
    }
    return nullptr;
  };
  auto is_runtime = [&](const std::string& name) {
    if (!runtime) return false;
    for (const auto& f : runtime_flags()) {
      if (name == f.flag) return true;
    }
    return false;
  };
  for (size_t i = 0; i < argv.size(); ++i) {
    const std::string& arg = argv[i];
    if (arg == "--help" || arg == "-h") {
      help_ = true;
      continue;
    }
    if (arg.rfind("--", 0) != 0) {
      positionals_.push_back(arg);
      continue;
    }
    std::string name = arg;
    std::optional<std::string> value;
    if (const size_t eq = arg.find('='); eq != std::string::npos) {
      name = arg.substr(0, eq);
      value = arg.substr(eq + 1);
    }
    const FlagSpec* spec = find(name);
    const bool runtime_flag = is_runtime(name);
    if (spec == nullptr && !runtime_flag) {
      throw InputError(name, "", "unknown flag for 'dsv4h " + command_ + "' (see dsv4h " + command_ + " --help)");
    }
    const bool takes_value = runtime_flag || !spec->value.empty();
    if (!takes_value) {
      if (value) throw InputError(name, "", "takes no value");
      values_[name] = "true";
      continue;
    }
    if (!value) {
      if (i + 1 >= argv.size()) throw InputError(name, "", "needs a value");
      value = argv[++i];
    }
    if (runtime_flag) {
      apply_runtime_flag(runtime_, name, *value);
    } else {
      values_[name] = *value;
    }
  }
  if (help_) return;
  for (const auto& f : flags) {
    if (f.required && !has(f.name)) {
      throw InputError(f.name, "", "is required by 'dsv4h " + command_ + "' (see dsv4h " + command_ + " --help)");
    }
  }
}

std::string Args::str(const std::string& flag) const {
  auto it = values_.find(flag);
  if (it == values_.end()) throw InputError(flag, "", "is required");
  return it->second;
}

std::optional<std::string> Args::optional_str(const std::string& flag) const {
  auto it = values_.find(flag);
  if (it == values_.end()) return std::nullopt;
  return it->second;
}

uint64_t Args::u64(const std::string& flag) const {
  const std::string text = str(flag);
  uint64_t v = 0;
  auto [ptr, ec] = std::from_chars(text.data(), text.data() + text.size(), v);
  if (ec != std::errc() || ptr != text.data() + text.size() || text.empty()) {
    throw InputError(flag, "", "expects a non-negative integer, got '" + text + "'");
  }
  return v;
}

int64_t Args::i64(const std::string& flag, int64_t fallback) const {
  if (!has(flag)) return fallback;
  const std::string text = str(flag);
  int64_t v = 0;
  auto [ptr, ec] = std::from_chars(text.data(), text.data() + text.size(), v);
  if (ec != std::errc() || ptr != text.data() + text.size() || text.empty()) {
    throw InputError(flag, "", "expects an integer, got '" + text + "'");
  }
  return v;
}

std::string usage(const std::string& command, const std::string& synopsis, const std::vector<FlagSpec>& flags,
                  bool runtime) {
  std::string out = "usage: dsv4h " + command + " " + synopsis + "\n\nflags:\n";
  auto line = [&](const std::string& left, const std::string& help) {
    out += "  " + left + std::string(left.size() < 30 ? 30 - left.size() : 1, ' ') + help + "\n";
  };
  for (const auto& f : flags) line(f.name + (f.value.empty() ? "" : " " + f.value), f.help);
  if (runtime) {
    out += "\nruntime options (validated against the model config):\n";
    for (const auto& f : runtime_flags()) line(std::string(f.flag) + " N", f.help);
  }
  return out;
}

std::vector<std::string> split_list(const std::string& text, const std::string& flag) {
  std::vector<std::string> out;
  for (size_t pos = 0; pos <= text.size();) {
    const size_t comma = std::min(text.find(',', pos), text.size());
    out.push_back(text.substr(pos, comma - pos));
    if (out.back().empty()) throw InputError(flag, "", "expects a comma-separated list, got '" + text + "'");
    pos = comma + 1;
  }
  return out;
}

double positive_seconds(const Args& args, const std::string& flag, double fallback) {
  if (!args.has(flag)) return fallback;
  const std::string text = args.str(flag);
  char* end = nullptr;
  const double v = std::strtod(text.c_str(), &end);
  if (text.empty() || *end != '\0' || !(v > 0)) throw InputError(flag, "", "expects a positive number of seconds, got '" + text + "'");
  return v;
}

}  // namespace dsv4::cli
