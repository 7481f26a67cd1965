//! The training step's gradients, two ways.
//!
//! **Explicit** ([`Model::loss_and_grads`]): the forward runs outside autograd, each layer
//! saving only what its backward needs (or only its input, with activation checkpointing);
//! the loss and `dh` come from `linear_cross_entropy_forward_backward` (never the full
//! `[tokens, vocab]` logits, no dW for the frozen head); then the layers are walked in
//! reverse on the standalone backward ops: `add_rms_norm_backward` / `rms_norm_backward`,
//! `lora_linear_backward` (frozen `W`: no dW), the GLU and RoPE backwards, `softmax_backward`
//! and the four attention matmuls. Layer 0's q/k/v skip `dx` (the embedding is frozen).
//! Gradients are kept in f32 under their PEFT keys.
//!
//! **Tape** ([`Model::loss_and_grads_tape`]): the same forward with the adapters tracked,
//! logits, cross-entropy and `Tensor::backward`: the reference the explicit gradients are
//! tested against, and a baseline of the bench.

use std::collections::BTreeMap;

use candle_core::{DType, Result, Tensor};
use candle_fused::nn::peft_key;

use crate::kops;
use crate::lora::Target;
use crate::model::{AdapterT, Batch, Ctx, Model, Saved, WHAT};
use crate::util::fail;

/// LoRA gradients (f32) keyed by PEFT key, e.g.
/// `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`.
#[derive(Debug, Clone, Default)]
pub struct LoraGrads {
    map: BTreeMap<String, Tensor>,
}

impl LoraGrads {
    /// The gradient of `key`.
    pub fn get(&self, key: &str) -> Option<&Tensor> {
        self.map.get(key)
    }

    /// `(key, gradient)` sorted by key.
    pub fn iter(&self) -> impl Iterator<Item = (&String, &Tensor)> {
        self.map.iter()
    }

    /// The keys, sorted.
    pub fn keys(&self) -> impl Iterator<Item = &String> {
        self.map.keys()
    }

    /// Number of tensors.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Sets the gradient of `key`.
    pub fn insert(&mut self, key: String, g: Tensor) {
        self.map.insert(key, g);
    }

    /// `self += k · other` (keys missing in `self` are added).
    pub fn add_scaled(&mut self, other: &LoraGrads, k: f64) -> Result<()> {
        for (key, g) in &other.map {
            let g = (g * k)?;
            let v = match self.map.remove(key) {
                Some(acc) => (acc + g)?,
                None => g,
            };
            self.map.insert(key.clone(), v);
        }
        Ok(())
    }

    /// Every gradient times `k`.
    pub fn scale(&mut self, k: f64) -> Result<()> {
        for g in self.map.values_mut() {
            *g = (&*g * k)?;
        }
        Ok(())
    }

    /// The global L2 norm `sqrt(Σ ‖g‖²)` (f64 accumulation of per-tensor f32 sums).
    pub fn global_norm(&self) -> Result<f64> {
        let mut s = 0f64;
        for g in self.map.values() {
            s += g
                .sqr()?
                .sum_all()?
                .to_dtype(DType::F64)?
                .to_scalar::<f64>()?;
        }
        Ok(s.sqrt())
    }

    /// Whether every element is finite.
    pub fn all_finite(&self) -> Result<bool> {
        Ok(self.global_norm()?.is_finite())
    }
}

/// Gradients of one projection's backward.
struct ProjGrads {
    dx: Option<Tensor>,
    /// `(dA, dB)` in the compute dtype.
    ad: Option<(Tensor, Tensor)>,
}

impl Model {
    /// Loss and LoRA gradients of `batch` through the explicit backward (training mode:
    /// LoRA dropout applies). See the module documentation.
    pub fn loss_and_grads(&self, batch: &Batch) -> Result<(f32, LoraGrads)> {
        self.loss_and_grads_scaled(batch, 1.0)
    }

    /// [`Model::loss_and_grads`] for `dloss · loss` (gradient accumulation weights each
    /// micro-batch by its share of the tokens). The returned loss is unscaled.
    pub fn loss_and_grads_scaled(&self, batch: &Batch, dloss: f64) -> Result<(f32, LoraGrads)> {
        let lora = self.need_lora("loss_and_grads")?;
        let _ = lora;
        let seed = self.next_dropout_seed();
        let ctx = self.ctx(batch, false, Some(seed))?;
        let (hf, x_last, per_layer) = self.hidden(&batch.tokens, &ctx, true)?;
        let lce = self.kernels.linear_cross_entropy_forward_backward(
            &hf,
            self.head(),
            &batch.targets,
            &Default::default(),
            None,
            false,
            dloss,
        )?;
        let loss = lce.loss.to_dtype(DType::F32)?.to_scalar::<f32>()?;
        let eps = self.cfg.rms_norm_eps;
        let k = &self.kernels;
        // The final norm: hf = rms_norm(x_L) · w.
        let (mut gx, _) = k.rms_norm_backward(&x_last, Some(&self.norm), &lce.dh, eps)?;
        let mut grads = LoraGrads::default();
        for (l, (x, saved)) in per_layer.into_iter().enumerate().rev() {
            let saved = match saved {
                Some(s) => s,
                None => {
                    // Activation checkpointing: recompute this layer from its input.
                    let h = k.rms_norm(&x, Some(&self.layers[l].input_norm), eps)?;
                    self.layer(l, &h, &x, &ctx, true)?
                        .2
                        .ok_or_else(|| crate::util::err(WHAT, "internal: no saved activations"))?
                }
            };
            gx = self.layer_backward(l, &x, &saved, &gx, &ctx, &mut grads)?;
        }
        Ok((loss, grads))
    }

