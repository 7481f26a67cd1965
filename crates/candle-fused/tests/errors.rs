//! Bad input gets an `Err` (never a panic) whose message names the op, the offending argument
//! and what was expected versus what was given.
//!
//! Not testable here:
//! * Device mismatch (x on one device, weight/mask/residual/dy on another) needs a second
//!   device: `tests/gpu/main.rs` (`device_mismatch_is_a_clear_error_for_every_op`) covers it.
//! * "Rows too long for a code path": the CPU kernels have no row-length limit (rows of 262144
//!   run in `tests/proptests.rs`); limits belong to the CUDA kernels and their tests.

mod common;

use candle_core::{DType, Module, Result, Tensor};
use candle_fused::prelude::*;
use candle_fused::{nn, ops};
use common::*;

/// Runs `f` (which must not panic) and checks it fails with a message containing `needles`
/// (always including the `candle-fused <op>:` prefix).
fn expect_err<T>(what: &str, op: &str, f: impl FnOnce() -> Result<T>, needles: &[&str]) {
    let msg = match no_panic(what, f) {
        Ok(_) => panic!("{what}: expected an error, got Ok"),
        Err(e) => e.to_string(),
    };
    let prefix = format!("candle-fused {op}:");
    assert!(
        msg.contains(&prefix),
        "{what}: message {msg:?} lacks {prefix:?}"
    );
    for n in needles {
        assert!(msg.contains(n), "{what}: message {msg:?} lacks {n:?}");
    }
}

fn t(shape: &[usize], dt: DType) -> Tensor {
    Tensor::zeros(shape, dt, &CPU).unwrap()
}

fn f32s(shape: &[usize]) -> Tensor {
    randn(shape, 1.0, DType::F32)
}

#[test]
fn rank_0_input() {
    let s = Tensor::new(1f32, &CPU).unwrap();
    let w = f32s(&[1]);
    let need = ["x", "rank >= 1", "rank 0"];
    expect_err(
        "softmax",
        "softmax_last_dim",
        || ops::softmax_last_dim(&s),
        &need,
    );
    expect_err(
        "masked",
        "masked_softmax",
        || ops::masked_softmax(&s, 1.0, None, true),
        &need,
    );
    expect_err(
        "softmax_backward",
        "softmax_backward",
        || ops::softmax_backward(&s, &s, 1.0),
        &need,
    );
    expect_err(
        "rms_norm",
        "rms_norm",
        || ops::rms_norm(&s, Some(&w), 1e-5),
        &need,
    );
    expect_err(
        "rms_norm no w",
        "rms_norm",
        || ops::rms_norm(&s, None, 1e-5),
        &need,
    );
    expect_err(
        "rms_norm_backward",
        "rms_norm_backward",
        || ops::rms_norm_backward(&s, None, &s, 1e-5),
        &need,
    );
    expect_err(
        "add_rms_norm",
        "add_rms_norm",
        || ops::add_rms_norm(&s, &s, &w, 1e-5),
        &need,
    );
    expect_err(
        "add_rms_norm_backward",
        "add_rms_norm_backward",
        || ops::add_rms_norm_backward(&s, &w, &s, &s, 1e-5),
        &["sum", "rank"],
    );
    expect_err(
        "prelude softmax",
        "softmax_last_dim",
        || s.softmax_fused(),
        &need,
    );
}

