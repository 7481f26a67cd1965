//! Parity with transformers + PEFT, f32 on the CPU, on the committed fixtures that
//! `scripts/make_fixtures.py` made with PyTorch (no PyTorch needed here; the conventions are
//! in `tests/fixtures/manifest.json`): tiny random-init Llama (GQA, llama3 RoPE scaling,
//! untied), Qwen2 (q/k/v bias, tied, a PEFT rank/alpha pattern) and Mistral (rsLoRA)
//! checkpoints with PEFT adapters whose B is non-zero.
//!
//! Checked, per architecture and batch (plain, right-padded with ignored targets, packed):
//! logits and loss within 1e-4 relative of transformers (base and adapter), every LoRA
//! gradient within 1e-4 of PEFT + torch autograd (explicit backward and tape), the explicit
//! backward against the tape within 1e-5, two AdamW steps (with and without gradient
//! clipping) within 1e-5 of torch.optim.AdamW, greedy generations identical, a PEFT-trained
//! adapter's eval loss, our `save_adapter` -> `load_adapter` round trip, the merged checkpoint,
//! and the tokenizer + chat template against AutoTokenizer. Every check is
//! reported (name, error, tolerance) and all failures are listed together.
//! `scripts/parity_sabotage.sh` reruns this with `CANDLE_FUSED_PARITY_SABOTAGE` set to each
//! mode (one input broken on purpose) to show the checks fail (`results/parity-sabotage.md`).

mod parity_common;

use candle_core::{DType, Device};
use candle_fused_train::{
    clip_grad_norm, generate, AdamW, AdamWConfig, GenerateConfig, LoraGrads, Message, Model,
    Tokenizer,
};
use parity_common::{rel, sabotage, Fixture, Report, ARCHS, BATCHES};

/// Logits, loss, gradients vs transformers + PEFT (f32).
const TOL: f64 = 1e-4;
/// AdamW parameters vs torch; the explicit backward vs the tape.
const TOL_STEP: f64 = 1e-5;

fn grads_vs(
    r: &mut Report,
    what: &str,
    fx: &Fixture,
    model: &Model,
    batch: &str,
    grads: &LoraGrads,
    tol: f64,
) {
    let keys: Vec<String> = model.lora_params().into_iter().map(|(k, _)| k).collect();
    r.check_eq(
        &format!("{} {what}: gradient count", fx.name),
        grads.len(),
        keys.len(),
    );
    let mut worst = (0.0f64, String::new());
    for k in &keys {
        let want = fx.expected(&format!("grads.{batch}.{k}"));
        match grads.get(k) {
            None => r.fail(format!("{} {what}: no gradient for {k}", fx.name)),
            Some(g) => {
                let e = rel(g, &want);
                if e > worst.0 || worst.1.is_empty() {
                    worst = (e, k.clone());
                }
            }
        }
    }
    r.check(
        &format!("{} {batch} {what} (worst: {})", fx.name, worst.1),
        worst.0,
        tol,
    );
}

#[test]
fn logits_and_loss_match_transformers() {
    let mut r = Report::new("logits and loss vs transformers");
    for arch in ARCHS {
        let fx = Fixture::load(arch);
        let base = fx.model(None);
        let adapted = fx.model(Some("adapter"));
        for b in BATCHES {
            let batch = fx.batch(b);
            for (which, model) in [("base", &base), ("adapter", &adapted)] {
                let want = fx.expected(&format!("logits.{b}.{which}"));
                let got = model.forward(&batch).unwrap();
                r.check(
                    &format!("{arch} {b} {which}: logits"),
                    rel(&got, &want),
                    TOL,
                );
                let loss_want = fx.loss(b, which);
                let loss = model.loss(&batch).unwrap() as f64;
                r.check(
                    &format!("{arch} {b} {which}: loss"),
                    ((loss - loss_want) / loss_want).abs(),
                    TOL,
                );
            }
            let (loss, _) = adapted.loss_and_grads(&batch).unwrap();
            let want = fx.loss(b, "adapter");
            r.check(
                &format!("{arch} {b}: loss of loss_and_grads"),
                ((loss as f64 - want) / want).abs(),
                TOL,
            );
        }
    }
    r.finish();
}

#[test]
fn lora_gradients_match_peft_explicit_and_tape() {
    let mut r = Report::new("LoRA gradients vs PEFT + torch autograd; explicit backward vs tape");
    for arch in ARCHS {
        let fx = Fixture::load(arch);
        let model = fx.model(Some("adapter"));
        for b in BATCHES {
            let batch = fx.batch(b);
            let (_, mut explicit) = model.loss_and_grads(&batch).unwrap();
            if sabotage("backward") {
                let k = explicit.keys().next().unwrap().clone();
                let g = (explicit.get(&k).unwrap() * (1.0 + 1e-4)).unwrap();
                explicit.insert(k, g);
            }
            let (_, tape) = model.loss_and_grads_tape(&batch).unwrap();
            grads_vs(
                &mut r,
                "explicit backward vs PEFT",
                &fx,
                &model,
                b,
                &explicit,
                TOL,
            );
            grads_vs(&mut r, "tape vs PEFT", &fx, &model, b, &tape, TOL);
            let mut worst = 0.0f64;
            for (k, g) in explicit.iter() {
                match tape.get(k) {
                    Some(t) => worst = worst.max(rel(g, t)),
                    None => r.fail(format!("{arch} {b}: the tape has no gradient for {k}")),
                }
            }
            r.check(
                &format!("{arch} {b}: explicit backward vs tape"),
                worst,
                TOL_STEP,
            );
        }
    }
    r.finish();
}

