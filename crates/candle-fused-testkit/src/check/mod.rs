//! The correctness sweep behind `candle-fused check`, the test suites and the GPU tests.
//!
//! One [`Case`] is an op, a shape and a dtype. [`run`] draws random inputs from the case's own
//! seeded stream ([`Case::stream`]: the same inputs for the same run seed, whatever ran
//! before), runs the fused op forward and backward (loss `Σ out ⊙ probe`, random probe) with
//! the given [`Kernels`] (poisoned: [`testing::poisoned`]), and compares the output and the
//! gradient of every input with the f64 reference (composed Candle ops in f64 on the CPU, on the
//! same rounded inputs, differentiated by Candle's autograd) by relative error. On a non-CPU
//! device it also compares with this crate's CPU backend.
//!
//! The tolerance is [`testing::tolerance`] of the dtype, except where the dtype itself cannot
//! hold the reference: then it is twice the error of the reference rounded to the dtype
//! (e.g. f16 RMSNorm gradients for a last dim of 1 are ~1e-6·dy, in f16's subnormal range),
//! or twice the rounding bound of a sum over rows in the accumulation type
//! ([`testing::sum_floor`], the RMSNorm weight gradient).

use candle_core::{DType, Device, Result, Tensor};
use candle_fused::Kernels;

use crate::rng::Rng;
use crate::{check_rope_glu, reference, testing};

mod cases;
use candle_fused::ops::{GluKind, RopeLayout, RopeStyle};
pub use cases::{row_cases, sweep};

/// How the additive mask of a masked-softmax case is shaped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MaskKind {
    /// No mask.
    None,
    /// `[T]`, broadcast over every row.
    Cols,
    /// `[S, T]` (the last two dims), broadcast over the leading dims.
    Rows,
    /// The full shape of the scores.
    Full,
    /// `[S, T]`, tracked as a variable: its gradient is checked too.
    Learned,
}

/// The op of a case.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum OpKind {
    Softmax,
    MaskedSoftmax {
        scale: f64,
        mask: MaskKind,
        causal: bool,
    },
    RmsNorm {
        weight: bool,
    },
    AddRmsNorm,
    /// LoRA linear on `x = shape` (last dim K): `W [n, K]`, `A [r, K]`, `B [n, r]`, optional
    /// bias `[n]`, scale `2 / r`; every input (W included, as a tracked variable) is checked.
    /// `B ~ N(0, r/4)` makes the adapter term as large as the base term at every rank (with
    /// PEFT's `B ~ N(0, 1/r)` it would be `2/r` of it: 0.8% at r = 256, below the half-type
    /// tolerance), and the adapter term is also checked on its own (`fwd(adapter)`: `W = 0`,
    /// no bias).
    Lora {
        n: usize,
        r: usize,
        bias: bool,
    },
    /// RoPE on `x = shape` (`[B, H, T, D]` or `[B, T, H, D]` per `layout`) with random
    /// positions, `[B, T]` i64 when `batch_positions`, else `[T]` u32 (see
    /// [`crate::check_rope_glu`]).
    Rope {
        layout: RopeLayout,
        style: RopeStyle,
        rotary_dim: usize,
        batch_positions: bool,
    },
    /// `act(gate) ⊙ up` with output `shape`; `packed`: one `[.., 2I]` input.
    Glu {
        kind: GluKind,
        packed: bool,
    },
}

impl OpKind {
    /// The shape of the op's output(s) for input shape `shape`.
    pub fn out_shape(&self, shape: &[usize]) -> Vec<usize> {
        match self {
            OpKind::Lora { n, .. } => {
                let mut s = shape.to_vec();
                if let Some(last) = s.last_mut() {
                    *last = *n;
                }
                s
            }
            _ => shape.to_vec(),
        }
    }

