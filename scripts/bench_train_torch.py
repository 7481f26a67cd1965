#!/usr/bin/env python3
"""The LoRA training step in PyTorch + PEFT, the peer of `candle-fused bench --op train`.

    python3 scripts/bench_train_torch.py [--device cpu] [--threads 2] --json torch-train.json
    python3 scripts/bench_train_torch.py --device cuda --dtype bf16 --seq 2048 --batch auto \\
        --configs qwen2.5-0.5b,llama-3.2-1b,llama-3-8b --variants eager,compile,liger --json gpu.json
    python3 scripts/merge_train_bench.py ours.json torch-train.json --md merged.md --json merged.json

The step (what is timed, per iteration): logits = model(tokens).logits (HF's forward with the
PEFT LoRA layers), loss = F.cross_entropy(logits over all B*T positions, random targets),
loss.backward(), AdamW.step(), zero_grad(set_to_none=True). Liger's variant instead passes
labels so its fused linear + cross-entropy is used (it never makes the logits). Model:
random-init transformers model of the named configuration (Llama or Qwen2 architecture),
frozen base in --dtype, PEFT LoRA on all linear layers (q/k/v/o/gate/up/down, not the LM head),
r 16, alpha 32, dropout 0; adapter weights in f32 (PEFT's autocast_adapter_dtype default);
torch.optim.AdamW(lr 1e-4) on the LoRA parameters. Random tokens (seeded), never zeros.

Variants (--variants): eager = PEFT eager with SDPA attention (transformers' default);
eager_attn = PEFT with transformers' "eager" attention (matmul + softmax); compile = the
eager model through torch.compile (forward; backward by AOTAutograd); liger = Liger-Kernel's
apply_liger_kernel_to_<arch> patching (RMSNorm, RoPE, SwiGLU, fused linear cross-entropy),
when liger_kernel imports (else the variant is listed under skipped).

--batch auto: the largest power of two whose step runs (one step each; for compile with the
eager model, so that the search does not recompile at every batch size).
Each (config, variant) runs in a fresh process, so its peak memory is its own:
  CPU: peak RSS = the process's RSS high-water mark (getrusage ru_maxrss) at the end;
       peak_delta = that minus the RSS after importing torch/transformers/peft (what the
       model, the adapter, the optimizer and the step added on top of the libraries).
  CUDA: torch.cuda.max_memory_allocated (and _reserved) over the timed steps.
Timing: warm-up steps, then the median of --iters steps (wall clock, device synchronised).
tokens/s = B * T / median step time.

GEMM efficiency: matmul FLOPs of the step / median step time, as a fraction of the GEMM rate
measured in the same process (torch.matmul, f32 on CPU: [B*T, hidden] x [hidden, intermediate],
the step's MLP up-projection shape; CUDA: --dtype [8192, 8192] x [8192, 8192]). The step's
matmul FLOPs (the same formula as the Rust bench), with M = B*T tokens, per linear K -> N:
  frozen base:  forward 2MKN, backward dX 2MKN (no dW: the base is frozen)
  LoRA rank r:  forward 2Mr(K+N), backward 4Mr(K+N) (dA, dB, and dX through A and B)
  attention:    QK^T and PV: forward 4*B*H*T^2*hd, backward 8*B*H*T^2*hd (full T x T)
  LM head:      forward 2*M*hidden*V, backward dX 2*M*hidden*V (frozen)
On CUDA this over the step time and the measured bf16 rate is the MFU figure of issue 12.
gemm_ms (the profile, --profile, default on the CPU): every GEMM shape of the step timed alone
(torch.matmul on contiguous operands, median of 5) times its count, summed: what the matmuls
alone would take; step - gemm_ms is everything else.
"""

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import time

import host_heap

