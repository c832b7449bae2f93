// cuBLASLt's block-scaled FP8 GEMM behind kernels/quant_gemm.h (see fp8_gemm_cublaslt.h for the
// switch, the layouts and the numerics). CUDA only; never compiled by hipcc.
#include "kernels/cuda/fp8_gemm_cublaslt.h"
#include "kernels/cuda/cublaslt_common.h"

#include <cublasLt.h>
#include <cuda_runtime.h>

#include <array>
#include <atomic>
#include <cstdlib>
#include <map>
#include <mutex>
#include <stdexcept>
#include <string>
#include <tuple>

#include "engine/core/formats.h"
#include "kernels/cuda/path_switch.h"
#include "kernels/cuda/port.h"

namespace dsv4::kernels::cuda {

namespace {

constexpr long long kBlock = 128;
constexpr size_t kMaxWorkspace = size_t{32} << 20;  // what the heuristic may ask for (Hopper's recommendation)
constexpr long long kTuneMinTokens = 512;            // autotuning only for prefill-sized problems

long long round_up(long long a, long long b) { return (a + b - 1) / b * b; }
using gpu::ceil_div;
bool aligned16(const void* p) { return gpu::aligned(p, 16); }

// ---- the switch -----------------------------------------------------------------------------------

// Portable by default: the engine's GPU run then equals its sim run bit for bit and passes the
// oracle's calibrated tolerances; cublaslt is the fast path, chosen explicitly (benchmarks).
// Constructed at first use: benchmarks name their registrations by path during static initialization.
PathSwitch& path_switch() {
  static PathSwitch s("DSV4_FP8_GEMM", {"portable", "cublaslt"});
  return s;
}
std::atomic<uint64_t> g_calls{0};
std::atomic<int> g_autotune{-1};  // -1: not read yet (DSV4_FP8_GEMM_TUNE)

void check_cuda(cudaError_t e, const char* what) {
  if (e != cudaSuccess) throw std::runtime_error(std::string("fp8_gemm_cublaslt: ") + what + ": " + cudaGetErrorString(e));
}

void check_lt(cublasStatus_t s, const char* what) {
  if (s != CUBLAS_STATUS_SUCCESS) {
    throw std::runtime_error(std::string("fp8_gemm_cublaslt: ") + what + " failed with cublasStatus " + std::to_string(static_cast<int>(s)));
  }
}

// ---- per-device state: the handle, sm_90 or not, the chosen algorithms --------------------------------

struct AlgoKey {
  int device;
  long long M, N, K, lda, ldd;
  uint32_t align_w, align_a, align_d;  // the pointers' alignment (bytes, up to 256): the algorithm may rely on it
  bool tuned;                          // chosen by timing (set_fp8_gemm_autotune) rather than the heuristic
  bool operator<(const AlgoKey& o) const {
    return std::tie(device, M, N, K, lda, ldd, align_w, align_a, align_d, tuned) <
           std::tie(o.device, o.M, o.N, o.K, o.lda, o.ldd, o.align_w, o.align_a, o.align_d, o.tuned);
  }
};


struct AlgoChoice {
  bool ok = false;
  cublasLtMatmulAlgo_t algo{};
  size_t workspace = 0;
};

struct State {
  std::mutex mu;
  std::map<int, cublasLtHandle_t> handles;
  std::map<int, bool> hopper;  // compute capability 9.x
  std::map<AlgoKey, AlgoChoice> algos;
};

State& state() {
  static State* s = new State();  // never destroyed: handles outlive static destruction order
  return *s;
}

int current_device() {
  int d = 0;
  check_cuda(cudaGetDevice(&d), "cudaGetDevice");
  return d;
}

bool device_is_hopper(int device) {
  State& s = state();
  std::lock_guard<std::mutex> lock(s.mu);
  auto it = s.hopper.find(device);
  if (it != s.hopper.end()) return it->second;
  int major = 0;
  check_cuda(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device), "cudaDeviceGetAttribute");
  return s.hopper[device] = (major == 9);
}



void build_descs(LtDescs& ds, long long M, long long N, long long K, long long lda, long long ldd, const float* w_scale,
                 const float* a_scale) {
  check_lt(cublasLtMatmulDescCreate(&ds.op, CUBLAS_COMPUTE_32F, CUDA_R_32F), "cublasLtMatmulDescCreate");
  const cublasOperation_t ta = CUBLAS_OP_T, tb = CUBLAS_OP_N;
  check_lt(cublasLtMatmulDescSetAttribute(ds.op, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof(ta)), "set TRANSA");
  check_lt(cublasLtMatmulDescSetAttribute(ds.op, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof(tb)), "set TRANSB");
  const int32_t a_mode = CUBLASLT_MATMUL_MATRIX_SCALE_BLK128x128_32F;  // A = the weight
  const int32_t b_mode = CUBLASLT_MATMUL_MATRIX_SCALE_VEC128_32F;      // B = the activations
  check_lt(cublasLtMatmulDescSetAttribute(ds.op, CUBLASLT_MATMUL_DESC_A_SCALE_MODE, &a_mode, sizeof(a_mode)), "set A_SCALE_MODE");
  check_lt(cublasLtMatmulDescSetAttribute(ds.op, CUBLASLT_MATMUL_DESC_B_SCALE_MODE, &b_mode, sizeof(b_mode)), "set B_SCALE_MODE");
  check_lt(cublasLtMatmulDescSetAttribute(ds.op, CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, &w_scale, sizeof(w_scale)), "set A_SCALE_POINTER");
  check_lt(cublasLtMatmulDescSetAttribute(ds.op, CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, &a_scale, sizeof(a_scale)), "set B_SCALE_POINTER");
  check_lt(cublasLtMatrixLayoutCreate(&ds.a, CUDA_R_8F_E4M3, static_cast<uint64_t>(K), static_cast<uint64_t>(N), K), "layout A");
  check_lt(cublasLtMatrixLayoutCreate(&ds.b, CUDA_R_8F_E4M3, static_cast<uint64_t>(K), static_cast<uint64_t>(M), lda), "layout B");
  check_lt(cublasLtMatrixLayoutCreate(&ds.d, CUDA_R_16BF, static_cast<uint64_t>(N), static_cast<uint64_t>(M), ldd), "layout D");
}

constexpr int kCandidates = 8;

// The heuristic's candidates for the problem, best first (those that report success). A fixed array:
// nvcc 13.0's front end fails on a std::vector of cublasLtMatmulHeuristicResult_t here.
struct Candidates {
  std::array<cublasLtMatmulHeuristicResult_t, kCandidates> r{};
  int n = 0;
  bool empty() const { return n == 0; }
  const cublasLtMatmulHeuristicResult_t& front() const { return r[0]; }
};

Candidates candidates(cublasLtHandle_t h, const AlgoKey& key, const LtDescs& ds) {
  std::array<cublasLtMatmulHeuristicResult_t, kCandidates> results{};
  const int returned = lt_heuristic(h, ds, kMaxWorkspace, key.align_w, key.align_a, key.align_d, key.tuned ? kCandidates : 1,
                                    results.data());
  Candidates out;  // none when cuBLASLt does not take the problem
  for (int i = 0; i < returned; ++i) {
    if (results[static_cast<size_t>(i)].state == CUBLAS_STATUS_SUCCESS) out.r[static_cast<size_t>(out.n++)] = results[static_cast<size_t>(i)];
  }
  return out;
}

// The remembered choice for the shape, if any.
bool cached(const AlgoKey& key, AlgoChoice& out) {
  State& s = state();
  std::lock_guard<std::mutex> lock(s.mu);
  auto it = s.algos.find(key);
  if (it == s.algos.end()) return false;
  out = it->second;
  return true;
}

AlgoChoice remember(const AlgoKey& key, const AlgoChoice& c) {
  State& s = state();
  std::lock_guard<std::mutex> lock(s.mu);
  return s.algos.emplace(key, c).first->second;  // a racing thread's choice wins: one per shape
}

// ---- the scale-widening kernel ---------------------------------------------------------------------
// Items [0, nkb * M): the activation scales, item kb * M + m = 2^(sa[m, kb] - 127) (0 for m >= T).
// Items [nkb * M, + nnb * ldw): the weight scales, item nb * ldw + kb = 2^(sw[nb, kb] - 127) (0 for
// kb >= nkb, the padding of the leading dimension).
__global__ void widen_scales_kernel(const uint8_t* sa, long long sa_ld, long long T, long long M, long long nkb,
                                    const uint8_t* sw, long long nnb, long long ldw, float* a_out, float* w_out) {
  const long long i = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
  const long long na = nkb * M;
  if (i < na) {
    const long long kb = i / M, m = i % M;
    a_out[i] = m < T ? ue8m0_to_f32(sa[m * sa_ld + kb]) : 0.0f;
    return;
  }
  const long long j = i - na;
  if (j < nnb * ldw) {
    const long long nb = j / ldw, kb = j % ldw;
    w_out[j] = kb < nkb ? ue8m0_to_f32(sw[nb * nkb + kb]) : 0.0f;
  }
}

}  // namespace

