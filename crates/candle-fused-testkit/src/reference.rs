//! Reference implementations from composed Candle ops: differentiable through Candle's
//! autograd, in whatever dtype they are given. The tests and `candle-fused check` run them on
//! f64 copies of the inputs as the ground truth; `candle-fused bench` times them in the
//! inputs' dtype as "Candle composed", the differentiable path Candle users have today.

use candle_core::{DType, Result, Tensor, D};
use candle_fused::ops::{GluKind, RopeLayout, RopeStyle};

/// `softmax(x)` over the last dim (Candle's `candle_nn::ops::softmax`).
pub fn softmax(x: &Tensor) -> Result<Tensor> {
    candle_nn::ops::softmax(x, D::Minus1)
}

/// The causal visibility mask for scores `[.., S, T]`: `1` where row `i` may see column `j`,
/// i.e. `j <= i + T - S` (u8, shape `[S, T]`).
pub fn causal_visible(s: usize, t: usize, device: &candle_core::Device) -> Result<Tensor> {
    let v: Vec<u8> = (0..s)
        .flat_map(|i| (0..t).map(move |j| u8::from(j as i64 <= i as i64 + t as i64 - s as i64)))
        .collect();
    Tensor::from_vec(v, (s, t), device)
}

/// `softmax(scale·x + mask)` over the last dim with optional causal masking; rows with every
/// column masked give zeros.
pub fn masked_softmax(
    x: &Tensor,
    scale: f64,
    mask: Option<&Tensor>,
    causal: bool,
) -> Result<Tensor> {
    let mut z = x.affine(scale, 0.0)?;
    if let Some(m) = mask {
        z = z.broadcast_add(m)?;
    }
    if causal {
        let dims = x.dims();
        let t = dims[dims.len() - 1];
        let s = if dims.len() >= 2 {
            dims[dims.len() - 2]
        } else {
            1
        };
        let vis = causal_visible(s, t, x.device())?;
        let vis = if dims.len() >= 2 {
            vis
        } else {
            vis.squeeze(0)?
        };
        let neg = Tensor::full(f64::NEG_INFINITY, (), x.device())?.to_dtype(x.dtype())?;
        z = vis
            .broadcast_as(z.shape())?
            .where_cond(&z, &neg.broadcast_as(z.shape())?)?;
    }
    let m = z.max_keepdim(D::Minus1)?.detach();
    // Rows with max = -inf are fully masked: shift by 0 instead, so exp gives 0 (not NaN).
    let m = m.eq(f64::NEG_INFINITY)?.where_cond(&m.zeros_like()?, &m)?;
    let e = z.broadcast_sub(&m)?.exp()?;
    let s = e.sum_keepdim(D::Minus1)?;
    // ... and divide those rows by 1 instead of 0.
    let s = (&s + s.eq(0.0)?.to_dtype(s.dtype())?)?;
    e.broadcast_div(&s)
}

/// `x / sqrt(mean(x²) + eps) * w` over the last dim.
pub fn rms_norm(x: &Tensor, w: Option<&Tensor>, eps: f64) -> Result<Tensor> {
    let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
    let y = x.broadcast_div(&(ms + eps)?.sqrt()?)?;
    match w {
        Some(w) => y.broadcast_mul(w),
        None => Ok(y),
    }
}

/// `(rms_norm(x + residual) * w, x + residual)`.
pub fn add_rms_norm(
    x: &Tensor,
    residual: &Tensor,
    w: &Tensor,
    eps: f64,
) -> Result<(Tensor, Tensor)> {
    let s = (x + residual)?;
    Ok((rms_norm(&s, Some(w), eps)?, s))
}

