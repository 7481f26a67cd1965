#!/usr/bin/env python3
"""Time PyTorch on the shapes of `candle-fused bench`, in the same JSON row schema.

Run it on the GPU machine in the same device call as `candle-fused bench --device cuda`,
then merge both with `scripts/merge_bench.py`:

    candle-fused bench --device cuda --json ours.json
    python3 scripts/bench_torch.py --json torch.json --cases ours.json
    python3 scripts/merge_bench.py ours.json torch.json --json merged.json --md merged.md

What is timed (impl `torch_eager`, and `torch_compile` = the same function through
`torch.compile(dynamic=False)`):
  softmax         torch.softmax(x, -1)
  masked_softmax  torch.softmax(x * scale + mask, -1); causal masking through a precomputed
                  additive [S, T] mask (0 / -inf), plus the [S, T] mask of the case if any
  rms_norm        F.rms_norm(x, (D,), w, eps)
  add_rms_norm    s = x + r; (F.rms_norm(s, (D,), w, eps), s)
Passes:
  fwd      the function on plain tensors
  bwd      torch.autograd.grad(outputs, inputs, grad_outputs=probes, retain_graph=True) on a
           graph built once per input set before timing (the op's backward alone, like ours'
           standalone backward given dy)
  fwd+bwd  the function on leaf tensors, loss = sum(out * probe), torch.autograd.grad(loss)

LoRA (family lora_linear, shape [M, K, N, r], x [M, K], frozen W [N, K], A [r, K], B [N, r],
s = 2.0, no bias; passes fwd, bwd and fwd+bwd, like the Rust bench):
  torch_base     F.linear(x, W)                                      (the bare base GEMM)
  torch_peft     F.linear(x, W) + F.linear(F.linear(x, A), B) * s    (what PEFT's Linear does)
  torch_addmm    y = x @ W.T; y.addmm_(x @ A.T, B.T, alpha=s)
  torch_merged   F.linear(x, W + s * B @ A)  (fwd only; the merge is done before timing)
  torch_compile  torch_peft through torch.compile(dynamic=False)
  bwd: torch_base and torch_peft only: torch.autograd.grad(y, [x, A, B] (torch_base: [x]),
  grad_outputs=probe, retain_graph=True) on a graph built before timing (the backward alone).
  fwd+bwd: x, A, B require grad (torch_base: x only), W does not; loss = sum(y * probe),
  torch.autograd.grad(loss, [x, A, B]). Flops and bytes as in crates/candle-fused-cli/src/bench/lora.rs.

Cross-entropy (family cross_entropy, logits [N, V], a tenth of the targets ignored, mean;
passes fwd, bwd, fwd+bwd with the bytes of crates/candle-fused-cli/src/bench/loss.rs):
  torch_eager    F.cross_entropy(x, t)
  torch_compile  the same through torch.compile(dynamic=False)
  liger_ce       liger_kernel's LigerCrossEntropyLoss (when the package imports; it writes the
                 gradient into its input logits during the forward, so the input set is reused
                 with those values: timing only)
Linear + cross-entropy (family linear_cross_entropy, shape [N, H, V], h [N, H], w [V, H];
passes fwd, fwd+bwd (frozen head: grad of h), fwd+bwd+dw (grads of h and w)):
  torch_eager    F.cross_entropy(h @ w.T, t)
  torch_compile  the same through torch.compile(dynamic=False)
  liger_flce     liger_kernel's LigerFusedLinearCrossEntropyLoss (when it imports)
  torch_base     the GEMMs alone: h @ w.T; then L @ w (and L.T @ h for +dw)
  TFLOP/s: 2NHV per GEMM (fwd 1, fwd+bwd 2, fwd+bwd+dw 3); peak_mib: torch.cuda's peak
  allocation of one call above what was allocated before (CUDA only).

RoPE (families rope: ops rope = [B, H, T, D] half-split, rope_bthd = [B, T, H, D],
rope_interleaved; theta 1e4, a table of 8192 positions, positions offset..offset+T, like the
Rust bench): cos/sin gathered at the positions before timing (HF computes them once per forward
for every layer).
  torch_eager    transformers' apply_rotary_pos_emb on q: q*cos + rotate_half(q)*sin (cos/sin
                 [1, T, D] unsqueezed at the head dim); interleaved: the pairs (2i, 2i+1) from a
                 [.., D/2, 2] view, stacked back
  torch_compile  the same through torch.compile(dynamic=False)
  liger          liger_kernel.transformers.rope.liger_rotary_pos_emb(q, k, cos, sin) with a
                 one-head k (the kernel rotates q and k together; k adds 1/H of the bytes),
                 [B, H, T, D] half-split only, when liger_kernel imports (CUDA)
GLU (family glu: swiglu, geglu (tanh GELU), swiglu_packed / geglu_packed (one [N, 2I] input,
shape = the output [N, I])):
  torch_eager    F.silu(g) * u / F.gelu(g, approximate="tanh") * u (packed: gu.chunk(2, -1))
  torch_compile  the same compiled
  liger          LigerSiLUMulFunction / LigerGELUMulFunction (two tensors; packed: the chunks)
  bwd / fwd+bwd as for the other ops; bytes as the Rust bench (RoPE 2Ne + 4TR + 4T each way,
  GLU fwd 3Ne, bwd 5Ne).

Timing: CUDA events around each call, device synchronised before and after, warm-up then the
median (the same repetition budget as the Rust bench); small inputs rotate among several input
sets (>= 128 MiB in all) so the 50 MB L2 does not hold them; inputs are random, never zeros.
The script measures the copy bandwidth itself (dst.copy_(src), 1 GiB, bytes read + written)
before and after the ops and uses the higher value for % copy, like the Rust bench.

matmul (shape [M, K, N]): torch_eager = F.linear(x, W), x [M, K], W [N, K], fwd only.

`--device cpu`: wall clock timing, torch's intra-op threads (torch.get_num_threads(); the
Rust bench uses all of rayon's threads, the same count on the same machine); the same rows as
the Rust CPU bench, merged with it by scripts/merge_bench.py.
"""

import argparse
import datetime
import json
import math
import os
import platform
import subprocess
import sys
import time
import traceback

import torch
import torch.nn.functional as F

import host_heap

EPS = 1e-5
SCALE = 0.125  # 1/sqrt(64), as in the Rust bench
ROTATE_BYTES = 128 << 20
MAX_SETS = 64

DTYPES = {
    "f32": torch.float32,
    "bf16": torch.bfloat16,
    "f16": torch.float16,
    "f64": torch.float64,
}

# The shapes of crates/candle-fused-cli/src/bench/cases.rs (keep in sync; `--cases ours.json` takes them from a
# candle-fused bench JSON instead, which is what the merged table needs).
ROW_SHAPES = {
    ("cuda", False): [
        ([1, 128, 1024], "f32"),
        ([4096, 4096], "f32"),
        ([4096, 4096], "bf16"),
        ([32768, 4096], "bf16"),
        ([8192, 32768], "bf16"),
        ([16384, 8192], "f32"),
        ([1024, 262144], "f32"),
    ],
    ("cuda", True): [([1, 128, 1024], "f32"), ([4096, 4096], "bf16")],
    ("cpu", False): [
        ([1, 128, 1024], "f32"),
        ([1024, 1024], "bf16"),
        ([4096, 4096], "f32"),
        ([4096, 4096], "bf16"),
        ([16, 262144], "f32"),
    ],
    ("cpu", True): [([1, 128, 1024], "f32"), ([64, 4096], "bf16")],
}
# (shape, dtype, op name): op name as candle_fused::check::OpKind::name() spells it.
ATTN_SHAPES = {
    ("cuda", False): [
        ([32, 32, 2048, 2048], "bf16", "masked_softmax+causal"),
        ([32, 32, 2048, 2048], "bf16", "masked_softmax+mask[S,T]"),
    ],
    ("cuda", True): [([4, 8, 512, 512], "bf16", "masked_softmax+causal")],
    ("cpu", False): [
        ([2, 8, 512, 512], "bf16", "masked_softmax+causal"),
        ([2, 8, 512, 512], "f32", "masked_softmax+causal"),
        ([2, 8, 512, 512], "f32", "masked_softmax+mask[S,T]"),
    ],
    ("cpu", True): [([1, 4, 128, 128], "f32", "masked_softmax+causal")],
}

