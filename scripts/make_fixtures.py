#!/usr/bin/env python3
"""Parity fixtures for candle-fused-train, made with PyTorch + transformers + PEFT only (no code
of ours on this side), and the live comparison against our binaries (`--check`).

    python3 scripts/make_fixtures.py [--out crates/candle-fused-train/tests/fixtures]
    python3 scripts/make_fixtures.py --check --bin $CARGO_TARGET_DIR/release/examples/parity \
        [--cli $CARGO_TARGET_DIR/release/candle-fused] [--log results/parity-check]

Make (the default) writes, for each architecture (llama, qwen2, mistral), under OUT/<arch>/:
  model/            a normal Hugging Face checkpoint dir, f32, random init (seeded):
                    config.json, generation_config.json, model.safetensors, tokenizer.json,
                    tokenizer_config.json (with a ChatML chat template)
  adapter/          a PEFT LoRA adapter (all-linear, non-zero B, dropout 0), PEFT format
  adapter_trained/  a PEFT LoRA adapter trained in PEFT (default init, AdamW) on `train_*` batches
  batches.safetensors   token batches: <name>.tokens / .targets / .positions / .segments (i64)
  expected.safetensors  logits.<batch>.base / logits.<batch>.adapter [B, T, V];
                        grads.<batch>.<PEFT key>; adamw.step<k>.<PEFT key>;
                        adamw_clip.step<k>.<PEFT key>
  expected.json         losses, AdamW settings and losses, generations, eval losses, metadata
and OUT/tokenizer_expected.json (encodings, decodings, chat template renderings) and
OUT/manifest.json (versions, seeds, the conventions below).

Conventions (the Rust side must follow them):
- `targets[b, t]` is the token predicted from position t (already shifted), -100 = ignored.
  loss = mean cross-entropy over the targets that are not -100 (of the whole batch).
- A packed row holds several sequences: `segments` numbers them (0, 1, ...), `positions`
  restart at 0 in each; the expected logits of a packed row are those of each sequence run
  alone (transformers, one call per sequence), concatenated. Unpacked batches have positions
  0..T and one segment per row (the Rust test may also pass None for them).
- Padded rows are right-padded with the pad token; their targets are -100 and there is no
  attention mask (plain causal attention), so the logits at every position are defined.
- Gradients: d loss / d LoRA parameter (torch autograd, f32), keyed like the tensors of
  adapter_model.safetensors ("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight").
- AdamW: torch.optim.AdamW with the lr/betas/eps/weight_decay of expected.json, constant lr;
  step 1 on batch `plain`, step 2 on batch `masked`, from the `adapter/` parameters.
  `adamw_clip`: the same with torch.nn.utils.clip_grad_norm_(max_norm) before each step.
- Generation: model.generate(do_sample=False, max_new_tokens=N), stopping at eos_token_id,
  with the adapter and without it (PeftModel.disable_adapter()); `new_tokens` are the
  generated ids only; `min_margin` is the smallest top-1 minus top-2 logit over the steps.

Check (`--check`): the live comparison with PEFT, both ways (an adapter written by our
`save_adapter` / `finetune` loaded in PEFT, an adapter trained in PEFT loaded by ours, same eval
loss); needs our binaries built; the procedure is in scripts/parity_check.py.
"""

import argparse
import datetime
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile

import peft
import safetensors
import tokenizers
import torch
import torch.nn.functional as F
import transformers
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

DEFAULT_OUT = "crates/candle-fused-train/tests/fixtures"
VOCAB = 300
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]
EOS, PAD = 0, 3
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'].strip() + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello world, this is a small byte-level tokenizer for tests.",
    "Question: what is two plus two? Answer: four.",
    "Rust engineers fine-tune language models with LoRA adapters.",
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\nParis.<|im_end|>\n",
]
ADAMW = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1)
CLIP_NORM = 0.05
MAX_NEW_TOKENS = 16
TRAIN_STEPS, TRAIN_LR = 30, 1e-2

