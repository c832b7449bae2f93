// GPU tests of the `cuda` runtime backend on one GPU: stream/event ordering on real hardware (and a
// missing wait really races), fork/join graph capture replayed with inputs updated in place, the
// watchdog naming a kernel that never finishes while the process stays usable. The NCCL tests across
// GPUs are in test_runtime_multigpu.cu.
#include <chrono>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include <gtest/gtest.h>

#include "engine/core/allocator.h"
#include "engine/core/error.h"
#include "engine/runtime/cuda_runtime.h"
#include "tests/gpu/gpu_test.h"
#include "tests/gpu/runtime_test_util.h"

namespace dsv4::rt {
namespace {

using namespace gpu_testing;

__device__ unsigned long long now_ns() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

__device__ void spin_ns(unsigned long long ns) {
  const unsigned long long start = now_ns();
  while (now_ns() - start < ns) {
  }
}

// The producer writes data[i] = i + 1 after an optional spin (to make a missing wait visible).
__global__ void produce(float* data, int n, unsigned long long delay_ns) {
  if (delay_ns > 0) spin_ns(delay_ns);
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) data[i] = static_cast<float>(i + 1);
}

__global__ void scale(const float* in, float* out, float factor, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) out[i] = in[i] * factor;
}

__global__ void add_scalar(const float* in, float* out, float value, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) out[i] = in[i] + value;
}

__global__ void add(const float* a, const float* b, float* out, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) out[i] = a[i] + b[i];
}

// A persistent-kernel barrier that can never fill: each block arrives once, then waits for one
// arrival more than there are blocks. It bails out after `bail_ns` so the GPU is freed.
__global__ void wait_for_counter(unsigned int* counter, unsigned int* bailed, unsigned long long bail_ns) {
  if (threadIdx.x != 0) return;
  atomicAdd(counter, 1u);
  const unsigned long long start = now_ns();
  while (atomicAdd(counter, 0u) < gridDim.x + 1) {
    if (now_ns() - start > bail_ns) {
      atomicExch(bailed, 1u);
      return;
    }
  }
}

constexpr int kThreads = 256;
int blocks(int n) { return (n + kThreads - 1) / kThreads; }

// Producer on one stream, consumer on another; `with_wait` decides whether the consumer's stream
// waits for the producer's event. Returns what the consumer computed.
std::vector<float> producer_consumer(bool with_wait, unsigned long long producer_delay_ns) {
  CudaRuntime rt(RuntimeOptions{}, CudaOptions{});
  constexpr int n = 4096;
  const StreamId producer = rt.create_stream(0, "producer");
  const StreamId consumer = rt.create_stream(0, "consumer");
  const EventId ready = rt.create_event("ready");
  const BufferId data = rt.alloc(0, n * sizeof(float), "data");
  const BufferId out = rt.alloc(0, n * sizeof(float), "out");
  upload_f32(rt, data, std::vector<float>(n, 0.0f));
  upload_f32(rt, out, std::vector<float>(n, -1.0f));
  float* d = ptr<float>(rt, data);
  float* o = ptr<float>(rt, out);
  // Load both kernels first: with lazy module loading, a kernel's first launch may wait for the
  // kernel that is running, which would serialize the race away.
  rt.launch(producer, launch_of("warm_up", {}, [=](cudaStream_t s) {
              produce<<<1, 1, 0, s>>>(d, 0, 0);
              scale<<<1, 1, 0, s>>>(d, o, 2.0f, 0);
            }));
  rt.synchronize(producer);
  rt.launch(producer, launch_of("produce", {writes(rt, data)}, [=](cudaStream_t s) {
              produce<<<blocks(n), kThreads, 0, s>>>(d, n, producer_delay_ns);
            }));
  rt.record(ready, producer);
  if (with_wait) rt.wait(consumer, ready);
  rt.launch(consumer, launch_of("consume", {reads(rt, data), writes(rt, out)}, [=](cudaStream_t s) {
              scale<<<blocks(n), kThreads, 0, s>>>(d, o, 2.0f, n);
            }));
  rt.synchronize(consumer);
  rt.synchronize(producer);
  return download_f32(rt, out);
}

std::vector<float> expected_doubled(int n) {
  std::vector<float> e(static_cast<size_t>(n));
  for (int i = 0; i < n; ++i) e[static_cast<size_t>(i)] = 2.0f * static_cast<float>(i + 1);
  return e;
}

