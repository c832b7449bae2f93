// The cuda runtime backend across GPUs (label multigpu, 2 GPUs): NCCL all-gather, send/recv,
// all-reduce and barrier over the GPUs one process drives; a collective whose peer never issues its
// part is a hang naming the ranks; and one process per GPU (nccl_rank_worker), where a rank that
// stops sending ends its peer's synchronization at the deadline in a HangError. Skipped with fewer
// than 2 GPUs.
#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdlib>
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

// ---- two GPUs ----

struct TwoRanks {
  CudaRuntime rt;
  StreamId s0, s1;
  int comm;
  TwoRanks() : rt(two_devices(), CudaOptions{}) {
    s0 = rt.create_stream(0, "rank0");
    s1 = rt.create_stream(1, "rank1");
    comm = rt.create_communicator({s0, s1}, "pp");
  }
  static RuntimeOptions two_devices() {
    RuntimeOptions o;
    o.devices = 2;
    return o;
  }
  void sync() {
    rt.synchronize(s0);
    rt.synchronize(s1);
  }
};

std::vector<float> ramp(int n, float base) {
  std::vector<float> v(static_cast<size_t>(n));
  for (int i = 0; i < n; ++i) v[static_cast<size_t>(i)] = base + static_cast<float>(i);
  return v;
}

TEST(CudaRuntimeMultiGpu, AllGatherThroughNccl) {
  DSV4_REQUIRE_GPUS(2);
  TwoRanks t;
  constexpr int n = 1000;
  BufferId send[2], recv[2];
  for (int r = 0; r < 2; ++r) {
    send[r] = t.rt.alloc(r, n * sizeof(float), "send" + std::to_string(r));
    recv[r] = t.rt.alloc(r, 2 * n * sizeof(float), "recv" + std::to_string(r));
    upload_f32(t.rt, send[r], ramp(n, 10000.0f * static_cast<float>(r)));
  }
  for (int r = 0; r < 2; ++r) t.rt.all_gather(t.comm, r, t.rt.all(send[r]), t.rt.all(recv[r]));
  t.sync();
  std::vector<float> expected = ramp(n, 0.0f);
  const std::vector<float> second = ramp(n, 10000.0f);
  expected.insert(expected.end(), second.begin(), second.end());
  for (int r = 0; r < 2; ++r) EXPECT_EQ(download_f32(t.rt, recv[r]), expected) << "rank " << r;
}

TEST(CudaRuntimeMultiGpu, SendRecvThroughNccl) {
  DSV4_REQUIRE_GPUS(2);
  TwoRanks t;
  constexpr int n = 1 << 18;  // 1 MiB
  const BufferId a = t.rt.alloc(0, n * sizeof(float), "activations");
  const BufferId b = t.rt.alloc(1, n * sizeof(float), "activations_in");
  const BufferId back = t.rt.alloc(0, n * sizeof(float), "grad_in");
  upload_f32(t.rt, a, ramp(n, 0.5f));
  upload_f32(t.rt, b, std::vector<float>(n, 0.0f));
  // Rank 1 posts its recv first: matching does not depend on which side issues first.
  t.rt.recv(t.comm, 1, 0, t.rt.all(b));
  t.rt.send(t.comm, 0, 1, t.rt.all(a));
  t.rt.send(t.comm, 1, 0, t.rt.all(b));
  t.rt.recv(t.comm, 0, 1, t.rt.all(back));
  t.sync();
  EXPECT_EQ(download_f32(t.rt, b), ramp(n, 0.5f));
  EXPECT_EQ(download_f32(t.rt, back), ramp(n, 0.5f));
}