# Architectures: config kwargs (transformers 5 names), LoRA settings, hub-style config.json or
# the one transformers writes, and the seed of everything random in that fixture.
ARCHS = {
    "llama": dict(
        cls="LlamaConfig",
        seed=1101,
        config=dict(
            vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
            rms_norm_eps=1e-5, tie_word_embeddings=False, attention_bias=False, mlp_bias=False,
            rope_parameters=dict(rope_type="llama3", rope_theta=10000.0, factor=8.0, low_freq_factor=1.0,
                                 high_freq_factor=4.0, original_max_position_embeddings=64),
        ),
        lora=dict(r=8, lora_alpha=16),
        hub_style=True,
    ),
    "qwen2": dict(
        cls="Qwen2Config",
        seed=2202,
        config=dict(
            vocab_size=VOCAB + 4, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=512,
            rms_norm_eps=1e-6, tie_word_embeddings=True, use_sliding_window=False,
            rope_parameters=dict(rope_type="default", rope_theta=1000000.0),
        ),
        lora=dict(r=4, lora_alpha=8, rank_pattern={"down_proj": 2}, alpha_pattern={"down_proj": 6}),
        hub_style=True,
    ),
    "mistral": dict(
        cls="MistralConfig",
        seed=3303,
        config=dict(
            vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=8, num_key_value_heads=4, head_dim=8, max_position_embeddings=512,
            rms_norm_eps=1e-5, tie_word_embeddings=False, sliding_window=None,
            rope_parameters=dict(rope_type="default", rope_theta=10000.0),
        ),
        lora=dict(r=4, lora_alpha=8, use_rslora=True),
        hub_style=False,  # config.json as transformers 5 writes it (rope_parameters)
    ),
}


# ----------------------------------------------------------------------------------------------
# Tokenizer


def make_tokenizer(model_dir):
    """A byte-level BPE (256 bytes + 4 specials + merges = VOCAB), trained on CORPUS
    (deterministic), saved like a hub checkpoint's tokenizer (chat template inside
    tokenizer_config.json)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 8, trainer)
    assert tok.get_vocab_size() == VOCAB, tok.get_vocab_size()
    assert [tok.token_to_id(s) for s in SPECIAL] == [0, 1, 2, 3]
    tok.save(os.path.join(model_dir, "tokenizer.json"))
    cfg = {
        "added_tokens_decoder": {
            str(i): {"content": s, "lstrip": False, "normalized": False, "rstrip": False,
                     "single_word": False, "special": True}
            for i, s in enumerate(SPECIAL)
        },
        "bos_token": None,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": SPECIAL[EOS],
        "model_max_length": 512,
        "pad_token": SPECIAL[PAD],
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    with open(os.path.join(model_dir, "tokenizer_config.json"), "w") as f:
        json.dump(cfg, f, indent=2)


def tokenizer_expected(model_dir):
    tok = AutoTokenizer.from_pretrained(model_dir)
    texts = [
        "Hello world",
        "The quick brown fox jumps over the lazy dog.",
        "  leading spaces and\ttabs\nnewlines  ",
        "héllo wörld, 你好 🦀",
        "special <|im_end|> inside<|endoftext|>",
        "",
    ]
    conv = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "  What is 2+2?  "},
        {"role": "assistant", "content": "4"},
    ]
    out = {"encode": [], "chat": []}
    for t in texts:
        ids = tok.encode(t, add_special_tokens=True)
        out["encode"].append({"text": t, "ids": ids, "decoded": tok.decode(ids)})
    for msgs, gen in ((conv, False), (conv[:2], True)):
        text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
        ids = tok.encode(text, add_special_tokens=False)
        out["chat"].append({"messages": msgs, "add_generation_prompt": gen, "text": text, "ids": ids})
    return out


# ----------------------------------------------------------------------------------------------
# Models


def hub_style_config(model_dir):
    """Rewrite config.json the way hub checkpoints (Llama 3.x, Qwen2.5) have it: rope_theta and
    rope_scaling at the top level, torch_dtype, no rope_parameters/layer_types."""
    path = os.path.join(model_dir, "config.json")
    with open(path) as f:
        cfg = json.load(f)
    rope = cfg.pop("rope_parameters")
    cfg["rope_theta"] = rope.pop("rope_theta")
    kind = rope.pop("rope_type")
    cfg["rope_scaling"] = None if kind == "default" else {"rope_type": kind, **rope}
    cfg["torch_dtype"] = cfg.pop("dtype", "float32")
    cfg.pop("layer_types", None)
    with open(path, "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)


def randomize_(model, gen):
    """Weights large enough that attention is far from uniform and logits are O(1): linear
    N(0, 1/in), embeddings N(0, 0.5^2) (tied: 0.25^2), norm weights 1 + N(0, 0.01), biases N(0, 0.04)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            elif name.endswith("bias"):
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))
            elif "embed_tokens" in name:
                std = 0.25 if model.config.tie_word_embeddings else 0.5  # tied: also the LM head
                p.copy_(std * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p.shape[1]))


