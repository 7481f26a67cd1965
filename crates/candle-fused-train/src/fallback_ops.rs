//! Stand-ins for the fused ops of issue 10 (RoPE, GLU, cross-entropy, linear+cross-entropy)
//! that the ops helpers are adding to `candle_fused::ops`, with the agreed signatures
//! (`/work/prompts/ops-api.md`) and built from composed Candle ops: the forwards are
//! differentiable on Candle's tape, the `*_backward` functions are hand-written.
//! Deleted when the real ops land (the model imports them through `crate::kops`).
//!
//! Limits of the stand-ins: RoPE supports no/linear/dynamic (static table)/llama3 scaling
//! (yarn is an error); cross-entropy supports no label smoothing, softcap or z-loss.

#![allow(dead_code)] // a stand-in: the whole agreed API, used or not

use candle_core::{DType, Device, Result, Tensor, D};

use crate::util::fail;

/// How rotary pairs are formed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeStyle {
    /// `rotate_half`: pairs `(i, i + R/2)` (Llama, Qwen2, Mistral).
    HalfSplit,
    /// Pairs `(2i, 2i + 1)`.
    Interleaved,
}

/// Where the time axis is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeLayout {
    /// `[B, H, T, D]`.
    Bhtd,
    /// `[B, T, H, D]`.
    Bthd,
}

/// `rope_scaling` of Hugging Face configs.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// Positions divided by `factor`.
    Linear { factor: f64 },
    /// NTK-aware (HF "dynamic").
    Dynamic {
        factor: f64,
        original_max_positions: usize,
    },
    /// Llama 3.x frequency-band scaling.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_positions: usize,
    },
    /// YaRN.
    Yarn {
        factor: f64,
        original_max_positions: usize,
        beta_fast: f64,
        beta_slow: f64,
        mscale: Option<f64>,
        mscale_all_dim: Option<f64>,
        attention_factor: Option<f64>,
    },
}

/// What a [`RopeTable`] is built from.
#[derive(Debug, Clone, PartialEq)]
pub struct RopeConfig {
    pub head_dim: usize,
    pub rotary_dim: usize,
    pub theta: f64,
    pub max_positions: usize,
    pub scaling: Option<RopeScaling>,
}

/// `cos`, `sin`: f32 `[max_positions, rotary_dim / 2]`.
#[derive(Debug, Clone)]
pub struct RopeTable {
    cos: Tensor,
    sin: Tensor,
    cfg: RopeConfig,
}

impl RopeTable {
    /// The table of `cfg` on `device`.
    pub fn new(cfg: &RopeConfig, device: &Device) -> Result<Self> {
        const OP: &str = "RopeTable";
        let r = cfg.rotary_dim;
        if r == 0 || !r.is_multiple_of(2) || r > cfg.head_dim {
            fail!(
                OP,
                "rotary_dim {r} must be even, >= 2 and <= head_dim {}",
                cfg.head_dim
            )
        }
        let half = r / 2;
        let mut inv: Vec<f64> = (0..half)
            .map(|i| 1.0 / cfg.theta.powf(2.0 * i as f64 / r as f64))
            .collect();
        match &cfg.scaling {
            None | Some(RopeScaling::Dynamic { .. }) => {}
            Some(RopeScaling::Linear { factor }) => inv.iter_mut().for_each(|f| *f /= factor),
            Some(RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_positions,
            }) => {
                let orig = *original_max_positions as f64;
                let low_wl = orig / low_freq_factor;
                let high_wl = orig / high_freq_factor;
                for f in inv.iter_mut() {
                    let wl = 2.0 * std::f64::consts::PI / *f;
                    if wl > low_wl {
                        *f /= factor;
                    } else if wl >= high_wl {
                        let s =
                            (orig / wl - low_freq_factor) / (high_freq_factor - low_freq_factor);
                        *f = (1.0 - s) * *f / factor + s * *f;
                    }
                }
            }
            Some(RopeScaling::Yarn { .. }) => {
                fail!(
                    OP,
                    "yarn rope scaling is not supported by the fallback RoPE"
                )
            }
        }
        let n = cfg.max_positions;
        let mut c = Vec::with_capacity(n * half);
        let mut s = Vec::with_capacity(n * half);
        for p in 0..n {
            for f in &inv {
                // f32 frequencies as in HF (inv_freq is an f32 buffer there).
                let a = p as f32 * (*f as f32);
                c.push(a.cos());
                s.push(a.sin());
            }
        }
        Ok(Self {
            cos: Tensor::from_vec(c, (n, half), device)?,
            sin: Tensor::from_vec(s, (n, half), device)?,
            cfg: cfg.clone(),
        })
    }
    pub fn cos(&self) -> &Tensor {
        &self.cos
    }
    pub fn sin(&self) -> &Tensor {
        &self.sin
    }
    pub fn config(&self) -> &RopeConfig {
        &self.cfg
    }
}

