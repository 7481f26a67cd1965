//! The loss rows of the correctness sweep: cross-entropy and linear + cross-entropy (their
//! integer targets do not fit [`crate::check::Case`], whose inputs are all float).
//!
//! One [`LossCase`] is an op, the leading dims, the vocabulary, a dtype and the loss options.
//! [`run`] draws fresh random inputs on the device (logits `N(0, 2²)`, or `N(0, 20²)` with
//! soft-capping so the cap bites; about a fifth of the targets ignored), runs the fused op
//! through autograd with a random scalar probe (`loss · probe`) and the standalone backward
//! with `dloss = probe`, and compares the loss and every gradient with the f64 reference
//! ([`crate::reference::cross_entropy`], composed Candle ops on the same rounded inputs,
//! differentiated by Candle's autograd). On a non-CPU device it also compares with this
//! crate's CPU backend.
//!
//! Floors: the loss is an f32 scalar for every dtype (its floor is f32's rounding of the
//! reference); the linear cross-entropy's logits chunk is in the input dtype, so for half
//! inputs its floor includes the reference evaluated on logits (and logit gradients) rounded to
//! that dtype.

use candle_core::{DType, Device, Result, Tensor, Var};
use candle_fused::ops::{CrossEntropyConfig, Reduction};
use candle_fused::Kernels;

use crate::check::Outcome;
use crate::rng::Rng;
use crate::{reference, testing};

/// The op of a loss case.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum LossOp {
    /// [`ops::cross_entropy`] on logits `[rows.., V]`.
    CrossEntropy,
    /// [`ops::linear_cross_entropy`] on `h [rows.., hidden]`, `w [V, hidden]`; `w` tracked
    /// when `train_w`.
    Linear {
        hidden: usize,
        chunk: Option<usize>,
        train_w: bool,
    },
}

/// One loss case.
#[derive(Debug, Clone)]
pub struct LossCase {
    pub op: LossOp,
    /// The leading dims (tokens).
    pub rows: Vec<usize>,
    /// Classes.
    pub v: usize,
    pub dtype: DType,
    pub cfg: CrossEntropyConfig,
    /// Fraction of targets set to `ignore_index` (1.0: all).
    pub p_ignore: f64,
}

impl LossCase {
    /// The shape of the case's main input (logits or h).
    pub fn shape(&self) -> Vec<usize> {
        let mut s = self.rows.clone();
        s.push(match self.op {
            LossOp::CrossEntropy => self.v,
            LossOp::Linear { hidden, .. } => hidden,
        });
        s
    }

    /// The op name with its options (e.g. `cross_entropy(V=1000,ls=0.1,cap=30)`).
    pub fn name(&self) -> String {
        let c = &self.cfg;
        let mut o = vec![format!("V={}", self.v)];
        if c.reduction == Reduction::Sum {
            o.push("sum".into());
        }
        if c.label_smoothing > 0.0 {
            o.push(format!("ls={}", c.label_smoothing));
        }
        if let Some(cap) = c.softcap {
            o.push(format!("cap={cap}"));
        }
        if c.z_loss > 0.0 {
            o.push(format!("z={}", c.z_loss));
        }
        if self.p_ignore >= 1.0 {
            o.push("all ignored".into());
        }
        match self.op {
            LossOp::CrossEntropy => format!("cross_entropy({})", o.join(",")),
            LossOp::Linear { chunk, train_w, .. } => {
                if let Some(k) = chunk {
                    o.push(format!("chunk={k}"));
                }
                if train_w {
                    o.push("dw".into());
                }
                format!("linear_cross_entropy({})", o.join(","))
            }
        }
    }
}

/// Random targets in `0..v` on `device`, each ignored with probability `p_ignore`, from the
/// calling thread's seeded stream.
pub fn random_targets(
    rows: &[usize],
    v: usize,
    p_ignore: f64,
    ignore: i64,
    device: &Device,
) -> Result<Tensor> {
    crate::rng::with_thread_rng(|r| targets_from(r, rows, v, p_ignore, ignore, device))
}

