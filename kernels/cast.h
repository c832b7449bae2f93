// The cast op: converts every element of `src` to `dst`'s dtype, through f32, rounding to nearest
// even and saturating as engine/core/formats.h defines. It is how activations and caches are packed
// to and unpacked from the narrow formats (bf16, f16, FP8, FP4, ue8m0).
//
// Contract (checked by check_cast_contract, a ContractError naming the argument and rule):
//   - src and dst have the same shape and live on the same device;
//   - one side is f32 and the other a narrow float (or both f32);
//   - both are contiguous (the kernels index them as flat arrays);
//   - fp4 tensors start on a byte boundary (even storage offset).
//
// `cast` is the entry point: it checks the contract and runs cast_host for host tensors or
// cast_cuda on current_stream() for GPU tensors. They write the same codes; one difference at the
// edge: for an fp4 dst with an odd element count cast_cuda writes the last byte whole (its high
// nibble 0), where cast_host leaves the nibble past the view untouched.
#pragma once

#include "engine/core/tensor.h"

namespace dsv4::kernels {

inline constexpr const char* kCastOp = "cast";

void check_cast_contract(const Tensor& src, const Tensor& dst);

// The dispatching entry point: host or GPU, from the tensors' device.
void cast(const Tensor& src, Tensor& dst);

// Host implementation (the `sim` backend's).
void cast_host(const Tensor& src, Tensor& dst);

#if defined(DSV4_WITH_CUDA)
// CUDA implementation on `stream` (a cudaStream_t; nullptr is the default stream). Asynchronous.
void cast_cuda(const Tensor& src, Tensor& dst, void* stream);
#endif

}  // namespace dsv4::kernels
