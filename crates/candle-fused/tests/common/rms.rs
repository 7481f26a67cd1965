//! RMSNorm helpers: the backward formula in f64 and the floors of its gradient checks.

use candle_core::{DType, Tensor, D};
use candle_fused_testkit::testing;

use super::*;

/// `(r, x̂, g)` of RMSNorm in f64: `r = 1/sqrt(mean(x²) + eps)` per row, `x̂ = x·r`,
/// `g = dy ⊙ w` (or `dy`).
fn rms_parts(x: &Tensor, w: Option<&Tensor>, dy: &Tensor, eps: f64) -> (Tensor, Tensor, Tensor) {
    let r = (x.sqr().unwrap().mean_keepdim(D::Minus1).unwrap() + eps)
        .unwrap()
        .sqrt()
        .unwrap()
        .recip()
        .unwrap();
    let xh = x.broadcast_mul(&r).unwrap();
    let g = match w {
        Some(w) => dy.broadcast_mul(&f64t(w)).unwrap(),
        None => dy.clone(),
    };
    (r, xh, g)
}

/// The RMSNorm backward from its definition, in f64: with `x̂ = x·r`, `r = 1/sqrt(mean(x²) +
/// eps)` and `g = dy ⊙ w`: `dx = r·(g − x̂·⟨g, x̂⟩/D)`, `dw = Σ_rows dy ⊙ x̂`.
pub fn rms_bwd64(x: &Tensor, w: Option<&Tensor>, dy: &Tensor, eps: f64) -> (Tensor, Tensor) {
    let (x, dy) = (f64t(x), f64t(dy));
    let d = x.dim(D::Minus1).unwrap() as f64;
    let (r, xh, g) = rms_parts(&x, w, &dy, eps);
    let c = ((&g * &xh).unwrap().sum_keepdim(D::Minus1).unwrap() / d).unwrap();
    let dx = (g - xh.broadcast_mul(&c).unwrap())
        .unwrap()
        .broadcast_mul(&r)
        .unwrap();
    let rows = x.elem_count() / x.dim(D::Minus1).unwrap();
    let dw = (dy * xh)
        .unwrap()
        .reshape((rows, d as usize))
        .unwrap()
        .sum(0)
        .unwrap();
    (dx, dw)
}

/// Floors for the RMSNorm gradients of input `x` (exact, any dtype), weight `w` and output
/// gradient `dy`, in `dt`; returns `(dx floor, dw floor)`:
///
/// * dx: `g − x̂·⟨g, x̂⟩/D` cancels when `g` is nearly parallel to `x̂` (always for D = 1 with
///   x² ≫ eps, where dx ≈ g·eps/|x|³): two f64 evaluations (ours and the reference's autograd)
///   differ by up to `u64·r·(|g| + |x̂|·Σ|g x̂|/D)` per element; 8× that, relative. Only ever
///   visible in f64.
/// * dw: `Σ_rows dy ⊙ x̂` is accumulated in f32 (f64 for f64) over the rows:
///   [`testing::sum_floor`] of its terms (the probabilistic bound of that sum's rounding,
///   which grows like the error does, so a wrong dw still fails).
pub fn rms_floors(x: &Tensor, w: Option<&Tensor>, dy: &Tensor, eps: f64, dt: DType) -> (f64, f64) {
    let norm = |t: &Tensor| -> f64 { vec64(t).iter().map(|v| v * v).sum::<f64>().sqrt() };
    let (x, dy) = (f64t(x), f64t(dy));
    let dcols = x.dim(D::Minus1).unwrap();
    let rows = x.elem_count() / dcols.max(1);
    let (dx, dw) = rms_bwd64(&x, w, &dy, eps);
    let (r, xh, g) = rms_parts(&x, w, &dy, eps);
    let gx = ((&g * &xh)
        .unwrap()
        .abs()
        .unwrap()
        .sum_keepdim(D::Minus1)
        .unwrap()
        / dcols as f64)
        .unwrap();
    let noise = (g.abs().unwrap() + xh.abs().unwrap().broadcast_mul(&gx).unwrap())
        .unwrap()
        .broadcast_mul(&r)
        .unwrap();
    let u64_ = unit_roundoff(DType::F64);
    let dx_floor = 8.0 * u64_ * norm(&noise) / norm(&dx).max(f64::MIN_POSITIVE);
    let terms = (dy * xh).unwrap().reshape((rows, dcols)).unwrap();
    let u_acc = unit_roundoff(if dt == DType::F64 {
        DType::F64
    } else {
        DType::F32
    });
    let _ = &dw;
    let dw_floor = testing::sum_floor(&terms, u_acc).unwrap();
    (dx_floor, dw_floor)
}

/// Floors for the add+RMSNorm gradients (`[dx = dresidual, dw]`): [`rms_floors`] on the exact
/// sum, plus what the backward inherits from reading the forward's `sum` output rounded to
/// `dt` (as it does, to save memory): twice the change of the exact backward when the exact
/// sum is replaced by the rounded one.
pub fn add_rms_floors(
    x: &Tensor,
    res: &Tensor,
    w: &Tensor,
    dn: &Tensor,
    ds: &Tensor,
    eps: f64,
    dt: DType,
) -> [f64; 2] {
    let s = (f64t(x) + f64t(res)).unwrap();
    let s_round = f64t(&s.to_dtype(dt).unwrap());
    let (dx_n, dw_e) = rms_bwd64(&s, Some(w), dn, eps);
    let (dx_r, dw_r) = rms_bwd64(&s_round, Some(w), dn, eps);
    let ds = f64t(ds);
    let dx_e = (&dx_n + &ds).unwrap();
    let dx_r = (dx_r + &ds).unwrap();
    let (fx, fw) = rms_floors(&s, Some(w), dn, eps, dt);
    // `fx` is relative to the RMSNorm part `dx_n`; where `d_sum` cancels it, it grows by
    // |dx_n| / |dx|. Through autograd Candle adds `d_sum` to the RMSNorm gradient after the
    // kernel has rounded that to `dt`: that rounding, amplified the same way, is the error the
    // exact add leaves (seed 6009280993392797790: one bf16 element, d_sum ≈ −9.7·w·dy, dx 0.03,
    // 4.3e-2 relative error). Zero for f32, where the rounding is f32's.
    let norm = |t: &Tensor| -> f64 { vec64(t).iter().map(|v| v * v).sum::<f64>().sqrt() };
    let amp = (norm(&dx_n) / norm(&dx_e).max(f64::MIN_POSITIVE)).max(1.0);
    let rounded_n = (f64t(&dx_n.to_dtype(dt).unwrap()) + &ds).unwrap();
    [
        2.0 * testing::rel_err(&dx_r, &dx_e).unwrap()
            + fx * amp
            + 2.0 * testing::rel_err(&rounded_n, &dx_e).unwrap(),
        2.0 * testing::rel_err(&dw_r, &dw_e).unwrap() + fw,
    ]
}
