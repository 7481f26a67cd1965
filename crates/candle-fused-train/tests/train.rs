//! The trainer: a resumed run continues with exactly the loss curve of an uninterrupted one;
//! a stop request saves a checkpoint; a NaN loss stops with a clear error naming the last good
//! checkpoint; outputs (adapter, metrics, plot) are written. Generation: greedy equals the
//! argmax of the full forward, the KV cache equals the full forward.

mod common;

use candle_core::{DType, Device, Tensor};
use candle_fused_train::{
    generate, Callback, GenerateConfig, KvCache, LoraSpec, Model, Row, SplitMix64, StepInfo,
    TrainConfig, TrainData, Trainer,
};
use common::*;

fn rows(n: usize, vocab: usize, seed: u64) -> Vec<Row> {
    let mut rng = SplitMix64::new(seed);
    (0..n)
        .map(|_| {
            let len = 4 + rng.below(6);
            let tokens: Vec<u32> = (0..len).map(|_| rng.below(vocab) as u32).collect();
            let mut targets: Vec<i64> = tokens[1..].iter().map(|&t| t as i64).collect();
            targets.push(-100);
            Row {
                tokens,
                targets,
                positions: (0..len as u32).collect(),
                segments: vec![0; len],
            }
        })
        .collect()
}

fn setup(seed: u64, dropout: f32) -> (Model, TrainData) {
    let (_, cfg) = variants().remove(0);
    let mut m = Model::random(cfg.clone(), DType::F32, &Device::Cpu, seed).unwrap();
    m.add_lora(
        &LoraSpec {
            dropout,
            ..LoraSpec::new(4, 8.0)
        },
        seed,
    )
    .unwrap();
    let data = TrainData {
        train: rows(13, cfg.vocab_size, seed),
        eval: rows(3, cfg.vocab_size, seed + 9),
    };
    (m, data)
}

fn tcfg(seed: u64) -> TrainConfig {
    TrainConfig {
        lr: 1e-2,
        warmup_steps: 2,
        steps: 8,
        batch_size: 3,
        grad_accum: 2,
        eval_every: 3,
        save_every: 0,
        seed,
        ..Default::default()
    }
}

struct StopAt(usize, usize);
impl Callback for StopAt {
    fn on_step(&mut self, s: &StepInfo) {
        self.1 = s.step;
    }
    fn stop_requested(&mut self) -> bool {
        self.1 == self.0
    }
}

fn losses(t: &Trainer) -> Vec<(u64, f64, String)> {
    t.metrics()
        .iter()
        .filter_map(|m| {
            let k = if m.get("loss").is_some() {
                "loss"
            } else {
                "eval_loss"
            };
            Some((m["step"].as_u64()?, m[k].as_f64()?, k.to_string()))
        })
        .collect()
}

#[test]
fn resume_gives_the_same_loss_curve() {
    let seed = seed();
    let dir = tempfile::tempdir().unwrap();
    // Uninterrupted (with LoRA dropout, so the dropout stream is part of the state).
    let (m, data) = setup(seed, 0.1);
    let mut a = Trainer::new(m, data.clone(), tcfg(seed), &dir.path().join("a")).unwrap();
    let sa = a.run(&mut ()).unwrap();
    assert_eq!(sa.steps, 8);
    assert!(!sa.stopped_early);
    // Stopped after step 5 (a stop request saves a checkpoint), then resumed from disk.
    let (m, _) = setup(seed, 0.1);
    let out_b = dir.path().join("b");
    let mut b = Trainer::new(m, data.clone(), tcfg(seed), &out_b).unwrap();
    let sb = b.run(&mut StopAt(5, 0)).unwrap();
    assert!(sb.stopped_early && sb.steps == 5);
    let ck = sb.last_checkpoint.clone().expect("a checkpoint on stop");
    assert!(ck.ends_with("step-5") && ck.join("optimizer.safetensors").exists());
    drop(b);
    let (fresh, _) = setup(seed + 100, 0.0); // other weights: everything must come from disk
    let (m, _) = setup(seed, 0.0);
    drop(fresh);
    let mut c = Trainer::resume(m, data.clone(), tcfg(seed), &out_b).unwrap();
    assert_eq!(c.step(), 5);
    let sc = c.run(&mut ()).unwrap();
    assert_eq!(sc.steps, 8);
    assert_eq!(
        losses(&a),
        losses(&c),
        "resumed curve differs (seed {seed})"
    );
    // Same final adapter, bit for bit.
    for ((ka, ta), (kc, tc)) in a
        .model
        .lora_params()
        .iter()
        .zip(c.model.lora_params().iter())
    {
        assert_eq!(ka, kc);
        assert_eq!(rel_err(tc, ta), 0.0, "{ka}");
    }
    for f in [
        "adapter_config.json",
        "adapter_model.safetensors",
        "metrics.jsonl",
        "loss.svg",
    ] {
        assert!(out_b.join(f).exists(), "{f}");
    }
    let svg = std::fs::read_to_string(out_b.join("loss.svg")).unwrap();
    assert!(svg.starts_with("<svg") && svg.contains("held-out loss"));
    // A resume with other settings is refused.
    let (m, _) = setup(seed, 0.0);
    let e = Trainer::resume(
        m,
        data,
        TrainConfig {
            batch_size: 2,
            ..tcfg(seed)
        },
        &out_b,
    )
    .err()
    .unwrap()
    .to_string();
    assert!(e.contains("batch_size = 3, this run has 2"), "{e}");
}

