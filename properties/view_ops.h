// The strided-input property (bug class A1): every token-major kernel entry point, fed a view of
// its [T, W] input (contiguous, row-padded, a column slice of a wider buffer like qkv_a[:, r:], or
// transposed), either computes exactly what it computes on the view's contiguous copy or throws a
// ContractError. It never silently misreads, and it never writes outside the view.
//
// Layout geometry (ViewSpec.pad, in elements; the buffer around the view is poisoned with a sentinel
// and checked after the call):
//   contiguous    rows of W, pad ignored
//   row-padded    row stride W + pad
//   column-slice  rows of pad + W, the view is the last W columns (offset pad), row stride pad + W
//   transposed    the transpose of a [W, T + pad] buffer: strides (1, T + pad)
// T = 1 views of the first three (and transposed with pad 0) count as contiguous (PyTorch's rule),
// so even a contiguous-only kernel proceeds and must then be right.
#pragma once

#include <rapidcheck.h>

#include <cstdint>
#include <functional>
#include <ostream>
#include <string>
#include <vector>

#include "engine/core/dtype.h"
#include "engine/core/tensor.h"
#include "properties/scenario.h"
#include "properties/verdict.h"

namespace dsv4::props {

// One kernel entry point as the property drives it.
struct ViewOp {
  std::string name;                  // e.g. "fused_norm_rope_inplace"; variants add ".what"
  int64_t width = 0;                 // W: the last dim of the token-major input whose layout varies
  std::vector<std::string> layouts;  // the layouts it can be given
  // Runs the kernel with `x` as its varied input (other arguments built deterministically from seed
  // and T = x.size(0)) and returns every output's bytes (in-place ops: x's logical contents after the
  // call, read through the view).
  std::function<std::vector<uint8_t>(Tensor& x, uint64_t seed)> run;
  DType dtype = DType::bf16;  // x's element type (byte-sized or wider; fp4 is not supported)
};

// The layouts of ViewSpec.layout, in generator order.
const std::vector<std::string>& view_layouts();

const std::vector<ViewOp>& view_ops();
std::vector<std::string> view_op_names();

// The property for one case: pass (equal bytes, or a ContractError on the view: then the detail
// starts with "refused: "), or mismatch (different bytes, a write outside the view, or the
// contiguous copy refused). InputError naming "view.layout" / "view.tokens" / "view.pad" for a spec
// the op cannot be given (a layout not in op.layouts, T or pad negative or over 4096).
Verdict check_view_case(const ViewOp& op, const ViewSpec& spec);
// Looks the op up in view_ops() (InputError naming "view.op" for an unknown name).
Verdict check_view_case(const ViewSpec& spec);

// Specs over every op of view_ops(): op, then layout, then T (0, 1, 2, odd sizes, the CUDA-graph
// batch buckets), pad (per layout) and seed, composed with mapcat so one case shrinks as one value.
rc::Gen<ViewSpec> gen_view_spec();

// "op layout T=.. pad=.. seed=..", for reports and RapidCheck's counterexamples.
std::string describe(const ViewSpec& spec);
void showValue(const ViewSpec& spec, std::ostream& os);

// Every element of `t` in row-major order as bytes (any strides; empty for an undefined tensor).
std::vector<uint8_t> logical_bytes(const Tensor& t);

}  // namespace dsv4::props
