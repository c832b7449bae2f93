// Launch contracts: declarative rules per argument of an op, checked before the op touches memory.
// A violation is a ContractError naming the op, the argument and the rule, so a strided slice fed to
// a kernel that assumes a dense tensor, or a length of 0 fed to a kernel that divides by it, is a
// loud typed error instead of a silent wrong read.
//
//   static const Contract contract = Contract("fused_norm_rope")
//       .arg("kv").dtype(DType::bf16).rank(2).contiguous().dim(1, 512)
//       .arg("positions").dtype(DType::i32).rank(1).same_size(0, "kv", 0).values_in(0, 1 << 20);
//   contract.check({{"kv", &kv}, {"positions", &positions}});
#pragma once

#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "engine/core/dtype.h"
#include "engine/core/tensor.h"

namespace dsv4 {

class Contract {
 public:
  using Args = std::vector<std::pair<std::string, const Tensor*>>;

  explicit Contract(std::string op);

  // Starts the rules of one argument; every rule below applies to it until the next arg().
  Contract& arg(std::string name);
  Contract& optional();  // the argument may be absent (nullptr or undefined); its rules apply when present

  Contract& dtype(DType expected);
  Contract& dtype_in(std::vector<DType> allowed);
  Contract& rank(int64_t expected);
  Contract& dim(int64_t d, int64_t size);                                    // shape[d] == size
  Contract& dim_multiple_of(int64_t d, int64_t multiple);                    // shape[d] % multiple == 0
  Contract& same_size(int64_t d, std::string other, int64_t other_d);        // shape[d] == other.shape[other_d]
  Contract& contiguous();                                                    // PyTorch's rule
  Contract& inner_contiguous();  // the last dim has stride 1 (rows may be padded or sliced)
  Contract& aligned(int64_t bytes);                                          // data pointer alignment
  Contract& same_device(std::string other);
  // Host-visible index and length tensors: every element in [lo, hi].
  Contract& values_in(int64_t lo, int64_t hi);
  // Every element in [lo, other.shape[other_d] - 1 + hi_offset]: indices into another argument.
  Contract& values_index_into(int64_t lo, std::string other, int64_t other_d);

  const std::string& op() const { return op_; }
  // Throws ContractError(op, argument, rule) for the first violation. The value rules read the
  // tensors' contents, which a launch can see only when it runs (an earlier launch may still be
  // writing them at issue time): `Values::skip` checks everything else.
  enum class Values { check, skip };
  void check(const Args& args, Values values = Values::check) const;

 private:
  struct Rule {
    std::string argument;
    std::string description;
    // Returns an error detail, or nullopt when satisfied.
    std::function<std::optional<std::string>(const Tensor&, const Args&)> test;
    bool reads_values = false;
  };
  void add(std::string description, std::function<std::optional<std::string>(const Tensor&, const Args&)> test,
           bool reads_values = false);

  std::string op_;
  std::string current_;
  std::vector<std::string> arguments_;
  std::vector<std::string> optional_;
  std::vector<std::string> references_;  // arguments named by relation rules; each must be declared
  std::vector<Rule> rules_;
};

}  // namespace dsv4
