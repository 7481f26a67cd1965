//! GPU checks of the cross-entropy (module of the single GPU test target `tests/gpu.rs`, behind
//! the `cuda` feature). Each `pub fn` panics with a readable message on failure and prints one
//! line per comparison (`op what shape dtype rel_err tol PASS|FAIL`).
//!
//! - [`sweep_vs_reference_and_cpu`]: the cross-entropy rows of `check_loss::sweep` plus the real
//!   vocabularies (Llama 3's 128256, Qwen2's 151936: rows on a thread-block cluster), an odd
//!   one (the scalar path) and 262147-long rows, every option, outputs poisoned: the loss and
//!   the gradient (autograd and standalone) vs the f64 reference and vs the CPU backend.
//! - [`misaligned_and_many_rows`]: a logits view at an odd offset (scalar path) and more rows
//!   than one grid covers, vs the CPU backend.
//! - [`deterministic_and_device_mismatch`]: bitwise-equal loss and gradient run to run; targets
//!   on another device are a clear error.

use candle_core::{DType, Device, Tensor};
use candle_fused::ops::{CrossEntropyConfig, Reduction};
use candle_fused::{KernelConfig, Kernels};
use candle_fused_testkit::check::Outcome;
use candle_fused_testkit::check_loss::{self, LossCase, LossOp};
use candle_fused_testkit::testing::{self, rel_err};

pub fn gpu() -> Device {
    Device::new_cuda(0).expect("a CUDA device")
}

pub fn k() -> Kernels {
    Kernels::new(KernelConfig::poisoned())
}

/// Prints the outcome; true when it passes.
pub fn report(o: &Outcome) -> bool {
    let ok = o.pass();
    println!(
        "{:<48} {:<20} {:<14} {:<5} {:>10.3e} {:>8.0e} {}",
        o.op,
        o.what,
        format!("{:?}", o.shape),
        format!("{:?}", o.dtype),
        o.rel_err,
        o.tol,
        if ok { "PASS" } else { "FAIL" }
    );
    ok
}

