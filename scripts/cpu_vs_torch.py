#!/usr/bin/env python3
"""Ours vs PyTorch eager, one line per (op, pass, shape, dtype), from one or more pairs of
`candle-fused bench` and `scripts/bench_torch.py` JSON files (Python standard library only).

    python3 scripts/cpu_vs_torch.py ours.json torch.json [ours2.json torch2.json ...] --md out.md

For each pair it prints ours' and torch's median and minimum (µs) and torch/ours (> 1: ours is
faster) for both; with several pairs, the spread of the median ratio across the runs (the
run-to-run noise of a shared machine). Memory-bound rows also get ours' % of the copy
bandwidth of its own run; matmul rows GFLOP/s. fwd+bwd rows are left out (they time Candle's
autograd, not the kernels: see BENCHMARKS.md).
"""

import argparse
import json
import sys


def load(path):
    with open(path) as fh:
        return json.load(fh)


def index(data, impl):
    return {(r["op"], r["pass"], tuple(r["shape"]), r["dtype"]): r
            for r in data["rows"] if r["impl"] == impl}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("files", nargs="+", help="ours.json torch.json pairs")
    ap.add_argument("--md", help="write the markdown table here")
    args = ap.parse_args()
    if len(args.files) % 2:
        sys.exit("cpu_vs_torch.py: give ours.json torch.json in pairs")
    pairs = [(load(args.files[i]), load(args.files[i + 1])) for i in range(0, len(args.files), 2)]
    runs = []
    for o, t in pairs:
        runs.append((index(o, "ours"), index(t, "torch_eager"), o["header"], t["header"]))
    keys = [k for k in runs[0][0] if k[1] != "fwd+bwd" and k in runs[0][1]]
    lines = []
    for i, (_, _, ho, ht) in enumerate(runs):
        lines.append(f"- run {i}: ours {ho['date']} (copy {ho['copy_gbps']:.1f} GB/s, commit "
                     f"`{ho.get('git_commit')}`), torch {ht['date']} (copy {ht['copy_gbps']:.1f} "
                     f"GB/s, torch {ht.get('torch_version')})")
    lines.append("")
    hdr = "| op | pass | shape | dtype | ours med µs | ours min µs | ours % copy / GFLOP/s | torch med µs | torch min µs | torch/ours med | torch/ours min |"
    if len(runs) > 1:
        hdr += " med ratio, other runs |"
    lines += [hdr, "|" + "|".join(["---"] * (hdr.count("|") - 1)) + "|"]
    for k in keys:
        o, t = runs[0][0][k], runs[0][1][k]
        perf = (f"{o['tflops'] * 1e3:.0f} GFLOP/s" if o.get("tflops")
                else f"{o['pct_copy']:.0f}%")
        row = (f"| {k[0]} | {k[1]} | {'x'.join(map(str, k[2]))} | {k[3]} | {o['median_us']:,.1f} | "
               f"{o['min_us']:,.1f} | {perf} | {t['median_us']:,.1f} | {t['min_us']:,.1f} | "
               f"×{t['median_us'] / o['median_us']:.2f} | ×{t['min_us'] / o['min_us']:.2f} |")
        if len(runs) > 1:
            others = []
            for ro, rt, _, _ in runs[1:]:
                if k in ro and k in rt:
                    others.append(f"×{rt[k]['median_us'] / ro[k]['median_us']:.2f}")
                else:
                    others.append("-")
            row += " " + ", ".join(others) + " |"
        lines.append(row)
    md = "\n".join(lines) + "\n"
    print(md)
    if args.md:
        with open(args.md, "w") as fh:
            fh.write(md)


if __name__ == "__main__":
    main()
