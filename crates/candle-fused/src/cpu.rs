//! Shared CPU machinery: element types with their accumulation type, the parallel row
//! driver every op uses, and the row math it calls: for f32 the runtime-dispatched SIMD layer
//! ([`crate::simd`]), for f64 plain loops (vectorized at the same level).
//!
//! Half types (f16, bf16) are converted a row at a time into an f32 scratch buffer that stays
//! in L1 (at the SIMD level: shifts or `vcvtneps2bf16` for bf16, F16C for f16), computed in
//! f32 and converted back, so they read and write their own dtype and accumulate in f32.
//! f32 and f64 rows are used in place (no copy); f64 accumulates in f64.

use candle_core::{CpuStorage, Layout, Result, WithDType};
use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};
use num_traits::Zero;
use rayon::prelude::*;

use crate::config::CpuConfig;
use crate::seam::Inputs;
use crate::simd::Isa;

mod out;
mod par;
mod rowmath;
pub(crate) use out::{alloc, OutBuf};
use out::{init_range, OutPtr};
pub(crate) use par::par_rows;
#[allow(unused_imports)]
pub(crate) use rowmath::{blocked_sum, exp_nonpos_f32, max, sum_map, wide_sums};

/// Accumulation type of the row kernels: `f32` (for f32, f16, bf16) or `f64`, with the row
/// math the kernels use (f32: [`Isa`]'s vector code; f64: lane loops at the same level).
pub(crate) trait Acc:
    num_traits::Float
    + Default
    + Send
    + Sync
    + std::fmt::Debug
    + std::ops::AddAssign
    + std::ops::SubAssign
    + 'static
{
    /// `exp(x)` for `x <= 0` (or NaN), one element (the softmax argument `x - max`).
    #[allow(dead_code)]
    fn exp_nonpos(x: Self) -> Self;
    fn of(v: f64) -> Self;
    /// Widened to f64 (exact).
    fn wide(self) -> f64;
    /// Maximum of a row (NaN entries may be skipped; they still poison a softmax via exp).
    fn v_max(isa: Isa, x: &[Self]) -> Self;
    /// `dst = exp(src - m)`, returning the blocked sum.
    fn v_exp_sub_sum(isa: Isa, src: &[Self], dst: &mut [Self], m: Self) -> Self;
    /// `x = exp(x - m)` in place, returning the blocked sum.
    fn v_exp_sub_sum_inplace(isa: Isa, x: &mut [Self], m: Self) -> Self;
    /// `y *= k`.
    fn v_scale(isa: Isa, y: &mut [Self], k: Self);
    /// Blocked `Σ x²`.
    fn v_sum_sq(isa: Isa, x: &[Self]) -> Self;
    /// `y = x · r · w`.
    fn v_mul_scale_w(isa: Isa, x: &[Self], r: Self, w: &[Self], y: &mut [Self]);
    /// `s = a + b`.
    fn v_add(isa: Isa, a: &[Self], b: &[Self], s: &mut [Self]);
    /// `o = a · b`.
    fn v_mul(isa: Isa, a: &[Self], b: &[Self], o: &mut [Self]);
    /// `z = k · x + m`.
    fn v_scale_add(isa: Isa, x: &[Self], k: Self, m: &[Self], z: &mut [Self]);
    /// `z = k · x + c`.
    fn v_scale_add_const(isa: Isa, x: &[Self], k: Self, c: Self, z: &mut [Self]);
    /// `⟨a, b⟩` in f64.
    fn v_dot_wide(isa: Isa, a: &[Self], b: &[Self]) -> f64;
    /// `(Σ x², Σ g·x)` in f64.
    fn v_wide_sums(isa: Isa, x: &[Self], g: &[Self]) -> (f64, f64);
    /// `dx = scale · y · (dy − dot)` in f64.
    fn v_softmax_bwd_row(isa: Isa, y: &[Self], dy: &[Self], dot: f64, scale: f64, dx: &mut [Self]);
    /// `g = r · (g − x · c) (+ dres)` in f64.
    fn v_rms_bwd_row(isa: Isa, x: &[Self], r: f64, c: f64, dres: Option<&[Self]>, g: &mut [Self]);
    /// `acc += dy · x · r`.
    fn v_dw_accumulate(isa: Isa, dy: &[Self], x: &[Self], r: Self, acc: &mut [Self]);
}

