//! Config parsing of each architecture and of bad configs; AdamW against a hand-computed step;
//! schedules and gradient clipping.

mod common;

use candle_core::{DType, Device, Tensor, Var};
use candle_fused_train::{
    clip_grad_norm, AdamW, AdamWConfig, Arch, LoraGrads, ModelConfig, RopeScaling, Schedule,
};
use common::*;
use serde_json::json;

#[test]
fn parses_each_architecture() {
    let c = tiny(
        "llama",
        json!({"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}),
    );
    assert_eq!(c.arch, Arch::Llama);
    assert_eq!((c.num_heads, c.num_kv_heads, c.head_dim), (4, 2, 8));
    assert!(!c.qkv_bias && !c.tie_word_embeddings);
    assert!(matches!(
        c.rope_scaling,
        Some(RopeScaling::Llama3 {
            original_max_positions: 8192,
            ..
        })
    ));
    let q = tiny(
        "qwen2",
        json!({"tie_word_embeddings": true, "eos_token_id": [3, 4]}),
    );
    assert_eq!(q.arch, Arch::Qwen2);
    assert!(q.qkv_bias && !q.o_bias && q.tie_word_embeddings);
    assert_eq!(q.eos_token_ids, vec![3, 4]);
    let m = tiny("mistral", json!({"sliding_window": 4096, "head_dim": 16}));
    assert_eq!(
        (m.arch, m.sliding_window, m.head_dim),
        (Arch::Mistral, Some(4096), 16)
    );
    let l = tiny("llama", json!({"attention_bias": true}));
    assert!(l.qkv_bias && l.o_bias);
    // transformers 5's rope_parameters.
    let mut v = tiny_json("llama", json!({}));
    v.as_object_mut().unwrap().remove("rope_theta");
    v["rope_parameters"] = json!({"rope_type": "linear", "factor": 2.0, "rope_theta": 500000.0});
    let c = ModelConfig::from_value(&v).unwrap();
    assert_eq!(c.rope_theta, 500000.0);
    assert_eq!(c.rope_scaling, Some(RopeScaling::Linear { factor: 2.0 }));
    // A config made in code round-trips through its JSON.
    let mut c2 = c.clone();
    c2.raw = serde_json::Value::Null;
    let back = ModelConfig::from_value(&c2.to_json()).unwrap();
    assert_eq!(
        (back.rope_theta, back.rope_scaling, back.num_kv_heads),
        (c.rope_theta, c.rope_scaling, c.num_kv_heads)
    );
}

#[test]
fn bad_configs_are_clear_errors() {
    let bad = |extra: serde_json::Value, arch: &str| {
        ModelConfig::from_value(&tiny_json(arch, extra))
            .unwrap_err()
            .to_string()
    };
    let e = bad(json!({"architectures": ["GPT2LMHeadModel"]}), "llama");
    assert!(
        e.contains("unsupported architecture \"GPT2LMHeadModel\""),
        "{e}"
    );
    let e = bad(json!({"hidden_act": "relu"}), "llama");
    assert!(e.contains("unsupported hidden_act \"relu\""), "{e}");
    let e = bad(json!({"mlp_bias": true}), "llama");
    assert!(e.contains("mlp_bias"), "{e}");
    let e = bad(json!({"num_key_value_heads": 3}), "llama");
    assert!(e.contains("not a multiple of num_key_value_heads 3"), "{e}");
    let e = bad(
        json!({"rope_scaling": {"rope_type": "longrope", "factor": 2.0}}),
        "llama",
    );
    assert!(
        e.contains("unsupported rope_scaling type \"longrope\""),
        "{e}"
    );
    let e = bad(
        json!({"rope_scaling": {"rope_type": "llama3", "factor": 2.0}}),
        "llama",
    );
    assert!(e.contains("low_freq_factor"), "{e}");
    let e = bad(json!({"use_sliding_window": true}), "qwen2");
    assert!(e.contains("use_sliding_window"), "{e}");
    let e = bad(json!({"quantization_config": {"bits": 4}}), "llama");
    assert!(e.contains("quantization_config"), "{e}");
    let e = bad(json!({"attention_dropout": 0.1}), "llama");
    assert!(e.contains("attention_dropout"), "{e}");
    let e = bad(json!({"hidden_size": "wide"}), "llama");
    assert!(
        e.contains("\"hidden_size\" must be a non-negative integer"),
        "{e}"
    );
    let mut v = tiny_json("llama", json!({}));
    v.as_object_mut().unwrap().remove("vocab_size");
    let e = ModelConfig::from_value(&v).unwrap_err().to_string();
    assert!(e.contains("missing \"vocab_size\""), "{e}");
    let e = ModelConfig::from_json("{not json").unwrap_err().to_string();
    assert!(e.contains("invalid JSON"), "{e}");
}

#[test]
fn adamw_matches_a_hand_computed_step() {
    let dev = Device::Cpu;
    let p0 = [0.5f32, -1.25, 2.0];
    let gs = [[0.1f32, -0.2, 0.3], [-0.05, 0.4, 0.0]];
    let (lr, wd, b1, b2, eps) = (0.01f64, 0.1f64, 0.9f64, 0.999f64, 1e-8f64);
    let var = Var::from_tensor(&Tensor::new(&p0, &dev).unwrap()).unwrap();
    let params = vec![("p".to_string(), var.clone())];
    let mut opt = AdamW::new(AdamWConfig {
        beta1: b1,
        beta2: b2,
        eps,
        weight_decay: wd,
    })
    .unwrap();
    // By hand, in f64.
    let mut p: Vec<f64> = p0.iter().map(|&x| x as f64).collect();
    let (mut m, mut v) = (vec![0f64; 3], vec![0f64; 3]);
    for (step, g) in gs.iter().enumerate() {
        let t = step as i32 + 1;
        for i in 0..3 {
            let gi = g[i] as f64;
            p[i] *= 1.0 - lr * wd;
            m[i] = b1 * m[i] + (1.0 - b1) * gi;
            v[i] = b2 * v[i] + (1.0 - b2) * gi * gi;
            let mh = m[i] / (1.0 - b1.powi(t));
            let vh = v[i] / (1.0 - b2.powi(t));
            p[i] -= lr * mh / (vh.sqrt() + eps);
        }
        let mut grads = LoraGrads::default();
        grads.insert("p".into(), Tensor::new(g, &dev).unwrap());
        opt.step(&params, &grads, lr).unwrap();
        let got: Vec<f32> = var.as_tensor().to_vec1().unwrap();
        for i in 0..3 {
            let e = (got[i] as f64 - p[i]).abs() / p[i].abs();
            assert!(e < 1e-6, "step {t} elem {i}: {} vs {}", got[i], p[i]);
        }
    }
    assert_eq!(opt.step, 2);
    // State round trip.
    let st = opt.state_tensors();
    let mut o2 = AdamW::new(opt.config).unwrap();
    o2.load_state(st, 2).unwrap();
    assert_eq!(o2.state_tensors().len(), 2);
}

#[test]
fn schedules_and_clipping() {
    let s = Schedule::Cosine;
    assert_eq!(s.lr(1.0, 0, 10, 110), 0.0);
    assert!((s.lr(1.0, 5, 10, 110) - 0.5).abs() < 1e-12);
    assert!((s.lr(1.0, 10, 10, 110) - 1.0).abs() < 1e-12);
    assert!((s.lr(1.0, 60, 10, 110) - 0.5).abs() < 1e-12);
    assert!(s.lr(1.0, 110, 10, 110).abs() < 1e-12);
    assert!((Schedule::Linear.lr(2.0, 60, 10, 110) - 1.0).abs() < 1e-12);
    assert_eq!(Schedule::Constant.lr(2.0, 100, 10, 110), 2.0);
    assert!(Schedule::parse("exp").is_err());
    let dev = Device::Cpu;
    let mut g = LoraGrads::default();
    g.insert("a".into(), Tensor::new(&[3f32, 0.0], &dev).unwrap());
    g.insert("b".into(), Tensor::new(&[4f32], &dev).unwrap());
    let n = clip_grad_norm(&mut g, 1.0).unwrap();
    assert!((n - 5.0).abs() < 1e-6);
    assert!((g.global_norm().unwrap() - 1.0).abs() < 1e-5);
    let n2 = clip_grad_norm(&mut g, 10.0).unwrap();
    assert!((n2 - 1.0).abs() < 1e-5 && (g.global_norm().unwrap() - 1.0).abs() < 1e-5);
    let _ = DType::F32;
}
