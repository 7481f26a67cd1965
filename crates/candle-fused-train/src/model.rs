//! The decoder (Llama / Qwen2 / Mistral) on the fused ops: weights kept frozen in the
//! training dtype (checkpoint I/O in `checkpoint.rs`), optional LoRA adapters (f32 masters),
//! and one forward used three ways:
//! on Candle's tape ([`Model::forward`], the adapters tracked), outside autograd saving what
//! the explicit backward needs (`crate::backward`), and KV-cached for generation.
//!
//! Per layer: `h = rms_norm(x)`, q/k/v (LoRA) projections, RoPE on q and k, scores `q·kᵀ`
//! with grouped heads (GQA without repeating k/v: the query heads of one kv head are stacked
//! along the rows), `masked_softmax` (causal, plus a block-diagonal mask for packed
//! sequences), `p·v`, o_proj, residual add + RMSNorm fused, gate/up, GLU, down, and the next
//! residual add fused with the next layer's input norm (the last with the final norm).

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use candle_core::{DType, Device, Result, Tensor};
use candle_fused::Kernels;

use crate::config::{Activation, ModelConfig};
use crate::kops::{GluKind, RopeLayout, RopeStyle, RopeTable};
use crate::lora::{Lora, LoraSpec, Target};
use crate::util::{fail, SplitMix64};

pub(crate) const WHAT: &str = "model";
/// The longest RoPE table built (positions beyond are refused).
pub(crate) const ROPE_CAP: usize = 32768;

/// One batch: `tokens` u32 `[B, T]`; `targets` i64 `[B, T]`, already shifted (the target of
/// position `t` is the token after it), `-100` ignored; `positions` u32/i64 `[B, T]` or `[T]`
/// (default `0..T`; packed sequences restart at 0); `segments` u32/i64 `[B, T]` (packed
/// sequences: tokens attend only within their segment id).
#[derive(Debug, Clone)]
pub struct Batch {
    pub tokens: Tensor,
    pub targets: Tensor,
    pub positions: Option<Tensor>,
    pub segments: Option<Tensor>,
}

impl Batch {
    /// A batch without packing.
    pub fn new(tokens: Tensor, targets: Tensor) -> Self {
        Self {
            tokens,
            targets,
            positions: None,
            segments: None,
        }
    }

    /// Non-ignored targets.
    pub fn n_valid(&self) -> Result<usize> {
        let t: Vec<i64> = self
            .targets
            .flatten_all()?
            .to_dtype(DType::I64)?
            .to_vec1()?;
        Ok(t.iter().filter(|&&x| x != -100).count())
    }
}

/// A decoder layer's frozen weights.
#[derive(Debug, Clone)]
pub(crate) struct Layer {
    pub input_norm: Tensor,
    pub post_norm: Tensor,
    /// `[out, in]` per [`Target::index`].
    pub proj: [Tensor; 7],
    pub bias: [Option<Tensor>; 7],
}

/// Base model plus optional LoRA adapters.
#[derive(Debug)]
pub struct Model {
    pub(crate) cfg: ModelConfig,
    pub(crate) dtype: DType,
    pub(crate) device: Device,
    pub(crate) kernels: Kernels,
    pub(crate) embed: Tensor,
    pub(crate) layers: Vec<Layer>,
    pub(crate) norm: Tensor,
    /// `None`: tied to `embed`.
    pub(crate) lm_head: Option<Tensor>,
    pub(crate) rope: RopeTable,
    pub(crate) lora: Option<Lora>,
    pub(crate) checkpointing: bool,
    pub(crate) dropout_state: AtomicU64,
}

/// What a forward needs besides the layer inputs.
pub(crate) struct Ctx {
    pub b: usize,
    pub t: usize,
    pub positions: Tensor,
    pub mask: Option<Tensor>,
    /// Whether the adapters are tracked (tape) or detached (explicit / inference).
    pub tape: bool,
    /// Dropout seed of this call (`None`: no dropout).
    pub dropout: Option<u64>,
}

/// An adapter as the ops take it: compute-dtype `A`, `B`, scale, and its dropout mask.
pub(crate) struct AdapterT {
    pub a: Tensor,
    pub b: Tensor,
    pub scale: f64,
    pub mask: Option<Tensor>,
}