/// Rotation by `sign·angle` (`sign = -1`: the backward).
fn rotate(
    x: &Tensor,
    table: &RopeTable,
    positions: &Tensor,
    layout: RopeLayout,
    style: RopeStyle,
    sign: f64,
) -> Result<Tensor> {
    const OP: &str = "rope";
    if x.rank() != 4 {
        fail!(OP, "x must be rank 4, got {:?}", x.dims())
    }
    let (b, d1, d2, d) = x.dims4()?;
    let t = match layout {
        RopeLayout::Bthd => d1,
        RopeLayout::Bhtd => d2,
    };
    let r = table.cfg.rotary_dim;
    if d != table.cfg.head_dim {
        fail!(
            OP,
            "x head dim {d} != table head_dim {}",
            table.cfg.head_dim
        )
    }
    let pb = match positions.dims() {
        [pt] if *pt == t => 1,
        [pb, pt] if *pt == t && (*pb == b || *pb == 1) => *pb,
        other => fail!(
            OP,
            "positions must be [T] or [B, T] with T = {t}, got {other:?}"
        ),
    };
    let flat = positions.flatten_all()?.to_dtype(DType::U32)?;
    let half = r / 2;
    let sel = |m: &Tensor| -> Result<Tensor> {
        let v = m.index_select(&flat, 0)?.to_dtype(x.dtype())?; // [pb*T, half]
        match layout {
            RopeLayout::Bthd => v.reshape((pb, t, 1, half)),
            RopeLayout::Bhtd => v.reshape((pb, 1, t, half)),
        }
    };
    let cos = sel(&table.cos)?;
    let sin = (sel(&table.sin)? * sign)?;
    let xr = x.narrow(D::Minus1, 0, r)?;
    let rotated = match style {
        RopeStyle::HalfSplit => {
            let x1 = xr.narrow(D::Minus1, 0, half)?;
            let x2 = xr.narrow(D::Minus1, half, half)?;
            let y1 = (x1.broadcast_mul(&cos)? - x2.broadcast_mul(&sin)?)?;
            let y2 = (x2.broadcast_mul(&cos)? + x1.broadcast_mul(&sin)?)?;
            Tensor::cat(&[y1, y2], D::Minus1)?
        }
        RopeStyle::Interleaved => {
            let xp = xr.reshape((b, d1, d2, half, 2))?;
            let x1 = xp.narrow(D::Minus1, 0, 1)?.squeeze(D::Minus1)?;
            let x2 = xp.narrow(D::Minus1, 1, 1)?.squeeze(D::Minus1)?;
            let y1 = (x1.broadcast_mul(&cos)? - x2.broadcast_mul(&sin)?)?;
            let y2 = (x2.broadcast_mul(&cos)? + x1.broadcast_mul(&sin)?)?;
            Tensor::stack(&[y1, y2], D::Minus1)?.reshape((b, d1, d2, r))?
        }
    };
    if r == d {
        Ok(rotated)
    } else {
        Tensor::cat(&[rotated, x.narrow(D::Minus1, r, d - r)?], D::Minus1)
    }
}

