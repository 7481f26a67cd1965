//! The GLU gate gradient's floor where its two terms cancel (shared by `glu.rs` and
//! `simd_levels_train_ops.rs`).

use candle_core::{DType, Tensor, D};
use candle_fused::ops::GluKind;
use candle_fused_testkit::asserts::{vec64, Both};
use candle_fused_testkit::testing::{self, unit_roundoff};

/// The floor of the gate gradient where its two terms cancel: `d(g·σ(z(g)))/dg = s + g·s·(1 − s)·z'`
/// crosses zero (GeGLU near g ≈ −0.75), so an element there keeps the absolute error of terms of
/// size `|dy·u|·(s + |g·s·(1 − s)·z'|)`: a few roundings of the f32 (f64) arithmetic that makes
/// them (the vector `exp`, the division: 8 unit roundoffs allowed), relative to the largest
/// reference gradient `reference` (which holds the gate gradient, or the packed `[.., 2I]` one).
pub fn gate_floor(kind: GluKind, g: &Tensor, u: &Tensor, dy: &Tensor, reference: &Tensor) -> f64 {
    const K2: f64 = 2.0 * 0.797_884_560_802_865_4;
    const C: f64 = 0.044_715;
    let acc = if g.dtype() == DType::F64 {
        DType::F64
    } else {
        DType::F32
    };
    let (g, u, dy) = (vec64(g), vec64(u), vec64(dy));
    let mag = g
        .iter()
        .zip(&u)
        .zip(&dy)
        .map(|((&g, &u), &d)| {
            let (z, dz) = match kind {
                GluKind::SwiGlu => (g, 1.0),
                GluKind::GeGluTanh => (K2 * (g + C * g * g * g), K2 * (1.0 + 3.0 * C * g * g)),
            };
            let s = 1.0 / (1.0 + (-z).exp());
            (d * u).abs() * (s + (g * s * (1.0 - s) * dz).abs())
        })
        .fold(0f64, f64::max);
    let max_ref = testing::max_abs(reference).unwrap();
    if max_ref == 0.0 || !mag.is_finite() {
        return 0.0;
    }
    8.0 * unit_roundoff(acc) * mag / max_ref
}

/// [`gate_floor`] for the packed layout: the gate and up halves of `gu`.
pub fn packed_gate_floor(kind: GluKind, gu: &Tensor, dy: &Tensor, reference: &Tensor) -> f64 {
    let i = gu.dim(D::Minus1).unwrap() / 2;
    let g = gu.narrow(D::Minus1, 0, i).unwrap();
    let u = gu.narrow(D::Minus1, i, i).unwrap();
    gate_floor(kind, &g, &u, dy, reference)
}

/// The reference gradient `k` of a `run_both` result.
pub fn rgrad(both: &Both, k: usize) -> &Tensor {
    both.3[k].as_ref().expect("a reference gradient")
}
