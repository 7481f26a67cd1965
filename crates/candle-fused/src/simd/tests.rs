//! Every primitive of the SIMD layer at every level this CPU has, against scalar f64 math
//! (and `half` for the conversions). Inputs come from a xorshift generator seeded from the
//! clock; the seed is in every failure message.

use half::{bf16, f16};

use super::math::exp_nonpos_f32;
use super::{Isa, SimdLevel};

struct Rng(u64);

impl Rng {
    fn new() -> (Self, u64) {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
            | 1;
        (Rng(seed), seed)
    }
    fn u32(&mut self) -> u32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 16) as u32
    }
    /// Uniform in [lo, hi).
    fn f32(&mut self, lo: f32, hi: f32) -> f32 {
        lo + (hi - lo) * (self.u32() as f32 / 4_294_967_296.0)
    }
    fn vec(&mut self, n: usize, lo: f32, hi: f32) -> Vec<f32> {
        (0..n).map(|_| self.f32(lo, hi)).collect()
    }
}

fn levels() -> Vec<Isa> {
    let l = SimdLevel::available();
    assert!(l.contains(&SimdLevel::Scalar));
    l.into_iter()
        .map(|l| Isa::new("test", l).unwrap())
        .collect()
}

/// Lengths that cover empty rows, tails of every size, one block and several blocks.
const LENS: [usize; 12] = [0, 1, 3, 7, 15, 16, 17, 31, 64, 100, 1024, 5000];

#[test]
fn levels_are_detected_and_forcing_a_missing_one_is_an_error() {
    let avail = SimdLevel::available();
    assert_eq!(avail[0], SimdLevel::detected());
    #[cfg(target_arch = "x86_64")]
    {
        let e = Isa::new("softmax_last_dim", SimdLevel::Neon).unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("softmax_last_dim") && msg.contains("neon") && msg.contains("scalar"),
            "{msg}"
        );
    }
    for l in avail {
        assert_eq!(Isa::new("t", l).unwrap().level(), l);
    }
}

#[test]
fn exp_matches_libm_at_every_level() {
    let mut xs = Vec::new();
    let mut x = -87.0f32;
    while x <= 0.0 {
        xs.push(x);
        x += 0.000_37;
    }
    let specials = [f32::NEG_INFINITY, -200.0, -87.5, f32::NAN, 0.0, -0.0];
    for isa in levels() {
        let mut out = vec![0f32; xs.len()];
        let sum = isa.exp_sub_sum(&xs, &mut out, 0.0);
        let mut worst = 0f64;
        let mut want_sum = 0f64;
        for (&x, &e) in xs.iter().zip(&out) {
            let want = (x as f64).exp();
            want_sum += want;
            worst = worst.max(((e as f64 - want) / want).abs());
        }
        assert!(worst < 5e-7, "{isa:?}: worst relative error {worst}");
        assert!(((sum as f64 - want_sum) / want_sum).abs() < 1e-6, "{isa:?}");
        // The same specials in vector lanes and in the tail.
        for pad in [0usize, 16, 29] {
            let mut v = vec![-1.0f32; pad];
            v.extend_from_slice(&specials);
            let mut o = vec![0f32; v.len()];
            isa.exp_sub_sum(&v, &mut o, 0.0);
            let o = &o[pad..];
            assert_eq!(o[0], 0.0, "{isa:?} exp(-inf)");
            assert_eq!(o[1], 0.0, "{isa:?} exp(-200)");
            assert_eq!(o[2], 0.0, "{isa:?} exp(-87.5)");
            assert!(o[3].is_nan(), "{isa:?} exp(NaN)");
            assert_eq!(o[4], 1.0, "{isa:?} exp(0)");
            assert_eq!(o[5], 1.0, "{isa:?} exp(-0)");
        }
    }
    assert_eq!(exp_nonpos_f32(0.0), 1.0);
    assert!(exp_nonpos_f32(f32::NAN).is_nan());
}

