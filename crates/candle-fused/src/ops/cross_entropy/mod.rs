//! Cross-entropy over the last dimension (`V` classes) with integer targets.
//!
//! For one row of logits `x` (length `V`) with target class `t`:
//! - optional soft-capping (Gemma 2): `z = c·tanh(x / c)`, else `z = x`;
//! - `lse = log Σ_j exp(z_j)` (max, then the sum of `exp(z − max)`; f32 for half inputs);
//! - `loss = lse − (1 − ε)·z_t − (ε / V)·Σ_j z_j + λ·lse²`,
//!
//! that is `(1 − ε)·(−log p_t) + ε·mean_j(−log p_j)` (PyTorch's label smoothing `ε`) plus the
//! z-loss `λ·lse²`. Rows whose target is `ignore_index` contribute nothing: `Mean` divides the
//! sum over the other rows by their count `n_valid`, `Sum` does not divide. **When every target
//! is ignored the loss is 0 and the gradient is zero** (PyTorch gives NaN for the mean of
//! nothing; a batch made only of prompt tokens should not poison a training run).
//!
//! Backward for a counted row, with `p = softmax(z)` and `s = dloss / n_valid` (`Mean`) or
//! `dloss` (`Sum`):
//! `dz_j = s·(p_j·(1 + 2λ·lse) − ε/V − (1 − ε)·[j = t])`, and with soft-capping
//! `dx_j = dz_j·(1 − tanh²(x_j / c))`. Ignored rows get a zero gradient.
//!
//! Written without cancellation: the loss as `(m − z_t) + ln Σ exp(z − m) + ε·(z_t − Σz/V) +
//! λ·lse²` (`m` the row max), and the target's gradient as `ε·(V−1)/V − Σ_{j≠t} p_j +
//! 2λ·lse·p_t` with the sum over the other classes reduced on its own (so a confident
//! prediction, `p_t → 1`, or `V = 1` keeps its relative accuracy instead of `p_t − 1`'s).
//!
//! **Targets** (i64 or u32, the logits' leading dims) are validated on the host before any
//! kernel runs (on a GPU this is a device→host copy of the `N` targets, one synchronisation):
//! a target outside `0..V` that is not `ignore_index` is an error naming its position and
//! value, and `n_valid` is counted there (the `Mean` scale and
//! [`crate::ops::LinearCrossEntropy::n_valid`] need it on the host anyway). The kernels then
//! get the targets as i32 classes, −1 for an ignored row.
//!
//! The loss is an f32 scalar (shape `[]`) for every logits dtype; f64 logits accumulate in
//! f64 and round the loss once. Per-row results are summed in row order (deterministic).
//! NaN logits in a counted row make the loss NaN (never silently dropped).
//!
//! Kernels: [`CeFwd`] `(logits, targets) -> (loss, row stats)`; [`CeBwd`]
//! `(logits, targets, row stats, dloss?) -> dlogits` (the autograd backward: one read, one
//! write);
//! [`CeFused`] `(logits, targets) -> (dlogits, row losses)` in one pass (the standalone
//! backward), which also runs in place (the logits become their gradient: the chunks of
//! [`super::linear_cross_entropy`]); [`CeSum`] `row losses -> loss`.

pub(crate) mod cpu;
#[cfg(feature = "cuda")]
pub(crate) mod cuda;

use candle_core::{DType, Device, Result, Tensor};

use crate::config::{KernelConfig, Kernels};
use crate::seam::{self, InplaceKernel, Kernel};
use crate::validate::{self, fail};

/// How the per-row losses are reduced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Reduction {
    /// The mean over the rows whose target is not ignored (0 when all are).
    #[default]
    Mean,
    /// The sum over the rows whose target is not ignored.
    Sum,
}

