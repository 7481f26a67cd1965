//! CPU kernels for cross-entropy, forward and backward side by side: per row one max sweep,
//! one sweep for `Σ exp(z − max)` and `Σ z` (lane accumulators, blocks joined in f64), and for
//! the gradient one writing sweep; rows in parallel. Ignored rows are never read.
//!
//! Every task runs compiled for the configured SIMD level ([`Isa::run`]; LLVM vectorizes the
//! lane loops there), half types converted at that level. The row driver is local:
//! `cpu::rows` maps rows to rows of the same length, while these kernels map rows to per-row
//! scalars (lse, loss) and update rows in place.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, Layout, Result, WithDType};
use half::{bf16, f16};
use num_traits::Zero;
use rayon::prelude::*;

use super::{CeBwd, CeFused, CeFwd, CeSum, Params};
use crate::config::{CpuConfig, KernelConfig};
use crate::cpu::{self, dispatch, exp_nonpos_f32, Acc, Elem};
use crate::seam::Inputs;
use crate::simd::Isa;
use crate::validate::fail;

/// The accumulation types with the soft-capping helpers.
pub(crate) trait CeAcc: Acc + WithDType {
    /// `(tanh(y), 1 − tanh²(y))`, both to a few ulps (the second without cancellation).
    fn tanh_sech2(y: Self) -> (Self, Self);
}

impl CeAcc for f32 {
    #[inline(always)]
    fn tanh_sech2(y: f32) -> (f32, f32) {
        tanh_sech2_f32(y)
    }
}

impl CeAcc for f64 {
    #[inline(always)]
    fn tanh_sech2(y: f64) -> (f64, f64) {
        let t = y.tanh();
        let e = (-2.0 * y.abs()).exp();
        (t, 4.0 * e / ((1.0 + e) * (1.0 + e)))
    }
}

/// `tanh(y)` and `sech²(y)` in f32 without a libm call (so loops over it vectorize). With
/// `e = exp(−2|y|)`: `tanh|y| = (1 − e)/(1 + e)` and `sech² = 4e/(1 + e)²`; below |y| = 0.3,
/// where `1 − e` cancels, tanh is its odd Taylor polynomial to y⁹ (truncation < 2e-8 relative).
#[inline(always)]
pub(crate) fn tanh_sech2_f32(y: f32) -> (f32, f32) {
    let a = y.abs();
    let e = exp_nonpos_f32(-2.0 * a);
    let big = (1.0 - e) / (1.0 + e);
    let y2 = a * a;
    let small = a
        * (1.0
            + y2 * (-1.0 / 3.0 + y2 * (2.0 / 15.0 + y2 * (-17.0 / 315.0 + y2 * (62.0 / 2835.0)))));
    let t = if a < 0.3 { small } else { big };
    let den = 1.0 + e;
    (t.copysign(y), 4.0 * e / (den * den))
}

/// A row's constants in the accumulation type.
struct Row<A> {
    /// `(c, 1/c)` of the soft-capping.
    cap: Option<(A, A)>,
    /// `ε`, `ε / V` and `ε·(V − 1)/V` (the target's share of the smoothing).
    eps: A,
    eps_v: A,
    eps_t: A,
    /// `λ`.
    zl: A,
}

/// A counted row's reduction: the max `m` of the (capped) logits, `ln s` with
/// `s = Σ exp(z − m)`, `Σ z`, and `Σ_{j≠t} p_j` (`1 − p_t` without cancellation).
#[derive(Clone, Copy)]
struct Stats<A> {
    m: A,
    ls: A,
    zs: A,
    other: A,
}

impl<A: CeAcc> Row<A> {
    fn new(p: &Params, v: usize) -> Self {
        let (e, vf) = (p.smoothing, v as f64);
        Self {
            cap: p.softcap.map(|c| (A::of(c), A::of(1.0 / c))),
            eps: A::of(e),
            eps_v: A::of(e / vf),
            eps_t: A::of(e * (vf - 1.0) / vf),
            zl: A::of(p.z_loss),
        }
    }

