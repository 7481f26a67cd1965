//! Linear + cross-entropy: `loss = CE(h·wᵀ, targets)` (the LM head and the loss) without the
//! full `[N, V]` logits.
//!
//! `h` `[.., H]` (leading dims flattened to `N` tokens), `w` `[V, H]` (the LM head; with tied
//! embeddings the embedding matrix), targets and options as in [`super::cross_entropy`].
//! Tokens are processed in chunks of `C` rows (default [`default_chunk`]: `C·V ≈ N·H`, a
//! chunk's logits about the size of `h`, rounded up to a multiple of 16 rows and at least 128
//! rows so the GEMMs stay efficient; with dW [`default_chunk_dw`], larger, so that the
//! accumulator is not re-read for every small chunk; on a GPU at least
//! [`MIN_CHUNK_ROWS_GPU`]: [`default_chunk_on`]; `chunk: Some(n)` forces `n`). Per chunk:
//!
//! 1. `logits_c = h_c·wᵀ` (GEMM: [`super::matmul`], cuBLAS or the gemm crate), `[C, V]`;
//! 2. the fused cross-entropy kernel, **in place**: one pass over `logits_c` gives the chunk's
//!    row losses and overwrites `logits_c` with `s·d loss / d logits_c` (`s` the loss scale times
//!    `dloss`), so no second `[C, V]` buffer is needed;
//! 3. `dh_c = dlogits_c·w` (GEMM), copied into `dh`;
//! 4. only when `w` needs a gradient: `dw += dlogits_cᵀ·h_c`, accumulated **in f32** (f64 for
//!    f64) in place (CUDA: one `cublasGemmEx` with `β = 1` into the f32 accumulator; CPU: the
//!    gemm crate's `dst += lhs·rhs`), rounded once to `w`'s dtype at the end. A frozen head
//!    costs no dW GEMM.
//!
//! Chunks whose targets are all ignored are skipped (no GEMM). Peak extra memory: `dh`
//! (`N·H`), one logits chunk (`C·V`) plus its `dh_c` (`C·H`), and with dW the f32 accumulator
//! `[V, H]` (and, for half types on the CPU, f32 copies of one chunk); never `[N, V]`. (On
//! the CPU a bf16 GEMM also widens its operands, `w` included, to f32 for the call: the gemm
//! crate has no bf16 kernel; Candle's CPU matmul does the same.)
//!
//! Gradients are produced during the forward (Liger-Kernel's way): [`linear_cross_entropy`]
//! keeps `dh` (and `dw`) and its backward multiplies them by the incoming gradient;
//! [`linear_cross_entropy_forward_backward`] returns them for an explicit training step.
//! Without any tracked input the forward skips the gradient work (loss only).
//!
//! **Half inputs**: the logits chunk is in the input dtype (bf16/f16), as PyTorch and Liger
//! compute it: an f32 chunk would need `w` in f32 (a `[V, H]` f32 copy, 2 GB for Llama 3's
//! head) or a mixed-type GEMM, for at most one bf16 rounding of each logit (2⁻⁹ relative). The
//! CE kernel reads it in f32 and accumulates in f32; `dlogits` is rounded once to the input
//! dtype, the GEMMs accumulate in f32 (on the CPU also for one-row chunks, whose f16 GEMV in
//! the gemm crate would accumulate in f16: [`super::matmul`] avoids it) and `dw` accumulates
//! across chunks in f32.

pub(crate) mod cpu;
#[cfg(feature = "cuda")]
pub(crate) mod cuda;

use candle_core::{DType, Device, Result, Storage, Tensor};

use super::cross_entropy::{self as ce, CeFused, CeFwd, CrossEntropyConfig, Params};
use crate::config::{KernelConfig, Kernels};
use crate::seam::{self, InplaceKernel};
use crate::validate::{self, fail};

const OP: &str = "linear_cross_entropy";

/// `dw += dlogitsᵀ·h` in place: destination the f32 (f64 for f64) accumulator `[V, H]`,
/// inputs `dlogits` `[C, V]` and `h` `[C, H]` in the input dtype.
#[derive(Debug, Clone, Copy)]
pub(crate) struct DwAccum {
    pub name: &'static str,
}

