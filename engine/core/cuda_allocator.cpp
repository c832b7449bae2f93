// Device memory through the CUDA runtime. Built only with DSV4_CUDA; the CPU build's versions of
// cuda_memory() and cuda_device_count() say there is no device.
#include <cuda_runtime.h>

#include <map>
#include <memory>
#include <mutex>
#include <new>
#include <stdexcept>
#include <string>

#include "engine/core/allocator.h"

namespace dsv4 {

namespace {

void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(e));
}

// Runs `fn` with `device` current and restores the caller's device.
template <class Fn>
void on_device(int device, Fn&& fn) {
  int previous = 0;
  check(cudaGetDevice(&previous), "cudaGetDevice");
  if (previous != device) check(cudaSetDevice(device), "cudaSetDevice");
  fn();
  if (previous != device) check(cudaSetDevice(previous), "cudaSetDevice");
}

class CudaMemory final : public MemorySpace {
 public:
  explicit CudaMemory(int index) : index_(index) {}
  Device device() const override { return Device{DeviceKind::cuda, index_}; }
  void* allocate_bytes(size_t bytes) override {
    void* p = nullptr;
    on_device(index_, [&] {
      if (cudaMalloc(&p, bytes == 0 ? 1 : bytes) != cudaSuccess) {
        (void)cudaGetLastError();
        throw std::bad_alloc();
      }
    });
    return p;
  }
  void free_bytes(void* ptr) override {
    on_device(index_, [&] { (void)cudaFree(ptr); });
  }
  // Copies are synchronous: they order after all work on the legacy default stream.
  void copy_to_host(void* dst, const void* src, size_t bytes) const override {
    if (bytes > 0) check(cudaMemcpy(dst, src, bytes, cudaMemcpyDeviceToHost), "cudaMemcpy D2H");
  }
  void copy_from_host(void* dst, const void* src, size_t bytes) const override {
    if (bytes == 0) return;
    check(cudaMemcpy(dst, src, bytes, cudaMemcpyHostToDevice), "cudaMemcpy H2D");
    // From pageable memory cudaMemcpy may return before the DMA lands; work on other streams
    // issued next must see the data.
    check(cudaStreamSynchronize(cudaStreamLegacy), "cudaStreamSynchronize after H2D");
  }
  void copy_within(void* dst, const void* src, size_t bytes) const override {
    if (bytes > 0) check(cudaMemcpy(dst, src, bytes, cudaMemcpyDeviceToDevice), "cudaMemcpy D2D");
  }
  void copy_within_async(void* dst, const void* src, size_t bytes, void* stream) const override {
    if (bytes > 0) {
      check(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, static_cast<cudaStream_t>(stream)),
            "cudaMemcpyAsync D2D");
    }
  }

 private:
  int index_;
};

}  // namespace

int cuda_device_count() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    (void)cudaGetLastError();  // no driver or no device: the CPU CI case
    return 0;
  }
  return count;
}

MemorySpace* cuda_memory(int device_index) {
  // Never destroyed, like host_memory(): static tensors may outlive main.
  static std::mutex* mutex = new std::mutex();
  static auto* spaces = new std::map<int, std::unique_ptr<CudaMemory>>();
  if (device_index < 0 || device_index >= cuda_device_count()) return nullptr;
  std::lock_guard<std::mutex> lock(*mutex);
  auto& slot = (*spaces)[device_index];
  if (!slot) slot = std::make_unique<CudaMemory>(device_index);
  return slot.get();
}

}  // namespace dsv4
