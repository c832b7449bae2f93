// One decode step of the small config on the cuda backend (issue 9's speed part): batch 64, every
// request at an 8K context, the step as the engine runs it (graphs on, multi-stream on, probes off),
// against its bytes-moved bound; and the device memory it takes against weights + caches + workspace.
//
// How the 8K context is set up. A real prefill of 64 x 8192 tokens with these kernels takes far too
// long for a benchmark, so the caches are filled directly: the serving pools (request slots,
// full-token pages, SWA pages) are grown for every request to 8192 tokens exactly as the scheduler
// would (in chunks of chunked_prefill_tokens, the SWA window sliding), and every KV cache buffer (the
// SWA caches, the c4 / c128 compressed caches, the indexer's key cache) is filled with valid random
// MODEL1 entries / f32 keys. The compress-state rings stay clean. The decode step then reads exactly
// what it would read at that context: 128 window entries per layer, on c4 layers the indexer's 2048
// keys and its top-512 compressed entries, on c128 layers the 64 compressed entries. The batch is the
// scheduler's DECODE batch for that state (positions 8191, seq_len 8191 -> 8192), built here; the
// same batch is stepped again each iteration (its KV write lands on the same slots).
//
// Weights. CheckpointSource::synthetic computes every element through a counter-based hash, single
// threaded, which is slow for the small config's ~10 GB; so this benchmark writes a safetensors file
// with the same layout and value ranges from a fast generator (e4m3 / e2m1 codes and block scales
// sized for variance ~1/fan_in, dense matrices uniform in +-sqrt(3/fan_in), norms near 1, distinct
// hash-table experts) into /dev/shm (or $TMPDIR) and loads it with CheckpointSource::file. The MTP
// block is not loaded (the step runs without MTP).
//
// Counters of BM_EngineDecodeStep (time per iteration = the GPU time of one step's graph replay,
// CUDA events on the engine's main stream):
//   step_gpu_ms       the step's device time (graph replay, all streams)
//   step_wall_ms      ModelRunner::forward: host metadata + replay + sync + logits download and argmax
//   bound_ms          bytes moved / 3.35 TB/s, bytes = weights read + KV read (below)
//   ratio_to_bound    step_gpu_ms / bound_ms (the target: <= 2)
//   weights_read_GB   every layer's weights and the head (all 64 experts: 64 tokens x 6 routed slots
//                     touch ~63.8 of 64 on average), the embedding's 64 rows, the hash tables' 64 rows
//   kv_read_GB        per request and layer: the window's entries; c4 layers the indexer's keys and
//                     the top-k compressed entries; c128 layers the compressed entries
//   cublaslt_gemms_per_step  FP8 GEMMs of the captured step that run through cuBLASLt
//   cublaslt_bf16_gemms_per_step  bf16 GEMMs of the captured step that do (DSV4_DENSE_GEMM=cublaslt)
//   mem_* (GB)        runtime buffers by kind (weights, caches, workspace) and the stream-ordered
//                     scratch (op scratch, cuBLASLt workspace) and graph memory high-water marks;
//                     mem_device_used: cudaMemGetInfo's used memory at the end minus before the engine
//
// Environment: DSV4_BENCH_EAGER=1 runs the step eagerly (no graph, one stream); with it,
// DSV4_BENCH_OP_TIMES=1 runs one more step with every launch timed and prints each op's launches,
// milliseconds and share of the step (flag_setting below).
#include <benchmark/benchmark.h>
#include <cuda_runtime.h>
#include <nlohmann/json.hpp>
#include <sys/statvfs.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <random>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "engine/checkpoint/checkpoint_layout.h"
#include "engine/checkpoint/checkpoint_source.h"
#include "engine/checkpoint/safetensors.h"
#include "engine/config/model_config.h"
#include "engine/core/allocator.h"
#include "engine/core/formats.h"
#include "engine/core/tensor.h"
#include "engine/model/model_runner.h"
#include "engine/model/serving_engine.h"
#include "engine/runtime/backend.h"
#include "engine/runtime/cuda_runtime.h"
#include "engine/serving/forward_batch.h"
#include "engine/serving/req_to_token_pool.h"
#include "engine/serving/swa_token_allocator.h"
#include "engine/serving/token_allocator.h"
#include "kernels/cuda/dense_gemm_cublaslt.h"
#include "kernels/cuda/fp8_gemm_cublaslt.h"
#include "kernels/cuda/moe_tc.h"
#include "kernels/cuda/sparse_attention_tc.h"
#include "kernels/indexer_logits.h"
#include "kernels/norm_rope.h"
#include "kernels/quant_gemm.h"