CONFIGS = {
    # The CPU shapes of issue 11 (Llama architecture, heads of 64, GQA 2:1, MLP 4x, untied).
    "cpu-h256": dict(arch="llama", hidden=256, layers=4, heads=4, kv_heads=2, intermediate=1024,
                     vocab=4096, tied=False),
    "cpu-h512": dict(arch="llama", hidden=512, layers=8, heads=8, kv_heads=4, intermediate=2048,
                     vocab=8192, tied=False),
    # The GPU configurations of issue 12 (the real models' shapes, random init).
    "qwen2.5-0.5b": dict(arch="qwen2", hidden=896, layers=24, heads=14, kv_heads=2, intermediate=4864,
                         vocab=151936, tied=True, rope_theta=1000000.0),
    "llama-3.2-1b": dict(arch="llama", hidden=2048, layers=16, heads=32, kv_heads=8, intermediate=8192,
                         vocab=128256, tied=True, rope_theta=500000.0,
                         rope_scaling=dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0,
                                           high_freq_factor=4.0, original_max_position_embeddings=8192)),
    "llama-3-8b": dict(arch="llama", hidden=4096, layers=32, heads=32, kv_heads=8, intermediate=14336,
                       vocab=128256, tied=False, rope_theta=500000.0),
}
RANK, ALPHA, LR = 16, 32, 1e-4
VARIANTS = ["eager", "eager_attn", "compile", "liger"]
DTYPES = {"f32": "float32", "bf16": "bfloat16", "f16": "float16"}


def matmul_flops(c, batch, seq, rank=RANK):
    """The step's matmul FLOPs (forward + backward), see the module docstring."""
    m, h, hd = batch * seq, c["hidden"], c["hidden"] // c["heads"]
    q, kv = c["heads"] * hd, c["kv_heads"] * hd
    lins = [(h, q), (h, kv), (h, kv), (q, h), (h, c["intermediate"]), (h, c["intermediate"]),
            (c["intermediate"], h)]
    per_layer = sum(4 * m * k * n + 6 * m * rank * (k + n) for k, n in lins)
    per_layer += 12 * batch * c["heads"] * seq * seq * hd
    return c["layers"] * per_layer + 4 * m * h * c["vocab"]


def gemms(c, batch, seq, rank=RANK):
    """Every matmul of the step as contiguous GEMM shapes (batch, m, k, n, count, what), identical
    shapes merged; the same list as the Rust bench (crates/candle-fused-cli/src/bench/train/shapes.rs)."""
    m, h, hd, r, l = batch * seq, c["hidden"], c["hidden"] // c["heads"], rank, c["layers"]
    q, kv, i = c["heads"] * hd, c["kv_heads"] * hd, c["intermediate"]
    out = {}

    def add(what, b, mm, k, n, count):
        g = out.setdefault((b, mm, k, n), dict(what=[], batch=b, m=mm, k=k, n=n, count=0))
        g["count"] += count
        if what not in g["what"]:
            g["what"].append(what)

    for k, n in [(h, q), (h, kv), (h, kv), (q, h), (h, i), (h, i), (i, h)]:
        for what, dims in [("x·Wᵀ", (m, k, n)), ("dY·W", (m, n, k)), ("x·Aᵀ", (m, k, r)), ("h·Bᵀ", (m, r, n)),
                           ("dY·B", (m, n, r)), ("dYᵀ·h", (n, m, r)), ("dHᵀ·x", (r, m, k)), ("dH·A", (m, r, k))]:
            add(what, 1, *dims, l)
    bh = batch * c["heads"]
    for what, dims in [("Q·Kᵀ", (seq, hd, seq)), ("P·V", (seq, seq, hd)), ("dO·Vᵀ", (seq, hd, seq)),
                       ("Pᵀ·dO", (seq, seq, hd)), ("dS·K", (seq, seq, hd)), ("dSᵀ·Q", (seq, seq, hd))]:
        add(what, bh, *dims, l)
    add("LM head x·Wᵀ", 1, m, h, c["vocab"], 1)
    add("LM head dY·W", 1, m, c["vocab"], h, 1)
    for g in out.values():
        g["what"] = ", ".join(g["what"])
    return list(out.values())


def gemm_profile(torch, c, batch, seq, dtype, device, sync):
    """Each GEMM shape of the step timed alone (torch.matmul, median of 5 after 2): the total ms
    of the step's matmuls at these speeds, and the per-shape rows."""
    total, rows = 0.0, []
    for g in gemms(c, batch, seq):
        shape = (lambda a, b: (a, b)) if g["batch"] == 1 else (lambda a, b: (g["batch"], a, b))
        a = torch.randn(shape(g["m"], g["k"]), device=device, dtype=dtype)
        b = torch.randn(shape(g["k"], g["n"]), device=device, dtype=dtype)
        t = []
        for i in range(7):
            sync()
            t0 = time.perf_counter()
            torch.matmul(a, b)
            sync()
            if i >= 2:
                t.append(time.perf_counter() - t0)
        sec = sorted(t)[len(t) // 2]
        total += sec * g["count"]
        rows.append(dict(g, ms_each=sec * 1e3, tflops=2 * g["batch"] * g["m"] * g["k"] * g["n"] / sec / 1e12))
    return total * 1e3, rows


def git_commit():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if os.environ.get("CANDLE_FUSED_COMMIT"):
        return os.environ["CANDLE_FUSED_COMMIT"]
    try:
        return subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=12"], cwd=root,
                              capture_output=True, text=True, check=True).stdout.strip() or None
    except Exception:
        return None


