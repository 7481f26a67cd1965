//! Cross-entropy on the CPU: forward and backward (autograd and the standalone backward)
//! against the f64 reference (`log_softmax` + `gather` composed in Candle, differentiated by
//! its autograd) with ignored targets, label smoothing, soft-capping and z-loss; the backward
//! against central finite differences; the ignored-row and all-ignored semantics; u32 targets,
//! leading dims, strided logits, -inf and NaN logits; poisoned outputs and determinism;
//! proptests over random shapes; bad input errors. Every kernel runs with poisoned outputs.
//!
//! Inputs come from a fresh seed per test, printed (the harness shows it on failure; rerun
//! with `CANDLE_FUSED_SEED`); the proptests carry their seed in the case.
//!
//! Not testable here: device mismatch (CPU only; `tests/gpu/cross_entropy.rs` covers it).

mod common;

use candle_core::{DType, Result, Tensor, Var};
use candle_fused::ops::{self, CrossEntropyConfig, Reduction};
use candle_fused::prelude::*;
use candle_fused::{KernelConfig, Kernels};
use candle_fused_testkit::{reference, testing};
use common::*;
use proptest::prelude::*;

fn k() -> Kernels {
    Kernels::new(KernelConfig::poisoned())
}

/// Ours (autograd and standalone) and the f64 reference, gradients of `probe · loss`. The
/// probes are f32 values: our loss is f32, so the gradient reaching it is rounded to f32.
struct Both {
    loss: Tensor,
    g: Tensor,
    gs: Tensor,
    r_loss: Tensor,
    r_g: Tensor,
    /// The loss's rounding floor (absolute, [`loss_floor`]).
    floor: f64,
}

fn both(x: &Tensor, t: &Tensor, cfg: &CrossEntropyConfig, probe: f64) -> Both {
    let v = Var::from_tensor(x).unwrap();
    let loss = k().cross_entropy(v.as_tensor(), t, cfg).unwrap();
    let g = (&loss * probe).unwrap().backward().unwrap();
    let g = g.get(&v).expect("a gradient for the logits").clone();
    let gs = k().cross_entropy_backward(x, t, cfg, probe).unwrap();
    let v64 = Var::from_tensor(&f64t(x)).unwrap();
    let r_loss = reference::cross_entropy(v64.as_tensor(), t, cfg).unwrap();
    let r_g = (&r_loss * probe).unwrap().backward().unwrap();
    let r_g = r_g.get(&v64).unwrap().clone();
    let floor = loss_floor(x, t, cfg);
    Both {
        loss,
        g,
        gs,
        r_loss,
        r_g,
        floor,
    }
}

fn check_both(ctx: &str, b: &Both, dt: DType) {
    assert_eq!(b.loss.dtype(), DType::F32, "{ctx}: the loss is f32");
    assert!(b.loss.dims().is_empty(), "{ctx}: the loss is a scalar");
    let le = testing::rel_err(&b.loss, &b.r_loss).unwrap();
    let r = vec64(&b.r_loss)[0];
    let abs = (vec64(&b.loss)[0] - r).abs();
    assert!(
        le <= loss_tol(dt) || abs <= b.floor,
        "{ctx}: loss {} vs reference {}: relative error {le:.3e} > {:.0e}",
        b.loss,
        b.r_loss,
        loss_tol(dt)
    );
    assert_eq!(b.g.dtype(), dt, "{ctx}: dlogits dtype");
    assert_close(&format!("{ctx}: dlogits (autograd)"), &b.g, &b.r_g, dt);
    assert_close(&format!("{ctx}: dlogits (standalone)"), &b.gs, &b.r_g, dt);
}

const SHAPES: [(&[usize], usize); 6] = [
    (&[4], 7),
    (&[2, 3], 1),
    (&[3, 5], 101),
    (&[6], 1000),
    (&[2], 4099),
    (&[1, 2, 2], 40),
];

#[test]
fn matches_the_reference_with_every_option() {
    let seed = fresh_seed("matches_the_reference_with_every_option");
    let mut rng = SeededRng::new(seed);
    for dt in DTYPES {
        for (name, cfg) in ce_configs() {
            for (lead, v) in SHAPES {
                let mut shape = lead.to_vec();
                shape.push(v);
                let x = rng.randn(&shape, 3.0, dt);
                let t = rng.targets(lead, v, 0.25, cfg.ignore_index);
                let probe = rng.normal() as f32 as f64;
                let ctx = format!("{name} {shape:?} {dt:?} seed {seed}");
                check_both(&ctx, &both(&x, &t, &cfg, probe), dt);
            }
        }
    }
}