/// What a layer's explicit backward needs (everything in the compute dtype).
pub(crate) struct Saved {
    pub h: Tensor,
    /// Roped queries `[B, Hq, T, D]`, keys `[B, Hkv, T, D]`, values `[B, Hkv, T, D]`.
    pub q: Tensor,
    pub k: Tensor,
    pub v: Tensor,
    /// Attention probabilities `[B, Hq, T, T]`.
    pub p: Tensor,
    /// Attention output before o_proj, `[B, T, Hq·D]`.
    pub o: Tensor,
    /// Residual after attention, and its norm.
    pub s: Tensor,
    pub h2: Tensor,
    pub gate: Tensor,
    pub up: Tensor,
    pub adapters: Vec<Option<AdapterT>>,
}

impl Model {
    /// The configuration.
    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// The compute dtype of the base weights.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The device.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The kernel handle every fused op of this model runs with (e.g. poisoned outputs in tests).
    pub fn set_kernels(&mut self, k: Kernels) {
        self.kernels = k;
    }

    /// Activation checkpointing for the explicit backward: each layer saves only its input and
    /// is recomputed in the backward (less memory, one more forward per layer).
    pub fn set_activation_checkpointing(&mut self, on: bool) {
        self.checkpointing = on;
    }

    /// The state of the LoRA-dropout stream (advanced by each training call; a checkpoint
    /// stores it).
    pub fn dropout_state(&self) -> u64 {
        self.dropout_state.load(Ordering::Relaxed)
    }

    /// Sets the LoRA-dropout stream state.
    pub fn set_dropout_state(&self, s: u64) {
        self.dropout_state.store(s, Ordering::Relaxed)
    }

    /// Adds fresh PEFT-initialised adapters (replacing any).
    pub fn add_lora(&mut self, spec: &LoraSpec, seed: u64) -> Result<()> {
        self.lora = Some(Lora::init(&self.cfg, spec, seed, &self.device)?);
        Ok(())
    }

    /// Loads a PEFT adapter directory (replacing any adapters).
    pub fn load_adapter(&mut self, dir: &Path) -> Result<()> {
        self.lora = Some(Lora::load(dir, &self.cfg, &self.device)?);
        Ok(())
    }

    /// Writes the adapters as a PEFT adapter directory.
    pub fn save_adapter(&self, dir: &Path, base_model_name_or_path: &str) -> Result<()> {
        match &self.lora {
            Some(l) => l.save(dir, base_model_name_or_path),
            None => fail!(WHAT, "save_adapter: the model has no LoRA adapters"),
        }
    }

    /// The adapters, if any.
    pub fn lora(&self) -> Option<&Lora> {
        self.lora.as_ref()
    }

    /// Removes the adapters (the base model alone).
    pub fn remove_lora(&mut self) -> Option<Lora> {
        self.lora.take()
    }

    /// `(PEFT key, f32 parameter)` of every LoRA parameter (empty without adapters).
    pub fn lora_params(&self) -> Vec<(String, Tensor)> {
        self.lora_vars()
            .into_iter()
            .map(|(k, v)| (k, v.as_tensor().clone()))
            .collect()
    }

    /// `(PEFT key, Var)` of every LoRA parameter: what an optimizer updates.
    pub fn lora_vars(&self) -> Vec<(String, candle_core::Var)> {
        self.lora.as_ref().map(Lora::vars).unwrap_or_default()
    }

    /// The LM head weight `[V, H]` (the embedding when tied).
    pub(crate) fn head(&self) -> &Tensor {
        self.lm_head.as_ref().unwrap_or(&self.embed)
    }

    /// Logits `[B, T, V]` of `batch` (no dropout). Runs on Candle's tape: the adapters are
    /// tracked, so `loss.backward()` reaches them.
    pub fn forward(&self, batch: &Batch) -> Result<Tensor> {
        let ctx = self.ctx(batch, true, None)?;
        let (h, _, _) = self.hidden(&batch.tokens, &ctx, false)?;
        self.kernels.linear(&h, self.head(), None)
    }

    /// Mean cross-entropy of `batch` outside autograd (no dropout): the eval loss.
    pub fn loss(&self, batch: &Batch) -> Result<f32> {
        let ctx = self.ctx(batch, false, None)?;
        let (h, _, _) = self.hidden(&batch.tokens, &ctx, false)?;
        let l = self.kernels.linear_cross_entropy(
            &h,
            self.head(),
            &batch.targets,
            &Default::default(),
            None,
        )?;
        l.to_dtype(DType::F32)?.to_scalar::<f32>()
    }