    /// The (soft-capped) logit.
    #[inline(always)]
    fn z(&self, x: A) -> A {
        match self.cap {
            Some((c, ic)) => c * A::tanh_sech2(x * ic).0,
            None => x,
        }
    }

    /// The reduction of a row with target `t`: the sums run over the columns before and after
    /// `t` (vectorized) and the target's term is added on its own. Soft-capping is monotonic,
    /// so the row max is the capped max.
    #[inline(always)]
    fn stats(&self, x: &[A], t: usize) -> Stats<A> {
        let mx = cpu::max(x);
        let (m, (sa, za), (sb, zb)) = match self.cap {
            None => (
                mx,
                exp_sums(&x[..t], mx, |v| v),
                exp_sums(&x[t + 1..], mx, |v| v),
            ),
            Some((c, ic)) => {
                let z = |v: A| c * A::tanh_sech2(v * ic).0;
                let m = z(mx);
                (m, exp_sums(&x[..t], m, z), exp_sums(&x[t + 1..], m, z))
            }
        };
        let zt = self.z(x[t]);
        let other = sa + sb;
        let s = other + A::exp_nonpos(zt - m);
        Stats {
            m,
            ls: s.ln(),
            zs: za + zb + zt,
            other: other / s,
        }
    }

    /// The row's loss `(m − z_t) + ln s + ε·(z_t − Σz/V) + λ·lse²` (the same as the module
    /// doc's form, written so that a certain prediction or `V = 1` gives exactly 0).
    #[inline(always)]
    fn loss(&self, xt: A, st: &Stats<A>) -> A {
        let zt = self.z(xt);
        let lse = st.m + st.ls;
        let l = (st.m - zt) + st.ls + self.zl * lse * lse;
        // (no smoothing term without smoothing: 0·Σz is NaN when a class has a -inf logit)
        if self.eps == A::zero() {
            l
        } else {
            l + self.eps * zt - self.eps_v * st.zs
        }
    }

    /// Overwrites the row (holding the logits) with `gs · d loss / d x`: for `j ≠ t`
    /// `p_j·(1 + 2λ·lse) − ε/V` with `p_j = exp(z_j − m − ln s)`, and for the target
    /// `ε·(V−1)/V − Σ_{j≠t} p_j + 2λ·lse·p_t` (no `p_t − 1` cancellation); times `sech²` with
    /// soft-capping. `other` is `Σ_{j≠t} p_j`.
    #[inline(always)]
    fn grad(&self, row: &mut [A], t: usize, m: A, ls: A, other: A, gs: A) {
        let lse = m + ls;
        let k = (A::one() + (self.zl + self.zl) * lse) * gs;
        let off = self.eps_v * gs;
        let xt = row[t];
        let (pt, dt) = match self.cap {
            None => {
                let g = |v: &mut A| *v = A::exp_nonpos((*v - m) - ls) * k - off;
                row[..t].iter_mut().for_each(g);
                row[t + 1..].iter_mut().for_each(g);
                (A::exp_nonpos((xt - m) - ls), A::one())
            }
            Some((c, ic)) => {
                let g = |v: &mut A| {
                    let (th, s2) = A::tanh_sech2(*v * ic);
                    *v = (A::exp_nonpos((c * th - m) - ls) * k - off) * s2;
                };
                row[..t].iter_mut().for_each(g);
                row[t + 1..].iter_mut().for_each(g);
                let (th, s2) = A::tanh_sech2(xt * ic);
                (A::exp_nonpos((c * th - m) - ls), s2)
            }
        };
        row[t] = (self.eps_t - other + (self.zl + self.zl) * lse * pt) * gs * dt;
    }
}

