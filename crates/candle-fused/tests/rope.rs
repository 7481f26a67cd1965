//! RoPE (`ops::rope`, `rope_backward`, `rope_fused`, `RopeTable`): forward and gradient vs
//! the composed f64 reference and finite differences, θ then −θ, the pass-through dims,
//! positions `[T]`/`[B, T]` (u32/i64) with restarts and offsets, strided inputs, property
//! tests. Bad input: `rope_errors.rs`; the table builder against the transformers formulas:
//! `rope_table.rs`.
//!
//! Inputs are fresh random values each run from the testkit's seeded stream (`common::randn`;
//! the seed is printed on failure, `CANDLE_FUSED_SEED` replays it).

mod common;

use candle_core::{DType, Result, Tensor};
use candle_fused::ops::{self, RopeLayout, RopeScaling, RopeStyle, RopeTable};
use candle_fused::prelude::*;
use candle_fused::{KernelConfig, Kernels};
use candle_fused_testkit::reference;
use common::*;

const STYLES: [RopeStyle; 2] = [RopeStyle::HalfSplit, RopeStyle::Interleaved];

fn k() -> Kernels {
    Kernels::new(KernelConfig::poisoned())
}

type Case = (RopeLayout, RopeStyle, [usize; 4], usize);

/// (layout, style, [B, H, T, D], rotary dim): D from 2 to 130, partial rotary dims, T = 1.
fn cases() -> Vec<Case> {
    let mut v = Vec::new();
    for layout in LAYOUTS {
        for style in STYLES {
            for (bhtd, rot) in [
                ([1, 1, 1, 2], 2),
                ([2, 3, 5, 8], 8),
                ([1, 4, 17, 64], 64),
                ([3, 2, 1, 10], 6),
                ([2, 2, 9, 7], 4),
                ([1, 3, 6, 130], 128),
            ] {
                v.push((layout, style, bhtd, rot));
            }
        }
    }
    v
}

fn fused(
    tab: RopeTable,
    pos: Tensor,
    layout: RopeLayout,
    style: RopeStyle,
) -> impl Fn(&[Tensor]) -> Result<Vec<Tensor>> {
    move |a| Ok(vec![k().rope(&a[0], &tab, &pos, layout, style)?])
}

fn refr(
    tab: RopeTable,
    pos: Tensor,
    layout: RopeLayout,
    style: RopeStyle,
) -> impl Fn(&[Tensor]) -> Result<Vec<Tensor>> {
    move |a| {
        Ok(vec![reference::rope(
            &a[0],
            tab.cos(),
            tab.sin(),
            &pos,
            layout,
            style,
        )?])
    }
}

#[test]
fn forward_and_backward_match_reference_all_dtypes() {
    for &dt in &DTYPES {
        for (layout, style, [b, h, t, d], rot) in cases() {
            let tab = table(d, rot, 64, None);
            for pos in [
                positions(&[t], 64, DType::U32),
                positions(&[b, t], 64, DType::I64),
            ] {
                let x = randn(&dims(layout, b, h, t, d), 1.0, dt);
                let probe = randn(x.dims(), 1.0, dt);
                let f = fused(tab.clone(), pos.clone(), layout, style);
                let r = refr(tab.clone(), pos.clone(), layout, style);
                let both = run_both(&f, &r, &[x], &[true], std::slice::from_ref(&probe));
                let ctx = format!(
                    "rope {layout:?} {style:?} {:?} rot {rot} pos {:?}",
                    [b, h, t, d],
                    pos.dims()
                );
                compare_all(&ctx, &both, &["y"], &["x"], &[true], dt, &|_| 0.0);
                // The standalone backward is the same as the autograd gradient, bit for bit.
                let dx = k()
                    .rope_backward(&probe, &tab, &pos, layout, style)
                    .unwrap();
                assert_equal(
                    &format!("{ctx}: rope_backward"),
                    &dx,
                    both.2[0].as_ref().unwrap(),
                );
            }
        }
    }
}