    /// Validates `batch` and builds the forward context.
    pub(crate) fn ctx(&self, batch: &Batch, tape: bool, dropout: Option<u64>) -> Result<Ctx> {
        let tk = &batch.tokens;
        if tk.dtype() != DType::U32 || tk.rank() != 2 {
            fail!(
                WHAT,
                "batch tokens must be u32 [B, T], got {:?} {:?}",
                tk.dtype(),
                tk.dims()
            )
        }
        let (b, t) = tk.dims2()?;
        if b == 0 || t == 0 {
            fail!(WHAT, "empty batch: tokens {:?}", tk.dims())
        }
        if !tk.device().same_device(&self.device) {
            fail!(
                WHAT,
                "batch tokens are on {:?}, the model on {:?}",
                tk.device().location(),
                self.device.location()
            )
        }
        let max = tk.flatten_all()?.max(0)?.to_scalar::<u32>()?;
        if max as usize >= self.cfg.vocab_size {
            fail!(
                WHAT,
                "token id {max} is outside the vocabulary (vocab_size {})",
                self.cfg.vocab_size
            )
        }
        let tg = &batch.targets;
        if tg.dims() != [b, t] || !matches!(tg.dtype(), DType::I64 | DType::U32) {
            fail!(
                WHAT,
                "batch targets must be i64 [B, T] = [{b}, {t}], got {:?} {:?}",
                tg.dtype(),
                tg.dims()
            )
        }
        if let Some(w) = self.cfg.sliding_window {
            if t > w {
                fail!(WHAT, "sequence length {t} exceeds the sliding window {w} (sliding-window attention is not implemented)")
            }
        }
        let positions = match &batch.positions {
            Some(p) => {
                if !(p.dims() == [b, t] || p.dims() == [t])
                    || !matches!(p.dtype(), DType::U32 | DType::I64)
                {
                    fail!(
                        WHAT,
                        "batch positions must be u32/i64 [B, T] or [T], got {:?} {:?}",
                        p.dtype(),
                        p.dims()
                    )
                }
                p.to_dtype(DType::U32)?
            }
            None => Tensor::arange(0u32, t as u32, &self.device)?,
        };
        let pmax = positions.flatten_all()?.max(0)?.to_scalar::<u32>()? as usize;
        let limit = self.rope.cos().dim(0)?;
        if pmax >= limit {
            fail!(WHAT, "position {pmax} is beyond the {limit} positions of the RoPE table (max_position_embeddings {})", self.cfg.max_position_embeddings)
        }
        let mask = match &batch.segments {
            Some(s) => {
                if s.dims() != [b, t] || !matches!(s.dtype(), DType::U32 | DType::I64) {
                    fail!(
                        WHAT,
                        "batch segments must be u32/i64 [B, T], got {:?} {:?}",
                        s.dtype(),
                        s.dims()
                    )
                }
                Some(segment_mask(s, self.dtype)?)
            }
            None => None,
        };
        Ok(Ctx {
            b,
            t,
            positions,
            mask,
            tape,
            dropout,
        })
    }

    /// The adapter of `(l, t)` as the ops take it, with its dropout mask for inputs of `rows`.
    pub(crate) fn adapter(
        &self,
        l: usize,
        t: Target,
        ctx: &Ctx,
        rows: usize,
    ) -> Result<Option<AdapterT>> {
        let Some(ad) = self
            .lora
            .as_ref()
            .and_then(|lo| lo.adapters[l][t.index()].as_ref())
        else {
            return Ok(None);
        };
        let (a, b) = if ctx.tape {
            (
                ad.a.as_tensor().to_dtype(self.dtype)?,
                ad.b.as_tensor().to_dtype(self.dtype)?,
            )
        } else {
            (
                ad.a.as_tensor().detach().to_dtype(self.dtype)?,
                ad.b.as_tensor().detach().to_dtype(self.dtype)?,
            )
        };
        let p = self.lora.as_ref().map(|l| l.spec.dropout).unwrap_or(0.0);
        let mask = match ctx.dropout {
            Some(seed) if p > 0.0 => {
                let k = ad.a.dim(1)?;
                let mut rng = SplitMix64::keyed(seed, l as u64, t.index() as u64);
                let keep = 1.0 / (1.0 - p as f64);
                let m: Vec<f32> = (0..rows * k)
                    .map(|_| {
                        if rng.next_f64() < p as f64 {
                            0.0
                        } else {
                            keep as f32
                        }
                    })
                    .collect();
                Some(Tensor::from_vec(m, (rows, k), &self.device)?.to_dtype(self.dtype)?)
            }
            _ => None,
        };
        Ok(Some(AdapterT {
            a,
            b,
            scale: ad.scale,
            mask,
        }))
    }

