//! A composed-Candle f64 reference of the decoder (HF maths: rotate_half RoPE with the
//! llama3 scaling, repeat_kv GQA, causal softmax, SiLU MLP), from a saved checkpoint's tensors
//! and optional adapters `(module path -> (A, B, scale))`.
#![allow(dead_code)]

use std::collections::HashMap;

use candle_core::{DType, Device, Result, Tensor, D};
use candle_fused_train::{ModelConfig, RopeScaling};

fn inv_freq(cfg: &ModelConfig) -> Vec<f64> {
    let d = cfg.head_dim;
    let mut inv: Vec<f64> = (0..d / 2)
        .map(|i| 1.0 / cfg.rope_theta.powf(2.0 * i as f64 / d as f64))
        .collect();
    if let Some(RopeScaling::Llama3 {
        factor,
        low_freq_factor,
        high_freq_factor,
        original_max_positions,
    }) = &cfg.rope_scaling
    {
        let orig = *original_max_positions as f64;
        for f in inv.iter_mut() {
            let wl = 2.0 * std::f64::consts::PI / *f;
            if wl > orig / low_freq_factor {
                *f /= factor;
            } else if wl >= orig / high_freq_factor {
                let s = (orig / wl - low_freq_factor) / (high_freq_factor - low_freq_factor);
                *f = (1.0 - s) * *f / factor + s * *f;
            }
        }
    }
    inv
}

fn rope(x: &Tensor, pos: &[Vec<usize>], cfg: &ModelConfig) -> Result<Tensor> {
    // x [B, H, T, D]
    let (b, _, t, d) = x.dims4()?;
    let inv = inv_freq(cfg);
    let mut c = Vec::new();
    let mut s = Vec::new();
    for row in pos.iter().take(b) {
        for &p in row.iter().take(t) {
            for k in 0..d {
                let a = p as f64 * inv[k % (d / 2)];
                c.push(a.cos());
                s.push(a.sin());
            }
        }
    }
    let c = Tensor::from_vec(c, (b, 1, t, d), x.device())?;
    let s = Tensor::from_vec(s, (b, 1, t, d), x.device())?;
    let x1 = x.narrow(D::Minus1, 0, d / 2)?;
    let x2 = x.narrow(D::Minus1, d / 2, d / 2)?;
    let rot = Tensor::cat(&[x2.neg()?, x1], D::Minus1)?;
    x.broadcast_mul(&c)? + rot.broadcast_mul(&s)?
}

pub type Adapters = HashMap<String, (Tensor, Tensor, f64)>;

/// Logits `[B, T, V]` (f64) for `tokens` with `positions` and segment ids per row.
pub fn forward(
    w: &HashMap<String, Tensor>,
    cfg: &ModelConfig,
    ad: &Adapters,
    tokens: &[Vec<u32>],
    positions: &[Vec<usize>],
    segments: Option<&[Vec<u32>]>,
) -> Result<Tensor> {
    let dev = Device::Cpu;
    let g = |k: &str| -> Result<Tensor> {
        w.get(k)
            .unwrap_or_else(|| panic!("missing {k}"))
            .to_dtype(DType::F64)
    };
    let (b, t) = (tokens.len(), tokens[0].len());
    let (h, hq, hkv, d) = (
        cfg.hidden_size,
        cfg.num_heads,
        cfg.num_kv_heads,
        cfg.head_dim,
    );
    let eps = cfg.rms_norm_eps;
    let rms = |x: &Tensor, wt: &Tensor| -> Result<Tensor> {
        let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
        x.broadcast_div(&(ms + eps)?.sqrt()?)?.broadcast_mul(wt)
    };
    let flat: Vec<u32> = tokens.iter().flatten().copied().collect();
    let ids = Tensor::from_vec(flat, b * t, &dev)?;
    let mut x = g("model.embed_tokens.weight")?
        .index_select(&ids, 0)?
        .reshape((b, t, h))?;
    let lin = |x: &Tensor, path: &str| -> Result<Tensor> {
        let wt = g(&format!("{path}.weight"))?;
        let mut y = x.broadcast_matmul(&wt.t()?)?;
        if let Some(bias) = w.get(&format!("{path}.bias")) {
            y = y.broadcast_add(&bias.to_dtype(DType::F64)?)?;
        }
        if let Some((a, bb, s)) = ad.get(path) {
            let a = a.to_dtype(DType::F64)?;
            let bb = bb.to_dtype(DType::F64)?;
            y = (y + (x.broadcast_matmul(&a.t()?)?.broadcast_matmul(&bb.t()?)? * *s)?)?;
        }
        Ok(y)
    };
    // Additive mask [B, 1, T, T]: causal and within a segment.
    let mut m = vec![0f64; b * t * t];
    for bi in 0..b {
        for i in 0..t {
            for j in 0..t {
                let same = segments.is_none_or(|s| s[bi][i] == s[bi][j]);
                if j > i || !same {
                    m[(bi * t + i) * t + j] = f64::NEG_INFINITY;
                }
            }
        }
    }
    let mask = Tensor::from_vec(m, (b, 1, t, t), &dev)?;
    for l in 0..cfg.num_layers {
        let p = format!("model.layers.{l}");
        let hn = rms(&x, &g(&format!("{p}.input_layernorm.weight"))?)?;
        let heads = |y: Tensor, n: usize| y.reshape((b, t, n, d))?.transpose(1, 2);
        let q = rope(
            &heads(lin(&hn, &format!("{p}.self_attn.q_proj"))?, hq)?,
            positions,
            cfg,
        )?;
        let k = rope(
            &heads(lin(&hn, &format!("{p}.self_attn.k_proj"))?, hkv)?,
            positions,
            cfg,
        )?;
        let v = heads(lin(&hn, &format!("{p}.self_attn.v_proj"))?, hkv)?;
        let rep = |y: Tensor| -> Result<Tensor> {
            let n = hq / hkv;
            y.unsqueeze(2)?
                .broadcast_as((b, hkv, n, t, d))?
                .reshape((b, hq, t, d))
        };
        let (k, v) = (rep(k)?, rep(v)?);
        let sc = (q.contiguous()?.matmul(&k.t()?.contiguous()?)? / (d as f64).sqrt())?
            .broadcast_add(&mask)?;
        let mx = sc.max_keepdim(D::Minus1)?;
        let e = sc.broadcast_sub(&mx)?.exp()?;
        let pr = e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?;
        let o = pr
            .matmul(&v.contiguous()?)?
            .transpose(1, 2)?
            .reshape((b, t, hq * d))?;
        x = (x + lin(&o, &format!("{p}.self_attn.o_proj"))?)?;
        let h2 = rms(&x, &g(&format!("{p}.post_attention_layernorm.weight"))?)?;
        let gate = lin(&h2, &format!("{p}.mlp.gate_proj"))?;
        let up = lin(&h2, &format!("{p}.mlp.up_proj"))?;
        let act = (gate.silu()? * up)?;
        x = (x + lin(&act, &format!("{p}.mlp.down_proj"))?)?;
    }
    let hf = rms(&x, &g("model.norm.weight")?)?;
    let head = if cfg.tie_word_embeddings {
        g("model.embed_tokens.weight")?
    } else {
        g("lm_head.weight")?
    };
    hf.broadcast_matmul(&head.t()?)
}