    /// Loss and LoRA gradients of `batch` through Candle's tape (`Tensor::backward`), with the
    /// same forward code (training mode: LoRA dropout applies, same stream as the explicit
    /// path).
    pub fn loss_and_grads_tape(&self, batch: &Batch) -> Result<(f32, LoraGrads)> {
        self.need_lora("loss_and_grads_tape")?;
        let seed = self.next_dropout_seed();
        let ctx = self.ctx(batch, true, Some(seed))?;
        let (h, _, _) = self.hidden(&batch.tokens, &ctx, false)?;
        let logits = self.kernels.linear(&h, self.head(), None)?;
        let loss = self
            .kernels
            .cross_entropy(&logits, &batch.targets, &Default::default())?;
        let store = loss.backward()?;
        let mut grads = LoraGrads::default();
        for (key, var) in self.lora_vars() {
            let g = match store.get(var.as_tensor()) {
                Some(g) => g.to_dtype(DType::F32)?,
                None => var.as_tensor().zeros_like()?,
            };
            grads.insert(key, g);
        }
        Ok((loss.to_dtype(DType::F32)?.to_scalar::<f32>()?, grads))
    }

    fn need_lora(&self, op: &str) -> Result<&crate::lora::Lora> {
        match &self.lora {
            Some(l) => Ok(l),
            None => fail!(
                WHAT,
                "{op}: the model has no LoRA adapters (call add_lora or load_adapter first)"
            ),
        }
    }

    fn next_dropout_seed(&self) -> u64 {
        self.dropout_state
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    }

    /// One layer's backward: from the gradient `gx_out` of its output residual, returns the
    /// gradient of its input residual `x` (for layer 0: zeros are not computed; the returned
    /// tensor is unused). Adapter gradients go into `grads`.
    fn layer_backward(
        &self,
        l: usize,
        x: &Tensor,
        sv: &Saved,
        gx_out: &Tensor,
        ctx: &Ctx,
        grads: &mut LoraGrads,
    ) -> Result<Tensor> {
        let k = &self.kernels;
        let eps = self.cfg.rms_norm_eps;
        let layer = &self.layers[l];
        let ad = |t: Target| sv.adapters[t.index()].as_ref();
        let mut put = |t: Target, g: ProjGrads| -> Result<Option<Tensor>> {
            if let Some((da, db)) = g.ad {
                let path = t.module_path(l);
                grads.insert(peft_key(&path, "lora_A"), da.to_dtype(DType::F32)?);
                grads.insert(peft_key(&path, "lora_B"), db.to_dtype(DType::F32)?);
            }
            Ok(g.dx)
        };
        // MLP: m = down(glu(gate(h2), up(h2))).
        let act = self.kernels.glu(self.glu_kind(), &sv.gate, &sv.up)?;
        let g = self.proj_backward(l, Target::Down, &act, gx_out, ad(Target::Down), true)?;
        let dact = put(Target::Down, g)?.ok_or_else(missing)?;
        let (dgate, dup) = self
            .kernels
            .glu_backward(self.glu_kind(), &sv.gate, &sv.up, &dact)?;
        let g = self.proj_backward(l, Target::Gate, &sv.h2, &dgate, ad(Target::Gate), true)?;
        let dh2_g = put(Target::Gate, g)?.ok_or_else(missing)?;
        let g = self.proj_backward(l, Target::Up, &sv.h2, &dup, ad(Target::Up), true)?;
        let dh2 = (dh2_g + put(Target::Up, g)?.ok_or_else(missing)?)?;
        // (h2, s) = add_rms_norm(a, x): the gradient of s (= of a and of x).
        let (gs, _) = k.add_rms_norm_backward(&sv.s, &layer.post_norm, &dh2, gx_out, eps)?;
        // Attention.
        let g = self.proj_backward(l, Target::O, &sv.o, &gs, ad(Target::O), true)?;
        let d_o = put(Target::O, g)?.ok_or_else(missing)?;
        let (dq, dk, dv) = self.attention_backward(sv, &d_o, ctx)?;
        let need_dx = l > 0;
        let mut dh: Option<Tensor> = None;
        for (t, dy) in [(Target::Q, &dq), (Target::K, &dk), (Target::V, &dv)] {
            let g = self.proj_backward(l, t, &sv.h, dy, ad(t), need_dx)?;
            if let Some(dx) = put(t, g)? {
                dh = Some(match dh {
                    Some(acc) => (acc + dx)?,
                    None => dx,
                });
            }
        }
        match dh {
            // (h, x) came out of the previous add_rms_norm with this layer's input norm.
            Some(dh) => Ok(k
                .add_rms_norm_backward(x, &layer.input_norm, &dh, &gs, eps)?
                .0),
            None => Ok(gs),
        }
    }

