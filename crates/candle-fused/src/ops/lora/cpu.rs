//! CPU kernels for the LoRA linear: every product is one call of the `gemm` crate (the GEMM
//! behind Candle's CPU matmul), transposes expressed by strides, accumulations by its
//! `dst = α·dst + β·lhs·rhs` form. f32/f64 compute in place on all rows at once. f16/bf16 run
//! in blocks of rows ([`crate::config::CpuConfig::half_gemm_block`] elements): a block of the
//! activations (x, dy, u) is widened to f32, computed, and the block's results rounded once;
//! the reductions over rows (dW, dA, dB, dbias) accumulate in f32 across blocks. So half types
//! accumulate in f32 throughout and the temporaries stay a block of rows (never `M×N`); the
//! weights are widened once (parameter-sized).

use std::any::TypeId;
use std::borrow::Cow;

use candle_core::{CpuStorage, Result};
use num_traits::{One, Zero};
use rayon::prelude::*;

use super::kernels::{Dims, LoraBwd, LoraDown, LoraFwd, Mat};
use crate::config::{CpuConfig, KernelConfig};
use crate::cpu::{self, Acc, Elem};
use crate::seam::Inputs;
use crate::simd::skinny::{Orient, View};
use crate::simd::Isa;
use crate::validate::fail;

/// A host operand: row stride and column stride of [`Mat`] in elements.
fn strides<A>(m: &Mat<*const A>) -> (isize, isize) {
    if m.t {
        (1, m.ld as isize)
    } else {
        (m.ld as isize, 1)
    }
}

/// The operand over the rows of `s` (row length `ld`), transposed when `t`.
fn mat<A>(s: &[A], ld: usize, t: bool) -> Mat<*const A> {
    if t {
        Mat::t(s.as_ptr(), ld)
    } else {
        Mat::rows(s.as_ptr(), ld)
    }
}

/// The SIMD level, skinny-product bound and threads (Candle's) of [`mm`].
#[derive(Clone, Copy)]
struct Gemm {
    isa: Isa,
    max_side: usize,
    threads: usize,
}

impl Gemm {
    fn new(name: &str, cfg: &KernelConfig) -> Result<Self> {
        Ok(Self {
            isa: Isa::new(name, cfg.cpu.simd)?,
            max_side: cfg.cpu.skinny_gemm_max,
            threads: candle_core::utils::get_num_threads(),
        })
    }

    fn parallelism(self) -> gemm::Parallelism {
        if self.threads > 1 {
            gemm::Parallelism::Rayon(self.threads)
        } else {
            gemm::Parallelism::None
        }
    }
}

/// `dst (m×n, row length ldd) = [dst +] beta·lhs (m×k)·rhs (k×n)`: f32 products with a side of
/// at most `g.max_side` on the skinny micro-kernels, the rest on the `gemm` crate.
///
/// # Safety
/// The views must cover `m×k` and `k×n` elements inside live slices, `dst` `m` rows of
/// `ldd >= n` elements.
#[allow(clippy::too_many_arguments)]
unsafe fn mm<A: Acc>(
    g: Gemm,
    (m, n, k): (usize, usize, usize),
    dst: &mut [A],
    ldd: usize,
    accumulate: bool,
    lhs: Mat<*const A>,
    rhs: Mat<*const A>,
    beta: A,
) {
    debug_assert!(m == 0 || dst.len() >= (m - 1) * ldd + n);
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            for row in dst.chunks_mut(ldd).take(m) {
                row[..n].fill(A::zero());
            }
        }
        return;
    }
    let ((lrs, lcs), (rrs, rcs)) = (strides(&lhs), strides(&rhs));
    if TypeId::of::<A>() == TypeId::of::<f32>() {
        let view = |p: *const A, rs, cs| View {
            ptr: p as *const f32,
            rs,
            cs,
        };
        // SAFETY: A is f32; the caller's contract covers the views and dst.
        if g.isa.skinny_gemm(
            g.threads,
            g.max_side,
            (m, n, k),
            dst.as_mut_ptr() as *mut f32,
            ldd,
            accumulate,
            view(lhs.ptr, lrs, lcs),
            view(rhs.ptr, rrs, rcs),
            beta.to_f32().unwrap_or(f32::NAN),
            Orient::Auto,
        ) {
            return;
        }
    }
    gemm::gemm(
        m,
        n,
        k,
        dst.as_mut_ptr(),
        1,
        ldd as isize,
        accumulate,
        lhs.ptr,
        lcs,
        lrs,
        rhs.ptr,
        rcs,
        rrs,
        A::one(),
        beta,
        false,
        false,
        false,
        g.parallelism(),
    )
}

