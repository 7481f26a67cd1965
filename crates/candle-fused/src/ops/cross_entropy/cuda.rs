//! CUDA glue for cross-entropy (kernels in `cross_entropy.cu`): the forward and the fused
//! loss + gradient on the row engine (a row of up to ~900K f32 logits stays on chip through a
//! thread-block cluster on sm_90), the backward from the saved row stats as a vectorized elementwise
//! kernel, and the deterministic f64 sum of the row losses.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, DeviceRepr};
use candle_core::cuda_backend::CudaDType;
use candle_core::{CudaDevice, CudaStorage, Layout, Result};

use super::{CeBwd, CeFused, CeFwd, CeSum, Params};
use crate::config::KernelConfig;
use crate::cuda::{self, dispatch, ptx, Args, Ptx, RowSpec};
use crate::seam::Inputs;
use crate::validate::fail;

pub(crate) static PTX: Ptx = ptx!("cross_entropy");

/// Bytes of the kernels' reduction type `MaxSumZ` (four f32: max, Σ exp, Σ z, Σ_{j≠t} p):
/// the row engine sizes its block scratch by it (12 here overran shared memory, found by
/// compute-sanitizer memcheck on the H200, 2026-12-02).
const MAX_SUM_Z: usize = 16;

/// The row constants (`CeParams` in cross_entropy.cu).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct CeParams {
    cap: f32,
    inv_cap: f32,
    eps: f32,
    eps_v: f32,
    eps_t: f32,
    zl: f32,
    scale: f32,
}

fn params(p: &Params, v: usize, scale: f64) -> CeParams {
    let (cap, inv_cap) = p
        .softcap
        .map_or((0.0, 0.0), |c| (c as f32, (1.0 / c) as f32));
    CeParams {
        cap,
        inv_cap,
        eps: p.smoothing as f32,
        eps_v: (p.smoothing / v as f64) as f32,
        eps_t: (p.smoothing * (v as f64 - 1.0) / v as f64) as f32,
        zl: p.z_loss as f32,
        scale: scale as f32,
    }
}

/// Rows and row length of a layout.
fn rows_d(l: &Layout) -> (usize, usize) {
    let d = l.dims().last().copied().unwrap_or(1);
    (l.shape().elem_count() / d.max(1), d)
}

fn targets<'a>(
    op: &str,
    ins: &Inputs<'a, CudaStorage>,
    i: usize,
) -> Result<(&'a CudaSlice<i32>, usize)> {
    let (s, l) = ins.get(i)?;
    cuda::slice::<i32>(op, "targets", s, l)
}

/// `out[0] = scale · Σ rows` (f64, fixed order).
fn sum_into(
    dev: &CudaDevice,
    rows: (&CudaSlice<f32>, usize),
    n: usize,
    scale: f64,
    poison: bool,
) -> Result<CudaSlice<f32>> {
    let stream = dev.cuda_stream();
    let mut out = cuda::alloc::<f32>(dev, 1, poison)?;
    {
        let mut args = Args::new(&stream);
        args.input(rows.0, rows.1)
            .val(n as i64)
            .val(scale)
            .output(&mut out, 0);
        cuda::launch_simple(dev, &PTX, "ce_sum", 1, 1024, &args)?;
    }
    Ok(out)
}

pub(crate) fn forward_t<T: CudaDType + DeviceRepr>(
    k: &CeFwd,
    cfg: &KernelConfig,
    ins: &Inputs<CudaStorage>,
) -> Result<Vec<CudaStorage>> {
    let op = ins.op();
    let (s, l) = ins.get(0)?;
    let dev = s.device();
    let stream = dev.cuda_stream();
    let (x, xo) = cuda::slice::<T>(op, "logits", s, l)?;
    let (tg, to) = targets(op, ins, 1)?;
    let (rows, d) = rows_d(l);
    let mut row_loss = cuda::alloc::<f32>(dev, rows, cfg.poison)?;
    let mut stats = cuda::alloc::<f32>(dev, 2 * rows, cfg.poison)?;
    // Nothing staged (nin 0): the forward reads each slice once from global memory.
    let spec = RowSpec::new(rows, d, 0, MAX_SUM_Z, &[(x, xo)], &stream);
    let prefix = format!("ce_fwd_{}", cuda::dtype_name(op, s.dtype())?);
    let plan = cuda::plan(op, dev, &PTX, &prefix, &spec)?;
    {
        let mut args = Args::new(&stream);
        args.input(x, xo)
            .input(tg, to)
            .output(&mut row_loss, 0)
            .output(&mut stats, 0);
        args.val(plan.geom).val(params(&k.p, d, 0.0));
        cuda::launch(&plan, &args)?;
    }
    let loss = sum_into(dev, (&row_loss, 0), rows, k.scale, cfg.poison)?;
    Ok(vec![cuda::storage(loss, dev), cuda::storage(stats, dev)])
}

