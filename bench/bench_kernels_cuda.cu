// The CUDA kernels against the H100's roofline (issue 9's speed part), at the small config's shapes
// (engine/config/presets.cpp "small": dim 4096, 64 heads of 512 (rope 64), q_lora 1024, 8 o-groups
// of rank 1024, window 128, indexer 64 heads of 128 with top-512, 64 routed experts (6 active) of
// 2048 plus one shared, vocab 129280). Decode shapes are batch 64 at an 8K context; prefill shapes
// M = 2048 and 4096 tokens.
//
// Every benchmark times its launches with CUDA events on its own stream (UseManualTime; a few
// untimed warm-up calls first; each timed iteration runs `reps` launches between the two events so
// microsecond kernels are not dominated by the events) and reports, as counters:
//   us            mean time of one call
//   GB/s          the bytes the call must move (each input read once, each output written once)
//   TFLOP/s       for matrix work: 2 · M · N · K (or the op's multiply-adds x 2)
//   frac_of_peak  achieved / the H100 SXM datasheet peak of the resource that bounds the kernel:
//                 HBM 3.35 TB/s, dense bf16 989 TFLOP/s, dense fp8 1979 TFLOP/s (the label says which)
// Inputs that a decode step streams from memory (weights, caches) rotate over several copies whose
// total exceeds the 50 MB L2, so a call does not find the previous call's data in L2.
// The FP8 GEMM runs both paths of kernels/cuda/fp8_gemm_cublaslt.h (portable: bitwise with the host;
// cublaslt: cuBLASLt's Hopper block scaling).
//
// Run: build/.../bench/bench_kernels_cuda [--benchmark_filter=...]. Without a GPU every benchmark
// reports "no CUDA device" and skips.
#include <benchmark/benchmark.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <random>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "engine/config/model_config.h"
#include "engine/core/allocator.h"
#include "engine/core/formats.h"
#include "engine/core/tensor.h"
#include "kernels/attn_output.h"
#include "kernels/cuda/dense_gemm_cublaslt.h"
#include "kernels/cuda/fp8_gemm_cublaslt.h"
#include "kernels/cuda/moe_tc.h"
#include "kernels/cuda/sparse_attention_tc.h"
#include "kernels/device.h"
#include "kernels/indexer_logits.h"
#include "kernels/mhc.h"
#include "kernels/moe.h"
#include "kernels/norm_rope.h"
#include "kernels/q_path.h"
#include "kernels/quant_gemm.h"
#include "kernels/sparse_attention.h"
#include "kernels/token_ops.h"

namespace {

using namespace dsv4;
using namespace dsv4::kernels;

constexpr double kHbmPeak = 3.35e12;   // bytes/s
constexpr double kBf16Peak = 989e12;   // dense flop/s
constexpr double kFp8Peak = 1979e12;   // dense flop/s
constexpr int64_t kRotationBytes = int64_t{160} << 20;  // > 3x the H100's 50 MB L2

void cuda_ok(cudaError_t e, const char* what) {
  if (e != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(e));
}

bool have_gpu(benchmark::State& state) {
  if (cuda_device_count() > 0) return true;
  state.SkipWithError("no CUDA device");
  return false;
}

Allocator& device() {
  static Allocator a(*cuda_memory(0), AllocatorMode::plain);
  return a;
}

const ModelConfig& small() {
  static const ModelConfig c = load_model_config("small");
  return c;
}

// ---- filling device memory ------------------------------------------------------------------------

__device__ inline uint64_t mix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

// Bytes in [lo, lo + span); e4m3: never a NaN code (0x7F / 0xFF become 0x7E / 0xFE).
__global__ void fill_bytes_kernel(uint8_t* p, long long n, uint64_t seed, int lo, int span, bool e4m3) {
  for (long long i = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<long long>(gridDim.x) * blockDim.x) {
    uint8_t b = static_cast<uint8_t>(lo + static_cast<int>(mix64(seed ^ static_cast<uint64_t>(i)) % static_cast<uint64_t>(span)));
    if (e4m3 && (b & 0x7F) == 0x7F) b ^= 1;
    p[i] = b;
  }
}

__global__ void fill_float_kernel(void* p, long long n, uint64_t seed, float lo, float hi, bool bf16) {
  for (long long i = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<long long>(gridDim.x) * blockDim.x) {
    const float u = static_cast<float>(mix64(seed ^ static_cast<uint64_t>(i)) >> 40) * (1.0f / 16777216.0f);
    const float v = lo + (hi - lo) * u;
    if (bf16) {
      static_cast<uint16_t*>(p)[i] = f32_to_bf16(v);
    } else {
      static_cast<float*>(p)[i] = v;
    }
  }
}

Tensor dev_tensor(const Shape& shape, DType dtype, const std::string& name) {
  return Tensor::empty(shape, dtype, device(), name);
}

long long storage_bytes(const Tensor& t) { return dtype_storage_bytes(t.dtype(), t.numel()); }

void fill_bytes(Tensor& t, uint64_t seed, int lo, int hi, bool e4m3 = false) {
  fill_bytes_kernel<<<1024, 256>>>(static_cast<uint8_t*>(t.data_ptr()), storage_bytes(t), seed, lo, hi - lo + 1, e4m3);
  cuda_ok(cudaGetLastError(), "fill_bytes");
}
void fill_e4m3(Tensor& t, uint64_t seed) { fill_bytes(t, seed, 0, 255, true); }
void fill_scales(Tensor& t, uint64_t seed) { fill_bytes(t, seed, 117, 130); }  // 2^-10 .. 2^3
void fill_float(Tensor& t, uint64_t seed, float lo = -1.0f, float hi = 1.0f) {
  fill_float_kernel<<<1024, 256>>>(t.data_ptr(), t.numel(), seed, lo, hi, t.dtype() == DType::bf16);
  cuda_ok(cudaGetLastError(), "fill_float");
}

// A host vector of integers (i32 or i64) as a device tensor.
template <class Int>
Tensor upload_ints(const std::vector<Int>& v, const Shape& shape, const std::string& name) {
  static_assert(sizeof(Int) == 4 || sizeof(Int) == 8, "i32 or i64");
  Tensor h = Tensor::empty(shape, sizeof(Int) == 4 ? DType::i32 : DType::i64, name);
  std::memcpy(h.data_ptr(), v.data(), v.size() * sizeof(Int));
  return h.to(device());
}
Tensor upload_i32(const std::vector<int32_t>& v, const Shape& shape, const std::string& name) {
  return upload_ints(v, shape, name);
}
// Decode positions near the 8K context: token t at 8191 - t.
Tensor decode_positions(int64_t T) {
  std::vector<int32_t> pos(static_cast<size_t>(T));
  for (int64_t t = 0; t < T; ++t) pos[static_cast<size_t>(t)] = static_cast<int32_t>(8191 - t % 8192);
  return upload_i32(pos, {T}, "positions");
}
// The RoPE frequencies of `rope_dim` dims (their values do not change the work).
Tensor rope_freqs(int64_t rope_dim) {
  Tensor f = dev_tensor({rope_dim / 2}, DType::f32, "freqs");
  fill_float(f, 31, 1e-4f, 1.0f);
  return f;
}

// Copies that together exceed the L2 (at least 1, at most `max_copies`).
int copies_for(long long bytes, int max_copies = 16) {
  return static_cast<int>(std::clamp<long long>((kRotationBytes + bytes - 1) / std::max<long long>(bytes, 1), 1, max_copies));
}

// ---- timing -----------------------------------------------------------------------------------------

struct Stream {
  cudaStream_t s = nullptr;
  cudaEvent_t a = nullptr, b = nullptr;
  Stream() {
    cuda_ok(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking), "cudaStreamCreate");
    cuda_ok(cudaEventCreate(&a), "cudaEventCreate");
    cuda_ok(cudaEventCreate(&b), "cudaEventCreate");
  }
  ~Stream() {
    cudaEventDestroy(a);
    cudaEventDestroy(b);
    cudaStreamDestroy(s);
  }
};

