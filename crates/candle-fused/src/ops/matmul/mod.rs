//! Matrix product `C = op(A) · op(B)`, differentiable: the one GEMM entry point of the
//! library (LoRA, linear + cross-entropy and the training crate call it).
//!
//! `op(X)` is `X` or, with its flag set, `Xᵀ` (the last two dims swapped, read through strides:
//! no copy). `A` is `[.., M, K]` (`[K, M]` with `ta`; leading dims fold into M when not
//! transposed), `B` is `[K, N]` (`[N, K]` with `tb`, e.g. a linear layer's weight); `C` is
//! `[.., M, N]`. Batched: `B` of rank ≥ 3 with the leading dims of `A` (e.g. attention's
//! `[B, H, T, D]`): one product per leading index, `op` on the last two dims of each.
//!
//! Backward, for the output gradient `G = dC`:
//! `dA = G · op(B)ᵀ` (or `(G · op(B)ᵀ)ᵀ = op(B) · Gᵀ` with `ta`) and
//! `dB = op(A)ᵀ · G` (or `Gᵀ · op(A)` with `tb`), each one more call of this op.
//!
//! CPU: f32, f64 and f16 through the `gemm` crate (AVX-512 kernels with its `x86-v4` feature,
//! all rayon threads, or `CpuConfig::gemm_threads`); bf16 (which `gemm` lacks) through an f32
//! GEMM on operands widened at the SIMD level, and `M = 1` (decode) as a bf16/f32 GEMV that
//! widens the weight in registers (one pass over the weight, the memory floor). CUDA: Candle's
//! matmul (cuBLAS).

mod cpu;

use candle_core::{CpuStorage, Result, Tensor};

use crate::config::{KernelConfig, Kernels};
use crate::seam::{self, Inputs, Kernel};
use crate::validate::{self, fail};

/// `C [batch, M, N] = op(A) · op(B)` on contiguous operands (`batch` products, each operand
/// advancing by its own matrix per product).
#[derive(Debug, Clone, Copy)]
pub(crate) struct MatmulFwd {
    pub batch: usize,
    pub m: usize,
    pub k: usize,
    pub n: usize,
    pub ta: bool,
    pub tb: bool,
}

impl Kernel for MatmulFwd {
    fn name(&self) -> &'static str {
        OP
    }
    fn inputs(&self) -> &'static [&'static str] {
        &["a", "b"]
    }
    fn cpu(&self, cfg: &KernelConfig, ins: &Inputs<CpuStorage>) -> Result<Vec<CpuStorage>> {
        cpu::forward(self, cfg, ins)
    }
    #[cfg(feature = "cuda")]
    fn cuda(
        &self,
        _: &KernelConfig,
        _: &Inputs<candle_core::CudaStorage>,
    ) -> Result<Vec<candle_core::CudaStorage>> {
        fail!(OP, "internal: CUDA matmuls go through Candle's matmul")
    }
}

const OP: &str = "matmul";

/// `(batch, M, K, N)` of `op(a) · op(b)` and the output shape, after the argument checks
/// (`batch` 1 when `b` has rank 2: then `a`'s leading dims fold into M).
fn sizes(
    a: &Tensor,
    b: &Tensor,
    ta: bool,
    tb: bool,
) -> Result<(usize, usize, usize, usize, Vec<usize>)> {
    validate::float_dtype(OP, "a", a)?;
    validate::same_dtype_device(OP, "b", b, a)?;
    if a.rank() < 2 {
        fail!(OP, "a must have rank >= 2, got shape {:?}", a.dims())
    }
    if b.rank() < 2 {
        fail!(OP, "b must have rank >= 2, got shape {:?}", b.dims())
    }
    let batched = b.rank() > 2;
    if batched && a.dims()[..a.rank() - 2] != b.dims()[..b.rank() - 2] {
        fail!(
            OP,
            "batched: a and b must have the same leading dims, got shapes {:?} and {:?}",
            a.dims(),
            b.dims()
        )
    }
    if ta && !batched && a.rank() != 2 {
        fail!(
            OP,
            "a transposed (ta = true) with a rank-2 b must have rank 2, got shape {:?}",
            a.dims()
        )
    }
    let ad = a.dims();
    let bd = b.dims();
    let (r, rb) = (ad.len(), bd.len());
    let (am, ak) = if ta {
        (ad[r - 1], ad[r - 2])
    } else {
        (ad[r - 2], ad[r - 1])
    };
    let (bk, bn) = if tb {
        (bd[rb - 1], bd[rb - 2])
    } else {
        (bd[rb - 2], bd[rb - 1])
    };
    if ak != bk {
        fail!(
            OP,
            "inner dimensions differ: op(a) is {:?}x{ak} ({}), op(b) is {bk}x{bn} ({}); a {:?}, b {:?}",
            am,
            if ta { "a transposed" } else { "a" },
            if tb { "b transposed" } else { "b" },
            ad,
            bd
        )
    }
    let lead: usize = ad[..r - 2].iter().product();
    let mut out = ad[..r - 2].to_vec();
    out.extend([am, bn]);
    Ok(if batched {
        (lead, am, ak, bn, out)
    } else {
        (1, lead * am, ak, bn, out)
    })
}