Fp8GemmPath fp8_gemm_path() { return static_cast<Fp8GemmPath>(path_switch().get()); }

void set_fp8_gemm_path(Fp8GemmPath path) { path_switch().set(static_cast<int>(path)); }

bool fp8_gemm_autotune() {
  int v = g_autotune.load(std::memory_order_relaxed);
  if (v < 0) {
    const char* e = std::getenv("DSV4_FP8_GEMM_TUNE");
    int expected = -1;
    g_autotune.compare_exchange_strong(expected, (e != nullptr && std::string(e) == "1") ? 1 : 0);
    v = g_autotune.load(std::memory_order_relaxed);
  }
  return v == 1;
}

void set_fp8_gemm_autotune(bool on) { g_autotune.store(on ? 1 : 0, std::memory_order_relaxed); }

uint64_t fp8_gemm_cublaslt_calls() { return g_calls.load(std::memory_order_relaxed); }

cublasLtHandle_t cublaslt_handle(int device) {
  State& s = state();
  std::lock_guard<std::mutex> lock(s.mu);
  auto it = s.handles.find(device);
  if (it != s.handles.end()) return it->second;
  cublasLtHandle_t h = nullptr;
  check_lt(cublasLtCreate(&h), "cublasLtCreate");
  s.handles[device] = h;
  return h;
}

