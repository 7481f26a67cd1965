//! CUDA path of the LoRA linear: every product is one cuBLAS `cublasGemmEx` call on Candle's
//! stream and cuBLAS handle (`CUBLAS_COMPUTE_32F` for f32/f16/bf16, so half types accumulate
//! in f32 and f32 never silently drops to TF32; `COMPUTE_64F` for f64). Accumulations use the
//! GEMM's β = 1 (no separate elementwise pass); the ones column of `u_ext` is a strided
//! `cuMemsetD2D*`. See the module doc of [`super`] for the order of the products and the bytes.
//!
//! Row-major to cuBLAS: a row-major `m×n` product `D = L·R` is the column-major `Dᵀ = Rᵀ·Lᵀ`,
//! so `R` is cuBLAS's `A` operand and `L` its `B`; a row-major matrix stored with row length
//! `ld` is its own transpose in column-major with the same leading dimension.

use std::ffi::c_void;

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc;
use candle_core::cuda_backend::CudaDType;
use candle_core::{CudaDevice, CudaStorage, DType, Layout, Result, Shape, Tensor, WithDType};
use cudarc::cublas::sys::{
    cublasComputeType_t, cublasGemmAlgo_t, cublasOperation_t, cudaDataType_t,
};
use cudarc::driver::{DevicePtr, DevicePtrMut, DeviceRepr};
use half::{bf16, f16};

use super::op::{Dims, LoraBwd, LoraFwd};
use crate::validate::fail;

const OP: &str = "lora_linear";

/// A row-major operand: device address, row length, and whether the logical matrix is the
/// transpose of the stored one.
#[derive(Clone, Copy)]
struct Mat {
    ptr: u64,
    ld: usize,
    t: bool,
}

impl Mat {
    fn rows(ptr: u64, ld: usize) -> Self {
        Self { ptr, ld, t: false }
    }
    fn t(ptr: u64, ld: usize) -> Self {
        Self { ptr, ld, t: true }
    }
}

/// The element types the CUDA path handles, with their cuBLAS types.
trait Elt: CudaDType + DeviceRepr + WithDType {
    const DATA: cudaDataType_t;
    /// The bit pattern of 1.0 (for the ones column), as 16, 32 or 64 bits.
    const ONE_BITS: u64;
}

impl Elt for f32 {
    const DATA: cudaDataType_t = cudaDataType_t::CUDA_R_32F;
    const ONE_BITS: u64 = 0x3F80_0000;
}
impl Elt for f64 {
    const DATA: cudaDataType_t = cudaDataType_t::CUDA_R_64F;
    const ONE_BITS: u64 = 0x3FF0_0000_0000_0000;
}
impl Elt for f16 {
    const DATA: cudaDataType_t = cudaDataType_t::CUDA_R_16F;
    const ONE_BITS: u64 = 0x3C00;
}
impl Elt for bf16 {
    const DATA: cudaDataType_t = cudaDataType_t::CUDA_R_16BF;
    const ONE_BITS: u64 = 0x3F80;
}

fn cublas_err(e: impl std::fmt::Debug) -> candle_core::Error {
    crate::validate::err(OP, format!("cuBLAS: {e:?}"))
}

fn driver_err(e: impl std::fmt::Debug) -> candle_core::Error {
    crate::validate::err(OP, format!("CUDA driver: {e:?}"))
}

/// The element offset of a contiguous layout (an error otherwise).
fn offset(arg: &str, l: &Layout) -> Result<usize> {
    match l.contiguous_offsets() {
        Some((a, _)) => Ok(a),
        None => fail!(
            OP,
            "{arg} must be contiguous (strides {:?} for shape {:?})",
            l.stride(),
            l.dims()
        ),
    }
}

