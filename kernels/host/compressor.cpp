#include "kernels/compressor.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "engine/core/contract.h"
#include "engine/core/error.h"
#include "engine/core/formats.h"
#include "kernels/device.h"
#include "kernels/host/host_common.h"

namespace dsv4::kernels {

using namespace host;  // the shared helpers of kernels/host/host_common.h

namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

std::string num(int64_t v) { return std::to_string(v); }

int64_t coff_of(int64_t ratio) { return ratio == 4 ? 2 : 1; }

void check_ratio(const char* op, int64_t ratio) {
  if (ratio < 1) throw ContractError(op, "ratio", "must be >= 1, got " + num(ratio));
}

void check_layout(const char* op, const CompressStateLayout& l, const Tensor& state) {
  if (l.coff != 1 && l.coff != 2) throw ContractError(op, "layout", "coff must be 1 or 2, got " + num(l.coff));
  if (l.dims < 1) throw ContractError(op, "layout", "dims must be >= 1, got " + num(l.dims));
  if (state.size(1) != l.row_bytes) {
    throw ContractError(op, "state", "row width " + num(state.size(1)) + " != layout.row_bytes " + num(l.row_bytes));
  }
  for (int64_t p = 0; p < l.coff; ++p) {
    // Every part must lie inside its row, 4-byte aligned, so a float read never straddles rows.
    for (const int64_t off : {l.kv_offset_bytes[p], l.score_offset_bytes[p]}) {
      if (off < 0) throw ContractError(op, "layout", "negative part offset " + num(off));
      if (off % 4 != 0) throw ContractError(op, "layout", "part offset " + num(off) + " is not float aligned");
      if (off + 4 * l.dims > l.row_bytes) {
        throw ContractError(op, "layout", "part at byte " + num(off) + " runs past the row of " + num(l.row_bytes));
      }
    }
  }
}

// The tensor rules of each kernel; sizes that depend on the layout are checked by hand.
const Contract& write_contract() {
  static const Contract c = Contract("compressor_write_state")
                                .arg("kv").dtype(DType::f32).rank(2).contiguous()
                                .arg("score").dtype(DType::f32).rank(2).contiguous()
                                .same_size(0, "kv", 0).same_size(1, "kv", 1)
                                .arg("state").dtype(DType::u8).rank(2).contiguous()
                                .arg("rows").dtype(DType::i64).rank(1).contiguous().same_size(0, "kv", 0)
                                .values_index_into(-1, "state", 0);
  return c;
}

const Contract& pool_contract() {
  static const Contract c = Contract("compressor_pool")
                                .arg("kv").dtype(DType::f32).rank(2).contiguous()
                                .arg("score").dtype(DType::f32).rank(2).contiguous()
                                .same_size(0, "kv", 0).same_size(1, "kv", 1)
                                .arg("state").dtype(DType::u8).rank(2).contiguous()
                                .arg("norm_weight").dtype(DType::f32).rank(1).contiguous()
                                .arg("rope_freqs").dtype(DType::f32).rank(1).contiguous()
                                .arg("out").dtype(DType::f32).rank(2).contiguous().same_size(1, "norm_weight", 0);
  return c;
}

float load_f32(const uint8_t* p) {
  float v;
  std::memcpy(&v, p, 4);
  return v;
}

void act_span(bool bf16, float* x, int64_t n) {
  if (!bf16) return;
  for (int64_t i = 0; i < n; ++i) x[i] = round_bf16(x[i]);
}

// The device-agnostic rules of the pool: tensor dtypes and shapes, the layout, the post-processing.
void check_pool_tensors(const char* op, const Tensor& kv, const Tensor& score, const Tensor& state,
                        const CompressStateLayout& layout, const Tensor& norm_weight, const Tensor& rope_freqs,
                        const CompressPostprocess& post, const Tensor& out) {
  pool_contract().check({{"kv", &kv},
                         {"score", &score},
                         {"state", &state},
                         {"norm_weight", &norm_weight},
                         {"rope_freqs", &rope_freqs},
                         {"out", &out}});
  check_layout(op, layout, state);
  const int64_t hd = layout.dims, width = layout.coff * hd;
  const int64_t rd = 2 * rope_freqs.size(0);
  if (kv.size(1) != width) throw ContractError(op, "kv", "width " + num(kv.size(1)) + " != coff * dims " + num(width));
  if (norm_weight.size(0) != hd) throw ContractError(op, "norm_weight", "size " + num(norm_weight.size(0)) + " != dims " + num(hd));
  if (rd < 2 || rd >= hd) throw ContractError(op, "rope_freqs", "rope dims " + num(rd) + " must lie in [2, dims)");
  if (post.rotate && (hd & (hd - 1)) != 0) throw ContractError(op, "post", "the Hadamard rotation needs power-of-two dims");
  if (post.quant == CompressQuant::fp8_nope || post.quant == CompressQuant::fp4) {
    if (post.quant_block < 1) throw ContractError(op, "post", "quant_block must be >= 1");
  }
  if (post.quant == CompressQuant::fp8_nope && (hd - rd) % post.quant_block != 0) {
    throw ContractError(op, "post", "nope dims " + num(hd - rd) + " must be whole FP8 blocks of " + num(post.quant_block));
  }
}

// The encoded plan buffer: i64 [words] contiguous with at least the header; ratio >= 1.
void check_plan_tensor(const char* op, const Tensor& plan, int64_t ratio) {
  Contract(op).arg("plan").dtype(DType::i64).rank(1).contiguous().check({{"plan", &plan}});
  if (plan.numel() < 3) throw ContractError(op, "plan", "holds " + num(plan.numel()) + " words, fewer than the header's 3");
  check_ratio(op, ratio);
}

// Host plans only: the header's counts, and the buffer long enough for them. Returns B.
int64_t check_plan_words(const char* op, const Tensor& plan, int64_t ratio) {
  const int64_t* w = plan.data<int64_t>();
  const int64_t T = w[0], B = w[1], S = w[2], words = plan.numel();
  if (T < 0 || B < 0) throw ContractError(op, "plan", "header has T " + num(T) + ", B " + num(B));
  if (S != coff_of(ratio) * ratio) {
    throw ContractError(op, "plan", "header has S " + num(S) + ", ratio " + num(ratio) + " needs " + num(coff_of(ratio) * ratio));
  }
  // Each count alone first, so that the product cannot overflow.
  if (T > words || B > words || compress_plan_words(T, B, S) > words) {
    throw ContractError(op, "plan", "T " + num(T) + ", B " + num(B) + ", S " + num(S) + " need more than its " + num(words) +
                                        " words");
  }
  return B;
}

void require_coff(const char* op, int64_t ratio, const CompressStateLayout& layout) {
  if (layout.coff != coff_of(ratio)) {
    throw ContractError(op, "layout", "coff " + num(layout.coff) + " != " + num(coff_of(ratio)) + " of ratio " + num(ratio));
  }
}

}  // namespace

