//! CPU matmul: the `gemm` crate for f32/f64/f16 (transposes as strides), bf16 widened to f32
//! at the SIMD level around an f32 GEMM, and a GEMV for `M = 1` (f32 and bf16; f16 also for
//! `N = 1`, whose `gemm` paths accumulate in f16) that streams the weight once, widening it in
//! registers, rows split over the rayon pool.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, DType, Result};
use half::{bf16, f16};
use rayon::prelude::*;

use super::{MatmulFwd, OP};
use crate::config::{CpuConfig, KernelConfig};
use crate::cpu;
use crate::seam::Inputs;
use crate::simd::skinny::{Orient, View};
use crate::simd::Isa;
use crate::validate::fail;

/// The `gemm` crate's parallelism for `cfg` (0 threads: all of rayon's).
fn parallelism(cfg: &KernelConfig) -> gemm::Parallelism {
    let t = match cfg.cpu.gemm_threads {
        0 => rayon::current_num_threads(),
        t => t,
    };
    if t > 1 {
        gemm::Parallelism::Rayon(t)
    } else {
        gemm::Parallelism::None
    }
}

/// op(A)[i, p] and op(B)[p, j] of one product as (row stride, column stride), after checking
/// that `a`, `b` and `c` (of these lengths) hold `m×k`, `k×n` and `m×n` elements.
fn strides(k: &MatmulFwd, a: usize, b: usize, c: usize) -> [(usize, usize); 2] {
    let (m, kk, n) = (k.m, k.k, k.n);
    assert!(a >= m * kk && b >= kk * n && c >= m * n);
    [
        if k.ta { (1, m) } else { (kk, 1) },
        if k.tb { (1, kk) } else { (n, 1) },
    ]
}

/// Threads of a `gemm` parallelism.
fn threads(par: gemm::Parallelism) -> usize {
    match par {
        gemm::Parallelism::Rayon(t) => t,
        _ => 1,
    }
}

/// `c = op(a) · op(b)` with the `gemm` crate; `a`, `b` contiguous in their stored shapes.
fn gemm_into<T: 'static + Copy + num_traits::Zero + num_traits::One>(
    k: &MatmulFwd,
    par: gemm::Parallelism,
    a: &[T],
    b: &[T],
    c: &mut [T],
) {
    let (m, kk, n) = (k.m, k.k, k.n);
    let [(a_rs, a_cs), (b_rs, b_cs)] = strides(k, a.len(), b.len(), c.len());
    // SAFETY: the strides address a[..m*k], b[..k*n] and c[..m*n], checked by `strides`; c
    // does not alias a or b.
    unsafe {
        gemm::gemm(
            m,
            n,
            kk,
            c.as_mut_ptr(),
            1,
            n as isize,
            false,
            a.as_ptr(),
            a_cs as isize,
            a_rs as isize,
            b.as_ptr(),
            b_cs as isize,
            b_rs as isize,
            T::zero(),
            T::one(),
            false,
            false,
            false,
            par,
        )
    }
}

/// Elements per task of the GEMV and of the conversions (keeps rayon's overhead small).
const TASK: usize = 1 << 16;

/// A vector operand of the GEMV, as f32.
trait GemvElem: Copy + Send + Sync {
    /// `Σ x[i] · w[i]` with `w` widened in registers.
    fn dot(isa: Isa, x: &[f32], w: &[Self]) -> f32;
    /// `acc[i] += a · w[i]`.
    fn axpy(isa: Isa, a: f32, w: &[Self], acc: &mut [f32]);
}

const LANES: usize = 32;

impl GemvElem for f32 {
    fn dot(isa: Isa, x: &[f32], w: &[f32]) -> f32 {
        isa.run(
            #[inline(always)]
            || dot_lanes(x, w, |v| v),
        )
    }
    fn axpy(isa: Isa, a: f32, w: &[f32], acc: &mut [f32]) {
        isa.run(
            #[inline(always)]
            || acc.iter_mut().zip(w).for_each(|(o, &v)| *o += a * v),
        )
    }
}