/// Widens `src` into `dst` (in parallel for long slices).
fn widen_into<T: Elem>(src: &[T], dst: &mut Vec<T::A>) {
    dst.clear();
    dst.resize(src.len(), T::A::zero());
    dst.par_chunks_mut(1 << 14)
        .zip(src.par_chunks(1 << 14))
        .for_each(|(o, i)| T::to_acc(i, o));
}

/// `src` in the accumulation type: borrowed for f32/f64, widened into `buf` for half types.
fn acc<'a, T: Elem>(src: &'a [T], buf: &'a mut Vec<T::A>) -> &'a [T::A] {
    match T::as_acc(src) {
        Some(s) => s,
        None => {
            widen_into(src, buf);
            buf
        }
    }
}

/// Optional input `i` (a weight, parameter-sized) in the accumulation type.
fn weight<'a, T: Elem>(ins: &Inputs<'a, CpuStorage>, i: usize) -> Result<Option<Cow<'a, [T::A]>>> {
    let Some(d) = cpu::opt_input::<T>(ins, i)? else {
        return Ok(None);
    };
    Ok(Some(match T::as_acc(d) {
        Some(x) => Cow::Borrowed(x),
        None => {
            let mut v = Vec::new();
            widen_into(d, &mut v);
            Cow::Owned(v)
        }
    }))
}

/// Runs `f` on `out` seen in the accumulation type, rounding once for half types.
fn with_acc<T: Elem>(out: &mut [T], f: impl FnOnce(&mut [T::A])) {
    if T::IS_ACC {
        f(T::as_acc_mut(out).expect("IS_ACC"))
    } else {
        let mut tmp = vec![T::A::zero(); out.len()];
        f(&mut tmp);
        out.par_chunks_mut(1 << 14)
            .zip(tmp.par_chunks(1 << 14))
            .for_each(|(o, i)| T::from_acc(i, o));
    }
}

/// Rows per block: all of them for f32/f64 (no copies), about `half_gemm_block` widened
/// elements of the widest activation row for half types.
fn block_rows<T: Elem>(cfg: &CpuConfig, m: usize, width: usize) -> usize {
    if T::IS_ACC {
        m.max(1)
    } else {
        (cfg.half_gemm_block.max(1) / width.max(1)).clamp(1, m.max(1))
    }
}

/// The row blocks `[m0, m1)`.
fn blocks(m: usize, rows: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..m.div_ceil(rows)).map(move |b| (b * rows, ((b + 1) * rows).min(m)))
}

/// `u_ext = [s·x·Aᵀ | 1 | 0..]` (`M × kk`, the ones column with a bias), in the storage dtype.
fn down_t<T: Elem>(
    gm: Gemm,
    d: &Dims,
    scale: f64,
    cfg: &KernelConfig,
    x: &[T],
    a: Option<&[T::A]>,
) -> Vec<T> {
    let kk = d.kk();
    let a = a.unwrap_or(&[]);
    let mut u = cpu::alloc::<T>(d.m * kk, cfg.poison);
    let mut xbuf = Vec::new();
    for (m0, m1) in blocks(d.m, block_rows::<T>(&cfg.cpu, d.m, d.k)) {
        let xb = acc(&x[m0 * d.k..m1 * d.k], &mut xbuf);
        with_acc::<T>(&mut u[m0 * kk..m1 * kk], |u| {
            // SAFETY: xb is (m1-m0)×K, A is r×K, u is (m1-m0) rows of kk >= r.
            unsafe {
                mm(
                    gm,
                    (m1 - m0, d.r, d.k),
                    u,
                    kk,
                    false,
                    mat(xb, d.k, false),
                    mat(a, d.k, true),
                    T::A::of(scale),
                )
            };
            for row in u.chunks_exact_mut(kk) {
                row[d.r..].fill(T::A::zero());
                if d.bias {
                    row[d.r] = T::A::one();
                }
            }
        });
    }
    u
}