int64_t compress_history_start(int64_t start_pos, int64_t ratio) {
  check_ratio("compress_history_start", ratio);
  if (start_pos < 0) throw ContractError("compress_history_start", "start_pos", "must be >= 0, got " + num(start_pos));
  return std::max<int64_t>(0, (start_pos / ratio - (coff_of(ratio) - 1)) * ratio);
}

CompressPlan build_compress_plan(std::span<const CompressRequestBatch> requests, int64_t ratio,
                                 int64_t state_row_count, bool store_every_row) {
  const char* op = "build_compress_plan";
  check_ratio(op, ratio);
  if (state_row_count < 1) throw ContractError(op, "state_row_count", "must be >= 1, got " + num(state_row_count));
  CompressPlan plan;
  plan.ratio = ratio;
  plan.coff = coff_of(ratio);
  const int64_t r = ratio;

  int64_t input_first = 0;  // the request's first input row
  for (size_t q = 0; q < requests.size(); ++q) {
    const CompressRequestBatch& req = requests[q];
    const std::string who = "requests[" + std::to_string(q) + "]";
    if (req.start_pos < 0) throw ContractError(op, who + ".start_pos", "must be >= 0, got " + num(req.start_pos));
    if (req.num_tokens < 0) throw ContractError(op, who + ".num_tokens", "must be >= 0, got " + num(req.num_tokens));
    const int64_t start = req.start_pos, end = req.start_pos + req.num_tokens;
    const int64_t hist = compress_history_start(start, r);
    if (static_cast<int64_t>(req.state_rows.size()) < end - hist) {
      throw ContractError(op, who + ".state_rows",
                          "covers " + std::to_string(req.state_rows.size()) + " positions from " + num(hist) +
                              ", needs " + num(end - hist) + " (up to position " + num(end - 1) + ")");
    }
    auto state_row = [&](int64_t pos) {
      const int64_t row = req.state_rows[static_cast<size_t>(pos - hist)];
      if (row < 0 || row >= state_row_count) {
        throw ContractError(op, who + ".state_rows",
                            "position " + num(pos) + " maps to row " + num(row) + ", outside [0, " +
                                num(state_row_count) + ")");
      }
      return row;
    };

    // Only tokens a later batch reads are stored: the unfinished block, and for c4 also the last
    // complete one (its A halves). Everything else is pooled straight from the input, unless the
    // batch's tail may be rejected (speculative verify), when the next batch re-pools from the state.
    // Under store_every_row the last row of a non-overlapping block is still skipped: the batch
    // that holds that position pools the block, so no later batch reads the row (a rejected one is
    // computed again, from the input), and a decode batch does not store it either.
    const int64_t keep_from = store_every_row ? start : std::max<int64_t>(0, (end / r - (plan.coff - 1)) * r);
    for (int64_t pos = start; pos < end; ++pos) {
      const bool block_end = plan.coff == 1 && pos % r == r - 1;
      plan.positions.push_back(pos);
      plan.write_rows.push_back(pos >= keep_from && !(store_every_row && block_end) ? state_row(pos) : -1);
    }

    // Blocks completed in this batch: their last position b*r + r - 1 lies in [start, end).
    for (int64_t b = start / r; b < end / r; ++b) {
      CompressPlanBlock blk{static_cast<int64_t>(q), b, 0};
      auto add = [&](int64_t pos) {
        CompressSource s;
        if (pos < 0) {
          s = {CompressSource::Kind::none, -1};  // c4 block 0: no previous block to overlap
        } else if (pos < start) {
          s = {CompressSource::Kind::state, state_row(pos)};
        } else {
          s = {CompressSource::Kind::input, input_first + pos - start};
        }
        if (s.kind != CompressSource::Kind::input) ++blk.buffer_len;
        plan.sources.push_back(s);
      };
      if (plan.coff == 2) {
        for (int64_t slot = 0; slot < r; ++slot) add((b - 1) * r + slot);
      }
      for (int64_t slot = 0; slot < r; ++slot) add(b * r + slot);
      plan.blocks.push_back(blk);
    }
    input_first += req.num_tokens;
  }
  check_compress_plan(plan, input_first, state_row_count);
  return plan;
}

