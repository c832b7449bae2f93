// One allocator interface for host and device memory. In testing mode every allocation gets guard
// bytes on both sides and fresh memory is filled with poison (NaN for floats, a sentinel for
// integers), so an out-of-bounds write or a read of never-written memory shows up, named by the
// tensor that owns the allocation.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "engine/core/dtype.h"

namespace dsv4 {

enum class DeviceKind : uint8_t { host, cuda };

struct Device {
  DeviceKind kind = DeviceKind::host;
  int index = 0;
  std::string str() const;  // "host", "cuda:0"
  bool operator==(const Device&) const = default;
};

// Raw memory of one memory space.
class MemorySpace {
 public:
  virtual ~MemorySpace() = default;
  virtual Device device() const = 0;
  virtual void* allocate_bytes(size_t bytes) = 0;  // never nullptr; throws std::bad_alloc
  virtual void free_bytes(void* ptr) = 0;
  virtual void copy_to_host(void* dst_host, const void* src, size_t bytes) const = 0;
  virtual void copy_from_host(void* dst, const void* src_host, size_t bytes) const = 0;
  virtual void copy_within(void* dst, const void* src, size_t bytes) const = 0;
  // A copy ordered on a device stream (a cudaStream_t for CUDA memory); the host copies at once.
  virtual void copy_within_async(void* dst, const void* src, size_t bytes, void* stream) const {
    (void)stream;
    copy_within(dst, src, bytes);
  }
};

MemorySpace& host_memory();
// The CUDA device's memory, or nullptr when the build has no CUDA or the device does not exist.
MemorySpace* cuda_memory(int device_index);
int cuda_device_count();  // 0 without CUDA

enum class AllocatorMode : uint8_t {
  plain,
  testing,  // guard bytes around every allocation, poison in fresh memory
};

// A byte range of the guard zone that no longer holds the guard pattern.
struct GuardDamage {
  std::string owner;        // the tensor (or buffer) name given at allocation
  Device device;
  size_t allocation_bytes;  // the payload size
  int64_t first_offset;     // relative to the payload start: negative = before it, >= allocation_bytes = after
  int64_t damaged_bytes;
  std::string describe() const;
};

class Allocator;

// One allocation. Frees itself (checking its guards in testing mode) when the last owner goes.
class Storage {
 public:
  ~Storage();
  Storage(const Storage&) = delete;
  Storage& operator=(const Storage&) = delete;

  void* data() const { return payload_; }
  size_t bytes() const { return bytes_; }
  const std::string& owner() const { return owner_; }
  Device device() const;
  MemorySpace& space() const;
  // Guard damage of this allocation now (empty when intact or not guarded).
  std::vector<GuardDamage> check_guards() const;

 private:
  friend class Allocator;
  struct State;
  Storage(std::shared_ptr<State> state, void* base, void* payload, size_t bytes, std::string owner);
  std::shared_ptr<State> state_;
  void* base_;
  void* payload_;
  size_t bytes_;
  std::string owner_;
};

class Allocator {
 public:
  static constexpr size_t kGuardBytes = 256;  // keeps the payload 256-byte aligned
  static constexpr uint8_t kGuardByte = 0xCD;

  explicit Allocator(MemorySpace& space, AllocatorMode mode = AllocatorMode::plain);
  ~Allocator();

  // `dtype` picks the poison pattern in testing mode; `owner` names the allocation in reports.
  std::shared_ptr<Storage> allocate(size_t bytes, DType dtype, std::string owner);

  AllocatorMode mode() const;
  Device device() const;
  MemorySpace& space() const;
  // Every live allocation's damage, and the damage found when allocations were released.
  std::vector<GuardDamage> check_guards() const;
  std::vector<GuardDamage> released_damage() const;

  // The allocator a storage came from (same memory space and mode), for copies made from it.
  static Allocator of(const Storage& storage);

 private:
  explicit Allocator(std::shared_ptr<Storage::State> state) : state_(std::move(state)) {}
  std::shared_ptr<Storage::State> state_;
};

// The bytes that fresh memory of `dtype` is filled with in testing mode (one element's worth,
// or one byte for sub-byte types).
std::vector<uint8_t> poison_pattern(DType dtype);

// A process-wide plain host allocator, for tensors that need no testing mode.
Allocator& default_host_allocator();

}  // namespace dsv4
