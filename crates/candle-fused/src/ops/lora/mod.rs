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
//! columns so cuBLAS sees 16-byte aligned rows (an odd `r + 1` would push it onto its
//! unaligned, scalar kernels).
//!
//! # Gradients and the frozen weight
//!
//! `x`, `A`, `B` and `bias` get gradients. `W` gets one **only when it is itself tracked**
//! (a `Var`, or computed from one): then `dW = dyᵀ·x` (a full `N×K×M` GEMM) is computed.
//! A `detach`ed or plain weight (what [`crate::nn::LoraLinear`] passes: PEFT freezes the base)
//! costs nothing. Likewise `dx` is computed only when `x` is tracked (the first layer's input
//! usually is not, saving the largest GEMM of the backward).
//!
//! # Kernels and autograd
//!
//! Three kernels of plain data (sizes, scale, which inputs are present, which gradients are
//! needed) on the crate's seam ([`crate::seam`]):
//! - [`LoraFwd`] `(x, w?, a?, b?, bias?) -> (y, u_ext?)`: the forward, returning the low-rank
//!   activation `u_ext` the backward needs;
//! - [`LoraDown`] `(x, a) -> u_ext`: `u_ext` alone (the standalone backward recomputes it);
//! - [`LoraBwd`] `(dy, x?, w?, a?, b?, u_ext?) -> (dx?, dw?, da?, db?, dbias?)`: the requested
//!   gradients, each its own output.
//!
//! `y` is attached to the graph with `x`, `w`, `a`, `b`, `bias` as parents (the seam packs
//! more than three tracked parents itself); its backward closure runs [`LoraBwd`] on what it
//! captured. The padded layouts (`u_ext`, `B_ext`) never leave the op: `B_ext` is built inside
//! each backend from `b` and `bias`, and `u_ext` is only ever handed back to [`LoraBwd`].
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
//! (about [`crate::config::CpuConfig::half_gemm_block`] elements, 2^20 by default): a block of `x`/`dy`/`u` is widened to f32, computed, and its results
//! rounded once; reductions over rows (dW, dA, dB, dbias) accumulate in f32 across blocks; the
//! weights are widened once per call (O(N·K) against O(M·N·K) work). So half types accumulate
//! in f32 (Candle's CPU matmul widens bf16 the same way, but its f16 GEMM rounds partial sums
//! to f16 between depth blocks) and no `M×N` temporary is made. `u_ext` is stored in the input
//! dtype on both backends. On CUDA, f64 is a clear error like for every other op.
//!
//! # What to time (bench)
//!
//! Flops (useful work; the padding of `kk` adds at most `2·M·N·7`): forward
//! `2·M·N·K + 2·M·r·K + 2·M·N·(r+1)`; backward with `dx`
//! `2·M·K·N + 2·M·N·r + 2·M·r·K` (dx) `+ 2·r·M·K` (dA) `+ 2·N·M·(r+1)` (dB, dbias)
//! (`+ 2·N·K·M` with dW). Minimum bytes (each input read once, each output written once):
//! forward `e·(M·K + N·K + r·K + N·r + N + M·N)`, backward `e·(M·N + M·K + N·K + (r·K + N·r) +
//! M·r + M·K + r·K + N·r)` with `e` the element size. Compare the forward with the bare
//! `x·Wᵀ` (the limit), Candle composed ops (`candle_fused_testkit::reference::lora_linear`), merged weights, and
//! PyTorch (`x@W.T + s*((x@A.T)@B.T)`, `torch.addmm`); forward+backward with grads for x, A, B.

mod cpu;
#[cfg(feature = "cuda")]
mod cuda;
mod kernels;

use candle_core::{Result, Tensor};

use crate::config::{KernelConfig, Kernels};
use crate::seam::{self, Kernel};
use crate::validate::{self, fail};
use kernels::{Dims, LoraBwd, LoraDown, LoraFwd, Need};

impl Kernel for LoraFwd {
    fn name(&self) -> &'static str {
        self.name
    }
    fn inputs(&self) -> &'static [&'static str] {
        &["x", "w", "a", "b", "bias"]
    }
    seam::backends!(cpu::forward, cuda::forward);
}

