//! The memory-bound ops in the bench: softmax, masked softmax, RMSNorm and add+RMSNorm.
//!
//! One [`MemCase`] is an op on a shape and dtype. It builds random input sets
//! ([`MemCase::inputs`]), knows the bytes each pass must move ([`MemCase::bytes`]), and runs
//! each implementation ([`MemCase::forward`], [`MemCase::backward`], [`MemCase::graph`]);
//! [`run_case`] times them all. The criterion benches (`benches/ops.rs`) use the same pieces.

use candle_core::{backprop::GradStore, DType, Device, Result, Tensor, Var};

use super::report::{Collector, Key};
use super::timing::Timer;
use candle_fused::Kernels;
use candle_fused_testkit::check::{self, MaskKind, OpKind};
use candle_fused_testkit::rng::Rng;

/// The epsilon of the norms (the same as `check::apply` uses).
pub const EPS: f64 = 1e-5;
/// Attention scale of the masked-softmax cases: 1/sqrt(head dim 64).
pub const SCALE: f64 = 0.125;

/// Which implementation a measurement runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Impl {
    /// Our op (bwd: the standalone backward function).
    Ours,
    /// `loss.backward()` through our op (bwd only).
    OursAutograd,
    /// `candle_fused_testkit::reference::*` in the input dtype.
    Composed,
    /// `candle_nn::ops::{softmax_last_dim, rms_norm}` (fwd only).
    Builtin,
}

impl Impl {
    pub fn as_str(self) -> &'static str {
        match self {
            Impl::Ours => "ours",
            Impl::OursAutograd => "ours_autograd",
            Impl::Composed => "candle_composed",
            Impl::Builtin => "candle_fused_builtin",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pass {
    Fwd,
    Bwd,
    FwdBwd,
}

impl Pass {
    pub fn as_str(self) -> &'static str {
        match self {
            Pass::Fwd => "fwd",
            Pass::Bwd => "bwd",
            Pass::FwdBwd => "fwd+bwd",
        }
    }
}

/// One random input set of a case.
pub struct InputSet {
    /// The op's arguments in `check::apply` order: `[x]`, `[x, mask]`, `[x, w]`, `[x, r, w]`.
    pub args: Vec<Tensor>,
    /// Which of `args` get gradients (every one but the mask).
    pub diff: Vec<bool>,
    /// One fixed random probe per output: the loss is `Σ_k sum(out_k ⊙ probe_k)`, and the
    /// probes are the `dy` of the standalone backward.
    pub probes: Vec<Tensor>,
    /// What the standalone backward reads besides `dy`: the forward output `y` (softmax),
    /// `x` (rms_norm) or `sum = x + r` (add_rms_norm).
    pub saved: Tensor,
}

/// An op on a shape and dtype, ours running on `kernels`.
#[derive(Debug, Clone)]
pub struct MemCase {
    pub op: OpKind,
    pub shape: Vec<usize>,
    pub dtype: DType,
    pub kernels: Kernels,
}

/// Candle's own elementwise kernels index with u32, so a tensor of 2^31 elements or more
/// (the [32, 32, 2048, 2048] scores) is built from random blocks along dim 0 (4 distinct blocks,
/// each far larger than the L2 cache, repeated).
fn blocks(shape: &[usize], mut gen: impl FnMut(&[usize]) -> Result<Tensor>) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    if n < (1 << 31) || shape.len() < 2 || shape[0] < 2 {
        return gen(shape);
    }
    let mut b = shape.to_vec();
    b[0] = 1;
    let distinct: Vec<Tensor> = (0..4.min(shape[0]))
        .map(|_| gen(&b))
        .collect::<Result<_>>()?;
    let parts: Vec<&Tensor> = (0..shape[0])
        .map(|i| &distinct[i % distinct.len()])
        .collect();
    Tensor::cat(&parts, 0)
}

/// `N(0, std²)` values from `rng`, drawn on the device (see [`Rng::randn_on`]).
fn randn(rng: &mut Rng, shape: &[usize], std: f64, dtype: DType, dev: &Device) -> Result<Tensor> {
    blocks(shape, |s| rng.randn_on(s, std, dtype, dev))
}

/// Uniform values in `[lo, hi)` from `rng`, drawn on the device.
fn rand(
    rng: &mut Rng,
    shape: &[usize],
    lo: f64,
    hi: f64,
    dtype: DType,
    dev: &Device,
) -> Result<Tensor> {
    blocks(shape, |s| rng.rand_on(s, lo, hi, dtype, dev))
}