/// RoPE from composed ops: the table rows at `positions` (`[T]` or `[B, T]`, u32/i64) are
/// gathered (`cos`, `sin`: `[P, R/2]`, converted to `x`'s dtype) and broadcast over the heads;
/// the first `R` dims of each head are rotated (pairs `(i, i + R/2)` or `(2i, 2i + 1)`), the
/// rest concatenated back unchanged. Differentiable in `x`.
pub fn rope(
    x: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    positions: &Tensor,
    layout: RopeLayout,
    style: RopeStyle,
) -> Result<Tensor> {
    let (d0, d1, d2, d) = x.dims4()?;
    let half = cos.dim(1)?;
    let rot = 2 * half;
    let (b, t) = match layout {
        RopeLayout::Bhtd => (d0, d2),
        RopeLayout::Bthd => (d0, d1),
    };
    let pb = if positions.rank() == 2 { b } else { 1 };
    let gather = |tab: &Tensor| -> Result<Tensor> {
        let g = tab
            .to_dtype(x.dtype())?
            .index_select(&positions.flatten_all()?, 0)?;
        match layout {
            RopeLayout::Bhtd => g.reshape((pb, 1, t, half)),
            RopeLayout::Bthd => g.reshape((pb, t, 1, half)),
        }
    };
    let (c, s) = (gather(cos)?, gather(sin)?);
    let xr = x.narrow(D::Minus1, 0, rot)?;
    let yr = match style {
        RopeStyle::HalfSplit => {
            let x1 = xr.narrow(D::Minus1, 0, half)?;
            let x2 = xr.narrow(D::Minus1, half, half)?;
            let y1 = (x1.broadcast_mul(&c)? - x2.broadcast_mul(&s)?)?;
            let y2 = (x2.broadcast_mul(&c)? + x1.broadcast_mul(&s)?)?;
            Tensor::cat(&[y1, y2], D::Minus1)?
        }
        RopeStyle::Interleaved => {
            let pairs = xr.reshape((d0, d1, d2, half, 2))?;
            let xe = pairs.narrow(D::Minus1, 0, 1)?.squeeze(D::Minus1)?;
            let xo = pairs.narrow(D::Minus1, 1, 1)?.squeeze(D::Minus1)?;
            let ye = (xe.broadcast_mul(&c)? - xo.broadcast_mul(&s)?)?;
            let yo = (xo.broadcast_mul(&c)? + xe.broadcast_mul(&s)?)?;
            Tensor::stack(&[ye, yo], D::Minus1)?.reshape((d0, d1, d2, rot))?
        }
    };
    if rot == d {
        Ok(yr)
    } else {
        Tensor::cat(&[yr, x.narrow(D::Minus1, rot, d - rot)?], D::Minus1)
    }
}

/// `act(gate) ⊙ up` written out from elementary ops (the ground truth in f64):
/// silu `g / (1 + e^{−g})`, gelu_tanh `g/2 · (1 + tanh(u))`, `u = sqrt(2/π)·(g + 0.044715·g³)`,
/// written as the equal `g·σ(2u)` with `σ(2u)` from `e = e^{−2|u|}` (`1/(1+e)` for u ≥ 0,
/// `e/(1+e)` below): `1 + tanh(u)` cancels for very negative `g` (relative error ~1e-5 in f64
/// at g = −8), and neither branch overflows, so the tape's gradient stays finite.
pub fn glu(kind: GluKind, gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    let act = match kind {
        GluKind::SwiGlu => (gate / (gate.neg()?.exp()? + 1.0)?)?,
        GluKind::GeGluTanh => {
            let k = (2.0 / std::f64::consts::PI).sqrt();
            let inner = ((gate + ((gate.sqr()? * gate)? * 0.044715)?)? * k)?;
            let e = (inner.abs()? * -2.0)?.exp()?;
            let den = (&e + 1.0)?;
            let sig = inner.ge(0.0)?.where_cond(&den.recip()?, &(&e / &den)?)?;
            (gate * sig)?
        }
    };
    act * up
}

/// `act(gate) ⊙ up` with Candle's own unary ops (`Tensor::silu`, `Tensor::gelu`, both with
/// a backward): what a Candle model writes today (the bench's composed path).
pub fn glu_builtin(kind: GluKind, gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    let act = match kind {
        GluKind::SwiGlu => gate.silu()?,
        GluKind::GeGluTanh => gate.gelu()?,
    };
    act * up
}

/// The packed layout `[.., 2I]`: [`glu`] of its two halves.
pub fn glu_packed(kind: GluKind, gate_up: &Tensor) -> Result<Tensor> {
    let i = gate_up.dim(D::Minus1)? / 2;
    glu(
        kind,
        &gate_up.narrow(D::Minus1, 0, i)?,
        &gate_up.narrow(D::Minus1, i, i)?,
    )
}

/// Upcasts to f64 (the reference precision).
pub fn f64(t: &Tensor) -> Result<Tensor> {
    t.to_dtype(DType::F64)
}