/// `(Σ exp(z(x) − m), Σ z(x))` over a slice: 16 lane accumulators per block of 1024 elements,
/// the blocks joined in f64.
#[inline(always)]
fn exp_sums<A: CeAcc>(x: &[A], m: A, z: impl Fn(A) -> A) -> (A, A) {
    const LANES: usize = 16;
    let (mut s, mut zs) = (0f64, 0f64);
    for blk in x.chunks(1024) {
        let mut a = [A::zero(); LANES];
        let mut b = [A::zero(); LANES];
        let ch = blk.chunks_exact(LANES);
        let rem = ch.remainder();
        for c in ch {
            for i in 0..LANES {
                let zi = z(c[i]);
                a[i] += A::exp_nonpos(zi - m);
                b[i] += zi;
            }
        }
        let (mut sa, mut sb) = (A::zero(), A::zero());
        for &v in rem {
            let zi = z(v);
            sa += A::exp_nonpos(zi - m);
            sb += zi;
        }
        for i in 0..LANES {
            sa += a[i];
            sb += b[i];
        }
        s += sa.wide();
        zs += sb.wide();
    }
    (A::of(s), A::of(zs))
}

// ---------------------------------------------------------------------------------------------
// Row drivers: tasks of whole rows (at least `task_elems` elements), serial below
// `serial_below`; results in row order. Ignored rows (target < 0) never reach `f`.

fn rows_per_task(cfg: &CpuConfig, d: usize) -> usize {
    cfg.task_elems.div_ceil(d.max(1)).max(1)
}

/// `f(row, logits row)` for every counted row of `x`, `R::default()` for ignored rows.
fn map_rows<T: Elem, R: Send + Default + Clone>(
    cfg: &CpuConfig,
    isa: Isa,
    x: &[T],
    tgt: &[i32],
    d: usize,
    f: impl Fn(usize, &[T::A]) -> R + Sync,
) -> Vec<R> {
    let rpt = rows_per_task(cfg, d);
    let task = |(ti, xs): (usize, &[T])| -> Vec<R> {
        isa.run(|| map_task::<T, R>(isa, ti * rpt, xs, tgt, d, &f))
    };
    let parts: Vec<Vec<R>> = if x.len() < cfg.serial_below {
        x.chunks(rpt * d).enumerate().map(task).collect()
    } else {
        x.par_chunks(rpt * d).enumerate().map(task).collect()
    };
    parts.concat()
}

/// One task of [`map_rows`]: rows `r0..` of `xs`, compiled for `isa` (inlined into its
/// [`Isa::run`]).
#[inline(always)]
fn map_task<T: Elem, R: Default>(
    isa: Isa,
    r0: usize,
    xs: &[T],
    tgt: &[i32],
    d: usize,
    f: &impl Fn(usize, &[T::A]) -> R,
) -> Vec<R> {
    let mut scratch = Vec::new();
    xs.chunks(d)
        .enumerate()
        .map(|(k, xr)| {
            let r = r0 + k;
            if tgt[r] < 0 {
                return R::default();
            }
            match T::as_acc(xr) {
                Some(a) => f(r, a),
                None => {
                    scratch.resize(d, T::A::zero());
                    T::to_acc_at(isa, xr, &mut scratch);
                    f(r, &scratch)
                }
            }
        })
        .collect()
}

/// `f(row, working row)` for every counted row of `dst`: the working row holds `src`'s row
/// (or `dst`'s own when `src` is `None`) in the accumulation type and is written back to
/// `dst` after `f`. Ignored rows of `dst` are set to zero.
fn update_rows<T: Elem, R: Send + Default + Clone>(
    cfg: &CpuConfig,
    isa: Isa,
    src: Option<&[T]>,
    dst: &mut [T],
    tgt: &[i32],
    d: usize,
    f: impl Fn(usize, &mut [T::A]) -> R + Sync,
) -> Vec<R> {
    let rpt = rows_per_task(cfg, d);
    let task = |(ti, ys): (usize, &mut [T])| -> Vec<R> {
        isa.run(|| update_task::<T, R>(isa, ti * rpt, src, ys, tgt, d, &f))
    };
    let parts: Vec<Vec<R>> = if dst.len() < cfg.serial_below {
        dst.chunks_mut(rpt * d).enumerate().map(task).collect()
    } else {
        dst.par_chunks_mut(rpt * d).enumerate().map(task).collect()
    };
    parts.concat()
}

