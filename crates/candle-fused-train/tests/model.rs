//! The model: the tape forward equals a composed f64 reference (1e-4), checkpoints round-trip
//! (single and sharded), packed sequences never attend across their boundaries and restart
//! their positions, adapters round-trip in PEFT format, merge equals the adapter, and bad
//! checkpoint files are clear errors.

mod common;

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use candle_fused_train::{Batch, LoraSpec, Model, Target};
use common::reference::{self, Adapters};
use common::*;

fn adapters(m: &Model) -> Adapters {
    let mut out = HashMap::new();
    let lora = m.lora().unwrap();
    for (l, row) in lora.adapters.iter().enumerate() {
        for t in Target::ALL {
            if let Some(a) = &row[t.index()] {
                out.insert(
                    t.module_path(l),
                    (a.a.as_tensor().clone(), a.b.as_tensor().clone(), a.scale),
                );
            }
        }
    }
    out
}

fn rows(t: &Tensor) -> Vec<Vec<u32>> {
    t.to_vec2().unwrap()
}

#[test]
fn forward_matches_composed_reference() {
    let seed = seed();
    let dev = Device::Cpu;
    for (name, cfg) in variants() {
        let mut m = Model::random(cfg.clone(), DType::F32, &dev, seed).unwrap();
        m.add_lora(&LoraSpec::new(4, 8.0), seed).unwrap();
        randomize_lora(&m, seed).unwrap();
        let dir = tempfile::tempdir().unwrap();
        m.save(dir.path(), false).unwrap();
        let w = candle_core::safetensors::load(dir.path().join("model.safetensors"), &dev).unwrap();
        let b = batch(&cfg, 2, 11, seed + 1, &dev);
        let got = m.forward(&b).unwrap();
        let toks = rows(&b.tokens);
        let pos: Vec<Vec<usize>> = vec![(0..11).collect(); 2];
        let want = reference::forward(&w, &cfg, &adapters(&m), &toks, &pos, None).unwrap();
        let e = rel_err(&got, &want);
        assert!(
            e < 1e-4,
            "{name}: logits relative error {e:e} (seed {seed})"
        );
        // And the reloaded checkpoint gives the same logits as the model it came from.
        let mut back = Model::load(dir.path(), DType::F32, &dev).unwrap();
        back.load_adapter({
            m.save_adapter(&dir.path().join("ad"), "tiny").unwrap();
            &dir.path().join("ad")
        })
        .unwrap();
        let again = back.forward(&b).unwrap();
        assert_eq!(
            rel_err(&again, &got),
            0.0,
            "{name}: reload changed the logits"
        );
    }
}

#[test]
fn packed_sequences_do_not_attend_across_boundaries() {
    let seed = seed();
    let dev = Device::Cpu;
    let (_, cfg) = variants().remove(0);
    let m = Model::random(cfg.clone(), DType::F32, &dev, seed).unwrap();
    let mut rng = candle_fused_train::SplitMix64::new(seed);
    let a: Vec<u32> = (0..5).map(|_| rng.below(cfg.vocab_size) as u32).collect();
    let c: Vec<u32> = (0..7).map(|_| rng.below(cfg.vocab_size) as u32).collect();
    let packed: Vec<u32> = a.iter().chain(&c).copied().collect();
    let seg: Vec<u32> = (0..12).map(|i| u32::from(i >= 5)).collect();
    let pos: Vec<u32> = (0..12).map(|i| if i >= 5 { i - 5 } else { i }).collect();
    let mk = |t: &[u32]| Tensor::from_vec(t.to_vec(), (1, t.len()), &dev).unwrap();
    let tg = |n: usize| Tensor::full(-100i64, (1, n), &dev).unwrap();
    let mut b = Batch::new(mk(&packed), tg(12));
    b.segments = Some(mk(&seg));
    b.positions = Some(mk(&pos));
    let lp = m.forward(&b).unwrap();
    let la = m.forward(&Batch::new(mk(&a), tg(5))).unwrap();
    let lc = m.forward(&Batch::new(mk(&c), tg(7))).unwrap();
    let e1 = rel_err(&lp.narrow(1, 0, 5).unwrap(), &la);
    let e2 = rel_err(&lp.narrow(1, 5, 7).unwrap(), &lc);
    assert!(
        e1 < 1e-5 && e2 < 1e-5,
        "packed vs alone: {e1:e}, {e2:e} (seed {seed})"
    );
    // Without the segment mask the second sequence would see the first: a real difference.
    let mut nb = Batch::new(mk(&packed), tg(12));
    nb.positions = Some(mk(&pos));
    let ln = m.forward(&nb).unwrap();
    assert!(rel_err(&ln.narrow(1, 5, 7).unwrap(), &lc) > 1e-3);
}

