//! Shared CUDA launch machinery (with the `cuda` feature): the embedded PTX of each op's `.cu`
//! file, device facts, the row-engine launch plan (slice per CTA, cluster size, threads, shared
//! memory), an argument packer and `cuLaunchKernelEx` with thread-block clusters.
//!
//! Every row op (softmax, RMSNorm, add+RMSNorm, forward and backward) runs on the same device
//! engine (`src/cuda/common.cuh`): a row is split over `csize` CTAs of a cluster (1 when it fits
//! one CTA's shared memory), each stages its slice on chip once and the reductions cross the
//! cluster through distributed shared memory. So HBM is read once even for 262144-long rows.

use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::{Mutex, OnceLock};

use candle_core::cuda_backend::cudarc::driver::{
    sys, CudaFunction, CudaSlice, CudaStream, DevicePtr, DevicePtrMut, SyncOnDrop,
};
use candle_core::cuda_backend::{CudaDType, DeviceId, WrapErr};
use candle_core::{CudaDevice, CudaStorage, DType, Layout, Result};

use crate::validate::{err, fail};

/// The PTX of one kernel file: for Hopper (`compute_90`, clusters) and older GPUs (`compute_80`).
pub(crate) struct Ptx {
    pub name: &'static str,
    pub sm90: &'static str,
    pub sm80: &'static str,
}

/// `ptx!("softmax")` embeds `softmax.sm90.ptx` and `softmax.sm80.ptx` built by build.rs.
macro_rules! ptx {
    ($name:literal) => {
        $crate::cuda::Ptx {
            name: $name,
            sm90: include_str!(concat!(env!("OUT_DIR"), "/", $name, ".sm90.ptx")),
            sm80: include_str!(concat!(env!("OUT_DIR"), "/", $name, ".sm80.ptx")),
        }
    };
}
pub(crate) use ptx;

/// Launch geometry shared with the kernels (`cf::Geom` in common.cuh).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub(crate) struct Geom {
    pub rows: i64,
    pub d: i64,
    pub chunk: i64,
    pub csize: i64,
}

/// What the planner needs to know about the device.
#[derive(Clone, Copy, Debug)]
pub(crate) struct DeviceInfo {
    pub cc_major: i32,
    pub sms: u32,
    pub smem_optin: u32,
}

type FuncCache = HashMap<(DeviceId, String), CudaFunction>;

/// Loaded kernels and device facts, per device: a launch costs a hash lookup, not driver
/// queries (this matters for small decode-time shapes).
static FUNCS: OnceLock<Mutex<FuncCache>> = OnceLock::new();
static INFOS: OnceLock<Mutex<HashMap<DeviceId, DeviceInfo>>> = OnceLock::new();

impl DeviceInfo {
    pub fn of(dev: &CudaDevice) -> Result<Self> {
        let cache = INFOS.get_or_init(Default::default);
        if let Some(i) = cache.lock().expect("cache lock").get(&dev.id()) {
            return Ok(*i);
        }
        let info = Self::query(dev)?;
        cache.lock().expect("cache lock").insert(dev.id(), info);
        Ok(info)
    }

