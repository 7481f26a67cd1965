//! CPU kernels for the LoRA linear: every product is one call of the `gemm` crate (the GEMM
//! behind Candle's CPU matmul), transposes expressed by strides, accumulations by its
//! `dst = α·dst + β·lhs·rhs` form. f32/f64 compute in place; f16/bf16 are widened to f32 once
//! and the results rounded once (f32 accumulation throughout).

use std::borrow::Cow;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, Layout, Result, Shape, WithDType};
use num_traits::{One, Zero};
use rayon::prelude::*;

use super::{Dims, LoraBwd, LoraFwd};
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

/// The data of a contiguous tensor, in the accumulation type (borrowed for f32/f64, widened
/// in parallel for half types).
fn widen<'a, T: Elem>(arg: &str, s: &'a CpuStorage, l: &Layout) -> Result<Cow<'a, [T::A]>> {
    let data: &[T] = cpu::slice(OP, arg, s, l)?;
    Ok(match T::as_acc(data) {
        Some(d) => Cow::Borrowed(d),
        None => {
            let mut out = vec![T::A::zero(); data.len()];
            out.par_chunks_mut(1 << 14)
                .zip(data.par_chunks(1 << 14))
                .for_each(|(o, i)| T::to_acc(i, o));
            Cow::Owned(out)
        }
    })
}

