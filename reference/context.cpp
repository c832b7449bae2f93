#include "reference/context.h"

#include "engine/core/formats.h"

namespace dsv4::ref {

float Context::act(float x) const { return numerics.quant() ? round_bf16(x) : x; }

void Context::act_inplace(Mat& m) const {
  if (!numerics.quant()) return;
  for (float& v : m.data) v = round_bf16(v);
}

}  // namespace dsv4::ref