    fn query(dev: &CudaDevice) -> Result<Self> {
        use sys::CUdevice_attribute::*;
        let stream = dev.cuda_stream();
        let ctx = stream.context();
        Ok(Self {
            cc_major: ctx
                .attribute(CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)
                .w()?,
            sms: ctx
                .attribute(CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
                .w()? as u32,
            smem_optin: ctx
                .attribute(CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)
                .w()? as u32,
        })
    }

    pub fn clusters(&self) -> bool {
        self.cc_major >= 9
    }
}

/// A row op's needs, from which [`plan`] derives the launch.
pub(crate) struct RowSpec {
    pub rows: usize,
    pub d: usize,
    /// Bytes of one element of the storage dtype.
    pub elem: usize,
    /// Staged input rows.
    pub nin: usize,
    /// Size of the reduction type.
    pub red: usize,
    /// 16-byte vectors are possible (the row length and every pointer line up).
    pub vec_ok: bool,
    /// A persistent grid (at most as many CTAs as fit on the GPU at once, walking the rows):
    /// for ops that accumulate per-CTA partials (dw). Otherwise one cluster per row.
    pub persistent: bool,
    /// Columns of the slice one thread may own at most (a per-thread register accumulator, like
    /// the RMSNorm backward's dw), with at most `max_threads` threads: the slice is then capped
    /// at `cols · max_threads` columns and each thread owns at most `cols` of them.
    /// `None`: no such limit (about 4 packs per thread, up to 1024 threads).
    pub owned: Option<Owned>,
}

/// The largest shared-memory slice per CTA the plan prefers (it splits a row over more CTAs of
/// a cluster above it, up to 16): ~110 KB lets two CTAs share an SM, so one stages while the
/// other computes. Smaller slices were measured slower for the fused cross-entropy (NOTES.md,
/// 2026-12-03).
const MAX_SLICE: usize = 110 * 1024;

impl RowSpec {
    /// A row op over `rows × d` elements of `T` that stages `nin` inputs and reduces values of
    /// `red` bytes, one cluster per row, no owned columns. 16-byte vectors when `d` is a
    /// multiple of the vector width and every pointer in `ptrs` (slice, element offset) is
    /// 16-byte aligned.
    pub fn new<T>(
        rows: usize,
        d: usize,
        nin: usize,
        red: usize,
        ptrs: &[(&CudaSlice<T>, usize)],
        stream: &CudaStream,
    ) -> Self {
        let elem = std::mem::size_of::<T>();
        let vec = 16 / elem;
        let vec_ok = d.is_multiple_of(vec) && ptrs.iter().all(|&(s, o)| aligned16(s, o, stream));
        Self {
            rows,
            d,
            elem,
            nin,
            red,
            vec_ok,
            persistent: false,
            owned: None,
        }
    }
}

/// See [`RowSpec::owned`]; must match the kernel (`COLS` and `__launch_bounds__` of the
/// RMSNorm backward).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Owned {
    pub cols: usize,
    pub max_threads: usize,
}

/// The planned launch of a row op.
#[derive(Clone, Debug)]
pub(crate) struct Launch {
    pub geom: Geom,
    pub threads: u32,
    pub smem: u32,
    /// Clusters launched (grid = clusters · csize blocks): as many as fit on the GPU at once
    /// (a persistent grid walking the rows), at most one per row.
    pub clusters: u32,
    func: CudaFunction,
}

fn align16(b: usize) -> usize {
    b.div_ceil(16) * 16
}

/// Plans the launch of the row-engine kernel `{prefix}_v{vec}` of `ptx`: vector width, slice
/// and cluster size, threads, shared memory, and a persistent grid sized by the occupancy the
/// driver reports. Errors when a row cannot stay on chip.
pub(crate) fn plan(
    op: &str,
    dev: &CudaDevice,
    ptx: &Ptx,
    prefix: &str,
    s: &RowSpec,
) -> Result<Launch> {
    plan_by(op, dev, ptx, s, |_| prefix.to_string())
}