/// Options of [`cross_entropy`] and [`super::linear_cross_entropy`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CrossEntropyConfig {
    /// Rows with this target contribute nothing (default −100, as PyTorch and transformers).
    pub ignore_index: i64,
    /// See [`Reduction`] (default `Mean`).
    pub reduction: Reduction,
    /// PyTorch's label smoothing `ε` in `[0, 1]` (default 0).
    pub label_smoothing: f64,
    /// Logit soft-capping `c·tanh(z / c)` with `c > 0` (Gemma 2: 30), applied first.
    pub softcap: Option<f64>,
    /// Coefficient `λ >= 0` of the z-loss `λ·lse²` (PaLM: 1e-4; default 0).
    pub z_loss: f64,
}

impl Default for CrossEntropyConfig {
    fn default() -> Self {
        Self {
            ignore_index: -100,
            reduction: Reduction::Mean,
            label_smoothing: 0.0,
            softcap: None,
            z_loss: 0.0,
        }
    }
}

/// The row math constants every CE kernel takes (`V` comes from the logits' layout).
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Params {
    pub smoothing: f64,
    pub softcap: Option<f64>,
    pub z_loss: f64,
}

impl Params {
    pub fn of(cfg: &CrossEntropyConfig) -> Self {
        Self {
            smoothing: cfg.label_smoothing,
            softcap: cfg.softcap,
            z_loss: cfg.z_loss,
        }
    }
}

/// Forward: inputs `(logits, targets)`, outputs `loss` (`[1]` f32: `scale · Σ row losses`) and
/// the row stats the backward needs, `[N, 2]` = `(lse, Σ_{j≠t} p_j)` (f32; f64 for f64
/// logits; zeros for ignored rows): the second is `1 − p_t` summed without cancellation.
#[derive(Debug, Clone, Copy)]
pub(crate) struct CeFwd {
    pub p: Params,
    pub scale: f64,
    pub name: &'static str,
}

/// Backward from the saved row stats: inputs `(logits, targets, stats, dloss?)` (`dloss`: f32
/// `[1]` on the device, multiplies `scale`), output `dlogits` (logits' dtype).
#[derive(Debug, Clone, Copy)]
pub(crate) struct CeBwd {
    pub p: Params,
    pub scale: f64,
    pub name: &'static str,
}

/// Loss and gradient in one pass: inputs `(logits, targets)`, outputs `dlogits` (scaled by
/// `scale`) and the unscaled row losses (`[N]`, f32; f64 for f64 logits; 0 for ignored rows).
/// As an [`InplaceKernel`] the logits are overwritten by `dlogits` and only the row losses are
/// returned.
#[derive(Debug, Clone, Copy)]
pub(crate) struct CeFused {
    pub p: Params,
    pub scale: f64,
    pub name: &'static str,
}

/// `scale · Σ row losses` (row order, f64) as an f32 `[1]`: input the row losses.
#[derive(Debug, Clone, Copy)]
pub(crate) struct CeSum {
    pub scale: f64,
    pub name: &'static str,
}

/// `impl Kernel` for a CE kernel struct: its name field, its inputs, and `seam::backends!`
/// with the rest (the `_t` kernels are generic over the element type).
macro_rules! kernel {
    ($k:ty, $inputs:expr, $($backends:tt)*) => {
        impl Kernel for $k {
            fn name(&self) -> &'static str {
                self.name
            }
            fn inputs(&self) -> &'static [&'static str] {
                $inputs
            }
            crate::seam::backends!($($backends)*);
        }
    };
}
kernel!(
    CeFwd,
    &["logits", "targets"],
    cpu::forward_t,
    cuda::forward_t
);
kernel!(
    CeBwd,
    &["logits", "targets", "stats", "dloss"],
    cpu::backward_t,
    cuda::backward_t
);
kernel!(CeFused, &["logits", "targets"], cpu::fused_t, cuda::fused_t);
kernel!(CeSum, &["row_losses"], plain cpu::sum, cuda::sum);

impl InplaceKernel for CeFused {
    fn name(&self) -> &'static str {
        self.name
    }
    fn inputs(&self) -> &'static [&'static str] {
        &["logits", "targets"]
    }
    crate::seam::backends!(in_place cpu::fused_inplace, cuda::fused_inplace);
}

/// Host-validated targets.
pub(crate) struct Targets {
    /// One i32 class per row (−1: ignored), `[N]`, on the logits' device.
    pub t: Tensor,
    /// The same classes on the host.
    pub host: Vec<i32>,
    /// Rows whose target is not ignored.
    pub n_valid: usize,
}