TEST(CudaRuntime, SynchronizedProducerConsumerIsCorrect) {
  DSV4_REQUIRE_GPUS(1);
  EXPECT_EQ(producer_consumer(/*with_wait=*/true, 50'000'000ull), expected_doubled(4096));
}

TEST(CudaRuntime, MissingWaitRacesOnHardware) {
  DSV4_REQUIRE_GPUS(1);
  // The consumer runs while the producer still spins: it reads the zeros the buffer held.
  const std::vector<float> got = producer_consumer(/*with_wait=*/false, 50'000'000ull);
  EXPECT_NE(got, expected_doubled(4096));
  int stale = 0;
  for (float v : got) stale += v == 0.0f ? 1 : 0;
  EXPECT_GT(stale, 0) << "no element read the value from before the producer wrote";
}

TEST(CudaRuntime, CopyIsOrderedOnItsStream) {
  DSV4_REQUIRE_GPUS(1);
  CudaRuntime rt(RuntimeOptions{}, CudaOptions{});
  constexpr int n = 1024;
  const StreamId s = rt.create_stream(0, "main");
  const BufferId src = rt.alloc(0, n * sizeof(float), "src");
  const BufferId dst = rt.alloc(0, n * sizeof(float), "dst");
  upload_f32(rt, src, std::vector<float>(n, 0.0f));
  upload_f32(rt, dst, std::vector<float>(n, 0.0f));
  float* p = ptr<float>(rt, src);
  // A slow producer then a copy of its output on the same stream: the copy must see the writes.
  rt.launch(s, launch_of("produce", {writes(rt, src)}, [=](cudaStream_t st) { produce<<<blocks(n), kThreads, 0, st>>>(p, n, 20'000'000ull); }));
  rt.copy(s, rt.all(dst), rt.all(src));
  rt.synchronize(s);
  std::vector<float> expected(n);
  for (int i = 0; i < n; ++i) expected[static_cast<size_t>(i)] = static_cast<float>(i + 1);
  EXPECT_EQ(download_f32(rt, dst), expected);
}

// x -> a = 2x (main) | b = x + 1 (side) -> out = a + b (main) -> copy of out (main).
struct ForkJoin {
  static constexpr int n = 2048;
  StreamId main, side;
  EventId fork, join;
  BufferId x, a, b, out, out_copy;

  explicit ForkJoin(Runtime& rt)
      : main(rt.create_stream(0, "main")),
        side(rt.create_stream(0, "side")),
        fork(rt.create_event("fork")),
        join(rt.create_event("join")),
        x(rt.alloc(0, n * sizeof(float), "x")),
        a(rt.alloc(0, n * sizeof(float), "a")),
        b(rt.alloc(0, n * sizeof(float), "b")),
        out(rt.alloc(0, n * sizeof(float), "out")),
        out_copy(rt.alloc(0, n * sizeof(float), "out_copy")) {}

  void issue(Runtime& rt) {
    float* px = ptr<float>(rt, x);
    float* pa = ptr<float>(rt, a);
    float* pb = ptr<float>(rt, b);
    float* po = ptr<float>(rt, out);
    rt.launch(main, launch_of("double", {reads(rt, x), writes(rt, a)}, [=](cudaStream_t s) {
                scale<<<blocks(n), kThreads, 0, s>>>(px, pa, 2.0f, n);
              }));
    rt.record(fork, main);
    rt.wait(side, fork);
    // Slow enough that a join edge missing from the graph would show.
    rt.launch(side, launch_of("plus_one", {reads(rt, x), writes(rt, b)}, [=](cudaStream_t s) {
                produce<<<1, 1, 0, s>>>(pb, 0, 5'000'000ull);
                add_scalar<<<blocks(n), kThreads, 0, s>>>(px, pb, 1.0f, n);
              }));
    rt.record(join, side);
    rt.wait(main, join);
    rt.launch(main, launch_of("sum", {reads(rt, a), reads(rt, b), writes(rt, out)}, [=](cudaStream_t s) {
                add<<<blocks(n), kThreads, 0, s>>>(pa, pb, po, n);
              }));
    rt.copy(main, rt.all(out_copy), rt.all(out));
  }
};

std::vector<float> input_for(int round, int n) {
  std::vector<float> v(static_cast<size_t>(n));
  for (int i = 0; i < n; ++i) v[static_cast<size_t>(i)] = static_cast<float>((i * 7 + round * 131) % 1000) * 0.25f;
  return v;
}

