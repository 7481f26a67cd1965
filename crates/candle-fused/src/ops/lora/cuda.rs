//! CUDA path of the LoRA linear: every product is one cuBLAS `cublasGemmEx` call on Candle's
//! stream and cuBLAS handle (`CUBLAS_COMPUTE_32F`, so half types accumulate in f32 and f32
//! never silently drops to TF32). Accumulations use the GEMM's β = 1 (no separate elementwise
//! pass); the ones column of `u_ext` is a strided `cuMemsetD2D*`, `B_ext` is assembled from
//! `b` and `bias` by strided copies (`cuMemcpy2D`, `N·(r + 1)` elements), and `dB_ext` is
//! split into `dB` and `dbias` the same way. See the module doc of [`super`] for the order of
//! the products and the bytes. f64 is refused like in every other op.
//!
//! Row-major to cuBLAS: a row-major `m×n` product `D = L·R` is the column-major `Dᵀ = Rᵀ·Lᵀ`,
//! so `R` is cuBLAS's `A` operand and `L` its `B`; a row-major matrix stored with row length
//! `ld` is its own transpose in column-major with the same leading dimension.

use std::ffi::c_void;

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc;
use candle_core::cuda_backend::CudaDType;
use candle_core::{CudaDevice, CudaStorage, Result};
use cudarc::cublas::sys::{
    cublasComputeType_t, cublasGemmAlgo_t, cublasOperation_t, cudaDataType_t,
};
use cudarc::driver::{sys, CudaSlice, CudaStream, DevicePtr, DevicePtrMut, DeviceRepr, SyncOnDrop};
use half::{bf16, f16};

use super::kernels::{Dims, LoraBwd, LoraDown, LoraFwd, Mat};
use crate::config::KernelConfig;
use crate::cuda;
use crate::seam::Inputs;
use crate::validate::{err, fail};

/// The element types the CUDA path handles, with their cuBLAS types.
pub(super) trait Elt: CudaDType + DeviceRepr {
    const DATA: cudaDataType_t;
    /// The bit pattern of 1.0 (for the ones column), as 16 or 32 bits.
    const ONE_BITS: u32;
}

impl Elt for f32 {
    const DATA: cudaDataType_t = cudaDataType_t::CUDA_R_32F;
    const ONE_BITS: u32 = 0x3F80_0000;
}
impl Elt for f16 {
    const DATA: cudaDataType_t = cudaDataType_t::CUDA_R_16F;
    const ONE_BITS: u32 = 0x3C00;
}
impl Elt for bf16 {
    const DATA: cudaDataType_t = cudaDataType_t::CUDA_R_16BF;
    const ONE_BITS: u32 = 0x3F80;
}

fn esz<T>() -> usize {
    std::mem::size_of::<T>()
}

/// A driver call's result as the op's error.
fn driver(op: &str, what: &str, r: sys::CUresult) -> Result<()> {
    if r == sys::CUresult::CUDA_SUCCESS {
        Ok(())
    } else {
        Err(err(op, format!("CUDA driver ({what}): {r:?}")))
    }
}

/// Device addresses of the buffers one call uses, holding their stream-ordering guards until
/// every product of the call is queued.
struct Addrs<'a> {
    stream: &'a CudaStream,
    guards: Vec<SyncOnDrop<'a>>,
}

impl<'a> Addrs<'a> {
    fn new(stream: &'a CudaStream) -> Self {
        Self {
            stream,
            guards: Vec::new(),
        }
    }

    /// The address of element `off` of an input.
    fn input<T>(&mut self, (s, off): (&'a CudaSlice<T>, usize)) -> u64 {
        let (p, g) = s.device_ptr(self.stream);
        self.guards.push(g);
        p + (off * esz::<T>()) as u64
    }

    /// The address of a buffer the call writes.
    fn output<T>(&mut self, s: &'a mut CudaSlice<T>) -> u64 {
        let (p, g) = s.device_ptr_mut(self.stream);
        self.guards.push(g);
        p
    }

    /// [`Addrs::output`] of an optional buffer.
    fn output_opt<T>(&mut self, s: &'a mut Option<CudaSlice<T>>) -> Option<u64> {
        s.as_mut().map(|s| self.output(s))
    }
}

/// The stream, the cuBLAS handle and the op name of one call.
struct Ctx<'a> {
    op: &'a str,
    dev: &'a CudaDevice,
    stream: &'a CudaStream,
}

