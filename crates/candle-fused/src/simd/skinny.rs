//! f32 matrix products with one short side (the LoRA rank, a few decode rows): explicit `pulp`
//! micro-kernels instead of the `gemm` crate, whose packing and blocking are sized for square
//! problems (measured 2–9× slower than MKL on the LoRA shapes of the training step).
//!
//! `C (m×n) = [C +] β·L (m×k)·R (k×n)`. The micro-kernel is the outer-product form: a tile of
//! `MR` rows × `NV` vectors of `C` lives in registers; for each `p` it loads `NV` vectors of
//! row `p` of `R` (which must have unit column stride) and broadcasts `L[i, p]` for each of the
//! `MR` rows. Column panels are the outer loop, so a panel of `R` stays in cache while the row
//! tiles of `L` stream past it.
//!
//! Orientation: either `C = L·R` directly (R packed into rows first when its columns are
//! strided) or `Cᵀ = Rᵀ·Lᵀ` into a scratch `n×m` that is transposed into `C`; the cheaper in
//! packing/transposing work wins, and a narrow output (`n < m`) whose `L` is stored transposed
//! is computed transposed (its broadcasts would otherwise stride through whole rows of `L`).
//! Threads split the rows of `C` (or its columns when there are few rows) into equal parts.

use pulp::{Simd, WithSimd};
use rayon::prelude::*;

use super::Isa;

/// A strided f32 operand: element `(i, j)` at `ptr + i·rs + j·cs`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct View {
    pub ptr: *const f32,
    pub rs: isize,
    pub cs: isize,
}

/// Which orientation [`Isa::skinny_gemm`] computes (tests force both).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(not(test), allow(dead_code))]
pub(crate) enum Orient {
    Auto,
    Direct,
    Transposed,
}

/// Below this many multiply-adds a product runs on the calling thread.
const PAR_MIN_MACS: usize = 1 << 17;

impl Isa {
    /// `dst[i·ldd + j] = [dst[i·ldd + j] +] beta · Σ_p L(i,p)·R(p,j)` for `i < m, j < n`, if
    /// `min(m, n, k) <= max_side` (returns `false` and writes nothing otherwise).
    ///
    /// # Safety
    /// `l` must address `m×k` and `r` `k×n` readable f32, `dst` `m` rows of `ldd >= n`
    /// writable f32 that alias neither.
    #[allow(clippy::too_many_arguments)]
    pub(crate) unsafe fn skinny_gemm(
        self,
        threads: usize,
        max_side: usize,
        (m, n, k): (usize, usize, usize),
        dst: *mut f32,
        ldd: usize,
        accumulate: bool,
        l: View,
        r: View,
        beta: f32,
        orient: Orient,
    ) -> bool {
        if m == 0 || n == 0 || k == 0 || m.min(n).min(k) > max_side {
            return false;
        }
        let direct_cost =
            if r.cs == 1 { 0 } else { k * n } + if n < m && l.rs == 1 { k * m } else { 0 };
        let trans_cost = if l.rs == 1 { 0 } else { k * m } + m * n;
        let transposed = match orient {
            Orient::Auto => trans_cost < direct_cost,
            Orient::Direct => false,
            Orient::Transposed => true,
        };
        if !transposed {
            let (rp, ldr, _buf) = rows_of(r, k, n);
            tiles(
                self,
                threads,
                (m, n, k),
                l,
                rp,
                ldr,
                dst,
                ldd,
                accumulate,
                beta,
            );
        } else {
            // Cᵀ (n×m) = Rᵀ·Lᵀ: Rᵀ(j,p) = R(p,j), Lᵀ(p,i) = L(i,p).
            let lt = View {
                ptr: r.ptr,
                rs: r.cs,
                cs: r.rs,
            };
            let rt = View {
                ptr: l.ptr,
                rs: l.cs,
                cs: l.rs,
            };
            let (rp, ldr, _buf) = rows_of(rt, k, m);
            let mut t = vec![0f32; n * m];
            tiles(
                self,
                threads,
                (n, m, k),
                lt,
                rp,
                ldr,
                t.as_mut_ptr(),
                m,
                false,
                beta,
            );
            for i in 0..m {
                let drow = std::slice::from_raw_parts_mut(dst.add(i * ldd), n);
                for (j, o) in drow.iter_mut().enumerate() {
                    let v = t[j * m + i];
                    *o = if accumulate { *o + v } else { v };
                }
            }
        }
        true
    }
}

/// `r` as rows of unit column stride: itself when it has them, else packed into a buffer.
unsafe fn rows_of(r: View, k: usize, n: usize) -> (*const f32, isize, Vec<f32>) {
    if r.cs == 1 {
        return (r.ptr, r.rs, Vec::new());
    }
    let mut buf = vec![0f32; k * n];
    for (p, row) in buf.chunks_exact_mut(n).enumerate() {
        let base = r.ptr.offset(p as isize * r.rs);
        for (j, o) in row.iter_mut().enumerate() {
            *o = *base.offset(j as isize * r.cs);
        }
    }
    let ptr = buf.as_ptr();
    (ptr, n as isize, buf)
}

