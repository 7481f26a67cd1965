//! Bitwise comparisons of the suites that check one path against another (layouts, views).

use candle_core::{DType, Tensor};

use super::vec64;

/// Element by element equal values, NaN matching NaN, where Candle's autograd may have
/// touched one side: it adds each gradient to a zeroed buffer, which turns `-0` into `0`, and
/// that add may run with flush-to-zero, so subnormals (of f32 range) count as zero.
pub fn assert_equal(what: &str, a: &Tensor, b: &Tensor) {
    assert_eq!((a.dims(), a.dtype()), (b.dims(), b.dtype()), "{what}");
    let tiny = if a.dtype() == DType::F64 {
        f64::MIN_POSITIVE
    } else {
        f32::MIN_POSITIVE as f64
    };
    let flush = |v: f64| if v.abs() < tiny { 0.0 } else { v };
    for (i, (x, y)) in vec64(a).iter().zip(vec64(b)).enumerate() {
        let same = flush(*x) == flush(y) || (x.is_nan() && y.is_nan());
        assert!(same, "{what}: element {i}: {x} vs {y}");
    }
}
