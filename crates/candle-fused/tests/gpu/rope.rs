//! GPU checks of RoPE (module of the GPU test target `tests/gpu.rs`, `cuda` feature). Each
//! `pub fn` panics with a readable message on failure and prints one line per comparison.
//!
//! - [`sweep_and_bench_shapes`]: the RoPE cases of `check::sweep` (head dims 2 to 130, partial
//!   rotary dims, both layouts, styles and position kinds) and the bench shapes
//!   (`[1, 32, 4096, 128]`, Qwen2.5-0.5B's `[4, 14, 2048, 64]`, `[B, T, H, D]`, interleaved),
//!   f32/f16/bf16, forward and dx vs the f64 reference and vs the CPU backend.
//! - [`misaligned_strided_and_odd`]: odd element offsets and head dims (the scalar build),
//!   strided views (the transposed projection output) vs the CPU backend and the contiguous
//!   copy; positions `[B, T]` i64.
//! - [`errors_and_stale_positions`]: f64, devices that differ, positions beyond the table
//!   (checked on the device), and positions changed in place after their check give NaN rows
//!   (never an out-of-bounds read).

use candle_core::{DType, Device, Tensor};
use candle_fused::ops::{self, RopeConfig, RopeLayout, RopeStyle, RopeTable};
use candle_fused::{KernelConfig, Kernels};
use candle_fused_testkit::check::{self, Case, OpKind};
use candle_fused_testkit::testing::{self, rel_err, tolerance};

use super::gpu;

fn k() -> Kernels {
    Kernels::new(KernelConfig::poisoned())
}

const DTYPES: [DType; 3] = [DType::F32, DType::F16, DType::BF16];

pub fn sweep_and_bench_shapes() {
    let mut cases: Vec<Case> = check::sweep(&DTYPES)
        .into_iter()
        .filter(|c| matches!(c.op, OpKind::Rope { .. }))
        .collect();
    // The bench shapes (the f64 reference of a 16.7M-element case takes seconds on the host).
    for (shape, layout, style, dtype) in [
        (
            vec![1, 32, 4096, 128],
            RopeLayout::Bhtd,
            RopeStyle::HalfSplit,
            DType::BF16,
        ),
        (
            vec![1, 32, 4096, 128],
            RopeLayout::Bhtd,
            RopeStyle::HalfSplit,
            DType::F32,
        ),
        (
            vec![4, 14, 2048, 64],
            RopeLayout::Bhtd,
            RopeStyle::HalfSplit,
            DType::BF16,
        ),
        (
            vec![1, 4096, 32, 128],
            RopeLayout::Bthd,
            RopeStyle::HalfSplit,
            DType::BF16,
        ),
        (
            vec![1, 32, 4096, 128],
            RopeLayout::Bhtd,
            RopeStyle::Interleaved,
            DType::F16,
        ),
        (
            vec![2, 3, 1000, 96],
            RopeLayout::Bthd,
            RopeStyle::Interleaved,
            DType::F32,
        ),
    ] {
        let rotary_dim = shape[3];
        let batch_positions = dtype == DType::F16;
        let op = OpKind::Rope {
            layout,
            style,
            rotary_dim,
            batch_positions,
        };
        cases.push(Case { op, shape, dtype });
    }
    super::run_cases(&cases);
}

fn table(d: usize, rot: usize, dev: &Device) -> RopeTable {
    let cfg = RopeConfig {
        rotary_dim: rot,
        ..RopeConfig::new(d, 10_000.0, 512)
    };
    RopeTable::new(&cfg, dev).unwrap()
}

pub fn misaligned_strided_and_odd() {
    let dev = gpu();
    for dt in DTYPES {
        for style in [RopeStyle::HalfSplit, RopeStyle::Interleaved] {
            for (d, rot) in [(128usize, 128usize), (130, 128), (10, 6), (64, 32)] {
                let (tg, tc) = (table(d, rot, &dev), table(d, rot, &Device::Cpu));
                // An odd element offset (the scalar build), [B, T] i64 positions.
                let n = 2 * 3 * 5 * d;
                let big = testing::randn(&[n + 1], 1.0, dt, &dev).unwrap();
                let x = big.narrow(0, 1, n).unwrap().reshape((2, 3, 5, d)).unwrap();
                let xc = x.to_device(&Device::Cpu).unwrap();
                for layout in [RopeLayout::Bhtd, RopeLayout::Bthd] {
                    // [B, T]: T is dim 2 of [2, 3, 5, d] for Bhtd, dim 1 for Bthd.
                    let t = if layout == RopeLayout::Bhtd { 5 } else { 3 };
                    let pos_c = testing::rand(&[2, t], 0.0, 512.0, DType::F64, &Device::Cpu)
                        .unwrap()
                        .floor()
                        .unwrap()
                        .to_dtype(DType::I64)
                        .unwrap();
                    let pos = pos_c.to_device(&dev).unwrap();
                    let y = k().rope(&x, &tg, &pos, layout, style).unwrap();
                    let yc = k().rope(&xc, &tc, &pos_c, layout, style).unwrap();
                    let e = rel_err(&y, &yc).unwrap();
                    assert!(
                        e <= tolerance(dt),
                        "offset 1 {dt:?} {style:?} d {d} rot {rot} {layout:?}: {e:e}"
                    );
                    let dx = k().rope_backward(&x, &tg, &pos, layout, style).unwrap();
                    let dxc = k().rope_backward(&xc, &tc, &pos_c, layout, style).unwrap();
                    assert!(
                        rel_err(&dx, &dxc).unwrap() <= tolerance(dt),
                        "bwd offset 1 {dt:?} d {d}"
                    );
                }
                // The transposed projection output [B, T, H, D] read as [B, H, T, D]: equal to
                // the contiguous copy, and to the CPU.
                let proj = testing::randn(&[2, 7, 3, d], 1.0, dt, &dev).unwrap();
                let xv = proj.transpose(1, 2).unwrap();
                let p1 = Tensor::arange(100u32, 107, &dev).unwrap();
                let y = k().rope(&xv, &tg, &p1, RopeLayout::Bhtd, style).unwrap();
                let yc = k()
                    .rope(&xv.contiguous().unwrap(), &tg, &p1, RopeLayout::Bhtd, style)
                    .unwrap();
                assert_eq!(
                    rel_err(&y, &yc).unwrap(),
                    0.0,
                    "strided vs contiguous {dt:?} d {d}"
                );
                let ycpu = k()
                    .rope(
                        &xv.to_device(&Device::Cpu).unwrap(),
                        &tc,
                        &p1.to_device(&Device::Cpu).unwrap(),
                        RopeLayout::Bhtd,
                        style,
                    )
                    .unwrap();
                assert!(
                    rel_err(&y, &ycpu).unwrap() <= tolerance(dt),
                    "strided vs cpu {dt:?} d {d}"
                );
                // θ then −θ.
                let back = k()
                    .rope_backward(&y, &tg, &p1, RopeLayout::Bhtd, style)
                    .unwrap();
                assert!(
                    rel_err(&back, &xv).unwrap() <= 2.0 * tolerance(dt),
                    "θ then −θ {dt:?} d {d}"
                );
            }
        }
    }
}