namespace {

using namespace dsv4;
using namespace dsv4::engine;

constexpr double kHbmPeak = 3.35e12;
constexpr int64_t kBatch = 64;
constexpr int64_t kContext = 8192;  // tokens each request holds after the step

void cuda_ok(cudaError_t e, const char* what) {
  if (e != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(e));
}

uint64_t mix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}
double uniform(uint64_t h) { return static_cast<double>(h >> 11) * 0x1.0p-52 - 1.0; }  // [-1, 1)

void parallel_for(int64_t n, const std::function<void(int64_t, int64_t)>& fn) {
  const int64_t threads = std::clamp<int64_t>(std::thread::hardware_concurrency(), 1, 32);
  if (n < (int64_t{1} << 20) || threads == 1) {
    fn(0, n);
    return;
  }
  std::vector<std::thread> pool;
  const int64_t chunk = (n + threads - 1) / threads;
  for (int64_t t = 0; t < threads; ++t) {
    const int64_t b = t * chunk, e = std::min(n, b + chunk);
    if (b < e) pool.emplace_back(fn, b, e);
  }
  for (auto& th : pool) th.join();
}

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

// The stored bytes of one tensor (see the file comment for the value ranges).
std::vector<uint8_t> fast_tensor_bytes(const ModelConfig& c, const TensorSpec& spec, uint64_t seed) {
  const int64_t n = shape_numel(spec.shape);
  std::vector<uint8_t> out(static_cast<size_t>(dtype_storage_bytes(spec.dtype, n)));
  const uint64_t base = mix64(seed ^ std::hash<std::string>{}(spec.name));
  const auto bound = [](int64_t fan_in) { return std::sqrt(3.0 / static_cast<double>(std::max<int64_t>(fan_in, 1))); };
  switch (spec.role) {
    case TensorRole::fp8_weight:
    case TensorRole::fp4_weight:
      parallel_for(static_cast<int64_t>(out.size()), [&](int64_t b, int64_t e) {
        for (int64_t i = b; i < e; ++i) {
          uint8_t v = static_cast<uint8_t>(mix64(base + static_cast<uint64_t>(i)));
          if (spec.role == TensorRole::fp8_weight && (v & 0x7F) == 0x7F) v ^= 1;  // no NaN codes
          out[static_cast<size_t>(i)] = v;
        }
      });
      break;
    case TensorRole::block_scale: {
      const double max_value = spec.scaled_dtype == DType::f8_e4m3fn ? 448.0 : 6.0;
      const uint8_t code = f32_to_ue8m0_ceil(static_cast<float>(bound(spec.fan_in) / max_value));
      for (int64_t i = 0; i < n; ++i) out[static_cast<size_t>(i)] = static_cast<uint8_t>(code + mix64(base + static_cast<uint64_t>(i)) % 2);
      break;
    }
    case TensorRole::hash_table: {
      const int64_t k = spec.shape[1], E = c.n_routed_experts;
      for (int64_t row = 0; row < spec.shape[0]; ++row) {
        const int64_t first = static_cast<int64_t>(mix64(base + static_cast<uint64_t>(row)) % static_cast<uint64_t>(E));
        for (int64_t j = 0; j < k; ++j) {
          const auto e = static_cast<int32_t>((first + j * (E / k)) % E);  // k distinct experts
          std::memcpy(out.data() + 4 * (row * k + j), &e, 4);
        }
      }
      break;
    }
    default: {
      parallel_for(n, [&](int64_t b, int64_t e) {
        for (int64_t i = b; i < e; ++i) {
          const double u = uniform(mix64(base + static_cast<uint64_t>(i)));
          double v = 0.0;
          switch (spec.role) {
            case TensorRole::dense_weight: v = spec.fan_in > 0 ? u * bound(spec.fan_in) : u; break;
            case TensorRole::norm_weight: v = 1.0 + 0.25 * u; break;
            case TensorRole::sink: v = 2.0 * u; break;
            default:
              v = ends_with(spec.name, "_scale") ? 0.625 + 0.375 * u : (ends_with(spec.name, "gate.bias") ? 0.1 * u : 0.5 * u);
              break;
          }
          if (spec.dtype == DType::f32) {
            const float f = static_cast<float>(v);
            std::memcpy(out.data() + 4 * i, &f, 4);
          } else {
            const uint16_t h = f32_to_bf16(static_cast<float>(v));
            std::memcpy(out.data() + 2 * i, &h, 2);
          }
        }
      });
      break;
    }
  }
  return out;
}