// Times `call(i)` (i counts calls, for rotating over `rotate` input sets) on a fresh stream and
// returns the mean seconds of one call. After three untimed eager calls (handles, algorithm choices,
// module loads) the calls are captured into a CUDA graph of `reps` calls (a multiple of `rotate`,
// about 300 us of work) and each timed iteration replays it: device time without the host's launch
// overhead, as the engine's decode graphs run. Ops that cannot be captured are timed eagerly.
double time_calls(benchmark::State& state, const std::function<void(int64_t)>& call, int rotate = 1) {
  Stream st;
  StreamScope scope(st.s);
  cuda_ok(cudaDeviceSynchronize(), "sync before warm-up");
  int64_t i = 0;
  for (int w = 0; w < 3; ++w) call(i++);
  cuda_ok(cudaEventRecord(st.a, st.s), "record");
  call(i++);
  cuda_ok(cudaEventRecord(st.b, st.s), "record");
  cuda_ok(cudaEventSynchronize(st.b), "sync");
  float ms = 0.0f;
  cuda_ok(cudaEventElapsedTime(&ms, st.a, st.b), "elapsed");
  int reps = static_cast<int>(std::clamp(std::ceil(0.3 / std::max(ms, 1e-4f)), 1.0, 200.0));
  reps = (reps + rotate - 1) / rotate * rotate;
  i = 0;
  cudaGraph_t graph = nullptr;
  cudaGraphExec_t exec = nullptr;
  bool graphed = cudaStreamBeginCapture(st.s, cudaStreamCaptureModeThreadLocal) == cudaSuccess;
  if (graphed) {
    try {
      for (int r = 0; r < reps; ++r) call(i++);
    } catch (const std::exception&) {
      graphed = false;
    }
    graphed = cudaStreamEndCapture(st.s, &graph) == cudaSuccess && graphed;
    graphed = graphed && cudaGraphInstantiate(&exec, graph, 0) == cudaSuccess;
    if (!graphed) (void)cudaGetLastError();
  }
  double total = 0.0;
  int64_t calls = 0;
  for (auto _ : state) {
    cuda_ok(cudaEventRecord(st.a, st.s), "record");
    if (graphed) {
      cuda_ok(cudaGraphLaunch(exec, st.s), "cudaGraphLaunch");
    } else {
      for (int r = 0; r < reps; ++r) call(i++);
    }
    cuda_ok(cudaEventRecord(st.b, st.s), "record");
    cuda_ok(cudaEventSynchronize(st.b), "sync");
    cuda_ok(cudaEventElapsedTime(&ms, st.a, st.b), "elapsed");
    state.SetIterationTime(ms * 1e-3);
    total += ms * 1e-3;
    calls += reps;
  }
  cuda_ok(cudaGetLastError(), "launches");
  if (exec != nullptr) cudaGraphExecDestroy(exec);
  if (graph != nullptr) cudaGraphDestroy(graph);
  state.counters["calls_per_iter"] = reps;
  state.counters["graph"] = graphed ? 1 : 0;
  return calls > 0 ? total / static_cast<double>(calls) : 0.0;
}

enum class Bound { hbm, bf16, fp8 };

// The counters; frac_of_peak is against the resource `bound` names.
void report(benchmark::State& state, double seconds, double bytes, double flops, Bound bound, const std::string& shape) {
  if (seconds <= 0.0) return;
  state.counters["us"] = seconds * 1e6;
  state.counters["GB/s"] = bytes / seconds / 1e9;
  if (flops > 0) state.counters["TFLOP/s"] = flops / seconds / 1e12;
  double frac = 0.0;
  const char* peak = "";
  switch (bound) {
    case Bound::hbm: frac = bytes / seconds / kHbmPeak; peak = "HBM 3.35 TB/s"; break;
    case Bound::bf16: frac = flops / seconds / kBf16Peak; peak = "bf16 989 TFLOP/s"; break;
    case Bound::fp8: frac = flops / seconds / kFp8Peak; peak = "fp8 1979 TFLOP/s"; break;
  }
  state.counters["frac_of_peak"] = frac;
  // The other resource's fraction too, for matrix work at decode sizes.
  if (bound != Bound::hbm) state.counters["frac_of_hbm"] = bytes / seconds / kHbmPeak;
  state.SetLabel(shape + " | peak: " + peak);
}

// ---- FP8 block-scaled GEMM ----------------------------------------------------------------------------

struct Fp8Shape {
  const char* name;
  int64_t N, K;
};
// The small config's FP8 linears (engine/checkpoint/checkpoint_layout.cpp).
const Fp8Shape kFp8Shapes[] = {
    {"wq_a", 1024, 4096},   {"wq_b", 32768, 1024},          {"wkv", 512, 4096},  {"wo_b", 4096, 8192},
    {"shared_w1", 2048, 4096}, {"shared_w2", 4096, 2048}, {"indexer_wq_b", 8192, 1024},
};

// Enough copies of a linear's FP8 weights and their 128 x 128 block scales to rotate past L2 (codes
// from `seed`, scales from `seed + 10`, then one seed per copy).
struct Fp8Weights {
  std::vector<Tensor> w, ws;
  long long bytes = 0;  // one copy's
  int copies = 0;
};
Fp8Weights fp8_weights(int64_t N, int64_t K, uint64_t seed) {
  const int64_t nkb = K / 128;
  Fp8Weights f;
  f.bytes = N * K + ((N + 127) / 128) * nkb;
  f.copies = copies_for(f.bytes);
  for (int c = 0; c < f.copies; ++c) {
    f.w.push_back(dev_tensor({N, K}, DType::f8_e4m3fn, "w"));
    f.ws.push_back(dev_tensor({(N + 127) / 128, nkb}, DType::ue8m0, "ws"));
    fill_e4m3(f.w.back(), seed + static_cast<uint64_t>(c));
    fill_scales(f.ws.back(), seed + 10 + static_cast<uint64_t>(c));
  }
  return f;
}

