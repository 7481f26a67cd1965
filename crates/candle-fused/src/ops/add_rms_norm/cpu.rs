//! CPU kernel for add+RMSNorm: per row, `sum = x + residual` is formed once (in the
//! accumulation type), reduced and normalized while it is in cache; both outputs are written
//! once. The backward is RMSNorm's (`rms_norm::cpu::backward` in fused-add mode).

use candle_core::{CpuStorage, Result};

use super::AddRmsNormFwd;
use crate::config::KernelConfig;
use crate::cpu::{self, Acc, Elem};
use crate::ops::rms_norm::cpu::{rstd, write_row};
use crate::seam::Inputs;
use crate::simd::Isa;

/// Returns `[normed, sum]`, each of x's shape.
pub(super) fn forward<T: Elem>(
    k: &AddRmsNormFwd,
    cfg: &KernelConfig,
    ins: &Inputs<CpuStorage>,
) -> Result<Vec<CpuStorage>> {
    let eps = k.eps;
    let op = ins.op();
    let (x0, xl) = ins.get(0)?;
    let (r0, rl) = ins.get(1)?;
    let (w0, wl) = ins.get(2)?;
    let xs = cpu::slice::<T>(op, "x", x0, xl)?;
    let rs = cpu::slice::<T>(op, "residual", r0, rl)?;
    let w = cpu::to_acc_vec(cpu::slice::<T>(op, "weight", w0, wl)?);
    let dims = xl.dims();
    let d = dims[dims.len() - 1];
    let eps = T::A::of(eps);
    let n = xs.len();
    let mut normed = cpu::OutBuf::<T>::new(n, cfg.poison);
    let mut sum = cpu::OutBuf::<T>::new(n, cfg.poison);
    let isa = Isa::new(op, cfg.cpu.simd)?;
    cpu::rows_at(
        &cfg.cpu,
        isa,
        [xs, rs],
        [&mut normed, &mut sum],
        d,
        0,
        |_, [x, res], [y, s], _| {
            T::A::v_add(isa, x, res, s);
            write_row(isa, s, rstd(isa, s, eps), Some(&w), y);
        },
    );
    Ok(vec![
        T::to_cpu_storage_owned(normed.into_vec()),
        T::to_cpu_storage_owned(sum.into_vec()),
    ])
}