#[test]
fn nan_loss_stops_and_keeps_the_last_good_checkpoint() {
    let seed = seed();
    let dir = tempfile::tempdir().unwrap();
    let (m, data) = setup(seed, 0.0);
    let mut t = Trainer::new(
        m,
        data,
        TrainConfig {
            save_every: 2,
            ..tcfg(seed)
        },
        dir.path(),
    )
    .unwrap();
    let s = t.run(&mut StopAt(3, 0)).unwrap();
    assert_eq!(s.steps, 3);
    // Poison one adapter: the next step's loss is NaN.
    let (_, var) = t.model.lora_vars().remove(1);
    var.set(&(var.as_tensor() * f64::NAN).unwrap()).unwrap();
    let before = t.model.lora_params();
    let e = t.run(&mut ()).unwrap_err().to_string();
    assert!(
        e.contains("the loss became NaN at step 4") && e.contains("step-3"),
        "{e}"
    );
    // The update was not applied, and the checkpoint is intact and loadable.
    for ((_, a), (_, b)) in before.iter().zip(t.model.lora_params().iter()) {
        let same = a
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .zip(b.flatten_all().unwrap().to_vec1::<f32>().unwrap())
            .all(|(x, y)| x.to_bits() == y.to_bits());
        assert!(same);
    }
    let mut m2 = Model::random(variants().remove(0).1, DType::F32, &Device::Cpu, seed).unwrap();
    m2.load_adapter(&dir.path().join("checkpoints").join("step-3"))
        .unwrap();
}

#[test]
fn greedy_generation_equals_argmax_of_the_full_forward() {
    let seed = seed();
    let dev = Device::Cpu;
    for (name, cfg) in variants() {
        let mut m = Model::random(cfg.clone(), DType::F32, &dev, seed).unwrap();
        m.add_lora(&LoraSpec::new(4, 8.0), seed).unwrap();
        randomize_lora(&m, seed).unwrap();
        let mut rng = SplitMix64::new(seed);
        let prompt: Vec<u32> = (0..5).map(|_| rng.below(cfg.vocab_size) as u32).collect();
        let gcfg = GenerateConfig {
            max_new_tokens: 8,
            stop_tokens: Some(vec![]),
            ..Default::default()
        };
        let mut streamed = Vec::new();
        let out = generate(&m, &prompt, &gcfg, |t| streamed.push(t)).unwrap();
        assert_eq!(out, streamed);
        assert_eq!(out.len(), 8);
        let all: Vec<u32> = prompt.iter().chain(&out[..7]).copied().collect();
        let n = all.len();
        let b = candle_fused_train::Batch::new(
            Tensor::from_vec(all.clone(), (1, n), &dev).unwrap(),
            Tensor::full(-100i64, (1, n), &dev).unwrap(),
        );
        let logits = m.forward(&b).unwrap().squeeze(0).unwrap();
        let am: Vec<u32> = logits.argmax(1).unwrap().to_vec1().unwrap();
        assert_eq!(&am[4..], &out[..], "{name}: greedy tokens (seed {seed})");
        // The cached logits equal the full forward's.
        let mut cache = KvCache::new();
        m.forward_cached(&all[..3], &mut cache).unwrap();
        let last = m.forward_cached(&all[3..], &mut cache).unwrap();
        let e = rel_err(&last, &logits.get(n - 1).unwrap());
        assert!(e < 1e-5, "{name}: cached vs full {e:e}");
    }
    // Sampling: seeded and reproducible; top_k = 1 is greedy.
    let (_, cfg) = variants().remove(0);
    let m = Model::random(cfg, DType::F32, &dev, seed).unwrap();
    let s = |c: GenerateConfig| generate(&m, &[1, 2, 3], &c, |_| {}).unwrap();
    let hot = GenerateConfig {
        max_new_tokens: 6,
        temperature: 1.5,
        top_p: 0.9,
        seed: 7,
        stop_tokens: Some(vec![]),
        ..Default::default()
    };
    assert_eq!(s(hot.clone()), s(hot.clone()));
    let greedy = GenerateConfig {
        temperature: 0.0,
        ..hot.clone()
    };
    assert_eq!(s(GenerateConfig { top_k: 1, ..hot }), s(greedy));
}