impl GemvElem for bf16 {
    fn dot(isa: Isa, x: &[f32], w: &[bf16]) -> f32 {
        isa.run(
            #[inline(always)]
            || dot_lanes(x, w, |v| f32::from_bits((v.to_bits() as u32) << 16)),
        )
    }
    fn axpy(isa: Isa, a: f32, w: &[bf16], acc: &mut [f32]) {
        isa.run(
            #[inline(always)]
            || {
                acc.iter_mut()
                    .zip(w)
                    .for_each(|(o, &v)| *o += a * f32::from_bits((v.to_bits() as u32) << 16))
            },
        )
    }
}

impl GemvElem for f16 {
    fn dot(isa: Isa, x: &[f32], w: &[f16]) -> f32 {
        let mut buf = [0f32; WIDEN];
        let mut t = 0f32;
        for (xc, wc) in x.chunks(WIDEN).zip(w.chunks(WIDEN)) {
            let b = &mut buf[..wc.len()];
            isa.f16_to_f32(wc, b);
            t += isa.run(
                #[inline(always)]
                || dot_lanes(xc, b, |v| v),
            );
        }
        t
    }
    fn axpy(isa: Isa, a: f32, w: &[f16], acc: &mut [f32]) {
        let mut buf = [0f32; WIDEN];
        for (oc, wc) in acc.chunks_mut(WIDEN).zip(w.chunks(WIDEN)) {
            let b = &mut buf[..wc.len()];
            isa.f16_to_f32(wc, b);
            isa.run(
                #[inline(always)]
                || oc.iter_mut().zip(b.iter()).for_each(|(o, &v)| *o += a * v),
            );
        }
    }
}

/// Elements of an f16 operand widened at a time on the stack by the f16 GEMV.
const WIDEN: usize = 256;

/// A lane-parallel dot product (LANES accumulators, so LLVM vectorizes it).
#[inline(always)]
fn dot_lanes<W: Copy>(x: &[f32], w: &[W], widen: impl Fn(W) -> f32) -> f32 {
    let n = x.len().min(w.len());
    let (x, w) = (&x[..n], &w[..n]);
    let mut acc = [0f32; LANES];
    let cx = x.chunks_exact(LANES);
    let cw = w.chunks_exact(LANES);
    let (rx, rw) = (cx.remainder(), cw.remainder());
    for (a, b) in cx.zip(cw) {
        for i in 0..LANES {
            acc[i] += a[i] * widen(b[i]);
        }
    }
    let mut t = 0f32;
    for (&a, &b) in rx.iter().zip(rw) {
        t += a * widen(b);
    }
    acc.iter().sum::<f32>() + t
}

/// `y [N] = x [K] · op(B)`: with `tb` (`B [N, K]`, a weight) one dot per output, rows split
/// over the pool; else (`B [K, N]`) `y += x[p] · B[p, :]` over column blocks.
fn gemv<W: GemvElem>(k: &MatmulFwd, isa: Isa, serial: bool, x: &[f32], b: &[W], y: &mut [f32]) {
    let (kk, n) = (k.k, k.n);
    if k.tb {
        let rows = TASK.div_ceil(kk).max(1);
        let job = |(i, ys): (usize, &mut [f32])| {
            for (r, o) in ys.iter_mut().enumerate() {
                let j = i * rows + r;
                *o = W::dot(isa, x, &b[j * kk..(j + 1) * kk]);
            }
        };
        if serial {
            y.chunks_mut(rows).enumerate().for_each(job);
        } else {
            y.par_chunks_mut(rows).enumerate().for_each(job);
        }
    } else {
        // Column blocks of 1024 (4 KiB of accumulators stay in L1).
        const COLS: usize = 1024;
        let job = |(i, ys): (usize, &mut [f32])| {
            ys.fill(0.0);
            let c0 = i * COLS;
            for (p, &xp) in x.iter().enumerate() {
                W::axpy(isa, xp, &b[p * n + c0..p * n + c0 + ys.len()], ys);
            }
        };
        if serial {
            y.chunks_mut(COLS).enumerate().for_each(job);
        } else {
            y.par_chunks_mut(COLS).enumerate().for_each(job);
        }
    }
}

/// Widens a bf16 operand to f32 at the SIMD level (in parallel blocks when large).
fn widen(isa: Isa, serial: bool, src: &[bf16]) -> Vec<f32> {
    let mut out = vec![0f32; src.len()];
    if serial || src.len() < 4 * TASK {
        isa.bf16_to_f32(src, &mut out);
    } else {
        out.par_chunks_mut(TASK)
            .zip(src.par_chunks(TASK))
            .for_each(|(o, s)| isa.bf16_to_f32(s, o));
    }
    out
}

