//! LoRA adapters in Hugging Face PEFT format: round trip through `save_adapters` /
//! `PeftAdapters`, the exact file layout PEFT reads, configs as PEFT writes them, and errors.
//! (Interop with the real PEFT runs in `scripts/peft_interop.py`.)

use std::path::PathBuf;

use candle_core::{DType, Module, Tensor};
use candle_fused::nn::{
    lora_linear, peft_key, save_adapters, LoraConfig, LoraLinear, PeftAdapters,
};
use candle_fused_testkit::testing::{self, rel_err};
use candle_nn::{VarBuilder, VarMap};
use serde_json::Value;

use candle_fused_testkit::asserts::CPU;

/// A fresh, unique temporary directory.
fn tmp_dir(tag: &str) -> PathBuf {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let d = std::env::temp_dir().join(format!("candle-fused-{tag}-{}-{nanos}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Three layers 24→40→32→16 (ranks 4, 4, 6) with random nonzero adapters.
fn model(vm: &VarMap) -> Vec<(String, LoraLinear)> {
    let vb = VarBuilder::from_varmap(vm, DType::F32, &CPU);
    let cfg = LoraConfig::new(4, 8.0);
    let dims = [(24, 40, 4), (40, 32, 4), (32, 16, 6)];
    dims.iter()
        .enumerate()
        .map(|(i, &(i_d, o_d, r))| {
            let path = format!("blocks.{i}.proj");
            let c = LoraConfig {
                rank: r,
                ..cfg.clone()
            };
            let mut l = lora_linear(i_d, o_d, &c, vb.pp(&path)).unwrap();
            let a = l.lora_a().clone();
            let b = testing::randn(&[o_d, r], 0.3, DType::F32, &CPU).unwrap();
            // Layer 1 gets its own scale (an alpha_pattern entry).
            let s = if i == 1 { 0.75 } else { l.scale() };
            l.set_adapter(&a, &b, s).unwrap();
            (path, l)
        })
        .collect()
}

fn run(layers: &[(String, LoraLinear)], x: &Tensor) -> Tensor {
    let mut h = x.clone();
    for (i, (_, l)) in layers.iter().enumerate() {
        h = l.forward(&h).unwrap();
        if i + 1 < layers.len() {
            h = h.relu().unwrap();
        }
    }
    h
}

#[test]
fn round_trip_reproduces_the_model() {
    let vm = VarMap::new();
    let layers = model(&vm);
    let dir = tmp_dir("roundtrip");
    let cfg = LoraConfig::new(4, 8.0).with_dropout(0.05);
    assert!(cfg
        .to_peft_json()
        .to_string()
        .contains("\"lora_dropout\":0.05,"));
    let refs: Vec<(&str, &LoraLinear)> = layers.iter().map(|(p, l)| (p.as_str(), l)).collect();
    save_adapters(&dir, &cfg, &refs).unwrap();

    let loaded = PeftAdapters::load(&dir, &CPU).unwrap();
    assert_eq!(
        loaded.module_paths(),
        ["blocks.0.proj", "blocks.1.proj", "blocks.2.proj"]
    );
    assert_eq!(loaded.config.rank, 4);
    assert_eq!(loaded.config.alpha, 8.0);
    assert!((loaded.config.dropout - 0.05).abs() < 1e-7);
    // Fresh layers on the same base weights (fresh adapters), then the loaded adapters.
    let mut fresh: Vec<(String, LoraLinear)> = layers
        .iter()
        .map(|(p, l)| {
            let a = Tensor::zeros(l.lora_a().dims(), DType::F32, &CPU).unwrap();
            let b = Tensor::zeros(l.lora_b().dims(), DType::F32, &CPU).unwrap();
            (
                p.clone(),
                LoraLinear::new(l.weight(), l.bias(), a, b, 1.0, 0.0).unwrap(),
            )
        })
        .collect();
    for (p, l) in fresh.iter_mut() {
        loaded.apply(p, l).unwrap();
    }
    for ((_, a), (_, b)) in layers.iter().zip(&fresh) {
        assert_eq!(a.scale(), b.scale());
        assert_eq!(rel_err(a.lora_a(), b.lora_a()).unwrap(), 0.0);
        assert_eq!(rel_err(a.lora_b(), b.lora_b()).unwrap(), 0.0);
    }
    let x = testing::randn(&[5, 24], 1.0, DType::F32, &CPU).unwrap();
    assert_eq!(rel_err(&run(&fresh, &x), &run(&layers, &x)).unwrap(), 0.0);
    // Loading into another dtype converts.
    let (p, l) = &layers[0];
    let w16 = l.weight().to_dtype(DType::BF16).unwrap();
    let z = |d: &[usize]| Tensor::zeros(d, DType::BF16, &CPU).unwrap();
    let mut l16 = LoraLinear::new(
        &w16,
        None,
        z(l.lora_a().dims()),
        z(l.lora_b().dims()),
        1.0,
        0.0,
    )
    .unwrap();
    loaded.apply(p, &mut l16).unwrap();
    assert_eq!(l16.lora_a().dtype(), DType::BF16);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn files_have_the_peft_layout() {
    let vm = VarMap::new();
    let layers = model(&vm);
    let dir = tmp_dir("layout");
    let mut cfg = LoraConfig::new(4, 8.0);
    cfg.task_type = Some("CAUSAL_LM".into());
    cfg.base_model_name_or_path = Some("toy/base".into());
    let refs: Vec<(&str, &LoraLinear)> = layers.iter().map(|(p, l)| (p.as_str(), l)).collect();
    save_adapters(&dir, &cfg, &refs).unwrap();

    let v: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(v["peft_type"], "LORA");
    assert_eq!(v["r"], 4);
    assert_eq!(v["lora_alpha"], 8);
    assert_eq!(v["bias"], "none");
    assert_eq!(v["fan_in_fan_out"], false);
    assert_eq!(v["use_dora"], false);
    assert_eq!(v["task_type"], "CAUSAL_LM");
    assert_eq!(v["base_model_name_or_path"], "toy/base");
    // Empty target_modules -> the saved paths; per-layer rank and scale in the patterns.
    assert_eq!(
        v["target_modules"],
        serde_json::json!(["blocks.0.proj", "blocks.1.proj", "blocks.2.proj"])
    );
    assert_eq!(v["rank_pattern"], serde_json::json!({"blocks.2.proj": 6}));
    assert_eq!(v["alpha_pattern"], serde_json::json!({"blocks.1.proj": 3}));

    let t = candle_core::safetensors::load(dir.join("adapter_model.safetensors"), &CPU).unwrap();
    let mut keys: Vec<&String> = t.keys().collect();
    keys.sort();
    assert_eq!(
        keys,
        [
            "base_model.model.blocks.0.proj.lora_A.weight",
            "base_model.model.blocks.0.proj.lora_B.weight",
            "base_model.model.blocks.1.proj.lora_A.weight",
            "base_model.model.blocks.1.proj.lora_B.weight",
            "base_model.model.blocks.2.proj.lora_A.weight",
            "base_model.model.blocks.2.proj.lora_B.weight",
        ]
    );
    assert_eq!(t[&peft_key("blocks.2.proj", "lora_A")].dims(), &[6, 32]);
    assert_eq!(t[&peft_key("blocks.2.proj", "lora_B")].dims(), &[16, 6]);
    assert_eq!(t[&peft_key("blocks.0.proj", "lora_A")].dtype(), DType::F32);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A config as PEFT 0.13+ writes it (extra fields are ignored), with patterns.
const PEFT_CONFIG: &str = r#"{
  "alpha_pattern": {"fc2": 32},
  "auto_mapping": null,
  "base_model_name_or_path": null,
  "bias": "none",
  "eva_config": null,
  "exclude_modules": null,
  "fan_in_fan_out": false,
  "inference_mode": true,
  "init_lora_weights": true,
  "layer_replication": null,
  "layers_pattern": null,
  "layers_to_transform": null,
  "loftq_config": {},
  "lora_alpha": 16,
  "lora_bias": false,
  "lora_dropout": 0.1,
  "megatron_config": null,
  "megatron_core": "megatron.core",
  "modules_to_save": null,
  "peft_type": "LORA",
  "r": 8,
  "rank_pattern": {"fc2": 4},
  "revision": null,
  "target_modules": ["fc1", "fc2", "fc3"],
  "task_type": null,
  "use_dora": false,
  "use_rslora": false
}"#;

#[test]
fn parses_configs_as_peft_writes_them() {
    let v: Value = serde_json::from_str(PEFT_CONFIG).unwrap();
    let c = LoraConfig::from_peft_json(&v).unwrap();
    assert_eq!((c.rank, c.alpha, c.use_rslora), (8, 16.0, false));
    assert!((c.dropout - 0.1).abs() < 1e-7);
    assert_eq!(c.target_modules, ["fc1", "fc2", "fc3"]);
    assert_eq!(c.scale(), 2.0);
    let f2 = c.for_module("model.fc2");
    assert_eq!((f2.rank, f2.alpha), (4, 32.0));
    assert_eq!(f2.scale(), 8.0);
    let f1 = c.for_module("fc1");
    assert_eq!((f1.rank, f1.alpha), (8, 16.0));
    // A key matches whole path components only.
    assert_eq!(c.for_module("xfc2").rank, 8);
    let mut rs = c.clone();
    rs.use_rslora = true;
    assert_eq!(rs.scale(), 16.0 / 8f64.sqrt());
    // Our own JSON parses back to the same config.
    assert_eq!(LoraConfig::from_peft_json(&c.to_peft_json()).unwrap(), c);
}

#[test]
fn unsupported_or_broken_adapters_are_clear_errors() {
    let bad = |patch: &str, want: &str| {
        let mut v: Value = serde_json::from_str(PEFT_CONFIG).unwrap();
        let p: Value = serde_json::from_str(patch).unwrap();
        for (k, x) in p.as_object().unwrap() {
            v[k] = x.clone();
        }
        let e = LoraConfig::from_peft_json(&v).unwrap_err().to_string();
        assert!(e.contains(want), "{e:?} lacks {want:?}");
        assert!(e.contains("candle-fused peft"), "{e:?}");
    };
    bad(r#"{"use_dora": true}"#, "use_dora");
    bad(r#"{"fan_in_fan_out": true}"#, "fan_in_fan_out");
    bad(r#"{"bias": "all"}"#, "bias = \"all\"");
    bad(r#"{"peft_type": "IA3"}"#, "peft_type");
    bad(r#"{"r": null}"#, "\"r\"");
    bad(r#"{"lora_alpha": "x"}"#, "lora_alpha");
    bad(r#"{"lora_bias": true}"#, "lora_bias");
    bad(r#"{"modules_to_save": ["classifier"]}"#, "modules_to_save");
    bad(
        r#"{"layer_replication": [[0, 4], [2, 5]]}"#,
        "layer_replication",
    );
    bad(
        r#"{"target_parameters": ["experts.w1"]}"#,
        "target_parameters",
    );
    bad(r#"{"use_qalora": true}"#, "use_qalora");

    // Missing directory / files.
    let dir = tmp_dir("broken");
    let e = PeftAdapters::load(&dir, &CPU).unwrap_err().to_string();
    assert!(e.contains("adapter_config.json"), "{e}");
    std::fs::write(dir.join("adapter_config.json"), PEFT_CONFIG).unwrap();
    std::fs::write(dir.join("adapter_model.bin"), b"pickle").unwrap();
    let e = PeftAdapters::load(&dir, &CPU).unwrap_err().to_string();
    assert!(e.contains("adapter_model.bin"), "{e}");

    // A layer of the wrong size.
    let vm = VarMap::new();
    let layers = model(&vm);
    let refs: Vec<(&str, &LoraLinear)> = layers.iter().map(|(p, l)| (p.as_str(), l)).collect();
    save_adapters(&dir, &LoraConfig::new(4, 8.0), &refs).unwrap();
    let loaded = PeftAdapters::load(&dir, &CPU).unwrap();
    let mut wrong = layers[1].1.clone();
    let e = loaded
        .apply("blocks.0.proj", &mut wrong)
        .unwrap_err()
        .to_string();
    assert!(e.contains("adapter is 40x24"), "{e}");
    let e = loaded.apply("nope", &mut wrong).unwrap_err().to_string();
    assert!(
        e.contains("no tensor \"base_model.model.nope.lora_A.weight\""),
        "{e}"
    );
    // Duplicate and empty paths on save.
    let l = &layers[0].1;
    assert!(save_adapters(&dir, &LoraConfig::new(4, 8.0), &[("a", l), ("a", l)]).is_err());
    assert!(save_adapters(&dir, &LoraConfig::new(4, 8.0), &[("", l)]).is_err());
    std::fs::remove_dir_all(&dir).unwrap();
}