#[test]
fn gradient_matches_finite_differences() {
    for (layout, style, [b, h, t, d], rot) in cases() {
        let tab = table(d, rot, 32, None);
        let pos = positions(&[b, t], 32, DType::I64);
        let x = randn(&dims(layout, b, h, t, d), 1.0, DType::F64);
        let probe = randn(x.dims(), 1.0, DType::F64);
        let f = fused(tab, pos, layout, style);
        let inputs = [x];
        let (_, g) = fwd_bwd(&f, &inputs, &[true], std::slice::from_ref(&probe)).unwrap();
        let want = fd(&f, &inputs, 0, 0, &probe);
        let ctx = format!(
            "rope dx vs fd {layout:?} {style:?} {:?} rot {rot}",
            [b, h, t, d]
        );
        assert_close_tol(&ctx, g[0].as_ref().unwrap(), &want, FD_TOL);
    }
}

/// θ then −θ gives `a²·x`: `x` for the plain table (f32: within a few ulps), and the YaRN
/// attention factor squared; the pass-through dims come back bit for bit.
#[test]
fn rotating_forward_then_backward_gives_back_the_input() {
    for layout in LAYOUTS {
        for style in STYLES {
            let tab = table(72, 64, 4096, None);
            let x = randn(&dims(layout, 2, 3, 50, 72), 1.0, DType::F32);
            let pos = positions(&[50], 4096, DType::U32);
            let y = ops::rope(&x, &tab, &pos, layout, style).unwrap();
            let back = ops::rope_backward(&y, &tab, &pos, layout, style).unwrap();
            assert_close_tol("θ then −θ", &back, &x, 1e-6);
            assert_same(
                "pass-through dims",
                &back.narrow(3, 64, 8).unwrap(),
                &x.narrow(3, 64, 8).unwrap(),
            );
            let yarn = Some(RopeScaling::Yarn {
                factor: 4.0,
                original_max_positions: 1024,
                beta_fast: 32.0,
                beta_slow: 1.0,
                mscale: None,
                mscale_all_dim: None,
                attention_factor: None,
            });
            let tab = table(72, 72, 4096, yarn);
            let a = tab.attention_factor();
            assert!((a - (0.1 * 4f64.ln() + 1.0)).abs() < 1e-15);
            let y = ops::rope(&x, &tab, &pos, layout, style).unwrap();
            let back = ops::rope_backward(&y, &tab, &pos, layout, style).unwrap();
            assert_close_tol(
                "yarn θ then −θ = a²·x",
                &back,
                &(&x * (a * a)).unwrap(),
                1e-6,
            );
        }
    }
}

/// The dims past the rotary dim are copied, and so is their gradient.
#[test]
fn pass_through_dims_and_their_gradient_are_unchanged() {
    for &dt in &DTYPES {
        let tab = table(10, 4, 16, None);
        let x = randn(&[2, 3, 4, 10], 1.0, dt);
        let pos = positions(&[4], 16, DType::U32);
        let y = k()
            .rope(&x, &tab, &pos, RopeLayout::Bhtd, RopeStyle::HalfSplit)
            .unwrap();
        assert_same(
            "pass-through",
            &y.narrow(3, 4, 6).unwrap(),
            &x.narrow(3, 4, 6).unwrap(),
        );
        let dy = randn(&[2, 3, 4, 10], 1.0, dt);
        let dx = k()
            .rope_backward(&dy, &tab, &pos, RopeLayout::Bhtd, RopeStyle::HalfSplit)
            .unwrap();
        assert_same(
            "pass-through grad",
            &dx.narrow(3, 4, 6).unwrap(),
            &dy.narrow(3, 4, 6).unwrap(),
        );
    }
}

