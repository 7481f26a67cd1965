//! Fused LoRA linear: `y = x·Wᵀ (+ bias) + s·(x·Aᵀ)·Bᵀ`, forward and backward.
//!
//! Shapes: `x [..., K]` (any leading dims, flattened to `M` rows), frozen base weight `W [N, K]`,
//! `bias [N]`, adapter `A [r, K]`, `B [N, r]`, scale `s` (PEFT: `alpha / r`).
//!
//! # Math
//!
//! With `u = s·x·Aᵀ` (`M × r`, the only activation the backward keeps besides what autograd
//! keeps anyway) and `g = s·dy·B` (`M × r`):
//!
//! ```text
//! y     = x·Wᵀ + u·Bᵀ + bias
//! dx    = dy·W + g·A
//! dA    = gᵀ·x
//! dB    = dyᵀ·u           (= s·dyᵀ·(x·Aᵀ))
//! dbias = Σ_rows dy
//! dW    = dyᵀ·x           (only when W is a tracked variable, see below)
//! ```
//!
//! The bias rides along the low-rank product as one more column: `u_ext = [u | 1]` (`M×(r+1)`)
//! and `B_ext = [B | bias]` (`N×(r+1)`), so `u_ext·B_extᵀ = u·Bᵀ + bias` and, in the backward,
//! `dyᵀ·u_ext = [dB | dbias]`: the bias costs neither an extra pass over `y` in the forward nor a
//! separate reduction over `dy` in the backward. Both are zero-padded to a multiple of 8
//! columns (and `A`'s packed part to a multiple of 8 elements) so cuBLAS sees 16-byte aligned
//! rows and operands (an odd `r + 1` would push it onto its unaligned, scalar kernels).
//!
//! # Gradients and the frozen weight
//!
//! `x`, `A`, `B` and `bias` get gradients. `W` gets one **only when it is itself tracked**
//! (a `Var`, or computed from one): then `dW = dyᵀ·x` (a full `N×K×M` GEMM) is computed.
//! A `detach`ed or plain weight (what [`crate::nn::LoraLinear`] passes: PEFT freezes the base)
//! costs nothing. Likewise `dx` is computed only when `x` is tracked (the first layer's input
//! usually is not, saving the largest GEMM of the backward).
//!
//! # Candle's three-input limit
//!
//! The op has five inputs. Internally `A`, `B_ext` are packed into one flat "adapter" tensor
//! (a differentiable `cat`: `r·(K+N+1)` elements, tiny next to `W`), and the op is a
//! `CustomOp3 (x, W, adapter)` that also holds `u_ext` (computed by a no-grad op just before).
//! Its backward is one no-grad op that writes `[dx | dW | dA | dB_ext]` into one buffer, split
//! into views; `cat`'s own backward hands `dA`, `dB`, `dbias` to `A`, `B`, `bias`. None of this
//! reaches the public API.
//!
//! # Order of the products and the bytes they move (the CUDA path, cuBLAS)
//!
//! Forward, three GEMMs, all with f32 accumulation (`CUBLAS_COMPUTE_32F`):
//! 1. `u_ext[:, :r] = s·x·Aᵀ` (`M×r×K`; reads `x` once: `M·K` elements) plus a strided memset
//!    of the ones column when there is a bias.
//! 2. `y = u_ext·B_extᵀ` (`M×N×kk`, `kk` = `r + 1` padded to 8, β = 0): writes `y` once
//!    (`M·N`).
//! 3. `y = x·Wᵀ + 1·y` (the base GEMM with β = 1): the low-rank term and the bias are folded in
//!    by the GEMM's epilogue, which reads `y` once (`M·N`) inside a compute-bound kernel.
//!
//! Extra traffic over the bare base GEMM: `M·K` (x again) `+ 2·M·N` (y written, then read by the
//! epilogue) `+ M·r` elements; never a temporary of size `M×N`. Alternatives considered:
//! - base GEMM first, then `y += u·Bᵀ` with β = 1: same bytes, but the extra `y` read+write
//!   happens in a memory-bound low-rank GEMM instead of being overlapped with the base GEMM's
//!   math; the chosen order writes `y` in the cheap GEMM and reads it in the expensive one.
//! - one GEMM on concatenations `[x | u]·[W | B]ᵀ`: `K+r` depth, no `y` round trip, but it
//!   copies `x` (`2·M·K`) and `W` (`2·N·K`) every call: more bytes unless the caller keeps both
//!   concatenated persistently.
//! - fusing `x·Aᵀ` into the base GEMM (`x·[W; A]ᵀ`) reads `x` once but writes `y` strided
//!   inside an `M×(N+r)` buffer (not contiguous for the caller) and needs `[W; A]`
//!   materialised.
//! - a custom GEMM with a second B operand in its main loop would remove the `y` round trip
//!   entirely; cuBLAS cannot express it (left for a CUTLASS-style kernel).
//!
//! Backward (`dx` needed): `g = s·dy·B` (`M×r×N`, reads `dy`), `dx = g·A` (β = 0, writes `dx`),
//! `dx = dy·W + 1·dx` (base-size GEMM, β = 1), `dA = gᵀ·x` (reads `x`), `dB_ext = dyᵀ·u_ext`
//! (reads `dy`). Extra traffic over the bare `dy·W`: `2·M·N` (dy twice more) `+ M·K` (x)
//! `+ 2·M·K` (dx round trip) `+ O((M + N + K)·r)`.
//!
//! # CPU path
//!
//! The same products through the `gemm` crate (what Candle's CPU matmul uses) with its
//! `dst = α·dst + β·lhs·rhs` form for the accumulations, strides for every transpose (no
//! copies). f32 and f64 run in place on all rows at once. f16 and bf16 run in blocks of rows
//! (about 2^20 elements): a block of `x`/`dy`/`u` is widened to f32, computed, and its results
//! rounded once; reductions over rows (dW, dA, dB, dbias) accumulate in f32 across blocks; the
//! weights are widened once per call (O(N·K) against O(M·N·K) work). So half types accumulate
//! in f32 (Candle's CPU matmul widens bf16 the same way, but its f16 GEMM rounds partial sums
//! to f16 between depth blocks) and no `M×N` temporary is made. `u_ext` is stored in the input
//! dtype on both backends.
//!
//! # What to time (bench)
//!
//! Flops (useful work; the padding of `kk` adds at most `2·M·N·7`): forward
//! `2·M·N·K + 2·M·r·K + 2·M·N·(r+1)`; backward with `dx`
//! `2·M·K·N + 2·M·N·r + 2·M·r·K` (dx) `+ 2·r·M·K` (dA) `+ 2·N·M·(r+1)` (dB, dbias)
//! (`+ 2·N·K·M` with dW). Minimum bytes (each input read once, each output written once):
//! forward `e·(M·K + N·K + r·K + N·r + N + M·N)`, backward `e·(M·N + M·K + N·K + (r·K + N·r) +
//! M·r + M·K + r·K + N·r)` with `e` the element size. Compare the forward with the bare
//! `x·Wᵀ` (the limit), Candle composed ops ([`lora_linear_composed`]), merged weights, and
//! PyTorch (`x@W.T + s*((x@A.T)@B.T)`, `torch.addmm`); forward+backward with grads for x, A, B.

