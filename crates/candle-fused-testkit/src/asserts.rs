//! Assertions and helpers of the test suites (they panic with a message naming what differs):
//! inputs from the seeded streams, forward + backward through Candle's autograd, comparison
//! with the f64 reference against the dtype's tolerance and the rounding floors, finite
//! differences, naive scalar implementations for the semantic tests.
//!
//! Every comparison is against a value computed independently of the fused kernels: the
//! composed Candle ops of [`crate::reference`] in f64 on upcast copies of the same rounded
//! inputs (differentiated by Candle's autograd), central finite differences, or plain scalar
//! loops.

use candle_core::{DType, Device, Result, Tensor, Var};

use crate::testing;

pub const DTYPES: [DType; 4] = [DType::F32, DType::F64, DType::F16, DType::BF16];
pub const HALF: [DType; 2] = [DType::F16, DType::BF16];
pub const CPU: Device = Device::Cpu;

/// A strided view of a tensor (transpose, narrow, broadcast, ...).
pub type View = fn(&Tensor) -> Result<Tensor>;

/// A strided-input case: name, first base shape and its view, second base shape and its view.
pub type ViewCase = (&'static str, Vec<usize>, View, Vec<usize>, View);

/// An op under test: inputs in, every output out.
pub type OpFn<'a> = &'a dyn Fn(&[Tensor]) -> Result<Vec<Tensor>>;

/// `N(0, std²)` values from the test's seeded stream.
pub fn randn(shape: &[usize], std: f64, dt: DType) -> Tensor {
    testing::randn(shape, std, dt, &CPU).unwrap()
}

/// Uniform values in `[lo, hi)` from the test's seeded stream.
pub fn rand(shape: &[usize], lo: f64, hi: f64, dt: DType) -> Tensor {
    testing::rand(shape, lo, hi, dt, &CPU).unwrap()
}

/// An additive mask: `N(0, 1)` values, each hidden (`-inf`) with probability `p_hide`.
pub fn mask(shape: &[usize], p_hide: f64, dt: DType) -> Tensor {
    testing::mask(shape, p_hide, dt, &CPU).unwrap()
}

pub fn f64t(t: &Tensor) -> Tensor {
    t.to_dtype(DType::F64).unwrap()
}

pub fn vec64(t: &Tensor) -> Vec<f64> {
    f64t(t).flatten_all().unwrap().to_vec1::<f64>().unwrap()
}

pub use crate::testing::{fwd_bwd, poisoned, unit_roundoff};

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
/// The floors are the project's rule (as in [`crate::check`]): a kernel cannot beat the
/// dtype's own rounding of the exact result. `extra_floor` is for an error that is inherent to
/// the op's design and is computed by the caller (e.g. the softmax backward reads the forward's
/// output `y`, rounded to the dtype); callers say why where they pass one.
pub fn assert_close_floor(what: &str, out: &Tensor, reference: &Tensor, dt: DType, extra: f64) {
    let err = testing::rel_err(out, reference).unwrap();
    let floor = rounding_floor(reference, dt);
    // Results below the dtype's smallest normal number (in f32 arithmetic for half types)
    // carry no relative precision: a vector `exp` flushes them to zero. A reference whose
    // values all lie there (e.g. GeGLU of one gate of -8) is measured against that scale.
    let min_normal = match dt {
        DType::F64 => f64::MIN_POSITIVE,
        DType::F16 => 2f64.powi(-14),
        _ => f32::MIN_POSITIVE as f64,
    };
    let max_ref = testing::max_abs(reference).unwrap_or(0.0);
    let extra = if max_ref > 0.0 && max_ref < min_normal {
        extra.max(min_normal / max_ref)
    } else {
        extra
    };
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

/// The fused and the reference gradient of input `name`, which must both exist and have the
/// same shape.
pub fn grad_pair<'a>(
    ctx: &str,
    name: &str,
    fused: &'a Option<Tensor>,
    reference: &'a Option<Tensor>,
) -> (&'a Tensor, &'a Tensor) {
    match (fused, reference) {
        (Some(a), Some(b)) => {
            assert_eq!(a.dims(), b.dims(), "{ctx}: d{name} shape");
            (a, b)
        }
        (a, b) => panic!(
            "{ctx}: gradient of {name} missing (fused: {}, reference: {})",
            a.is_some(),
            b.is_some()
        ),
    }
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
        let (a, b) = grad_pair(ctx, in_names[k], &g[k], &rg[k]);
        assert_close_floor(&format!("{ctx}: d{}", in_names[k]), a, b, dt, grad_floor(k));
    }
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

/// Central finite differences in f64 of `Σ f(inputs)[out] ⊙ probe` with respect to input
/// `which`, through [`testing::finite_diff`].
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
