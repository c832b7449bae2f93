// kernels/device.h: the current stream and the host-or-GPU choice of every entry point.
#include "kernels/device.h"

#include <string>

#include "engine/core/error.h"

namespace dsv4::kernels {

namespace {
thread_local void* g_stream = nullptr;
}  // namespace

void* current_stream() { return g_stream; }

StreamScope::StreamScope(void* stream) : previous_(g_stream) { g_stream = stream; }
StreamScope::~StreamScope() { g_stream = previous_; }

bool runs_on_gpu(const char* op, std::initializer_list<std::pair<const char*, const Tensor*>> args) {
  const std::pair<const char*, const Tensor*>* first = nullptr;
  for (const auto& a : args) {
    if (!a.second->defined()) continue;
    if (first == nullptr) {
      first = &a;
      continue;
    }
    const Device d0 = first->second->device();
    const Device d = a.second->device();
    if (d != d0) {
      throw ContractError(op, a.first,
                          "is on " + d.str() + " but '" + std::string(first->first) + "' is on " + d0.str() +
                              " (an op's tensors live on one device)");
    }
  }
  return first != nullptr && on_gpu(*first->second);
}

void no_gpu_build(const char* op) {
  throw ContractError(op, "device", "tensors are on a GPU but this build has no CUDA kernels (configure with DSV4_CUDA=ON)");
}

}  // namespace dsv4::kernels