# The LoRA shapes [M, K, N, r] of crates/candle-fused-cli/src/bench/cases.rs::lora_shapes (keep in sync).
LORA_SHAPES = {
    ("cuda", False): [
        ([128, 512, 512, 8], "f32"),  # the seeds' shape
        ([1, 4096, 4096, 16], "bf16"),
        ([4096, 4096, 4096, 16], "bf16"),
        ([16384, 4096, 4096, 16], "bf16"),
        ([16384, 4096, 14336, 64], "bf16"),
    ],
    ("cuda", True): [([128, 512, 512, 8], "f32"), ([4096, 4096, 4096, 16], "bf16")],
    ("cpu", False): [
        ([128, 512, 512, 8], "f32"),
        ([1, 4096, 4096, 16], "bf16"),
        ([1024, 1024, 1024, 16], "f32"),
        ([1024, 1024, 1024, 16], "bf16"),
    ],
    ("cpu", True): [([128, 512, 512, 8], "f32")],
}
LORA_SCALE = 2.0  # crates/candle-fused-cli/src/bench/lora.rs::SCALE

# The loss shapes of crates/candle-fused-cli/src/bench/cases.rs::{ce_shapes, lce_shapes} (keep in
# sync): cross_entropy [N, V], linear_cross_entropy [N, H, V].
CE_SHAPES = {
    ("cuda", False): [([8192, 128256], "bf16"), ([8192, 151936], "bf16"), ([4096, 32000], "f32")],
    ("cuda", True): [([4096, 32000], "bf16")],
    ("cpu", False): [([1024, 32000], "f32"), ([512, 32000], "bf16"), ([64, 128256], "bf16")],
    ("cpu", True): [([64, 32000], "f32")],
}
LCE_SHAPES = {
    ("cuda", False): [([8192, 4096, 128256], "bf16"), ([8192, 896, 151936], "bf16")],
    ("cuda", True): [([2048, 896, 151936], "bf16")],
    ("cpu", False): [([1024, 256, 16384], "f32"), ([2048, 128, 32000], "f32"),
                     ([256, 256, 32000], "bf16")],
    ("cpu", True): [([256, 64, 4096], "f32")],
}


# The matmul shapes [M, K, N] (batched: [batch, M, K, N]) of
# crates/candle-fused-cli/src/bench/gemm.rs::gemm_shapes (keep in sync): y = x @ W.T with
# W [N, K] (batched: torch.bmm(x, W.transpose(1, 2)), W [batch, N, K]), f32 and bf16.
_GEMM = [[1024, 512, 512], [1024, 512, 1344], [1024, 512, 8192], [4096, 1024, 1024],
         [1, 4096, 4096], [16, 256, 64, 256], [16, 256, 256, 64], [32, 256, 64, 256],
         [32, 256, 256, 64], [1024, 1024, 16], [1024, 16, 1024], [16, 1024, 1024]]
_GEMM_Q = [[1024, 512, 512], [1, 4096, 4096], [16, 256, 64, 256]]
GEMM_SHAPES = {
    (dev, quick): [(s, dt) for dt in ("f32", "bf16") for s in (_GEMM_Q if quick else _GEMM)]
    for dev in ("cpu", "cuda") for quick in (False, True)
}

FAMILIES = ["softmax", "masked_softmax", "rms_norm", "add_rms_norm", "lora_linear",
            "cross_entropy", "linear_cross_entropy", "matmul", "rope", "glu"]

# RoPE and GLU shapes of crates/candle-fused-cli/src/bench/cases.rs (keep in sync): (op, shape, dtype).
ROPE_SHAPES = {
    ("cuda", False): [
        ("rope", [1, 32, 4096, 128], "bf16"),
        ("rope", [1, 32, 4096, 128], "f32"),
        ("rope", [4, 14, 2048, 64], "bf16"),
        ("rope_bthd", [1, 4096, 32, 128], "bf16"),
        ("rope_interleaved", [1, 32, 4096, 128], "bf16"),
    ],
    ("cuda", True): [("rope", [1, 32, 4096, 128], "bf16"), ("rope", [4, 14, 2048, 64], "bf16")],
    ("cpu", False): [
        ("rope", [1, 32, 4096, 128], "f32"),
        ("rope", [1, 32, 4096, 128], "bf16"),
        ("rope", [4, 14, 2048, 64], "bf16"),
        ("rope_bthd", [1, 4096, 32, 128], "bf16"),
        ("rope_interleaved", [1, 32, 4096, 128], "f32"),
    ],
    ("cpu", True): [("rope", [1, 8, 512, 128], "f32"), ("rope", [2, 14, 256, 64], "bf16")],
}
GLU_SHAPES = {
    ("cuda", False): [
        ("swiglu", [8192, 14336], "bf16"),
        ("swiglu_packed", [8192, 14336], "bf16"),
        ("swiglu", [8192, 14336], "f32"),
        ("geglu", [8192, 14336], "bf16"),
    ],
    ("cuda", True): [("swiglu", [8192, 14336], "bf16"), ("swiglu_packed", [8192, 14336], "bf16")],
    ("cpu", False): [
        ("swiglu", [1024, 4864], "f32"),
        ("swiglu", [1024, 4864], "bf16"),
        ("swiglu_packed", [1024, 4864], "bf16"),
        ("geglu", [1024, 4864], "f32"),
    ],
    ("cpu", True): [("swiglu", [64, 4864], "f32"), ("swiglu_packed", [64, 4864], "bf16")],
}
ROPE_POSITIONS = 8192  # crates/candle-fused-cli/src/bench/rope_glu.rs::ROPE_POSITIONS
ROPE_OPS = ("rope", "rope_bthd", "rope_interleaved", "rope_bthd_interleaved")
GLU_OPS = ("swiglu", "swiglu_packed", "geglu", "geglu_packed")


def family_of(op):
    if op.startswith("masked_softmax"):
        return "masked_softmax"
    if op in ROPE_OPS:
        return "rope"
    if op in GLU_OPS:
        return "glu"
    if op in ("softmax", "rms_norm", "add_rms_norm", "lora_linear", "cross_entropy",
              "linear_cross_entropy", "matmul"):
        return op
    return None


def elt_size(dtype):
    return torch.tensor([], dtype=DTYPES[dtype]).element_size()


def bytes_for(op, shape, dtype, pas):
    """Bytes that must move, as in crates/candle-fused-cli/src/bench/memops.rs (inputs read once + outputs written)."""
    e = elt_size(dtype)
    n = math.prod(shape) * e
    d = shape[-1] * e
    m = 0
    if "mask[S,T]" in op:
        m = (shape[-2] if len(shape) >= 2 else 1) * shape[-1] * e
    fam = family_of(op)
    if fam in ("softmax", "masked_softmax"):
        fwd, bwd = 2 * n + m, 3 * n
    elif fam == "rms_norm":
        fwd, bwd = 2 * n + d, 3 * n + 2 * d
    elif fam == "add_rms_norm":
        fwd, bwd = 4 * n + d, 4 * n + 2 * d
    else:
        raise ValueError(op)
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[pas]


