//! CPU kernels for GLU, forward and backward: rows of `I` in parallel
//! ([`cpu::par_rows`]), each in chunks of 256: `e^{−|z|}` of the chunk by the SIMD layer's
//! vector `exp`, then an elementwise loop compiled for the configured SIMD level
//! ([`Isa::run`]: LLVM vectorizes it there); half types through f32 blocks of scratch
//! converted at that level.

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

/// `σ(z) = 1/(1 + e)` for `z ≥ 0` and `e/(1 + e)` below, `e = e^{−|z|}` ([`gate_from`]): no
/// cancellation, no overflow; NaN stays NaN (through `g` itself).
#[inline(always)]
fn fwd_span<A: Acc, const GELU: bool>(isa: Isa, g: &[A], u: &[A], y: &mut [A]) {
    let mut e = [A::zero(); CH];
    for ((gc, uc), yc) in g.chunks(CH).zip(u.chunks(CH)).zip(y.chunks_mut(CH)) {
        let e = gate_exps::<A, GELU>(isa, gc, &mut e);
        for (((o, &gv), &uv), &ev) in yc.iter_mut().zip(gc).zip(uc).zip(e.iter()) {
            let (s, _, _) = gate_from::<A, GELU>(gv, ev);
            *o = gv * s * uv;
        }
    }
}

/// Elements per chunk of the vector `exp` in the GLU loops.
const CH: usize = 256;

/// `e^{−|z(g)|}` for a chunk of gates, through the SIMD layer's vector `exp` (the scalar
/// libm-free `exp` called per element does not vectorize): the logistic function's only
/// transcendental, computed once per element.
#[inline(always)]
fn gate_exps<'a, A: Acc, const GELU: bool>(isa: Isa, g: &[A], e: &'a mut [A; CH]) -> &'a [A] {
    let e = &mut e[..g.len()];
    for (ev, &gv) in e.iter_mut().zip(g) {
        *ev = -z_of::<A, GELU>(gv).abs();
    }
    A::v_exp_sub_sum_inplace(isa, e, A::zero());
    e
}

/// The logistic function's argument: `g` (SwiGLU) or `2·sqrt(2/π)·(g + 0.044715·g³)`.
#[inline(always)]
fn z_of<A: Acc, const GELU: bool>(g: A) -> A {
    if GELU {
        let (k2, k2c) = (A::of(2.0 * K), A::of(2.0 * K * C));
        g * (k2 + k2c * g * g)
    } else {
        g
    }
}

/// For a gate value `g` and `e = e^{−|z(g)|}`: `(s, 1 − s, z'(g))` with `s = σ(z(g))` (see the
/// module doc of glu).
#[inline(always)]
fn gate_from<A: Acc, const GELU: bool>(g: A, e: A) -> (A, A, A) {
    let r = A::one() / (A::one() + e);
    let er = e * r;
    let (s, om) = if z_of::<A, GELU>(g) >= A::zero() {
        (r, er)
    } else {
        (er, r)
    };
    let dz = if GELU {
        let (k2, k2c) = (A::of(2.0 * K), A::of(2.0 * K * C));
        k2 + A::of(3.0) * k2c * g * g
    } else {
        A::one()
    };
    (s, om, dz)
}

