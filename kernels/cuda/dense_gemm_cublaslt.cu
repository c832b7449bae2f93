// cuBLASLt's bf16 GEMM behind kernels/cuda/dense_gemm.cu (see dense_gemm_cublaslt.h for the switch,
// the layout and the numerics). CUDA only; never compiled by hipcc.
#include "kernels/cuda/dense_gemm_cublaslt.h"

#include <cublasLt.h>
#include <cuda_runtime.h>

#include <atomic>
#include <map>
#include <mutex>
#include <stdexcept>
#include <string>
#include <tuple>

#include "kernels/cuda/cublaslt_common.h"
#include "kernels/cuda/port.h"

namespace dsv4::kernels::cuda {

namespace {

constexpr size_t kMaxWorkspace = size_t{32} << 20;

PathSwitch& path_switch() {
  static PathSwitch s("DSV4_DENSE_GEMM", {"portable", "cublaslt"});
  return s;
}
std::atomic<uint64_t> g_calls{0};

void check_lt(cublasStatus_t s, const char* what) {
  if (s != CUBLAS_STATUS_SUCCESS) {
    throw std::runtime_error(std::string("dense_gemm_cublaslt: ") + what + " failed with cublasStatus " +
                             std::to_string(static_cast<int>(s)));
  }
}

// One shape's remembered algorithm (ok false: cuBLASLt offered none, the plain kernel runs).
struct Key {
  int device;
  long long T, N, K, ldx, ldo;
  int groups;
  bool out_bf16;
  uint32_t align_x, align_w, align_o;
  bool operator<(const Key& o) const {
    return std::tie(device, T, N, K, ldx, ldo, groups, out_bf16, align_x, align_w, align_o) <
           std::tie(o.device, o.T, o.N, o.K, o.ldx, o.ldo, o.groups, o.out_bf16, o.align_x, o.align_w, o.align_o);
  }
};
struct Choice {
  bool ok = false;
  cublasLtMatmulAlgo_t algo{};
  size_t workspace = 0;
};

std::mutex g_mu;
std::map<Key, Choice>& algos() {
  static auto* m = new std::map<Key, Choice>();  // never destroyed, as the handles
  return *m;
}

// One operand's layout: rows x cols column-major with leading dimension ld, and `batches` of them
// batch_stride elements apart.
void layout(cublasLtMatrixLayout_t* l, cudaDataType_t type, long long rows, long long cols, long long ld, int batches,
            long long batch_stride, const char* what) {
  check_lt(cublasLtMatrixLayoutCreate(l, type, static_cast<uint64_t>(rows), static_cast<uint64_t>(cols), ld), what);
  if (batches > 1) {
    const int32_t count = batches;
    const int64_t stride = batch_stride;
    check_lt(cublasLtMatrixLayoutSetAttribute(*l, CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT, &count, sizeof(count)), what);
    check_lt(cublasLtMatrixLayoutSetAttribute(*l, CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET, &stride, sizeof(stride)),
             what);
  }
}

void build(LtDescs& ds, const DenseLtProblem& p) {
  check_lt(cublasLtMatmulDescCreate(&ds.op, CUBLAS_COMPUTE_32F, CUDA_R_32F), "cublasLtMatmulDescCreate");
  const cublasOperation_t ta = CUBLAS_OP_T, tb = CUBLAS_OP_N;
  check_lt(cublasLtMatmulDescSetAttribute(ds.op, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof(ta)), "set TRANSA");
  check_lt(cublasLtMatmulDescSetAttribute(ds.op, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof(tb)), "set TRANSB");
  layout(&ds.a, CUDA_R_16BF, p.K, p.N, p.K, p.groups, p.N * p.K, "layout A");
  layout(&ds.b, CUDA_R_16BF, p.K, p.T, p.ldx, p.groups, p.K, "layout B");
  layout(&ds.d, p.out_bf16 ? CUDA_R_16BF : CUDA_R_32F, p.N, p.T, p.ldo, p.groups, p.N, "layout D");
}

Choice choose(cublasLtHandle_t h, const Key& key, const LtDescs& ds) {
  cublasLtMatmulHeuristicResult_t result{};
  const int returned = lt_heuristic(h, ds, kMaxWorkspace, key.align_w, key.align_x, key.align_o, 1, &result);
  if (returned < 1 || result.state != CUBLAS_STATUS_SUCCESS) return Choice{};
  return Choice{true, result.algo, result.workspaceSize};
}

// Rows, batch offsets and pointers 16-byte aligned, so that every operand suits a vectorized algorithm.
bool fits(const DenseLtProblem& p) {
  const long long out_size = p.out_bf16 ? 2 : 4;
  if (p.T < 0 || p.N <= 0 || p.K <= 0 || p.groups < 1) return false;
  if ((p.K * 2) % 16 != 0 || (p.ldx * 2) % 16 != 0 || (p.ldo * out_size) % 16 != 0 || (p.N * out_size) % 16 != 0) {
    return false;
  }
  return gpu::aligned(p.x, 16) && gpu::aligned(p.w, 16) && gpu::aligned(p.out, 16);
}

}  // namespace

DenseGemmPath dense_gemm_path() { return static_cast<DenseGemmPath>(path_switch().get()); }
void set_dense_gemm_path(DenseGemmPath path) { path_switch().set(static_cast<int>(path)); }
const char* dense_gemm_path_name(DenseGemmPath path) { return path_switch().name(static_cast<int>(path)); }
uint64_t dense_gemm_cublaslt_calls() { return g_calls.load(std::memory_order_relaxed); }

bool dense_gemm_cublaslt(const DenseLtProblem& p, void* stream_ptr) {
  if (!fits(p)) return false;
  if (p.T == 0) return true;
  auto stream = static_cast<cudaStream_t>(stream_ptr);
  int device = 0;
  gpu::check(cudaGetDevice(&device), "cudaGetDevice");
  const cublasLtHandle_t h = cublaslt_handle(device);
  LtDescs ds;
  build(ds, p);
  const Key key{device, p.T, p.N, p.K, p.ldx, p.ldo, p.groups, p.out_bf16,
                lt_alignment(p.x), lt_alignment(p.w), lt_alignment(p.out)};
  Choice choice;
  {
    std::lock_guard<std::mutex> lock(g_mu);
    auto it = algos().find(key);
    if (it == algos().end()) it = algos().emplace(key, choose(h, key, ds)).first;
    choice = it->second;
  }
  if (!choice.ok) return false;
  gpu::Scratch workspace(choice.workspace, stream);
  const float alpha = 1.0f, beta = 0.0f;
  check_lt(cublasLtMatmul(h, ds.op, &alpha, p.w, ds.a, p.x, ds.b, &beta, p.out, ds.d, p.out, ds.d, &choice.algo,
                          workspace.as<void>(), choice.workspace, stream),
           "cublasLtMatmul");
  g_calls.fetch_add(1, std::memory_order_relaxed);
  return true;
}

}  // namespace dsv4::kernels::cuda
