//! Helpers for verifying the ops, shared by the test suites, `candle-fused check` and the
//! GPU tests: seeded random inputs, the poisoned kernels, relative error against a reference,
//! finite differences, rounding floors, and the tolerances.

use candle_core::{DType, Device, Result, Tensor, Var};
use candle_fused::{KernelConfig, Kernels};

use crate::rng;

/// The kernels every test and `check` runs: the default configuration with every output
/// filled with NaN before the kernel writes it, so an element a kernel misses shows up.
pub fn poisoned() -> Kernels {
    Kernels::new(KernelConfig::poisoned())
}

/// Tolerance on the relative error `‖out − ref‖ / ‖ref‖` against the f64 reference:
/// f32 1e-5, f16/bf16 1e-2, f64 1e-8.
pub fn tolerance(dtype: DType) -> f64 {
    match dtype {
        DType::F64 => 1e-8,
        DType::F32 => 1e-5,
        _ => 1e-2,
    }
}

/// `N(0, std²)` values of `shape` from the calling thread's seeded stream ([`rng`]), drawn on
/// the host and moved to `dtype` on `device`.
pub fn randn(shape: &[usize], std: f64, dtype: DType, device: &Device) -> Result<Tensor> {
    rng::with_thread_rng(|r| r.randn(shape, std, dtype, device))
}

/// Uniform values in `[lo, hi)`, as [`randn`].
pub fn rand(shape: &[usize], lo: f64, hi: f64, dtype: DType, device: &Device) -> Result<Tensor> {
    rng::with_thread_rng(|r| r.rand(shape, lo, hi, dtype, device))
}

/// An additive mask of `shape` (`N(0, 1)` values, each `-inf` with probability `p_hide`), as
/// [`randn`].
pub fn mask(shape: &[usize], p_hide: f64, dtype: DType, device: &Device) -> Result<Tensor> {
    rng::with_thread_rng(|r| r.mask(shape, p_hide, dtype, device))
}

/// Unit roundoff (half an ulp of 1) of a float dtype.
pub fn unit_roundoff(dt: DType) -> f64 {
    match dt {
        DType::F64 => f64::EPSILON / 2.0,
        DType::F32 => f32::EPSILON as f64 / 2.0,
        DType::F16 => 2f64.powi(-11),
        DType::BF16 => 2f64.powi(-8),
        _ => f64::NAN,
    }
}

/// The rounding floor of a sum over rows computed in a dtype of unit roundoff `u`, relative to
/// the exact sum: for `terms [rows, D]` (f64, the exact summands) and the exact sums
/// `Σ_rows terms`, returns `‖bound‖ / ‖Σ_rows terms‖` with, per column,
/// `bound = λ·u·(sqrt(Σ_k S_k²) + 2·sqrt(Σ_k t_k²))`, `S_k` the running sums over the rows and
/// `λ = 6`.
///
/// This is the probabilistic rounding-error bound of a recursive sum (each addition rounds
/// its partial sum by an independent, mean-zero error of at most `u`, so the total error is a
/// sum of independent terms bounded by `u·|S_k|`; Hoeffding's inequality gives the `λ` bound,
/// exceeded with probability below `2·exp(−λ²/2)` ≈ 3e-8), plus the rounding of each term
/// (a product of two rounded factors: `2u·|t_k|`). A blocked or tree order has smaller partial
/// sums than the sequential one, so this covers every order the kernels use; unlike the
/// worst-case `n·u·Σ|t_k|` it does not grow with the number of rows faster than the error
/// does, so a wrong sum still fails.
pub fn sum_floor(terms: &Tensor, u: f64) -> Result<f64> {
    let t = terms.to_dtype(DType::F64)?;
    let s = t.cumsum(0)?;
    let sq = |x: &Tensor| -> Result<Tensor> { x.sqr()?.sum(0)?.sqrt() };
    let bound = ((sq(&s)? + (sq(&t)? * 2.0)?)? * (6.0 * u))?;
    let norm = |x: &Tensor| -> Result<f64> { x.sqr()?.sum_all()?.sqrt()?.to_scalar::<f64>() };
    let total = norm(&t.sum(0)?)?;
    Ok(norm(&bound)? / total.max(f64::MIN_POSITIVE))
}