#[test]
fn integer_dtypes() {
    for dt in [DType::U32, DType::I64, DType::U8] {
        let x = t(&[2, 4], dt);
        let w = t(&[4], dt);
        let d = format!("{dt:?}");
        let need = [
            "x has dtype",
            d.as_str(),
            "expected one of f32, f64, f16, bf16",
        ];
        expect_err(
            "softmax",
            "softmax_last_dim",
            || ops::softmax_last_dim(&x),
            &need,
        );
        expect_err(
            "masked",
            "masked_softmax",
            || ops::masked_softmax(&x, 1.0, None, false),
            &need,
        );
        expect_err(
            "softmax_backward",
            "softmax_backward",
            || ops::softmax_backward(&x, &x, 1.0),
            &["y has dtype", d.as_str()],
        );
        expect_err(
            "rms_norm",
            "rms_norm",
            || ops::rms_norm(&x, Some(&w), 1e-5),
            &need,
        );
        expect_err(
            "rms_norm no w",
            "rms_norm",
            || ops::rms_norm(&x, None, 1e-5),
            &need,
        );
        expect_err(
            "add_rms_norm",
            "add_rms_norm",
            || ops::add_rms_norm(&x, &x, &w, 1e-5),
            &need,
        );
        expect_err(
            "add_rms_norm_backward",
            "add_rms_norm_backward",
            || ops::add_rms_norm_backward(&x, &w, &x, &x, 1e-5),
            &["sum has dtype", d.as_str()],
        );
        // Integer dtypes are rejected even when empty.
        let e = t(&[0, 4], dt);
        expect_err(
            "empty int",
            "softmax_last_dim",
            || ops::softmax_last_dim(&e),
            &need,
        );
    }
}

#[test]
fn eps_must_be_finite_and_positive() {
    let x = f32s(&[2, 8]);
    let w = f32s(&[8]);
    let empty = f32s(&[0, 8]);
    for eps in [0.0, -0.0, -1e-5, f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
        let got = format!("got {eps}");
        let need = ["eps must be a finite number > 0", got.as_str()];
        expect_err(
            "rms_norm",
            "rms_norm",
            || ops::rms_norm(&x, Some(&w), eps),
            &need,
        );
        expect_err(
            "rms_norm no w",
            "rms_norm",
            || ops::rms_norm(&x, None, eps),
            &need,
        );
        expect_err(
            "rms_norm empty",
            "rms_norm",
            || ops::rms_norm(&empty, Some(&w), eps),
            &need,
        );
        expect_err(
            "rms_norm_backward",
            "rms_norm_backward",
            || ops::rms_norm_backward(&x, Some(&w), &x, eps),
            &need,
        );
        expect_err(
            "add_rms_norm",
            "add_rms_norm",
            || ops::add_rms_norm(&x, &x, &w, eps),
            &need,
        );
        expect_err(
            "add_rms_norm_backward",
            "add_rms_norm_backward",
            || ops::add_rms_norm_backward(&x, &w, &x, &x, eps),
            &need,
        );
        expect_err("prelude", "rms_norm", || x.rms_norm_fused(&w, eps), &need);
        expect_err(
            "module",
            "rms_norm",
            || nn::RmsNorm::new(w.clone(), eps).forward(&x),
            &need,
        );
    }
}

#[test]
fn scale_must_be_finite() {
    let x = f32s(&[2, 8]);
    let empty = f32s(&[0, 8]);
    for scale in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
        let got = format!("got {scale}");
        let need = ["scale must be finite", got.as_str()];
        for causal in [false, true] {
            expect_err(
                "masked",
                "masked_softmax",
                || ops::masked_softmax(&x, scale, None, causal),
                &need,
            );
        }
        expect_err(
            "masked empty",
            "masked_softmax",
            || ops::masked_softmax(&empty, scale, None, false),
            &need,
        );
        expect_err(
            "softmax_backward",
            "softmax_backward",
            || ops::softmax_backward(&x, &x, scale),
            &need,
        );
        expect_err(
            "prelude",
            "masked_softmax",
            || x.masked_softmax_fused(scale, None, false),
            &need,
        );
    }
}