bool without_mtp(const std::string& name) { return name.rfind("mtp.", 0) != 0; }

// A directory with room for `bytes` (tmpfs first).
std::string scratch_dir(uint64_t bytes) {
  std::vector<std::string> dirs = {"/dev/shm"};
  if (const char* t = std::getenv("TMPDIR")) dirs.emplace_back(t);
  dirs.emplace_back("/tmp");
  for (const std::string& d : dirs) {
    struct statvfs st {};
    if (::statvfs(d.c_str(), &st) == 0 && static_cast<uint64_t>(st.f_bavail) * st.f_frsize > bytes + (uint64_t{1} << 30)) return d;
  }
  return "/tmp";
}

// Writes the kept tensors of `layout` as a safetensors file, one tensor in memory at a time (the
// format of SafetensorsWriter, whose in-memory serialization would hold the ~10 GB twice).
void write_checkpoint(const ModelConfig& config, const std::vector<TensorSpec>& layout, const std::string& path) {
  nlohmann::ordered_json header = nlohmann::ordered_json::object();
  uint64_t offset = 0;
  for (const TensorSpec& s : layout) {
    if (!without_mtp(s.name)) continue;
    const auto bytes = static_cast<uint64_t>(dtype_storage_bytes(s.dtype, shape_numel(s.shape)));
    header[s.name] = {{"dtype", std::string(safetensors_dtype_name(s.dtype))},
                      {"shape", s.shape},
                      {"data_offsets", {offset, offset + bytes}}};
    offset += bytes;
  }
  std::string text = header.dump();
  text.append((8 - text.size() % 8) % 8, ' ');
  std::FILE* f = std::fopen(path.c_str(), "wb");
  if (f == nullptr) throw std::runtime_error("cannot create " + path);
  uint8_t len[8];
  for (int i = 0; i < 8; ++i) len[i] = static_cast<uint8_t>(static_cast<uint64_t>(text.size()) >> (8 * i));
  bool ok = std::fwrite(len, 1, 8, f) == 8 && std::fwrite(text.data(), 1, text.size(), f) == text.size();
  for (const TensorSpec& s : layout) {
    if (!ok || !without_mtp(s.name)) continue;
    const std::vector<uint8_t> bytes = fast_tensor_bytes(config, s, 1);
    ok = std::fwrite(bytes.data(), 1, bytes.size(), f) == bytes.size();
  }
  ok = (std::fclose(f) == 0) && ok;
  if (!ok) throw std::runtime_error("cannot write " + path);
}

// Records every runtime buffer, with the phase it was made in.
class BufferLog : public rt::RuntimeObserver {
 public:
  struct Entry {
    std::string name, phase;
    uint64_t bytes;
    rt::BufferId id;
  };
  std::string phase = "other";
  std::vector<Entry> entries;
  void on_buffer_created(rt::BufferId id, int, const std::string& name, uint64_t bytes) override {
    entries.push_back({name, phase, bytes, id});
  }
};

bool is_cache(const std::string& name) {
  return ends_with(name, ".swa_kv") || ends_with(name, ".c4_kv") || ends_with(name, ".c128_kv") ||
         ends_with(name, ".indexer_keys") || ends_with(name, "compress_state");
}