def make_model(arch, spec, model_dir):
    gen = torch.Generator().manual_seed(spec["seed"])
    cfg_cls = getattr(transformers, spec["cls"])
    cfg = cfg_cls(bos_token_id=None, eos_token_id=EOS, pad_token_id=PAD, **spec["config"])
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32, attn_implementation="eager")
    randomize_(model, gen)
    model.generation_config.eos_token_id = EOS
    model.generation_config.pad_token_id = PAD
    model.save_pretrained(model_dir)
    if spec["hub_style"]:
        hub_style_config(model_dir)
    make_tokenizer(model_dir)
    # What was written must be what transformers reads back.
    back = load_base(model_dir)
    ids = torch.randint(0, VOCAB, (2, 9), generator=gen)
    with torch.no_grad():
        err = (model(ids).logits - back(ids).logits).abs().max().item()
    assert err == 0.0, f"{arch}: config.json rewrite changed the model ({err})"
    return gen


def load_base(model_dir):
    m = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
    m.eval()
    return m


def lora_config(spec, **over):
    kw = dict(target_modules="all-linear", lora_dropout=0.0, bias="none", task_type="CAUSAL_LM")
    kw.update(spec["lora"])
    kw.update(over)
    return LoraConfig(**kw)


def lora_named(model):
    """(PEFT file key, parameter) of every LoRA parameter, in named_parameters order."""
    out = []
    for name, p in model.named_parameters():
        if "lora_" in name:
            assert ".default." in name, name
            out.append((name.replace(".default.", "."), p))
    return out


def make_adapter(spec, model_dir, adapter_dir, gen):
    """PEFT LoRA, then A ~ N(0, 1/in) and B ~ N(0, (0.4 / (scale sqrt(r)))^2): non-zero B, the
    adapter's term about 0.4 of the base projection."""
    model = get_peft_model(load_base(model_dir), lora_config(spec))
    with torch.no_grad():
        for _, mod in model.named_modules():
            if hasattr(mod, "lora_A") and "default" in mod.lora_A:
                a, b = mod.lora_A["default"].weight, mod.lora_B["default"].weight
                r, s = a.shape[0], mod.scaling["default"]
                a.copy_(torch.randn(a.shape, generator=gen) / math.sqrt(a.shape[1]))
                b.copy_(torch.randn(b.shape, generator=gen) * 0.4 / (s * math.sqrt(r)))
    model.save_pretrained(adapter_dir)
    fix_base_name(adapter_dir)


