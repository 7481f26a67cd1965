//! CUDA glue for RMSNorm (kernels in `rms_norm.cu`), forward and backward; the backward also
//! serves add+RMSNorm (fused-add mode of [`BwdArgs`]).

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::DeviceRepr;
use candle_core::cuda_backend::CudaDType;
use candle_core::{CudaStorage, Layout, Result, Shape};

use super::BwdArgs;
use crate::cuda::{self, dispatch, ptx, Args, Owned, Ptx, RowSpec};

const OP: &str = "rms_norm";
pub(crate) static PTX: Ptx = ptx!("rms_norm");

type Arg<'a> = (&'a CudaStorage, &'a Layout);

pub(crate) fn forward(
    eps: f64,
    s: &CudaStorage,
    l: &Layout,
    w: Option<Arg>,
) -> Result<(CudaStorage, Shape)> {
    dispatch!(OP, s.dtype(), |T| forward_t::<T>(eps, s, l, w))
}

fn forward_t<T: CudaDType + DeviceRepr>(
    eps: f64,
    s: &CudaStorage,
    l: &Layout,
    w: Option<Arg>,
) -> Result<(CudaStorage, Shape)> {
    let dev = s.device();
    let stream = dev.cuda_stream();
    let (x, xo) = cuda::slice::<T>(OP, "x", s, l)?;
    let w = w
        .map(|(ws, wl)| cuda::slice::<T>(OP, "weight", ws, wl))
        .transpose()?;
    let d = l.dims()[l.dims().len() - 1];
    let rows = l.shape().elem_count() / d;
    let mut y = cuda::alloc::<T>(dev, rows * d)?;
    let vec = 16 / std::mem::size_of::<T>();
    let vec_ok = d % vec == 0
        && cuda::aligned16(x, xo, &stream)
        && w.is_none_or(|(w, wo)| cuda::aligned16(w, wo, &stream))
        && cuda::aligned16(&y, 0, &stream);
    let spec = RowSpec {
        rows,
        d,
        elem: std::mem::size_of::<T>(),
        nin: 1,
        extra_per_col: 0,
        red: 4,
        vec_ok,
        persistent: false,
        owned: None,
    };
    let prefix = format!("rms_fwd_{}", cuda::dtype_name(OP, s.dtype())?);
    let plan = cuda::plan(OP, dev, &PTX, &prefix, &spec)?;
    {
        let mut args = Args::new(&stream);
        args.input(x, xo);
        match w {
            Some((w, wo)) => args.input(w, wo),
            None => args.null(),
        };
        args.output(&mut y, 0).val(plan.geom).val(eps as f32);
        cuda::launch(&plan, &args)?;
    }
    Ok((cuda::storage(y, dev), l.shape().clone()))
}

/// The backward kernel build: each thread owns at most `cols` columns (its dw accumulator in
/// registers) with at most `max_threads` threads (the kernel's `__launch_bounds__`).
/// `CANDLE_FUSED_RMS_BWD_COLS=16|32` picks the build (a tuning switch; default 32, measured
/// faster overall on an H200: `results/gpu/kernel-probe-rms-bwd-2026-11-27.log`). The 32-column
/// build held to 96 registers per thread (5 instead of 4 CTAs per SM on 4096-wide rows) was
/// measured slower at every shape (`results/gpu/kernel-probe-2026-11-27-softmax-rms.log`).
fn bwd_owned() -> Owned {
    static COLS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    let cols = *COLS.get_or_init(
        || match std::env::var("CANDLE_FUSED_RMS_BWD_COLS").as_deref() {
            Ok("16") => 16,
            _ => 32,
        },
    );
    Owned {
        cols,
        max_threads: if cols == 32 { 512 } else { 1024 },
    }
}

/// Returns `dx` (shape of x) and, with a weight, `dw` (`[D]`).
pub(crate) fn backward(
    eps: f64,
    a: BwdArgs<'_, CudaStorage>,
) -> Result<(CudaStorage, Option<CudaStorage>)> {
    dispatch!(OP, a.x.0.dtype(), |T| backward_t::<T>(eps, &a))
}

fn backward_t<T: CudaDType + DeviceRepr>(
    eps: f64,
    a: &BwdArgs<'_, CudaStorage>,
) -> Result<(CudaStorage, Option<CudaStorage>)> {
    let dev = a.x.0.device();
    let stream = dev.cuda_stream();
    let (xs, xo) = cuda::slice::<T>(OP, "x", a.x.0, a.x.1)?;
    let (gs, go) = cuda::slice::<T>(OP, "dy", a.dy.0, a.dy.1)?;
    let dres = a
        .dres
        .map(|(s, l)| cuda::slice::<T>(OP, "d_sum", s, l))
        .transpose()?;
    let w =
        a.w.map(|(ws, wl)| cuda::slice::<T>(OP, "weight", ws, wl))
            .transpose()?;
    let dims = a.x.1.dims();
    let d = dims[dims.len() - 1];
    let n = a.x.1.shape().elem_count();
    let rows = n / d;
    let mut dx = cuda::alloc::<T>(dev, n)?;
    let elem = std::mem::size_of::<T>();
    let vec = 16 / elem;
    let vec_ok = d % vec == 0
        && cuda::aligned16(xs, xo, &stream)
        && cuda::aligned16(gs, go, &stream)
        && dres.is_none_or(|(s, o)| cuda::aligned16(s, o, &stream))
        && w.is_none_or(|(w, wo)| cuda::aligned16(w, wo, &stream))
        && cuda::aligned16(&dx, 0, &stream);
    let owned = bwd_owned();
    let spec = RowSpec {
        rows,
        d,
        elem,
        nin: 2,
        extra_per_col: 0,
        red: 16,
        vec_ok,
        persistent: w.is_some(),
        // Each thread owns a fixed set of columns (the dw accumulator in registers): the
        // kernel's COLS and __launch_bounds__.
        owned: Some(owned),
    };
    let dt = cuda::dtype_name(OP, a.x.0.dtype())?;
    let op = if a.dres.is_some() {
        "add_rms_norm_backward"
    } else {
        "rms_norm_backward"
    };
    let plan = cuda::plan(op, dev, &PTX, &format!("rms_bwd{}_{dt}", owned.cols), &spec)?;
    let mut part = if w.is_some() {
        Some(cuda::alloc::<f32>(dev, plan.clusters as usize * d)?)
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
            let mut dw = cuda::alloc::<T>(dev, d)?;
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
    Ok((cuda::storage(dx, dev), dw))
}
