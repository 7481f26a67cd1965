//! The embedded default job: nothing downloaded. A small Llama-architecture model made on the
//! spot from a fixed seed and saved as a normal Hugging Face checkpoint directory (with the
//! byte-level `tokenizer.json` and a `tokenizer_config.json`), and a deterministic synthetic
//! instruction dataset a LoRA can visibly learn: `shout: <words> ->` → the words in capitals
//! with an exclamation mark (copying with a transformation, loss on the completion only;
//! held-out examples are new word combinations).

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Result};
use serde_json::json;

use crate::config::ModelConfig;
use crate::model::Model;
use crate::tokenizer::Tokenizer;
use crate::util::{write_atomic, SplitMix64};

/// The seed of the demo model (fixed: every run starts from the same base).
pub const DEMO_MODEL_SEED: u64 = 20_241_127;

/// The demo model's configuration: Llama, hidden 128, 4 layers, 4 heads (2 kv heads: GQA),
/// tied embeddings, vocabulary 264 (256 bytes + 5 specials, padded to a multiple of 8).
pub fn demo_config() -> Result<ModelConfig> {
    ModelConfig::from_value(&json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": 264,
        "hidden_size": 128,
        "intermediate_size": 384,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 32,
        "max_position_embeddings": 512,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": true,
        "hidden_act": "silu",
        "attention_bias": false,
        "mlp_bias": false,
        "attention_dropout": 0.0,
        "bos_token_id": 256,
        "eos_token_id": 257,
        "pad_token_id": 258,
        "torch_dtype": "float32",
    }))
}

const WORDS: &[&str] = &[
    "apple", "river", "stone", "cloud", "green", "quick", "brown", "fox", "jumps", "over", "lazy",
    "dog", "night", "light", "sound", "water", "fire", "earth", "wind", "storm", "happy", "small",
    "large", "bright", "dark", "cold", "warm", "sweet", "sharp", "soft", "train", "model", "learn",
    "value", "tensor", "kernel", "fused", "candle", "rust", "graph", "red", "blue", "gold",
    "silver", "tree", "leaf", "bird", "fish", "sun", "moon", "star", "road", "city", "house",
    "door", "window", "table", "chair", "book", "paper",
];

/// `n` examples `{"prompt": "shout: w1 w2 ->", "completion": " W1 W2!"}` of 1–3 words, from
/// `seed`.
pub fn demo_examples(n: usize, seed: u64) -> Vec<serde_json::Value> {
    let mut rng = SplitMix64::new(seed);
    (0..n)
        .map(|_| {
            let k = 1 + rng.below(3);
            let words: Vec<&str> = (0..k).map(|_| WORDS[rng.below(WORDS.len())]).collect();
            let text = words.join(" ");
            json!({"prompt": format!("shout: {text} ->"), "completion": format!(" {}!", text.to_uppercase())})
        })
        .collect()
}

/// The files of the demo job.
#[derive(Debug, Clone)]
pub struct DemoFiles {
    /// The base checkpoint directory (config, weights, tokenizer).
    pub model_dir: PathBuf,
    /// The JSONL training data.
    pub data: PathBuf,
}

/// Writes the demo model (f32) and tokenizer into `dir/base` and the dataset (`n` examples)
/// to `dir/data.jsonl`, each file atomically. Deterministic: the same bytes every time.
pub fn prepare(dir: &Path, n: usize) -> Result<DemoFiles> {
    let model_dir = dir.join("base");
    let model = Model::random(demo_config()?, DType::F32, &Device::Cpu, DEMO_MODEL_SEED)?;
    model.save(&model_dir, false)?;
    Tokenizer::byte_level()?.save(&model_dir)?;
    let mut text = String::new();
    for e in demo_examples(n, DEMO_MODEL_SEED + 1) {
        text.push_str(&e.to_string());
        text.push('\n');
    }
    let data = dir.join("data.jsonl");
    write_atomic(&data, text.as_bytes())?;
    Ok(DemoFiles { model_dir, data })
}
