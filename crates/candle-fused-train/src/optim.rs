//! AdamW on the LoRA parameters (decoupled weight decay, f32 state, PyTorch's update order so
//! steps match `torch.optim.AdamW` to rounding), learning-rate schedules as in transformers'
//! `get_{constant,linear,cosine}_schedule_with_warmup`, and global gradient-norm clipping as
//! `torch.nn.utils.clip_grad_norm_`.

use std::collections::BTreeMap;

use candle_core::{DType, Result, Tensor, Var};

use crate::backward::LoraGrads;
use crate::util::fail;

const WHAT: &str = "optim";

/// AdamW hyper-parameters (PyTorch's defaults except the weight decay, which PEFT recipes
/// usually set to 0).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }
}

/// AdamW state: first and second moments per parameter key (f32), and the step count.
#[derive(Debug, Clone)]
pub struct AdamW {
    pub config: AdamWConfig,
    /// Steps taken.
    pub step: u64,
    m: BTreeMap<String, Tensor>,
    v: BTreeMap<String, Tensor>,
}

impl AdamW {
    /// Fresh state.
    pub fn new(config: AdamWConfig) -> Result<Self> {
        let c = config;
        if !(0.0..1.0).contains(&c.beta1) || !(0.0..1.0).contains(&c.beta2) {
            fail!(
                WHAT,
                "betas must be in [0, 1), got ({}, {})",
                c.beta1,
                c.beta2
            )
        }
        let ok = c.eps > 0.0 && c.weight_decay >= 0.0 && c.eps.is_finite();
        if !ok {
            fail!(
                WHAT,
                "eps must be > 0 and weight_decay >= 0, got {} and {}",
                c.eps,
                c.weight_decay
            )
        }
        Ok(Self {
            config,
            step: 0,
            m: BTreeMap::new(),
            v: BTreeMap::new(),
        })
    }

    /// One update of `params` with `grads` (matched by key; a parameter without gradient is
    /// left alone, like PyTorch's `p.grad is None`) at learning rate `lr`.
    pub fn step(&mut self, params: &[(String, Var)], grads: &LoraGrads, lr: f64) -> Result<()> {
        let c = self.config;
        self.step += 1;
        let t = self.step as i32;
        let bc1 = 1.0 - c.beta1.powi(t);
        let bc2 = 1.0 - c.beta2.powi(t);
        let step_size = lr / bc1;
        let bc2_sqrt = bc2.sqrt();
        for (key, p) in params {
            let Some(g) = grads.get(key) else { continue };
            if g.dims() != p.dims() {
                fail!(
                    WHAT,
                    "gradient of {key} has shape {:?}, the parameter {:?}",
                    g.dims(),
                    p.dims()
                )
            }
            let g = g.to_dtype(DType::F32)?;
            let mut theta = p.as_tensor().detach();
            if c.weight_decay != 0.0 {
                theta = (&theta * (1.0 - lr * c.weight_decay))?;
            }
            let m = match self.m.get(key) {
                Some(m) => ((m * c.beta1)? + (&g * (1.0 - c.beta1))?)?,
                None => (&g * (1.0 - c.beta1))?,
            };
            let g2 = g.sqr()?;
            let v = match self.v.get(key) {
                Some(v) => ((v * c.beta2)? + (g2 * (1.0 - c.beta2))?)?,
                None => (g2 * (1.0 - c.beta2))?,
            };
            let denom = ((v.sqrt()? / bc2_sqrt)? + c.eps)?;
            let theta = (theta - ((&m / denom)? * step_size)?)?;
            p.set(&theta)?;
            self.m.insert(key.clone(), m);
            self.v.insert(key.clone(), v);
        }
        Ok(())
    }

    /// The moments as named tensors (`m.<key>`, `v.<key>`) for a checkpoint.
    pub fn state_tensors(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::new();
        for (k, t) in &self.m {
            out.push((format!("m.{k}"), t.clone()));
        }
        for (k, t) in &self.v {
            out.push((format!("v.{k}"), t.clone()));
        }
        out
    }

    /// Restores the moments saved by [`AdamW::state_tensors`] and the step count.
    pub fn load_state(
        &mut self,
        tensors: impl IntoIterator<Item = (String, Tensor)>,
        step: u64,
    ) -> Result<()> {
        self.m.clear();
        self.v.clear();
        for (k, t) in tensors {
            if let Some(key) = k.strip_prefix("m.") {
                self.m.insert(key.to_string(), t.to_dtype(DType::F32)?);
            } else if let Some(key) = k.strip_prefix("v.") {
                self.v.insert(key.to_string(), t.to_dtype(DType::F32)?);
            } else {
                fail!(WHAT, "optimizer state holds an unknown tensor {k:?}")
            }
        }
        self.step = step;
        Ok(())
    }
}

/// Scales `grads` so their global norm is at most `max_norm` (`clip_grad_norm_`: factor
/// `max_norm / (norm + 1e-6)` when below 1). Returns the norm before clipping.
pub fn clip_grad_norm(grads: &mut LoraGrads, max_norm: f64) -> Result<f64> {
    let norm = grads.global_norm()?;
    if max_norm > 0.0 && norm.is_finite() {
        let coef = max_norm / (norm + 1e-6);
        if coef < 1.0 {
            grads.scale(coef)?;
        }
    }
    Ok(norm)
}

/// Learning-rate schedules (the multiplier of the peak rate at a step, transformers' maths).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Schedule {
    /// Linear warmup, then constant.
    Constant,
    /// Linear warmup, then linear decay to 0 at the last step.
    Linear,
    /// Linear warmup, then half a cosine to 0 at the last step.
    Cosine,
}

impl Schedule {
    /// Parses `constant`, `linear` or `cosine`.
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "constant" => Ok(Schedule::Constant),
            "linear" => Ok(Schedule::Linear),
            "cosine" => Ok(Schedule::Cosine),
            _ => fail!(WHAT, "unknown schedule {s:?} (constant, linear, cosine)"),
        }
    }

    /// The name.
    pub fn name(self) -> &'static str {
        match self {
            Schedule::Constant => "constant",
            Schedule::Linear => "linear",
            Schedule::Cosine => "cosine",
        }
    }

    /// The learning rate at optimizer step `step` (0-based) of `total`, peak `lr`, `warmup`
    /// warmup steps.
    pub fn lr(self, lr: f64, step: usize, warmup: usize, total: usize) -> f64 {
        if step < warmup {
            return lr * step as f64 / warmup.max(1) as f64;
        }
        let progress = (step - warmup) as f64 / (total.saturating_sub(warmup)).max(1) as f64;
        match self {
            Schedule::Constant => lr,
            Schedule::Linear => lr * (1.0 - progress).max(0.0),
            Schedule::Cosine => {
                lr * (0.5 * (1.0 + (std::f64::consts::PI * progress).cos())).max(0.0)
            }
        }
    }
}
