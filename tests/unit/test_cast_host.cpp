#include <cmath>

#include <gtest/gtest.h>

#include "engine/core/error.h"
#include "kernels/cast.h"

namespace dsv4::kernels {
namespace {

void expect_contract_error(const Tensor& src, Tensor dst, const std::string& argument) {
  try {
    cast_host(src, dst);
    FAIL() << "accepted";
  } catch (const ContractError& e) {
    EXPECT_EQ(e.op(), "cast");
    EXPECT_EQ(e.argument(), argument) << e.what();
  }
}

TEST(CastHost, RoundTripsThroughEveryNarrowFormat) {
  const std::vector<double> values = {0.0, 1.0, -2.5, 0.3, 448.0, 1e-3};
  Tensor src = Tensor::from_values({2, 3}, DType::f32, values, "x");
  for (DType d : {DType::bf16, DType::f16, DType::f8_e4m3fn, DType::f8_e4m3fnuz, DType::f8_e5m2, DType::f4_e2m1}) {
    Tensor packed = Tensor::empty({2, 3}, d, "packed");
    cast_host(src, packed);
    Tensor back = Tensor::empty({2, 3}, DType::f32, "back");
    cast_host(packed, back);
    EXPECT_EQ(back.values(), packed.values()) << dtype_name(d);
    EXPECT_EQ(back.values()[1], 1.0) << dtype_name(d);
  }
}

TEST(CastHost, ZeroElementsIsANoOp) {
  Tensor src = Tensor::empty({0, 512}, DType::f32, "x");
  Tensor dst = Tensor::empty({0, 512}, DType::f8_e4m3fn, "y");
  EXPECT_NO_THROW(cast_host(src, dst));
}

TEST(CastHost, ContractNamesTheArgument) {
  Tensor wide = Tensor::empty({4, 640}, DType::f32, "qkv_a");
  wide.fill(1.0);
  expect_contract_error(wide.narrow(1, 128, 512), Tensor::empty({4, 512}, DType::bf16, "kv"), "src");
  expect_contract_error(Tensor::empty({4, 512}, DType::f32, "kv"),
                        Tensor::empty({4, 640}, DType::bf16, "out").narrow(1, 0, 512), "dst");
  expect_contract_error(Tensor::empty({4}, DType::f32, "a"), Tensor::empty({5}, DType::bf16, "b"), "dst");
  expect_contract_error(Tensor::empty({4}, DType::f32, "a"), Tensor::empty({4}, DType::i32, "b"), "dst");
  expect_contract_error(Tensor::empty({4}, DType::bf16, "a"), Tensor::empty({4}, DType::f8_e4m3fn, "b"), "src");
  Tensor fp4 = Tensor::empty({8}, DType::f4_e2m1, "w");
  expect_contract_error(fp4.narrow(0, 1, 4), Tensor::empty({4}, DType::f32, "out"), "src");
}

TEST(CastHost, SingleRowSliceOfAWiderBufferIsContiguousAndAccepted) {
  Tensor wide = Tensor::from_values({1, 8}, DType::f32, {1, 2, 3, 4, 5, 6, 7, 8}, "qkv_a");
  Tensor out = Tensor::empty({1, 4}, DType::bf16, "kv");
  cast_host(wide.narrow(1, 4, 4), out);
  EXPECT_EQ(out.values(), (std::vector<double>{5, 6, 7, 8}));
}

}  // namespace
}  // namespace dsv4::kernels