impl Acc for f32 {
    #[inline(always)]
    fn exp_nonpos(x: f32) -> f32 {
        crate::simd::math::exp_nonpos_f32(x)
    }
    #[inline(always)]
    fn of(v: f64) -> f32 {
        v as f32
    }
    #[inline(always)]
    fn wide(self) -> f64 {
        self as f64
    }
    fn v_max(isa: Isa, x: &[f32]) -> f32 {
        isa.max(x)
    }
    fn v_exp_sub_sum(isa: Isa, src: &[f32], dst: &mut [f32], m: f32) -> f32 {
        isa.exp_sub_sum(src, dst, m)
    }
    fn v_exp_sub_sum_inplace(isa: Isa, x: &mut [f32], m: f32) -> f32 {
        isa.exp_sub_sum_inplace(x, m)
    }
    fn v_scale(isa: Isa, y: &mut [f32], k: f32) {
        isa.scale(y, k)
    }
    fn v_sum_sq(isa: Isa, x: &[f32]) -> f32 {
        isa.sum_sq(x)
    }
    fn v_mul_scale_w(isa: Isa, x: &[f32], r: f32, w: &[f32], y: &mut [f32]) {
        isa.mul_scale_w(x, r, w, y)
    }
    fn v_add(isa: Isa, a: &[f32], b: &[f32], s: &mut [f32]) {
        isa.add(a, b, s)
    }
    fn v_mul(isa: Isa, a: &[f32], b: &[f32], o: &mut [f32]) {
        isa.mul(a, b, o)
    }
    fn v_scale_add(isa: Isa, x: &[f32], k: f32, m: &[f32], z: &mut [f32]) {
        isa.scale_add(x, k, m, z)
    }
    fn v_scale_add_const(isa: Isa, x: &[f32], k: f32, c: f32, z: &mut [f32]) {
        isa.scale_add_const(x, k, c, z)
    }
    fn v_dot_wide(isa: Isa, a: &[f32], b: &[f32]) -> f64 {
        isa.dot_wide(a, b)
    }
    fn v_wide_sums(isa: Isa, x: &[f32], g: &[f32]) -> (f64, f64) {
        isa.wide_sums(x, g)
    }
    fn v_softmax_bwd_row(isa: Isa, y: &[f32], dy: &[f32], dot: f64, scale: f64, dx: &mut [f32]) {
        isa.softmax_bwd_row(y, dy, dot, scale, dx)
    }
    fn v_rms_bwd_row(isa: Isa, x: &[f32], r: f64, c: f64, dres: Option<&[f32]>, g: &mut [f32]) {
        isa.rms_bwd_row(x, r, c, dres, g)
    }
    fn v_dw_accumulate(isa: Isa, dy: &[f32], x: &[f32], r: f32, acc: &mut [f32]) {
        isa.dw_accumulate(dy, x, r, acc)
    }
}