#[test]
fn sharded_checkpoint_loads() {
    let seed = seed();
    let dev = Device::Cpu;
    let (_, cfg) = variants().remove(2);
    let m = Model::random(cfg.clone(), DType::F32, &dev, seed).unwrap();
    let dir = tempfile::tempdir().unwrap();
    m.save(dir.path(), false).unwrap();
    let w = candle_core::safetensors::load(dir.path().join("model.safetensors"), &dev).unwrap();
    let sharded = tempfile::tempdir().unwrap();
    std::fs::copy(
        dir.path().join("config.json"),
        sharded.path().join("config.json"),
    )
    .unwrap();
    let mut names: Vec<&String> = w.keys().collect();
    names.sort();
    let (first, second) = names.split_at(names.len() / 2);
    let mut map = serde_json::Map::new();
    for (file, part) in [
        ("model-00001-of-00002.safetensors", first),
        ("model-00002-of-00002.safetensors", second),
    ] {
        let t: HashMap<String, Tensor> =
            part.iter().map(|n| ((*n).clone(), w[*n].clone())).collect();
        candle_core::safetensors::save(&t, sharded.path().join(file)).unwrap();
        for n in part {
            map.insert((*n).clone(), serde_json::json!(file));
        }
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": map});
    std::fs::write(
        sharded.path().join("model.safetensors.index.json"),
        index.to_string(),
    )
    .unwrap();
    let back = Model::load(sharded.path(), DType::F32, &dev).unwrap();
    let b = batch(&cfg, 1, 6, seed, &dev);
    assert_eq!(
        rel_err(&back.forward(&b).unwrap(), &m.forward(&b).unwrap()),
        0.0
    );
    // A missing shard is named.
    std::fs::remove_file(sharded.path().join("model-00002-of-00002.safetensors")).unwrap();
    let e = Model::load(sharded.path(), DType::F32, &dev)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("model-00002-of-00002.safetensors") && e.contains("missing"),
        "{e}"
    );
}

#[test]
fn bad_checkpoint_files_are_clear_errors() {
    let seed = seed();
    let dev = Device::Cpu;
    let (_, cfg) = variants().remove(0);
    let m = Model::random(cfg, DType::F32, &dev, seed).unwrap();
    let dir = tempfile::tempdir().unwrap();
    m.save(dir.path(), false).unwrap();
    let st = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&st).unwrap();
    // Truncated.
    std::fs::write(&st, &bytes[..bytes.len() / 2]).unwrap();
    let e = Model::load(dir.path(), DType::F32, &dev)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("model.safetensors") && e.contains("truncated"),
        "{e}"
    );
    // Garbage.
    std::fs::write(&st, b"not a safetensors file").unwrap();
    let e = Model::load(dir.path(), DType::F32, &dev)
        .unwrap_err()
        .to_string();
    assert!(e.contains("model.safetensors"), "{e}");
    // Missing weights file.
    std::fs::remove_file(&st).unwrap();
    let e = Model::load(dir.path(), DType::F32, &dev)
        .unwrap_err()
        .to_string();
    assert!(e.contains("no model.safetensors"), "{e}");
    // A tensor missing.
    let w = candle_core::safetensors::load_buffer(&bytes, &dev).unwrap();
    let mut w: HashMap<String, Tensor> = w;
    w.remove("model.layers.1.mlp.up_proj.weight");
    candle_core::safetensors::save(&w, &st).unwrap();
    let e = Model::load(dir.path(), DType::F32, &dev)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("model.layers.1.mlp.up_proj.weight") && e.contains("missing"),
        "{e}"
    );
    // A tensor of the wrong shape.
    w.insert(
        "model.layers.1.mlp.up_proj.weight".into(),
        Tensor::zeros((3, 3), DType::F32, &dev).unwrap(),
    );
    candle_core::safetensors::save(&w, &st).unwrap();
    let e = Model::load(dir.path(), DType::F32, &dev)
        .unwrap_err()
        .to_string();
    assert!(e.contains("up_proj") && e.contains("[3, 3]"), "{e}");
    // No config.
    std::fs::remove_file(dir.path().join("config.json")).unwrap();
    let e = Model::load(dir.path(), DType::F32, &dev)
        .unwrap_err()
        .to_string();
    assert!(e.contains("config.json"), "{e}");
}

