//! CPU kernels for GLU, forward and backward: rows of `I` in parallel
//! ([`cpu::par_rows`]), each an elementwise loop (the logistic function from the crate's
//! libm-free `exp`) compiled for the configured SIMD level ([`Isa::run`]: LLVM vectorizes it
//! there), half types through f32 blocks of scratch converted at that level.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, Result};
use num_traits::Zero;

use super::{GluBwd, GluFwd, GluKind};
use crate::config::KernelConfig;
use crate::cpu::{self, dispatch, Acc, Elem};
use crate::seam::Inputs;
use crate::simd::Isa;

/// `sqrt(2/π)` and the cubic coefficient of gelu_tanh.
const K: f64 = 0.797_884_560_802_865_4;
const C: f64 = 0.044_715;

/// `(σ(a), 1 − σ(a))`, both from `e^{−|a|}`: no cancellation, no overflow; NaN stays NaN.
#[inline(always)]
fn sig2<A: Acc>(a: A) -> (A, A) {
    let e = A::exp_nonpos(-a.abs());
    let r = A::one() / (A::one() + e);
    let er = e * r;
    if a >= A::zero() {
        (r, er)
    } else {
        (er, r)
    }
}

/// For a gate value `g`: `(s, 1 − s, z'(g))` with `s = σ(z(g))` (see the module doc of glu).
#[inline(always)]
fn gate<A: Acc, const GELU: bool>(g: A) -> (A, A, A) {
    if GELU {
        let (k2, k2c) = (A::of(2.0 * K), A::of(2.0 * K * C));
        let g2 = g * g;
        let (s, om) = sig2(g * (k2 + k2c * g2));
        (s, om, k2 + A::of(3.0) * k2c * g2)
    } else {
        let (s, om) = sig2(g);
        (s, om, A::one())
    }
}

#[inline(always)]
fn fwd_span<A: Acc, const GELU: bool>(g: &[A], u: &[A], y: &mut [A]) {
    for ((o, &gv), &uv) in y.iter_mut().zip(g).zip(u) {
        let (s, _, _) = gate::<A, GELU>(gv);
        *o = gv * s * uv;
    }
}

#[inline(always)]
fn bwd_span<A: Acc, const GELU: bool>(g: &[A], u: &[A], dy: &[A], dg: &mut [A], du: &mut [A]) {
    for ((((a, b), &gv), &uv), &d) in dg.iter_mut().zip(du.iter_mut()).zip(g).zip(u).zip(dy) {
        let (s, om, dz) = gate::<A, GELU>(gv);
        // g·s·(1 − s) first: 0 for saturated gates even when z' is large.
        *a = d * uv * (s + gv * s * om * dz);
        *b = d * gv * s;
    }
}

/// Elements per block of f32 scratch for half types.
const BLK: usize = 512;

/// `f` on the spans in the accumulation type: directly for f32/f64, in blocks of [`BLK`]
/// converted through scratch for f16/bf16.
#[inline(always)]
fn on_acc<T: Elem, const N: usize, const M: usize>(
    isa: Isa,
    ins: [&[T]; N],
    outs: [&mut [T]; M],
    mut f: impl FnMut([&[T::A]; N], [&mut [T::A]; M]),
) {
    if T::IS_ACC {
        let i = ins.map(|s| T::as_acc(s).expect("IS_ACC"));
        let o = outs.map(|s| T::as_acc_mut(s).expect("IS_ACC"));
        return f(i, o);
    }
    let n = outs[0].len();
    let mut ib = [[T::A::zero(); BLK]; N];
    let mut ob = [[T::A::zero(); BLK]; M];
    let mut outs = outs;
    let mut lo = 0;
    while lo < n {
        let len = BLK.min(n - lo);
        for (b, s) in ib.iter_mut().zip(&ins) {
            T::to_acc_at(isa, &s[lo..lo + len], &mut b[..len]);
        }
        {
            let i: [&[T::A]; N] = std::array::from_fn(|k| &ib[k][..len]);
            let mut it = ob.iter_mut();
            let o: [&mut [T::A]; M] =
                std::array::from_fn(|_| &mut it.next().expect("M blocks")[..len]);
            f(i, o);
        }
        for (s, b) in outs.iter_mut().zip(&ob) {
            T::from_acc_at(isa, &b[..len], &mut s[lo..lo + len]);
        }
        lo += len;
    }
}

pub(crate) fn forward(
    k: &GluFwd,
    cfg: &KernelConfig,
    ins: &Inputs<CpuStorage>,
) -> Result<Vec<CpuStorage>> {
    let (s, _) = ins.get(0)?;
    dispatch!(ins.op(), s.dtype(), |T| match k.kind {
        GluKind::SwiGlu => forward_t::<T, false>(k, cfg, ins),
        GluKind::GeGluTanh => forward_t::<T, true>(k, cfg, ins),
    })
}

