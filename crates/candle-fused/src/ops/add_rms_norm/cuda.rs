//! CUDA glue for add+RMSNorm's forward (kernel in `add_rms_norm.cu`); its backward is
//! RMSNorm's in fused-add mode.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::DeviceRepr;
use candle_core::cuda_backend::CudaDType;
use candle_core::{CudaStorage, Result};

use super::AddRmsNormFwd;
use crate::config::KernelConfig;
use crate::cuda::{self, ptx, Args, Ptx, RowSpec};
use crate::seam::Inputs;

static PTX: Ptx = ptx!("add_rms_norm");

/// Returns `[normed, sum]`, each of x's shape.
pub(super) fn forward<T: CudaDType + DeviceRepr>(
    k: &AddRmsNormFwd,
    cfg: &KernelConfig,
    ins: &Inputs<CudaStorage>,
) -> Result<Vec<CudaStorage>> {
    let eps = k.eps;
    let op = ins.op();
    let (x0, xl) = ins.get(0)?;
    let (r0, rl) = ins.get(1)?;
    let (w0, wl) = ins.get(2)?;
    let dev = x0.device();
    let stream = dev.cuda_stream();
    let (xs, xo) = cuda::slice::<T>(op, "x", x0, xl)?;
    let (rs, ro) = cuda::slice::<T>(op, "residual", r0, rl)?;
    let (ws, wo) = cuda::slice::<T>(op, "weight", w0, wl)?;
    let dims = xl.dims();
    let d = dims[dims.len() - 1];
    let n = xl.shape().elem_count();
    let rows = n / d;
    let mut normed = cuda::alloc::<T>(dev, n, cfg.poison)?;
    let mut sum = cuda::alloc::<T>(dev, n, cfg.poison)?;
    let ptrs = [(xs, xo), (rs, ro), (ws, wo), (&normed, 0), (&sum, 0)];
    let spec = RowSpec::new(rows, d, 2, 4, &ptrs, &stream);
    let prefix = format!("add_rms_fwd_{}", cuda::dtype_name(op, x0.dtype())?);
    let plan = cuda::plan(op, dev, &PTX, &prefix, &spec)?;
    {
        let mut args = Args::new(&stream);
        args.input(xs, xo)
            .input(rs, ro)
            .input(ws, wo)
            .output(&mut normed, 0)
            .output(&mut sum, 0)
            .val(plan.geom)
            .val(eps as f32);
        cuda::launch(&plan, &args)?;
    }
    Ok(vec![cuda::storage(normed, dev), cuda::storage(sum, dev)])
}
