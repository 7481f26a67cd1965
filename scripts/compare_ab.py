#!/usr/bin/env python3
"""Before/after of the CPU bench (issue 8): `ours` rows of two binaries run alternately
(before1, after1, before2, after2). Per row: the medians, the run-to-run noise of each side
(|run1 - run2| / mean), and after/before (< 1: the refactored code is faster).

    python3 scripts/compare_ab.py results/bench/2026-12-02-cpu-ab --md OUT.md
"""
import argparse, json, statistics

ap = argparse.ArgumentParser()
ap.add_argument("prefix")
ap.add_argument("--md", required=True)
ap.add_argument("--before", default="?", help="what the before binary is (commit)")
ap.add_argument("--after", default="?", help="what the after binary is (commit)")
a = ap.parse_args()

def load(tag):
    d = json.load(open(f"{a.prefix}-{tag}.json"))
    return d["header"], {(r["op"], r["pass"], tuple(r["shape"]), r["dtype"]): r for r in d["rows"] if r["impl"] == "ours"}

hb, b1 = load("before1"); _, b2 = load("before2")
ha, a1 = load("after1"); _, a2 = load("after2")
keys = [k for k in b1 if k in b2 and k in a1 and k in a2]
out = ["# CPU bench before/after the architecture refactor (issue 8)", "",
       f"before: {a.before}; after: {a.after}; {hb['device_name']}, copy {hb['copy_gbps']:.1f} / {ha['copy_gbps']:.1f} GB/s; run alternately "
       "before1, after1, before2, after2 on this machine; times are each run's median (µs) of `ours`.", "",
       "| op | pass | shape | dtype | before (run1 / run2) | noise before | after (run1 / run2) | noise after | after / before |",
       "|---|---|---|---|---:|---:|---:|---:|---:|"]
ratios, noise = [], []
for k in keys:
    bb = [b1[k]["median_us"], b2[k]["median_us"]]; aa = [a1[k]["median_us"], a2[k]["median_us"]]
    nb = abs(bb[0] - bb[1]) / statistics.mean(bb); na = abs(aa[0] - aa[1]) / statistics.mean(aa)
    r = statistics.mean(aa) / statistics.mean(bb)
    ratios.append(r); noise += [nb, na]
    out.append(f"| {k[0]} | {k[1]} | {'x'.join(map(str, k[2]))} | {k[3]} | {bb[0]:,.0f} / {bb[1]:,.0f} | {nb:.1%} | {aa[0]:,.0f} / {aa[1]:,.0f} | {na:.1%} | {r:.2f} |")
out += ["", f"{len(keys)} rows; after/before: median {statistics.median(ratios):.2f}, "
        f"min {min(ratios):.2f}, max {max(ratios):.2f}; rows slower after by more than the larger "
        f"of the two sides' noise: {sum(1 for k, r in zip(keys, ratios) if r > 1 + max(abs(b1[k]['median_us']-b2[k]['median_us'])/b1[k]['median_us'], abs(a1[k]['median_us']-a2[k]['median_us'])/a1[k]['median_us']))}; "
        f"run-to-run noise: median {statistics.median(noise):.1%}, max {max(noise):.1%}."]
open(a.md, "w").write("\n".join(out) + "\n")
print("\n".join(out[-1:]))
