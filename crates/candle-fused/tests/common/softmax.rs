//! Softmax helpers: the backward formula in f64, the gradient checks with their floors, and
//! the masked-softmax comparison.

use candle_core::{DType, Result, Tensor, D};
use candle_fused::ops;
use candle_fused_testkit::{reference, testing};

use super::*;

/// The f64 softmax backward from its definition, `scale · y ⊙ (dy − ⟨dy, y⟩)`.
pub fn softmax_bwd64(y: &Tensor, dy: &Tensor, scale: f64) -> Tensor {
    let (y, dy) = (f64t(y), f64t(dy));
    let dot = (&y * &dy).unwrap().sum_keepdim(D::Minus1).unwrap();
    (y * dy.broadcast_sub(&dot).unwrap())
        .unwrap()
        .affine(scale, 0.0)
        .unwrap()
}

/// `|scale|·u·|y| ⊙ (|dy − ⟨dy, y⟩| + Σ|y dy|)` with `u = 2^-53`: how far two f64
/// evaluations of the softmax backward may differ (the subtraction `dy − ⟨dy, y⟩` cancels for
/// nearly one-hot rows). Non-negative, so it can be summed like the gradient.
pub fn softmax_bwd64_noise(y: &Tensor, dy: &Tensor, scale: f64) -> Tensor {
    let (y, dy) = (f64t(y), f64t(dy));
    let dot = (&y * &dy).unwrap().sum_keepdim(D::Minus1).unwrap();
    let absdot = (&y * &dy)
        .unwrap()
        .abs()
        .unwrap()
        .sum_keepdim(D::Minus1)
        .unwrap();
    let diff = dy.broadcast_sub(&dot).unwrap().abs().unwrap();
    (y.abs().unwrap() * diff.broadcast_add(&absdot).unwrap())
        .unwrap()
        .affine(scale.abs() * f64::EPSILON / 2.0, 0.0)
        .unwrap()
}

/// Checks a softmax gradient `got` (of `x`: `scale` = the op's scale; of a mask: `scale` = 1,
/// summed to the mask's shape by `reduce`) against `reference` (the f64 autograd through the
/// composed ops), for a forward that gave `y` (ours) and `y_ref` (the f64 reference) and the
/// output gradient `dy`. Two checks:
///
/// 1. The backward kernel on its actual inputs: `got` against the exact formula
///    `scale·y⊙(dy − ⟨dy, y⟩)` evaluated in f64 on *our* `y` and `dy`, at the dtype's
///    tolerance (floor: the f64 evaluation noise of that formula, see
///    [`softmax_bwd64_noise`], only ever visible for f64 and nearly one-hot rows).
/// 2. End to end against the reference, with the floor of what any backward that reads the
///    forward's output must inherit: twice the change of the exact backward when `y_ref` is
///    replaced by our `y` and by `y_ref` rounded to `dt` (the forward itself is checked at
///    the dtype's tolerance separately). For nearly one-hot rows `dy − ⟨dy, y⟩` cancels and
///    this floor grows; check 1 stays tight there.
#[allow(clippy::too_many_arguments)]
pub fn check_softmax_grad(
    ctx: &str,
    got: &Tensor,
    reference: &Tensor,
    y: &Tensor,
    y_ref: &Tensor,
    dy: &Tensor,
    scale: f64,
    dt: DType,
    reduce: &dyn Fn(&Tensor) -> Tensor,
) {
    let exact = reduce(&softmax_bwd64(y_ref, dy, scale));
    let full_ours = softmax_bwd64(y, dy, scale);
    let on_ours = reduce(&full_ours);
    let rounded = reduce(&softmax_bwd64(&y_ref.to_dtype(dt).unwrap(), dy, scale));
    let noise = reduce(&softmax_bwd64_noise(y_ref, dy, scale));
    let norm = |t: &Tensor| -> f64 { vec64(t).iter().map(|v| v * v).sum::<f64>().sqrt() };
    let cond = 8.0 * norm(&noise) / norm(&exact).max(f64::MIN_POSITIVE);
    // The op hands Candle the full-shape gradient in `dt` and Candle's autograd sums it over
    // the broadcast dims in `dt` (Candle's CPU sum accumulates in the storage type). Rounding
    // each of the n summed terms and each partial sum costs at most n·u·Σ|terms| per element
    // (u: unit roundoff of dt), times 2. For a plain input (n = 1) this is 2u, below the
    // dtype's tolerance; for a broadcast mask in bf16 whose sum cancels it can exceed 1e-2 (a
    // limit of returning the gradient through Candle's broadcast backward, not of the kernel).
    let storage = sum_floor(&full_ours, reduce, dt);
    assert_close_floor(
        &format!("{ctx} (vs the formula on our y)"),
        got,
        &on_ours,
        dt,
        cond.max(storage),
    );
    let inherited = 2.0
        * (testing::rel_err(&on_ours, &exact).unwrap()
            + testing::rel_err(&rounded, &exact).unwrap())
        + cond
        + storage;
    assert_close_floor(ctx, got, reference, dt, inherited);
}

/// Compares a softmax run by [`run_both`]: the forward at the dtype's tolerance, and the
/// gradient of every input marked in `diff` with [`check_softmax_grad`]; input `k` enters the
/// op with scale `scales[k]` (x: the op's scale; an additive mask: 1) and `reduce[k]` maps a
/// gradient of the op's (full-shape) operand to that input (sum over broadcast dims, undoing
/// a view, ...).
#[allow(clippy::too_many_arguments)]
pub fn compare_softmax(
    ctx: &str,
    both: &Both,
    probe: &Tensor,
    names: &[&str],
    diff: &[bool],
    scales: &[f64],
    dt: DType,
    reduce: &[&dyn Fn(&Tensor) -> Tensor],
) {
    let (o, ro, g, rg) = both;
    assert_eq!(o[0].dtype(), dt, "{ctx}: output dtype");
    assert_close(&format!("{ctx}: forward"), &o[0], &ro[0], dt);
    for k in 0..diff.len() {
        if !diff[k] {
            continue;
        }
        let (a, b) = grad_pair(ctx, names[k], &g[k], &rg[k]);
        check_softmax_grad(
            &format!("{ctx}: d{}", names[k]),
            a,
            b,
            &o[0],
            &ro[0],
            probe,
            scales[k],
            dt,
            reduce[k],
        );
    }
}