pub(crate) mod cpu;
mod op;

#[doc(hidden)]
pub use cpu::set_block_elems as set_cpu_block_elems;
#[cfg(feature = "cuda")]
pub(crate) mod cuda;

use candle_core::{Result, Tensor};

use op::{Dims, LoraDown, LoraFwd, Need};

use crate::validate::{self, fail};

/// Checks of one tensor argument: dtype and device of `x`, exact shape.
fn check_arg(
    op: &str,
    arg: &str,
    t: &Tensor,
    x: &Tensor,
    dims: &[usize],
    what: &str,
) -> Result<()> {
    validate::same_dtype_device(op, arg, t, x)?;
    validate::shape_eq(op, arg, t, dims, what)
}

/// Validates the arguments; returns `(K, N, r)`.
pub(crate) fn check(
    op: &str,
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    a: &Tensor,
    b: &Tensor,
    scale: f64,
) -> Result<(usize, usize, usize)> {
    validate::rank_ge1(op, "x", x)?;
    validate::float_dtype(op, "x", x)?;
    let k = x.dim(candle_core::D::Minus1)?;
    if w.rank() != 2 {
        fail!(op, "w must have shape [N, K] (rank 2), got {:?}", w.dims())
    }
    let n = w.dim(0)?;
    check_arg(op, "w", w, x, &[n, k], "[N, K] with K the last dim of x")?;
    if a.rank() != 2 {
        fail!(op, "a must have shape [r, K] (rank 2), got {:?}", a.dims())
    }
    let r = a.dim(0)?;
    if r == 0 {
        fail!(
            op,
            "a has rank r = 0 rows (shape {:?}); r must be >= 1",
            a.dims()
        )
    }
    if r > k.min(n) {
        fail!(
            op,
            "rank r = {r} (rows of a) exceeds min(K, N) = min({k}, {n}); expected 1 <= r <= {}",
            k.min(n)
        )
    }
    check_arg(op, "a", a, x, &[r, k], "[r, K] with K the last dim of x")?;
    check_arg(
        op,
        "b",
        b,
        x,
        &[n, r],
        "[N, r] with N the rows of w, r the rows of a",
    )?;
    if let Some(bias) = bias {
        check_arg(op, "bias", bias, x, &[n], "[N] with N the rows of w")?;
    }
    validate::finite(op, "scale", scale)?;
    Ok((k, n, r))
}

