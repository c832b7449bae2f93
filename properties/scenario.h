// The Scenario: one plain value that describes a case of a property completely (docs/properties.md).
// Generators produce it, the runner executes it, `check` writes it to the corpus; it holds the
// generated values themselves (prompt token ids, partitions, schedules), never only an RNG seed.
//
// A scenario belongs to one suite. Engine suites fill `engine` (model, requests, runtime, schedule);
// the op-level suites fill their own section: `view` (strided-input), `translation`
// (index-translation), `conversion` (fp8-conversion), `schedule_case` (indexer-schedule);
// invalid-config fills `engine` and names the field it made invalid in `expect_field`. `faults` lists
// the injected faults (empty for a clean run).
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace dsv4::props {

struct RequestSpec {
  int64_t id = 0;
  std::vector<int32_t> prompt;  // token ids
  int64_t arrival_step = 0;     // the scheduler step at which it arrives
  int64_t max_new_tokens = 1;   // the prefill's token plus the decode steps
};

// An engine run: the model, the requests, the runtime and the stream schedule.
struct EngineSpec {
  std::string config = "micro";  // a preset name
  uint64_t weight_seed = 1;      // synthetic weights
  std::string quant = "fp8";     // fp8 | w8a8-int8
  std::vector<RequestSpec> requests;
  std::string backend = "sim";
  // Runtime options (engine/config/runtime_options.h), as the user would set them.
  int64_t page_size = 256;
  int64_t swa_page_size = 256;
  int64_t c4_ring_size = 8;
  int64_t c128_ring_size = 0;
  std::vector<int64_t> batch_buckets = {1, 2, 4, 8};
  int64_t max_running_requests = 8;
  int64_t chunked_prefill_tokens = 512;
  // Engine options.
  std::vector<int64_t> pp_partition;  // empty: one stage
  int64_t cp = 1;
  bool graphs = false;
  bool multi_stream = true;
  bool mtp = false;           // speculative decoding with the MTP block's drafts
  int64_t draft_tokens = 0;   // with mtp: drafts per step (the engine runs 1)
  int64_t indexer_sms = 4;
  // The sim stream interleaving: in-order, random:SEED, pct:SEED:DEPTH, delay:STREAM:OPS.
  std::string schedule = "in-order";
};

// strided-input: one kernel entry point fed one input layout.
struct ViewSpec {
  std::string op;        // an entry point of view_ops()
  int64_t tokens = 2;    // T, the leading dimension (0, 1, 2, odd sizes, bucket sizes)
  std::string layout = "contiguous";  // contiguous | row-padded | column-slice | transposed
  int64_t pad = 0;       // extra elements per row (row-padded) or columns before the slice (column-slice)
  uint64_t seed = 1;     // the input values
};

// index-translation: a compress-state pool's geometry and the SWA locations it translates.
struct TranslationSpec {
  int64_t swa_page_size = 256;
  int64_t ring_size = 8;
  int64_t ratio = 4;
  int64_t swa_page_count = 4;
  std::vector<int64_t> swa_locs;
};

// fp8-conversion: f32 inputs (bit patterns) through one portable encoder.
struct ConversionSpec {
  std::string format = "e4m3fn";  // e4m3fn | e4m3fnuz | e5m2 | e2m1 | bf16 | f16
  std::vector<uint32_t> inputs;
};

// indexer-schedule: context lengths of the indexer's persistent kernel and how its schedule is built.
struct ScheduleSpec {
  std::vector<int32_t> context_lens;  // rows * next_n values, row-major
  int64_t rows = 1;
  int64_t next_n = 1;                 // 1..4
  std::string layout = "per-token";   // "per-token" (N_total, 1) or "native" (B, next_n): the layout the schedule is built from and the kernel runs
  int64_t block_kv = 64;
  int64_t num_sms = 4;
};

struct Scenario {
  std::string suite;
  std::optional<EngineSpec> engine;
  std::string expect_field;  // invalid-config: the field the scenario made invalid ("" = valid)
  std::optional<ViewSpec> view;
  std::optional<TranslationSpec> translation;
  std::optional<ConversionSpec> conversion;
  std::optional<ScheduleSpec> schedule_case;
  std::vector<std::string> faults;
};

}  // namespace dsv4::props
