#!/usr/bin/env bash
# Builds the CUDA binaries here (no GPU needed) and packs them, gzipped, into .gpu/ (git-ignored)
# for a GPU machine that has no Rust toolchain: the CLI, the GPU test target, the LoRA PEFT
# interop example. Then run there: bash scripts/gpu-run.sh <phase>
set -euo pipefail
cd "$(dirname "$0")/.."
[ -f .cuda/env.sh ] || bash scripts/setup-cuda.sh
source .cuda/env.sh
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-target/cuda}
mkdir -p .gpu
rm -f .gpu/*
cargo build --release --features cuda -p candle-fused-cli --bin candle-fused
cp "$CARGO_TARGET_DIR/release/candle-fused" .gpu/candle-fused
# The one GPU test target.
exe=$(cargo test --release --features cuda -p candle-fused --test gpu --no-run --message-format=json 2>/dev/null \
  | python3 -c 'import json,sys
for l in sys.stdin:
    m=json.loads(l)
    if m.get("reason")=="compiler-artifact" and m.get("executable") and m["target"]["name"]=="gpu": print(m["executable"])' | tail -n1)
cp "$exe" .gpu/gpu-tests
for ex in peft_interop kernel_probe; do
  if [ -f crates/candle-fused/examples/$ex.rs ]; then
    cargo build --release --features cuda -p candle-fused --example $ex
    cp "$CARGO_TARGET_DIR/release/examples/$ex" .gpu/$ex
  fi
done
git rev-parse --short HEAD > .gpu/COMMIT 2>/dev/null || true
gzip -9 $(ls .gpu/* | grep -v COMMIT)
ls -la .gpu; du -sh .gpu
