//! Linear + cross-entropy on the CPU: the loss and the gradients of `h` and `w` (autograd and
//! the standalone forward+backward) against the f64 reference (full logits `h·wᵀ`, then
//! `log_softmax` + `gather`, differentiated by Candle's autograd) and against our own
//! cross-entropy on the full logits, for chunks of 1 row, odd sizes, more than the tokens and
//! the default, with and without dW, with every loss option; against central finite
//! differences; tied embeddings; frozen heads (no dW); all-ignored batches; proptests over
//! random shapes; bad input errors. Every kernel runs with poisoned outputs. The memory bound
//! is `tests/linear_cross_entropy_memory.rs` (its own binary: it counts every allocation).

mod common;

use candle_core::{DType, Result, Tensor, Var};
use candle_fused::ops::{self, CrossEntropyConfig, LinearCrossEntropy};
use candle_fused::prelude::*;
use candle_fused::{KernelConfig, Kernels};
use candle_fused_testkit::{reference, testing};
use common::*;
use proptest::prelude::*;

fn k() -> Kernels {
    Kernels::new(KernelConfig::poisoned())
}

/// One problem: `h [lead.., hd]`, `w [v, hd]`, targets.
struct Case {
    h: Tensor,
    w: Tensor,
    t: Tensor,
    cfg: CrossEntropyConfig,
    probe: f64,
}

fn case(
    rng: &mut SeededRng,
    lead: &[usize],
    hd: usize,
    v: usize,
    dt: DType,
    cfg: CrossEntropyConfig,
    p_ignore: f64,
) -> Case {
    let mut shape = lead.to_vec();
    shape.push(hd);
    Case {
        h: rng.randn(&shape, 1.0, dt),
        w: rng.randn(&[v, hd], 2.0 / (hd as f64).sqrt(), dt),
        t: rng.targets(lead, v, p_ignore, cfg.ignore_index),
        cfg,
        probe: rng.normal() as f32 as f64,
    }
}

/// `(loss, dh, dw)` of `probe · loss` through autograd for `f(h, w)`; `dw` when `train_w`.
fn grads(
    h: &Tensor,
    w: &Tensor,
    train_w: bool,
    probe: f64,
    f: impl Fn(&Tensor, &Tensor) -> Result<Tensor>,
) -> (Tensor, Tensor, Option<Tensor>) {
    let hv = Var::from_tensor(h).unwrap();
    let wv = Var::from_tensor(w).unwrap();
    let wt = if train_w {
        wv.as_tensor().clone()
    } else {
        w.clone()
    };
    let loss = f(hv.as_tensor(), &wt).unwrap();
    let g = (&loss * probe).unwrap().backward().unwrap();
    let dh = g.get(&hv).expect("dh").clone();
    let dw = g.get(&wv).cloned();
    assert_eq!(
        dw.is_some(),
        train_w,
        "a gradient for w exactly when it is tracked"
    );
    (loss, dh, dw)
}

/// The f64 reference and the conditioning of its gradient GEMMs.
struct Reference {
    loss: Tensor,
    dh: Tensor,
    dw: Tensor,
    /// `|dlogits|·|w|` and `|dlogits|ᵀ·|h|`: what the GEMMs sum before terms cancel.
    dh_mag: Tensor,
    dw_mag: Tensor,
    /// The (f64) logits.
    logits: Tensor,
}

/// The logits' shape `[lead.., V]`.
fn logits_shape(c: &Case) -> Vec<usize> {
    let mut s = c.t.dims().to_vec();
    s.push(c.w.dim(0).unwrap());
    s
}