/// Checks `cfg`'s numbers.
pub(crate) fn check_config(op: &str, cfg: &CrossEntropyConfig) -> Result<()> {
    let e = cfg.label_smoothing;
    if !(e.is_finite() && (0.0..=1.0).contains(&e)) {
        fail!(op, "label_smoothing must be in [0, 1], got {e}")
    }
    if let Some(c) = cfg.softcap {
        if !(c.is_finite() && c > 0.0) {
            fail!(op, "softcap must be a finite number > 0, got {c}")
        }
    }
    let z = cfg.z_loss;
    if !(z.is_finite() && z >= 0.0) {
        fail!(op, "z_loss must be a finite number >= 0, got {z}")
    }
    Ok(())
}

/// Checks rows of `arg` (rank >= 1, float, non-empty, `V <= i32::MAX`); returns `(rows, V,
/// the leading dims)`.
pub(crate) fn check_rows(op: &str, arg: &str, x: &Tensor) -> Result<(usize, usize, Vec<usize>)> {
    validate::rank_ge1(op, arg, x)?;
    validate::float_dtype(op, arg, x)?;
    let dims = x.dims();
    let v = dims[dims.len() - 1];
    let lead = dims[..dims.len() - 1].to_vec();
    let rows: usize = lead.iter().product();
    if v == 0 || rows == 0 {
        fail!(
            op,
            "{arg} of shape {dims:?} is empty: a loss needs at least one row and one class"
        )
    }
    if v > i32::MAX as usize {
        fail!(
            op,
            "{arg} has {v} classes, more than the kernels index ({})",
            i32::MAX
        )
    }
    Ok((rows, v, lead))
}

/// Validates `targets` (dtype i64 or u32, shape `lead`, on `device`, each in `0..v` or
/// `ignore_index`) on the host and returns them as i32 classes on `device`.
pub(crate) fn check_targets(
    op: &str,
    targets: &Tensor,
    lead: &[usize],
    v: usize,
    ignore_index: i64,
    device: &Device,
) -> Result<Targets> {
    match targets.dtype() {
        DType::I64 | DType::U32 => {}
        d => fail!(
            op,
            "targets has dtype {d:?}, expected i64 or u32 class indices"
        ),
    }
    if targets.dims() != lead {
        fail!(
            op,
            "targets has shape {:?}, expected {lead:?} (the leading dims of the logits)",
            targets.dims()
        )
    }
    if !targets.device().same_device(device) {
        fail!(
            op,
            "targets is on device {:?}, expected {:?} (the device of the logits)",
            targets.device().location(),
            device.location()
        )
    }
    let vals: Vec<i64> = match targets.dtype() {
        DType::U32 => targets
            .flatten_all()?
            .to_vec1::<u32>()?
            .into_iter()
            .map(i64::from)
            .collect(),
        _ => targets.flatten_all()?.to_vec1::<i64>()?,
    };
    let mut host = Vec::with_capacity(vals.len());
    let mut n_valid = 0;
    for (i, &t) in vals.iter().enumerate() {
        if t == ignore_index {
            host.push(-1);
        } else if (0..v as i64).contains(&t) {
            host.push(t as i32);
            n_valid += 1;
        } else {
            fail!(
                op,
                "target {t} at row {i} is out of range: expected a class in 0..{v} or \
                 ignore_index ({ignore_index})"
            )
        }
    }
    let t = Tensor::from_slice(&host, host.len(), device)?;
    Ok(Targets { t, host, n_valid })
}

/// The factor of the summed row losses: `1 / n_valid` (Mean), 1 (Sum), 0 with nothing counted.
pub(crate) fn loss_scale(cfg: &CrossEntropyConfig, n_valid: usize) -> f64 {
    match (n_valid, cfg.reduction) {
        (0, _) => 0.0,
        (n, Reduction::Mean) => 1.0 / n as f64,
        (_, Reduction::Sum) => 1.0,
    }
}