/// [`plan`] for ops whose kernel build depends on the planned slice: `prefix_of(chunk)` names
/// the kernel given the elements per CTA slice.
pub(crate) fn plan_by(
    op: &str,
    dev: &CudaDevice,
    ptx: &Ptx,
    s: &RowSpec,
    prefix_of: impl FnOnce(usize) -> String,
) -> Result<Launch> {
    let info = DeviceInfo::of(dev)?;
    let vec = if s.vec_ok { 16 / s.elem } else { 1 };
    let fixed = align16(35 * s.red) + 64;
    let limit = (info.smem_optin as usize).saturating_sub(fixed);
    let per_col = s.nin * s.elem;
    let smem_of = |chunk: usize| s.nin * align16(chunk * s.elem) + align16(35 * s.red);
    let chunk_of = |c: usize| s.d.div_ceil(c).div_ceil(vec) * vec;
    let max_chunk = s.owned.map_or(usize::MAX, |o| o.cols * o.max_threads);
    let fits = |c: usize| smem_of(chunk_of(c)) <= limit && chunk_of(c) <= max_chunk;
    let max_c = if info.clusters() { 16 } else { 1 };
    // Smallest cluster whose slice fits.
    let mut c = 1;
    while c <= max_c && !fits(c) {
        c *= 2;
    }
    if c > max_c {
        let cap = ((limit / per_col.max(1)).min(max_chunk) * max_c) / vec * vec;
        fail!(
            op,
            "rows of {} elements do not fit on chip on this GPU (at most {cap} for this dtype{}), \
             so the CUDA kernel cannot run them",
            s.d,
            if info.clusters() {
                ""
            } else {
                " without thread-block clusters (needs sm_90)"
            }
        )
    }
    // Slices of at most `MAX_SLICE` bytes (several CTAs share an SM, so one stages while
    // another computes); and few long rows get more CTAs per row (each still >= 8192 columns)
    // so the grid covers the GPU.
    while c < max_c && smem_of(chunk_of(c)) > MAX_SLICE {
        c *= 2;
    }
    while c < max_c && s.rows * c < 2 * info.sms as usize && chunk_of(2 * c) >= 8192 {
        c *= 2;
    }
    let chunk = chunk_of(c);
    let units = chunk.div_ceil(vec);
    let threads = match s.owned {
        // Each thread owns at most `cols` columns (whole packs: cols is a multiple of vec).
        Some(o) => chunk
            .div_ceil(o.cols)
            .next_power_of_two()
            .clamp(32, o.max_threads),
        None => units.div_ceil(4).next_power_of_two().clamp(32, 1024),
    } as u32;
    let smem = smem_of(chunk) as u32;
    let name = format!("{}_v{vec}", prefix_of(chunk));
    let func = function(dev, ptx, &name)?;
    let max_clusters = (1usize << 24) / c;
    let clusters = if s.persistent {
        // As many CTAs as the driver says fit at once (asked only here: a driver call costs
        // microseconds, which matter for small shapes).
        let per_sm = func
            .occupancy_max_active_blocks_per_multiprocessor(threads, smem as usize, None)
            .w()?
            .max(1) as usize;
        (info.sms as usize * per_sm / c).clamp(1, s.rows.max(1))
    } else {
        s.rows.max(1)
    }
    .min(max_clusters);
    Ok(Launch {
        geom: Geom {
            rows: s.rows as i64,
            d: s.d as i64,
            chunk: chunk as i64,
            csize: c as i64,
        },
        threads,
        smem,
        clusters: clusters as u32,
        func,
    })
}

/// Kernel arguments: each value is kept in its own heap box (stable address for the driver),
/// device pointers keep their stream-ordering guards alive until the launch is done.
pub(crate) struct Args<'a> {
    blobs: Vec<Box<[u8]>>,
    guards: Vec<SyncOnDrop<'a>>,
    stream: &'a CudaStream,
}

impl<'a> Args<'a> {
    pub fn new(stream: &'a CudaStream) -> Self {
        Self {
            blobs: Vec::new(),
            guards: Vec::new(),
            stream,
        }
    }

    /// A plain value (`#[repr(C)]`/primitive, matching the kernel's parameter type).
    pub fn val<V: Copy>(&mut self, v: V) -> &mut Self {
        let size = std::mem::size_of::<V>();
        let mut b = vec![0u8; size].into_boxed_slice();
        // SAFETY: V is Copy (plain data) and b holds exactly size_of::<V>() bytes.
        unsafe { std::ptr::copy_nonoverlapping(&v as *const V as *const u8, b.as_mut_ptr(), size) };
        self.blobs.push(b);
        self
    }

    /// A device pointer to element `offset` of `s`.
    pub fn input<T>(&mut self, s: &'a CudaSlice<T>, offset: usize) -> &mut Self {
        let (p, g) = s.device_ptr(self.stream);
        self.guards.push(g);
        self.val(p + (offset * std::mem::size_of::<T>()) as u64)
    }

    /// A device pointer the kernel writes through.
    pub fn output<T>(&mut self, s: &'a mut CudaSlice<T>, offset: usize) -> &mut Self {
        let (p, g) = s.device_ptr_mut(self.stream);
        self.guards.push(g);
        self.val(p + (offset * std::mem::size_of::<T>()) as u64)
    }

    /// Device pointers to elements `offsets` of one output buffer (e.g. the two halves of a
    /// packed gradient), in order.
    pub fn outputs_at<T>(&mut self, s: &'a mut CudaSlice<T>, offsets: &[usize]) -> &mut Self {
        let (p, g) = s.device_ptr_mut(self.stream);
        self.guards.push(g);
        for &o in offsets {
            self.val(p + (o * std::mem::size_of::<T>()) as u64);
        }
        self
    }