#[test]
fn large_vocabularies() {
    let seed = fresh_seed("large_vocabularies");
    let mut rng = SeededRng::new(seed);
    for (v, dt) in [
        (128256, DType::F32),
        (151936, DType::BF16),
        (65537, DType::F16),
    ] {
        let cfg = CrossEntropyConfig {
            label_smoothing: 0.1,
            ..Default::default()
        };
        let x = rng.randn(&[3, v], 2.0, dt);
        let t = rng.targets(&[3], v, 0.0, -100);
        check_both(
            &format!("V={v} {dt:?} seed {seed}"),
            &both(&x, &t, &cfg, 1.0),
            dt,
        );
    }
}

/// `Σ f(x) · probe` in f64 for the finite differences.
fn loss64(f: impl Fn(&Tensor) -> Result<Tensor>) -> impl Fn(&[Tensor]) -> Result<Tensor> {
    move |a: &[Tensor]| f(&a[0])?.to_dtype(DType::F64)
}

#[test]
fn backward_matches_finite_differences() {
    let seed = fresh_seed("backward_matches_finite_differences");
    let mut rng = SeededRng::new(seed);
    for (name, cfg) in ce_configs() {
        let x = rng.randn(&[3, 5], 2.0, DType::F64);
        let t = rng.targets(&[3], 5, 0.3, cfg.ignore_index);
        let probe = Tensor::new(1.0f64, &CPU).unwrap();
        let ours = k().cross_entropy_backward(&x, &t, &cfg, 1.0).unwrap();
        // Differences of the exact function (the f64 reference): the kernel's derivative.
        let f_ref = loss64(|x| reference::cross_entropy(x, &t, &cfg));
        let fd = testing::finite_diff(&f_ref, std::slice::from_ref(&x), 0, &probe, 1e-6).unwrap();
        assert_close_tol(
            &format!("{name}: vs fd of the reference, seed {seed}"),
            &ours,
            &fd,
            FD_TOL,
        );
        // Differences of our own forward (an f32 loss, hence the larger step and tolerance):
        // the forward and the backward agree.
        let f_ours = loss64(|x| k().cross_entropy(x, &t, &cfg));
        let fd = testing::finite_diff(&f_ours, std::slice::from_ref(&x), 0, &probe, 1e-2).unwrap();
        assert_close_tol(
            &format!("{name}: vs fd of ours, seed {seed}"),
            &ours,
            &fd,
            2e-3,
        );
    }
}

#[test]
fn all_ignored_gives_zero_loss_and_zero_gradient() {
    let seed = fresh_seed("all_ignored");
    let mut rng = SeededRng::new(seed);
    for reduction in [Reduction::Mean, Reduction::Sum] {
        for dt in DTYPES {
            let cfg = CrossEntropyConfig {
                reduction,
                label_smoothing: 0.1,
                z_loss: 1e-3,
                ..Default::default()
            };
            let x = rng.randn(&[4, 9], 2.0, dt);
            let t = Tensor::full(-100i64, 4, &CPU).unwrap();
            let b = both(&x, &t, &cfg, 1.0);
            assert_eq!(
                b.loss.to_scalar::<f32>().unwrap(),
                0.0,
                "{reduction:?} {dt:?}"
            );
            for g in [&b.g, &b.gs] {
                assert!(
                    vec64(g).iter().all(|&v| v == 0.0),
                    "{reduction:?} {dt:?}: gradient not zero"
                );
            }
        }
    }
}

#[test]
fn ignored_rows_get_exactly_zero_gradient() {
    let seed = fresh_seed("ignored_rows");
    let mut rng = SeededRng::new(seed);
    let (n, v) = (12, 33);
    for (name, cfg) in ce_configs() {
        let x = rng.randn(&[n, v], 2.0, DType::F32);
        let t = rng.targets(&[n], v, 0.5, cfg.ignore_index);
        let tv = t.to_vec1::<i64>().unwrap();
        let g = k().cross_entropy_backward(&x, &t, &cfg, 1.0).unwrap();
        for (r, &c) in tv.iter().enumerate() {
            let row = g.get(r).unwrap().to_vec1::<f32>().unwrap();
            if c == cfg.ignore_index {
                assert!(
                    row.iter().all(|&v| v == 0.0),
                    "{name}: ignored row {r} has a gradient"
                );
            } else {
                assert!(
                    row.iter().any(|&v| v != 0.0),
                    "{name}: counted row {r} has none"
                );
            }
        }
    }
}