    pub fn name(&self) -> String {
        match self {
            OpKind::Softmax => "softmax".into(),
            OpKind::MaskedSoftmax { mask, causal, .. } => {
                let m = match mask {
                    MaskKind::None => "",
                    MaskKind::Cols => "+mask[T]",
                    MaskKind::Rows => "+mask[S,T]",
                    MaskKind::Full => "+mask[full]",
                    MaskKind::Learned => "+mask[S,T]var",
                };
                format!("masked_softmax{m}{}", if *causal { "+causal" } else { "" })
            }
            OpKind::RmsNorm { weight: true } => "rms_norm".into(),
            OpKind::RmsNorm { weight: false } => "rms_norm(no w)".into(),
            OpKind::AddRmsNorm => "add_rms_norm".into(),
            OpKind::Lora { n, r, bias } => {
                format!(
                    "lora_linear(N={n},r={r}{})",
                    if *bias { ",bias" } else { "" }
                )
            }
            OpKind::Rope { .. } | OpKind::Glu { .. } => check_rope_glu::name(*self),
        }
    }
}

/// One op on one shape and dtype.
#[derive(Debug, Clone)]
pub struct Case {
    pub op: OpKind,
    pub shape: Vec<usize>,
    pub dtype: DType,
}

impl Case {
    /// The case's own random stream of the run's seed (named after the op, shape and dtype).
    pub fn stream(&self) -> Rng {
        Rng::stream(&format!(
            "check {} {:?} {:?}",
            self.op.name(),
            self.shape,
            self.dtype
        ))
    }
}

/// One compared quantity of a case.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub op: String,
    /// What was compared: `fwd`, `d<input>`, with ` vs cpu` for the CPU-backend comparison.
    pub what: String,
    pub shape: Vec<usize>,
    pub dtype: DType,
    pub rel_err: f64,
    pub tol: f64,
}

impl Outcome {
    pub fn pass(&self) -> bool {
        self.rel_err <= self.tol
    }
}

/// The inputs of a case: the tensors, and which of them get gradients.
struct Inputs {
    names: Vec<&'static str>,
    tensors: Vec<Tensor>,
    differentiable: Vec<bool>,
}

fn make_inputs(case: &Case, device: &Device, rng: &mut Rng) -> Result<Inputs> {
    if let OpKind::Rope { .. } | OpKind::Glu { .. } = case.op {
        let (names, tensors, differentiable) = check_rope_glu::make_inputs(case, device, rng)?;
        return Ok(Inputs {
            names,
            tensors,
            differentiable,
        });
    }
    let dt = case.dtype;
    let shape = &case.shape;
    let d = *shape.last().unwrap_or(&1);
    let x = rng.randn(shape, 3.0, dt, device)?;
    Ok(match case.op {
        OpKind::Softmax => Inputs {
            names: vec!["x"],
            tensors: vec![x],
            differentiable: vec![true],
        },
        OpKind::MaskedSoftmax { mask, .. } => {
            let r = shape.len();
            let t = shape[r - 1];
            let s = if r >= 2 { shape[r - 2] } else { 1 };
            let mshape: Option<Vec<usize>> = match mask {
                MaskKind::None => None,
                MaskKind::Cols => Some(vec![t]),
                MaskKind::Rows | MaskKind::Learned => {
                    Some(if r >= 2 { vec![s, t] } else { vec![t] })
                }
                MaskKind::Full => Some(shape.clone()),
            };
            match mshape {
                None => Inputs {
                    names: vec!["x"],
                    tensors: vec![x],
                    differentiable: vec![true],
                },
                Some(ms) => {
                    // Normal values with about a fifth of the entries hidden (-inf).
                    let m = rng.mask(&ms, 0.2, dt, device)?;
                    Inputs {
                        names: vec!["x", "mask"],
                        tensors: vec![x, m],
                        differentiable: vec![true, mask == MaskKind::Learned],
                    }
                }
            }
        }
        OpKind::RmsNorm { weight } => {
            if weight {
                let w = rng.rand(&[d], 0.5, 1.5, dt, device)?;
                Inputs {
                    names: vec!["x", "weight"],
                    tensors: vec![x, w],
                    differentiable: vec![true, true],
                }
            } else {
                Inputs {
                    names: vec!["x"],
                    tensors: vec![x],
                    differentiable: vec![true],
                }
            }
        }
        OpKind::Lora { n, r, bias } => {
            let sk = 1.0 / (d as f64).sqrt();
            let w = rng.randn(&[n, d], sk, dt, device)?;
            let a = rng.randn(&[r, d], sk, dt, device)?;
            let b = rng.randn(&[n, r], (r as f64).sqrt() / 2.0, dt, device)?;
            let mut names = vec!["x", "w", "a", "b"];
            let mut tensors = vec![x, w, a, b];
            if bias {
                names.push("bias");
                tensors.push(rng.randn(&[n], 1.0, dt, device)?);
            }
            let differentiable = vec![true; tensors.len()];
            Inputs {
                names,
                tensors,
                differentiable,
            }
        }
        OpKind::Rope { .. } | OpKind::Glu { .. } => unreachable!("handled above"),
        OpKind::AddRmsNorm => {
            let res = rng.randn(shape, 1.0, dt, device)?;
            let w = rng.rand(&[d], 0.5, 1.5, dt, device)?;
            Inputs {
                names: vec!["x", "residual", "weight"],
                tensors: vec![x, res, w],
                differentiable: vec![true, true, true],
            }
        }
    })
}

