#!/usr/bin/env python3
"""`make_fixtures.py --check`: adapters cross the border both ways, live, with PEFT.

    cargo build --release -p candle-fused-train --example parity
    cargo build --release -p candle-fused-cli            # optional: also checks `finetune`
    python3 scripts/make_fixtures.py --check --bin $CARGO_TARGET_DIR/release/examples/parity \\
        [--cli $CARGO_TARGET_DIR/release/candle-fused] [--log results/parity-check]

Per architecture of the committed fixtures (the same checkpoints and token batches on both
sides, so no tokenization is involved):
1. ours -> PEFT: our `parity train` adds a LoRA (PEFT init, the fixture's r and alpha), takes
   10 AdamW steps on batch `plain` with the explicit backward and writes the adapter with
   `Model::save_adapter`; PEFT loads it (PeftModel.from_pretrained on the transformers model)
   and its eval loss on batch `masked` must equal ours within 1e-4 relative.
2. PEFT -> ours: PEFT trains an adapter from its default init (10 AdamW steps on `plain`),
   save_pretrained; our `parity eval` loads it and gives PEFT's eval loss on `masked`.
   Also the fixture's adapter/ (qwen2: a rank/alpha pattern; mistral: rsLoRA) loaded and
   written again by ours (`parity resave`): PEFT's logits with it equal those with the original.
3. Merge: our `parity merge` writes base + adapter/ merged (Model::save(.., merge_lora = true));
   transformers loads it as a plain checkpoint and its logits on `plain` equal PEFT's
   (base + adapter) within 1e-4 relative.
4. With --cli: `candle-fused finetune` on the llama fixture with a small JSONL; PEFT loads the
   adapter it wrote and gives the same loss on `masked` as our `parity eval` of it.
Writes LOG.json and LOG.md; exits 1 when a check fails.
"""

import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile

import torch

import make_fixtures as mf

TOL = 1e-4
STEPS, LR = 10, 1e-2


def run(cmd):
    p = subprocess.run([str(c) for c in cmd], capture_output=True, text=True)
    lines = [l for l in p.stdout.splitlines() if l.startswith("{")]
    if p.returncode != 0 or not lines:
        raise RuntimeError(f"{' '.join(map(str, cmd))} exited {p.returncode}:\n{p.stdout}\n{p.stderr}")
    return json.loads(lines[-1])


def peft_loss(model_dir, adapter_dir, batch):
    m = mf.load_peft(model_dir, adapter_dir, trainable=False)
    with torch.no_grad():
        return mf.loss_of(mf.logits_of(m, batch), batch["targets"]).item()


def base_loss(model_dir, batch):
    with torch.no_grad():
        return mf.loss_of(mf.logits_of(mf.load_base(model_dir), batch), batch["targets"]).item()


def load_batch(path, name):
    t = mf.load_file(path)
    return {k: t[f"{name}.{k}"] for k in ("tokens", "targets", "positions", "segments")}


def logits_row(name, model_dir, adapter_dir, want_fn, batches, rows):
    """Logits on batch `plain` of model_dir (+ adapter_dir in PEFT) against want_fn's, and how far
    the adapter moves them from the fixture's base model (must be visible)."""
    pb = load_batch(batches, "plain")
    with torch.no_grad():
        m = mf.load_peft(model_dir, adapter_dir, trainable=False) if adapter_dir else mf.load_base(model_dir)
        got, want = mf.logits_of(m, pb), want_fn(pb)
        plain = mf.logits_of(mf.load_base(os.path.join(os.path.dirname(batches), "model")), pb)
    err = ((got - want).norm() / want.norm()).item()
    effect = ((plain - want).norm() / want.norm()).item()
    ok = err <= TOL and effect > 1e-2
    rows.append(dict(check=name, rel_err=err, tol=TOL, adapter_effect=effect, result="PASS" if ok else "FAIL"))
    print(f"{'PASS' if ok else 'FAIL'} {name}: rel err {err:.2e} (adapter effect {effect:.2e})", flush=True)


