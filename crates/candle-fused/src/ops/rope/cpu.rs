//! CPU kernel for RoPE (forward = rotation by `+θ`, backward = by `−θ`, one function):
//! head vectors in parallel ([`cpu::par_rows`]; `x` is read through its strides), each
//! rotated by one loop over its pairs with the table row of its position, compiled for the
//! configured SIMD level ([`Isa::run`]: LLVM vectorizes it there); half types through an f32
//! row of scratch converted at that level.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, Layout, Result};
use num_traits::Zero;

use super::{Geom, Rope, RopeStyle};
use crate::config::KernelConfig;
use crate::cpu::{self, dispatch, Acc, Elem};
use crate::seam::Inputs;
use crate::simd::Isa;
use crate::validate::fail;

pub(crate) fn run(
    k: &Rope,
    cfg: &KernelConfig,
    ins: &Inputs<CpuStorage>,
) -> Result<Vec<CpuStorage>> {
    let (xs, _) = ins.get(0)?;
    dispatch!(ins.op(), xs.dtype(), |T| run_t::<T>(k, cfg, ins))
}

/// The positions as table rows, each checked against the table.
fn positions(op: &str, s: &CpuStorage, l: &Layout, n_pos: usize) -> Result<Vec<usize>> {
    let check = |i: usize, v: i64| -> Result<usize> {
        if v < 0 || v as u64 >= n_pos as u64 {
            fail!(
                op,
                "positions[{i}] = {v} is outside the table (positions 0..={}, max_positions \
                 {n_pos}); build a larger RopeTable",
                n_pos - 1
            )
        }
        Ok(v as usize)
    };
    match s {
        CpuStorage::U32(_) => cpu::slice::<u32>(op, "positions", s, l)?
            .iter()
            .enumerate()
            .map(|(i, &v)| check(i, v as i64))
            .collect(),
        CpuStorage::I64(_) => cpu::slice::<i64>(op, "positions", s, l)?
            .iter()
            .enumerate()
            .map(|(i, &v)| check(i, v))
            .collect(),
        _ => fail!(op, "positions must be u32 or i64, got {:?}", s.dtype()),
    }
}

fn run_t<T: Elem>(
    k: &Rope,
    cfg: &KernelConfig,
    ins: &Inputs<CpuStorage>,
) -> Result<Vec<CpuStorage>> {
    let op = ins.op();
    let (xs, xl) = ins.get(0)?;
    let (cs, cl) = ins.get(1)?;
    let (ss, sl) = ins.get(2)?;
    let (ps, pl) = ins.get(3)?;
    let g = Geom::new(k, xl, pl, cl)?;
    let x = T::cpu_storage_as_slice(xs)?;
    if g.x_extent() > x.len() {
        fail!(op, "internal: the layout of x reaches past its storage")
    }
    let cos = cpu::slice::<f32>(op, "cos", cs, cl)?;
    let sin = cpu::slice::<f32>(op, "sin", ss, sl)?;
    let pos = positions(op, ps, pl, g.n_pos)?;
    let half = g.rot / 2;
    let (style, sign) = (k.style, if k.inverse { -1.0 } else { 1.0 });
    let d = g.d;
    let isa = Isa::new(op, cfg.cpu.simd)?;
    let mut out = cpu::OutBuf::<T>::new(g.rows() * d, cfg.poison);
    cpu::par_rows(&cfg.cpu, g.rows(), [&mut out], [d], |rows, [o]| {
        isa.run(
            #[inline(always)]
            || {
                let mut xa = vec![T::A::zero(); if T::IS_ACC { 0 } else { d }];
                let mut ya = xa.clone();
                for (r, orow) in rows.zip(o.chunks_exact_mut(d)) {
                    // Output row r in (b, h, t) order of the layout: its input row and position.
                    let (b, h, t) = match k.layout {
                        super::RopeLayout::Bhtd => (r / (g.h * g.t), (r / g.t) % g.h, r % g.t),
                        super::RopeLayout::Bthd => (r / (g.h * g.t), r % g.h, (r / g.h) % g.t),
                    };
                    let xo = g.off + b * g.sb + h * g.sh + t * g.st;
                    let xrow = &x[xo..xo + d];
                    let p = pos[b * g.pos_b + t];
                    let c = &cos[p * half..(p + 1) * half];
                    let s = &sin[p * half..(p + 1) * half];
                    match (T::as_acc(xrow), T::as_acc_mut(orow)) {
                        (Some(xr), Some(yr)) => rotate(style, sign, xr, yr, c, s),
                        _ => {
                            T::to_acc_at(isa, xrow, &mut xa);
                            rotate(style, sign, &xa, &mut ya, c, s);
                            T::from_acc_at(isa, &ya, orow);
                        }
                    }
                }
            },
        )
    });
    Ok(vec![T::to_cpu_storage_owned(out.into_vec())])
}

/// One head vector: `y = R(sign·θ)·x` over the first `2·c.len()` entries, the rest copied.
#[inline(always)]
fn rotate<A: Acc>(style: RopeStyle, sign: f64, x: &[A], y: &mut [A], c: &[f32], s: &[f32]) {
    let half = c.len();
    let sg = A::of(sign);
    let w = |v: f32| A::of(v as f64);
    match style {
        RopeStyle::HalfSplit => {
            let (x1, rest) = x.split_at(half);
            let (x2, xp) = rest.split_at(half);
            let (y1, rest) = y.split_at_mut(half);
            let (y2, yp) = rest.split_at_mut(half);
            for (((((o1, o2), &a), &b), &cv), &sv) in y1
                .iter_mut()
                .zip(y2.iter_mut())
                .zip(x1)
                .zip(x2)
                .zip(c)
                .zip(s)
            {
                let (cv, sv) = (w(cv), w(sv) * sg);
                *o1 = a * cv - b * sv;
                *o2 = b * cv + a * sv;
            }
            yp.copy_from_slice(xp);
        }
        RopeStyle::Interleaved => {
            let (xr, xp) = x.split_at(2 * half);
            let (yr, yp) = y.split_at_mut(2 * half);
            for (((yo, xi), &cv), &sv) in
                yr.chunks_exact_mut(2).zip(xr.chunks_exact(2)).zip(c).zip(s)
            {
                let (cv, sv) = (w(cv), w(sv) * sg);
                yo[0] = xi[0] * cv - xi[1] * sv;
                yo[1] = xi[1] * cv + xi[0] * sv;
            }
            yp.copy_from_slice(xp);
        }
    }
}