/// The f64 reference; with `round`, on logits and logit gradients rounded to that dtype (what a
/// logits chunk in a half dtype can reach at best: `dh = dlogits·w` sums rounded terms that
/// may cancel).
fn reference_parts(c: &Case, round: Option<DType>) -> Reference {
    let (h, w) = (f64t(&c.h), f64t(&c.w));
    let hd = h.dim(candle_core::D::Minus1).unwrap();
    let h2 = h.reshape(((), hd)).unwrap();
    let mut logits = h2.matmul(&w.t().unwrap()).unwrap();
    if let Some(dt) = round {
        logits = f64t(&logits.to_dtype(dt).unwrap());
    }
    let z = Var::from_tensor(&logits).unwrap();
    let loss =
        reference::cross_entropy(z.as_tensor(), &c.t.flatten_all().unwrap(), &c.cfg).unwrap();
    let logits = logits.reshape(logits_shape(c)).unwrap();
    let mut dz = (&loss * c.probe)
        .unwrap()
        .backward()
        .unwrap()
        .get(&z)
        .unwrap()
        .clone();
    if let Some(dt) = round {
        dz = f64t(&dz.to_dtype(dt).unwrap());
    }
    let dh = dz.matmul(&w).unwrap().reshape(h.shape()).unwrap();
    let dw = dz.t().unwrap().matmul(&h2).unwrap();
    let a = dz.abs().unwrap();
    let dh_mag = a.matmul(&w.abs().unwrap()).unwrap();
    let dw_mag = a.t().unwrap().matmul(&h2.abs().unwrap()).unwrap();
    Reference {
        loss,
        dh,
        dw,
        dh_mag,
        dw_mag,
        logits,
    }
}

/// The error a gradient GEMM can show from terms that cancel: each `dlogits` element carries a
/// few roundings of the f32 (f64) arithmetic that makes it (exp, tanh, the log-sum-exp: 8 unit
/// roundoffs allowed; half inputs: its rounding to the dtype) and the sum keeps their absolute
/// size, `u·Σ|dlogits||x|`, relative to the largest gradient element.
fn cancellation_floor(mag: &Tensor, reference: &Tensor, dt: DType) -> f64 {
    let u = match dt {
        DType::F64 => 8.0 * unit_roundoff(DType::F64),
        DType::F32 => 8.0 * unit_roundoff(DType::F32),
        // Half inputs: dlogits is stored in the dtype, one rounding (≤ u) of a value computed
        // in f32, which may fall on the other side of a rounding boundary than the reference's.
        half => 2.0 * unit_roundoff(half),
    };
    let max_ref = testing::max_abs(reference).unwrap();
    if max_ref == 0.0 {
        return 0.0;
    }
    u * testing::max_abs(mag).unwrap() / max_ref
}

/// Compares ours (autograd and standalone) for `chunk` with the reference.
fn check_case(ctx: &str, c: &Case, chunk: Option<usize>, train_w: bool) {
    let dt = c.h.dtype();
    let (loss, dh, dw) = grads(&c.h, &c.w, train_w, c.probe, |h, w| {
        k().linear_cross_entropy(h, w, &c.t, &c.cfg, chunk)
    });
    let s: LinearCrossEntropy = k()
        .linear_cross_entropy_forward_backward(&c.h, &c.w, &c.t, &c.cfg, chunk, train_w, c.probe)
        .unwrap();
    assert_eq!(s.dw.is_some(), train_w);
    assert_eq!(s.dh.dims(), c.h.dims());
    assert_eq!((s.dh.dtype(), loss.dtype()), (dt, DType::F32));
    let r = reference_parts(c, None);
    let (r_loss, r_dh, r_dw) = (&r.loss, &r.dh, &r.dw);
    let half = matches!(dt, DType::F16 | DType::BF16);
    let rounded = half.then(|| reference_parts(c, Some(dt)));
    let extra = |ours_ref: &Tensor, pick: fn(&Reference) -> &Tensor| {
        rounded
            .as_ref()
            .map_or(0.0, |r| 2.0 * testing::rel_err(pick(r), ours_ref).unwrap())
    };
    let floor = loss_floor(&r.logits, &c.t, &c.cfg);
    for (what, l) in [("loss", &loss), ("loss (standalone)", &s.loss)] {
        let err = testing::rel_err(l, r_loss).unwrap();
        let abs = (vec64(l)[0] - vec64(r_loss)[0]).abs();
        let t = loss_tol(dt).max(extra(r_loss, |r| &r.loss));
        assert!(
            err <= t || abs <= floor,
            "{ctx}: {what} {l} vs {r_loss}: {err:.3e} > {t:.1e} (absolute {abs:.1e} > floor {floor:.1e})"
        );
    }
    // Beyond the rounded reference (logits and dlogits in the dtype), the standalone result is
    // rounded once more (dh/dw stored in the dtype) and the autograd one twice (stored with
    // dloss = 1, then scaled by the incoming gradient): one unit roundoff each, relative to
    // the largest element (zero for f32/f64). Terms that cancel in the GEMMs keep the size of
    // their operands' errors (`cancellation_floor`).
    let u = if half { unit_roundoff(dt) } else { 0.0 };
    let grads_to_check = [
        (
            "dh",
            Some(&dh),
            Some(&s.dh),
            r_dh,
            &r.dh_mag,
            extra(r_dh, |r| &r.dh),
        ),
        (
            "dw",
            dw.as_ref(),
            s.dw.as_ref(),
            r_dw,
            &r.dw_mag,
            extra(r_dw, |r| &r.dw),
        ),
    ];
    for (name, auto, standalone, r, mag, f) in grads_to_check {
        let (Some(auto), Some(standalone)) = (auto, standalone) else {
            continue;
        };
        let f = f.max(cancellation_floor(mag, r, dt));
        assert_close_floor(
            &format!("{ctx}: {name} (autograd)"),
            auto,
            r,
            dt,
            f + 2.0 * u,
        );
        assert_close_floor(
            &format!("{ctx}: {name} (standalone)"),
            standalone,
            r,
            dt,
            f + u,
        );
    }
}