#[test]
fn weight_length_must_equal_last_dim() {
    let x = f32s(&[2, 8]);
    for ws in [&[7usize][..], &[9], &[1], &[0], &[1, 8], &[8, 1], &[2, 8]] {
        let w = f32s(ws);
        let shape = format!("{ws:?}");
        let need = [
            "weight has shape",
            shape.as_str(),
            "expected [8]",
            "the last dim of x",
        ];
        expect_err(
            "rms_norm",
            "rms_norm",
            || ops::rms_norm(&x, Some(&w), 1e-5),
            &need,
        );
        expect_err(
            "rms_norm_backward",
            "rms_norm_backward",
            || ops::rms_norm_backward(&x, Some(&w), &x, 1e-5),
            &need,
        );
        expect_err(
            "add_rms_norm",
            "add_rms_norm",
            || ops::add_rms_norm(&x, &x, &w, 1e-5),
            &need,
        );
        expect_err(
            "add_rms_norm_backward",
            "add_rms_norm_backward",
            || ops::add_rms_norm_backward(&x, &w, &x, &x, 1e-5),
            &[
                "weight has shape",
                shape.as_str(),
                "expected [8]",
                "the last dim of sum",
            ],
        );
        expect_err("prelude", "rms_norm", || x.rms_norm_fused(&w, 1e-5), &need);
        expect_err(
            "prelude add",
            "add_rms_norm",
            || x.add_rms_norm_fused(&x, &w, 1e-5),
            &need,
        );
        expect_err(
            "module",
            "rms_norm",
            || nn::RmsNorm::new(w.clone(), 1e-5).forward(&x),
            &need,
        );
    }
    // Empty x with the wrong weight is still an error.
    let e = f32s(&[0, 8]);
    let w = f32s(&[7]);
    expect_err(
        "empty x",
        "rms_norm",
        || ops::rms_norm(&e, Some(&w), 1e-5),
        &["weight has shape [7], expected [8]"],
    );
}

#[test]
fn residual_shape_must_equal_x() {
    let x = f32s(&[2, 8]);
    let w = f32s(&[8]);
    // Broadcastable shapes are rejected too: the sum is an output of x's shape.
    for rs in [
        &[2usize, 7][..],
        &[3, 8],
        &[1, 8],
        &[8],
        &[2, 2, 8],
        &[0, 8],
    ] {
        let r = f32s(rs);
        let shape = format!("{rs:?}");
        let need = [
            "residual has shape",
            shape.as_str(),
            "expected [2, 8]",
            "the shape of x",
        ];
        expect_err(
            "add_rms_norm",
            "add_rms_norm",
            || ops::add_rms_norm(&x, &r, &w, 1e-5),
            &need,
        );
        expect_err(
            "prelude",
            "add_rms_norm",
            || x.add_rms_norm_fused(&r, &w, 1e-5),
            &need,
        );
        expect_err(
            "module",
            "add_rms_norm",
            || nn::RmsNorm::new(w.clone(), 1e-5).forward_add(&x, &r),
            &need,
        );
    }
}

#[test]
fn mask_must_broadcast_to_x() {
    let x = f32s(&[2, 3, 4]);
    for ms in [
        &[5usize][..],
        &[3, 5],
        &[2, 4],
        &[2, 3, 1, 4],
        &[1, 2, 3, 4],
        &[0],
        &[4, 4],
        &[3, 2, 4],
    ] {
        let m = f32s(ms);
        let shape = format!("{ms:?}");
        let need = [
            "mask of shape",
            shape.as_str(),
            "cannot be broadcast to the shape of x [2, 3, 4]",
        ];
        for causal in [false, true] {
            expect_err(
                "masked",
                "masked_softmax",
                || ops::masked_softmax(&x, 0.5, Some(&m), causal),
                &need,
            );
        }
        expect_err(
            "prelude",
            "masked_softmax",
            || x.masked_softmax_fused(0.5, Some(&m), false),
            &need,
        );
    }
    // Empty x with a mask that does not fit.
    let e = f32s(&[0, 4]);
    let m = f32s(&[5]);
    expect_err(
        "empty x",
        "masked_softmax",
        || ops::masked_softmax(&e, 1.0, Some(&m), false),
        &["mask of shape [5] cannot be broadcast to the shape of x [0, 4]"],
    );
}

