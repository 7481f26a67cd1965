//! CPU kernels for the LoRA linear: every product is one call of the `gemm` crate (the GEMM
//! behind Candle's CPU matmul), transposes expressed by strides, accumulations by its
//! `dst = α·dst + β·lhs·rhs` form. f32/f64 compute in place on all rows at once. f16/bf16 run
//! in blocks of rows: a block of the activations (x, dy, u) is widened to f32, computed, and the
//! block's results rounded once; the reductions over rows (dW, dA, dB, dbias) accumulate in
//! f32 across blocks. So half types accumulate in f32 throughout and the temporaries stay a
//! block of rows (never `M×N`); the weights are widened once (parameter-sized).

use std::borrow::Cow;
use std::sync::atomic::{AtomicUsize, Ordering};

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, Layout, Result, Shape, WithDType};
use num_traits::{One, Zero};
use rayon::prelude::*;

use super::op::{Dims, LoraBwd, LoraFwd};
use crate::cpu::{self, dispatch, Acc, Elem};
use crate::validate::fail;

const OP: &str = "lora_linear";

/// A row-major view for the GEMM: element `(i, j)` at `ptr + i·rs + j·cs`.
#[derive(Clone, Copy)]
struct Mat<A> {
    ptr: *const A,
    rs: isize,
    cs: isize,
}

impl<A> Mat<A> {
    /// A contiguous `rows × cols` matrix with row length `ld`.
    fn rows(s: &[A], ld: usize) -> Self {
        Self {
            ptr: s.as_ptr(),
            rs: ld as isize,
            cs: 1,
        }
    }

    /// The transpose of `Mat::rows(s, ld)`.
    fn t(s: &[A], ld: usize) -> Self {
        Self {
            ptr: s.as_ptr(),
            rs: 1,
            cs: ld as isize,
        }
    }
}

fn parallelism() -> gemm::Parallelism {
    let n = candle_core::utils::get_num_threads();
    if n > 1 {
        gemm::Parallelism::Rayon(n)
    } else {
        gemm::Parallelism::None
    }
}

/// `dst (m×n, row length ldd) = [dst +] beta·lhs (m×k)·rhs (k×n)`.
///
/// # Safety
/// The views must cover `m×k` and `k×n` elements inside live slices, `dst` `m` rows of
/// `ldd >= n` elements.
unsafe fn mm<A: Acc>(
    (m, n, k): (usize, usize, usize),
    dst: &mut [A],
    ldd: usize,
    accumulate: bool,
    lhs: Mat<A>,
    rhs: Mat<A>,
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
    gemm::gemm(
        m,
        n,
        k,
        dst.as_mut_ptr(),
        1,
        ldd as isize,
        accumulate,
        lhs.ptr,
        lhs.cs,
        lhs.rs,
        rhs.ptr,
        rhs.cs,
        rhs.rs,
        A::one(),
        beta,
        false,
        false,
        false,
        parallelism(),
    )
}

/// The contiguous data of a storage argument.
fn data<'a, T: Elem>(arg: &str, s: &'a CpuStorage, l: &Layout) -> Result<&'a [T]> {
    cpu::slice(OP, arg, s, l)
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

/// A weight (parameter-sized) in the accumulation type.
fn widen_weight<'a, T: Elem>(arg: &str, s: &'a CpuStorage, l: &Layout) -> Result<Cow<'a, [T::A]>> {
    let d = data::<T>(arg, s, l)?;
    Ok(match T::as_acc(d) {
        Some(x) => Cow::Borrowed(x),
        None => {
            let mut v = Vec::new();
            widen_into(d, &mut v);
            Cow::Owned(v)
        }
    })
}

/// Runs `f` with the CPU data of a tensor the op holds (u_ext, the adapter).
fn with_held<T: Elem, R>(
    arg: &str,
    t: &candle_core::Tensor,
    f: impl FnOnce(&[T]) -> Result<R>,
) -> Result<R> {
    let (st, l) = t.storage_and_layout();
    match &*st {
        candle_core::Storage::Cpu(s) => f(data::<T>(arg, s, l)?),
        _ => fail!(OP, "{arg} is not on the CPU (internal)"),
    }
}