/// Rotary embedding of `x` at `positions` (differentiable in `x`).
pub fn rope(
    x: &Tensor,
    table: &RopeTable,
    positions: &Tensor,
    layout: RopeLayout,
    style: RopeStyle,
) -> Result<Tensor> {
    rotate(x, table, positions, layout, style, 1.0)
}

/// The backward of [`rope`]: the inverse rotation of `dy`.
pub fn rope_backward(
    dy: &Tensor,
    table: &RopeTable,
    positions: &Tensor,
    layout: RopeLayout,
    style: RopeStyle,
) -> Result<Tensor> {
    rotate(&dy.detach(), table, positions, layout, style, -1.0)
}

/// Gated linear units.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GluKind {
    /// `silu(gate) * up`.
    SwiGlu,
    /// `gelu_tanh(gate) * up`.
    GeGluTanh,
}

/// `act(gate) * up`, differentiable.
pub fn glu(kind: GluKind, gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    let a = match kind {
        GluKind::SwiGlu => gate.silu()?,
        GluKind::GeGluTanh => gate.gelu()?,
    };
    a * up
}

/// `[.., 2I] -> [.., I]`: first half gate, second half up.
pub fn glu_packed(kind: GluKind, gate_up: &Tensor) -> Result<Tensor> {
    let i = gate_up.dim(D::Minus1)? / 2;
    glu(
        kind,
        &gate_up.narrow(D::Minus1, 0, i)?,
        &gate_up.narrow(D::Minus1, i, i)?,
    )
}

/// `silu(gate) * up`.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    glu(GluKind::SwiGlu, gate, up)
}

/// `(dgate, dup)` of [`glu`] for the output gradient `dy` (computed in f32).
pub fn glu_backward(
    kind: GluKind,
    gate: &Tensor,
    up: &Tensor,
    dy: &Tensor,
) -> Result<(Tensor, Tensor)> {
    let dt = gate.dtype();
    let g = gate.detach().to_dtype(DType::F32)?;
    let u = up.detach().to_dtype(DType::F32)?;
    let dy = dy.detach().to_dtype(DType::F32)?;
    let (act, dact) = match kind {
        GluKind::SwiGlu => {
            let s = candle_nn::ops::sigmoid(&g)?;
            let act = (&g * &s)?;
            // d silu = s·(1 + g·(1 − s))
            let dact = (&s * ((&g * (1.0 - &s)?)? + 1.0)?)?;
            (act, dact)
        }
        GluKind::GeGluTanh => {
            let c = (2.0f64 / std::f64::consts::PI).sqrt();
            let inner = ((&g + (g.powf(3.0)? * 0.044715)?)? * c)?;
            let th = inner.tanh()?;
            let act = ((&g * (&th + 1.0)?)? * 0.5)?;
            let dinner = (((g.sqr()? * (3.0 * 0.044715))? + 1.0)? * c)?;
            let sech2 = (1.0 - th.sqr()?)?;
            let dact = (((&th + 1.0)? * 0.5)? + ((&g * 0.5)? * sech2)?.mul(&dinner)?)?;
            (act, dact)
        }
    };
    let dup = (&dy * act)?.to_dtype(dt)?;
    let dgate = ((dy * u)? * dact)?.to_dtype(dt)?;
    Ok((dgate, dup))
}

/// How the per-token losses are reduced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reduction {
    /// Mean over non-ignored targets.
    Mean,
    /// Sum.
    Sum,
}