impl MemCase {
    /// The case's random stream of the run's seed (the same inputs for the same seed).
    pub fn stream(&self) -> Rng {
        Rng::stream(&format!(
            "bench {} {:?} {:?}",
            self.op.name(),
            self.shape,
            self.dtype
        ))
    }

    /// `--op` family name.
    pub fn family(&self) -> &'static str {
        match self.op {
            OpKind::Softmax => "softmax",
            OpKind::MaskedSoftmax { .. } => "masked_softmax",
            OpKind::RmsNorm { .. } => "rms_norm",
            OpKind::AddRmsNorm => "add_rms_norm",
            OpKind::Lora { .. } => "lora_linear",
            OpKind::Rope { .. } => "rope",
            OpKind::Glu { .. } => "glu",
        }
    }

    fn elems(&self) -> usize {
        self.shape.iter().product()
    }

    fn last(&self) -> usize {
        *self.shape.last().unwrap_or(&1)
    }

    fn mask_shape(&self) -> Option<Vec<usize>> {
        match self.op {
            OpKind::MaskedSoftmax { mask, .. } => {
                let r = self.shape.len();
                let t = self.shape[r - 1];
                let s = if r >= 2 { self.shape[r - 2] } else { 1 };
                match mask {
                    MaskKind::None => None,
                    MaskKind::Cols => Some(vec![t]),
                    MaskKind::Rows | MaskKind::Learned => Some(vec![s, t]),
                    MaskKind::Full => Some(self.shape.clone()),
                }
            }
            _ => None,
        }
    }

    fn n_out(&self) -> usize {
        if self.op == OpKind::AddRmsNorm {
            2
        } else {
            1
        }
    }

    fn scale(&self) -> f64 {
        match self.op {
            OpKind::MaskedSoftmax { scale, .. } => scale,
            _ => 1.0,
        }
    }

    /// Bytes that must move (see the legend in `report`): inputs read once + outputs written
    /// once. N = elements, D = last dim, M = mask elements, e = bytes per element.
    pub fn bytes(&self, pass: Pass) -> f64 {
        let e = self.dtype.size_in_bytes() as f64;
        let n = self.elems() as f64 * e;
        let d = self.last() as f64 * e;
        let m = self
            .mask_shape()
            .map_or(0.0, |s| s.iter().product::<usize>() as f64 * e);
        let (fwd, bwd) = match self.op {
            OpKind::Softmax | OpKind::MaskedSoftmax { .. } => (2.0 * n + m, 3.0 * n),
            OpKind::RmsNorm { weight: true } => (2.0 * n + d, 3.0 * n + 2.0 * d),
            OpKind::RmsNorm { weight: false } => (2.0 * n, 3.0 * n),
            OpKind::AddRmsNorm => (4.0 * n + d, 4.0 * n + 2.0 * d),
            OpKind::Lora { .. } | OpKind::Rope { .. } | OpKind::Glu { .. } => {
                unreachable!("benchmarked by its own family")
            }
        };
        match pass {
            Pass::Fwd => fwd,
            Pass::Bwd => bwd,
            Pass::FwdBwd => fwd + bwd,
        }
    }

    /// Bytes of one input set (to decide how many sets to rotate among).
    pub fn set_bytes(&self) -> usize {
        let e = self.dtype.size_in_bytes();
        let n = self.elems() * e;
        let m = self
            .mask_shape()
            .map_or(0, |s| s.iter().product::<usize>() * e);
        // x (+ r), probes, saved, w, mask.
        let tensors = match self.op {
            OpKind::AddRmsNorm => 5,
            _ => 3,
        };
        tensors * n + m + self.last() * e
    }

    /// The implementations timed in `pass`, each with the impl it is compared with.
    pub fn impls(&self, pass: Pass) -> Vec<(Impl, Option<Impl>)> {
        match pass {
            Pass::Fwd => {
                let mut v = vec![(Impl::Ours, None)];
                if matches!(self.op, OpKind::Softmax | OpKind::RmsNorm { .. }) {
                    v.push((Impl::Builtin, Some(Impl::Ours)));
                }
                v.push((Impl::Composed, Some(Impl::Ours)));
                v
            }
            Pass::Bwd => vec![
                (Impl::Ours, None),
                (Impl::OursAutograd, None),
                (Impl::Composed, Some(Impl::OursAutograd)),
            ],
            Pass::FwdBwd => vec![(Impl::Ours, None), (Impl::Composed, Some(Impl::Ours))],
        }
    }

    /// A random input set on `dev` from `rng`: x ~ N(0, 3²) (logits) or N(0, 1), weight
    /// uniform in [0.5, 1.5), mask N(0, 1) with about a fifth of the entries -inf, probes
    /// N(0, 1).
    pub fn inputs(&self, dev: &Device, rng: &mut Rng) -> Result<InputSet> {
        let (dt, sh) = (self.dtype, self.shape.as_slice());
        let d = self.last();
        let probes = (0..self.n_out())
            .map(|_| randn(rng, sh, 1.0, dt, dev))
            .collect::<Result<Vec<_>>>()?;
        let (args, diff) = match self.op {
            OpKind::Softmax => (vec![randn(rng, sh, 3.0, dt, dev)?], vec![true]),
            OpKind::MaskedSoftmax { .. } => {
                let x = randn(rng, sh, 3.0, dt, dev)?;
                match self.mask_shape() {
                    None => (vec![x], vec![true]),
                    Some(ms) => {
                        let vals = randn(rng, &ms, 1.0, dt, dev)?;
                        let hide = rand(rng, &ms, 0.0, 1.0, DType::F32, dev)?.lt(0.2)?;
                        let neg =
                            Tensor::full(f32::NEG_INFINITY, ms.as_slice(), dev)?.to_dtype(dt)?;
                        (vec![x, hide.where_cond(&neg, &vals)?], vec![true, false])
                    }
                }
            }
            OpKind::RmsNorm { weight } => {
                let mut a = vec![randn(rng, sh, 1.0, dt, dev)?];
                if weight {
                    a.push(rand(rng, &[d], 0.5, 1.5, dt, dev)?);
                }
                let n = a.len();
                (a, vec![true; n])
            }
            OpKind::AddRmsNorm => (
                vec![
                    randn(rng, sh, 1.0, dt, dev)?,
                    randn(rng, sh, 1.0, dt, dev)?,
                    rand(rng, &[d], 0.5, 1.5, dt, dev)?,
                ],
                vec![true; 3],
            ),
            OpKind::Lora { .. } | OpKind::Rope { .. } | OpKind::Glu { .. } => {
                unreachable!("benchmarked by its own family")
            }
        };
        let saved = match self.op {
            // Our forward output, or the reference's if ours fails (so the other impls can
            // still be timed; ours' own failure is reported by its own rows).
            OpKind::Softmax | OpKind::MaskedSoftmax { .. } => {
                match check::apply(&self.kernels, self.op, &args, true) {
                    Ok(mut o) => o.remove(0),
                    Err(_) => check::apply(&self.kernels, self.op, &args, false)?.remove(0),
                }
            }
            OpKind::RmsNorm { .. } => args[0].clone(),
            OpKind::AddRmsNorm => (&args[0] + &args[1])?,
            OpKind::Lora { .. } | OpKind::Rope { .. } | OpKind::Glu { .. } => {
                unreachable!("benchmarked by its own family")
            }
        };
        Ok(InputSet {
            args,
            diff,
            probes,
            saved,
        })
    }

    /// The forward of `imp` (`Ours`, `Composed` or `Builtin`) on plain (untracked) tensors.
    pub fn forward(&self, imp: Impl, set: &InputSet) -> Result<Vec<Tensor>> {
        match imp {
            Impl::Ours | Impl::OursAutograd => {
                check::apply(&self.kernels, self.op, &set.args, true)
            }
            Impl::Composed => check::apply(&self.kernels, self.op, &set.args, false),
            Impl::Builtin => match self.op {
                OpKind::Softmax => Ok(vec![candle_nn::ops::softmax_last_dim(&set.args[0])?]),
                OpKind::RmsNorm { weight: true } => Ok(vec![candle_nn::ops::rms_norm(
                    &set.args[0],
                    &set.args[1],
                    EPS as f32,
                )?]),
                _ => candle_core::bail!("no built-in Candle op for {}", self.op.name()),
            },
        }
    }

    /// Our standalone backward, with the probes as output gradients.
    pub fn backward(&self, set: &InputSet) -> Result<Vec<Tensor>> {
        let dy = &set.probes[0];
        let k = &self.kernels;
        match self.op {
            OpKind::Softmax | OpKind::MaskedSoftmax { .. } => {
                Ok(vec![k.softmax_backward(&set.saved, dy, self.scale())?])
            }
            OpKind::RmsNorm { .. } => {
                let (dx, dw) = k.rms_norm_backward(&set.saved, set.args.get(1), dy, EPS)?;
                Ok(std::iter::once(dx).chain(dw).collect())
            }
            OpKind::AddRmsNorm => {
                let (dx, dw) =
                    k.add_rms_norm_backward(&set.saved, &set.args[2], dy, &set.probes[1], EPS)?;
                Ok(vec![dx, dw])
            }
            OpKind::Lora { .. } | OpKind::Rope { .. } | OpKind::Glu { .. } => {
                unreachable!("benchmarked by its own family")
            }
        }
    }

    /// Builds the autograd graph: the differentiable inputs as variables, the forward of ours
    /// (`fused`) or the composed ops, and `loss = Σ_k sum(out_k ⊙ probe_k)`. Returns the loss
    /// and the variables (keep them alive until `loss.backward()`).
    pub fn graph(&self, fused: bool, set: &InputSet) -> Result<(Tensor, Vec<Var>)> {
        let mut vars = Vec::new();
        let mut args = Vec::with_capacity(set.args.len());
        for (t, &d) in set.args.iter().zip(&set.diff) {
            if d {
                let v = Var::from_tensor(t)?;
                args.push(v.as_tensor().clone());
                vars.push(v);
            } else {
                args.push(t.clone());
            }
        }
        let outs = check::apply(&self.kernels, self.op, &args, fused)?;
        let mut loss: Option<Tensor> = None;
        for (o, p) in outs.iter().zip(&set.probes) {
            let term = super::probe_loss(o, p)?;
            loss = Some(match loss {
                None => term,
                Some(l) => (l + term)?,
            });
        }
        Ok((loss.expect("every op has an output"), vars))
    }

    /// Forward + `loss.backward()` (see [`MemCase::graph`]).
    pub fn fwd_bwd(&self, fused: bool, set: &InputSet) -> Result<GradStore> {
        let (loss, _vars) = self.graph(fused, set)?;
        loss.backward()
    }

    /// Times one implementation of one pass, rotating among `sets`.
    pub fn measure(
        &self,
        timer: &Timer,
        pass: Pass,
        imp: Impl,
        sets: &[InputSet],
    ) -> Result<super::timing::Stats> {
        let k = sets.len();
        let fused = matches!(imp, Impl::Ours | Impl::OursAutograd);
        match (pass, imp) {
            (Pass::Fwd, _) => timer.time(|i| self.forward(imp, &sets[i % k])),
            (Pass::Bwd, Impl::Ours) => timer.time(|i| self.backward(&sets[i % k])),
            (Pass::Bwd, _) => timer.time_with_setup(
                |i| self.graph(fused, &sets[i % k]),
                |(loss, vars)| Ok((loss.backward()?, loss, vars)),
            ),
            (Pass::FwdBwd, _) => timer.time(|i| self.fwd_bwd(fused, &sets[i % k])),
        }
    }
}

