//! The LoRA linear in the bench (`--op lora_linear`): `y = x·Wᵀ + s·(x·Aᵀ)·Bᵀ` with
//! `x [M, K]`, frozen `W [N, K]`, `A [r, K]`, `B [N, r]`, no bias, `s` = [`SCALE`].
//!
//! Rows have the shape `[M, K, N, r]`. Implementations, side by side in one run:
//!
//! | impl              | fwd                                      | fwd+bwd (grads)                |
//! |-------------------|------------------------------------------|--------------------------------|
//! | `base_gemm`       | `x.matmul(&w.t())` (Candle's matmul)     | same, `x` a `Var` (dx; Candle's matmul backward also computes the unused `dW`) |
//! | `base_linear`     | [`Kernels::linear`]`(x, w, None)`      | same, `x` a `Var` (dx only)    |
//! | `ours`            | [`Kernels::lora_linear`] (bias `None`)       | x, A, B `Var`s (dx, dA, dB)    |
//! | `candle_composed` | [`reference::lora_linear`] (what candle-lora does) | x, A, B `Var`s (+ the unused `dW`, see above) |
//! | `merged`          | [`Kernels::linear`] with `W' = W + s·B·A` (merged untimed) | (inference only) |
//!
//! The `bwd` pass times the backward alone, given `dy` (the probe), outside Candle's autograd:
//! ours is [`Kernels::lora_linear_backward`] (dx, dA, dB), `base_gemm` the base layer's
//! `dx = dy·W` (Candle's matmul, the limit). `fwd` + `bwd` is the kernel-level cost of a
//! training step's LoRA layer, without Candle's autograd bookkeeping (see `fwd+bwd`).
//!
//! `base_gemm` and `base_linear` are the same product `x·Wᵀ` through Candle's matmul and
//! through our op's GEMM; the faster of the two is "the limit" the summary compares ours
//! with (the target: ours fwd <= 1.05x the limit for M >= 4096). fwd+bwd times
//! `loss = sum(y ⊙ probe)` (a fixed random probe per input set, the same for every impl)
//! and `loss.backward()`; W is a plain tensor (frozen), never a `Var`.
//!
//! # Flops (the useful arithmetic of the function each impl computes)
//!
//! ```text
//! GEMM           = 2·M·K·N
//! LoRA fwd       = 2·M·K·N + 2·M·K·r + 2·M·r·N          (x·Wᵀ, x·Aᵀ, u·Bᵀ)
//! LoRA bwd       = 2·M·N·K + 4·M·N·r + 4·M·K·r          (dx = dy·W + (s·dy·B)·A,
//!                                                        dA = gᵀ·x, dB = dyᵀ·u)
//! LoRA fwd+bwd   = 4·M·K·N + 6·M·N·r + 6·M·K·r          (about 2x the forward: no dW)
//! base fwd       = 2·M·K·N,  base fwd+bwd = 4·M·K·N     (y = x·Wᵀ, dx = dy·W)
//! merged fwd     = 2·M·K·N                              (y = x·W'ᵀ)
//! ```
//! Candle's unused `dW` and the loss's `y ⊙ probe` and sum are not counted.
//!
//! # Bytes (each input read once, each output written once; `e` = bytes per element)
//!
//! ```text
//! LoRA fwd  e·(M·K + N·K + r·K + N·r + M·N)                        (x, W, A, B -> y)
//! LoRA bwd  e·(M·N + M·K + N·K + r·K + N·r + M·r + M·K + r·K + N·r) (dy, x, W, A, B, u
//!                                                                    -> dx, dA, dB)
//! base/merged fwd  e·(M·K + N·K + M·N),   base bwd  e·(M·N + N·K + M·K)
//! fwd+bwd = fwd bytes + bwd bytes
//! ```
//!
//! # Memory (the largest case, 16384×4096×14336 r64 bf16, one input set)
//! x 128 MiB (plus its `Var` copy), W and W' 112 MiB each, probe and y 448 MiB each; the
//! composed fwd+bwd holds about six `M×N` tensors (y, the low-rank term, the sum, y ⊙ probe
//! and their gradients) and a `dW`: about 4 GiB in all, far below an 80 GB GPU. The whole
//! family on an H100/H200 is 6 cases × 9 measurements × ~0.3 s each plus setup: ~20–30 s.
//!
//! Inputs are random (never zeros): `x ~ N(0, 1)`, `W, A ~ N(0, 1/K)`, `B ~ N(0, 1/r)`,
//! probe `~ N(0, 1)`. Cases whose input set is small rotate among several sets (at least
//! [`super::memops::ROTATE_BYTES`] in all, each with its own W, A, B, W') so the L2 cache does
//! not hold them. Before timing, ours' and the merged forward are checked against the composed
//! ops on the first set, `base_linear`'s against `base_gemm`'s; an impl that disagrees is
//! reported as skipped (with the error), not timed.

