//! The f64 row math (f32 rows go through `crate::simd`) and the shared reductions: loops
//! written with LANES independent accumulators so LLVM vectorizes them (a single scalar
//! accumulator would serialize the reduction); sums run over blocks of BLOCK elements whose
//! partial sums are added in f64.

use super::Acc;

const LANES: usize = 16;
use crate::simd::BLOCK;

/// `exp(x)` for `x <= 0` in f32 without a libm call (see [`crate::simd::math`]).
#[allow(unused_imports)]
pub(crate) use crate::simd::math::exp_nonpos_f32;

/// Sum of `g(x)` over a row (blocked, f64 across blocks).
#[allow(dead_code)]
#[inline(always)]
pub(crate) fn sum_map<A: Acc>(x: &[A], g: impl Fn(A) -> A) -> A {
    blocked_sum(x.len(), |i| g(x[i]))
}

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

/// `(Σ x², Σ g·x)` in f64, lane-parallel.
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reductions_match_scalar() {
        let x: Vec<f32> = (0..1000)
            .map(|i| ((i * 7919) % 1013) as f32 * 0.01 - 3.0)
            .collect();
        let m = x.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        assert_eq!(max(&x), m);
        let s: f64 = x.iter().map(|&v| v as f64).sum();
        assert!((blocked_sum(x.len(), |i| x[i]) as f64 - s).abs() < 1e-3);
        let d: f64 = x.iter().map(|&v| (v as f64) * (v as f64)).sum();
        assert!((blocked_sum(x.len(), |i| x[i] * x[i]) as f64 - d).abs() / d < 1e-6);
    }
}
