#include "properties/view_ops.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <sstream>
#include <utility>

#include "engine/core/allocator.h"
#include "engine/core/error.h"
#include "kernels/attn_output.h"
#include "kernels/cast.h"
#include "kernels/int8_gemm.h"
#include "kernels/mhc.h"
#include "kernels/moe.h"
#include "kernels/norm_rope.h"
#include "kernels/q_path.h"
#include "kernels/quant_gemm.h"

namespace dsv4::props {
namespace {

constexpr uint8_t kSentinel = 0xA5;  // a finite value in every dtype used, so a misread is plausible garbage
constexpr int64_t kMaxExtent = 4096;  // T and pad beyond this are a malformed spec, not a case
constexpr double kEps = 1e-6;

// ---- deterministic arguments ----------------------------------------------------------------------

uint64_t splitmix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

// A value in [-1, 1) that depends only on (seed, stream, index): each argument has its own stream,
// and the varied input indexes by logical element, so every layout holds the same values.
double noise(uint64_t seed, uint64_t stream, uint64_t index) {
  const uint64_t h = splitmix64(seed ^ splitmix64(stream * 0x100000001B3ull + index));
  return static_cast<double>(h >> 11) * 0x1.0p-52 - 1.0;
}

// Values of a sensible magnitude for the dtype: activations in [-4, 4), fp8 codes in [-16, 16),
// int8 codes over the whole [-127, 127].
double sensible(DType dtype, double u) {
  switch (dtype) {
    case DType::f32:
    case DType::f64:
    case DType::bf16:
    case DType::f16: return 4.0 * u;
    case DType::f8_e4m3fn:
    case DType::f8_e4m3fnuz:
    case DType::f8_e5m2: return 16.0 * u;
    case DType::i8: return std::round(127.0 * u);
    default: break;
  }
  DSV4_ASSERT(false, "strided-input: no value rule for dtype " + std::string(dtype_name(dtype)));
  return 0.0;
}

Tensor filled(const Shape& shape, DType dtype, uint64_t seed, uint64_t stream, double scale, const std::string& name) {
  std::vector<double> v(static_cast<size_t>(shape_numel(shape)));
  for (size_t i = 0; i < v.size(); ++i) {
    v[i] = scale * noise(seed, stream, i);
    if (dtype == DType::i8) v[i] = std::round(v[i]);
  }
  return Tensor::from_values(shape, dtype, v, name);
}

// Outputs start as zeros so bytes a kernel leaves alone compare equal between the two runs.
Tensor zeros(const Shape& shape, DType dtype, const std::string& name) {
  Tensor t = Tensor::empty(shape, dtype, name);
  if (t.storage()->bytes() > 0) std::memset(t.storage()->data(), 0, t.storage()->bytes());
  return t;
}

// Power-of-two (ue8m0) scales 2^-1 .. 2^-4.
Tensor pow2_scales(const Shape& shape, uint64_t seed, uint64_t stream, const std::string& name) {
  std::vector<double> v(static_cast<size_t>(shape_numel(shape)));
  for (size_t i = 0; i < v.size(); ++i) {
    v[i] = std::ldexp(1.0, -1 - static_cast<int>(splitmix64(seed + stream * 977 + i) % 4));
  }
  return Tensor::from_values(shape, DType::ue8m0, v, name);
}

Tensor positions(int64_t tokens, uint64_t seed) {
  std::vector<double> v(static_cast<size_t>(tokens));
  for (size_t i = 0; i < v.size(); ++i) v[i] = static_cast<double>(splitmix64(seed + 17 * i) % 8192);
  return Tensor::from_values({tokens}, DType::i32, v, "positions");
}

// The RoPE table theta^(-2j / rope_dim) for `pairs` pairs.
Tensor rope_freqs(int64_t pairs) {
  std::vector<double> v(static_cast<size_t>(pairs));
  for (int64_t j = 0; j < pairs; ++j) v[static_cast<size_t>(j)] = std::pow(10000.0, -static_cast<double>(j) / pairs);
  return Tensor::from_values({pairs}, DType::f32, v, "freqs");
}

void append(std::vector<uint8_t>& out, const Tensor& t) {
  const std::vector<uint8_t> b = logical_bytes(t);
  out.insert(out.end(), b.begin(), b.end());
}

template <class... Ts>
std::vector<uint8_t> bytes_of(const Ts&... tensors) {
  std::vector<uint8_t> out;
  (append(out, tensors), ...);
  return out;
}

// ---- the op table ---------------------------------------------------------------------------------

const std::vector<std::string> kAllLayouts = {"contiguous", "row-padded", "column-slice", "transposed"};

// Each input below is the varied x [T, W]; the rest is small and fixed by the contracts: RoPE over
// the last 8 dims, heads of 16, FP8 blocks of 32, hc = 4 copies of 8.
std::vector<ViewOp> build_ops() {
  using namespace dsv4::kernels;
  std::vector<ViewOp> ops;

  ops.push_back({kNormRopeOp, 32, kAllLayouts, [](Tensor& x, uint64_t seed) {
                   const Tensor w = filled({32}, DType::f32, seed, 1, 0.5, "weight");
                   fused_norm_rope_inplace(x, w, kEps, rope_freqs(4), positions(x.size(0), seed));
                   return bytes_of(x);
                 }});

  ops.push_back({kNormRopeStoreOp, 32, kAllLayouts, [](Tensor& x, uint64_t seed) {
                   const int64_t T = x.size(0);
                   constexpr int64_t page_size = 4, block = 8;
                   const int64_t pages = T / page_size + 2;
                   const int64_t entries = pages * page_size;
                   // Distinct locations with some -1 (padding) rows: (t + seed) mod entries is injective for t < T.
                   std::vector<double> locs(static_cast<size_t>(T));
                   for (int64_t t = 0; t < T; ++t) {
                     locs[static_cast<size_t>(t)] =
                         t % 3 == static_cast<int64_t>(seed % 3) ? -1.0 : static_cast<double>((t + static_cast<int64_t>(seed % 64)) % entries);
                   }
                   const Tensor swa_locs = Tensor::from_values({T}, DType::i64, locs, "swa_locs");
                   const int64_t page_bytes = model1_layout(kNormRopeStoreOp, 32, 8, block).page_bytes(page_size);
                   Tensor cache = zeros({pages, page_bytes}, DType::u8, "cache");
                   const Tensor w = filled({32}, DType::f32, seed, 1, 0.5, "weight");
                   fused_norm_rope_store_kv(x, w, kEps, rope_freqs(4), positions(T, seed), swa_locs, cache, page_size, block);
                   return bytes_of(cache);
                 }});

  ops.push_back({kRmsNormOp, 24, kAllLayouts, [](Tensor& x, uint64_t seed) {
                   const Tensor w = filled({24}, DType::f32, seed, 1, 0.5, "weight");
                   Tensor out = zeros({x.size(0), 24}, DType::bf16, "out");
                   rms_norm(x, w, kEps, out);
                   return bytes_of(out);
                 }});

  ops.push_back({kQNormRopeOp, 32, kAllLayouts, [](Tensor& x, uint64_t seed) {
                   q_norm_rope_inplace(x, 2, 16, kEps, rope_freqs(4), positions(x.size(0), seed));
                   return bytes_of(x);
                 }});

  ops.push_back({kInverseRopeOp, 32, kAllLayouts, [](Tensor& x, uint64_t seed) {
                   inverse_rope_inplace(x, 2, 16, rope_freqs(4), positions(x.size(0), seed));
                   return bytes_of(x);
                 }});

  ops.push_back({kIndexerQOp, 32, kAllLayouts, [](Tensor& x, uint64_t seed) {
                   indexer_q(x, 2, 16, rope_freqs(4), positions(x.size(0), seed), IndexerQuant::fp4, 8);
                   return bytes_of(x);
                 }});

  // The FP8 activation quantization, from both input dtypes it takes.
  for (const DType dtype : {DType::bf16, DType::f32}) {
    ops.push_back({dtype == DType::bf16 ? "act_quant_fp8" : "act_quant_fp8.f32", 64, kAllLayouts,
                   [](Tensor& x, uint64_t) {
                     Tensor q = zeros({x.size(0), 64}, DType::f8_e4m3fn, "q");
                     Tensor s = zeros({x.size(0), 2}, DType::ue8m0, "scales");
                     act_quant_fp8(x, 32, q, s);
                     return bytes_of(q, s);
                   },
                   dtype});
  }

  ops.push_back({"act_quant_int8", 48, kAllLayouts, [](Tensor& x, uint64_t) {
                   Tensor q = zeros({x.size(0), 48}, DType::i8, "q");
                   Tensor s = zeros({x.size(0)}, DType::f32, "scales");
                   act_quant_int8(x, q, s);
                   return bytes_of(q, s);
                 }});

  // The projection entry point in each of its three weight formats.
  ops.push_back({"linear_projection.fp8", 64, kAllLayouts, [](Tensor& x, uint64_t seed) {
                   const Tensor w = filled({16, 64}, DType::f8_e4m3fn, seed, 1, 2.0, "w");
                   const Tensor ws = pow2_scales({1, 2}, seed, 2, "w_scale");
                   Tensor out = zeros({x.size(0), 16}, DType::bf16, "out");
                   linear_projection(x, w, BlockScales{ws, 32}, out);
                   return bytes_of(out);
                 }});
  ops.push_back({"linear_projection.int8", 48, kAllLayouts, [](Tensor& x, uint64_t seed) {
                   const Tensor w = filled({16, 48}, DType::i8, seed, 1, 127.0, "w");
                   const Tensor ws = filled({16}, DType::f32, seed, 2, 0.01, "w_scale");
                   Tensor out = zeros({x.size(0), 16}, DType::bf16, "out");
                   linear_projection(x, w, ChannelScales{ws}, out);
                   return bytes_of(out);
                 }});
  ops.push_back({"linear_projection.bf16", 40, kAllLayouts,
                 [](Tensor& x, uint64_t seed) {
                   const Tensor w = filled({12, 40}, DType::bf16, seed, 1, 0.5, "w");
                   Tensor out = zeros({x.size(0), 12}, DType::bf16, "out");
                   linear_projection(x, w, kNoWeightScale, out);
                   return bytes_of(out);
                 },
                 DType::f32});

  // The GEMMs themselves, fed already quantized activations.
  ops.push_back({"gemm_fp8_block_scaled", 64, kAllLayouts,
                 [](Tensor& x, uint64_t seed) {
                   const Tensor sa = pow2_scales({x.size(0), 2}, seed, 3, "act_scales");
                   const Tensor w = filled({16, 64}, DType::f8_e4m3fn, seed, 1, 2.0, "w");
                   const Tensor ws = pow2_scales({1, 2}, seed, 2, "w_scales");
                   Tensor out = zeros({x.size(0), 16}, DType::bf16, "out");
                   gemm_fp8_block_scaled(x, sa, w, ws, out, 32);
                   return bytes_of(out);
                 },
                 DType::f8_e4m3fn});
  ops.push_back({"gemm_int8_per_channel", 48, kAllLayouts,
                 [](Tensor& x, uint64_t seed) {
                   const Tensor sa = filled({x.size(0)}, DType::f32, seed, 3, 0.02, "act_scales");
                   const Tensor w = filled({16, 48}, DType::i8, seed, 1, 127.0, "w");
                   const Tensor ws = filled({16}, DType::f32, seed, 2, 0.01, "w_scales");
                   Tensor out = zeros({x.size(0), 16}, DType::bf16, "out");
                   gemm_int8_per_channel(x, sa, w, ws, out);
                   return bytes_of(out);
                 },
                 DType::i8});

  ops.push_back({kGroupedWoAOp, 32, kAllLayouts, [](Tensor& x, uint64_t seed) {
                   const Tensor wo_a = filled({8, 16}, DType::bf16, seed, 1, 0.5, "wo_a");
                   Tensor out = zeros({x.size(0), 8}, DType::bf16, "out");
                   grouped_wo_a(x, wo_a, 2, out);
                   return bytes_of(out);
                 }});

  // The cast op both ways: packing f32 to bf16, unpacking e4m3 to f32.
  ops.push_back({"cast_host", 24, kAllLayouts,
                 [](Tensor& x, uint64_t) {
                   Tensor dst = zeros(x.shape(), DType::bf16, "dst");
                   cast_host(x, dst);
                   return bytes_of(dst);
                 },
                 DType::f32});
  ops.push_back({"cast_host.e4m3", 24, kAllLayouts,
                 [](Tensor& x, uint64_t) {
                   Tensor dst = zeros(x.shape(), DType::f32, "dst");
                   cast_host(x, dst);
                   return bytes_of(dst);
                 },
                 DType::f8_e4m3fn});

  // The MoE gate: its fp32 GEMM, the routing from the logits, the SwiGLU and the combine.
  ops.push_back({"moe_gate_logits", 32, kAllLayouts, [](Tensor& x, uint64_t seed) {
                   const Tensor gate_w = filled({8, 32}, DType::bf16, seed, 1, 0.25, "gate_w");
                   Tensor logits = zeros({x.size(0), 8}, DType::f32, "logits");
                   moe_gate_logits(x, gate_w, logits);
                   return bytes_of(logits);
                 }});
  ops.push_back({"moe_gate", 8, kAllLayouts,
                 [](Tensor& x, uint64_t seed) {
                   const Tensor bias = filled({8}, DType::f32, seed, 1, 0.1, "bias");
                   Tensor experts = zeros({x.size(0), 2}, DType::i32, "experts");
                   Tensor weights = zeros({x.size(0), 2}, DType::f32, "weights");
                   moe_gate(x, bias, Tensor(), Tensor(), 2, 1.5f, experts, weights);
                   return bytes_of(experts, weights);
                 },
                 DType::f32});
  ops.push_back({"swiglu_clamp", 16, kAllLayouts, [](Tensor& x, uint64_t seed) {
                   const int64_t T = x.size(0);
                   const Tensor u = filled({T, 16}, DType::bf16, seed, 1, 8.0, "u");
                   const Tensor row_weight = filled({T}, DType::f32, seed, 2, 1.0, "row_weight");
                   Tensor h = zeros({T, 16}, DType::bf16, "h");
                   swiglu_clamp(x, u, 7.0f, row_weight, h);
                   return bytes_of(h);
                 }});
  ops.push_back({"moe_combine", 16, kAllLayouts, [](Tensor& x, uint64_t seed) {
                   const Tensor routed = filled({x.size(0), 2, 16}, DType::bf16, seed, 1, 4.0, "routed");
                   Tensor out = zeros({x.size(0), 16}, DType::bf16, "out");
                   moe_combine(routed, x, out);  // x is the shared expert's output
                   return bytes_of(out);
                 }});

  // mHC over the residual R [T, hc * d] with hc = 4, d = 8.
  ops.push_back({kHcPreOp, 32, kAllLayouts, [](Tensor& x, uint64_t seed) {
                   const int64_t T = x.size(0);
                   const Tensor fn = filled({24, 32}, DType::f32, seed, 1, 0.1, "fn");
                   const Tensor base = filled({24}, DType::f32, seed, 2, 0.1, "base");
                   const Tensor scale = Tensor::from_values({3}, DType::f32, {0.7, 0.6, 0.5}, "scale");
                   Tensor out = zeros({T, 8}, DType::bf16, "x");
                   Tensor post = zeros({T, 4}, DType::f32, "post");
                   Tensor comb = zeros({T, 4, 4}, DType::f32, "comb");
                   hc_pre(x, fn, base, scale, kEps, kEps, 3, out, post, comb);
                   return bytes_of(out, post, comb);
                 }});
  ops.push_back({kHcPostOp, 32, kAllLayouts, [](Tensor& x, uint64_t seed) {
                   const int64_t T = x.size(0);
                   const Tensor F = filled({T, 8}, DType::bf16, seed, 1, 4.0, "F");
                   const Tensor post = filled({T, 4}, DType::f32, seed, 2, 1.0, "post");
                   const Tensor comb = filled({T, 4, 4}, DType::f32, seed, 3, 0.5, "comb");
                   Tensor out = zeros({T, 32}, DType::bf16, "R_out");
                   hc_post(F, x, post, comb, out);
                   return bytes_of(out);
                 }});
  ops.push_back({kHcHeadOp, 32, kAllLayouts, [](Tensor& x, uint64_t seed) {
                   const Tensor fn = filled({4, 32}, DType::f32, seed, 1, 0.1, "fn");
                   const Tensor base = filled({4}, DType::f32, seed, 2, 0.1, "base");
                   const Tensor scale = Tensor::from_values({1}, DType::f32, {0.7}, "scale");
                   Tensor y = zeros({x.size(0), 8}, DType::bf16, "y");
                   hc_head(x, fn, base, scale, kEps, kEps, y);
                   return bytes_of(y);
                 }});
  return ops;
}

// ---- one case -------------------------------------------------------------------------------------

// The varied input as a view into a larger buffer; every byte outside the view holds the sentinel.
struct ViewBuffer {
  Tensor buffer;               // the whole storage, 1-D
  Tensor view;                 // [T, W]
  std::vector<bool> in_view;   // per byte of the buffer
  std::vector<uint8_t> before; // the buffer's bytes before the call
};

ViewBuffer make_view(const ViewOp& op, const ViewSpec& spec) {
  const int64_t T = spec.tokens;
  const int64_t W = op.width;
  const int64_t pad = spec.pad;
  DSV4_ASSERT(dtype_bits(op.dtype) % 8 == 0, "strided-input: sub-byte dtypes are not supported");
  const int64_t elem = dtype_bits(op.dtype) / 8;
  // A row's worth of margin (at least 16 elements) on both sides catches row -1 and row T.
  const int64_t margin = std::max<int64_t>(W, 16);
  Shape strides;
  int64_t offset = margin;
  int64_t span = 0;
  if (spec.layout == "contiguous") {
    strides = {W, 1};
    span = T * W;
  } else if (spec.layout == "row-padded") {
    strides = {W + pad, 1};
    span = T * (W + pad);
  } else if (spec.layout == "column-slice") {
    strides = {pad + W, 1};
    offset += pad;
    span = T * (pad + W);
  } else {  // transposed
    strides = {1, T + pad};
    span = W * (T + pad);
  }
  ViewBuffer vb;
  vb.buffer = Tensor::empty({2 * margin + span}, op.dtype, "view.buffer");
  std::memset(vb.buffer.storage()->data(), kSentinel, vb.buffer.storage()->bytes());
  vb.view = vb.buffer.as_strided({T, W}, strides, offset);
  vb.in_view.assign(vb.buffer.storage()->bytes(), false);
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t c = 0; c < W; ++c) {
      vb.view.set({t, c}, sensible(op.dtype, noise(spec.seed, 0, static_cast<uint64_t>(t * W + c))));
      const int64_t e = vb.view.element_index({t, c});
      std::fill_n(vb.in_view.begin() + e * elem, elem, true);
    }
  }
  const auto* data = static_cast<const uint8_t*>(vb.buffer.storage()->data());
  vb.before.assign(data, data + vb.buffer.storage()->bytes());
  return vb;
}