/// The LoRA linear `x·Wᵀ (+ bias) + scale·(x·Aᵀ)·Bᵀ` from composed Candle ops (`matmul`,
/// `broadcast_add`, `affine`) for `x [..., K]`, `w [N, K]`, `a [r, K]`, `b [N, r]`: the
/// reference of the tests (in f64) and the "Candle composed" row of the bench (what
/// candle-lora does).
pub fn lora_linear(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    a: &Tensor,
    b: &Tensor,
    scale: f64,
) -> Result<Tensor> {
    let dims = x.dims();
    let k = dims[dims.len() - 1];
    let m: usize = dims[..dims.len() - 1].iter().product();
    let x2 = x.reshape((m, k))?;
    let mut y = x2.matmul(&w.t()?)?;
    if let Some(bias) = bias {
        y = y.broadcast_add(bias)?;
    }
    let low = x2.matmul(&a.t()?)?.matmul(&b.t()?)?.affine(scale, 0.0)?;
    let y = (y + low)?;
    let mut out = dims[..dims.len() - 1].to_vec();
    out.push(w.dim(0)?);
    y.reshape(out)
}

/// Cross-entropy from composed Candle ops (`log_softmax` + `gather`), differentiable in
/// `logits`, in the logits' dtype: `targets` (i64 or u32, the leading dims) with
/// `cfg.ignore_index` rows masked out, PyTorch's label smoothing, soft-capping `c·tanh(z/c)`
/// first, z-loss `λ·lse²`; `Mean` over the counted rows (0 when none is counted) or `Sum`.
/// Returns a scalar of the logits' dtype.
pub fn cross_entropy(
    logits: &Tensor,
    targets: &Tensor,
    cfg: &candle_fused::ops::CrossEntropyConfig,
) -> Result<Tensor> {
    let v = logits.dim(D::Minus1)?;
    let x = logits.reshape(((), v))?;
    let dev = x.device();
    let t: Vec<i64> = match targets.dtype() {
        DType::U32 => targets
            .flatten_all()?
            .to_vec1::<u32>()?
            .into_iter()
            .map(i64::from)
            .collect(),
        _ => targets
            .flatten_all()?
            .to_dtype(DType::I64)?
            .to_vec1::<i64>()?,
    };
    let valid: Vec<f64> = t
        .iter()
        .map(|&c| f64::from(u8::from(c != cfg.ignore_index)))
        .collect();
    let n_valid = valid.iter().sum::<f64>();
    let safe: Vec<u32> = t
        .iter()
        .map(|&c| if c == cfg.ignore_index { 0 } else { c as u32 })
        .collect();
    let n = safe.len();
    let idx = Tensor::from_vec(safe, (n, 1), dev)?;
    let valid = Tensor::from_vec(valid, n, dev)?.to_dtype(x.dtype())?;
    let z = match cfg.softcap {
        Some(c) => (x.affine(1.0 / c, 0.0)?.tanh()? * c)?,
        None => x,
    };
    let logp = candle_nn::ops::log_softmax(&z, D::Minus1)?;
    let eps = cfg.label_smoothing;
    let nll = logp.gather(&idx, 1)?.squeeze(1)?.neg()?;
    let mut row = nll.affine(1.0 - eps, 0.0)?;
    if eps > 0.0 {
        let smooth = logp.mean(1)?.neg()?;
        row = (row + smooth.affine(eps, 0.0)?)?;
    }
    if cfg.z_loss > 0.0 {
        let lse = z.log_sum_exp(D::Minus1)?;
        row = (row + lse.sqr()?.affine(cfg.z_loss, 0.0)?)?;
    }
    let total = (row * valid)?.sum_all()?;
    match (cfg.reduction, n_valid == 0.0) {
        // (times a zero tensor, not affine(0, 0), so autograd still reaches the logits)
        (_, true) => &total * total.zeros_like()?,
        (candle_fused::ops::Reduction::Mean, false) => total.affine(1.0 / n_valid, 0.0),
        (candle_fused::ops::Reduction::Sum, false) => Ok(total),
    }
}

/// `cross_entropy(h·wᵀ, targets, cfg)` with the full logits (`h` `[.., H]`, `w` `[V, H]`):
/// the composed path Candle users have today (matmul, log_softmax, gather).
pub fn linear_cross_entropy(
    h: &Tensor,
    w: &Tensor,
    targets: &Tensor,
    cfg: &candle_fused::ops::CrossEntropyConfig,
) -> Result<Tensor> {
    let hd = h.dim(D::Minus1)?;
    let logits = h.reshape(((), hd))?.matmul(&w.t()?)?;
    cross_entropy(&logits, &targets.flatten_all()?, cfg)
}