/// `dst (m×n, row length ldd) = [dst +] beta·lhs (m×k)·rhs (k×n)` on Candle's cuBLAS handle.
///
/// # Safety
/// The addresses must point to live device buffers of `T` covering the operands.
unsafe fn mm<T: Elt>(
    dev: &CudaDevice,
    (m, n, k): (usize, usize, usize),
    (dst, ldd): (u64, usize),
    accumulate: bool,
    lhs: Mat,
    rhs: Mat,
    beta: f64,
) -> Result<()> {
    if m == 0 || n == 0 {
        return Ok(());
    }
    let blas = dev.cublas_handle();
    let op = |t: bool| {
        if t {
            cublasOperation_t::CUBLAS_OP_T
        } else {
            cublasOperation_t::CUBLAS_OP_N
        }
    };
    let c_beta = if accumulate { 1.0 } else { 0.0 };
    let (a64, b64) = (beta, c_beta);
    let (a32, b32) = (beta as f32, c_beta as f32);
    let (alpha_p, beta_p, compute) = if T::DTYPE == DType::F64 {
        (
            &a64 as *const f64 as *const c_void,
            &b64 as *const f64 as *const c_void,
            cublasComputeType_t::CUBLAS_COMPUTE_64F,
        )
    } else {
        (
            &a32 as *const f32 as *const c_void,
            &b32 as *const f32 as *const c_void,
            cublasComputeType_t::CUBLAS_COMPUTE_32F,
        )
    };
    cudarc::cublas::result::gemm_ex(
        *blas.handle(),
        op(rhs.t),
        op(lhs.t),
        n as i32,
        m as i32,
        k as i32,
        alpha_p,
        rhs.ptr as *const c_void,
        T::DATA,
        rhs.ld as i32,
        lhs.ptr as *const c_void,
        T::DATA,
        lhs.ld as i32,
        beta_p,
        dst as *mut c_void,
        T::DATA,
        ldd as i32,
        compute,
        cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT_TENSOR_OP,
    )
    .map_err(cublas_err)
}

/// Fills columns `col..ld` of the `rows × ld` row-major buffer at `base`: 1.0 in column `col`
/// when `ones` (the bias column), zeros in the rest (the padding), with strided memsets.
///
/// # Safety
/// `base` must point to `rows·ld` live elements of `T`.
unsafe fn tail_columns<T: Elt>(
    dev: &CudaDevice,
    base: u64,
    rows: usize,
    ld: usize,
    col: usize,
    ones: bool,
) -> Result<()> {
    use cudarc::driver::sys;
    let esize = std::mem::size_of::<T>();
    let stream = dev.cuda_stream().cu_stream();
    let pitch = ld * esize;
    // Sets `width` elements from column `c` of every row to the element with bits `bits`.
    let set = |c: usize, width: usize, bits: u64| -> sys::CUresult {
        if width == 0 {
            return sys::CUresult::CUDA_SUCCESS;
        }
        let ptr = base + (c * esize) as u64;
        match esize {
            2 => sys::cuMemsetD2D16Async(ptr, pitch, bits as u16, width, rows, stream),
            4 => sys::cuMemsetD2D32Async(ptr, pitch, bits as u32, width, rows, stream),
            // f64: 1.0 is not a repeated 32-bit word; zeros are.
            _ if bits == 0 => sys::cuMemsetD2D32Async(ptr, pitch, 0, 2 * width, rows, stream),
            _ => {
                let lo = sys::cuMemsetD2D32Async(ptr, pitch, bits as u32, width, rows, stream);
                if lo != sys::CUresult::CUDA_SUCCESS {
                    return lo;
                }
                sys::cuMemsetD2D32Async(ptr + 4, pitch, (bits >> 32) as u32, width, rows, stream)
            }
        }
    };
    let mut c = col;
    if ones {
        // The f64 case writes the two words of one element separately: width must be 1.
        let res = set(c, 1, T::ONE_BITS);
        if res != sys::CUresult::CUDA_SUCCESS {
            return Err(driver_err(res));
        }
        c += 1;
    }
    let res = set(c, ld - c, 0);
    if res != sys::CUresult::CUDA_SUCCESS {
        return Err(driver_err(res));
    }
    Ok(())
}