TEST(CudaRuntimeMultiGpu, AllReduceAndBarrierThroughNccl) {
  DSV4_REQUIRE_GPUS(2);
  TwoRanks t;
  constexpr int n = 4096;
  BufferId send[2], recv[2];
  for (int r = 0; r < 2; ++r) {
    send[r] = t.rt.alloc(r, n * sizeof(float), "partial" + std::to_string(r));
    recv[r] = t.rt.alloc(r, n * sizeof(float), "sum" + std::to_string(r));
    std::vector<float> v(n);
    for (int i = 0; i < n; ++i) v[static_cast<size_t>(i)] = static_cast<float>((r + 1) * i);
    upload_f32(t.rt, send[r], v);
  }
  for (int r = 0; r < 2; ++r) t.rt.all_reduce_sum_f32(t.comm, r, t.rt.all(send[r]), t.rt.all(recv[r]));
  for (int r = 0; r < 2; ++r) t.rt.barrier(t.comm, r);
  t.sync();
  std::vector<float> expected(n);
  for (int i = 0; i < n; ++i) expected[static_cast<size_t>(i)] = static_cast<float>(3 * i);
  for (int r = 0; r < 2; ++r) EXPECT_EQ(download_f32(t.rt, recv[r]), expected) << "rank " << r;
}

__global__ void double_kernel(const float* in, float* out, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) out[i] = 2.0f * in[i];
}

// One process drives both ranks: a part whose peer never issues its own can never match, so
// synchronizing its stream is a hang at once, naming the collective, the rank and the missing rank.
TEST(CudaRuntimeMultiGpu, AnUnmatchedRecvIsAHangNamingTheSilentRank) {
  DSV4_REQUIRE_GPUS(2);
  TwoRanks t;
  const BufferId in = t.rt.alloc(1, 1024 * sizeof(float), "stage_input");
  upload_f32(t.rt, in, std::vector<float>(1024, 0.0f));
  t.rt.recv(t.comm, 1, 0, t.rt.all(in));
  try {
    t.rt.synchronize(t.s1);
    ADD_FAILURE() << "synchronize returned";
  } catch (const HangError& e) {
    EXPECT_EQ(e.kernel(), "recv");
    const std::string what = e.what();
    EXPECT_NE(what.find("recv of 'pp' (rank 1) waits for rank 0, which never issued the matching send"), std::string::npos)
        << what;
  }
  try {
    t.rt.synchronize_device(1);
    ADD_FAILURE() << "synchronize_device returned";
  } catch (const HangError& e) {
    EXPECT_NE(std::string(e.what()).find("rank 0"), std::string::npos) << e.what();
  }
  // Work issued behind the recv is held back, as the GPU would hold it behind the collective: when
  // the silent rank sends after all, the pair runs first and the doubling reads what arrived.
  constexpr int n = 1024;
  const BufferId doubled = t.rt.alloc(1, n * sizeof(float), "doubled");
  float* src = ptr<float>(t.rt, in);
  float* dst = ptr<float>(t.rt, doubled);
  t.rt.launch(t.s1, launch_of("stage1.layers", {reads(t.rt, in), writes(t.rt, doubled)}, [=](cudaStream_t s) {
    double_kernel<<<(n + 255) / 256, 256, 0, s>>>(src, dst, n);
  }));
  const BufferId out = t.rt.alloc(0, n * sizeof(float), "stage_output");
  upload_f32(t.rt, out, ramp(n, 1.0f));
  t.rt.send(t.comm, 0, 1, t.rt.all(out));
  t.sync();
  std::vector<float> expected = ramp(n, 1.0f);
  for (float& v : expected) v *= 2.0f;
  EXPECT_EQ(download_f32(t.rt, doubled), expected);
}

