// Where an op runs. Every op has one public entry point (kernels/<op>.h) that checks the op's
// contract once and then runs the host implementation (kernels/host, the `sim` backend's) when its
// tensors live in host memory, or the CUDA implementation (kernels/cuda, HIP-portable) when they
// live on a GPU. The CUDA implementation enqueues on the current stream: the one the `cuda` runtime
// backend set around the launch (StreamScope), or the default stream outside any launch.
#pragma once

#include <initializer_list>

#include "engine/core/tensor.h"

namespace dsv4::kernels {

// The cudaStream_t (hipStream_t) kernels are enqueued on in this thread; nullptr is the default stream.
void* current_stream();

// Sets current_stream() for its lifetime (nests).
class StreamScope {
 public:
  explicit StreamScope(void* stream);
  ~StreamScope();
  StreamScope(const StreamScope&) = delete;
  StreamScope& operator=(const StreamScope&) = delete;

 private:
  void* previous_;
};

inline bool on_gpu(const Tensor& t) { return t.defined() && t.device().kind == DeviceKind::cuda; }

// The device an op runs on, from its tensors: every defined tensor must be on the same device kind
// (else a ContractError naming `op` and the first argument that differs). Returns true for GPU.
bool runs_on_gpu(const char* op, std::initializer_list<std::pair<const char*, const Tensor*>> args);

// For an entry point whose tensors are on a GPU in a build without CUDA: a ContractError.
[[noreturn]] void no_gpu_build(const char* op);

}  // namespace dsv4::kernels

// In an entry point, once runs_on_gpu() said so: runs `call` (the op's kernels::cuda function on
// current_stream()) and returns; in a build without CUDA, `call` is not compiled and the entry
// point throws no_gpu_build(op).
#if defined(DSV4_WITH_CUDA)
#define DSV4_GPU_OR_FAIL(op, call) \
  do {                             \
    call;                          \
    return;                        \
  } while (0)
#else
#define DSV4_GPU_OR_FAIL(op, call) ::dsv4::kernels::no_gpu_build(op)
#endif