#[test]
fn equals_the_reference_for_every_chunk_size_and_option() {
    let seed = fresh_seed("equals_the_reference");
    let mut rng = SeededRng::new(seed);
    for dt in DTYPES {
        let cfgs = ce_configs();
        let cfgs = if dt == DType::F32 {
            &cfgs[..]
        } else {
            &cfgs[3..]
        };
        for (name, cfg) in cfgs {
            for (lead, hd, v) in [
                (&[13][..], 8, 37),
                (&[2, 5][..], 16, 101),
                (&[20][..], 33, 7),
            ] {
                let c = case(&mut rng, lead, hd, v, dt, *cfg, 0.25);
                for chunk in [Some(1), Some(3), Some(7), Some(1000), None] {
                    for train_w in [false, true] {
                        let ctx = format!("{name} {lead:?}x{hd} V={v} {dt:?} chunk {chunk:?} dw {train_w} seed {seed}");
                        check_case(&ctx, &c, chunk, train_w);
                    }
                }
            }
        }
    }
}

#[test]
fn equals_our_cross_entropy_on_the_full_logits() {
    let seed = fresh_seed("equals_our_cross_entropy");
    let mut rng = SeededRng::new(seed);
    for dt in [DType::F32, DType::BF16] {
        let cfg = ce_configs()[4].1;
        let c = case(&mut rng, &[3, 7], 24, 301, dt, cfg, 0.2);
        let full = |h: &Tensor, w: &Tensor| {
            let logits = h.reshape(((), 24))?.matmul(&w.t()?)?;
            k().cross_entropy(&logits, &c.t.flatten_all()?, &c.cfg)
        };
        let (l0, dh0, dw0) = grads(&c.h, &c.w, true, c.probe, full);
        for chunk in [Some(1), Some(5), Some(21), Some(64), None] {
            let (l, dh, dw) = grads(&c.h, &c.w, true, c.probe, |h, w| {
                k().linear_cross_entropy(h, w, &c.t, &c.cfg, chunk)
            });
            let ctx = format!("{dt:?} chunk {chunk:?} seed {seed}");
            assert_close_tol(&format!("{ctx}: loss"), &l, &l0, loss_tol(dt));
            assert_close(&format!("{ctx}: dh"), &dh, &dh0, dt);
            assert_close(
                &format!("{ctx}: dw"),
                dw.as_ref().unwrap(),
                dw0.as_ref().unwrap(),
                dt,
            );
        }
    }
}