/// Candle's product of the same operands (CUDA, and the bench's peer).
fn candle_matmul(a: &Tensor, b: &Tensor, ta: bool, tb: bool) -> Result<Tensor> {
    let a = if ta { a.t()? } else { a.clone() };
    let b = if tb { b.t()? } else { b.clone() };
    if b.rank() > 2 {
        a.matmul(&b)
    } else {
        a.broadcast_matmul(&b)
    }
}

impl Kernels {
    /// [`matmul`] with this handle's configuration.
    pub fn matmul(&self, a: &Tensor, b: &Tensor, ta: bool, tb: bool) -> Result<Tensor> {
        let (batch, m, k, n, shape) = sizes(a, b, ta, tb)?;
        if !a.device().is_cpu() {
            return candle_matmul(a, b, ta, tb);
        }
        if batch == 0 || m == 0 || n == 0 || k == 0 {
            return Tensor::zeros(shape, a.dtype(), a.device());
        }
        let cfg = self.config;
        let kern = MatmulFwd {
            batch,
            m,
            k,
            n,
            ta,
            tb,
        };
        let c = seam::run(&kern, &cfg, &[Some(a), Some(b)])?.remove(0);
        let me = *self;
        let (a_shape, b_shape) = (a.shape().clone(), b.shape().clone());
        let (ac, bc) = (a.clone(), b.clone());
        let batched = b.rank() > 2;
        seam::attach(OP, c, shape, &[a, b], move |_, g| {
            // Batched: each product's gradients by the same rules. Else g [.., M, N] folds its
            // leading dims like a's.
            let g2 = if batched {
                g.clone()
            } else {
                g.reshape((m, n))?
            };
            let da = if !ac.track_op() {
                None
            } else if ta {
                Some(me.matmul(&bc, &g2, tb, true)?)
            } else {
                Some(me.matmul(&g2, &bc, false, !tb)?.reshape(a_shape.clone())?)
            };
            let db = if !bc.track_op() {
                None
            } else {
                let a2 = if ta || batched {
                    ac.clone()
                } else {
                    ac.reshape((m, k))?
                };
                Some(if tb {
                    me.matmul(&g2, &a2, true, ta)?
                } else {
                    me.matmul(&a2, &g2, !ta, false)?
                })
            };
            debug_assert!(db.as_ref().is_none_or(|t| t.shape() == &b_shape));
            Ok(vec![da, db])
        })
    }
}

/// `op(a) · op(b)` (see the module doc), differentiable in `a` and `b`: `a` `[.., M, K]` (or
/// `[K, M]` with `ta`), `b` `[K, N]` (or `[N, K]` with `tb`), same float dtype and device;
/// or batched: `a` `[.., M, K]` and `b` `[.., K, N]` with the same leading dims (the flags
/// transpose the last two dims of each). `linear(x, W)` is `matmul(x, W, false, true)`.
pub fn matmul(a: &Tensor, b: &Tensor, ta: bool, tb: bool) -> Result<Tensor> {
    Kernels::default().matmul(a, b, ta, tb)
}