/// `B_ext = [B | bias | 0..]` (`N × kk`) in the accumulation type.
fn b_ext<T: Elem>(d: &Dims, b: Option<&[T]>, bias: Option<&[T]>) -> Vec<T::A> {
    let kk = d.kk();
    let mut out = vec![T::A::zero(); d.n * kk];
    for (i, row) in out.chunks_exact_mut(kk).enumerate() {
        if let Some(b) = b {
            T::to_acc(&b[i * d.r..(i + 1) * d.r], &mut row[..d.r]);
        }
        if let Some(bias) = bias {
            T::to_acc(&bias[i..i + 1], &mut row[d.r..d.r + 1]);
        }
    }
    out
}

/// [`LoraDown`]: `u_ext`.
pub(super) fn down<T: Elem>(
    k: &LoraDown,
    cfg: &KernelConfig,
    ins: &Inputs<CpuStorage>,
) -> Result<Vec<CpuStorage>> {
    let x = cpu::input::<T>(ins, 0)?;
    let a = weight::<T>(ins, 1)?;
    let gm = Gemm::new(k.name, cfg)?;
    let u = down_t::<T>(gm, &k.dims, k.scale, cfg, x, a.as_deref());
    Ok(vec![T::to_cpu_storage_owned(u)])
}

/// [`LoraFwd`]: `u_ext` first, then `y = u_ext·B_extᵀ` and the base GEMM accumulating onto it.
pub(super) fn forward<T: Elem>(
    k: &LoraFwd,
    cfg: &KernelConfig,
    ins: &Inputs<CpuStorage>,
) -> Result<Vec<CpuStorage>> {
    type A<T> = <T as Elem>::A;
    let d = k.dims;
    let kk = d.kk();
    let x = cpu::input::<T>(ins, 0)?;
    let w = weight::<T>(ins, 1)?;
    let a = weight::<T>(ins, 2)?;
    let (b, bias) = (cpu::opt_input::<T>(ins, 3)?, cpu::opt_input::<T>(ins, 4)?);
    let gm = Gemm::new(k.name, cfg)?;
    let u = (kk > 0).then(|| down_t::<T>(gm, &d, k.scale, cfg, x, a.as_deref()));
    let bext = (kk > 0).then(|| b_ext::<T>(&d, b, bias));
    let mut y = cpu::alloc::<T>(d.m * d.n, cfg.poison);
    let (mut xbuf, mut ubuf) = (Vec::new(), Vec::new());
    for (m0, m1) in blocks(d.m, block_rows::<T>(&cfg.cpu, d.m, d.k.max(d.n))) {
        let rows = m1 - m0;
        let xb = acc(&x[m0 * d.k..m1 * d.k], &mut xbuf);
        let ub = u.as_ref().map(|u| acc(&u[m0 * kk..m1 * kk], &mut ubuf));
        with_acc::<T>(&mut y[m0 * d.n..m1 * d.n], |y| {
            let mut low = false;
            if let (Some(bext), Some(u)) = (&bext, ub) {
                // SAFETY: u is rows×kk, B_ext is N×kk, y is rows×N.
                unsafe {
                    mm(
                        gm,
                        (rows, d.n, kk),
                        y,
                        d.n,
                        false,
                        mat(u, kk, false),
                        mat(bext, kk, true),
                        A::<T>::one(),
                    )
                };
                low = true;
            }
            match &w {
                // SAFETY: x is rows×K, W is N×K.
                Some(w) => unsafe {
                    mm(
                        gm,
                        (rows, d.n, d.k),
                        y,
                        d.n,
                        low,
                        mat(xb, d.k, false),
                        mat(w, d.k, true),
                        A::<T>::one(),
                    )
                },
                None if !low => y.fill(A::<T>::zero()),
                None => {}
            }
        });
    }
    let mut out = vec![T::to_cpu_storage_owned(y)];
    out.extend(u.map(T::to_cpu_storage_owned));
    Ok(out)
}

