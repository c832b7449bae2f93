# Shared by the ci/ scripts: which preset this machine builds, and how many jobs.
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
jobs="$(nproc)"

# The CUDA build whenever nvcc is installed (it compiles on CPU-only machines too; the GPU tests
# then skip), otherwise the CPU build. DSV4_PRESET overrides.
choose_preset() {
  if [[ -n "${DSV4_PRESET:-}" ]]; then
    echo "$DSV4_PRESET"
  elif [[ -x /usr/local/cuda/bin/nvcc ]] || command -v nvcc >/dev/null 2>&1; then
    echo cuda
  else
    echo cpu
  fi
}

# DSV4_DEBUG_INFO=0 builds without -g (same optimisation, same NDEBUG): a third less compile time
# and much faster links. .ci/run sets it; a developer's build keeps the presets' debug info.
preset_cache_args() {
  if [[ "${DSV4_DEBUG_INFO:-1}" == 0 ]]; then
    echo "-DCMAKE_CXX_FLAGS_RELWITHDEBINFO=-O2 -DNDEBUG;-DCMAKE_CUDA_FLAGS_RELWITHDEBINFO=-O2 -DNDEBUG;-DCMAKE_CXX_FLAGS_DEBUG=-O1"
  fi
}

build_preset() {
  local preset="$1" args=()
  IFS=';' read -r -a args <<<"$(preset_cache_args)"
  cmake --preset "$preset" -S "$repo_root" "${args[@]}" >/dev/null
  cmake --build --preset "$preset" -j "$jobs"
}

has_gpu() {
  command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q GPU
}
