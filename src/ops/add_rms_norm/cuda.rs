//! CUDA glue for add+RMSNorm's forward (kernel in `add_rms_norm.cu`); its backward is
//! RMSNorm's in fused-add mode.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::DeviceRepr;
use candle_core::cuda_backend::CudaDType;
use candle_core::{CudaStorage, Layout, Result, Shape};

use crate::cuda::{self, dispatch, ptx, Args, Ptx, RowSpec};

const OP: &str = "add_rms_norm";
static PTX: Ptx = ptx!("add_rms_norm");

type Arg<'a> = (&'a CudaStorage, &'a Layout);

pub(super) fn forward(eps: f64, x: Arg, r: Arg, w: Arg) -> Result<(CudaStorage, Shape)> {
    dispatch!(OP, x.0.dtype(), |T| forward_t::<T>(eps, x, r, w))
}

fn forward_t<T: CudaDType + DeviceRepr>(
    eps: f64,
    x: Arg,
    r: Arg,
    w: Arg,
) -> Result<(CudaStorage, Shape)> {
    let dev = x.0.device();
    let stream = dev.cuda_stream();
    let (xs, xo) = cuda::slice::<T>(OP, "x", x.0, x.1)?;
    let (rs, ro) = cuda::slice::<T>(OP, "residual", r.0, r.1)?;
    let (ws, wo) = cuda::slice::<T>(OP, "weight", w.0, w.1)?;
    let dims = x.1.dims();
    let d = dims[dims.len() - 1];
    let n = x.1.shape().elem_count();
    let rows = n / d;
    let mut out = cuda::alloc::<T>(dev, 2 * n)?;
    let vec = 16 / std::mem::size_of::<T>();
    let vec_ok = d % vec == 0
        && cuda::aligned16(xs, xo, &stream)
        && cuda::aligned16(rs, ro, &stream)
        && cuda::aligned16(ws, wo, &stream)
        && cuda::aligned16(&out, n, &stream)
        && cuda::aligned16(&out, 0, &stream);
    let spec = RowSpec {
        rows,
        d,
        elem: std::mem::size_of::<T>(),
        nin: 2,
        extra_per_col: 0,
        red: 4,
        vec_ok,
        persistent: false,
    };
    let prefix = format!("add_rms_fwd_{}", cuda::dtype_name(OP, x.0.dtype())?);
    let plan = cuda::plan(OP, dev, &PTX, &prefix, &spec)?;
    {
        let mut args = Args::new(&stream);
        args.input(xs, xo)
            .input(rs, ro)
            .input(ws, wo)
            .outputs(&mut out, &[0, n])
            .val(plan.geom)
            .val(eps as f32);
        cuda::launch(&plan, &args)?;
    }
    let mut packed = vec![2];
    packed.extend_from_slice(dims);
    Ok((cuda::storage(out, dev), Shape::from(packed)))
}