#[test]
fn u32_targets_leading_dims_and_strided_logits() {
    let seed = fresh_seed("u32_targets");
    let mut rng = SeededRng::new(seed);
    let cfg = CrossEntropyConfig {
        label_smoothing: 0.1,
        ..Default::default()
    };
    let x = rng.randn(&[6, 17], 2.0, DType::F32);
    let t = rng.targets(&[6], 17, 0.0, -100);
    let base = k().cross_entropy(&x, &t, &cfg).unwrap();
    let gbase = k().cross_entropy_backward(&x, &t, &cfg, 1.0).unwrap();
    // u32 targets.
    let tu = t.to_dtype(DType::U32).unwrap();
    assert_same(
        "u32 loss",
        &k().cross_entropy(&x, &tu, &cfg).unwrap(),
        &base,
    );
    assert_same(
        "u32 grad",
        &k().cross_entropy_backward(&x, &tu, &cfg, 1.0).unwrap(),
        &gbase,
    );
    // u32 with an ignore_index they can hold.
    let c7 = CrossEntropyConfig {
        ignore_index: 7,
        ..cfg
    };
    let t7 = Tensor::from_vec(vec![7u32, 1, 7, 3, 16, 0], 6, &CPU).unwrap();
    let b = both(&x, &t7, &c7, 1.0);
    check_both("u32 ignore 7", &b, DType::F32);
    // Leading dims are flattened.
    let x3 = x.reshape((2, 3, 17)).unwrap();
    let t3 = t.reshape((2, 3)).unwrap();
    assert_same(
        "[2,3,V] loss",
        &k().cross_entropy(&x3, &t3, &cfg).unwrap(),
        &base,
    );
    let g3 = k().cross_entropy_backward(&x3, &t3, &cfg, 1.0).unwrap();
    assert_eq!(g3.dims(), &[2, 3, 17]);
    assert_same("[2,3,V] grad", &g3.reshape((6, 17)).unwrap(), &gbase);
    // Strided (transposed) logits give the same as their contiguous copy.
    let xt = x.t().unwrap().contiguous().unwrap().t().unwrap();
    assert!(!xt.is_contiguous());
    assert_same(
        "strided loss",
        &k().cross_entropy(&xt, &t, &cfg).unwrap(),
        &base,
    );
    assert_same(
        "strided grad",
        &k().cross_entropy_backward(&xt, &t, &cfg, 1.0).unwrap(),
        &gbase,
    );
    // The prelude method is the same op.
    assert_same("prelude", &x.cross_entropy_fused(&t, &cfg).unwrap(), &base);
}

#[test]
fn poisoning_and_repetition_do_not_change_a_bit() {
    let seed = fresh_seed("poison");
    let mut rng = SeededRng::new(seed);
    for dt in DTYPES {
        let cfg = ce_configs()[4].1;
        let x = rng.randn(&[37, 300], 3.0, dt);
        let t = rng.targets(&[37], 300, 0.2, cfg.ignore_index);
        let plain = Kernels::default();
        let a = plain.cross_entropy(&x, &t, &cfg).unwrap();
        let ga = plain.cross_entropy_backward(&x, &t, &cfg, 0.5).unwrap();
        for _ in 0..2 {
            assert_same("loss", &k().cross_entropy(&x, &t, &cfg).unwrap(), &a);
            assert_same(
                "grad",
                &k().cross_entropy_backward(&x, &t, &cfg, 0.5).unwrap(),
                &ga,
            );
        }
    }
}