/// `y = x·Wᵀ (+ bias) + scale·(x·Aᵀ)·Bᵀ`, differentiable in `x`, `a`, `b`, `bias` (and in `w`
/// when `w` is tracked; a detached/frozen weight costs no gradient work).
///
/// `x [..., K]`, `w [N, K]`, `bias [N]`, `a [r, K]`, `b [N, r]` with `1 <= r <= min(K, N)`,
/// all of one float dtype (f32, f64, f16, bf16; half types accumulate in f32) and one device.
/// Returns `[..., N]`. Non-contiguous inputs are copied to contiguous ones first. An `x` with
/// no rows gives an empty output.
pub fn lora_linear(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    a: &Tensor,
    b: &Tensor,
    scale: f64,
) -> Result<Tensor> {
    const OP: &str = "lora_linear";
    check(OP, x, w, bias, a, b, scale)?;
    core(x, Some(w), bias, Some((a, b)), scale)
}

/// A plain linear layer `y = x·Wᵀ (+ bias)` through the same kernels (the bias folded into
/// the GEMM as above): what a merged or disabled [`crate::nn::LoraLinear`] runs. Differentiable
/// in `x` and `bias` (and `w` when tracked).
pub fn linear(x: &Tensor, w: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    const OP: &str = "linear";
    validate::rank_ge1(OP, "x", x)?;
    validate::float_dtype(OP, "x", x)?;
    let k = x.dim(candle_core::D::Minus1)?;
    if w.rank() != 2 {
        fail!(OP, "w must have shape [N, K] (rank 2), got {:?}", w.dims())
    }
    let n = w.dim(0)?;
    check_arg(OP, "w", w, x, &[n, k], "[N, K] with K the last dim of x")?;
    if let Some(bias) = bias {
        check_arg(OP, "bias", bias, x, &[n], "[N] with N the rows of w")?;
    }
    core(x, Some(w), bias, None, 0.0)
}

/// The adapter branch alone, `scale·(x·Aᵀ)·Bᵀ` (the dropout path of `LoraLinear`, whose
/// adapter sees a different input than the base product).
pub(crate) fn adapter_only(x: &Tensor, a: &Tensor, b: &Tensor, scale: f64) -> Result<Tensor> {
    const OP: &str = "lora_adapter";
    validate::rank_ge1(OP, "x", x)?;
    validate::float_dtype(OP, "x", x)?;
    let k = x.dim(candle_core::D::Minus1)?;
    let r = a.dim(0)?;
    let n = b.dim(0)?;
    check_arg(OP, "a", a, x, &[r, k], "[r, K]")?;
    check_arg(OP, "b", b, x, &[n, r], "[N, r]")?;
    validate::finite(OP, "scale", scale)?;
    core(x, None, None, Some((a, b)), scale)
}

/// The general form behind [`lora_linear`] and [`crate::nn::LoraLinear`] (arguments already
/// validated): `x·Wᵀ` when `w` is given, `+ bias`, `+ scale·(x·Aᵀ)·Bᵀ` when an adapter is
/// given. At least one of `w` and the adapter must be given.
pub(crate) fn core(
    x: &Tensor,
    w: Option<&Tensor>,
    bias: Option<&Tensor>,
    adapter: Option<(&Tensor, &Tensor)>,
    scale: f64,
) -> Result<Tensor> {
    let dims = x.dims();
    let k = dims[dims.len() - 1];
    let m: usize = dims[..dims.len() - 1].iter().product();
    let n = match (w, adapter) {
        (Some(w), _) => w.dim(0)?,
        (None, Some((_, b))) => b.dim(0)?,
        (None, None) => fail!(
            "lora_linear",
            "internal: neither a base weight nor an adapter"
        ),
    };
    let r = adapter.map(|(a, _)| a.dim(0)).transpose()?.unwrap_or(0);
    let mut out_dims = dims[..dims.len() - 1].to_vec();
    out_dims.push(n);
    if m == 0 {
        return Tensor::zeros(out_dims, x.dtype(), x.device());
    }
    if k == 0 || n == 0 {
        // Empty products: y is the bias (or zeros), and no GEMM has anything to do.
        let y = Tensor::zeros((m, n), x.dtype(), x.device())?;
        let y = match bias {
            Some(bias) => y.broadcast_add(bias)?,
            None => y,
        };
        return y.reshape(out_dims);
    }
    let d = Dims {
        m,
        k,
        n,
        r,
        bias: bias.is_some(),
        base: w.is_some(),
    };
    gemm_limit("lora_linear", &d)?;
    let x2 = x.reshape((m, k))?.contiguous()?;
    let w = w.map(|w| w.contiguous()).transpose()?;
    let packed = pack_adapter(x, &d, bias, adapter)?;
    let u = low_rank_input(&x2, &d, adapter, scale)?;
    let need = Need {
        dx: x.track_op(),
        dw: w.as_ref().is_some_and(|w| w.track_op()),
        da: adapter.is_some_and(|(a, _)| a.track_op()),
        db: adapter.is_some_and(|(_, b)| b.track_op()) || bias.is_some_and(|b| b.track_op()),
    };
    let op = LoraFwd {
        dims: d,
        scale,
        need,
        u,
    };
    let y = match (&w, &packed) {
        (Some(w), Some(p)) => x2.apply_op3(w, p, op)?,
        (Some(w), None) => x2.apply_op2(w, op)?,
        (None, Some(p)) => x2.apply_op2(p, op)?,
        (None, None) => unreachable!("checked above"),
    };
    y.reshape(out_dims)
}

