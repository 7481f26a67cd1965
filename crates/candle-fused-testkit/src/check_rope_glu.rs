//! The RoPE and GLU cases of the correctness sweep ([`crate::check`]): their inputs, the
//! fused op (with poisoned outputs) and the reference, and the sweep's shapes. `check.rs`
//! dispatches [`OpKind::Rope`] and [`OpKind::Glu`] here.
//!
//! RoPE cases use a plain table (θ = 10⁴) of [`ROPE_POSITIONS`] rows and random positions
//! (`[T]` u32, or `[B, T]` i64 with `batch_positions`); only `x` gets a gradient. GLU cases
//! name the shape of the output (`[.., I]`): two tensors of that shape, or one packed
//! `[.., 2I]` input.

use candle_core::{DType, Device, Result, Tensor};
use candle_fused::ops::{GluKind, RopeConfig, RopeLayout, RopeStyle, RopeTable};
use candle_fused::Kernels;

use crate::check::{Case, OpKind};
use crate::reference;
use crate::rng::Rng;

/// Rows of the RoPE cases' table.
pub const ROPE_POSITIONS: usize = 4096;

/// `(names, tensors, differentiable)` of a case's inputs.
pub(crate) type Made = (Vec<&'static str>, Vec<Tensor>, Vec<bool>);

/// The shape of `x` in a RoPE case is `[B, H, T, D]` or `[B, T, H, D]` per its layout.
fn bt(layout: RopeLayout, shape: &[usize]) -> (usize, usize) {
    match layout {
        RopeLayout::Bhtd => (shape[0], shape[2]),
        RopeLayout::Bthd => (shape[0], shape[1]),
    }
}

pub(crate) fn make_inputs(case: &Case, device: &Device, rng: &mut Rng) -> Result<Made> {
    let (dt, shape) = (case.dtype, case.shape.as_slice());
    match case.op {
        OpKind::Rope {
            layout,
            batch_positions,
            ..
        } => {
            let x = rng.randn(shape, 1.0, dt, device)?;
            let (b, t) = bt(layout, shape);
            let (pshape, pdt) = if batch_positions {
                (vec![b, t], DType::I64)
            } else {
                (vec![t], DType::U32)
            };
            let pos = rng
                .rand(
                    &pshape,
                    0.0,
                    ROPE_POSITIONS as f64,
                    DType::F64,
                    &Device::Cpu,
                )?
                .floor()?
                .to_dtype(pdt)?
                .to_device(device)?;
            Ok((vec!["x", "positions"], vec![x, pos], vec![true, false]))
        }
        OpKind::Glu { packed: true, .. } => {
            let mut s = shape.to_vec();
            if let Some(last) = s.last_mut() {
                *last *= 2;
            }
            let gu = rng.randn(&s, 2.0, dt, device)?;
            Ok((vec!["gate_up"], vec![gu], vec![true]))
        }
        OpKind::Glu { packed: false, .. } => {
            let g = rng.randn(shape, 2.0, dt, device)?;
            let u = rng.randn(shape, 1.0, dt, device)?;
            Ok((vec!["gate", "up"], vec![g, u], vec![true, true]))
        }
        _ => candle_core::bail!("check_rope_glu: not a RoPE or GLU case: {:?}", case.op),
    }
}

/// The table of a RoPE case on `device`.
pub fn rope_table(head_dim: usize, rotary_dim: usize, device: &Device) -> Result<RopeTable> {
    let cfg = RopeConfig {
        rotary_dim,
        ..RopeConfig::new(head_dim, 10_000.0, ROPE_POSITIONS)
    };
    RopeTable::new(&cfg, device)
}

/// The fused op (on `k`, whose configuration the sweep poisons) or the reference on `args`
/// (see [`make_inputs`]).
pub(crate) fn apply(k: &Kernels, op: OpKind, args: &[Tensor], fused: bool) -> Result<Vec<Tensor>> {
    Ok(match op {
        OpKind::Rope {
            layout,
            style,
            rotary_dim,
            ..
        } => {
            let (x, pos) = (&args[0], &args[1]);
            let d = x.dim(3)?;
            let tab = rope_table(d, rotary_dim, x.device())?;
            if fused {
                vec![k.rope(x, &tab, pos, layout, style)?]
            } else {
                vec![reference::rope(
                    x,
                    tab.cos(),
                    tab.sin(),
                    pos,
                    layout,
                    style,
                )?]
            }
        }
        OpKind::Glu { kind, packed: true } => vec![if fused {
            k.glu_packed(kind, &args[0])?
        } else {
            reference::glu_packed(kind, &args[0])?
        }],
        OpKind::Glu {
            kind,
            packed: false,
        } => vec![if fused {
            k.glu(kind, &args[0], &args[1])?
        } else {
            reference::glu(kind, &args[0], &args[1])?
        }],
        _ => candle_core::bail!("check_rope_glu: not a RoPE or GLU case: {op:?}"),
    })
}

pub(crate) fn name(op: OpKind) -> String {
    match op {
        OpKind::Rope {
            layout,
            style,
            rotary_dim,
            batch_positions,
        } => format!(
            "rope({},{},r{rotary_dim},pos{})",
            match layout {
                RopeLayout::Bhtd => "bhtd",
                RopeLayout::Bthd => "bthd",
            },
            match style {
                RopeStyle::HalfSplit => "half",
                RopeStyle::Interleaved => "inter",
            },
            if batch_positions { "[B,T]" } else { "[T]" }
        ),
        OpKind::Glu { kind, packed } => format!(
            "{}{}",
            match kind {
                GluKind::SwiGlu => "swiglu",
                GluKind::GeGluTanh => "geglu",
            },
            if packed { "(packed)" } else { "" }
        ),
        _ => format!("{op:?}"),
    }
}

/// The sweep's RoPE and GLU cases for `dtype`: RoPE with head dims 2 to 130 (partial rotary
/// dims, odd T, a head dim that takes the scalar path), both layouts and styles, both
/// position kinds; GLU of both kinds and layouts, last dims 1 to 65536.
pub fn sweep(dtype: DType) -> Vec<Case> {
    let mut cases = Vec::new();
    let rope_shapes: [([usize; 4], usize); 6] = [
        ([1, 1, 1, 2], 2),
        ([2, 3, 5, 8], 8),
        ([1, 4, 17, 64], 64),
        ([2, 2, 9, 10], 6),
        ([1, 2, 33, 128], 128),
        ([3, 2, 7, 130], 128),
    ];
    for (i, (bhtd, rot)) in rope_shapes.into_iter().enumerate() {
        for layout in [RopeLayout::Bhtd, RopeLayout::Bthd] {
            for style in [RopeStyle::HalfSplit, RopeStyle::Interleaved] {
                let [b, h, t, d] = bhtd;
                let shape = match layout {
                    RopeLayout::Bhtd => vec![b, h, t, d],
                    RopeLayout::Bthd => vec![b, t, h, d],
                };
                let op = OpKind::Rope {
                    layout,
                    style,
                    rotary_dim: rot,
                    batch_positions: (i + (style == RopeStyle::Interleaved) as usize) % 2 == 1,
                };
                cases.push(Case { op, shape, dtype });
            }
        }
    }
    let glu_shapes: [&[usize]; 6] = [
        &[1],
        &[3, 1],
        &[4, 7],
        &[2, 3, 1000],
        &[5, 4097],
        &[2, 65536],
    ];
    for shape in glu_shapes {
        for kind in [GluKind::SwiGlu, GluKind::GeGluTanh] {
            for packed in [false, true] {
                cases.push(Case {
                    op: OpKind::Glu { kind, packed },
                    shape: shape.to_vec(),
                    dtype,
                });
            }
        }
    }
    cases
}