impl InplaceKernel for DwAccum {
    fn name(&self) -> &'static str {
        self.name
    }
    fn inputs(&self) -> &'static [&'static str] {
        &["dw", "dlogits", "h"]
    }
    crate::seam::backends!(in_place cpu::dw_accum, cuda::dw_accum);
}

/// Loss and gradients of [`linear_cross_entropy_forward_backward`].
#[derive(Debug, Clone)]
pub struct LinearCrossEntropy {
    /// The loss, an f32 scalar (shape `[]`).
    pub loss: Tensor,
    /// `d (dloss·loss) / d h`: h's shape and dtype.
    pub dh: Tensor,
    /// `d (dloss·loss) / d w` (`[V, H]`, w's dtype) when asked for.
    pub dw: Option<Tensor>,
    /// Rows whose target is not ignored (the `Mean` divisor).
    pub n_valid: usize,
}

/// The fewest rows of a default chunk: GEMMs of fewer rows run far below peak (tensor-core
/// tiles of 64–128 rows; on the CPU, the gemm crate re-packs `w` for every chunk).
pub const MIN_CHUNK_ROWS: usize = 128;

/// The default chunk: `C·V ≈ N·H` (a chunk's logits about the size of `h`), rounded up to a
/// multiple of 16 rows, at least [`MIN_CHUNK_ROWS`], at most `N`.
pub fn default_chunk(n: usize, h: usize, v: usize) -> usize {
    (n * h)
        .div_ceil(v.max(1))
        .next_multiple_of(16)
        .max(MIN_CHUNK_ROWS)
        .clamp(1, n.max(1))
}

/// The default chunk when `w`'s gradient is accumulated: at least [`default_chunk`], and up to
/// a chunk whose logits take half the bytes of the `[V, H]` accumulator (`C = H·a / (2e)`, `a`
/// the accumulator's and `e` the input's element bytes; a multiple of 16 rows, at most `N`).
/// Every chunk's dW GEMM reads and writes the whole accumulator (`2·V·H·a` bytes for `2·C·V·H`
/// flops): with Llama 3's head (`H` = 4096, bf16) the default 272-row chunks made that traffic
/// 31 × 4.2 GB, more than the GEMMs' own time on an H200; 4096-row chunks make it 2 × 4.2 GB.
/// The accumulator already dominates the extra memory then, so the larger chunk costs at most
/// half of it again.
pub fn default_chunk_dw(n: usize, h: usize, v: usize, dtype: DType) -> usize {
    let (e, a) = match dtype {
        DType::F64 => (8, 8),
        d => (d.size_in_bytes(), 4),
    };
    let big = (h * a / (2 * e)) / 16 * 16;
    default_chunk(n, h, v).max(big.min(n))
}

/// The fewest rows of a default chunk on a GPU. Measured on an H200 (2026-12-02, bench rows
/// `ours_c*`, bf16, 8192 tokens): each chunk's `dh` GEMM has only `C × H` outputs over a
/// `K = V` reduction, so small chunks leave SMs idle; Llama 3's head (H 4096) fwd+bwd took
/// 31.4 ms at the 272-row default and 27.5 ms at 1024 rows (2048: 27.5, 4096: 27.1; its GEMMs
/// alone 24.9), Qwen2.5-0.5B's (H 896) 14.3 ms at 128 rows and 9.4 ms at 1024, for about
/// 310 MB of extra memory (the full logits would take 2.1 and 2.5 GB).
pub const MIN_CHUNK_ROWS_GPU: usize = 1024;

/// The default chunk for `h` on its device: [`default_chunk`] (or [`default_chunk_dw`] when
/// w's gradient is accumulated), on a GPU at least [`MIN_CHUNK_ROWS_GPU`] rows (at most `N`).
pub fn default_chunk_on(
    device: &Device,
    n: usize,
    h: usize,
    v: usize,
    dtype: DType,
    need_dw: bool,
) -> usize {
    let c = match need_dw {
        true => default_chunk_dw(n, h, v, dtype),
        false => default_chunk(n, h, v),
    };
    if device.is_cpu() {
        c
    } else {
        c.max(MIN_CHUNK_ROWS_GPU.min(n))
    }
}

/// What one run produces.
struct Out {
    loss: Storage,
    dh: Option<Tensor>,
    dw: Option<Tensor>,
    n_valid: usize,
}

