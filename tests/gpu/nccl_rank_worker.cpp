// One rank of a communicator spanning processes (one process per GPU), started by
// test_runtime_cuda's multi-process test: `nccl_rank_worker RANK WORLD RENDEZVOUS_FILE`, with
// CUDA_VISIBLE_DEVICES naming this rank's GPU. Exits 0 when all-gather, a send/recv ring and a
// barrier give the right data; 1 (with a message) otherwise.
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <string>
#include <vector>

#include "engine/runtime/cuda_runtime.h"

int main(int argc, char** argv) {
  using namespace dsv4::rt;
  if (argc != 4) {
    std::fprintf(stderr, "usage: nccl_rank_worker RANK WORLD RENDEZVOUS_FILE\n");
    return 2;
  }
  const int rank = std::atoi(argv[1]);
  const int world = std::atoi(argv[2]);
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
