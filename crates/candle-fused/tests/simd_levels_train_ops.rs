//! The training ops' CPU kernels (RoPE, SwiGLU / GeGLU from two tensors and packed,
//! cross-entropy with label smoothing and ignored rows; forward and backward through autograd)
//! at every SIMD level this CPU has (`KernelConfig.cpu.simd` forced), against the f64
//! reference, as `simd_levels.rs` does for the row ops: how the AVX2 and scalar builds of
//! these kernels run on an AVX-512 machine.

mod common;

use candle_core::{DType, Device, Result, Tensor, Var};
use candle_fused::config::CpuConfig;
use candle_fused::ops::{
    CrossEntropyConfig, GluKind, RopeConfig, RopeLayout, RopeStyle, RopeTable,
};
use candle_fused::{KernelConfig, Kernels, SimdLevel};
use candle_fused_testkit::{reference, testing};
use common::*;

fn kernels(level: SimdLevel) -> Kernels {
    Kernels::new(KernelConfig {
        poison: true,
        cpu: CpuConfig {
            simd: level,
            ..CpuConfig::default()
        },
        ..KernelConfig::default()
    })
}

fn levels() -> Vec<SimdLevel> {
    let l = SimdLevel::available();
    eprintln!("SIMD levels on this CPU: {l:?}");
    assert!(l.contains(&SimdLevel::Scalar));
    l
}

const NO_FLOOR: &dyn Fn(usize) -> f64 = &|_| 0.0;

#[test]
fn rope_at_every_level() {
    // Head dims with vector tails (rotary halves of 3, 8 and 33), a partial rotary dim, both
    // layouts and styles; the last shape takes the parallel path.
    let cases: &[([usize; 4], usize, usize)] = &[
        ([1, 2, 3, 6], 6, 6),
        ([2, 3, 5, 16], 16, 12),
        ([1, 4, 7, 66], 66, 66),
        ([2, 8, 128, 64], 64, 64),
    ];
    for level in levels() {
        let k = kernels(level);
        for &dt in &DTYPES {
            for &(shape, d, rot) in cases {
                for layout in [RopeLayout::Bhtd, RopeLayout::Bthd] {
                    for style in [RopeStyle::HalfSplit, RopeStyle::Interleaved] {
                        let ctx =
                            format!("{level:?} rope {shape:?} r{rot} {layout:?} {style:?} {dt:?}");
                        let cfg = RopeConfig {
                            rotary_dim: rot,
                            ..RopeConfig::new(d, 10_000.0, 512)
                        };
                        let tab = RopeTable::new(&cfg, &Device::Cpu).unwrap();
                        let t = match layout {
                            RopeLayout::Bhtd => shape[2],
                            RopeLayout::Bthd => shape[1],
                        };
                        let pos = rand(&[t], 0.0, 512.0, DType::F64)
                            .floor()
                            .and_then(|p| p.to_dtype(DType::U32))
                            .unwrap();
                        let x = randn(&shape, 1.0, dt);
                        let probe = randn(&shape, 1.0, dt);
                        let f = |a: &[Tensor]| -> Result<Vec<Tensor>> {
                            Ok(vec![k.rope(&a[0], &tab, &pos, layout, style)?])
                        };
                        let r = |a: &[Tensor]| -> Result<Vec<Tensor>> {
                            Ok(vec![reference::rope(
                                &a[0],
                                tab.cos(),
                                tab.sin(),
                                &pos,
                                layout,
                                style,
                            )?])
                        };
                        let both = run_both(&f, &r, &[x], &[true], std::slice::from_ref(&probe));
                        compare_all(&ctx, &both, &["y"], &["x"], &[true], dt, NO_FLOOR);
                    }
                }
            }
        }
    }
}

