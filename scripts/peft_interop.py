#!/usr/bin/env python3
"""Interop of candle-fused's LoRA adapters with Hugging Face PEFT, both ways.

Needs torch, peft and safetensors (no Rust toolchain): the Rust side is the prebuilt example
binary `peft_interop` (cargo build --release --example peft_interop [--features cuda]).

1. Builds a stack of nn.Linear layers (64 -> 96 -> 80 -> 48, ReLU between), saves its base
   weights, wraps it with PEFT LoRA (r=8, lora_alpha=16, all three linears, dropout 0.05;
   fc3 gets r=4, alpha=4 through rank_pattern/alpha_pattern),
   trains a few steps so that B != 0, saves the adapter with save_pretrained, and saves an
   input x [2, 5, 64] with PEFT's outputs (adapter on and off).
2. `peft_interop reproduce`: our crate loads base + PEFT adapter and must reproduce PEFT's
   outputs within 1e-4 relative (f32), adapter on, off, and merged.
3. `peft_interop export`: our crate trains its own adapter (r=4, alpha=8; fc2 r=6, alpha=18
   through the patterns) and saves it in PEFT
   format with its outputs; PEFT loads it (PeftModel.from_pretrained) and must give the same
   outputs within 1e-4 relative.

Writes OUT.json and OUT.md (OUT = --out, default results/peft_interop); exits 1 on a failure.

    python3 scripts/peft_interop.py --bin target/release/examples/peft_interop \
        [--device cpu|cuda] [--out results/peft_interop]
"""

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile

import peft
import safetensors
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

TOL = 1e-4
DIMS = [64, 96, 80, 48]
NAMES = ["fc1", "fc2", "fc3"]


class Stack(torch.nn.Module):
    def __init__(self):
        super().__init__()
        for name, (i, o) in zip(NAMES, zip(DIMS[:-1], DIMS[1:])):
            setattr(self, name, torch.nn.Linear(i, o))

    def forward(self, x):
        for k, name in enumerate(NAMES):
            x = getattr(self, name)(x)
            if k + 1 < len(NAMES):
                x = torch.relu(x)
        return x