use candle_core::{backprop::GradStore, DType, Device, Result, Tensor, Var};

use super::cases::{self, Scope};
use super::memops::{sets_for, Pass};
use super::report::{self, Collector, Key};
use super::timing::{Stats, Timer};
use super::Family;
use candle_fused::Kernels;
use candle_fused_testkit::reference;
use candle_fused_testkit::rng::Rng;

/// The op name of the rows (and the `--op` family name).
pub const OP: &str = "lora_linear";
/// The LoRA scale `s` (= alpha / r with PEFT's common alpha = 2r).
pub const SCALE: f64 = 2.0;

/// Which implementation a measurement runs (see the module doc).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Impl {
    BaseGemm,
    BaseLinear,
    Ours,
    Composed,
    Merged,
}

impl Impl {
    pub fn as_str(self) -> &'static str {
        match self {
            Impl::BaseGemm => "base_gemm",
            Impl::BaseLinear => "base_linear",
            Impl::Ours => "ours",
            Impl::Composed => "candle_composed",
            Impl::Merged => "merged",
        }
    }

    /// Does the impl compute only `x·Wᵀ` (or `x·W'ᵀ`), not the LoRA terms?
    fn plain_gemm(self) -> bool {
        matches!(self, Impl::BaseGemm | Impl::BaseLinear | Impl::Merged)
    }
}

/// The impls timed in a pass, in order (everything but ours is compared with ours).
pub fn impls(pass: Pass) -> Vec<Impl> {
    match pass {
        Pass::Fwd => vec![
            Impl::BaseGemm,
            Impl::BaseLinear,
            Impl::Ours,
            Impl::Composed,
            Impl::Merged,
        ],
        Pass::FwdBwd => vec![Impl::BaseGemm, Impl::BaseLinear, Impl::Ours, Impl::Composed],
        Pass::Bwd => vec![Impl::BaseGemm, Impl::Ours],
    }
}

const PASSES: [Pass; 3] = [Pass::Fwd, Pass::Bwd, Pass::FwdBwd];

/// One LoRA problem: sizes and dtype, ours running on `kernels`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LoraCase {
    pub m: usize,
    pub k: usize,
    pub n: usize,
    pub r: usize,
    pub dtype: DType,
    pub kernels: Kernels,
}

/// One random input set. The `Var`s are the fwd+bwd inputs; the plain tensors share their
/// storage (detached) and are the forward's inputs, so the forward runs untracked.
pub struct LoraSet {
    pub x: Var,
    pub a: Var,
    pub b: Var,
    pub xd: Tensor,
    pub ad: Tensor,
    pub bd: Tensor,
    /// The frozen base weight (a plain tensor).
    pub w: Tensor,
    /// `W + s·B·A` (computed in f32, rounded once to the dtype).
    pub merged: Tensor,
    /// The loss's probe `[M, N]`.
    pub probe: Tensor,
}

impl LoraCase {
    /// `[M, K, N, r]` in `dtype` on the default kernels.
    pub fn from_shape(s: [usize; 4], dtype: DType) -> Self {
        LoraCase {
            m: s[0],
            k: s[1],
            n: s[2],
            r: s[3],
            dtype,
            kernels: Kernels::default(),
        }
    }

    /// The case's random stream of the run's seed (the same inputs for the same seed).
    pub fn stream(&self) -> Rng {
        Rng::stream(&format!("bench {OP} {:?} {:?}", self.shape(), self.dtype))
    }

    /// The rows' shape `[M, K, N, r]`.
    pub fn shape(&self) -> Vec<usize> {
        vec![self.m, self.k, self.n, self.r]
    }

    fn f64s(&self) -> (f64, f64, f64, f64) {
        (self.m as f64, self.k as f64, self.n as f64, self.r as f64)
    }

    /// Flops of one call (the formulas of the module doc).
    pub fn flops(&self, pass: Pass, imp: Impl) -> f64 {
        let (m, k, n, r) = self.f64s();
        let gemm = 2.0 * m * k * n;
        let (fwd, bwd) = if imp.plain_gemm() {
            (gemm, gemm)
        } else {
            (
                gemm + 2.0 * m * k * r + 2.0 * m * r * n,
                gemm + 4.0 * m * n * r + 4.0 * m * k * r,
            )
        };
        match pass {
            Pass::Fwd => fwd,
            Pass::Bwd => bwd,
            Pass::FwdBwd => fwd + bwd,
        }
    }

