#!/usr/bin/env bash
# Builds the CUDA binaries here (no GPU needed) and packs them, gzipped, into .gpu/ (git-ignored)
# for a GPU machine that has no Rust toolchain: the CLI, the GPU test targets of the kernels and
# of the model, the LoRA PEFT interop, kernel probe and model parity examples. Then run there:
# bash scripts/gpu-run.sh <phase> (scripts/GPU-CALLS.md: the calls and what to carry).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -f .cuda/env.sh ] || bash scripts/setup-cuda.sh
source .cuda/env.sh
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-target/cuda}
mkdir -p .gpu
rm -f .gpu/*
cargo build --release --features cuda -p candle-fused-cli --bin candle-fused
cp "$CARGO_TARGET_DIR/release/candle-fused" .gpu/candle-fused
# The GPU test targets: the kernels' (candle-fused --test gpu) and the model's
# (candle-fused-train --test gpu, on the committed fixtures, which travel with the tree).
test_exe() { # package -> the path of its `gpu` test binary
  cargo test --release --features cuda -p "$1" --test gpu --no-run --message-format=json 2>/dev/null \
    | python3 -c 'import json,sys
for l in sys.stdin:
    m=json.loads(l)
    if m.get("reason")=="compiler-artifact" and m.get("executable") and m["target"]["name"]=="gpu": print(m["executable"])' | tail -n1
}
exe=$(test_exe candle-fused); [ -n "$exe" ] || { echo "no candle-fused gpu test binary"; exit 1; }
cp "$exe" .gpu/gpu-tests
exe=$(test_exe candle-fused-train); [ -n "$exe" ] || { echo "no candle-fused-train gpu test binary"; exit 1; }
cp "$exe" .gpu/train-gpu-tests
# The model's `parity` example (the live transformers + PEFT check, make_fixtures.py --check).
cargo build --release --features cuda -p candle-fused-train --example parity
cp "$CARGO_TARGET_DIR/release/examples/parity" .gpu/parity
for ex in peft_interop kernel_probe; do
  if [ -f crates/candle-fused/examples/$ex.rs ]; then
    cargo build --release --features cuda -p candle-fused --example $ex
    cp "$CARGO_TARGET_DIR/release/examples/$ex" .gpu/$ex
  fi
done
git rev-parse --short HEAD > .gpu/COMMIT 2>/dev/null || true
# One solid xz archive with a dictionary larger than any binary: the binaries share most of
# their bytes (candle's and our CUDA kernels, the same crates), which gzip per file cannot see
# (about 14 MiB gzipped per binary, 6.5 MiB for two binaries in one such archive). gpu-run.sh
# unpacks it with Python's lzma (any dictionary size; no xz binary needed there).
bins=$(cd .gpu && ls | grep -v COMMIT)
tar -C .gpu -cf - $bins | xz -T1 --lzma2=preset=6,dict=192MiB > .gpu/bin.tar.xz
(cd .gpu && rm -f $bins)
ls -la .gpu; du -sh .gpu
# The device tool carries at most 64 MiB: the tree, .gpu/ and the wheels in .whl/ together.
total=$(du -cb .gpu/* | tail -n1 | cut -f1)
echo "bundle: $((total / 1048576)) MiB (limit: well under 64 MiB with the tree and .whl)"
[ "$total" -lt $((40 << 20)) ] || { echo "bundle too large: $total bytes"; exit 1; }
