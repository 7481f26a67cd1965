#!/usr/bin/env bash
# Runs on the GPU machine (carry .gpu/ from scripts/build-gpu-bundle.sh, and .whl/ for
# Liger-Kernel). Writes logs to $OUT (or ./gpu-out). Phases: test (GPU tests + check),
# sanitize (compute-sanitizer memcheck and racecheck on the GPU tests, small shapes), probe
# (quick kernel timings), bench (ours), torch (PyTorch on the same cases + the merged table),
# peft (LoRA interop with PEFT), train-test (the model's GPU tests), parity (live adapter
# round trips with transformers + PEFT), train-bench (ours: the LoRA training step),
# torch-train (PyTorch + PEFT's step + the merged table), nsys (one step of ours on the 1B
# configuration, kernel summary), ncu; or several: bash scripts/gpu-run.sh test bench.
# scripts/GPU-CALLS.md: the three device calls of issue 12. Environment: TEST_TIMEOUT,
# TEST_FILTER/TEST_TAG (a part of the GPU tests, no check), SAN_TIMEOUT, PROBE_ARGS/PROBE_TAG, BENCH_ARGS/BENCH_TIMEOUT, TORCH_ARGS/TORCH_TIMEOUT,
# TRAIN_TEST_TIMEOUT, PARITY_TIMEOUT, TRAIN_CONFIGS, TRAIN_VARIANTS, TRAIN_PROFILE (true: time each GEMM of the step alone), TRAIN_BATCH, TRAIN_WARMUP,
# TRAIN_ITERS, TRAIN_BENCH_TIMEOUT, TRAIN_ARGS (more bench arguments, e.g. --cuda-events off)/TRAIN_TAG, TORCH_TRAIN_VARIANTS/TORCH_TRAIN_BATCH/TORCH_TRAIN_TAG/
# TORCH_TRAIN_TIMEOUT, TRAIN_OURS, SAN_FILTER (test-name filters of the sanitizer runs), NCU_KERNELS/NCU_BENCH/NCU_TIMEOUT, NSYS_BATCH/NSYS_TIMEOUT, PACK (see below),
# CANDLE_FUSED_SEED (fixes the random inputs of the tests, check, bench and probe; each run
# prints the seed it used).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-out}; mkdir -p "$OUT"
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
export PYTHONUNBUFFERED=1
B=/tmp/cf-bin; mkdir -p $B
# The bundle: one solid xz archive (scripts/build-gpu-bundle.sh), unpacked with Python's lzma;
# older bundles: one .gz per binary.
[ -f .gpu/bin.tar.xz ] && python3 -c 'import sys, tarfile; tarfile.open(sys.argv[1], "r:xz").extractall(sys.argv[2])' .gpu/bin.tar.xz $B
for f in .gpu/*.gz; do [ -e "$f" ] && gunzip -c "$f" > "$B/$(basename "$f" .gz)"; done
chmod +x $B/*
# The model tests read the committed fixtures of this copy of the tree.
export CANDLE_FUSED_FIXTURES=$PWD/crates/candle-fused-train/tests/fixtures
# Liger-Kernel from the carried wheel (.whl/, pure Python; triton comes with torch here), for
# the torch, torch-train phases: installed offline into /tmp/site once.
liger() {
  [ -n "${LIGER_DONE:-}" ] && return 0
  LIGER_DONE=1
  if ls .whl/liger_kernel-*.whl > /dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/liger_kernel-*.whl \
      && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} \
      && python3 -c 'import liger_kernel, importlib.metadata as m; print("liger-kernel", m.version("liger-kernel"))'
  else
    echo "no .whl/liger_kernel-*.whl: the liger rows will be listed as skipped"
  fi
}
# The training bench's model configurations (both sides), variants and step counts.
TRAIN_CONFIGS=${TRAIN_CONFIGS:-qwen2.5-0.5b,llama-3.2-1b,llama-3-8b}
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
      { echo "# $STAMP"; timeout ${TEST_TIMEOUT:-400} $B/gpu-tests --test-threads=1 --nocapture ${TEST_FILTER:-} 2>&1; } > "$OUT/gpu-tests${TEST_TAG:-}.log"; r=$?
      grep -E '^test |test result' "$OUT/gpu-tests${TEST_TAG:-}.log"; [ $r = 0 ] || { rc=1; grep -E 'FAIL|panicked|error' "$OUT/gpu-tests${TEST_TAG:-}.log" | head -40; }
      # TEST_FILTER (test-name filters) runs a part of the GPU tests and no check.
      if [ -z "${TEST_FILTER:-}" ]; then
        { echo "# $STAMP"; $B/candle-fused check --device cuda 2>&1; } > "$OUT/check-cuda.log"; r=$?
        tail -n 3 "$OUT/check-cuda.log"; [ $r = 0 ] || { rc=1; grep FAIL "$OUT/check-cuda.log" | head -20; }
      fi ;;
    sanitize)
      for tool in memcheck racecheck; do
        { echo "# $STAMP"; timeout ${SAN_TIMEOUT:-300} compute-sanitizer --tool $tool --error-exitcode 9 $B/gpu-tests --test-threads=1 \
            ${SAN_FILTER:-misaligned fully_masked non_contiguous sanitizer_small} 2>&1; } > "$OUT/sanitizer-$tool.log"; r=$?
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
      # BENCH_TAG names the files (bench-ours$BENCH_TAG.json): repeats in one call.
      timeout ${BENCH_TIMEOUT:-420} $B/candle-fused bench --device cuda --json "$OUT/bench-ours${BENCH_TAG:-}.json" ${BENCH_ARGS:-} > "$OUT/bench-ours${BENCH_TAG:-}.log" 2>&1 || rc=1
      tail -n 70 "$OUT/bench-ours${BENCH_TAG:-}.log" ;;
    torch)
      # PyTorch on the same cases as our JSON (BENCH_OURS, default $OUT/bench-ours.json), then
      # one merged table.
      ours=${BENCH_OURS:-$OUT/bench-ours${BENCH_TAG:-}.json}
      t=${BENCH_TAG:-}
      liger
      timeout ${TORCH_TIMEOUT:-420} python3 scripts/bench_torch.py --cases "$ours" --json "$OUT/bench-torch$t.json" ${TORCH_ARGS:-} > "$OUT/bench-torch$t.log" 2>&1 || rc=1
      tail -n 5 "$OUT/bench-torch$t.log"
      python3 scripts/merge_bench.py "$ours" "$OUT/bench-torch$t.json" --json "$OUT/bench-merged$t.json" --md "$OUT/bench-merged$t.md" || rc=1
      head -n 90 "$OUT/bench-merged$t.md" ;;
    ncu)
      # Profile kernels while the bench runs (NCU_BENCH, default "--op rope --quick": its first
      # case is the bench shape): NCU_KERNELS is a space-separated list of kernel-name regexes,
      # two profiled launches each (ncu prints when the process ends: keep the bench short).
      for k in ${NCU_KERNELS:-rope_half_u32_bf16}; do
        timeout ${NCU_TIMEOUT:-120} ncu --clock-control none -k "regex:$k" -c 2 --section SpeedOfLight --section LaunchStats \
          --section Occupancy --section MemoryWorkloadAnalysis --section WarpStateStats \
          $B/candle-fused bench --device cuda ${NCU_BENCH:---op rope --quick} > "$OUT/ncu-$k.log" 2>&1 || rc=1
        grep -E '^  [a-z_0-9]+ \(|Duration|DRAM Throughput|Achieved Occupancy|Registers Per|Block Size|Grid Size|Waves Per SM|Theoretical Occ|L2 Hit|Warp Cycles Per Issued' "$OUT/ncu-$k.log" | head -60
      done ;;
    train-test)
      # The model on CUDA (crates/candle-fused-train/tests/gpu.rs): fixtures vs transformers +
      # PEFT, vs the CPU, explicit backward vs tape.
      { echo "# $STAMP"; timeout ${TRAIN_TEST_TIMEOUT:-240} $B/train-gpu-tests --test-threads=1 --nocapture 2>&1; } > "$OUT/train-gpu-tests.log"; r=$?
      grep -E '^test |test result|MISSED' "$OUT/train-gpu-tests.log"; echo "checks: $(grep -c '^  PASS' "$OUT/train-gpu-tests.log") PASS, $(grep -c '^  FAIL' "$OUT/train-gpu-tests.log") FAIL"
      [ $r = 0 ] || { rc=1; grep -E '^  FAIL|panicked' "$OUT/train-gpu-tests.log" | head -40; } ;;
    parity)
      # The live adapter round trips with this machine's transformers + PEFT (make_fixtures.py
      # --check; our side on the CPU).
      timeout ${PARITY_TIMEOUT:-180} python3 scripts/make_fixtures.py --check --bin $B/parity --cli $B/candle-fused --log "$OUT/parity-check" > "$OUT/parity-check.log" 2>&1 || rc=1
      tail -n 15 "$OUT/parity-check.log" ;;
    train-bench)
      # Ours: the LoRA training step (bench --op train, a fresh process per row, the JSON
      # rewritten after each row so a timeout keeps the finished rows).
      { echo "# $STAMP"; timeout ${TRAIN_BENCH_TIMEOUT:-230} $B/candle-fused bench --op train --device cuda --dtype bf16 --seq 2048 \
          --batch ${TRAIN_BATCH:-auto} --configs "$TRAIN_CONFIGS" --variants ${TRAIN_VARIANTS:-ours,ours_ckpt,tape} \
          --warmup ${TRAIN_WARMUP:-2} --iters ${TRAIN_ITERS:-5} ${TRAIN_PROFILE:+--profile $TRAIN_PROFILE} ${TRAIN_ARGS:-} --json "$OUT/train-ours${TRAIN_TAG:-}.json" 2>&1; } > "$OUT/train-ours${TRAIN_TAG:-}.log" || rc=1
      grep -E ' / |skipped' "$OUT/train-ours${TRAIN_TAG:-}.log" | grep -v 'fresh process' ;;
    torch-train)
      # PyTorch + PEFT on the same configurations (eager SDPA, torch.compile, Liger), then
      # one merged table with ours (TRAIN_OURS, default $OUT/train-ours.json).
      liger
      timeout ${TORCH_TRAIN_TIMEOUT:-280} python3 scripts/bench_train_torch.py --device cuda --dtype bf16 --seq 2048 \
          --batch ${TORCH_TRAIN_BATCH:-auto} --configs "$TRAIN_CONFIGS" --variants ${TORCH_TRAIN_VARIANTS:-eager,compile,liger} \
          --warmup ${TRAIN_WARMUP:-2} --iters ${TRAIN_ITERS:-5} --json "$OUT/train-torch${TORCH_TRAIN_TAG:-}.json" > "$OUT/train-torch${TORCH_TRAIN_TAG:-}.log" 2>&1 || rc=1
      grep -E ' / |skipped' "$OUT/train-torch${TORCH_TRAIN_TAG:-}.log" | grep -v 'fresh process'
      ours=${TRAIN_OURS:-$OUT/train-ours.json}
      torch_jsons=$(ls "$OUT"/train-torch*.json 2>/dev/null)
      if [ -f "$ours" ] && [ -n "$torch_jsons" ]; then
        python3 scripts/merge_train_bench.py "$ours" $torch_jsons --json "$OUT/train-merged.json" --md "$OUT/train-merged.md" || rc=1
        cat "$OUT/train-merged.md"
      fi ;;
    nsys)
      # One training step of ours on the 1B configuration under Nsight Systems (the worker
      # process is traced: nsys follows children); the kernel summary comes back, the report
      # stays in /tmp (too large for the device tool).
      rep=/tmp/nsys-train-1b
      timeout ${NSYS_TIMEOUT:-150} nsys profile -o $rep -f true -t cuda,nvtx --stats=false \
          $B/candle-fused bench --op train --device cuda --dtype bf16 --seq 2048 --batch ${NSYS_BATCH:-4} \
          --configs llama-3.2-1b --variants ours --warmup 1 --iters 1 > "$OUT/nsys-train-1b.log" 2>&1 || rc=1
      nsys stats --report cuda_gpu_kern_sum --format csv $rep.nsys-rep > "$OUT/nsys-train-1b-kernels.csv" 2>>"$OUT/nsys-train-1b.log" || rc=1
      nsys stats --report cuda_gpu_mem_time_sum,cuda_api_sum --format csv $rep.nsys-rep > "$OUT/nsys-train-1b-mem-api.csv" 2>>"$OUT/nsys-train-1b.log" || true
      python3 - "$OUT/nsys-train-1b-kernels.csv" <<'PY' || true
import csv, sys
rows = [r for r in csv.reader(open(sys.argv[1])) if r]
i = next(k for k, r in enumerate(rows) if r and r[0].startswith("Time"))
head, body = rows[i], rows[i + 1:]
t, n = head.index("Total Time (ns)"), head.index("Name")
tot = sum(float(r[t]) for r in body)
print(f"GPU kernel time {tot / 1e6:.1f} ms over {len(body)} kernels (2 steps: warm-up + timed); top 25:")
for r in body[:25]:
    print(f"{100 * float(r[t]) / tot:5.1f}% {float(r[t]) / 1e6:8.2f} ms  x{r[head.index('Instances')]:>5}  {r[n][:110]}")
PY
      ;;
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
