// kernels/token_ops.h on the GPU (label gpu; skipped without one): each op on device tensors equals
// the same op on host tensors, bit for bit, over T in {0, 1, 2, odd, bucket sizes}.
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include "engine/core/allocator.h"
#include "engine/core/error.h"
#include "engine/core/formats.h"
#include "engine/runtime/backend.h"
#include "kernels/token_ops.h"

namespace dsv4::kernels {
namespace {

#define DSV4_REQUIRE_GPU()                                        \
  do {                                                            \
    if (!rt::cuda_available()) GTEST_SKIP() << "no CUDA device"; \
  } while (0)

constexpr int64_t kTokenCounts[] = {0, 1, 2, 7, 8, 64};

Allocator& device() {
  static Allocator a(*cuda_memory(0), AllocatorMode::testing);
  return a;
}

Tensor random_bf16(const Shape& shape, std::mt19937& rng) {
  Tensor t = Tensor::empty(shape, DType::bf16, "x");
  std::normal_distribution<float> n(0.0f, 1.0f);
  for (int64_t i = 0; i < t.numel(); ++i) t.data<uint16_t>()[i] = f32_to_bf16(n(rng));
  return t;
}

Tensor ints(const std::vector<int32_t>& v) {
  Tensor t = Tensor::empty({static_cast<int64_t>(v.size())}, DType::i32, "ids");
  if (!v.empty()) std::memcpy(t.data_ptr(), v.data(), v.size() * 4);
  return t;
}

// The bytes of a tensor's (contiguous) elements, wherever it lives.
std::vector<uint8_t> bytes_of(const Tensor& t) {
  const Tensor h = t.contiguous().to(default_host_allocator());
  const auto* p = static_cast<const uint8_t*>(h.data_ptr());
  return std::vector<uint8_t>(p, p + dtype_storage_bytes(h.dtype(), h.numel()));
}

Tensor on_gpu(const Tensor& t) { return t.to(device()); }
Tensor empty_gpu(const Shape& s, DType d) { return Tensor::empty(s, d, device(), "out"); }

void sync() { ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess); }

TEST(TokenOpsGpu, EmbedGatherArgmaxAddAndScaleEqualTheHost) {
  DSV4_REQUIRE_GPU();
  std::mt19937 rng(11);
  const int64_t V = 97, d = 24, copies = 3;
  const Tensor table = random_bf16({V, d}, rng);
  for (int64_t T : kTokenCounts) {
    std::vector<int32_t> id(static_cast<size_t>(T));
    for (auto& x : id) x = static_cast<int32_t>(rng() % V);
    const Tensor ids = ints(id);
    Tensor host_out = Tensor::empty({T, copies * d}, DType::bf16, "out");
    embed_rows(ids, table, copies, host_out);
    Tensor gpu_out = empty_gpu({T, copies * d}, DType::bf16);
    embed_rows(on_gpu(ids), on_gpu(table), copies, gpu_out);
    sync();
    EXPECT_EQ(bytes_of(gpu_out), bytes_of(host_out)) << "embed T=" << T;

    // gather_rows from a row-padded source (a column slice of a wider buffer).
    const Tensor wide = random_bf16({V, d + 8}, rng);
    const Tensor src = wide.narrow(1, 4, d);
    Tensor hg = Tensor::empty({T, d}, DType::bf16, "g");
    gather_rows(src, ids, hg);
    const Tensor wide_gpu = on_gpu(wide);
    Tensor gg = empty_gpu({T, d}, DType::bf16);
    gather_rows(wide_gpu.narrow(1, 4, d), on_gpu(ids), gg);
    sync();
    EXPECT_EQ(bytes_of(gg), bytes_of(hg)) << "gather T=" << T;

    // argmax with ties (every value from a small set) and a NaN or two.
    Tensor logits = Tensor::empty({T, V}, DType::f32, "logits");
    for (int64_t i = 0; i < logits.numel(); ++i) logits.data<float>()[i] = static_cast<float>(rng() % 5);
    if (T > 1) logits.data<float>()[V + 3] = std::numeric_limits<float>::quiet_NaN();
    if (T > 2) logits.data<float>()[2 * V] = std::numeric_limits<float>::quiet_NaN();
    Tensor ha = Tensor::empty({T}, DType::i32, "a");
    argmax_rows(logits, ha);
    Tensor ga = empty_gpu({T}, DType::i32);
    argmax_rows(on_gpu(logits), ga);
    sync();
    EXPECT_EQ(bytes_of(ga), bytes_of(ha)) << "argmax T=" << T;

    // add_bf16 into a column slice of a residual.
    const Tensor a = random_bf16({T, d}, rng), b = random_bf16({T, d}, rng);
    Tensor hr = random_bf16({T, copies * d}, rng);
    Tensor gr = on_gpu(hr);
    Tensor hs = hr.narrow(1, d, d);
    add_bf16(a, b, hs);
    Tensor gs = gr.narrow(1, d, d);
    add_bf16(on_gpu(a), on_gpu(b), gs);
    sync();
    EXPECT_EQ(bytes_of(gr), bytes_of(hr)) << "add T=" << T;

    Tensor hf = Tensor::empty({T, d}, DType::f32, "f");
    scale_bf16(a, 0.037f, hf);
    Tensor gf = empty_gpu({T, d}, DType::f32);
    scale_bf16(on_gpu(a), 0.037f, gf);
    sync();
    EXPECT_EQ(bytes_of(gf), bytes_of(hf)) << "scale T=" << T;
  }
}

TEST(TokenOpsGpu, NextIdsAndPositionBiasEqualTheHost) {
  DSV4_REQUIRE_GPU();
  std::mt19937 rng(12);
  for (int64_t T : kTokenCounts) {
    if (T == 0) continue;
    std::vector<int32_t> id(static_cast<size_t>(T)), pos(static_cast<size_t>(T));
    for (auto& x : id) x = static_cast<int32_t>(rng() % 1000);
    for (auto& x : pos) x = static_cast<int32_t>(rng() % 300);
    // Rows of 1..3 tokens.
    std::vector<int32_t> last, hint, sampled;
    for (int64_t t = 0; t < T;) {
      t = std::min<int64_t>(T, t + 1 + static_cast<int64_t>(rng() % 3));
      last.push_back(static_cast<int32_t>(t - 1));
      hint.push_back(rng() % 2 ? -1 : static_cast<int32_t>(rng() % 1000));
      sampled.push_back(static_cast<int32_t>(rng() % 1000));
    }
    Tensor hn = Tensor::empty({T}, DType::i32, "n");
    mtp_next_ids(ints(id), ints(last), ints(hint), ints(sampled), hn);
    Tensor gn = empty_gpu({T}, DType::i32);
    mtp_next_ids(on_gpu(ints(id)), on_gpu(ints(last)), on_gpu(ints(hint)), on_gpu(ints(sampled)), gn);
    sync();
    EXPECT_EQ(bytes_of(gn), bytes_of(hn)) << "next ids T=" << T;

    const int64_t ratio = 4, C = 10;
    Tensor score = Tensor::empty({T, C}, DType::f32, "s"), bias = Tensor::empty({ratio, C}, DType::f32, "b");
    std::normal_distribution<float> n(0.0f, 1.0f);
    for (int64_t i = 0; i < score.numel(); ++i) score.data<float>()[i] = n(rng);
    for (int64_t i = 0; i < bias.numel(); ++i) bias.data<float>()[i] = n(rng);
    Tensor gs = on_gpu(score);
    add_position_bias(score, bias, ints(pos), ratio);
    add_position_bias(gs, on_gpu(bias), on_gpu(ints(pos)), ratio);
    sync();
    EXPECT_EQ(bytes_of(gs), bytes_of(score)) << "bias T=" << T;
  }
}

TEST(TokenOpsGpu, CopiesAndMixedDevicesAreRefused) {
  DSV4_REQUIRE_GPU();
  std::mt19937 rng(13);
  const Tensor x = random_bf16({5, 6}, rng);
  Tensor g = empty_gpu({5, 6}, DType::bf16);
  copy_from_host(g, x.data_ptr(), 60);
  Tensor g2 = empty_gpu({5, 6}, DType::bf16);
  copy_tensor(g, g2);
  sync();
  EXPECT_EQ(bytes_of(g2), bytes_of(x));
  Tensor host_out = Tensor::empty({5, 12}, DType::bf16, "out");
  EXPECT_THROW(embed_rows(on_gpu(ints({0, 1, 2, 3, 4})), x, 2, host_out), ContractError);
  EXPECT_THROW(copy_from_host(g, x.data_ptr(), 1000), ContractError);
}

}  // namespace
}  // namespace dsv4::kernels