// Fills a device buffer by doubling copies of its first `pattern` bytes.
void replicate(uint8_t* base, const std::vector<uint8_t>& pattern, uint64_t total) {
  const uint64_t first = std::min<uint64_t>(pattern.size(), total);
  cuda_ok(cudaMemcpy(base, pattern.data(), first, cudaMemcpyHostToDevice), "cache pattern");
  for (uint64_t done = first; done < total;) {
    const uint64_t n = std::min(done, total - done);
    cuda_ok(cudaMemcpy(base + done, base, n, cudaMemcpyDeviceToDevice), "cache copy");
    done += n;
  }
}

// A 0/1 environment setting: unset or 0 (false), 1 (true); nothing for any other value.
//   DSV4_BENCH_EAGER     1: the step runs eagerly (no graph, one stream), for profilers
//   DSV4_BENCH_OP_TIMES  1: one more step with each op's device time (CudaRuntime::time_ops), printed
//                        as a table; needs DSV4_BENCH_EAGER=1 (graph replays are not timed per op)
std::optional<bool> flag_setting(const char* name) {
  const char* v = std::getenv(name);
  if (v == nullptr || std::string(v) == "0") return false;
  if (std::string(v) == "1") return true;
  return std::nullopt;
}

struct Setup {
  ModelConfig config;
  RuntimeOptions options;
  BufferLog log;
  std::unique_ptr<rt::Runtime> runtime;
  std::unique_ptr<serving::ReqToTokenPool> slots;
  std::unique_ptr<serving::TokenAllocator> full;
  std::unique_ptr<serving::SwaTokenAllocator> swa;
  std::unique_ptr<DeviceWeights> weights;
  std::unique_ptr<ModelRunner> runner;
  serving::ForwardBatch batch;
  size_t free_before = 0, total_memory = 0;
  double load_seconds = 0, weights_read = 0, kv_read = 0;
  int64_t indexer_sms = 0;
  bool eager = false;  // DSV4_BENCH_EAGER=1
  std::string checkpoint;

  Setup() {
    const auto t0 = std::chrono::steady_clock::now();
    config = load_model_config("small");
    // Pools for 64 requests of 8K (plus a page), not the preset's 64K: what serving at 8K takes.
    config.max_seq_len = kContext + 256;
    options.max_running_requests = kBatch;
    options.batch_buckets = {1, 2, 4, 8, 16, 32, 64};
    cuda_ok(cudaSetDevice(0), "cudaSetDevice");
    cuda_ok(cudaFree(nullptr), "context");
    cuda_ok(cudaMemGetInfo(&free_before, &total_memory), "cudaMemGetInfo");

    // The checkpoint file.
    uint64_t file_bytes = 0;
    const std::vector<TensorSpec> layout = checkpoint_layout(config);
    for (const TensorSpec& s : layout) {
      if (without_mtp(s.name)) file_bytes += static_cast<uint64_t>(dtype_storage_bytes(s.dtype, shape_numel(s.shape)));
    }
    checkpoint = scratch_dir(file_bytes) + "/dsv4_bench_small_" + std::to_string(::getpid()) + ".safetensors";
    write_checkpoint(config, layout, checkpoint);
    const double written = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    std::printf("checkpoint: %.2f GB written to %s in %.1f s\n", static_cast<double>(file_bytes) / 1e9, checkpoint.c_str(), written);

    rt::RuntimeOptions ro;
    ro.devices = 1;
    runtime = rt::make_runtime(rt::BackendKind::cuda, ro, rt::SimOptions{}, 300.0);
    runtime->add_observer(&log);
    const PoolSizes sizes = default_pool_sizes(config, options);
    slots = std::make_unique<serving::ReqToTokenPool>(options.max_running_requests, config.max_seq_len);
    full = std::make_unique<serving::TokenAllocator>(config, options, sizes.full_pages, config.max_seq_len);
    swa = std::make_unique<serving::SwaTokenAllocator>(config, options, sizes.swa_pages, full->capacity_tokens());

    log.phase = "weights";
    {
      const CheckpointSource source = CheckpointSource::file(checkpoint);
      weights = std::make_unique<DeviceWeights>(*runtime, 0, config, source, without_mtp);
    }
    ::unlink(checkpoint.c_str());

    log.phase = "runner";
    EngineOptions eo;
    // DSV4_BENCH_EAGER=1 launches the step's kernels one by one (no graph, one stream), for a
    // per-kernel profile; the figures to report are the default's.
    this->eager = flag_setting("DSV4_BENCH_EAGER").value_or(false);
    eo.graphs = !this->eager;
    eo.multi_stream = eo.graphs;
    eo.probes = false;
    // Every block of the persistent indexer kernel that fits on the device at once (two per SM on an
    // H100): BM_IndexerLogitsDecode/sms:-1 against sms:0 (one per SM) measures the difference.
    indexer_sms = kernels::cuda::indexer_logits_max_blocks();
    eo.indexer_sms = indexer_sms;
    runner = std::make_unique<ModelRunner>(*runtime, config, options, *weights, eo, *slots, *full, *swa);
    log.phase = "other";

    warm_fp8_gemm();
    fill_caches();
    grow_requests();
    load_seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    count_bytes();
  }