    /// `x·Wᵀ (+ bias) (+ LoRA)` of projection `t` of layer `l`; `x [B, T, in]`.
    pub(crate) fn proj(
        &self,
        l: usize,
        t: Target,
        x: &Tensor,
        ad: Option<&AdapterT>,
    ) -> Result<Tensor> {
        let layer = &self.layers[l];
        let (w, bias) = (&layer.proj[t.index()], layer.bias[t.index()].as_ref());
        match ad {
            None => self.kernels.linear(x, w, bias),
            Some(AdapterT {
                a,
                b,
                scale,
                mask: None,
            }) => self.kernels.lora_linear(x, w, bias, a, b, *scale),
            Some(AdapterT {
                a,
                b,
                scale,
                mask: Some(m),
            }) => {
                let dims = x.dims().to_vec();
                let k = dims[dims.len() - 1];
                let rows = x.elem_count() / k;
                let base = self.kernels.linear(x, w, bias)?;
                let xd = (x.reshape((rows, k))? * m)?;
                let low = (xd.matmul(&a.t()?)?.matmul(&b.t()?)? * *scale)?;
                let low = low.reshape(base.shape())?;
                base + low
            }
        }
    }

    /// Embeddings of `tokens [B, T]` (frozen: a plain tensor).
    pub(crate) fn embed_tokens(&self, tokens: &Tensor) -> Result<Tensor> {
        let (b, t) = tokens.dims2()?;
        self.embed
            .index_select(&tokens.flatten_all()?, 0)?
            .reshape((b, t, self.cfg.hidden_size))
    }

    /// The final normed hidden states `[B, T, H]`, the last residual `x_L`, and per layer its
    /// input `x_l` with (when `save`) what its backward needs.
    #[allow(clippy::type_complexity)]
    pub(crate) fn hidden(
        &self,
        tokens: &Tensor,
        ctx: &Ctx,
        save: bool,
    ) -> Result<(Tensor, Tensor, Vec<(Tensor, Option<Saved>)>)> {
        let k = &self.kernels;
        let eps = self.cfg.rms_norm_eps;
        let mut x = self.embed_tokens(tokens)?;
        let n = self.layers.len();
        let mut h = k.rms_norm(&x, Some(&self.layers[0].input_norm), eps)?;
        let mut per_layer = Vec::with_capacity(n);
        for l in 0..n {
            let keep = save && !self.checkpointing;
            let (m, s, saved) = self.layer(l, &h, &x, ctx, keep)?;
            let w_next = if l + 1 < n {
                &self.layers[l + 1].input_norm
            } else {
                &self.norm
            };
            let (h_next, x_next) = k.add_rms_norm(&m, &s, w_next, eps)?;
            per_layer.push((x, saved));
            h = h_next;
            x = x_next;
        }
        Ok((h, x, per_layer))
    }

    /// One layer from its normed input `h` and residual input `x`: returns the MLP output `m`,
    /// the post-attention residual `s` (the layer's output is `s + m`) and, with `save`, the
    /// activations of its backward.
    pub(crate) fn layer(
        &self,
        l: usize,
        h: &Tensor,
        x: &Tensor,
        ctx: &Ctx,
        save: bool,
    ) -> Result<(Tensor, Tensor, Option<Saved>)> {
        let (m, s, saved, _) = self.layer_kv(l, h, x, ctx, save, None)?;
        Ok((m, s, saved))
    }

