//! Generation: a KV cache (roped keys and values per layer, appended per step), prefill of
//! the prompt in one forward, then one token per forward; greedy, temperature, top-k and
//! top-p sampling from a seeded RNG; each new token handed to a callback (streaming).

use candle_core::{DType, Result, Tensor};

use crate::model::{Ctx, Model, WHAT};
use crate::util::{fail, SplitMix64};

/// Decoding options.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateConfig {
    /// At most this many new tokens.
    pub max_new_tokens: usize,
    /// `<= 0`: greedy (argmax).
    pub temperature: f64,
    /// Keep only the `k` most likely tokens (0: off).
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches `p` (1: off).
    pub top_p: f64,
    /// Sampling seed.
    pub seed: u64,
    /// Generation stops after any of these (default: the config's `eos_token_id`s).
    pub stop_tokens: Option<Vec<u32>>,
}

impl Default for GenerateConfig {
    fn default() -> Self {
        Self {
            max_new_tokens: 64,
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            seed: 0,
            stop_tokens: None,
        }
    }
}

/// Keys and values of every layer for the tokens seen so far.
#[derive(Debug, Clone, Default)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
    len: usize,
}

impl KvCache {
    /// An empty cache.
    pub fn new() -> Self {
        Self::default()
    }

    /// Tokens cached.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Model {
    /// Runs `tokens` after what `cache` holds (batch 1, no dropout, outside autograd) and
    /// returns the logits of the last token (f32 `[V]`).
    pub fn forward_cached(&self, tokens: &[u32], cache: &mut KvCache) -> Result<Tensor> {
        if tokens.is_empty() {
            fail!(WHAT, "forward_cached: no tokens")
        }
        if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= self.cfg.vocab_size) {
            fail!(
                WHAT,
                "token id {bad} is outside the vocabulary (vocab_size {})",
                self.cfg.vocab_size
            )
        }
        let t = tokens.len();
        let start = cache.len;
        let limit = self.rope.cos().dim(0)?;
        if start + t > limit {
            fail!(
                WHAT,
                "{} tokens exceed the {limit} positions of the model",
                start + t
            )
        }
        if let Some(w) = self.cfg.sliding_window {
            if start + t > w {
                fail!(WHAT, "{} tokens exceed the sliding window {w}", start + t)
            }
        }
        let ids = Tensor::new(tokens, &self.device)?.unsqueeze(0)?;
        let ctx = Ctx {
            b: 1,
            t,
            positions: Tensor::arange(start as u32, (start + t) as u32, &self.device)?,
            mask: None,
            tape: false,
            dropout: None,
        };
        if cache.layers.len() != self.layers.len() {
            cache.layers = vec![None; self.layers.len()];
        }
        let k = &self.kernels;
        let eps = self.cfg.rms_norm_eps;
        let n = self.layers.len();
        let mut x = self.embed_tokens(&ids)?;
        let mut h = k.rms_norm(&x, Some(&self.layers[0].input_norm), eps)?;
        for l in 0..n {
            let (m, s, _, kv) = self.layer_kv(l, &h, &x, &ctx, false, cache.layers[l].as_ref())?;
            cache.layers[l] = Some(kv);
            let w_next = if l + 1 < n {
                &self.layers[l + 1].input_norm
            } else {
                &self.norm
            };
            let (hn, xn) = k.add_rms_norm(&m, &s, w_next, eps)?;
            h = hn;
            x = xn;
        }
        cache.len += t;
        let last = h.narrow(1, t - 1, 1)?.reshape((1, self.cfg.hidden_size))?;
        self.kernels
            .linear(&last, self.head(), None)?
            .to_dtype(DType::F32)?
            .reshape(self.cfg.vocab_size)
    }
}

/// Picks the next token from f32 logits.
pub fn sample(logits: &[f32], cfg: &GenerateConfig, rng: &mut SplitMix64) -> u32 {
    let argmax = || {
        let mut best = 0;
        for (i, &v) in logits.iter().enumerate() {
            if v > logits[best] {
                best = i;
            }
        }
        best as u32
    };
    if cfg.temperature <= 0.0 {
        return argmax();
    }
    let mut idx: Vec<usize> = (0..logits.len())
        .filter(|&i| logits[i].is_finite())
        .collect();
    if idx.is_empty() {
        return argmax();
    }
    idx.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
    if cfg.top_k > 0 {
        idx.truncate(cfg.top_k);
    }
    let mx = logits[idx[0]] as f64;
    let mut p: Vec<f64> = idx
        .iter()
        .map(|&i| ((logits[i] as f64 - mx) / cfg.temperature).exp())
        .collect();
    let total: f64 = p.iter().sum();
    p.iter_mut().for_each(|x| *x /= total);
    if cfg.top_p < 1.0 {
        let mut acc = 0.0;
        let mut keep = p.len();
        for (j, &x) in p.iter().enumerate() {
            acc += x;
            if acc >= cfg.top_p {
                keep = j + 1;
                break;
            }
        }
        p.truncate(keep);
        idx.truncate(keep);
        let total: f64 = p.iter().sum();
        p.iter_mut().for_each(|x| *x /= total);
    }
    let u = rng.next_f64();
    let mut acc = 0.0;
    for (j, &x) in p.iter().enumerate() {
        acc += x;
        if u < acc {
            return idx[j] as u32;
        }
    }
    idx[idx.len() - 1] as u32
}

/// Generates up to `cfg.max_new_tokens` tokens after `prompt` (KV-cached), calling `on_token`
/// with each as it is made; returns the new tokens (a stop token included when one ends it).
pub fn generate(
    model: &Model,
    prompt: &[u32],
    cfg: &GenerateConfig,
    mut on_token: impl FnMut(u32),
) -> Result<Vec<u32>> {
    if prompt.is_empty() {
        fail!(WHAT, "generate: empty prompt")
    }
    if !(cfg.top_p > 0.0 && cfg.top_p <= 1.0 && cfg.temperature.is_finite()) {
        fail!(
            WHAT,
            "generate: top_p must be in (0, 1] and temperature finite, got {} and {}",
            cfg.top_p,
            cfg.temperature
        )
    }
    let stops = cfg
        .stop_tokens
        .clone()
        .unwrap_or_else(|| model.config().eos_token_ids.clone());
    let mut rng = SplitMix64::new(cfg.seed);
    let mut cache = KvCache::new();
    let mut out = Vec::new();
    let mut logits = model.forward_cached(prompt, &mut cache)?;
    for _ in 0..cfg.max_new_tokens {
        let v: Vec<f32> = logits.to_vec1()?;
        let next = sample(&v, cfg, &mut rng);
        out.push(next);
        on_token(next);
        if stops.contains(&next) {
            break;
        }
        if out.len() == cfg.max_new_tokens {
            break;
        }
        logits = model.forward_cached(&[next], &mut cache)?;
    }
    Ok(out)
}
