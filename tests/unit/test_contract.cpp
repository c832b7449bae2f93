#include <gtest/gtest.h>

#include "engine/core/contract.h"
#include "engine/core/error.h"

namespace dsv4 {
namespace {

// The shape of fused norm+RoPE in place: a contiguous [T, 512] bf16 tensor and one position per row.
const Contract& norm_rope() {
  static const Contract c = Contract("fused_norm_rope")
                                .arg("kv").dtype(DType::bf16).rank(2).dim(1, 512).contiguous().aligned(16)
                                .arg("positions").dtype(DType::i32).rank(1).same_size(0, "kv", 0).values_in(0, 1023)
                                .arg("weight").optional().dtype(DType::f32).rank(1).same_size(0, "kv", 1);
  return c;
}

ContractError violation(const Contract::Args& args) {
  try {
    norm_rope().check(args);
  } catch (const ContractError& e) {
    return e;
  }
  ADD_FAILURE() << "no contract violation";
  return ContractError("", "", "");
}

TEST(Contract, AcceptsWhatItDescribes) {
  Tensor kv = Tensor::empty({3, 512}, DType::bf16, "kv");
  Tensor pos = Tensor::from_values({3}, DType::i32, {0, 1, 2}, "positions");
  EXPECT_NO_THROW(norm_rope().check({{"kv", &kv}, {"positions", &pos}}));
  Tensor w = Tensor::empty({512}, DType::f32, "w");
  EXPECT_NO_THROW(norm_rope().check({{"kv", &kv}, {"positions", &pos}, {"weight", &w}}));
}

TEST(Contract, StridedSliceIsRefusedByName) {
  // kv = qkv_a[..., q_lora_rank:]: the seed bug's strided view.
  Tensor qkv = Tensor::empty({3, 128 + 512}, DType::bf16, "qkv_a");
  Tensor kv = qkv.narrow(1, 128, 512);
  Tensor pos = Tensor::from_values({3}, DType::i32, {0, 1, 2}, "positions");
  const ContractError e = violation({{"kv", &kv}, {"positions", &pos}});
  EXPECT_EQ(e.op(), "fused_norm_rope");
  EXPECT_EQ(e.argument(), "kv");
  EXPECT_NE(e.rule().find("contiguous"), std::string::npos);
  EXPECT_NE(e.rule().find("[640, 1]"), std::string::npos) << e.what();
  // One row of the same slice is contiguous by PyTorch's rule and passes.
  Tensor one = qkv.narrow(0, 0, 1).narrow(1, 128, 512);
  Tensor pos1 = Tensor::from_values({1}, DType::i32, {0}, "positions");
  EXPECT_NO_THROW(norm_rope().check({{"kv", &one}, {"positions", &pos1}}));
}

TEST(Contract, EachRuleNamesItsArgument) {
  Tensor kv = Tensor::empty({3, 512}, DType::bf16, "kv");
  Tensor pos = Tensor::from_values({3}, DType::i32, {0, 1, 2}, "positions");
  Tensor f32 = Tensor::empty({3, 512}, DType::f32, "kv");
  EXPECT_EQ(violation({{"kv", &f32}, {"positions", &pos}}).rule(), "dtype bf16: got f32");
  Tensor wide = Tensor::empty({3, 448}, DType::bf16, "kv");
  EXPECT_NE(violation({{"kv", &wide}, {"positions", &pos}}).rule().find("shape[1] == 512"), std::string::npos);
  Tensor short_pos = Tensor::from_values({2}, DType::i32, {0, 1}, "positions");
  EXPECT_EQ(violation({{"kv", &kv}, {"positions", &short_pos}}).argument(), "positions");
  Tensor bad_pos = Tensor::from_values({3}, DType::i32, {0, 1, 4096}, "positions");
  const ContractError range = violation({{"kv", &kv}, {"positions", &bad_pos}});
  EXPECT_NE(range.rule().find("element 2 is 4096"), std::string::npos) << range.what();
  EXPECT_EQ(violation({{"kv", &kv}}).rule(), "required but missing");
  EXPECT_EQ(violation({{"kv", &kv}, {"positions", &pos}, {"bias", &pos}}).argument(), "bias");
  Tensor w = Tensor::empty({448}, DType::f32, "w");
  EXPECT_EQ(violation({{"kv", &kv}, {"positions", &pos}, {"weight", &w}}).argument(), "weight");
}

TEST(Contract, LengthsOfZeroCanBeRefused) {
  // "Never feed 0 or negative lengths to these kernels."
  const Contract c = Contract("sparse_attn").arg("topk_lengths").dtype(DType::i32).values_in(1, 1 << 20);
  Tensor lens = Tensor::from_values({4}, DType::i32, {3, 1, 0, 7}, "lens");
  try {
    c.check({{"topk_lengths", &lens}});
    FAIL();
  } catch (const ContractError& e) {
    EXPECT_NE(e.rule().find("element 2 is 0"), std::string::npos);
  }
}

TEST(Contract, IndicesIntoAnotherArgument) {
  const Contract c = Contract("gather").arg("table").rank(2).arg("index").values_index_into(-1, "table", 0);
  Tensor table = Tensor::empty({5, 4}, DType::f32, "table");
  Tensor ok = Tensor::from_values({3}, DType::i64, {-1, 0, 4}, "index");
  Tensor bad = Tensor::from_values({3}, DType::i64, {0, 5, 1}, "index");
  EXPECT_NO_THROW(c.check({{"table", &table}, {"index", &ok}}));
  EXPECT_THROW(c.check({{"table", &table}, {"index", &bad}}), ContractError);
}

TEST(Contract, InnerContiguousAllowsPaddedRows) {
  const Contract c = Contract("rows").arg("x").inner_contiguous();
  Tensor padded = Tensor::empty({4, 160}, DType::bf16, "x").narrow(1, 0, 128);
  EXPECT_NO_THROW(c.check({{"x", &padded}}));
  Tensor transposed = Tensor::empty({4, 8}, DType::bf16, "x").transpose(0, 1);
  EXPECT_THROW(c.check({{"x", &transposed}}), ContractError);
}

TEST(Contract, AlignmentOfAnOffsetView) {
  const Contract c = Contract("vec").arg("x").aligned(16);
  Tensor t = Tensor::empty({64}, DType::bf16, "x");
  EXPECT_NO_THROW(c.check({{"x", &t}}));
  Tensor off = t.narrow(0, 1, 8);
  EXPECT_THROW(c.check({{"x", &off}}), ContractError);
}

}  // namespace
}  // namespace dsv4

namespace dsv4 {
namespace {

TEST(ContractDeathTest, RelationToAnUndeclaredArgumentIsAContractBug) {
  const Contract c = Contract("bad").arg("x").same_size(0, "y", 0);
  Tensor x = Tensor::empty({2}, DType::f32, "x");
  EXPECT_DEATH(c.check({{"x", &x}}), "does not declare");
}

}  // namespace
}  // namespace dsv4
