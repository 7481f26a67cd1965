//! The vector math of the row kernels, generic over a `pulp` instruction set `S` (each
//! function runs inside [`super::Isa::vectorize`], compiled with `S`'s target features).
//!
//! f32 loops are explicit `pulp` vector code: full vectors through the head of the row, the
//! tail element by element with the same formula, and several independent accumulators so a
//! reduction is not one serial dependency chain. f64 accumulations are lane-array loops
//! (16 lanes) that LLVM vectorizes for `S` (`pulp` has no generic f32 -> f64 widening).

use pulp::Simd;

use super::BLOCK;

const LOG2E: f32 = std::f32::consts::LOG2_E;
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
/// 1.5 · 2^23: adding it rounds an f32 of magnitude < 2^22 to an integer (in the low bits).
const SHIFTER: f32 = 12_582_912.0;
/// Inputs below this give 0 (e^-87 ≈ 1.6e-38, the bottom of the normal range).
const EXP_LO: f32 = -87.0;
/// Degree-6 Taylor coefficients of e^r, highest first.
const P: [f32; 7] = [
    1.0 / 720.0,
    1.0 / 120.0,
    1.0 / 24.0,
    1.0 / 6.0,
    0.5,
    1.0,
    1.0,
];

/// Lanes of the f64 accumulations.
const WIDE: usize = 16;

/// `exp(x)` for `x <= 0` (or NaN), one element: x = n·ln2 + r with |r| <= ln2/2 (Cody–Waite,
/// two-part ln2), e^r by its degree-6 Taylor polynomial (truncation < 1.3e-7 relative), 2^n
/// built in the exponent bits. Below e^-87 the result is 0; NaN stays NaN.
#[inline(always)]
pub(crate) fn exp_nonpos_f32(x: f32) -> f32 {
    let small = x < EXP_LO;
    let xc = if small { EXP_LO } else { x };
    let t = xc * LOG2E + SHIFTER;
    let n = t - SHIFTER;
    let r = xc - n * LN2_HI - n * LN2_LO;
    let mut p = P[0];
    for &c in &P[1..] {
        p = p * r + c;
    }
    let ni = (t.to_bits() as i32).wrapping_sub(0x4B40_0000);
    let scale = f32::from_bits(((ni + 127) as u32) << 23);
    if small {
        0.0
    } else {
        p * scale
    }
}

/// [`exp_nonpos_f32`] on a vector.
#[inline(always)]
pub(crate) fn exp_nonpos<S: Simd>(s: S, x: S::f32s) -> S::f32s {
    let lo = s.splat_f32s(EXP_LO);
    let small = s.less_than_f32s(x, lo);
    let xc = s.select_f32s(small, lo, x);
    let shifter = s.splat_f32s(SHIFTER);
    let t = s.mul_add_e_f32s(xc, s.splat_f32s(LOG2E), shifter);
    let n = s.sub_f32s(t, shifter);
    let r = s.mul_add_e_f32s(n, s.splat_f32s(-LN2_HI), xc);
    let r = s.mul_add_e_f32s(n, s.splat_f32s(-LN2_LO), r);
    let mut p = s.splat_f32s(P[0]);
    for &c in &P[1..] {
        p = s.mul_add_e_f32s(p, r, s.splat_f32s(c));
    }
    // 2^n: the integer n sits in the low mantissa bits of t (offset by 0x4B40_0000).
    let bias = s.splat_u32s(127u32.wrapping_sub(0x4B40_0000));
    let e = s.add_u32s(s.transmute_u32s_f32s(t), bias);
    let scale = s.transmute_f32s_u32s(s.wrapping_dyn_shl_u32s(e, s.splat_u32s(23)));
    s.select_f32s(small, s.splat_f32s(0.0), s.mul_f32s(p, scale))
}