fn with_held_opt<T: Elem, R>(
    arg: &str,
    t: Option<&candle_core::Tensor>,
    f: impl FnOnce(Option<&[T]>) -> Result<R>,
) -> Result<R> {
    match t {
        Some(t) => with_held::<T, R>(arg, t, |d| f(Some(d))),
        None => f(None),
    }
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

static BLOCK_ELEMS: AtomicUsize = AtomicUsize::new(1 << 20);

/// Sets the size (in elements of the widest activation row times rows) of the row blocks the
/// half-type CPU path widens at a time (default 2^20). For tests: small blocks exercise the
/// accumulation across blocks on small shapes.
#[doc(hidden)]
pub fn set_block_elems(n: usize) {
    BLOCK_ELEMS.store(n.max(1), Ordering::Relaxed)
}

/// Rows per block: all of them for f32/f64 (no copies), about `BLOCK_ELEMS` widened elements
/// of the widest activation row for half types.
fn block_rows<T: Elem>(m: usize, width: usize) -> usize {
    if T::IS_ACC {
        m.max(1)
    } else {
        (BLOCK_ELEMS.load(Ordering::Relaxed) / width.max(1)).clamp(1, m.max(1))
    }
}

/// The row blocks `[m0, m1)`.
fn blocks(m: usize, rows: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..m.div_ceil(rows)).map(move |b| (b * rows, ((b + 1) * rows).min(m)))
}

fn storage<T: WithDType>(v: Vec<T>) -> CpuStorage {
    T::to_cpu_storage_owned(v)
}

/// `u_ext = [s·x·Aᵀ | 1]`, `M × kk`.
pub(crate) fn down(
    d: &Dims,
    scale: f64,
    x: (&CpuStorage, &Layout),
    a: (&CpuStorage, &Layout),
) -> Result<(CpuStorage, Shape)> {
    dispatch!(OP, x.0.dtype(), |T| {
        type A = <T as Elem>::A;
        let xs = data::<T>("x", x.0, x.1)?;
        let a_s = widen_weight::<T>("a", a.0, a.1)?;
        let kk = d.kk();
        let mut u = cpu::alloc::<T>(d.m * kk, crate::poison::poison_enabled());
        let mut xbuf = Vec::new();
        for (m0, m1) in blocks(d.m, block_rows::<T>(d.m, d.k)) {
            let xb = acc(&xs[m0 * d.k..m1 * d.k], &mut xbuf);
            with_acc::<T>(&mut u[m0 * kk..m1 * kk], |u| {
                // SAFETY: xb is (m1-m0)×K, A is r×K, u is (m1-m0) rows of kk >= r.
                unsafe {
                    mm(
                        (m1 - m0, d.r, d.k),
                        u,
                        kk,
                        false,
                        Mat::rows(xb, d.k),
                        Mat::t(&a_s, d.k),
                        A::of(scale),
                    )
                };
                for row in u.chunks_exact_mut(kk) {
                    row[d.r..].fill(A::zero());
                    if d.bias {
                        row[d.r] = A::one();
                    }
                }
            });
        }
        Ok((storage(u), Shape::from((d.m, kk))))
    })
}

