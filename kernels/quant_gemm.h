// The quantized linear path (dsv4-model §2.9): FP8 activation quantization per 1 x block with ue8m0
// scales, the FP8 x FP8 GEMM with 128 x 128 weight block scales, the FP8 x FP4 GEMM of the routed
// experts, and the fused projection entry points linear_fp8 and linear_projection that chain them
// (linear_projection also runs the w8a8-int8 path of kernels/int8_gemm.h).
//
// Layouts are the checkpoint's (engine/checkpoint/checkpoint_layout.h) and the GPU kernels':
//   x        [T, K]            bf16 or f32, last dim contiguous (rows may be padded)
//   q        [T, K]            f8_e4m3fn, last dim contiguous
//   s_act    [T, K / block]    ue8m0, contiguous
//   w (fp8)  [N, K]            f8_e4m3fn, contiguous
//   s_w(fp8) [ceil(N / wb), K / wb]  ue8m0, contiguous (wb = weight block, 128)
//   w (fp4)  [N, K / 2]        i8 or u8, two e2m1 values per byte, low nibble = even k, contiguous
//   s_w(fp4) [N, K / fb]       ue8m0, contiguous (fb = fp4 block, 32)
//   out      [T, N]            bf16, last dim contiguous
//
// Numerics, fixed so the host kernel is the executable statement of the GPU kernels' order:
//   act quant: amax = max(|x|, 1e-4) per block, s = 2^ceil(log2(amax * fp32(1/448))),
//              q = e4m3(clamp(x / s, -448, 448)) (round to nearest even).
//   FP8 GEMM : for each K-block of 128, p = Σ q_a·q_w in fp32 (ascending k), then
//              acc += p * (s_a[t, kb] * s_w[n / 128, kb]) in fp32; out = bf16(acc).
//   FP4 GEMM : the same per K-block of 32 with s_a[t, k / 128] * s_w[n, k / 32].
//
// Devices: all tensors of one call live on one device (else a ContractError naming the first that
// differs). Host tensors run the loops of kernels/host/quant_gemm.cpp; GPU tensors run
// kernels/cuda/quant_gemm.cu (and dense_gemm.cu for bf16 weights) on current_stream(), bit for bit
// the same results (each output element summed by one thread in the order above; linear_fp8 and
// linear_projection quantize the activations into stream-ordered scratch, no host round trip).
// The FP8 x FP8 GEMM has a second, fast GPU path: cuBLASLt's Hopper block scaling, chosen with
// DSV4_FP8_GEMM=cublaslt (kernels/cuda/fp8_gemm_cublaslt.h); it is not bitwise with the host.
// Nothing here reads tensor contents to check them, so the same rules hold on both devices.
//
// Contract violations (dtype, rank, shape, contiguity, K not a multiple of the block, wrongly shaped
// scales) are ContractErrors naming the argument.
#pragma once

#include <cstdint>
#include <type_traits>
#include <utility>

#include "engine/core/tensor.h"

namespace dsv4::kernels {

inline constexpr int64_t kFp8Block = 128;  // activation and FP8 weight block (1 x 128, 128 x 128)
inline constexpr int64_t kFp4Block = 32;   // FP4 weight scale block along K (1 x 32)

// x [T, K] bf16/f32 -> q [T, K] e4m3 codes, scales [T, K / block] ue8m0. K % block == 0.
void act_quant_fp8(const Tensor& x, int64_t block, Tensor& q, Tensor& scales);

// out [T, N] = q_act [T, K] · w [N, K]^T with per-block scales (see above). `block` is both the
// activation block and the square weight block.
void gemm_fp8_block_scaled(const Tensor& q_act, const Tensor& act_scales, const Tensor& w, const Tensor& w_scales,
                           Tensor& out, int64_t block = kFp8Block);

// out [T, N] = q_act [T, K] · w [N, K]^T for packed e2m1 weights [N, K / 2] with [N, K / w_block]
// scales; activation scales cover 1 x act_block (act_block % w_block == 0).
void gemm_fp4_weights(const Tensor& q_act, const Tensor& act_scales, const Tensor& w, const Tensor& w_scales,
                      Tensor& out, int64_t act_block = kFp8Block, int64_t w_block = kFp4Block);

// ---- the fused projection entry point -----------------------------------------------------------
//
// Bug class A5: a caller passed a Python float where the op schema said Optional[Tensor] for the
// weight scale. Here the scale argument has exactly two spellings: a Tensor (FP8 weights; its shape
// is checked against w at run time) or the explicit tag kNoWeightScale (bf16 weights). Neither
// converts from a number, and an arithmetic overload is deleted so the mistake reads as a
// "use of deleted function" at compile time rather than a confusing overload failure.
struct NoWeightScale {
  explicit constexpr NoWeightScale() = default;  // explicit: `{}` cannot stand for "none" by accident
};
inline constexpr NoWeightScale kNoWeightScale{};

// FP8 weights: out = bf16(gemm_fp8_block_scaled(act_quant_fp8(x), w, w_scale)).
void linear_fp8(const Tensor& x, const Tensor& w, const Tensor& w_scale, Tensor& out);
// bf16 weights: out = bf16(x · w^T), fp32 accumulation, no activation quantization.
void linear_fp8(const Tensor& x, const Tensor& w, NoWeightScale w_scale, Tensor& out);
// A scalar is never a per-block scale tensor.
template <class S>
  requires std::is_arithmetic_v<std::remove_cvref_t<S>>
void linear_fp8(const Tensor& x, const Tensor& w, S&& w_scale, Tensor& out) = delete;

// ---- the typed weight scale and the projection entry point for every weight format --------------
//
// linear_projection takes the weight scale as a WeightScale, which has exactly three spellings:
//   BlockScales{t}   FP8 e4m3 weights: t = the [ceil(N / 128), K / 128] ue8m0 block scales
//                    (BlockScales{t, b}: blocks of b, activations quantized per 1 x b)
//   ChannelScales{t} int8 weights (w8a8-int8): t = the [N] f32 per-output-channel scales
//   kNoWeightScale   bf16 weights
// BlockScales and ChannelScales are built from a Tensor only explicitly, so the spelling states the
// layout; WeightScale converts from those three and from nothing else: not from a number (A5) and
// not from a bare Tensor, whose layout would be a guess. At run time the weight's dtype must agree
// with the spelling (e4m3 with BlockScales, i8 with ChannelScales, bf16 with kNoWeightScale) and
// the scale tensor's shape with the weight; a mismatch is a ContractError naming "w_scale".
class BlockScales {
 public:
  // `block`: the square weight block and the activation block (128 on released models; the
  // config's weight_block_size).
  explicit BlockScales(Tensor scales, int64_t block = kFp8Block) : scales_(std::move(scales)), block_(block) {}
  const Tensor& tensor() const { return scales_; }
  int64_t block() const { return block_; }

