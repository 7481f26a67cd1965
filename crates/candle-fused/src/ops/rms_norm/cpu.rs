//! CPU kernels for RMSNorm: one sweep to reduce a row (sum of squares; in the backward also
//! ⟨dy⊙w, x⟩ in the same sweep), one to write it; rows in parallel; the weight gradient
//! accumulated per fixed row block and summed in order (deterministic).

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, Layout, Result, Shape};

use super::BwdArgs;
use crate::cpu::{self, dispatch, Acc, Elem};

const OP: &str = "rms_norm";

/// `1 / sqrt(mean(x²) + eps)` of a row.
#[inline(always)]
pub(crate) fn rstd<A: Acc>(x: &[A], eps: A) -> A {
    let ss = cpu::sum_map(x, |v| v * v);
    A::one() / (ss / A::of(x.len() as f64) + eps).sqrt()
}

/// `y = x · r ⊙ w`.
#[inline(always)]
pub(crate) fn write_row<A: Acc>(x: &[A], r: A, w: Option<&[A]>, y: &mut [A]) {
    match w {
        Some(w) => {
            for ((o, &xv), &wv) in y.iter_mut().zip(x).zip(w) {
                *o = xv * r * wv;
            }
        }
        None => {
            for (o, &xv) in y.iter_mut().zip(x) {
                *o = xv * r;
            }
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
fn bwd_row<A: Acc>(
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
        Some(w) => {
            for ((o, &d), &wv) in dx.iter_mut().zip(dy).zip(w) {
                *o = d * wv;
            }
        }
        None => dx.copy_from_slice(dy),
    }
    let (ss, dot) = cpu::wide_sums(x, dx);
    let denom = ss + n as f64 * eps;
    let r = 1.0 / (ss / n as f64 + eps).sqrt();
    let c = dot / denom;
    for (o, &xv) in dx.iter_mut().zip(x) {
        *o = A::of(r * (o.wide() - xv.wide() * c));
    }
    if let Some(dres) = dres {
        for (o, &v) in dx.iter_mut().zip(dres) {
            *o += v;
        }
    }
    if w.is_some() {
        let ra = A::of(r);
        for ((a, &gv), &xv) in dw.iter_mut().zip(dy).zip(x) {
            *a += gv * xv * ra;
        }
    }
}

pub(crate) fn forward(
    eps: f64,
    s: &CpuStorage,
    l: &Layout,
    w: Option<(&CpuStorage, &Layout)>,
) -> Result<(CpuStorage, Shape)> {
    dispatch!(OP, s.dtype(), |T| forward_t::<T>(eps, s, l, w))
}

fn forward_t<T: Elem>(
    eps: f64,
    s: &CpuStorage,
    l: &Layout,
    w: Option<(&CpuStorage, &Layout)>,
) -> Result<(CpuStorage, Shape)> {
    let x = cpu::slice::<T>(OP, "x", s, l)?;
    let d = l.dims()[l.dims().len() - 1];
    let w = match w {
        Some((ws, wl)) => Some(cpu::to_acc_vec(cpu::slice::<T>(OP, "weight", ws, wl)?)),
        None => None,
    };
    let eps = T::A::of(eps);
    let mut out = cpu::alloc::<T>(x.len());
    cpu::rows([x], [&mut out], d, 0, |_, [x], [y], _| {
        write_row(x, rstd(x, eps), w.as_deref(), y)
    });
    Ok((T::to_cpu_storage_owned(out), l.shape().clone()))
}

/// Returns `dx` (shape of x) and, with a weight, `dw` (`[D]`).
pub(crate) fn backward(
    eps: f64,
    a: BwdArgs<'_, CpuStorage>,
) -> Result<(CpuStorage, Option<CpuStorage>)> {
    dispatch!(OP, a.x.0.dtype(), |T| backward_t::<T>(eps, &a))
}

fn backward_t<T: Elem>(
    eps: f64,
    a: &BwdArgs<'_, CpuStorage>,
) -> Result<(CpuStorage, Option<CpuStorage>)> {
    let x = cpu::slice::<T>(OP, "x", a.x.0, a.x.1)?;
    let dy = cpu::slice::<T>(OP, "dy", a.dy.0, a.dy.1)?;
    let dres = a
        .dres
        .map(|(s, l)| cpu::slice::<T>(OP, "d_sum", s, l))
        .transpose()?;
    let dims = a.x.1.dims();
    let d = dims[dims.len() - 1];
    let w = match a.w {
        Some((ws, wl)) => Some(cpu::to_acc_vec(cpu::slice::<T>(OP, "weight", ws, wl)?)),
        None => None,
    };
    let w = w.as_deref();
    let dw_len = if w.is_some() { d } else { 0 };
    let mut dx = cpu::alloc::<T>(x.len());
    let dw = match dres {
        Some(dres) => cpu::rows(
            [x, dy, dres],
            [&mut dx],
            d,
            dw_len,
            |_, [x, g, dr], [dx], acc| bwd_row(x, g, Some(dr), w, dx, acc, eps),
        ),
        None => cpu::rows([x, dy], [&mut dx], d, dw_len, |_, [x, g], [dx], acc| {
            bwd_row(x, g, None, w, dx, acc, eps)
        }),
    };
    let dw = w.map(|_| {
        let mut out = vec![T::zero(); d];
        cpu::from_acc_vec::<T>(&dw, &mut out);
        T::to_cpu_storage_owned(out)
    });
    Ok((T::to_cpu_storage_owned(dx), dw))
}