void BM_Fp8Gemm(benchmark::State& state, int shape_index, cuda::Fp8GemmPath path, bool tune) {
  if (!have_gpu(state)) return;
  const Fp8Shape& s = kFp8Shapes[shape_index];
  const int64_t M = state.range(0), N = s.N, K = s.K, nkb = K / 128;
  const Fp8Weights f = fp8_weights(N, K, 10);
  const std::vector<Tensor>& w = f.w;
  const std::vector<Tensor>& ws = f.ws;
  const long long w_bytes = f.bytes;
  const int copies = f.copies;
  Tensor q = dev_tensor({M, K}, DType::f8_e4m3fn, "q"), sa = dev_tensor({M, nkb}, DType::ue8m0, "sa");
  fill_e4m3(q, 1);
  fill_scales(sa, 2);
  Tensor out = dev_tensor({M, N}, DType::bf16, "out");
  cuda::Fp8GemmPathScope scope(path);
  const bool tune_before = cuda::fp8_gemm_autotune();
  cuda::set_fp8_gemm_autotune(tune);
  const uint64_t lt_before = cuda::fp8_gemm_cublaslt_calls();
  const double sec = time_calls(state, [&](int64_t i) {
    const auto c = static_cast<size_t>(i % copies);
    gemm_fp8_block_scaled(q, sa, w[c], ws[c], out);
  }, copies);
  cuda::set_fp8_gemm_autotune(tune_before);
  const bool used_lt = cuda::fp8_gemm_cublaslt_calls() > lt_before;
  const double bytes = static_cast<double>(w_bytes + M * K + M * nkb + M * N * 2);
  const double flops = 2.0 * static_cast<double>(M) * static_cast<double>(N) * static_cast<double>(K);
  report(state, sec, bytes, flops, M >= 512 ? Bound::fp8 : Bound::hbm,
         std::string(s.name) + " M " + std::to_string(M) + " N " + std::to_string(N) + " K " + std::to_string(K) +
             " path " + (used_lt ? (tune ? "cublaslt (autotuned)" : "cublaslt") : "portable"));
}

void register_fp8_gemms() {
  for (int i = 0; i < static_cast<int>(std::size(kFp8Shapes)); ++i) {
    const std::string n = kFp8Shapes[i].name;
    benchmark::RegisterBenchmark(("BM_Fp8Gemm_cublaslt/" + n).c_str(), BM_Fp8Gemm, i, cuda::Fp8GemmPath::cublaslt, false)
        ->Arg(64)->Arg(2048)->Arg(4096)->ArgName("M")->UseManualTime()->Unit(benchmark::kMicrosecond)->MinTime(0.2);
  }
  // With autotuning (set_fp8_gemm_autotune): the fastest of the heuristic's first eight algorithms.
  for (int i = 0; i < static_cast<int>(std::size(kFp8Shapes)); ++i) {
    const std::string n = kFp8Shapes[i].name;
    benchmark::RegisterBenchmark(("BM_Fp8Gemm_cublaslt_tuned/" + n).c_str(), BM_Fp8Gemm, i, cuda::Fp8GemmPath::cublaslt, true)
        ->Arg(2048)->Arg(4096)->ArgName("M")->UseManualTime()->Unit(benchmark::kMicrosecond)->MinTime(0.2);
  }
  // The portable kernel (bitwise with the host): the decode shape of every linear, two prefill ones.
  for (int i = 0; i < static_cast<int>(std::size(kFp8Shapes)); ++i) {
    const std::string n = kFp8Shapes[i].name;
    auto* b = benchmark::RegisterBenchmark(("BM_Fp8Gemm_portable/" + n).c_str(), BM_Fp8Gemm, i, cuda::Fp8GemmPath::portable, false)
                  ->Arg(64)->ArgName("M")->UseManualTime()->Unit(benchmark::kMicrosecond)->MinTime(0.1);
    if (n == "wq_a" || n == "wo_b") b->Arg(2048);
  }
}

// linear_fp8's whole FP8 path (activation quantization, scale widening, GEMM) from bf16 activations.
void BM_LinearFp8(benchmark::State& state, int shape_index, cuda::Fp8GemmPath path) {
  if (!have_gpu(state)) return;
  const Fp8Shape& s = kFp8Shapes[shape_index];
  const int64_t M = state.range(0), N = s.N, K = s.K;
  const Fp8Weights f = fp8_weights(N, K, 30);
  const std::vector<Tensor>& w = f.w;
  const std::vector<Tensor>& ws = f.ws;
  const long long w_bytes = f.bytes;
  const int copies = f.copies;
  Tensor x = dev_tensor({M, K}, DType::bf16, "x");
  fill_float(x, 3, -2.0f, 2.0f);
  Tensor out = dev_tensor({M, N}, DType::bf16, "out");
  cuda::Fp8GemmPathScope scope(path);
  const double sec = time_calls(state, [&](int64_t i) {
    const auto c = static_cast<size_t>(i % copies);
    linear_projection(x, w[c], BlockScales{ws[c]}, out);
  }, copies);
  const double bytes = static_cast<double>(w_bytes + M * K * 2 + M * N * 2);
  const double flops = 2.0 * static_cast<double>(M) * static_cast<double>(N) * static_cast<double>(K);
  report(state, sec, bytes, flops, M >= 512 ? Bound::fp8 : Bound::hbm,
         std::string(s.name) + " M " + std::to_string(M) + " N " + std::to_string(N) + " K " + std::to_string(K) +
             " path " + cuda::fp8_gemm_path_name(path) + " (act quant + GEMM)");
}

// ---- activation quantization, RMSNorm -------------------------------------------------------------------

void BM_ActQuantFp8(benchmark::State& state) {
  if (!have_gpu(state)) return;
  const int64_t T = state.range(0), K = small().dim;
  Tensor x = dev_tensor({T, K}, DType::bf16, "x");
  fill_float(x, 4, -3.0f, 3.0f);
  Tensor q = dev_tensor({T, K}, DType::f8_e4m3fn, "q"), s = dev_tensor({T, K / 128}, DType::ue8m0, "s");
  const double sec = time_calls(state, [&](int64_t) { act_quant_fp8(x, 128, q, s); });
  report(state, sec, static_cast<double>(T * K * 2 + T * K + T * K / 128), 0, Bound::hbm,
         "x [" + std::to_string(T) + ", " + std::to_string(K) + "] bf16, blocks of 128");
}