pub(crate) fn backward_t<T: CudaDType + DeviceRepr>(
    k: &CeBwd,
    cfg: &KernelConfig,
    ins: &Inputs<CudaStorage>,
) -> Result<Vec<CudaStorage>> {
    let op = ins.op();
    let (s, l) = ins.get(0)?;
    let dev = s.device();
    let stream = dev.cuda_stream();
    let (x, xo) = cuda::slice::<T>(op, "logits", s, l)?;
    let (tg, to) = targets(op, ins, 1)?;
    let (ss, sl) = ins.get(2)?;
    let (stats, so) = cuda::slice::<f32>(op, "stats", ss, sl)?;
    let dloss = ins
        .opt(3)
        .map(|(s, l)| cuda::slice::<f32>(op, "dloss", s, l))
        .transpose()?;
    let (rows, d) = rows_d(l);
    let mut y = cuda::alloc::<T>(dev, rows * d, cfg.poison)?;
    let width = 16 / std::mem::size_of::<T>();
    let vec_ok =
        d % width == 0 && cuda::aligned16(x, xo, &stream) && cuda::aligned16(&y, 0, &stream);
    let vec = if vec_ok { width } else { 1 };
    // One block per row (grid-stride), its threads walking the row's packs.
    let block = (d / vec).div_ceil(4).next_power_of_two().clamp(32, 512) as u32;
    let grid = rows.clamp(1, 1 << 20) as u32;
    let name = format!("ce_bwd_{}_v{vec}", cuda::dtype_name(op, s.dtype())?);
    {
        let mut args = Args::new(&stream);
        args.input(x, xo).input(tg, to).input(stats, so);
        match dloss {
            Some((g, go)) => args.input(g, go),
            None => args.null(),
        };
        args.output(&mut y, 0)
            .val(rows as i64)
            .val(d as i64)
            .val(params(&k.p, d, k.scale));
        cuda::launch_simple(dev, &PTX, &name, grid, block, &args)?;
    }
    Ok(vec![cuda::storage(y, dev)])
}

/// Launches `ce_fused` reading `x` and writing the gradient to `y` (`None`: into `x`).
#[allow(clippy::too_many_arguments)]
fn launch_fused<T: CudaDType + DeviceRepr>(
    op: &str,
    dt: &str,
    k: &CeFused,
    dev: &CudaDevice,
    x: (&CudaSlice<T>, usize),
    y: Option<&mut CudaSlice<T>>,
    tg: (&CudaSlice<i32>, usize),
    rows: usize,
    d: usize,
    row_loss: &mut CudaSlice<f32>,
) -> Result<()> {
    let stream = dev.cuda_stream();
    let mut ptrs = vec![x];
    if let Some(y) = &y {
        ptrs.push((&**y, 0));
    }
    let spec = RowSpec::new(rows, d, 1, MAX_SUM_Z, &ptrs, &stream);
    let prefix = format!("ce_fused_{dt}");
    let plan = cuda::plan(op, dev, &PTX, &prefix, &spec)?;
    let mut args = Args::new(&stream);
    args.input(x.0, x.1).input(tg.0, tg.1);
    match y {
        Some(y) => args.output(y, 0),
        // In place: y = x (each CTA writes only the slice it staged, after the reduction).
        None => args.input(x.0, x.1),
    };
    args.output(row_loss, 0)
        .val(plan.geom)
        .val(params(&k.p, d, k.scale));
    cuda::launch(&plan, &args)
}

pub(crate) fn fused_t<T: CudaDType + DeviceRepr>(
    k: &CeFused,
    cfg: &KernelConfig,
    ins: &Inputs<CudaStorage>,
) -> Result<Vec<CudaStorage>> {
    let op = ins.op();
    let (s, l) = ins.get(0)?;
    let dev = s.device();
    let x = cuda::slice::<T>(op, "logits", s, l)?;
    let tg = targets(op, ins, 1)?;
    let (rows, d) = rows_d(l);
    let mut y = cuda::alloc::<T>(dev, rows * d, cfg.poison)?;
    let mut row_loss = cuda::alloc::<f32>(dev, rows, cfg.poison)?;
    let dt = cuda::dtype_name(op, s.dtype())?;
    launch_fused(op, dt, k, dev, x, Some(&mut y), tg, rows, d, &mut row_loss)?;
    Ok(vec![cuda::storage(y, dev), cuda::storage(row_loss, dev)])
}

pub(crate) fn fused_inplace(
    k: &CeFused,
    cfg: &KernelConfig,
    (ds, dl): (&mut CudaStorage, &Layout),
    ins: &Inputs<CudaStorage>,
) -> Result<Vec<CudaStorage>> {
    let op = ins.op();
    let dev = ds.device().clone();
    let tg = targets(op, ins, 0)?;
    let (rows, d) = rows_d(dl);
    let Some((start, _)) = dl.contiguous_offsets() else {
        fail!(op, "internal: the in-place logits must be contiguous")
    };
    let mut row_loss = cuda::alloc::<f32>(&dev, rows, cfg.poison)?;
    let dt = cuda::dtype_name(op, ds.dtype())?;
    dispatch!(op, ds.dtype(), |T| {
        let x = ds.as_cuda_slice_mut::<T>()?;
        launch_fused::<T>(
            op,
            dt,
            k,
            &dev,
            (&*x, start),
            None,
            tg,
            rows,
            d,
            &mut row_loss,
        )?;
    });
    Ok(vec![cuda::storage(row_loss, &dev)])
}

pub(crate) fn sum(
    k: &CeSum,
    cfg: &KernelConfig,
    ins: &Inputs<CudaStorage>,
) -> Result<Vec<CudaStorage>> {
    let op = ins.op();
    let (s, l) = ins.get(0)?;
    let dev = s.device();
    let rows = cuda::slice::<f32>(op, "row_losses", s, l)?;
    let out = sum_into(dev, rows, l.shape().elem_count(), k.scale, cfg.poison)?;
    Ok(vec![cuda::storage(out, dev)])
}