def find_adapter(root):
    """The adapter dir under a finetune --out (the top one, not a checkpoint's)."""
    best = None
    for d, _, files in os.walk(root):
        if "adapter_config.json" in files and (best is None or d.count(os.sep) < best.count(os.sep)):
            best = d
    if best is None:
        raise RuntimeError(f"no adapter_config.json under {root}")
    return best


def check(args):
    work = tempfile.mkdtemp(prefix="parity_check_")
    fx = args.out
    rows = []

    def row(name, ours, theirs, base):
        err = abs(ours - theirs) / abs(theirs)
        ok = err <= TOL and abs(theirs - base) > 1e-3  # and the adapter changes the loss
        rows.append(dict(check=name, ours=ours, peft=theirs, base=base, rel_err=err, tol=TOL,
                         result="PASS" if ok else "FAIL"))
        print(f"{'PASS' if ok else 'FAIL'} {name}: ours {ours:.6f}, PEFT {theirs:.6f} (base {base:.6f}), "
              f"rel err {err:.2e}", flush=True)

    for arch, spec in mf.ARCHS.items():
        model_dir = os.path.join(fx, arch, "model")
        batches = os.path.join(fx, arch, "batches.safetensors")
        ev = load_batch(batches, "masked")
        base = base_loss(model_dir, ev)
        # 1. ours -> PEFT
        out = os.path.join(work, arch, "ours_adapter")
        res = run([args.bin, "train", "--model", model_dir, "--batches", batches, "--batch", "plain",
                   "--steps", STEPS, "--lr", LR, "--rank", spec["lora"]["r"], "--alpha", spec["lora"]["lora_alpha"],
                   "--seed", 7, "--out", out, "--eval-batch", "masked"])
        row(f"{arch}: adapter of our save_adapter, loaded by PEFT (eval loss)", res["eval_loss"],
            peft_loss(model_dir, out, ev), base)
        # 2. PEFT -> ours
        torch.manual_seed(spec["seed"] + 1)
        pm = mf.get_peft_model(mf.load_base(model_dir), mf.lora_config(spec))
        pm.train()
        opt = torch.optim.AdamW([p for _, p in mf.lora_named(pm)], lr=LR)
        tb = load_batch(batches, "plain")
        for _ in range(STEPS):
            opt.zero_grad()
            mf.loss_of(mf.logits_of(pm, tb), tb["targets"]).backward()
            opt.step()
        pdir = os.path.join(work, arch, "peft_adapter")
        pm.save_pretrained(pdir)
        ours = run([args.bin, "eval", "--model", model_dir, "--adapter", pdir, "--batches", batches,
                    "--batch", "masked"])["loss"]
        row(f"{arch}: adapter trained in PEFT, loaded by ours (eval loss)", ours, peft_loss(model_dir, pdir, ev), base)
        # 1b. the fixture adapter (patterns, rsLoRA) written again by ours, logits in PEFT
        rdir = os.path.join(work, arch, "resaved")
        run([args.bin, "resave", "--model", model_dir, "--adapter", os.path.join(fx, arch, "adapter"),
             "--batches", batches, "--out", rdir])
        logits_row(f"{arch}: fixture adapter re-saved by ours, in PEFT vs the original (logits)", model_dir,
                   rdir, lambda pb: mf.logits_of(mf.load_peft(model_dir, os.path.join(fx, arch, "adapter"),
                                                              trainable=False), pb), batches, rows)
        # 3. merge
        mdir = os.path.join(work, arch, "merged")
        run([args.bin, "merge", "--model", model_dir, "--adapter", os.path.join(fx, arch, "adapter"),
             "--batches", batches, "--out", mdir])
        logits_row(f"{arch}: our merged checkpoint in transformers vs PEFT (logits)", mdir, None,
                   lambda pb: mf.logits_of(mf.load_peft(model_dir, os.path.join(fx, arch, "adapter"),
                                                        trainable=False), pb), batches, rows)

    if args.cli:
        arch = "llama"
        model_dir = os.path.join(fx, arch, "model")
        batches = os.path.join(fx, arch, "batches.safetensors")
        data = os.path.join(work, "data.jsonl")
        with open(data, "w") as f:
            for i in range(64):
                f.write(json.dumps({"text": f"Question {i}: what is {i} plus {i}? Answer: {2 * i}."}) + "\n")
        ft = os.path.join(work, "finetune")
        cmd = [args.cli, "finetune", "--model", model_dir, "--data", data, "--out", ft, "--steps", 8,
               "--seq-len", 32, "--batch-size", 4, "--lr", 1e-2, "--seed", 0]
        p = subprocess.run([str(c) for c in cmd], capture_output=True, text=True)
        if p.returncode != 0:
            rows.append(dict(check="finetune", result="FAIL", error=p.stderr[-2000:]))
            print(f"FAIL finetune exited {p.returncode}:\n{p.stderr[-2000:]}")
        else:
            ad = find_adapter(ft)
            ev = load_batch(batches, "masked")
            ours = run([args.bin, "eval", "--model", model_dir, "--adapter", ad, "--batches", batches,
                        "--batch", "masked"])["loss"]
            row(f"{arch}: adapter written by `candle-fused finetune`, loaded by PEFT (eval loss)", ours,
                peft_loss(model_dir, ad, ev), base_loss(model_dir, ev))

    ok = bool(rows) and all(r["result"] == "PASS" for r in rows)
    write_log(args, rows, ok)
    return 0 if ok else 1