#[test]
fn adapter_round_trip_and_merge() {
    let seed = seed();
    let dev = Device::Cpu;
    let (_, cfg) = variants().remove(1);
    let mut m = Model::random(cfg.clone(), DType::F32, &dev, seed).unwrap();
    let spec = LoraSpec {
        targets: vec![Target::Q, Target::O, Target::Up],
        ..LoraSpec::new(2, 7.0)
    };
    m.add_lora(&spec, seed).unwrap();
    randomize_lora(&m, seed).unwrap();
    let b = batch(&cfg, 2, 6, seed, &dev);
    let want = m.forward(&b).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ad = dir.path().join("adapter");
    m.save_adapter(&ad, "org/base").unwrap();
    let cfgj: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(ad.join("adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(cfgj["base_model_name_or_path"], "org/base");
    assert_eq!(cfgj["task_type"], "CAUSAL_LM");
    assert_eq!(cfgj["r"], 2);
    assert_eq!(cfgj["lora_alpha"], 7);
    assert_eq!(
        cfgj["target_modules"],
        serde_json::json!(["q_proj", "o_proj", "up_proj"])
    );
    let st = candle_core::safetensors::load(ad.join("adapter_model.safetensors"), &dev).unwrap();
    assert!(st.contains_key("base_model.model.model.layers.1.self_attn.o_proj.lora_B.weight"));
    assert_eq!(st.len(), 2 * 3 * cfg.num_layers);
    let mut other = Model::random(cfg.clone(), DType::F32, &dev, seed).unwrap();
    other.load_adapter(&ad).unwrap();
    assert_eq!(rel_err(&other.forward(&b).unwrap(), &want), 0.0);
    // Merged checkpoint == base + adapter.
    let merged = dir.path().join("merged");
    m.save(&merged, true).unwrap();
    let mm = Model::load(&merged, DType::F32, &dev).unwrap();
    assert!(mm.lora().is_none());
    let e = rel_err(&mm.forward(&b).unwrap(), &want);
    assert!(e < 1e-5, "merged vs adapter {e:e}");
    // Loading an adapter of another shape is a clear error.
    let mut wrong = Model::random(tiny("llama", serde_json::json!({"hidden_size": 16, "intermediate_size": 24, "num_key_value_heads": 4})), DType::F32, &dev, seed).unwrap();
    let e = wrong.load_adapter(&ad).unwrap_err().to_string();
    assert!(e.contains("adapter is 48x32") && e.contains("24x16"), "{e}");
}

#[test]
fn lora_spec_errors() {
    let dev = Device::Cpu;
    let (_, cfg) = variants().remove(0);
    let mut m = Model::random(cfg, DType::F32, &dev, 1).unwrap();
    let e = m
        .add_lora(&LoraSpec::new(33, 1.0), 0)
        .unwrap_err()
        .to_string();
    assert!(e.contains("rank 33 exceeds min(in, out)"), "{e}");
    let e = Target::parse_list("q_proj,foo_proj")
        .unwrap_err()
        .to_string();
    assert!(e.contains("unknown target module \"foo_proj\""), "{e}");
    assert_eq!(Target::parse_list("all-linear").unwrap().len(), 7);
    let e = m
        .loss_and_grads(&batch(m.config(), 1, 4, 1, &dev))
        .unwrap_err()
        .to_string();
    assert!(e.contains("no LoRA adapters"), "{e}");
}
