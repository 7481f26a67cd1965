//! Shared test helpers: tiny configurations of each architecture, seeded random batches,
//! adapters with non-zero B, gradient comparison, and a fresh seed per run (printed with any
//! failure; set CANDLE_FUSED_SEED to rerun one).
#![allow(dead_code)]

pub mod reference;

use candle_core::{DType, Device, Result, Tensor};
use candle_fused_train::{Batch, LoraGrads, Model, ModelConfig, SplitMix64};

/// A fresh seed (or `CANDLE_FUSED_SEED`), printed so a failure can be rerun.
pub fn seed() -> u64 {
    let s = std::env::var("CANDLE_FUSED_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1)
        });
    eprintln!("seed {s} (rerun with CANDLE_FUSED_SEED={s})");
    s
}

/// A tiny `config.json` of `arch` ("llama", "qwen2", "mistral"), with `extra` fields merged.
pub fn tiny_json(arch: &str, extra: serde_json::Value) -> serde_json::Value {
    let archs = match arch {
        "llama" => "LlamaForCausalLM",
        "qwen2" => "Qwen2ForCausalLM",
        "mistral" => "MistralForCausalLM",
        other => other,
    };
    let mut v = serde_json::json!({
        "architectures": [archs],
        "model_type": arch,
        "vocab_size": 61,
        "hidden_size": 32,
        "intermediate_size": 48,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 128,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": false,
        "hidden_act": "silu",
    });
    if let (Some(m), Some(e)) = (v.as_object_mut(), extra.as_object()) {
        for (k, x) in e {
            m.insert(k.clone(), x.clone());
        }
    }
    v
}

pub fn tiny(arch: &str, extra: serde_json::Value) -> ModelConfig {
    ModelConfig::from_value(&tiny_json(arch, extra)).expect("a valid tiny config")
}

/// The architectures and variants the gradient tests cover.
pub fn variants() -> Vec<(&'static str, ModelConfig)> {
    vec![
        (
            "llama gqa untied llama3-rope",
            tiny(
                "llama",
                serde_json::json!({"rope_scaling": {"rope_type": "llama3", "factor": 8.0,
                    "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 16}}),
            ),
        ),
        (
            "llama mha tied attention_bias",
            tiny(
                "llama",
                serde_json::json!({"num_key_value_heads": 4, "tie_word_embeddings": true,
                    "attention_bias": true}),
            ),
        ),
        (
            "qwen2 gqa tied qkv-bias",
            tiny("qwen2", serde_json::json!({"tie_word_embeddings": true})),
        ),
        (
            "mistral gqa untied",
            tiny("mistral", serde_json::json!({"sliding_window": 4096})),
        ),
    ]
}

/// Random tokens `[b, t]` and shifted targets with some ignored (-100).
pub fn batch(cfg: &ModelConfig, b: usize, t: usize, seed: u64, dev: &Device) -> Batch {
    let mut rng = SplitMix64::new(seed);
    let v = cfg.vocab_size;
    let toks: Vec<u32> = (0..b * t).map(|_| rng.below(v) as u32).collect();
    let mut tg: Vec<i64> = Vec::with_capacity(b * t);
    for i in 0..b * t {
        let next = if (i + 1) % t == 0 {
            -100
        } else {
            toks[i + 1] as i64
        };
        tg.push(if rng.below(5) == 0 { -100 } else { next });
    }
    Batch::new(
        Tensor::from_vec(toks, (b, t), dev).unwrap(),
        Tensor::from_vec(tg, (b, t), dev).unwrap(),
    )
}

/// Sets every LoRA B (and A) to random values, so every gradient is non-zero.
pub fn randomize_lora(model: &Model, seed: u64) -> Result<()> {
    let mut rng = SplitMix64::new(seed ^ 0x5eed);
    for (_, var) in model.lora_vars() {
        let n = var.elem_count();
        let v: Vec<f32> = (0..n).map(|_| (rng.normal() * 0.1) as f32).collect();
        var.set(&Tensor::from_vec(v, var.shape(), var.device())?)?;
    }
    Ok(())
}

/// Max |a - b| / max |b| over a tensor (f64).
pub fn rel_err(a: &Tensor, b: &Tensor) -> f64 {
    let a = a.to_dtype(DType::F64).unwrap().flatten_all().unwrap();
    let b = b.to_dtype(DType::F64).unwrap().flatten_all().unwrap();
    let d: f64 = (&a - &b)
        .unwrap()
        .abs()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar()
        .unwrap();
    let m: f64 = b.abs().unwrap().max(0).unwrap().to_scalar().unwrap();
    d / m.max(1e-30)
}

/// Asserts `got` and `want` hold the same keys with every tensor within `tol` relative.
pub fn assert_grads_close(got: &LoraGrads, want: &LoraGrads, tol: f64, what: &str) {
    let gk: Vec<&String> = got.keys().collect();
    let wk: Vec<&String> = want.keys().collect();
    assert_eq!(gk, wk, "{what}: gradient keys differ");
    assert!(!got.is_empty(), "{what}: no gradients");
    for (k, w) in want.iter() {
        let g = got.get(k).unwrap();
        assert_eq!(g.dims(), w.dims(), "{what}: {k} shape");
        let wmax: f64 = w
            .to_dtype(DType::F64)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar()
            .unwrap();
        assert!(wmax > 0.0, "{what}: {k} reference gradient is all zeros");
        let e = rel_err(g, w);
        assert!(e < tol, "{what}: {k} relative error {e:.3e} >= {tol:.0e}");
    }
}