#[test]
fn reductions_match_f64_at_every_level() {
    let (mut rng, seed) = Rng::new();
    for isa in levels() {
        for &n in &LENS {
            let x = rng.vec(n, -3.0, 3.0);
            let g = rng.vec(n, -2.0, 2.0);
            let ctx = format!("{isa:?} n={n} seed={seed}");
            let m = x.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            assert_eq!(isa.max(&x), m, "{ctx}");
            let ss: f64 = x.iter().map(|&v| v as f64 * v as f64).sum();
            let got = isa.sum_sq(&x) as f64;
            assert!(
                (got - ss).abs() <= 1e-6 * ss.max(1e-30),
                "{ctx}: {got} vs {ss}"
            );
            let dot: f64 = x.iter().zip(&g).map(|(&a, &b)| a as f64 * b as f64).sum();
            let scale: f64 = x
                .iter()
                .zip(&g)
                .map(|(&a, &b)| (a as f64 * b as f64).abs())
                .sum();
            assert!((isa.dot_wide(&x, &g) - dot).abs() <= 1e-13 * scale, "{ctx}");
            let (s2, d2) = isa.wide_sums(&x, &g);
            assert!((s2 - ss).abs() <= 1e-13 * ss, "{ctx}");
            assert!((d2 - dot).abs() <= 1e-13 * scale, "{ctx}");
            // In place and out of place give the same exponentials.
            let mut a = vec![0f32; n];
            let s1 = isa.exp_sub_sum(&x, &mut a, m);
            let mut b = x.clone();
            let s2 = isa.exp_sub_sum_inplace(&mut b, m);
            assert_eq!(a, b, "{ctx}");
            assert_eq!(s1, s2, "{ctx}");
        }
        // A NaN anywhere makes the softmax NaN whatever max does with it.
        let mut x = rng.vec(40, -1.0, 1.0);
        x[20] = f32::NAN;
        let m = isa.max(&x);
        let mut o = vec![0f32; 40];
        assert!(isa.exp_sub_sum(&x, &mut o, m).is_nan(), "{isa:?}");
    }
}

#[test]
fn elementwise_rows_match_scalar_at_every_level() {
    let (mut rng, seed) = Rng::new();
    for isa in levels() {
        for &n in &LENS {
            let ctx = format!("{isa:?} n={n} seed={seed}");
            let x = rng.vec(n, -3.0, 3.0);
            let w = rng.vec(n, 0.5, 1.5);
            let g = rng.vec(n, -1.0, 1.0);
            let close = |a: f32, b: f64| (a as f64 - b).abs() <= 2e-7 * (1.0 + b.abs());
            let mut y = vec![f32::NAN; n];
            isa.mul_scale_w(&x, 0.7, &w, &mut y);
            for i in 0..n {
                assert!(
                    close(y[i], x[i] as f64 * 0.7 * w[i] as f64),
                    "{ctx} mul_scale_w"
                );
            }
            isa.add(&x, &w, &mut y);
            for i in 0..n {
                assert_eq!(y[i], x[i] + w[i], "{ctx} add");
            }
            isa.mul(&x, &w, &mut y);
            for i in 0..n {
                assert_eq!(y[i], x[i] * w[i], "{ctx} mul");
            }
            isa.scale_add(&x, 0.125, &g, &mut y);
            for i in 0..n {
                assert!(
                    close(y[i], 0.125 * x[i] as f64 + g[i] as f64),
                    "{ctx} scale_add"
                );
            }
            isa.scale_add_const(&x, 0.125, -2.0, &mut y);
            for i in 0..n {
                assert!(
                    close(y[i], 0.125 * x[i] as f64 - 2.0),
                    "{ctx} scale_add_const"
                );
            }
            let mut z = x.clone();
            isa.scale(&mut z, 3.0);
            for i in 0..n {
                assert_eq!(z[i], x[i] * 3.0, "{ctx} scale");
            }
            let mut acc = w.clone();
            isa.dw_accumulate(&g, &x, 0.5, &mut acc);
            for i in 0..n {
                let want = w[i] as f64 + g[i] as f64 * x[i] as f64 * 0.5;
                assert!(close(acc[i], want), "{ctx} dw_accumulate");
            }
            isa.softmax_bwd_row(&x, &g, 0.3, 2.0, &mut y);
            for i in 0..n {
                let want = (2.0 * x[i] as f64 * (g[i] as f64 - 0.3)) as f32;
                assert_eq!(y[i], want, "{ctx} softmax_bwd_row");
            }
            for dres in [None, Some(&w[..])] {
                let mut gg = g.clone();
                isa.rms_bwd_row(&x, 1.5, 0.25, dres, &mut gg);
                for i in 0..n {
                    let mut want = (1.5 * (g[i] as f64 - x[i] as f64 * 0.25)) as f32;
                    if let Some(d) = dres {
                        want += d[i];
                    }
                    assert_eq!(gg[i], want, "{ctx} rms_bwd_row");
                }
            }
        }
    }
}