void check_compress_plan(const CompressPlan& plan, int64_t num_tokens, int64_t state_row_count) {
  const char* op = "compress_plan";
  check_ratio(op, plan.ratio);
  const int64_t r = plan.ratio, S = plan.sources_per_block();
  if (plan.coff != coff_of(r)) {
    throw ContractError(op, "coff", "must be " + num(coff_of(r)) + " for ratio " + num(r) + ", got " + num(plan.coff));
  }
  if (plan.num_tokens() != num_tokens) {
    throw ContractError(op, "positions", "has " + num(plan.num_tokens()) + " tokens, the input " + num(num_tokens));
  }
  if (static_cast<int64_t>(plan.write_rows.size()) != num_tokens) {
    throw ContractError(op, "write_rows", "has " + std::to_string(plan.write_rows.size()) + " rows, want " + num(num_tokens));
  }
  if (static_cast<int64_t>(plan.sources.size()) != static_cast<int64_t>(plan.blocks.size()) * S) {
    throw ContractError(op, "sources", "has " + std::to_string(plan.sources.size()) + " entries, want blocks * " + num(S));
  }
  for (int64_t t = 0; t < num_tokens; ++t) {
    const int64_t pos = plan.positions[static_cast<size_t>(t)];
    const int64_t row = plan.write_rows[static_cast<size_t>(t)];
    if (pos < 0) throw ContractError(op, "positions", "token " + num(t) + " has position " + num(pos));
    if (row < -1 || row >= state_row_count) {
      throw ContractError(op, "write_rows",
                          "token " + num(t) + " writes row " + num(row) + ", outside [-1, " + num(state_row_count) + ")");
    }
  }
  for (size_t k = 0; k < plan.blocks.size(); ++k) {
    const CompressPlanBlock& blk = plan.blocks[k];
    const std::string where = "block " + std::to_string(k);
    if (blk.block < 0) throw ContractError(op, "blocks", where + " has index " + num(blk.block));
    if (blk.buffer_len < 0 || blk.buffer_len > S) {
      throw ContractError(op, "blocks", where + " has buffer_len " + num(blk.buffer_len) + ", outside [0, " + num(S) + "]");
    }
    for (int64_t i = 0; i < S; ++i) {
      const CompressSource& s = plan.sources[k * static_cast<size_t>(S) + static_cast<size_t>(i)];
      // The pooled position of slot i: c4 reaches one block back for its A halves.
      const int64_t pos = (blk.block - (plan.coff - 1)) * r + i;
      const bool buffered = i < blk.buffer_len;
      switch (s.kind) {
        case CompressSource::Kind::none:
          if (pos >= 0) throw ContractError(op, "sources", where + " slot " + num(i) + " is empty but position " + num(pos) + " exists");
          if (!buffered) throw ContractError(op, "sources", where + " slot " + num(i) + " is empty past buffer_len");
          break;
        case CompressSource::Kind::state:
          if (pos < 0) throw ContractError(op, "sources", where + " slot " + num(i) + " reads a state row before position 0");
          if (!buffered) throw ContractError(op, "sources", where + " slot " + num(i) + " reads the state past buffer_len");
          if (s.index < 0 || s.index >= state_row_count) {
            throw ContractError(op, "sources", where + " slot " + num(i) + " reads state row " + num(s.index) +
                                                   ", outside [0, " + num(state_row_count) + ")");
          }
          break;
        case CompressSource::Kind::input:
          if (buffered) throw ContractError(op, "sources", where + " slot " + num(i) + " reads the input within buffer_len");
          if (s.index < 0 || s.index >= num_tokens) {
            throw ContractError(op, "sources", where + " slot " + num(i) + " reads input row " + num(s.index) +
                                                   ", outside [0, " + num(num_tokens) + ")");
          }
          if (plan.positions[static_cast<size_t>(s.index)] != pos) {
            throw ContractError(op, "sources", where + " slot " + num(i) + " wants position " + num(pos) +
                                                   ", input row " + num(s.index) + " holds " +
                                                   num(plan.positions[static_cast<size_t>(s.index)]));
          }
          break;
        default:
          throw ContractError(op, "sources", where + " slot " + num(i) + " has an unknown kind");
      }
    }
  }
}

