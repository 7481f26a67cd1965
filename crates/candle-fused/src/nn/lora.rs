//! `LoraLinear`: a linear layer with a frozen base weight and a trainable low-rank adapter,
//! `y = x·Wᵀ + b + s·(dropout(x)·Aᵀ)·Bᵀ` with `s = alpha / r`, on the fused op
//! [`crate::ops::lora_linear`].
//!
//! - Initialised like PEFT: `A` Kaiming-uniform with `a = √5` (uniform in `±1/√in`, what
//!   `nn.Linear` and PEFT's default use), `B` zeros, so a fresh adapter leaves the output of the
//!   base layer unchanged.
//! - The base weight and bias are frozen (stored detached: they get no gradient and no
//!   gradient work, like PEFT's `bias = "none"`); `A` and `B` train with any candle-nn optimizer.
//! - Dropout applies to the adapter branch's input only, in training only
//!   ([`LoraLinear::forward_t`] with `train = true`, or [`LoraLinear::set_training`]). With dropout the two branches see different
//!   inputs, so that path runs the base product and the adapter branch as two fused calls (one
//!   extra pass over `y` and `dx`); without dropout (the default, and always at inference) it is
//!   one fused call.
//! - [`LoraLinear::merge`] folds `s·B·A` into the weight for inference at the speed of the base
//!   GEMM; [`LoraLinear::unmerge`] subtracts it again (like PEFT, exact up to the rounding of the
//!   weight's dtype).
//! - Save and load adapters in Hugging Face PEFT format with [`crate::nn::save_adapters`] and
//!   [`crate::nn::PeftAdapters`].

use std::collections::BTreeMap;

use candle_core::{DType, Module, Result, Tensor, Var};
use candle_nn::{Init, VarBuilder};

use crate::config::Kernels;
use crate::ops;
use crate::validate::fail;

const OP: &str = "LoraLinear";

/// LoRA hyper-parameters, named after PEFT's `LoraConfig` fields (in brackets).
#[derive(Debug, Clone, PartialEq)]
pub struct LoraConfig {
    /// The rank `r` [`r`].
    pub rank: usize,
    /// [`lora_alpha`]: the scale is `alpha / r` (or `alpha / √r` with `use_rslora`).
    pub alpha: f64,
    /// Dropout probability on the adapter branch's input, training only [`lora_dropout`].
    pub dropout: f32,
    /// Rank-stabilised scaling `alpha / √r` [`use_rslora`].
    pub use_rslora: bool,
    /// Module names or paths the adapters target [`target_modules`]. When saving, an empty
    /// list is replaced by the saved modules' paths.
    pub target_modules: Vec<String>,
    /// [`base_model_name_or_path`].
    pub base_model_name_or_path: Option<String>,
    /// [`task_type`], e.g. `CAUSAL_LM`; `None` for a bare model.
    pub task_type: Option<String>,
    /// Per-module ranks [`rank_pattern`]: a key matches a module path equal to it or ending in
    /// `.key` (PEFT's keys are regexes; they are matched literally here).
    pub rank_pattern: BTreeMap<String, usize>,
    /// Per-module alphas [`alpha_pattern`], matched like `rank_pattern`.
    pub alpha_pattern: BTreeMap<String, f64>,
}

impl LoraConfig {
    /// Rank `rank`, `lora_alpha = alpha`, no dropout, no targets.
    pub fn new(rank: usize, alpha: f64) -> Self {
        Self {
            rank,
            alpha,
            dropout: 0.0,
            use_rslora: false,
            target_modules: Vec::new(),
            base_model_name_or_path: None,
            task_type: None,
            rank_pattern: BTreeMap::new(),
            alpha_pattern: BTreeMap::new(),
        }
    }

    /// With dropout probability `p` (training only).
    pub fn with_dropout(mut self, p: f32) -> Self {
        self.dropout = p;
        self
    }

    /// With these target module names.
    pub fn with_target_modules<S: AsRef<str>>(mut self, names: &[S]) -> Self {
        self.target_modules = names.iter().map(|s| s.as_ref().to_string()).collect();
        self
    }

