//! Helpers shared by the test suites: inputs, forward + backward through Candle's autograd,
//! comparison with the f64 reference, naive scalar implementations for the semantic tests,
//! and a seeded generator for the property tests.
//!
//! Every comparison is against a value computed independently of the fused kernels: the
//! composed Candle ops of `candle_fused::reference` in f64 on upcast copies of the same rounded
//! inputs (differentiated by Candle's autograd), central finite differences, or the plain
//! scalar loops below.
#![allow(dead_code)]

use candle_core::{DType, Device, Result, Tensor, Var, D};
use candle_fused::{ops, reference, testing};

pub const DTYPES: [DType; 4] = [DType::F32, DType::F64, DType::F16, DType::BF16];
pub const HALF: [DType; 2] = [DType::F16, DType::BF16];
pub const CPU: Device = Device::Cpu;

/// A strided view of a tensor (transpose, narrow, broadcast, ...).
pub type View = fn(&Tensor) -> Result<Tensor>;

/// A strided-input case: name, first base shape and its view, second base shape and its view.
pub type ViewCase = (&'static str, Vec<usize>, View, Vec<usize>, View);

/// An op under test: inputs in, every output out.
pub type OpFn<'a> = &'a dyn Fn(&[Tensor]) -> Result<Vec<Tensor>>;

/// Fresh `N(0, std²)` values (Candle's CPU RNG is seeded from the OS: every run differs).
pub fn randn(shape: &[usize], std: f64, dt: DType) -> Tensor {
    testing::randn(shape, std, dt, &CPU).unwrap()
}

/// Fresh uniform values in `[lo, hi)`.
pub fn rand(shape: &[usize], lo: f64, hi: f64, dt: DType) -> Tensor {
    testing::rand(shape, lo, hi, dt, &CPU).unwrap()
}

/// An additive mask: `N(0, 1)` values, each hidden (`-inf`) with probability `p_hide`.
pub fn mask(shape: &[usize], p_hide: f64, dt: DType) -> Tensor {
    let vals = randn(shape, 1.0, DType::F64);
    let hide = rand(shape, 0.0, 1.0, DType::F64).lt(p_hide).unwrap();
    let neg = Tensor::full(f64::NEG_INFINITY, shape, &CPU).unwrap();
    hide.where_cond(&neg, &vals).unwrap().to_dtype(dt).unwrap()
}

pub fn f64t(t: &Tensor) -> Tensor {
    t.to_dtype(DType::F64).unwrap()
}

pub fn vec64(t: &Tensor) -> Vec<f64> {
    f64t(t).flatten_all().unwrap().to_vec1::<f64>().unwrap()
}

/// Unit roundoff (half an ulp of 1) of a float dtype.
pub fn unit_roundoff(dt: DType) -> f64 {
    match dt {
        DType::F64 => f64::EPSILON / 2.0,
        DType::F32 => f32::EPSILON as f64 / 2.0,
        DType::F16 => 2f64.powi(-11),
        DType::BF16 => 2f64.powi(-8),
        d => panic!("not a float dtype: {d:?}"),
    }
}

/// Half the smallest subnormal of a float dtype: the largest absolute rounding error of a
/// value in the subnormal range.
pub fn subnormal_half_step(dt: DType) -> f64 {
    match dt {
        DType::F64 => 2f64.powi(-1075),
        DType::F32 => 2f64.powi(-150),
        DType::F16 => 2f64.powi(-25),
        DType::BF16 => 2f64.powi(-134),
        d => panic!("not a float dtype: {d:?}"),
    }
}

pub fn tol(dt: DType) -> f64 {
    testing::tolerance(dt)
}

/// The relative error of the reference itself once rounded to `dt`: what the dtype cannot
/// represent. It exceeds [`tol`] only where the values fall into f16's subnormal range.
pub fn rounding_floor(reference: &Tensor, dt: DType) -> f64 {
    testing::rel_err(&reference.to_dtype(dt).unwrap(), reference).unwrap()
}

/// Asserts `rel_err(out, reference) <= max(tol(dt), 2·rounding_floor, extra_floor)`.
///
/// The floors are the project's rule (as in `candle_fused::check`): a kernel cannot beat the
/// dtype's own rounding of the exact result. `extra_floor` is for an error that is inherent to
/// the op's design and is computed by the caller (e.g. the softmax backward reads the forward's
/// output `y`, rounded to the dtype); callers say why where they pass one.
pub fn assert_close_floor(what: &str, out: &Tensor, reference: &Tensor, dt: DType, extra: f64) {
    let err = testing::rel_err(out, reference).unwrap();
    let floor = rounding_floor(reference, dt);
    let t = tol(dt).max(2.0 * floor).max(extra);
    assert!(
        err <= t,
        "{what} ({dt:?}, shape {:?}): relative error {err:.3e} > tolerance {t:.1e} \
         (dtype tol {:.0e}, rounding floor {floor:.1e}, extra floor {extra:.1e}); \
         max |ref| {:.3e}",
        reference.dims(),
        tol(dt),
        testing::max_abs(reference).unwrap_or(f64::NAN),
    );
}

pub fn assert_close(what: &str, out: &Tensor, reference: &Tensor, dt: DType) {
    assert_close_floor(what, out, reference, dt, 0.0)
}

/// Asserts `rel_err(out, reference) <= tol` with an explicit tolerance.
pub fn assert_close_tol(what: &str, out: &Tensor, reference: &Tensor, tol: f64) {
    let err = testing::rel_err(out, reference).unwrap();
    assert!(
        err <= tol,
        "{what} (shape {:?}): relative error {err:.3e} > tolerance {tol:.1e}",
        reference.dims()
    );
}

/// Asserts that two tensors are equal element by element, NaN matching NaN (same dtype).
pub fn assert_same(what: &str, a: &Tensor, b: &Tensor) {
    assert_eq!(a.dims(), b.dims(), "{what}: shapes differ");
    assert_eq!(a.dtype(), b.dtype(), "{what}: dtypes differ");
    let (va, vb) = (vec64(a), vec64(b));
    for (i, (x, y)) in va.iter().zip(&vb).enumerate() {
        assert!(
            x.to_bits() == y.to_bits() || (x.is_nan() && y.is_nan()),
            "{what}: element {i} differs: {x} vs {y}"
        );
    }
}

/// Runs `f` on `inputs` (those marked in `diff` as tracked `Var`s), backpropagates the loss
/// `Σ_k out_k ⊙ probe_k` and returns the outputs and the gradient of each tracked input. The
/// gradient of the loss with respect to `out_k` is exactly `probe_k`, in any dtype.
pub fn fwd_bwd(
    f: OpFn,
    inputs: &[Tensor],
    diff: &[bool],
    probes: &[Tensor],
) -> Result<(Vec<Tensor>, Vec<Option<Tensor>>)> {
    let vars: Vec<Option<Var>> = inputs
        .iter()
        .zip(diff)
        .map(|(t, &d)| {
            if d {
                Var::from_tensor(t).map(Some)
            } else {
                Ok(None)
            }
        })
        .collect::<Result<_>>()?;
    let args: Vec<Tensor> = inputs
        .iter()
        .zip(&vars)
        .map(|(t, v)| {
            v.as_ref()
                .map_or_else(|| t.clone(), |v| v.as_tensor().clone())
        })
        .collect();
    let outs = f(&args)?;
    let mut loss: Option<Tensor> = None;
    for (o, p) in outs.iter().zip(probes) {
        let term = (o * p)?.sum_all()?;
        loss = Some(match loss {
            None => term,
            Some(l) => (l + term)?,
        });
    }
    let grads = loss.expect("at least one probed output").backward()?;
    let g = vars
        .iter()
        .map(|v| v.as_ref().and_then(|v| grads.get(v).cloned()))
        .collect();
    Ok((outs, g))
}

/// The fused op and the reference op, forward and backward on the same inputs: the fused one
/// on `inputs` (in their dtype), the reference on f64 copies of them. Returns
/// `(fused outs, ref outs, fused grads, ref grads)`.
pub type Both = (
    Vec<Tensor>,
    Vec<Tensor>,
    Vec<Option<Tensor>>,
    Vec<Option<Tensor>>,
);

pub fn run_both(
    fused: OpFn,
    reference: OpFn,
    inputs: &[Tensor],
    diff: &[bool],
    probes: &[Tensor],
) -> Both {
    let (o, g) = fwd_bwd(fused, inputs, diff, probes).unwrap();
    let in64: Vec<Tensor> = inputs.iter().map(f64t).collect();
    let p64: Vec<Tensor> = probes.iter().map(f64t).collect();
    let (ro, rg) = fwd_bwd(reference, &in64, diff, &p64).unwrap();
    (o, ro, g, rg)
}

/// Compares everything [`run_both`] returns: outputs (named `out_names`) and the gradient of
/// every input marked in `diff` (named `in_names`), which must exist on both sides.
/// `grad_floor(k)` is an extra floor for the gradient of input `k` (see
/// [`assert_close_floor`]).
#[allow(clippy::too_many_arguments)]
pub fn compare_all(
    ctx: &str,
    both: &Both,
    out_names: &[&str],
    in_names: &[&str],
    diff: &[bool],
    dt: DType,
    grad_floor: &dyn Fn(usize) -> f64,
) {
    let (o, ro, g, rg) = both;
    assert_eq!(o.len(), ro.len());
    for (k, (a, b)) in o.iter().zip(ro).enumerate() {
        assert_eq!(
            a.dtype(),
            dt,
            "{ctx}: output {} has the wrong dtype",
            out_names[k]
        );
        assert_close(&format!("{ctx}: forward {}", out_names[k]), a, b, dt);
    }
    for k in 0..diff.len() {
        if !diff[k] {
            continue;
        }
        let (a, b) = match (&g[k], &rg[k]) {
            (Some(a), Some(b)) => (a, b),
            (a, b) => panic!(
                "{ctx}: gradient of {} missing (fused: {}, reference: {})",
                in_names[k],
                a.is_some(),
                b.is_some()
            ),
        };
        assert_eq!(a.dims(), b.dims(), "{ctx}: d{} shape", in_names[k]);
        assert_close_floor(&format!("{ctx}: d{}", in_names[k]), a, b, dt, grad_floor(k));
    }
}

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

/// The floor for a gradient that Candle's autograd reduces in `dt` from a full-shape gradient
/// `g_full` (f64) to an input through `reduce` (a sum over broadcast dims, the adjoint of a
/// view): Candle's CPU sum accumulates in the storage type, so rounding each of the `n` terms
/// and each partial sum costs at most `n·u·Σ|terms|` per element (`u`: unit roundoff of dt),
/// taken twice. For `n = 1` this is `2u`, below every dtype's tolerance; for sums that cancel
/// in bf16 it can exceed 1e-2: a limit of Candle's reduction, not of the kernel.
pub fn sum_floor(g_full: &Tensor, reduce: &dyn Fn(&Tensor) -> Tensor, dt: DType) -> f64 {
    let norm = |t: &Tensor| -> f64 { vec64(t).iter().map(|v| v * v).sum::<f64>().sqrt() };
    let g_full = f64t(g_full);
    let reduced = reduce(&g_full);
    let n = (g_full.elem_count() / reduced.elem_count().max(1)).max(1) as f64;
    let abs_sum = reduce(&g_full.abs().unwrap());
    // Per element: n·u·Σ|terms|, plus n half-steps of the subnormal range (f16).
    let bound = abs_sum
        .affine(n * unit_roundoff(dt), n * subnormal_half_step(dt))
        .unwrap();
    2.0 * norm(&bound) / norm(&reduced).max(f64::MIN_POSITIVE)
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
        let (a, b) = match (&g[k], &rg[k]) {
            (Some(a), Some(b)) => (a, b),
            (a, b) => panic!(
                "{ctx}: gradient of {} missing (fused: {}, reference: {})",
                names[k],
                a.is_some(),
                b.is_some()
            ),
        };
        assert_eq!(a.dims(), b.dims(), "{ctx}: d{} shape", names[k]);
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
/// into each element (`2(n+1)·u·Σ|g_j|`).
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
    let n = (full.elem_count() / on_ours.len().max(1)) as f64;
    let k = 2.0 * (n + 1.0) * unit_roundoff(dt);
    // Terms in f16's subnormal range round with an absolute error up to half its smallest
    // subnormal (2^-25), whatever their size.
    let eta = 2.0 * (n + 1.0) * subnormal_half_step(dt);
    for (i, ((got, want), a)) in vec64(dm).iter().zip(&on_ours).zip(&abs).enumerate() {
        assert!(
            (got - want).abs() <= k * a + eta,
            "{ctx}: per-row mask gradient [{i}] = {got:.3e}, expected {want:.3e} (≈ 0) \
             within {:.1e}",
            k * a + eta
        );
    }
}

/// The adjoint of a linear view `view` of a tensor of `base` shape: maps a gradient of the
/// view's shape to the base's (a transpose is undone, a broadcast summed), by autograd.
/// Works in the dtype of the gradient it is given.
pub fn pullback<'a>(
    view: &'a dyn Fn(&Tensor) -> Result<Tensor>,
    base: &[usize],
) -> impl Fn(&Tensor) -> Tensor + 'a {
    let base = base.to_vec();
    move |g: &Tensor| {
        let v = Var::zeros(base.as_slice(), g.dtype(), &CPU).unwrap();
        let loss = (view(v.as_tensor()).unwrap() * g)
            .unwrap()
            .sum_all()
            .unwrap();
        loss.backward().unwrap().get(&v).unwrap().clone()
    }
}