std::string where(const ViewSpec& spec) {
  return "layout " + spec.layout + ", T=" + std::to_string(spec.tokens) + ", pad=" + std::to_string(spec.pad);
}

std::string hex(uint8_t b) {
  static const char* digits = "0123456789abcdef";
  return std::string("0x") + digits[b >> 4] + digits[b & 0xF];
}

const ViewOp& find_op(const std::string& name) {
  for (const ViewOp& op : view_ops()) {
    if (op.name == name) return op;
  }
  std::string known;
  for (const ViewOp& op : view_ops()) known += (known.empty() ? "" : ", ") + op.name;
  throw InputError("scenario", "view.op", "unknown op '" + name + "'; known: " + known);
}

void validate(const ViewOp& op, const ViewSpec& spec) {
  if (std::find(op.layouts.begin(), op.layouts.end(), spec.layout) == op.layouts.end()) {
    std::string legal;
    for (const std::string& l : op.layouts) legal += (legal.empty() ? "" : ", ") + l;
    throw InputError("scenario", "view.layout", "'" + spec.layout + "' is not a layout of " + op.name + " (" + legal + ")");
  }
  if (spec.tokens < 0 || spec.tokens > kMaxExtent) {
    throw InputError("scenario", "view.tokens", "must be in [0, " + std::to_string(kMaxExtent) + "], got " +
                                                    std::to_string(spec.tokens));
  }
  if (spec.pad < 0 || spec.pad > kMaxExtent) {
    throw InputError("scenario", "view.pad", "must be in [0, " + std::to_string(kMaxExtent) + "], got " +
                                                 std::to_string(spec.pad));
  }
}

