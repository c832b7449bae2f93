// The MoE feed-forward pieces around the quantized GEMMs (dsv4-model §3): the gate (fp32 gate GEMM,
// sqrt-softplus scores, routing by top-k of s + bias or by the tid2eid row of the current token,
// weights s / Σ s · route_scale), the clamped SwiGLU with the routing weight applied before w2, and
// the fp32 combine of routed and shared expert outputs rounded once to bf16.
//
// Each entry point runs where its tensors live (kernels/device.h): every tensor on one device, the
// host loops below for host tensors, the CUDA kernels (kernels/cuda/moe.cu) on the current stream
// for device tensors, with the same numerics (bitwise equal; see each function). Rules that read
// tensor contents (index ranges, repeated experts) are checked for host tensors only; a GPU kernel
// given a bad index never reads or writes out of bounds and treats the index as -1 (see each).
//
// Layouts:
//   x          [T, d]      bf16 or f32, last dim contiguous
//   gate_w     [E, d]      bf16 or f32, contiguous (the checkpoint's bf16 gate.weight)
//   logits     [T, E]      f32, contiguous
//   bias       [E]         f32 (score layers; undefined tensor = absent)
//   tid2eid    [V, k]      i32, contiguous (hash layers; undefined tensor = absent)
//   token_ids  [T]         i32 or i64 (read only with tid2eid)
//   experts    [T, k]      i32, contiguous, in routing order (top-k: descending s + bias,
//                          ties to the lower index; hash: the table's order)
//   weights    [T, k]      f32, contiguous
//   g, u       [R, I]      bf16 or f32, last dim contiguous; R rows of (token, expert) pairs
//   row_weight [R]         f32 (routed experts; undefined = shared expert, no weight)
//   h          [R, I]      bf16, last dim contiguous
//   routed     [T, k, d]   bf16 or f32, contiguous: expert j's output for token t at [t, j]
//   shared     [T, d]      bf16 or f32, last dim contiguous
//   out        [T, d]      bf16, last dim contiguous
//   xn         [T, d]      bf16, last dim contiguous (moe_experts' input rows)
//   table      [E, 6]      i64, contiguous, on the device: expert_pointer_table (moe_experts on a GPU)
#pragma once

#include <cstdint>
#include <vector>

#include "engine/core/tensor.h"

