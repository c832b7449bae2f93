// One rank of a communicator spanning processes (one process per GPU), started by
// test_runtime_cuda's multi-process tests: `nccl_rank_worker RANK WORLD RENDEZVOUS_FILE [silent-sender]`,
// with CUDA_VISIBLE_DEVICES naming this rank's GPU. Exits 0 when all-gather, a send/recv ring and a
// barrier give the right data; 1 (with a message) otherwise.
// With `silent-sender` (two ranks): after one exchange rank 0 stops sending; rank 1 receives from it
// again with a 3 s deadline and exits 0 when its synchronization ends in a HangError naming the recv,
// its rank and the communicator.
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <filesystem>
#include <string>
#include <thread>
#include <vector>

#include "engine/runtime/cuda_runtime.h"

namespace {

int silent_sender(int rank, const std::string& file) {
  using namespace dsv4::rt;
  CudaOptions cuda;
  cuda.sync_deadline_s = rank == 1 ? 3 : 60;
  CudaRuntime rt(RuntimeOptions{}, cuda);
  const StreamId s = rt.create_stream(0, "rank" + std::to_string(rank));
  const int comm = rt.join_communicator(s, rank, 2, file, "pp");
  // One exchange first: NCCL connects a pair at its first send/recv, which needs both ranks.
  const BufferId in = rt.alloc(0, 1024, "stage_input");
  if (rank == 0) {
    rt.send(comm, 0, 1, rt.all(in));
  } else {
    rt.recv(comm, 1, 0, rt.all(in));
  }
  rt.synchronize(s);
  const std::string done = file + ".done";
  if (rank == 0) {
    // Stops sending, but stays up (a peer that exits can turn the hang into a connection error);
    // then leaves without tearing the communicator down, which could wait for the aborted peer.
    const auto until = std::chrono::steady_clock::now() + std::chrono::seconds(60);
    while (!std::filesystem::exists(done) && std::chrono::steady_clock::now() < until) {
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    std::fflush(stdout);
    std::_Exit(0);
  }
  rt.recv(comm, 1, 0, rt.all(in));
  int status = 1;
  try {
    rt.synchronize(s);
    std::fprintf(stderr, "rank 1: the recv from a silent rank 0 finished\n");
  } catch (const HangError& e) {
    const std::string what = e.what();
    if (what.find("recv") != std::string::npos && what.find("rank 1") != std::string::npos &&
        what.find("'pp'") != std::string::npos) {
      std::printf("rank 1: %s\n", e.what());
      status = 0;
    } else {
      std::fprintf(stderr, "rank 1: the HangError does not name the recv, the rank and the communicator: %s\n", e.what());
    }
  }
  std::FILE* f = std::fopen(done.c_str(), "w");
  if (f != nullptr) std::fclose(f);
  return status;
}

}  // namespace

int main(int argc, char** argv) {
  using namespace dsv4::rt;
  if (argc != 4 && !(argc == 5 && std::string(argv[4]) == "silent-sender")) {
    std::fprintf(stderr, "usage: nccl_rank_worker RANK WORLD RENDEZVOUS_FILE [silent-sender]\n");
    return 2;
  }
  const int rank = std::atoi(argv[1]);
  const int world = std::atoi(argv[2]);
  if (argc == 5) {
    try {
      return silent_sender(rank, argv[3]);
    } catch (const std::exception& e) {
      std::fprintf(stderr, "rank %d: %s\n", rank, e.what());
      return 1;
    }
  }
  try {
    CudaOptions cuda;
    cuda.sync_deadline_s = 60;
    CudaRuntime rt(RuntimeOptions{}, cuda);
    const StreamId s = rt.create_stream(0, "rank" + std::to_string(rank));
    const int comm = rt.join_communicator(s, rank, world, argv[3], "spanning");
    constexpr int kFloats = 4;
    const BufferId send = rt.alloc(0, kFloats * 4, "send");
    const BufferId gathered = rt.alloc(0, static_cast<uint64_t>(world) * kFloats * 4, "gathered");
    const BufferId ring_in = rt.alloc(0, kFloats * 4, "ring_in");
    std::vector<float> mine(kFloats, static_cast<float>(rank + 1));
    rt.upload(send, 0, mine.data(), kFloats * 4);
    rt.all_gather(comm, rank, rt.all(send), rt.all(gathered));
    // A ring: even ranks send first, odd ranks receive first, so no two sends wait on each other.
    const int next = (rank + 1) % world, prev = (rank + world - 1) % world;
    if (rank % 2 == 0) {
      rt.send(comm, rank, next, rt.all(send));
      rt.recv(comm, rank, prev, rt.all(ring_in));
    } else {
      rt.recv(comm, rank, prev, rt.all(ring_in));
      rt.send(comm, rank, next, rt.all(send));
    }
    rt.barrier(comm, rank);
    rt.synchronize(s);
    std::vector<float> all(static_cast<size_t>(world) * kFloats), in(kFloats);
    rt.download(gathered, 0, all.data(), all.size() * 4);
    rt.download(ring_in, 0, in.data(), kFloats * 4);
    for (int r = 0; r < world; ++r) {
      for (int i = 0; i < kFloats; ++i) {
        if (all[static_cast<size_t>(r * kFloats + i)] != static_cast<float>(r + 1)) {
          std::fprintf(stderr, "rank %d: all_gather slot %d holds %g\n", rank, r, all[static_cast<size_t>(r * kFloats + i)]);
          return 1;
        }
      }
    }
    for (float v : in) {
      if (v != static_cast<float>(prev + 1)) {
        std::fprintf(stderr, "rank %d: received %g from rank %d\n", rank, v, prev);
        return 1;
      }
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "rank %d: %s\n", rank, e.what());
    return 1;
  }
  return 0;
}