/// Two AdamW steps (batch `plain`, then `masked`) from the `adapter/` parameters, constant lr,
/// without and with global gradient-norm clipping, against torch.optim.AdamW.
#[test]
fn adamw_steps_match_torch() {
    let mut r = Report::new("AdamW steps vs torch.optim.AdamW");
    for arch in ARCHS {
        let fx = Fixture::load(arch);
        for run in ["adamw", "adamw_clip"] {
            let s = &fx.info[run];
            let cfg = AdamWConfig {
                beta1: s["betas"][0].as_f64().unwrap(),
                beta2: s["betas"][1].as_f64().unwrap(),
                eps: s["eps"].as_f64().unwrap(),
                weight_decay: if sabotage("adamw") {
                    0.0
                } else {
                    s["weight_decay"].as_f64().unwrap()
                },
            };
            let lr = s["lr"].as_f64().unwrap();
            let clip = s
                .get("max_grad_norm")
                .and_then(|v| v.as_f64())
                .filter(|_| !sabotage("clip"));
            let model = fx.model(Some("adapter"));
            let mut opt = AdamW::new(cfg).unwrap();
            for (k, name) in s["batches"].as_array().unwrap().iter().enumerate() {
                let name = name.as_str().unwrap();
                let (loss, mut grads) = model.loss_and_grads(&fx.batch(name)).unwrap();
                let want_loss = s["losses"][k].as_f64().unwrap();
                r.check(
                    &format!("{arch} {run} step {}: loss", k + 1),
                    ((loss as f64 - want_loss) / want_loss).abs(),
                    TOL,
                );
                if let Some(c) = clip {
                    let norm = clip_grad_norm(&mut grads, c).unwrap();
                    let want = s["grad_norms_before_clip"][k].as_f64().unwrap();
                    r.check(
                        &format!("{arch} {run} step {}: grad norm before clipping", k + 1),
                        ((norm - want) / want).abs(),
                        TOL,
                    );
                }
                opt.step(&model.lora_vars(), &grads, lr).unwrap();
                let mut worst = (0.0f64, String::new());
                for (key, p) in model.lora_params() {
                    let e = rel(&p, &fx.expected(&format!("{run}.step{}.{key}", k + 1)));
                    if e >= worst.0 {
                        worst = (e, key);
                    }
                }
                r.check(
                    &format!(
                        "{arch} {run} step {}: parameters (worst: {})",
                        k + 1,
                        worst.1
                    ),
                    worst.0,
                    TOL_STEP,
                );
            }
        }
    }
    r.finish();
}

/// The adapter trained in PEFT (from PEFT's default init) loads here and gives PEFT's eval loss.
#[test]
fn peft_trained_adapter_gives_the_same_eval_loss() {
    let mut r = Report::new("PEFT-trained adapter: eval loss");
    for arch in ARCHS {
        let fx = Fixture::load(arch);
        let t = &fx.info["adapter_trained"];
        let batch = fx.batch(t["eval_batch"].as_str().unwrap());
        for (which, key) in [
            (None, "eval_loss_base"),
            (Some("adapter_trained"), "eval_loss_adapter"),
        ] {
            let want = t[key].as_f64().unwrap();
            let got = fx.model(which).loss(&batch).unwrap() as f64;
            r.check(&format!("{arch} {key}"), ((got - want) / want).abs(), TOL);
        }
    }
    r.finish();
}

/// Our `save_adapter` then `load_adapter` gives the same parameters and logits (the PEFT
/// side of the round trip, PEFT loading our adapter, is `scripts/make_fixtures.py --check`).
#[test]
fn save_adapter_round_trip() {
    let mut r = Report::new("save_adapter -> load_adapter");
    let tmp = tempdir("parity-roundtrip");
    for arch in ARCHS {
        let fx = Fixture::load(arch);
        let model = fx.model(Some("adapter"));
        let dir = tmp.join(arch);
        model.save_adapter(&dir, "model").unwrap();
        let mut back = fx.model(None);
        back.load_adapter(&dir).unwrap();
        let want: std::collections::BTreeMap<_, _> = model.lora_params().into_iter().collect();
        let got: std::collections::BTreeMap<_, _> = back.lora_params().into_iter().collect();
        r.check_eq(
            &format!("{arch}: {} keys", want.len()),
            got.keys().collect::<Vec<_>>(),
            want.keys().collect::<Vec<_>>(),
        );
        let worst = want
            .iter()
            .filter_map(|(k, v)| got.get(k).map(|g| rel(g, v)))
            .fold(0.0, f64::max);
        r.check(&format!("{arch}: parameters"), worst, 0.0);
        let batch = fx.batch("plain");
        let e = rel(
            &back.forward(&batch).unwrap(),
            &fx.expected("logits.plain.adapter"),
        );
        r.check(
            &format!("{arch}: logits after the round trip vs transformers"),
            e,
            TOL,
        );
    }
    let _ = std::fs::remove_dir_all(&tmp);
    r.finish();
}