def fix_base_name(adapter_dir):
    """base_model_name_or_path relative to the fixture dir (not this machine's path); the
    target_modules list sorted; no model card."""
    path = os.path.join(adapter_dir, "adapter_config.json")
    with open(path) as f:
        cfg = json.load(f)
    cfg["base_model_name_or_path"] = "model"
    if isinstance(cfg["target_modules"], list):
        cfg["target_modules"] = sorted(cfg["target_modules"])  # PEFT writes a set (random order)
    with open(path, "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
    readme = os.path.join(adapter_dir, "README.md")  # PEFT's model card template
    if os.path.exists(readme):
        os.remove(readme)


def load_peft(model_dir, adapter_dir, trainable=True):
    m = PeftModel.from_pretrained(load_base(model_dir), adapter_dir, is_trainable=trainable)
    m.eval()  # dropout is 0 anyway; eval keeps generate() and forward identical
    return m


# ----------------------------------------------------------------------------------------------
# Batches, loss, logits


def make_batches(gen, vocab):
    """plain [2, 12] (all targets), masked [3, 10] (right padding, prompt tokens ignored),
    packed [2, 16] (segments 6+5+5 and 9+7, positions restart, last target of each -100)."""
    out = {}

    def rand(n):
        return torch.randint(4, vocab, (n,), generator=gen)  # no special tokens

    seq = torch.stack([rand(13) for _ in range(2)])
    out["plain"] = dict(tokens=seq[:, :-1], targets=seq[:, 1:].clone(),
                        positions=torch.arange(12).repeat(2, 1), segments=torch.zeros(2, 12, dtype=torch.long))
    lens, prompt = [10, 7, 4], [3, 0, 1]
    tok = torch.full((3, 10), PAD, dtype=torch.long)
    tgt = torch.full((3, 10), -100, dtype=torch.long)
    for b, (n, p) in enumerate(zip(lens, prompt)):
        s = rand(n + 1)
        tok[b, :n] = s[:n]
        tgt[b, p:n] = s[p + 1:n + 1]
    out["masked"] = dict(tokens=tok, targets=tgt, positions=torch.arange(10).repeat(3, 1),
                         segments=torch.zeros(3, 10, dtype=torch.long))
    rows = [[6, 5, 5], [9, 7]]
    tok, tgt, pos, seg = (torch.zeros(2, 16, dtype=torch.long) for _ in range(4))
    for b, lengths in enumerate(rows):
        t = 0
        for k, n in enumerate(lengths):
            s = rand(n)
            tok[b, t:t + n] = s
            tgt[b, t:t + n - 1] = s[1:]
            tgt[b, t + n - 1] = -100
            pos[b, t:t + n] = torch.arange(n)
            seg[b, t:t + n] = k
            t += n
    out["packed"] = dict(tokens=tok, targets=tgt, positions=pos, segments=seg)
    return out


def logits_of(model, batch):
    """[B, T, V]; packed rows: each segment run alone, concatenated."""
    tok, seg = batch["tokens"], batch["segments"]
    rows = []
    for b in range(tok.shape[0]):
        parts = []
        for k in torch.unique_consecutive(seg[b]).tolist():
            idx = (seg[b] == k).nonzero().flatten()
            parts.append(model(input_ids=tok[b:b + 1, idx]).logits[0])
        rows.append(torch.cat(parts, 0))
    return torch.stack(rows)


def loss_of(logits, targets):
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100)


def check_hf_loss(model, batch, loss):
    """Our target convention against transformers' own shifted labels (plain batch)."""
    labels = torch.cat([batch["tokens"][:, :1], batch["targets"]], 1)
    ids = torch.cat([batch["tokens"], batch["targets"][:, -1:]], 1)
    hf = model(input_ids=ids, labels=labels).loss.item()
    assert abs(hf - loss) <= 1e-5 * abs(loss), (hf, loss)


# ----------------------------------------------------------------------------------------------
# Fixture of one architecture


def adamw_run(model_dir, adapter_dir, batches, clip, tensors, prefix):
    model = load_peft(model_dir, adapter_dir)
    named = lora_named(model)
    opt = torch.optim.AdamW([p for _, p in named], **ADAMW)
    losses, norms = [], []
    for k, name in enumerate(["plain", "masked"], 1):
        opt.zero_grad()
        loss = loss_of(logits_of(model, batches[name]), batches[name]["targets"])
        loss.backward()
        if clip is not None:
            norms.append(torch.nn.utils.clip_grad_norm_([p for _, p in named], clip).item())
        opt.step()
        losses.append(loss.item())
        for key, p in named:
            tensors[f"{prefix}.step{k}.{key}"] = p.detach().clone()
    return losses, norms


def generations(model, prompts):
    out = []
    for ids in prompts:
        x = torch.tensor([ids])
        with torch.no_grad():
            g = model.generate(input_ids=x, attention_mask=torch.ones_like(x), do_sample=False,
                               max_new_tokens=MAX_NEW_TOKENS, eos_token_id=EOS, pad_token_id=PAD,
                               output_scores=True, return_dict_in_generate=True)
        new = g.sequences[0, len(ids):].tolist()
        margins = [(s[0].topk(2).values[0] - s[0].topk(2).values[1]).item() for s in g.scores]
        out.append(dict(prompt=ids, new_tokens=new, stopped_at_eos=EOS in new, min_margin=min(margins)))
        assert min(margins) > 1e-3, f"near-tie in greedy decoding ({min(margins)}): pick another prompt"
    return out