def sets_for(set_bytes):
    return max(1, min(MAX_SETS, -(-ROTATE_BYTES // max(1, set_bytes))))


def shape_str(shape):
    return "x".join(str(d) for d in shape)


class Budget:
    def __init__(self, cuda, quick):
        if cuda:
            self.warmup, self.min_reps, self.max_reps, self.target_s = (
                (3, 10, 50, 0.1) if quick else (5, 10, 200, 0.25)
            )
        else:
            self.warmup, self.min_reps, self.max_reps, self.target_s = (
                (1, 3, 20, 0.1) if quick else (1, 4, 40, 0.25)
            )


class Ctx:
    def __init__(self, args):
        self.args = args
        self.device = torch.device(args.device)
        self.cuda = self.device.type == "cuda"
        self.budget = Budget(self.cuda, args.quick)
        self.rows, self.skipped, self.notes = [], [], []
        self.copy_gbps = None
        self.t0 = time.time()
        if self.cuda:
            self.device_name = torch.cuda.get_device_name(self.device)
            self.ev0 = torch.cuda.Event(enable_timing=True)
            self.ev1 = torch.cuda.Event(enable_timing=True)
        else:
            self.device_name = f"{platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def once(self, fn, s):
        """One timed call, microseconds; the result is dropped after the clock stops."""
        self.sync()
        if self.cuda:
            self.ev0.record()
            r = fn(s)
            self.ev1.record()
            self.sync()
            us = self.ev0.elapsed_time(self.ev1) * 1e3
        else:
            t = time.perf_counter()
            r = fn(s)
            us = (time.perf_counter() - t) * 1e6
        del r
        return us

    def timeit(self, fn, setup=None):
        """Warm-up, then as many reps as fit the budget; returns (median, min, reps)."""
        setup = setup or (lambda i: i)
        b = self.budget
        i, warm = 0, float("inf")
        for _ in range(max(1, b.warmup)):
            warm = min(warm, self.once(fn, setup(i)))
            i += 1
        reps = max(b.min_reps, min(b.max_reps, int(b.target_s * 1e6 / max(warm, 1e-3))))
        samples = []
        for _ in range(reps):
            samples.append(self.once(fn, setup(i)))
            i += 1
        samples.sort()
        n = len(samples)
        med = samples[n // 2] if n % 2 else 0.5 * (samples[n // 2 - 1] + samples[n // 2])
        return med, samples[0], n

    def record(self, op, pas, shape, dtype, impl, sets, fn, setup=None, nbytes=None, flops=None,
               baseline="ours"):
        try:
            med, mn, reps = self.timeit(fn, setup)
        except Exception as e:  # OOM, compile failure, unsupported: a skipped row, not a crash
            err = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:200]
            print(f"  {op:<28} {pas:<8} {shape_str(shape):<18} {dtype:<5} {impl:<22} SKIPPED: {err}",
                  file=sys.stderr)
            self.skipped.append(dict(op=op, pass_=pas, shape=shape, dtype=dtype, impl=impl, error=err))
            free_memory()
            return
        nbytes = bytes_for(op, shape, dtype, pas) if nbytes is None else nbytes
        gbps = nbytes / (med * 1e3)
        row = dict(
            op=op, pass_=pas, shape=list(shape), dtype=dtype,
            device=self.device.type, device_name=self.device_name, impl=impl,
            median_us=med, min_us=mn, reps=reps, sets=sets, bytes=float(nbytes), gbps=gbps,
            pct_copy=None, flops=flops, tflops=(flops / (med * 1e6)) if flops else None,
            baseline=baseline, speedup=None,
        )
        self.rows.append(row)
        tf = f" {row['tflops']:>8.3g} TFLOP/s" if row["tflops"] else ""
        print(f"  {op:<28} {pas:<8} {shape_str(shape):<18} {dtype:<5} {impl:<22} "
              f"{med:>12.1f} us {gbps:>8.1f} GB/s{tf}", file=sys.stderr)

    def over_time(self):
        return time.time() - self.t0 > self.args.max_seconds


def free_memory():
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def randn(shape, std, dtype, device):
    return (torch.randn(shape, device=device, dtype=torch.float32) * std).to(DTYPES[dtype])


def rand(shape, lo, hi, dtype, device):
    return (torch.rand(shape, device=device, dtype=torch.float32) * (hi - lo) + lo).to(DTYPES[dtype])


def copy_bandwidth(ctx, nbytes):
    src = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, device=ctx.device)
    dst = torch.empty_like(src)
    med, _, reps = ctx.timeit(lambda i: dst.copy_(src))
    del src, dst
    free_memory()
    return 2 * nbytes / (med * 1e3), reps


# ---------------------------------------------------------------- the memory-bound ops


def make_fn(op, shape):
    """The PyTorch function of an op: f(*args) -> tuple of outputs, and which args are
    differentiable."""
    d = shape[-1]
    if op == "softmax":
        return (lambda x: (torch.softmax(x, -1),)), [True]
    if op.startswith("masked_softmax"):
        return (lambda x, add: (torch.softmax(x * SCALE + add, -1),)), [True, False]
    if op == "rms_norm":
        return (lambda x, w: (F.rms_norm(x, (d,), w, EPS),)), [True, True]
    if op == "add_rms_norm":
        def f(x, r, w):
            s = x + r
            return F.rms_norm(s, (d,), w, EPS), s
        return f, [True, True, True]
    raise ValueError(op)


def make_inputs(op, shape, dtype, dev):
    """(args, probes) with the distributions of the Rust bench."""
    d = shape[-1]
    if op == "softmax":
        args = [randn(shape, 3.0, dtype, dev)]
    elif op.startswith("masked_softmax"):
        s, t = (shape[-2] if len(shape) >= 2 else 1), shape[-1]
        add = torch.zeros((s, t), device=dev, dtype=DTYPES[dtype])
        if "mask[S,T]" in op:
            vals = randn((s, t), 1.0, dtype, dev)
            hide = torch.rand((s, t), device=dev) < 0.2
            add = vals.masked_fill(hide, float("-inf"))
        if "causal" in op:
            i = torch.arange(s, device=dev)[:, None]
            j = torch.arange(t, device=dev)[None, :]
            add = add.masked_fill(j > i + (t - s), float("-inf"))
        args = [randn(shape, 3.0, dtype, dev), add]
    elif op == "rms_norm":
        args = [randn(shape, 1.0, dtype, dev), rand((d,), 0.5, 1.5, dtype, dev)]
    elif op == "add_rms_norm":
        args = [randn(shape, 1.0, dtype, dev), randn(shape, 1.0, dtype, dev),
                rand((d,), 0.5, 1.5, dtype, dev)]
    else:
        raise ValueError(op)
    n_out = 2 if op == "add_rms_norm" else 1
    probes = [randn(shape, 1.0, dtype, dev) for _ in range(n_out)]
    return args, probes


def set_bytes(op, shape, dtype):
    e = elt_size(dtype)
    n = math.prod(shape) * e
    k = 5 if op == "add_rms_norm" else 3
    return k * n + shape[-1] * e


def leaves(args, diff):
    return [a.detach().requires_grad_() if dd else a for a, dd in zip(args, diff)]


def build_graph(f, diff, args, probes):
    la = leaves(args, diff)
    return f(*la), [x for x, dd in zip(la, diff) if dd], probes


def bwd_rows(ctx, op, shape, dtype, impl, f, diff, sets, nbytes=None, flops=None):
    """The backward alone: autograd.grad with retain_graph=True on graphs built before timing.
    If the graph cannot be kept (e.g. a compiled backward refusing retain_graph), each
    repetition builds its graph untimed instead (noted). `sets`: (args, probes) pairs; `diff`:
    which args get gradients; nbytes/flops as for ctx.record (None: the memory-bound formulas)."""
    k = len(sets)
    try:
        graphs = [build_graph(f, diff, a, p) for a, p in sets]
        for g in graphs[:1]:
            torch.autograd.grad(g[0], g[1], grad_outputs=g[2], retain_graph=True)
            torch.autograd.grad(g[0], g[1], grad_outputs=g[2], retain_graph=True)
    except Exception as e:
        graphs = None
        free_memory()
        ctx.notes.append(f"{impl} {op} {shape_str(shape)} {dtype} bwd: graph not reusable "
                         f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:200]
                         + "); timed on a graph rebuilt untimed each repetition")
    if graphs is not None:
        ctx.record(op, "bwd", shape, dtype, impl, k,
                   lambda i: torch.autograd.grad(graphs[i % k][0], graphs[i % k][1],
                                                 grad_outputs=graphs[i % k][2],
                                                 retain_graph=True),
                   nbytes=nbytes, flops=flops)
        del graphs
    else:
        ctx.record(op, "bwd", shape, dtype, impl, k,
                   lambda g: torch.autograd.grad(g[0], g[1], grad_outputs=g[2]),
                   setup=lambda i: build_graph(f, diff, *sets[i % k]), nbytes=nbytes, flops=flops)


def run_mem_case(ctx, op, shape, dtype, compile_it):
    dev = ctx.device
    f_eager, diff = make_fn(op, shape)
    k = sets_for(set_bytes(op, shape, dtype))
    print(f"{op} {shape_str(shape)} {dtype} ({k} input set(s))", file=sys.stderr)
    try:
        sets = [make_inputs(op, shape, dtype, dev) for _ in range(k)]
    except Exception as e:
        err = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:200]
        for impl in ["torch_eager"] + (["torch_compile"] if compile_it else []):
            for pas in ("fwd", "bwd", "fwd+bwd"):
                ctx.skipped.append(dict(op=op, pass_=pas, shape=shape, dtype=dtype, impl=impl, error=err))
        free_memory()
        return

    impls = [("torch_eager", f_eager)]
    if compile_it:
        if ctx.over_time():
            ctx.notes.append(f"torch_compile skipped for {op} {shape_str(shape)} {dtype}: "
                             f"past --max-seconds {ctx.args.max_seconds}")
        else:
            try:
                torch._dynamo.reset()
                f_c = torch.compile(f_eager, dynamic=False)
                # Compile the forward and the backward outside the timed region.
                a, p = sets[0]
                with torch.no_grad():
                    f_c(*a)
                la = leaves(a, diff)
                outs = f_c(*la)
                torch.autograd.grad(sum((o * q).sum() for o, q in zip(outs, p)),
                                    [x for x, dd in zip(la, diff) if dd])
                del outs, la
                ctx.sync()
                impls.append(("torch_compile", f_c))
            except Exception as e:
                ctx.notes.append(f"torch_compile failed for {op} {shape_str(shape)} {dtype}: "
                                 f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300])

    for impl, f in impls:
        # fwd
        with torch.no_grad():
            ctx.record(op, "fwd", shape, dtype, impl, k, lambda i: f(*sets[i % k][0]))
        # bwd: a graph per input set, built before timing and kept (retain_graph=True).
        bwd_rows(ctx, op, shape, dtype, impl, f, diff, sets)
        free_memory()

        # fwd+bwd
        def fwd_bwd(i):
            a, p = sets[i % k]
            la = leaves(a, diff)
            outs = f(*la)
            loss = sum((o * q).sum() for o, q in zip(outs, p))
            return torch.autograd.grad(loss, [x for x, dd in zip(la, diff) if dd])

        ctx.record(op, "fwd+bwd", shape, dtype, impl, k, fwd_bwd)
    del sets
    free_memory()