/// A fresh output buffer of `len` elements, filled with 0xFF bytes (NaN) when poisoning is on.
fn alloc<T: Elt>(dev: &CudaDevice, len: usize) -> Result<cudarc::driver::CudaSlice<T>> {
    // SAFETY: every element is written by the kernels before it is read (poisoning checks it).
    let mut s = unsafe { dev.alloc::<T>(len.max(1))? };
    if crate::poison::poison_enabled() {
        let stream = dev.cuda_stream();
        let (p, _g) = s.device_ptr_mut(&stream);
        // SAFETY: p points to len·size_of::<T>() bytes of the buffer just allocated.
        unsafe {
            cudarc::driver::result::memset_d8_async(
                p,
                0xFF,
                len * std::mem::size_of::<T>(),
                stream.cu_stream(),
            )
        }
        .map_err(driver_err)?;
    }
    Ok(s)
}

/// Runs `f` with the device address (element offset applied) of a storage argument.
fn with_ptr<T: Elt, R>(
    arg: &str,
    s: &CudaStorage,
    l: &Layout,
    f: impl FnOnce(u64) -> Result<R>,
) -> Result<R> {
    let off = offset(arg, l)?;
    let slice = s.as_cuda_slice::<T>()?;
    let stream = s.device.cuda_stream();
    let (p, _guard) = slice.device_ptr(&stream);
    f(p + (off * std::mem::size_of::<T>()) as u64)
}

/// As [`with_ptr`] for a tensor the op holds (u_ext, the adapter).
fn with_tensor_ptr<T: Elt, R>(
    arg: &str,
    t: &Tensor,
    f: impl FnOnce(u64) -> Result<R>,
) -> Result<R> {
    let (st, l) = t.storage_and_layout();
    match &*st {
        candle_core::Storage::Cuda(s) => with_ptr::<T, R>(arg, s, l, f),
        _ => fail!(OP, "{arg} is not on the CUDA device (internal)"),
    }
}

/// Optional storage argument to an optional address.
fn with_opt<T: Elt, R>(
    arg: &str,
    s: Option<(&CudaStorage, &Layout)>,
    f: impl FnOnce(Option<u64>) -> Result<R>,
) -> Result<R> {
    match s {
        Some((s, l)) => with_ptr::<T, R>(arg, s, l, |p| f(Some(p))),
        None => f(None),
    }
}

fn with_opt_tensor<T: Elt, R>(
    arg: &str,
    t: Option<&Tensor>,
    f: impl FnOnce(Option<u64>) -> Result<R>,
) -> Result<R> {
    match t {
        Some(t) => with_tensor_ptr::<T, R>(arg, t, |p| f(Some(p))),
        None => f(None),
    }
}

macro_rules! dispatch_cuda {
    ($dtype:expr, |$T:ident| $body:expr) => {
        match $dtype {
            DType::F32 => {
                type $T = f32;
                $body
            }
            DType::F64 => {
                type $T = f64;
                $body
            }
            DType::F16 => {
                type $T = f16;
                $body
            }
            DType::BF16 => {
                type $T = bf16;
                $body
            }
            d => fail!(
                OP,
                "unsupported dtype {d:?}, expected f32, f64, f16 or bf16"
            ),
        }
    };
}

fn esz<T>() -> u64 {
    std::mem::size_of::<T>() as u64
}

/// `u_ext = [s·x·Aᵀ | 1]`, `M × kk`.
pub(crate) fn down(
    d: &Dims,
    scale: f64,
    x: (&CudaStorage, &Layout),
    a: (&CudaStorage, &Layout),
) -> Result<(CudaStorage, Shape)> {
    let dev = x.0.device.clone();
    let kk = d.kk();
    dispatch_cuda!(x.0.dtype(), |T| {
        let mut u = alloc::<T>(&dev, d.m * kk)?;
        with_ptr::<T, _>("x", x.0, x.1, |xp| {
            with_ptr::<T, _>("a", a.0, a.1, |ap| {
                let stream = dev.cuda_stream();
                let (up, _g) = u.device_ptr_mut(&stream);
                // SAFETY: x is M×K, A is r×K, u is M×kk, all live for the calls.
                unsafe {
                    mm::<T>(
                        &dev,
                        (d.m, d.r, d.k),
                        (up, kk),
                        false,
                        Mat::rows(xp, d.k),
                        Mat::t(ap, d.k),
                        scale,
                    )?;
                    tail_columns::<T>(&dev, up, d.m, kk, d.r, d.bias)?;
                }
                Ok(())
            })
        })?;
        Ok((CudaStorage::wrap_cuda_slice(u, dev), Shape::from((d.m, kk))))
    })
}