#[test]
fn glu_at_every_level() {
    let shapes: &[&[usize]] = &[&[1], &[3, 17], &[2, 3, 100], &[64, 4097]];
    for level in levels() {
        let k = kernels(level);
        for &dt in &DTYPES {
            for shape in shapes {
                for kind in [GluKind::SwiGlu, GluKind::GeGluTanh] {
                    let ctx = format!("{level:?} glu {kind:?} {shape:?} {dt:?}");
                    let (g, u) = (randn(shape, 2.0, dt), randn(shape, 1.0, dt));
                    let probe = randn(shape, 1.0, dt);
                    let f = |a: &[Tensor]| -> Result<Vec<Tensor>> {
                        Ok(vec![k.glu(kind, &a[0], &a[1])?])
                    };
                    let r = |a: &[Tensor]| -> Result<Vec<Tensor>> {
                        Ok(vec![reference::glu(kind, &a[0], &a[1])?])
                    };
                    let both = run_both(
                        &f,
                        &r,
                        &[g.clone(), u.clone()],
                        &[true; 2],
                        std::slice::from_ref(&probe),
                    );
                    // The gate gradient's terms cancel near its zero (glu.rs: gate_floor).
                    let fl = gate_floor(kind, &g, &u, &probe, rgrad(&both, 0));
                    let floor = |k: usize| if k == 0 { fl } else { 0.0 };
                    compare_all(&ctx, &both, &["y"], &["gate", "up"], &[true; 2], dt, &floor);

                    let mut packed = shape.to_vec();
                    *packed.last_mut().unwrap() *= 2;
                    let gu = randn(&packed, 2.0, dt);
                    let f = |a: &[Tensor]| -> Result<Vec<Tensor>> {
                        Ok(vec![k.glu_packed(kind, &a[0])?])
                    };
                    let r = |a: &[Tensor]| -> Result<Vec<Tensor>> {
                        Ok(vec![reference::glu_packed(kind, &a[0])?])
                    };
                    let both = run_both(
                        &f,
                        &r,
                        std::slice::from_ref(&gu),
                        &[true],
                        std::slice::from_ref(&probe),
                    );
                    let fl = packed_gate_floor(kind, &gu, &probe, rgrad(&both, 0));
                    let ctx = format!("{ctx} packed");
                    compare_all(&ctx, &both, &["y"], &["gate_up"], &[true], dt, &|_| fl);
                }
            }
        }
    }
}

#[test]
fn cross_entropy_at_every_level() {
    let shapes: &[(usize, usize)] = &[(1, 1), (5, 17), (7, 1000), (64, 4099)];
    let cfg = CrossEntropyConfig {
        label_smoothing: 0.1,
        ..Default::default()
    };
    for level in levels() {
        let k = kernels(level);
        for &dt in &DTYPES {
            for &(n, v) in shapes {
                let ctx = format!("{level:?} cross_entropy [{n}, {v}] {dt:?}");
                let x = randn(&[n, v], 3.0, dt);
                // Every third row ignored (-100); the rest uniform over the vocabulary.
                let t: Vec<i64> = rand(&[n], 0.0, v as f64, DType::F64)
                    .to_vec1::<f64>()
                    .unwrap()
                    .iter()
                    .enumerate()
                    .map(|(i, &f)| {
                        if i % 3 == 2 {
                            -100
                        } else {
                            (f as i64).min(v as i64 - 1)
                        }
                    })
                    .collect();
                let t = Tensor::from_vec(t, n, &Device::Cpu).unwrap();
                // The loss is an f32 scalar for every dtype: its own tolerance (loss_tol);
                // the gradient (autograd and standalone) in the logits' dtype.
                let probe = 0.75; // exact in f32 (the loss and its gradient seed are f32)
                let var = Var::from_tensor(&x).unwrap();
                let loss = k.cross_entropy(var.as_tensor(), &t, &cfg).unwrap();
                let g = (&loss * probe).unwrap().backward().unwrap();
                let g = g.get(&var).expect("a gradient for the logits").clone();
                let gs = k.cross_entropy_backward(&x, &t, &cfg, probe).unwrap();
                let v64 = Var::from_tensor(&x.to_dtype(DType::F64).unwrap()).unwrap();
                let r_loss = reference::cross_entropy(v64.as_tensor(), &t, &cfg).unwrap();
                let r_g = (&r_loss * probe).unwrap().backward().unwrap();
                let r_g = r_g.get(&v64).unwrap().clone();
                let le = testing::rel_err(&loss, &r_loss).unwrap();
                assert!(le <= loss_tol(dt), "{ctx}: loss relative error {le:.3e}");
                assert_close(&format!("{ctx}: dlogits (autograd)"), &g, &r_g, dt);
                assert_close(&format!("{ctx}: dlogits (standalone)"), &gs, &r_g, dt);
            }
        }
    }
}