# ---------------------------------------------------------------- matmul


def run_matmul_case(ctx, op, shape, dtype, compile_it):
    """y = F.linear(x, W) = x @ W.T, x [M, K], W [N, K] ~ N(0, 1/K), fwd only; flops 2MKN,
    bytes e(MK + NK + MN), as crates/candle-fused-cli/src/bench/gemm.rs (impl torch_eager).
    Batched [b, M, K, N]: torch.bmm(x, W.transpose(1, 2)), x [b, M, K], W [b, N, K]."""
    b, (m, k, n) = (shape[0], shape[1:]) if len(shape) == 4 else (1, shape)
    lead = (b,) if len(shape) == 4 else ()
    e = elt_size(dtype)
    nbytes = float(b * e * (m * k + n * k + m * n))
    sets_n = sets_for(int(nbytes))
    print(f"{op} {shape_str(shape)} {dtype} ({sets_n} input set(s))", file=sys.stderr)
    sets = [(randn(lead + (m, k), 1.0, dtype, ctx.device),
             randn(lead + (n, k), 1.0 / math.sqrt(k), dtype, ctx.device))
            for _ in range(sets_n)]
    fn = (lambda x, w: torch.bmm(x, w.transpose(1, 2))) if lead else F.linear
    with torch.no_grad():
        ctx.record(op, "fwd", shape, dtype, "torch_eager", sets_n,
                   lambda i: fn(*sets[i % sets_n]), nbytes=nbytes, flops=2.0 * b * m * k * n)
    del sets
    free_memory()


# ---------------------------------------------------------------- LoRA