pub fn identity(t: &Tensor) -> Tensor {
    t.clone()
}

/// The RMSNorm backward from its definition, in f64: with `x̂ = x·r`, `r = 1/sqrt(mean(x²) +
/// eps)` and `g = dy ⊙ w`: `dx = r·(g − x̂·⟨g, x̂⟩/D)`, `dw = Σ_rows dy ⊙ x̂`.
pub fn rms_bwd64(x: &Tensor, w: Option<&Tensor>, dy: &Tensor, eps: f64) -> (Tensor, Tensor) {
    let (x, dy) = (f64t(x), f64t(dy));
    let d = x.dim(D::Minus1).unwrap() as f64;
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
/// * dw: `Σ_rows dy ⊙ x̂` is accumulated in f32 (f64 for f64) over the rows: at most
///   `rows·u_acc·Σ|terms|` per element, twice, relative. Visible only when that sum cancels.
pub fn rms_floors(x: &Tensor, w: Option<&Tensor>, dy: &Tensor, eps: f64, dt: DType) -> (f64, f64) {
    let norm = |t: &Tensor| -> f64 { vec64(t).iter().map(|v| v * v).sum::<f64>().sqrt() };
    let (x, dy) = (f64t(x), f64t(dy));
    let dcols = x.dim(D::Minus1).unwrap();
    let rows = x.elem_count() / dcols.max(1);
    let (dx, dw) = rms_bwd64(&x, w, &dy, eps);
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
    let terms = (dy * xh)
        .unwrap()
        .abs()
        .unwrap()
        .reshape((rows, dcols))
        .unwrap();
    let u_acc = unit_roundoff(if dt == DType::F64 {
        DType::F64
    } else {
        DType::F32
    });
    let dw_floor =
        2.0 * rows as f64 * u_acc * norm(&terms.sum(0).unwrap()) / norm(&dw).max(f64::MIN_POSITIVE);
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
    let (dx_e, dw_e) = rms_bwd64(&s, Some(w), dn, eps);
    let (dx_r, dw_r) = rms_bwd64(&s_round, Some(w), dn, eps);
    let ds = f64t(ds);
    let dx_e = (dx_e + &ds).unwrap();
    let dx_r = (dx_r + &ds).unwrap();
    let (fx, fw) = rms_floors(&s, Some(w), dn, eps, dt);
    [
        2.0 * testing::rel_err(&dx_r, &dx_e).unwrap() + fx,
        2.0 * testing::rel_err(&dw_r, &dw_e).unwrap() + fw,
    ]
}

/// Central finite differences in f64 of `Σ f(inputs)[out] ⊙ probe` with respect to input
/// `which`, through `candle_fused::testing::finite_diff`.
pub fn fd(f: OpFn, inputs: &[Tensor], which: usize, out: usize, probe: &Tensor) -> Tensor {
    let g = |args: &[Tensor]| -> Result<Tensor> { Ok(f(args)?.swap_remove(out)) };
    testing::finite_diff(g, inputs, which, probe, 1e-6).unwrap()
}

/// Finite-difference tolerance (f64, h = 1e-6, smooth functions of O(1) values).
pub const FD_TOL: f64 = 1e-6;

/// The plain f64 softmax of one row with `-inf` for hidden entries; `zero_if_empty`: a row
/// with nothing visible gives zeros (`masked_softmax`) instead of NaN.
pub fn naive_softmax_row(z: &[f64], zero_if_empty: bool) -> Vec<f64> {
    let m = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    if m == f64::NEG_INFINITY && zero_if_empty {
        return vec![0.0; z.len()];
    }
    let e: Vec<f64> = z.iter().map(|&v| (v - m).exp()).collect();
    let s: f64 = e.iter().sum();
    e.iter().map(|v| v / s).collect()
}

/// The bits of every element (f64-widened: exact for every float dtype).
pub fn bits(t: &Tensor) -> Vec<u64> {
    vec64(t).iter().map(|v| v.to_bits()).collect()
}

/// Runs `f`, failing the test with `what` if it panics.
pub fn no_panic<R>(what: &str, f: impl FnOnce() -> R) -> R {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(_) => panic!("{what}: panicked instead of returning a Result"),
    }
}