impl Kernels {
    /// [`cross_entropy`] with this handle's configuration.
    pub fn cross_entropy(
        &self,
        logits: &Tensor,
        targets: &Tensor,
        cfg: &CrossEntropyConfig,
    ) -> Result<Tensor> {
        const OP: &str = "cross_entropy";
        check_config(OP, cfg)?;
        let (rows, v, lead) = check_rows(OP, "logits", logits)?;
        let tg = check_targets(OP, targets, &lead, v, cfg.ignore_index, logits.device())?;
        let (p, scale, kc) = (Params::of(cfg), loss_scale(cfg, tg.n_valid), self.config);
        let k = CeFwd { p, scale, name: OP };
        let mut out = seam::run(&k, &kc, &[Some(logits), Some(&tg.t)])?.into_iter();
        let (Some(loss), Some(stats)) = (out.next(), out.next()) else {
            fail!(OP, "internal: the forward returned too few outputs")
        };
        let stats = seam::tensor(stats, (rows, 2));
        let (xs, ts) = (logits.detach(), tg.t);
        seam::attach(OP, loss, (), &[logits], move |_, g| {
            let g = g.to_dtype(DType::F32)?.reshape(1)?;
            let k = CeBwd { p, scale, name: OP };
            let ins = [Some(&xs), Some(&ts), Some(&stats), Some(&g)];
            let dx = seam::run1(&k, &kc, &ins, xs.shape())?;
            Ok(vec![Some(dx)])
        })
    }

    /// [`cross_entropy_backward`] with this handle's configuration.
    pub fn cross_entropy_backward(
        &self,
        logits: &Tensor,
        targets: &Tensor,
        cfg: &CrossEntropyConfig,
        dloss: f64,
    ) -> Result<Tensor> {
        const OP: &str = "cross_entropy_backward";
        check_config(OP, cfg)?;
        validate::finite(OP, "dloss", dloss)?;
        let (_, v, lead) = check_rows(OP, "logits", logits)?;
        let tg = check_targets(OP, targets, &lead, v, cfg.ignore_index, logits.device())?;
        let k = CeFused {
            p: Params::of(cfg),
            scale: loss_scale(cfg, tg.n_valid) * dloss,
            name: OP,
        };
        let mut out = seam::run(&k, &self.config, &[Some(logits), Some(&tg.t)])?;
        if out.is_empty() {
            fail!(OP, "internal: the kernel returned no dlogits")
        }
        Ok(seam::tensor(out.remove(0), logits.shape().clone()))
    }
}

/// Cross-entropy of `logits` `[.., V]` (any float dtype; leading dims flattened to rows)
/// against class indices `targets` `[..]` (i64 or u32, the leading dims), with the options of
/// `cfg` (ignored targets, mean or sum, label smoothing, soft-capping, z-loss; see the module
/// doc). Returns the f32 scalar loss, differentiable in `logits`.
pub fn cross_entropy(
    logits: &Tensor,
    targets: &Tensor,
    cfg: &CrossEntropyConfig,
) -> Result<Tensor> {
    Kernels::default().cross_entropy(logits, targets, cfg)
}

/// The gradient of `dloss · cross_entropy(logits, targets, cfg)` with respect to `logits`
/// (logits' shape and dtype), in one pass over the logits (`dloss` = 1.0 for a plain backward).
pub fn cross_entropy_backward(
    logits: &Tensor,
    targets: &Tensor,
    cfg: &CrossEntropyConfig,
    dloss: f64,
) -> Result<Tensor> {
    Kernels::default().cross_entropy_backward(logits, targets, cfg, dloss)
}

/// The `[1]` storage of `scale · Σ rows` of per-row losses (from [`CeFused`]) through
/// [`CeSum`].
pub(crate) fn sum_rows(
    kc: &KernelConfig,
    name: &'static str,
    rows: &Tensor,
    scale: f64,
) -> Result<candle_core::Storage> {
    let mut out = seam::run(&CeSum { scale, name }, kc, &[Some(rows)])?;
    if out.is_empty() {
        fail!(name, "internal: the sum returned nothing")
    }
    Ok(out.remove(0))
}