#[inline(always)]
fn bwd_span<A: Acc, const GELU: bool>(
    isa: Isa,
    g: &[A],
    u: &[A],
    dy: &[A],
    dg: &mut [A],
    du: &mut [A],
) {
    let mut e = [A::zero(); CH];
    // Zipped chunks and elements (no indexing: no bounds checks in the vectorized loop).
    let ins = g.chunks(CH).zip(u.chunks(CH)).zip(dy.chunks(CH));
    let outs = dg.chunks_mut(CH).zip(du.chunks_mut(CH));
    for (((gc, uc), dc), (ac, bc)) in ins.zip(outs) {
        let e = gate_exps::<A, GELU>(isa, gc, &mut e);
        let els = gc.iter().zip(uc).zip(dc).zip(e.iter());
        for ((((&gv, &uv), &d), &ev), (a, b)) in els.zip(ac.iter_mut().zip(bc.iter_mut())) {
            let (s, om, dz) = gate_from::<A, GELU>(gv, ev);
            // g·s·(1 − s) first: 0 for saturated gates even when z' is large.
            *a = d * uv * (s + gv * s * om * dz);
            *b = d * gv * s;
        }
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
    let mut y = cpu::OutBuf::<T>::new(rows * i, cfg.poison);
    cpu::par_rows(&cfg.cpu, rows, [&mut y], [i], |r, [yo]| {
        isa.run(
            #[inline(always)]
            || match u {
                // Two tensors: row by row as in the packed layout, so both layouts chunk the
                // vector `exp` alike and give the same bits.
                Some(u) => {
                    for (row, yr) in r.zip(yo.chunks_exact_mut(i)) {
                        let span = row * i..(row + 1) * i;
                        on_acc::<T, 2, 1>(
                            isa,
                            [&g[span.clone()], &u[span]],
                            [yr],
                            #[inline(always)]
                            |[g, u], [y]| fwd_span::<T::A, GELU>(isa, g, u, y),
                        )
                    }
                }
                None => {
                    for (row, yr) in r.zip(yo.chunks_exact_mut(i)) {
                        let (gr, ur) = g[row * 2 * i..(row + 1) * 2 * i].split_at(i);
                        on_acc::<T, 2, 1>(
                            isa,
                            [gr, ur],
                            [yr],
                            #[inline(always)]
                            |[g, u], [y]| fwd_span::<T::A, GELU>(isa, g, u, y),
                        )
                    }
                }
            },
        )
    });
    Ok(vec![T::to_cpu_storage_owned(y.into_vec())])
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
        let mut dgu = cpu::OutBuf::<T>::new(g.len(), cfg.poison);
        cpu::par_rows(&cfg.cpu, rows, [&mut dgu], [2 * i], |r, [o]| {
            isa.run(
                #[inline(always)]
                || {
                    for (row, orow) in r.zip(o.chunks_exact_mut(2 * i)) {
                        let (gr, ur) = g[row * 2 * i..(row + 1) * 2 * i].split_at(i);
                        let dr = &dy[row * i..(row + 1) * i];
                        let (dgr, dur) = orow.split_at_mut(i);
                        on_acc::<T, 3, 2>(
                            isa,
                            [gr, ur, dr],
                            [dgr, dur],
                            #[inline(always)]
                            |[g, u, d], [a, b]| bwd_span::<T::A, GELU>(isa, g, u, d, a, b),
                        )
                    }
                },
            )
        });
        return Ok(vec![T::to_cpu_storage_owned(dgu.into_vec())]);
    }
    let (us, ul) = ins.get(1)?;
    let u = cpu::slice::<T>(op, "up", us, ul)?;
    let rows = g.len() / last;
    let mut dg = cpu::OutBuf::<T>::new(g.len(), cfg.poison);
    let mut du = cpu::OutBuf::<T>::new(g.len(), cfg.poison);
    cpu::par_rows(
        &cfg.cpu,
        rows,
        [&mut dg, &mut du],
        [last, last],
        |r, [a, b]| {
            // Row by row, as the packed layout (the same bits from both).
            isa.run(
                #[inline(always)]
                || {
                    let rows = r
                        .zip(a.chunks_exact_mut(last))
                        .zip(b.chunks_exact_mut(last));
                    for ((row, ar), br) in rows {
                        let span = row * last..(row + 1) * last;
                        on_acc::<T, 3, 2>(
                            isa,
                            [&g[span.clone()], &u[span.clone()], &dy[span]],
                            [ar, br],
                            #[inline(always)]
                            |[g, u, d], [a, b]| bwd_span::<T::A, GELU>(isa, g, u, d, a, b),
                        )
                    }
                },
            )
        },
    );
    Ok(vec![
        T::to_cpu_storage_owned(dg.into_vec()),
        T::to_cpu_storage_owned(du.into_vec()),
    ])
}
