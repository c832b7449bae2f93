// Every tensor of a DeepSeek-V4 checkpoint for a config: the inference demo's names (after its
// convert step), the shapes, and the dtypes as released checkpoints store them (dsv4-model §2.9):
// FP8 weights as F8_E4M3 with F8_E8M0 block scales, FP4 routed experts packed two per byte under
// I8 with F8_E8M0 1 x fp4_block scales, BF16 for embed/gate/head/norms/compressor weights, F32 for
// ape/attn_sink/gate bias/hc_*, I32 for tid2eid.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "engine/config/model_config.h"
#include "engine/core/dtype.h"

namespace dsv4 {

// What a tensor holds, which decides how synthetic values are drawn and how it is counted.
enum class TensorRole {
  fp8_weight,   // e4m3 values; its block scales are the tensor named <prefix>.scale
  fp4_weight,   // e2m1 pairs in I8 bytes, shape [out, in / 2]; scales in <prefix>.scale
  block_scale,  // ue8m0 scales of the fp8/fp4 weight with the same prefix
  dense_weight, // a bf16 or f32 matrix used as is (embed, head, gate, wo_a, compressor, hc_*_fn)
  norm_weight,  // RMSNorm weights (around 1)
  bias,         // additive parameters: hc_*_base, hc_*_scale, ape, gate bias
  sink,         // attn_sink logits
  hash_table,   // tid2eid
};

struct TensorSpec {
  std::string name;
  std::vector<int64_t> shape;  // as stored (fp4: packed, in/2 columns)
  DType dtype;                 // as stored (fp4: DType::i8)
  TensorRole role;
  int64_t fan_in = 0;          // the logical input width of a matrix (for init scaling)
  std::string weight_name;     // block_scale: the weight it scales; fp8/fp4 weights: their scale's name
  DType scaled_dtype = DType::f32;  // block_scale: the format of the values it scales (e4m3fn or e2m1)
};

std::vector<TensorSpec> checkpoint_layout(const ModelConfig& config);

struct ParameterCount {
  int64_t total = 0;           // every parameter (fp4 counts two per byte), scales excluded
  int64_t routed_experts = 0;  // all routed-expert parameters, main layers and MTP
  int64_t mtp = 0;             // parameters of the MTP blocks (mtp.*), included in total
  int64_t activated = 0;       // parameters one token touches: total minus the routed experts it skips
  int64_t scale_bytes = 0;     // block-scale tensors, in bytes
  int64_t stored_bytes = 0;    // every tensor as stored
};
ParameterCount count_parameters(const ModelConfig& config);

}  // namespace dsv4
