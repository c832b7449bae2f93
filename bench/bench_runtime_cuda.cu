// The cuda backend's launch overhead through the runtime API: an empty kernel per launch, with the
// hazard detector registered and without it, against a bare <<<>>> launch.
#include <benchmark/benchmark.h>

#include "engine/runtime/cuda_runtime.h"
#include "engine/runtime/hazard_detector.h"

namespace {

using namespace dsv4;
using namespace dsv4::rt;

__global__ void empty_kernel() {}

void BM_BareCudaLaunch(benchmark::State& state) {
  if (cuda_device_count() == 0) {
    state.SkipWithError("no CUDA device");
    return;
  }
  cudaStream_t stream;
  cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking);
  int i = 0;
  for (auto _ : state) {
    empty_kernel<<<1, 32, 0, stream>>>();
    if (++i % 1024 == 0) cudaStreamSynchronize(stream);
  }
  cudaStreamSynchronize(stream);
  cudaStreamDestroy(stream);
}

void BM_RuntimeLaunch(benchmark::State& state) {
  if (cuda_device_count() == 0) {
    state.SkipWithError("no CUDA device");
    return;
  }
  const bool detector_on = state.range(0) != 0;
  CudaRuntime rt(RuntimeOptions{}, CudaOptions{});
  HazardDetector detector;
  if (detector_on) rt.add_observer(&detector);
  const StreamId s = rt.create_stream(0, "main");
  const BufferId b = rt.alloc(0, 4096, "x");
  Launch l;
  l.op = "empty";
  l.accesses = {Access{rt.range(b, 0, 2048), AccessKind::read}, Access{rt.range(b, 2048, 4096), AccessKind::write}};
  l.cuda = [](void* stream) { empty_kernel<<<1, 32, 0, static_cast<cudaStream_t>(stream)>>>(); };
  int i = 0;
  for (auto _ : state) {
    rt.launch(s, l);
    if (++i % 1024 == 0) rt.synchronize(s);
  }
  rt.synchronize(s);
  state.counters["hazards"] = static_cast<double>(detector.hazards().size());
}

BENCHMARK(BM_BareCudaLaunch)->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_RuntimeLaunch)->Arg(0)->Arg(1)->ArgNames({"detector"})->Unit(benchmark::kMicrosecond);

}  // namespace
