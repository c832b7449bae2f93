// Helpers shared by the cuda runtime's GPU tests (test_runtime_cuda.cu, test_runtime_multigpu.cu).
#pragma once

#include <cuda_runtime.h>

#include <functional>
#include <string>
#include <utility>
#include <vector>

#include "engine/runtime/runtime.h"

namespace dsv4::rt::gpu_testing {

template <class T>
T* ptr(Runtime& rt, BufferId b) {
  return static_cast<T*>(rt.data(b));
}

inline std::vector<float> download_f32(Runtime& rt, BufferId b) {
  std::vector<float> out(rt.bytes(b) / sizeof(float));
  rt.download(b, 0, out.data(), rt.bytes(b));
  return out;
}

inline void upload_f32(Runtime& rt, BufferId b, const std::vector<float>& values) {
  rt.upload(b, 0, values.data(), values.size() * sizeof(float));
}

inline Launch launch_of(std::string op, std::vector<Access> accesses, std::function<void(cudaStream_t)> body) {
  Launch l;
  l.op = std::move(op);
  l.accesses = std::move(accesses);
  l.cuda = [body = std::move(body)](void* s) { body(static_cast<cudaStream_t>(s)); };
  return l;
}

inline Access reads(Runtime& rt, BufferId b) { return Access{rt.all(b), AccessKind::read}; }
inline Access writes(Runtime& rt, BufferId b) { return Access{rt.all(b), AccessKind::write}; }

}  // namespace dsv4::rt::gpu_testing