/// `y = x·Wᵀ + u_ext·B_extᵀ` (low-rank term first, then the base GEMM accumulates onto it).
pub(crate) fn forward(
    op: &LoraFwd,
    x: (&CpuStorage, &Layout),
    w: Option<(&CpuStorage, &Layout)>,
    adapter: Option<(&CpuStorage, &Layout)>,
) -> Result<(CpuStorage, Shape)> {
    let d = op.dims;
    let kk = d.kk();
    dispatch!(OP, x.0.dtype(), |T| {
        type A = <T as Elem>::A;
        let xs = data::<T>("x", x.0, x.1)?;
        let ws = w.map(|(s, l)| widen_weight::<T>("w", s, l)).transpose()?;
        let ads = adapter
            .map(|(s, l)| widen_weight::<T>("adapter", s, l))
            .transpose()?;
        let u_held = if kk > 0 { op.u.as_ref() } else { None };
        let mut y = cpu::alloc::<T>(d.m * d.n, crate::poison::poison_enabled());
        with_held_opt::<T, _>("u", u_held, |us| {
            let (mut xbuf, mut ubuf) = (Vec::new(), Vec::new());
            for (m0, m1) in blocks(d.m, block_rows::<T>(d.m, d.k.max(d.n))) {
                let rows = m1 - m0;
                let xb = acc(&xs[m0 * d.k..m1 * d.k], &mut xbuf);
                let ub = us.map(|u| acc(&u[m0 * kk..m1 * kk], &mut ubuf));
                with_acc::<T>(&mut y[m0 * d.n..m1 * d.n], |y| {
                    let mut low = false;
                    if let (Some(ad), Some(u)) = (&ads, ub) {
                        let bext = &ad[d.a_len()..];
                        // SAFETY: u is rows×kk, B_ext is N×kk, y is rows×N.
                        unsafe {
                            mm(
                                (rows, d.n, kk),
                                y,
                                d.n,
                                false,
                                Mat::rows(u, kk),
                                Mat::t(bext, kk),
                                A::one(),
                            )
                        };
                        low = true;
                    }
                    match &ws {
                        // SAFETY: x is rows×K, W is N×K.
                        Some(ws) => unsafe {
                            mm(
                                (rows, d.n, d.k),
                                y,
                                d.n,
                                low,
                                Mat::rows(xb, d.k),
                                Mat::t(ws, d.k),
                                A::one(),
                            )
                        },
                        None if !low => y.fill(A::zero()),
                        None => {}
                    }
                });
            }
            Ok(())
        })?;
        Ok((storage(y), Shape::from((d.m, d.n))))
    })
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

/// The flat `[dx | dW | dA | dB_ext]` of the parts in `op.need`.
pub(crate) fn backward(
    op: &LoraBwd,
    dy: (&CpuStorage, &Layout),
    x: (&CpuStorage, &Layout),
    w: Option<(&CpuStorage, &Layout)>,
) -> Result<(CpuStorage, Shape)> {
    let d = op.dims;
    let need = op.need;
    let kk = d.kk();
    dispatch!(OP, x.0.dtype(), |T| {
        type A = <T as Elem>::A;
        let one = A::one();
        let dys = data::<T>("dy", dy.0, dy.1)?;
        let xs = data::<T>("x", x.0, x.1)?;
        let ws = w.map(|(s, l)| widen_weight::<T>("w", s, l)).transpose()?;
        let ads: Option<Vec<A>> = with_held_opt::<T, _>("adapter", op.adapter.as_ref(), |a| {
            Ok(a.map(|a| {
                let mut v = Vec::new();
                widen_into(a, &mut v);
                v
            }))
        })?;
        let (a_s, bext) = match &ads {
            Some(ad) => (&ad[..d.r * d.k], &ad[d.a_len()..]),
            None => (&[][..], &[][..]),
        };
        let has_g = d.r > 0 && (need.dx || need.da) && ads.is_some();
        let u_held = if kk > 0 && need.db {
            op.u.as_ref()
        } else {
            None
        };
        let mut out = cpu::alloc::<T>(need.out_len(&d), crate::poison::poison_enabled());
        {
            let rest: &mut [T] = &mut out;
            let (dx_out, rest) = rest.split_at_mut(if need.dx { d.m * d.k } else { 0 });
            let (dw_out, rest) = rest.split_at_mut(if need.dw { d.n * d.k } else { 0 });
            let adapter_len = if need.da || need.db {
                d.adapter_len()
            } else {
                0
            };
            let (da_out, db_out) =
                rest[..adapter_len].split_at_mut(if adapter_len > 0 { d.a_len() } else { 0 });
            // dA is the first r·K elements of its part; the padding's gradient is zero.
            let (da_out, da_pad) = da_out.split_at_mut(if adapter_len > 0 { d.r * d.k } else { 0 });
            da_pad.fill(T::zero());
            let mut dw_acc = Reduce::<T>::new(dw_out);
            let mut da_acc = Reduce::<T>::new(da_out);
            let mut db_acc = Reduce::<T>::new(db_out);
            with_held_opt::<T, _>("u", u_held, |us| {
                let (mut dybuf, mut xbuf, mut ubuf) = (Vec::new(), Vec::new(), Vec::new());
                let mut g: Vec<A> = Vec::new();
                for (m0, m1) in blocks(d.m, block_rows::<T>(d.m, d.k.max(d.n))) {
                    let rows = m1 - m0;
                    let dyb = acc(&dys[m0 * d.n..m1 * d.n], &mut dybuf);
                    let xb = if need.dw || need.da {
                        acc(&xs[m0 * d.k..m1 * d.k], &mut xbuf)
                    } else {
                        &[][..]
                    };
                    // g = s·dy·B (rows×r), needed by dx and dA.
                    if has_g {
                        g.clear();
                        g.resize(rows * d.r, A::zero());
                        // SAFETY: dy is rows×N, B the first r columns of B_ext (N×kk).
                        unsafe {
                            mm(
                                (rows, d.r, d.n),
                                &mut g,
                                d.r,
                                false,
                                Mat::rows(dyb, d.n),
                                Mat::rows(bext, kk),
                                A::of(op.scale),
                            )
                        };
                    }
                    if need.dx {
                        with_acc::<T>(&mut dx_out[m0 * d.k..m1 * d.k], |dx| {
                            if has_g {
                                // SAFETY: g is rows×r, A is r×K, dx is rows×K.
                                unsafe {
                                    mm(
                                        (rows, d.k, d.r),
                                        dx,
                                        d.k,
                                        false,
                                        Mat::rows(&g, d.r),
                                        Mat::rows(a_s, d.k),
                                        one,
                                    )
                                };
                            }
                            match &ws {
                                // SAFETY: dy is rows×N, W is N×K.
                                Some(ws) => unsafe {
                                    mm(
                                        (rows, d.k, d.n),
                                        dx,
                                        d.k,
                                        has_g,
                                        Mat::rows(dyb, d.n),
                                        Mat::rows(ws, d.k),
                                        one,
                                    )
                                },
                                None if !has_g => dx.fill(A::zero()),
                                None => {}
                            }
                        });
                    }
                    if need.dw {
                        let (dw, started) = dw_acc.acc();
                        // SAFETY: dyᵀ is N×rows, x is rows×K, dW is N×K.
                        unsafe {
                            mm(
                                (d.n, d.k, rows),
                                dw,
                                d.k,
                                started,
                                Mat::t(dyb, d.n),
                                Mat::rows(xb, d.k),
                                one,
                            )
                        };
                    }
                    if need.da && has_g {
                        let (da, started) = da_acc.acc();
                        // SAFETY: gᵀ is r×rows, x is rows×K, dA is r×K.
                        unsafe {
                            mm(
                                (d.r, d.k, rows),
                                da,
                                d.k,
                                started,
                                Mat::t(&g, d.r),
                                Mat::rows(xb, d.k),
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
                                (d.n, kk, rows),
                                db,
                                kk,
                                started,
                                Mat::t(dyb, d.n),
                                Mat::rows(ub, kk),
                                one,
                            )
                        };
                    }
                }
                Ok(())
            })?;
            dw_acc.finish();
            da_acc.finish();
            db_acc.finish();
        }
        let len = out.len();
        Ok((storage(out), Shape::from(len)))
    })
}
