//! f32 <-> bf16/f16 conversion of whole rows at the [`Isa`]'s level.
//!
//! * bf16 -> f32 is a 16-bit shift (vectorized at every level).
//! * f32 -> bf16 rounds to nearest even with NaN kept quiet, bit for bit what `half` does:
//!   AVX-512 BF16's `vcvtneps2bf16` at the AVX-512 level when the CPU has it (which also
//!   flushes subnormal inputs, below 1.2e-38, to zero), else the integer rounding vectorized.
//! * f16 <-> f32 goes through `half`'s slice conversions, which use F16C (`vcvtph2ps`,
//!   `vcvtps2ph`) when the CPU has it and a bit-exact software path otherwise.

use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};

use super::Isa;

/// Whether the CPU has AVX-512 BF16 (with the AVX-512 F/VL it builds on).
pub(crate) fn has_avx512_bf16() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512bf16")
            && std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512vl")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Round to nearest even on the bits, NaN kept (quiet): `half`'s `bf16::from_f32`.
#[inline(always)]
fn bf16_bits(x: f32) -> u16 {
    let b = x.to_bits();
    if b & 0x7FFF_FFFF > 0x7F80_0000 {
        ((b >> 16) | 0x40) as u16
    } else {
        (b.wrapping_add(0x7FFF + ((b >> 16) & 1)) >> 16) as u16
    }
}

impl Isa {
    /// `dst[i] = src[i]` widened.
    #[inline]
    pub fn bf16_to_f32(self, src: &[bf16], dst: &mut [f32]) {
        let n = dst.len();
        let src = &src[..n];
        self.run(
            #[inline(always)]
            || {
                for (d, s) in dst.iter_mut().zip(src) {
                    *d = f32::from_bits((s.to_bits() as u32) << 16);
                }
            },
        )
    }

    /// `dst[i] = src[i]` rounded to nearest even.
    #[inline]
    pub fn f32_to_bf16(self, src: &[f32], dst: &mut [bf16]) {
        let n = dst.len();
        let src = &src[..n];
        #[cfg(target_arch = "x86_64")]
        if matches!(self, Isa::Avx512(_)) && bf16_hw() {
            // SAFETY: `bf16_hw` checked that the CPU has AVX-512 F, VL and BF16.
            unsafe { f32_to_bf16_avx512(src, dst) };
            return;
        }
        self.run(
            #[inline(always)]
            || {
                for (d, &s) in dst.iter_mut().zip(src) {
                    *d = bf16::from_bits(bf16_bits(s));
                }
            },
        )
    }

    /// `dst[i] = src[i]` widened.
    #[inline]
    pub fn f16_to_f32(self, src: &[f16], dst: &mut [f32]) {
        let n = dst.len();
        src[..n].convert_to_f32_slice(dst)
    }

    /// `dst[i] = src[i]` rounded to nearest even.
    #[inline]
    pub fn f32_to_f16(self, src: &[f32], dst: &mut [f16]) {
        let n = dst.len();
        dst.convert_from_f32_slice(&src[..n])
    }
}

/// [`has_avx512_bf16`], detected once.
#[cfg(target_arch = "x86_64")]
fn bf16_hw() -> bool {
    use std::sync::OnceLock;
    static HW: OnceLock<bool> = OnceLock::new();
    *HW.get_or_init(has_avx512_bf16)
}

/// f32 -> bf16 with `vcvtneps2bf16`, 16 lanes at a time; the tail through [`bf16_bits`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vl,avx512bf16")]
unsafe fn f32_to_bf16_avx512(src: &[f32], dst: &mut [bf16]) {
    use std::arch::x86_64::{
        __m256bh, __m256i, _mm256_storeu_si256, _mm512_cvtneps_pbh, _mm512_loadu_ps,
    };
    let n = dst.len().min(src.len());
    let full = n / 16 * 16;
    let mut i = 0;
    while i < full {
        // SAFETY: i + 16 <= n; unaligned loads and stores.
        unsafe {
            let v = _mm512_loadu_ps(src.as_ptr().add(i));
            let h: __m256bh = _mm512_cvtneps_pbh(v);
            _mm256_storeu_si256(
                dst.as_mut_ptr().add(i) as *mut __m256i,
                std::mem::transmute::<__m256bh, __m256i>(h),
            );
        }
        i += 16;
    }
    for j in full..n {
        dst[j] = bf16::from_bits(bf16_bits(src[j]));
    }
}
