//! The embedded default job: nothing downloaded. A small Llama-architecture model made on the
//! spot from a fixed seed and saved as a normal Hugging Face checkpoint directory (with the
//! byte-level `tokenizer.json` and a `tokenizer_config.json`), and a deterministic synthetic
//! instruction dataset a LoRA can visibly learn: `shout: red fox ->` → ` RED FOX!` (1–3 words
//! from a list of 60, copied in capitals; loss on the completion only; held-out examples are
//! new word combinations). A counting task ([`demo_examples`]) is the easier alternative.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Result};
use serde_json::json;

use crate::config::ModelConfig;
use crate::model::Model;
use crate::tokenizer::Tokenizer;
use crate::util::{write_atomic, SplitMix64};

/// The seed of the demo model (fixed: every run starts from the same base).
pub const DEMO_MODEL_SEED: u64 = 20_241_127;

/// The standard deviation of the demo model's (untied) LM head: large enough that the frozen
/// head can express confident predictions (with the usual 0.02 the largest logit a unit-RMS
/// hidden state can reach is about 2.6, which caps the loss near 3), small enough that the
/// untrained model starts near the uniform loss ln(264) = 5.6.
pub const DEMO_HEAD_STD: f64 = 0.1;

/// The demo model's configuration: Llama, hidden 128, 4 layers, 4 heads (2 kv heads: GQA),
/// untied embeddings, vocabulary 264 (256 bytes + 5 specials, padded to a multiple of 8).
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
        "tie_word_embeddings": false,
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

/// `n` counting instructions from `seed`: `count down from 7 ->` → ` 76543210!`, `count up
/// from 4 by two ->` → ` 468!` (up/down, by one/two, from 0–9). Each next digit is a function of
/// the current one and of the instruction, which a LoRA on a random base learns in a few
/// hundred steps; 40 distinct instructions, so held-out examples repeat instructions seen in
/// training (the split measures that the task was learned, not generalisation).
pub fn demo_examples(n: usize, seed: u64) -> Vec<serde_json::Value> {
    let mut rng = SplitMix64::new(seed);
    (0..n)
        .map(|_| {
            let start = rng.below(10) as i64;
            let up = rng.below(2) == 0;
            let step = 1 + rng.below(2) as i64;
            let mut digits = String::new();
            let mut d = start;
            while (0..=9).contains(&d) {
                digits.push_str(&d.to_string());
                d += if up { step } else { -step };
            }
            let prompt = format!(
                "count {} from {start}{} ->",
                if up { "up" } else { "down" },
                if step == 2 { " by two" } else { "" }
            );
            json!({"prompt": prompt, "completion": format!(" {digits}!")})
        })
        .collect()
}

const WORDS: &[&str] = &[
    "apple", "river", "stone", "cloud", "green", "quick", "brown", "fox", "jumps", "over", "lazy",
    "dog", "night", "light", "sound", "water", "fire", "earth", "wind", "storm", "happy", "small",
    "large", "bright", "dark", "cold", "warm", "sweet", "sharp", "soft", "train", "model", "learn",
    "value", "tensor", "kernel", "fused", "candle", "rust", "graph", "red", "blue", "gold",
    "silver", "tree", "leaf", "bird", "fish", "sun", "moon", "star", "road", "city", "house",
    "door", "window", "table", "chair", "book", "paper",
];

/// `n` examples `{"prompt": "shout: w1 w2 ->", "completion": " W1 W2!"}` of 1–3 words from
/// `seed` (copying with a transformation; held-out examples are new word combinations).
pub fn shout_examples(n: usize, seed: u64) -> Vec<serde_json::Value> {
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

/// Writes the demo model (f32) and tokenizer into `dir/base` and the `shout` dataset (`n` examples)
/// to `dir/data.jsonl`, each file atomically. Deterministic: the same bytes every time.
pub fn prepare(dir: &Path, n: usize) -> Result<DemoFiles> {
    prepare_with(dir, n, true)
}

/// [`prepare`] with the `shout` task, or counting when `!shout`.
pub fn prepare_with(dir: &Path, n: usize, shout: bool) -> Result<DemoFiles> {
    let model_dir = dir.join("base");
    let model = Model::random_with(
        demo_config()?,
        DType::F32,
        &Device::Cpu,
        DEMO_MODEL_SEED,
        0.02,
        DEMO_HEAD_STD,
    )?;
    model.save(&model_dir, false)?;
    Tokenizer::byte_level()?.save(&model_dir)?;
    let mut text = String::new();
    let examples = if shout {
        shout_examples(n, DEMO_MODEL_SEED + 1)
    } else {
        demo_examples(n, DEMO_MODEL_SEED + 1)
    };
    for e in examples {
        text.push_str(&e.to_string());
        text.push('\n');
    }
    let data = dir.join("data.jsonl");
    write_atomic(&data, text.as_bytes())?;
    Ok(DemoFiles { model_dir, data })
}