def train_batches(gen, vocab, n):
    """A learnable pattern for the trained adapter: t[i+1] = (3 t[i] + 7) mod (vocab - 4) + 4,
    with a random start token per row, [4, 12] per batch."""
    out = []
    for _ in range(n):
        start = torch.randint(4, vocab, (4,), generator=gen)
        seq = [start]
        for _ in range(12):
            seq.append((3 * (seq[-1] - 4) + 7) % (vocab - 4) + 4)
        s = torch.stack(seq, 1)
        out.append(dict(tokens=s[:, :-1], targets=s[:, 1:].clone(), positions=torch.arange(12).repeat(4, 1),
                        segments=torch.zeros(4, 12, dtype=torch.long)))
    return out


def make_arch(arch, spec, out):
    root = os.path.join(out, arch)
    shutil.rmtree(root, ignore_errors=True)
    model_dir, adapter_dir, trained_dir = (os.path.join(root, d) for d in ("model", "adapter", "adapter_trained"))
    os.makedirs(model_dir)
    torch.manual_seed(spec["seed"])
    gen = make_model(arch, spec, model_dir)
    make_adapter(spec, model_dir, adapter_dir, gen)
    vocab = VOCAB  # tokens the tokenizer can make (qwen2's embedding is larger)
    batches = make_batches(gen, vocab)
    tensors, info = {}, {"arch": arch, "seed": spec["seed"], "losses": {}, "lora": dict(spec["lora"])}

    base = load_base(model_dir)
    model = load_peft(model_dir, adapter_dir)
    for name, b in batches.items():
        with torch.no_grad():
            lb = logits_of(base, b)
            with model.disable_adapter():
                lb2 = logits_of(model, b)
            assert torch.equal(lb, lb2)
        model.zero_grad()
        la = logits_of(model, b)
        loss = loss_of(la, b["targets"])
        loss.backward()
        tensors[f"logits.{name}.base"] = lb.detach()
        tensors[f"logits.{name}.adapter"] = la.detach()
        info["losses"][name] = {"base": loss_of(lb, b["targets"]).item(), "adapter": loss.item(),
                                "targets": int((b["targets"] != -100).sum())}
        for key, p in lora_named(model):
            assert p.grad is not None and p.grad.abs().max() > 0, f"{arch} {name} {key}: zero gradient"
            tensors[f"grads.{name}.{key}"] = p.grad.detach().clone()
        if name == "plain":
            check_hf_loss(base, b, info["losses"][name]["base"])
    saved = load_file(os.path.join(adapter_dir, "adapter_model.safetensors"))
    assert sorted(saved) == sorted(k for k, _ in lora_named(model)), "PEFT file keys != parameter names"
    assert any(v.abs().max() > 0 for k, v in saved.items() if "lora_B" in k)

    info["adamw"] = dict(ADAMW, betas=list(ADAMW["betas"]), batches=["plain", "masked"], schedule="constant")
    info["adamw"]["losses"], _ = adamw_run(model_dir, adapter_dir, batches, None, tensors, "adamw")
    info["adamw_clip"] = dict(info["adamw"], max_grad_norm=CLIP_NORM)
    info["adamw_clip"]["losses"], norms = adamw_run(model_dir, adapter_dir, batches, CLIP_NORM, tensors, "adamw_clip")
    info["adamw_clip"]["grad_norms_before_clip"] = norms
    assert all(n > CLIP_NORM for n in norms), f"clipping not active: {norms}"
    assert info["adamw"]["losses"][0] == info["losses"]["plain"]["adapter"]

    tok = AutoTokenizer.from_pretrained(model_dir)
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    prompts = [tok.encode("The quick brown", add_special_tokens=False),
               tok.apply_chat_template(chat, tokenize=True, add_generation_prompt=True, return_dict=False)]
    prompts = [list(p["input_ids"]) if isinstance(p, dict) else list(p) for p in prompts]
    with model.disable_adapter():
        info["generate_base"] = generations(model, prompts)
    info["generate_adapter"] = generations(model, prompts)
    info["generate"] = dict(do_sample=False, max_new_tokens=MAX_NEW_TOKENS, eos_token_id=EOS)
    assert [g["new_tokens"] for g in info["generate_base"]] == [g["new_tokens"] for g in generations(base, prompts)]

    # An adapter trained in PEFT (default init: B = 0, so step 0 is the base model).
    tb = train_batches(gen, vocab, TRAIN_STEPS + 1)
    eval_batch, tb = tb[0], tb[1:]
    for k, v in eval_batch.items():
        batches[f"eval.{k}"] = v
    tm = get_peft_model(load_base(model_dir), lora_config(spec))
    tm.train()
    named = lora_named(tm)
    opt = torch.optim.AdamW([p for _, p in named], lr=TRAIN_LR)
    train_losses = []
    for b in tb:
        opt.zero_grad()
        loss = loss_of(logits_of(tm, b), b["targets"])
        loss.backward()
        opt.step()
        train_losses.append(loss.item())
    tm.save_pretrained(trained_dir)
    fix_base_name(trained_dir)
    fresh = load_peft(model_dir, trained_dir, trainable=False)
    with torch.no_grad():
        ev_adapter = loss_of(logits_of(fresh, eval_batch), eval_batch["targets"]).item()
        ev_base = loss_of(logits_of(base, eval_batch), eval_batch["targets"]).item()
    assert ev_adapter < ev_base - 0.5, f"the PEFT-trained adapter did not learn ({ev_base} -> {ev_adapter})"
    info["adapter_trained"] = dict(eval_batch="eval", eval_loss_base=ev_base, eval_loss_adapter=ev_adapter,
                                   train_steps=TRAIN_STEPS, lr=TRAIN_LR, train_losses=train_losses,
                                   optimizer="torch.optim.AdamW defaults except lr")

    flat = {}
    for name, b in batches.items():
        if "." in name:
            flat[name] = b.contiguous()
        else:
            for k, v in b.items():
                flat[f"{name}.{k}"] = v.contiguous()
    save_file(flat, os.path.join(root, "batches.safetensors"))
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(root, "expected.safetensors"))
    with open(os.path.join(root, "expected.json"), "w") as f:
        json.dump(info, f, indent=2)
    print(f"{arch}: losses {json.dumps(info['losses'])}, PEFT-trained eval {ev_base:.4f} -> {ev_adapter:.4f}")
    return model_dir


