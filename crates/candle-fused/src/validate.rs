//! Argument checks shared by every op. Each error names the op, the offending argument and
//! what was expected versus what was given.

use candle_core::{DType, Result, Tensor};

/// Builds the crate's error: `candle-fused <op>: <msg>`.
pub(crate) fn err(op: &str, msg: impl std::fmt::Display) -> candle_core::Error {
    candle_core::Error::Msg(format!("candle-fused {op}: {msg}"))
}

macro_rules! fail {
    ($op:expr, $($arg:tt)*) => {
        return Err($crate::validate::err($op, format!($($arg)*)))
    };
}
pub(crate) use fail;

/// Runs `$body` with `$T` bound to the Rust type of `$dtype` when it is one of the listed
/// dtypes (`F32 => f32, ...`), else returns the op's error `$msg` (with `{d:?}` the dtype).
/// The backends' `cpu::dispatch!` and `cuda::dispatch!` are this with their dtype lists.
macro_rules! for_dtypes {
    ($op:expr, $dtype:expr, |$T:ident| $body:expr, [$($D:ident => $ty:ty),+], $msg:literal) => {
        match $dtype {
            $(candle_core::DType::$D => {
                type $T = $ty;
                $body
            })+
            d => $crate::validate::fail!($op, $msg, d = d),
        }
    };
}
pub(crate) use for_dtypes;

/// The element range `[start, end)` of a contiguous layout (an error naming the op and the
/// argument otherwise; the seam makes every input contiguous unless the kernel reads it
/// through its strides).
pub(crate) fn contiguous(op: &str, arg: &str, l: &candle_core::Layout) -> Result<(usize, usize)> {
    match l.contiguous_offsets() {
        Some(r) => Ok(r),
        None => fail!(
            op,
            "{arg} must be contiguous (strides {:?} for shape {:?})",
            l.stride(),
            l.dims()
        ),
    }
}

/// The dtypes the ops accept.
pub(crate) fn float_dtype(op: &str, arg: &str, t: &Tensor) -> Result<()> {
    match t.dtype() {
        DType::F32 | DType::F64 | DType::F16 | DType::BF16 => Ok(()),
        d => fail!(
            op,
            "{arg} has dtype {d:?}, expected one of f32, f64, f16, bf16"
        ),
    }
}

/// `t` has rank >= 1.
pub(crate) fn rank_ge1(op: &str, arg: &str, t: &Tensor) -> Result<()> {
    if t.rank() == 0 {
        fail!(
            op,
            "{arg} must have rank >= 1 (the op works over the last dim), got a scalar (rank 0)"
        )
    }
    Ok(())
}

/// `t` has the same dtype and device as `x`.
pub(crate) fn same_dtype_device(op: &str, arg: &str, t: &Tensor, x: &Tensor) -> Result<()> {
    if t.dtype() != x.dtype() {
        fail!(
            op,
            "{arg} has dtype {:?}, expected {:?} (the dtype of x)",
            t.dtype(),
            x.dtype()
        )
    }
    if !t.device().same_device(x.device()) {
        fail!(
            op,
            "{arg} is on device {:?}, expected {:?} (the device of x)",
            t.device().location(),
            x.device().location()
        )
    }
    Ok(())
}

/// `t` has exactly `dims`.
pub(crate) fn shape_eq(op: &str, arg: &str, t: &Tensor, dims: &[usize], what: &str) -> Result<()> {
    if t.dims() != dims {
        fail!(
            op,
            "{arg} has shape {:?}, expected {:?} ({what})",
            t.dims(),
            dims
        )
    }
    Ok(())
}

/// `t` has the dtype and device of `x` and exactly `dims` (`what` says where they come from).
pub(crate) fn like(
    op: &str,
    arg: &str,
    t: &Tensor,
    x: &Tensor,
    dims: &[usize],
    what: &str,
) -> Result<()> {
    same_dtype_device(op, arg, t, x)?;
    shape_eq(op, arg, t, dims, what)
}

/// eps is finite and > 0.
pub(crate) fn eps(op: &str, eps: f64) -> Result<()> {
    if !(eps.is_finite() && eps > 0.0) {
        fail!(op, "eps must be a finite number > 0, got {eps}")
    }
    Ok(())
}

/// scale is finite.
pub(crate) fn finite(op: &str, arg: &str, v: f64) -> Result<()> {
    if !v.is_finite() {
        fail!(op, "{arg} must be finite, got {v}")
    }
    Ok(())
}

/// Can `from` be broadcast to `to` (numpy rules, leading dims may be missing)?
pub(crate) fn broadcastable(op: &str, arg: &str, from: &[usize], to: &[usize]) -> Result<()> {
    let ok = from.len() <= to.len()
        && from
            .iter()
            .rev()
            .zip(to.iter().rev())
            .all(|(&f, &t)| f == t || f == 1);
    if !ok {
        fail!(
            op,
            "{arg} of shape {from:?} cannot be broadcast to the shape of x {to:?}"
        )
    }
    Ok(())
}