fn forward_t<T: Elem, const GELU: bool>(
    k: &GluFwd,
    cfg: &KernelConfig,
    ins: &Inputs<CpuStorage>,
) -> Result<Vec<CpuStorage>> {
    let op = ins.op();
    let (gs, gl) = ins.get(0)?;
    let g = cpu::slice::<T>(op, ins.name(0), gs, gl)?;
    let last = gl.dims()[gl.dims().len() - 1];
    let (i, u) = if k.packed {
        (last / 2, None)
    } else {
        let (us, ul) = ins.get(1)?;
        (last, Some(cpu::slice::<T>(op, "up", us, ul)?))
    };
    let rows = if k.packed {
        g.len() / (2 * i)
    } else {
        g.len() / i
    };
    let isa = Isa::new(op, cfg.cpu.simd)?;
    let mut y = cpu::alloc::<T>(rows * i, cfg.poison);
    cpu::par_rows(&cfg.cpu, rows, [&mut y], [i], |r, [yo]| {
        isa.run(|| match u {
            // Two tensors: the task's rows are one contiguous span.
            Some(u) => {
                let span = r.start * i..r.end * i;
                on_acc::<T, 2, 1>(isa, [&g[span.clone()], &u[span]], [yo], |[g, u], [y]| {
                    fwd_span::<T::A, GELU>(g, u, y)
                })
            }
            None => {
                for (row, yr) in r.zip(yo.chunks_exact_mut(i)) {
                    let (gr, ur) = g[row * 2 * i..(row + 1) * 2 * i].split_at(i);
                    on_acc::<T, 2, 1>(isa, [gr, ur], [yr], |[g, u], [y]| {
                        fwd_span::<T::A, GELU>(g, u, y)
                    })
                }
            }
        })
    });
    Ok(vec![T::to_cpu_storage_owned(y)])
}

pub(crate) fn backward(
    k: &GluBwd,
    cfg: &KernelConfig,
    ins: &Inputs<CpuStorage>,
) -> Result<Vec<CpuStorage>> {
    let (s, _) = ins.get(0)?;
    dispatch!(ins.op(), s.dtype(), |T| match k.kind {
        GluKind::SwiGlu => backward_t::<T, false>(k, cfg, ins),
        GluKind::GeGluTanh => backward_t::<T, true>(k, cfg, ins),
    })
}

fn backward_t<T: Elem, const GELU: bool>(
    k: &GluBwd,
    cfg: &KernelConfig,
    ins: &Inputs<CpuStorage>,
) -> Result<Vec<CpuStorage>> {
    let op = ins.op();
    let (gs, gl) = ins.get(0)?;
    let g = cpu::slice::<T>(op, ins.name(0), gs, gl)?;
    let (ds, dl) = ins.get(2)?;
    let dy = cpu::slice::<T>(op, "dy", ds, dl)?;
    let last = gl.dims()[gl.dims().len() - 1];
    let isa = Isa::new(op, cfg.cpu.simd)?;
    if k.packed {
        let i = last / 2;
        let rows = g.len() / last;
        let mut dgu = cpu::alloc::<T>(g.len(), cfg.poison);
        cpu::par_rows(&cfg.cpu, rows, [&mut dgu], [2 * i], |r, [o]| {
            isa.run(|| {
                for (row, orow) in r.zip(o.chunks_exact_mut(2 * i)) {
                    let (gr, ur) = g[row * 2 * i..(row + 1) * 2 * i].split_at(i);
                    let dr = &dy[row * i..(row + 1) * i];
                    let (dgr, dur) = orow.split_at_mut(i);
                    on_acc::<T, 3, 2>(isa, [gr, ur, dr], [dgr, dur], |[g, u, d], [a, b]| {
                        bwd_span::<T::A, GELU>(g, u, d, a, b)
                    })
                }
            })
        });
        return Ok(vec![T::to_cpu_storage_owned(dgu)]);
    }
    let (us, ul) = ins.get(1)?;
    let u = cpu::slice::<T>(op, "up", us, ul)?;
    let rows = g.len() / last;
    let mut dg = cpu::alloc::<T>(g.len(), cfg.poison);
    let mut du = cpu::alloc::<T>(g.len(), cfg.poison);
    cpu::par_rows(
        &cfg.cpu,
        rows,
        [&mut dg, &mut du],
        [last, last],
        |r, [a, b]| {
            let span = r.start * last..r.end * last;
            isa.run(|| {
                on_acc::<T, 3, 2>(
                    isa,
                    [&g[span.clone()], &u[span.clone()], &dy[span]],
                    [a, b],
                    |[g, u, d], [a, b]| bwd_span::<T::A, GELU>(g, u, d, a, b),
                )
            })
        },
    );
    Ok(vec![
        T::to_cpu_storage_owned(dg),
        T::to_cpu_storage_owned(du),
    ])
}
