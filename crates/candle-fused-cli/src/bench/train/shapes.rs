//! The model configurations of `bench --op train` (the same as
//! `scripts/bench_train_torch.py`'s), their `config.json`, and the step's matmuls: the FLOP
//! count and the list of GEMM shapes the profile times.

use candle_core::Result;
use serde_json::{json, Value};

/// A model configuration of the bench.
#[derive(Debug, Clone, Copy)]
pub struct Shape {
    pub name: &'static str,
    pub arch: &'static str,
    pub hidden: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub intermediate: usize,
    pub vocab: usize,
    pub tied: bool,
    pub rope_theta: f64,
}

/// The configurations of `scripts/bench_train_torch.py` (keep in sync; the merge checks it).
pub const SHAPES: &[Shape] = &[
    Shape {
        name: "cpu-h256",
        arch: "llama",
        hidden: 256,
        layers: 4,
        heads: 4,
        kv_heads: 2,
        intermediate: 1024,
        vocab: 4096,
        tied: false,
        rope_theta: 10000.0,
    },
    Shape {
        name: "cpu-h512",
        arch: "llama",
        hidden: 512,
        layers: 8,
        heads: 8,
        kv_heads: 4,
        intermediate: 2048,
        vocab: 8192,
        tied: false,
        rope_theta: 10000.0,
    },
    Shape {
        name: "qwen2.5-0.5b",
        arch: "qwen2",
        hidden: 896,
        layers: 24,
        heads: 14,
        kv_heads: 2,
        intermediate: 4864,
        vocab: 151936,
        tied: true,
        rope_theta: 1000000.0,
    },
    Shape {
        name: "llama-3.2-1b",
        arch: "llama",
        hidden: 2048,
        layers: 16,
        heads: 32,
        kv_heads: 8,
        intermediate: 8192,
        vocab: 128256,
        tied: true,
        rope_theta: 500000.0,
    },
    Shape {
        name: "llama-3-8b",
        arch: "llama",
        hidden: 4096,
        layers: 32,
        heads: 32,
        kv_heads: 8,
        intermediate: 14336,
        vocab: 128256,
        tied: false,
        rope_theta: 500000.0,
    },
];

impl Shape {
    pub fn by_name(name: &str) -> Result<Shape> {
        SHAPES
            .iter()
            .copied()
            .find(|s| s.name == name)
            .ok_or_else(|| {
                let known: Vec<_> = SHAPES.iter().map(|s| s.name).collect();
                candle_core::Error::Msg(format!(
                    "bench --op train: unknown config {name:?}, expected one of {}",
                    known.join(", ")
                ))
            })
    }

    /// A Hugging Face `config.json` of this shape (what `ModelConfig::from_json` reads).
    pub fn hf_config(&self, seq: usize) -> String {
        let (arch, ty) = match self.arch {
            "qwen2" => ("Qwen2ForCausalLM", "qwen2"),
            _ => ("LlamaForCausalLM", "llama"),
        };
        let mut v = json!({
            "architectures": [arch], "model_type": ty, "hidden_size": self.hidden,
            "intermediate_size": self.intermediate, "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads, "num_key_value_heads": self.kv_heads,
            "vocab_size": self.vocab, "max_position_embeddings": seq.max(4096), "rms_norm_eps": 1e-5,
            "rope_theta": self.rope_theta, "rope_scaling": null, "tie_word_embeddings": self.tied,
            "hidden_act": "silu", "torch_dtype": "float32",
        });
        if self.arch == "qwen2" {
            v["use_sliding_window"] = json!(false);
        }
        v.to_string()
    }

    pub fn json(&self) -> Value {
        json!({ "arch": self.arch, "hidden": self.hidden, "layers": self.layers, "heads": self.heads,
                "kv_heads": self.kv_heads, "intermediate": self.intermediate, "vocab": self.vocab, "tied": self.tied })
    }
}