    /// The scale `s` for rank `r` and alpha `alpha` under this config's scaling rule.
    pub fn scale_of(&self, r: usize, alpha: f64) -> f64 {
        if self.use_rslora {
            alpha / (r as f64).sqrt()
        } else {
            alpha / r as f64
        }
    }

    /// The scale `s` of this config.
    pub fn scale(&self) -> f64 {
        self.scale_of(self.rank, self.alpha)
    }

    /// This config as it applies to the module at `path` (`rank_pattern`, `alpha_pattern`).
    pub fn for_module(&self, path: &str) -> LoraConfig {
        let matches = |key: &str| path == key || path.ends_with(&format!(".{key}"));
        let mut c = self.clone();
        if let Some((_, &r)) = self.rank_pattern.iter().find(|(k, _)| matches(k)) {
            c.rank = r;
        }
        if let Some((_, &a)) = self.alpha_pattern.iter().find(|(k, _)| matches(k)) {
            c.alpha = a;
        }
        c
    }

    fn check(&self) -> Result<()> {
        if self.rank == 0 {
            fail!(OP, "rank must be >= 1, got 0")
        }
        if !self.alpha.is_finite() {
            fail!(OP, "alpha must be finite, got {}", self.alpha)
        }
        if !(0.0..1.0).contains(&self.dropout) {
            fail!(OP, "dropout must be in [0, 1), got {}", self.dropout)
        }
        Ok(())
    }
}

/// A linear layer with a frozen base weight `[out, in]` (and bias `[out]`) plus a LoRA adapter
/// `A [r, in]`, `B [out, r]`. See the module documentation.
#[derive(Debug, Clone)]
pub struct LoraLinear {
    weight: Tensor,
    bias: Option<Tensor>,
    lora_a: Tensor,
    lora_b: Tensor,
    scale: f64,
    dropout: f32,
    enabled: bool,
    merged: bool,
    training: bool,
    kernels: Kernels,
}

impl LoraLinear {
    /// From explicit tensors. `weight` and `bias` are detached (frozen); `lora_a`/`lora_b` are
    /// kept as given (pass `Var`-backed tensors to train them). Runs on the default
    /// [`Kernels`] (see [`Self::with_kernels`]).
    pub fn new(
        weight: &Tensor,
        bias: Option<&Tensor>,
        lora_a: Tensor,
        lora_b: Tensor,
        scale: f64,
        dropout: f32,
    ) -> Result<Self> {
        let this = Self {
            weight: weight.detach(),
            bias: bias.map(|b| b.detach()),
            lora_a,
            lora_b,
            scale,
            dropout,
            enabled: true,
            merged: false,
            training: false,
            kernels: Kernels::default(),
        };
        this.check()?;
        Ok(this)
    }

    /// This layer running on `kernels` (e.g. `Kernels::new(KernelConfig::poisoned())` in
    /// tests, or a tuned configuration).
    pub fn with_kernels(mut self, kernels: Kernels) -> Self {
        self.kernels = kernels;
        self
    }

    /// The kernels this layer runs on.
    pub fn kernels(&self) -> &Kernels {
        &self.kernels
    }

    fn check(&self) -> Result<()> {
        if self.weight.rank() != 2 {
            fail!(
                OP,
                "weight must have shape [out, in], got {:?}",
                self.weight.dims()
            )
        }
        let (n, k) = self.weight.dims2()?;
        // The op's own validation gives the messages (shapes, dtypes, devices, r, scale); a
        // one-row x stands for the layer's input (nothing is computed).
        let x = Tensor::zeros((1, k), self.weight.dtype(), self.weight.device())?;
        ops::check_lora(
            "lora_linear",
            &x,
            &self.weight,
            self.bias.as_ref(),
            &self.lora_a,
            &self.lora_b,
            self.scale,
        )
        .map_err(|e| crate::validate::err(OP, format!("invalid layer ({n}x{k}): {e}")))?;
        if !(0.0..1.0).contains(&self.dropout) {
            fail!(OP, "dropout must be in [0, 1), got {}", self.dropout)
        }
        Ok(())
    }

