//! CPU kernel of the linear cross-entropy's weight gradient: `dw += dlogitsᵀ·h` for one chunk,
//! one call of the `gemm` crate accumulating into the f32 (f64) accumulator (`dst += lhs·rhs`,
//! the transpose by strides); half inputs are widened to f32 first (one chunk's worth).
//! (The logits and `dh` GEMMs go through [`crate::ops::matmul`], which calls the same crate.)

use std::borrow::Cow;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, Layout, Result};
use num_traits::One;

use super::DwAccum;
use crate::config::KernelConfig;
use crate::cpu::{self, dispatch, Elem};
use crate::ops::cross_entropy::cpu::{dst_slice, SliceMut};
use crate::seam::Inputs;
use crate::validate::fail;

fn parallelism() -> gemm::Parallelism {
    let n = candle_core::utils::get_num_threads();
    if n > 1 {
        gemm::Parallelism::Rayon(n)
    } else {
        gemm::Parallelism::None
    }
}

/// `s` in the accumulation type (borrowed for f32/f64).
fn widen<T: Elem>(s: &[T]) -> Cow<'_, [T::A]> {
    match T::as_acc(s) {
        Some(a) => Cow::Borrowed(a),
        None => Cow::Owned(cpu::to_acc_vec(s)),
    }
}

pub(crate) fn dw_accum(
    _: &DwAccum,
    _: &KernelConfig,
    (ds, dl): (&mut CpuStorage, &Layout),
    ins: &Inputs<CpuStorage>,
) -> Result<Vec<CpuStorage>> {
    let (gs, _) = ins.get(0)?;
    dispatch!(ins.op(), gs.dtype(), |T| dw_accum_t::<T>(ds, dl, ins))
}

fn dw_accum_t<T: Elem>(
    ds: &mut CpuStorage,
    dl: &Layout,
    ins: &Inputs<CpuStorage>,
) -> Result<Vec<CpuStorage>>
where
    T::A: SliceMut,
{
    let op = ins.op();
    let (gs, gl) = ins.get(0)?;
    let (hs, hl) = ins.get(1)?;
    let g = cpu::slice::<T>(op, "dlogits", gs, gl)?;
    let h = cpu::slice::<T>(op, "h", hs, hl)?;
    let (c, v) = (gl.dims()[0], gl.dims()[1]);
    let hd = hl.dims()[1];
    if hl.dims()[0] != c || dl.dims() != [v, hd] {
        fail!(
            op,
            "internal: dw accumulation shapes {:?} += {:?}ᵀ·{:?}",
            dl.dims(),
            gl.dims(),
            hl.dims()
        )
    }
    let dst = dst_slice::<T::A>(op, "dw", ds, dl)?;
    let (g, h) = (widen(g), widen(h));
    if c == 0 || v == 0 || hd == 0 {
        return Ok(vec![]);
    }
    // dst[V, H] += gᵀ (element (i, k) = g[k·V + i]) · h (element (k, j) = h[k·H + j]).
    // SAFETY: dst holds V·H elements, g C·V and h C·H; the strides stay inside them.
    unsafe {
        gemm::gemm(
            v,
            hd,
            c,
            dst.as_mut_ptr(),
            1,
            hd as isize,
            true,
            g.as_ptr(),
            v as isize,
            1,
            h.as_ptr(),
            1,
            hd as isize,
            T::A::one(),
            T::A::one(),
            false,
            false,
            false,
            parallelism(),
        );
    }
    Ok(vec![])
}