TEST(CudaRuntime, ForkJoinGraphReplaysEqualEager) {
  DSV4_REQUIRE_GPUS(1);
  constexpr int n = ForkJoin::n;
  // Eager, one fresh runtime, per input.
  std::vector<std::vector<float>> eager;
  {
    CudaRuntime rt(RuntimeOptions{}, CudaOptions{});
    ForkJoin p(rt);
    for (int round = 0; round < 3; ++round) {
      upload_f32(rt, p.x, input_for(round, n));
      p.issue(rt);
      rt.synchronize(p.main);
      eager.push_back(download_f32(rt, p.out_copy));
      EXPECT_EQ(eager.back(), download_f32(rt, p.out));
    }
  }
  for (int round = 0; round < 3; ++round) {
    const std::vector<float> in = input_for(round, n);
    for (int i = 0; i < n; ++i) {
      ASSERT_EQ(eager[static_cast<size_t>(round)][static_cast<size_t>(i)], 3.0f * in[static_cast<size_t>(i)] + 1.0f);
    }
  }

  CudaRuntime rt(RuntimeOptions{}, CudaOptions{});
  ForkJoin p(rt);
  upload_f32(rt, p.x, std::vector<float>(n, 0.0f));
  rt.begin_capture(p.main);
  p.issue(rt);
  const GraphId g = rt.end_capture(p.main);
  // double, plus_one, sum, copy: sum joins both branches.
  const GraphTopology& topo = rt.topology(g);
  ASSERT_EQ(topo.nodes.size(), 4u);
  EXPECT_EQ(topo.nodes[2].predecessors, (std::vector<int>{0, 1}));
  for (int round = 0; round < 3; ++round) {
    // Inputs updated in place between replays: the graph reads the buffer, not a snapshot.
    upload_f32(rt, p.x, input_for(round, n));
    upload_f32(rt, p.out_copy, std::vector<float>(n, -1.0f));
    rt.replay(g, p.main);
    rt.synchronize(p.main);
    EXPECT_EQ(download_f32(rt, p.out_copy), eager[static_cast<size_t>(round)]) << "replay " << round;
    EXPECT_EQ(download_f32(rt, p.out), eager[static_cast<size_t>(round)]) << "replay " << round;
  }
}

TEST(CudaRuntime, TimeOpsSumsEachOpsLaunchesOutsideCaptures) {
  DSV4_REQUIRE_GPUS(1);
  CudaRuntime rt(RuntimeOptions{}, CudaOptions{});
  constexpr int n = 4096;
  const StreamId main = rt.create_stream(0, "main");
  const BufferId data = rt.alloc(0, n * sizeof(float), "data");
  const BufferId out = rt.alloc(0, n * sizeof(float), "out");
  float* d = ptr<float>(rt, data);
  float* o = ptr<float>(rt, out);
  const auto slow = [&] {  // 20 ms of spinning
    rt.launch(main, launch_of("slow", {writes(rt, data)}, [=](cudaStream_t s) {
                produce<<<blocks(n), kThreads, 0, s>>>(d, n, 20'000'000);
              }));
  };
  const auto fast = [&] {
    rt.launch(main, launch_of("fast", {reads(rt, data), writes(rt, out)}, [=](cudaStream_t s) {
                scale<<<blocks(n), kThreads, 0, s>>>(d, o, 2.0f, n);
              }));
  };
  fast();  // not timed
  rt.time_ops(true);
  slow();
  fast();
  slow();
  // A capture is not timed, nor are its replays.
  rt.begin_capture(main);
  fast();
  const GraphId g = rt.end_capture(main);
  rt.replay(g, main);
  EXPECT_THROW((void)rt.op_times(), std::logic_error);  // the spin is still running
  rt.synchronize(main);
  const std::vector<OpTime> times = rt.op_times();
  ASSERT_EQ(times.size(), 2u);
  EXPECT_EQ(times[0].op, "slow");
  EXPECT_EQ(times[0].launches, 2);
  EXPECT_GE(times[0].ms, 39.0);  // two spins of 20 ms
  EXPECT_EQ(times[1].op, "fast");
  EXPECT_EQ(times[1].launches, 1);
  EXPECT_GT(times[1].ms, 0.0);
  EXPECT_LT(times[1].ms, times[0].ms);
  EXPECT_TRUE(rt.op_times().empty());  // read once
  rt.time_ops(false);
  fast();
  rt.synchronize(main);
  EXPECT_TRUE(rt.op_times().empty());
}

