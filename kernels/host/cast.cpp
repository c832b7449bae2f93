#include "kernels/cast.h"

#include <algorithm>
#include <cstring>
#include <string>

#include "engine/core/error.h"
#include "engine/core/formats.h"
#include "kernels/device.h"

namespace dsv4::kernels {

void check_cast_contract(const Tensor& src, const Tensor& dst) {
  const char* op = kCastOp;
  if (!src.defined()) throw ContractError(op, "src", "is undefined");
  if (!dst.defined()) throw ContractError(op, "dst", "is undefined");
  if (src.shape() != dst.shape()) {
    throw ContractError(op, "dst", "shape " + shape_str(dst.shape()) + " differs from src " + shape_str(src.shape()));
  }
  if (!(src.device() == dst.device())) {
    throw ContractError(op, "dst", "lives on " + dst.device().str() + ", src on " + src.device().str());
  }
  const bool src_f32 = src.dtype() == DType::f32;
  const bool dst_f32 = dst.dtype() == DType::f32;
  if (!(src_f32 && (dst_f32 || is_narrow_float(dst.dtype()))) && !(dst_f32 && is_narrow_float(src.dtype()))) {
    throw ContractError(op, src_f32 ? "dst" : "src",
                        "casts go between f32 and a narrow float, got " + std::string(dtype_name(src.dtype())) +
                            " -> " + std::string(dtype_name(dst.dtype())));
  }
  if (!src.is_contiguous()) throw ContractError(op, "src", "must be contiguous, strides " + shape_str(src.strides()));
  if (!dst.is_contiguous()) throw ContractError(op, "dst", "must be contiguous, strides " + shape_str(dst.strides()));
  if (src.dtype() == DType::f4_e2m1 && src.offset() % 2 != 0) throw ContractError(op, "src", "fp4 view starts mid-byte");
  if (dst.dtype() == DType::f4_e2m1 && dst.offset() % 2 != 0) throw ContractError(op, "dst", "fp4 view starts mid-byte");
}

void cast_host(const Tensor& src, Tensor& dst) {
  check_cast_contract(src, dst);
  if (src.device().kind != DeviceKind::host) throw ContractError("cast_host", "src", "needs host tensors");
  const int64_t n = src.numel();
  if (n == 0) return;
  if (src.dtype() == DType::f32 && dst.dtype() == DType::f32) {
    std::copy_n(src.data<float>(), n, dst.data<float>());
    return;
  }
  if (src.dtype() == DType::f32) {
    const float* in = src.data<float>();
    auto* out = dst.data<uint8_t>();
    for (int64_t i = 0; i < n; ++i) store_code(dst.dtype(), out, i, encode_narrow(dst.dtype(), in[i]));
    return;
  }
  const auto* in = src.data<uint8_t>();
  float* out = dst.data<float>();
  for (int64_t i = 0; i < n; ++i) out[i] = decode_narrow(src.dtype(), load_code(src.dtype(), in, i));
}

void cast(const Tensor& src, Tensor& dst) {
  check_cast_contract(src, dst);
  if (runs_on_gpu(kCastOp, {{"src", &src}, {"dst", &dst}})) {
    DSV4_GPU_OR_FAIL(kCastOp, cast_cuda(src, dst, current_stream()));
  }
  cast_host(src, dst);
}

}  // namespace dsv4::kernels