def write_log(args, rows, ok):
    commit = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=12"], capture_output=True,
                            text=True).stdout.strip()
    head = dict(tool="scripts/make_fixtures.py --check", date=datetime.datetime.now(datetime.timezone.utc)
                .strftime("%Y-%m-%dT%H:%M:%SZ"), git_commit=commit, machine=platform.machine(),
                cpu_count=os.cpu_count(), versions=mf.versions(), bin=str(args.bin), cli=args.cli and str(args.cli))
    os.makedirs(os.path.dirname(args.log) or ".", exist_ok=True)
    with open(args.log + ".json", "w") as f:
        json.dump(dict(header=head, rows=rows, result="PASS" if ok else "FAIL"), f, indent=2)
    v = head["versions"]
    md = [f"# Adapter round trip with PEFT ({head['date']}, commit `{commit}`)\n",
          f"torch {v['torch']}, transformers {v['transformers']}, peft {v['peft']}, Python {v['python']}; "
          f"f32 on the CPU ({head['cpu_count']} cores). Made by `scripts/make_fixtures.py --check` "
          "(the procedure is in `scripts/parity_check.py`).\n",
          "| check | ours | PEFT | base | rel err | tol | result |", "|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        if "ours" in r and "adapter_effect" not in r:
            md.append(f"| {r['check']} | {r['ours']:.6f} | {r['peft']:.6f} | {r['base']:.6f} | {r['rel_err']:.2e} | "
                      f"{r['tol']:.0e} | {r['result']} |")
        elif "adapter_effect" in r:
            md.append(f"| {r['check']} | - | - | adapter effect {r['adapter_effect']:.2e} | {r['rel_err']:.2e} | "
                      f"{r['tol']:.0e} | {r['result']} |")
        else:
            md.append(f"| {r['check']} | - | - | - | - | - | {r['result']}: {r.get('error', '')[:200]} |")
    md.append(f"\nOverall: **{'PASS' if ok else 'FAIL'}** ({sum(r['result'] == 'PASS' for r in rows)}/{len(rows)}).")
    with open(args.log + ".md", "w") as f:
        f.write("\n".join(md) + "\n")
    print(f"log: {args.log}.json, {args.log}.md", file=sys.stderr)