/// One task of [`update_rows`]: rows `r0..` of `ys`, compiled for `isa`.
#[inline(always)]
fn update_task<T: Elem, R: Default>(
    isa: Isa,
    r0: usize,
    src: Option<&[T]>,
    ys: &mut [T],
    tgt: &[i32],
    d: usize,
    f: &impl Fn(usize, &mut [T::A]) -> R,
) -> Vec<R> {
    let mut scratch = Vec::new();
    ys.chunks_mut(d)
        .enumerate()
        .map(|(k, yr)| {
            let r = r0 + k;
            if tgt[r] < 0 {
                yr.fill(T::zero());
                return R::default();
            }
            let xr = src.map(|s| &s[r * d..(r + 1) * d]);
            if T::IS_ACC {
                if let Some(xr) = xr {
                    yr.copy_from_slice(xr);
                }
                f(r, T::as_acc_mut(yr).expect("IS_ACC"))
            } else {
                scratch.resize(d, T::A::zero());
                T::to_acc_at(isa, xr.unwrap_or(yr), &mut scratch);
                let res = f(r, &mut scratch);
                T::from_acc_at(isa, &scratch, yr);
                res
            }
        })
        .collect()
}

/// The rows' sum in f64, in row order.
fn total<A: Acc>(v: &[A]) -> f64 {
    v.iter().map(|x| x.wide()).sum()
}

fn last_dim(l: &Layout) -> usize {
    l.dims().last().copied().unwrap_or(1)
}

fn targets<'a>(op: &str, ins: &Inputs<'a, CpuStorage>) -> Result<&'a [i32]> {
    let (s, l) = ins.get(1)?;
    cpu::slice::<i32>(op, "targets", s, l)
}

fn f32_storage(v: f64) -> CpuStorage {
    CpuStorage::F32(vec![v as f32])
}

// ---------------------------------------------------------------------------------------------
// Forward: loss and lse.

pub(crate) fn forward(
    k: &CeFwd,
    cfg: &KernelConfig,
    ins: &Inputs<CpuStorage>,
) -> Result<Vec<CpuStorage>> {
    let (xs, _) = ins.get(0)?;
    dispatch!(ins.op(), xs.dtype(), |T| forward_t::<T>(k, cfg, ins))
}

fn forward_t<T: Elem>(
    k: &CeFwd,
    cfg: &KernelConfig,
    ins: &Inputs<CpuStorage>,
) -> Result<Vec<CpuStorage>>
where
    T::A: CeAcc,
{
    let op = ins.op();
    let (xs, xl) = ins.get(0)?;
    let x = cpu::slice::<T>(op, "logits", xs, xl)?;
    let tgt = targets(op, ins)?;
    let d = last_dim(xl);
    let r = Row::<T::A>::new(&k.p, d);
    let isa = Isa::new(op, cfg.cpu.simd)?;
    let res = map_rows::<T, [T::A; 3]>(&cfg.cpu, isa, x, tgt, d, |i, row| {
        let t = tgt[i] as usize;
        let st = r.stats(row, t);
        [r.loss(row[t], &st), st.m + st.ls, st.other]
    });
    let loss: Vec<T::A> = res.iter().map(|v| v[0]).collect();
    let stats: Vec<T::A> = res.iter().flat_map(|v| [v[1], v[2]]).collect();
    Ok(vec![
        f32_storage(total(&loss) * k.scale),
        T::A::to_cpu_storage_owned(stats),
    ])
}

// ---------------------------------------------------------------------------------------------
// Backward from the saved lse.