  ~Setup() {
    runner.reset();
    weights.reset();
    runtime.reset();
  }

  // One tiny FP8 GEMM before the first (captured) step: the cuBLASLt handle and its first heuristic
  // are made outside any capture, as a prefill would have made them.
  void warm_fp8_gemm() {
    Allocator dev(*cuda_memory(0));
    Tensor q = Tensor::empty({4, 128}, DType::f8_e4m3fn, dev, "q"), sa = Tensor::empty({4, 1}, DType::ue8m0, dev, "sa");
    Tensor w = Tensor::empty({128, 128}, DType::f8_e4m3fn, dev, "w"), ws = Tensor::empty({1, 1}, DType::ue8m0, dev, "ws");
    Tensor out = Tensor::empty({4, 128}, DType::bf16, dev, "out");
    cuda_ok(cudaMemset(q.data_ptr(), 0x38, 4 * 128), "memset");
    cuda_ok(cudaMemset(w.data_ptr(), 0x38, 128 * 128), "memset");
    cuda_ok(cudaMemset(sa.data_ptr(), 127, 4), "memset");
    cuda_ok(cudaMemset(ws.data_ptr(), 127, 1), "memset");
    kernels::gemm_fp8_block_scaled(q, sa, w, ws, out);
    cuda_ok(cudaDeviceSynchronize(), "warm-up GEMM");
  }

  void fill_caches() {
    const kernels::Model1Layout layout =
        kernels::model1_layout("bench", config.head_dim, config.rope_head_dim, config.kv_block_size);
    std::mt19937 rng(7);
    std::normal_distribution<float> normal(0.0f, 1.0f);
    auto model1_page = [&](int64_t page_size) {
      std::vector<uint8_t> page(static_cast<size_t>(layout.page_bytes(page_size)), 0);
      std::vector<float> kv(static_cast<size_t>(config.head_dim));
      for (int64_t e = 0; e < page_size; ++e) {
        for (float& v : kv) v = normal(rng);
        kernels::model1_pack(layout, page_size, kv.data(), page.data(), e);
      }
      return page;
    };
    const std::vector<uint8_t> swa_page = model1_page(options.swa_page_size);
    const std::vector<uint8_t> c4_page = model1_page(options.page_size / 4);
    const std::vector<uint8_t> c128_page = config.max_ratio() >= 128 ? model1_page(options.page_size / 128) : std::vector<uint8_t>{};
    std::vector<uint8_t> keys(size_t{1} << 20);
    for (size_t i = 0; i < keys.size(); i += 4) {
      const float f = normal(rng);
      std::memcpy(keys.data() + i, &f, 4);
    }
    for (const BufferLog::Entry& e : log.entries) {
      if (e.phase != "runner") continue;
      const std::vector<uint8_t>* pattern = nullptr;
      if (ends_with(e.name, ".swa_kv")) pattern = &swa_page;
      if (ends_with(e.name, ".c4_kv")) pattern = &c4_page;
      if (ends_with(e.name, ".c128_kv")) pattern = &c128_page;
      if (ends_with(e.name, ".indexer_keys")) pattern = &keys;
      if (pattern == nullptr || pattern->empty()) continue;
      replicate(static_cast<uint8_t*>(runtime->data(e.id)), *pattern, e.bytes);
    }
  }

