//! CUDA kernel of the linear cross-entropy's weight gradient: `dw += dlogitsᵀ·h` for one chunk
//! as one `cublasGemmEx` (inputs in their dtype, f32 compute, `β = 1` into the f32
//! accumulator), on Candle's cuBLAS handle and stream. (The logits and `dh` GEMMs go through
//! [`crate::ops::matmul`], i.e. Candle's matmul on the same cuBLAS.)

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::cublas::{result, sys};
use candle_core::cuda_backend::cudarc::driver::{DevicePtr, DevicePtrMut};
use candle_core::{CudaStorage, DType, Layout, Result};

use super::DwAccum;
use crate::config::KernelConfig;
use crate::seam::Inputs;
use crate::validate::{err, fail};

pub(crate) fn dw_accum(
    _: &DwAccum,
    _: &KernelConfig,
    (ds, dl): (&mut CudaStorage, &Layout),
    ins: &Inputs<CudaStorage>,
) -> Result<Vec<CudaStorage>> {
    let op = ins.op();
    let (gs, gl) = ins.get(0)?;
    let (hs, hl) = ins.get(1)?;
    let (c, v) = (gl.dims()[0], gl.dims()[1]);
    let hd = hl.dims()[1];
    if hl.dims()[0] != c || dl.dims() != [v, hd] {
        fail!(
            op,
            "internal: dw accumulation shapes {:?} += {:?}ᵀ·{:?}",
            dl.dims(),
            gl.dims(),
            hl.dims()
        )
    }
    let ty = match gs.dtype() {
        DType::F32 => sys::cudaDataType::CUDA_R_32F,
        DType::F16 => sys::cudaDataType::CUDA_R_16F,
        DType::BF16 => sys::cudaDataType::CUDA_R_16BF,
        d => fail!(
            op,
            "dtype {d:?} is not supported by the CUDA kernels (f32, f16, bf16)"
        ),
    };
    let esz = gs.dtype().size_in_bytes() as u64;
    let int =
        |x: usize| i32::try_from(x).map_err(|_| err(op, format!("size {x} exceeds cuBLAS's int")));
    let (m, n, k) = (int(hd)?, int(v)?, int(c)?);
    if m == 0 || n == 0 || k == 0 {
        return Ok(vec![]);
    }
    let dev = ds.device().clone();
    let stream = dev.cuda_stream();
    let blas = dev.cublas_handle();
    let (g_off, h_off) = (gl.start_offset() as u64, hl.start_offset() as u64);
    let d_off = dl.start_offset() as u64;
    // Raw device pointers of the three operands (same dtype dispatch as the storage).
    macro_rules! ptr {
        ($s:expr, $t:ty) => {
            $s.as_cuda_slice::<$t>()?.device_ptr(&stream)
        };
    }
    let (gp, _g1) = match gs.dtype() {
        DType::F32 => ptr!(gs, f32),
        DType::F16 => ptr!(gs, half::f16),
        _ => ptr!(gs, half::bf16),
    };
    let (hp, _g2) = match hs.dtype() {
        DType::F32 => ptr!(hs, f32),
        DType::F16 => ptr!(hs, half::f16),
        _ => ptr!(hs, half::bf16),
    };
    let acc = ds.as_cuda_slice_mut::<f32>()?;
    let (dp, _g3) = acc.device_ptr_mut(&stream);
    let (alpha, beta) = (1f32, 1f32);
    // Column-major: dwᵀ [H, V] += hᵀ [H, C] · dlogits [C, V], i.e. A = h (no transpose,
    // lda = H), B = dlogits stored [V, C] column-major (transposed, ldb = V), C = dw (ldc = H).
    // SAFETY: the pointers cover C·H, C·V and V·H elements of live buffers on Candle's stream
    // (the cuBLAS handle's stream); alpha and beta are host f32 (compute type 32F).
    unsafe {
        result::gemm_ex(
            *blas.handle(),
            sys::cublasOperation_t::CUBLAS_OP_N,
            sys::cublasOperation_t::CUBLAS_OP_T,
            m,
            n,
            k,
            &alpha as *const f32 as *const _,
            (hp + h_off * esz) as *const _,
            ty,
            m,
            (gp + g_off * esz) as *const _,
            ty,
            n,
            &beta as *const f32 as *const _,
            (dp + d_off * 4) as *mut _,
            sys::cudaDataType::CUDA_R_32F,
            m,
            sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
        )
    }
    .map_err(|e| err(op, format!("cublasGemmEx failed: {e:?}")))?;
    Ok(vec![])
}