#[inline(always)]
pub(crate) fn max<S: Simd>(s: S, x: &[f32]) -> f32 {
    let (head, tail) = S::as_simd_f32s(x);
    let ninf = s.splat_f32s(f32::NEG_INFINITY);
    let mut a = [ninf; 4];
    let mut quads = head.chunks_exact(4);
    // The element first: on x86 a NaN element leaves the accumulator as it was.
    for q in &mut quads {
        for k in 0..4 {
            a[k] = s.max_f32s(q[k], a[k]);
        }
    }
    for &v in quads.remainder() {
        a[0] = s.max_f32s(v, a[0]);
    }
    let v = s.max_f32s(s.max_f32s(a[0], a[1]), s.max_f32s(a[2], a[3]));
    let mut m = s.reduce_max_f32s(v);
    for &v in tail {
        if v > m {
            m = v;
        }
    }
    m
}

/// `dst = exp(src - m)` over one block, returning its sum.
#[inline(always)]
fn exp_block<S: Simd>(s: S, src: &[f32], dst: &mut [f32], m: f32) -> f32 {
    let (hs, ts) = S::as_simd_f32s(src);
    let (hd, td) = S::as_mut_simd_f32s(dst);
    let mv = s.splat_f32s(m);
    let zero = s.splat_f32s(0.0);
    let mut a = [zero; 2];
    let mut pairs_s = hs.chunks_exact(2);
    let mut pairs_d = hd.chunks_exact_mut(2);
    for (ps, pd) in (&mut pairs_s).zip(&mut pairs_d) {
        for k in 0..2 {
            let e = exp_nonpos(s, s.sub_f32s(ps[k], mv));
            pd[k] = e;
            a[k] = s.add_f32s(a[k], e);
        }
    }
    for (x, y) in pairs_s.remainder().iter().zip(pairs_d.into_remainder()) {
        let e = exp_nonpos(s, s.sub_f32s(*x, mv));
        *y = e;
        a[0] = s.add_f32s(a[0], e);
    }
    let mut sum = s.reduce_sum_f32s(s.add_f32s(a[0], a[1]));
    for (x, y) in ts.iter().zip(td) {
        let e = exp_nonpos_f32(x - m);
        *y = e;
        sum += e;
    }
    sum
}

/// `x = exp(x - m)` over one block in place, returning its sum.
#[inline(always)]
fn exp_block_inplace<S: Simd>(s: S, x: &mut [f32], m: f32) -> f32 {
    let (hx, tx) = S::as_mut_simd_f32s(x);
    let mv = s.splat_f32s(m);
    let zero = s.splat_f32s(0.0);
    let mut a = [zero; 2];
    let mut pairs = hx.chunks_exact_mut(2);
    for p in &mut pairs {
        for k in 0..2 {
            let e = exp_nonpos(s, s.sub_f32s(p[k], mv));
            p[k] = e;
            a[k] = s.add_f32s(a[k], e);
        }
    }
    for v in pairs.into_remainder() {
        let e = exp_nonpos(s, s.sub_f32s(*v, mv));
        *v = e;
        a[0] = s.add_f32s(a[0], e);
    }
    let mut sum = s.reduce_sum_f32s(s.add_f32s(a[0], a[1]));
    for v in tx {
        let e = exp_nonpos_f32(*v - m);
        *v = e;
        sum += e;
    }
    sum
}

#[inline(always)]
pub(crate) fn exp_sub_sum<S: Simd>(s: S, src: &[f32], dst: &mut [f32], m: f32) -> f32 {
    assert_eq!(src.len(), dst.len(), "exp_sub_sum: lengths differ");
    if src.len() <= BLOCK {
        return exp_block(s, src, dst, m);
    }
    let mut total = 0f64;
    for (a, b) in src.chunks(BLOCK).zip(dst.chunks_mut(BLOCK)) {
        total += exp_block(s, a, b, m) as f64;
    }
    total as f32
}

#[inline(always)]
pub(crate) fn exp_sub_sum_inplace<S: Simd>(s: S, x: &mut [f32], m: f32) -> f32 {
    if x.len() <= BLOCK {
        return exp_block_inplace(s, x, m);
    }
    let mut total = 0f64;
    for b in x.chunks_mut(BLOCK) {
        total += exp_block_inplace(s, b, m) as f64;
    }
    total as f32
}

