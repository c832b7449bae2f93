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

build_preset() {
  local preset="$1"
  cmake --preset "$preset" -S "$repo_root" >/dev/null
  cmake --build --preset "$preset" -j "$jobs"
}

has_gpu() {
  command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q GPU
}