    /// A null pointer (an absent optional input).
    pub fn null(&mut self) -> &mut Self {
        self.val(0u64)
    }
}

/// The kernel `name` of `ptx` (the build for the device's architecture), loaded once per
/// device, with its dynamic shared memory limit raised to the device maximum and (on sm_90)
/// clusters of up to 16 CTAs allowed.
fn function(dev: &CudaDevice, ptx: &Ptx, name: &str) -> Result<CudaFunction> {
    let cache = FUNCS.get_or_init(Default::default);
    let key = (dev.id(), name.to_string());
    if let Some(f) = cache.lock().expect("cache lock").get(&key) {
        return Ok(f.clone());
    }
    let info = DeviceInfo::of(dev)?;
    let (src, arch) = if info.clusters() {
        (ptx.sm90, "sm90")
    } else {
        (ptx.sm80, "sm80")
    };
    let func = dev
        .get_or_load_custom_func(name, &format!("candle-fused-{}-{arch}", ptx.name), src)?
        .into_cuda_function();
    use sys::CUfunction_attribute_enum::*;
    // Static + dynamic shared memory may not exceed the opt-in limit: a kernel with static
    // shared arrays (ce_sum's 8 KiB) gets the rest (asking for the whole limit there is
    // CUDA_ERROR_INVALID_VALUE).
    let static_smem = func.shared_size_bytes().w()?;
    func.set_attribute(
        CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
        info.smem_optin as i32 - static_smem,
    )
    .w()?;
    if info.clusters() {
        func.set_attribute(CU_FUNC_ATTRIBUTE_NON_PORTABLE_CLUSTER_SIZE_ALLOWED, 1)
            .w()?;
    }
    cache.lock().expect("cache lock").insert(key, func.clone());
    Ok(func)
}

/// Launches a planned row-engine kernel.
pub(crate) fn launch(plan: &Launch, args: &Args) -> Result<()> {
    let csize = plan.geom.csize as u32;
    raw_launch(
        &plan.func,
        args,
        (
            [plan.clusters * csize, 1, 1],
            [plan.threads, 1, 1],
            plan.smem,
        ),
        csize,
    )
}

/// Launches a plain (non-row-engine) kernel of `ptx`: 1-D grid and block, no shared memory.
pub(crate) fn launch_simple(
    dev: &CudaDevice,
    ptx: &Ptx,
    name: &str,
    grid: u32,
    block: u32,
    args: &Args,
) -> Result<()> {
    raw_launch(
        &function(dev, ptx, name)?,
        args,
        ([grid, 1, 1], [block, 1, 1], 0),
        1,
    )
}

/// Launches a plain kernel of `ptx` on a 3-D grid of 3-D blocks, no shared memory.
pub(crate) fn launch_3d(
    dev: &CudaDevice,
    ptx: &Ptx,
    name: &str,
    grid: [u32; 3],
    block: [u32; 3],
    args: &Args,
) -> Result<()> {
    raw_launch(&function(dev, ptx, name)?, args, (grid, block, 0), 1)
}

/// `cuLaunchKernelEx` on the arguments' stream, with a cluster attribute when `csize > 1`.
fn raw_launch(
    func: &CudaFunction,
    args: &Args,
    (grid, block, smem): ([u32; 3], [u32; 3], u32),
    csize: u32,
) -> Result<()> {
    let mut params: Vec<*mut c_void> = args
        .blobs
        .iter()
        .map(|b| b.as_ptr() as *mut c_void)
        .collect();
    // SAFETY: a zeroed attribute is a valid POD value; the union field is set before use.
    let mut attr: sys::CUlaunchAttribute = unsafe { std::mem::zeroed() };
    attr.id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION;
    attr.value.clusterDim.x = csize;
    attr.value.clusterDim.y = 1;
    attr.value.clusterDim.z = 1;
    let cfg = sys::CUlaunchConfig {
        gridDimX: grid[0],
        gridDimY: grid[1],
        gridDimZ: grid[2],
        blockDimX: block[0],
        blockDimY: block[1],
        blockDimZ: block[2],
        sharedMemBytes: smem,
        hStream: args.stream.cu_stream(),
        attrs: &mut attr,
        numAttrs: u32::from(csize > 1),
    };
    // SAFETY: `params` point at live boxed values whose sizes match the kernel's parameters
    // (each op's cuda.rs pushes them in the kernel's order); device pointers stay valid while
    // `args` holds their guards.
    let res = unsafe {
        sys::cuLaunchKernelEx(
            &cfg,
            func.cu_function(),
            params.as_mut_ptr(),
            std::ptr::null_mut(),
        )
    };
    if res != sys::CUresult::CUDA_SUCCESS {
        return Err(err(
            "cuda launch",
            format!("cuLaunchKernelEx failed: {res:?}"),
        ));
    }
    Ok(())
}