pub(crate) fn backward(
    k: &CeBwd,
    cfg: &KernelConfig,
    ins: &Inputs<CpuStorage>,
) -> Result<Vec<CpuStorage>> {
    let (xs, _) = ins.get(0)?;
    dispatch!(ins.op(), xs.dtype(), |T| backward_t::<T>(k, cfg, ins))
}

fn backward_t<T: Elem>(
    k: &CeBwd,
    cfg: &KernelConfig,
    ins: &Inputs<CpuStorage>,
) -> Result<Vec<CpuStorage>>
where
    T::A: CeAcc,
{
    let op = ins.op();
    let (xs, xl) = ins.get(0)?;
    let x = cpu::slice::<T>(op, "logits", xs, xl)?;
    let tgt = targets(op, ins)?;
    let (ss, sl) = ins.get(2)?;
    let stats = cpu::slice::<T::A>(op, "stats", ss, sl)?;
    let dloss = match ins.opt(3) {
        Some((s, l)) => cpu::slice::<f32>(op, "dloss", s, l)?
            .first()
            .copied()
            .unwrap_or(1.0) as f64,
        None => 1.0,
    };
    let d = last_dim(xl);
    let r = Row::<T::A>::new(&k.p, d);
    let gs = T::A::of(k.scale * dloss);
    let mut dx = cpu::alloc::<T>(x.len(), cfg.poison);
    let isa = Isa::new(op, cfg.cpu.simd)?;
    update_rows::<T, ()>(&cfg.cpu, isa, Some(x), &mut dx, tgt, d, |i, row| {
        let (lse, other) = (stats[2 * i], stats[2 * i + 1]);
        r.grad(row, tgt[i] as usize, lse, T::A::zero(), other, gs)
    });
    Ok(vec![T::to_cpu_storage_owned(dx)])
}

// ---------------------------------------------------------------------------------------------
// Loss and gradient in one pass (out of place, and in place).

/// Mutable access to a CPU storage's data.
pub(crate) trait SliceMut: Sized {
    fn slice_mut(s: &mut CpuStorage) -> Option<&mut [Self]>;
}

macro_rules! slice_mut {
    ($t:ty, $v:ident) => {
        impl SliceMut for $t {
            fn slice_mut(s: &mut CpuStorage) -> Option<&mut [$t]> {
                match s {
                    CpuStorage::$v(v) => Some(v.as_mut_slice()),
                    _ => None,
                }
            }
        }
    };
}
slice_mut!(f32, F32);
slice_mut!(f64, F64);
slice_mut!(f16, F16);
slice_mut!(bf16, BF16);

/// The contiguous data of an in-place destination.
pub(crate) fn dst_slice<'a, T: SliceMut>(
    op: &str,
    arg: &str,
    s: &'a mut CpuStorage,
    l: &Layout,
) -> Result<&'a mut [T]> {
    let Some((a, b)) = l.contiguous_offsets() else {
        fail!(
            op,
            "{arg} must be contiguous (strides {:?} for shape {:?})",
            l.stride(),
            l.dims()
        )
    };
    match T::slice_mut(s) {
        Some(v) => Ok(&mut v[a..b]),
        None => fail!(op, "internal: {arg} has an unexpected dtype"),
    }
}

/// Loss and gradient rows: `dst` receives the gradient of `src`'s rows (or of its own rows).
fn fused_rows<T: Elem>(
    k: &CeFused,
    cfg: &KernelConfig,
    isa: Isa,
    src: Option<&[T]>,
    dst: &mut [T],
    tgt: &[i32],
    d: usize,
) -> Vec<T::A>
where
    T::A: CeAcc,
{
    let r = Row::<T::A>::new(&k.p, d);
    let gs = T::A::of(k.scale);
    update_rows::<T, T::A>(&cfg.cpu, isa, src, dst, tgt, d, |i, row| {
        let t = tgt[i] as usize;
        let st = r.stats(row, t);
        let loss = r.loss(row[t], &st);
        r.grad(row, t, st.m, st.ls, st.other, gs);
        loss
    })
}

