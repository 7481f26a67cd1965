#!/usr/bin/env python3
"""Merge the training-step bench JSON of `candle-fused bench --op train` and of
`scripts/bench_train_torch.py` into one JSON and a markdown table (standard library only).

    python3 scripts/merge_train_bench.py ours.json torch.json --json merged.json --md merged.md

Rows are grouped by (config, dtype, device, seq); within a group every impl keeps its own batch
(on a GPU each side runs the largest batch that fits). The summary has, per group: each impl's
tokens/s, ms/step, peak memory and GEMM efficiency, then the issue's ratios with their targets:
  ours / ours_tape tokens/s              >= 2.0   (issue 11)
  ours / torch_peft tokens/s             >= 1.0   (CPU, issue 11; GPU: 1.3 for 0.5B/1B, 1.1 8B)
  ours GEMM efficiency                   >= 80%   (the fallback of issue 11 when the matmul
                                                   rate makes 1.0x PyTorch impossible)
  ours / torch_peft peak memory          <= 1.0   (CPU, process RSS high-water marks; GPU 0.7)
  ours / best torch variant tokens/s     >= 1.0   (GPU, issue 12)
The model configurations of the two files must agree (checked), and the runs must be on the
same device (a warning otherwise).
"""

import argparse
import json
import sys

IMPL_ORDER = ["ours", "ours_tape", "torch_peft", "torch_peft_eager_attn", "torch_peft_compile",
              "torch_peft_liger"]
GPU_SPEED = {"qwen2.5-0.5b": 1.3, "llama-3.2-1b": 1.3, "llama-3-8b": 1.1}


def load(path):
    with open(path) as f:
        d = json.load(f)
    if "header" not in d or "rows" not in d:
        sys.exit(f"merge_train_bench.py: {path} is not a bench JSON (no header/rows)")
    return d


def mark(ok):
    return " ✓" if ok else " ✗"


def rank(impl):
    return IMPL_ORDER.index(impl) if impl in IMPL_ORDER else len(IMPL_ORDER)


def merge(inputs):
    runs, rows, skipped, models = [], [], [], {}
    for i, (path, d) in enumerate(inputs):
        runs.append(dict(d["header"], file=path))
        for r in d["rows"]:
            if r.get("op") != "train":
                continue
            r = dict(r, run=i)
            m = {k: r["model"][k] for k in ("hidden", "layers", "heads", "kv_heads", "intermediate", "vocab")}
            if models.setdefault(r["config"], m) != m:
                sys.exit(f"merge_train_bench.py: config {r['config']} differs between runs: "
                         f"{models[r['config']]} vs {m} ({path})")
            rows.append(r)
        skipped += [dict(s, run=i) for s in d.get("skipped", [])]
    groups = {}
    for r in rows:
        groups.setdefault((r["config"], r["dtype"], r["device"], r["seq"]), {}).setdefault(r["impl"], r)
    return runs, groups, skipped


