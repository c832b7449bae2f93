#include <cmath>
#include <cstring>
#include <stdexcept>

#include <gtest/gtest.h>

#include "engine/core/allocator.h"
#include "engine/core/tensor.h"

namespace dsv4 {
namespace {

TEST(Allocator, TestingModePoisonsFloatsWithNaN) {
  Allocator alloc(host_memory(), AllocatorMode::testing);
  for (DType d : {DType::f32, DType::bf16, DType::f16, DType::f8_e4m3fn, DType::f8_e4m3fnuz, DType::f8_e5m2,
                  DType::ue8m0, DType::f64}) {
    Tensor t = Tensor::empty({7}, d, alloc, "fresh");
    for (double v : t.values()) EXPECT_TRUE(std::isnan(v)) << dtype_name(d);
  }
}

TEST(Allocator, TestingModePoisonsIntegersWithASentinel) {
  Allocator alloc(host_memory(), AllocatorMode::testing);
  Tensor t = Tensor::empty({3}, DType::i32, alloc, "lens");
  EXPECT_EQ(t.data<uint32_t>()[0], 0xA5A5A5A5u);
  Tensor b = Tensor::empty({3}, DType::boolean, alloc, "mask");
  EXPECT_EQ(b.data<uint8_t>()[2], 0xA5);  // neither 0 nor 1
  Tensor f4 = Tensor::empty({4}, DType::f4_e2m1, alloc, "w");
  EXPECT_EQ(f4.values(), (std::vector<double>{6, 6, 6, 6}));  // e2m1 has no NaN: its largest value
}

TEST(Allocator, PlainModeHasNoGuards) {
  Allocator alloc(host_memory(), AllocatorMode::plain);
  Tensor t = Tensor::empty({4}, DType::f32, alloc, "x");
  EXPECT_TRUE(alloc.check_guards().empty());
}

TEST(Allocator, ReportsWriteAfterTheEndWithTheOwnerName) {
  Allocator alloc(host_memory(), AllocatorMode::testing);
  Tensor t = Tensor::empty({16}, DType::f32, alloc, "layers.0.attn.kv_cache");
  EXPECT_TRUE(alloc.check_guards().empty());
  t.data<float>()[16] = 1.0f;  // one element past the end: the bug a page size of 0 produced
  const auto damage = alloc.check_guards();
  ASSERT_EQ(damage.size(), 1u);
  EXPECT_EQ(damage[0].owner, "layers.0.attn.kv_cache");
  EXPECT_EQ(damage[0].first_offset, 64);
  const std::string text = damage[0].describe();
  EXPECT_NE(text.find("layers.0.attn.kv_cache"), std::string::npos);
  EXPECT_NE(text.find("after the end"), std::string::npos);
}

TEST(Allocator, ReportsWriteBeforeTheStart) {
  Allocator alloc(host_memory(), AllocatorMode::testing);
  Tensor t = Tensor::empty({8}, DType::u8, alloc, "state_rows");
  t.data<uint8_t>()[-3] = 0;
  const auto damage = alloc.check_guards();
  ASSERT_EQ(damage.size(), 1u);
  EXPECT_EQ(damage[0].first_offset, -3);
  EXPECT_NE(damage[0].describe().find("before the start of 'state_rows'"), std::string::npos);
}

TEST(Allocator, ReleaseChecksGuardsAndKeepsTheReport) {
  Allocator alloc(host_memory(), AllocatorMode::testing);
  {
    Tensor t = Tensor::empty({4}, DType::f32, alloc, "scratch");
    std::memset(t.data<uint8_t>() + 16, 0, 2);
  }
  const auto damage = alloc.released_damage();
  ASSERT_EQ(damage.size(), 1u);
  EXPECT_EQ(damage[0].owner, "scratch");
  EXPECT_EQ(damage[0].damaged_bytes, 2);
}

TEST(Allocator, ZeroByteAllocationsAreGuardedToo) {
  Allocator alloc(host_memory(), AllocatorMode::testing);
  Tensor t = Tensor::empty({0, 584}, DType::u8, alloc, "empty_page");
  EXPECT_TRUE(alloc.check_guards().empty());
  static_cast<uint8_t*>(t.storage()->data())[0] = 1;
  EXPECT_EQ(alloc.check_guards().size(), 1u);
}

TEST(Allocator, CopiesMadeFromAStorageUseItsAllocator) {
  Allocator alloc(host_memory(), AllocatorMode::testing);
  Tensor t = Tensor::from_values({2, 3}, DType::f32, {1, 2, 3, 4, 5, 6}, "src");
  Tensor guarded = t.to(alloc);
  Tensor copy = guarded.transpose(0, 1).contiguous();
  EXPECT_EQ(copy.values(), (std::vector<double>{1, 4, 2, 5, 3, 6}));
  copy.data<float>()[6] = 0;
  EXPECT_EQ(alloc.check_guards().size(), 1u);
}

// Host memory whose reads back to the host can be made to fail, as a CUDA context does after a
// kernel faults (cudaMemcpy: "unspecified launch failure").
class BreakableMemory : public MemorySpace {
 public:
  bool broken = false;
  Device device() const override { return host_memory().device(); }
  void* allocate_bytes(size_t bytes) override { return host_memory().allocate_bytes(bytes); }
  void free_bytes(void* ptr) override { host_memory().free_bytes(ptr); }
  void copy_to_host(void* dst, const void* src, size_t bytes) const override {
    if (broken) throw std::runtime_error("cudaMemcpy D2H: unspecified launch failure");
    host_memory().copy_to_host(dst, src, bytes);
  }
  void copy_from_host(void* dst, const void* src, size_t bytes) const override {
    host_memory().copy_from_host(dst, src, bytes);
  }
  void copy_within(void* dst, const void* src, size_t bytes) const override { host_memory().copy_within(dst, src, bytes); }
};

// A tensor released while its guards cannot be read (the error that broke the device is unwinding
// the run) is freed without throwing: a throwing destructor would end the process in SIGABRT (seen
// on an H100, where three faults' cases ended so instead of with the launch failure).
TEST(Allocator, ReleaseWithUnreadableGuardsDoesNotThrow) {
  BreakableMemory memory;
  Allocator alloc(memory, AllocatorMode::testing);
  try {
    Tensor t = Tensor::empty({4}, DType::f32, alloc, "victim");
    memory.broken = true;
    throw std::runtime_error("the launch failure");
  } catch (const std::runtime_error& e) {
    EXPECT_STREQ(e.what(), "the launch failure");  // reached: ~Storage did not terminate the process
  }
  memory.broken = false;
  EXPECT_TRUE(alloc.check_guards().empty());
}

}  // namespace
}  // namespace dsv4
