#include "reference/context.h"

#include "engine/core/formats.h"

namespace dsv4::ref {

const char* linear_quant_name(LinearQuant q) { return q == LinearQuant::w8a8_int8 ? "w8a8_int8" : "fp8_block"; }

float Context::act(float x) const { return numerics.quant() ? round_bf16(x) : x; }

void Context::act_inplace(Mat& m) const {
  if (!numerics.quant()) return;
  for (float& v : m.data) v = round_bf16(v);
}

}  // namespace dsv4::ref