/// Widens an f16 operand to f32 at the SIMD level.
fn widen16(isa: Isa, src: &[f16]) -> Vec<f32> {
    let mut out = vec![0f32; src.len()];
    isa.f16_to_f32(src, &mut out);
    out
}

fn narrow(isa: Isa, serial: bool, src: &[f32]) -> Vec<bf16> {
    let mut out: Vec<bf16> = bytemuck::allocation::zeroed_vec(src.len());
    if serial || src.len() < 4 * TASK {
        isa.f32_to_bf16(src, &mut out);
    } else {
        out.par_chunks_mut(TASK)
            .zip(src.par_chunks(TASK))
            .for_each(|(o, s)| isa.f32_to_bf16(s, o));
    }
    out
}

/// The `k.batch` products of `k`, `f(one, par, a_i, b_i, c_i)` on one matrix of each operand:
/// with at least as many products as threads, one product per rayon task (each serial: no
/// fork-join inside the small per-head GEMMs of attention); else one after the other, each
/// with `par`.
fn per_product<A: Sync, B: Sync, C: Send>(
    k: &MatmulFwd,
    par: gemm::Parallelism,
    a: &[A],
    b: &[B],
    c: &mut [C],
    f: impl Fn(&MatmulFwd, gemm::Parallelism, &[A], &[B], &mut [C]) + Sync,
) {
    let one = MatmulFwd { batch: 1, ..*k };
    let (sa, sb, sc) = (k.m * k.k, k.k * k.n, k.m * k.n);
    let threads = threads(par);
    let job = |(i, ci): (usize, &mut [C]), p| {
        f(
            &one,
            p,
            &a[i * sa..(i + 1) * sa],
            &b[i * sb..(i + 1) * sb],
            ci,
        )
    };
    if k.batch == 1 {
        job((0, &mut c[..sc]), par);
    } else if threads > 1 && k.batch >= threads {
        c[..k.batch * sc]
            .par_chunks_mut(sc)
            .enumerate()
            .for_each(|ic| job(ic, gemm::Parallelism::None));
    } else {
        c[..k.batch * sc]
            .chunks_mut(sc)
            .enumerate()
            .for_each(|ic| job(ic, par));
    }
}

/// The f32 products of `k` (the GEMV for `M = 1` when `gemv`).
fn f32_products(
    k: &MatmulFwd,
    isa: Isa,
    par: gemm::Parallelism,
    cpu: &CpuConfig,
    a: &[f32],
    b: &[f32],
    c: &mut [f32],
) {
    let (gemv_on, skinny_max) = (cpu.gemv, cpu.skinny_gemm_max);
    per_product(k, par, a, b, c, |one, p, a, b, c| {
        if one.m == 1 && gemv_on {
            gemv(one, isa, matches!(p, gemm::Parallelism::None), a, b, c);
        } else if !skinny(one, isa, p, skinny_max, a, b, c) {
            gemm_into(one, p, a, b, c);
        }
    })
}

/// One f32 product on the skinny micro-kernels ([`Isa::skinny_gemm`]) when a side is at most
/// `max_side`; `false` (nothing written) otherwise.
fn skinny(
    k: &MatmulFwd,
    isa: Isa,
    par: gemm::Parallelism,
    max_side: usize,
    a: &[f32],
    b: &[f32],
    c: &mut [f32],
) -> bool {
    let (m, kk, n) = (k.m, k.k, k.n);
    let [(a_rs, a_cs), (b_rs, b_cs)] = strides(k, a.len(), b.len(), c.len());
    let view = |s: &[f32], rs: usize, cs: usize| View {
        ptr: s.as_ptr(),
        rs: rs as isize,
        cs: cs as isize,
    };
    // SAFETY: the views address a[..m*k] and b[..k*n], c holds m rows of n (checked by
    // `strides`).
    unsafe {
        isa.skinny_gemm(
            threads(par),
            max_side,
            (m, n, kk),
            c.as_mut_ptr(),
            n,
            false,
            view(a, a_rs, a_cs),
            view(b, b_rs, b_cs),
            1.0,
            Orient::Auto,
        )
    }
}