/// The fused op on `kernels` (`fused = true`) or the reference, on `args`; every output of
/// the op.
pub fn apply(kernels: &Kernels, op: OpKind, args: &[Tensor], fused: bool) -> Result<Vec<Tensor>> {
    let eps = 1e-5;
    let k = kernels;
    Ok(match (op, fused) {
        (OpKind::Softmax, true) => vec![k.softmax_last_dim(&args[0])?],
        (OpKind::Softmax, false) => vec![reference::softmax(&args[0])?],
        (OpKind::MaskedSoftmax { scale, causal, .. }, f) => {
            let mask = args.get(1);
            if f {
                vec![k.masked_softmax(&args[0], scale, mask, causal)?]
            } else {
                vec![reference::masked_softmax(&args[0], scale, mask, causal)?]
            }
        }
        (OpKind::RmsNorm { .. }, true) => vec![k.rms_norm(&args[0], args.get(1), eps)?],
        (OpKind::RmsNorm { .. }, false) => vec![reference::rms_norm(&args[0], args.get(1), eps)?],
        (OpKind::Lora { r, .. }, fused) => {
            let s = 2.0 / r as f64;
            let (x, w, a, b, bias) = (&args[0], &args[1], &args[2], &args[3], args.get(4));
            if fused {
                vec![k.lora_linear(x, w, bias, a, b, s)?]
            } else {
                vec![reference::lora_linear(x, w, bias, a, b, s)?]
            }
        }
        (OpKind::AddRmsNorm, true) => {
            let (a, b) = k.add_rms_norm(&args[0], &args[1], &args[2], eps)?;
            vec![a, b]
        }
        (OpKind::AddRmsNorm, false) => {
            let (a, b) = reference::add_rms_norm(&args[0], &args[1], &args[2], eps)?;
            vec![a, b]
        }
        (OpKind::Rope { .. } | OpKind::Glu { .. }, f) => check_rope_glu::apply(k, op, args, f)?,
    })
}

/// Forward outputs and the gradients of the differentiable inputs of `Σ_k out_k ⊙ probe_k`.
fn fwd_bwd(
    k: &Kernels,
    op: OpKind,
    inputs: &[Tensor],
    differentiable: &[bool],
    probes: &[Tensor],
    fused: bool,
) -> Result<(Vec<Tensor>, Vec<Option<Tensor>>)> {
    let f = |args: &[Tensor]| apply(k, op, args, fused);
    testing::fwd_bwd(&f, inputs, differentiable, probes)
}

/// `t` summed over its leading dims down to `dims` (a broadcast mask's gradient).
fn sum_to(t: &Tensor, dims: &[usize]) -> Result<Tensor> {
    let mut t = t.clone();
    while t.rank() > dims.len() {
        t = t.sum(0)?;
    }
    for (k, &d) in dims.iter().enumerate() {
        if d == 1 && t.dim(k)? != 1 {
            t = t.sum_keepdim(k)?;
        }
    }
    Ok(t)
}