/// `[B, T]` positions: packed sequences restarting at 0 and a KV cache at an offset give the
/// same rows as separate calls with `[T]` positions.
#[test]
fn per_token_positions_restart_and_offset() {
    let tab = table(16, 16, 64, None);
    for layout in LAYOUTS {
        let x = randn(&dims(layout, 2, 3, 6, 16), 1.0, DType::F32);
        // Row 0: two packed sequences (0, 1, 2, 0, 1, 2); row 1: a cache continuing at 40.
        let pos = Tensor::new(&[[0i64, 1, 2, 0, 1, 2], [40, 41, 42, 43, 44, 45]], &CPU).unwrap();
        let y = ops::rope(&x, &tab, &pos, layout, RopeStyle::HalfSplit).unwrap();
        for bi in 0..2 {
            let xb = x.narrow(0, bi, 1).unwrap();
            let pb = pos.narrow(0, bi, 1).unwrap().squeeze(0).unwrap();
            let yb = ops::rope(&xb, &tab, &pb, layout, RopeStyle::HalfSplit).unwrap();
            assert_same("row of [B, T] positions", &y.narrow(0, bi, 1).unwrap(), &yb);
        }
        // Position 0 is the identity.
        let t_dim = if layout == RopeLayout::Bhtd { 2 } else { 1 };
        assert_same(
            "position 0",
            &y.narrow(0, 0, 1).unwrap().narrow(t_dim, 0, 1).unwrap(),
            &x.narrow(0, 0, 1).unwrap().narrow(t_dim, 0, 1).unwrap(),
        );
        // u32 and i64 positions agree.
        let y32 = ops::rope(
            &x,
            &tab,
            &pos.to_dtype(DType::U32).unwrap(),
            layout,
            RopeStyle::HalfSplit,
        )
        .unwrap();
        assert_same("u32 vs i64 positions", &y32, &y);
    }
}

/// Views whose last dim is contiguous are read through their strides (transposed projection
/// output, narrowed heads, broadcast); others are copied first. All equal the contiguous copy
/// bit for bit, and gradients flow through the views.
#[test]
fn strided_inputs_match_contiguous_copies() {
    let tab = table(8, 8, 32, None);
    let pos = positions(&[5], 32, DType::U32);
    let views: Vec<(&str, Vec<usize>, View)> = vec![
        ("transposed [B,T,H,D] as Bhtd", vec![2, 5, 3, 8], |x| {
            x.transpose(1, 2)
        }),
        ("narrowed last dim", vec![2, 3, 5, 11], |x| {
            x.narrow(3, 2, 8)
        }),
        ("broadcast heads", vec![2, 1, 5, 8], |x| {
            x.broadcast_as((2, 3, 5, 8))
        }),
        ("last dim strided (copied)", vec![2, 3, 8, 5], |x| {
            x.transpose(2, 3)
        }),
    ];
    for &dt in &DTYPES {
        for style in STYLES {
            for (name, base, view) in &views {
                let xb = randn(base, 1.0, dt);
                let xv = view(&xb).unwrap();
                assert!(!xv.is_contiguous(), "{name}");
                let y = k().rope(&xv, &tab, &pos, RopeLayout::Bhtd, style).unwrap();
                let yc = k()
                    .rope(
                        &xv.contiguous().unwrap(),
                        &tab,
                        &pos,
                        RopeLayout::Bhtd,
                        style,
                    )
                    .unwrap();
                assert_same(name, &y, &yc);
                assert!(y.is_contiguous());
                let view = *view;
                let (t1, p1, t2, p2) = (tab.clone(), pos.clone(), tab.clone(), pos.clone());
                let f = move |a: &[Tensor]| -> Result<Vec<Tensor>> {
                    Ok(vec![k().rope(
                        &view(&a[0])?,
                        &t1,
                        &p1,
                        RopeLayout::Bhtd,
                        style,
                    )?])
                };
                let r = move |a: &[Tensor]| -> Result<Vec<Tensor>> {
                    Ok(vec![reference::rope(
                        &view(&a[0])?,
                        t2.cos(),
                        t2.sin(),
                        &p2,
                        RopeLayout::Bhtd,
                        style,
                    )?])
                };
                let probe = randn(xv.dims(), 1.0, dt);
                let both = run_both(&f, &r, &[xb], &[true], std::slice::from_ref(&probe));
                // Candle sums the broadcast view's gradient over the heads in dt: the floor of
                // that sum, from the reference gradient of the view itself.
                let r_view = refr(tab.clone(), pos.clone(), RopeLayout::Bhtd, style);
                let xv64 = f64t(&xv).contiguous().unwrap();
                let (_, gv) = fwd_bwd(&r_view, &[xv64], &[true], &[f64t(&probe)]).unwrap();
                let floor = sum_floor(gv[0].as_ref().unwrap(), &pullback(&view, base), dt);
                compare_all(name, &both, &["y"], &["x"], &[true], dt, &|_| floor);
                // A strided dy in the standalone backward.
                let dy = randn(&[2, 5, 3, 8], 1.0, dt).transpose(1, 2).unwrap();
                assert_same(
                    &format!("{name}: strided dy"),
                    &k().rope_backward(&dy, &tab, &pos, RopeLayout::Bhtd, style)
                        .unwrap(),
                    &k().rope_backward(
                        &dy.contiguous().unwrap(),
                        &tab,
                        &pos,
                        RopeLayout::Bhtd,
                        style,
                    )
                    .unwrap(),
                );
            }
        }
    }
}