pub(super) fn forward(
    k: &MatmulFwd,
    cfg: &KernelConfig,
    ins: &Inputs<CpuStorage>,
) -> Result<Vec<CpuStorage>> {
    let (sa, la) = ins.get(0)?;
    let (sb, lb) = ins.get(1)?;
    let par = parallelism(cfg);
    let serial = matches!(par, gemm::Parallelism::None);
    let isa = Isa::new(OP, cfg.cpu.simd)?;
    let mn = k.batch * k.m * k.n;
    let out = match sa.dtype() {
        DType::F32 => {
            let a = cpu::slice::<f32>(OP, "a", sa, la)?;
            let b = cpu::slice::<f32>(OP, "b", sb, lb)?;
            let mut c = cpu::alloc::<f32>(mn, cfg.poison);
            f32_products(k, isa, par, &cfg.cpu, a, b, &mut c);
            CpuStorage::F32(c)
        }
        DType::F64 => {
            let a = cpu::slice::<f64>(OP, "a", sa, la)?;
            let b = cpu::slice::<f64>(OP, "b", sb, lb)?;
            let mut c = cpu::alloc::<f64>(mn, cfg.poison);
            per_product(k, par, a, b, &mut c, |one, p, a, b, c| {
                gemm_into(one, p, a, b, c)
            });
            CpuStorage::F64(c)
        }
        DType::F16 if k.batch > 1 => {
            // Batched f16 (attention): widened to f32 like bf16, so no product runs one of
            // the gemm crate's f16-accumulating GEMV paths.
            let a = cpu::slice::<f16>(OP, "a", sa, la)?;
            let b = cpu::slice::<f16>(OP, "b", sb, lb)?;
            let (a32, b32) = (widen16(isa, a), widen16(isa, b));
            let mut c32 = cpu::alloc::<f32>(mn, cfg.poison);
            f32_products(k, isa, par, &cfg.cpu, &a32, &b32, &mut c32);
            let mut c: Vec<f16> = bytemuck::allocation::zeroed_vec(mn);
            isa.f32_to_f16(&c32, &mut c);
            CpuStorage::F16(c)
        }
        DType::F16 => {
            let a = cpu::slice::<f16>(OP, "a", sa, la)?;
            let b = cpu::slice::<f16>(OP, "b", sb, lb)?;
            let mut c = cpu::alloc::<f16>(mn, cfg.poison);
            // The gemm crate's f16 GEMV paths (`M = 1` or `N = 1`) accumulate in f16 (relative
            // error ~1e-2 at K = 4096, measured); ours accumulates in f32 like its GEMM.
            // `N = 1` is the same GEMV transposed: `cᵀ = op(b)ᵀ · op(a)ᵀ`.
            let gemv_of = match (k.m, k.n) {
                (1, _) => Some((*k, a, b)),
                (m, 1) => Some((
                    MatmulFwd {
                        batch: 1,
                        m: 1,
                        k: k.k,
                        n: m,
                        ta: false,
                        tb: !k.ta,
                    },
                    b,
                    a,
                )),
                _ => None,
            };
            if let Some((g, x, w)) = gemv_of {
                let mut x32 = vec![0f32; g.k];
                isa.f16_to_f32(&x[..g.k], &mut x32);
                let mut c32 = vec![0f32; mn];
                gemv(&g, isa, serial, &x32, w, &mut c32);
                isa.f32_to_f16(&c32, &mut c);
            } else {
                gemm_into(k, par, a, b, &mut c);
            }
            CpuStorage::F16(c)
        }
        DType::BF16 => {
            let a = cpu::slice::<bf16>(OP, "a", sa, la)?;
            let b = cpu::slice::<bf16>(OP, "b", sb, lb)?;
            let mut c32 = cpu::alloc::<f32>(mn, cfg.poison);
            if k.batch == 1 && k.m == 1 && cfg.cpu.gemv {
                let x = widen(isa, true, a);
                gemv(k, isa, serial, &x, b, &mut c32);
            } else {
                let (a32, b32) = (widen(isa, serial, a), widen(isa, serial, b));
                f32_products(k, isa, par, &cfg.cpu, &a32, &b32, &mut c32);
            }
            CpuStorage::BF16(narrow(isa, serial, &c32))
        }
        d => fail!(
            OP,
            "unsupported dtype {d:?}, expected f32, f64, f16 or bf16"
        ),
    };
    Ok(vec![out])
}