#[test]
fn minus_inf_logits_are_excluded_classes_and_nan_propagates() {
    let seed = fresh_seed("inf_nan");
    let mut rng = SeededRng::new(seed);
    let cfg = CrossEntropyConfig::default();
    let vals = rng.randn(&[4], 1.0, DType::F64).to_vec1::<f64>().unwrap();
    let ninf = f64::NEG_INFINITY;
    let x = Tensor::new(&[[vals[0], vals[1], ninf, vals[2], ninf, vals[3]]], &CPU).unwrap();
    let t = Tensor::new(&[3i64], &CPU).unwrap();
    let reduced = Tensor::from_slice(&vals, (1, 4), &CPU).unwrap();
    let tr = Tensor::new(&[2i64], &CPU).unwrap();
    let loss = k().cross_entropy(&x, &t, &cfg).unwrap();
    let want = reference::cross_entropy(&reduced, &tr, &cfg).unwrap();
    assert_close_tol(
        "loss with -inf classes",
        &loss.to_dtype(DType::F64).unwrap(),
        &want,
        1e-6,
    );
    let g = vec64(&k().cross_entropy_backward(&x, &t, &cfg, 1.0).unwrap());
    let gr = vec64(
        &k().cross_entropy_backward(&reduced, &tr, &cfg, 1.0)
            .unwrap(),
    );
    assert_eq!((g[2], g[4]), (0.0, 0.0));
    let kept = [g[0], g[1], g[3], g[5]];
    for (a, b) in kept.iter().zip(&gr) {
        assert!((a - b).abs() <= 1e-12 * (1.0 + b.abs()), "{a} vs {b}");
    }
    // NaN in a counted row makes the loss NaN; in an ignored row it changes nothing.
    let mut rows = rng.randn(&[10], 1.0, DType::F32).to_vec1::<f32>().unwrap();
    rows[7] = f32::NAN;
    let xn = Tensor::from_vec(rows, (2, 5), &CPU).unwrap();
    let counted = Tensor::new(&[0i64, 1], &CPU).unwrap();
    let l = k()
        .cross_entropy(&xn, &counted, &cfg)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(l.is_nan(), "a NaN logit must give a NaN loss, got {l}");
    let ignored = Tensor::new(&[0i64, -100], &CPU).unwrap();
    let l = k()
        .cross_entropy(&xn, &ignored, &cfg)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(
        l.is_finite(),
        "a NaN in an ignored row must not matter, got {l}"
    );
}

// ---------------------------------------------------------------------------------------------
// Bad input.