    /// [`Model::layer`] after cached keys and values `past`; also returns all keys and values.
    #[allow(clippy::type_complexity)]
    pub(crate) fn layer_kv(
        &self,
        l: usize,
        h: &Tensor,
        x: &Tensor,
        ctx: &Ctx,
        save: bool,
        past: Option<&(Tensor, Tensor)>,
    ) -> Result<(Tensor, Tensor, Option<Saved>, (Tensor, Tensor))> {
        let rows = ctx.b * ctx.t;
        let mut ads = Vec::with_capacity(7);
        for t in Target::ALL {
            ads.push(self.adapter(l, t, ctx, rows)?);
        }
        let q = self.proj(l, Target::Q, h, ads[0].as_ref())?;
        let kk = self.proj(l, Target::K, h, ads[1].as_ref())?;
        let v = self.proj(l, Target::V, h, ads[2].as_ref())?;
        let (o, qh, kh, vh, p) = self.attention(
            &q,
            &kk,
            &v,
            &ctx.positions,
            ctx.mask.as_ref(),
            past,
            ctx.b,
            ctx.t,
        )?;
        let a = self.proj(l, Target::O, &o, ads[3].as_ref())?;
        let layer = &self.layers[l];
        let (h2, s) = self
            .kernels
            .add_rms_norm(&a, x, &layer.post_norm, self.cfg.rms_norm_eps)?;
        let gate = self.proj(l, Target::Gate, &h2, ads[4].as_ref())?;
        let up = self.proj(l, Target::Up, &h2, ads[5].as_ref())?;
        let act = self.kernels.glu(self.glu_kind(), &gate, &up)?;
        let m = self.proj(l, Target::Down, &act, ads[6].as_ref())?;
        let kv = (kh.clone(), vh.clone());
        let saved = save.then(|| Saved {
            h: h.clone(),
            q: qh,
            k: kh,
            v: vh,
            p,
            o,
            s: s.clone(),
            h2,
            gate,
            up,
            adapters: ads,
        });
        Ok((m, s, saved, kv))
    }

    pub(crate) fn glu_kind(&self) -> GluKind {
        match self.cfg.hidden_act {
            Activation::Silu => GluKind::SwiGlu,
            Activation::GeluTanh => GluKind::GeGluTanh,
        }
    }

    /// Attention of projected `q [B, T, Hq·D]`, `k`, `v [B, T, Hkv·D]` (with cached keys and
    /// values `past` before them). Returns the output `[B, T, Hq·D]`, the roped queries
    /// `[B, Hq, T, D]`, all keys and values `[B, Hkv, T_all, D]` and the probabilities.
    #[allow(clippy::too_many_arguments, clippy::type_complexity)]
    pub(crate) fn attention(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        positions: &Tensor,
        mask: Option<&Tensor>,
        past: Option<&(Tensor, Tensor)>,
        b: usize,
        t: usize,
    ) -> Result<(Tensor, Tensor, Tensor, Tensor, Tensor)> {
        let c = &self.cfg;
        let (hq, hkv, d, g) = (c.num_heads, c.num_kv_heads, c.head_dim, c.kv_groups());
        let heads = |x: &Tensor, n: usize| x.reshape((b, t, n, d))?.transpose(1, 2)?.contiguous();
        let style = RopeStyle::HalfSplit;
        let qh = self.kernels.rope(
            &heads(q, hq)?,
            &self.rope,
            positions,
            RopeLayout::Bhtd,
            style,
        )?;
        let kh = self.kernels.rope(
            &heads(k, hkv)?,
            &self.rope,
            positions,
            RopeLayout::Bhtd,
            style,
        )?;
        let vh = heads(v, hkv)?;
        let (kh, vh) = match past {
            Some((pk, pv)) => (Tensor::cat(&[pk, &kh], 2)?, Tensor::cat(&[pv, &vh], 2)?),
            None => (kh, vh),
        };
        let tk = kh.dim(2)?;
        let qg = qh.reshape((b, hkv, g * t, d))?;
        // Batched products on the CPU: one head per rayon task (ops::matmul).
        let scores = self
            .kernels
            .matmul(&qg, &kh, false, true)?
            .reshape((b, hq, t, tk))?;
        let p = self
            .kernels
            .masked_softmax(&scores, 1.0 / (d as f64).sqrt(), mask, true)?;
        let o = self
            .kernels
            .matmul(&p.reshape((b, hkv, g * t, tk))?, &vh, false, false)?
            .reshape((b, hq, t, d))?
            .transpose(1, 2)?
            .reshape((b, t, hq * d))?;
        Ok((o, qh, kh, vh, p))
    }
}

/// The additive block-diagonal mask `[B, 1, T, T]` of segment ids `[B, T]`: 0 within a
/// segment, `-inf` across (the causal part is the softmax's own flag).
pub(crate) fn segment_mask(seg: &Tensor, dtype: DType) -> Result<Tensor> {
    let (b, t) = seg.dims2()?;
    let s = seg.to_dtype(DType::U32)?;
    let same = s
        .unsqueeze(2)?
        .broadcast_as((b, t, t))?
        .eq(&s.unsqueeze(1)?.broadcast_as((b, t, t))?)?;
    let zero = Tensor::zeros((b, t, t), dtype, seg.device())?;
    let ninf = Tensor::full(f32::NEG_INFINITY, (b, t, t), seg.device())?.to_dtype(dtype)?;
    same.where_cond(&zero, &ninf)?.unsqueeze(1)
}