/// Checks the arguments; returns `(N, H, V, leading dims)`.
fn check(
    op: &str,
    h: &Tensor,
    w: &Tensor,
    cfg: &CrossEntropyConfig,
    chunk: Option<usize>,
) -> Result<(usize, usize, usize, Vec<usize>)> {
    ce::check_config(op, cfg)?;
    let (n, hd, lead) = ce::check_rows(op, "h", h)?;
    if w.rank() != 2 {
        fail!(
            op,
            "w has shape {:?}, expected [V, {hd}] (rank 2: vocabulary × hidden)",
            w.dims()
        )
    }
    validate::same_dtype_device(op, "w", w, h)?;
    let (v, wh) = (w.dim(0)?, w.dim(1)?);
    if wh != hd {
        fail!(
            op,
            "w has shape {:?}, expected [V, {hd}] (its second dim is the last dim of h)",
            w.dims()
        )
    }
    if v == 0 || v > i32::MAX as usize {
        fail!(op, "w has {v} rows (classes), expected 1..={}", i32::MAX)
    }
    if chunk == Some(0) {
        fail!(op, "chunk must be at least 1 row, got Some(0)")
    }
    Ok((n, hd, v, lead))
}

/// The chunk loop (module doc). `need_dh`/`need_dw`: which gradients to produce (neither:
/// the loss only); `dloss` scales them.
#[allow(clippy::too_many_arguments)]
fn run(
    kc: &KernelConfig,
    op: &'static str,
    h: &Tensor,
    w: &Tensor,
    targets: &Tensor,
    cfg: &CrossEntropyConfig,
    chunk: Option<usize>,
    need_dh: bool,
    need_dw: bool,
    dloss: f64,
) -> Result<Out> {
    let (n, hd, v, lead) = check(op, h, w, cfg, chunk)?;
    validate::finite(op, "dloss", dloss)?;
    let tg = ce::check_targets(op, targets, &lead, v, cfg.ignore_index, h.device())?;
    let (dt, dev) = (h.dtype(), h.device().clone());
    let acc_dt = if dt == DType::F64 {
        DType::F64
    } else {
        DType::F32
    };
    let p = Params::of(cfg);
    let scale = ce::loss_scale(cfg, tg.n_valid);
    let c = chunk
        .unwrap_or_else(|| default_chunk_on(&dev, n, hd, v, dt, need_dw))
        .min(n);
    let h2 = h.detach().reshape((n, hd))?.contiguous()?;
    let w = w.detach().contiguous()?;
    let mm = Kernels::new(*kc);
    let grads = need_dh || need_dw;
    let dh = if need_dh {
        Some(Tensor::zeros((n, hd), dt, &dev)?)
    } else {
        None
    };
    let acc = if need_dw {
        Some(Tensor::zeros((v, hd), acc_dt, &dev)?)
    } else {
        None
    };
    let fused = CeFused {
        p,
        scale: scale * dloss,
        name: op,
    };
    // Per chunk: its row losses (gradient path) or its scaled loss (loss only).
    let mut parts: Vec<Tensor> = Vec::new();
    for r0 in (0..n).step_by(c) {
        let len = c.min(n - r0);
        if tg.host[r0..r0 + len].iter().all(|&t| t < 0) {
            continue;
        }
        let hc = h2.narrow(0, r0, len)?;
        let tc = tg.t.narrow(0, r0, len)?;
        let logits = mm.matmul(&hc, &w, false, true)?;
        if !grads {
            let k = CeFwd { p, scale, name: op };
            let mut o = seam::run(&k, kc, &[Some(&logits), Some(&tc)])?;
            parts.push(seam::tensor(o.remove(0), 1));
            continue;
        }
        let mut o = seam::run_inplace(&fused, kc, &logits, &[&tc])?;
        if o.is_empty() {
            fail!(op, "internal: the chunk kernel returned no losses")
        }
        parts.push(seam::tensor(o.remove(0), len));
        if let Some(dh) = &dh {
            dh.slice_set(&mm.matmul(&logits, &w, false, false)?, 0, r0)?;
        }
        if let Some(acc) = &acc {
            seam::run_inplace(&DwAccum { name: op }, kc, acc, &[&logits, &hc])?;
        }
    }
    let (parts, s) = match (parts.is_empty(), grads) {
        (true, _) => (Tensor::zeros(1, DType::F32, &dev)?, 1.0),
        (false, true) => (Tensor::cat(&parts, 0)?, scale),
        (false, false) => (Tensor::cat(&parts, 0)?, 1.0),
    };
    let loss = ce::sum_rows(kc, op, &parts, s)?;
    let dh = dh.map(|t| t.reshape(h.shape())).transpose()?;
    let dw = match acc {
        Some(a) if a.dtype() != w.dtype() => Some(a.to_dtype(w.dtype())?),
        other => other,
    };
    Ok(Out {
        loss,
        dh,
        dw,
        n_valid: tg.n_valid,
    })
}