fn expect_err<T: std::fmt::Debug>(
    what: &str,
    op: &str,
    f: impl FnOnce() -> Result<T>,
    needles: &[&str],
) {
    let msg = match no_panic(what, f) {
        Ok(v) => panic!("{what}: expected an error, got Ok({v:?})"),
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

#[test]
fn bad_input_is_a_clear_error() {
    let d = CrossEntropyConfig::default();
    let x = randn(&[4, 7], 1.0, DType::F32);
    let t = Tensor::new(&[0i64, 1, 2, 3], &CPU).unwrap();
    let ce = |x: &Tensor, t: &Tensor, c: &CrossEntropyConfig| ops::cross_entropy(x, t, c);
    let bwd =
        |x: &Tensor, t: &Tensor, c: &CrossEntropyConfig| ops::cross_entropy_backward(x, t, c, 1.0);
    let op = "cross_entropy";
    let t5 = Tensor::new(&[0i64, 1, 2, 3, 4], &CPU).unwrap();
    expect_err(
        "shape",
        op,
        || ce(&x, &t5, &d),
        &["targets", "[5]", "expected [4]"],
    );
    let t2 = Tensor::new(&[[0i64, 1], [2, 3]], &CPU).unwrap();
    expect_err(
        "rank",
        op,
        || ce(&x, &t2, &d),
        &["targets", "[2, 2]", "expected [4]"],
    );
    let tf = t.to_dtype(DType::F32).unwrap();
    expect_err(
        "float targets",
        op,
        || ce(&x, &tf, &d),
        &["targets", "F32", "i64 or u32"],
    );
    let tu8 = t.to_dtype(DType::U8).unwrap();
    expect_err("u8 targets", op, || ce(&x, &tu8, &d), &["targets", "U8"]);
    let xi = x.to_dtype(DType::U32).unwrap();
    expect_err("int logits", op, || ce(&xi, &t, &d), &["logits", "U32"]);
    let hi = Tensor::new(&[0i64, 1, 7, 3], &CPU).unwrap();
    expect_err(
        "target = V",
        op,
        || ce(&x, &hi, &d),
        &["target 7 at row 2", "0..7", "-100"],
    );
    let neg = Tensor::new(&[-1i64, 1, 2, 3], &CPU).unwrap();
    expect_err(
        "negative target",
        op,
        || ce(&x, &neg, &d),
        &["target -1 at row 0", "out of range"],
    );
    let big = Tensor::new(&[0u32, 1, 2, 4_000_000_000], &CPU).unwrap();
    expect_err(
        "u32 target",
        op,
        || ce(&x, &big, &d),
        &["target 4000000000 at row 3"],
    );
    let e0 = Tensor::zeros((0, 7), DType::F32, &CPU).unwrap();
    let t0 = Tensor::zeros(0, DType::I64, &CPU).unwrap();
    expect_err(
        "no rows",
        op,
        || ce(&e0, &t0, &d),
        &["logits", "[0, 7]", "empty"],
    );
    let v0 = Tensor::zeros((4, 0), DType::F32, &CPU).unwrap();
    expect_err(
        "no classes",
        op,
        || ce(&v0, &t, &d),
        &["logits", "[4, 0]", "empty"],
    );
    let s = Tensor::new(1f32, &CPU).unwrap();
    let ts = Tensor::new(0i64, &CPU).unwrap();
    expect_err(
        "scalar logits",
        op,
        || ce(&s, &ts, &d),
        &["logits", "rank >= 1"],
    );
    for (bad, needle) in [
        (
            CrossEntropyConfig {
                label_smoothing: 1.5,
                ..d
            },
            "label_smoothing must be in [0, 1], got 1.5",
        ),
        (
            CrossEntropyConfig {
                label_smoothing: f64::NAN,
                ..d
            },
            "label_smoothing",
        ),
        (
            CrossEntropyConfig {
                softcap: Some(0.0),
                ..d
            },
            "softcap must be a finite number > 0, got 0",
        ),
        (
            CrossEntropyConfig {
                softcap: Some(f64::INFINITY),
                ..d
            },
            "softcap",
        ),
        (
            CrossEntropyConfig { z_loss: -1.0, ..d },
            "z_loss must be a finite number >= 0, got -1",
        ),
    ] {
        expect_err(needle, op, || ce(&x, &t, &bad), &[needle]);
        expect_err(
            needle,
            "cross_entropy_backward",
            || bwd(&x, &t, &bad),
            &[needle],
        );
    }
    let bop = "cross_entropy_backward";
    expect_err("bwd shape", bop, || bwd(&x, &t5, &d), &["targets", "[5]"]);
    expect_err(
        "bwd range",
        bop,
        || bwd(&x, &hi, &d),
        &["target 7 at row 2"],
    );
    expect_err(
        "dloss",
        bop,
        || ops::cross_entropy_backward(&x, &t, &d, f64::NAN),
        &["dloss must be finite"],
    );
}

// ---------------------------------------------------------------------------------------------
// Property tests.

fn vocab() -> impl Strategy<Value = usize> {
    prop_oneof![
        2 => Just(1usize),
        2 => Just(2),
        2 => Just(3),
        2 => Just(7),
        2 => Just(13),
        2 => Just(31),
        2 => Just(101),
        2 => Just(251),
        1 => Just(1009),
        1 => Just(4099),
        4 => 4usize..=64,
    ]
}

fn config_strategy() -> impl Strategy<Value = CrossEntropyConfig> {
    (
        prop_oneof![Just(0.0), Just(0.1), Just(1.0)],
        prop_oneof![Just(None), Just(Some(4.0))],
        prop_oneof![Just(0.0), Just(1e-3)],
        prop_oneof![Just(Reduction::Mean), Just(Reduction::Sum)],
    )
        .prop_map(
            |(label_smoothing, softcap, z_loss, reduction)| CrossEntropyConfig {
                label_smoothing,
                softcap,
                z_loss,
                reduction,
                ..Default::default()
            },
        )
}

proptest! {
    #![proptest_config(proptest_config(200))]

    #[test]
    fn random_shapes_match_the_reference(
        lead in prop::collection::vec(1usize..=5, 1..=3),
        v in vocab(),
        dt in prop_oneof![Just(DType::F32), Just(DType::F64), Just(DType::F16), Just(DType::BF16)],
        cfg in config_strategy(),
        p_ignore in prop_oneof![Just(0.0), Just(0.3), Just(1.0)],
        seed in any::<u64>(),
    ) {
        let mut rng = SeededRng::new(seed);
        let mut shape = lead.clone();
        shape.push(v);
        let x = rng.randn(&shape, 3.0, dt);
        let t = rng.targets(&lead, v, p_ignore, cfg.ignore_index);
        let probe = rng.normal() as f32 as f64;
        check_both(&format!("{shape:?} {dt:?} {cfg:?} seed {seed}"), &both(&x, &t, &cfg, probe), dt);
    }
}