namespace dsv4::kernels {

// logits = x_f32 · gate_w^T: a plain fp32 GEMM (ascending d, one fp32 accumulator per output). On a
// GPU: kernels/cuda/dense_gemm.cu, the same order per output, bitwise equal to the host loops.
void moe_gate_logits(const Tensor& x, const Tensor& gate_w, Tensor& logits);
#if defined(DSV4_WITH_CUDA)
namespace cuda {
void moe_gate_logits(const Tensor& x, const Tensor& gate_w, Tensor& logits, void* stream);
}  // namespace cuda
#endif

// Routing from the logits. With tid2eid (hash layers) the experts are tid2eid[token_ids[t]] and bias
// must be absent; otherwise the top-k of s + bias (bias optional, used only for selection). Either
// way weights = s[experts] / Σ s[experts] · route_scale in fp32. ContractError for k outside [1, E]
// and, for host tensors, a token id outside tid2eid or a table row with repeated or out-of-range
// experts. On a GPU (not checked there): a token id outside tid2eid gives that token experts -1 and
// weights 0; an out-of-range table entry gives expert -1, weight 0 and adds nothing to Σ s; a
// repeated entry is kept. NaN scores rank after every number on a GPU (the host's order for NaN
// keys is unspecified); for finite and infinite keys both pick the same experts.
void moe_gate(const Tensor& logits, const Tensor& bias, const Tensor& tid2eid, const Tensor& token_ids, int64_t k,
              float route_scale, Tensor& experts, Tensor& weights);

// h = bf16(silu(g') · u' · row_weight) with, when limit > 0, u' = clamp(u, -limit, limit) and
// g' = min(g, limit) (the gate is not clamped from below); limit <= 0 disables the clamp. In fp32:
// silu(g') = g' / (1 + e^-g'), then · u', then · row_weight. e^-g' is the host's expf; the GPU's is
// exp in double rounded once to fp32: the same value unless e^-g' lies within ~1e-3 fp32 ulp of a
// rounding boundary, and then h differs only if that ulp also moves its bf16 rounding (~1e-8).
void swiglu_clamp(const Tensor& g, const Tensor& u, float limit, const Tensor& row_weight, Tensor& h);

// out[t] = bf16(Σ_j routed[t, j] + shared[t]): fp32 accumulation, routed in order j, shared last.
void moe_combine(const Tensor& routed, const Tensor& shared, Tensor& out);

// ---- the routed experts --------------------------------------------------------------------------
//
// The weights of one routed expert, as the checkpoint stores them (I = moe_inter_dim):
//   fp4  : w1, w3 [I, d / 2] and w2 [d, I / 2] i8 or u8 (packed e2m1, low nibble = even k);
//          s1, s3 [I, d / fp4_block] and s2 [d, I / fp4_block] ue8m0
//   fp8  : w1, w3 [I, d] and w2 [d, I] f8_e4m3fn; s1, s3 [ceil(I / wb), d / wb] and
//          s2 [ceil(d / wb), I / wb] ue8m0 (wb = weight_block)
//   int8 : w1, w3 [I, d] and w2 [d, I] i8 (w8a8-int8); s1, s3 [I] and s2 [d] f32 per channel
// Every tensor contiguous; every expert of a layer has the same I.
enum class ExpertFormat : uint8_t { fp4, fp8, int8 };

struct ExpertWeights {
  Tensor w1, s1, w2, s2, w3, s3;
};

struct MoeExpertsConfig {
  ExpertFormat format = ExpertFormat::fp4;
  int64_t act_block = 128;     // fp4: activations quantized to FP8 per 1 x act_block
  int64_t fp4_block = 32;      // fp4: the weight scale block along K (divides act_block, even)
  int64_t weight_block = 128;  // fp8: the square weight block, also the activation block
  float swiglu_limit = 0.0f;   // the routed experts' clamp (<= 0: none; NaN refused)
};

// The device addresses the GPU path reads the experts' weights through: E rows of
// (w1, s1, w2, s2, w3, s3) data pointers (data_ptr(), as integers), row e for expert e. The engine
// builds it once at load, uploads it to an i64 [E, 6] device tensor (the same bits) and passes that
// as moe_experts' `table` together with the same `experts` vector. Undefined tensors give 0.
std::vector<uint64_t> expert_pointer_table(const std::vector<ExpertWeights>& experts);

// The routed experts of one MoE layer: for every slot (t, j), y = w2 · act(swiglu_clamp(w1 · x_t,
// w3 · x_t, swiglu_limit, weights[t, j])) with expert experts[t, j], written to routed row t * k + j.
// routed is [T, k, d] or [T * k, d] bf16, contiguous. Per expert, its slots in ascending t * k + j
// are gathered and run through the format's GEMMs, exactly as these host steps do (and the GPU
// kernels, bit for bit):
//   fp4 : act_quant_fp8(rows, act_block) + gemm_fp4_weights(..., act_block, fp4_block)
//   fp8 : linear_projection(rows, w, BlockScales{s, weight_block})
//   int8: linear_projection(rows, w, ChannelScales{s})
// for w1 and w3 (bf16 g and u), swiglu_clamp with the slot's weight (bf16 h), then w2 (bf16 y).
// A token may name one expert in several slots; each slot is computed on its own. An expert no slot
// names is never read. ContractError for an expert index outside [0, E) (host tensors; on a GPU
// such a slot's routed row is written with zeros) and for any dtype, shape or block rule above.
// `table` is required when the tensors are on a GPU (undefined otherwise); the GPU path takes the
// experts' shapes from `experts_w` and their addresses from `table` (not cross-checked: it must be
// expert_pointer_table(experts_w) on xn's device).
void moe_experts(const Tensor& xn, const Tensor& experts, const Tensor& weights,
                 const std::vector<ExpertWeights>& experts_w, const Tensor& table, const MoeExpertsConfig& config,
                 Tensor& routed);

}  // namespace dsv4::kernels

#if defined(DSV4_WITH_CUDA)
namespace dsv4::kernels::cuda {
// The CUDA implementations (kernels/cuda/moe.cu) of moe_gate, swiglu_clamp, moe_combine and
// moe_experts on `stream` (a cudaStream_t; nullptr is the default stream); the entry points above
// have checked the contracts. Asynchronous and capturable: no synchronization, scratch from
// gpu::Scratch. `inter` is the experts' I.
void moe_gate(const Tensor& logits, const Tensor& bias, const Tensor& tid2eid, const Tensor& token_ids, int64_t k,
              float route_scale, Tensor& experts, Tensor& weights, void* stream);
void swiglu_clamp(const Tensor& g, const Tensor& u, float limit, const Tensor& row_weight, Tensor& h, void* stream);
void moe_combine(const Tensor& routed, const Tensor& shared, Tensor& out, void* stream);
void moe_experts(const Tensor& xn, const Tensor& experts, const Tensor& weights, int64_t num_experts, int64_t inter,
                 const Tensor& table, const MoeExpertsConfig& config, Tensor& routed, void* stream);
// GEMMs of moe_experts run so far (process-wide) by the small-batch fp4 kernel: fp4 experts with a
// 16- or 32-wide weight block, K a multiple of 32, and T * k <= 8 * E (decode batches). It gives the
// tiled kernel's bits; tests read this count to know which kernel they checked.
uint64_t moe_small_batch_gemms();
}  // namespace dsv4::kernels::cuda
#endif
