//! GPU checks of SwiGLU / GeGLU (module of the GPU test target `tests/gpu.rs`, `cuda`
//! feature). Each `pub fn` panics with a readable message on failure.
//!
//! - [`sweep_and_bench_shapes`]: the GLU cases of `check::sweep` (last dims 1 to 65536, both
//!   kinds and layouts) and the bench shape `[8192, 14336]`, f32/f16/bf16, forward and every
//!   gradient vs the f64 reference and vs the CPU backend.
//! - [`misaligned_and_odd`]: odd element offsets and odd `I` (the scalar build) vs the CPU;
//!   the standalone backwards vs autograd; device mismatch and f64 errors.

use candle_core::{DType, Device, Tensor, Var};
use candle_fused::ops::{self, GluKind};
use candle_fused::{KernelConfig, Kernels};
use candle_fused_testkit::check::{self, Case, OpKind};
use candle_fused_testkit::testing::{self, rel_err, tolerance};

use super::gpu;

fn k() -> Kernels {
    Kernels::new(KernelConfig::poisoned())
}

const DTYPES: [DType; 3] = [DType::F32, DType::F16, DType::BF16];
const KINDS: [GluKind; 2] = [GluKind::SwiGlu, GluKind::GeGluTanh];

pub fn sweep_and_bench_shapes() {
    let mut cases: Vec<Case> = check::sweep(&DTYPES)
        .into_iter()
        .filter(|c| matches!(c.op, OpKind::Glu { .. }))
        .collect();
    // The bench shape (its f64 reference takes several GB and seconds on the host).
    for (kind, packed, dtype) in [
        (GluKind::SwiGlu, false, DType::BF16),
        (GluKind::SwiGlu, true, DType::BF16),
        (GluKind::GeGluTanh, false, DType::F32),
    ] {
        let op = OpKind::Glu { kind, packed };
        cases.push(Case {
            op,
            shape: vec![8192, 14336],
            dtype,
        });
    }
    super::run_cases(&cases);
}

pub fn misaligned_and_odd() {
    let dev = gpu();
    let cpu = Device::Cpu;
    for dt in DTYPES {
        for kind in KINDS {
            for (rows, i) in [(4usize, 1024usize), (3, 1001), (5, 1), (2, 8)] {
                let n = rows * i;
                // Views at an odd element offset: contiguous, so not copied, and misaligned.
                let big = testing::randn(&[3 * n + 1], 2.0, dt, &dev).unwrap();
                let g = big.narrow(0, 1, n).unwrap().reshape((rows, i)).unwrap();
                let u = big.narrow(0, n + 1, n).unwrap().reshape((rows, i)).unwrap();
                let gu = big
                    .narrow(0, 1, 2 * n)
                    .unwrap()
                    .reshape((rows, 2 * i))
                    .unwrap();
                let dy = big
                    .narrow(0, 2 * n + 1, n)
                    .unwrap()
                    .reshape((rows, i))
                    .unwrap();
                let c = |t: &Tensor| t.to_device(&cpu).unwrap();
                let tol = tolerance(dt);
                let ctx = format!("{kind:?} {dt:?} [{rows}, {i}]");
                let y = k().glu(kind, &g, &u).unwrap();
                assert!(
                    rel_err(&y, &k().glu(kind, &c(&g), &c(&u)).unwrap()).unwrap() <= tol,
                    "{ctx} fwd"
                );
                let (a, b) = k().glu_backward(kind, &g, &u, &dy).unwrap();
                let (ac, bc) = k().glu_backward(kind, &c(&g), &c(&u), &c(&dy)).unwrap();
                assert!(
                    rel_err(&a, &ac).unwrap() <= tol && rel_err(&b, &bc).unwrap() <= tol,
                    "{ctx} bwd"
                );
                let yp = k().glu_packed(kind, &gu).unwrap();
                assert!(
                    rel_err(&yp, &k().glu_packed(kind, &c(&gu)).unwrap()).unwrap() <= tol,
                    "{ctx} packed fwd"
                );
                let dgu = k().glu_packed_backward(kind, &gu, &dy).unwrap();
                let dguc = k().glu_packed_backward(kind, &c(&gu), &c(&dy)).unwrap();
                assert!(rel_err(&dgu, &dguc).unwrap() <= tol, "{ctx} packed bwd");
                // The standalone backward is the autograd gradient.
                let vg = Var::from_tensor(&g).unwrap();
                let vu = Var::from_tensor(&u).unwrap();
                let loss = (k().glu(kind, vg.as_tensor(), vu.as_tensor()).unwrap() * &dy)
                    .unwrap()
                    .sum_all()
                    .unwrap();
                let grads = loss.backward().unwrap();
                assert_eq!(
                    rel_err(grads.get(&vg).unwrap(), &a).unwrap(),
                    0.0,
                    "{ctx} dgate vs autograd"
                );
                assert_eq!(
                    rel_err(grads.get(&vu).unwrap(), &b).unwrap(),
                    0.0,
                    "{ctx} dup vs autograd"
                );
            }
        }
    }
    let g = testing::randn(&[4, 8], 1.0, DType::F32, &dev).unwrap();
    let e = ops::glu(GluKind::SwiGlu, &g, &g.to_device(&cpu).unwrap())
        .unwrap_err()
        .to_string();
    assert!(e.contains("up is on device"), "{e}");
    let e = ops::glu_backward(GluKind::SwiGlu, &g, &g, &g.to_device(&cpu).unwrap())
        .unwrap_err()
        .to_string();
    assert!(e.contains("dy is on device"), "{e}");
    let g64 = g.to_dtype(DType::F64).unwrap();
    let e = ops::glu(GluKind::SwiGlu, &g64, &g64)
        .unwrap_err()
        .to_string();
    assert!(e.contains("not supported by the CUDA kernels"), "{e}");
}

/// Small shapes of both kinds and layouts (what compute-sanitizer runs).
pub fn sanitizer_small() {
    let mut cases = Vec::new();
    for dtype in [DType::F32, DType::BF16] {
        for shape in [vec![3, 7], vec![2, 1000], vec![1, 65536]] {
            for kind in KINDS {
                for packed in [false, true] {
                    cases.push(Case {
                        op: OpKind::Glu { kind, packed },
                        shape: shape.clone(),
                        dtype,
                    });
                }
            }
        }
    }
    super::run_cases(&cases);
}