/// Subnormal f32 (and zero), which `vcvtneps2bf16` flushes to a signed zero.
fn is_subnormal(x: f32) -> bool {
    x != 0.0 && x.abs() < f32::MIN_POSITIVE
}

#[test]
fn half_conversions_match_half_at_every_level() {
    let (mut rng, seed) = Rng::new();
    // Random bit patterns (every class: normals, subnormals, inf, NaN) plus the edges.
    let mut bits: Vec<f32> = (0..20_000).map(|_| f32::from_bits(rng.u32())).collect();
    bits.extend([
        0.0,
        -0.0,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
        f32::MAX,
        f32::MIN_POSITIVE,
        65504.0,
        65520.0,
        1.0 + 1.0 / 256.0,
        1.0 + 3.0 / 256.0,
    ]);
    bits.extend(rng.vec(5000, -10.0, 10.0));
    for isa in levels() {
        for n in [bits.len(), 1, 15, 17, 33] {
            let src = &bits[..n];
            let ctx = format!("{isa:?} n={n} seed={seed}");
            let mut b = vec![bf16::ZERO; n];
            isa.f32_to_bf16(src, &mut b);
            for (i, (&x, &got)) in src.iter().zip(&b).enumerate() {
                let want = bf16::from_f32(x);
                let flushed = is_subnormal(x) && got.to_f32() == 0.0;
                assert!(
                    got.to_bits() == want.to_bits() || flushed,
                    "{ctx} f32_to_bf16[{i}] of {x:e} ({:#x}): {:#x} vs {:#x}",
                    x.to_bits(),
                    got.to_bits(),
                    want.to_bits()
                );
            }
            let mut back = vec![0f32; n];
            isa.bf16_to_f32(&b, &mut back);
            for (&h, &f) in b.iter().zip(&back) {
                assert_eq!(f.to_bits(), h.to_f32().to_bits(), "{ctx} bf16_to_f32");
            }
            let mut h = vec![f16::ZERO; n];
            isa.f32_to_f16(src, &mut h);
            for (&x, &got) in src.iter().zip(&h) {
                let want = f16::from_f32(x);
                assert!(
                    got.to_bits() == want.to_bits() || (x.is_nan() && got.is_nan()),
                    "{ctx} f32_to_f16 of {x:e}"
                );
            }
            isa.f16_to_f32(&h, &mut back);
            for (&v, &f) in h.iter().zip(&back) {
                assert!(
                    f.to_bits() == v.to_f32().to_bits() || (v.is_nan() && f.is_nan()),
                    "{ctx} f16_to_f32"
                );
            }
        }
    }
}

