#!/usr/bin/env bash
# Shows that each parity check can fail: runs tests/parity.rs once clean and once per
# CANDLE_FUSED_PARITY_SABOTAGE mode (each breaks one input on purpose, see
# crates/candle-fused-train/tests/parity_common/mod.rs) and writes the FAIL counts and the
# failing checks to results/parity-sabotage.md. Expects every sabotaged run to fail.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-results/parity-sabotage.md}
cargo build --release -q -p candle-fused-train --test parity || exit 1
{
  echo "# Parity checks failing on purpose ($(date -u +%Y-%m-%dT%H:%M:%SZ), commit \`$(git describe --always --dirty --abbrev=12)\`)"
  echo
  echo "\`scripts/parity_sabotage.sh\`: \`cargo test --release -p candle-fused-train --test parity\` with"
  echo "\`CANDLE_FUSED_PARITY_SABOTAGE\` set to each mode; a mode breaks one input, the checks that guard it must fail."
  echo
  echo "| mode | what it breaks | tests failed | checks FAIL / PASS |"
  echo "|---|---|---:|---:|"
} > "$out.tmp"
declare -A what=(
  [none]="nothing (the CI run)"
  [adapter]="adapter_trained/ weights loaded where adapter/ is expected"
  [packing]="the packed batch run without positions and segments"
  [targets]="one target id changed"
  [adamw]="AdamW weight decay off"
  [clip]="no gradient clipping in the clipped AdamW run"
  [backward]="one explicit-backward gradient scaled by 1 + 1e-4"
  [generate]="one generated token fewer"
)
status=0
details=""
for mode in none adapter packing targets adamw clip backward generate; do
  log=$(mktemp)
  CANDLE_FUSED_PARITY_SABOTAGE=$mode cargo test --release -q -p candle-fused-train --test parity -- --nocapture --test-threads 1 >"$log" 2>&1
  rc=$?
  fails=$(grep -c '^  FAIL' "$log"); passes=$(grep -c '^  PASS' "$log")
  failed_tests=$(grep -oE '[0-9]+ failed' "$log" | tail -1)
  echo "| \`$mode\` | ${what[$mode]} | ${failed_tests:-0 failed} | $fails / $passes |" >> "$out.tmp"
  if [ "$mode" = none ]; then [ $rc -eq 0 ] || status=1; else [ $rc -ne 0 ] || status=1; fi
  details+=$'\n'"### \`$mode\`"$'\n\n```text\n'"$(grep '^  FAIL' "$log" | head -12)"$'\n```\n'
  rm -f "$log"
done
echo "$details" >> "$out.tmp"
mv "$out.tmp" "$out"
echo "wrote $out (status $status: 0 = the clean run passed and every sabotaged run failed)"
exit $status
