//! CUDA glue for RMSNorm (kernels in `rms_norm.cu`), forward and backward; the backward also
//! serves add+RMSNorm (its fused-add input `d_sum`).

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::DeviceRepr;
use candle_core::cuda_backend::CudaDType;
use candle_core::{CudaStorage, Result};

use super::{RmsNormBwd, RmsNormFwd};
use crate::config::{DwColumns, KernelConfig};
use crate::cuda::{self, ptx, Args, Owned, Ptx, RowSpec};
use crate::seam::Inputs;

pub(crate) static PTX: Ptx = ptx!("rms_norm");

pub(super) fn forward<T: CudaDType + DeviceRepr>(
    k: &RmsNormFwd,
    cfg: &KernelConfig,
    ins: &Inputs<CudaStorage>,
) -> Result<Vec<CudaStorage>> {
    let op = ins.op();
    let (s, l) = ins.get(0)?;
    let dev = s.device();
    let stream = dev.cuda_stream();
    let (x, xo) = cuda::slice::<T>(op, "x", s, l)?;
    let w = ins
        .opt(1)
        .map(|(ws, wl)| cuda::slice::<T>(op, "weight", ws, wl))
        .transpose()?;
    let d = l.dims()[l.dims().len() - 1];
    let rows = l.shape().elem_count() / d;
    let mut y = cuda::alloc::<T>(dev, rows * d, cfg.poison)?;
    let mut ptrs = vec![(x, xo), (&y, 0)];
    ptrs.extend(w);
    let spec = RowSpec::new(rows, d, 1, 4, &ptrs, &stream);
    let prefix = format!("rms_fwd_{}", cuda::dtype_name(op, s.dtype())?);
    let plan = cuda::plan(op, dev, &PTX, &prefix, &spec)?;
    {
        let mut args = Args::new(&stream);
        args.input(x, xo);
        match w {
            Some((w, wo)) => args.input(w, wo),
            None => args.null(),
        };
        args.output(&mut y, 0).val(plan.geom).val(k.eps as f32);
        cuda::launch(&plan, &args)?;
    }
    Ok(vec![cuda::storage(y, dev)])
}

/// The backward kernel build: each thread owns at most `cols` columns (its dw accumulator in
/// registers) with at most `max_threads` threads (the kernel's `__launch_bounds__`), from
/// [`crate::config::RmsNormBwdConfig`]. `Auto` is 32 columns: measured faster overall on an
/// H200 (`results/gpu/kernel-probe-rms-bwd-2026-11-27.log`); the 32-column build held to 96
/// registers per thread (5 instead of 4 CTAs per SM on 4096-wide rows) was measured slower at
/// every shape (`results/gpu/kernel-probe-2026-11-27-softmax-rms.log`).
fn bwd_owned(cfg: &KernelConfig) -> Owned {
    match cfg.cuda.rms_norm_bwd.dw_columns {
        DwColumns::C16 => Owned {
            cols: 16,
            max_threads: 1024,
        },
        DwColumns::Auto | DwColumns::C32 => Owned {
            cols: 32,
            max_threads: 512,
        },
    }
}

/// Returns `dx` (shape of x, plus `d_sum` when given) and, with a weight, `dw` (`[D]`).
pub(super) fn backward<T: CudaDType + DeviceRepr>(
    k: &RmsNormBwd,
    cfg: &KernelConfig,
    ins: &Inputs<CudaStorage>,
) -> Result<Vec<CudaStorage>> {
    let op = ins.op();
    let (x0, xl) = ins.get(0)?;
    let (g0, gl) = ins.get(2)?;
    let dev = x0.device();
    let stream = dev.cuda_stream();
    let (xs, xo) = cuda::slice::<T>(op, "x", x0, xl)?;
    let (gs, go) = cuda::slice::<T>(op, "dy", g0, gl)?;
    let dres = ins
        .opt(3)
        .map(|(s, l)| cuda::slice::<T>(op, "d_sum", s, l))
        .transpose()?;
    let w = ins
        .opt(1)
        .map(|(ws, wl)| cuda::slice::<T>(op, "weight", ws, wl))
        .transpose()?;
    let dims = xl.dims();
    let d = dims[dims.len() - 1];
    let n = xl.shape().elem_count();
    let rows = n / d;
    let mut dx = cuda::alloc::<T>(dev, n, cfg.poison)?;
    let mut ptrs = vec![(xs, xo), (gs, go), (&dx, 0)];
    ptrs.extend(dres);
    ptrs.extend(w);
    let owned = bwd_owned(cfg);
    let spec = RowSpec {
        persistent: w.is_some(),
        // Each thread owns a fixed set of columns (the dw accumulator in registers): the
        // kernel's COLS and __launch_bounds__.
        owned: Some(owned),
        ..RowSpec::new(rows, d, 2, 16, &ptrs, &stream)
    };
    let dt = cuda::dtype_name(op, x0.dtype())?;
    let eps = k.eps;
    let plan = cuda::plan(op, dev, &PTX, &format!("rms_bwd{}_{dt}", owned.cols), &spec)?;
    let mut part = if w.is_some() {
        Some(cuda::alloc::<f32>(
            dev,
            plan.clusters as usize * d,
            cfg.poison,
        )?)
    } else {
        None
    };
    {
        let mut args = Args::new(&stream);
        args.input(xs, xo).input(gs, go);
        match dres {
            Some((s, o)) => args.input(s, o),
            None => args.null(),
        };
        match w {
            Some((w, wo)) => args.input(w, wo),
            None => args.null(),
        };
        args.output(&mut dx, 0);
        match part.as_mut() {
            Some(p) => args.output(p, 0),
            None => args.null(),
        };
        args.val(plan.geom).val(eps);
        cuda::launch(&plan, &args)?;
    }
    let dw = match part.as_ref() {
        Some(p) => {
            let mut dw = cuda::alloc::<T>(dev, d, cfg.poison)?;
            {
                let mut args = Args::new(&stream);
                args.input(p, 0)
                    .val(plan.clusters as i64)
                    .val(d as i64)
                    .output(&mut dw, 0);
                let block = 256u32;
                let grid = d.div_ceil(block as usize).min(65535) as u32;
                cuda::launch_simple(dev, &PTX, &format!("dw_reduce_{dt}"), grid, block, &args)?;
            }
            Some(cuda::storage(dw, dev))
        }
        None => None,
    };
    let mut out = vec![cuda::storage(dx, dev)];
    out.extend(dw);
    Ok(out)
}