#[test]
fn autograd_is_the_standalone_step_and_frozen_heads_get_nothing() {
    let seed = fresh_seed("autograd_is_standalone");
    let mut rng = SeededRng::new(seed);
    let c = case(
        &mut rng,
        &[17],
        12,
        50,
        DType::F32,
        CrossEntropyConfig::default(),
        0.2,
    );
    let s = k()
        .linear_cross_entropy_forward_backward(&c.h, &c.w, &c.t, &c.cfg, Some(4), true, 1.0)
        .unwrap();
    let (l, dh, dw) = grads(&c.h, &c.w, true, 1.0, |h, w| {
        k().linear_cross_entropy(h, w, &c.t, &c.cfg, Some(4))
    });
    assert_same("loss", &l, &s.loss);
    assert_same("dh", &dh, &s.dh);
    assert_same("dw", dw.as_ref().unwrap(), s.dw.as_ref().unwrap());
    // A frozen head: no dw from either entry.
    let (_, dh2, dw2) = grads(&c.h, &c.w, false, 1.0, |h, w| {
        k().linear_cross_entropy(h, w, &c.t, &c.cfg, Some(4))
    });
    assert!(dw2.is_none());
    assert_same("dh, frozen w", &dh2, &s.dh);
    let s2 = k()
        .linear_cross_entropy_forward_backward(&c.h, &c.w, &c.t, &c.cfg, Some(4), false, 1.0)
        .unwrap();
    assert!(s2.dw.is_none());
    assert_eq!(
        s2.n_valid,
        c.t.to_vec1::<i64>()
            .unwrap()
            .iter()
            .filter(|&&t| t != -100)
            .count()
    );
    // Nothing tracked (evaluation): the loss alone, the same value.
    let le = k()
        .linear_cross_entropy(&c.h, &c.w, &c.t, &c.cfg, Some(4))
        .unwrap();
    assert_close_tol("eval loss", &le, &s.loss, 1e-6);
    // The prelude method is the same op.
    let lp =
        c.h.linear_cross_entropy_fused(&c.w, &c.t, &c.cfg, Some(4))
            .unwrap();
    assert_close_tol("prelude loss", &lp, &s.loss, 1e-6);
}

#[test]
fn tied_embeddings_sum_both_gradients() {
    let seed = fresh_seed("tied_embeddings");
    let mut rng = SeededRng::new(seed);
    let (n, hd, v) = (11, 10, 29);
    let emb = rng.randn(&[v, hd], 1.0, DType::F32);
    let ids = rng
        .targets(&[n], v, 0.0, -100)
        .to_dtype(DType::U32)
        .unwrap();
    let t = rng.targets(&[n], v, 0.2, -100);
    let cfg = CrossEntropyConfig {
        label_smoothing: 0.1,
        ..Default::default()
    };
    let run = |fused: bool, e: &Tensor| -> Tensor {
        let ev = Var::from_tensor(e).unwrap();
        let x = ev.as_tensor().index_select(&ids, 0).unwrap();
        let h = x.tanh().unwrap();
        let loss = if fused {
            k().linear_cross_entropy(&h, ev.as_tensor(), &t, &cfg, Some(3))
                .unwrap()
        } else {
            reference::linear_cross_entropy(&h, ev.as_tensor(), &t, &cfg).unwrap()
        };
        loss.backward().unwrap().get(&ev).unwrap().clone()
    };
    let ours = run(true, &emb);
    let want = run(false, &f64t(&emb));
    assert_close(&format!("tied dW, seed {seed}"), &ours, &want, DType::F32);
}