/// `Model::save(.., merge_lora = true)` then `Model::load`: the merged checkpoint gives PEFT's
/// adapter logits (transformers loading it is `make_fixtures.py --check`).
#[test]
fn merged_checkpoint_gives_the_adapter_logits() {
    let mut r = Report::new("merged checkpoint vs PEFT");
    let tmp = tempdir("parity-merge");
    for arch in ARCHS {
        let fx = Fixture::load(arch);
        let dir = tmp.join(arch);
        fx.model(Some("adapter")).save(&dir, true).unwrap();
        let merged = Model::load(&dir, DType::F32, &Device::Cpu).unwrap();
        for b in BATCHES {
            let e = rel(
                &merged.forward(&fx.batch(b)).unwrap(),
                &fx.expected(&format!("logits.{b}.adapter")),
            );
            r.check(&format!("{arch} {b}: merged logits"), e, TOL);
        }
    }
    let _ = std::fs::remove_dir_all(&tmp);
    r.finish();
}

fn tempdir(tag: &str) -> std::path::PathBuf {
    let p = std::env::temp_dir().join(format!(
        "{tag}-{}-{:?}",
        std::process::id(),
        std::thread::current().id()
    ));
    let _ = std::fs::remove_dir_all(&p);
    std::fs::create_dir_all(&p).unwrap();
    p
}

/// Greedy generations (`generate(do_sample=False)`), with the adapter and without, are the
/// same tokens as transformers'; the stream callback sees them in order.
#[test]
fn greedy_generation_matches_transformers() {
    let mut r = Report::new("greedy generation vs transformers generate()");
    for arch in ARCHS {
        let fx = Fixture::load(arch);
        let g = &fx.info["generate"];
        let mut max_new = g["max_new_tokens"].as_u64().unwrap() as usize;
        if sabotage("generate") {
            max_new -= 1;
        }
        let cfg = GenerateConfig {
            max_new_tokens: max_new,
            temperature: 0.0,
            stop_tokens: Some(vec![g["eos_token_id"].as_u64().unwrap() as u32]),
            ..GenerateConfig::default()
        };
        for (which, adapter) in [
            ("generate_base", None),
            ("generate_adapter", Some("adapter")),
        ] {
            let model = fx.model(adapter);
            for (i, case) in fx.info[which].as_array().unwrap().iter().enumerate() {
                let ids = |v: &serde_json::Value| -> Vec<u32> {
                    v.as_array()
                        .unwrap()
                        .iter()
                        .map(|x| x.as_u64().unwrap() as u32)
                        .collect()
                };
                let (prompt, want) = (ids(&case["prompt"]), ids(&case["new_tokens"]));
                let mut streamed = vec![];
                let got = generate(&model, &prompt, &cfg, |t| streamed.push(t)).unwrap();
                r.check_eq(
                    &format!(
                        "{arch} {which} prompt {i} (min top-2 margin {:.1e})",
                        case["min_margin"].as_f64().unwrap()
                    ),
                    &got,
                    &want,
                );
                r.check_eq(
                    &format!("{arch} {which} prompt {i}: streamed tokens"),
                    &streamed,
                    &got,
                );
            }
        }
    }
    r.finish();
}

/// The tokenizer (tokenizers crate) and the chat template (minijinja) against transformers'
/// AutoTokenizer: encodings, decodings, rendered conversations and their ids.
#[test]
fn tokenizer_and_chat_template_match_transformers() {
    let mut r = Report::new("tokenizer and chat template vs transformers");
    let want =
        parity_common::read_json(&parity_common::fixtures_dir().join("tokenizer_expected.json"));
    let tok = Tokenizer::load(&parity_common::fixtures_dir().join("llama/model")).unwrap();
    let ids = |v: &serde_json::Value| -> Vec<u32> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect()
    };
    for case in want["encode"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        let got = tok.encode(text, true).unwrap();
        r.check_eq(&format!("encode {text:?}"), &got, &ids(&case["ids"]));
        r.check_eq(
            &format!("decode {text:?}"),
            tok.decode(&got, false).unwrap().as_str(),
            case["decoded"].as_str().unwrap(),
        );
    }
    for (i, case) in want["chat"].as_array().unwrap().iter().enumerate() {
        let msgs: Vec<Message> = serde_json::from_value(case["messages"].clone()).unwrap();
        let text = tok
            .render_chat(&msgs, case["add_generation_prompt"].as_bool().unwrap())
            .unwrap();
        r.check_eq(
            &format!("chat {i}: rendered text"),
            text.as_str(),
            case["text"].as_str().unwrap(),
        );
        r.check_eq(
            &format!("chat {i}: ids"),
            &tok.encode(&text, false).unwrap(),
            &ids(&case["ids"]),
        );
    }
    r.finish();
}