/// The skinny f32 products against f64 sums: every level, both orientations and `Auto`,
/// transposed and strided operands, accumulate or overwrite (the output poisoned with NaN so an
/// unwritten element fails), threads on or off, and the padding of each output row untouched.
#[test]
fn skinny_gemm_matches_f64() {
    use super::skinny::{Orient, View};
    let (mut rng, seed) = Rng::new();
    let shapes = [
        (1, 1, 1),
        (3, 5, 7),
        (17, 16, 33),
        (40, 31, 9),
        (9, 70, 16),
        (16, 200, 300),
        (300, 16, 200),
        (250, 130, 8),
        (64, 8, 1000),
        (8, 1000, 64),
    ];
    for isa in levels() {
        for &(m, n, k) in &shapes {
            for (ta, tb, acc, orient, threads) in [
                (false, false, false, Orient::Auto, 1),
                (false, true, true, Orient::Direct, 2),
                (true, false, false, Orient::Transposed, 2),
                (true, true, true, Orient::Auto, 2),
                (false, true, false, Orient::Transposed, 1),
                (true, false, true, Orient::Direct, 1),
            ] {
                let a = rng.vec(m * k, -1.0, 1.0);
                let b = rng.vec(k * n, -1.0, 1.0);
                let ldd = n + 3;
                let init = rng.vec(m * ldd, -1.0, 1.0);
                let mut c = init.clone();
                if !acc {
                    for row in c.chunks_mut(ldd) {
                        row[..n].fill(f32::NAN);
                    }
                }
                let beta = rng.f32(0.5, 2.0);
                let (a_rs, a_cs) = if ta { (1, m) } else { (k, 1) };
                let (b_rs, b_cs) = if tb { (1, k) } else { (n, 1) };
                let va = View {
                    ptr: a.as_ptr(),
                    rs: a_rs as isize,
                    cs: a_cs as isize,
                };
                let vb = View {
                    ptr: b.as_ptr(),
                    rs: b_rs as isize,
                    cs: b_cs as isize,
                };
                // SAFETY: the views cover a and b; c has m rows of ldd >= n.
                let ran = unsafe {
                    isa.skinny_gemm(
                        threads,
                        usize::MAX,
                        (m, n, k),
                        c.as_mut_ptr(),
                        ldd,
                        acc,
                        va,
                        vb,
                        beta,
                        orient,
                    )
                };
                assert!(ran);
                let what = format!(
                    "{:?} {m}x{n}x{k} ta={ta} tb={tb} acc={acc} {orient:?} threads={threads} seed={seed}",
                    isa.level()
                );
                for i in 0..m {
                    for j in 0..ldd {
                        let got = c[i * ldd + j];
                        if j >= n {
                            assert_eq!(
                                got.to_bits(),
                                init[i * ldd + j].to_bits(),
                                "padding written: {what}"
                            );
                            continue;
                        }
                        let mut s = 0f64;
                        let mut mag = 0f64;
                        for p in 0..k {
                            let t = a[i * a_rs + p * a_cs] as f64 * b[p * b_rs + j * b_cs] as f64;
                            s += t;
                            mag += t.abs();
                        }
                        let want =
                            beta as f64 * s + if acc { init[i * ldd + j] as f64 } else { 0.0 };
                        let tol = 1e-5 * (beta as f64 * mag + 1.0);
                        assert!(
                            (got as f64 - want).abs() <= tol,
                            "({i},{j}) got {got} want {want}: {what}"
                        );
                    }
                }
            }
        }
        // No side at most max_side: declined, nothing written.
        let mut c = [7f32; 4];
        let d = [1f32; 4];
        let vd = View {
            ptr: d.as_ptr(),
            rs: 2,
            cs: 1,
        };
        // SAFETY: 2×2 operands.
        let ran = unsafe {
            isa.skinny_gemm(
                1,
                1,
                (2, 2, 2),
                c.as_mut_ptr(),
                2,
                false,
                vd,
                vd,
                1.0,
                Orient::Auto,
            )
        };
        assert!(!ran && c == [7f32; 4]);
    }
}