#[test]
fn gradients_match_finite_differences() {
    let seed = fresh_seed("finite_differences");
    let mut rng = SeededRng::new(seed);
    for (name, cfg) in ce_configs() {
        let c = case(&mut rng, &[4], 3, 5, DType::F64, cfg, 0.25);
        let s = k()
            .linear_cross_entropy_forward_backward(&c.h, &c.w, &c.t, &c.cfg, Some(3), true, 1.0)
            .unwrap();
        let probe = Tensor::new(1.0f64, &CPU).unwrap();
        let f = |a: &[Tensor]| reference::linear_cross_entropy(&a[0], &a[1], &c.t, &c.cfg);
        let inputs = [c.h.clone(), c.w.clone()];
        let fdh = testing::finite_diff(f, &inputs, 0, &probe, 1e-6).unwrap();
        let fdw = testing::finite_diff(f, &inputs, 1, &probe, 1e-6).unwrap();
        assert_close_tol(
            &format!("{name}: dh vs fd, seed {seed}"),
            &s.dh,
            &fdh,
            FD_TOL,
        );
        assert_close_tol(
            &format!("{name}: dw vs fd, seed {seed}"),
            s.dw.as_ref().unwrap(),
            &fdw,
            FD_TOL,
        );
    }
}

#[test]
fn all_ignored_gives_zero_loss_and_zero_gradients() {
    let seed = fresh_seed("all_ignored");
    let mut rng = SeededRng::new(seed);
    for dt in DTYPES {
        let c = case(&mut rng, &[9], 6, 13, dt, ce_configs()[4].1, 1.0);
        for chunk in [Some(2), None] {
            let s = k()
                .linear_cross_entropy_forward_backward(&c.h, &c.w, &c.t, &c.cfg, chunk, true, 1.0)
                .unwrap();
            assert_eq!(s.loss.to_scalar::<f32>().unwrap(), 0.0);
            assert_eq!(s.n_valid, 0);
            assert!(vec64(&s.dh).iter().all(|&v| v == 0.0), "{dt:?}: dh");
            assert!(
                vec64(s.dw.as_ref().unwrap()).iter().all(|&v| v == 0.0),
                "{dt:?}: dw"
            );
        }
    }
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
    let h = randn(&[4, 8], 1.0, DType::F32);
    let w = randn(&[10, 8], 1.0, DType::F32);
    let t = Tensor::new(&[0i64, 1, 2, 3], &CPU).unwrap();
    let op = "linear_cross_entropy";
    let lce = |h: &Tensor, w: &Tensor, t: &Tensor, c: Option<usize>| {
        ops::linear_cross_entropy(h, w, t, &d, c)
    };
    let w1 = randn(&[80], 1.0, DType::F32);
    expect_err(
        "w rank",
        op,
        || lce(&h, &w1, &t, None),
        &["w has shape [80]", "expected [V, 8]"],
    );
    let w9 = randn(&[10, 9], 1.0, DType::F32);
    expect_err(
        "w hidden",
        op,
        || lce(&h, &w9, &t, None),
        &["w has shape [10, 9]", "expected [V, 8]"],
    );
    let w64 = w.to_dtype(DType::F64).unwrap();
    expect_err(
        "w dtype",
        op,
        || lce(&h, &w64, &t, None),
        &["w has dtype F64", "expected F32"],
    );
    let w0 = Tensor::zeros((0, 8), DType::F32, &CPU).unwrap();
    expect_err(
        "no classes",
        op,
        || lce(&h, &w0, &t, None),
        &["w has 0 rows"],
    );
    expect_err(
        "chunk 0",
        op,
        || lce(&h, &w, &t, Some(0)),
        &["chunk must be at least 1 row"],
    );
    let t3 = Tensor::new(&[0i64, 1, 2], &CPU).unwrap();
    expect_err(
        "targets shape",
        op,
        || lce(&h, &w, &t3, None),
        &["targets has shape [3]", "expected [4]"],
    );
    let tf = t.to_dtype(DType::F32).unwrap();
    expect_err(
        "float targets",
        op,
        || lce(&h, &w, &tf, None),
        &["targets has dtype F32"],
    );
    let hi = Tensor::new(&[0i64, 10, 2, 3], &CPU).unwrap();
    expect_err(
        "target = V",
        op,
        || lce(&h, &w, &hi, None),
        &["target 10 at row 1", "0..10"],
    );
    let e = Tensor::zeros((0, 8), DType::F32, &CPU).unwrap();
    let te = Tensor::zeros(0, DType::I64, &CPU).unwrap();
    expect_err(
        "empty h",
        op,
        || lce(&e, &w, &te, None),
        &["h of shape [0, 8] is empty"],
    );
    let hi8 = h.to_dtype(DType::U8).unwrap();
    expect_err("int h", op, || lce(&hi8, &w, &t, None), &["h has dtype U8"]);
    let bad = CrossEntropyConfig {
        label_smoothing: -0.1,
        ..d
    };
    expect_err(
        "config",
        op,
        || ops::linear_cross_entropy(&h, &w, &t, &bad, None),
        &["label_smoothing"],
    );
    let fop = "linear_cross_entropy_forward_backward";
    expect_err(
        "dloss",
        fop,
        || ops::linear_cross_entropy_forward_backward(&h, &w, &t, &d, None, true, f64::INFINITY),
        &["dloss must be finite"],
    );
    expect_err(
        "fb chunk",
        fop,
        || ops::linear_cross_entropy_forward_backward(&h, &w, &t, &d, Some(0), false, 1.0),
        &["chunk"],
    );
}