impl Acc for f64 {
    #[inline(always)]
    fn exp_nonpos(x: f64) -> f64 {
        x.exp()
    }
    #[inline(always)]
    fn of(v: f64) -> f64 {
        v
    }
    #[inline(always)]
    fn wide(self) -> f64 {
        self
    }
    fn v_max(isa: Isa, x: &[f64]) -> f64 {
        isa.run(
            #[inline(always)]
            || max(x),
        )
    }
    fn v_exp_sub_sum(isa: Isa, src: &[f64], dst: &mut [f64], m: f64) -> f64 {
        isa.run(
            #[inline(always)]
            || {
                let n = src.len();
                let (src, dst) = (&src[..n], &mut dst[..n]);
                blocked_sum(n, |i| {
                    let e = (src[i] - m).exp();
                    dst[i] = e;
                    e
                })
            },
        )
    }
    fn v_exp_sub_sum_inplace(isa: Isa, x: &mut [f64], m: f64) -> f64 {
        isa.run(
            #[inline(always)]
            || {
                let n = x.len();
                blocked_sum(n, |i| {
                    let e = (x[i] - m).exp();
                    x[i] = e;
                    e
                })
            },
        )
    }
    fn v_scale(isa: Isa, y: &mut [f64], k: f64) {
        isa.run(
            #[inline(always)]
            || y.iter_mut().for_each(|v| *v *= k),
        )
    }
    fn v_sum_sq(isa: Isa, x: &[f64]) -> f64 {
        isa.run(
            #[inline(always)]
            || blocked_sum(x.len(), |i| x[i] * x[i]),
        )
    }
    fn v_mul_scale_w(isa: Isa, x: &[f64], r: f64, w: &[f64], y: &mut [f64]) {
        isa.run(
            #[inline(always)]
            || {
                for ((o, &xv), &wv) in y.iter_mut().zip(x).zip(w) {
                    *o = xv * r * wv;
                }
            },
        )
    }
    fn v_add(isa: Isa, a: &[f64], b: &[f64], s: &mut [f64]) {
        isa.run(
            #[inline(always)]
            || {
                for ((o, &x), &y) in s.iter_mut().zip(a).zip(b) {
                    *o = x + y;
                }
            },
        )
    }
    fn v_mul(isa: Isa, a: &[f64], b: &[f64], o: &mut [f64]) {
        isa.run(
            #[inline(always)]
            || {
                for ((v, &x), &y) in o.iter_mut().zip(a).zip(b) {
                    *v = x * y;
                }
            },
        )
    }
    fn v_scale_add(isa: Isa, x: &[f64], k: f64, m: &[f64], z: &mut [f64]) {
        isa.run(
            #[inline(always)]
            || {
                for ((o, &a), &b) in z.iter_mut().zip(x).zip(m) {
                    *o = k * a + b;
                }
            },
        )
    }
    fn v_scale_add_const(isa: Isa, x: &[f64], k: f64, c: f64, z: &mut [f64]) {
        isa.run(
            #[inline(always)]
            || {
                for (o, &a) in z.iter_mut().zip(x) {
                    *o = k * a + c;
                }
            },
        )
    }
    fn v_dot_wide(isa: Isa, a: &[f64], b: &[f64]) -> f64 {
        isa.run(
            #[inline(always)]
            || blocked_sum(a.len().min(b.len()), |i| a[i] * b[i]),
        )
    }
    fn v_wide_sums(isa: Isa, x: &[f64], g: &[f64]) -> (f64, f64) {
        isa.run(
            #[inline(always)]
            || wide_sums(x, g),
        )
    }
    fn v_softmax_bwd_row(isa: Isa, y: &[f64], dy: &[f64], dot: f64, scale: f64, dx: &mut [f64]) {
        isa.run(
            #[inline(always)]
            || {
                for ((d, &yj), &gj) in dx.iter_mut().zip(y).zip(dy) {
                    *d = scale * yj * (gj - dot);
                }
            },
        )
    }
    fn v_rms_bwd_row(isa: Isa, x: &[f64], r: f64, c: f64, dres: Option<&[f64]>, g: &mut [f64]) {
        isa.run(
            #[inline(always)]
            || {
                for (o, &xv) in g.iter_mut().zip(x) {
                    *o = r * (*o - xv * c);
                }
                if let Some(dres) = dres {
                    for (o, &v) in g.iter_mut().zip(dres) {
                        *o += v;
                    }
                }
            },
        )
    }
    fn v_dw_accumulate(isa: Isa, dy: &[f64], x: &[f64], r: f64, acc: &mut [f64]) {
        isa.run(
            #[inline(always)]
            || {
                for ((a, &g), &v) in acc.iter_mut().zip(dy).zip(x) {
                    *a += g * v * r;
                }
            },
        )
    }
}