/// Relative error `‖out − ref‖₂ / ‖ref‖₂`, in f64 on the CPU.
///
/// Non-finite values must match exactly: where `reference` is NaN (or ±inf) `out` must be too,
/// and a NaN or inf in `out` where the reference is finite gives `inf`. Those positions are
/// then left out of the norms. When `‖ref‖ = 0` the absolute error `‖out‖` is returned.
pub fn rel_err(out: &Tensor, reference: &Tensor) -> Result<f64> {
    if out.dims() != reference.dims() {
        candle_core::bail!(
            "rel_err: shapes differ {:?} vs {:?}",
            out.dims(),
            reference.dims()
        )
    }
    let a = out.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
    let b = reference
        .to_dtype(DType::F64)?
        .flatten_all()?
        .to_vec1::<f64>()?;
    let (mut num, mut den) = (0f64, 0f64);
    for (&x, &y) in a.iter().zip(&b) {
        if !y.is_finite() {
            let same = (y.is_nan() && x.is_nan()) || x == y;
            if !same {
                return Ok(f64::INFINITY);
            }
            continue;
        }
        if !x.is_finite() {
            return Ok(f64::INFINITY);
        }
        num += (x - y) * (x - y);
        den += y * y;
    }
    Ok(if den == 0.0 {
        num.sqrt()
    } else {
        (num / den).sqrt()
    })
}

/// The largest absolute value (for messages).
pub fn max_abs(t: &Tensor) -> Result<f64> {
    t.to_dtype(DType::F64)?
        .abs()?
        .flatten_all()?
        .max(0)?
        .to_scalar::<f64>()
}

/// Central finite differences of `L(inputs) = Σ f(inputs) ⊙ probe` with respect to
/// `inputs[which]`, in f64 on the CPU, for every element of that input (keep it small).
pub fn finite_diff<F>(
    f: F,
    inputs: &[Tensor],
    which: usize,
    probe: &Tensor,
    h: f64,
) -> Result<Tensor>
where
    F: Fn(&[Tensor]) -> Result<Tensor>,
{
    let base = inputs[which].to_dtype(DType::F64)?;
    let shape = base.shape().clone();
    let flat = base.flatten_all()?.to_vec1::<f64>()?;
    let loss = |v: &[f64]| -> Result<f64> {
        let mut args: Vec<Tensor> = inputs.to_vec();
        args[which] = Tensor::from_slice(v, &shape, &Device::Cpu)?;
        (f(&args)? * probe)?.sum_all()?.to_scalar::<f64>()
    };
    let mut grad = vec![0f64; flat.len()];
    let mut v = flat.clone();
    for i in 0..flat.len() {
        v[i] = flat[i] + h;
        let lp = loss(&v)?;
        v[i] = flat[i] - h;
        let lm = loss(&v)?;
        v[i] = flat[i];
        grad[i] = (lp - lm) / (2.0 * h);
    }
    Tensor::from_vec(grad, &shape, &Device::Cpu)
}

/// Runs `f` on `inputs` (those marked in `diff` as tracked `Var`s), backpropagates the loss
/// `Σ_k out_k ⊙ probe_k` and returns the outputs and the gradient of each tracked input (`None`
/// for the others). The gradient of the loss with respect to `out_k` is exactly `probe_k`, in
/// any dtype (the loss value itself is never read).
pub fn fwd_bwd(
    f: &dyn Fn(&[Tensor]) -> Result<Vec<Tensor>>,
    inputs: &[Tensor],
    diff: &[bool],
    probes: &[Tensor],
) -> Result<(Vec<Tensor>, Vec<Option<Tensor>>)> {
    let vars: Vec<Option<Var>> = inputs
        .iter()
        .zip(diff)
        .map(|(t, &d)| d.then(|| Var::from_tensor(t)).transpose())
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
    let Some(loss) = loss else {
        candle_core::bail!("fwd_bwd: no probed output")
    };
    let grads = loss.backward()?;
    let g = vars
        .iter()
        .map(|v| v.as_ref().and_then(|v| grads.get(v).cloned()))
        .collect();
    Ok((outs, g))
}