/// Splits `C` over `threads` and runs the tile loops on each part.
#[allow(clippy::too_many_arguments)]
unsafe fn tiles(
    isa: Isa,
    threads: usize,
    (m, n, k): (usize, usize, usize),
    l: View,
    r: *const f32,
    ldr: isize,
    dst: *mut f32,
    ldd: usize,
    accumulate: bool,
    beta: f32,
) {
    let job = Job {
        l,
        r,
        ldr,
        dst,
        ldd,
        k,
        accumulate,
        beta,
        rows: (0, m),
        cols: (0, n),
    };
    let parts = if threads > 1 && m * n * k >= PAR_MIN_MACS {
        threads
    } else {
        1
    };
    if parts == 1 {
        isa.vectorize(job);
        return;
    }
    // Rows when each part gets at least 16 of them, else columns in multiples of 64.
    let split_rows = m >= 16 * parts;
    let (len, unit) = if split_rows { (m, 16) } else { (n, 64) };
    let per = len.div_ceil(parts).next_multiple_of(unit);
    let ranges: Vec<(usize, usize)> = (0..len)
        .step_by(per)
        .map(|s| (s, (s + per).min(len)))
        .collect();
    ranges.into_par_iter().for_each(|(a, b)| {
        let mut j = job;
        if split_rows {
            j.rows = (a, b);
        } else {
            j.cols = (a, b);
        }
        isa.vectorize(j);
    });
}

/// One part of a product: rows `rows.0..rows.1` × columns `cols.0..cols.1` of `C`.
#[derive(Clone, Copy)]
struct Job {
    l: View,
    r: *const f32,
    ldr: isize,
    dst: *mut f32,
    ldd: usize,
    k: usize,
    accumulate: bool,
    beta: f32,
    rows: (usize, usize),
    cols: (usize, usize),
}

// SAFETY: `l` and `r` are only read, and the parts of `tiles` write disjoint rows or columns
// of `dst`.
unsafe impl Send for Job {}
unsafe impl Sync for Job {}

impl WithSimd for Job {
    type Output = ();
    #[inline(always)]
    fn with_simd<S: Simd>(self, s: S) {
        let lanes = S::F32_LANES;
        let n = self.cols.1 - self.cols.0;
        // SAFETY: the caller's contract of `skinny_gemm`.
        unsafe {
            if lanes >= 16 || lanes <= 4 {
                // 32 vector registers (AVX-512, NEON) or scalar.
                if n <= lanes {
                    run::<S, 8, 1>(s, &self)
                } else if n <= 2 * lanes {
                    run::<S, 8, 2>(s, &self)
                } else {
                    run::<S, 4, 4>(s, &self)
                }
            } else if n <= lanes {
                // 16 registers (AVX2).
                run::<S, 8, 1>(s, &self)
            } else {
                run::<S, 6, 2>(s, &self)
            }
        }
    }
}

/// The tile loops of one part: full panels of `NV` vectors, then single vectors, then one
/// partial vector; within each, row tiles of `MR` then single rows.
#[inline(always)]
unsafe fn run<S: Simd, const MR: usize, const NV: usize>(s: S, j: &Job) {
    let lanes = S::F32_LANES;
    let (c0, c1) = j.cols;
    let mut c = c0;
    while c + NV * lanes <= c1 {
        rows::<S, MR, NV, false>(s, j, c, NV * lanes);
        c += NV * lanes;
    }
    while c + lanes <= c1 {
        rows::<S, MR, 1, false>(s, j, c, lanes);
        c += lanes;
    }
    if c < c1 {
        rows::<S, MR, 1, true>(s, j, c, c1 - c);
    }
}

#[inline(always)]
unsafe fn rows<S: Simd, const MR: usize, const NV: usize, const PARTIAL: bool>(
    s: S,
    j: &Job,
    c: usize,
    width: usize,
) {
    let (r0, r1) = j.rows;
    let mut i = r0;
    while i + MR <= r1 {
        tile::<S, MR, NV, PARTIAL>(s, j, i, c, width);
        i += MR;
    }
    while i < r1 {
        tile::<S, 1, NV, PARTIAL>(s, j, i, c, width);
        i += 1;
    }
}

/// `C[i0..i0+MR, c..c+width]`: `NV` full vectors, or (`PARTIAL`, `NV = 1`) `width` columns
/// fewer than a vector.
#[inline(always)]
unsafe fn tile<S: Simd, const MR: usize, const NV: usize, const PARTIAL: bool>(
    s: S,
    j: &Job,
    i0: usize,
    c: usize,
    width: usize,
) {
    let lanes = S::F32_LANES;
    let zero = s.splat_f32s(0.0);
    let mut acc = [[zero; NV]; MR];
    let r = j.r.add(c);
    let l = j.l.ptr.offset(i0 as isize * j.l.rs);
    let load = |p: *const f32| -> S::f32s {
        if PARTIAL {
            s.partial_load_f32s(std::slice::from_raw_parts(p, width))
        } else {
            (p as *const S::f32s).read_unaligned()
        }
    };
    for p in 0..j.k {
        let rrow = r.offset(p as isize * j.ldr);
        let mut rv = [zero; NV];
        for (v, o) in rv.iter_mut().enumerate() {
            *o = load(rrow.add(v * lanes));
        }
        let lp = l.offset(p as isize * j.l.cs);
        for (i, a) in acc.iter_mut().enumerate() {
            let b = s.splat_f32s(*lp.offset(i as isize * j.l.rs));
            for v in 0..NV {
                a[v] = s.mul_add_e_f32s(b, rv[v], a[v]);
            }
        }
    }
    let bv = s.splat_f32s(j.beta);
    let d = j.dst.add(i0 * j.ldd + c);
    for (i, a) in acc.iter().enumerate() {
        let drow = d.add(i * j.ldd);
        for (v, &av) in a.iter().enumerate() {
            let p = drow.add(v * lanes);
            let mut o = s.mul_f32s(bv, av);
            if j.accumulate {
                o = s.add_f32s(load(p), o);
            }
            if PARTIAL {
                s.partial_store_f32s(std::slice::from_raw_parts_mut(p, width), o);
            } else {
                (p as *mut S::f32s).write_unaligned(o);
            }
        }
    }
}
