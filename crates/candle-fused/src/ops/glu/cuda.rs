//! CUDA glue for GLU (kernels in `glu.cu`), forward and backward: the row geometry of the
//! two-tensor (one row of every element) and packed (`[.., 2I]`) layouts, the 16-byte vector
//! choice, the launch.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaStream, DeviceRepr};
use candle_core::cuda_backend::CudaDType;
use candle_core::{CudaDevice, CudaStorage, Result};

use super::{GluBwd, GluFwd, GluKind};
use crate::config::KernelConfig;
use crate::cuda::{self, dispatch, ptx, Args, Ptx};
use crate::seam::Inputs;

static PTX: Ptx = ptx!("glu");

/// `GluGeom` of glu.cu.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct GluGeom {
    rows: i64,
    cols: i64,
    gs: i64,
    us: i64,
    ys: i64,
    dgs: i64,
    dus: i64,
}

/// Rows, columns and the row stride of gate and up (`2I` packed, else one row of `n`).
fn layout(packed: bool, n_gate: usize, last: usize) -> (usize, usize, usize) {
    if packed {
        (n_gate / last, last / 2, last)
    } else {
        (1, n_gate, n_gate)
    }
}

/// The vector width: 16-byte packs when the row length and every pointer line up.
fn width<T>(cols: usize, ptrs: &[(&CudaSlice<T>, usize)], stream: &CudaStream) -> usize {
    let vec = 16 / std::mem::size_of::<T>();
    if cols.is_multiple_of(vec) && ptrs.iter().all(|&(s, o)| cuda::aligned16(s, o, stream)) {
        vec
    } else {
        1
    }
}

/// Grid and block: packs of columns on x, rows on y (grid-stride past 65535 blocks).
fn launch(
    dev: &CudaDevice,
    name: &str,
    rows: usize,
    cols: usize,
    v: usize,
    args: &Args,
) -> Result<()> {
    let packs = cols.div_ceil(v);
    let bx = packs.next_power_of_two().min(256);
    let by = 256 / bx;
    let grid = [
        packs.div_ceil(bx).min(i32::MAX as usize) as u32,
        rows.div_ceil(by).min(65535) as u32,
        1,
    ];
    cuda::launch_3d(dev, &PTX, name, grid, [bx as u32, by as u32, 1], args)
}

fn kind_name(kind: GluKind) -> &'static str {
    match kind {
        GluKind::SwiGlu => "silu",
        GluKind::GeGluTanh => "gelu",
    }
}

pub(crate) fn forward(
    k: &GluFwd,
    cfg: &KernelConfig,
    ins: &Inputs<CudaStorage>,
) -> Result<Vec<CudaStorage>> {
    let (s, _) = ins.get(0)?;
    dispatch!(ins.op(), s.dtype(), |T| forward_t::<T>(k, cfg, ins))
}

fn forward_t<T: CudaDType + DeviceRepr>(
    k: &GluFwd,
    cfg: &KernelConfig,
    ins: &Inputs<CudaStorage>,
) -> Result<Vec<CudaStorage>> {
    let op = ins.op();
    let (gs0, gl) = ins.get(0)?;
    let dev = gs0.device();
    let stream = dev.cuda_stream();
    let (g, go) = cuda::slice::<T>(op, ins.name(0), gs0, gl)?;
    let n = gl.shape().elem_count();
    let (rows, cols, stride) = layout(k.packed, n, gl.dims()[gl.dims().len() - 1]);
    let (u, uo) = if k.packed {
        (g, go + cols)
    } else {
        let (us, ul) = ins.get(1)?;
        cuda::slice::<T>(op, "up", us, ul)?
    };
    let mut y = cuda::alloc::<T>(dev, rows * cols, cfg.poison)?;
    let v = width(cols, &[(g, go), (u, uo), (&y, 0)], &stream);
    let geo = GluGeom {
        rows: rows as i64,
        cols: cols as i64,
        gs: stride as i64,
        us: stride as i64,
        ys: cols as i64,
        dgs: 0,
        dus: 0,
    };
    let dt = cuda::dtype_name(op, gs0.dtype())?;
    {
        let mut args = Args::new(&stream);
        args.input(g, go).input(u, uo).output(&mut y, 0).val(geo);
        let name = format!("glu_fwd_{}_{dt}_v{v}", kind_name(k.kind));
        launch(dev, &name, rows, cols, v, &args)?;
    }
    Ok(vec![cuda::storage(y, dev)])
}

pub(crate) fn backward(
    k: &GluBwd,
    cfg: &KernelConfig,
    ins: &Inputs<CudaStorage>,
) -> Result<Vec<CudaStorage>> {
    let (s, _) = ins.get(0)?;
    dispatch!(ins.op(), s.dtype(), |T| backward_t::<T>(k, cfg, ins))
}

fn backward_t<T: CudaDType + DeviceRepr>(
    k: &GluBwd,
    cfg: &KernelConfig,
    ins: &Inputs<CudaStorage>,
) -> Result<Vec<CudaStorage>> {
    let op = ins.op();
    let (gs0, gl) = ins.get(0)?;
    let (ds, dl) = ins.get(2)?;
    let dev = gs0.device();
    let stream = dev.cuda_stream();
    let (g, go) = cuda::slice::<T>(op, ins.name(0), gs0, gl)?;
    let (dy, dyo) = cuda::slice::<T>(op, "dy", ds, dl)?;
    let n = gl.shape().elem_count();
    let (rows, cols, stride) = layout(k.packed, n, gl.dims()[gl.dims().len() - 1]);
    let (u, uo) = if k.packed {
        (g, go + cols)
    } else {
        let (us, ul) = ins.get(1)?;
        cuda::slice::<T>(op, "up", us, ul)?
    };
    let dt = cuda::dtype_name(op, gs0.dtype())?;
    let name = |v: usize| format!("glu_bwd_{}_{dt}_v{v}", kind_name(k.kind));
    let geo = GluGeom {
        rows: rows as i64,
        cols: cols as i64,
        gs: stride as i64,
        us: stride as i64,
        ys: cols as i64,
        dgs: stride as i64,
        dus: stride as i64,
    };
    if k.packed {
        // One [.., 2I] buffer: dgate in the first half of each row, dup in the second.
        let mut dgu = cuda::alloc::<T>(dev, n, cfg.poison)?;
        let v = width(cols, &[(g, go), (u, uo), (dy, dyo), (&dgu, 0)], &stream);
        {
            let mut args = Args::new(&stream);
            args.input(g, go).input(u, uo).input(dy, dyo);
            args.outputs_at(&mut dgu, &[0, cols]).val(geo);
            launch(dev, &name(v), rows, cols, v, &args)?;
        }
        return Ok(vec![cuda::storage(dgu, dev)]);
    }
    let mut dg = cuda::alloc::<T>(dev, n, cfg.poison)?;
    let mut du = cuda::alloc::<T>(dev, n, cfg.poison)?;
    let v = width(
        cols,
        &[(g, go), (u, uo), (dy, dyo), (&dg, 0), (&du, 0)],
        &stream,
    );
    {
        let mut args = Args::new(&stream);
        args.input(g, go).input(u, uo).input(dy, dyo);
        args.output(&mut dg, 0).output(&mut du, 0).val(geo);
        launch(dev, &name(v), rows, cols, v, &args)?;
    }
    Ok(vec![cuda::storage(dg, dev), cuda::storage(du, dev)])
}