/// Sums a full-shape tensor down to a broadcast `shape` (the inverse of `broadcast_as`).
pub fn sum_to(t: &Tensor, shape: &[usize]) -> Tensor {
    let mut t = t.clone();
    while t.rank() > shape.len() {
        t = t.sum(0).unwrap();
    }
    for (i, &d) in shape.iter().enumerate() {
        if d == 1 && t.dim(i).unwrap() != 1 {
            t = t.sum_keepdim(i).unwrap();
        }
    }
    t
}

/// Masked softmax: forward, dx and (when `learned`) dmask against the f64 reference and the
/// backward formula on our forward's output (see [`check_softmax_grad`]), for the output
/// gradient `probe`.
#[allow(clippy::too_many_arguments)]
pub fn check_masked_softmax(
    ctx: &str,
    x: &Tensor,
    mask: Option<&Tensor>,
    learned: bool,
    scale: f64,
    causal: bool,
    dt: DType,
    probe: &Tensor,
) {
    let f = move |a: &[Tensor]| -> Result<Vec<Tensor>> {
        Ok(vec![ops::masked_softmax(&a[0], scale, a.get(1), causal)?])
    };
    let r = move |a: &[Tensor]| -> Result<Vec<Tensor>> {
        Ok(vec![reference::masked_softmax(
            &a[0],
            scale,
            a.get(1),
            causal,
        )?])
    };
    let mut inputs = vec![x.clone()];
    let mut diff = vec![true];
    if let Some(m) = mask {
        inputs.push(m.clone());
        diff.push(learned);
    }
    let both = run_both(&f, &r, &inputs, &diff, std::slice::from_ref(probe));
    assert!(
        vec64(&both.0[0]).iter().all(|v| v.is_finite()),
        "{ctx}: non-finite output without NaN/inf input"
    );
    if let (Some(m), true) = (mask, learned) {
        if m.dim(D::Minus1).unwrap() == 1 {
            // A per-row mask shifts a whole row: its exact gradient is 0.
            assert_zero_mask_grad(
                ctx,
                both.2[1].as_ref().unwrap(),
                &both.0[0],
                probe,
                m.dims(),
                dt,
            );
            diff[1] = false;
        }
    }
    if scale == 0.0 {
        // The output ignores x: dx is exactly 0 (Candle's autograd has no gradient for it).
        let dx = both.2[0].as_ref().expect("dx");
        assert!(vec64(dx).iter().all(|&v| v == 0.0), "{ctx}: dx != 0");
        diff[0] = false;
    }
    let mdims = mask.map(|m| m.dims().to_vec()).unwrap_or_default();
    let to_mask = move |t: &Tensor| sum_to(t, &mdims);
    compare_softmax(
        ctx,
        &both,
        probe,
        &["x", "mask"],
        &diff,
        &[scale, 1.0],
        dt,
        &[&identity, &to_mask],
    );
}

/// A mask whose last dim is 1 adds the same value to a whole row, which softmax ignores: its
/// exact gradient `Σ_j g_j` is 0, so a relative error means nothing. On our forward's output
/// `y` (rounded, so `Σ y` is 1 only to the dtype's precision) the formula gives
/// `⟨dy, y⟩ (1 − Σ y)`; `dm` must match that up to the rounding of the `n` terms Candle sums
/// into each element (`2(n+1)·u·Σ|g_j|`), plus 8× the f64 evaluation noise of those terms
/// ([`softmax_bwd64_noise`], summed alike): `g_j = y_j (dy_j − ⟨dy, y⟩)` cancels, so each term
/// carries an error of its operands' size, not of its own (seed 10094423093461037144: f64, a
/// [1, 4, 1] mask, off by 1.1e-16 against a 8.1e-17 bound without it).
pub fn assert_zero_mask_grad(
    ctx: &str,
    dm: &Tensor,
    y: &Tensor,
    probe: &Tensor,
    ms: &[usize],
    dt: DType,
) {
    assert_eq!(dm.dims(), ms, "{ctx}: dmask shape");
    let full = softmax_bwd64(y, probe, 1.0);
    let on_ours = vec64(&sum_to(&full, ms));
    let abs = vec64(&sum_to(&full.abs().unwrap(), ms));
    let noise = vec64(&sum_to(&softmax_bwd64_noise(y, probe, 1.0), ms));
    let n = (full.elem_count() / on_ours.len().max(1)) as f64;
    let k = 2.0 * (n + 1.0) * unit_roundoff(dt);
    // Terms in f16's subnormal range round with an absolute error up to half its smallest
    // subnormal (2^-25), whatever their size.
    let eta = 2.0 * (n + 1.0) * subnormal_half_step(dt);
    for (i, (((got, want), a), e)) in vec64(dm)
        .iter()
        .zip(&on_ours)
        .zip(&abs)
        .zip(&noise)
        .enumerate()
    {
        let bound = k * a + eta + 8.0 * e;
        assert!(
            (got - want).abs() <= bound,
            "{ctx}: per-row mask gradient [{i}] = {got:.3e}, expected {want:.3e} (≈ 0) \
             within {bound:.1e}"
        );
    }
}
