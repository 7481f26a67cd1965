//! The matrix products in the bench (`--op matmul`): `y [M, N] = x [M, K] · Wᵀ` with a weight
//! `W [N, K]` (the layout of a linear layer, LoRA's base GEMM and the training step), forward
//! only. Rows have the shape `[M, K, N]`; batched rows `[batch, M, K, N]`: `x [batch, M, K]`,
//! `W [batch, N, K]`, one product per batch index (attention's per-head `Q·Kᵀ` and `P·V`
//! shapes of the CPU training step).
//!
//! | impl            | what                                                              |
//! |-----------------|-------------------------------------------------------------------|
//! | `ours`          | `Kernels::matmul(x, W, false, true)` on the bench's `--kernel-config` |
//! | `ours_1thread`  | the same with `CpuConfig::gemm_threads = 1` (no thread pool)      |
//! | `ours_no_gemv`  | `M = 1` only: the `gemm` crate instead of our GEMV                |
//! | `candle_matmul` | `x.matmul(&W.t())`: Candle's CPU matmul (the `gemm` crate; no bf16; batched: one product after the other, each over the thread pool)|
//!
//! Flops `2·M·K·N`; bytes `e·(M·K + N·K + M·N)` (each operand read once, the output written
//! once): for the decode GEMV (`M = 1`) that is the memory floor, so its % of the copy
//! bandwidth says how close it comes. Inputs `x ~ N(0, 1)`, `W ~ N(0, 1/K)`, rotated among
//! several sets when small. `scripts/bench_torch.py` times `F.linear(x, W)` on the same rows.

use candle_core::{DType, Device, Result, Tensor};

use super::cases::Scope;
use super::memops::sets_for;
use super::report::{Collector, Key};
use super::timing::Timer;
use super::Family;
use candle_fused::config::CpuConfig;
use candle_fused::Kernels;

/// The op name of the rows (and the `--op` family name).
pub const OP: &str = "matmul";

/// `[batch, M, K, N]` and dtypes: the LoRA/Llama shapes of the issue, the decode GEMV (batch
/// 1), the attention products of the CPU training step's `cpu-h256`/`cpu-h512` configs
/// (4 sequences × 4/8 heads, T 256, head dim 64: `Q·Kᵀ` is 256×64×256, `P·V` 256×256×64), and
/// rank-16 LoRA shapes (`x·Aᵀ`, `u·Bᵀ`, `dUᵀ·x`).
pub fn gemm_shapes(scope: Scope) -> Vec<([usize; 4], DType)> {
    let shapes: &[[usize; 4]] = if scope.quick {
        &[[1, 1024, 512, 512], [1, 1, 4096, 4096], [16, 256, 64, 256]]
    } else {
        &[
            [1, 1024, 512, 512],
            [1, 1024, 512, 1344],
            [1, 1024, 512, 8192],
            [1, 4096, 1024, 1024],
            [1, 1, 4096, 4096],
            [16, 256, 64, 256],
            [16, 256, 256, 64],
            [32, 256, 64, 256],
            [32, 256, 256, 64],
            [1, 1024, 1024, 16],
            [1, 1024, 16, 1024],
            [1, 16, 1024, 1024],
        ]
    };
    let mut out = vec![];
    for dt in [DType::F32, DType::BF16] {
        out.extend(shapes.iter().map(|&s| (s, dt)));
    }
    out
}

/// A row's shape: `[M, K, N]`, or `[batch, M, K, N]` when batched.
fn row_shape(s: [usize; 4]) -> Vec<usize> {
    if s[0] == 1 {
        s[1..].to_vec()
    } else {
        s.to_vec()
    }
}

fn dtype_str(dt: DType) -> &'static str {
    match dt {
        DType::F32 => "f32",
        DType::BF16 => "bf16",
        DType::F16 => "f16",
        _ => "f64",
    }
}

fn inputs(shape: [usize; 4], dt: DType, dev: &Device) -> Result<(Tensor, Tensor)> {
    let [b, m, k, n] = shape;
    let (xs, ws) = if b == 1 {
        (vec![m, k], vec![n, k])
    } else {
        (vec![b, m, k], vec![b, n, k])
    };
    let x = Tensor::randn(0f32, 1.0, xs, dev)?.to_dtype(dt)?;
    let w = Tensor::randn(0f32, (1.0 / k as f64).sqrt() as f32, ws, dev)?.to_dtype(dt)?;
    Ok((x, w))
}

/// The `matmul` family.
pub struct GemmFamily;

impl Family for GemmFamily {
    fn name(&self) -> &'static str {
        OP
    }

    fn run(&self, scope: Scope, timer: &Timer, out: &mut Collector) {
        let cases = gemm_shapes(scope);
        for (i, &(shape, dt)) in cases.iter().enumerate() {
            let [b, m, k, n] = shape;
            let e = dt.size_in_bytes();
            let bytes = (b * e * (m * k + n * k + m * n)) as f64;
            let flops = 2.0 * (b * m * k * n) as f64;
            let n_sets = sets_for(bytes as usize);
            eprintln!(
                "[{}/{}] matmul {b}x{m}x{k}x{n} {} ({n_sets} input set(s))",
                i + 1,
                cases.len(),
                dtype_str(dt)
            );
            let key = |imp: &'static str| Key {
                op: OP.to_string(),
                pass: "fwd",
                shape: row_shape(shape),
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
            // Ours on the bench's --kernel-config, and its variants.
            let with = |f: fn(&mut CpuConfig)| {
                let mut c = scope.kernels.config;
                f(&mut c.cpu);
                Kernels::new(c)
            };
            let mut impls: Vec<(&'static str, Kernels)> = vec![
                ("ours", scope.kernels),
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
                    .matmul(&w0.to_dtype(DType::F32)?.t()?.contiguous()?)?;
                let got = scope
                    .kernels
                    .matmul(x0, w0, false, true)?
                    .to_dtype(DType::F32)?;
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