def versions():
    return dict(torch=torch.__version__, transformers=transformers.__version__, peft=peft.__version__,
                safetensors=safetensors.__version__, tokenizers=tokenizers.__version__,
                python=platform.python_version())


def make(out):
    os.makedirs(out, exist_ok=True)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)  # summation order independent of the machine's core count
    dirs = [make_arch(arch, spec, out) for arch, spec in ARCHS.items()]
    tex = tokenizer_expected(dirs[0])
    with open(os.path.join(out, "tokenizer_expected.json"), "w") as f:  # one case a line
        f.write("{\n" + ",\n".join(
            f'"{k}": [\n' + ",\n".join(json.dumps(c, ensure_ascii=False) for c in v) + "\n]" for k, v in tex.items()
        ) + "\n}\n")
    manifest = dict(made_by="scripts/make_fixtures.py", date=datetime.date.today().isoformat(),
                    versions=versions(), archs={a: dict(seed=s["seed"], lora=s["lora"], hub_style_config=s["hub_style"])
                                                for a, s in ARCHS.items()},
                    conventions=__doc__.split("Conventions (the Rust side must follow them):\n")[1].split("\nCheck")[0])
    with open(os.path.join(out, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=2)
    total = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(out) for f in fs)
    print(f"fixtures in {out}: {total / 1e6:.2f} MB")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=DEFAULT_OUT, help="fixture directory (make mode)")
    ap.add_argument("--check", action="store_true", help="run the live comparison against our binary")
    ap.add_argument("--bin", help="check mode: our `parity` example binary "
                    "(cargo build --release -p candle-fused-train --example parity)")
    ap.add_argument("--cli", help="check mode, optional: our candle-fused binary (checks `finetune`)")
    ap.add_argument("--log", default="results/parity-check", help="check mode: log path without extension")
    args = ap.parse_args()
    if args.check:
        if not args.bin:
            sys.exit("make_fixtures.py --check needs --bin (our `parity` example binary)")
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        import parity_check  # the procedure lives there (this file makes the fixtures)

        sys.exit(parity_check.check(args))
    make(args.out)


if __name__ == "__main__":
    main()
