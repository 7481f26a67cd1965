//! CPU kernel for add+RMSNorm: per row, `sum = x + residual` is formed once (in the
//! accumulation type), reduced and normalized while it is in cache; both outputs are written
//! once. The backward is RMSNorm's (`rms_norm::cpu::backward` in fused-add mode).

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, Layout, Result, Shape};

use crate::cpu::{self, dispatch, Acc, Elem};
use crate::ops::rms_norm::cpu::{rstd, write_row};

const OP: &str = "add_rms_norm";

type Arg<'a> = (&'a CpuStorage, &'a Layout);

pub(super) fn forward(eps: f64, x: Arg, r: Arg, w: Arg) -> Result<(CpuStorage, Shape)> {
    dispatch!(OP, x.0.dtype(), |T| forward_t::<T>(eps, x, r, w))
}

fn forward_t<T: Elem>(eps: f64, x: Arg, r: Arg, w: Arg) -> Result<(CpuStorage, Shape)> {
    let xs = cpu::slice::<T>(OP, "x", x.0, x.1)?;
    let rs = cpu::slice::<T>(OP, "residual", r.0, r.1)?;
    let w = cpu::to_acc_vec(cpu::slice::<T>(OP, "weight", w.0, w.1)?);
    let dims = x.1.dims();
    let d = dims[dims.len() - 1];
    let eps = T::A::of(eps);
    let n = xs.len();
    let mut out = cpu::alloc::<T>(2 * n);
    let (normed, sum) = out.split_at_mut(n);
    cpu::rows([xs, rs], [normed, sum], d, 0, |_, [x, res], [y, s], _| {
        for ((sv, &a), &b) in s.iter_mut().zip(x).zip(res) {
            *sv = a + b;
        }
        write_row(s, rstd(s, eps), Some(&w), y);
    });
    let mut packed_dims = vec![2];
    packed_dims.extend_from_slice(dims);
    Ok((T::to_cpu_storage_owned(out), Shape::from(packed_dims)))
}