/// A small seeded generator (SplitMix64) for the property tests, so a failing case is
/// reproduced from the seed proptest prints.
pub struct SeededRng(u64);

impl SeededRng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)`.
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Standard normal (Box–Muller).
    pub fn normal(&mut self) -> f64 {
        let u1 = 1.0 - self.uniform();
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }

    /// A tensor of `N(0, std²)` values in `dt`.
    pub fn randn(&mut self, shape: &[usize], std: f64, dt: DType) -> Tensor {
        let n: usize = shape.iter().product();
        let v: Vec<f64> = (0..n).map(|_| std * self.normal()).collect();
        Tensor::from_vec(v, shape, &CPU)
            .unwrap()
            .to_dtype(dt)
            .unwrap()
    }

    /// A tensor of uniform values in `[lo, hi)` in `dt`.
    pub fn rand(&mut self, shape: &[usize], lo: f64, hi: f64, dt: DType) -> Tensor {
        let n: usize = shape.iter().product();
        let v: Vec<f64> = (0..n).map(|_| lo + (hi - lo) * self.uniform()).collect();
        Tensor::from_vec(v, shape, &CPU)
            .unwrap()
            .to_dtype(dt)
            .unwrap()
    }

    /// An additive mask: `N(0, 1)` values, each `-inf` with probability `p_hide`.
    pub fn mask(&mut self, shape: &[usize], p_hide: f64, dt: DType) -> Tensor {
        let n: usize = shape.iter().product();
        let v: Vec<f64> = (0..n)
            .map(|_| {
                if self.uniform() < p_hide {
                    f64::NEG_INFINITY
                } else {
                    self.normal()
                }
            })
            .collect();
        Tensor::from_vec(v, shape, &CPU)
            .unwrap()
            .to_dtype(dt)
            .unwrap()
    }
}