void compressor_write_state_host(const Tensor& kv, const Tensor& score, const Tensor& rows, Tensor& state,
                                 const CompressStateLayout& layout) {
  const char* op = "compressor_write_state";
  write_contract().check({{"kv", &kv}, {"score", &score}, {"state", &state}, {"rows", &rows}});
  check_layout(op, layout, state);
  for (const auto& [name, t] : {std::pair<const char*, const Tensor*>{"kv", &kv}, {"score", &score}, {"rows", &rows},
                                {"state", &state}}) {
    require_host(op, name, *t);
  }
  const int64_t hd = layout.dims, width = layout.coff * hd;
  if (kv.size(1) != width) throw ContractError(op, "kv", "width " + num(kv.size(1)) + " != coff * dims " + num(width));

  const float* kv_p = kv.data<float>();
  const float* sc_p = score.data<float>();
  const int64_t* row_p = rows.data<int64_t>();
  uint8_t* base = state.data<uint8_t>();
  for (int64_t t = 0; t < kv.size(0); ++t) {
    if (row_p[t] < 0) continue;  // consumed within its own batch
    uint8_t* row = base + row_p[t] * layout.row_bytes;
    // Full width for c4: the A half is read by the next block's overlap, the B half by this block.
    for (int64_t p = 0; p < layout.coff; ++p) {
      std::memcpy(row + layout.kv_offset_bytes[p], kv_p + t * width + p * hd, static_cast<size_t>(4 * hd));
      std::memcpy(row + layout.score_offset_bytes[p], sc_p + t * width + p * hd, static_cast<size_t>(4 * hd));
    }
  }
}

