//! RoPE (`--op rope`) and SwiGLU/GeGLU (`--op glu`) in the bench.
//!
//! RoPE rows: `rope` (`[B, H, T, D]`, half-split), `rope_bthd` (`[B, T, H, D]`),
//! `rope_interleaved`; full rotary dim, θ = 10⁴, a table of 8192 positions, positions
//! `[T]` u32 = `0..T` + a random offset. GLU rows: `swiglu`, `geglu` (two tensors of the
//! output shape `[N, I]`), `swiglu_packed` (one `[N, 2I]` input).
//!
//! | impl                | fwd | bwd | fwd+bwd |
//! |---------------------|-----|-----|---------|
//! | `ours`              | `Kernels::rope` / `Kernels::glu(_packed)` on the bench's `--kernel-config` | the standalone backward given dy | forward on Vars + `loss.backward()` |
//! | `ours_autograd`     |     | `loss.backward()` through ours (graph built untimed) | |
//! | `candle_composed`   | the same function from Candle ops in the input dtype: `testkit::reference::rope` (cos/sin gathered at the positions each call) and `glu_builtin` (`Tensor::silu` / `Tensor::gelu`, tanh approximation, times up) | `loss.backward()` (graph untimed) | as ours |
//! | `candle_rotary_emb` | `candle_nn::rotary_emb::{rope, rope_thd, rope_i}` on cos/sin gathered at the positions before timing (no backward) | | |
//!
//! Bytes (`e` bytes per element, `N` elements of x or of the GLU output, `T` tokens, `R`
//! rotary dim): RoPE fwd and bwd `2Ne + 4TR + 4T` (x in, y out, the cos/sin rows of the T
//! positions in f32, the u32 positions); GLU fwd `3Ne` (gate, up -> y), bwd `5Ne` (gate,
//! up, dy -> dgate, dup); fwd+bwd the sum. The loss is `sum(y ⊙ probe)` with a fixed random
//! probe, which is also the bwd's `dy`. Before timing, ours' forward is checked against the
//! composed one on the first input set (a wrong forward is skipped, not timed).

use candle_core::{backprop::GradStore, DType, Device, Result, Tensor, Var};
use candle_fused::ops::{GluKind, RopeConfig, RopeLayout, RopeStyle, RopeTable};
use candle_fused::Kernels;
use candle_fused_testkit::{reference, testing};

use super::cases::{self, Scope};
use super::memops::{sets_for, Pass};
use super::report::{self, Collector, Key};
use super::timing::{Stats, Timer};
use super::Family;

/// Rows of the bench's RoPE table.
pub const ROPE_POSITIONS: usize = 8192;

/// Which implementation a measurement runs (see the module doc).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Impl {
    Ours,
    OursAutograd,
    Composed,
    CandleRotary,
}

impl Impl {
    pub fn as_str(self) -> &'static str {
        match self {
            Impl::Ours => "ours",
            Impl::OursAutograd => "ours_autograd",
            Impl::Composed => "candle_composed",
            Impl::CandleRotary => "candle_rotary_emb",
        }
    }
}

/// A RoPE or GLU problem.
#[derive(Debug, Clone)]
pub enum Case {
    /// x of `shape` (in the layout's order).
    Rope {
        shape: [usize; 4],
        layout: RopeLayout,
        style: RopeStyle,
        dtype: DType,
    },
    /// Output `shape` `[.., I]`.
    Glu {
        shape: Vec<usize>,
        kind: GluKind,
        packed: bool,
        dtype: DType,
    },
}

/// One random input set: the inputs as plain tensors, the probe, and for RoPE the table,
/// positions and gathered cos/sin (for Candle's kernels).
pub struct Set {
    pub args: Vec<Tensor>,
    pub probe: Tensor,
    pub rope: Option<(RopeTable, Tensor, Tensor, Tensor)>,
    /// The kernel configuration ours run on (the bench's `--kernel-config`).
    pub kernels: Kernels,
}

fn randn(shape: &[usize], std: f64, dtype: DType, dev: &Device) -> Result<Tensor> {
    Tensor::randn(0f32, std as f32, shape, dev)?.to_dtype(dtype)
}