impl Ctx<'_> {
    /// `dst (m×n, row length ldd) = [dst +] beta·lhs (m×k)·rhs (k×n)` on Candle's cuBLAS
    /// handle.
    ///
    /// # Safety
    /// The addresses must point to live device buffers of `T` covering the operands.
    unsafe fn mm<T: Elt>(
        &self,
        (m, n, k): (usize, usize, usize),
        (dst, ldd): (u64, usize),
        accumulate: bool,
        lhs: Mat<u64>,
        rhs: Mat<u64>,
        beta: f64,
    ) -> Result<()> {
        if m == 0 || n == 0 {
            return Ok(());
        }
        let blas = self.dev.cublas_handle();
        let op = |t: bool| {
            if t {
                cublasOperation_t::CUBLAS_OP_T
            } else {
                cublasOperation_t::CUBLAS_OP_N
            }
        };
        let alpha = beta as f32;
        let c_beta: f32 = if accumulate { 1.0 } else { 0.0 };
        cudarc::cublas::result::gemm_ex(
            *blas.handle(),
            op(rhs.t),
            op(lhs.t),
            n as i32,
            m as i32,
            k as i32,
            &alpha as *const f32 as *const c_void,
            rhs.ptr as *const c_void,
            T::DATA,
            rhs.ld as i32,
            lhs.ptr as *const c_void,
            T::DATA,
            lhs.ld as i32,
            &c_beta as *const f32 as *const c_void,
            dst as *mut c_void,
            T::DATA,
            ldd as i32,
            cublasComputeType_t::CUBLAS_COMPUTE_32F,
            cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT_TENSOR_OP,
        )
        .map_err(|e| err(self.op, format!("cuBLAS: {e:?}")))
    }

    /// Zeroes `len` elements at `p` (stream-ordered).
    ///
    /// # Safety
    /// `p` must point to `len` live elements of `T`.
    unsafe fn zero<T>(&self, p: u64, len: usize) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        let r = sys::cuMemsetD8Async(p, 0, len * esz::<T>(), self.stream.cu_stream());
        driver(self.op, "memset", r)
    }

    /// Fills columns `col..ld` of the `rows × ld` row-major buffer at `base`: 1.0 in column
    /// `col` when `ones` (the bias column), zeros in the rest (the padding), with strided
    /// memsets.
    ///
    /// # Safety
    /// `base` must point to `rows·ld` live elements of `T`.
    unsafe fn tail_columns<T: Elt>(
        &self,
        base: u64,
        rows: usize,
        ld: usize,
        col: usize,
        ones: bool,
    ) -> Result<()> {
        let e = esz::<T>();
        let pitch = ld * e;
        let stream = self.stream.cu_stream();
        // Sets `width` elements from column `c` of every row to the element with bits `bits`.
        let set = |c: usize, width: usize, bits: u32| -> Result<()> {
            if width == 0 {
                return Ok(());
            }
            let ptr = base + (c * e) as u64;
            let r = match e {
                2 => sys::cuMemsetD2D16Async(ptr, pitch, bits as u16, width, rows, stream),
                _ => sys::cuMemsetD2D32Async(ptr, pitch, bits, width, rows, stream),
            };
            driver(self.op, "strided memset", r)
        };
        let mut c = col;
        if ones {
            set(c, 1, T::ONE_BITS)?;
            c += 1;
        }
        set(c, ld - c, 0)
    }

    /// Copies a `rows × width` block of `T` between row-major buffers with row lengths
    /// `src.1` and `dst.1` (elements).
    ///
    /// # Safety
    /// Both blocks must lie inside live buffers of `T`.
    unsafe fn copy_block<T>(
        &self,
        src: (u64, usize),
        dst: (u64, usize),
        width: usize,
        rows: usize,
    ) -> Result<()> {
        if width == 0 || rows == 0 {
            return Ok(());
        }
        let e = esz::<T>();
        let copy = sys::CUDA_MEMCPY2D {
            srcXInBytes: 0,
            srcY: 0,
            srcMemoryType: sys::CUmemorytype::CU_MEMORYTYPE_DEVICE,
            srcHost: std::ptr::null(),
            srcDevice: src.0,
            srcArray: std::ptr::null_mut(),
            srcPitch: src.1 * e,
            dstXInBytes: 0,
            dstY: 0,
            dstMemoryType: sys::CUmemorytype::CU_MEMORYTYPE_DEVICE,
            dstHost: std::ptr::null_mut(),
            dstDevice: dst.0,
            dstArray: std::ptr::null_mut(),
            dstPitch: dst.1 * e,
            WidthInBytes: width * e,
            Height: rows,
        };
        let r = sys::cuMemcpy2DAsync_v2(&copy, self.stream.cu_stream());
        driver(self.op, "strided copy", r)
    }

    /// `u_ext = [s·x·Aᵀ | 1 | 0..]` at `u` (`M × kk`).
    ///
    /// # Safety
    /// `x` is `M×K`, `a` (when `r > 0`) `r×K`, `u` `M×kk`, all live.
    unsafe fn down<T: Elt>(
        &self,
        d: &Dims,
        scale: f64,
        x: u64,
        a: Option<u64>,
        u: u64,
    ) -> Result<()> {
        let kk = d.kk();
        if let (Some(a), true) = (a, d.r > 0) {
            self.mm::<T>(
                (d.m, d.r, d.k),
                (u, kk),
                false,
                Mat::rows(x, d.k),
                Mat::t(a, d.k),
                scale,
            )?;
        }
        self.tail_columns::<T>(u, d.m, kk, d.r, d.bias)
    }

    /// `B_ext = [B | bias | 0..]` at `dst` (`N × kk`), zeros where `b` or `bias` is absent.
    ///
    /// # Safety
    /// `b` is `N×r`, `bias` `N`, `dst` `N×kk`, all live.
    unsafe fn b_ext<T>(&self, d: &Dims, b: Option<u64>, bias: Option<u64>, dst: u64) -> Result<()> {
        let kk = d.kk();
        self.zero::<T>(dst, d.n * kk)?;
        if let Some(b) = b {
            self.copy_block::<T>((b, d.r), (dst, kk), d.r, d.n)?;
        }
        if let Some(bias) = bias {
            let col = dst + (d.r * esz::<T>()) as u64;
            self.copy_block::<T>((bias, 1), (col, kk), 1, d.n)?;
        }
        Ok(())
    }
}

