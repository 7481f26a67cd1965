#!/usr/bin/env bash
# Installs the pinned CUDA 13.0.x toolchain from PyPI into .cuda/ (git-ignored) and makes it
# usable as CUDA_HOME for building `--features cuda` on a machine without a GPU or driver:
#   * lib64/libX.so -> ../lib/libX.so.N symlinks (the wheels ship only versioned names),
#   * a generated link stub lib64/stubs/libcuda.so (soname libcuda.so.1) that defines every
#     `cu*` driver symbol cudarc declares. At run time the real driver's libcuda.so.1 is used.
# Usage:  bash scripts/setup-cuda.sh && source .cuda/env.sh
# Stay on 13.0.x: newer nvcc emits PTX that a 13.0 driver cannot load.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
DEST=${CUDA_FUSED_TOOLCHAIN_DIR:-$ROOT/.cuda}
VERSION=13.0.2
CUDA_HOME=$DEST/nvidia/cu13
PY=${PYTHON:-python3}

if [ ! -x "$CUDA_HOME/bin/nvcc" ]; then
  echo "[setup-cuda] installing cuda-toolkit==$VERSION into $DEST (about 1.3 GB)"
  "$PY" -m pip install -q --disable-pip-version-check --target "$DEST" \
    "cuda-toolkit[nvcc,crt,nvvm,cudart,cccl,cublas,curand,nvrtc]==$VERSION"
fi

mkdir -p "$CUDA_HOME/lib64/stubs"
# Unversioned names for the linker.
for f in "$CUDA_HOME"/lib/lib*.so.*; do
  [ -e "$f" ] || continue
  base=$(basename "$f"); stem=${base%%.so.*}
  [ -e "$CUDA_HOME/lib64/$stem.so" ] || ln -sf "../lib/$base" "$CUDA_HOME/lib64/$stem.so"
done

# Link stub for the driver API: every cu* function cudarc's driver bindings declare.
STUB=$CUDA_HOME/lib64/stubs/libcuda.so
if [ ! -e "$STUB" ]; then
  REG=${CARGO_HOME:-$HOME/.cargo}/registry/src
  SYS=$(ls -d "$REG"/*/cudarc-0.19.*/src/driver/sys 2>/dev/null | sort -V | tail -n1 || true)
  if [ -z "$SYS" ]; then
    (cd "$ROOT" && cargo fetch -q)
    SYS=$(ls -d "$REG"/*/cudarc-0.19.*/src/driver/sys | sort -V | tail -n1)
  fi
  grep -ohE '\bfn cu[A-Za-z0-9_]+' -r "$SYS" | awk '{print $2}' | sort -u \
    | awk '{printf "void %s(void) {}\n", $1}' > "$DEST/libcuda_stub.c"
  gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$STUB" "$DEST/libcuda_stub.c"
  ln -sf stubs/libcuda.so "$CUDA_HOME/lib64/libcuda.so"
  echo "[setup-cuda] libcuda stub: $(wc -l < "$DEST/libcuda_stub.c") symbols"
fi

cat > "$DEST/env.sh" <<ENV
export CUDA_HOME=$CUDA_HOME
export CUDA_PATH=$CUDA_HOME
export PATH=$CUDA_HOME/bin:\$PATH
export CUDA_COMPUTE_CAP=\${CUDA_COMPUTE_CAP:-90}
export LIBRARY_PATH=$CUDA_HOME/lib64:$CUDA_HOME/lib64/stubs:\${LIBRARY_PATH:-}
ENV
echo "[setup-cuda] ready: source $DEST/env.sh ; nvcc: $("$CUDA_HOME/bin/nvcc" --version | tail -n1)"
