#!/usr/bin/env python3
"""Merge `candle-fused bench` JSON and `scripts/bench_torch.py` JSON into one JSON file and a
markdown table (Python standard library only).

    python3 scripts/merge_bench.py ours.json torch.json --json merged.json --md merged.md

Every input has the same layout: {"header": {...}, "rows": [...], "skipped": [...]}. Rows are
matched on (op, pass, shape, dtype, device). Each row keeps the GB/s and % of copy bandwidth
of its own run (each run measured its own copy bandwidth). `speedup` is recomputed for every
row that names a `baseline` (the like-for-like measurement of ours: `ours`, or `ours_autograd`
for Candle's composed backward): this row's median / the baseline's median, i.e. how many
times faster ours is.

The markdown has a summary table (one line per op, pass, shape, dtype: ours' time, GB/s and %
of copy bandwidth, then each other impl's time and how many times faster ours is), for the
compute-bound rows (LoRA, rows with flops) a summary with TFLOP/s, ours / the base GEMM and
ours / PyTorch's autograd against the issue's targets, and the full table (one line per impl),
ready to paste into BENCHMARKS.md.
"""

import argparse
import json
import sys

# Column order of the impls (others are appended in the order they appear).
IMPL_ORDER = [
    "ours",
    "ours_autograd",
    "base_gemm",
    "base_linear",
    "candle_fused_builtin",
    "candle_composed",
    "candle_rotary_emb",
    "merged",
    "torch_eager",
    "torch_base",
    "torch_peft",
    "torch_addmm",
    "torch_merged",
    "torch_compile",
    "liger",
]
# Compute-bound rows (those with flops: LoRA) get their own summary with TFLOP/s and the
# targets of issue 4: fwd <= 1.05x the limit (the faster of base_gemm and base_linear) for
# M >= 4096, fwd+bwd <= 0.85x PyTorch's autograd (torch_peft).
LIMIT_IMPLS = ("base_gemm", "base_linear")
FWD_TARGET, FWD_TARGET_MIN_M = 1.05, 4096
FWD_BWD_TARGET, FWD_BWD_VS = 0.85, "torch_peft"
PASS_ORDER = {"fwd": 0, "bwd": 1, "fwd+bwd": 2}


def shape_str(shape):
    return "x".join(str(d) for d in shape)


def load(path):
    with open(path) as fh:
        data = json.load(fh)
    for k in ("header", "rows"):
        if k not in data:
            sys.exit(f"merge_bench.py: {path} has no {k!r} (not a bench JSON)")
    return data


def key(r):
    return (r["op"], r["pass"], tuple(r["shape"]), r["dtype"], r.get("device", "?"))


def merge(inputs):
    runs, rows, skipped = [], [], []
    for i, (path, data) in enumerate(inputs):
        h = dict(data["header"])
        h["file"] = path
        runs.append(h)
        copy = h.get("copy_gbps")
        for r in data["rows"]:
            r = dict(r)
            r["run"] = i
            if r.get("pct_copy") is None and copy:
                r["pct_copy"] = 100.0 * r["gbps"] / copy
            rows.append(r)
        for s in data.get("skipped", []):
            s = dict(s)
            s["run"] = i
            skipped.append(s)
    # Several rows of one key and impl (e.g. two runs of ours): keep the first.
    seen, uniq = set(), []
    for r in rows:
        k = key(r) + (r["impl"],)
        if k in seen:
            continue
        seen.add(k)
        uniq.append(r)
    by_key = {}
    for r in uniq:
        by_key.setdefault(key(r), {})[r["impl"]] = r
    for r in uniq:
        b = r.get("baseline")
        base = by_key[key(r)].get(b) if b else None
        r["speedup"] = r["median_us"] / base["median_us"] if base else None
    order = {}
    for r in uniq:
        order.setdefault((r["op"], tuple(r["shape"]), r["dtype"]), len(order))

    def impl_rank(name):
        return IMPL_ORDER.index(name) if name in IMPL_ORDER else len(IMPL_ORDER)

    uniq.sort(key=lambda r: (order[(r["op"], tuple(r["shape"]), r["dtype"])],
                             PASS_ORDER.get(r["pass"], 9), impl_rank(r["impl"])))
    return runs, uniq, skipped