#[test]
fn prelude_and_free_functions_agree() {
    let tab = table(8, 8, 16, None);
    let pos = positions(&[3], 16, DType::U32);
    let x = randn(&[1, 2, 3, 8], 1.0, DType::F32);
    let a = x
        .rope_fused(&tab, &pos, RopeLayout::Bhtd, RopeStyle::Interleaved)
        .unwrap();
    let b = ops::rope(&x, &tab, &pos, RopeLayout::Bhtd, RopeStyle::Interleaved).unwrap();
    assert_same("prelude", &a, &b);
}

// ---------------------------------------------------------------------------------------------
// Property tests: random shapes (1, odd, primes), rotary dims, layouts, styles, dtypes and
// positions, from a seed that is part of the case (a failure reproduces from its seed).

mod props {
    use super::*;
    use proptest::prelude::*;

    fn config() -> ProptestConfig {
        ProptestConfig {
            cases: 200,
            failure_persistence: None,
            max_shrink_iters: 100,
            ..ProptestConfig::default()
        }
    }

    fn dtype() -> impl Strategy<Value = DType> {
        prop_oneof![
            Just(DType::F32),
            Just(DType::F64),
            Just(DType::F16),
            Just(DType::BF16)
        ]
    }

    /// (head dim, rotary dim): even rotary dims up to the head dim, odd head dims.
    fn dims_rot() -> impl Strategy<Value = (usize, usize)> {
        prop_oneof![
            Just(2usize),
            Just(3),
            Just(7),
            Just(8),
            Just(13),
            Just(64),
            Just(67),
            Just(128),
            2usize..40
        ]
        .prop_flat_map(|d| (Just(d), 1usize..=d / 2).prop_map(|(d, h)| (d, 2 * h)))
    }

    proptest! {
        #![proptest_config(config())]

        #[test]
        fn rope_matches_reference(
            b in 1usize..=3, h in prop_oneof![Just(1usize), Just(2), Just(3), Just(5), Just(7)],
            t in prop_oneof![Just(1usize), Just(2), Just(5), Just(11), Just(31)],
            (d, rot) in dims_rot(), dt in dtype(), seed in any::<u64>(),
            bhtd in any::<bool>(), half in any::<bool>(), per_row in any::<bool>(), wide in any::<bool>(),
        ) {
            let layout = if bhtd { RopeLayout::Bhtd } else { RopeLayout::Bthd };
            let style = if half { RopeStyle::HalfSplit } else { RopeStyle::Interleaved };
            let mut rng = SeededRng::new(seed);
            let maxp = 97;
            let tab = table(d, rot, maxp, None);
            let pshape = if per_row { vec![b, t] } else { vec![t] };
            let pos = rng.rand(&pshape, 0.0, maxp as f64, DType::F64).floor().unwrap()
                .to_dtype(if wide { DType::I64 } else { DType::U32 }).unwrap();
            let x = rng.randn(&dims(layout, b, h, t, d), 1.0, dt);
            let probe = rng.randn(x.dims(), 1.0, dt);
            let f = fused(tab.clone(), pos.clone(), layout, style);
            let r = refr(tab, pos, layout, style);
            let both = run_both(&f, &r, &[x], &[true], std::slice::from_ref(&probe));
            let ctx = format!("seed {seed}: rope {layout:?} {style:?} {:?} rot {rot} {dt:?}", [b, h, t, d]);
            compare_all(&ctx, &both, &["y"], &["x"], &[true], dt, &|_| 0.0);
        }
    }
}