#[inline(always)]
pub(crate) fn scale<S: Simd>(s: S, y: &mut [f32], k: f32) {
    let (h, t) = S::as_mut_simd_f32s(y);
    let kv = s.splat_f32s(k);
    for v in h {
        *v = s.mul_f32s(*v, kv);
    }
    for v in t {
        *v *= k;
    }
}

#[inline(always)]
fn sum_sq_block<S: Simd>(s: S, x: &[f32]) -> f32 {
    let (h, t) = S::as_simd_f32s(x);
    let zero = s.splat_f32s(0.0);
    let mut a = [zero; 4];
    let mut quads = h.chunks_exact(4);
    for q in &mut quads {
        for k in 0..4 {
            a[k] = s.mul_add_e_f32s(q[k], q[k], a[k]);
        }
    }
    for &v in quads.remainder() {
        a[0] = s.mul_add_e_f32s(v, v, a[0]);
    }
    let v = s.add_f32s(s.add_f32s(a[0], a[1]), s.add_f32s(a[2], a[3]));
    let mut sum = s.reduce_sum_f32s(v);
    for &v in t {
        sum += v * v;
    }
    sum
}

#[inline(always)]
pub(crate) fn sum_sq<S: Simd>(s: S, x: &[f32]) -> f32 {
    if x.len() <= BLOCK {
        return sum_sq_block(s, x);
    }
    let mut total = 0f64;
    for b in x.chunks(BLOCK) {
        total += sum_sq_block(s, b) as f64;
    }
    total as f32
}

/// `out[i] = f(a[i], b[i], out[i])` over `out`'s length: `v` on the SIMD body, `e` on the
/// scalar tail (the same arithmetic).
#[inline(always)]
fn zip2<S: Simd>(
    a: &[f32],
    b: &[f32],
    out: &mut [f32],
    v: impl Fn(S::f32s, S::f32s, S::f32s) -> S::f32s,
    e: impl Fn(f32, f32, f32) -> f32,
) {
    let n = out.len();
    let (a, b) = (&a[..n], &b[..n]);
    let (ha, ta) = S::as_simd_f32s(a);
    let (hb, tb) = S::as_simd_f32s(b);
    let (ho, to) = S::as_mut_simd_f32s(out);
    for ((o, &x), &y) in ho.iter_mut().zip(ha).zip(hb) {
        *o = v(x, y, *o);
    }
    for ((o, &x), &y) in to.iter_mut().zip(ta).zip(tb) {
        *o = e(x, y, *o);
    }
}

#[inline(always)]
pub(crate) fn mul_scale_w<S: Simd>(s: S, x: &[f32], r: f32, w: &[f32], y: &mut [f32]) {
    let rv = s.splat_f32s(r);
    zip2::<S>(
        x,
        w,
        y,
        |a, b, _| s.mul_f32s(s.mul_f32s(a, rv), b),
        |a, b, _| a * r * b,
    )
}

#[inline(always)]
pub(crate) fn add<S: Simd>(s: S, a: &[f32], b: &[f32], out: &mut [f32]) {
    zip2::<S>(a, b, out, |x, y, _| s.add_f32s(x, y), |x, y, _| x + y)
}

#[inline(always)]
pub(crate) fn mul<S: Simd>(s: S, a: &[f32], b: &[f32], out: &mut [f32]) {
    zip2::<S>(a, b, out, |x, y, _| s.mul_f32s(x, y), |x, y, _| x * y)
}

#[inline(always)]
pub(crate) fn scale_add<S: Simd>(s: S, x: &[f32], k: f32, m: &[f32], z: &mut [f32]) {
    let kv = s.splat_f32s(k);
    zip2::<S>(
        x,
        m,
        z,
        |a, b, _| s.add_f32s(s.mul_f32s(kv, a), b),
        |a, b, _| k * a + b,
    )
}