void compressor_pool_host(const CompressPlan& plan, const Tensor& kv, const Tensor& score, const Tensor& state,
                          const CompressStateLayout& layout, const Tensor& norm_weight, const Tensor& rope_freqs,
                          const CompressPostprocess& post, Tensor& out) {
  const char* op = "compressor_pool";
  check_pool_tensors(op, kv, score, state, layout, norm_weight, rope_freqs, post, out);
  for (const auto& [name, t] : {std::pair<const char*, const Tensor*>{"kv", &kv}, {"score", &score}, {"state", &state},
                                {"norm_weight", &norm_weight}, {"rope_freqs", &rope_freqs}, {"out", &out}}) {
    require_host(op, name, *t);
  }
  check_compress_plan(plan, kv.size(0), state.size(0));
  const int64_t r = plan.ratio, S = plan.sources_per_block(), hd = layout.dims, width = layout.coff * hd;
  const int64_t rd = 2 * rope_freqs.size(0);
  if (layout.coff != plan.coff) throw ContractError(op, "layout", "coff " + num(layout.coff) + " != the plan's " + num(plan.coff));
  if (out.size(0) != static_cast<int64_t>(plan.blocks.size())) {
    throw ContractError(op, "out", "has " + num(out.size(0)) + " rows for " + std::to_string(plan.blocks.size()) + " blocks");
  }

  const float* kv_p = kv.data<float>();
  const float* sc_p = score.data<float>();
  const uint8_t* st_p = state.data<uint8_t>();
  const float* w = norm_weight.data<float>();
  const float* freqs = rope_freqs.data<float>();
  auto act = [&](float x) { return post.bf16_act ? round_bf16(x) : x; };

  // Per source: where channel 0 of its kv and score live (bytes for the state, floats for the input).
  std::vector<const uint8_t*> st_kv(static_cast<size_t>(S)), st_sc(static_cast<size_t>(S));
  std::vector<const float*> in_kv(static_cast<size_t>(S)), in_sc(static_cast<size_t>(S));
  std::vector<float> s(static_cast<size_t>(S)), v(static_cast<size_t>(S));
  for (size_t k = 0; k < plan.blocks.size(); ++k) {
    const int64_t b = plan.blocks[k].block;
    for (int64_t i = 0; i < S; ++i) {
      const auto u = static_cast<size_t>(i);
      const CompressSource& src = plan.sources[k * static_cast<size_t>(S) + u];
      const int64_t part = (plan.coff == 2 && i >= r) ? 1 : 0;  // c4: A halves first, then B halves
      st_kv[u] = st_sc[u] = nullptr;
      in_kv[u] = in_sc[u] = nullptr;
      if (src.kind == CompressSource::Kind::state) {
        st_kv[u] = st_p + src.index * layout.row_bytes + layout.kv_offset_bytes[part];
        st_sc[u] = st_p + src.index * layout.row_bytes + layout.score_offset_bytes[part];
      } else if (src.kind == CompressSource::Kind::input) {
        in_kv[u] = kv_p + src.index * width + part * hd;
        in_sc[u] = sc_p + src.index * width + part * hd;
      }
    }

    float* o = out.data<float>() + static_cast<int64_t>(k) * hd;
    // The reference's exact arithmetic, per channel in source order: fp32 exp, double sums.
    for (int64_t j = 0; j < hd; ++j) {
      for (int64_t i = 0; i < S; ++i) {
        const auto u = static_cast<size_t>(i);
        if (st_kv[u] != nullptr) {
          s[u] = load_f32(st_sc[u] + 4 * j);
          v[u] = load_f32(st_kv[u] + 4 * j);
        } else if (in_kv[u] != nullptr) {
          s[u] = in_sc[u][j];
          v[u] = in_kv[u][j];
        } else {
          s[u] = kNegInf;  // the clean row: weight exactly 0
          v[u] = 0.0f;
        }
      }
      const float m = *std::max_element(s.begin(), s.end());
      DSV4_ASSERT(std::isfinite(m), "compressor_pool: a pooled channel has no finite score");
      double denom = 0.0;
      for (int64_t i = 0; i < S; ++i) denom += static_cast<double>(std::exp(s[static_cast<size_t>(i)] - m));
      const float sum = static_cast<float>(denom);
      double c = 0.0;
      for (int64_t i = 0; i < S; ++i) {
        const float p = std::exp(s[static_cast<size_t>(i)] - m) / sum;
        c += static_cast<double>(p * v[static_cast<size_t>(i)]);
      }
      o[j] = act(static_cast<float>(c));
    }

    // RMSNorm with weight (double sum of squares, as the reference), output rounded.
    double sum_sq = 0.0;
    for (int64_t i = 0; i < hd; ++i) sum_sq += static_cast<double>(o[i]) * o[i];
    const float inv = static_cast<float>(1.0 / std::sqrt(sum_sq / static_cast<double>(hd) + post.norm_eps));
    for (int64_t i = 0; i < hd; ++i) o[i] = act(o[i] * inv * w[i]);

    // RoPE on the last rd dims at the block's first position (also for the overlapping c4).
    float* rope = o + hd - rd;
    for (int64_t j = 0; j < rd / 2; ++j) {
      const float angle = static_cast<float>(b * r) * freqs[j];
      const float cs = std::cos(angle), sn = std::sin(angle);
      const float a = rope[2 * j], bb = rope[2 * j + 1];
      rope[2 * j] = a * cs - bb * sn;
      rope[2 * j + 1] = a * sn + bb * cs;
    }
    act_span(post.bf16_act, rope, rd);

    if (post.rotate) {
      hadamard_inplace(o, hd);
      act_span(post.bf16_act, o, hd);
    }
    switch (post.quant) {
      case CompressQuant::none:
        break;
      case CompressQuant::fp8_nope:  // rope dims stay bf16
        fp8_quant_dequant_blocks(o, hd - rd, post.quant_block, post.fp8_rounding);
        act_span(post.bf16_act, o, hd - rd);
        break;
      case CompressQuant::fp4:
        fp4_quant_dequant_blocks(o, hd, post.quant_block);
        act_span(post.bf16_act, o, hd);
        break;
      case CompressQuant::fp8_vector:
        fp8_quant_dequant_blocks(o, hd, hd, true);
        act_span(post.bf16_act, o, hd);
        break;
    }
  }
}

