//! The matrix products in the bench (`--op matmul`): `y [M, N] = x [M, K] · Wᵀ` with a weight
//! `W [N, K]` (the layout of a linear layer, LoRA's base GEMM and the training step), forward
//! only. Rows have the shape `[M, K, N]`.
//!
//! | impl            | what                                                              |
//! |-----------------|-------------------------------------------------------------------|
//! | `ours`          | [`ops::matmul`]`(x, W, false, true)`, default configuration      |
//! | `ours_1thread`  | the same with `CpuConfig::gemm_threads = 1` (no thread pool)      |
//! | `ours_no_gemv`  | `M = 1` only: the `gemm` crate instead of our GEMV                |
//! | `candle_matmul` | `x.matmul(&W.t())`: Candle's CPU matmul (the `gemm` crate; no bf16)|
//!
//! Flops `2·M·K·N`; bytes `e·(M·K + N·K + M·N)` (each operand read once, the output written
//! once): for the decode GEMV (`M = 1`) that is the memory floor, so its % of the copy
//! bandwidth says how close it comes. Inputs `x ~ N(0, 1)`, `W ~ N(0, 1/K)`, rotated among
//! several sets when small. `scripts/bench_torch.py` times `F.linear(x, W)` on the same rows.

use candle_core::{DType, Device, Result, Tensor};

use super::cases::Plan;
use super::memops::sets_for;
use super::report::{Collector, Key};
use super::timing::Timer;
use super::Family;
use candle_fused::config::CpuConfig;
use candle_fused::{ops, KernelConfig, Kernels};

/// The op name of the rows (and the `--op` family name).
pub const OP: &str = "matmul";

/// `(M, K, N)` and dtypes: the LoRA/Llama shapes of the issue, and the decode GEMV.
pub fn gemm_shapes(plan: Plan) -> Vec<([usize; 3], DType)> {
    let shapes: &[[usize; 3]] = if plan.quick {
        &[[1024, 512, 512], [1, 4096, 4096]]
    } else {
        &[
            [1024, 512, 512],
            [1024, 512, 1344],
            [1024, 512, 8192],
            [4096, 1024, 1024],
            [1, 4096, 4096],
        ]
    };
    let mut out = vec![];
    for dt in [DType::F32, DType::BF16] {
        out.extend(shapes.iter().map(|&s| (s, dt)));
    }
    out
}

fn dtype_str(dt: DType) -> &'static str {
    match dt {
        DType::F32 => "f32",
        DType::BF16 => "bf16",
        DType::F16 => "f16",
        _ => "f64",
    }
}

fn inputs(shape: [usize; 3], dt: DType, dev: &Device) -> Result<(Tensor, Tensor)> {
    let [m, k, n] = shape;
    let x = Tensor::randn(0f32, 1.0, (m, k), dev)?.to_dtype(dt)?;
    let w = Tensor::randn(0f32, (1.0 / k as f64).sqrt() as f32, (n, k), dev)?.to_dtype(dt)?;
    Ok((x, w))
}

/// The `matmul` family.
pub struct GemmFamily;

impl Family for GemmFamily {
    fn name(&self) -> &'static str {
        OP
    }

    fn run(&self, plan: Plan, timer: &Timer, out: &mut Collector) {
        let cases = gemm_shapes(plan);
        for (i, &(shape, dt)) in cases.iter().enumerate() {
            let [m, k, n] = shape;
            let e = dt.size_in_bytes();
            let bytes = (e * (m * k + n * k + m * n)) as f64;
            let flops = 2.0 * (m * k * n) as f64;
            let n_sets = sets_for(bytes as usize);
            eprintln!(
                "[{}/{}] matmul {m}x{k}x{n} {} ({n_sets} input set(s))",
                i + 1,
                cases.len(),
                dtype_str(dt)
            );
            let key = |imp: &'static str| Key {
                op: OP.to_string(),
                pass: "fwd",
                shape: shape.to_vec(),
                dtype: dtype_str(dt).to_string(),
                imp,
            };
            let sets: Result<Vec<_>> = (0..n_sets)
                .map(|_| inputs(shape, dt, timer.device()))
                .collect();
            let sets = match sets {
                Ok(s) => s,
                Err(e) => {
                    out.skip_all(vec![key("ours")], &e);
                    continue;
                }
            };
            let with = |f: fn(&mut CpuConfig)| {
                let mut c = KernelConfig::default();
                f(&mut c.cpu);
                Kernels::new(c)
            };
            let mut impls: Vec<(&'static str, Kernels)> = vec![
                ("ours", Kernels::default()),
                ("ours_1thread", with(|c| c.gemm_threads = 1)),
            ];
            if m == 1 {
                impls.push(("ours_no_gemv", with(|c| c.gemv = false)));
            }
            // Check ours against Candle's product (f32) / an f32 product (bf16) before timing.
            let (x0, w0) = &sets[0];
            let check = (|| -> Result<f64> {
                let want = x0
                    .to_dtype(DType::F32)?
                    .matmul(&w0.to_dtype(DType::F32)?.t()?)?;
                let got = ops::matmul(x0, w0, false, true)?.to_dtype(DType::F32)?;
                let num = (got - &want)?.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
                let den = want.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
                Ok((num / den).sqrt())
            })();
            match check {
                Ok(err) if err < if dt == DType::F32 { 1e-5 } else { 1e-2 } => {}
                Ok(err) => {
                    let e =
                        candle_core::Error::Msg(format!("relative error {err:.2e} vs f32 product"));
                    out.skip_all(impls.iter().map(|(n, _)| key(n)).collect(), &e);
                    continue;
                }
                Err(e) => {
                    out.skip_all(impls.iter().map(|(n, _)| key(n)).collect(), &e);
                    continue;
                }
            }
            for (name, kern) in &impls {
                let res = timer.time(|r| {
                    let (x, w) = &sets[r % sets.len()];
                    kern.matmul(x, w, false, true)
                });
                let base = if *name == "ours" { None } else { Some("ours") };
                out.record(key(name), bytes, Some(flops), n_sets, base, res);
            }
            let res = timer.time(|r| {
                let (x, w) = &sets[r % sets.len()];
                x.matmul(&w.t()?)
            });
            out.record(
                key("candle_matmul"),
                bytes,
                Some(flops),
                n_sets,
                Some("ours"),
                res,
            );
            out.checkpoint();
        }
    }
}