    /// Wraps an existing `candle_nn::Linear`: the adapter's `lora_A.weight` (`[r, in]`,
    /// Kaiming-uniform) and `lora_B.weight` (`[out, r]`, zeros) come from `vb` (created there
    /// when `vb` is backed by a `VarMap`, loaded otherwise).
    pub fn from_linear(base: &candle_nn::Linear, cfg: &LoraConfig, vb: VarBuilder) -> Result<Self> {
        cfg.check()?;
        let (out_dim, in_dim) = base.weight().dims2()?;
        let (a, b) = adapter_vars(in_dim, out_dim, cfg, &vb)?;
        Self::new(base.weight(), base.bias(), a, b, cfg.scale(), cfg.dropout)
    }

    /// The base weight `[out, in]` (merged when [`Self::is_merged`]).
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }
    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }
    /// `A`, `[r, in]`.
    pub fn lora_a(&self) -> &Tensor {
        &self.lora_a
    }
    /// `B`, `[out, r]`.
    pub fn lora_b(&self) -> &Tensor {
        &self.lora_b
    }
    pub fn scale(&self) -> f64 {
        self.scale
    }
    pub fn rank(&self) -> usize {
        self.lora_a.dims()[0]
    }
    pub fn in_dim(&self) -> usize {
        self.weight.dims()[1]
    }
    pub fn out_dim(&self) -> usize {
        self.weight.dims()[0]
    }
    pub fn dropout(&self) -> f32 {
        self.dropout
    }
    pub fn set_dropout(&mut self, p: f32) -> Result<()> {
        if !(0.0..1.0).contains(&p) {
            fail!(OP, "dropout must be in [0, 1), got {p}")
        }
        self.dropout = p;
        Ok(())
    }

    /// Training mode for [`Module::forward`] (and so `ModuleT`): dropout on the adapter input
    /// when on. Off by default.
    pub fn set_training(&mut self, on: bool) {
        self.training = on;
    }
    pub fn is_training(&self) -> bool {
        self.training
    }

    /// Is the adapter applied in `forward`?
    pub fn is_adapter_enabled(&self) -> bool {
        self.enabled
    }

    /// Turns the adapter on or off (off: the output is the base layer's). Disabling a merged
    /// layer unmerges it first.
    pub fn set_adapter_enabled(&mut self, on: bool) -> Result<()> {
        if !on && self.merged {
            self.unmerge()?;
        }
        self.enabled = on;
        Ok(())
    }

    pub fn is_merged(&self) -> bool {
        self.merged
    }

    /// `s·B·A` in f32 (f64 for f64 weights), shape `[out, in]`.
    fn delta(&self) -> Result<Tensor> {
        let ct = if self.weight.dtype() == DType::F64 {
            DType::F64
        } else {
            DType::F32
        };
        let b = self.lora_b.detach().to_dtype(ct)?;
        let a = self.lora_a.detach().to_dtype(ct)?;
        b.matmul(&a)?.affine(self.scale, 0.0)
    }

    /// Folds the adapter into the weight, `W ← W + s·B·A` (computed in f32, rounded once), so
    /// `forward` costs one base GEMM. Inference only: a merged layer gives `A` and `B` no
    /// gradient. Errors if already merged or the adapter is disabled.
    pub fn merge(&mut self) -> Result<()> {
        if self.merged {
            fail!(OP, "merge: the adapter is already merged")
        }
        if !self.enabled {
            fail!(OP, "merge: the adapter is disabled")
        }
        let dt = self.weight.dtype();
        let delta = self.delta()?;
        let w = (self.weight.to_dtype(delta.dtype())? + delta)?;
        self.weight = w.to_dtype(dt)?.detach();
        self.merged = true;
        Ok(())
    }

    /// Undoes [`Self::merge`]: `W ← W − s·B·A`. Errors if not merged.
    pub fn unmerge(&mut self) -> Result<()> {
        if !self.merged {
            fail!(OP, "unmerge: the adapter is not merged")
        }
        let dt = self.weight.dtype();
        let delta = self.delta()?;
        let w = (self.weight.to_dtype(delta.dtype())? - delta)?;
        self.weight = w.to_dtype(dt)?.detach();
        self.merged = false;
        Ok(())
    }

    /// The trainable parameters, `[A, B]`, as `Var`s for an optimizer. Adapters that are not
    /// variables yet (e.g. loaded from a file) are turned into variables first.
    pub fn trainable_vars(&mut self) -> Result<Vec<Var>> {
        let a = Var::from_tensor(&self.lora_a)?;
        let b = Var::from_tensor(&self.lora_b)?;
        self.lora_a = a.as_tensor().clone();
        self.lora_b = b.as_tensor().clone();
        Ok(vec![a, b])
    }

    /// Replaces the adapter (e.g. one loaded from a PEFT file), converted to the weight's dtype
    /// and device. Errors if merged.
    pub fn set_adapter(&mut self, lora_a: &Tensor, lora_b: &Tensor, scale: f64) -> Result<()> {
        if self.merged {
            fail!(OP, "set_adapter: unmerge first")
        }
        let conv = |t: &Tensor| -> Result<Tensor> {
            t.to_device(self.weight.device())?
                .to_dtype(self.weight.dtype())
        };
        let mut next = self.clone();
        next.lora_a = conv(lora_a)?;
        next.lora_b = conv(lora_b)?;
        next.scale = scale;
        next.check()?;
        *self = next;
        Ok(())
    }
}