void BM_RmsNorm(benchmark::State& state) {
  if (!have_gpu(state)) return;
  const int64_t T = state.range(0), n = small().dim;
  Tensor x = dev_tensor({T, n}, DType::bf16, "x"), w = dev_tensor({n}, DType::f32, "w"), y = dev_tensor({T, n}, DType::bf16, "y");
  fill_float(x, 5);
  fill_float(w, 6, 0.5f, 1.5f);
  const double sec = time_calls(state, [&](int64_t) { rms_norm(x, w, 1e-6, y); });
  report(state, sec, static_cast<double>(T * n * 4 + n * 4), 0, Bound::hbm,
         "x [" + std::to_string(T) + ", " + std::to_string(n) + "] bf16");
}

// ---- bf16 matrix work: the head (f32 logits) and the grouped wo_a ---------------------------------------

void BM_HeadLogits(benchmark::State& state, cuda::DenseGemmPath path) {
  if (!have_gpu(state)) return;
  cuda::DenseGemmPathScope scope(path);
  const int64_t T = state.range(0), V = small().vocab_size, d = small().dim;
  Tensor head = dev_tensor({V, d}, DType::bf16, "head");  // 1.06 GB: larger than any L2 on its own
  fill_float(head, 7, -0.05f, 0.05f);
  Tensor x = dev_tensor({T, d}, DType::bf16, "x");
  fill_float(x, 8);
  Tensor logits = dev_tensor({T, V}, DType::f32, "logits");
  const double sec = time_calls(state, [&](int64_t) { moe_gate_logits(x, head, logits); });
  report(state, sec, static_cast<double>(V * d * 2 + T * d * 2 + T * V * 4), 2.0 * T * V * d, T >= 512 ? Bound::bf16 : Bound::hbm,
         "head: x [" + std::to_string(T) + ", " + std::to_string(d) + "] bf16 x W [" + std::to_string(V) + ", " +
             std::to_string(d) + "] bf16 -> f32");
}

void BM_GroupedWoA(benchmark::State& state, cuda::DenseGemmPath path) {
  if (!have_gpu(state)) return;
  cuda::DenseGemmPathScope scope(path);
  const ModelConfig& c = small();
  const int64_t T = state.range(0), G = c.o_groups, r = c.o_lora_rank, W = c.n_heads * c.head_dim / G;
  const long long w_bytes = G * r * W * 2;
  const int copies = copies_for(w_bytes);
  std::vector<Tensor> w;
  for (int i = 0; i < copies; ++i) {
    w.push_back(dev_tensor({G * r, W}, DType::bf16, "wo_a"));
    fill_float(w.back(), 50 + static_cast<uint64_t>(i), -0.05f, 0.05f);
  }
  Tensor o = dev_tensor({T, G * W}, DType::bf16, "o"), u = dev_tensor({T, G * r}, DType::bf16, "u");
  fill_float(o, 9);
  const double sec = time_calls(state, [&](int64_t i) { grouped_wo_a(o, w[static_cast<size_t>(i % copies)], G, u); }, copies);
  report(state, sec, static_cast<double>(w_bytes + T * G * W * 2 + T * G * r * 2), 2.0 * T * G * r * W,
         T >= 512 ? Bound::bf16 : Bound::hbm,
         "o [" + std::to_string(T) + ", " + std::to_string(G * W) + "] x wo_a [" + std::to_string(G * r) + ", " +
             std::to_string(W) + "] bf16, " + std::to_string(G) + " groups");
}

// ---- the routed experts (FP4 weights) -----------------------------------------------------------------

void BM_MoeExperts(benchmark::State& state, cuda::MoeGemmPath path) {
  if (!have_gpu(state)) return;
  cuda::MoeGemmPathScope scope(path);
  const ModelConfig& c = small();
  const int64_t T = state.range(0), E = c.n_routed_experts, k = c.n_activated_experts, d = c.dim, I = c.moe_inter_dim;
  const int64_t fb = c.fp4_block_size;
  // One layer's experts, packed e2m1 (two per byte) with 1 x 32 ue8m0 scales.
  Tensor w13 = dev_tensor({2 * E * I, d / 2}, DType::i8, "w13"), s13 = dev_tensor({2 * E * I, d / fb}, DType::ue8m0, "s13");
  Tensor w2 = dev_tensor({E * d, I / 2}, DType::i8, "w2"), s2 = dev_tensor({E * d, I / fb}, DType::ue8m0, "s2");
  fill_bytes(w13, 11, 0, 255);
  fill_bytes(w2, 12, 0, 255);
  fill_scales(s13, 13);
  fill_scales(s2, 14);
  std::vector<ExpertWeights> experts;
  for (int64_t e = 0; e < E; ++e) {
    experts.push_back({w13.narrow(0, 2 * e * I, I), s13.narrow(0, 2 * e * I, I), w2.narrow(0, e * d, d),
                       s2.narrow(0, e * d, d), w13.narrow(0, (2 * e + 1) * I, I), s13.narrow(0, (2 * e + 1) * I, I)});
  }
  const std::vector<uint64_t> ptrs = expert_pointer_table(experts);
  Tensor table_h = Tensor::empty({E, 6}, DType::i64, "table");
  std::memcpy(table_h.data_ptr(), ptrs.data(), ptrs.size() * 8);
  const Tensor table = table_h.to(device());
  // Random routing: k distinct experts per token.
  std::mt19937 rng(15);
  std::vector<int32_t> ex;
  std::vector<bool> touched(static_cast<size_t>(E), false);
  for (int64_t t = 0; t < T; ++t) {
    std::vector<int32_t> all(static_cast<size_t>(E));
    for (int64_t e = 0; e < E; ++e) all[static_cast<size_t>(e)] = static_cast<int32_t>(e);
    std::shuffle(all.begin(), all.end(), rng);
    for (int64_t j = 0; j < k; ++j) {
      ex.push_back(all[static_cast<size_t>(j)]);
      touched[static_cast<size_t>(all[static_cast<size_t>(j)])] = true;
    }
  }
  const int64_t n_touched = std::count(touched.begin(), touched.end(), true);
  const Tensor experts_t = upload_i32(ex, {T, k}, "experts");
  Tensor weights = dev_tensor({T, k}, DType::f32, "weights");
  fill_float(weights, 16, 0.05f, 0.3f);
  Tensor xn = dev_tensor({T, d}, DType::bf16, "xn");
  fill_float(xn, 17);
  Tensor routed = dev_tensor({T, k, d}, DType::bf16, "routed");
  MoeExpertsConfig cfg;
  cfg.format = ExpertFormat::fp4;
  cfg.act_block = c.act_block_size;
  cfg.fp4_block = fb;
  cfg.weight_block = c.weight_block_size;
  cfg.swiglu_limit = static_cast<float>(c.swiglu_limit);
  const double sec = time_calls(state, [&](int64_t) { moe_experts(xn, experts_t, weights, experts, table, cfg, routed); });
  const double per_expert = static_cast<double>(3 * I * d / 2 + 3 * I * d / fb);
  const double bytes = per_expert * static_cast<double>(n_touched) + static_cast<double>(T * d * 2 + T * k * d * 2);
  const double flops = 2.0 * static_cast<double>(T * k) * 3.0 * static_cast<double>(I * d);
  report(state, sec, bytes, flops, T >= 512 ? Bound::fp8 : Bound::hbm,
         std::to_string(T) + " tokens x top-" + std::to_string(k) + " of " + std::to_string(E) + " experts (" +
             std::to_string(n_touched) + " touched), d " + std::to_string(d) + ", I " + std::to_string(I) +
             ", fp4 weights (the whole layer is " + std::to_string(E * per_expert / 1e6) + " MB)");
}

