// The tensor-core path of the routed experts' fp4 GEMMs at decode batch sizes (kernels/cuda/moe.cu),
// behind the same entry point as the bitwise kernels (kernels/moe.h: moe_experts). CUDA only, sm_80
// and later: HIP builds never include this header (moe.cu guards it) and always run the bitwise
// kernels.
//
// The switch (process-wide): the environment variable DSV4_MOE_GEMM=exact|tensor_core, read once at
// the first fp4 moe_experts call (default exact); set_moe_gemm_path overrides it (tests, benchmarks).
// Any other value of the variable is refused (an InputError naming it at the first call).
//   exact       : the small-batch and tiled kernels of moe.cu, bit for bit the host.
//   tensor_core : where the small-batch kernel would run (at most 8 rows per expert on average) and
//                 the weight blocks are 32 wide inside whole activation blocks, on a device of
//                 compute capability 8.0 or later with code for it; the exact kernels otherwise.
//                 Each 32-wide block's partial sum comes from two bf16 mma.sync m16n8k16 (the e4m3
//                 activations and e2m1 weights are exact in bf16, so the products are exact; the
//                 tensor cores add them in their own order); then, as the host, acc += partial ·
//                 (s_a · s_w) in f32 over the blocks in order. Not bitwise with the host: the h
//                 between the two GEMMs is re-quantized to e4m3, so a last-bit difference in one of
//                 its values can move its code. tests/gpu/test_kernels_moe.cu measures the agreement.
// Determinism: fixed grids and fixed orders, so reruns and graph replays give the same bits.
#pragma once

#include <cstdint>

#include "kernels/cuda/path_switch.h"

namespace dsv4::kernels::cuda {

enum class MoeGemmPath : int { exact = 0, tensor_core = 1 };

MoeGemmPath moe_gemm_path();
void set_moe_gemm_path(MoeGemmPath path);
const char* moe_gemm_path_name(MoeGemmPath path);

// Sets the path for its lifetime (tests, benchmarks); restores the previous one.
using MoeGemmPathScope = PathScope<MoeGemmPath, moe_gemm_path, set_moe_gemm_path>;

// How many expert GEMMs (up or down) the tensor-core path has enqueued.
uint64_t moe_tensor_core_gemms();

}  // namespace dsv4::kernels::cuda