  // Every request grown to kContext tokens as chunked prefill would, then the DECODE batch.
  void grow_requests() {
    std::vector<int64_t> out_loc;
    std::vector<int32_t> ids;
    for (int64_t r = 0; r < kBatch; ++r) {
      const int64_t slot = slots->alloc().value();
      for (int64_t len = 0; len < kContext;) {
        const int64_t next = std::min(kContext, len + options.chunked_prefill_tokens);
        const serving::PageAllocation a = full->extend(slot, next);
        if (!a) throw std::runtime_error(a.describe("full"));
        full->write_locs(slot, len, next, slots->row(slot));
        const serving::PageAllocation b = swa->extend(slot, next, slots->row(slot));
        if (!b) throw std::runtime_error(b.describe("swa"));
        len = next;
      }
      serving::ForwardRow row;
      row.request_id = r + 1;
      row.req_slot = slot;
      row.seq_len_before = kContext - 1;
      row.seq_len_after = kContext;
      const int64_t loc = full->loc(slot, kContext - 1);
      const int32_t id = static_cast<int32_t>(mix64(static_cast<uint64_t>(r)) % static_cast<uint64_t>(config.vocab_size));
      serving::append_row(batch, row, std::span<const int64_t>(&loc, 1), std::span<const int32_t>(&id, 1));
    }
    batch.mode = serving::ForwardMode::decode;
    serving::pad_to_bucket(batch, options.batch_buckets);
    serving::check_forward_batch(batch);
  }

  void count_bytes() {
    const int64_t d = config.dim;
    const kernels::Model1Layout layout =
        kernels::model1_layout("bench", config.head_dim, config.rope_head_dim, config.kv_block_size);
    const double entry = static_cast<double>(layout.value_bytes() + layout.scale_bytes());
    for (const BufferLog::Entry& e : log.entries) {
      if (e.phase != "weights") continue;
      if (e.name == "embed.weight") {
        weights_read += static_cast<double>(kBatch * d * 2);
      } else if (ends_with(e.name, "gate.tid2eid")) {
        weights_read += static_cast<double>(kBatch * config.n_activated_experts * 4);
      } else {
        weights_read += static_cast<double>(e.bytes);
      }
    }
    for (int64_t l = 0; l < config.n_layers; ++l) {
      const int64_t ratio = config.ratio(l);
      double per_request = static_cast<double>(std::min<int64_t>(kContext, config.window_size)) * entry;
      if (ratio == 4) {
        const int64_t keys = kContext / 4;
        per_request += static_cast<double>(keys * config.index_head_dim * 4);
        per_request += static_cast<double>(std::min<int64_t>(keys, config.index_topk)) * entry;
      } else if (ratio > 0) {
        per_request += static_cast<double>(kContext / ratio) * entry;
      }
      kv_read += per_request * kBatch;
    }
  }
};

double gb(double bytes) { return bytes / 1e9; }

