//! The runtime-dispatched SIMD layer of the CPU kernels, built on `pulp` (the crate Candle's
//! GEMM uses): [`Isa`] is a detected instruction set (AVX-512, AVX2+FMA, NEON, or scalar), and
//! its methods are the vector math of the row kernels: max, exp-and-sum, sums of squares,
//! f64-accumulated dot products, the elementwise row updates, and f32 <-> bf16/f16 conversion.
//!
//! Each method runs its loop inside `pulp`'s `vectorize`, i.e. in a function compiled with the
//! level's target features, so the binary stays portable (no `target-cpu=native`) and the
//! level is chosen at run time from [`SimdLevel`] (`KernelConfig.cpu.simd`; tests force each
//! level the machine has). The f32 math is explicit `pulp` vector code ([`math`]); the f64
//! accumulations are plain lane-array loops that LLVM vectorizes in that context.
//!
//! Accuracy: `exp` is the Cody–Waite + degree-6 polynomial of the scalar code (< 5e-7
//! relative on `[-87, 0]`); sums run lanes within blocks of [`BLOCK`] elements and join the
//! blocks in f64; dot products whose result cancels (`⟨dy, y⟩`, `⟨g, x⟩`) accumulate in f64.

pub(crate) mod convert;
pub(crate) mod math;
pub(crate) mod skinny;
#[cfg(test)]
mod tests;

use candle_core::Result;
use pulp::{Simd, WithSimd};

pub use crate::config::SimdLevel;
use crate::validate::fail;

/// Elements per block of the blocked sums (lanes within a block, f64 across blocks).
pub(crate) const BLOCK: usize = 1024;

/// A detected instruction set: the proof (a `pulp` token) that the CPU has it.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Isa {
    #[cfg(target_arch = "x86_64")]
    Avx512(pulp::x86::V4),
    #[cfg(target_arch = "x86_64")]
    Avx2(pulp::x86::V3),
    /// The best level `pulp` detects on this target (NEON on aarch64).
    #[cfg(not(target_arch = "x86_64"))]
    Arch(pulp::Arch),
    Scalar,
}

impl SimdLevel {
    /// Every level this CPU supports, best first (`Scalar` always; never `Auto`).
    pub fn available() -> Vec<SimdLevel> {
        [
            SimdLevel::Avx512,
            SimdLevel::Avx2,
            SimdLevel::Neon,
            SimdLevel::Scalar,
        ]
        .into_iter()
        .filter(|l| Isa::detect(*l).is_some())
        .collect()
    }

    /// The level [`SimdLevel::Auto`] resolves to on this CPU.
    pub fn detected() -> SimdLevel {
        Isa::best().level()
    }

    /// Whether the CPU also has AVX-512 BF16 (`vcvtneps2bf16`, used for f32 to bf16 at the
    /// AVX-512 level).
    pub fn has_avx512_bf16() -> bool {
        convert::has_avx512_bf16()
    }

    /// Lower-case name (`avx512`, `avx2`, `neon`, `scalar`, `auto`).
    pub fn as_str(self) -> &'static str {
        match self {
            SimdLevel::Auto => "auto",
            SimdLevel::Avx512 => "avx512",
            SimdLevel::Avx2 => "avx2",
            SimdLevel::Neon => "neon",
            SimdLevel::Scalar => "scalar",
        }
    }
}

impl Isa {
    /// The token of `level` if this CPU has it (`Auto`: the best one).
    fn detect(level: SimdLevel) -> Option<Isa> {
        match level {
            SimdLevel::Auto => Some(Isa::best()),
            #[cfg(target_arch = "x86_64")]
            SimdLevel::Avx512 => pulp::x86::V4::try_new().map(Isa::Avx512),
            #[cfg(target_arch = "x86_64")]
            SimdLevel::Avx2 => pulp::x86::V3::try_new().map(Isa::Avx2),
            #[cfg(target_arch = "aarch64")]
            SimdLevel::Neon => match pulp::Arch::new() {
                pulp::Arch::Scalar => None,
                a => Some(Isa::Arch(a)),
            },
            SimdLevel::Scalar => Some(Isa::Scalar),
            #[allow(unreachable_patterns)]
            _ => None,
        }
    }

    fn best() -> Isa {
        #[cfg(target_arch = "x86_64")]
        {
            if let Some(v4) = pulp::x86::V4::try_new() {
                return Isa::Avx512(v4);
            }
            if let Some(v3) = pulp::x86::V3::try_new() {
                return Isa::Avx2(v3);
            }
            Isa::Scalar
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            Isa::Arch(pulp::Arch::new())
        }
    }

    /// The level of this token.
    pub fn level(self) -> SimdLevel {
        match self {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512(_) => SimdLevel::Avx512,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2(_) => SimdLevel::Avx2,
            #[cfg(not(target_arch = "x86_64"))]
            Isa::Arch(a) => match a {
                pulp::Arch::Scalar => SimdLevel::Scalar,
                #[allow(unreachable_patterns)]
                _ => SimdLevel::Neon,
            },
            Isa::Scalar => SimdLevel::Scalar,
        }
    }