// ---- the encoded plan -----------------------------------------------------------------------------

int64_t compress_plan_words(int64_t T, int64_t B, int64_t S) { return 3 + 2 * T + 3 * B + 2 * B * S + B; }

std::vector<int64_t> encode_compress_plan(const CompressPlan& plan, std::span<const int64_t> dest) {
  const int64_t T = plan.num_tokens(), B = static_cast<int64_t>(plan.blocks.size()), S = plan.sources_per_block();
  if (static_cast<int64_t>(dest.size()) != B) {
    throw ContractError("encode_compress_plan", "dest", "has " + std::to_string(dest.size()) + " locations for " + num(B) + " blocks");
  }
  std::vector<int64_t> w;
  w.reserve(static_cast<size_t>(compress_plan_words(T, B, S)));
  w.push_back(T);
  w.push_back(B);
  w.push_back(S);
  w.insert(w.end(), plan.positions.begin(), plan.positions.end());
  w.insert(w.end(), plan.write_rows.begin(), plan.write_rows.end());
  for (const CompressPlanBlock& b : plan.blocks) {
    w.push_back(b.request);
    w.push_back(b.block);
    w.push_back(b.buffer_len);
  }
  for (const CompressSource& src : plan.sources) {
    w.push_back(static_cast<int64_t>(src.kind));
    w.push_back(src.index);
  }
  w.insert(w.end(), dest.begin(), dest.end());
  return w;
}