void BM_EngineDecodeStep(benchmark::State& state) {
  if (!rt::cuda_available()) {
    state.SkipWithError("no CUDA device");
    return;
  }
  static std::string why;  // SkipWithError keeps the pointer
  for (const char* name : {"DSV4_BENCH_EAGER", "DSV4_BENCH_OP_TIMES"}) {
    if (!flag_setting(name)) {
      why = std::string(name) + " must be 0 or 1, got '" + std::getenv(name) + "'";
      state.SkipWithError(why.c_str());
      return;
    }
  }
  const bool time_ops = *flag_setting("DSV4_BENCH_OP_TIMES");
  if (time_ops && !*flag_setting("DSV4_BENCH_EAGER")) {
    state.SkipWithError("DSV4_BENCH_OP_TIMES=1 needs DSV4_BENCH_EAGER=1: graph replays are not timed per op");
    return;
  }
  auto setup = std::make_unique<Setup>();
  Setup& s = *setup;
  auto& cuda_rt = dynamic_cast<rt::CudaRuntime&>(*s.runtime);
  const auto stream = static_cast<cudaStream_t>(cuda_rt.native(s.runner->main_stream()));
  cudaEvent_t a = nullptr, b = nullptr;
  cuda_ok(cudaEventCreate(&a), "event");
  cuda_ok(cudaEventCreate(&b), "event");
  const uint64_t lt_before = kernels::cuda::fp8_gemm_cublaslt_calls();
  const uint64_t dense_lt_before = kernels::cuda::dense_gemm_cublaslt_calls();

  // The first step captures the graph (every FP8 GEMM in it is counted); two more warm the caches.
  const auto c0 = std::chrono::steady_clock::now();
  StepRecord first = s.runner->forward(s.batch);
  const double capture_seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - c0).count();
  const uint64_t lt_in_graph = kernels::cuda::fp8_gemm_cublaslt_calls() - lt_before;
  const uint64_t dense_lt_in_graph = kernels::cuda::dense_gemm_cublaslt_calls() - dense_lt_before;
  for (int i = 0; i < 2; ++i) (void)s.runner->forward(s.batch);

  // The step as forward() runs it, with events around the replay (or the eager launches).
  const auto step = [&] {
    StepRecord rec;
    rec.step = s.batch.step;
    rec.mode = s.batch.mode;
    s.runner->begin(s.batch, &rec);
    cuda_ok(cudaEventRecord(a, stream), "record");
    s.runner->launch(s.batch);
    cuda_ok(cudaEventRecord(b, stream), "record");
    s.runtime->synchronize(s.runner->main_stream());
    s.runner->finish_probes();
    s.runner->end();
    rec.rows = s.runner->sample(s.batch);
    return rec;
  };
  double gpu_total = 0, wall_total = 0;
  int64_t n = 0;
  for (auto _ : state) {
    const auto w0 = std::chrono::steady_clock::now();
    const StepRecord rec = step();
    const double wall = std::chrono::duration<double>(std::chrono::steady_clock::now() - w0).count();
    float ms = 0.0f;
    cuda_ok(cudaEventElapsedTime(&ms, a, b), "elapsed");
    state.SetIterationTime(ms * 1e-3);
    gpu_total += ms * 1e-3;
    wall_total += wall;
    ++n;
    benchmark::DoNotOptimize(rec.rows.data());
  }
  std::vector<rt::OpTime> op_table;
  if (time_ops) {
    cuda_rt.time_ops(true);
    (void)step();
    cuda_rt.time_ops(false);
    op_table = cuda_rt.op_times();
  }
  const double gpu = gpu_total / static_cast<double>(std::max<int64_t>(n, 1));
  const double wall = wall_total / static_cast<double>(std::max<int64_t>(n, 1));
  const double bound = (s.weights_read + s.kv_read) / kHbmPeak;

  // Memory.
  double mem_weights = 0, mem_caches = 0, mem_workspace = 0;
  for (const BufferLog::Entry& e : s.log.entries) {
    if (e.phase == "weights") {
      mem_weights += static_cast<double>(e.bytes);
    } else if (is_cache(e.name)) {
      mem_caches += static_cast<double>(e.bytes);
    } else {
      mem_workspace += static_cast<double>(e.bytes);
    }
  }
  cudaMemPool_t pool = nullptr;
  uint64_t pool_high = 0, graph_high = 0;
  if (cudaDeviceGetDefaultMemPool(&pool, 0) == cudaSuccess) {
    (void)cudaMemPoolGetAttribute(pool, cudaMemPoolAttrUsedMemHigh, &pool_high);
  }
  (void)cudaDeviceGetGraphMemAttribute(0, cudaGraphMemAttrUsedMemHigh, &graph_high);
  size_t free_after = 0, total = 0;
  cuda_ok(cudaMemGetInfo(&free_after, &total), "cudaMemGetInfo");
  const double device_used = static_cast<double>(s.free_before) - static_cast<double>(free_after);

  int distinct = 0;
  {
    std::vector<int32_t> sampled;
    for (const auto& r : first.rows) sampled.push_back(r.sampled_id);
    std::sort(sampled.begin(), sampled.end());
    distinct = static_cast<int>(std::unique(sampled.begin(), sampled.end()) - sampled.begin());
  }

  state.counters["step_gpu_ms"] = gpu * 1e3;
  state.counters["step_wall_ms"] = wall * 1e3;
  state.counters["bound_ms"] = bound * 1e3;
  state.counters["ratio_to_bound"] = gpu / bound;
  state.counters["weights_read_GB"] = gb(s.weights_read);
  state.counters["kv_read_GB"] = gb(s.kv_read);
  state.counters["mem_weights_GB"] = gb(mem_weights);
  state.counters["mem_caches_GB"] = gb(mem_caches);
  state.counters["mem_workspace_GB"] = gb(mem_workspace);
  state.counters["mem_scratch_high_GB"] = gb(static_cast<double>(pool_high));
  state.counters["mem_graph_high_GB"] = gb(static_cast<double>(graph_high));
  state.counters["mem_sum_GB"] = gb(mem_weights + mem_caches + mem_workspace + static_cast<double>(pool_high + graph_high));
  state.counters["mem_device_used_GB"] = gb(device_used);
  state.counters["mem_device_total_GB"] = gb(static_cast<double>(total));
  state.counters["setup_s"] = s.load_seconds;
  state.counters["capture_step_s"] = capture_seconds;
  state.counters["cublaslt_gemms_per_step"] = static_cast<double>(lt_in_graph);
  state.counters["cublaslt_bf16_gemms_per_step"] = static_cast<double>(dense_lt_in_graph);
  state.SetLabel("small config, batch " + std::to_string(kBatch) + " at context " + std::to_string(kContext) +
                 (s.eager ? ", eager (no graph, one stream)" : ", graphs + multi-stream") + ", indexer " + std::to_string(s.indexer_sms) + " blocks, FP8 GEMM " +
                 kernels::cuda::fp8_gemm_path_name(kernels::cuda::fp8_gemm_path()) + ", bf16 GEMM " +
                 kernels::cuda::dense_gemm_path_name(kernels::cuda::dense_gemm_path()) + ", experts " +
                 kernels::cuda::moe_gemm_path_name(kernels::cuda::moe_gemm_path()) + ", attention " +
                 kernels::cuda::sparse_attention_path_name(kernels::cuda::sparse_attention_path()) + ", " +
                 std::to_string(first.rows.size()) + " rows sampled (" + std::to_string(distinct) + " distinct tokens)");
  std::printf("decode step: gpu %.3f ms, wall %.3f ms, bound %.3f ms (weights %.3f GB + KV %.3f GB at 3.35 TB/s), "
              "ratio %.2f\n",
              gpu * 1e3, wall * 1e3, bound * 1e3, gb(s.weights_read), gb(s.kv_read), gpu / bound);
  std::printf("memory: weights %.3f GB, caches %.3f GB, workspace %.3f GB, scratch high %.3f GB, graph high %.3f GB; "
              "sum %.3f GB; device used %.3f GB of %.3f GB\n",
              gb(mem_weights), gb(mem_caches), gb(mem_workspace), gb(static_cast<double>(pool_high)),
              gb(static_cast<double>(graph_high)),
              gb(mem_weights + mem_caches + mem_workspace + static_cast<double>(pool_high + graph_high)), gb(device_used),
              gb(static_cast<double>(total)));
  if (time_ops) {
    double sum = 0;
    for (const rt::OpTime& t : op_table) sum += t.ms;
    std::printf("op times, one eager step (%.3f ms in %zu ops):\n  %-44s %8s %10s %7s\n", sum, op_table.size(), "op",
                "launches", "ms", "share");
    for (const rt::OpTime& t : op_table) {
      std::printf("  %-44s %8lld %10.3f %6.1f%%\n", t.op.c_str(), static_cast<long long>(t.launches), t.ms,
                  sum > 0 ? 100.0 * t.ms / sum : 0.0);
    }
  }
  cudaEventDestroy(a);
  cudaEventDestroy(b);
  setup.reset();
}

BENCHMARK(BM_EngineDecodeStep)->UseManualTime()->Iterations(5)->Unit(benchmark::kMillisecond);

}  // namespace
