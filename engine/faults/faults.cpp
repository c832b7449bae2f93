#include "engine/faults/faults.h"

#include "engine/core/error.h"

namespace dsv4::faults {

namespace detail {
std::atomic<uint32_t> g_enabled{0};
}

const std::array<FaultInfo, kFaultCount>& registry() {
  static const std::array<FaultInfo, kFaultCount> table = {{
      {Fault::kv_slice_noncontiguous, "kv-slice-noncontiguous",
       "engine/model/model_runner.cpp ModelRunner::issue_attention (prefill CP)",
       "the CP path hands the strided qkv_a[:, q_lora_rank:] slice straight to the contiguous-only "
       "in-place norm+RoPE instead of a contiguous copy",
       "sglang PR 25396 (_compute_kv_bf16 under NSA prefill CP)", 2},
      {Fault::lazy_upgrade_on_alt_stream, "lazy-upgrade-on-alt-stream",
       "engine/model/model_runner.cpp ModelRunner::upgrade_on_first_use",
       "the batch metadata is upgraded lazily by its first consumer, on that consumer's alt stream, "
       "and the other alt streams read it with no event",
       "sglang PR 25729 / issue 25662 (garbage output at PP >= 4)"},
      {Fault::indexer_schedule_layout_mismatch, "indexer-schedule-layout-mismatch",
       "engine/model/model_runner.cpp ModelRunner::prepare_metadata",
       "the indexer's persistent-kernel schedule is built from (bs, next_n) context lengths while the "
       "kernel runs the (N_total, 1) layout",
       "sglang PR 24635 / issue 24571 (MTP hang in paged MQA logits)"},
      {Fault::frozen_metadata_not_refreshed, "frozen-metadata-not-refreshed",
       "engine/model/model_runner.cpp ModelRunner::prepare_metadata (graph replay)",
       "a graph replay refreshes the indexer schedule through the frozen metadata object, which "
       "refuses, and the error is swallowed: the captured schedule stays",
       "sglang PR 24635 (stale schedule under CUDA-graph replay, swallowed FrozenInstanceError)"},
      {Fault::draft_extend_v2_not_planned, "draft-extend-v2-not-planned",
       "engine/model/model_runner.cpp ModelRunner::plan_draft_extend",
       "DRAFT_EXTEND_V2 skips the MTP block's metadata planning, so the draft attends with the "
       "previous step's positions and window",
       "sglang PR 24635 (is_draft_extend() without include_v2)"},
      {Fault::swa_page_size_default_zero, "swa-page-size-default-zero",
       "engine/model/model_runner.cpp ModelRunner::ModelRunner (compress-state pools)",
       "the core compressor's state pool is built without the SWA page size and takes the default 0",
       "sglang PR 25898 (CompressStatePool swa_page_size = 0, division by zero, OOB write)"},
      {Fault::fp8_round_half_up, "fp8-round-half-up", "engine/core/formats.h detail::round_magnitude",
       "the software FP8 e4m3 conversion rounds ties away from zero instead of to even",
       "sglang PR 25898 (cvt_float_to_fp8_e4m3 on ROCm)"},
      {Fault::quant_scale_scalar, "quant-scale-scalar",
       "engine/model/model_runner.cpp project() (w8a8-int8 linears)",
       "the int8 path passes a one-element scale where the optional per-channel weight scale belongs",
       "sglang PR 21367 (float passed for Optional[Tensor] w_scale)"},
      {Fault::norm_rope_contiguity_unchecked, "norm-rope-contiguity-unchecked",
       "kernels/host/norm_rope.cpp fused_norm_rope_inplace",
       "the contiguous-only in-place norm+RoPE loses its contiguity check; the kernel still reads and "
       "writes dense rows, so a strided view is silently misread",
       "sglang PR 25396 (fused_norm_rope.cuh hard-codes the row stride; only its TensorMatcher refused the slice)"},
  }};
  return table;
}

const FaultInfo& info(Fault fault) { return registry()[static_cast<size_t>(fault)]; }

std::optional<Fault> find(std::string_view name) {
  for (const FaultInfo& f : registry()) {
    if (name == f.name) return f.id;
  }
  return std::nullopt;
}

Fault parse(const std::string& name, const std::string& source, const std::string& field) {
  if (auto f = find(name)) return *f;
  std::string known;
  for (const FaultInfo& f : registry()) known += (known.empty() ? "" : ", ") + std::string(f.name);
  throw InputError(source, field, "unknown fault '" + name + "' (registered: " + known + ")");
}

std::vector<Fault> enabled_faults() {
  std::vector<Fault> out;
  for (const FaultInfo& f : registry()) {
    if (enabled(f.id)) out.push_back(f.id);
  }
  return out;
}

void set_enabled(const std::vector<Fault>& faults) {
  uint32_t bits = 0;
  for (Fault f : faults) bits |= 1u << static_cast<uint32_t>(f);
  detail::g_enabled.store(bits, std::memory_order_relaxed);
}

ScopedFaults::ScopedFaults(const std::vector<Fault>& faults) : saved_(detail::g_enabled.load()) {
  set_enabled(faults);
}

ScopedFaults::~ScopedFaults() { detail::g_enabled.store(saved_); }

}  // namespace dsv4::faults