CompressPlan decode_compress_plan(const int64_t* w, int64_t ratio, std::vector<int64_t>& dest) {
  const char* op = "decode_compress_plan";
  check_ratio(op, ratio);
  CompressPlan plan;
  plan.ratio = ratio;
  plan.coff = coff_of(ratio);
  const int64_t T = w[0], B = w[1], S = w[2];
  if (T < 0 || B < 0) throw ContractError(op, "words", "header has T " + num(T) + ", B " + num(B));
  if (S != plan.sources_per_block()) {
    throw ContractError(op, "words", "header has S " + num(S) + ", ratio " + num(ratio) + " needs " + num(plan.sources_per_block()));
  }
  const int64_t* p = w + 3;
  plan.positions.assign(p, p + T);
  p += T;
  plan.write_rows.assign(p, p + T);
  p += T;
  plan.blocks.resize(static_cast<size_t>(B));
  for (CompressPlanBlock& b : plan.blocks) {
    b.request = p[0];
    b.block = p[1];
    b.buffer_len = p[2];
    p += 3;
  }
  plan.sources.resize(static_cast<size_t>(B * S));
  for (CompressSource& src : plan.sources) {
    // An unknown kind stays unknown (check_compress_plan refuses it).
    src.kind = static_cast<CompressSource::Kind>(static_cast<uint8_t>(p[0] >= 0 && p[0] <= 2 ? p[0] : 255));
    src.index = p[1];
    p += 2;
  }
  dest.assign(p, p + B);
  return plan;
}

// ---- the dispatching entry points ------------------------------------------------------------------

void compressor_pool(const Tensor& plan, int64_t ratio, const Tensor& kv, const Tensor& score, const Tensor& state,
                     const CompressStateLayout& layout, const Tensor& norm_weight, const Tensor& rope_freqs,
                     const CompressPostprocess& post, Tensor& entries_out) {
  const char* op = "compressor_pool";
  check_plan_tensor(op, plan, ratio);
  check_pool_tensors(op, kv, score, state, layout, norm_weight, rope_freqs, post, entries_out);
  require_coff(op, ratio, layout);
  if (runs_on_gpu(op, {{"plan", &plan},
                       {"kv", &kv},
                       {"score", &score},
                       {"state", &state},
                       {"norm_weight", &norm_weight},
                       {"rope_freqs", &rope_freqs},
                       {"entries_out", &entries_out}})) {
    DSV4_GPU_OR_FAIL(op, cuda::compressor_pool(plan, ratio, kv, score, state, layout, norm_weight, rope_freqs, post, entries_out,
                          current_stream()));
  }
  const int64_t B = check_plan_words(op, plan, ratio);
  if (B > entries_out.size(0)) {
    throw ContractError(op, "entries_out", "has " + num(entries_out.size(0)) + " rows for the plan's " + num(B) + " blocks");
  }
  std::vector<int64_t> dest;
  const CompressPlan p = decode_compress_plan(plan.data<int64_t>(), ratio, dest);
  Tensor out = entries_out.narrow(0, 0, B);
  compressor_pool_host(p, kv, score, state, layout, norm_weight, rope_freqs, post, out);
}

void compressor_write_state(const Tensor& plan, int64_t ratio, const Tensor& kv, const Tensor& score, Tensor& state,
                            const CompressStateLayout& layout) {
  const char* op = "compressor_write_state";
  check_plan_tensor(op, plan, ratio);
  static const Contract c = Contract(op)
                                .arg("kv").dtype(DType::f32).rank(2).contiguous()
                                .arg("score").dtype(DType::f32).rank(2).contiguous()
                                .same_size(0, "kv", 0).same_size(1, "kv", 1)
                                .arg("state").dtype(DType::u8).rank(2).contiguous();
  c.check({{"kv", &kv}, {"score", &score}, {"state", &state}});
  check_layout(op, layout, state);
  require_coff(op, ratio, layout);
  const int64_t width = layout.coff * layout.dims;
  if (kv.size(1) != width) throw ContractError(op, "kv", "width " + num(kv.size(1)) + " != coff * dims " + num(width));
  if (runs_on_gpu(op, {{"plan", &plan}, {"kv", &kv}, {"score", &score}, {"state", &state}})) {
    DSV4_GPU_OR_FAIL(op, cuda::compressor_write_state(plan, ratio, kv, score, state, layout, current_stream()));
  }
  check_plan_words(op, plan, ratio);
  std::vector<int64_t> dest;
  const CompressPlan p = decode_compress_plan(plan.data<int64_t>(), ratio, dest);
  Tensor rows = Tensor::empty({p.num_tokens()}, DType::i64, "write_rows");
  if (p.num_tokens() > 0) std::memcpy(rows.data_ptr(), p.write_rows.data(), p.write_rows.size() * 8);
  compressor_write_state_host(kv, score, rows, state, layout);
}

