//! CPU kernel for add+RMSNorm: per row, `sum = x + residual` is formed once (in the
//! accumulation type), reduced and normalized while it is in cache; both outputs are written
//! once. The backward is RMSNorm's (`rms_norm::cpu::backward` in fused-add mode).

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, Layout, Result};

use crate::cpu::{self, dispatch, Acc, Elem};
use crate::ops::rms_norm::cpu::{rstd, write_row};

const OP: &str = "add_rms_norm";

type Arg<'a> = (&'a CpuStorage, &'a Layout);

/// Returns `(normed, sum)`, each of x's shape.
pub(super) fn forward(eps: f64, x: Arg, r: Arg, w: Arg) -> Result<(CpuStorage, CpuStorage)> {
    dispatch!(OP, x.0.dtype(), |T| forward_t::<T>(eps, x, r, w))
}

fn forward_t<T: Elem>(eps: f64, x: Arg, r: Arg, w: Arg) -> Result<(CpuStorage, CpuStorage)> {
    let xs = cpu::slice::<T>(OP, "x", x.0, x.1)?;
    let rs = cpu::slice::<T>(OP, "residual", r.0, r.1)?;
    let w = cpu::to_acc_vec(cpu::slice::<T>(OP, "weight", w.0, w.1)?);
    let dims = x.1.dims();
    let d = dims[dims.len() - 1];
    let eps = T::A::of(eps);
    let n = xs.len();
    let mut normed = cpu::alloc::<T>(n);
    let mut sum = cpu::alloc::<T>(n);
    cpu::rows(
        [xs, rs],
        [&mut normed, &mut sum],
        d,
        0,
        |_, [x, res], [y, s], _| {
            for ((sv, &a), &b) in s.iter_mut().zip(x).zip(res) {
                *sv = a + b;
            }
            write_row(s, rstd(s, eps), Some(&w), y);
        },
    );
    Ok((
        T::to_cpu_storage_owned(normed),
        T::to_cpu_storage_owned(sum),
    ))
}