#[test]
fn dtype_mismatch() {
    let pairs = [
        (DType::F32, DType::F16),
        (DType::F16, DType::BF16),
        (DType::BF16, DType::F32),
        (DType::F64, DType::F32),
        (DType::F32, DType::U8),
        (DType::F16, DType::I64),
    ];
    for (xd, od) in pairs {
        let x = t(&[2, 8], xd);
        let o = t(&[2, 8], od);
        let w = t(&[8], od);
        let wx = t(&[8], xd);
        let (xs, os) = (format!("{xd:?}"), format!("{od:?}"));
        let need = |arg: &'static str| -> Vec<String> {
            vec![format!("{arg} has dtype {os}, expected {xs}")]
        };
        let check = |what: &str, op: &str, arg: &'static str, f: &dyn Fn() -> Result<Tensor>| {
            let n = need(arg);
            let n: Vec<&str> = n.iter().map(|s| s.as_str()).collect();
            expect_err(what, op, f, &n);
        };
        check("mask", "masked_softmax", "mask", &|| {
            ops::masked_softmax(&x, 1.0, Some(&o), false)
        });
        check("prelude mask", "masked_softmax", "mask", &|| {
            x.masked_softmax_fused(1.0, Some(&o), true)
        });
        check("weight", "rms_norm", "weight", &|| {
            ops::rms_norm(&x, Some(&w), 1e-5)
        });
        check("module weight", "rms_norm", "weight", &|| {
            nn::RmsNorm::new(w.clone(), 1e-5).forward(&x)
        });
        check("add weight", "add_rms_norm", "weight", &|| {
            Ok(ops::add_rms_norm(&x, &x, &w, 1e-5)?.0)
        });
        check("residual", "add_rms_norm", "residual", &|| {
            Ok(ops::add_rms_norm(&x, &o, &wx, 1e-5)?.0)
        });
        check("rms dy", "rms_norm_backward", "dy", &|| {
            Ok(ops::rms_norm_backward(&x, Some(&wx), &o, 1e-5)?.0)
        });
        check("softmax dy", "softmax_backward", "dy", &|| {
            ops::softmax_backward(&x, &o, 1.0)
        });
        check("d_normed", "add_rms_norm_backward", "d_normed", &|| {
            Ok(ops::add_rms_norm_backward(&x, &wx, &o, &x, 1e-5)?.0)
        });
        check("d_sum", "add_rms_norm_backward", "d_sum", &|| {
            Ok(ops::add_rms_norm_backward(&x, &wx, &x, &o, 1e-5)?.0)
        });
    }
}

#[test]
fn backward_gradient_shape_mismatch() {
    let x = f32s(&[2, 8]);
    let w = f32s(&[8]);
    for gs in [&[2usize, 7][..], &[8], &[1, 8], &[2, 8, 1]] {
        let g = f32s(gs);
        let shape = format!("{gs:?}");
        expect_err(
            "softmax dy",
            "softmax_backward",
            || ops::softmax_backward(&x, &g, 1.0),
            &[
                "dy has shape",
                shape.as_str(),
                "expected [2, 8]",
                "the shape of y",
            ],
        );
        expect_err(
            "rms dy",
            "rms_norm_backward",
            || ops::rms_norm_backward(&x, Some(&w), &g, 1e-5),
            &["dy has shape", shape.as_str(), "the shape of x"],
        );
        expect_err(
            "d_normed",
            "add_rms_norm_backward",
            || ops::add_rms_norm_backward(&x, &w, &g, &x, 1e-5),
            &["d_normed has shape", shape.as_str(), "the shape of sum"],
        );
        expect_err(
            "d_sum",
            "add_rms_norm_backward",
            || ops::add_rms_norm_backward(&x, &w, &x, &g, 1e-5),
            &["d_sum has shape", shape.as_str(), "the shape of sum"],
        );
    }
}

#[test]
fn good_input_still_works_after_errors() {
    // The checks reject only what they should: the boundary cases are accepted.
    let x = f32s(&[2, 3, 4]);
    for ms in [
        &[4usize][..],
        &[1, 4],
        &[3, 4],
        &[3, 1],
        &[1, 1, 1],
        &[2, 1, 4],
        &[2, 3, 4],
    ] {
        assert!(
            ops::masked_softmax(&x, 0.0, Some(&f32s(ms)), true).is_ok(),
            "{ms:?}"
        );
    }
    let tiny = f64::MIN_POSITIVE;
    assert!(ops::rms_norm(&x, Some(&f32s(&[4])), tiny).is_ok());
    assert!(ops::rms_norm(&f32s(&[3, 1]), Some(&f32s(&[1])), 1e-5).is_ok());
    assert!(ops::softmax_last_dim(&f32s(&[1])).is_ok());
}