// ---- sparse attention (decode) --------------------------------------------------------------------------

// A cache of `pages` pages of `page_size` MODEL1 entries, every page a copy of one packed page of
// random entries (finite values of the magnitudes the engine stores).
Tensor model1_cache(const Model1Layout& layout, int64_t page_size, int64_t pages, uint64_t seed) {
  const int64_t page_bytes = layout.page_bytes(page_size);
  std::vector<uint8_t> page(static_cast<size_t>(page_bytes), 0);
  std::mt19937 rng(static_cast<unsigned>(seed));
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> kv(static_cast<size_t>(layout.head_dim));
  for (int64_t e = 0; e < page_size; ++e) {
    for (float& v : kv) v = normal(rng);
    model1_pack(layout, page_size, kv.data(), page.data(), e);
  }
  Tensor cache = dev_tensor({pages, page_bytes}, DType::u8, "cache");
  auto* base = static_cast<uint8_t*>(cache.data_ptr());
  cuda_ok(cudaMemcpy(base, page.data(), page.size(), cudaMemcpyHostToDevice), "cache page");
  for (int64_t p = 1; p < pages; p *= 2) {
    const int64_t n = std::min(p, pages - p);
    cuda_ok(cudaMemcpy(base + p * page_bytes, base, static_cast<size_t>(n * page_bytes), cudaMemcpyDeviceToDevice), "cache copy");
  }
  return cache;
}

// T decode tokens; swa_topk window keys and extra_topk compressed keys each (a c4 layer: the
// indexer's top-512; a c128 layer: all 64 compressed entries of an 8K context).
void BM_SparseAttentionDecode(benchmark::State& state, int64_t extra_topk, cuda::SparseAttentionPath path) {
  if (!have_gpu(state)) return;
  cuda::SparseAttentionPathScope scope(path);
  // The tensor-core path's heads per block (arg "hb"; 0: the launch chooses).
  const int head_block = path == cuda::SparseAttentionPath::tensor_core ? static_cast<int>(state.range(1)) : 0;
  cuda::set_sparse_attention_tc_head_block(head_block);
  const ModelConfig& c = small();
  const int64_t T = state.range(0), H = c.n_heads, D = c.head_dim, swa_topk = c.window_size;
  const Model1Layout layout = model1_layout("bench", D, c.rope_head_dim, c.kv_block_size);
  const int64_t swa_page = 256, extra_page = extra_topk == c.index_topk ? 256 / 4 : 256 / 128;
  const double entry_bytes = static_cast<double>(layout.value_bytes() + layout.scale_bytes());
  const double per_call = static_cast<double>(T * (swa_topk + extra_topk)) * entry_bytes;
  const int sets = std::clamp(static_cast<int>(std::ceil(static_cast<double>(kRotationBytes) / per_call)), 1, 8);
  const int64_t swa_entries = sets * T * swa_topk, extra_entries = sets * T * extra_topk;
  const Tensor swa_cache = model1_cache(layout, swa_page, (swa_entries + swa_page - 1) / swa_page, 21);
  const Tensor extra_cache = model1_cache(layout, extra_page, (extra_entries + extra_page - 1) / extra_page, 22);
  // Index set r: token t reads its own entries of region r (no entry shared between tokens).
  std::vector<Tensor> swa_idx, extra_idx;
  for (int r = 0; r < sets; ++r) {
    std::vector<int32_t> a(static_cast<size_t>(T * swa_topk)), b(static_cast<size_t>(T * extra_topk));
    for (int64_t i = 0; i < T * swa_topk; ++i) a[static_cast<size_t>(i)] = static_cast<int32_t>(r * T * swa_topk + i);
    for (int64_t i = 0; i < T * extra_topk; ++i) b[static_cast<size_t>(i)] = static_cast<int32_t>(r * T * extra_topk + i);
    swa_idx.push_back(upload_i32(a, {T, swa_topk}, "swa_idx"));
    extra_idx.push_back(upload_i32(b, {T, extra_topk}, "extra_idx"));
  }
  const Tensor swa_lens = upload_i32(std::vector<int32_t>(static_cast<size_t>(T), static_cast<int32_t>(swa_topk)), {T}, "swa_lens");
  const Tensor extra_lens = upload_i32(std::vector<int32_t>(static_cast<size_t>(T), static_cast<int32_t>(extra_topk)), {T}, "extra_lens");
  Tensor q = dev_tensor({T, H, D}, DType::bf16, "q"), out = dev_tensor({T, H, D}, DType::bf16, "out");
  fill_float(q, 23);
  Tensor sink = dev_tensor({H}, DType::f32, "sink");
  fill_float(sink, 24);
  SparseAttentionArgs args;
  args.q = q;
  args.swa_cache = swa_cache;
  args.swa_page_size = swa_page;
  args.swa_lens = swa_lens;
  args.extra_cache = extra_cache;
  args.extra_page_size = extra_page;
  args.extra_lens = extra_lens;
  args.attn_sink = sink;
  args.scale = 1.0f / std::sqrt(static_cast<float>(D));
  args.rope_dim = c.rope_head_dim;
  args.kv_block = c.kv_block_size;
  args.out = out;
  const double sec = time_calls(state, [&](int64_t i) {
    args.swa_indices = swa_idx[static_cast<size_t>(i % sets)];
    args.extra_indices = extra_idx[static_cast<size_t>(i % sets)];
    sparse_attention(args);
  }, sets);
  cuda::set_sparse_attention_tc_head_block(0);
  const double bytes = per_call + static_cast<double>(T * H * D * 2 * 2 + T * (swa_topk + extra_topk) * 4);
  // q.k and p.v over every (token, head, key): 2 x 2 x D flops each.
  const double flops = 4.0 * static_cast<double>(T * H * (swa_topk + extra_topk)) * static_cast<double>(D);
  report(state, sec, bytes, flops, Bound::hbm,
         std::to_string(T) + " tokens x " + std::to_string(H) + " heads x D " + std::to_string(D) + ", " +
             std::to_string(swa_topk) + " window + " + std::to_string(extra_topk) + " compressed keys each (" +
             std::to_string(static_cast<int>(entry_bytes)) + " B MODEL1 entries)");
}

// ---- the indexer (decode at 8K: 2048 compressed keys per token) -----------------------------------------