/// cuBLAS takes `i32` sizes.
fn gemm_limit(op: &str, d: &Dims) -> Result<()> {
    let (m, k, n) = (d.m, d.k, d.n);
    if m > i32::MAX as usize || k > i32::MAX as usize || n > i32::MAX as usize {
        fail!(
            op,
            "sizes M = {m}, K = {k}, N = {n} exceed the GEMM limit of 2^31 - 1 per dimension"
        )
    }
    Ok(())
}

/// The packed adapter `[A | 0.. | B_ext]` with `B_ext = [B | bias | 0..]` (widths padded to
/// multiples of `PAD`); a differentiable `cat`, so `A`, `B`, `bias` get their gradients (the
/// zero pads' gradients are dropped by cat's backward). `None` when there is neither an adapter
/// nor a bias.
fn pack_adapter(
    x: &Tensor,
    d: &Dims,
    bias: Option<&Tensor>,
    adapter: Option<(&Tensor, &Tensor)>,
) -> Result<Option<Tensor>> {
    let (k, n, r, kk) = (d.k, d.n, d.r, d.kk());
    if kk == 0 {
        return Ok(None);
    }
    let zeros = |len: usize, shape: &[usize]| -> Result<Option<Tensor>> {
        if len == 0 {
            Ok(None)
        } else {
            Tensor::zeros(shape, x.dtype(), x.device()).map(Some)
        }
    };
    let mut cols: Vec<Tensor> = Vec::new();
    if let Some((_, b)) = adapter {
        cols.push(b.clone());
    }
    if let Some(bias) = bias {
        cols.push(bias.unsqueeze(1)?);
    }
    let used = r + usize::from(d.bias);
    cols.extend(zeros(kk - used, &[n, kk - used])?);
    let bext = Tensor::cat(&cols, 1)?.flatten_all()?;
    let mut parts = Vec::new();
    if let Some((a, _)) = adapter {
        parts.push(a.flatten_all()?);
        parts.extend(zeros(d.a_len() - r * k, &[d.a_len() - r * k])?);
    }
    parts.push(bext);
    Ok(Some(Tensor::cat(&parts, 0)?.contiguous()?))
}

/// `u_ext = [s·x·Aᵀ | 1 | 0..]` (`M × kk`), a constant of the graph (no gradient flows
/// through it); `None` without adapter and bias.
fn low_rank_input(
    x2: &Tensor,
    d: &Dims,
    adapter: Option<(&Tensor, &Tensor)>,
    scale: f64,
) -> Result<Option<Tensor>> {
    Ok(match adapter {
        Some((a, _)) => Some(
            x2.detach()
                .apply_op2_no_bwd(&a.detach().contiguous()?, &LoraDown { dims: *d, scale })?,
        ),
        None if d.bias => {
            let ones = Tensor::ones((d.m, 1), x2.dtype(), x2.device())?;
            let pad = Tensor::zeros((d.m, d.kk() - 1), x2.dtype(), x2.device())?;
            Some(Tensor::cat(&[ones, pad], 1)?)
        }
        None => None,
    })
}