// One of `values`, shrinking towards the first (rc::gen::elementOf does not shrink).
template <class T>
rc::Gen<T> shrinking_element(std::vector<T> values) {
  const size_t count = values.size();
  return rc::gen::map(rc::gen::inRange<size_t>(0, count), [values = std::move(values)](size_t i) { return values[i]; });
}

}  // namespace

const std::vector<std::string>& view_layouts() { return kAllLayouts; }

const std::vector<ViewOp>& view_ops() {
  static const std::vector<ViewOp> ops = build_ops();
  return ops;
}

std::vector<std::string> view_op_names() {
  std::vector<std::string> names;
  for (const ViewOp& op : view_ops()) names.push_back(op.name);
  return names;
}

std::vector<uint8_t> logical_bytes(const Tensor& t) {
  if (!t.defined() || t.numel() == 0) return {};
  // A fresh contiguous copy even when t is contiguous: it may sit at an offset in a larger storage.
  const Tensor dense = t.clone(t.name() + ".bytes");
  const auto* data = static_cast<const uint8_t*>(dense.data_ptr());
  return std::vector<uint8_t>(data, data + dtype_storage_bytes(t.dtype(), t.numel()));
}

Verdict check_view_case(const ViewOp& op, const ViewSpec& spec) {
  validate(op, spec);
  ViewBuffer vb = make_view(op, spec);
  // The copy gets its own storage, so running the op on it cannot touch the view's buffer.
  Tensor dense = vb.view.clone(op.name + ".contiguous");

  std::vector<uint8_t> expected;
  try {
    expected = op.run(dense, spec.seed);
  } catch (const ContractError& e) {
    return Verdict::fail(VerdictKind::mismatch, op.name,
                         where(spec) + ": the contiguous input was refused: " + std::string(e.what()));
  }

  std::vector<uint8_t> got;
  std::string refusal;
  try {
    got = op.run(vb.view, spec.seed);
  } catch (const ContractError& e) {
    refusal = e.what();
  }

  // Checked even after a refusal: a kernel that wrote and then threw still corrupted its neighbours.
  const auto* after = static_cast<const uint8_t*>(vb.buffer.storage()->data());
  for (size_t i = 0; i < vb.before.size(); ++i) {
    if (vb.in_view[i] || after[i] == vb.before[i]) continue;
    const int64_t elem = dtype_bits(op.dtype) / 8;
    return Verdict::fail(VerdictKind::mismatch, op.name,
                         "wrote outside its view: " + where(spec) + ": buffer byte " + std::to_string(i) +
                             " (element " + std::to_string(static_cast<int64_t>(i) / elem) + ", view offset " +
                             std::to_string(vb.view.offset()) + ") changed " + hex(vb.before[i]) + " -> " +
                             hex(after[i]));
  }
  if (!refusal.empty()) {
    Verdict v = Verdict::pass();
    v.detail = "refused: " + refusal;
    return v;
  }

  const size_t n = std::min(got.size(), expected.size());
  for (size_t i = 0; i < n; ++i) {
    if (got[i] == expected[i]) continue;
    return Verdict::fail(VerdictKind::mismatch, op.name,
                         where(spec) + ": first differing byte " + std::to_string(i) + " of " +
                             std::to_string(expected.size()) + " (view " + hex(got[i]) + ", contiguous " +
                             hex(expected[i]) + ")");
  }
  if (got.size() != expected.size()) {
    return Verdict::fail(VerdictKind::mismatch, op.name,
                         where(spec) + ": " + std::to_string(got.size()) + " output bytes on the view, " +
                             std::to_string(expected.size()) + " on the contiguous copy");
  }
  return Verdict::pass();
}

