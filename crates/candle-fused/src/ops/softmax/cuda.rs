//! CUDA glue for softmax (kernels in `softmax.cu`): picks the vector width, plans the row
//! engine launch, and passes the mask's broadcast geometry.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::DeviceRepr;
use candle_core::cuda_backend::CudaDType;
use candle_core::{CudaStorage, Layout, Result};

use super::{SoftmaxBwd, SoftmaxFwd};
use crate::config::{KernelConfig, RegisterCache};
use crate::cuda::{self, ptx, Args, Ptx, RowSpec};
use crate::seam::Inputs;
use crate::validate::fail;

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

pub(super) fn forward<T: CudaDType + DeviceRepr>(
    op: &SoftmaxFwd,
    cfg: &KernelConfig,
    ins: &Inputs<CudaStorage>,
) -> Result<Vec<CudaStorage>> {
    let (s, l) = ins.get(0)?;
    let mask = ins.opt(1);
    let dev = s.device();
    let stream = dev.cuda_stream();
    let (x, xo) = cuda::slice::<T>(op.name, "x", s, l)?;
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
    let mut y = cuda::alloc::<T>(dev, rows * d, cfg.poison)?;
    let spec = RowSpec::new(rows, d, 1, 8, &[(x, xo), (&y, 0)], &stream);
    // The masked kernel (a mask, maybe causal too), the causal-only one, or the plain one.
    let kind = if mask.is_some() {
        "masked_softmax"
    } else if op.causal {
        "causal_softmax"
    } else {
        "softmax"
    };
    let dt = cuda::dtype_name(op.name, s.dtype())?;
    let cache = cfg.cuda.softmax_fwd.register_cache;
    let plan = cuda::plan_by(op.name, dev, &PTX, &spec, |chunk| {
        format!(
            "{kind}_fwd{}_{dt}",
            cache_tag(cache, chunk, std::mem::size_of::<T>())
        )
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
    Ok(vec![cuda::storage(y, dev)])
}

/// The forward build's register cache (softmax.cu's CACHE): `"c"` keeps each thread's
/// exponentials in registers (one ex2 per element, no shared-memory re-read), `""` re-reads
/// shared memory. [`RegisterCache::Auto`] caches when a CTA's slice has at most 8192 elements
/// and 16 KiB: the cache holds the slice in f32 registers, and longer slices would cost
/// occupancy (measured on an H200: 33% slower at [8192, 32768] bf16, 36% at [1024, 262144]
/// f32; 2026-12-02, `--kernel-config softmax-cache-on/off` in one call: [16384, 8192] f32
/// 303 µs cached against 267 uncached, so f32 slices over 4096 elements are not cached). Two
/// other builds were slower at every shape and were dropped
/// (`results/gpu/kernel-probe-2026-11-27-softmax-rms.log`): one caching the raw packs (fewer
/// registers, ex2 twice), one caching 2 packs per thread with twice the threads.
fn cache_tag(cache: RegisterCache, chunk: usize, elem_bytes: usize) -> &'static str {
    match cache {
        RegisterCache::Off => "",
        RegisterCache::On => "c",
        RegisterCache::Auto if chunk <= 8192 && chunk * elem_bytes <= 16 << 10 => "c",
        RegisterCache::Auto => "",
    }
}

pub(super) fn backward<T: CudaDType + DeviceRepr>(
    op: &SoftmaxBwd,
    cfg: &KernelConfig,
    ins: &Inputs<CudaStorage>,
) -> Result<Vec<CudaStorage>> {
    let (ys, yl) = ins.get(0)?;
    let (gs, gl) = ins.get(1)?;
    let dev = ys.device();
    let stream = dev.cuda_stream();
    let (y, yo) = cuda::slice::<T>(op.name, "y", ys, yl)?;
    let (g, go) = cuda::slice::<T>(op.name, "dy", gs, gl)?;
    let dims = yl.dims();
    let d = dims[dims.len() - 1];
    let rows = yl.shape().elem_count() / d;
    let mut dx = cuda::alloc::<T>(dev, rows * d, cfg.poison)?;
    let spec = RowSpec::new(rows, d, 2, 16, &[(y, yo), (g, go), (&dx, 0)], &stream);
    let prefix = format!("softmax_bwd_{}", cuda::dtype_name(op.name, ys.dtype())?);
    let plan = cuda::plan(op.name, dev, &PTX, &prefix, &spec)?;
    {
        let mut args = Args::new(&stream);
        args.input(y, yo)
            .input(g, go)
            .output(&mut dx, 0)
            .val(plan.geom)
            .val(op.scale as f32);
        cuda::launch(&plan, &args)?;
    }
    Ok(vec![cuda::storage(dx, dev)])
}