/// Rotate among input sets until they hold at least this many bytes (2.5x a Hopper L2).
pub const ROTATE_BYTES: usize = 128 << 20;
/// ... but never more than this many sets.
pub const MAX_SETS: usize = 64;

/// How many input sets a case rotates among.
pub fn sets_for(set_bytes: usize) -> usize {
    ROTATE_BYTES.div_ceil(set_bytes.max(1)).clamp(1, MAX_SETS)
}

const PASSES: [Pass; 3] = [Pass::Fwd, Pass::Bwd, Pass::FwdBwd];

/// Times every implementation of every pass of `case` and records the rows.
pub fn run_case(case: &MemCase, timer: &Timer, out: &mut Collector) {
    let key = |pass: Pass, imp: Impl| Key {
        op: case.op.name(),
        pass: pass.as_str(),
        shape: case.shape.clone(),
        dtype: case.dtype.as_str().to_string(),
        imp: imp.as_str(),
    };
    let k = sets_for(case.set_bytes());
    let mut rng = case.stream();
    let all_keys = || {
        PASSES
            .iter()
            .flat_map(|&p| case.impls(p).into_iter().map(move |(i, _)| key(p, i)))
            .collect()
    };
    let make = |_| case.inputs(timer.device(), &mut rng);
    let Some(sets) = out.input_sets(k, make, all_keys) else {
        return;
    };
    for pass in PASSES {
        for (imp, baseline) in case.impls(pass) {
            let res = case.measure(timer, pass, imp, &sets);
            out.record(
                key(pass, imp),
                case.bytes(pass),
                None,
                k,
                baseline.map(Impl::as_str),
                res,
            );
        }
    }
}