Verdict check_view_case(const ViewSpec& spec) { return check_view_case(find_op(spec.op), spec); }

rc::Gen<ViewSpec> gen_view_spec() {
  // 0, 1 (the blind spot), 2, odd sizes 3..33, and the CUDA-graph batch buckets; each class shrinks
  // towards its smallest member.
  const auto gen_tokens = rc::gen::weightedOneOf<int64_t>({
      {3, shrinking_element<int64_t>({0, 1, 2})},
      {2, rc::gen::map(rc::gen::inRange<int64_t>(1, 17), [](int64_t k) { return 2 * k + 1; })},
      {2, shrinking_element<int64_t>({1, 2, 4, 8, 16, 32, 64})},
  });
  // The op never shrinks (the signature names it); its layout shrinks towards "contiguous".
  return rc::gen::mapcat(rc::gen::elementOf(view_op_names()), [gen_tokens](const std::string& name) {
    const ViewOp& op = find_op(name);
    const int64_t W = op.width;
    return rc::gen::mapcat(shrinking_element(op.layouts), [gen_tokens, name, W](const std::string& layout) {
      rc::Gen<int64_t> gen_pad = rc::gen::just<int64_t>(0);
      if (layout == "row-padded") {
        gen_pad = rc::gen::inRange<int64_t>(1, 17);
      } else if (layout == "column-slice") {
        // Arbitrary prefixes, and the qkv_a shapes: a prefix of one and three times the slice
        // (Pro: q_lora_rank 1536 before the 512-wide kv).
        gen_pad = rc::gen::oneOf(rc::gen::inRange<int64_t>(1, W + 1), shrinking_element<int64_t>({W, 3 * W}));
      } else if (layout == "transposed") {
        gen_pad = rc::gen::inRange<int64_t>(0, 4);
      }
      return rc::gen::map(rc::gen::tuple(gen_tokens, gen_pad, rc::gen::arbitrary<uint64_t>()),
                          [name, layout](const std::tuple<int64_t, int64_t, uint64_t>& t) {
                            return ViewSpec{name, std::get<0>(t), layout, std::get<1>(t), std::get<2>(t)};
                          });
    });
  });
}

std::string describe(const ViewSpec& spec) {
  std::ostringstream os;
  os << spec.op << " " << spec.layout << " T=" << spec.tokens << " pad=" << spec.pad << " seed=" << spec.seed;
  return os.str();
}

void showValue(const ViewSpec& spec, std::ostream& os) { os << describe(spec); }

}  // namespace dsv4::props