/// Runs loss cases on the GPU; panics listing every failure.
pub fn run_loss_cases(cases: &[LossCase]) {
    let dev = gpu();
    let mut failures = Vec::new();
    let mut n = 0;
    for c in cases {
        match check_loss::run(&testing::poisoned(), c, &dev) {
            Ok(outs) => {
                for o in outs {
                    n += 1;
                    if !report(&o) {
                        failures.push(format!(
                            "{} {} {:?} {:?}: {:.3e} > {:.0e}",
                            o.op, o.what, o.shape, o.dtype, o.rel_err, o.tol
                        ));
                    }
                }
            }
            Err(e) => failures.push(format!(
                "{} {:?} {:?}: error {e}",
                c.name(),
                c.shape(),
                c.dtype
            )),
        }
    }
    assert!(n > 0);
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

const DTYPES: [DType; 3] = [DType::F32, DType::F16, DType::BF16];

pub fn sweep_vs_reference_and_cpu() {
    let mut cases: Vec<LossCase> = check_loss::sweep(&DTYPES)
        .into_iter()
        .filter(|c| c.op == LossOp::CrossEntropy)
        .collect();
    let d = CrossEntropyConfig::default();
    let all = CrossEntropyConfig {
        label_smoothing: 0.1,
        softcap: Some(30.0),
        z_loss: 1e-4,
        ..d
    };
    let sum = CrossEntropyConfig {
        reduction: Reduction::Sum,
        ..d
    };
    for dtype in DTYPES {
        for (rows, v, cfg) in [
            (vec![64], 128256, d),
            (vec![8, 2], 128256, all),
            (vec![16], 151936, all),
            (vec![33], 151936, sum),
            (vec![7], 32001, all),
            (vec![3], 262147, d),
            (vec![4097], 3, all),
        ] {
            cases.push(LossCase {
                op: LossOp::CrossEntropy,
                rows,
                v,
                dtype,
                cfg,
                p_ignore: 0.2,
            });
        }
    }
    run_loss_cases(&cases);
}

/// Ours on the GPU (kernels `kg`) and on the CPU for `x` (any layout): loss, standalone
/// gradient, autograd.
fn vs_cpu(kg: &Kernels, what: &str, x: &Tensor, t: &Tensor, cfg: &CrossEntropyConfig, tol: f64) {
    let cpu = Device::Cpu;
    let (xc, tc) = (x.to_device(&cpu).unwrap(), t.to_device(&cpu).unwrap());
    let l = kg.cross_entropy(x, t, cfg).unwrap();
    let lc = k().cross_entropy(&xc, &tc, cfg).unwrap();
    let e = rel_err(&l, &lc).unwrap();
    assert!(e < tol, "{what}: loss vs cpu {e:.3e}");
    let g = kg.cross_entropy_backward(x, t, cfg, 0.5).unwrap();
    let gc = k().cross_entropy_backward(&xc, &tc, cfg, 0.5).unwrap();
    let e = rel_err(&g, &gc).unwrap();
    assert!(e < tol, "{what}: dlogits vs cpu {e:.3e}");
    let v = candle_core::Var::from_tensor(x).unwrap();
    let ga = kg
        .cross_entropy(v.as_tensor(), t, cfg)
        .unwrap()
        .backward()
        .unwrap();
    let e = rel_err(&(ga.get(&v).unwrap() * 0.5).unwrap(), &gc).unwrap();
    assert!(e < tol, "{what}: autograd dlogits vs cpu {e:.3e}");
    println!("{what}: PASS");
}

pub fn misaligned_and_many_rows() {
    let dev = gpu();
    let cfg = CrossEntropyConfig {
        label_smoothing: 0.1,
        z_loss: 1e-3,
        ..Default::default()
    };
    // Real vocabularies (a row per cluster of CTAs), a length just past a cluster's slice and an
    // odd tail.
    {
        let kg = k();
        let name = "default";
        for (rows, v) in [(8, 128256), (8, 151936), (5, 4096 * 8 + 8), (3, 1000)] {
            for dt in DTYPES {
                let tol = testing::tolerance(dt);
                let x = testing::randn(&[rows, v], 2.0, dt, &dev).unwrap();
                let t = check_loss::random_targets(&[rows], v, 0.2, -100, &dev).unwrap();
                vs_cpu(
                    &kg,
                    &format!("{name} [{rows}, {v}] {dt:?}"),
                    &x,
                    &t,
                    &cfg,
                    tol,
                );
            }
        }
    }
    for dt in DTYPES {
        let tol = testing::tolerance(dt);
        let big = testing::randn(&[1, 8 * 1024 + 1], 2.0, dt, &dev).unwrap();
        let x = big
            .narrow(1, 1, 8 * 1024)
            .unwrap()
            .reshape((8, 1024))
            .unwrap();
        let t = check_loss::random_targets(&[8], 1024, 0.2, -100, &dev).unwrap();
        vs_cpu(&k(), &format!("misaligned {dt:?}"), &x, &t, &cfg, tol);
    }
    let rows = (1usize << 20) + 3;
    let x = testing::randn(&[rows, 3], 2.0, DType::F32, &dev).unwrap();
    let t = check_loss::random_targets(&[rows], 3, 0.2, -100, &dev).unwrap();
    vs_cpu(&k(), "many rows", &x, &t, &cfg, 1e-5);
}

pub fn deterministic_and_device_mismatch() {
    let dev = gpu();
    let cfg = CrossEntropyConfig {
        label_smoothing: 0.1,
        softcap: Some(30.0),
        ..Default::default()
    };
    let x = testing::randn(&[512, 128256], 3.0, DType::BF16, &dev).unwrap();
    let t = check_loss::random_targets(&[512], 128256, 0.1, -100, &dev).unwrap();
    let bits = |t: &Tensor| -> Vec<u32> {
        t.to_dtype(DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .map(|v| v.to_bits())
            .collect()
    };
    let l1 = bits(&k().cross_entropy(&x, &t, &cfg).unwrap());
    let g1 = bits(&k().cross_entropy_backward(&x, &t, &cfg, 1.0).unwrap());
    for _ in 0..3 {
        assert_eq!(
            bits(&k().cross_entropy(&x, &t, &cfg).unwrap()),
            l1,
            "loss differs run to run"
        );
        assert_eq!(
            bits(&k().cross_entropy_backward(&x, &t, &cfg, 1.0).unwrap()),
            g1,
            "dlogits differ run to run"
        );
    }
    let tc = t.to_device(&Device::Cpu).unwrap();
    let e = k().cross_entropy(&x, &tc, &cfg).unwrap_err().to_string();
    assert!(
        e.contains("candle-fused cross_entropy:") && e.contains("targets is on device"),
        "{e}"
    );
    let e = k()
        .cross_entropy_backward(&x, &tc, &cfg, 1.0)
        .unwrap_err()
        .to_string();
    assert!(e.contains("targets is on device"), "{e}");
    println!("deterministic and device mismatch: PASS");
}