void BM_IndexerLogitsDecode(benchmark::State& state) {
  if (!have_gpu(state)) return;
  const ModelConfig& c = small();
  const int64_t T = state.range(0), Hi = c.index_n_heads, Di = c.index_head_dim;
  const int64_t context = 8192, keys = context / 4, pages_per_token = keys / kIndexerPageKeys;
  int64_t num_sms = state.range(1);  // 0: one block per SM; -1: every block that fits at once
  if (num_sms == 0) {
    int sms = 0;
    cuda_ok(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0), "SM count");
    num_sms = std::min<int64_t>(sms, cuda::indexer_logits_max_blocks());
  } else if (num_sms < 0) {
    num_sms = cuda::indexer_logits_max_blocks();
  }
  const double key_bytes = static_cast<double>(T * keys * Di * 4);
  const int sets = std::clamp(static_cast<int>(std::ceil(static_cast<double>(kRotationBytes) / key_bytes)), 1, 4);
  Tensor kv = dev_tensor({sets * T * pages_per_token, kIndexerPageKeys, Di}, DType::f32, "kv_pages");
  fill_float(kv, 31);
  std::vector<Tensor> tables;
  for (int r = 0; r < sets; ++r) {
    std::vector<int32_t> bt(static_cast<size_t>(T * pages_per_token));
    for (int64_t i = 0; i < T * pages_per_token; ++i) bt[static_cast<size_t>(i)] = static_cast<int32_t>(r * T * pages_per_token + i);
    tables.push_back(upload_i32(bt, {T, pages_per_token}, "block_table"));
  }
  Tensor ctx_h = Tensor::empty({T, 1}, DType::i32, "context_lens");
  for (int64_t t = 0; t < T; ++t) ctx_h.data<int32_t>()[t] = static_cast<int32_t>(keys);
  const Tensor schedule = build_indexer_schedule(ctx_h, kIndexerPageKeys, num_sms).to(device());
  Tensor q = dev_tensor({T, 1, Hi, Di}, DType::f32, "q"), w = dev_tensor({T, Hi}, DType::f32, "weights");
  fill_float(q, 32);
  fill_float(w, 33);
  Tensor logits = dev_tensor({T, keys}, DType::f32, "logits");
  IndexerLogitsArgs args;
  args.q = q;
  args.kv_pages = kv;
  args.weights = w;
  args.context_lens = ctx_h.to(device());
  args.schedule = schedule;
  args.logits = logits;
  args.block_kv = kIndexerPageKeys;
  args.num_sms = num_sms;
  const double sec = time_calls(state, [&](int64_t i) {
    args.block_table = tables[static_cast<size_t>(i % sets)];
    indexer_logits(args);
  }, sets);
  const double bytes = key_bytes + static_cast<double>(T * Hi * Di * 4 + T * Hi * 4 + T * keys * 4);
  report(state, sec, bytes, 2.0 * static_cast<double>(T * keys * Hi * Di), Bound::hbm,
         std::to_string(T) + " tokens x " + std::to_string(keys) + " keys (8K context) x " + std::to_string(Hi) +
             " heads x " + std::to_string(Di) + ", f32 keys, " + std::to_string(num_sms) + " persistent blocks");
}

void BM_IndexerTopkDecode(benchmark::State& state) {
  if (!have_gpu(state)) return;
  const int64_t T = state.range(0), keys = 8192 / 4, k = small().index_topk, pages = keys / kIndexerPageKeys;
  Tensor logits = dev_tensor({T, keys}, DType::f32, "logits");
  fill_float(logits, 41);
  std::vector<int32_t> bt(static_cast<size_t>(T * pages));
  for (int64_t i = 0; i < T * pages; ++i) bt[static_cast<size_t>(i)] = static_cast<int32_t>(i);
  const Tensor table = upload_i32(bt, {T, pages}, "block_table");
  Tensor topk = dev_tensor({T, k}, DType::i32, "topk"), kv_index = dev_tensor({T, k}, DType::i32, "kv_index");
  Tensor lengths = dev_tensor({T}, DType::i32, "lengths");
  const double sec = time_calls(state, [&](int64_t) { indexer_topk(logits, table, k, topk, kv_index, lengths); });
  report(state, sec, static_cast<double>(T * keys * 4 + T * pages * 4 + 2 * T * k * 4 + T * 4), 0, Bound::hbm,
         std::to_string(T) + " rows x " + std::to_string(keys) + " logits, top-" + std::to_string(k));
}

// ---- the element-wise ops of a layer: mHC, norms and RoPE, the MoE's gate, SwiGLU and combine ----------
// All bound by HBM; bytes count each tensor read or written once. The compressor is not here: its
// kernels take a plan that the serving layer builds from the request state.

void BM_HcPre(benchmark::State& state) {
  if (!have_gpu(state)) return;
  const ModelConfig& c = small();
  const int64_t T = state.range(0), d = c.dim, hc = c.hc_mult, mix = (2 + hc) * hc;
  Tensor R = dev_tensor({T, hc * d}, DType::bf16, "R"), fn = dev_tensor({mix, hc * d}, DType::f32, "fn");
  Tensor base = dev_tensor({mix}, DType::f32, "base"), scale = dev_tensor({3}, DType::f32, "scale");
  fill_float(R, 40);
  fill_float(fn, 41, -0.01f, 0.01f);
  fill_float(base, 42);
  fill_float(scale, 43, 0.5f, 1.5f);
  Tensor x = dev_tensor({T, d}, DType::bf16, "x"), post = dev_tensor({T, hc}, DType::f32, "post");
  Tensor comb = dev_tensor({T, hc, hc}, DType::f32, "comb");
  const double sec = time_calls(state, [&](int64_t) {
    hc_pre(R, fn, base, scale, c.hc_eps, c.norm_eps, c.hc_sinkhorn_iters, x, post, comb);
  });
  report(state, sec, static_cast<double>(T * hc * d * 2 + mix * hc * d * 4 + T * d * 2 + T * (hc + hc * hc) * 4), 0,
         Bound::hbm, "R [" + std::to_string(T) + ", " + std::to_string(hc * d) + "] bf16, " +
                         std::to_string(c.hc_sinkhorn_iters) + " Sinkhorn iterations");
}

void BM_HcPost(benchmark::State& state) {
  if (!have_gpu(state)) return;
  const ModelConfig& c = small();
  const int64_t T = state.range(0), d = c.dim, hc = c.hc_mult;
  Tensor F = dev_tensor({T, d}, DType::bf16, "F"), R = dev_tensor({T, hc * d}, DType::bf16, "R");
  Tensor post = dev_tensor({T, hc}, DType::f32, "post"), comb = dev_tensor({T, hc, hc}, DType::f32, "comb");
  fill_float(F, 44);
  fill_float(R, 45);
  fill_float(post, 46, 0.0f, 2.0f);
  fill_float(comb, 47, 0.0f, 0.5f);
  Tensor R_out = dev_tensor({T, hc * d}, DType::bf16, "R_out");
  const double sec = time_calls(state, [&](int64_t) { hc_post(F, R, post, comb, R_out); });
  report(state, sec, static_cast<double>(T * d * 2 + 2 * T * hc * d * 2 + T * (hc + hc * hc) * 4), 0, Bound::hbm,
         "F [" + std::to_string(T) + ", " + std::to_string(d) + "], R [" + std::to_string(T) + ", " +
             std::to_string(hc * d) + "] bf16");
}