def markdown(runs, groups, skipped):
    out = ["### Runs\n"]
    for i, h in enumerate(runs):
        ver = ""
        if h.get("torch_version"):
            ver = f", torch {h['torch_version']}, transformers {h.get('transformers_version')}, peft {h.get('peft_version')}"
        load = f", load {h['load']}" if h.get("load") else ""
        out.append(f"- run {i}: `{h.get('tool')}` on **{h.get('device_name')}** ({h.get('device')}, "
                   f"{h.get('threads', '?')} threads), {h.get('date')}, commit `{h.get('git_commit') or '?'}`{ver}{load}")
    if len({h.get("device_name") for h in runs}) > 1:
        out.append("\n**Warning: the runs are on different devices.**")
    out.append("\n### Training step (LoRA r 16 all-linear, AdamW)\n")
    out.append("| config | dtype | batch × seq | impl | ms/step | tokens/s | peak MB | GEMM eff | GEMMs alone ms | rest ms | run |")
    out.append("|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for (cfg, dt, dev, seq), g in groups.items():
        for impl in sorted(g, key=rank):
            r = g[impl]
            gm = r.get("gemm_ms")
            gcell = f"{gm:,.1f} | {r['median_step_ms'] - gm:,.1f}" if gm else "- | -"
            out.append(f"| {cfg} | {dt} | {r['batch']} × {seq} | {impl} | {r['median_step_ms']:,.1f} | "
                       f"{r['tokens_per_s']:,.0f} | {r['peak_mem_mb']:,.0f} | {100 * r['gemm_efficiency']:.1f}% | "
                       f"{gcell} | {r['run']} |")
    out.append("\nGEMM eff = the step's matmul FLOPs / step time / the GEMM rate its side measured in the same "
               "process. GEMMs alone = every GEMM shape of the step timed alone on that side's matmul, times its "
               "count (the matmuls' share of the step); rest = step − that (softmax, norms, RoPE, elementwise, "
               "copies, allocation, optimizer).")
    out.append("\n### Ratios against the targets\n")
    out.append("| config | ours/tape tokens/s (≥ 2) | ours/torch_peft tokens/s | ours GEMM eff (≥ 80%) | "
               "ours/torch_peft peak mem | ours/best torch tokens/s (≥ 1) |")
    out.append("|---|---:|---:|---:|---:|---:|")
    for (cfg, dt, dev, seq), g in groups.items():
        o = g.get("ours")
        if not o:
            continue
        cells = [cfg]
        t = g.get("ours_tape")
        cells.append(f"{o['tokens_per_s'] / t['tokens_per_s']:.2f}{mark(o['tokens_per_s'] >= 2 * t['tokens_per_s'])}"
                     if t else "-")
        p = g.get("torch_peft")
        speed_t = GPU_SPEED.get(cfg, 1.0) if dev == "cuda" else 1.0
        cells.append(f"{o['tokens_per_s'] / p['tokens_per_s']:.2f}{mark(o['tokens_per_s'] >= speed_t * p['tokens_per_s'])} "
                     f"(≥ {speed_t})" if p else "-")
        cells.append(f"{100 * o['gemm_efficiency']:.1f}%{mark(o['gemm_efficiency'] >= 0.8)}")
        mem_t = 0.7 if dev == "cuda" else 1.0
        cells.append(f"{o['peak_mem_mb'] / p['peak_mem_mb']:.2f}{mark(o['peak_mem_mb'] <= mem_t * p['peak_mem_mb'])} "
                     f"(≤ {mem_t})" if p else "-")
        torch_rows = [r for k, r in g.items() if k.startswith("torch")]
        best = max(torch_rows, key=lambda r: r["tokens_per_s"], default=None)
        cells.append(f"{o['tokens_per_s'] / best['tokens_per_s']:.2f}{mark(o['tokens_per_s'] >= best['tokens_per_s'])} "
                     f"({best['impl']})" if best else "-")
        out.append("| " + " | ".join(cells) + " |")
    prof = []
    for (cfg, dt, dev, seq), g in groups.items():
        o, p = g.get("ours"), g.get("torch_peft")
        if o and p and o.get("gemm_shapes") and p.get("gemm_shapes"):
            ps = {(x["batch"], x["m"], x["k"], x["n"]): x for x in p["gemm_shapes"]}
            prof.append(f"\n**{cfg}**: the step's GEMMs alone: ours {o['gemm_ms']:,.1f} ms, PyTorch "
                        f"{p['gemm_ms']:,.1f} ms (ours / PyTorch = {o['gemm_ms'] / p['gemm_ms']:.2f}); GEMM rate "
                        f"{1e3 * o['gemm_rate_tflops']:.0f} vs {1e3 * p['gemm_rate_tflops']:.0f} GFLOP/s.\n")
            prof.append("| GEMM | [b×] m × k × n | count | ours ms each | PyTorch ms each | ours/PyTorch |")
            prof.append("|---|---|---:|---:|---:|---:|")
            for x in sorted(o["gemm_shapes"], key=lambda x: -x["ms_each"] * x["count"]):
                y = ps.get((x["batch"], x["m"], x["k"], x["n"]))
                b = f"{x['batch']}× " if x["batch"] > 1 else ""
                prof.append(f"| {x['what']} | {b}{x['m']} × {x['k']} × {x['n']} | {x['count']} | {x['ms_each']:.3f} | "
                            + (f"{y['ms_each']:.3f} | {x['ms_each'] / y['ms_each']:.2f}" if y else "- | -") + " |")
    if prof:
        out.append("\n### Profile: the step's GEMM shapes, each timed alone\n")
        out += prof
    mem = {}
    for g in groups.values():
        for r in g.values():
            mem.setdefault(r.get("mem_kind", "?"), []).append(r["impl"])
    out.append("\nPeak memory: " + "; ".join(f"{', '.join(sorted(set(v), key=rank))}: {k}" for k, v in mem.items()) + ".")
    extra = [(r["config"], r["impl"], r) for g in groups.values() for r in g.values()
             if r.get("heap_peak_mb") is not None or r.get("peak_delta_mb") is not None]
    if extra:
        out.append("\n| config | impl | process RSS peak MB | RSS peak − RSS at start MB | heap peak MB (counting allocator) |")
        out.append("|---|---|---:|---:|---:|")
        for cfg, impl, r in extra:
            hp = r.get("heap_peak_mb")
            out.append(f"| {cfg} | {impl} | {r['peak_mem_mb']:,.0f} | {r.get('peak_delta_mb', 0):,.0f} | "
                       + (f"{hp:,.0f}" if hp is not None else "-") + " |")
    if skipped:
        out.append("\n### Not measured\n")
        for s in skipped:
            out.append(f"- {s.get('config')} {s.get('variant', s.get('impl'))} (run {s['run']}): {s.get('error')}")
    for i, h in enumerate(runs):
        for n in h.get("notes", []):
            out.append(f"- run {i}: {n}")
    for i, h in enumerate(runs):
        if h.get("legend"):
            out.append(f"\n<details><summary>How run {i} measured</summary>\n\n```text\n{h['legend'].strip()}\n```\n</details>")
    return "\n".join(out) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("inputs", nargs="+")
    ap.add_argument("--json")
    ap.add_argument("--md")
    args = ap.parse_args()
    runs, groups, skipped = merge([(p, load(p)) for p in args.inputs])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(runs=runs, rows=[r for g in groups.values() for r in g.values()], skipped=skipped), f, indent=2)
    md = markdown(runs, groups, skipped)
    if args.md:
        with open(args.md, "w") as f:
            f.write(md)
        print(f"merge_train_bench.py: {sum(map(len, groups.values()))} rows -> {args.md}")
    else:
        sys.stdout.write(md)


if __name__ == "__main__":
    main()