void compressor_store(const Tensor& plan, int64_t ratio, const Tensor& entries, Tensor& cache,
                      const Model1Layout& model1, int64_t page_size) {
  const char* op = "compressor_store";
  check_plan_tensor(op, plan, ratio);
  static const Contract c = Contract(op)
                                .arg("entries").dtype(DType::f32).rank(2).contiguous()
                                .arg("cache").dtype_in({DType::f32, DType::u8}).contiguous();
  c.check({{"entries", &entries}, {"cache", &cache}});
  const int64_t dims = entries.size(1);
  if (dims < 1) throw ContractError(op, "entries", "needs at least one dim per entry");
  int64_t locations = 0;
  if (cache.dtype() == DType::f32) {
    if (cache.dim() < 1 || cache.size(-1) != dims) {
      throw ContractError(op, "cache", "f32 rows must end in the entries' " + num(dims) + " dims, got " + shape_str(cache.shape()));
    }
    locations = cache.numel() / dims;
  } else {
    if (cache.dim() != 2) throw ContractError(op, "cache", "a MODEL1 cache is [pages, page_bytes], got " + shape_str(cache.shape()));
    if (page_size < 1) throw ContractError(op, "page_size", "must be >= 1, got " + num(page_size));
    model1_layout(op, model1.head_dim, model1.rope_dim, model1.scale_block, "model1");
    if (model1.head_dim != dims) {
      throw ContractError(op, "model1", "head_dim " + num(model1.head_dim) + " != the entries' " + num(dims) + " dims");
    }
    if (cache.size(1) != model1.page_bytes(page_size)) {
      throw ContractError(op, "cache", "pages of " + num(cache.size(1)) + " bytes, MODEL1 needs " + num(model1.page_bytes(page_size)) +
                                           " for " + num(page_size) + " entries");
    }
    locations = cache.size(0) * page_size;
  }
  if (runs_on_gpu(op, {{"plan", &plan}, {"entries", &entries}, {"cache", &cache}})) {
    DSV4_GPU_OR_FAIL(op, cuda::compressor_store(plan, ratio, entries, cache, model1, page_size, current_stream()));
  }
  const int64_t B = check_plan_words(op, plan, ratio);
  if (B > entries.size(0)) {
    throw ContractError(op, "entries", "has " + num(entries.size(0)) + " rows for the plan's " + num(B) + " blocks");
  }
  std::vector<int64_t> dest;
  decode_compress_plan(plan.data<int64_t>(), ratio, dest);
  for (int64_t k = 0; k < B; ++k) {
    const int64_t loc = dest[static_cast<size_t>(k)];
    if (loc < 0 || loc >= locations) {
      throw ContractError(op, "plan", "block " + num(k) + " stores at " + num(loc) + ", outside [0, " + num(locations) + ")");
    }
  }
  const float* e = entries.data<float>();
  for (int64_t k = 0; k < B; ++k) {
    const int64_t loc = dest[static_cast<size_t>(k)];
    if (cache.dtype() == DType::f32) {
      std::memcpy(cache.data<float>() + loc * dims, e + k * dims, static_cast<size_t>(dims) * 4);
    } else {
      model1_pack(model1, page_size, e + k * dims, cache.data<uint8_t>(), loc);
    }
  }
}

}  // namespace dsv4::kernels
