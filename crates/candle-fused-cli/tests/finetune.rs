//! The training commands end to end through the binary on a tiny checkpoint: finetune writes
//! a PEFT adapter, metrics and plot; an existing --out is refused unless --overwrite or
//! --resume; --resume continues; generate, eval and merge run on the result; bad input (JSONL
//! line, target module, rank, tokenizer larger than the embedding, missing model) is a clear
//! error with nothing half-written; `bench --stream 0` is refused.

use std::path::Path;
use std::process::Command;

use candle_core::{DType, Device};
use candle_fused_train::{Model, ModelConfig, Tokenizer};

fn tiny_checkpoint(dir: &Path, vocab: usize) {
    let cfg = ModelConfig::from_value(&serde_json::json!({
        "architectures": ["LlamaForCausalLM"], "vocab_size": vocab, "hidden_size": 32,
        "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "max_position_embeddings": 256, "rms_norm_eps": 1e-5,
        "eos_token_id": 257, "pad_token_id": 258
    }))
    .unwrap();
    Model::random(cfg, DType::F32, &Device::Cpu, 3)
        .unwrap()
        .save(dir, false)
        .unwrap();
    Tokenizer::byte_level().unwrap().save(dir).unwrap();
}

fn run(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_candle-fused"))
        .args(args)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn finetune_generate_eval_merge_and_bad_input() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("model");
    tiny_checkpoint(&model, 264);
    let data = tmp.path().join("data.jsonl");
    let lines: Vec<String> = (0..20)
        .map(|i| format!(r#"{{"prompt": "say {i} ->", "completion": " {i}!"}}"#))
        .collect();
    std::fs::write(&data, lines.join("\n")).unwrap();
    let out = tmp.path().join("run");
    let (m, d, o) = (
        model.to_str().unwrap(),
        data.to_str().unwrap(),
        out.to_str().unwrap(),
    );
    let base = [
        "finetune",
        "--model",
        m,
        "--data",
        d,
        "--out",
        o,
        "--steps",
        "4",
        "--batch-size",
        "2",
        "--seq-len",
        "32",
        "--save-every",
        "2",
        "--eval-every",
        "2",
        "--rank",
        "4",
    ];
    let (ok, text) = run(&base);
    assert!(ok, "{text}");
    assert!(
        text.contains("done after 4/4 steps") && text.contains("held-out loss"),
        "{text}"
    );
    for f in [
        "adapter_config.json",
        "adapter_model.safetensors",
        "metrics.jsonl",
        "loss.svg",
        "checkpoints/step-2",
    ] {
        assert!(out.join(f).exists(), "{f} missing");
    }
    // An existing --out is refused, --resume continues, --overwrite starts over.
    let (ok, text) = run(&base);
    assert!(
        !ok && text.contains("holds an earlier run") && text.contains("--overwrite"),
        "{text}"
    );
    let with = |extra: &[&str]| -> Vec<String> {
        base.iter().chain(extra).map(|s| s.to_string()).collect()
    };
    let args = with(&["--resume"]);
    let (ok, text) = run(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(ok && text.contains("resuming at step 2"), "{text}");
    let args = with(&["--overwrite"]);
    let (ok, text) = run(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(ok, "{text}");
    // generate, eval, merge on the result.
    let (ok, text) = run(&[
        "generate",
        "--model",
        m,
        "--adapter",
        o,
        "--prompt",
        "say 3 ->",
        "--max-new-tokens",
        "4",
    ]);
    assert!(ok && text.starts_with("say 3 ->"), "{text}");
    let (ok, text) = run(&["eval", "--model", m, "--adapter", o, "--data", d]);
    assert!(ok && text.contains("perplexity"), "{text}");
    let merged = tmp.path().join("merged");
    let (ok, text) = run(&[
        "merge",
        "--model",
        m,
        "--adapter",
        o,
        "--out",
        merged.to_str().unwrap(),
    ]);
    assert!(
        ok && merged.join("model.safetensors").exists() && merged.join("tokenizer.json").exists(),
        "{text}"
    );
    let (ok, text) = run(&[
        "merge",
        "--model",
        m,
        "--adapter",
        o,
        "--out",
        merged.to_str().unwrap(),
    ]);
    assert!(!ok && text.contains("exists"), "{text}");
    // Bad input: each a clear error, no output directory left behind.
    let fresh = tmp.path().join("fresh");
    let f = fresh.to_str().unwrap();
    let bad = tmp.path().join("bad.jsonl");
    std::fs::write(&bad, "{\"text\": \"ok\"}\n{\"text\": 3}\n").unwrap();
    let b = bad.to_str().unwrap();
    let cases: Vec<(&str, &str, Vec<&str>, String)> = vec![
        (m, b, vec![], format!("{b}:2: \"text\" must be a string")),
        (
            m,
            d,
            vec!["--targets", "q_proj,qkv_proj"],
            "unknown target module \"qkv_proj\"".into(),
        ),
        (
            m,
            d,
            vec!["--rank", "40"],
            "rank 40 exceeds min(in, out)".into(),
        ),
        (
            "/nonexistent/model",
            d,
            vec![],
            "/nonexistent/model: no such directory".into(),
        ),
    ];
    for (mm, dd, extra, want) in cases {
        let mut args = vec![
            "finetune",
            "--model",
            mm,
            "--data",
            dd,
            "--out",
            f,
            "--steps",
            "1",
            "--seq-len",
            "32",
        ];
        args.extend(extra);
        let (ok, text) = run(&args);
        assert!(!ok && text.contains(&want), "wanted {want:?} in:\n{text}");
        assert!(!fresh.join("adapter_model.safetensors").exists());
    }
    let small = tmp.path().join("small");
    tiny_checkpoint(&small, 200);
    let (ok, text) = run(&[
        "finetune",
        "--model",
        small.to_str().unwrap(),
        "--data",
        d,
        "--out",
        f,
    ]);
    assert!(
        !ok && text.contains("the tokenizer has 261 tokens but the model's embedding only 200"),
        "{text}"
    );
}

/// `bench --stream 0` is refused with a message naming the flag (before any work is done).
#[test]
fn bench_stream_zero_is_a_clear_error() {
    let (ok, text) = run(&["bench", "--device", "cpu", "--op", "rope", "--stream", "0"]);
    assert!(!ok, "{text}");
    assert!(text.contains("--stream must be at least 1"), "{text}");
}
