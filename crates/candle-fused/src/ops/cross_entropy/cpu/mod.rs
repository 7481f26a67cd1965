//! CPU kernels for cross-entropy, forward and backward side by side: per row one max sweep,
//! one sweep for `Σ exp(z − max)` and `Σ z` (lane accumulators, blocks joined in f64), and for
//! the gradient one writing sweep; rows in parallel. Ignored rows are never read.
//!
//! Every task runs compiled for the configured SIMD level ([`Isa::run`]; LLVM vectorizes the
//! lane loops there), half-type rows read in blocks converted at that level (`row.rs`: the
//! row math). The row driver is local:
//! `cpu::rows` maps rows to rows of the same length, while these kernels map rows to per-row
//! scalars (lse, loss) and update rows in place.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, Layout, Result, WithDType};
use half::{bf16, f16};
use num_traits::Zero;
use rayon::prelude::*;

mod row;

pub(crate) use row::CeAcc;
use row::Row;

use super::{CeBwd, CeFused, CeFwd, CeSum};
use crate::config::{CpuConfig, KernelConfig};
use crate::cpu::{self, dispatch, Acc, Elem};
use crate::seam::Inputs;
use crate::simd::Isa;
use crate::validate::fail;

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
    f: impl Fn(usize, &[T]) -> R + Sync,
) -> Vec<R> {
    let rpt = rows_per_task(cfg, d);
    let task = |(ti, xs): (usize, &[T])| -> Vec<R> {
        isa.run(
            #[inline(always)]
            || {
                xs.chunks(d)
                    .enumerate()
                    .map(
                        #[inline(always)]
                        |(k, xr)| {
                            let r = ti * rpt + k;
                            if tgt[r] < 0 {
                                R::default()
                            } else {
                                f(r, xr)
                            }
                        },
                    )
                    .collect()
            },
        )
    };
    let parts: Vec<Vec<R>> = if x.len() < cfg.serial_below {
        x.chunks(rpt * d).enumerate().map(task).collect()
    } else {
        x.par_chunks(rpt * d).enumerate().map(task).collect()
    };
    parts.concat()
}

/// `f(row, src row, dst row)` for every counted row of `dst` (`src` `None`: in place, the
/// logits are `dst`'s own); ignored rows of `dst` are set to zero.
fn update_rows<T: Elem, R: Send + Default + Clone>(
    cfg: &CpuConfig,
    isa: Isa,
    src: Option<&[T]>,
    dst: &mut [T],
    tgt: &[i32],
    d: usize,
    f: impl Fn(usize, Option<&[T]>, &mut [T]) -> R + Sync,
) -> Vec<R> {
    let rpt = rows_per_task(cfg, d);
    let task = |(ti, ys): (usize, &mut [T])| -> Vec<R> {
        isa.run(
            #[inline(always)]
            || {
                ys.chunks_mut(d)
                    .enumerate()
                    .map(
                        #[inline(always)]
                        |(k, yr)| {
                            let r = ti * rpt + k;
                            if tgt[r] < 0 {
                                yr.fill(T::zero());
                                return R::default();
                            }
                            f(r, src.map(|s| &s[r * d..(r + 1) * d]), yr)
                        },
                    )
                    .collect()
            },
        )
    };
    let parts: Vec<Vec<R>> = if dst.len() < cfg.serial_below {
        dst.chunks_mut(rpt * d).enumerate().map(task).collect()
    } else {
        dst.par_chunks_mut(rpt * d).enumerate().map(task).collect()
    };
    parts.concat()
}

/// The rows' sum in f64, in row order.
fn total<A: Acc>(v: &[A]) -> f64 {
    v.iter().map(|x| x.wide()).sum()
}

fn last_dim(l: &Layout) -> usize {
    l.dims().last().copied().unwrap_or(1)
}