pub fn errors_and_stale_positions() {
    let dev = gpu();
    let tab = table(8, 8, &dev);
    let x = testing::randn(&[1, 2, 3, 8], 1.0, DType::F32, &dev).unwrap();
    let (l, s) = (RopeLayout::Bhtd, RopeStyle::HalfSplit);
    let pos = Tensor::new(&[0u32, 1, 2], &dev).unwrap();
    let msg = |r: candle_core::Result<Tensor>| r.unwrap_err().to_string();
    let e = msg(ops::rope(
        &x.to_dtype(DType::F64).unwrap(),
        &tab,
        &pos,
        l,
        s,
    ));
    assert!(e.contains("not supported by the CUDA kernels"), "{e}");
    let e = msg(ops::rope(&x, &table(8, 8, &Device::Cpu), &pos, l, s));
    assert!(e.contains("the table is on device"), "{e}");
    let e = msg(ops::rope(
        &x,
        &tab,
        &pos.to_device(&Device::Cpu).unwrap(),
        l,
        s,
    ));
    assert!(e.contains("positions is on device"), "{e}");
    let e = msg(ops::rope(
        &x,
        &tab,
        &Tensor::new(&[0u32, 512, 2], &dev).unwrap(),
        l,
        s,
    ));
    assert!(
        e.contains("positions hold 512") && e.contains("0..=511"),
        "{e}"
    );
    let e = msg(ops::rope(
        &x,
        &tab,
        &Tensor::new(&[0i64, -3, 2], &dev).unwrap(),
        l,
        s,
    ));
    assert!(e.contains("negative"), "{e}");
    // A positions tensor changed in place after its check (the check is cached per tensor):
    // the kernel's own bound makes that row NaN, the others stay right.
    let pos = Tensor::new(&[0u32, 1, 2], &dev).unwrap();
    let y0 = ops::rope(&x, &tab, &pos, l, s).unwrap();
    pos.slice_set(&Tensor::new(&[7000u32], &dev).unwrap(), 0, 1)
        .unwrap();
    let y = ops::rope(&x, &tab, &pos, l, s)
        .unwrap()
        .to_device(&Device::Cpu)
        .unwrap();
    let row = |t: &Tensor, i: usize| {
        t.narrow(2, i, 1)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    };
    assert!(row(&y, 1).iter().all(|v| v.is_nan()), "{:?}", row(&y, 1));
    let y0 = y0.to_device(&Device::Cpu).unwrap();
    assert_eq!(row(&y, 0), row(&y0, 0));
    assert_eq!(row(&y, 2), row(&y0, 2));
}

/// Small shapes of every RoPE variant (what compute-sanitizer runs).
pub fn sanitizer_small() {
    let mut cases = Vec::new();
    for dtype in [DType::F32, DType::BF16] {
        for (shape, layout, style, rot, bp) in [
            (
                vec![2, 3, 5, 8],
                RopeLayout::Bhtd,
                RopeStyle::HalfSplit,
                8,
                false,
            ),
            (
                vec![2, 5, 3, 10],
                RopeLayout::Bthd,
                RopeStyle::Interleaved,
                6,
                true,
            ),
            (
                vec![1, 2, 3, 130],
                RopeLayout::Bhtd,
                RopeStyle::Interleaved,
                128,
                true,
            ),
            (
                vec![1, 17, 2, 64],
                RopeLayout::Bthd,
                RopeStyle::HalfSplit,
                32,
                false,
            ),
        ] {
            let op = OpKind::Rope {
                layout,
                style,
                rotary_dim: rot,
                batch_positions: bp,
            };
            cases.push(Case { op, shape, dtype });
        }
    }
    super::run_cases(&cases);
}
