//! CUDA glue for RoPE (kernel in `rope.cu`): the vector width (16-byte packs when the head
//! dim, the rotary half, every stride and pointer line up; else the scalar build), the heads
//! each thread rotates with one load of its table entries, and the launch.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::DeviceRepr;
use candle_core::cuda_backend::CudaDType;
use candle_core::{CudaStorage, DType, Result};

use super::{Geom, Rope, RopeStyle};
use crate::config::{HeadsPerThread, KernelConfig, RopeOccupancy};
use crate::cuda::{self, dispatch, ptx, Args, DeviceInfo, Ptx};
use crate::seam::Inputs;
use crate::validate::fail;

static PTX: Ptx = ptx!("rope");

/// `RopeGeom` of rope.cu.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct RopeGeom {
    b: i64,
    h: i64,
    t: i64,
    d: i64,
    half: i64,
    sb: i64,
    sh: i64,
    st: i64,
    ob: i64,
    oh: i64,
    ot: i64,
    pos_b: i64,
    n_pos: i64,
    rot_units: i64,
    hpt: i64,
    sign: f32,
}

pub(crate) fn run(
    k: &Rope,
    cfg: &KernelConfig,
    ins: &Inputs<CudaStorage>,
) -> Result<Vec<CudaStorage>> {
    let (xs, _) = ins.get(0)?;
    dispatch!(ins.op(), xs.dtype(), |T| run_t::<T>(k, cfg, ins))
}

/// Heads per thread: up to 8 (the table entries are loaded once for all of them), fewer when
/// that would leave fewer than 1024 threads per SM (each thread keeps several 16-byte loads
/// in flight, so half the SM's threads cover the memory latency); at least 2 when there are
/// two heads (the f32 table bytes per pair equal a bf16 pair's). On an H200 (2026-12-02, the
/// sweep that applied its configurations; an earlier one's bench ignored them) fixed values of
/// 2, 4 and 16 (`RopeKernelConfig`) were 0–4% slower than this at bf16 [1, 32, 4096, 128], and
/// 16 was 17% slower at Qwen's [4, 14, 2048, 64].
fn heads_per_thread(g: &Geom, units: usize, sms: usize, cfg: HeadsPerThread) -> usize {
    if let HeadsPerThread::Fixed(n) = cfg {
        return (n as usize).clamp(1, g.h.max(1));
    }
    if g.h <= 1 {
        return 1;
    }
    let threads = |hpt: usize| g.b * g.t * units * g.h.div_ceil(hpt);
    let mut hpt = 8;
    while hpt > 2 && threads(hpt) < sms * 1024 {
        hpt /= 2;
    }
    hpt
}

fn run_t<T: CudaDType + DeviceRepr>(
    k: &Rope,
    cfg: &KernelConfig,
    ins: &Inputs<CudaStorage>,
) -> Result<Vec<CudaStorage>> {
    let op = ins.op();
    let (xs, xl) = ins.get(0)?;
    let (cs, cl) = ins.get(1)?;
    let (ss, sl) = ins.get(2)?;
    let (ps, pl) = ins.get(3)?;
    let g = Geom::new(k, xl, pl, cl)?;
    let dev = xs.device();
    let stream = dev.cuda_stream();
    let x = xs.as_cuda_slice::<T>()?;
    if g.x_extent() > x.len() {
        fail!(op, "internal: the layout of x reaches past its storage")
    }
    let (cos, co) = cuda::slice::<f32>(op, "cos", cs, cl)?;
    let (sin, so) = cuda::slice::<f32>(op, "sin", ss, sl)?;
    let mut y = cuda::alloc::<T>(dev, g.rows() * g.d, cfg.poison)?;
    let half = g.rot / 2;
    let vec = 16 / std::mem::size_of::<T>();
    // Strides of dims of size 1 are never used.
    let strides = [(g.b, g.sb), (g.h, g.sh), (g.t, g.st)];
    let vec_ok = g.d % vec == 0
        && half % vec == 0
        && g.off % vec == 0
        && strides.iter().all(|&(n, s)| n <= 1 || s % vec == 0)
        && cuda::aligned16(x, 0, &stream)
        && cuda::aligned16(&y, 0, &stream)
        && cuda::aligned16(cos, co, &stream)
        && cuda::aligned16(sin, so, &stream);
    let v = if vec_ok { vec } else { 1 };
    let (style, rot_units) = match k.style {
        RopeStyle::HalfSplit => ("half", half / v),
        RopeStyle::Interleaved => ("inter", half / (v / 2).max(1)),
    };
    let units = rot_units + (g.d - g.rot) / v;
    if units > 1024 {
        fail!(
            op,
            "head dim {} is too large for the CUDA kernel ({units} threads per head vector, at most 1024)",
            g.d
        )
    }
    let sms = DeviceInfo::of(dev)?.sms as usize;
    let hpt = heads_per_thread(&g, units, sms, cfg.cuda.rope.heads_per_thread);
    let by = (256 / units).max(1);
    let (ob, oh, ot) = g.out_strides(k.layout);
    let geom = RopeGeom {
        b: g.b as i64,
        h: g.h as i64,
        t: g.t as i64,
        d: g.d as i64,
        half: half as i64,
        sb: g.sb as i64,
        sh: g.sh as i64,
        st: g.st as i64,
        ob: ob as i64,
        oh: oh as i64,
        ot: ot as i64,
        pos_b: g.pos_b as i64,
        n_pos: g.n_pos as i64,
        rot_units: rot_units as i64,
        hpt: hpt as i64,
        sign: if k.inverse { -1.0 } else { 1.0 },
    };
    let groups = g.h.div_ceil(hpt);
    if groups > 65535 {
        fail!(
            op,
            "{} heads are too many for the CUDA kernel (at most {})",
            g.h,
            65535 * hpt
        )
    }
    let tblocks = g.t.div_ceil(by);
    if tblocks > i32::MAX as usize {
        fail!(op, "{} tokens are too many for one CUDA launch", g.t)
    }
    let grid = [tblocks as u32, groups as u32, g.b.min(65535) as u32];
    let block = [units as u32, by as u32, 1];
    let dt = cuda::dtype_name(op, xs.dtype())?;
    {
        let mut args = Args::new(&stream);
        args.input(x, g.off).input(cos, co).input(sin, so);
        let pos_name = match ps.dtype() {
            DType::U32 => {
                let (p, po) = cuda::slice::<u32>(op, "positions", ps, pl)?;
                args.input(p, po);
                "u32"
            }
            DType::I64 => {
                let (p, po) = cuda::slice::<i64>(op, "positions", ps, pl)?;
                args.input(p, po);
                "i64"
            }
            other => fail!(op, "positions has dtype {other:?}, expected u32 or i64"),
        };
        args.output(&mut y, 0).val(geom);
        // The bounded builds assume CTAs of at most 256 threads.
        let occ = match cfg.cuda.rope.occupancy {
            _ if block[0] * block[1] > 256 => "",
            RopeOccupancy::Unbounded => "",
            RopeOccupancy::Ctas4 => "_c4",
        };
        let name = format!("rope_{style}_{pos_name}_{dt}_v{v}{occ}");
        cuda::launch_3d(dev, &PTX, &name, grid, block, &args)?;
    }
    Ok(vec![cuda::storage(y, dev)])
}
