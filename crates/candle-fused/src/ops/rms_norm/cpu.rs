//! CPU kernels for RMSNorm: one sweep to reduce a row (sum of squares; in the backward also
//! ⟨dy⊙w, x⟩ in the same sweep), one to write it, at the configuration's SIMD level
//! (`crate::simd`); rows in parallel; the weight gradient accumulated per fixed row block and
//! summed in order (deterministic).

use candle_core::{CpuStorage, Result};

use super::{RmsNormBwd, RmsNormFwd};
use crate::config::KernelConfig;
use crate::cpu::{self, Acc, Elem};
use crate::seam::Inputs;
use crate::simd::Isa;

/// `1 / sqrt(mean(x²) + eps)` of a row.
#[inline(always)]
pub(crate) fn rstd<A: Acc>(isa: Isa, x: &[A], eps: A) -> A {
    let ss = A::v_sum_sq(isa, x);
    A::one() / (ss / A::of(x.len() as f64) + eps).sqrt()
}

/// `y = x · r ⊙ w`.
#[inline(always)]
pub(crate) fn write_row<A: Acc>(isa: Isa, x: &[A], r: A, w: Option<&[A]>, y: &mut [A]) {
    match w {
        Some(w) => A::v_mul_scale_w(isa, x, r, w, y),
        None => {
            y.copy_from_slice(x);
            A::v_scale(isa, y, r);
        }
    }
}

/// One row of the backward: `dx = r·(g − x·c) (+ dres)` with `g = dy ⊙ w` and
/// `c = ⟨g, x⟩ / (Σx² + D·eps)`; `dw += dy ⊙ x·r`.
///
/// The reductions and `g − x·c` are evaluated in f64 (products of f32 values are exact there):
/// `g − x·c` cancels when `g` is nearly parallel to `x` (always for `D = 1`, where the true
/// gradient is `g·eps/(x² + eps)`), and f32 would leave only rounding noise.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn bwd_row<A: Acc>(
    isa: Isa,
    x: &[A],
    dy: &[A],
    dres: Option<&[A]>,
    w: Option<&[A]>,
    dx: &mut [A],
    dw: &mut [A],
    eps: f64,
) {
    let n = x.len();
    // g = dy ⊙ w, kept in dx until dx is written.
    match w {
        Some(w) => A::v_mul(isa, dy, w, dx),
        None => dx.copy_from_slice(dy),
    }
    let (ss, dot) = A::v_wide_sums(isa, x, dx);
    let denom = ss + n as f64 * eps;
    let r = 1.0 / (ss / n as f64 + eps).sqrt();
    let c = dot / denom;
    A::v_rms_bwd_row(isa, x, r, c, dres, dx);
    if w.is_some() {
        A::v_dw_accumulate(isa, dy, x, A::of(r), dw);
    }
}

pub(super) fn forward<T: Elem>(
    k: &RmsNormFwd,
    cfg: &KernelConfig,
    ins: &Inputs<CpuStorage>,
) -> Result<Vec<CpuStorage>> {
    let eps = k.eps;
    let op = ins.op();
    let (xs, xl) = ins.get(0)?;
    let x = cpu::slice::<T>(op, "x", xs, xl)?;
    let d = xl.dims()[xl.dims().len() - 1];
    let w = cpu::opt_acc_vec::<T>(ins, 1)?;
    let eps = T::A::of(eps);
    let isa = Isa::new(op, cfg.cpu.simd)?;
    let mut out = cpu::OutBuf::<T>::new(x.len(), cfg.poison);
    cpu::rows_at(&cfg.cpu, isa, [x], [&mut out], d, 0, |_, [x], [y], _| {
        write_row(isa, x, rstd(isa, x, eps), w.as_deref(), y)
    });
    Ok(vec![T::to_cpu_storage_owned(out.into_vec())])
}

/// Returns `dx` (shape of x, plus `d_sum` when given) and, with a weight, `dw` (`[D]`).
pub(super) fn backward<T: Elem>(
    k: &RmsNormBwd,
    cfg: &KernelConfig,
    ins: &Inputs<CpuStorage>,
) -> Result<Vec<CpuStorage>> {
    let eps = k.eps;
    let op = ins.op();
    let (xs, xl) = ins.get(0)?;
    let x = cpu::slice::<T>(op, "x", xs, xl)?;
    let (gs, gl) = ins.get(2)?;
    let dy = cpu::slice::<T>(op, "dy", gs, gl)?;
    let dres = ins
        .opt(3)
        .map(|(s, l)| cpu::slice::<T>(op, "d_sum", s, l))
        .transpose()?;
    let dims = xl.dims();
    let d = dims[dims.len() - 1];
    let w = cpu::opt_acc_vec::<T>(ins, 1)?;
    let w = w.as_deref();
    let dw_len = if w.is_some() { d } else { 0 };
    let mut dx = cpu::OutBuf::<T>::new(x.len(), cfg.poison);
    let c = &cfg.cpu;
    let isa = Isa::new(op, c.simd)?;
    let dw = match dres {
        Some(dres) => cpu::rows_at(
            c,
            isa,
            [x, dy, dres],
            [&mut dx],
            d,
            dw_len,
            |_, [x, g, dr], [dx], acc| bwd_row(isa, x, g, Some(dr), w, dx, acc, eps),
        ),
        None => cpu::rows_at(
            c,
            isa,
            [x, dy],
            [&mut dx],
            d,
            dw_len,
            |_, [x, g], [dx], acc| bwd_row(isa, x, g, None, w, dx, acc, eps),
        ),
    };
    let mut out = vec![T::to_cpu_storage_owned(dx.into_vec())];
    if w.is_some() {
        let mut dwv = vec![T::zero(); d];
        cpu::from_acc_vec::<T>(&dw, &mut dwv);
        out.push(T::to_cpu_storage_owned(dwv));
    }
    Ok(out)
}
