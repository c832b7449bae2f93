#include "engine/core/allocator.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <new>

#include "engine/core/error.h"

namespace dsv4 {

std::string Device::str() const {
  return kind == DeviceKind::host ? std::string("host") : "cuda:" + std::to_string(index);
}

std::string GuardDamage::describe() const {
  std::string where;
  if (first_offset < 0) {
    where = std::to_string(-first_offset) + " bytes before the start";
  } else {
    where = std::to_string(first_offset - static_cast<int64_t>(allocation_bytes)) + " bytes after the end";
  }
  return "guard damaged at " + where + " of '" + owner + "' (" + device.str() + ", " +
         std::to_string(allocation_bytes) + " bytes, " + std::to_string(damaged_bytes) +
         " damaged bytes)";
}

namespace {

class HostMemory final : public MemorySpace {
 public:
  Device device() const override { return Device{DeviceKind::host, 0}; }
  void* allocate_bytes(size_t bytes) override {
    void* p = std::aligned_alloc(256, std::max<size_t>(256, (bytes + 255) / 256 * 256));
    if (p == nullptr) throw std::bad_alloc();
    return p;
  }
  void free_bytes(void* ptr) override { std::free(ptr); }
  void copy_to_host(void* dst, const void* src, size_t bytes) const override {
    if (bytes > 0) std::memcpy(dst, src, bytes);
  }
  void copy_from_host(void* dst, const void* src, size_t bytes) const override {
    if (bytes > 0) std::memcpy(dst, src, bytes);
  }
  void copy_within(void* dst, const void* src, size_t bytes) const override {
    if (bytes > 0) std::memmove(dst, src, bytes);
  }
};

}  // namespace

MemorySpace& host_memory() {
  // Never destroyed: storages held by other static objects may be released after main returns.
  static HostMemory* memory = new HostMemory();
  return *memory;
}

#if !defined(DSV4_WITH_CUDA)
MemorySpace* cuda_memory(int) { return nullptr; }
int cuda_device_count() { return 0; }
#endif

std::vector<uint8_t> poison_pattern(DType dtype) {
  switch (dtype) {
    case DType::f32: return {0xAD, 0xDE, 0xC0, 0x7F};   // 0x7FC0DEAD, a quiet NaN
    case DType::f64: return {0xAD, 0xDE, 0xAD, 0xDE, 0x00, 0x00, 0xF8, 0x7F};
    case DType::bf16: return {0xC1, 0x7F};              // 0x7FC1
    case DType::f16: return {0x01, 0x7E};               // 0x7E01
    case DType::f8_e4m3fn: return {0x7F};
    case DType::f8_e4m3fnuz: return {0x80};
    case DType::f8_e5m2: return {0x7F};
    case DType::ue8m0: return {0xFF};
    case DType::f4_e2m1: return {0x77};  // no NaN in e2m1: +6 in both nibbles, the largest value
    case DType::i8:
    case DType::u8:
    case DType::boolean:  // 0xA5 is neither false nor true
    case DType::i32:
    case DType::i64:
      return {0xA5};
  }
  DSV4_ASSERT(false, "unknown dtype");
}

struct Storage::State {
  MemorySpace* space;
  AllocatorMode mode;
  mutable std::mutex mutex;
  std::vector<Storage*> live;
  std::vector<GuardDamage> released_damage;
};

Storage::Storage(std::shared_ptr<State> state, void* base, void* payload, size_t bytes, std::string owner)
    : state_(std::move(state)), base_(base), payload_(payload), bytes_(bytes), owner_(std::move(owner)) {}

Device Storage::device() const { return state_->space->device(); }
MemorySpace& Storage::space() const { return *state_->space; }

std::vector<GuardDamage> Storage::check_guards() const {
  if (state_->mode != AllocatorMode::testing) return {};
  const size_t g = Allocator::kGuardBytes;
  std::vector<uint8_t> before(g), after(g);
  state_->space->copy_to_host(before.data(), base_, g);
  state_->space->copy_to_host(after.data(), static_cast<uint8_t*>(payload_) + bytes_, g);
  std::vector<GuardDamage> out;
  auto scan = [&](const std::vector<uint8_t>& zone, int64_t zone_offset) {
    int64_t first = -1;
    int64_t count = 0;
    for (size_t i = 0; i < zone.size(); ++i) {
      if (zone[i] != Allocator::kGuardByte) {
        if (first < 0) first = static_cast<int64_t>(i);
        ++count;
      }
    }
    if (count > 0) {
      out.push_back(GuardDamage{owner_, device(), bytes_, zone_offset + first, count});
    }
  };
  scan(before, -static_cast<int64_t>(g));
  scan(after, static_cast<int64_t>(bytes_));
  return out;
}

Storage::~Storage() {
  std::vector<GuardDamage> damage;
  try {
    damage = check_guards();
  } catch (const std::exception& e) {
    // The guards cannot be read back (a CUDA context broken by a faulting kernel): they go unchecked.
    // A destructor that threw here would terminate the process while the fault's own error unwinds,
    // and the run would end as SIGABRT instead of that error.
    std::fprintf(stderr, "dsv4: guards of '%s' not checked: %s\n", owner_.c_str(), e.what());
  }
  {
    std::lock_guard<std::mutex> lock(state_->mutex);
    auto& live = state_->live;
    live.erase(std::remove(live.begin(), live.end(), this), live.end());
    for (auto& d : damage) {
      std::fprintf(stderr, "dsv4: %s\n", d.describe().c_str());
      state_->released_damage.push_back(std::move(d));
    }
  }
  state_->space->free_bytes(base_);
}

Allocator::Allocator(MemorySpace& space, AllocatorMode mode) : state_(std::make_shared<Storage::State>()) {
  state_->space = &space;
  state_->mode = mode;
}

Allocator::~Allocator() = default;

std::shared_ptr<Storage> Allocator::allocate(size_t bytes, DType dtype, std::string owner) {
  MemorySpace& space = *state_->space;
  const bool testing = state_->mode == AllocatorMode::testing;
  const size_t guard = testing ? kGuardBytes : 0;
  void* base = space.allocate_bytes(bytes + 2 * guard);
  void* payload = static_cast<uint8_t*>(base) + guard;
  if (testing) {
    // Guards and poison are written from a host image, so the same code serves device memory.
    std::vector<uint8_t> image(bytes + 2 * guard, kGuardByte);
    const std::vector<uint8_t> pattern = poison_pattern(dtype);
    for (size_t i = 0; i < bytes; ++i) image[guard + i] = pattern[i % pattern.size()];
    space.copy_from_host(base, image.data(), image.size());
  }
  auto storage = std::shared_ptr<Storage>(new Storage(state_, base, payload, bytes, std::move(owner)));
  std::lock_guard<std::mutex> lock(state_->mutex);
  state_->live.push_back(storage.get());
  return storage;
}

AllocatorMode Allocator::mode() const { return state_->mode; }
Device Allocator::device() const { return state_->space->device(); }
MemorySpace& Allocator::space() const { return *state_->space; }

std::vector<GuardDamage> Allocator::check_guards() const {
  std::lock_guard<std::mutex> lock(state_->mutex);
  std::vector<GuardDamage> out;
  for (const Storage* s : state_->live) {
    auto d = s->check_guards();
    out.insert(out.end(), d.begin(), d.end());
  }
  return out;
}

std::vector<GuardDamage> Allocator::released_damage() const {
  std::lock_guard<std::mutex> lock(state_->mutex);
  return state_->released_damage;
}

Allocator Allocator::of(const Storage& storage) { return Allocator(storage.state_); }

Allocator& default_host_allocator() {
  static Allocator* allocator = new Allocator(host_memory(), AllocatorMode::plain);
  return *allocator;
}

}  // namespace dsv4