    /// Minimum bytes of one call (the formulas of the module doc).
    pub fn bytes(&self, pass: Pass, imp: Impl) -> f64 {
        let (m, k, n, r) = self.f64s();
        let e = self.dtype.size_in_bytes() as f64;
        let (fwd, bwd) = if imp.plain_gemm() {
            (m * k + n * k + m * n, m * n + n * k + m * k)
        } else {
            (
                m * k + n * k + r * k + n * r + m * n,
                m * n + m * k + n * k + r * k + n * r + m * r + m * k + r * k + n * r,
            )
        };
        e * match pass {
            Pass::Fwd => fwd,
            Pass::Bwd => bwd,
            Pass::FwdBwd => fwd + bwd,
        }
    }

    /// Bytes of one input set: x, W, W', A, B, probe.
    pub fn set_bytes(&self) -> usize {
        let (m, k, n, r) = (self.m, self.k, self.n, self.r);
        self.dtype.size_in_bytes() * (m * k + 2 * n * k + r * k + n * r + m * n)
    }

    /// A random input set on `dev` from `rng` (distributions in the module doc).
    pub fn inputs(&self, dev: &Device, rng: &mut Rng) -> Result<LoraSet> {
        let (m, k, n, r, dt) = (self.m, self.k, self.n, self.r, self.dtype);
        let mut randn = |shape: &[usize], std: f64| rng.randn_on(shape, std, dt, dev);
        let xd = randn(&[m, k], 1.0)?;
        let w = randn(&[n, k], 1.0 / (k as f64).sqrt())?;
        let ad = randn(&[r, k], 1.0 / (k as f64).sqrt())?;
        let bd = randn(&[n, r], 1.0 / (r as f64).sqrt())?;
        let probe = randn(&[m, n], 1.0)?;
        let f32 = |t: &Tensor| t.to_dtype(DType::F32);
        let merged =
            (f32(&w)? + f32(&bd)?.matmul(&f32(&ad)?)?.affine(SCALE, 0.0)?)?.to_dtype(dt)?;
        let (x, a, b) = (
            Var::from_tensor(&xd)?,
            Var::from_tensor(&ad)?,
            Var::from_tensor(&bd)?,
        );
        Ok(LoraSet {
            xd: x.as_tensor().detach(),
            ad: a.as_tensor().detach(),
            bd: b.as_tensor().detach(),
            x,
            a,
            b,
            w,
            merged,
            probe,
        })
    }

    /// The forward of `imp` on plain (untracked) tensors.
    pub fn forward(&self, imp: Impl, s: &LoraSet) -> Result<Tensor> {
        match imp {
            Impl::BaseGemm => s.xd.matmul(&s.w.t()?),
            Impl::BaseLinear => self.kernels.linear(&s.xd, &s.w, None),
            Impl::Ours => self
                .kernels
                .lora_linear(&s.xd, &s.w, None, &s.ad, &s.bd, SCALE),
            Impl::Composed => reference::lora_linear(&s.xd, &s.w, None, &s.ad, &s.bd, SCALE),
            Impl::Merged => self.kernels.linear(&s.xd, &s.merged, None),
        }
    }

    /// Forward on the `Var`s, `loss = sum(y ⊙ probe)`, `loss.backward()`.
    pub fn fwd_bwd(&self, imp: Impl, s: &LoraSet) -> Result<GradStore> {
        let (x, a, b) = (s.x.as_tensor(), s.a.as_tensor(), s.b.as_tensor());
        let y = match imp {
            Impl::BaseGemm => x.matmul(&s.w.t()?)?,
            Impl::BaseLinear => self.kernels.linear(x, &s.w, None)?,
            Impl::Ours => self.kernels.lora_linear(x, &s.w, None, a, b, SCALE)?,
            Impl::Composed => reference::lora_linear(x, &s.w, None, a, b, SCALE)?,
            Impl::Merged => candle_core::bail!("merged weights are timed for inference only"),
        };
        super::probe_loss(&y, &s.probe)?.backward()
    }

    /// The backward alone given `dy` (the set's probe), outside autograd: ours is
    /// [`Kernels::lora_linear_backward`] (dx, dA, dB); `base_gemm` is the base layer's `dx = dy·W`
    /// through Candle's matmul (the limit: what any LoRA backward must at least do).
    pub fn backward(&self, imp: Impl, s: &LoraSet) -> Result<Tensor> {
        match imp {
            Impl::BaseGemm => s.probe.matmul(&s.w),
            Impl::Ours => {
                let g = self
                    .kernels
                    .lora_linear_backward(&s.xd, &s.w, None, &s.ad, &s.bd, SCALE, &s.probe)?;
                Ok(g.dx)
            }
            _ => candle_core::bail!(
                "candle-fused bench: no standalone {OP} backward for {}",
                imp.as_str()
            ),
        }
    }