/// [`random_targets`] from `rng`.
pub fn targets_from(
    rng: &mut Rng,
    rows: &[usize],
    v: usize,
    p_ignore: f64,
    ignore: i64,
    device: &Device,
) -> Result<Tensor> {
    let n: usize = rows.iter().product();
    let u = rng
        .rand(&[n], 0.0, 1.0, DType::F64, &Device::Cpu)?
        .to_vec1::<f64>()?;
    let c = rng
        .rand(&[n], 0.0, v as f64, DType::F64, &Device::Cpu)?
        .to_vec1::<f64>()?;
    let t: Vec<i64> = u
        .iter()
        .zip(&c)
        .map(|(&u, &c)| {
            if u < p_ignore {
                ignore
            } else {
                (c as i64).min(v as i64 - 1)
            }
        })
        .collect();
    Tensor::from_vec(t, rows, device)
}

/// Inputs of a case: the float inputs (logits, or h and w) and the targets.
struct Inputs {
    floats: Vec<Tensor>,
    targets: Tensor,
}

fn make_inputs(case: &LossCase, device: &Device, rng: &mut Rng) -> Result<Inputs> {
    let dt = case.dtype;
    let targets = targets_from(
        rng,
        &case.rows,
        case.v,
        case.p_ignore,
        case.cfg.ignore_index,
        device,
    )?;
    let floats = match case.op {
        LossOp::CrossEntropy => {
            let std = if case.cfg.softcap.is_some() {
                20.0
            } else {
                2.0
            };
            vec![rng.randn(&case.shape(), std, dt, device)?]
        }
        LossOp::Linear { hidden, .. } => vec![
            rng.randn(&case.shape(), 1.0, dt, device)?,
            rng.randn(&[case.v, hidden], 2.0 / (hidden as f64).sqrt(), dt, device)?,
        ],
    };
    Ok(Inputs { floats, targets })
}

/// Which float inputs get gradients.
fn tracked(op: LossOp) -> Vec<bool> {
    match op {
        LossOp::CrossEntropy => vec![true],
        LossOp::Linear { train_w, .. } => vec![true, train_w],
    }
}

/// `(loss, gradients)` of `loss · probe` through autograd: the fused op on `k`
/// (`None`: the f64 reference).
fn fwd_bwd(
    case: &LossCase,
    k: Option<&Kernels>,
    floats: &[Tensor],
    targets: &Tensor,
    probe: f64,
) -> Result<(Tensor, Vec<Option<Tensor>>)> {
    let diff = tracked(case.op);
    let vars: Vec<Option<Var>> = floats
        .iter()
        .zip(&diff)
        .map(|(t, &d)| {
            if d {
                Var::from_tensor(t).map(Some)
            } else {
                Ok(None)
            }
        })
        .collect::<Result<_>>()?;
    let args: Vec<Tensor> = floats
        .iter()
        .zip(&vars)
        .map(|(t, v)| {
            v.as_ref()
                .map_or_else(|| t.clone(), |v| v.as_tensor().clone())
        })
        .collect();
    let c = &case.cfg;
    let loss = match (case.op, k) {
        (LossOp::CrossEntropy, Some(k)) => k.cross_entropy(&args[0], targets, c)?,
        (LossOp::CrossEntropy, None) => reference::cross_entropy(&args[0], targets, c)?,
        (LossOp::Linear { chunk, .. }, Some(k)) => {
            k.linear_cross_entropy(&args[0], &args[1], targets, c, chunk)?
        }
        (LossOp::Linear { .. }, None) => {
            reference::linear_cross_entropy(&args[0], &args[1], targets, c)?
        }
    };
    let p = Tensor::new(probe, loss.device())?.to_dtype(loss.dtype())?;
    let grads = (&loss * p)?.backward()?;
    let g = vars
        .iter()
        .map(|v| v.as_ref().and_then(|v| grads.get(v).cloned()))
        .collect();
    Ok((loss, g))
}

/// The standalone entry points: `(loss or None, gradients)` with `dloss = probe`.
fn standalone(
    case: &LossCase,
    k: &Kernels,
    floats: &[Tensor],
    targets: &Tensor,
    probe: f64,
) -> Result<(Option<Tensor>, Vec<Option<Tensor>>)> {
    Ok(match case.op {
        LossOp::CrossEntropy => {
            let dx = k.cross_entropy_backward(&floats[0], targets, &case.cfg, probe)?;
            (None, vec![Some(dx)])
        }
        LossOp::Linear { chunk, train_w, .. } => {
            let r = k.linear_cross_entropy_forward_backward(
                &floats[0], &floats[1], targets, &case.cfg, chunk, train_w, probe,
            )?;
            (Some(r.loss), vec![Some(r.dh), r.dw])
        }
    })
}