TEST(CudaRuntime, WatchdogNamesTheKernelThatNeverFinishes) {
  DSV4_REQUIRE_GPUS(1);
  CudaOptions cuda;
  cuda.sync_deadline_s = 1.0;
  CudaRuntime rt(RuntimeOptions{}, cuda);
  const StreamId s = rt.create_stream(0, "persistent");
  const StreamId other = rt.create_stream(0, "other");
  const EventId after = rt.create_event("after_persistent");
  const BufferId counter = rt.alloc(0, sizeof(unsigned int), "counter");
  const BufferId bailed = rt.alloc(0, sizeof(unsigned int), "bailed");
  const unsigned int zero = 0;
  rt.upload(counter, 0, &zero, sizeof zero);
  rt.upload(bailed, 0, &zero, sizeof zero);
  unsigned int* pc = ptr<unsigned int>(rt, counter);
  unsigned int* pb = ptr<unsigned int>(rt, bailed);
  const auto start = std::chrono::steady_clock::now();
  rt.launch(s, launch_of("persistent_barrier", {writes(rt, counter), writes(rt, bailed)}, [=](cudaStream_t st) {
              wait_for_counter<<<4, 32, 0, st>>>(pc, pb, 4'000'000'000ull);
            }));
  rt.record(after, s);
  rt.wait(other, after);

  try {
    rt.synchronize(s);
    FAIL() << "synchronize returned while the kernel spins";
  } catch (const HangError& e) {
    const double took = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    EXPECT_EQ(e.kernel(), "persistent_barrier");
    EXPECT_NE(std::string(e.what()).find("stream 'persistent'"), std::string::npos) << e.what();
    EXPECT_GE(took, 0.95);
    EXPECT_LT(took, 1.5);
  }
  // A stream blocked behind the hung one: the report still names the kernel it waits for.
  try {
    rt.synchronize(other);
    FAIL() << "synchronize returned while the awaited kernel spins";
  } catch (const HangError& e) {
    EXPECT_EQ(e.kernel(), "persistent_barrier") << e.what();
    EXPECT_NE(std::string(e.what()).find("stream 'other' waits on stream 'persistent'"), std::string::npos) << e.what();
  }
  try {
    rt.synchronize(after);
    FAIL() << "synchronize returned while the recorded kernel spins";
  } catch (const HangError& e) {
    EXPECT_EQ(e.kernel(), "persistent_barrier") << e.what();
  }
  EXPECT_FALSE(rt.query(after));

  // The kernel bails out after ~4 s; from then on the runtime works as before.
  bool finished = false;
  for (int attempt = 0; attempt < 10 && !finished; ++attempt) {
    try {
      rt.synchronize(s);
      finished = true;
    } catch (const HangError&) {
    }
  }
  ASSERT_TRUE(finished);
  rt.synchronize(other);
  unsigned int flag = 0;
  rt.download(bailed, 0, &flag, sizeof flag);
  EXPECT_EQ(flag, 1u);

  constexpr int n = 256;
  const BufferId data = rt.alloc(0, n * sizeof(float), "data");
  float* pd = ptr<float>(rt, data);
  rt.launch(s, launch_of("produce", {writes(rt, data)}, [=](cudaStream_t st) { produce<<<1, n, 0, st>>>(pd, n, 0); }));
  rt.synchronize_device(0);
  const std::vector<float> got = download_f32(rt, data);
  for (int i = 0; i < n; ++i) EXPECT_EQ(got[static_cast<size_t>(i)], static_cast<float>(i + 1));
}

TEST(CudaRuntime, LaunchWithoutCudaImplementationIsAContractError) {
  DSV4_REQUIRE_GPUS(1);
  CudaRuntime rt(RuntimeOptions{}, CudaOptions{});
  const StreamId s = rt.create_stream(0, "main");
  Launch l;
  l.op = "host_only_kernel";
  l.host = [] {};
  try {
    rt.launch(s, l);
    FAIL() << "a launch without a CUDA body was accepted";
  } catch (const ContractError& e) {
    EXPECT_EQ(e.op(), "host_only_kernel");
    EXPECT_EQ(e.rule(), "has no CUDA implementation");
  }
  rt.synchronize(s);  // nothing was enqueued; the stream is fine
}

TEST(CudaRuntime, RefusesMoreDevicesThanPresent) {
  DSV4_REQUIRE_GPUS(1);
  RuntimeOptions options;
  options.devices = cuda_device_count() + 1;
  EXPECT_THROW(CudaRuntime(options, CudaOptions{}), std::runtime_error);
}

}  // namespace
}  // namespace dsv4::rt