/// `lora_A.weight` and `lora_B.weight` from `vb`, initialised like PEFT.
fn adapter_vars(
    in_dim: usize,
    out_dim: usize,
    cfg: &LoraConfig,
    vb: &VarBuilder,
) -> Result<(Tensor, Tensor)> {
    let bound = 1.0 / (in_dim as f64).sqrt();
    let a = vb.get_with_hints(
        (cfg.rank, in_dim),
        "lora_A.weight",
        Init::Uniform {
            lo: -bound,
            up: bound,
        },
    )?;
    let b = vb.get_with_hints((out_dim, cfg.rank), "lora_B.weight", Init::Const(0.0))?;
    Ok((a, b))
}

impl LoraLinear {
    /// Forward with an explicit training flag (dropout only when `train`). This inherent method
    /// is what `layer.forward_t(x, train)` calls; Candle's blanket `ModuleT` impl (through
    /// [`Module`]) uses [`Self::set_training`]'s flag instead.
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let k = &self.kernels;
        if self.merged || !self.enabled {
            return k.linear(x, &self.weight, self.bias.as_ref());
        }
        if train && self.dropout > 0.0 {
            let base = k.linear(x, &self.weight, self.bias.as_ref())?;
            let xd = candle_nn::ops::dropout(x, self.dropout)?;
            let low = k.lora_adapter(&xd, &self.lora_a, &self.lora_b, self.scale)?;
            return base + low;
        }
        k.lora_linear(
            x,
            &self.weight,
            self.bias.as_ref(),
            &self.lora_a,
            &self.lora_b,
            self.scale,
        )
    }
}

impl Module for LoraLinear {
    /// Forward in the mode of [`LoraLinear::set_training`] (inference by default: no dropout).
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_t(x, self.training)
    }
}

/// A LoRA linear layer whose base weights come from `vb` as `candle_nn::linear_b` names them
/// (`weight`, `bias`) and whose adapter is `vb["lora_A.weight"]`, `vb["lora_B.weight"]` (PEFT's
/// names). With a `VarMap`-backed `vb`, missing tensors are created (base like candle-nn,
/// adapter like PEFT); the base stays frozen either way.
pub fn lora_linear_b(
    in_dim: usize,
    out_dim: usize,
    bias: bool,
    cfg: &LoraConfig,
    vb: VarBuilder,
) -> Result<LoraLinear> {
    cfg.check()?;
    let base = candle_nn::linear_b(in_dim, out_dim, bias, vb.clone())?;
    LoraLinear::from_linear(&base, cfg, vb)
}

/// [`lora_linear_b`] with a bias.
pub fn lora_linear(
    in_dim: usize,
    out_dim: usize,
    cfg: &LoraConfig,
    vb: VarBuilder,
) -> Result<LoraLinear> {
    lora_linear_b(in_dim, out_dim, true, cfg, vb)
}
