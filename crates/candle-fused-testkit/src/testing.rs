//! Helpers for verifying the ops, shared by the test suites, `candle-fused check` and the
//! GPU tests: random inputs, output poisoning, relative error against a reference, finite
//! differences, and the tolerances.

use candle_core::{DType, Device, Result, Tensor};

pub use candle_fused::poison::{poison_enabled, set_poison};

/// Tolerance on the relative error `‖out − ref‖ / ‖ref‖` against the f64 reference:
/// f32 1e-5, f16/bf16 1e-2, f64 1e-8.
pub fn tolerance(dtype: DType) -> f64 {
    match dtype {
        DType::F64 => 1e-8,
        DType::F32 => 1e-5,
        _ => 1e-2,
    }
}

/// Fresh standard-normal values of `shape` times `std`, drawn on the CPU (Candle's CPU RNG
/// is seeded from the OS, so every run differs) and moved to `dtype` on `device`.
pub fn randn(shape: &[usize], std: f64, dtype: DType, device: &Device) -> Result<Tensor> {
    Tensor::randn(0f64, std, shape, &Device::Cpu)?
        .to_dtype(dtype)?
        .to_device(device)
}

/// Uniform values in `[lo, hi)`, as [`randn`].
pub fn rand(shape: &[usize], lo: f64, hi: f64, dtype: DType, device: &Device) -> Result<Tensor> {
    Tensor::rand(lo, hi, shape, &Device::Cpu)?
        .to_dtype(dtype)?
        .to_device(device)
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