/// A reduction output over the rows: the output itself for f32/f64, an f32 accumulator for
/// half types (rounded into the output at the end).
struct Reduce<'a, T: Elem> {
    out: &'a mut [T],
    tmp: Vec<T::A>,
    started: bool,
}

impl<'a, T: Elem> Reduce<'a, T> {
    fn new(out: &'a mut [T]) -> Self {
        let tmp = if T::IS_ACC {
            Vec::new()
        } else {
            vec![T::A::zero(); out.len()]
        };
        Self {
            out,
            tmp,
            started: false,
        }
    }

    /// The accumulator, and whether a previous block already wrote it.
    fn acc(&mut self) -> (&mut [T::A], bool) {
        let started = self.started;
        self.started = true;
        if T::IS_ACC {
            (T::as_acc_mut(self.out).expect("IS_ACC"), started)
        } else {
            (&mut self.tmp, started)
        }
    }

    /// Rounds into the output (zeros if no block contributed).
    fn finish(mut self) {
        if !self.started {
            let (a, _) = self.acc();
            a.fill(T::A::zero());
        }
        if !T::IS_ACC {
            self.out
                .par_chunks_mut(1 << 14)
                .zip(self.tmp.par_chunks(1 << 14))
                .for_each(|(o, i)| T::from_acc(i, o));
        }
    }
}