/// A scratch or output buffer of `n` elements when `on`.
fn buffer<T: DeviceRepr>(
    dev: &CudaDevice,
    on: bool,
    n: usize,
    poison: bool,
) -> Result<Option<CudaSlice<T>>> {
    if on {
        cuda::alloc::<T>(dev, n, poison).map(Some)
    } else {
        Ok(None)
    }
}

/// [`LoraDown`]: `u_ext`.
pub(super) fn down<T: Elt>(
    k: &LoraDown,
    cfg: &KernelConfig,
    ins: &Inputs<CudaStorage>,
) -> Result<Vec<CudaStorage>> {
    let d = k.dims;
    let (x0, _) = ins.get(0)?;
    let dev = x0.device();
    let stream = dev.cuda_stream();
    let ctx = Ctx {
        op: ins.op(),
        dev,
        stream: &stream,
    };
    let (x, a) = (cuda::opt_input::<T>(ins, 0)?, cuda::opt_input::<T>(ins, 1)?);
    let mut u = cuda::alloc::<T>(dev, d.m * d.kk(), cfg.poison)?;
    {
        let mut p = Addrs::new(&stream);
        let Some(x) = x else {
            fail!(ins.op(), "internal: x was not given")
        };
        let xp = p.input(x);
        let ap = a.map(|a| p.input(a));
        let up = p.output(&mut u);
        // SAFETY: the buffers have the sizes of `d` (validated by the op).
        unsafe { ctx.down::<T>(&d, k.scale, xp, ap, up)? };
    }
    Ok(vec![cuda::storage(u, dev)])
}