/// A storage dtype the ops accept, with its accumulation type.
pub(crate) trait Elem: WithDType + bytemuck::Zeroable {
    type A: Acc;
    /// `Self` is `Self::A` (rows are used in place, no conversion).
    const IS_ACC: bool;
    fn to_acc(src: &[Self], dst: &mut [Self::A]);
    fn from_acc(src: &[Self::A], dst: &mut [Self]);
    /// [`Elem::to_acc`] at the SIMD level of `isa`.
    fn to_acc_at(isa: Isa, src: &[Self], dst: &mut [Self::A]);
    /// [`Elem::from_acc`] at the SIMD level of `isa`.
    fn from_acc_at(isa: Isa, src: &[Self::A], dst: &mut [Self]);
    fn as_acc(s: &[Self]) -> Option<&[Self::A]>;
    fn as_acc_mut(s: &mut [Self]) -> Option<&mut [Self::A]>;
    fn nan() -> Self;
}

macro_rules! elem_native {
    ($t:ty) => {
        impl Elem for $t {
            type A = $t;
            const IS_ACC: bool = true;
            fn to_acc(src: &[$t], dst: &mut [$t]) {
                dst.copy_from_slice(src)
            }
            fn from_acc(src: &[$t], dst: &mut [$t]) {
                dst.copy_from_slice(src)
            }
            fn to_acc_at(_: Isa, src: &[$t], dst: &mut [$t]) {
                dst.copy_from_slice(src)
            }
            fn from_acc_at(_: Isa, src: &[$t], dst: &mut [$t]) {
                dst.copy_from_slice(src)
            }
            fn as_acc(s: &[$t]) -> Option<&[$t]> {
                Some(s)
            }
            fn as_acc_mut(s: &mut [$t]) -> Option<&mut [$t]> {
                Some(s)
            }
            fn nan() -> $t {
                <$t>::NAN
            }
        }
    };
}
elem_native!(f32);
elem_native!(f64);

macro_rules! elem_half {
    ($t:ty, $to:ident, $from:ident) => {
        impl Elem for $t {
            type A = f32;
            const IS_ACC: bool = false;
            fn to_acc(src: &[$t], dst: &mut [f32]) {
                src.convert_to_f32_slice(dst)
            }
            fn from_acc(src: &[f32], dst: &mut [$t]) {
                dst.convert_from_f32_slice(src)
            }
            fn to_acc_at(isa: Isa, src: &[$t], dst: &mut [f32]) {
                isa.$to(src, dst)
            }
            fn from_acc_at(isa: Isa, src: &[f32], dst: &mut [$t]) {
                isa.$from(src, dst)
            }
            fn as_acc(_: &[$t]) -> Option<&[f32]> {
                None
            }
            fn as_acc_mut(_: &mut [$t]) -> Option<&mut [f32]> {
                None
            }
            fn nan() -> $t {
                <$t>::NAN
            }
        }
    };
}
elem_half!(f16, f16_to_f32, f32_to_f16);
elem_half!(bf16, bf16_to_f32, f32_to_bf16);

/// Runs `$body` with `$T` bound to the Rust type of `$dtype` (f32, f64, f16, bf16).
macro_rules! dispatch {
    ($op:expr, $dtype:expr, |$T:ident| $body:expr) => {
        $crate::validate::for_dtypes!(
            $op,
            $dtype,
            |$T| $body,
            [F32 => f32, F64 => f64, F16 => half::f16, BF16 => half::bf16],
            "unsupported dtype {d:?}, expected f32, f64, f16 or bf16"
        )
    };
}
pub(crate) use dispatch;

