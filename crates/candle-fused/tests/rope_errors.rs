//! RoPE bad input: every wrong shape, dtype, device, position and table gives a clear error
//! naming the problem (never a panic); empty inputs give empty outputs.

mod common;

use candle_core::{DType, Result, Tensor};
use candle_fused::ops::{self, RopeConfig, RopeLayout, RopeScaling, RopeStyle, RopeTable};
use common::*;

fn err<T: std::fmt::Debug>(r: Result<T>) -> String {
    no_panic("rope bad input", || r.unwrap_err().to_string())
}

#[test]
fn bad_input_gives_clear_errors() {
    let tab = table(8, 8, 16, None);
    let x = randn(&[1, 2, 3, 8], 1.0, DType::F32);
    let pos = positions(&[3], 16, DType::U32);
    let l = RopeLayout::Bhtd;
    let s = RopeStyle::HalfSplit;
    let cases: Vec<(&str, String)> = vec![
        (
            "rank",
            err(ops::rope(
                &randn(&[2, 3, 8], 1.0, DType::F32),
                &tab,
                &pos,
                l,
                s,
            )),
        ),
        (
            "head dim",
            err(ops::rope(
                &randn(&[1, 2, 3, 6], 1.0, DType::F32),
                &tab,
                &pos,
                l,
                s,
            )),
        ),
        (
            "dtype",
            err(ops::rope(
                &x.to_dtype(DType::U32).unwrap(),
                &tab,
                &pos,
                l,
                s,
            )),
        ),
        (
            "positions",
            err(ops::rope(&x, &tab, &positions(&[4], 16, DType::U32), l, s)),
        ),
        (
            "positions",
            err(ops::rope(
                &x,
                &tab,
                &positions(&[2, 3], 16, DType::I64),
                l,
                s,
            )),
        ),
        (
            "positions",
            err(ops::rope(
                &x,
                &tab,
                &positions(&[1, 1, 3], 16, DType::I64),
                l,
                s,
            )),
        ),
        (
            "u32 or i64",
            err(ops::rope(
                &x,
                &tab,
                &pos.to_dtype(DType::F32).unwrap(),
                l,
                s,
            )),
        ),
        (
            "u32 or i64",
            err(ops::rope(&x, &tab, &pos.to_dtype(DType::U8).unwrap(), l, s)),
        ),
        (
            "outside the table",
            err(ops::rope(
                &x,
                &tab,
                &Tensor::new(&[0u32, 16, 2], &CPU).unwrap(),
                l,
                s,
            )),
        ),
        (
            "outside the table",
            err(ops::rope(
                &x,
                &tab,
                &Tensor::new(&[0i64, -1, 2], &CPU).unwrap(),
                l,
                s,
            )),
        ),
        (
            "outside the table",
            err(ops::rope_backward(
                &x,
                &tab,
                &Tensor::new(&[0u32, 99, 2], &CPU).unwrap(),
                l,
                s,
            )),
        ),
        (
            "dy",
            err(ops::rope_backward(
                &randn(&[1, 2, 8], 1.0, DType::F32),
                &tab,
                &pos,
                l,
                s,
            )),
        ),
    ];
    for (want, got) in cases {
        assert!(
            got.contains("candle-fused rope") && got.contains(want),
            "expected {want:?} in: {got}"
        );
    }
    // Table configuration.
    let bad: Vec<(&str, RopeConfig)> = vec![
        (
            "rotary_dim must be even",
            RopeConfig {
                rotary_dim: 7,
                ..RopeConfig::new(8, 1e4, 16)
            },
        ),
        (
            "rotary_dim must be even",
            RopeConfig {
                rotary_dim: 10,
                ..RopeConfig::new(8, 1e4, 16)
            },
        ),
        (
            "rotary_dim must be even",
            RopeConfig {
                rotary_dim: 0,
                ..RopeConfig::new(8, 1e4, 16)
            },
        ),
        ("theta", RopeConfig::new(8, -1.0, 16)),
        ("theta", RopeConfig::new(8, f64::NAN, 16)),
        ("max_positions", RopeConfig::new(8, 1e4, 0)),
        ("too large", RopeConfig::new(8, 1e4, 1 << 31)),
        (
            "factor",
            RopeConfig {
                scaling: Some(RopeScaling::Linear { factor: 0.0 }),
                ..RopeConfig::new(8, 1e4, 16)
            },
        ),
        (
            "rotary_dim > 2",
            RopeConfig {
                scaling: Some(RopeScaling::Dynamic {
                    factor: 2.0,
                    original_max_positions: 8,
                }),
                ..RopeConfig::new(2, 1e4, 16)
            },
        ),
        (
            "original_max_positions",
            RopeConfig {
                scaling: Some(yarn(2.0, 0)),
                ..RopeConfig::new(8, 1e4, 16)
            },
        ),
        (
            "high_freq_factor > low_freq_factor",
            RopeConfig {
                scaling: Some(RopeScaling::Llama3 {
                    factor: 8.0,
                    low_freq_factor: 4.0,
                    high_freq_factor: 1.0,
                    original_max_positions: 8,
                }),
                ..RopeConfig::new(8, 1e4, 16)
            },
        ),
    ];
    for (want, cfg) in bad {
        let got = err(RopeTable::new(&cfg, &CPU));
        assert!(
            got.contains("rope_table") && got.contains(want),
            "expected {want:?} in: {got}"
        );
    }
}

#[test]
fn empty_inputs_give_empty_outputs() {
    let tab = table(8, 8, 16, None);
    for (shape, pshape) in [
        ([0usize, 2, 3, 8], vec![3usize]),
        ([1, 0, 3, 8], vec![3]),
        ([1, 2, 0, 8], vec![0]),
        ([2, 2, 0, 8], vec![2, 0]),
    ] {
        let x = Tensor::zeros(&shape, DType::F32, &CPU).unwrap();
        let pos = Tensor::zeros(pshape.as_slice(), DType::U32, &CPU).unwrap();
        let y = ops::rope(&x, &tab, &pos, RopeLayout::Bhtd, RopeStyle::HalfSplit).unwrap();
        assert_eq!(y.dims(), &shape);
        let dx =
            ops::rope_backward(&x, &tab, &pos, RopeLayout::Bhtd, RopeStyle::HalfSplit).unwrap();
        assert_eq!(dx.dims(), &shape);
    }
}
