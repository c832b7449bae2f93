// Typed errors. InputError is what a user can cause (bad config, case file, checkpoint, flag): it
// names the source and the field, and the CLI turns it into exit code 2. ContractError is an op
// entry point refusing its arguments. Internal invariants use DSV4_ASSERT and stop the run.
#pragma once

#include <cstdio>
#include <cstdlib>
#include <stdexcept>
#include <string>

namespace dsv4 {

class InputError : public std::runtime_error {
 public:
  // source: a file path, "--flag", or a preset name; field: the offending field or JSON path.
  InputError(std::string source, std::string field, const std::string& message)
      : std::runtime_error(format(source, field, message)),
        source_(std::move(source)),
        field_(std::move(field)) {}
  const std::string& source() const { return source_; }
  const std::string& field() const { return field_; }

 private:
  static std::string format(const std::string& source, const std::string& field,
                            const std::string& message) {
    std::string out = source;
    if (!field.empty()) out += (out.empty() ? "" : ": ") + field;
    return out + ": " + message;
  }
  std::string source_;
  std::string field_;
};

class ContractError : public std::logic_error {
 public:
  ContractError(std::string op, std::string argument, const std::string& rule)
      : std::logic_error(op + ": argument '" + argument + "': " + rule),
        op_(std::move(op)),
        argument_(std::move(argument)),
        rule_(rule) {}
  const std::string& op() const { return op_; }
  const std::string& argument() const { return argument_; }
  const std::string& rule() const { return rule_; }

 private:
  std::string op_;
  std::string argument_;
  std::string rule_;
};

[[noreturn]] inline void assertion_failed(const char* expr, const char* file, int line,
                                          const std::string& message) {
  std::fprintf(stderr, "dsv4: internal invariant violated: %s (%s:%d) %s\n", expr, file, line,
               message.c_str());
  std::abort();
}

}  // namespace dsv4

#define DSV4_ASSERT(cond, message)                                           \
  do {                                                                       \
    if (!(cond)) ::dsv4::assertion_failed(#cond, __FILE__, __LINE__, message); \
  } while (0)