// The KV row's norm + RoPE + MODEL1 store (the SWA cache write of every layer).
void BM_NormRopeStoreKv(benchmark::State& state) {
  if (!have_gpu(state)) return;
  const ModelConfig& c = small();
  const int64_t T = state.range(0), D = c.head_dim, page = 256;
  const Model1Layout layout = model1_layout("bench", D, c.rope_head_dim, c.kv_block_size);
  Tensor kv = dev_tensor({T, D}, DType::bf16, "kv"), w = dev_tensor({D}, DType::f32, "w");
  fill_float(kv, 48);
  fill_float(w, 49, 0.5f, 1.5f);
  const Tensor freqs = rope_freqs(c.rope_head_dim), positions = decode_positions(T);
  std::vector<int64_t> locs(static_cast<size_t>(T));
  for (int64_t t = 0; t < T; ++t) locs[static_cast<size_t>(t)] = t * 7 % T;  // distinct slots, not in order
  const Tensor swa_locs = upload_ints(locs, {T}, "swa_locs");
  Tensor cache = dev_tensor({(T + page - 1) / page, layout.page_bytes(page)}, DType::u8, "cache");
  const double sec = time_calls(state, [&](int64_t) {
    fused_norm_rope_store_kv(kv, w, c.norm_eps, freqs, positions, swa_locs, cache, page, c.kv_block_size);
  });
  report(state, sec, static_cast<double>(T * D * 2 + T * (layout.value_bytes() + layout.scale_bytes()) + T * 12), 0,
         Bound::hbm, "kv [" + std::to_string(T) + ", " + std::to_string(D) + "] bf16 -> MODEL1 entries");
}

// The in-place per-head ops: the query's norm + RoPE and the attention output's inverse RoPE (the
// 64 heads of 512), the indexer query's RoPE + Hadamard + FP4 (block 32) quant-dequant (64 of 128).
enum class HeadOp { q_norm_rope, indexer_q, inverse_rope };

void BM_HeadsInPlace(benchmark::State& state, HeadOp op) {
  if (!have_gpu(state)) return;
  const ModelConfig& c = small();
  const bool indexer = op == HeadOp::indexer_q;
  const int64_t T = state.range(0), H = indexer ? c.index_n_heads : c.n_heads;
  const int64_t D = indexer ? c.index_head_dim : c.head_dim, rope = c.rope_head_dim;
  Tensor q = dev_tensor({T, H * D}, DType::bf16, "q");
  fill_float(q, 50);
  const Tensor freqs = rope_freqs(rope), positions = decode_positions(T);
  const double sec = time_calls(state, [&](int64_t) {
    switch (op) {
      case HeadOp::q_norm_rope: q_norm_rope_inplace(q, H, D, c.norm_eps, freqs, positions); break;
      case HeadOp::indexer_q: indexer_q(q, H, D, freqs, positions, IndexerQuant::fp4, 32); break;
      case HeadOp::inverse_rope: inverse_rope_inplace(q, H, D, freqs, positions); break;
    }
  });
  const int64_t touched = op == HeadOp::inverse_rope ? rope : D;  // dims read and written per head
  report(state, sec, static_cast<double>(2 * T * H * touched * 2 + T * 4), 0, Bound::hbm,
         "[" + std::to_string(T) + ", " + std::to_string(H) + " x " + std::to_string(D) + "] bf16 in place, " +
             std::to_string(touched) + " dims per head");
}

// Routing by top-k of the scores plus bias (a score layer).
void BM_MoeGate(benchmark::State& state) {
  if (!have_gpu(state)) return;
  const ModelConfig& c = small();
  const int64_t T = state.range(0), E = c.n_routed_experts, k = c.n_activated_experts;
  Tensor logits = dev_tensor({T, E}, DType::f32, "logits"), bias = dev_tensor({E}, DType::f32, "bias");
  fill_float(logits, 53, -4.0f, 4.0f);
  fill_float(bias, 54, -0.1f, 0.1f);
  Tensor experts = dev_tensor({T, k}, DType::i32, "experts"), weights = dev_tensor({T, k}, DType::f32, "weights");
  const double sec = time_calls(state, [&](int64_t) {
    moe_gate(logits, bias, Tensor(), Tensor(), k, static_cast<float>(c.route_scale), experts, weights);
  });
  report(state, sec, static_cast<double>(T * E * 4 + E * 4 + T * k * 8), 0, Bound::hbm,
         "logits [" + std::to_string(T) + ", " + std::to_string(E) + "] f32, top-" + std::to_string(k));
}

// The routed experts' clamped SwiGLU with the routing weight (T * k rows).
void BM_SwigluClamp(benchmark::State& state) {
  if (!have_gpu(state)) return;
  const ModelConfig& c = small();
  const int64_t R = state.range(0) * c.n_activated_experts, I = c.moe_inter_dim;
  Tensor g = dev_tensor({R, I}, DType::bf16, "g"), u = dev_tensor({R, I}, DType::bf16, "u");
  Tensor w = dev_tensor({R}, DType::f32, "row_weight"), h = dev_tensor({R, I}, DType::bf16, "h");
  fill_float(g, 55, -12.0f, 12.0f);
  fill_float(u, 56, -12.0f, 12.0f);
  fill_float(w, 57, 0.0f, 1.0f);
  const double sec = time_calls(state, [&](int64_t) { swiglu_clamp(g, u, static_cast<float>(c.swiglu_limit), w, h); });
  report(state, sec, static_cast<double>(3 * R * I * 2 + R * 4), 0, Bound::hbm,
         "g, u, h [" + std::to_string(R) + ", " + std::to_string(I) + "] bf16");
}

// The routed experts' outputs and the shared expert's summed into the residual stream's input.
void BM_MoeCombine(benchmark::State& state) {
  if (!have_gpu(state)) return;
  const ModelConfig& c = small();
  const int64_t T = state.range(0), k = c.n_activated_experts, d = c.dim;
  Tensor routed = dev_tensor({T, k, d}, DType::bf16, "routed"), shared = dev_tensor({T, d}, DType::bf16, "shared");
  fill_float(routed, 58);
  fill_float(shared, 59);
  Tensor out = dev_tensor({T, d}, DType::bf16, "out");
  const double sec = time_calls(state, [&](int64_t) { moe_combine(routed, shared, out); });
  report(state, sec, static_cast<double>((k + 2) * T * d * 2), 0, Bound::hbm,
         "routed [" + std::to_string(T) + ", " + std::to_string(k) + ", " + std::to_string(d) + "] + shared, bf16");
}