def rel_err(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def run_bin(binary, mode, workdir, device):
    cmd = [binary, mode, "--dir", workdir, "--device", device]
    p = subprocess.run(cmd, capture_output=True, text=True)
    sys.stderr.write(p.stderr)
    lines = [l for l in p.stdout.splitlines() if l.startswith("{")]
    if not lines:
        raise SystemExit(f"{' '.join(cmd)} printed no JSON (exit {p.returncode}):\n{p.stdout}")
    res = json.loads(lines[-1])
    res["exit_code"] = p.returncode
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", required=True, help="path of the peft_interop example binary")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="device of the Rust side")
    ap.add_argument("--out", default="results/peft_interop", help="output path without extension")
    ap.add_argument("--workdir", default=None, help="scratch directory (default: a fresh temp dir)")
    ap.add_argument("--seed", type=int, default=None, help="torch seed (default: random)")
    args = ap.parse_args()

    seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(seed)
    workdir = args.workdir or tempfile.mkdtemp(prefix="peft_interop_")
    os.makedirs(workdir, exist_ok=True)

    # 1. Base model, PEFT adapter, a few training steps, outputs.
    base = Stack()
    save_file({k: v.contiguous() for k, v in base.state_dict().items()}, os.path.join(workdir, "base.safetensors"))
    with open(os.path.join(workdir, "model.json"), "w") as f:
        json.dump(
            {
                "layers": [
                    {"path": n, "in": i, "out": o, "bias": True} for n, i, o in zip(NAMES, DIMS[:-1], DIMS[1:])
                ],
                "activation": "relu",
            },
            f,
        )
    cfg = LoraConfig(
        r=8,
        lora_alpha=16,
        target_modules=NAMES,
        lora_dropout=0.05,
        bias="none",
        rank_pattern={"fc3": 4},
        alpha_pattern={"fc3": 4},
    )
    model = get_peft_model(base, cfg)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    xt, yt = torch.randn(256, DIMS[0]), torch.randn(256, DIMS[-1])
    model.train()
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(xt), yt)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.eval()
    b_max = max(m.lora_B["default"].weight.abs().max().item() for n, m in model.named_modules() if hasattr(m, "lora_B") and "default" in m.lora_B)
    model.save_pretrained(os.path.join(workdir, "peft_adapter"))
    x = torch.randn(2, 5, DIMS[0])
    with torch.no_grad():
        y_peft = model(x)
        with model.disable_adapter():
            y_base = model(x)
    save_file({"x": x, "y_peft": y_peft, "y_base": y_base}, os.path.join(workdir, "io.safetensors"))

    # 2. Our crate reproduces PEFT.
    repro = run_bin(args.bin, "reproduce", workdir, args.device)

    # 3. Our adapter, loaded by PEFT.
    export = run_bin(args.bin, "export", workdir, args.device)
    fresh = Stack()
    fresh.load_state_dict(load_file(os.path.join(workdir, "base.safetensors")))
    ours = PeftModel.from_pretrained(fresh, os.path.join(workdir, "ours_adapter"))
    ours.eval()
    with torch.no_grad():
        y_ours_peft = ours(x)
        with ours.disable_adapter():
            y_ours_base = ours(x)
    y_ours = load_file(os.path.join(workdir, "ours_out.safetensors"))["y"]
    loaded_cfg = ours.peft_config["default"]
    e_ours = rel_err(y_ours_peft, y_ours)
    ours_effect = rel_err(y_ours, y_ours_base)
    ranks = {n: getattr(ours.base_model.model, n).lora_A["default"].weight.shape[0] for n in NAMES}
    scales = {n: getattr(ours.base_model.model, n).scaling["default"] for n in NAMES}
    peft_loads = {
        "rel_err_peft_vs_ours": e_ours,
        "ranks": ranks,
        "scales": scales,
        "adapter_effect_rel": ours_effect,
        "r": loaded_cfg.r,
        "lora_alpha": loaded_cfg.lora_alpha,
        "target_modules": sorted(loaded_cfg.target_modules),
        "pass": e_ours < TOL and ours_effect > 1e-3 and ranks["fc2"] == 6 and abs(scales["fc2"] - 3.0) < 1e-12,
    }

    ok = bool(repro["pass"] and repro["exit_code"] == 0 and export["pass"] and export["exit_code"] == 0 and peft_loads["pass"])
    result = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "peft": peft.__version__,
        "safetensors": safetensors.__version__,
        "rust_device": args.device,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "seed": seed,
        "model": {"dims": DIMS, "modules": NAMES, "activation": "relu"},
        "peft_adapter": {"r": 8, "lora_alpha": 16, "lora_dropout": 0.05, "rank_pattern": {"fc3": 4}, "alpha_pattern": {"fc3": 4}, "train_losses": [losses[0], losses[-1]], "max_abs_lora_b": b_max},
        "tolerance": TOL,
        "ours_reproduces_peft": repro,
        "ours_export": export,
        "peft_loads_ours": peft_loads,
        "pass": ok,
    }
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump(result, f, indent=2)
    with open(args.out + ".md", "w") as f:
        f.write(f"# PEFT interop ({result['date']})\n\n")
        f.write(f"torch {result['torch']}, peft {result['peft']}, Python {result['python']}, Rust device `{args.device}`")
        f.write(f", GPU {result['gpu']}\n\n" if result["gpu"] else "\n\n")
        f.write("| check | relative error | tolerance | result |\n|---|---|---|---|\n")
        rows = [
            ("candle-fused reproduces PEFT (adapter on)", repro["rel_err_adapter_on"]),
            ("candle-fused reproduces PEFT (adapter off)", repro["rel_err_adapter_off"]),
            ("candle-fused reproduces PEFT (merged)", repro["rel_err_merged"]),
            ("PEFT loads candle-fused's adapter", e_ours),
        ]
        for name, e in rows:
            f.write(f"| {name} | {e:.2e} | {TOL:.0e} | {'PASS' if e < TOL else 'FAIL'} |\n")
        f.write(
            f"\nAdapter effect (how far the adapted output is from the base): PEFT's "
            f"{repro['adapter_effect_rel']:.3f}, ours {ours_effect:.3f} (relative).\n"
        )
        f.write(
            f"Per-module patterns: candle-fused read PEFT's scales {repro.get('scales')} "
            f"(fc1, fc2, fc3; fc3 r=4, alpha=4 via rank/alpha_pattern); PEFT read ours as ranks "
            f"{ranks} and scales {scales} (fc2 r=6, alpha=18).\n"
        )
    print(json.dumps(result, indent=2))
    print("PEFT interop:", "PASS" if ok else "FAIL")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
