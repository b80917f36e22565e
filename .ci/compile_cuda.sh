#!/usr/bin/env bash
# Compile-only check of the CUDA sources in csrc/ with nvcc, against the installed torch's headers.
# A CPU-only torch works: its headers suffice given C10_CUDA_NO_CMAKE_CONFIGURE_FILE (nothing built
# here is linked or run).  torch.utils.cpp_extension refuses .cu files on a CPU-only torch, hence
# nvcc directly, with the flags setup.py would use (csrc/build_native.py and torch's own).
set -euo pipefail
cd "$(dirname "$0")/.."

NVCC="${NVCC:-$(command -v nvcc || echo "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc")}"
if [ ! -x "$NVCC" ]; then
  echo "compile_cuda: nvcc not found (set NVCC or CUDA_HOME); skipping the CUDA compile check"
  exit 0
fi
ARCH="${CUDA_ARCH:-sm_90}"

read -r -a FLAGS <<<"$(python - <<'PY'
import sys
sys.path.insert(0, "csrc")
import build_native
from torch.utils import cpp_extension
flags = ["-I" + path for path in cpp_extension.include_paths()]
flags += cpp_extension.COMMON_NVCC_FLAGS + build_native.NVCC_FLAGS
print(" ".join(flags + ["-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE", "-std=c++20", "-Xcompiler", "-fPIC"]))
PY
)"

OUT="$(mktemp -d)"
trap 'rm -rf "$OUT"' EXIT
status=0
for source in csrc/*.cu; do
  start=$(date +%s)
  if "$NVCC" -arch="$ARCH" -c "$source" -o "$OUT/$(basename "$source").o" "${FLAGS[@]}"; then
    echo "compile_cuda: compiled $source for $ARCH with $("$NVCC" --version | tail -1) in $(( $(date +%s) - start )) s"
  else
    echo "compile_cuda: FAILED to compile $source" >&2
    status=1
  fi
done
exit $status