/// [`LoraFwd`]: `u_ext`, then `y = u_ext·B_extᵀ` (β = 0), then `y = x·Wᵀ + y` (β = 1).
pub(super) fn forward<T: Elt>(
    k: &LoraFwd,
    cfg: &KernelConfig,
    ins: &Inputs<CudaStorage>,
) -> Result<Vec<CudaStorage>> {
    let (d, op) = (k.dims, ins.op());
    let kk = d.kk();
    let (x0, xl) = ins.get(0)?;
    let dev = x0.device();
    let stream = dev.cuda_stream();
    let ctx = Ctx {
        op,
        dev,
        stream: &stream,
    };
    let x = cuda::slice::<T>(op, "x", x0, xl)?;
    let (w, a) = (cuda::opt_input::<T>(ins, 1)?, cuda::opt_input::<T>(ins, 2)?);
    let (b, bias) = (cuda::opt_input::<T>(ins, 3)?, cuda::opt_input::<T>(ins, 4)?);
    let mut y = cuda::alloc::<T>(dev, d.m * d.n, cfg.poison)?;
    let mut u = buffer::<T>(dev, kk > 0, d.m * kk, cfg.poison)?;
    let mut bext = buffer::<T>(dev, kk > 0, d.n * kk, false)?;
    {
        let mut p = Addrs::new(&stream);
        let xp = p.input(x);
        let (wp, ap) = (w.map(|s| p.input(s)), a.map(|s| p.input(s)));
        let (bp, biasp) = (b.map(|s| p.input(s)), bias.map(|s| p.input(s)));
        let yp = p.output(&mut y);
        let up = p.output_opt(&mut u);
        let bextp = p.output_opt(&mut bext);
        // SAFETY: u is M×kk, B_ext N×kk, x M×K, W N×K, A r×K, B N×r, bias N, y M×N (the sizes
        // of `d`, validated by the op).
        unsafe {
            let mut low = false;
            if let (Some(up), Some(bextp)) = (up, bextp) {
                ctx.down::<T>(&d, k.scale, xp, ap, up)?;
                ctx.b_ext::<T>(&d, bp, biasp, bextp)?;
                ctx.mm::<T>(
                    (d.m, d.n, kk),
                    (yp, d.n),
                    false,
                    Mat::rows(up, kk),
                    Mat::t(bextp, kk),
                    1.0,
                )?;
                low = true;
            }
            match wp {
                Some(wp) => ctx.mm::<T>(
                    (d.m, d.n, d.k),
                    (yp, d.n),
                    low,
                    Mat::rows(xp, d.k),
                    Mat::t(wp, d.k),
                    1.0,
                )?,
                None if !low => fail!(op, "internal: nothing to compute"),
                None => {}
            }
        }
    }
    // B_ext is freed stream-ordered, after the products that read it.
    drop(bext);
    let mut out = vec![cuda::storage(y, dev)];
    out.extend(u.map(|u| cuda::storage(u, dev)));
    Ok(out)
}

