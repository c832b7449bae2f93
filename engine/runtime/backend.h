// Choosing a backend by name: the one place that knows which backends this build has and whether a
// GPU is present. Commands and the property runner make their runtime here.
#pragma once

#include <memory>
#include <string>

#include "engine/runtime/runtime.h"
#include "engine/runtime/sim_runtime.h"

namespace dsv4::rt {

// "sim", "cuda", or "auto" (cuda when this build has it and a GPU is present, else sim). An unknown
// name, or cuda in a build without CUDA or on a machine without a GPU, is an InputError naming
// `flag` (the command-line flag or file field the name came from).
BackendKind parse_backend(const std::string& name, const std::string& flag);
const char* backend_name(BackendKind kind);
// True when this build has the cuda backend and at least one GPU is present.
bool cuda_available();
// The GPUs present (0 without the cuda backend), counted in a child process like cuda_available().
int cuda_gpu_count();

// A runtime of `kind`: `sim` with `sim` options; cuda with every synchronization bounded by
// `sync_deadline_s` seconds (a HangError past it).
std::unique_ptr<Runtime> make_runtime(BackendKind kind, const RuntimeOptions& options, const SimOptions& sim,
                                      double sync_deadline_s = 30.0);

// Drops what a failed step left queued (SimRuntime::discard_queued_work); on cuda, waits for the
// devices and ignores the errors of that work, which the step has already reported.
void discard_after_failure(Runtime& runtime);

}  // namespace dsv4::rt
