#!/usr/bin/env bash
# Runs on the GPU machine (carry .gpu/ from scripts/build-gpu-bundle.sh). Writes logs to $OUT
# (or ./gpu-out). Phases: test (GPU tests + check), sanitize (compute-sanitizer memcheck and
# racecheck on the GPU tests, small shapes), probe (quick kernel timings), bench (ours),
# torch (PyTorch on the same cases + the merged table), peft (LoRA interop with PEFT), or
# several: bash scripts/gpu-run.sh test bench. Environment: TEST_TIMEOUT, SAN_TIMEOUT,
# PROBE_ARGS/PROBE_TAG, BENCH_ARGS/BENCH_TIMEOUT, TORCH_ARGS/TORCH_TIMEOUT, PACK (see below),
# CANDLE_FUSED_SEED (fixes the random inputs of the tests, check, bench and probe; each run
# prints the seed it used).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-out}; mkdir -p "$OUT"
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
export PYTHONUNBUFFERED=1
B=/tmp/cf-bin; mkdir -p $B
for f in .gpu/*.gz; do gunzip -c "$f" > "$B/$(basename "$f" .gz)"; done
chmod +x $B/*
# The bundle's commit for the bench reports (this copy of the tree may carry a stale .git).
[ -s .gpu/COMMIT ] && export CANDLE_FUSED_COMMIT=$(cat .gpu/COMMIT)
GPU=$(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | head -n1)
# The kernel configuration is chosen by arguments (bench --kernel-config, the probe's
# --configs), never by environment variables; the stamp records the arguments of this call.
STAMP="$(date -u +%Y-%m-%dT%H:%MZ) | $GPU | commit $(cat .gpu/COMMIT 2>/dev/null) | seed ${CANDLE_FUSED_SEED:-fresh} | bench: ${BENCH_ARGS:-} | probe: ${PROBE_ARGS:-}"
echo "$STAMP"
rc=0
for phase in "$@"; do
  case $phase in
    test)
      { echo "# $STAMP"; timeout ${TEST_TIMEOUT:-400} $B/gpu-tests --test-threads=1 --nocapture 2>&1; } > "$OUT/gpu-tests.log"; r=$?
      grep -E '^test |test result' "$OUT/gpu-tests.log"; [ $r = 0 ] || { rc=1; grep -E 'FAIL|panicked|error' "$OUT/gpu-tests.log" | head -40; }
      { echo "# $STAMP"; $B/candle-fused check --device cuda 2>&1; } > "$OUT/check-cuda.log"; r=$?
      tail -n 3 "$OUT/check-cuda.log"; [ $r = 0 ] || { rc=1; grep FAIL "$OUT/check-cuda.log" | head -20; } ;;
    sanitize)
      for tool in memcheck racecheck; do
        { echo "# $STAMP"; timeout ${SAN_TIMEOUT:-300} compute-sanitizer --tool $tool --error-exitcode 9 $B/gpu-tests --test-threads=1 \
            misaligned fully_masked non_contiguous sanitizer_small 2>&1; } > "$OUT/sanitizer-$tool.log"; r=$?
        echo "$tool exit $r"; tail -n 4 "$OUT/sanitizer-$tool.log"; [ $r = 0 ] || rc=1
      done ;;
    probe)
      # Quick kernel timings (crates/candle-fused/examples/kernel_probe.rs) of every kernel
      # configuration (KernelConfig::candidates(), named beside each timing); PROBE_ARGS passes
      # e.g. "--ops rms --configs default,rms-bwd-cols16", PROBE_TAG names the log.
      { echo "# $STAMP"; timeout ${PROBE_TIMEOUT:-120} $B/kernel_probe ${PROBE_ARGS:-} 2>&1; } > "$OUT/probe${PROBE_TAG:-}.log" || rc=1
      cat "$OUT/probe${PROBE_TAG:-}.log" ;;
    bench)
      # Our bench (all families, or BENCH_ARGS such as "--op rms_norm,add_rms_norm"), CUDA;
      # prints its summary last.
      timeout ${BENCH_TIMEOUT:-420} $B/candle-fused bench --device cuda --json "$OUT/bench-ours.json" ${BENCH_ARGS:-} > "$OUT/bench-ours.log" 2>&1 || rc=1
      tail -n 70 "$OUT/bench-ours.log" ;;
    torch)
      # PyTorch on the same cases as our JSON (BENCH_OURS, default $OUT/bench-ours.json), then
      # one merged table.
      ours=${BENCH_OURS:-$OUT/bench-ours.json}
      timeout ${TORCH_TIMEOUT:-420} python3 scripts/bench_torch.py --cases "$ours" --json "$OUT/bench-torch.json" ${TORCH_ARGS:-} > "$OUT/bench-torch.log" 2>&1 || rc=1
      tail -n 5 "$OUT/bench-torch.log"
      python3 scripts/merge_bench.py "$ours" "$OUT/bench-torch.json" --json "$OUT/bench-merged.json" --md "$OUT/bench-merged.md" || rc=1
      head -n 90 "$OUT/bench-merged.md" ;;
    ncu)
      # Profile kernels of one probe shape (PROBE_SHAPE, default 3 = [32768,4096] bf16):
      # NCU_KERNELS is a space-separated list of kernel-name regexes, one profiled launch each.
      for k in ${NCU_KERNELS:-rms_fwd}; do
        ncu --clock-control none -k "regex:$k" -c 1 --set full $B/kernel_probe ${PROBE_SHAPE:-3} --configs default \
          > "$OUT/ncu-$k.log" 2>&1 || rc=1
        grep -E '^  [a-z_0-9]+ \(|Duration|DRAM Throughput|Compute \(SM\) Throughput|Achieved Occupancy|Registers Per|Block Size|Issued Ipc Active|Executed Instructions  |Warp Cycles Per Issued|Stall [A-Z][a-z]+ +|One or More Eligible|Dynamic Shared|Theoretical Occ|Block Limit' "$OUT/ncu-$k.log" | head -60
      done ;;
    peft)
      if [ -f scripts/peft_interop.py ]; then
        python3 scripts/peft_interop.py --bin $B/peft_interop --device cuda --out "$OUT/peft_interop_cuda" > "$OUT/peft-interop.log" 2>&1 || rc=1
        tail -n 20 "$OUT/peft-interop.log"
      fi ;;
    *) echo "unknown phase $phase"; rc=2 ;;
  esac
  # PACK=FILE: after every phase, pack everything so far into one archive (a run cut short
  # still returns what it finished; the device tool returns few files).
  [ -n "${PACK:-}" ] && tar czf "$PACK" -C "$OUT" .
done
exit $rc