    /// Checks `imp`'s forward against Candle's (`base_linear` against `base_gemm`, the others
    /// against `candle_composed`) on `s`, relative to the largest |y|; the merged weight is
    /// rounded once to the dtype, so it gets a looser bound.
    pub fn verify(&self, imp: Impl, s: &LoraSet) -> Result<()> {
        let reference = match imp {
            Impl::BaseLinear => Impl::BaseGemm,
            _ => Impl::Composed,
        };
        let want = self.forward(reference, s)?.to_dtype(DType::F32)?;
        let got = self.forward(imp, s)?.to_dtype(DType::F32)?;
        let scale = want.abs()?.max_all()?.to_scalar::<f32>()? as f64;
        let diff = (got - &want)?.abs()?.max_all()?.to_scalar::<f32>()? as f64;
        let rel = diff / scale.max(f64::MIN_POSITIVE);
        let half = matches!(self.dtype, DType::BF16 | DType::F16);
        let tol = match (half, imp == Impl::Merged) {
            (false, false) => 1e-4,
            (false, true) => 1e-3,
            (true, false) => 2e-2,
            (true, true) => 5e-2,
        };
        if rel.is_finite() && rel <= tol {
            Ok(())
        } else {
            candle_core::bail!(
                "candle-fused bench: {} forward differs from {}: max |diff| / max |y| = \
                 {rel:.3e} > {tol:.0e}; not timed",
                imp.as_str(),
                reference.as_str()
            )
        }
    }

    /// Times one implementation of one pass, rotating among `sets`.
    pub fn measure(&self, timer: &Timer, pass: Pass, imp: Impl, sets: &[LoraSet]) -> Result<Stats> {
        let k = sets.len();
        match pass {
            Pass::Fwd => timer.time(|i| self.forward(imp, &sets[i % k])),
            Pass::FwdBwd => timer.time(|i| self.fwd_bwd(imp, &sets[i % k])),
            Pass::Bwd => timer.time(|i| self.backward(imp, &sets[i % k])),
        }
    }
}

/// Times every implementation of every pass of `case` and records the rows.
pub fn run_case(case: &LoraCase, timer: &Timer, out: &mut Collector) {
    let key = |pass: Pass, imp: Impl| Key {
        op: OP.to_string(),
        pass: pass.as_str(),
        shape: case.shape(),
        dtype: case.dtype.as_str().to_string(),
        imp: imp.as_str(),
    };
    let n_sets = sets_for(case.set_bytes());
    let mut rng = case.stream();
    let all_keys = || {
        PASSES
            .iter()
            .flat_map(|&p| impls(p).into_iter().map(move |i| key(p, i)))
            .collect()
    };
    let make = |_| case.inputs(timer.device(), &mut rng);
    let Some(sets) = out.input_sets(n_sets, make, all_keys) else {
        return;
    };
    // An impl whose forward disagrees with the composed ops is not timed (in any pass).
    let checks: Vec<(Impl, Result<()>)> = [Impl::BaseLinear, Impl::Ours, Impl::Merged]
        .into_iter()
        .map(|imp| (imp, case.verify(imp, &sets[0])))
        .collect();
    for pass in PASSES {
        for imp in impls(pass) {
            let failed = checks.iter().find_map(|(i, r)| match r {
                Err(e) if *i == imp => Some(candle_core::Error::Msg(e.to_string())),
                _ => None,
            });
            let res = match failed {
                Some(e) => Err(e),
                None => case.measure(timer, pass, imp, &sets),
            };
            let baseline = (imp != Impl::Ours).then_some(Impl::Ours.as_str());
            out.record(
                key(pass, imp),
                case.bytes(pass, imp),
                Some(case.flops(pass, imp)),
                n_sets,
                baseline,
                res,
            );
        }
    }
}

/// The `lora_linear` family.
pub struct LoraFamily;

