//! The `candle-fused check` sweep on the CPU: every op, every dtype, forward and every input
//! gradient against the f64 reference (composed Candle ops + autograd).

use candle_core::{DType, Device};
use candle_fused_testkit::check::{self, OpKind};
use candle_fused_testkit::testing::poisoned;

#[test]
fn cpu_sweep_all_ops_all_dtypes() {
    let mut failures = Vec::new();
    let mut n = 0;
    for case in check::sweep(&[DType::F32, DType::F64, DType::F16, DType::BF16]) {
        for o in check::run(&poisoned(), &case, &Device::Cpu).unwrap() {
            n += 1;
            if !o.pass() {
                failures.push(format!(
                    "{} {} {:?} {:?}: rel err {:.3e} > {:.0e}",
                    o.op, o.what, o.shape, o.dtype, o.rel_err, o.tol
                ));
            }
        }
    }
    assert!(n > 300, "only {n} comparisons ran");
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// The LoRA cases of the sweep check the forward, the adapter term alone and every gradient
/// (W included).
#[test]
fn check_sweep_covers_lora_with_every_gradient() {
    let cases: Vec<_> = check::sweep(&[DType::F32])
        .into_iter()
        .filter(|c| matches!(c.op, OpKind::Lora { .. }))
        .collect();
    assert!(cases.len() >= 5);
    for case in &cases {
        let outs = check::run(&poisoned(), case, &Device::Cpu).unwrap();
        let whats: Vec<&str> = outs.iter().map(|o| o.what.as_str()).collect();
        let bias = matches!(case.op, OpKind::Lora { bias: true, .. });
        let mut want = vec!["fwd", "fwd(adapter)", "dx", "dw", "da", "db"];
        if bias {
            want.push("dbias");
        }
        assert_eq!(whats, want, "{}", case.op.name());
        for o in &outs {
            assert!(
                o.pass(),
                "{} {}: {:.3e} > {:.0e}",
                o.op,
                o.what,
                o.rel_err,
                o.tol
            );
        }
    }
}