/// Runs one loss case on `device` with `kernels` (poisoned: [`testing::poisoned`]), its inputs
/// from the case's own seeded stream (see the module doc).
pub fn run(kernels: &Kernels, case: &LossCase, device: &Device) -> Result<Vec<Outcome>> {
    let k = *kernels;
    let mut rng = Rng::stream(&format!("check_loss {} {:?}", case.name(), case.dtype));
    let inputs = make_inputs(case, device, &mut rng)?;
    let probe = rng
        .randn(&[1], 1.0, DType::F32, &Device::Cpu)?
        .to_vec1::<f32>()?[0] as f64;
    let names: &[&str] = match case.op {
        LossOp::CrossEntropy => &["logits"],
        LossOp::Linear { .. } => &["h", "w"],
    };
    let (loss, grads) = fwd_bwd(case, Some(&k), &inputs.floats, &inputs.targets, probe)?;
    let (s_loss, s_grads) = standalone(case, &k, &inputs.floats, &inputs.targets, probe)?;

    let cpu64 = |t: &Tensor| t.to_device(&Device::Cpu)?.to_dtype(DType::F64);
    let ref_in: Vec<Tensor> = inputs.floats.iter().map(cpu64).collect::<Result<_>>()?;
    let ref_t = inputs.targets.to_device(&Device::Cpu)?;
    let (r_loss, r_grads) = fwd_bwd(case, None, &ref_in, &ref_t, probe)?;

    let dt = case.dtype;
    let tol = testing::tolerance(dt);
    let floor = |r: &Tensor, d: DType| -> Result<f64> { testing::rel_err(&r.to_dtype(d)?, r) };
    // Half logits chunks (linear CE): the reference on logits rounded to the dtype.
    let (rounded_loss, rounded_grads) = match case.op {
        LossOp::Linear { .. } if matches!(dt, DType::F16 | DType::BF16) => {
            let (l, g) = rounded_logits_reference(case, &ref_in, &ref_t, probe)?;
            (Some(l), g)
        }
        _ => (None, vec![]),
    };
    let mut res = Vec::new();
    let mut push = |what: String, err: f64, fl: f64| {
        res.push(Outcome {
            op: case.name(),
            what,
            shape: case.shape(),
            dtype: dt,
            rel_err: err,
            tol: tol.max(2.0 * fl),
        })
    };
    let loss_floor = |r: &Tensor| -> Result<f64> {
        let mut f = floor(r, DType::F32)?;
        if let Some(rl) = &rounded_loss {
            f = f.max(testing::rel_err(rl, r)?);
        }
        Ok(f)
    };
    push(
        "fwd".into(),
        testing::rel_err(&loss, &r_loss)?,
        loss_floor(&r_loss)?,
    );
    if let Some(sl) = &s_loss {
        push(
            "fwd (standalone)".into(),
            testing::rel_err(sl, &r_loss)?,
            loss_floor(&r_loss)?,
        );
    }
    for (i, r) in r_grads.iter().enumerate() {
        let Some(r) = r else { continue };
        let mut fl = floor(r, dt)?;
        if let Some(Some(g)) = rounded_grads.get(i) {
            fl = fl.max(testing::rel_err(g, r)?);
        }
        for (what, g) in [("", &grads[i]), (" (standalone)", &s_grads[i])] {
            let err = match g {
                Some(g) => testing::rel_err(g, r)?,
                None => f64::INFINITY,
            };
            push(format!("d{}{what}", names[i]), err, fl);
        }
    }
    if !device.is_cpu() {
        let cpu_in: Vec<Tensor> = inputs
            .floats
            .iter()
            .map(|t| t.to_device(&Device::Cpu))
            .collect::<Result<_>>()?;
        let (c_loss, c_grads) = fwd_bwd(case, Some(&k), &cpu_in, &ref_t, probe)?;
        push("fwd vs cpu".into(), testing::rel_err(&loss, &c_loss)?, 0.0);
        for (i, (g, c)) in grads.iter().zip(&c_grads).enumerate() {
            if let (Some(g), Some(c)) = (g, c) {
                push(
                    format!("d{} vs cpu", names[i]),
                    testing::rel_err(g, c)?,
                    0.0,
                );
            }
        }
    }
    Ok(res)
}

