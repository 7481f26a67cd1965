//! The row math of the CPU cross-entropy kernels: the reduction of a row (max, `Σ exp`, `Σ z`),
//! its loss and its gradient, for rows in the accumulation type and, in blocks converted at the
//! SIMD level, rows stored in a half type.

use candle_core::WithDType;
use num_traits::Zero;

use super::super::Params;
use crate::cpu::{self, exp_nonpos_f32, Acc, Elem};
use crate::simd::Isa;

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
pub(super) struct Row<A> {
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
pub(super) struct Stats<A> {
    pub m: A,
    pub ls: A,
    pub zs: A,
    pub other: A,
}

impl<A: CeAcc> Row<A> {
    pub(super) fn new(p: &Params, v: usize) -> Self {
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

    /// The stats from the (capped) row max `m`, the sums over the non-target columns and the
    /// target's raw logit `xt`.
    #[inline(always)]
    fn finish(&self, m: A, (s, zs): (f64, f64), xt: A) -> Stats<A> {
        let zt = self.z(xt);
        let other = A::of(s);
        let s = other + A::exp_nonpos(zt - m);
        Stats {
            m,
            ls: s.ln(),
            zs: A::of(zs) + zt,
            other: other / s,
        }
    }

    /// `(Σ exp(z(x) − m), Σ z(x))` over a span of non-target columns held in scratch (which
    /// this overwrites): without soft-capping through the SIMD layer's vector `exp` (the scalar
    /// per-element `exp` does not vectorize), with it per element.
    #[inline(always)]
    fn sums_in(&self, isa: Isa, x: &mut [A], m: A) -> (f64, f64) {
        match self.cap {
            None => {
                let zs = cpu::blocked_sum(x.len(), |i| x[i]).wide();
                (A::v_exp_sub_sum_inplace(isa, x, m).wide(), zs)
            }
            Some((c, ic)) => exp_sums(x, m, |v| c * A::tanh_sech2(v * ic).0),
        }
    }

    /// The reduction of a row with target `t` (any element type): the max sweep, then the sums
    /// over blocks of [`HB`] copied (converted at `isa`'s level for half types) into scratch
    /// that stays in L1; the columns before and after `t` are summed, the target's term is
    /// added on its own. Half-type rows are never widened as a whole. Soft-capping is
    /// monotonic, so the capped max is the cap of the max. Returns the stats and the target's
    /// raw logit.
    #[inline(always)]
    pub(super) fn stats_of<T: Elem<A = A>>(&self, isa: Isa, x: &[T], t: usize) -> (Stats<A>, A) {
        let mut buf = [A::zero(); HB];
        let mx = match T::as_acc(x) {
            Some(a) => cpu::max(a),
            None => {
                let mut mx = A::neg_infinity();
                for c in x.chunks(HB) {
                    let b = &mut buf[..c.len()];
                    T::to_acc_at(isa, c, b);
                    let bm = cpu::max(b);
                    mx = if bm > mx { bm } else { mx };
                }
                mx
            }
        };
        let m = self.z(mx);
        let (mut s, mut zs) = (0f64, 0f64);
        for (ci, c) in x.chunks(HB).enumerate() {
            let b = &mut buf[..c.len()];
            T::to_acc_at(isa, c, b);
            let lo = ci * HB;
            let (a, z) = if (lo..lo + c.len()).contains(&t) {
                let (p, q) = b.split_at_mut(t - lo);
                let (sa, za) = self.sums_in(isa, p, m);
                let (sb, zb) = self.sums_in(isa, &mut q[1..], m);
                (sa + sb, za + zb)
            } else {
                self.sums_in(isa, b, m)
            };
            s += a;
            zs += z;
        }
        let xt = one(isa, x[t]);
        (self.finish(m, (s, zs), xt), xt)
    }

    /// The row's loss `(m − z_t) + ln s + ε·(z_t − Σz/V) + λ·lse²` (the same as the module
    /// doc's form, written so that a certain prediction or `V = 1` gives exactly 0).
    #[inline(always)]
    pub(super) fn loss(&self, xt: A, st: &Stats<A>) -> A {
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

    /// The gradient's row constants: `k = (1 + 2λ·lse)·gs` and `off = gs·ε/V`.
    #[inline(always)]
    fn k_off(&self, m: A, ls: A, gs: A) -> (A, A) {
        let lse = m + ls;
        ((A::one() + (self.zl + self.zl) * lse) * gs, self.eps_v * gs)
    }

    /// Overwrites a span of non-target columns (holding the logits) with their gradient
    /// `p_j·(1 + 2λ·lse) − ε/V` (times `gs`), `p_j = exp(z_j − m − ln s)`; times `sech²` with
    /// soft-capping (per element). Without it: `z − m`, the SIMD layer's vector `exp` of that
    /// minus `ln s`, then the affine map (three vectorized passes over the span, in L1).
    #[inline(always)]
    fn grad_span(&self, isa: Isa, span: &mut [A], m: A, ls: A, (k, off): (A, A)) {
        match self.cap {
            None => {
                span.iter_mut().for_each(|v| *v -= m);
                A::v_exp_sub_sum_inplace(isa, span, ls);
                span.iter_mut().for_each(|v| *v = *v * k - off);
            }
            Some((c, ic)) => span.iter_mut().for_each(|v| {
                let (th, s2) = A::tanh_sech2(*v * ic);
                *v = (A::exp_nonpos((c * th - m) - ls) * k - off) * s2;
            }),
        }
    }

    /// The target's gradient `ε·(V−1)/V − Σ_{j≠t} p_j + 2λ·lse·p_t` (times `gs`, and `sech²`
    /// with soft-capping): no `p_t − 1` cancellation. `other` is `Σ_{j≠t} p_j`.
    #[inline(always)]
    fn grad_target(&self, xt: A, m: A, ls: A, other: A, gs: A) -> A {
        let lse = m + ls;
        let (pt, dt) = match self.cap {
            None => (A::exp_nonpos((xt - m) - ls), A::one()),
            Some((c, ic)) => {
                let (th, s2) = A::tanh_sech2(xt * ic);
                (A::exp_nonpos((c * th - m) - ls), s2)
            }
        };
        (self.eps_t - other + (self.zl + self.zl) * lse * pt) * gs * dt
    }

    /// Writes `gs · d loss / d x` of row `src` (`None`: `dst`'s own logits) into `dst`, for a
    /// row with target `t` and stats `m`, `ls`, `other` (any element type; half types in
    /// blocks of [`HB`] converted at `isa`'s level: one read and one write of the row; the
    /// target's gradient from its stats, written over the block's).
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    pub(super) fn grad_of<T: Elem<A = A>>(
        &self,
        isa: Isa,
        src: Option<&[T]>,
        dst: &mut [T],
        t: usize,
        (m, ls, other): (A, A, A),
        gs: A,
    ) {
        let ko = self.k_off(m, ls, gs);
        let xt = one(isa, src.map_or(dst[t], |s| s[t]));
        let gt = self.grad_target(xt, m, ls, other, gs);
        if T::IS_ACC {
            if let Some(s) = src {
                dst.copy_from_slice(s);
            }
            let row = T::as_acc_mut(dst).expect("IS_ACC");
            for c in row.chunks_mut(HB) {
                self.grad_span(isa, c, m, ls, ko);
            }
            row[t] = gt;
            return;
        }
        let mut buf = [A::zero(); HB];
        let mut lo = 0;
        while lo < dst.len() {
            let hi = (lo + HB).min(dst.len());
            let b = &mut buf[..hi - lo];
            T::to_acc_at(isa, src.map_or(&dst[lo..hi], |s| &s[lo..hi]), b);
            self.grad_span(isa, b, m, ls, ko);
            if (lo..hi).contains(&t) {
                b[t - lo] = gt;
            }
            T::from_acc_at(isa, b, &mut dst[lo..hi]);
            lo = hi;
        }
    }
}

/// One element widened to the accumulation type.
#[inline(always)]
fn one<T: Elem>(isa: Isa, x: T) -> T::A {
    let mut o = [T::A::zero()];
    T::to_acc_at(isa, &[x], &mut o);
    o[0]
}

/// Elements of a half-type row converted to the accumulation type at a time (2 KiB of f32:
/// stays in L1 between the conversion and the sweep).
const HB: usize = 512;

/// `(Σ exp(z(x) − m), Σ z(x))` over a slice: 16 lane accumulators per block of 1024 elements,
/// the blocks joined in f64.
#[inline(always)]
fn exp_sums<A: CeAcc>(x: &[A], m: A, z: impl Fn(A) -> A) -> (f64, f64) {
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
    (s, zs)
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