impl Kernel for LoraDown {
    fn name(&self) -> &'static str {
        self.name
    }
    fn inputs(&self) -> &'static [&'static str] {
        &["x", "a"]
    }
    seam::backends!(cpu::down, cuda::down);
}

impl Kernel for LoraBwd {
    fn name(&self) -> &'static str {
        self.name
    }
    fn inputs(&self) -> &'static [&'static str] {
        &["dy", "x", "w", "a", "b", "u_ext"]
    }
    seam::backends!(cpu::backward, cuda::backward);
}

/// `x` (rank >= 1, float) and `w` (`[N, K]`); returns `(K, N)`.
fn check_base(op: &str, x: &Tensor, w: &Tensor) -> Result<(usize, usize)> {
    validate::rank_ge1(op, "x", x)?;
    validate::float_dtype(op, "x", x)?;
    let k = x.dim(candle_core::D::Minus1)?;
    if w.rank() != 2 {
        fail!(op, "w must have shape [N, K] (rank 2), got {:?}", w.dims())
    }
    let n = w.dim(0)?;
    validate::like(op, "w", w, x, &[n, k], "[N, K] with K the last dim of x")?;
    Ok((k, n))
}

/// Validates the arguments of the LoRA linear; returns `(K, N, r)`.
pub(crate) fn check(
    op: &str,
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    a: &Tensor,
    b: &Tensor,
    scale: f64,
) -> Result<(usize, usize, usize)> {
    let (k, n) = check_base(op, x, w)?;
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
    validate::like(op, "a", a, x, &[r, k], "[r, K] with K the last dim of x")?;
    validate::like(
        op,
        "b",
        b,
        x,
        &[n, r],
        "[N, r] with N the rows of w, r the rows of a",
    )?;
    if let Some(bias) = bias {
        validate::like(op, "bias", bias, x, &[n], "[N] with N the rows of w")?;
    }
    validate::finite(op, "scale", scale)?;
    Ok((k, n, r))
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

/// `(M, K)` of `x [..., K]` and the output dims `[..., n]`.
fn rows_of(x: &Tensor, n: usize) -> (usize, usize, Vec<usize>) {
    let dims = x.dims();
    let k = dims[dims.len() - 1];
    let m: usize = dims[..dims.len() - 1].iter().product();
    let mut out = dims[..dims.len() - 1].to_vec();
    out.push(n);
    (m, k, out)
}

/// The gradients one [`LoraBwd`] run returns (`None` where not asked for).
#[derive(Default)]
struct BwdOut {
    dx: Option<Tensor>,
    dw: Option<Tensor>,
    da: Option<Tensor>,
    db: Option<Tensor>,
    dbias: Option<Tensor>,
}

/// Runs [`LoraBwd`] outside autograd (the autograd closure and [`lora_linear_backward`]).
/// `x2` is `x` as `[M, K]`; absent inputs are those no needed gradient uses.
#[allow(clippy::too_many_arguments)]
fn run_backward(
    cfg: &KernelConfig,
    k: &LoraBwd,
    dy: &Tensor,
    x2: Option<&Tensor>,
    w: Option<&Tensor>,
    a: Option<&Tensor>,
    b: Option<&Tensor>,
    u: Option<&Tensor>,
) -> Result<BwdOut> {
    let (d, need) = (k.dims, k.need);
    if !(need.dx || need.dw || need.da || need.db || need.dbias) {
        return Ok(BwdOut::default());
    }
    let dy = dy.reshape((d.m, d.n))?;
    let mut out = seam::run(k, cfg, &[Some(&dy), x2, w, a, b, u])?.into_iter();
    let mut take = |on: bool, shape: &[usize]| -> Result<Option<Tensor>> {
        if !on {
            return Ok(None);
        }
        match out.next() {
            Some(s) => Ok(Some(seam::tensor(s, shape))),
            None => fail!(k.name, "internal: the backward returned too few gradients"),
        }
    };
    Ok(BwdOut {
        dx: take(need.dx, &[d.m, d.k])?,
        dw: take(need.dw, &[d.n, d.k])?,
        da: take(need.da, &[d.r, d.k])?,
        db: take(need.db, &[d.n, d.r])?,
        dbias: take(need.dbias, &[d.n])?,
    })
}

impl Kernels {
    /// [`lora_linear`] with this handle's configuration.
    pub fn lora_linear(
        &self,
        x: &Tensor,
        w: &Tensor,
        bias: Option<&Tensor>,
        a: &Tensor,
        b: &Tensor,
        scale: f64,
    ) -> Result<Tensor> {
        const OP: &str = "lora_linear";
        check(OP, x, w, bias, a, b, scale)?;
        self.lora_core(OP, x, Some(w), bias, Some((a, b)), scale)
    }

    /// [`linear`] with this handle's configuration.
    pub fn linear(&self, x: &Tensor, w: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
        const OP: &str = "linear";
        let (_, n) = check_base(OP, x, w)?;
        if let Some(bias) = bias {
            validate::like(OP, "bias", bias, x, &[n], "[N] with N the rows of w")?;
        }
        self.lora_core(OP, x, Some(w), bias, None, 0.0)
    }

    /// The adapter branch alone, `scale·(x·Aᵀ)·Bᵀ` (the dropout path of `LoraLinear`, whose
    /// adapter sees a different input than the base product).
    pub(crate) fn lora_adapter(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        scale: f64,
    ) -> Result<Tensor> {
        const OP: &str = "lora_adapter";
        validate::rank_ge1(OP, "x", x)?;
        validate::float_dtype(OP, "x", x)?;
        let k = x.dim(candle_core::D::Minus1)?;
        let r = a.dim(0)?;
        let n = b.dim(0)?;
        validate::like(OP, "a", a, x, &[r, k], "[r, K]")?;
        validate::like(OP, "b", b, x, &[n, r], "[N, r]")?;
        validate::finite(OP, "scale", scale)?;
        self.lora_core(OP, x, None, None, Some((a, b)), scale)
    }

    /// The general form (arguments already validated): `x·Wᵀ` when `w` is given, `+ bias`,
    /// `+ scale·(x·Aᵀ)·Bᵀ` when an adapter is given (at least one of `w` and the adapter).
    fn lora_core(
        &self,
        op: &'static str,
        x: &Tensor,
        w: Option<&Tensor>,
        bias: Option<&Tensor>,
        adapter: Option<(&Tensor, &Tensor)>,
        scale: f64,
    ) -> Result<Tensor> {
        let n = match (w, adapter) {
            (Some(w), _) => w.dim(0)?,
            (None, Some((_, b))) => b.dim(0)?,
            (None, None) => fail!(op, "internal: neither a base weight nor an adapter"),
        };
        let (m, k, out_dims) = rows_of(x, n);
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
        let (a, b) = (adapter.map(|p| p.0), adapter.map(|p| p.1));
        let d = Dims {
            m,
            k,
            n,
            r: a.map(|a| a.dim(0)).transpose()?.unwrap_or(0),
            bias: bias.is_some(),
            base: w.is_some(),
        };
        gemm_limit(op, &d)?;
        let cfg = self.config;
        let x2 = x.reshape((m, k))?;
        let fwd = LoraFwd {
            dims: d,
            scale,
            name: op,
        };
        let mut out = seam::run(&fwd, &cfg, &[Some(&x2), w, a, b, bias])?.into_iter();
        let Some(y) = out.next() else {
            fail!(op, "internal: the forward returned no output")
        };
        let tracked = |t: Option<&Tensor>| t.is_some_and(|t| t.track_op());
        let need = Need {
            dx: x2.track_op(),
            dw: tracked(w),
            da: tracked(a),
            db: tracked(b),
            dbias: tracked(bias),
        };
        let bwd = LoraBwd {
            dims: d,
            scale,
            need,
            name: op,
        };
        // What the backward reads, kept only when a needed gradient uses it.
        let keep = |on: bool, t: Option<&Tensor>| if on { t.map(|t| t.detach()) } else { None };
        let xs = keep(need.dw || need.da, Some(&x2));
        let ws = keep(need.dx, w);
        let a_s = keep(need.dx, a);
        let bs = keep(need.g(&d), b);
        let u = match out.next() {
            Some(u) if need.db_ext(&d) => Some(seam::tensor(u, (m, d.kk()))),
            _ => None,
        };
        let mut parents = vec![&x2];
        parents.extend(w);
        parents.extend(a);
        parents.extend(b);
        parents.extend(bias);
        let y = seam::attach(op, y, (m, n), &parents, move |_, dy| {
            let g = run_backward(
                &cfg,
                &bwd,
                dy,
                xs.as_ref(),
                ws.as_ref(),
                a_s.as_ref(),
                bs.as_ref(),
                u.as_ref(),
            )?;
            let mut grads = vec![g.dx];
            if d.base {
                grads.push(g.dw);
            }
            if d.r > 0 {
                grads.push(g.da);
                grads.push(g.db);
            }
            if d.bias {
                grads.push(g.dbias);
            }
            Ok(grads)
        })?;
        y.reshape(out_dims)
    }

    /// [`lora_linear_backward`] with this handle's configuration.
    #[allow(clippy::too_many_arguments)]
    pub fn lora_linear_backward(
        &self,
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
        let (m, _, out_dims) = rows_of(x, n);
        validate::like(OP, "dy", dy, x, &out_dims, "the output's shape [..., N]")?;
        let (dt, dev) = (x.dtype(), x.device());
        if m == 0 || k == 0 || n == 0 {
            // Empty products: every gradient is zero (or empty).
            let dy2 = dy.reshape((m, n))?.to_dtype(candle_core::DType::F32)?;
            return Ok(LoraGrads {
                dx: Tensor::zeros(x.dims(), dt, dev)?,
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
        let cfg = &self.config;
        let x2 = x.reshape((m, k))?;
        let down = LoraDown {
            dims: d,
            scale,
            name: OP,
        };
        let u = seam::run1(&down, cfg, &[Some(&x2), Some(a)], (m, d.kk()))?;
        let need = Need {
            dx: true,
            dw: false,
            da: true,
            db: true,
            dbias: bias.is_some(),
        };
        let bwd = LoraBwd {
            dims: d,
            scale,
            need,
            name: OP,
        };
        let g = run_backward(
            cfg,
            &bwd,
            dy,
            Some(&x2),
            Some(w),
            Some(a),
            Some(b),
            Some(&u),
        )?;
        let missing = || validate::err(OP, "internal: the backward returned no gradient");
        Ok(LoraGrads {
            dx: g.dx.ok_or_else(missing)?.reshape(x.dims())?,
            da: g.da.ok_or_else(missing)?,
            db: g.db.ok_or_else(missing)?,
            dbias: g.dbias,
        })
    }
}

/// `y = x·Wᵀ (+ bias) + scale·(x·Aᵀ)·Bᵀ`, differentiable in `x`, `a`, `b`, `bias` (and in `w`
/// when `w` is tracked; a detached/frozen weight costs no gradient work).
///
/// `x [..., K]`, `w [N, K]`, `bias [N]`, `a [r, K]`, `b [N, r]` with `1 <= r <= min(K, N)`,
/// all of one float dtype (f32, f64, f16, bf16; half types accumulate in f32; f64 on the CPU
/// only) and one device. Returns `[..., N]`. Non-contiguous inputs are copied to contiguous
/// ones first. An `x` with no rows gives an empty output.
pub fn lora_linear(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    a: &Tensor,
    b: &Tensor,
    scale: f64,
) -> Result<Tensor> {
    Kernels::default().lora_linear(x, w, bias, a, b, scale)
}

/// A plain linear layer `y = x·Wᵀ (+ bias)` through the same kernels (the bias folded into
/// the GEMM as above): what a merged or disabled [`crate::nn::LoraLinear`] runs. Differentiable
/// in `x` and `bias` (and `w` when tracked).
pub fn linear(x: &Tensor, w: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    Kernels::default().linear(x, w, bias)
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
/// autograd: the same kernel `Tensor::backward` runs through [`lora_linear`] (CPU: gemm,
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
    Kernels::default().lora_linear_backward(x, w, bias, a, b, scale, dy)
}
