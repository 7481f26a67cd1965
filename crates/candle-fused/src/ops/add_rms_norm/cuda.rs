//! CUDA glue for add+RMSNorm's forward (kernel in `add_rms_norm.cu`); its backward is
//! RMSNorm's in fused-add mode.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::DeviceRepr;
use candle_core::cuda_backend::CudaDType;
use candle_core::{CudaStorage, Layout, Result};

use crate::cuda::{self, dispatch, ptx, Args, Ptx, RowSpec};

const OP: &str = "add_rms_norm";
static PTX: Ptx = ptx!("add_rms_norm");

type Arg<'a> = (&'a CudaStorage, &'a Layout);

/// Returns `(normed, sum)`, each of x's shape.
pub(super) fn forward(eps: f64, x: Arg, r: Arg, w: Arg) -> Result<(CudaStorage, CudaStorage)> {
    dispatch!(OP, x.0.dtype(), |T| forward_t::<T>(eps, x, r, w))
}

fn forward_t<T: CudaDType + DeviceRepr>(
    eps: f64,
    x: Arg,
    r: Arg,
    w: Arg,
) -> Result<(CudaStorage, CudaStorage)> {
    let dev = x.0.device();
    let stream = dev.cuda_stream();
    let (xs, xo) = cuda::slice::<T>(OP, "x", x.0, x.1)?;
    let (rs, ro) = cuda::slice::<T>(OP, "residual", r.0, r.1)?;
    let (ws, wo) = cuda::slice::<T>(OP, "weight", w.0, w.1)?;
    let dims = x.1.dims();
    let d = dims[dims.len() - 1];
    let n = x.1.shape().elem_count();
    let rows = n / d;
    let mut normed = cuda::alloc::<T>(dev, n)?;
    let mut sum = cuda::alloc::<T>(dev, n)?;
    let vec = 16 / std::mem::size_of::<T>();
    let vec_ok = d % vec == 0
        && cuda::aligned16(xs, xo, &stream)
        && cuda::aligned16(rs, ro, &stream)
        && cuda::aligned16(ws, wo, &stream)
        && cuda::aligned16(&normed, 0, &stream)
        && cuda::aligned16(&sum, 0, &stream);
    let spec = RowSpec {
        rows,
        d,
        elem: std::mem::size_of::<T>(),
        nin: 2,
        extra_per_col: 0,
        red: 4,
        vec_ok,
        persistent: false,
        owned: None,
    };
    let prefix = format!("add_rms_fwd_{}", cuda::dtype_name(OP, x.0.dtype())?);
    let plan = cuda::plan(OP, dev, &PTX, &prefix, &spec)?;
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
    Ok((cuda::storage(normed, dev), cuda::storage(sum, dev)))
}