TEST(CudaRuntimeMultiGpu, AnAllGatherARankNeverJoinsIsAHang) {
  DSV4_REQUIRE_GPUS(2);
  TwoRanks t;
  const BufferId send = t.rt.alloc(0, 64, "send0");
  const BufferId recv = t.rt.alloc(0, 128, "recv0");
  t.rt.all_gather(t.comm, 0, t.rt.all(send), t.rt.all(recv));
  try {
    t.rt.synchronize(t.s0);
    ADD_FAILURE() << "synchronize returned";
  } catch (const HangError& e) {
    EXPECT_EQ(e.kernel(), "all_gather");
    EXPECT_NE(std::string(e.what()).find("waits for rank 1, which never issued its part"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace dsv4::rt

// ---- one process per GPU -------------------------------------------------------------------------

#include <spawn.h>
#include <sys/wait.h>

#include <chrono>
#include <filesystem>
#include <thread>

extern char** environ;

namespace dsv4::rt {
namespace {

// Runs nccl_rank_worker as ranks 0 and 1, one GPU each; a failure unless both exit 0 within 120 s.
void run_two_rank_processes(const std::vector<std::string>& extra_args) {
  const std::string dir = ::testing::TempDir() + "/dsv4_nccl_" + std::to_string(getpid());
  std::filesystem::remove_all(dir);
  std::filesystem::create_directories(dir);
  const std::string file = dir + "/id";
  // Rank r gets the r-th GPU this test may use (ctest's resource groups set CUDA_VISIBLE_DEVICES).
  std::vector<std::string> gpus;
  if (const char* visible = std::getenv("CUDA_VISIBLE_DEVICES"); visible != nullptr && *visible != '\0') {
    std::string list = visible;
    for (size_t at = 0; at <= list.size();) {
      const size_t comma = std::min(list.find(',', at), list.size());
      gpus.push_back(list.substr(at, comma - at));
      at = comma + 1;
    }
  }
  std::vector<pid_t> pids;
  for (int rank = 0; rank < 2; ++rank) {
    const std::string gpu = static_cast<size_t>(rank) < gpus.size() ? gpus[static_cast<size_t>(rank)] : std::to_string(rank);
    std::vector<std::string> env_strings = {"CUDA_VISIBLE_DEVICES=" + gpu};
    for (char** e = environ; *e != nullptr; ++e) {
      if (std::string(*e).rfind("CUDA_VISIBLE_DEVICES=", 0) != 0) env_strings.emplace_back(*e);
    }
    std::vector<char*> envp;
    for (auto& s : env_strings) envp.push_back(s.data());
    envp.push_back(nullptr);
    std::vector<std::string> args = {DSV4_NCCL_WORKER, std::to_string(rank), "2", file};
    args.insert(args.end(), extra_args.begin(), extra_args.end());
    std::vector<char*> argv;
    for (auto& a : args) argv.push_back(a.data());
    argv.push_back(nullptr);
    pid_t pid = 0;
    ASSERT_EQ(posix_spawn(&pid, args[0].c_str(), nullptr, nullptr, argv.data(), envp.data()), 0) << args[0];
    pids.push_back(pid);
  }
  // Each rank has a deadline of its own (60 s at most); give them 120 s before killing.
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(120);
  for (pid_t pid : pids) {
    int status = 0;
    while (waitpid(pid, &status, WNOHANG) == 0) {
      if (std::chrono::steady_clock::now() > deadline) {
        kill(pid, SIGKILL);
        waitpid(pid, &status, 0);
        ADD_FAILURE() << "rank process " << pid << " did not finish";
        break;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << "rank process exit status " << status;
  }
  std::filesystem::remove_all(dir);
}

TEST(CudaRuntimeMultiProcess, TwoProcessesAllGatherAndSendRecvThroughNccl) {
  if (cuda_device_count() < 2) GTEST_SKIP() << "needs 2 GPUs";
  run_two_rank_processes({});
}

// A rank that stops sending: its peer's recv never completes on the GPU, and the peer's
// synchronization ends at its deadline in a HangError naming the recv, the rank and the
// communicator, instead of a stuck job (the worker checks the text).
TEST(CudaRuntimeMultiProcess, ARankThatStopsSendingIsAHangAtTheDeadline) {
  if (cuda_device_count() < 2) GTEST_SKIP() << "needs 2 GPUs";
  run_two_rank_processes({"silent-sender"});
}

}  // namespace
}  // namespace dsv4::rt