def fmt_us(x):
    return f"{x:,.1f}" if x < 1e5 else f"{x:,.0f}"


def markdown(runs, rows, skipped):
    out = []
    out.append("### Runs\n")
    for i, h in enumerate(runs):
        extra = ""
        if h.get("torch_version"):
            extra = f", torch {h['torch_version']}"
            if h.get("triton_version"):
                extra += f", triton {h['triton_version']}"
        out.append(
            f"- run {i}: `{h.get('tool', '?')}` on **{h.get('device_name', '?')}** "
            f"({h.get('device', '?')}), {h.get('date', '?')}, copy bandwidth "
            f"**{h.get('copy_gbps', 0):.1f} GB/s**, commit `{h.get('git_commit') or '?'}`, "
            f"mode {h.get('mode', '?')}{extra}"
        )
    names = {h.get("device_name") for h in runs}
    if len(names) > 1:
        out.append(f"\n**Warning: the runs are on different devices: {sorted(map(str, names))}.**")

    mem_rows = [r for r in rows if not r.get("flops")]
    impls = []
    for r in mem_rows:
        if r["impl"] not in impls:
            impls.append(r["impl"])
    impls.sort(key=lambda n: IMPL_ORDER.index(n) if n in IMPL_ORDER else len(IMPL_ORDER))
    others = [n for n in impls if n != "ours"]

    if mem_rows:
        out += mem_summary(mem_rows, others)
    lora_rows = [r for r in rows if r.get("flops")]
    if lora_rows:
        out += compute_summary(lora_rows)

    out.append("\n### All rows\n")
    out.append("| op | pass | shape | dtype | impl | median µs | GB/s | % copy | TFLOP/s | ours ×faster | run |")
    out.append("|---|---|---|---|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        sp = f"×{r['speedup']:.2f}" if r.get("speedup") is not None else ""
        tf = fmt_tf(r.get("tflops"), "")
        out.append(
            f"| {r['op']} | {r['pass']} | {shape_str(r['shape'])} | {r['dtype']} | {r['impl']} | "
            f"{fmt_us(r['median_us'])} | {r['gbps']:.1f} | {r['pct_copy']:.1f}% | {tf} | {sp} | {r['run']} |"
        )
    if skipped:
        out.append("\n### Not measured\n")
        for s in skipped:
            out.append(
                f"- {s['op']} {s['pass']} {shape_str(s['shape'])} {s['dtype']} {s['impl']} "
                f"(run {s['run']}): {s['error']}"
            )
    notes = [(i, n) for i, h in enumerate(runs) for n in h.get("notes", [])]
    if notes:
        out.append("\n### Notes\n")
        for i, n in notes:
            out.append(f"- run {i}: {n}")
    legend = [h.get("legend") for h in runs if h.get("legend")]
    if legend:
        out.append("\n### How it was measured\n")
        for i, h in enumerate(runs):
            if h.get("legend"):
                out.append(f"run {i} (`{h.get('tool', '?')}`):\n\n```text\n{h['legend']}\n```\n")
    return "\n".join(out) + "\n"


def fmt_tf(t, missing="-"):
    """TFLOP/s: two decimals, or three significant digits below 0.1 (CPU, tiny shapes)."""
    if not t:
        return missing
    return f"{t:.2f}" if t >= 0.1 else f"{t:.3g}"


def impl_cell(r):
    if r is None:
        return ""
    if r.get("speedup") is not None:
        return f"{fmt_us(r['median_us'])} (×{r['speedup']:.2f})"
    return f"{fmt_us(r['median_us'])} ({r['pct_copy']:.0f}% copy)"


def compute_summary(rows):
    """LoRA (rows with flops): ours' time and TFLOP/s, ours / the limit (the faster of
    base_gemm and base_linear) and ours / torch_peft with the issue's targets, then each other
    impl's time and how many times faster ours is."""
    out = ["\n### Summary: LoRA (compute-bound)\n"]
    out.append(
        "Times are medians in µs; TFLOP/s = useful flops / time (formulas in the legend). "
        "`ours/limit` = ours' time / the faster of `base_gemm` and `base_linear` (the bare "
        f"x·Wᵀ; target ≤ {FWD_TARGET} for the forward with M ≥ {FWD_TARGET_MIN_M}); "
        f"`ours/{FWD_BWD_VS}` = ours' time / PyTorch's PEFT-style time (target ≤ "
        f"{FWD_BWD_TARGET} for fwd+bwd). Other impls: time, then (×N) = ours is N times faster "
        "(×N < 1: that impl is faster).\n"
    )
    impls = []
    for r in rows:
        if r["impl"] not in impls and r["impl"] != "ours":
            impls.append(r["impl"])
    impls.sort(key=lambda n: IMPL_ORDER.index(n) if n in IMPL_ORDER else len(IMPL_ORDER))
    head = ["op", "pass", "shape", "dtype", "ours µs", "ours TFLOP/s", "ours/limit",
            f"ours/{FWD_BWD_VS}"] + impls
    out.append("| " + " | ".join(head) + " |")
    out.append("|" + "|".join(["---"] * 4 + ["---:"] * (len(head) - 4)) + "|")
    groups = {}
    for r in rows:
        groups.setdefault(key(r), {})[r["impl"]] = r
    for k, g in groups.items():
        op, pas, shape, dtype, _ = k
        o = g.get("ours")
        cells = [op, pas, shape_str(shape), dtype]
        if o:
            cells += [fmt_us(o["median_us"]), fmt_tf(o.get("tflops"))]
            limit = min((g[n]["median_us"] for n in LIMIT_IMPLS if n in g), default=None)
            if limit:
                ratio = o["median_us"] / limit
                mark = ""
                if pas == "fwd" and shape[0] >= FWD_TARGET_MIN_M:
                    mark = " ✓" if ratio <= FWD_TARGET else " ✗"
                cells.append(f"{ratio:.3f}{mark}")
            else:
                cells.append("-")
            vs = g.get(FWD_BWD_VS)
            if vs:
                ratio = o["median_us"] / vs["median_us"]
                mark = (" ✓" if ratio <= FWD_BWD_TARGET else " ✗") if pas == "fwd+bwd" else ""
                cells.append(f"{ratio:.3f}{mark}")
            else:
                cells.append("-")
        else:
            cells += ["-", "-", "-", "-"]
        cells += [impl_cell(g.get(n)) for n in impls]
        out.append("| " + " | ".join(cells) + " |")
    return out


def mem_summary(rows, others):
    out = ["\n### Summary\n"]
    out.append(
        "Times are medians in µs. `ours`: GB/s of the bytes that must move and % of the copy "
        "bandwidth measured in the same run. Other impls: time, then (×N) = ours is N times "
        "faster (bwd of `candle_composed` is compared with `ours_autograd`: both time "
        "`loss.backward()`; everything else with `ours`).\n"
    )
    head = ["op", "pass", "shape", "dtype", "ours µs", "ours GB/s", "ours % copy"] + others
    out.append("| " + " | ".join(head) + " |")
    out.append("|" + "|".join(["---"] * 4 + ["---:"] * (len(head) - 4)) + "|")
    groups = {}
    for r in rows:
        groups.setdefault(key(r), {})[r["impl"]] = r
    for k, g in groups.items():
        op, pas, shape, dtype, _ = k
        o = g.get("ours")
        cells = [op, pas, shape_str(shape), dtype]
        if o:
            cells += [fmt_us(o["median_us"]), f"{o['gbps']:.1f}", f"{o['pct_copy']:.1f}%"]
        else:
            cells += ["-", "-", "-"]
        cells += [impl_cell(g.get(n)) for n in others]
        out.append("| " + " | ".join(cells) + " |")
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("inputs", nargs="+", help="bench JSON files (candle-fused bench, bench_torch.py)")
    ap.add_argument("--json", help="write the merged JSON here")
    ap.add_argument("--md", help="write the markdown here (default: stdout)")
    args = ap.parse_args()
    runs, rows, skipped = merge([(p, load(p)) for p in args.inputs])
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"runs": runs, "rows": rows, "skipped": skipped}, fh, indent=2)
    md = markdown(runs, rows, skipped)
    if args.md:
        with open(args.md, "w") as fh:
            fh.write(md)
        print(f"merge_bench.py: {len(rows)} rows from {len(runs)} runs -> "
              f"{args.md}" + (f", {args.json}" if args.json else ""))
    else:
        sys.stdout.write(md)


if __name__ == "__main__":
    main()