impl Kernels {
    /// [`linear_cross_entropy`] with this handle's configuration.
    pub fn linear_cross_entropy(
        &self,
        h: &Tensor,
        w: &Tensor,
        targets: &Tensor,
        cfg: &CrossEntropyConfig,
        chunk: Option<usize>,
    ) -> Result<Tensor> {
        let (need_dh, need_dw) = (h.track_op(), w.track_op());
        let out = run(
            &self.config,
            OP,
            h,
            w,
            targets,
            cfg,
            chunk,
            need_dh,
            need_dw,
            1.0,
        )?;
        let (dh, dw) = (out.dh, out.dw);
        seam::attach(OP, out.loss, (), &[h, w], move |_, g| {
            // The product in f32 (f64 for f64), rounded once: a half `g` would add its own
            // rounding (2⁻⁹ relative for bf16) to the stored gradient's.
            let times = |t: &Tensor| {
                let acc = if t.dtype() == DType::F64 {
                    DType::F64
                } else {
                    DType::F32
                };
                t.to_dtype(acc)?
                    .broadcast_mul(&g.to_dtype(acc)?)?
                    .to_dtype(t.dtype())
            };
            Ok(vec![
                dh.as_ref().map(times).transpose()?,
                dw.as_ref().map(times).transpose()?,
            ])
        })
    }

    /// [`linear_cross_entropy_forward_backward`] with this handle's configuration.
    #[allow(clippy::too_many_arguments)]
    pub fn linear_cross_entropy_forward_backward(
        &self,
        h: &Tensor,
        w: &Tensor,
        targets: &Tensor,
        cfg: &CrossEntropyConfig,
        chunk: Option<usize>,
        need_dw: bool,
        dloss: f64,
    ) -> Result<LinearCrossEntropy> {
        const OP: &str = "linear_cross_entropy_forward_backward";
        let out = run(
            &self.config,
            OP,
            h,
            w,
            targets,
            cfg,
            chunk,
            true,
            need_dw,
            dloss,
        )?;
        let Some(dh) = out.dh else {
            fail!(OP, "internal: no dh")
        };
        Ok(LinearCrossEntropy {
            loss: seam::tensor(out.loss, ()),
            dh,
            dw: out.dw,
            n_valid: out.n_valid,
        })
    }
}

/// `CE(h·wᵀ, targets)` (see [`super::cross_entropy`] for `cfg`) without the `[N, V]` logits:
/// tokens in chunks of `chunk` rows (`None`: a chunk's logits about the size of `h`). `h`
/// `[.., H]`, `w` `[V, H]` of h's dtype (tied embeddings: the embedding matrix), targets
/// `[..]` (i64 or u32). Returns the f32 scalar loss, differentiable in `h`, and in `w` when `w`
/// is tracked (a frozen head costs no dW GEMM). The gradients are computed during this call
/// and kept until the backward (module doc).
pub fn linear_cross_entropy(
    h: &Tensor,
    w: &Tensor,
    targets: &Tensor,
    cfg: &CrossEntropyConfig,
    chunk: Option<usize>,
) -> Result<Tensor> {
    Kernels::default().linear_cross_entropy(h, w, targets, cfg, chunk)
}

/// The explicit training step's entry: the loss and the gradients of `dloss · loss` with
/// respect to `h` (always) and `w` (when `need_dw`) in one pass over the chunks, plus the number
/// of counted targets. Same arguments as [`linear_cross_entropy`].
pub fn linear_cross_entropy_forward_backward(
    h: &Tensor,
    w: &Tensor,
    targets: &Tensor,
    cfg: &CrossEntropyConfig,
    chunk: Option<usize>,
    need_dw: bool,
    dloss: f64,
) -> Result<LinearCrossEntropy> {
    Kernels::default()
        .linear_cross_entropy_forward_backward(h, w, targets, cfg, chunk, need_dw, dloss)
}
