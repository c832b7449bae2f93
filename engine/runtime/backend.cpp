#include "engine/runtime/backend.h"

#include <sys/wait.h>

#include <algorithm>
#include <unistd.h>

#include "engine/core/allocator.h"
#include "engine/core/error.h"
#if defined(DSV4_WITH_CUDA)
#include "engine/runtime/cuda_runtime.h"
#endif

namespace dsv4::rt {

int cuda_gpu_count() {
#if defined(DSV4_WITH_CUDA)
  // Asked in a child process: CUDA does not survive fork(), and the property runner forks a child
  // per case after choosing the backend, so this process must not initialize CUDA by asking.
  static const int count = [] {
    const pid_t pid = fork();
    if (pid == 0) _exit(std::min(cuda_device_count(), 100));
    int status = 0;
    if (pid < 0 || waitpid(pid, &status, 0) != pid || !WIFEXITED(status)) return 0;
    return WEXITSTATUS(status);
  }();
  return count;
#else
  return 0;
#endif
}

bool cuda_available() { return cuda_gpu_count() > 0; }

BackendKind parse_backend(const std::string& name, const std::string& flag) {
  if (name == "sim") return BackendKind::sim;
  if (name == "auto") return cuda_available() ? BackendKind::cuda : BackendKind::sim;
  if (name != "cuda") throw InputError(flag, "", "expects sim, cuda or auto, got '" + name + "'");
#if defined(DSV4_WITH_CUDA)
  if (!cuda_available()) throw InputError(flag, "", "'cuda': no CUDA device is present on this machine");
  return BackendKind::cuda;
#else
  throw InputError(flag, "", "'cuda': this build has no cuda backend (configure with -DDSV4_CUDA=ON, preset cuda)");
#endif
}

const char* backend_name(BackendKind kind) { return kind == BackendKind::cuda ? "cuda" : "sim"; }

std::unique_ptr<Runtime> make_runtime(BackendKind kind, const RuntimeOptions& options, const SimOptions& sim,
                                      double sync_deadline_s) {
  if (kind == BackendKind::sim) return std::make_unique<SimRuntime>(options, sim);
#if defined(DSV4_WITH_CUDA)
  CudaOptions cuda;
  cuda.sync_deadline_s = sync_deadline_s;
  return std::make_unique<CudaRuntime>(options, cuda);
#else
  (void)sync_deadline_s;
  throw InputError("backend", "", "'cuda': this build has no cuda backend");
#endif
}

void discard_after_failure(Runtime& runtime) {
  if (auto* sim = dynamic_cast<SimRuntime*>(&runtime)) {
    sim->discard_queued_work();
    return;
  }
  for (int d = 0; d < runtime.device_count(); ++d) {
    try {
      runtime.synchronize_device(d);
    } catch (const std::exception&) {
    }
  }
#if defined(DSV4_WITH_CUDA)
  // Work held back behind a collective that never matched would never run.
  if (auto* cuda = dynamic_cast<CudaRuntime*>(&runtime)) cuda->discard_deferred_work();
#endif
}

}  // namespace dsv4::rt