/// [`LoraBwd`]: the gradients in `need`, in the order `dx, dw, da, db, dbias`.
pub(super) fn backward<T: Elt>(
    k: &LoraBwd,
    cfg: &KernelConfig,
    ins: &Inputs<CudaStorage>,
) -> Result<Vec<CudaStorage>> {
    let (d, need, op) = (k.dims, k.need, ins.op());
    let kk = d.kk();
    let (g0, gl) = ins.get(0)?;
    let dev = g0.device();
    let stream = dev.cuda_stream();
    let ctx = Ctx {
        op,
        dev,
        stream: &stream,
    };
    let dy = cuda::slice::<T>(op, "dy", g0, gl)?;
    let (x, w) = (cuda::opt_input::<T>(ins, 1)?, cuda::opt_input::<T>(ins, 2)?);
    let (a, b, u) = (
        cuda::opt_input::<T>(ins, 3)?,
        cuda::opt_input::<T>(ins, 4)?,
        cuda::opt_input::<T>(ins, 5)?,
    );
    let has_g = need.g(&d) && b.is_some();
    let db_ext = need.db_ext(&d);
    if ((need.dw || need.da) && x.is_none())
        || (db_ext && u.is_none())
        || (has_g && need.dx && a.is_none())
    {
        fail!(
            op,
            "internal: an input the requested gradients need was not given"
        )
    }
    let poison = cfg.poison;
    // Scratch: g = s·dy·B (M×r, in the storage dtype: cuBLAS wants one type for A and B),
    // B_ext (N×kk) and dB_ext (N×kk).
    let mut g = buffer::<T>(dev, has_g, d.m * d.r, false)?;
    let mut bext = buffer::<T>(dev, has_g, d.n * kk, false)?;
    let mut dbext = buffer::<T>(dev, db_ext, d.n * kk, false)?;
    let mut dx = buffer::<T>(dev, need.dx, d.m * d.k, poison)?;
    let mut dw = buffer::<T>(dev, need.dw, d.n * d.k, poison)?;
    let mut da = buffer::<T>(dev, need.da, d.r * d.k, poison)?;
    let mut db = buffer::<T>(dev, need.db && d.r > 0, d.n * d.r, poison)?;
    let mut dbias = buffer::<T>(dev, need.dbias, d.n, poison)?;
    {
        let mut p = Addrs::new(&stream);
        let dyp = p.input(dy);
        let (xp, wp) = (x.map(|s| p.input(s)), w.map(|s| p.input(s)));
        let (ap, bp, up) = (
            a.map(|s| p.input(s)),
            b.map(|s| p.input(s)),
            u.map(|s| p.input(s)),
        );
        let (gp, bextp) = (p.output_opt(&mut g), p.output_opt(&mut bext));
        let dbextp = p.output_opt(&mut dbext);
        let (dxp, dwp, dap) = (
            p.output_opt(&mut dx),
            p.output_opt(&mut dw),
            p.output_opt(&mut da),
        );
        let (dbp, dbiasp) = (p.output_opt(&mut db), p.output_opt(&mut dbias));
        // SAFETY: every address covers its operand (the sizes of `d`, validated by the op; the
        // shapes as in the CPU path); the inputs each product reads were checked above.
        unsafe {
            if let (true, Some(gp), Some(bextp)) = (has_g, gp, bextp) {
                ctx.b_ext::<T>(&d, bp, None, bextp)?;
                ctx.mm::<T>(
                    (d.m, d.r, d.n),
                    (gp, d.r),
                    false,
                    Mat::rows(dyp, d.n),
                    Mat::rows(bextp, kk),
                    k.scale,
                )?;
            }
            if let Some(dxp) = dxp {
                let mut low = false;
                if let (Some(gp), Some(ap)) = (gp, ap) {
                    ctx.mm::<T>(
                        (d.m, d.k, d.r),
                        (dxp, d.k),
                        false,
                        Mat::rows(gp, d.r),
                        Mat::rows(ap, d.k),
                        1.0,
                    )?;
                    low = true;
                }
                match wp {
                    Some(wp) => ctx.mm::<T>(
                        (d.m, d.k, d.n),
                        (dxp, d.k),
                        low,
                        Mat::rows(dyp, d.n),
                        Mat::rows(wp, d.k),
                        1.0,
                    )?,
                    None if !low => ctx.zero::<T>(dxp, d.m * d.k)?,
                    None => {}
                }
            }
            if let (Some(dwp), Some(xp)) = (dwp, xp) {
                ctx.mm::<T>(
                    (d.n, d.k, d.m),
                    (dwp, d.k),
                    false,
                    Mat::t(dyp, d.n),
                    Mat::rows(xp, d.k),
                    1.0,
                )?;
            }
            if let Some(dap) = dap {
                match (gp, xp) {
                    (Some(gp), Some(xp)) => ctx.mm::<T>(
                        (d.r, d.k, d.m),
                        (dap, d.k),
                        false,
                        Mat::t(gp, d.r),
                        Mat::rows(xp, d.k),
                        1.0,
                    )?,
                    _ => ctx.zero::<T>(dap, d.r * d.k)?,
                }
            }
            if let (Some(dbextp), Some(up)) = (dbextp, up) {
                ctx.mm::<T>(
                    (d.n, kk, d.m),
                    (dbextp, kk),
                    false,
                    Mat::t(dyp, d.n),
                    Mat::rows(up, kk),
                    1.0,
                )?;
                // dB_ext = [dB | dbias | 0..]: split into its parts.
                if let Some(dbp) = dbp {
                    ctx.copy_block::<T>((dbextp, kk), (dbp, d.r), d.r, d.n)?;
                }
                if let Some(dbiasp) = dbiasp {
                    let col = dbextp + (d.r * esz::<T>()) as u64;
                    ctx.copy_block::<T>((col, kk), (dbiasp, 1), 1, d.n)?;
                }
            }
        }
    }
    // The scratch buffers are freed stream-ordered, after the products that use them.
    drop((g, bext, dbext));
    Ok([dx, dw, da, db, dbias]
        .into_iter()
        .flatten()
        .map(|s| cuda::storage(s, dev))
        .collect())
}