/// Cross-entropy options.
#[derive(Debug, Clone, PartialEq)]
pub struct CrossEntropyConfig {
    pub ignore_index: i64,
    pub reduction: Reduction,
    pub label_smoothing: f64,
    pub softcap: Option<f64>,
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

fn check_cfg(op: &str, cfg: &CrossEntropyConfig) -> Result<()> {
    if cfg.label_smoothing != 0.0 || cfg.softcap.is_some() || cfg.z_loss != 0.0 {
        fail!(
            op,
            "label smoothing, softcap and z-loss are not supported by the fallback"
        )
    }
    Ok(())
}

/// `(safe targets u32 [N], mask f32 [N], n_valid)` for logits rows `n`, vocabulary `v`.
fn prep_targets(
    op: &str,
    targets: &Tensor,
    n: usize,
    v: usize,
    cfg: &CrossEntropyConfig,
) -> Result<(Tensor, Tensor, usize)> {
    if targets.elem_count() != n {
        fail!(
            op,
            "targets have {} elements ({:?}), expected {n} (the rows of the logits)",
            targets.elem_count(),
            targets.dims()
        )
    }
    let t: Vec<i64> = targets.flatten_all()?.to_dtype(DType::I64)?.to_vec1()?;
    let mut safe = Vec::with_capacity(n);
    let mut mask = Vec::with_capacity(n);
    let mut n_valid = 0;
    for (i, &x) in t.iter().enumerate() {
        if x == cfg.ignore_index {
            safe.push(0u32);
            mask.push(0f32);
        } else if x < 0 || x as usize >= v {
            fail!(
                op,
                "target {x} at row {i} is outside the vocabulary 0..{v} (and not ignore_index {})",
                cfg.ignore_index
            )
        } else {
            safe.push(x as u32);
            mask.push(1f32);
            n_valid += 1;
        }
    }
    let dev = targets.device();
    Ok((
        Tensor::from_vec(safe, n, dev)?,
        Tensor::from_vec(mask, n, dev)?,
        n_valid,
    ))
}

fn divisor(cfg: &CrossEntropyConfig, n_valid: usize) -> f64 {
    match cfg.reduction {
        Reduction::Mean => n_valid.max(1) as f64,
        Reduction::Sum => 1.0,
    }
}

/// Mean (or summed) cross-entropy of `logits [.., V]` against `targets [..]`, an f32 scalar,
/// differentiable in `logits`.
pub fn cross_entropy(
    logits: &Tensor,
    targets: &Tensor,
    cfg: &CrossEntropyConfig,
) -> Result<Tensor> {
    const OP: &str = "cross_entropy";
    check_cfg(OP, cfg)?;
    let v = logits.dim(D::Minus1)?;
    let n = logits.elem_count() / v.max(1);
    let (safe, mask, n_valid) = prep_targets(OP, targets, n, v, cfg)?;
    let z = logits.reshape((n, v))?.to_dtype(DType::F32)?;
    let m = z.max_keepdim(1)?.detach();
    let lse = (z.broadcast_sub(&m)?.exp()?.sum_keepdim(1)?.log()? + m)?.squeeze(1)?;
    let zt = z.gather(&safe.unsqueeze(1)?, 1)?.squeeze(1)?;
    let per = ((lse - zt)? * mask)?;
    per.sum_all()? / divisor(cfg, n_valid)
}

/// `dlogits` of `dloss · cross_entropy(logits, targets)`, logits' shape and dtype.
pub fn cross_entropy_backward(
    logits: &Tensor,
    targets: &Tensor,
    cfg: &CrossEntropyConfig,
    dloss: f64,
) -> Result<Tensor> {
    const OP: &str = "cross_entropy_backward";
    check_cfg(OP, cfg)?;
    let v = logits.dim(D::Minus1)?;
    let n = logits.elem_count() / v.max(1);
    let (safe, mask, n_valid) = prep_targets(OP, targets, n, v, cfg)?;
    let z = logits.detach().reshape((n, v))?.to_dtype(DType::F32)?;
    let d = dlogits(&z, &safe, &mask, dloss / divisor(cfg, n_valid))?;
    d.to_dtype(logits.dtype())?.reshape(logits.shape())
}

/// `(softmax(z) − onehot(t)) · mask · k` for f32 `z [n, V]`.
fn dlogits(z: &Tensor, safe: &Tensor, mask: &Tensor, k: f64) -> Result<Tensor> {
    let (n, v) = z.dims2()?;
    let p = candle_nn::ops::softmax_last_dim(z)?;
    let ids = Tensor::arange(0u32, v as u32, z.device())?.unsqueeze(0)?;
    let onehot = ids
        .broadcast_eq(&safe.unsqueeze(1)?.broadcast_as((n, v))?)?
        .to_dtype(DType::F32)?;
    (p - onehot)?.broadcast_mul(&mask.unsqueeze(1)?)? * k
}

/// `cross_entropy(h·wᵀ, targets)`, differentiable in `h` (and `w` when tracked).
pub fn linear_cross_entropy(
    h: &Tensor,
    w: &Tensor,
    targets: &Tensor,
    cfg: &CrossEntropyConfig,
    _chunk: Option<usize>,
) -> Result<Tensor> {
    let hd = h.dim(D::Minus1)?;
    let n = h.elem_count() / hd.max(1);
    let logits = h.reshape((n, hd))?.matmul(&w.t()?)?;
    cross_entropy(&logits, targets, cfg)
}

/// The result of [`linear_cross_entropy_forward_backward`].
#[derive(Debug, Clone)]
pub struct LinearCrossEntropy {
    pub loss: Tensor,
    pub dh: Tensor,
    pub dw: Option<Tensor>,
    pub n_valid: usize,
}

/// Loss and gradients of `dloss · cross_entropy(h·wᵀ, targets)` in one pass over row chunks
/// (never the full `[N, V]` logits).
pub fn linear_cross_entropy_forward_backward(
    h: &Tensor,
    w: &Tensor,
    targets: &Tensor,
    cfg: &CrossEntropyConfig,
    chunk: Option<usize>,
    need_dw: bool,
    dloss: f64,
) -> Result<LinearCrossEntropy> {
    const OP: &str = "linear_cross_entropy_forward_backward";
    check_cfg(OP, cfg)?;
    let hd = h.dim(D::Minus1)?;
    let (v, wk) = w.dims2()?;
    if wk != hd {
        fail!(OP, "w is {:?}, expected [V, {hd}]", w.dims())
    }
    let n = h.elem_count() / hd.max(1);
    let (safe, mask, n_valid) = prep_targets(OP, targets, n, v, cfg)?;
    let h2 = h.detach().reshape((n, hd))?;
    let w = w.detach();
    let rows = chunk
        .unwrap_or_else(|| n.div_ceil(v.div_ceil(hd.max(1)).max(1)))
        .max(1);
    let k = dloss / divisor(cfg, n_valid);
    let mut loss = Tensor::zeros((), DType::F32, h.device())?;
    let mut dh = Vec::new();
    let mut dw: Option<Tensor> = None;
    let mut start = 0;
    while start < n {
        let len = rows.min(n - start);
        let hc = h2.narrow(0, start, len)?;
        let z = hc.matmul(&w.t()?)?.to_dtype(DType::F32)?;
        let (sc, mc) = (safe.narrow(0, start, len)?, mask.narrow(0, start, len)?);
        let m = z.max_keepdim(1)?;
        let lse = (z.broadcast_sub(&m)?.exp()?.sum_keepdim(1)?.log()? + m)?.squeeze(1)?;
        let zt = z.gather(&sc.unsqueeze(1)?, 1)?.squeeze(1)?;
        loss = (loss + ((lse - zt)? * &mc)?.sum_all()?)?;
        let dz = dlogits(&z, &sc, &mc, k)?.to_dtype(h.dtype())?;
        dh.push(dz.matmul(&w)?);
        if need_dw {
            let part = dz.t()?.matmul(&hc)?;
            dw = Some(match dw {
                Some(acc) => (acc + part)?,
                None => part,
            });
        }
        start += len;
    }
    let dh = if dh.is_empty() {
        h.zeros_like()?
    } else {
        Tensor::cat(&dh, 0)?.reshape(h.shape())?
    };
    let dw = match (need_dw, dw) {
        (true, None) => Some(w.zeros_like()?),
        (_, d) => d,
    };
    Ok(LinearCrossEntropy {
        loss: (loss / divisor(cfg, n_valid))?,
        dh,
        dw,
        n_valid,
    })
}