impl Case {
    pub fn op_name(&self) -> &'static str {
        match self {
            Case::Rope { layout, style, .. } => match (layout, style) {
                (RopeLayout::Bhtd, RopeStyle::HalfSplit) => "rope",
                (RopeLayout::Bthd, RopeStyle::HalfSplit) => "rope_bthd",
                (RopeLayout::Bhtd, RopeStyle::Interleaved) => "rope_interleaved",
                (RopeLayout::Bthd, RopeStyle::Interleaved) => "rope_bthd_interleaved",
            },
            Case::Glu { kind, packed, .. } => match (kind, packed) {
                (GluKind::SwiGlu, false) => "swiglu",
                (GluKind::SwiGlu, true) => "swiglu_packed",
                (GluKind::GeGluTanh, false) => "geglu",
                (GluKind::GeGluTanh, true) => "geglu_packed",
            },
        }
    }

    pub fn shape(&self) -> Vec<usize> {
        match self {
            Case::Rope { shape, .. } => shape.to_vec(),
            Case::Glu { shape, .. } => shape.clone(),
        }
    }

    pub fn dtype(&self) -> DType {
        match self {
            Case::Rope { dtype, .. } | Case::Glu { dtype, .. } => *dtype,
        }
    }

    fn elems(&self) -> usize {
        self.shape().iter().product()
    }

    /// Bytes that must move (module doc).
    pub fn bytes(&self, pass: Pass) -> f64 {
        let n = self.elems() as f64 * self.dtype().size_in_bytes() as f64;
        let (fwd, bwd) = match self {
            Case::Rope { shape, layout, .. } => {
                let t = match layout {
                    RopeLayout::Bhtd => shape[2],
                    RopeLayout::Bthd => shape[1],
                } as f64;
                let one = 2.0 * n + 4.0 * t * shape[3] as f64 + 4.0 * t;
                (one, one)
            }
            Case::Glu { .. } => (3.0 * n, 5.0 * n),
        };
        match pass {
            Pass::Fwd => fwd,
            Pass::Bwd => bwd,
            Pass::FwdBwd => fwd + bwd,
        }
    }

    /// Bytes of one input set (to decide how many sets to rotate among).
    pub fn set_bytes(&self) -> usize {
        let n = self.elems() * self.dtype().size_in_bytes();
        match self {
            Case::Rope { .. } => 2 * n,
            Case::Glu { .. } => 3 * n,
        }
    }

    /// The impls timed in `pass`, each with the impl its speedup divides by.
    pub fn impls(&self, pass: Pass) -> Vec<(Impl, Option<Impl>)> {
        match pass {
            Pass::Fwd => {
                let mut v = vec![(Impl::Ours, None), (Impl::Composed, Some(Impl::Ours))];
                if matches!(self, Case::Rope { .. }) {
                    v.push((Impl::CandleRotary, Some(Impl::Ours)));
                }
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

    /// A fresh random input set on `dev` (x, gate_up ~ N(0, 1), gate ~ N(0, 2²), up and
    /// the probe ~ N(0, 1); RoPE positions `offset..offset + T`), for ours on `kernels`.
    pub fn inputs(&self, dev: &Device, table: Option<&RopeTable>, kernels: Kernels) -> Result<Set> {
        let dt = self.dtype();
        let shape = self.shape();
        let probe = randn(&shape, 1.0, dt, dev)?;
        match self {
            Case::Rope { layout, .. } => {
                let t = match layout {
                    RopeLayout::Bhtd => shape[2],
                    RopeLayout::Bthd => shape[1],
                };
                let table = table.expect("a RoPE case has a table").clone();
                let offset = (testing::rand(&[1], 0.0, 1.0, DType::F64, &Device::Cpu)?
                    .to_vec1::<f64>()?[0]
                    * (ROPE_POSITIONS - t) as f64) as u32;
                let pos = Tensor::arange(offset, offset + t as u32, dev)?;
                let gather = |tab: &Tensor| tab.index_select(&pos, 0)?.to_dtype(dt);
                let (c, s) = (gather(table.cos())?, gather(table.sin())?);
                Ok(Set {
                    args: vec![randn(&shape, 1.0, dt, dev)?],
                    probe,
                    rope: Some((table, pos, c, s)),
                    kernels,
                })
            }
            Case::Glu { packed: true, .. } => {
                let mut s = shape.clone();
                *s.last_mut().expect("rank >= 1") *= 2;
                Ok(Set {
                    args: vec![randn(&s, 1.0, dt, dev)?],
                    probe,
                    rope: None,
                    kernels,
                })
            }
            Case::Glu { packed: false, .. } => Ok(Set {
                args: vec![randn(&shape, 2.0, dt, dev)?, randn(&shape, 1.0, dt, dev)?],
                probe,
                rope: None,
                kernels,
            }),
        }
    }

    /// The forward of `imp` on `args` (plain tensors or the graph's variables).
    fn apply(&self, imp: Impl, args: &[Tensor], s: &Set) -> Result<Tensor> {
        match self {
            Case::Rope { layout, style, .. } => {
                let (tab, pos, c, sn) = s.rope.as_ref().expect("a RoPE set");
                let x = &args[0];
                match imp {
                    Impl::Ours | Impl::OursAutograd => s.kernels.rope(x, tab, pos, *layout, *style),
                    Impl::Composed => {
                        reference::rope(x, tab.cos(), tab.sin(), pos, *layout, *style)
                    }
                    Impl::CandleRotary => match (layout, style) {
                        (RopeLayout::Bhtd, RopeStyle::HalfSplit) => {
                            candle_nn::rotary_emb::rope(x, c, sn)
                        }
                        (RopeLayout::Bthd, RopeStyle::HalfSplit) => {
                            candle_nn::rotary_emb::rope_thd(x, c, sn)
                        }
                        (RopeLayout::Bhtd, RopeStyle::Interleaved) => {
                            candle_nn::rotary_emb::rope_i(x, c, sn)
                        }
                        (RopeLayout::Bthd, RopeStyle::Interleaved) => {
                            candle_core::bail!("candle_nn has no interleaved [B, T, H, D] rope")
                        }
                    },
                }
            }
            Case::Glu { kind, packed, .. } => match (imp, packed) {
                (Impl::Ours | Impl::OursAutograd, true) => s.kernels.glu_packed(*kind, &args[0]),
                (Impl::Ours | Impl::OursAutograd, false) => {
                    s.kernels.glu(*kind, &args[0], &args[1])
                }
                (Impl::Composed, true) => {
                    let i = args[0].dim(candle_core::D::Minus1)? / 2;
                    let (g, u) = (
                        args[0].narrow(candle_core::D::Minus1, 0, i)?,
                        args[0].narrow(candle_core::D::Minus1, i, i)?,
                    );
                    reference::glu_builtin(*kind, &g, &u)
                }
                (Impl::Composed, false) => reference::glu_builtin(*kind, &args[0], &args[1]),
                (Impl::CandleRotary, _) => candle_core::bail!("not a GLU impl"),
            },
        }
    }

    /// Our standalone backward with the probe as `dy`.
    fn backward(&self, s: &Set) -> Result<Vec<Tensor>> {
        match self {
            Case::Rope { layout, style, .. } => {
                let (tab, pos, _, _) = s.rope.as_ref().expect("a RoPE set");
                Ok(vec![s
                    .kernels
                    .rope_backward(&s.probe, tab, pos, *layout, *style)?])
            }
            Case::Glu {
                kind, packed: true, ..
            } => Ok(vec![s
                .kernels
                .glu_packed_backward(*kind, &s.args[0], &s.probe)?]),
            Case::Glu {
                kind,
                packed: false,
                ..
            } => {
                let (a, b) = s
                    .kernels
                    .glu_backward(*kind, &s.args[0], &s.args[1], &s.probe)?;
                Ok(vec![a, b])
            }
        }
    }

    /// The inputs as variables, the forward of `imp` and `loss = sum(y ⊙ probe)`; keep the
    /// variables alive until `loss.backward()`.
    fn graph(&self, imp: Impl, s: &Set) -> Result<(Tensor, Vec<Var>)> {
        let vars: Vec<Var> = s.args.iter().map(Var::from_tensor).collect::<Result<_>>()?;
        let args: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let y = self.apply(imp, &args, s)?;
        Ok((super::probe_loss(&y, &s.probe)?, vars))
    }

    fn fwd_bwd(&self, imp: Impl, s: &Set) -> Result<GradStore> {
        let (loss, _vars) = self.graph(imp, s)?;
        loss.backward()
    }

    /// Ours' forward against the composed one (relative error within the dtype's tolerance).
    fn verify(&self, s: &Set) -> Result<()> {
        let ours = self.apply(Impl::Ours, &s.args, s)?;
        let want = self.apply(Impl::Composed, &s.args, s)?;
        let err = testing::rel_err(&ours, &want)?;
        let tol = 2.0 * testing::tolerance(self.dtype());
        // NaN fails too.
        if err.is_nan() || err > tol {
            candle_core::bail!("ours' forward differs from the composed ops: relative error {err:.3e} > {tol:.0e}; not timed")
        }
        Ok(())
    }

    fn measure(&self, timer: &Timer, pass: Pass, imp: Impl, sets: &[Set]) -> Result<Stats> {
        let k = sets.len();
        match (pass, imp) {
            (Pass::Fwd, _) => timer.time(|i| self.apply(imp, &sets[i % k].args, &sets[i % k])),
            (Pass::Bwd, Impl::Ours) => timer.time(|i| self.backward(&sets[i % k])),
            (Pass::Bwd, _) => timer.time_with_setup(
                |i| self.graph(imp, &sets[i % k]),
                |(loss, vars)| Ok((loss.backward()?, loss, vars)),
            ),
            (Pass::FwdBwd, _) => timer.time(|i| self.fwd_bwd(imp, &sets[i % k])),
        }
    }
}

const PASSES: [Pass; 3] = [Pass::Fwd, Pass::Bwd, Pass::FwdBwd];

/// Times every implementation of every pass of `case` (ours on `kernels`) and records the rows.
pub fn run_case(case: &Case, kernels: &Kernels, timer: &Timer, out: &mut Collector) {
    let key = |pass: Pass, imp: Impl| Key {
        op: case.op_name().to_string(),
        pass: pass.as_str(),
        shape: case.shape(),
        dtype: case.dtype().as_str().to_string(),
        imp: imp.as_str(),
    };
    let keys = || {
        PASSES
            .iter()
            .flat_map(|&p| case.impls(p).into_iter().map(move |(i, _)| key(p, i)))
            .collect()
    };
    let dev = timer.device();
    let table = match case {
        Case::Rope { shape, .. } => {
            match RopeTable::new(&RopeConfig::new(shape[3], 10_000.0, ROPE_POSITIONS), dev) {
                Ok(t) => Some(t),
                Err(e) => return out.skip_all(keys(), &e),
            }
        }
        Case::Glu { .. } => None,
    };
    let n_sets = sets_for(case.set_bytes());
    let sets: Result<Vec<Set>> = (0..n_sets)
        .map(|_| case.inputs(dev, table.as_ref(), *kernels))
        .collect();
    let sets = match sets {
        Ok(s) => s,
        Err(e) => return out.skip_all(keys(), &e),
    };
    let verified = case.verify(&sets[0]);
    for pass in PASSES {
        for (imp, baseline) in case.impls(pass) {
            let res = match (&verified, imp) {
                (Err(e), Impl::Ours | Impl::OursAutograd) => {
                    Err(candle_core::Error::Msg(e.to_string()))
                }
                _ => case.measure(timer, pass, imp, &sets),
            };
            out.record(
                key(pass, imp),
                case.bytes(pass),
                None,
                n_sets,
                baseline.map(Impl::as_str),
                res,
            );
        }
    }
}

/// The `rope` or `glu` family.
pub struct RopeGluFamily(pub &'static str);

impl Family for RopeGluFamily {
    fn name(&self) -> &'static str {
        self.0
    }
    fn run(&self, scope: Scope, timer: &Timer, out: &mut Collector) {
        let cases: Vec<Case> = match self.0 {
            "rope" => cases::rope_shapes(scope)
                .into_iter()
                .map(|(shape, layout, style, dtype)| Case::Rope {
                    shape,
                    layout,
                    style,
                    dtype,
                })
                .collect(),
            _ => cases::glu_shapes(scope)
                .into_iter()
                .map(|(shape, kind, packed, dtype)| Case::Glu {
                    shape,
                    kind,
                    packed,
                    dtype,
                })
                .collect(),
        };
        for (i, case) in cases.iter().enumerate() {
            eprintln!(
                "[{}/{}] {} {} {} ({} input set(s))",
                i + 1,
                cases.len(),
                case.op_name(),
                report::shape_str(&case.shape()),
                case.dtype().as_str(),
                sets_for(case.set_bytes())
            );
            run_case(case, &scope.kernels, timer, out);
            out.checkpoint();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_impl_runs_and_records_rows() {
        let timer = crate::bench::test_util::timer(1);
        let cases = vec![
            Case::Rope {
                shape: [1, 3, 5, 8],
                layout: RopeLayout::Bhtd,
                style: RopeStyle::HalfSplit,
                dtype: DType::F32,
            },
            Case::Rope {
                shape: [2, 5, 3, 8],
                layout: RopeLayout::Bthd,
                style: RopeStyle::HalfSplit,
                dtype: DType::BF16,
            },
            Case::Rope {
                shape: [1, 3, 5, 8],
                layout: RopeLayout::Bhtd,
                style: RopeStyle::Interleaved,
                dtype: DType::F32,
            },
            Case::Glu {
                shape: vec![3, 10],
                kind: GluKind::SwiGlu,
                packed: false,
                dtype: DType::F32,
            },
            Case::Glu {
                shape: vec![3, 10],
                kind: GluKind::SwiGlu,
                packed: true,
                dtype: DType::BF16,
            },
            Case::Glu {
                shape: vec![3, 10],
                kind: GluKind::GeGluTanh,
                packed: false,
                dtype: DType::F32,
            },
        ];
        for case in cases {
            let mut out = crate::bench::test_util::collector();
            run_case(&case, &Kernels::default(), &timer, &mut out);
            assert!(out.skipped.is_empty(), "{:?}", out.skipped);
            let n: usize = PASSES.iter().map(|&p| case.impls(p).len()).sum();
            assert_eq!(out.rows.len(), n, "{}", case.op_name());
        }
    }

    /// Ours run on the bench's `--kernel-config` (a SIMD level this CPU lacks: every row of
    /// ours fails, the peers' rows are timed).
    #[test]
    fn ours_run_on_the_given_kernel_config() {
        let timer = crate::bench::test_util::timer(2);
        let k = crate::bench::test_util::unavailable_simd();
        for case in [
            Case::Rope {
                shape: [1, 3, 5, 8],
                layout: RopeLayout::Bhtd,
                style: RopeStyle::HalfSplit,
                dtype: DType::F32,
            },
            Case::Glu {
                shape: vec![3, 10],
                kind: GluKind::SwiGlu,
                packed: false,
                dtype: DType::F32,
            },
        ] {
            let mut out = crate::bench::test_util::collector();
            run_case(&case, &k, &timer, &mut out);
            crate::bench::test_util::ours_skipped_others_timed(&out);
        }
    }

    /// The composed and Candle forwards agree with ours (the bench compares like with like).
    #[test]
    fn forwards_agree() {
        let dev = Device::Cpu;
        let case = Case::Rope {
            shape: [2, 3, 7, 16],
            layout: RopeLayout::Bhtd,
            style: RopeStyle::HalfSplit,
            dtype: DType::F32,
        };
        let tab = RopeTable::new(&RopeConfig::new(16, 10_000.0, ROPE_POSITIONS), &dev).unwrap();
        let s = case.inputs(&dev, Some(&tab), Kernels::default()).unwrap();
        let ours = case.apply(Impl::Ours, &s.args, &s).unwrap();
        for imp in [Impl::Composed, Impl::CandleRotary] {
            let other = case.apply(imp, &s.args, &s).unwrap();
            assert!(testing::rel_err(&other, &ours).unwrap() < 1e-6, "{imp:?}");
        }
        assert_eq!(
            case.bytes(Pass::Fwd),
            (2 * 2 * 3 * 7 * 16 * 4 + 4 * 7 * 16 + 4 * 7) as f64
        );
    }
}
