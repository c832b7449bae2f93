#include <gtest/gtest.h>

#include "engine/core/error.h"
#include "engine/core/tensor.h"

namespace dsv4 {
namespace {

Tensor iota(const Shape& shape, DType dtype = DType::f32) {
  std::vector<double> v(static_cast<size_t>(shape_numel(shape)));
  for (size_t i = 0; i < v.size(); ++i) v[i] = static_cast<double>(i);
  return Tensor::from_values(shape, dtype, v, "iota");
}

TEST(Tensor, FreshTensorIsContiguousWithRowMajorStrides) {
  Tensor t = Tensor::empty({3, 4, 5}, DType::bf16, "t");
  EXPECT_EQ(t.strides(), (Shape{20, 5, 1}));
  EXPECT_TRUE(t.is_contiguous());
  EXPECT_EQ(t.numel(), 60);
}

TEST(Tensor, ZeroRowsIsLegalEverywhere) {
  Tensor t = Tensor::empty({0, 512}, DType::bf16, "kv");
  EXPECT_EQ(t.numel(), 0);
  EXPECT_TRUE(t.is_contiguous());
  EXPECT_TRUE(t.narrow(1, 0, 448).is_contiguous());  // empty: contiguous whatever the strides
  EXPECT_EQ(t.transpose(0, 1).shape(), (Shape{512, 0}));
  EXPECT_EQ(t.contiguous().numel(), 0);
  EXPECT_EQ(t.view({0, 8, 64}).shape(), (Shape{0, 8, 64}));
  EXPECT_TRUE(t.values().empty());
  EXPECT_EQ(t.reshape({-1, 512}).shape(), (Shape{0, 512}));
}

TEST(Tensor, OneRowIgnoresItsStride) {
  // PyTorch's rule: dims of size 1 do not constrain contiguity.
  Tensor wide = iota({1, 576});
  Tensor kv = wide.narrow(1, 64, 512);  // T=1 slice of a wider row
  EXPECT_EQ(kv.strides(), (Shape{576, 1}));
  EXPECT_TRUE(kv.is_contiguous());
  Tensor odd = wide.as_strided({1, 4}, {12345, 1}, 0);
  EXPECT_TRUE(odd.is_contiguous());
}

TEST(Tensor, LastDimSliceOfWiderRowIsNotContiguous) {
  // The seed bug's shape: kv = qkv_a[..., q_lora_rank:] with T >= 2 rows.
  Tensor qkv = iota({3, 128 + 512});
  Tensor kv = qkv.narrow(-1, 128, 512);
  EXPECT_FALSE(kv.is_contiguous());
  EXPECT_EQ(kv.offset(), 128);
  EXPECT_EQ(kv.get({2, 5}), 2 * 640 + 128 + 5);
  Tensor dense = kv.contiguous();
  EXPECT_TRUE(dense.is_contiguous());
  EXPECT_NE(dense.storage(), kv.storage());
  EXPECT_EQ(dense.values(), kv.values());
  EXPECT_EQ(dense.get({2, 5}), kv.get({2, 5}));
}

TEST(Tensor, TwoRowsOfAWiderBufferAreNotContiguousButOneRowIs) {
  Tensor buf = iota({2, 16});
  EXPECT_FALSE(buf.narrow(1, 0, 8).is_contiguous());
  EXPECT_TRUE(buf.narrow(0, 1, 1).narrow(1, 0, 8).is_contiguous());
}

TEST(Tensor, ViewsShareStorage) {
  Tensor t = iota({4, 6});
  Tensor row = t.select(0, 2);
  row.set({3}, -1.0);
  EXPECT_EQ(t.get({2, 3}), -1.0);
  EXPECT_EQ(row.storage(), t.storage());
}

TEST(Tensor, SelectNarrowSliceAndNegativeDims) {
  Tensor t = iota({4, 6});
  EXPECT_EQ(t.select(-1, 5).values(), (std::vector<double>{5, 11, 17, 23}));
  EXPECT_EQ(t.slice(1, 1, 6, 2).values(), (std::vector<double>{1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23}));
  EXPECT_EQ(t.slice(0, -1, 100).shape(), (Shape{1, 6}));
  EXPECT_EQ(t.narrow(0, 4, 0).shape(), (Shape{0, 6}));
  EXPECT_THROW(t.narrow(0, 3, 2), ContractError);
  EXPECT_THROW(t.select(0, 4), ContractError);
  EXPECT_THROW(t.select(2, 0), ContractError);
}

TEST(Tensor, TransposeAndPermute) {
  Tensor t = iota({2, 3, 4});
  Tensor tt = t.transpose(0, 2);
  EXPECT_EQ(tt.shape(), (Shape{4, 3, 2}));
  EXPECT_FALSE(tt.is_contiguous());
  EXPECT_EQ(tt.get({3, 1, 1}), t.get({1, 1, 3}));
  Tensor p = t.permute({1, 2, 0});
  EXPECT_EQ(p.shape(), (Shape{3, 4, 2}));
  EXPECT_EQ(p.get({2, 3, 1}), t.get({1, 2, 3}));
  EXPECT_EQ(p.permute({2, 0, 1}).values(), t.values());
  EXPECT_THROW(t.permute({0, 0, 1}), ContractError);
  Tensor c = tt.contiguous();
  EXPECT_EQ(c.values(), tt.values());
}

TEST(Tensor, UnsqueezeKeepsContiguity) {
  Tensor t = iota({3, 4});
  EXPECT_EQ(t.unsqueeze(0).shape(), (Shape{1, 3, 4}));
  EXPECT_EQ(t.unsqueeze(-1).shape(), (Shape{3, 4, 1}));
  EXPECT_TRUE(t.unsqueeze(1).is_contiguous());
  // (N,) -> (N, 1): the layout the indexer schedule expects for context lengths.
  Tensor lens = iota({5}, DType::i32);
  EXPECT_EQ(lens.unsqueeze(-1).shape(), (Shape{5, 1}));
}

TEST(Tensor, AsStridedChecksBounds) {
  Tensor t = iota({10});
  Tensor w = t.as_strided({4, 3}, {2, 1}, 1);  // overlapping windows
  EXPECT_EQ(w.get({3, 2}), 9.0);
  EXPECT_THROW(t.as_strided({4, 3}, {3, 1}, 1), ContractError);
  EXPECT_THROW(t.as_strided({2}, {-1}, 5), ContractError);
  EXPECT_NO_THROW(t.as_strided({0, 3}, {100, 100}, 10));
}

TEST(Tensor, ViewWhereLegalAndReshapeOtherwise) {
  Tensor t = iota({4, 6});
  EXPECT_EQ(t.view({2, 2, 6}).strides(), (Shape{12, 6, 1}));
  EXPECT_EQ(t.view({-1}).shape(), (Shape{24}));
  // A column slice can still merge its outer dims...
  Tensor s = iota({4, 2, 8}).narrow(2, 0, 4);
  EXPECT_TRUE(s.try_view({8, 4}).has_value());
  // ...but not fold the sliced dim into its neighbour.
  EXPECT_FALSE(s.try_view({4, 8}).has_value());
  EXPECT_THROW(s.view({4, 8}), ContractError);
  Tensor r = s.reshape({4, 8});
  EXPECT_TRUE(r.is_contiguous());
  EXPECT_EQ(r.values(), s.values());
  // Transposed tensors cannot be flattened as a view.
  EXPECT_FALSE(t.transpose(0, 1).try_view({24}).has_value());
  EXPECT_THROW(t.view({5, 5}), ContractError);
  EXPECT_THROW(t.view({-1, -1}), ContractError);
}

TEST(Tensor, Fp4ElementsAreNibblesLowFirst) {
  Tensor t = Tensor::from_values({2, 4}, DType::f4_e2m1, {0.5, 1, 1.5, 2, 3, 4, 6, -6}, "fp4");
  const auto* bytes = t.data<uint8_t>();
  EXPECT_EQ(bytes[0], 0x21);  // 0.5 = 0x1 low, 1.0 = 0x2 high
  Tensor col = t.narrow(1, 1, 2);
  EXPECT_EQ(col.values(), (std::vector<double>{1, 1.5, 4, 6}));
  Tensor c = col.contiguous();
  EXPECT_EQ(c.values(), col.values());
  EXPECT_THROW(t.narrow(1, 1, 2).data_ptr(), ContractError);  // mid-byte start
}

TEST(Tensor, ValuesConvertThroughTheDtype) {
  Tensor t = Tensor::from_values({3}, DType::f8_e4m3fn, {1.0, 500.0, -0.3}, "q");
  const auto v = t.values();
  EXPECT_EQ(v[0], 1.0);
  EXPECT_EQ(v[1], 448.0);  // saturates
  EXPECT_NEAR(v[2], -0.3, 0.02);
}

}  // namespace
}  // namespace dsv4