    /// `(dq, dk, dv)` as `[B, T, H·D]` from the gradient of the attention output.
    fn attention_backward(
        &self,
        sv: &Saved,
        d_o: &Tensor,
        ctx: &Ctx,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let c = &self.cfg;
        let (b, t) = (ctx.b, ctx.t);
        let (hq, hkv, d, g) = (c.num_heads, c.num_kv_heads, c.head_dim, c.kv_groups());
        let scale = 1.0 / (d as f64).sqrt();
        let dog = d_o
            .reshape((b, t, hq, d))?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((b, hkv, g * t, d))?;
        let pg = sv.p.reshape((b, hkv, g * t, t))?;
        let mm = |a: &Tensor, b: &Tensor, ta, tb| self.kernels.matmul(a, b, ta, tb);
        let dp = mm(&dog, &sv.v, false, true)?.reshape((b, hq, t, t))?;
        let dv = mm(&pg, &dog, true, false)?;
        let ds = self.kernels.softmax_backward(&sv.p, &dp, scale)?;
        let dsg = ds.reshape((b, hkv, g * t, t))?;
        let dq = mm(&dsg, &sv.k, false, false)?.reshape((b, hq, t, d))?;
        let qg = sv.q.reshape((b, hkv, g * t, d))?;
        let dk = mm(&dsg, &qg, true, false)?;
        let style = kops::RopeStyle::HalfSplit;
        let layout = kops::RopeLayout::Bhtd;
        let dq = self
            .kernels
            .rope_backward(&dq, &self.rope, &ctx.positions, layout, style)?;
        let dk = self
            .kernels
            .rope_backward(&dk, &self.rope, &ctx.positions, layout, style)?;
        let flat = |x: Tensor, n: usize| x.transpose(1, 2)?.reshape((b, t, n * d));
        Ok((flat(dq, hq)?, flat(dk, hkv)?, flat(dv, hkv)?))
    }

    /// The backward of projection `t` of layer `l` (input `x`, output gradient `dy`): `dx`
    /// (when `need_dx`) and the adapter's `(dA, dB)`; the frozen weight and bias get none.
    fn proj_backward(
        &self,
        l: usize,
        t: Target,
        x: &Tensor,
        dy: &Tensor,
        ad: Option<&AdapterT>,
        need_dx: bool,
    ) -> Result<ProjGrads> {
        let layer = &self.layers[l];
        let (w, bias) = (&layer.proj[t.index()], layer.bias[t.index()].as_ref());
        let kdim = x.dim(candle_core::D::Minus1)?;
        let n = w.dim(0)?;
        let rows = x.elem_count() / kdim;
        let base_dx = |dy2: &Tensor| -> Result<Tensor> { dy2.matmul(w) };
        match ad {
            None => {
                let dx = if need_dx {
                    Some(base_dx(&dy.reshape((rows, n))?)?.reshape(x.shape())?)
                } else {
                    None
                };
                Ok(ProjGrads { dx, ad: None })
            }
            Some(AdapterT {
                a,
                b,
                scale,
                mask: None,
            }) if need_dx => {
                let g = self
                    .kernels
                    .lora_linear_backward(x, w, bias, a, b, *scale, dy)?;
                Ok(ProjGrads {
                    dx: Some(g.dx),
                    ad: Some((g.da, g.db)),
                })
            }
            Some(AdapterT { a, b, scale, mask }) => {
                // The adapter sees x ⊙ mask (dropout) or x; products on [rows, r] only.
                let x2 = x.reshape((rows, kdim))?;
                let xd = match mask {
                    Some(m) => (&x2 * m)?,
                    None => x2,
                };
                let dy2 = dy.reshape((rows, n))?;
                let gr = (dy2.matmul(b)? * *scale)?; // [rows, r]
                let da = gr.t()?.matmul(&xd)?;
                let u = (xd.matmul(&a.t()?)? * *scale)?;
                let db = dy2.t()?.matmul(&u)?;
                let dx = if need_dx {
                    let mut low = gr.matmul(a)?;
                    if let Some(m) = mask {
                        low = (low * m)?;
                    }
                    Some((base_dx(&dy2)? + low)?.reshape(x.shape())?)
                } else {
                    None
                };
                Ok(ProjGrads {
                    dx,
                    ad: Some((da, db)),
                })
            }
        }
    }
}

fn missing() -> candle_core::Error {
    crate::util::err(WHAT, "internal: a backward returned no dx")
}
