//! Shared CPU machinery: element types with their accumulation type, the parallel row
//! drivers every op uses, and the vectorizable math (max, sum, dot, exp) of their inner loops.
//!
//! Half types (f16, bf16) are converted a row at a time into an f32 scratch buffer, computed in
//! f32 and converted back, so they read and write their own dtype and accumulate in f32.
//! f32 and f64 rows are used in place (no copy); f64 accumulates in f64.

use candle_core::{CpuStorage, Layout, Result, WithDType};
use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};
use num_traits::Zero;
use rayon::prelude::*;

use crate::config::CpuConfig;
use crate::validate::fail;

/// Accumulation type of the row kernels: `f32` (for f32, f16, bf16) or `f64`.
pub(crate) trait Acc:
    num_traits::Float + Default + Send + Sync + std::fmt::Debug + std::ops::AddAssign + 'static
{
    /// `exp(x)` for `x <= 0` (or NaN): the softmax argument `x - max`.
    fn exp_nonpos(x: Self) -> Self;
    fn of(v: f64) -> Self;
    /// Widened to f64 (exact).
    fn wide(self) -> f64;
}

impl Acc for f32 {
    #[inline(always)]
    fn exp_nonpos(x: f32) -> f32 {
        exp_nonpos_f32(x)
    }
    #[inline(always)]
    fn of(v: f64) -> f32 {
        v as f32
    }
    #[inline(always)]
    fn wide(self) -> f64 {
        self as f64
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
}

/// A storage dtype the ops accept, with its accumulation type.
pub(crate) trait Elem: WithDType {
    type A: Acc;
    /// `Self` is `Self::A` (rows are used in place, no conversion).
    const IS_ACC: bool;
    fn to_acc(src: &[Self], dst: &mut [Self::A]);
    fn from_acc(src: &[Self::A], dst: &mut [Self]);
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
    ($t:ty) => {
        impl Elem for $t {
            type A = f32;
            const IS_ACC: bool = false;
            fn to_acc(src: &[$t], dst: &mut [f32]) {
                src.convert_to_f32_slice(dst)
            }
            fn from_acc(src: &[f32], dst: &mut [$t]) {
                dst.convert_from_f32_slice(src)
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
elem_half!(f16);
elem_half!(bf16);

/// Runs `$body` with `$T` bound to the Rust type of `$dtype` (f32, f64, f16, bf16).
macro_rules! dispatch {
    ($op:expr, $dtype:expr, |$T:ident| $body:expr) => {
        match $dtype {
            candle_core::DType::F32 => {
                type $T = f32;
                $body
            }
            candle_core::DType::F64 => {
                type $T = f64;
                $body
            }
            candle_core::DType::F16 => {
                type $T = half::f16;
                $body
            }
            candle_core::DType::BF16 => {
                type $T = half::bf16;
                $body
            }
            d => $crate::validate::fail!(
                $op,
                "unsupported dtype {d:?}, expected f32, f64, f16 or bf16"
            ),
        }
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
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => fail!(
            op,
            "{arg} must be contiguous (strides {:?} for shape {:?})",
            l.stride(),
            l.dims()
        ),
    }
}

/// An output buffer: NaN when `poison` is on (tests, [`crate::KernelConfig::poison`]), else
/// zeros.
pub(crate) fn alloc<T: Elem>(n: usize, poison: bool) -> Vec<T> {
    if poison {
        vec![T::nan(); n]
    } else {
        vec![T::zero(); n]
    }
}

/// Rows per task: at least `task_elems` elements per task, and (for the deterministic
/// reductions) at most `max_tasks` tasks. Depends only on the problem size and the
/// configuration, never on the thread count.
fn rows_per_task(task_elems: usize, rows: usize, d: usize, max_tasks: usize) -> usize {
    let by_size = task_elems.div_ceil(d.max(1));
    let by_count = rows.div_ceil(max_tasks.max(1));
    by_size.max(by_count).clamp(1, rows.max(1))
}

/// A raw output pointer shared by the tasks of [`rows`], which write disjoint row ranges.
#[derive(Clone, Copy)]
struct OutPtr<T>(*mut T);
// SAFETY: each task of `rows` derives slices for its own, disjoint, rows only.
unsafe impl<T: Send> Send for OutPtr<T> {}
unsafe impl<T: Sync> Sync for OutPtr<T> {}

/// The parallel row driver (work sizing from `cfg`). `inputs` hold `rows` rows of length `d` each (contiguous), each of
/// the `M` outputs receives `rows` rows. For each row, `f(row, [input rows], [output rows],
/// acc)` runs on rows of the accumulation type (converted through per-task scratch for half
/// types). `acc` is a per-task accumulator of length `acc_len`; the tasks' accumulators are
/// summed in task order, so the returned total is deterministic run to run (the tasks are fixed
/// by the problem size, never by the thread count).
pub(crate) fn rows<T: Elem, const N: usize, const M: usize, F>(
    cfg: &CpuConfig,
    inputs: [&[T]; N],
    outs: [&mut [T]; M],
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
    if n_rows == 0 {
        return total;
    }
    let ptrs: [OutPtr<T>; M] = outs.map(|o| OutPtr(o.as_mut_ptr()));
    let max_tasks = if acc_len > 0 { 64 } else { usize::MAX };
    let rpt = rows_per_task(cfg.task_elems, n_rows, d, max_tasks);
    let n_tasks = n_rows.div_ceil(rpt);
    let run_task = |task: usize| {
        let mut acc = vec![T::A::zero(); acc_len];
        let mut scratch: Vec<T::A> = Vec::new();
        for r in task * rpt..((task + 1) * rpt).min(n_rows) {
            let ins: [&[T]; N] = std::array::from_fn(|k| &inputs[k][r * d..(r + 1) * d]);
            // SAFETY: row r lies inside every output (r < n_rows) and belongs to this task
            // alone; the slices live until the end of this iteration.
            let orows: [&mut [T]; M] = std::array::from_fn(|k| unsafe {
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
                    T::to_acc(s, &mut ins_buf[k * d..(k + 1) * d]);
                }
                let ins_a: [&[T::A]; N] = std::array::from_fn(|k| &ins_buf[k * d..(k + 1) * d]);
                let mut it = out_buf.chunks_exact_mut(d);
                let outs_a: [&mut [T::A]; M] =
                    std::array::from_fn(|_| it.next().expect("scratch has M rows"));
                f(r, ins_a, outs_a, &mut acc);
                for (o, a) in orows.into_iter().zip(out_buf.chunks_exact(d)) {
                    T::from_acc(a, o);
                }
            }
        }
        acc
    };
    // Small problems run on the calling thread: waking the pool costs more than they do.
    let partials: Vec<Vec<T::A>> = if n_rows * d < cfg.serial_below {
        (0..n_tasks).map(run_task).collect()
    } else {
        (0..n_tasks).into_par_iter().map(run_task).collect()
    };
    for p in partials {
        for (t, v) in total.iter_mut().zip(p) {
            *t += v;
        }
    }
    total
}

/// The parallel driver for ops whose outputs do not share one row length or whose inputs are
/// not plain rows (strided RoPE input, GLU's packed `[.., 2I]` layout): `n_rows` rows, output
/// `k` holding `row_lens[k]` elements per row. Tasks of whole rows (sized as in [`rows`], from
/// the elements they write) run `f(rows, [output rows])` with each output's slice for those
/// rows; the op reads its inputs itself and converts half types through its own scratch.
pub(crate) fn par_rows<T: Send + Sync, const M: usize, F>(
    cfg: &CpuConfig,
    n_rows: usize,
    outs: [&mut [T]; M],
    row_lens: [usize; M],
    f: F,
) where
    F: Fn(std::ops::Range<usize>, [&mut [T]; M]) + Sync,
{
    for (o, &l) in outs.iter().zip(&row_lens) {
        assert_eq!(o.len(), n_rows * l, "row driver: output length");
    }
    if n_rows == 0 {
        return;
    }
    let per_row: usize = row_lens.iter().sum::<usize>().max(1);
    let rpt = rows_per_task(cfg.task_elems, n_rows, per_row, usize::MAX);
    let n_tasks = n_rows.div_ceil(rpt);
    let ptrs: [OutPtr<T>; M] = outs.map(|o| OutPtr(o.as_mut_ptr()));
    let run_task = |task: usize| {
        let r = task * rpt..((task + 1) * rpt).min(n_rows);
        // SAFETY: rows r.start..r.end lie inside every output and belong to this task alone;
        // the slices live until the end of the call.
        let o: [&mut [T]; M] = std::array::from_fn(|k| unsafe {
            std::slice::from_raw_parts_mut(
                ptrs[k].0.add(r.start * row_lens[k]),
                r.len() * row_lens[k],
            )
        });
        f(r, o)
    };
    if n_rows * per_row < cfg.serial_below {
        (0..n_tasks).for_each(run_task);
    } else {
        (0..n_tasks).into_par_iter().for_each(run_task);
    }
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

// ---------------------------------------------------------------------------------------------
// Vectorizable inner loops. Written with LANES independent accumulators so LLVM emits SIMD
// (a single scalar accumulator would serialize the reduction). Sums run over blocks of BLOCK
// elements whose partial sums are added in f64, so even 262144-long f32 rows keep ~1e-7
// relative accuracy.

const LANES: usize = 16;
const BLOCK: usize = 1024;

/// Maximum of a row (NaN entries are skipped here; they still poison the softmax through exp).
#[inline(always)]
pub(crate) fn max<A: Acc>(x: &[A]) -> A {
    let mut acc = [A::neg_infinity(); LANES];
    let chunks = x.chunks_exact(LANES);
    let rem = chunks.remainder();
    for c in chunks {
        for i in 0..LANES {
            acc[i] = if c[i] > acc[i] { c[i] } else { acc[i] };
        }
    }
    let mut m = A::neg_infinity();
    for &v in acc.iter().chain(rem) {
        m = if v > m { v } else { m };
    }
    m
}

/// Lane-parallel sum of `g(i)` for `i` in `0..n` (one block).
#[inline(always)]
fn lane_sum<A: Acc>(n: usize, mut g: impl FnMut(usize) -> A) -> A {
    let mut acc = [A::zero(); LANES];
    let full = n / LANES * LANES;
    let mut i = 0;
    while i < full {
        for (l, a) in acc.iter_mut().enumerate() {
            *a += g(i + l);
        }
        i += LANES;
    }
    let mut s = A::zero();
    for j in full..n {
        s += g(j);
    }
    acc.iter().fold(s, |p, &q| p + q)
}

/// Blocked sum of `g(i)` for `i` in `0..n`: lanes within a block, f64 across blocks.
#[inline(always)]
pub(crate) fn blocked_sum<A: Acc>(n: usize, mut g: impl FnMut(usize) -> A) -> A {
    if n <= BLOCK {
        return lane_sum(n, g);
    }
    let mut total = 0f64;
    let mut start = 0;
    while start < n {
        let len = BLOCK.min(n - start);
        let part = lane_sum(len, |i| g(start + i));
        total += part.to_f64().unwrap_or(f64::NAN);
        start += len;
    }
    A::of(total)
}

/// Sum of `g(x)` over a row.
#[inline(always)]
pub(crate) fn sum_map<A: Acc>(x: &[A], g: impl Fn(A) -> A) -> A {
    blocked_sum(x.len(), |i| g(x[i]))
}

/// `(Σ x², Σ g·x)` in f64 (products of f32 values are exact there), lane-parallel.
#[inline(always)]
pub(crate) fn wide_sums<A: Acc>(x: &[A], g: &[A]) -> (f64, f64) {
    let mut ss = [0f64; LANES];
    let mut dt = [0f64; LANES];
    let cx = x.chunks_exact(LANES);
    let cg = g.chunks_exact(LANES);
    let (rx, rg) = (cx.remainder(), cg.remainder());
    for (a, b) in cx.zip(cg) {
        for i in 0..LANES {
            let xv = a[i].wide();
            ss[i] += xv * xv;
            dt[i] += b[i].wide() * xv;
        }
    }
    let (mut s, mut d) = (0f64, 0f64);
    for (&a, &b) in rx.iter().zip(rg) {
        s += a.wide() * a.wide();
        d += b.wide() * a.wide();
    }
    (ss.iter().sum::<f64>() + s, dt.iter().sum::<f64>() + d)
}

/// `dst[i] = exp(src[i] - m)`, returning the sum of the results.
#[inline(always)]
pub(crate) fn exp_sub_sum<A: Acc>(src: &[A], dst: &mut [A], m: A) -> A {
    let n = src.len();
    let (src, dst) = (&src[..n], &mut dst[..n]);
    blocked_sum(n, |i| {
        let e = A::exp_nonpos(src[i] - m);
        dst[i] = e;
        e
    })
}

/// `out[i] = exp(out[i] - m)` in place, returning the sum of the results.
#[inline(always)]
pub(crate) fn exp_sub_sum_inplace<A: Acc>(out: &mut [A], m: A) -> A {
    let n = out.len();
    blocked_sum(n, |i| {
        let e = A::exp_nonpos(out[i] - m);
        out[i] = e;
        e
    })
}

/// `exp(x)` for `x <= 0` in f32 without a libm call, so loops over it vectorize.
/// x = n·ln2 + r with |r| <= ln2/2 (Cody–Waite, two-part ln2); e^r by its degree-6 Taylor
/// polynomial (truncation error < 1.3e-7 relative); 2^n built in the exponent bits.
/// Results below e^-87 (about 1.6e-38) flush to 0; NaN stays NaN.
#[inline(always)]
pub(crate) fn exp_nonpos_f32(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    const SHIFTER: f32 = 12_582_912.0; // 1.5 * 2^23: adding it rounds to an integer
    let small = x < -87.0;
    let xc = if small { -87.0 } else { x };
    let t = xc * LOG2E + SHIFTER;
    let n = t - SHIFTER;
    let r = xc - n * LN2_HI - n * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    let ni = (t.to_bits() as i32).wrapping_sub(0x4B40_0000);
    let scale = f32::from_bits(((ni + 127) as u32) << 23);
    if small {
        0.0
    } else {
        p * scale
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_matches_libm() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x <= 0.0 {
            let got = exp_nonpos_f32(x) as f64;
            let want = (x as f64).exp();
            worst = worst.max(((got - want) / want).abs());
            x += 0.000_37;
        }
        assert!(worst < 5e-7, "worst relative error {worst}");
        assert_eq!(exp_nonpos_f32(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_nonpos_f32(-200.0), 0.0);
        assert!(exp_nonpos_f32(f32::NAN).is_nan());
        assert_eq!(exp_nonpos_f32(0.0), 1.0);
    }

    #[test]
    fn reductions_match_scalar() {
        let x: Vec<f32> = (0..1000)
            .map(|i| ((i * 7919) % 1013) as f32 * 0.01 - 3.0)
            .collect();
        let m = x.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        assert_eq!(max(&x), m);
        let s: f64 = x.iter().map(|&v| v as f64).sum();
        assert!((sum_map(&x, |v| v) as f64 - s).abs() < 1e-3);
        let d: f64 = x.iter().map(|&v| (v as f64) * (v as f64)).sum();
        assert!((blocked_sum(x.len(), |i| x[i] * x[i]) as f64 - d).abs() / d < 1e-6);
    }

    #[test]
    fn task_split_bounds_the_task_count() {
        for &(rows, d) in &[
            (1usize, 1usize),
            (7, 3),
            (1000, 4096),
            (100_000, 2),
            (5, 1 << 20),
        ] {
            let rpt = rows_per_task(1 << 15, rows, d, 64);
            assert!(rpt >= 1 && rpt <= rows);
            assert!(rows.div_ceil(rpt) <= 64, "{rows}x{d}: {rpt} rows per task");
        }
    }
}