/// The summands `dy ⊙ x̂` (f64, `[rows, D]`) of the RMSNorm weight gradient, x̂ the
/// normalized input (the sum for add+RMSNorm).
fn weight_grad_terms(op: OpKind, ref_in: &[Tensor], dy: &Tensor) -> Result<Tensor> {
    let x = match op {
        OpKind::AddRmsNorm => (&ref_in[0] + &ref_in[1])?,
        _ => ref_in[0].clone(),
    };
    let xhat = reference::rms_norm(&x, None, 1e-5)?;
    let d = x.dim(candle_core::D::Minus1)?;
    (dy * xhat)?.reshape(((), d))
}

/// Runs one case on `device` with `kernels`; returns the forward comparison, one per input
/// gradient, and on a non-CPU device the same against this crate's CPU backend.
pub fn run(kernels: &Kernels, case: &Case, device: &Device) -> Result<Vec<Outcome>> {
    let k = kernels;
    let mut rng = case.stream();
    let inputs = make_inputs(case, device, &mut rng)?;
    let tol = testing::tolerance(case.dtype);
    let n_out = if case.op == OpKind::AddRmsNorm { 2 } else { 1 };
    let probes: Vec<Tensor> = (0..n_out)
        .map(|_| rng.randn(&case.op.out_shape(&case.shape), 1.0, case.dtype, device))
        .collect::<Result<_>>()?;
    let (outs, grads) = fwd_bwd(
        k,
        case.op,
        &inputs.tensors,
        &inputs.differentiable,
        &probes,
        true,
    )?;

    // Float inputs upcast to f64; integer ones (RoPE positions) as they are.
    let cpu64 = |t: &Tensor| -> Result<Tensor> {
        let t = t.to_device(&Device::Cpu)?;
        if t.dtype().is_float() {
            t.to_dtype(DType::F64)
        } else {
            Ok(t)
        }
    };
    let ref_in: Vec<Tensor> = inputs.tensors.iter().map(cpu64).collect::<Result<_>>()?;
    let ref_probes: Vec<Tensor> = probes.iter().map(cpu64).collect::<Result<_>>()?;
    let (ref_outs, ref_grads) = fwd_bwd(
        k,
        case.op,
        &ref_in,
        &inputs.differentiable,
        &ref_probes,
        false,
    )?;

    let mut res = Vec::new();
    let mut push = |what: String, err: f64, floor: f64| {
        res.push(Outcome {
            op: case.op.name(),
            what,
            shape: case.shape.clone(),
            dtype: case.dtype,
            rel_err: err,
            tol: tol.max(2.0 * floor),
        })
    };
    // The error of the reference itself once rounded to the case's dtype.
    let floor = |r: &Tensor| -> Result<f64> { testing::rel_err(&r.to_dtype(case.dtype)?, r) };
    let out_names = ["fwd", "fwd(sum)"];
    for (j, (o, r)) in outs.iter().zip(&ref_outs).enumerate() {
        push(out_names[j].to_string(), testing::rel_err(o, r)?, floor(r)?);
    }
    if let OpKind::Lora { r, .. } = case.op {
        // The adapter term on its own (W = 0, no bias), so a wrong adapter cannot hide behind
        // the base product.
        let t = &inputs.tensors;
        let s = 2.0 / r as f64;
        let zero_w = t[1].zeros_like()?;
        let y = k.lora_linear(&t[0], &zero_w, None, &t[2], &t[3], s)?;
        let yr = reference::lora_linear(
            &ref_in[0],
            &ref_in[1].zeros_like()?,
            None,
            &ref_in[2],
            &ref_in[3],
            s,
        )?;
        push(
            "fwd(adapter)".into(),
            testing::rel_err(&y, &yr)?,
            floor(&yr)?,
        );
    }
    for (i, (g, r)) in grads.iter().zip(&ref_grads).enumerate() {
        if let (Some(g), Some(r)) = (g, r) {
            let err = testing::rel_err(g, r)?;
            // The RMSNorm weight gradient is a sum over rows, Σ dy ⊙ x̂, accumulated in f32
            // (f64 for f64) whose terms cancel (for D = 1, x̂ = ±1): its floor is the
            // rounding bound of that sum.
            let floor_rows = match (case.op, inputs.names[i]) {
                (OpKind::RmsNorm { .. } | OpKind::AddRmsNorm, "weight") => {
                    let terms = weight_grad_terms(case.op, &ref_in, &ref_probes[0])?;
                    let acc = if case.dtype == DType::F64 {
                        DType::F64
                    } else {
                        DType::F32
                    };
                    testing::sum_floor(&terms, testing::unit_roundoff(acc))?
                }
                _ => 0.0,
            };
            // add+RMSNorm's backward reads the forward's `sum` as stored, rounded to the dtype;
            // the reference evaluated at that rounded sum bounds what any backward can reach.
            let floor_sum = match (case.op, inputs.names[i]) {
                (OpKind::AddRmsNorm, "x" | "residual") if case.dtype != DType::F64 => {
                    let s = (&ref_in[0] + &ref_in[1])?
                        .to_dtype(case.dtype)?
                        .to_dtype(DType::F64)?;
                    let at_rounded = [s.clone(), s.zeros_like()?, ref_in[2].clone()];
                    let (_, gs) = fwd_bwd(
                        k,
                        case.op,
                        &at_rounded,
                        &inputs.differentiable,
                        &ref_probes,
                        false,
                    )?;
                    match &gs[0] {
                        Some(gr) => testing::rel_err(gr, r)?,
                        None => 0.0,
                    }
                }
                // Softmax backward reads the forward's y as stored (rounded): the exact backward
                // at the rounded y, y_r ⊙ (dy − ⟨dy, y_r⟩), bounds what it can reach (rows that
                // are nearly one-hot amplify the rounding).
                (OpKind::Softmax | OpKind::MaskedSoftmax { .. }, "x" | "mask")
                    if case.dtype != DType::F64 =>
                {
                    let scale = match case.op {
                        OpKind::MaskedSoftmax { scale, .. } if inputs.names[i] == "x" => scale,
                        _ => 1.0,
                    };
                    let yr = ref_outs[0].to_dtype(case.dtype)?.to_dtype(DType::F64)?;
                    let dy = &ref_probes[0];
                    let dot = (dy * &yr)?.sum_keepdim(candle_core::D::Minus1)?;
                    let g = (yr.mul(&dy.broadcast_sub(&dot)?)? * scale)?;
                    let g = if g.dims() == r.dims() {
                        g
                    } else {
                        sum_to(&g, r.dims())?
                    };
                    testing::rel_err(&g, r)?
                }
                _ => 0.0,
            };
            push(
                format!("d{}", inputs.names[i]),
                err,
                floor(r)?.max(floor_sum).max(floor_rows),
            );
        } else if inputs.differentiable[i] {
            push(
                format!("d{} (missing)", inputs.names[i]),
                f64::INFINITY,
                0.0,
            );
        }
    }
    if !device.is_cpu() {
        let cpu_in: Vec<Tensor> = inputs
            .tensors
            .iter()
            .map(|t| t.to_device(&Device::Cpu))
            .collect::<Result<_>>()?;
        let cpu_probes: Vec<Tensor> = probes
            .iter()
            .map(|t| t.to_device(&Device::Cpu))
            .collect::<Result<_>>()?;
        let (c_outs, c_grads) = fwd_bwd(
            k,
            case.op,
            &cpu_in,
            &inputs.differentiable,
            &cpu_probes,
            true,
        )?;
        for (j, (o, c)) in outs.iter().zip(&c_outs).enumerate() {
            push(
                format!("{} vs cpu", out_names[j]),
                testing::rel_err(o, c)?,
                0.0,
            );
        }
        for (i, (g, c)) in grads.iter().zip(&c_grads).enumerate() {
            if let (Some(g), Some(c)) = (g, c) {
                push(
                    format!("d{} vs cpu", inputs.names[i]),
                    testing::rel_err(g, c)?,
                    0.0,
                );
            }
        }
    }
    Ok(res)
}