 private:
  Tensor scales_;
  int64_t block_ = kFp8Block;
};

class ChannelScales {
 public:
  explicit ChannelScales(Tensor scales) : scales_(std::move(scales)) {}
  const Tensor& tensor() const { return scales_; }

 private:
  Tensor scales_;
};

class WeightScale {
 public:
  enum class Kind : uint8_t { none, block, channel };

  // Implicit from the three typed spellings only (each already says what it is).
  WeightScale(NoWeightScale) {}
  WeightScale(BlockScales s) : kind_(Kind::block), scales_(s.tensor()), block_(s.block()) {}
  WeightScale(ChannelScales s) : kind_(Kind::channel), scales_(s.tensor()) {}
  // Neither a number nor a bare tensor is a weight scale; deleted so the mistake reads as a "use of
  // deleted function" at compile time.
  template <class T>
    requires(std::is_arithmetic_v<std::remove_cvref_t<T>> || std::is_same_v<std::remove_cvref_t<T>, Tensor>)
  WeightScale(T&&) = delete;

  Kind kind() const { return kind_; }
  const Tensor& tensor() const { return scales_; }  // undefined for Kind::none
  int64_t block() const { return block_; }          // Kind::block: the FP8 block
  const char* spelling() const;                     // "kNoWeightScale", "BlockScales", "ChannelScales"

 private:
  Kind kind_ = Kind::none;
  Tensor scales_;
  int64_t block_ = kFp8Block;
};

// out [T, N] bf16 = the projection of x [T, K] (bf16/f32, last dim contiguous) by w [N, K]:
//   w f8_e4m3fn + BlockScales   : linear_fp8's FP8 path (act_quant_fp8 per 128, gemm_fp8_block_scaled)
//   w i8        + ChannelScales : act_quant_int8 per token, gemm_int8_per_channel (kernels/int8_gemm.h)
//   w bf16      + kNoWeightScale: linear_fp8's bf16 path (fp32 accumulation, no activation quantization)
// Bit for bit the same as calling those steps directly.
void linear_projection(const Tensor& x, const Tensor& w, const WeightScale& w_scale, Tensor& out);
// A scalar is never a weight scale (A5).
template <class S>
  requires std::is_arithmetic_v<std::remove_cvref_t<S>>
void linear_projection(const Tensor& x, const Tensor& w, S&& w_scale, Tensor& out) = delete;

#if defined(DSV4_WITH_CUDA)
// The GPU implementations behind the entry points above (kernels/cuda/quant_gemm.cu and
// dense_gemm.cu), enqueued on `stream` (a cudaStream_t / hipStream_t). They assume the entry
// point's contract checks have passed and never synchronize.
namespace cuda {
void act_quant_fp8(const Tensor& x, int64_t block, Tensor& q, Tensor& scales, void* stream);
void gemm_fp8_block_scaled(const Tensor& q_act, const Tensor& act_scales, const Tensor& w, const Tensor& w_scales,
                           Tensor& out, int64_t block, void* stream);
void gemm_fp4_weights(const Tensor& q_act, const Tensor& act_scales, const Tensor& w, const Tensor& w_scales,
                      Tensor& out, int64_t act_block, int64_t w_block, void* stream);
// act_quant_fp8 per 1 x block into scratch, then gemm_fp8_block_scaled.
void linear_fp8(const Tensor& x, const Tensor& w, const Tensor& w_scale, Tensor& out, int64_t block, void* stream);
// out = bf16(x · w^T) for bf16 weights, one fp32 accumulator per output in ascending k (dense_gemm.cu).
void linear_bf16(const Tensor& x, const Tensor& w, Tensor& out, void* stream);
}  // namespace cuda
#endif

}  // namespace dsv4::kernels