const char* fp8_gemm_path_name(Fp8GemmPath path) { return path_switch().name(static_cast<int>(path)); }

bool fp8_gemm_cublaslt_fits(const Fp8GemmLtProblem& p, int64_t block) {
  if (block != kBlock || p.K <= 0 || p.K % kBlock != 0 || p.N <= 0 || p.T < 0) return false;
  if (p.lda % 16 != 0 || !aligned16(p.qa) || !aligned16(p.w)) return false;
  return device_is_hopper(current_device());
}

bool fp8_gemm_cublaslt(const Fp8GemmLtProblem& p, void* stream_ptr) {
  if (p.T == 0) return true;
  auto stream = static_cast<cudaStream_t>(stream_ptr);
  const int device = current_device();
  const long long T = p.T, N = p.N, K = p.K;
  const long long M = round_up(T, 4);
  const long long nkb = K / kBlock, nnb = ceil_div(N, kBlock), ldw = round_up(nkb, 4);

  // Where cuBLASLt reads the activations and writes the output (the caller's, or padded scratch).
  const bool stage_a = p.qa_rows < M;
  const bool stage_d = M != T || p.ldo % 8 != 0 || !aligned16(p.out);
  const long long lda = stage_a ? K : p.lda;
  const long long ldd = stage_d ? round_up(N, 8) : p.ldo;

  // Scratch first (stream-ordered; released on the stream if cuBLASLt turns the problem down).
  gpu::Scratch scales(static_cast<size_t>((nkb * M + nnb * ldw) * 4), stream);
  float* a_scale = scales.as<float>();
  float* w_scale = a_scale + nkb * M;  // M % 4 == 0: 16-byte aligned
  gpu::Scratch a_stage(stage_a ? static_cast<size_t>(M * K) : 0, stream);
  gpu::Scratch d_stage(stage_d ? static_cast<size_t>(M * ldd * 2) : 0, stream);
  const uint8_t* a = stage_a ? a_stage.as<uint8_t>() : p.qa;
  uint16_t* d = stage_d ? d_stage.as<uint16_t>() : p.out;

  LtDescs ds;
  build_descs(ds, M, N, K, lda, ldd, w_scale, a_scale);
  const cublasLtHandle_t h = cublaslt_handle(device);
  // The algorithm: remembered per shape; else the heuristic's first (the same bits on every call of one
  // shape; split-K algorithms are fine, their reduction is deterministic), or with autotuning the
  // fastest of its candidates, timed outside any capture on prefill-sized problems. No candidate
  // (CUBLAS_STATUS_NOT_SUPPORTED or an empty list) is remembered as "portable".
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  check_cuda(cudaStreamIsCapturing(stream, &capture), "cudaStreamIsCapturing");
  const bool want_tune = fp8_gemm_autotune() && M >= kTuneMinTokens;
  const bool tune = want_tune && capture == cudaStreamCaptureStatusNone;  // a capture cannot time: heuristic
  const AlgoKey key{device, M, N, K, lda, ldd, lt_alignment(p.w), lt_alignment(a), lt_alignment(d), want_tune};
  AlgoChoice known;
  const bool have = cached(key, known);
  Candidates list;
  if (!have) {
    list = candidates(h, key, ds);
    if (list.empty()) {
      remember(key, AlgoChoice{});
      return false;
    }
  } else if (!known.ok) {
    return false;
  }

  {
    const long long items = nkb * M + nnb * ldw;
    const int threads = 256;
    widen_scales_kernel<<<gpu::blocks_for(items, threads), threads, 0, stream>>>(p.sa, p.sa_ld, T, M, nkb, p.sw, nnb,
                                                                                  ldw, a_scale, w_scale);
    gpu::check_launch("fp8_gemm_cublaslt (scales)");
  }
  if (stage_a) {
    check_cuda(cudaMemcpy2DAsync(a_stage.as<uint8_t>(), static_cast<size_t>(K), p.qa, static_cast<size_t>(p.lda),
                                 static_cast<size_t>(K), static_cast<size_t>(T), cudaMemcpyDeviceToDevice, stream),
               "stage activations");
    check_cuda(cudaMemsetAsync(a_stage.as<uint8_t>() + T * K, 0, static_cast<size_t>((M - T) * K), stream),
               "zero activation padding");
  }
  const float alpha = 1.0f, beta = 0.0f;
  AlgoChoice choice;
  if (have) {
    choice = known;
  } else if (!tune || list.n == 1) {
    choice = remember(key, AlgoChoice{true, list.front().algo, list.front().workspaceSize});
  } else {
    // Time every candidate on this call's operands (a warm-up, then the best of three) and keep the
    // fastest; ties go to the heuristic's order.
    size_t ws_max = 0;
    for (int i = 0; i < list.n; ++i) ws_max = std::max(ws_max, list.r[static_cast<size_t>(i)].workspaceSize);
    gpu::Scratch ws(ws_max, stream);
    cudaEvent_t e0 = nullptr, e1 = nullptr;
    check_cuda(cudaEventCreate(&e0), "cudaEventCreate");
    check_cuda(cudaEventCreate(&e1), "cudaEventCreate");
    float best = 0.0f;
    size_t best_i = 0;
    for (size_t i = 0; i < static_cast<size_t>(list.n); ++i) {
      float t_min = 0.0f;
      bool ran = true;
      for (int rep = 0; rep < 4 && ran; ++rep) {
        check_cuda(cudaEventRecord(e0, stream), "cudaEventRecord");
        ran = cublasLtMatmul(h, ds.op, &alpha, p.w, ds.a, a, ds.b, &beta, d, ds.d, d, ds.d, &list.r[i].algo, ws.as<void>(),
                             list.r[i].workspaceSize, stream) == CUBLAS_STATUS_SUCCESS;
        check_cuda(cudaEventRecord(e1, stream), "cudaEventRecord");
        check_cuda(cudaEventSynchronize(e1), "cudaEventSynchronize");
        float ms = 0.0f;
        check_cuda(cudaEventElapsedTime(&ms, e0, e1), "cudaEventElapsedTime");
        if (rep == 1 || (rep > 1 && ms < t_min)) t_min = ms;  // rep 0 warms up
      }
      if (ran && (best == 0.0f || t_min < best)) {
        best = t_min;
        best_i = i;
      }
    }
    cudaEventDestroy(e0);
    cudaEventDestroy(e1);
    choice = remember(key, AlgoChoice{true, list.r[best_i].algo, list.r[best_i].workspaceSize});
  }
  gpu::Scratch workspace(choice.workspace, stream);

  check_lt(cublasLtMatmul(h, ds.op, &alpha, p.w, ds.a, a, ds.b, &beta, d, ds.d, d, ds.d, &choice.algo,
                          workspace.as<void>(), choice.workspace, stream),
           "cublasLtMatmul");
  g_calls.fetch_add(1, std::memory_order_relaxed);
  if (stage_d) {
    check_cuda(cudaMemcpy2DAsync(p.out, static_cast<size_t>(p.ldo * 2), d, static_cast<size_t>(ldd * 2),
                                 static_cast<size_t>(N * 2), static_cast<size_t>(T), cudaMemcpyDeviceToDevice, stream),
               "copy the output rows");
  }
  return true;
}

}  // namespace dsv4::kernels::cuda