/// [`LoraBwd`]: the gradients in `need`, in the order `dx, dw, da, db, dbias`.
pub(super) fn backward<T: Elem>(
    k: &LoraBwd,
    cfg: &KernelConfig,
    ins: &Inputs<CpuStorage>,
) -> Result<Vec<CpuStorage>> {
    type A<T> = <T as Elem>::A;
    let (d, need) = (k.dims, k.need);
    let gm = Gemm::new(k.name, cfg)?;
    let kk = d.kk();
    let one = A::<T>::one();
    let dys = cpu::input::<T>(ins, 0)?;
    let xs = cpu::opt_input::<T>(ins, 1)?;
    let w = weight::<T>(ins, 2)?;
    let a = weight::<T>(ins, 3)?;
    let b = weight::<T>(ins, 4)?;
    let us = cpu::opt_input::<T>(ins, 5)?.filter(|_| need.db_ext(&d));
    let has_g = need.g(&d) && b.is_some();
    if ((need.dw || need.da) && xs.is_none())
        || (need.db_ext(&d) && us.is_none())
        || (has_g && need.dx && a.is_none())
    {
        fail!(
            k.name,
            "internal: an input the requested gradients need was not given"
        )
    }
    let (a_s, bs) = (a.as_deref().unwrap_or(&[]), b.as_deref().unwrap_or(&[]));
    let len = |on: bool, n: usize| if on { n } else { 0 };
    let mut dx_out = cpu::alloc::<T>(len(need.dx, d.m * d.k), cfg.poison);
    let mut dw_out = cpu::alloc::<T>(len(need.dw, d.n * d.k), cfg.poison);
    let mut da_out = cpu::alloc::<T>(len(need.da, d.r * d.k), cfg.poison);
    let mut dbext_out = cpu::alloc::<T>(len(need.db_ext(&d), d.n * kk), cfg.poison);
    {
        let mut dw_acc = Reduce::<T>::new(&mut dw_out);
        let mut da_acc = Reduce::<T>::new(&mut da_out);
        let mut db_acc = Reduce::<T>::new(&mut dbext_out);
        let (mut dybuf, mut xbuf, mut ubuf) = (Vec::new(), Vec::new(), Vec::new());
        let mut g: Vec<A<T>> = Vec::new();
        for (m0, m1) in blocks(d.m, block_rows::<T>(&cfg.cpu, d.m, d.k.max(d.n))) {
            let rows = m1 - m0;
            let dyb = acc(&dys[m0 * d.n..m1 * d.n], &mut dybuf);
            let xb = match xs {
                Some(x) if need.dw || need.da => acc(&x[m0 * d.k..m1 * d.k], &mut xbuf),
                _ => &[][..],
            };
            // g = s·dy·B (rows×r), needed by dx and dA.
            if has_g {
                g.clear();
                g.resize(rows * d.r, A::<T>::zero());
                // SAFETY: dy is rows×N, B is N×r.
                unsafe {
                    mm(
                        gm,
                        (rows, d.r, d.n),
                        &mut g,
                        d.r,
                        false,
                        mat(dyb, d.n, false),
                        mat(bs, d.r, false),
                        A::<T>::of(k.scale),
                    )
                };
            }
            if need.dx {
                with_acc::<T>(&mut dx_out[m0 * d.k..m1 * d.k], |dx| {
                    if has_g {
                        // SAFETY: g is rows×r, A is r×K, dx is rows×K.
                        unsafe {
                            mm(
                                gm,
                                (rows, d.k, d.r),
                                dx,
                                d.k,
                                false,
                                mat(&g, d.r, false),
                                mat(a_s, d.k, false),
                                one,
                            )
                        };
                    }
                    match &w {
                        // SAFETY: dy is rows×N, W is N×K.
                        Some(w) => unsafe {
                            mm(
                                gm,
                                (rows, d.k, d.n),
                                dx,
                                d.k,
                                has_g,
                                mat(dyb, d.n, false),
                                mat(w, d.k, false),
                                one,
                            )
                        },
                        None if !has_g => dx.fill(A::<T>::zero()),
                        None => {}
                    }
                });
            }
            if need.dw {
                let (dw, started) = dw_acc.acc();
                // SAFETY: dyᵀ is N×rows, x is rows×K, dW is N×K.
                unsafe {
                    mm(
                        gm,
                        (d.n, d.k, rows),
                        dw,
                        d.k,
                        started,
                        mat(dyb, d.n, true),
                        mat(xb, d.k, false),
                        one,
                    )
                };
            }
            if need.da && has_g {
                let (da, started) = da_acc.acc();
                // SAFETY: gᵀ is r×rows, x is rows×K, dA is r×K.
                unsafe {
                    mm(
                        gm,
                        (d.r, d.k, rows),
                        da,
                        d.k,
                        started,
                        mat(&g, d.r, true),
                        mat(xb, d.k, false),
                        one,
                    )
                };
            }
            if let Some(u) = us {
                let ub = acc(&u[m0 * kk..m1 * kk], &mut ubuf);
                let (db, started) = db_acc.acc();
                // SAFETY: dyᵀ is N×rows, u_ext is rows×kk, dB_ext is N×kk.
                unsafe {
                    mm(
                        gm,
                        (d.n, kk, rows),
                        db,
                        kk,
                        started,
                        mat(dyb, d.n, true),
                        mat(ub, kk, false),
                        one,
                    )
                };
            }
        }
        dw_acc.finish();
        da_acc.finish();
        db_acc.finish();
    }
    // dB_ext = [dB | dbias | 0..]: split into its parts.
    let mut out = Vec::new();
    for (on, v) in [(need.dx, dx_out), (need.dw, dw_out), (need.da, da_out)] {
        if on {
            out.push(T::to_cpu_storage_owned(v));
        }
    }
    if need.db && d.r > 0 {
        let mut db = cpu::alloc::<T>(d.n * d.r, cfg.poison);
        for (o, row) in db.chunks_exact_mut(d.r).zip(dbext_out.chunks_exact(kk)) {
            o.copy_from_slice(&row[..d.r]);
        }
        out.push(T::to_cpu_storage_owned(db));
    }
    if need.dbias {
        let dbias: Vec<T> = dbext_out.chunks_exact(kk).map(|row| row[d.r]).collect();
        out.push(T::to_cpu_storage_owned(dbias));
    }
    Ok(out)
}