/// The inputs every out-of-place CE kernel starts from: the logits (input 0), the targets
/// (input 1), the row length and the configured SIMD level.
#[allow(clippy::type_complexity)]
fn logits_targets<'a, T: Elem>(
    cfg: &KernelConfig,
    ins: &Inputs<'a, CpuStorage>,
) -> Result<(&'a [T], &'a [i32], usize, Isa)> {
    let op = ins.op();
    let (xs, xl) = ins.get(0)?;
    let (ts, tl) = ins.get(1)?;
    Ok((
        cpu::slice::<T>(op, "logits", xs, xl)?,
        cpu::slice::<i32>(op, "targets", ts, tl)?,
        last_dim(xl),
        Isa::new(op, cfg.cpu.simd)?,
    ))
}

fn f32_storage(v: f64) -> CpuStorage {
    CpuStorage::F32(vec![v as f32])
}

// ---------------------------------------------------------------------------------------------
// Forward: loss and lse.

pub(crate) fn forward_t<T: Elem>(
    k: &CeFwd,
    cfg: &KernelConfig,
    ins: &Inputs<CpuStorage>,
) -> Result<Vec<CpuStorage>>
where
    T::A: CeAcc,
{
    let (x, tgt, d, isa) = logits_targets::<T>(cfg, ins)?;
    let r = Row::<T::A>::new(&k.p, d);
    let res = map_rows::<T, [T::A; 3]>(
        &cfg.cpu,
        isa,
        x,
        tgt,
        d,
        #[inline(always)]
        |i, row| {
            let (st, xt) = r.stats_of(isa, row, tgt[i] as usize);
            [r.loss(xt, &st), st.m + st.ls, st.other]
        },
    );
    let loss: Vec<T::A> = res.iter().map(|v| v[0]).collect();
    let stats: Vec<T::A> = res.iter().flat_map(|v| [v[1], v[2]]).collect();
    Ok(vec![
        f32_storage(total(&loss) * k.scale),
        T::A::to_cpu_storage_owned(stats),
    ])
}

// ---------------------------------------------------------------------------------------------
// Backward from the saved lse.

pub(crate) fn backward_t<T: Elem>(
    k: &CeBwd,
    cfg: &KernelConfig,
    ins: &Inputs<CpuStorage>,
) -> Result<Vec<CpuStorage>>
where
    T::A: CeAcc,
{
    let op = ins.op();
    let (x, tgt, d, isa) = logits_targets::<T>(cfg, ins)?;
    let (ss, sl) = ins.get(2)?;
    let stats = cpu::slice::<T::A>(op, "stats", ss, sl)?;
    let dloss = match ins.opt(3) {
        Some((s, l)) => cpu::slice::<f32>(op, "dloss", s, l)?
            .first()
            .copied()
            .unwrap_or(1.0) as f64,
        None => 1.0,
    };
    let r = Row::<T::A>::new(&k.p, d);
    let gs = T::A::of(k.scale * dloss);
    let mut dx = cpu::alloc::<T>(x.len(), cfg.poison);
    update_rows::<T, ()>(
        &cfg.cpu,
        isa,
        Some(x),
        &mut dx,
        tgt,
        d,
        #[inline(always)]
        |i, src, dst| {
            let (lse, other) = (stats[2 * i], stats[2 * i + 1]);
            let t = tgt[i] as usize;
            r.grad_of(isa, src, dst, t, (lse, T::A::zero(), other), gs)
        },
    );
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
    update_rows::<T, T::A>(
        &cfg.cpu,
        isa,
        src,
        dst,
        tgt,
        d,
        #[inline(always)]
        |i, src, dst| {
            let t = tgt[i] as usize;
            let (st, xt) = r.stats_of(isa, src.unwrap_or(&*dst), t);
            r.grad_of(isa, src, dst, t, (st.m, st.ls, st.other), gs);
            r.loss(xt, &st)
        },
    )
}

pub(crate) fn fused_t<T: Elem>(
    k: &CeFused,
    cfg: &KernelConfig,
    ins: &Inputs<CpuStorage>,
) -> Result<Vec<CpuStorage>>
where
    T::A: CeAcc,
{
    let (x, tgt, d, isa) = logits_targets::<T>(cfg, ins)?;
    let mut dx = cpu::alloc::<T>(x.len(), cfg.poison);
    let losses = fused_rows::<T>(k, cfg, isa, Some(x), &mut dx, tgt, d);
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