impl Family for LoraFamily {
    fn name(&self) -> &'static str {
        OP
    }
    fn run(&self, scope: Scope, timer: &Timer, out: &mut Collector) {
        let cases: Vec<LoraCase> = cases::lora_shapes(scope)
            .into_iter()
            .map(|(s, dt)| LoraCase {
                kernels: scope.kernels,
                ..LoraCase::from_shape(s, dt)
            })
            .collect();
        for (i, case) in cases.iter().enumerate() {
            eprintln!(
                "[{}/{}] {OP} {} {} ({} input set(s))",
                i + 1,
                cases.len(),
                report::shape_str(&case.shape()),
                case.dtype.as_str(),
                sets_for(case.set_bytes())
            );
            run_case(case, timer, out);
            out.checkpoint();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn case(dtype: DType) -> LoraCase {
        LoraCase::from_shape([37, 70, 50, 5], dtype)
    }

    fn rel(a: &Tensor, b: &Tensor) -> f64 {
        let (a, b) = (
            a.to_dtype(DType::F64).unwrap(),
            b.to_dtype(DType::F64).unwrap(),
        );
        let d = (&a - &b).unwrap().abs().unwrap().max_all().unwrap();
        let m = b.abs().unwrap().max_all().unwrap();
        d.to_scalar::<f64>().unwrap() / m.to_scalar::<f64>().unwrap()
    }

    #[test]
    fn every_forward_matches_candle() {
        for dt in [DType::F32, DType::BF16] {
            let c = case(dt);
            let s = c.inputs(&Device::Cpu, &mut c.stream()).unwrap();
            for imp in [Impl::BaseLinear, Impl::Ours, Impl::Merged] {
                c.verify(imp, &s).unwrap();
            }
        }
    }

    #[test]
    fn verify_rejects_a_wrong_forward() {
        let c = case(DType::F32);
        let mut s = c.inputs(&Device::Cpu, &mut c.stream()).unwrap();
        // The un-merged weight lacks the adapter term: the merged row must not be timed.
        s.merged = s.w.clone();
        let e = c.verify(Impl::Merged, &s).unwrap_err().to_string();
        assert!(
            e.contains("merged forward differs from candle_composed"),
            "{e}"
        );
    }

    #[test]
    fn fwd_bwd_gives_the_same_gradients() {
        let c = case(DType::F32);
        let s = c.inputs(&Device::Cpu, &mut c.stream()).unwrap();
        let ours = c.fwd_bwd(Impl::Ours, &s).unwrap();
        let comp = c.fwd_bwd(Impl::Composed, &s).unwrap();
        for v in [&s.x, &s.a, &s.b] {
            let (g, h) = (ours.get(v).unwrap(), comp.get(v).unwrap());
            assert!(rel(g, h) < 1e-5, "{}", rel(g, h));
        }
        for imp in [Impl::BaseGemm, Impl::BaseLinear] {
            let g = c.fwd_bwd(imp, &s).unwrap();
            assert!(rel(g.get(&s.x).unwrap(), &s.probe.matmul(&s.w).unwrap()) < 1e-5);
            assert!(g.get(&s.a).is_none() && g.get(&s.b).is_none());
        }
        assert!(c.fwd_bwd(Impl::Merged, &s).is_err());
    }

    #[test]
    fn flops_and_bytes() {
        let c = LoraCase::from_shape([2, 3, 5, 7], DType::BF16);
        let (m, k, n, r) = (2.0, 3.0, 5.0, 7.0);
        let fb = 4.0 * m * k * n + 6.0 * m * n * r + 6.0 * m * k * r;
        assert_eq!(c.flops(Pass::FwdBwd, Impl::Ours), fb);
        assert_eq!(c.flops(Pass::Fwd, Impl::Merged), 2.0 * m * k * n);
        assert_eq!(c.flops(Pass::FwdBwd, Impl::BaseGemm), 4.0 * m * k * n);
        let fwd = 2.0 * (m * k + n * k + r * k + n * r + m * n);
        assert_eq!(c.bytes(Pass::Fwd, Impl::Composed), fwd);
    }

    #[test]
    fn run_case_records_every_row() {
        let timer = crate::bench::test_util::timer(2);
        let mut out = crate::bench::test_util::collector();
        run_case(&case(DType::F32), &timer, &mut out);
        out.finish();
        assert!(out.skipped.is_empty(), "{:?}", out.skipped);
        assert_eq!(out.rows.len(), 11);
        for r in &out.rows {
            assert_eq!(r.shape, vec![37, 70, 50, 5]);
            assert!(r.tflops.is_some_and(|t| t > 0.0) && r.median_us > 0.0);
            assert_eq!(r.speedup.is_some(), r.imp != "ours", "{}", r.imp);
        }
        let s = report::compute_summary(&out.rows);
        assert_eq!(s.lines().count(), 5, "{s}");
        assert!(report::summary(&out.rows).is_empty());
    }
}