/// `y = u_ext·B_extᵀ` (β = 0), then `y = x·Wᵀ + y` (β = 1).
pub(crate) fn forward(
    op: &LoraFwd,
    x: (&CudaStorage, &Layout),
    w: Option<(&CudaStorage, &Layout)>,
    adapter: Option<(&CudaStorage, &Layout)>,
) -> Result<(CudaStorage, Shape)> {
    let d = op.dims;
    let kk = d.kk();
    let dev = x.0.device.clone();
    dispatch_cuda!(x.0.dtype(), |T| {
        let mut y = alloc::<T>(&dev, d.m * d.n)?;
        with_ptr::<T, _>("x", x.0, x.1, |xp| {
            with_opt::<T, _>("w", w, |wp| {
                with_opt::<T, _>("adapter", adapter, |adp| {
                    with_opt_tensor::<T, _>("u", op.u.as_ref(), |up| {
                        let stream = dev.cuda_stream();
                        let (yp, _g) = y.device_ptr_mut(&stream);
                        let mut low = false;
                        // SAFETY: u is M×kk, B_ext (after A's r·K elements) N×kk, x M×K,
                        // W N×K, y M×N.
                        unsafe {
                            if let (Some(adp), Some(up), true) = (adp, up, kk > 0) {
                                let bext = adp + d.a_len() as u64 * esz::<T>();
                                mm::<T>(
                                    &dev,
                                    (d.m, d.n, kk),
                                    (yp, d.n),
                                    false,
                                    Mat::rows(up, kk),
                                    Mat::t(bext, kk),
                                    1.0,
                                )?;
                                low = true;
                            }
                            match wp {
                                Some(wp) => mm::<T>(
                                    &dev,
                                    (d.m, d.n, d.k),
                                    (yp, d.n),
                                    low,
                                    Mat::rows(xp, d.k),
                                    Mat::t(wp, d.k),
                                    1.0,
                                )?,
                                None if !low => fail!(OP, "internal: nothing to compute"),
                                None => {}
                            }
                        }
                        Ok(())
                    })
                })
            })
        })?;
        Ok((
            CudaStorage::wrap_cuda_slice(y, dev),
            Shape::from((d.m, d.n)),
        ))
    })
}