/// The step's matmul FLOPs (see [`LEGEND`]).
pub fn matmul_flops(s: &Shape, batch: usize, seq: usize, rank: usize) -> f64 {
    let (m, h, hd) = (
        (batch * seq) as f64,
        s.hidden as f64,
        (s.hidden / s.heads) as f64,
    );
    let (q, kv, i, r) = (
        s.heads as f64 * hd,
        s.kv_heads as f64 * hd,
        s.intermediate as f64,
        rank as f64,
    );
    let lins = [(h, q), (h, kv), (h, kv), (q, h), (h, i), (h, i), (i, h)];
    let mut layer: f64 = lins
        .iter()
        .map(|&(k, n)| 4.0 * m * k * n + 6.0 * m * r * (k + n))
        .sum();
    layer += 12.0 * (batch * s.heads) as f64 * (seq * seq) as f64 * hd;
    s.layers as f64 * layer + 4.0 * m * h * s.vocab as f64
}

/// One GEMM shape of the step: `count` times `[batch ×] [m, k] x [k, n]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Gemm {
    pub what: String,
    pub batch: usize,
    pub m: usize,
    pub k: usize,
    pub n: usize,
    pub count: usize,
}

impl Gemm {
    pub fn flops(&self) -> f64 {
        2.0 * (self.batch * self.m * self.k * self.n) as f64 * self.count as f64
    }
}

/// Every matmul of the step (forward and backward; the FLOPs of [`matmul_flops`]), as
/// contiguous GEMM shapes (transposed operands are timed as plain ones), identical shapes
/// merged: per linear K -> N, `x·Wᵀ` [M,K]x[K,N] and `dX = dY·W` [M,N]x[N,K]; LoRA `x·Aᵀ`,
/// `h·Bᵀ`, `dH = dY·B`, `dB = dYᵀ·h`, `dA = dHᵀ·x`, `dX += dH·A`; per head `Q·Kᵀ`, `P·V` and
/// their four backward products; the LM head's forward and dX.
pub fn gemms(s: &Shape, batch: usize, seq: usize, rank: usize) -> Vec<Gemm> {
    let (m, h, hd, r, l) = (batch * seq, s.hidden, s.hidden / s.heads, rank, s.layers);
    let (q, kv, i) = (s.heads * hd, s.kv_heads * hd, s.intermediate);
    let mut out: Vec<Gemm> = vec![];
    let mut add = |what: &str, b, m, k, n, count| {
        let same = |o: &&mut Gemm| (o.batch, o.m, o.k, o.n) == (b, m, k, n);
        match out.iter_mut().find(same) {
            Some(o) => {
                o.count += count;
                if !o.what.split(", ").any(|w| w == what) {
                    o.what = format!("{}, {what}", o.what);
                }
            }
            None => out.push(Gemm {
                what: what.into(),
                batch: b,
                m,
                k,
                n,
                count,
            }),
        }
    };
    for (k, n) in [(h, q), (h, kv), (h, kv), (q, h), (h, i), (h, i), (i, h)] {
        add("x·Wᵀ", 1, m, k, n, l);
        add("dY·W", 1, m, n, k, l);
        add("x·Aᵀ", 1, m, k, r, l);
        add("h·Bᵀ", 1, m, r, n, l);
        add("dY·B", 1, m, n, r, l);
        add("dYᵀ·h", 1, n, m, r, l);
        add("dHᵀ·x", 1, r, m, k, l);
        add("dH·A", 1, m, r, k, l);
    }
    let bh = batch * s.heads;
    add("Q·Kᵀ", bh, seq, hd, seq, l);
    add("P·V", bh, seq, seq, hd, l);
    add("dO·Vᵀ", bh, seq, hd, seq, l);
    add("Pᵀ·dO", bh, seq, seq, hd, l);
    add("dS·K", bh, seq, seq, hd, l);
    add("dSᵀ·Q", bh, seq, seq, hd, l);
    add("LM head x·Wᵀ", 1, m, h, s.vocab, 1);
    add("LM head dY·W", 1, m, s.vocab, h, 1);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gemm_list_has_the_flops_of_the_formula() {
        for s in SHAPES {
            let total: f64 = gemms(s, 2, 64, 16).iter().map(Gemm::flops).sum();
            let f = matmul_flops(s, 2, 64, 16);
            assert!((total - f).abs() <= 1e-9 * f, "{}: {total} vs {f}", s.name);
        }
    }
}