pub(crate) fn fused(
    k: &CeFused,
    cfg: &KernelConfig,
    ins: &Inputs<CpuStorage>,
) -> Result<Vec<CpuStorage>> {
    let (xs, _) = ins.get(0)?;
    dispatch!(ins.op(), xs.dtype(), |T| fused_t::<T>(k, cfg, ins))
}

fn fused_t<T: Elem>(
    k: &CeFused,
    cfg: &KernelConfig,
    ins: &Inputs<CpuStorage>,
) -> Result<Vec<CpuStorage>>
where
    T::A: CeAcc,
{
    let op = ins.op();
    let (xs, xl) = ins.get(0)?;
    let x = cpu::slice::<T>(op, "logits", xs, xl)?;
    let tgt = targets(op, ins)?;
    let mut dx = cpu::alloc::<T>(x.len(), cfg.poison);
    let isa = Isa::new(op, cfg.cpu.simd)?;
    let losses = fused_rows::<T>(k, cfg, isa, Some(x), &mut dx, tgt, last_dim(xl));
    Ok(vec![
        T::to_cpu_storage_owned(dx),
        T::A::to_cpu_storage_owned(losses),
    ])
}

pub(crate) fn fused_inplace(
    k: &CeFused,
    cfg: &KernelConfig,
    (ds, dl): (&mut CpuStorage, &Layout),
    ins: &Inputs<CpuStorage>,
) -> Result<Vec<CpuStorage>> {
    let op = ins.op();
    // `ins` holds the inputs after the destination: targets first.
    let (ts, tl) = ins.get(0)?;
    let tgt = cpu::slice::<i32>(op, "targets", ts, tl)?;
    let d = last_dim(dl);
    let isa = Isa::new(op, cfg.cpu.simd)?;
    dispatch!(op, ds.dtype(), |T| {
        let dst = dst_slice::<T>(op, "logits", ds, dl)?;
        let losses = fused_rows::<T>(k, cfg, isa, None, dst, tgt, d);
        Ok(vec![<T as Elem>::A::to_cpu_storage_owned(losses)])
    })
}

// ---------------------------------------------------------------------------------------------
// Sum of row losses.

pub(crate) fn sum(
    k: &CeSum,
    _: &KernelConfig,
    ins: &Inputs<CpuStorage>,
) -> Result<Vec<CpuStorage>> {
    let op = ins.op();
    let (s, l) = ins.get(0)?;
    let t = match s {
        CpuStorage::F32(_) => total(cpu::slice::<f32>(op, "row_losses", s, l)?),
        CpuStorage::F64(_) => total(cpu::slice::<f64>(op, "row_losses", s, l)?),
        _ => fail!(op, "internal: row losses must be f32 or f64"),
    };
    Ok(vec![f32_storage(t * k.scale)])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tanh_and_sech2_match_libm() {
        let (mut wt, mut ws) = (0f64, 0f64);
        let mut y = -12.0f32;
        while y <= 12.0 {
            let (t, s) = tanh_sech2_f32(y);
            let yt = (y as f64).tanh();
            let ys = 1.0 - yt * yt;
            wt = wt.max(((t as f64 - yt) / yt.abs().max(1e-30)).abs());
            ws = ws.max(((s as f64 - ys) / ys).abs());
            y += 0.000_71;
        }
        assert!(wt < 5e-7, "tanh worst relative error {wt}");
        assert!(ws < 1e-6, "sech² worst relative error {ws}");
        assert_eq!(tanh_sech2_f32(0.0).0, 0.0);
        assert_eq!(tanh_sech2_f32(f32::INFINITY).0, 1.0);
        assert_eq!(tanh_sech2_f32(f32::NEG_INFINITY).0, -1.0);
        assert!(tanh_sech2_f32(f32::NAN).0.is_nan());
    }
}