/// The flat `[dx | dW | dA | dB_ext]` of the parts in `op.need`.
pub(crate) fn backward(
    op: &LoraBwd,
    dy: (&CudaStorage, &Layout),
    x: (&CudaStorage, &Layout),
    w: Option<(&CudaStorage, &Layout)>,
) -> Result<(CudaStorage, Shape)> {
    let d = op.dims;
    let need = op.need;
    let kk = d.kk();
    let len = need.out_len(&d);
    let dev = x.0.device.clone();
    dispatch_cuda!(x.0.dtype(), |T| {
        let mut out = alloc::<T>(&dev, len)?;
        // g = s·dy·B, M×r (in the storage dtype: cuBLAS wants one type for A and B).
        let mut g = alloc::<T>(&dev, d.m * d.r.max(1))?;
        with_ptr::<T, _>("dy", dy.0, dy.1, |dyp| {
            with_ptr::<T, _>("x", x.0, x.1, |xp| {
                with_opt::<T, _>("w", w, |wp| {
                    with_opt_tensor::<T, _>("adapter", op.adapter.as_ref(), |adp| {
                        with_opt_tensor::<T, _>("u", op.u.as_ref(), |up| {
                            let stream = dev.cuda_stream();
                            let (op_, _g1) = out.device_ptr_mut(&stream);
                            let (gp, _g2) = g.device_ptr_mut(&stream);
                            let e = esz::<T>();
                            let (ap, bext) = match adp {
                                Some(p) => (p, p + d.a_len() as u64 * e),
                                None => (0, 0),
                            };
                            let has_g = d.r > 0 && (need.dx || need.da) && adp.is_some();
                            // SAFETY: every address covers its operand (shapes as in the CPU
                            // path); out holds the parts in `need`, g is M×r.
                            unsafe {
                                if has_g {
                                    mm::<T>(
                                        &dev,
                                        (d.m, d.r, d.n),
                                        (gp, d.r),
                                        false,
                                        Mat::rows(dyp, d.n),
                                        Mat::rows(bext, kk),
                                        op.scale,
                                    )?;
                                }
                                let mut at = op_;
                                if need.dx {
                                    let mut low = false;
                                    if has_g {
                                        mm::<T>(
                                            &dev,
                                            (d.m, d.k, d.r),
                                            (at, d.k),
                                            false,
                                            Mat::rows(gp, d.r),
                                            Mat::rows(ap, d.k),
                                            1.0,
                                        )?;
                                        low = true;
                                    }
                                    match wp {
                                        Some(wp) => mm::<T>(
                                            &dev,
                                            (d.m, d.k, d.n),
                                            (at, d.k),
                                            low,
                                            Mat::rows(dyp, d.n),
                                            Mat::rows(wp, d.k),
                                            1.0,
                                        )?,
                                        None if !low => zero::<T>(&dev, at, d.m * d.k)?,
                                        None => {}
                                    }
                                    at += (d.m * d.k) as u64 * e;
                                }
                                if need.dw {
                                    mm::<T>(
                                        &dev,
                                        (d.n, d.k, d.m),
                                        (at, d.k),
                                        false,
                                        Mat::t(dyp, d.n),
                                        Mat::rows(xp, d.k),
                                        1.0,
                                    )?;
                                    at += (d.n * d.k) as u64 * e;
                                }
                                if need.da || need.db {
                                    if need.da && has_g {
                                        mm::<T>(
                                            &dev,
                                            (d.r, d.k, d.m),
                                            (at, d.k),
                                            false,
                                            Mat::t(gp, d.r),
                                            Mat::rows(xp, d.k),
                                            1.0,
                                        )?;
                                    } else {
                                        zero::<T>(&dev, at, d.r * d.k)?;
                                    }
                                    let pad = d.a_len() - d.r * d.k;
                                    zero::<T>(&dev, at + (d.r * d.k) as u64 * e, pad)?;
                                    at += d.a_len() as u64 * e;
                                    match (up, need.db && kk > 0) {
                                        (Some(up), true) => mm::<T>(
                                            &dev,
                                            (d.n, kk, d.m),
                                            (at, kk),
                                            false,
                                            Mat::t(dyp, d.n),
                                            Mat::rows(up, kk),
                                            1.0,
                                        )?,
                                        _ => zero::<T>(&dev, at, d.n * kk)?,
                                    }
                                }
                            }
                            Ok(())
                        })
                    })
                })
            })
        })?;
        drop(g);
        Ok((CudaStorage::wrap_cuda_slice(out, dev), Shape::from(len)))
    })
}

/// Zeroes `len` elements at `p` (stream-ordered).
///
/// # Safety
/// `p` must point to `len` live elements of `T`.
unsafe fn zero<T: Elt>(dev: &CudaDevice, p: u64, len: usize) -> Result<()> {
    if len == 0 {
        return Ok(());
    }
    cudarc::driver::result::memset_d8_async(
        p,
        0,
        len * std::mem::size_of::<T>(),
        dev.cuda_stream().cu_stream(),
    )
    .map_err(driver_err)
}