/// The data of a tensor held by the op (u_ext, the adapter), in the accumulation type.
fn widen_tensor<T: Elem>(arg: &str, t: &candle_core::Tensor) -> Result<Vec<T::A>> {
    let (st, l) = t.storage_and_layout();
    match &*st {
        candle_core::Storage::Cpu(s) => Ok(widen::<T>(arg, s, l)?.into_owned()),
        _ => fail!(OP, "{arg} is not on the CPU (internal)"),
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
        let xs = widen::<T>("x", x.0, x.1)?;
        let a_s = widen::<T>("a", a.0, a.1)?;
        let kk = d.kk();
        let mut u = cpu::alloc::<T>(d.m * kk);
        with_acc::<T>(&mut u, |u| {
            // SAFETY: x is M×K, A is r×K, u is M rows of kk >= r.
            unsafe {
                mm(
                    (d.m, d.r, d.k),
                    u,
                    kk,
                    false,
                    Mat::rows(&xs, d.k),
                    Mat::t(&a_s, d.k),
                    <T as Elem>::A::of(scale),
                )
            };
            if d.bias {
                for row in u.chunks_exact_mut(kk) {
                    row[d.r] = <T as Elem>::A::one();
                }
            }
        });
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
        let xs = widen::<T>("x", x.0, x.1)?;
        let ws = w.map(|(s, l)| widen::<T>("w", s, l)).transpose()?;
        let ads = adapter
            .map(|(s, l)| widen::<T>("adapter", s, l))
            .transpose()?;
        let us = match (&op.u, kk) {
            (Some(u), kk) if kk > 0 => Some(widen_tensor::<T>("u", u)?),
            _ => None,
        };
        let mut y = cpu::alloc::<T>(d.m * d.n);
        with_acc::<T>(&mut y, |y| {
            let one = <T as Elem>::A::one();
            let mut low = false;
            if let (Some(ad), Some(u)) = (&ads, &us) {
                let bext = &ad[d.r * d.k..];
                // SAFETY: u is M×kk, B_ext is N×kk, y is M×N.
                unsafe {
                    mm(
                        (d.m, d.n, kk),
                        y,
                        d.n,
                        false,
                        Mat::rows(u, kk),
                        Mat::t(bext, kk),
                        one,
                    )
                };
                low = true;
            }
            match &ws {
                // SAFETY: x is M×K, W is N×K.
                Some(ws) => unsafe {
                    mm(
                        (d.m, d.n, d.k),
                        y,
                        d.n,
                        low,
                        Mat::rows(&xs, d.k),
                        Mat::t(ws, d.k),
                        one,
                    )
                },
                None if !low => y.fill(<T as Elem>::A::zero()),
                None => {}
            }
        });
        Ok((storage(y), Shape::from((d.m, d.n))))
    })
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
        let dys = widen::<T>("dy", dy.0, dy.1)?;
        let xs = widen::<T>("x", x.0, x.1)?;
        let ws = w.map(|(s, l)| widen::<T>("w", s, l)).transpose()?;
        let ads = op
            .adapter
            .as_ref()
            .map(|t| widen_tensor::<T>("adapter", t))
            .transpose()?;
        let us = match (&op.u, kk) {
            (Some(u), kk) if kk > 0 => Some(widen_tensor::<T>("u", u)?),
            _ => None,
        };
        let (a_s, bext) = match &ads {
            Some(ad) => (&ad[..d.r * d.k], &ad[d.r * d.k..]),
            None => (&[][..], &[][..]),
        };
        // g = s·dy·B (M×r), needed by dx and dA.
        let g: Vec<A> = if d.r > 0 && (need.dx || need.da) {
            let mut g = vec![A::zero(); d.m * d.r];
            // SAFETY: dy is M×N, B is the first r columns of B_ext (N×kk), g is M×r.
            unsafe {
                mm(
                    (d.m, d.r, d.n),
                    &mut g,
                    d.r,
                    false,
                    Mat::rows(&dys, d.n),
                    Mat::rows(bext, kk),
                    A::of(op.scale),
                )
            };
            g
        } else {
            Vec::new()
        };
        let mut out = cpu::alloc::<T>(need.out_len(&d));
        let mut rest: &mut [T] = &mut out;
        if need.dx {
            let (dx, tail) = rest.split_at_mut(d.m * d.k);
            rest = tail;
            with_acc::<T>(dx, |dx| {
                let mut low = false;
                if d.r > 0 {
                    // SAFETY: g is M×r, A is r×K, dx is M×K.
                    unsafe {
                        mm(
                            (d.m, d.k, d.r),
                            dx,
                            d.k,
                            false,
                            Mat::rows(&g, d.r),
                            Mat::rows(a_s, d.k),
                            one,
                        )
                    };
                    low = true;
                }
                match &ws {
                    // SAFETY: dy is M×N, W is N×K.
                    Some(ws) => unsafe {
                        mm(
                            (d.m, d.k, d.n),
                            dx,
                            d.k,
                            low,
                            Mat::rows(&dys, d.n),
                            Mat::rows(ws, d.k),
                            one,
                        )
                    },
                    None if !low => dx.fill(A::zero()),
                    None => {}
                }
            });
        }
        if need.dw {
            let (dw, tail) = rest.split_at_mut(d.n * d.k);
            rest = tail;
            // SAFETY: dyᵀ is N×M, x is M×K, dW is N×K.
            with_acc::<T>(dw, |dw| unsafe {
                mm(
                    (d.n, d.k, d.m),
                    dw,
                    d.k,
                    false,
                    Mat::t(&dys, d.n),
                    Mat::rows(&xs, d.k),
                    one,
                )
            });
        }
        if need.da || need.db {
            let (da, db) = rest.split_at_mut(d.r * d.k);
            with_acc::<T>(da, |da| {
                if need.da {
                    // SAFETY: gᵀ is r×M, x is M×K, dA is r×K.
                    unsafe {
                        mm(
                            (d.r, d.k, d.m),
                            da,
                            d.k,
                            false,
                            Mat::t(&g, d.r),
                            Mat::rows(&xs, d.k),
                            one,
                        )
                    }
                } else {
                    da.fill(A::zero())
                }
            });
            with_acc::<T>(db, |db| match (&us, need.db) {
                // SAFETY: dyᵀ is N×M, u_ext is M×kk, dB_ext is N×kk.
                (Some(u), true) => unsafe {
                    mm(
                        (d.n, kk, d.m),
                        db,
                        kk,
                        false,
                        Mat::t(&dys, d.n),
                        Mat::rows(u, kk),
                        one,
                    )
                },
                _ => db.fill(A::zero()),
            });
        }
        let len = out.len();
        Ok((storage(out), Shape::from(len)))
    })
}
