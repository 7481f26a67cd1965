//! CUDA glue for softmax (kernels in `softmax.cu`): picks the vector width, plans the row
//! engine launch, and passes the mask's broadcast geometry.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::DeviceRepr;
use candle_core::cuda_backend::CudaDType;
use candle_core::{CudaStorage, Layout, Result, Shape};

use super::{Softmax, SoftmaxBwd};
use crate::cuda::{self, dispatch, ptx, Args, Ptx, RowSpec};
use crate::validate::fail;

const OP: &str = "softmax";
static PTX: Ptx = ptx!("softmax");

/// `MaskGeom` of softmax.cu: where the mask value of (row, col) is.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct MaskGeom {
    nd: i64,
    dims: [i64; 6],
    strides: [i64; 6],
    col_stride: i64,
    start: i64,
}

/// The mask's leading dims, with size-1 dims dropped, mergeable neighbours merged (a run of
/// broadcast dims becomes one) and outer broadcast dims dropped (they never move the offset).
fn mask_geom(ml: &Layout) -> Result<MaskGeom> {
    let dims = ml.dims();
    let strides = ml.stride();
    let r = dims.len();
    let mut lead: Vec<(usize, usize)> = Vec::new(); // outermost first
    for (&d, &s) in dims[..r - 1].iter().zip(&strides[..r - 1]) {
        if d == 1 {
            continue;
        }
        match lead.last_mut() {
            Some(outer) if outer.1 == s * d => *outer = (outer.0 * d, s),
            _ => lead.push((d, s)),
        }
    }
    while lead.first().is_some_and(|&(_, s)| s == 0) {
        lead.remove(0);
    }
    if lead.len() > 6 {
        fail!(
            "masked_softmax",
            "the mask's layout has {} independent leading dims; the CUDA kernel handles 6",
            lead.len()
        )
    }
    let mut g = MaskGeom {
        nd: lead.len() as i64,
        col_stride: strides[r - 1] as i64,
        start: ml.start_offset() as i64,
        ..Default::default()
    };
    for (k, &(d, s)) in lead.iter().enumerate() {
        g.dims[k] = d as i64;
        g.strides[k] = s as i64;
    }
    Ok(g)
}

pub(super) fn forward(
    op: &Softmax,
    s: &CudaStorage,
    l: &Layout,
    mask: Option<(&CudaStorage, &Layout)>,
) -> Result<(CudaStorage, Shape)> {
    dispatch!(OP, s.dtype(), |T| forward_t::<T>(op, s, l, mask))
}

fn forward_t<T: CudaDType + DeviceRepr>(
    op: &Softmax,
    s: &CudaStorage,
    l: &Layout,
    mask: Option<(&CudaStorage, &Layout)>,
) -> Result<(CudaStorage, Shape)> {
    let dev = s.device();
    let stream = dev.cuda_stream();
    let (x, xo) = cuda::slice::<T>(OP, "x", s, l)?;
    let dims = l.dims();
    let d = dims[dims.len() - 1];
    let rows = l.shape().elem_count() / d;
    let s_rows = if dims.len() >= 2 {
        dims[dims.len() - 2]
    } else {
        1
    };
    let (mslice, mg) = match mask {
        Some((ms, ml)) => (Some((ms.as_cuda_slice::<T>()?, ml)), mask_geom(ml)?),
        None => (None, MaskGeom::default()),
    };
    let mut y = cuda::alloc::<T>(dev, rows * d)?;
    let vec = 16 / std::mem::size_of::<T>();
    let vec_ok = d % vec == 0 && cuda::aligned16(x, xo, &stream) && cuda::aligned16(&y, 0, &stream);
    let spec = RowSpec {
        rows,
        d,
        elem: std::mem::size_of::<T>(),
        nin: 1,
        extra_per_col: 0,
        red: 8,
        vec_ok,
        persistent: false,
        owned: None,
    };
    // The masked kernel (a mask, maybe causal too), the causal-only one, or the plain one.
    let kind = if mask.is_some() {
        "masked_softmax"
    } else if op.causal {
        "causal_softmax"
    } else {
        "softmax"
    };
    let dt = cuda::dtype_name(OP, s.dtype())?;
    let plan = cuda::plan_by("masked_softmax", dev, &PTX, &spec, |chunk| {
        format!("{kind}_fwd{}_{dt}", cache_tag(chunk))
    })?;
    {
        let mut args = Args::new(&stream);
        args.input(x, xo);
        match mslice {
            Some((m, _)) => args.input(m, 0),
            None => args.null(),
        };
        args.output(&mut y, 0)
            .val(plan.geom)
            .val(mg)
            .val(op.scale as f32)
            .val(op.causal as i32)
            .val(op.zero_masked_rows as i32)
            .val(s_rows as i64);
        cuda::launch(&plan, &args)?;
    }
    Ok((cuda::storage(y, dev), l.shape().clone()))
}

