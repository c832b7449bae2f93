// The MoE feed-forward pieces around the quantized GEMMs (dsv4-model §3): the gate (fp32 gate GEMM,
// sqrt-softplus scores, routing by top-k of s + bias or by the tid2eid row of the current token,
// weights s / Σ s · route_scale), the clamped SwiGLU with the routing weight applied before w2, and
// the fp32 combine of routed and shared expert outputs rounded once to bf16.
//
// Layouts (the expert GEMMs take rows from these; no GPU MoE kernel exists yet, so these are the
// layouts the CUDA kernels are to follow):
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
#pragma once

#include <cstdint>

#include "engine/core/tensor.h"

namespace dsv4::kernels {

// logits = x_f32 · gate_w^T: a plain fp32 GEMM (ascending d, one fp32 accumulator per output).
void moe_gate_logits(const Tensor& x, const Tensor& gate_w, Tensor& logits);

// Routing from the logits. With tid2eid (hash layers) the experts are tid2eid[token_ids[t]] and bias
// must be absent; otherwise the top-k of s + bias (bias optional, used only for selection). Either
// way weights = s[experts] / Σ s[experts] · route_scale in fp32. ContractError for a token id outside
// tid2eid, a table row with repeated or out-of-range experts, k outside [1, E].
void moe_gate(const Tensor& logits, const Tensor& bias, const Tensor& tid2eid, const Tensor& token_ids, int64_t k,
              float route_scale, Tensor& experts, Tensor& weights);

// h = bf16(silu(g') · u' · row_weight) with, when limit > 0, u' = clamp(u, -limit, limit) and
// g' = min(g, limit) (the gate is not clamped from below); limit <= 0 disables the clamp.
void swiglu_clamp(const Tensor& g, const Tensor& u, float limit, const Tensor& row_weight, Tensor& h);

// out[t] = bf16(Σ_j routed[t, j] + shared[t]): fp32 accumulation, routed in order j, shared last.
void moe_combine(const Tensor& routed, const Tensor& shared, Tensor& out);

}  // namespace dsv4::kernels