def rss_mb():
    """Current RSS (MB) from /proc/self/statm."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def hwm_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def progress(msg):
    print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------
# Worker: one (config, variant) in this process


def build(torch, c, dtype, device, variant, seq):
    import transformers
    from peft import LoraConfig, get_peft_model

    if variant == "liger":
        import liger_kernel.transformers as lk  # ImportError -> skipped
        getattr(lk, f"apply_liger_kernel_to_{c['arch']}")(
            rope=True, rms_norm=True, swiglu=True, cross_entropy=False, fused_linear_cross_entropy=True)
    kw = dict(vocab_size=c["vocab"], hidden_size=c["hidden"], intermediate_size=c["intermediate"],
              num_hidden_layers=c["layers"], num_attention_heads=c["heads"],
              num_key_value_heads=c["kv_heads"], max_position_embeddings=max(4096, seq),
              rms_norm_eps=1e-5, tie_word_embeddings=c["tied"],
              rope_parameters=dict(c.get("rope_scaling", dict(rope_type="default")),
                                   rope_theta=c.get("rope_theta", 10000.0)))
    cfg_cls = transformers.LlamaConfig if c["arch"] == "llama" else transformers.Qwen2Config
    cfg = cfg_cls(**kw)
    attn = "eager" if variant == "eager_attn" else "sdpa"
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation=attn)
    model.config.use_cache = False
    lcfg = LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules="all-linear",
                      bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(model, lcfg)
    with torch.no_grad():  # non-zero B, like a model in the middle of training
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0.0, 0.01)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR)
    n_lora = sum(p.numel() for p in params)
    fwd = torch.compile(model) if variant == "compile" else model
    return model, fwd, opt, n_lora


def make_step(torch, fwd, opt, variant, tokens, targets):
    import torch.nn.functional as F

    def step():
        if variant == "liger":
            # Liger's fused linear cross-entropy needs labels (it shifts them: pass tokens + 1 col).
            loss = fwd(input_ids=tokens, labels=targets).loss
        else:
            logits = fwd(input_ids=tokens).logits
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return step


def gemm_rate(torch, c, batch, seq, dtype, device, sync):
    """TFLOP/s of torch.matmul on the step's MLP shape (CPU) or 8192^3 (CUDA), median of reps."""
    if device.type == "cuda":
        m, k, n = 8192, 8192, 8192
    else:
        m, k, n = batch * seq, c["hidden"], c["intermediate"]
    g = torch.Generator(device=device).manual_seed(7)
    a = torch.randn(m, k, generator=g, device=device, dtype=dtype)
    b = torch.randn(k, n, generator=g, device=device, dtype=dtype)
    times = []
    for i in range(25):
        sync()
        t = time.perf_counter()
        torch.matmul(a, b)
        sync()
        if i >= 5:
            times.append(time.perf_counter() - t)
    times.sort()
    return 2 * m * k * n / times[len(times) // 2] / 1e12, [m, k, n]


def worker(args):
    t_start = time.perf_counter()
    import torch
    import transformers
    import peft

    rss_libs = rss_mb()
    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, DTYPES[args.dtype])
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    c = CONFIGS[args.config]
    try:
        model, fwd, opt, n_lora = build(torch, c, dtype, device, args.variant, args.seq)
    except ImportError as e:
        print(f"SKIP {args.variant}: {e}", flush=True)
        return
    rss_model = rss_mb()

    def attempt(batch, steps, warmup, f=None):
        g = torch.Generator(device="cpu").manual_seed(args.seed + batch)
        seq = torch.randint(0, c["vocab"], (batch, args.seq + 1), generator=g)
        tokens, targets = seq[:, :-1].to(device), seq[:, 1:].to(device)
        if args.variant == "liger":  # HF/Liger shift labels inside: labels[t] is predicted at t-1
            targets = seq[:, :-1].to(device)
        step = make_step(torch, f or fwd, opt, args.variant, tokens, targets)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        times, losses = [], []
        for i in range(steps):
            sync()
            t = time.perf_counter()
            loss = step()
            sync()
            dt = time.perf_counter() - t
            losses.append(loss.item())
            if i >= warmup:
                times.append(dt)
            progress(f"  {args.config} {args.variant} batch {batch} step {i + 1}/{steps}: "
                     f"{dt * 1e3:.1f} ms, loss {losses[-1]:.4f}")
        return times, losses

    if args.batch == "auto":  # the largest power of two that fits: one step each, then time it
        # compile: the search runs the eager model (each new batch would recompile, minutes on
        # the 8B configuration); the compiled step then runs at the batch found.
        b = None
        probe = model if args.variant == "compile" else None
        for cand in [2**i for i in range(0, 10)]:
            try:
                attempt(cand, 1, 1, probe)
                b = cand
            except torch.OutOfMemoryError:
                progress(f"  batch {cand}: out of memory")
                break
            finally:
                opt.zero_grad(set_to_none=True)
                if cuda:
                    torch.cuda.empty_cache()
        if b is None:
            raise SystemExit("batch 1 does not fit")
    else:
        b = int(args.batch)
    times, losses = attempt(b, args.warmup + args.iters, args.warmup)
    best = (b, times, losses, torch.cuda.max_memory_allocated() if cuda else None,
            torch.cuda.max_memory_reserved() if cuda else None)
    b, times, losses, peak_alloc, peak_reserved = best
    times.sort()
    med = times[len(times) // 2]
    rate, gemm_shape = gemm_rate(torch, c, b, args.seq, dtype, device, sync)
    flops = matmul_flops(c, b, args.seq)
    assert abs(sum(2 * g["batch"] * g["m"] * g["k"] * g["n"] * g["count"] for g in gemms(c, b, args.seq)) - flops) < 1e-6 * flops
    gemm_ms, gemm_shapes = gemm_profile(torch, c, b, args.seq, dtype, device, sync) if args.profile else (None, None)
    row = dict(
        op="train", impl=f"torch_peft_{args.variant}" if args.variant != "eager" else "torch_peft",
        variant=args.variant, config=args.config, model=c, batch=b, seq=args.seq, dtype=args.dtype,
        device=device.type, rank=RANK, alpha=ALPHA, lora_params=n_lora, threads=torch.get_num_threads(),
        warmup=args.warmup, iters=args.iters, step_ms=[t * 1e3 for t in times], median_step_ms=med * 1e3,
        tokens_per_s=b * args.seq / med, losses=losses, matmul_flops=flops, tflops=flops / med / 1e12,
        gemm_rate_tflops=rate, gemm_shape=gemm_shape, gemm_efficiency=flops / med / 1e12 / rate,
        gemm_ms=gemm_ms, gemm_shapes=gemm_shapes,
        rss_after_imports_mb=rss_libs, rss_after_model_mb=rss_model,
        wall_s=time.perf_counter() - t_start, host_heap=args.host_heap,
    )
    if cuda:
        row.update(peak_mem_mb=peak_alloc / 2**20, peak_reserved_mb=peak_reserved / 2**20,
                   mem_kind="torch.cuda.max_memory_allocated over the timed steps")
    else:
        row.update(peak_mem_mb=hwm_mb(), peak_delta_mb=hwm_mb() - rss_libs,
                   mem_kind="process RSS high-water mark (ru_maxrss), fresh process per row")
    print("ROW " + json.dumps(row), flush=True)


# ----------------------------------------------------------------------------------------------
# Driver


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", default=None, choices=list(DTYPES), help="default: f32 on CPU, bf16 on CUDA")
    ap.add_argument("--configs", default=None, help=f"comma-separated from {list(CONFIGS)} "
                    "(default: the cpu-* ones on CPU, the others on CUDA)")
    ap.add_argument("--variants", default="eager", help=f"comma-separated from {VARIANTS}")
    ap.add_argument("--batch", default=None, help="batch size, or auto (largest that fits, CUDA); default 4 (CPU)")
    ap.add_argument("--seq", type=int, default=None, help="sequence length (default 256 CPU, 2048 CUDA)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: all cores)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--profile", type=int, default=None, help="1: time each GEMM shape of the step alone "
                    "(gemm_ms; default on for the CPU)")
    ap.add_argument("--json", help="write {header, rows, skipped} here")
    ap.add_argument("--host-heap", default="keep", choices=["keep", "release"],
                    help="freed host memory: keep (in glibc's heap, as candle-fused bench does "
                         "by default) or release (glibc's defaults)")
    ap.add_argument("--worker", nargs=2, metavar=("CONFIG", "VARIANT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    cuda = args.device == "cuda"
    args.dtype = args.dtype or ("bf16" if cuda else "f32")
    args.seq = args.seq or (2048 if cuda else 256)
    args.batch = args.batch or ("auto" if cuda else "4")
    args.threads = args.threads or os.cpu_count()
    args.profile = (0 if cuda else 1) if args.profile is None else args.profile
    if args.worker:
        args.config, args.variant = args.worker
        args.host_heap = host_heap.apply(args.host_heap)  # what this worker runs with
        return worker(args)

    configs = args.configs.split(",") if args.configs else [k for k in CONFIGS if k.startswith("cpu-") != cuda]
    variants = args.variants.split(",")
    for bad in [c for c in configs if c not in CONFIGS] + [v for v in variants if v not in VARIANTS]:
        sys.exit(f"bench_train_torch.py: unknown config or variant {bad!r}")
    import peft
    import torch
    import transformers

    header = dict(
        tool="scripts/bench_train_torch.py",
        date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        device=args.device,
        device_name=torch.cuda.get_device_name() if cuda else (platform.processor() or platform.machine()),  # CPU: below
        cpu_count=os.cpu_count(), threads=args.threads, git_commit=git_commit(),
        torch_version=torch.__version__, transformers_version=transformers.__version__,
        peft_version=peft.__version__, python=platform.python_version(),
        load=os.getloadavg() if hasattr(os, "getloadavg") else None,
        host_heap=args.host_heap,
        legend=__doc__.split("\n\n", 2)[2],
    )
    try:
        with open("/proc/cpuinfo") as f:
            names = [l.split(":", 1)[1].strip() for l in f if l.startswith("model name")]
        if names and not cuda:  # the same form as the Rust bench's device name
            header["device_name"] = f"{names[0]} ({args.threads} threads)"
    except OSError:
        pass
    rows, skipped = [], []
    for name in configs:
        for v in variants:
            cmd = [sys.executable, os.path.abspath(__file__), "--worker", name, v, "--device", args.device,
                   "--dtype", args.dtype, "--seq", str(args.seq), "--batch", str(args.batch),
                   "--threads", str(args.threads), "--warmup", str(args.warmup), "--iters", str(args.iters),
                   "--seed", str(args.seed), "--profile", str(args.profile), "--host-heap", args.host_heap]
            progress(f"{name} / {v}: fresh process")
            p = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
            got = [l[4:] for l in p.stdout.splitlines() if l.startswith("ROW ")]
            skip = [l[5:] for l in p.stdout.splitlines() if l.startswith("SKIP ")]
            if p.returncode != 0 or not got:
                why = skip[-1] if skip else f"worker exit {p.returncode} (see its stderr in the log)"
                skipped.append(dict(op="train", config=name, variant=v, error=why))
                progress(f"{name} / {v}: skipped: {why}")
                continue
            r = json.loads(got[-1])
            rows.append(r)
            progress(f"{name} / {v}: {r['median_step_ms']:.1f} ms/step, {r['tokens_per_s']:.0f} tokens/s, "
                     f"peak {r['peak_mem_mb']:.0f} MB, GEMM efficiency {100 * r['gemm_efficiency']:.1f}% "
                     f"of {r['gemm_rate_tflops'] * 1e3:.1f} GFLOP/s")
            if args.json:
                write(args.json, header, rows, skipped)
    header["load_after"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    if args.json:
        write(args.json, header, rows, skipped)
    print(f"{'config':<14} {'impl':<24} {'batch':>5} {'ms/step':>9} {'tokens/s':>9} {'peak MB':>8} {'GEMM eff':>8}")
    for r in rows:
        print(f"{r['config']:<14} {r['impl']:<24} {r['batch']:>5} {r['median_step_ms']:>9.1f} "
              f"{r['tokens_per_s']:>9.0f} {r['peak_mem_mb']:>8.0f} {100 * r['gemm_efficiency']:>7.1f}%")
    for s in skipped:
        print(f"skipped: {s['config']} {s['variant']}: {s['error']}")


def write(path, header, rows, skipped):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(dict(header=header, rows=rows, skipped=skipped), f, indent=2)
    os.replace(tmp, path)


if __name__ == "__main__":
    main()