    /// The token for `level`, or an error naming `op` when this CPU lacks it.
    pub fn new(op: &str, level: SimdLevel) -> Result<Isa> {
        match Isa::detect(level) {
            Some(isa) => Ok(isa),
            None => fail!(
                op,
                "SIMD level {} is not available on this CPU (available: {})",
                level.as_str(),
                SimdLevel::available()
                    .iter()
                    .map(|l| l.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }
    }

    /// Runs `op` compiled for this instruction set.
    #[inline(always)]
    pub fn vectorize<W: WithSimd>(self, op: W) -> W::Output {
        match self {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512(s) => Simd::vectorize(s, op),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2(s) => Simd::vectorize(s, op),
            #[cfg(not(target_arch = "x86_64"))]
            Isa::Arch(a) => a.dispatch(op),
            Isa::Scalar => Simd::vectorize(pulp::Scalar::new(), op),
        }
    }

    /// Runs `f` (plain loops that LLVM vectorizes) compiled for this instruction set.
    #[inline(always)]
    pub fn run<R>(self, f: impl FnOnce() -> R) -> R {
        self.vectorize(Plain(f))
    }
}

/// A closure as a [`WithSimd`] op (for loops written without explicit vector types).
struct Plain<F>(F);

impl<R, F: FnOnce() -> R> WithSimd for Plain<F> {
    type Output = R;
    #[inline(always)]
    fn with_simd<S: Simd>(self, _: S) -> R {
        (self.0)()
    }
}

/// Defines a [`WithSimd`] struct around a generic function of [`math`] and the [`Isa`] method
/// that runs it.
macro_rules! isa_fn {
    ($(#[$m:meta])* $name:ident, $op:ident<$($lt:lifetime),*> { $($arg:ident: $ty:ty),* } -> $ret:ty) => {
        struct $op<$($lt),*> { $($arg: $ty),* }
        impl<$($lt),*> WithSimd for $op<$($lt),*> {
            type Output = $ret;
            #[inline(always)]
            fn with_simd<S: Simd>(self, s: S) -> $ret {
                math::$name(s, $(self.$arg),*)
            }
        }
        impl Isa {
            $(#[$m])*
            #[inline]
            pub fn $name<$($lt),*>(self, $($arg: $ty),*) -> $ret {
                self.vectorize($op { $($arg),* })
            }
        }
    };
}

isa_fn!(
    /// The maximum of `x` (`-inf` when empty; NaN entries may be skipped: they poison the
    /// softmax through `exp` anyway).
    max, MaxOp<'a> { x: &'a [f32] } -> f32
);
isa_fn!(
    /// `dst[i] = exp(src[i] - m)` (for `src[i] <= m`), returning the blocked sum of the results.
    exp_sub_sum, ExpSubSum<'a, 'b> { src: &'a [f32], dst: &'b mut [f32], m: f32 } -> f32
);
isa_fn!(
    /// `x[i] = exp(x[i] - m)` in place, returning the blocked sum of the results.
    exp_sub_sum_inplace, ExpSubSumInplace<'a> { x: &'a mut [f32], m: f32 } -> f32
);
isa_fn!(
    /// `y[i] *= k`.
    scale, ScaleOp<'a> { y: &'a mut [f32], k: f32 } -> ()
);
isa_fn!(
    /// `Σ x²`, lanes within blocks, blocks joined in f64.
    sum_sq, SumSq<'a> { x: &'a [f32] } -> f32
);
isa_fn!(
    /// `y[i] = x[i] · r · w[i]`.
    mul_scale_w, MulScaleW<'a, 'b, 'c> { x: &'a [f32], r: f32, w: &'b [f32], y: &'c mut [f32] } -> ()
);
isa_fn!(
    /// `s[i] = a[i] + b[i]`.
    add, AddOp<'a, 'b, 'c> { a: &'a [f32], b: &'b [f32], s: &'c mut [f32] } -> ()
);
isa_fn!(
    /// `z[i] = k · x[i] + m[i]`.
    scale_add, ScaleAdd<'a, 'b, 'c> { x: &'a [f32], k: f32, m: &'b [f32], z: &'c mut [f32] } -> ()
);
isa_fn!(
    /// `z[i] = k · x[i] + c`.
    scale_add_const, ScaleAddConst<'a, 'b> { x: &'a [f32], k: f32, c: f32, z: &'b mut [f32] } -> ()
);
isa_fn!(
    /// `⟨a, b⟩` accumulated in f64 (products of f32 values are exact there).
    dot_wide, DotWide<'a, 'b> { a: &'a [f32], b: &'b [f32] } -> f64
);
isa_fn!(
    /// `(Σ x², Σ g·x)` accumulated in f64.
    wide_sums, WideSums<'a, 'b> { x: &'a [f32], g: &'b [f32] } -> (f64, f64)
);
isa_fn!(
    /// Softmax backward of a row: `dx[i] = scale · y[i] · (dy[i] − dot)`, evaluated in f64.
    softmax_bwd_row, SoftmaxBwdRow<'a, 'b, 'c> {
        y: &'a [f32], dy: &'b [f32], dot: f64, scale: f64, dx: &'c mut [f32]
    } -> ()
);
isa_fn!(
    /// RMSNorm backward of a row, in place on `g` (holding `dy ⊙ w` or `dy`):
    /// `g[i] = r · (g[i] − x[i] · c)` evaluated in f64, plus `dres[i]` when given.
    rms_bwd_row, RmsBwdRow<'a, 'b, 'c> {
        x: &'a [f32], r: f64, c: f64, dres: Option<&'b [f32]>, g: &'c mut [f32]
    } -> ()
);
isa_fn!(
    /// `acc[i] += dy[i] · x[i] · r` (the weight gradient of one row).
    dw_accumulate, DwAccumulate<'a, 'b, 'c> { dy: &'a [f32], x: &'b [f32], r: f32, acc: &'c mut [f32] } -> ()
);
isa_fn!(
    /// `o[i] = a[i] · b[i]`.
    mul, MulOp<'a, 'b, 'c> { a: &'a [f32], b: &'b [f32], o: &'c mut [f32] } -> ()
);