#[inline(always)]
pub(crate) fn scale_add_const<S: Simd>(s: S, x: &[f32], k: f32, c: f32, z: &mut [f32]) {
    let n = z.len();
    let x = &x[..n];
    let (hx, tx) = S::as_simd_f32s(x);
    let (hz, tz) = S::as_mut_simd_f32s(z);
    let (kv, cv) = (s.splat_f32s(k), s.splat_f32s(c));
    for (o, &a) in hz.iter_mut().zip(hx) {
        *o = s.add_f32s(s.mul_f32s(kv, a), cv);
    }
    for (o, &a) in tz.iter_mut().zip(tx) {
        *o = k * a + c;
    }
}

#[inline(always)]
pub(crate) fn dw_accumulate<S: Simd>(s: S, dy: &[f32], x: &[f32], r: f32, acc: &mut [f32]) {
    let rv = s.splat_f32s(r);
    zip2::<S>(
        dy,
        x,
        acc,
        |g, v, a| s.add_f32s(a, s.mul_f32s(s.mul_f32s(g, v), rv)),
        |g, v, a| a + g * v * r,
    )
}

#[inline(always)]
pub(crate) fn dot_wide<S: Simd>(_: S, a: &[f32], b: &[f32]) -> f64 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0f64; WIDE];
    let ca = a.chunks_exact(WIDE);
    let cb = b.chunks_exact(WIDE);
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..WIDE {
            acc[i] += x[i] as f64 * y[i] as f64;
        }
    }
    let mut t = 0f64;
    for (&x, &y) in ra.iter().zip(rb) {
        t += x as f64 * y as f64;
    }
    acc.iter().sum::<f64>() + t
}

#[inline(always)]
pub(crate) fn wide_sums<S: Simd>(_: S, x: &[f32], g: &[f32]) -> (f64, f64) {
    let n = x.len().min(g.len());
    let (x, g) = (&x[..n], &g[..n]);
    let mut ss = [0f64; WIDE];
    let mut dt = [0f64; WIDE];
    let cx = x.chunks_exact(WIDE);
    let cg = g.chunks_exact(WIDE);
    let (rx, rg) = (cx.remainder(), cg.remainder());
    for (a, b) in cx.zip(cg) {
        for i in 0..WIDE {
            let xv = a[i] as f64;
            ss[i] += xv * xv;
            dt[i] += b[i] as f64 * xv;
        }
    }
    let (mut s, mut d) = (0f64, 0f64);
    for (&a, &b) in rx.iter().zip(rg) {
        s += a as f64 * a as f64;
        d += b as f64 * a as f64;
    }
    (ss.iter().sum::<f64>() + s, dt.iter().sum::<f64>() + d)
}

#[inline(always)]
pub(crate) fn softmax_bwd_row<S: Simd>(
    _: S,
    y: &[f32],
    dy: &[f32],
    dot: f64,
    scale: f64,
    dx: &mut [f32],
) {
    let n = dx.len();
    let (y, dy) = (&y[..n], &dy[..n]);
    for ((d, &yj), &gj) in dx.iter_mut().zip(y).zip(dy) {
        *d = (scale * yj as f64 * (gj as f64 - dot)) as f32;
    }
}

#[inline(always)]
pub(crate) fn rms_bwd_row<S: Simd>(
    _: S,
    x: &[f32],
    r: f64,
    c: f64,
    dres: Option<&[f32]>,
    g: &mut [f32],
) {
    let n = g.len();
    let x = &x[..n];
    match dres {
        Some(dres) => {
            let dres = &dres[..n];
            for ((o, &xv), &dr) in g.iter_mut().zip(x).zip(dres) {
                *o = (r * (*o as f64 - xv as f64 * c)) as f32 + dr;
            }
        }
        None => {
            for (o, &xv) in g.iter_mut().zip(x) {
                *o = (r * (*o as f64 - xv as f64 * c)) as f32;
            }
        }
    }
}