/// An output buffer of `n` elements; filled with 0xFF bytes (NaN in every float dtype) when
/// `poison` is on ([`crate::KernelConfig::poison`]), so elements a kernel fails to write are
/// caught.
pub(crate) fn alloc<T: candle_core::cuda_backend::cudarc::driver::DeviceRepr>(
    dev: &CudaDevice,
    n: usize,
    poison: bool,
) -> Result<CudaSlice<T>> {
    // SAFETY: the kernels write every element (checked by the poisoned tests).
    let mut s = unsafe { dev.alloc::<T>(n.max(1))? };
    if poison {
        let stream = dev.cuda_stream();
        let (p, _g) = s.device_ptr_mut(&stream);
        // SAFETY: p points at n·size_of::<T>() bytes owned by `s`.
        let r = unsafe {
            sys::cuMemsetD8Async(
                p,
                0xFF,
                n.max(1) * std::mem::size_of::<T>(),
                stream.cu_stream(),
            )
        };
        if r != sys::CUresult::CUDA_SUCCESS {
            return Err(err("cuda poison", format!("cuMemsetD8Async failed: {r:?}")));
        }
    }
    Ok(s)
}

/// The contiguous data of `arg`: its slice and the element offset where it starts.
pub(crate) fn slice<'s, T: CudaDType>(
    op: &str,
    arg: &str,
    s: &'s CudaStorage,
    l: &Layout,
) -> Result<(&'s CudaSlice<T>, usize)> {
    let (a, _) = crate::validate::contiguous(op, arg, l)?;
    Ok((s.as_cuda_slice::<T>()?, a))
}

/// [`slice`] of optional input `i` of a kernel (named in errors as the kernel names it).
pub(crate) fn opt_input<'a, T: CudaDType>(
    ins: &crate::seam::Inputs<'a, CudaStorage>,
    i: usize,
) -> Result<Option<(&'a CudaSlice<T>, usize)>> {
    ins.opt(i)
        .map(|(s, l)| slice::<T>(ins.op(), ins.name(i), s, l))
        .transpose()
}

/// Is element `offset` of `s` 16-byte aligned?
pub(crate) fn aligned16<T>(s: &CudaSlice<T>, offset: usize, stream: &CudaStream) -> bool {
    let (p, _g) = s.device_ptr(stream);
    (p as usize + offset * std::mem::size_of::<T>()).is_multiple_of(16)
}

/// The kernel-name suffix of a dtype; f64 has no CUDA kernels.
pub(crate) fn dtype_name(op: &str, dt: DType) -> Result<&'static str> {
    Ok(match dt {
        DType::F32 => "f32",
        DType::F16 => "f16",
        DType::BF16 => "bf16",
        d => fail!(
            op,
            "dtype {d:?} is not supported by the CUDA kernels (f32, f16, bf16)"
        ),
    })
}

/// Runs `$body` with `$T` bound to the Rust type of the storage's dtype (f32, f16, bf16); f64
/// and the rest are one clear error, the same for every op.
macro_rules! dispatch {
    ($op:expr, $dtype:expr, |$T:ident| $body:expr) => {
        $crate::validate::for_dtypes!(
            $op,
            $dtype,
            |$T| $body,
            [F32 => f32, F16 => half::f16, BF16 => half::bf16],
            "dtype {d:?} is not supported by the CUDA kernels (f32, f16, bf16)"
        )
    };
}
pub(crate) use dispatch;

/// Wraps a finished output slice as candle storage.
pub(crate) fn storage<T: CudaDType>(s: CudaSlice<T>, dev: &CudaDevice) -> CudaStorage {
    CudaStorage::wrap_cuda_slice(s, dev.clone())
}