def lora_flops(shape, impl, pas):
    """Useful flops of one call, as crates/candle-fused-cli/src/bench/lora.rs: LoRA fwd 2MKN + 2MKr + 2MrN, bwd
    2MNK + 4MNr + 4MKr (dx, dA, dB; no dW); the plain GEMMs (base, merged) 2MKN each way."""
    m, k, n, r = shape
    gemm = 2 * m * k * n
    if impl in ("torch_base", "torch_merged"):
        fwd, bwd = gemm, gemm
    else:
        fwd, bwd = gemm + 2 * m * k * r + 2 * m * r * n, gemm + 4 * m * n * r + 4 * m * k * r
    return float({"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[pas])


def lora_bytes(shape, dtype, impl, pas):
    """Minimum bytes, as crates/candle-fused-cli/src/bench/lora.rs: LoRA fwd e(MK + NK + rK + Nr + MN), bwd
    e(MN + 2MK + NK + 2rK + 2Nr + Mr); plain GEMMs fwd e(MK + NK + MN), bwd e(MN + NK + MK)."""
    m, k, n, r = shape
    e = elt_size(dtype)
    if impl in ("torch_base", "torch_merged"):
        fwd, bwd = m * k + n * k + m * n, m * n + n * k + m * k
    else:
        fwd = m * k + n * k + r * k + n * r + m * n
        bwd = m * n + 2 * m * k + n * k + 2 * r * k + 2 * n * r + m * r
    return float(e * {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[pas])


def lora_set_bytes(shape, dtype):
    m, k, n, r = shape
    return elt_size(dtype) * (m * k + 2 * n * k + r * k + n * r + m * n)


def lora_inputs(shape, dtype, dev):
    """x ~ N(0, 1), W, A ~ N(0, 1/K), B ~ N(0, 1/r), probe ~ N(0, 1) (as the Rust bench);
    the merged weight W + s*B@A computed in f32 and rounded once."""
    m, k, n, r = shape
    x = randn((m, k), 1.0, dtype, dev)
    w = randn((n, k), 1.0 / math.sqrt(k), dtype, dev)
    a = randn((r, k), 1.0 / math.sqrt(k), dtype, dev)
    b = randn((n, r), 1.0 / math.sqrt(r), dtype, dev)
    probe = randn((m, n), 1.0, dtype, dev)
    merged = (w.float() + LORA_SCALE * (b.float() @ a.float())).to(DTYPES[dtype])
    return dict(x=x, w=w, a=a, b=b, probe=probe, merged=merged)


def lora_base(x, w, a, b):
    return F.linear(x, w)


def lora_peft(x, w, a, b):
    return F.linear(x, w) + F.linear(F.linear(x, a), b) * LORA_SCALE


def lora_addmm(x, w, a, b):
    y = x @ w.T
    return y.addmm_(x @ a.T, b.T, alpha=LORA_SCALE)


def lora_fwd_bwd(f, st, only_x=False):
    x = st["x"].detach().requires_grad_()
    a, b = st["a"], st["b"]
    if not only_x:
        a, b = a.detach().requires_grad_(), b.detach().requires_grad_()
    loss = (f(x, st["w"], a, b) * st["probe"]).sum()
    return torch.autograd.grad(loss, [x] if only_x else [x, a, b])


def lora_check(impl, got, want, dtype):
    """got vs want (torch_peft), relative to max |want|: a wrong formula is not timed."""
    rel = ((got.float() - want.float()).abs().max() / want.float().abs().max()).item()
    half = dtype in ("bf16", "f16")
    tol = (5e-2 if half else 1e-3) if impl == "torch_merged" else (2e-2 if half else 1e-4)
    if not rel <= tol:
        raise ValueError(f"{impl} forward differs from torch_peft: rel {rel:.3e} > {tol:.0e}")


def run_lora_case(ctx, op, shape, dtype, compile_it):
    dev = ctx.device
    k = sets_for(lora_set_bytes(shape, dtype))
    print(f"{op} {shape_str(shape)} {dtype} ({k} input set(s))", file=sys.stderr)
    fwd_impls = ["torch_base", "torch_peft", "torch_addmm", "torch_merged"]
    fb_impls = ["torch_base", "torch_peft", "torch_addmm"]
    if compile_it:
        fwd_impls.append("torch_compile")
        fb_impls.append("torch_compile")

    def skip(impls, pas, err):
        for impl in impls:
            ctx.skipped.append(dict(op=op, pass_=pas, shape=list(shape), dtype=dtype, impl=impl,
                                    error=err))
            print(f"  {op:<28} {pas:<8} {shape_str(shape):<18} {dtype:<5} {impl:<22} SKIPPED: {err}",
                  file=sys.stderr)

    def errstr(e):
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:200]

    try:
        sets = [lora_inputs(shape, dtype, dev) for _ in range(k)]
    except Exception as e:
        skip(fwd_impls, "fwd", errstr(e))
        skip(fb_impls, "fwd+bwd", errstr(e))
        free_memory()
        return

    fns = {
        "torch_base": lora_base,
        "torch_peft": lora_peft,
        "torch_addmm": lora_addmm,
        "torch_merged": lambda x, w, a, b: F.linear(x, w),  # called with the merged weight
    }
    if compile_it:
        if ctx.over_time():
            ctx.notes.append(f"torch_compile skipped for {op} {shape_str(shape)} {dtype}: "
                             f"past --max-seconds {ctx.args.max_seconds}")
            fwd_impls.remove("torch_compile")
            fb_impls.remove("torch_compile")
        else:
            try:
                torch._dynamo.reset()
                f_c = torch.compile(lora_peft, dynamic=False)
                st = sets[0]
                with torch.no_grad():  # compile the forward and the backward untimed
                    f_c(st["x"], st["w"], st["a"], st["b"])
                lora_fwd_bwd(f_c, st)
                ctx.sync()
                fns["torch_compile"] = f_c
            except Exception as e:
                ctx.notes.append(f"torch_compile failed for {op} {shape_str(shape)} {dtype}: "
                                 + errstr(e))
                fwd_impls.remove("torch_compile")
                fb_impls.remove("torch_compile")
                free_memory()

    def args_of(impl, st):
        w = st["merged"] if impl == "torch_merged" else st["w"]
        return st["x"], w, st["a"], st["b"]

    # Each impl's forward against torch_peft's on the first set (a wrong formula is not timed).
    bad = {}
    with torch.no_grad():
        try:
            want = lora_peft(*args_of("torch_peft", sets[0]))
            for impl in fwd_impls:
                if impl not in ("torch_base", "torch_peft"):
                    try:
                        lora_check(impl, fns[impl](*args_of(impl, sets[0])), want, dtype)
                    except Exception as e:
                        bad[impl] = errstr(e)
            del want
        except Exception as e:
            bad["torch_peft"] = errstr(e)
    free_memory()

    for pas, impls in (("fwd", fwd_impls), ("fwd+bwd", fb_impls)):
        for impl in impls:
            if impl in bad:
                skip([impl], pas, bad[impl])
                continue
            f = fns[impl]
            nbytes = lora_bytes(shape, dtype, impl, pas)
            flops = lora_flops(shape, impl, pas)
            if pas == "fwd":
                with torch.no_grad():
                    ctx.record(op, pas, shape, dtype, impl, k,
                               lambda i, f=f, impl=impl: f(*args_of(impl, sets[i % k])),
                               nbytes=nbytes, flops=flops)
            else:
                only_x = impl == "torch_base"
                ctx.record(op, pas, shape, dtype, impl, k,
                           lambda i, f=f, only_x=only_x: lora_fwd_bwd(f, sets[i % k], only_x),
                           nbytes=nbytes, flops=flops)
            free_memory()
    # The backward alone given dy (the probe), on graphs built before timing: torch_base
    # (dx = dy @ W) and torch_peft (grads of x, A, B), like the Rust bench's bwd rows.
    for impl in ("torch_base", "torch_peft"):
        if impl in bad:
            skip([impl], "bwd", bad[impl])
            continue
        adapter = impl != "torch_base"
        bwd_rows(ctx, op, shape, dtype, impl, fns[impl], [True, False, adapter, adapter],
                 [((st["x"], st["w"], st["a"], st["b"]), st["probe"]) for st in sets],
                 nbytes=lora_bytes(shape, dtype, impl, "bwd"),
                 flops=lora_flops(shape, impl, "bwd"))
        free_memory()
    del sets
    free_memory()


# ---------------------------------------------------------------- losses


def errstr(e):
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:200]


def loss_targets(n, v, dev):
    t = torch.randint(0, v, (n,), device=dev)
    t[torch.rand(n, device=dev) < 0.1] = -100
    return t


def liger(name):
    """A loss class of liger_kernel, or None when the package does not import."""
    try:
        import liger_kernel.transformers as lt
        return getattr(lt, name)
    except Exception:
        return None


def compiled(ctx, what, f, warm):
    """torch.compile(f) warmed up by `warm(f_c)` (forward and backward compiled untimed), or None."""
    if ctx.over_time():
        ctx.notes.append(f"torch_compile skipped for {what}: past --max-seconds")
        return None
    try:
        torch._dynamo.reset()
        f_c = torch.compile(f, dynamic=False)
        warm(f_c)
        ctx.sync()
        return f_c
    except Exception as e:
        ctx.notes.append(f"torch_compile failed for {what}: " + errstr(e))
        free_memory()
        return None


def run_ce_case(ctx, op, shape, dtype, compile_it):
    dev, (n, v) = ctx.device, shape
    nv = n * v * elt_size(dtype)
    k = sets_for(nv)
    print(f"{op} {shape_str(shape)} {dtype} ({k} input set(s))", file=sys.stderr)
    try:
        sets = [(randn((n, v), 2.0, dtype, dev), loss_targets(n, v, dev)) for _ in range(k)]
    except Exception as e:
        for pas in ("fwd", "bwd", "fwd+bwd"):
            ctx.skipped.append(dict(op=op, pass_=pas, shape=shape, dtype=dtype, impl="torch_eager",
                                    error=errstr(e)))
        return
    eager = lambda x, t: F.cross_entropy(x, t, ignore_index=-100)
    fns = [("torch_eager", eager)]
    if compile_it:
        def warm(f_c):
            x = sets[0][0].detach().requires_grad_()
            torch.autograd.grad(f_c(x, sets[0][1]), [x])
        f_c = compiled(ctx, f"{op} {shape_str(shape)} {dtype}", eager, warm)
        if f_c is not None:
            fns.append(("torch_compile", f_c))
    cls = liger("LigerCrossEntropyLoss")
    if cls is not None and ctx.cuda:
        lce = cls(ignore_index=-100)
        fns.append(("liger_ce", lambda x, t: lce(x, t)))
    for impl, f in fns:
        with torch.no_grad():
            ctx.record(op, "fwd", shape, dtype, impl, k, lambda i, f=f: f(*sets[i % k]), nbytes=nv)
        try:
            graphs = []
            for x, t in sets:
                xl = x.detach().clone().requires_grad_() if impl == "liger_ce" else x.detach().requires_grad_()
                graphs.append((f(xl, t), xl))
            ctx.record(op, "bwd", shape, dtype, impl, k,
                       lambda i: torch.autograd.grad(graphs[i % k][0], [graphs[i % k][1]],
                                                     retain_graph=True),
                       nbytes=2 * nv)
            del graphs
        except Exception as e:
            ctx.skipped.append(dict(op=op, pass_="bwd", shape=shape, dtype=dtype, impl=impl,
                                    error=errstr(e)))
        free_memory()

        def fwd_bwd(i, f=f):
            x, t = sets[i % k]
            xl = x.detach().requires_grad_()
            return torch.autograd.grad(f(xl, t), [xl])

        ctx.record(op, "fwd+bwd", shape, dtype, impl, k, fwd_bwd, nbytes=3 * nv)
    del sets
    free_memory()


def run_lce_case(ctx, op, shape, dtype, compile_it):
    dev, (n, h, v) = ctx.device, shape
    e = elt_size(dtype)
    gemm = 2.0 * n * h * v
    k = sets_for((n * h + v * h) * e)
    print(f"{op} {shape_str(shape)} {dtype} ({k} input set(s))", file=sys.stderr)
    try:
        sets = [(randn((n, h), 1.0, dtype, dev), randn((v, h), 1.0 / math.sqrt(h), dtype, dev),
                 loss_targets(n, v, dev)) for _ in range(k)]
    except Exception as ex:
        ctx.skipped.append(dict(op=op, pass_="fwd", shape=shape, dtype=dtype, impl="torch_eager",
                                error=errstr(ex)))
        return
    eager = lambda x, w, t: F.cross_entropy(x @ w.T, t, ignore_index=-100)
    fns = [("torch_eager", eager)]
    if compile_it:
        def warm(f_c):
            x = sets[0][0].detach().requires_grad_()
            w = sets[0][1].detach().requires_grad_()
            torch.autograd.grad(f_c(x, w, sets[0][2]), [x, w])
        f_c = compiled(ctx, f"{op} {shape_str(shape)} {dtype}", eager, warm)
        if f_c is not None:
            fns.append(("torch_compile", f_c))
    cls = liger("LigerFusedLinearCrossEntropyLoss")
    if cls is not None and ctx.cuda:
        fl = cls(ignore_index=-100)
        fns.append(("liger_flce", lambda x, w, t: fl(w, x, t)))

    def gemms(x, w, dw):
        logits = x @ w.T
        out = [logits @ w]
        if dw:
            out.append(logits.T @ x)
        return out

    passes = [("fwd", 1, e * (n * h + v * h)), ("fwd+bwd", 2, e * (2 * n * h + v * h)),
              ("fwd+bwd+dw", 3, e * (2 * n * h + 2 * v * h))]
    for pas, g, nbytes in passes:
        dw = pas == "fwd+bwd+dw"
        for impl, f in fns + [("torch_base", None)]:
            if pas == "fwd":
                if f is None:
                    call = lambda i: sets[i % k][0] @ sets[i % k][1].T
                else:
                    call = lambda i, f=f: f(*sets[i % k])
                with torch.no_grad():
                    ctx.record(op, pas, shape, dtype, impl, k, call, nbytes=nbytes, flops=gemm * g)
                continue
            if f is None:
                call = lambda i, dw=dw: gemms(sets[i % k][0], sets[i % k][1], dw)
            else:
                def call(i, f=f, dw=dw):
                    x, w, t = sets[i % k]
                    xl = x.detach().requires_grad_()
                    wl = w.detach().requires_grad_() if dw else w
                    return torch.autograd.grad(f(xl, wl, t), [xl, wl] if dw else [xl])
            if f is None:
                with torch.no_grad():
                    ctx.record(op, pas, shape, dtype, impl, k, call, nbytes=nbytes, flops=gemm * g)
            else:
                ctx.record(op, pas, shape, dtype, impl, k, call, nbytes=nbytes, flops=gemm * g)
            if ctx.cuda and ctx.rows and ctx.rows[-1]["impl"] == impl and ctx.rows[-1]["pass_"] == pas:
                try:
                    free_memory()
                    ctx.sync()
                    torch.cuda.reset_peak_memory_stats(dev)
                    base = torch.cuda.memory_allocated(dev)
                    if f is None:
                        with torch.no_grad():
                            r = call(0)
                    else:
                        r = call(0)
                    ctx.sync()
                    ctx.rows[-1]["peak_mib"] = (torch.cuda.max_memory_allocated(dev) - base) / 2**20
                    del r
                except Exception as ex:
                    ctx.notes.append(f"peak memory of {impl} {op} {pas}: " + errstr(ex))
            free_memory()
    del sets
    free_memory()


# ---------------------------------------------------------------- RoPE and GLU


def rope_tables(d, dev):
    """cos/sin [ROPE_POSITIONS, D/2] in f32 (theta 1e4), computed in f64 like the Rust table."""
    inv = 1.0 / (10000.0 ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    ang = torch.arange(ROPE_POSITIONS, dtype=torch.float64)[:, None] * inv[None, :]
    return ang.cos().float().to(dev), ang.sin().float().to(dev)


def rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def rope_eager(op):
    """f(q, cos, sin): cos/sin [1, T, D] (half-split, HF's cat(freqs, freqs)) or [1, T, D/2]."""
    unsq = 2 if "bthd" in op else 1

    if "interleaved" in op:
        def f(q, cos, sin):
            c, s = cos.unsqueeze(unsq), sin.unsqueeze(unsq)
            x = q.unflatten(-1, (-1, 2))
            x0, x1 = x[..., 0], x[..., 1]
            return (torch.stack((x0 * c - x1 * s, x1 * c + x0 * s), dim=-1).flatten(-2),)
        return f

    def f(q, cos, sin):
        c, s = cos.unsqueeze(unsq), sin.unsqueeze(unsq)
        return (q * c + rotate_half(q) * s,)
    return f


def liger_rope():
    try:
        from liger_kernel.transformers.rope import liger_rotary_pos_emb
    except Exception:
        return None

    def f(q, k, cos, sin):
        return liger_rotary_pos_emb(q, k, cos, sin)
    return f


def run_rope_case(ctx, op, shape, dtype, compile_it):
    """RoPE rows (see the module doc): fwd, bwd (autograd.grad on a prebuilt graph) and fwd+bwd,
    x the only differentiable input."""
    dev = ctx.device
    d = shape[3]
    t = shape[2] if "bthd" not in op else shape[1]
    e = elt_size(dtype)
    n = math.prod(shape)
    one = 2 * n * e + 4 * t * d + 4 * t
    nbytes = {"fwd": one, "bwd": one, "fwd+bwd": 2 * one}
    k = sets_for(2 * n * e)
    print(f"{op} {shape_str(shape)} {dtype} ({k} input set(s))", file=sys.stderr)
    cos_t, sin_t = rope_tables(d, dev)
    sets = []
    for _ in range(k):
        off = int(torch.randint(0, ROPE_POSITIONS - t + 1, (1,)).item())
        pos = torch.arange(off, off + t, device=dev)
        c, s = cos_t[pos], sin_t[pos]
        if "interleaved" not in op:
            c, s = torch.cat((c, c), -1), torch.cat((s, s), -1)
        c, s = c[None].to(DTYPES[dtype]), s[None].to(DTYPES[dtype])
        sets.append(((randn(shape, 1.0, dtype, dev), c, s), [randn(shape, 1.0, dtype, dev)]))
    f_eager = rope_eager(op)
    impls = [("torch_eager", f_eager)]
    if compile_it and not ctx.over_time():
        try:
            torch._dynamo.reset()
            f_c = torch.compile(f_eager, dynamic=False)
            (a, p) = sets[0]
            with torch.no_grad():
                f_c(*a)
            la = leaves(a, [True, False, False])
            torch.autograd.grad((f_c(*la)[0] * p[0]).sum(), [la[0]])
            impls.append(("torch_compile", f_c))
        except Exception as ex:
            ctx.notes.append(f"torch_compile failed for {op}: {type(ex).__name__}: {str(ex)[:200]}")
    lig = liger_rope() if (ctx.cuda and op == "rope") else None
    if lig is not None:
        kcache = {}  # a one-head k per input set, made before timing (keyed by q's storage)
        for a, _ in sets:
            kcache[a[0].data_ptr()] = a[0][:, :1].detach().clone()

        def f_lig(q, c, s):
            return (lig(q, kcache[q.data_ptr()], c, s)[0],)
        impls.append(("liger", f_lig))
    elif ctx.cuda and op == "rope":
        ctx.notes.append("liger: liger_kernel does not import; no liger rows")
    diff = [True, False, False]
    for impl, f in impls:
        with torch.no_grad():
            ctx.record(op, "fwd", shape, dtype, impl, k, lambda i, f=f: f(*sets[i % k][0]),
                       nbytes=nbytes["fwd"])
        bwd_rows(ctx, op, shape, dtype, impl, f, diff, sets, nbytes=nbytes["bwd"])

        def fwd_bwd(i, f=f):
            a, p = sets[i % k]
            la = leaves(a, diff)
            return torch.autograd.grad((f(*la)[0] * p[0]).sum(), [la[0]])

        ctx.record(op, "fwd+bwd", shape, dtype, impl, k, fwd_bwd, nbytes=nbytes["fwd+bwd"])
        free_memory()
    del sets
    free_memory()


def liger_glu(kind):
    try:
        if kind == "swiglu":
            from liger_kernel.ops.swiglu import LigerSiLUMulFunction as Fn
        else:
            from liger_kernel.ops.geglu import LigerGELUMulFunction as Fn
    except Exception:
        return None
    return Fn.apply


def run_glu_case(ctx, op, shape, dtype, compile_it):
    """GLU rows (see the module doc)."""
    dev = ctx.device
    kind = "geglu" if op.startswith("geglu") else "swiglu"
    packed = op.endswith("_packed")
    e = elt_size(dtype)
    n = math.prod(shape)
    nbytes = {"fwd": 3 * n * e, "bwd": 5 * n * e, "fwd+bwd": 8 * n * e}
    k = sets_for(3 * n * e)
    print(f"{op} {shape_str(shape)} {dtype} ({k} input set(s))", file=sys.stderr)

    def act(g):
        return F.silu(g) if kind == "swiglu" else F.gelu(g, approximate="tanh")

    if packed:
        def f_eager(gu):
            g, u = gu.chunk(2, dim=-1)
            return (act(g) * u,)
        diff = [True]
        wide = list(shape[:-1]) + [2 * shape[-1]]
        sets = [((randn(wide, 1.0, dtype, dev),), [randn(shape, 1.0, dtype, dev)]) for _ in range(k)]
    else:
        def f_eager(g, u):
            return (act(g) * u,)
        diff = [True, True]
        sets = [((randn(shape, 2.0, dtype, dev), randn(shape, 1.0, dtype, dev)),
                 [randn(shape, 1.0, dtype, dev)]) for _ in range(k)]
    impls = [("torch_eager", f_eager)]
    if compile_it and not ctx.over_time():
        try:
            torch._dynamo.reset()
            f_c = torch.compile(f_eager, dynamic=False)
            (a, p) = sets[0]
            with torch.no_grad():
                f_c(*a)
            la = leaves(a, diff)
            torch.autograd.grad((f_c(*la)[0] * p[0]).sum(), [x for x, dd in zip(la, diff) if dd])
            impls.append(("torch_compile", f_c))
        except Exception as ex:
            ctx.notes.append(f"torch_compile failed for {op}: {type(ex).__name__}: {str(ex)[:200]}")
    lig = liger_glu(kind) if ctx.cuda else None
    if lig is not None:
        if packed:
            def f_lig(gu):
                g, u = gu.chunk(2, dim=-1)
                return (lig(g, u),)
        else:
            def f_lig(g, u):
                return (lig(g, u),)
        impls.append(("liger", f_lig))
    elif ctx.cuda:
        ctx.notes.append(f"liger: liger_kernel does not import; no liger rows for {op}")
    for impl, f in impls:
        with torch.no_grad():
            ctx.record(op, "fwd", shape, dtype, impl, k, lambda i, f=f: f(*sets[i % k][0]),
                       nbytes=nbytes["fwd"])
        bwd_rows(ctx, op, shape, dtype, impl, f, diff, sets, nbytes=nbytes["bwd"])

        def fwd_bwd(i, f=f):
            a, p = sets[i % k]
            la = leaves(a, diff)
            return torch.autograd.grad((f(*la)[0] * p[0]).sum(), [x for x, dd in zip(la, diff) if dd])

        ctx.record(op, "fwd+bwd", shape, dtype, impl, k, fwd_bwd, nbytes=nbytes["fwd+bwd"])
        free_memory()
    del sets
    free_memory()


def cases_from_json(path):
    with open(path) as fh:
        data = json.load(fh)
    seen, out = set(), []
    for r in data["rows"]:
        key = (r["op"], tuple(r["shape"]), r["dtype"])
        if family_of(r["op"]) in FAMILIES and key not in seen:
            seen.add(key)
            out.append((r["op"], list(r["shape"]), r["dtype"]))
    return out


def default_cases(dev_type, quick):
    out = []
    for op in FAMILIES:
        if op == "masked_softmax":
            out += [(name, shape, dt) for shape, dt, name in ATTN_SHAPES[(dev_type, quick)]]
        elif op == "lora_linear":
            out += [(op, shape, dt) for shape, dt in LORA_SHAPES[(dev_type, quick)]]
        elif op == "cross_entropy":
            out += [(op, shape, dt) for shape, dt in CE_SHAPES[(dev_type, quick)]]
        elif op == "linear_cross_entropy":
            out += [(op, shape, dt) for shape, dt in LCE_SHAPES[(dev_type, quick)]]
        elif op == "matmul":
            out += [(op, shape, dt) for shape, dt in GEMM_SHAPES[(dev_type, quick)]]
        elif op == "rope":
            out += [tuple(c) for c in ROPE_SHAPES[(dev_type, quick)]]
        elif op == "glu":
            out += [tuple(c) for c in GLU_SHAPES[(dev_type, quick)]]
        else:
            out += [(op, shape, dt) for shape, dt in ROW_SHAPES[(dev_type, quick)]]
    return out


def git_commit():
    """$CANDLE_FUSED_COMMIT when set (scripts/gpu-run.sh sets it to the bundle's commit: the GPU
    machine's copy of the tree may carry a stale .git); else git describe in the repo; else
    .gpu/COMMIT (written by scripts/build-gpu-bundle.sh)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if os.environ.get("CANDLE_FUSED_COMMIT"):
        return os.environ["CANDLE_FUSED_COMMIT"]
    try:
        return subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=12"], cwd=root,
                              capture_output=True, text=True, check=True).stdout.strip() or None
    except Exception:
        pass
    try:
        with open(os.path.join(root, ".gpu", "COMMIT")) as fh:
            return fh.read().strip() or None
    except OSError:
        return None


def table(rows):
    hdr = (f"{'op':<28} {'pass':<8} {'shape':<18} {'dtype':<5} {'impl':<22} "
           f"{'median us':>12} {'GB/s':>9} {'% copy':>7} {'TFLOP/s':>9}")
    lines = [hdr, "-" * len(hdr)]
    for r in rows:
        tf = (f"{r['tflops']:.2f}" if r["tflops"] >= 0.1 else f"{r['tflops']:.3g}") if r.get("tflops") else ""
        lines.append(f"{r['op']:<28} {r['pass']:<8} {shape_str(r['shape']):<18} {r['dtype']:<5} "
                     f"{r['impl']:<22} {r['median_us']:>12.1f} {r['gbps']:>9.1f} {r['pct_copy']:>6.1f}% "
                     f"{tf:>9}")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--json", help="write the rows here")
    ap.add_argument("--quick", action="store_true", help="the bench's --quick shapes")
    ap.add_argument("--cases", help="take (op, shape, dtype) from this candle-fused bench JSON")
    ap.add_argument("--op", help="comma-separated families: " + ", ".join(FAMILIES))
    ap.add_argument("--compile", default="some", choices=["none", "some", "all"],
                    help="torch.compile rows: none; some = where it can fuse more than eager "
                         "(masked_softmax, add_rms_norm, lora_linear, the losses; default); all")
    ap.add_argument("--host-heap", default="keep", choices=["keep", "release"],
                    help="freed host memory: keep (in glibc's heap, as candle-fused bench "
                         "--host-heap keep, its default) or release (glibc's defaults)")
    ap.add_argument("--max-seconds", type=float, default=420.0,
                    help="start no new torch.compile work after this many seconds (eager rows "
                         "still run)")
    args = ap.parse_args()
    args.host_heap = host_heap.apply(args.host_heap)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("bench_torch.py: CUDA is not available (use --device cpu to try the script)")

    ctx = Ctx(args)
    cases = cases_from_json(args.cases) if args.cases else default_cases(ctx.device.type, args.quick)
    if args.op:
        want = args.op.split(",")
        bad = [w for w in want if w not in FAMILIES]
        if bad:
            sys.exit(f"bench_torch.py: unknown --op {bad}, expected one of {FAMILIES}")
        cases = [c for c in cases if family_of(c[0]) in want]
    compile_fams = {"none": set(),
                    "some": {"masked_softmax", "add_rms_norm", "lora_linear", "cross_entropy",
                             "linear_cross_entropy", "rope", "glu"},
                    "all": set(FAMILIES)}[args.compile]
    torch._dynamo.config.cache_size_limit = 256

    copy_bytes = (1 << 30) if ctx.cuda else (256 << 20)
    print(f"bench_torch.py on {ctx.device_name}, torch {torch.__version__}: copy bandwidth...",
          file=sys.stderr)
    before, reps = copy_bandwidth(ctx, copy_bytes)
    ctx.copy_gbps = before
    print(f"copy bandwidth: {before:.1f} GB/s", file=sys.stderr)
    for op, shape, dtype in cases:
        run = {"lora_linear": run_lora_case, "cross_entropy": run_ce_case,
               "linear_cross_entropy": run_lce_case,
               "matmul": run_matmul_case, "rope": run_rope_case,
               "glu": run_glu_case}.get(family_of(op), run_mem_case)
        run(ctx, op, shape, dtype, family_of(op) in compile_fams)
        if args.json:  # a checkpoint, so a run cut short still leaves its rows
            save(ctx, args, copy_bytes, partial=True)
    after, _ = copy_bandwidth(ctx, copy_bytes)
    ctx.copy_gbps = max(before, after)
    ctx.notes.insert(0, f"copy bandwidth {before:.1f} GB/s before the ops and {after:.1f} GB/s after "
                        f"({copy_bytes >> 20} MiB dst.copy_(src), {reps} reps); % copy uses the higher")
    header, rows, skipped = save(ctx, args, copy_bytes, partial=False)
    print(table(rows))
    for s in skipped:
        print(f"skipped: {s['op']} {s['pass']} {shape_str(s['shape'])} {s['dtype']} {s['impl']}: {s['error']}")
    for n in ctx.notes:
        print(f"note: {n}")
    print(f"\nbench_torch.py on {ctx.device_name} ({header['date']}, torch {torch.__version__}): "
          f"{len(rows)} rows, {len(skipped)} skipped, copy bandwidth {ctx.copy_gbps:.1f} GB/s, "
          f"{time.time() - ctx.t0:.0f} s" + (f"; JSON: {args.json}" if args.json else ""))


def save(ctx, args, copy_bytes, partial):
    """Builds the JSON (rows with % copy of ctx.copy_gbps) and writes it if --json."""
    # JSON field names: "pass" and "impl" (Python keywords avoided internally).
    rows = [{("pass" if k == "pass_" else k): v for k, v in r.items()} for r in ctx.rows]
    for r in rows:
        r["pct_copy"] = 100.0 * r["gbps"] / ctx.copy_gbps
    skipped = [{("pass" if k == "pass_" else k): v for k, v in s.items()} for s in ctx.skipped]
    try:
        import triton
        triton_version = triton.__version__
    except Exception:
        triton_version = None
    notes = list(ctx.notes)
    if partial:
        notes.insert(0, "partial: the run was cut short; % copy uses the copy bandwidth measured "
                        "before the ops")
    header = dict(
        tool="scripts/bench_torch.py",
        date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        device=ctx.device.type, device_name=ctx.device_name, copy_gbps=ctx.copy_gbps,
        copy_bytes=copy_bytes, git_commit=git_commit(),
        mode="partial" if partial else ("quick" if args.quick else "full"),
        torch_version=torch.__version__, triton_version=triton_version,
        cuda_version=torch.version.cuda, host_heap=args.host_heap,
        legend=("Same bytes formulas and timing rules as candle-fused bench. torch_eager: "
                "torch.softmax / softmax(x*scale + additive mask) / F.rms_norm / x + r then "
                "F.rms_norm. torch_compile: the same function through torch.compile("
                "dynamic=False). bwd: torch.autograd.grad(outputs, inputs, grad_outputs=probes, "
                "retain_graph=True) on a prebuilt graph. fwd+bwd: loss = sum(out * probe), "
                "torch.autograd.grad(loss, inputs). LoRA (lora_linear, shape MxKxNxr, s = 2): "
                "torch_base = F.linear(x, W); torch_peft = F.linear(x, W) + F.linear(F.linear("
                "x, A), B) * s; torch_addmm = (x @ W.T).addmm_(x @ A.T, B.T, alpha=s); "
                "torch_merged = F.linear(x, W + s*B@A) (merged untimed); torch_compile = "
                "torch_peft compiled; fwd+bwd: grads of x, A, B (torch_base: x), W frozen, "
                "loss = sum(y * probe); TFLOP/s and GB/s with the formulas of the Rust bench. "
                "cross_entropy: F.cross_entropy (mean, ignore_index -100), liger_ce = "
                "LigerCrossEntropyLoss; linear_cross_entropy: F.cross_entropy(h @ w.T, t), "
                "liger_flce = LigerFusedLinearCrossEntropyLoss, torch_base = the GEMMs alone; "
                "peak_mib = torch.cuda peak allocation of one call above the inputs."),
        notes=notes,
    )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(dict(header=header, rows=rows, skipped=skipped), fh, indent=2)
    return header, rows, skipped


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception:
        traceback.print_exc()
        sys.exit(1)