/// The f64 reference of a linear case evaluated on logits rounded to the case's dtype (what a
/// logits chunk in that dtype can reach at best): `(loss, [dh, dw])`.
fn rounded_logits_reference(
    case: &LossCase,
    ref_in: &[Tensor],
    targets: &Tensor,
    probe: f64,
) -> Result<(Tensor, Vec<Option<Tensor>>)> {
    let (h, w) = (&ref_in[0], &ref_in[1]);
    let hd = h.dim(candle_core::D::Minus1)?;
    let h2 = h.reshape(((), hd))?;
    let logits = h2
        .matmul(&w.t()?)?
        .to_dtype(case.dtype)?
        .to_dtype(DType::F64)?;
    let z = Var::from_tensor(&logits)?;
    let loss = reference::cross_entropy(z.as_tensor(), &targets.flatten_all()?, &case.cfg)?;
    let grads = (&loss * probe)?.backward()?;
    // ... and on logit gradients rounded to it (dh = dlogits·w sums rounded terms).
    let dz = grads.get(&z).cloned().unwrap_or(logits.zeros_like()?);
    let dz = dz.to_dtype(case.dtype)?.to_dtype(DType::F64)?;
    let dh = dz.matmul(w)?.reshape(h.shape())?;
    let dw = dz.t()?.matmul(&h2)?;
    Ok((loss, vec![Some(dh), Some(dw)]))
}

/// The loss rows of `candle-fused check`: cross-entropy on vocabularies 1 to 151936 (odd,
/// prime, Llama 3's and Qwen2's) with each option, all-ignored batches; linear cross-entropy
/// with chunks of 1, odd, and more than the tokens, with and without dW.
pub fn sweep(dtypes: &[DType]) -> Vec<LossCase> {
    let base = CrossEntropyConfig::default();
    let smooth = CrossEntropyConfig {
        label_smoothing: 0.1,
        z_loss: 1e-3,
        ..base
    };
    let capped = CrossEntropyConfig {
        softcap: Some(30.0),
        ..base
    };
    let sum = CrossEntropyConfig {
        reduction: Reduction::Sum,
        label_smoothing: 0.05,
        ..base
    };
    let mut cases = Vec::new();
    for &dtype in dtypes {
        let ce = |rows: Vec<usize>, v: usize, cfg: CrossEntropyConfig, p_ignore: f64| LossCase {
            op: LossOp::CrossEntropy,
            rows,
            v,
            dtype,
            cfg,
            p_ignore,
        };
        cases.push(ce(vec![3], 1, base, 0.2));
        cases.push(ce(vec![4], 7, base, 0.2));
        cases.push(ce(vec![2, 3], 1000, smooth, 0.2));
        cases.push(ce(vec![5], 4099, capped, 0.2));
        cases.push(ce(vec![3], 32000, sum, 0.2));
        cases.push(ce(vec![2], 65536, smooth, 0.2));
        cases.push(ce(vec![3], 128256, base, 0.0));
        cases.push(ce(vec![2], 151936, capped, 0.0));
        cases.push(ce(vec![4], 50, base, 1.0));
        let lin = |rows: Vec<usize>,
                   v: usize,
                   hidden: usize,
                   chunk: Option<usize>,
                   train_w: bool,
                   cfg: CrossEntropyConfig| LossCase {
            op: LossOp::Linear {
                hidden,
                chunk,
                train_w,
            },
            rows,
            v,
            dtype,
            cfg,
            p_ignore: 0.2,
        };
        cases.push(lin(vec![2, 5], 37, 16, Some(1), true, base));
        cases.push(lin(vec![13], 101, 24, Some(3), true, smooth));
        cases.push(lin(vec![9], 64, 32, Some(100), false, capped));
        cases.push(lin(vec![40], 1000, 64, None, true, base));
        cases.push(lin(vec![33], 4097, 48, None, false, sum));
    }
    cases
}