/// The contiguous data of `arg` (an error names the op and the argument otherwise).
pub(crate) fn slice<'a, T: WithDType>(
    op: &str,
    arg: &str,
    s: &'a CpuStorage,
    l: &Layout,
) -> Result<&'a [T]> {
    let data = T::cpu_storage_as_slice(s)?;
    let (a, b) = crate::validate::contiguous(op, arg, l)?;
    Ok(&data[a..b])
}

/// The contiguous data of input `i` of a kernel (named in errors as the kernel names it).
pub(crate) fn input<'a, T: WithDType>(ins: &Inputs<'a, CpuStorage>, i: usize) -> Result<&'a [T]> {
    let (s, l) = ins.get(i)?;
    slice(ins.op(), ins.name(i), s, l)
}

/// [`input`] of an optional input.
pub(crate) fn opt_input<'a, T: WithDType>(
    ins: &Inputs<'a, CpuStorage>,
    i: usize,
) -> Result<Option<&'a [T]>> {
    ins.opt(i)
        .map(|(s, l)| slice(ins.op(), ins.name(i), s, l))
        .transpose()
}

/// An optional small input (a weight) converted to the accumulation type.
pub(crate) fn opt_acc_vec<T: Elem>(
    ins: &Inputs<CpuStorage>,
    i: usize,
) -> Result<Option<Vec<T::A>>> {
    Ok(opt_input::<T>(ins, i)?.map(to_acc_vec))
}

/// Rows per task: at least `task_elems` elements per task, and (for the deterministic
/// reductions) at most `max_tasks` tasks. Depends only on the problem size and the
/// configuration, never on the thread count.
fn rows_per_task(task_elems: usize, rows: usize, d: usize, max_tasks: usize) -> usize {
    let by_size = task_elems.div_ceil(d.max(1));
    let by_count = rows.div_ceil(max_tasks.max(1));
    by_size.max(by_count).clamp(1, rows.max(1))
}

/// [`rows_at`] at the configuration's SIMD level (the scalar level if the configured one is
/// missing; kernels that want that reported call [`Isa::new`] and [`rows_at`] themselves).
#[allow(dead_code)]
pub(crate) fn rows<T: Elem, const N: usize, const M: usize, F>(
    cfg: &CpuConfig,
    inputs: [&[T]; N],
    outs: [&mut OutBuf<T>; M],
    d: usize,
    acc_len: usize,
    f: F,
) -> Vec<T::A>
where
    F: Fn(usize, [&[T::A]; N], [&mut [T::A]; M], &mut [T::A]) + Sync,
{
    let isa = Isa::new("cpu", cfg.simd).unwrap_or(Isa::Scalar);
    rows_at(cfg, isa, inputs, outs, d, acc_len, f)
}