// The embedding rows of the step's tokens, written once per mHC copy.
void BM_EmbedRows(benchmark::State& state) {
  if (!have_gpu(state)) return;
  const ModelConfig& c = small();
  const int64_t T = state.range(0), V = c.vocab_size, d = c.dim, hc = c.hc_mult;
  Tensor table = dev_tensor({V, d}, DType::bf16, "embed");
  fill_float(table, 60, -0.05f, 0.05f);
  std::vector<int32_t> ids(static_cast<size_t>(T));
  for (int64_t t = 0; t < T; ++t) ids[static_cast<size_t>(t)] = static_cast<int32_t>((t * 2654435761LL) % V);
  const Tensor id_t = upload_i32(ids, {T}, "ids");
  Tensor out = dev_tensor({T, hc * d}, DType::bf16, "out");
  const double sec = time_calls(state, [&](int64_t) { embed_rows(id_t, table, hc, out); });
  report(state, sec, static_cast<double>(T * d * 2 + T * hc * d * 2 + T * 4), 0, Bound::hbm,
         std::to_string(T) + " rows of [" + std::to_string(V) + ", " + std::to_string(d) + "] bf16, " +
             std::to_string(hc) + " copies");
}

// ---- registration -------------------------------------------------------------------------------------

int register_all() {
  register_fp8_gemms();
  for (const int i : {0, 3}) {  // wq_a, wo_b
    const std::string n = kFp8Shapes[i].name;
    benchmark::RegisterBenchmark(("BM_LinearFp8_cublaslt/" + n).c_str(), BM_LinearFp8, i, cuda::Fp8GemmPath::cublaslt)
        ->Arg(64)->Arg(2048)->ArgName("M")->UseManualTime()->Unit(benchmark::kMicrosecond)->MinTime(0.2);
    benchmark::RegisterBenchmark(("BM_LinearFp8_portable/" + n).c_str(), BM_LinearFp8, i, cuda::Fp8GemmPath::portable)
        ->Arg(64)->ArgName("M")->UseManualTime()->Unit(benchmark::kMicrosecond)->MinTime(0.1);
  }
  benchmark::RegisterBenchmark("BM_ActQuantFp8", BM_ActQuantFp8)->Arg(64)->Arg(2048)->ArgName("T")->UseManualTime()->Unit(benchmark::kMicrosecond)->MinTime(0.1);
  benchmark::RegisterBenchmark("BM_RmsNorm", BM_RmsNorm)->Arg(64)->Arg(2048)->ArgName("T")->UseManualTime()->Unit(benchmark::kMicrosecond)->MinTime(0.1);
  for (const cuda::DenseGemmPath path : {cuda::DenseGemmPath::portable, cuda::DenseGemmPath::cublaslt}) {
    const std::string suffix = std::string("_") + cuda::dense_gemm_path_name(path);
    benchmark::RegisterBenchmark(("BM_HeadLogits" + suffix).c_str(), BM_HeadLogits, path)->Arg(64)->ArgName("T")->UseManualTime()->Unit(benchmark::kMicrosecond)->MinTime(0.2);
    benchmark::RegisterBenchmark(("BM_GroupedWoA" + suffix).c_str(), BM_GroupedWoA, path)->Arg(64)->ArgName("T")->UseManualTime()->Unit(benchmark::kMicrosecond)->MinTime(0.1);
  }
  for (const cuda::MoeGemmPath path : {cuda::MoeGemmPath::exact, cuda::MoeGemmPath::tensor_core}) {
    benchmark::RegisterBenchmark((std::string("BM_MoeExperts_") + cuda::moe_gemm_path_name(path)).c_str(), BM_MoeExperts, path)
        ->Arg(64)->ArgName("T")->UseManualTime()->Unit(benchmark::kMicrosecond)->MinTime(0.2);
  }
  // The tensor-core path also with each forced head block (hb 0: the launch's own choice).
  for (const auto path : {cuda::SparseAttentionPath::exact, cuda::SparseAttentionPath::tensor_core}) {
    const std::string suffix = std::string("_") + cuda::sparse_attention_path_name(path);
    const bool tc = path == cuda::SparseAttentionPath::tensor_core;
    for (const auto& [layer, extra] : {std::pair<const char*, int64_t>{"/c4_layer", small().index_topk},
                                       std::pair<const char*, int64_t>{"/c128_layer", 8192 / 128}}) {
      auto* b = benchmark::RegisterBenchmark(("BM_SparseAttentionDecode" + suffix + layer).c_str(),
                                             BM_SparseAttentionDecode, extra, path);
      b->ArgNames({"batch", "hb"})->UseManualTime()->Unit(benchmark::kMicrosecond)->MinTime(0.2);
      for (const int64_t hb : tc ? std::vector<int64_t>{0, 16, 32, 64} : std::vector<int64_t>{0}) b->Args({64, hb});
    }
  }
  benchmark::RegisterBenchmark("BM_IndexerLogitsDecode", BM_IndexerLogitsDecode)
      ->Args({64, 0})->Args({64, -1})->Args({64, 4})->ArgNames({"batch", "sms"})->UseManualTime()->Unit(benchmark::kMicrosecond)->MinTime(0.2);
  benchmark::RegisterBenchmark("BM_IndexerTopkDecode", BM_IndexerTopkDecode)->Arg(64)->ArgName("batch")->UseManualTime()->Unit(benchmark::kMicrosecond)->MinTime(0.1);
  // The element-wise ops at the decode batch and a prefill chunk.
  const auto tokens = [](benchmark::internal::Benchmark* b) {
    b->Arg(64)->Arg(2048)->ArgName("T")->UseManualTime()->Unit(benchmark::kMicrosecond)->MinTime(0.1);
  };
  using Bench = void (*)(benchmark::State&);
  const std::pair<const char*, Bench> elementwise[] = {
      {"BM_HcPre", BM_HcPre},         {"BM_HcPost", BM_HcPost},           {"BM_NormRopeStoreKv", BM_NormRopeStoreKv},
      {"BM_MoeGate", BM_MoeGate},     {"BM_SwigluClamp", BM_SwigluClamp}, {"BM_MoeCombine", BM_MoeCombine},
      {"BM_EmbedRows", BM_EmbedRows}};
  for (const auto& [name, fn] : elementwise) tokens(benchmark::RegisterBenchmark(name, fn));
  tokens(benchmark::RegisterBenchmark("BM_QNormRope", BM_HeadsInPlace, HeadOp::q_norm_rope));
  tokens(benchmark::RegisterBenchmark("BM_IndexerQ", BM_HeadsInPlace, HeadOp::indexer_q));
  tokens(benchmark::RegisterBenchmark("BM_InverseRope", BM_HeadsInPlace, HeadOp::inverse_rope));
  return 0;
}

const int kRegistered = register_all();

}  // namespace