/// The gradients [`lora_linear_backward`] returns.
#[derive(Debug, Clone)]
pub struct LoraGrads {
    /// `dy·W + s·(dy·B)·A`, shape of `x`.
    pub dx: Tensor,
    /// `s·(dy·B)ᵀ·x`, `[r, K]`.
    pub da: Tensor,
    /// `s·dyᵀ·(x·Aᵀ)`, `[N, r]`.
    pub db: Tensor,
    /// `Σ_rows dy`, `[N]` (when a bias was given).
    pub dbias: Option<Tensor>,
}

/// The backward of [`lora_linear`] given the output gradient `dy` (`[..., N]`), outside
/// autograd: the same kernels `Tensor::backward` runs through [`lora_linear`] (CPU: gemm,
/// CUDA: cuBLAS), for custom training loops and for timing the backward alone. `W` is frozen
/// (no `dW`). Arguments as [`lora_linear`]; `dy` must match its output's shape, dtype and
/// device.
pub fn lora_linear_backward(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    a: &Tensor,
    b: &Tensor,
    scale: f64,
    dy: &Tensor,
) -> Result<LoraGrads> {
    const OP: &str = "lora_linear_backward";
    let (k, n, r) = check(OP, x, w, bias, a, b, scale)?;
    let dims = x.dims();
    let m: usize = dims[..dims.len() - 1].iter().product();
    let mut out_dims = dims[..dims.len() - 1].to_vec();
    out_dims.push(n);
    check_arg(OP, "dy", dy, x, &out_dims, "the output's shape [..., N]")?;
    let (dt, dev) = (x.dtype(), x.device());
    if m == 0 || k == 0 || n == 0 {
        // Empty products: every gradient is zero (or empty).
        let dy2 = dy.reshape((m, n))?.to_dtype(candle_core::DType::F32)?;
        return Ok(LoraGrads {
            dx: Tensor::zeros(dims, dt, dev)?,
            da: Tensor::zeros((r, k), dt, dev)?,
            db: Tensor::zeros((n, r), dt, dev)?,
            dbias: match bias {
                Some(_) => Some(dy2.sum(0)?.to_dtype(dt)?),
                None => None,
            },
        });
    }
    let d = Dims {
        m,
        k,
        n,
        r,
        bias: bias.is_some(),
        base: true,
    };
    gemm_limit(OP, &d)?;
    let x2 = x.reshape((m, k))?.contiguous()?.detach();
    let (a, b) = (a.detach(), b.detach());
    let bias = bias.map(|t| t.detach());
    let adapter = pack_adapter(&x2, &d, bias.as_ref(), Some((&a, &b)))?;
    let u = low_rank_input(&x2, &d, Some((&a, &b)), scale)?;
    let need = Need {
        dx: true,
        dw: false,
        da: true,
        db: true,
    };
    let op = LoraFwd {
        dims: d,
        scale,
        need,
        u,
    };
    let dy2 = dy.reshape((m, n))?;
    let w = w.detach().contiguous()?;
    let (dx, _, dad) = op.backward(&x2, Some(&w), adapter.as_ref(), &dy2)?;
    let missing = || validate::err(OP, "internal: the backward returned no gradient");
    let dx = dx.ok_or_else(missing)?.reshape(dims)?;
    // The adapter's gradient, unpacked like `pack_adapter` packed it: [dA | 0.. | dB_ext].
    let dad = dad.ok_or_else(missing)?;
    let da = dad.narrow(0, 0, r * k)?.reshape((r, k))?;
    let bext = dad.narrow(0, d.a_len(), n * d.kk())?.reshape((n, d.kk()))?;
    Ok(LoraGrads {
        dx,
        da,
        db: bext.narrow(1, 0, r)?.contiguous()?,
        dbias: match d.bias {
            true => Some(bext.narrow(1, r, 1)?.squeeze(1)?.contiguous()?),
            false => None,
        },
    })
}

/// The same function from composed Candle ops (`matmul`, `broadcast_add`, `affine`): the
/// reference of the tests (in f64) and the "Candle composed" row of the bench (what
/// candle-lora does).
pub fn lora_linear_composed(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    a: &Tensor,
    b: &Tensor,
    scale: f64,
) -> Result<Tensor> {
    let dims = x.dims();
    let k = dims[dims.len() - 1];
    let m: usize = dims[..dims.len() - 1].iter().product();
    let x2 = x.reshape((m, k))?;
    let mut y = x2.matmul(&w.t()?)?;
    if let Some(bias) = bias {
        y = y.broadcast_add(bias)?;
    }
    let low = x2.matmul(&a.t()?)?.matmul(&b.t()?)?.affine(scale, 0.0)?;
    let y = (y + low)?;
    let mut out = dims[..dims.len() - 1].to_vec();
    out.push(w.dim(0)?);
    y.reshape(out)
}