/// The parallel row driver (work sizing from `cfg`). `inputs` hold `rows` rows of length `d`
/// each (contiguous), each of the `M` outputs receives `rows` rows. For each row,
/// `f(row, [input rows], [output rows], acc)` runs on rows of the accumulation type (half types
/// are converted through per-task scratch at `isa`'s level). `acc` is a per-task accumulator of
/// length `acc_len`; the tasks' accumulators are summed in task order, so the returned total is
/// deterministic run to run (the tasks are fixed by the problem size, never by the thread
/// count).
///
/// Problems below `cfg.serial_below` elements run on the calling thread (waking the pool
/// costs more than they do); larger ones are split into tasks of at least `cfg.task_elems`
/// elements that rayon spreads over the cores.
#[allow(clippy::too_many_arguments)]
pub(crate) fn rows_at<T: Elem, const N: usize, const M: usize, F>(
    cfg: &CpuConfig,
    isa: Isa,
    inputs: [&[T]; N],
    outs: [&mut OutBuf<T>; M],
    d: usize,
    acc_len: usize,
    f: F,
) -> Vec<T::A>
where
    F: Fn(usize, [&[T::A]; N], [&mut [T::A]; M], &mut [T::A]) + Sync,
{
    let len = outs[0].len();
    assert!(
        outs.iter().all(|o| o.len() == len),
        "row driver: outputs differ in length"
    );
    assert!(
        inputs.iter().all(|i| i.len() == len),
        "row driver: inputs differ in length"
    );
    let n_rows = len.checked_div(d).unwrap_or(0);
    let mut total = vec![T::A::zero(); acc_len];
    let poison: [bool; M] = std::array::from_fn(|k| outs[k].poison());
    let ptrs: [OutPtr<T>; M] = std::array::from_fn(|k| outs[k].ptr());
    // SAFETY (here and in the tasks): every output has room for `len` elements; the tasks
    // initialise rows 0..n_rows, each its own, and this initialises what lies past them.
    for (&p, &poison) in ptrs.iter().zip(&poison) {
        unsafe { init_range(p, n_rows * d, len, poison) };
    }
    let max_tasks = if acc_len > 0 { 64 } else { usize::MAX };
    let rpt = rows_per_task(cfg.task_elems, n_rows, d, max_tasks);
    let n_tasks = n_rows.div_ceil(rpt);
    let run_task = |task: usize| {
        let mut acc = vec![T::A::zero(); acc_len];
        let mut scratch: Vec<T::A> = Vec::new();
        for r in task * rpt..((task + 1) * rpt).min(n_rows) {
            let ins: [&[T]; N] = std::array::from_fn(|k| &inputs[k][r * d..(r + 1) * d]);
            // SAFETY: row r lies inside every output (r < n_rows) and belongs to this task
            // alone: it is initialised here, and its slices live until the end of this
            // iteration.
            let orows: [&mut [T]; M] = std::array::from_fn(|k| unsafe {
                init_range(ptrs[k], r * d, (r + 1) * d, poison[k]);
                std::slice::from_raw_parts_mut(ptrs[k].0.add(r * d), d)
            });
            if T::IS_ACC {
                let ins_a = ins.map(|s| T::as_acc(s).expect("IS_ACC"));
                let outs_a = orows.map(|o| T::as_acc_mut(o).expect("IS_ACC"));
                f(r, ins_a, outs_a, &mut acc);
            } else {
                scratch.resize((N + M) * d, T::A::zero());
                let (ins_buf, out_buf) = scratch.split_at_mut(N * d);
                for (k, s) in ins.iter().enumerate() {
                    T::to_acc_at(isa, s, &mut ins_buf[k * d..(k + 1) * d]);
                }
                let ins_a: [&[T::A]; N] = std::array::from_fn(|k| &ins_buf[k * d..(k + 1) * d]);
                let mut it = out_buf.chunks_exact_mut(d);
                let outs_a: [&mut [T::A]; M] =
                    std::array::from_fn(|_| it.next().expect("scratch has M rows"));
                f(r, ins_a, outs_a, &mut acc);
                for (o, a) in orows.into_iter().zip(out_buf.chunks_exact(d)) {
                    T::from_acc_at(isa, a, o);
                }
            }
        }
        acc
    };
    let partials: Vec<Vec<T::A>> = if n_rows * d < cfg.serial_below || n_tasks == 1 {
        (0..n_tasks).map(run_task).collect()
    } else {
        (0..n_tasks).into_par_iter().map(run_task).collect()
    };
    for o in outs {
        // SAFETY: the tasks initialised (and the kernel wrote) rows 0..n_rows; the rest was
        // initialised before them.
        unsafe { o.assume_filled() };
    }
    for p in partials {
        for (t, v) in total.iter_mut().zip(p) {
            *t += v;
        }
    }
    total
}

/// A small vector of `T` (a weight) converted to the accumulation type.
pub(crate) fn to_acc_vec<T: Elem>(s: &[T]) -> Vec<T::A> {
    let mut v = vec![T::A::zero(); s.len()];
    T::to_acc(s, &mut v);
    v
}

/// Converts accumulators back to the storage type.
pub(crate) fn from_acc_vec<T: Elem>(s: &[T::A], dst: &mut [T]) {
    T::from_acc(s, dst)
}

#[cfg(test)]
mod tests;