/// The forward build's register cache (softmax.cu's CACHE): `"c"` keeps each thread's
/// exponentials in registers (one ex2 per element, no shared-memory re-read), `""` re-reads
/// shared memory. Cached when a CTA's slice has
/// at most 8192 elements: the cache holds the slice in f32 registers, and longer slices would
/// cost occupancy (measured on an H200: 33% slower at [8192, 32768] bf16, 36% at [1024, 262144]
/// f32). `CANDLE_FUSED_SOFTMAX_CACHE=none|c` forces a build (a tuning switch). Two other builds
/// were slower at every shape and were dropped (`results/gpu/kernel-probe-2026-11-27-softmax-rms.log`):
/// one caching the raw packs (fewer registers, ex2 twice), one caching 2 packs per thread with
/// twice the threads (more occupancy, but more per-row reduction work).
fn cache_tag(chunk: usize) -> &'static str {
    static FORCED: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    let forced = FORCED.get_or_init(|| std::env::var("CANDLE_FUSED_SOFTMAX_CACHE").ok());
    match forced.as_deref() {
        Some("none") => "",
        Some("c") => "c",
        _ if chunk <= 8192 => "c",
        _ => "",
    }
}

pub(super) fn backward(
    op: &SoftmaxBwd,
    ys: &CudaStorage,
    yl: &Layout,
    gs: &CudaStorage,
    gl: &Layout,
) -> Result<(CudaStorage, Shape)> {
    dispatch!(OP, ys.dtype(), |T| backward_t::<T>(op, ys, yl, gs, gl))
}

fn backward_t<T: CudaDType + DeviceRepr>(
    op: &SoftmaxBwd,
    ys: &CudaStorage,
    yl: &Layout,
    gs: &CudaStorage,
    gl: &Layout,
) -> Result<(CudaStorage, Shape)> {
    let dev = ys.device();
    let stream = dev.cuda_stream();
    let (y, yo) = cuda::slice::<T>(OP, "y", ys, yl)?;
    let (g, go) = cuda::slice::<T>(OP, "dy", gs, gl)?;
    let dims = yl.dims();
    let d = dims[dims.len() - 1];
    let rows = yl.shape().elem_count() / d;
    let mut dx = cuda::alloc::<T>(dev, rows * d)?;
    let vec = 16 / std::mem::size_of::<T>();
    let vec_ok = d % vec == 0
        && cuda::aligned16(y, yo, &stream)
        && cuda::aligned16(g, go, &stream)
        && cuda::aligned16(&dx, 0, &stream);
    let spec = RowSpec {
        rows,
        d,
        elem: std::mem::size_of::<T>(),
        nin: 2,
        extra_per_col: 0,
        red: 16,
        vec_ok,
        persistent: false,
        owned: None,
    };
    let prefix = format!("softmax_bwd_{}", cuda::dtype_name(OP, ys.dtype())?);
    let plan = cuda::plan("softmax_backward", dev, &PTX, &prefix, &spec)?;
    {
        let mut args = Args::new(&stream);
        args.input(y, yo)
            .input(g, go)
            .output(&mut dx, 0)
            .val(plan.geom)
            .val(op.scale as f32);
        cuda::launch(&plan, &args)?;
    }
    Ok((cuda::storage(dx, dev), yl.shape().clone()))
}
