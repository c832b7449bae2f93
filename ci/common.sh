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

# DSV4_CI_FLAGS=1 builds for a CI run: without -g (same optimisation, same NDEBUG: a third less
# compile time and much faster links) and with the test binaries' own sources at -O1 (see
# DSV4_TEST_CXX_FLAGS in cmake/dsv4.cmake). .ci/run sets it; a developer's build keeps the presets'.
preset_cache_args() {
  if [[ "${DSV4_CI_FLAGS:-0}" == 1 ]]; then
    echo "-DCMAKE_CXX_FLAGS_RELWITHDEBINFO=-O2 -DNDEBUG;-DCMAKE_CUDA_FLAGS_RELWITHDEBINFO=-O2 -DNDEBUG;-DCMAKE_CXX_FLAGS_DEBUG=-O1;-DDSV4_TEST_CXX_FLAGS=-O1"
  fi
}

# build_preset PRESET [extra -D cache arguments...]
build_preset() {
  local preset="$1" args=()
  shift
  IFS=';' read -r -a args <<<"$(preset_cache_args)"
  cmake --preset "$preset" -S "$repo_root" "${args[@]}" "$@" >/dev/null
  cmake --build --preset "$preset" -j "$jobs"
}

has_gpu() {
  command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q GPU
}
