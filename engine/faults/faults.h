// The fault registry: named bugs, each re-introducing one real bug class at the place where it
// lived (docs/faults.md). Every fault is compiled into every build and is off unless a run enables
// it; a fault site costs one relaxed atomic load when every fault is off. A fault is the evidence
// that a property has teeth: `dsv4h mutants` enables each one in turn and reports which property
// caught it.
#pragma once

#include <array>
#include <atomic>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace dsv4::faults {

enum class Fault : uint32_t {
  kv_slice_noncontiguous,
  lazy_upgrade_on_alt_stream,
  indexer_schedule_layout_mismatch,
  frozen_metadata_not_refreshed,
  draft_extend_v2_not_planned,
  swa_page_size_default_zero,
  fp8_round_half_up,
  quant_scale_scalar,
  norm_rope_contiguity_unchecked,
};
inline constexpr size_t kFaultCount = 9;

struct FaultInfo {
  Fault id;
  const char* name;     // the registry name, e.g. "kv-slice-noncontiguous"
  const char* where;    // the fault site (file and function)
  const char* summary;  // what the bug does, in one sentence
  const char* origin;   // the real bug it re-introduces
  int ranks = 1;        // engine ranks (one device each) a run needs to reach the site: 2 for prefill CP
};

// Every registered fault, in enum order.
const std::array<FaultInfo, kFaultCount>& registry();
const FaultInfo& info(Fault fault);
std::optional<Fault> find(std::string_view name);
// The fault called `name`; InputError naming `source` and `field` (with the list of names) otherwise.
Fault parse(const std::string& name, const std::string& source, const std::string& field);

namespace detail {
extern std::atomic<uint32_t> g_enabled;
}

// Whether `fault` is on in this process. Device code never sees a fault (its sites are host code).
inline bool enabled(Fault fault) {
#if defined(__CUDA_ARCH__) || defined(__HIP_DEVICE_COMPILE__)
  (void)fault;
  return false;
#else
  const uint32_t bits = detail::g_enabled.load(std::memory_order_relaxed);
  return bits != 0 && ((bits >> static_cast<uint32_t>(fault)) & 1u) != 0;
#endif
}

// The enabled faults, in enum order.
std::vector<Fault> enabled_faults();
void set_enabled(const std::vector<Fault>& faults);

// Enables `faults` for its lifetime and restores the previous set afterwards.
class ScopedFaults {
 public:
  explicit ScopedFaults(const std::vector<Fault>& faults);
  ~ScopedFaults();
  ScopedFaults(const ScopedFaults&) = delete;
  ScopedFaults& operator=(const ScopedFaults&) = delete;

 private:
  uint32_t saved_;
};

}  // namespace dsv4::faults