// ---------------------------------------------------------------------------------------------
// Property tests.

proptest! {
    #![proptest_config(proptest_config(120))]

    #[test]
    fn random_shapes_match_the_reference(
        lead in prop::collection::vec(1usize..=6, 1..=2),
        hd in prop_oneof![Just(1usize), Just(2), Just(5), Just(16), Just(33)],
        v in prop_oneof![Just(1usize), Just(2), Just(3), Just(7), Just(31), Just(101), Just(251), 4usize..=64],
        chunk in prop_oneof![Just(None), Just(Some(1usize)), (2usize..=10).prop_map(Some), Just(Some(100))],
        train_w in any::<bool>(),
        dt in prop_oneof![Just(DType::F32), Just(DType::F64), Just(DType::F16), Just(DType::BF16)],
        cfg_i in 0usize..5,
        p_ignore in prop_oneof![Just(0.0), Just(0.3), Just(1.0)],
        seed in any::<u64>(),
    ) {
        let mut rng = SeededRng::new(seed);
        let cfg = ce_configs()[cfg_i].1;
        let c = case(&mut rng, &lead, hd, v, dt, cfg, p_ignore);
        check_case(&format!("{lead:?}x{hd} V={v} {dt:?} cfg {cfg_i} chunk {chunk:?} dw {train_w} p_ignore {p_ignore} seed {seed}"), &c, chunk, train_w);
    }
}

/// The dW chunk of the bench's heads: logits at most half the f32 accumulator's bytes.
#[test]
fn dw_chunk_sizes() {
    // Llama 3 (H 4096, V 128256, bf16): 4096 rows (a 1 GiB chunk beside the 2 GiB accumulator).
    assert_eq!(ops::linear_cross_entropy_chunk(8192, 4096, 128256), 272);
    for (n, h, v, dt, want) in [
        (8192, 4096, 128256, DType::BF16, 4096),
        (8192, 4096, 128256, DType::F32, 2048),
        // Qwen2.5-0.5B (H 896, V 151936): 896 rows; never more than the tokens.
        (8192, 896, 151936, DType::BF16, 896),
        (500, 4096, 128256, DType::BF16, 500),
        (8192, 64, 65536, DType::F64, 128),
    ] {
        assert_eq!(
            ops::linear_cross_entropy_chunk_dw(n, h, v, dt),
            want,
            "{n}x{h}x{v} {dt:?}"
        );
    }
    // On the CPU the device-aware default is the plain rule.
    let cpu = candle_core::Device::Cpu;
    for (n, h, v, dw) in [(8192, 4096, 128256, false), (8192, 896, 151936, true)] {
        let want = if dw {
            ops::linear_cross_entropy_chunk_dw(n, h, v, DType::BF16)
        } else {
            ops::linear_cross_entropy_chunk(n, h, v)
        };
        assert_eq!(
            ops::linear_cross_entropy_chunk_on(&cpu, n, h, v, DType::BF16, dw),
            want
        );
    }
}
