//! CPU kernels for softmax: rows in parallel, three sweeps over a row that stays in cache
//! (max; exp and sum written to the output; scale), each at the SIMD level of the
//! configuration (`crate::simd`), f32 accumulation for halves.

use candle_core::{CpuStorage, Layout, Result};
use num_traits::{Float, Zero};

use super::{SoftmaxBwd, SoftmaxFwd};
use crate::config::KernelConfig;
use crate::cpu::{self, Acc, Elem};
use crate::seam::Inputs;
use crate::simd::Isa;

/// The mask in the accumulation type (borrowed when it already is), and its index.
type MaskParts<'a, A> = (Option<std::borrow::Cow<'a, [A]>>, Option<MaskIndex>);

/// Where the mask value of (row, column) lives in the mask's storage.
struct MaskIndex {
    start: usize,
    /// dims and strides of the leading (row) dims, innermost last.
    lead: Vec<(usize, usize)>,
    col_stride: usize,
}

impl MaskIndex {
    fn new(l: &Layout) -> Self {
        let dims = l.dims();
        let strides = l.stride();
        let r = dims.len();
        Self {
            start: l.start_offset(),
            lead: dims[..r - 1]
                .iter()
                .copied()
                .zip(strides[..r - 1].iter().copied())
                .collect(),
            col_stride: strides[r - 1],
        }
    }

    fn row_offset(&self, mut row: usize) -> usize {
        let mut off = self.start;
        for &(d, s) in self.lead.iter().rev() {
            off += (row % d) * s;
            row /= d;
        }
        off
    }

    /// One past the largest offset used.
    fn extent(&self, cols: usize) -> usize {
        let lead: usize = self.lead.iter().map(|&(d, s)| (d - 1) * s).sum();
        self.start + lead + (cols - 1) * self.col_stride + 1
    }
}

pub(super) fn forward<T: Elem>(
    op: &SoftmaxFwd,
    cfg: &KernelConfig,
    ins: &Inputs<CpuStorage>,
) -> Result<Vec<CpuStorage>> {
    let (s, l) = ins.get(0)?;
    let mask = ins.opt(1);
    let x = cpu::slice::<T>(op.name, "x", s, l)?;
    let isa = Isa::new(op.name, cfg.cpu.simd)?;
    let dims = l.dims();
    let t = dims[dims.len() - 1];
    let s_rows = if dims.len() >= 2 {
        dims[dims.len() - 2]
    } else {
        1
    };
    let mut out = cpu::OutBuf::<T>::new(x.len(), cfg.poison);
    let plain = mask.is_none() && !op.causal && op.scale == 1.0;
    if plain {
        cpu::rows_at(&cfg.cpu, isa, [x], [&mut out], t, 0, |_, [x], [y], _| {
            let m = T::A::v_max(isa, x);
            let sum = T::A::v_exp_sub_sum(isa, x, y, m);
            // A fully masked row is zeros, unless it holds a NaN (NaN propagates).
            let zero =
                op.zero_masked_rows && m == T::A::neg_infinity() && !x.iter().any(|v| v.is_nan());
            normalize(isa, y, sum, zero);
        });
    } else {
        // The mask, in the accumulation type, read through its (broadcast) strides.
        let (mask_vals, index): MaskParts<T::A> = match mask {
            None => (None, None),
            Some((ms, ml)) => {
                let data = T::cpu_storage_as_slice(ms)?;
                let index = MaskIndex::new(ml);
                let data = &data[..index.extent(t).min(data.len())];
                let vals = match T::as_acc(data) {
                    Some(a) => std::borrow::Cow::Borrowed(a),
                    None => std::borrow::Cow::Owned(cpu::to_acc_vec(data)),
                };
                (Some(vals), Some(index))
            }
        };
        let scale = T::A::of(op.scale);
        let neg_inf = T::A::neg_infinity();
        cpu::rows_at(&cfg.cpu, isa, [x], [&mut out], t, 0, |r, [x], [z], _| {
            let vis = if op.causal {
                let i = (r % s_rows) as i64;
                (i + t as i64 - s_rows as i64 + 1).clamp(0, t as i64) as usize
            } else {
                t
            };
            let (zv, zh) = z.split_at_mut(vis);
            zh.fill(T::A::zero());
            match (&mask_vals, &index) {
                (Some(mv), Some(ix)) => {
                    let off = ix.row_offset(r);
                    match ix.col_stride {
                        0 => T::A::v_scale_add_const(isa, &x[..vis], scale, mv[off], zv),
                        1 => T::A::v_scale_add(isa, &x[..vis], scale, &mv[off..off + vis], zv),
                        cs => {
                            for (j, (zj, &xj)) in zv.iter_mut().zip(x).enumerate() {
                                *zj = scale * xj + mv[off + j * cs];
                            }
                        }
                    }
                }
                _ => {
                    zv.copy_from_slice(&x[..vis]);
                    T::A::v_scale(isa, zv, scale);
                }
            }
            let m = T::A::v_max(isa, zv);
            let all_masked = vis == 0 || m == neg_inf;
            // `max` skips NaN: a row of -inf and NaN is not "fully masked", its NaN propagates.
            if all_masked && op.zero_masked_rows && !zv.iter().any(|v| v.is_nan()) {
                zv.fill(T::A::zero());
                return;
            }
            let sum = T::A::v_exp_sub_sum_inplace(isa, zv, m);
            normalize(isa, zv, sum, false);
            if sum.is_nan() {
                // A NaN (or +inf) logit makes the whole row NaN, causally hidden columns
                // included, as an additive -inf mask and the f64 reference do.
                zh.fill(T::A::nan());
            }
        });
    }
    Ok(vec![T::to_cpu_storage_owned(out.into_vec())])
}

#[inline(always)]
fn normalize<A: Acc>(isa: Isa, y: &mut [A], sum: A, zero: bool) {
    if zero {
        y.fill(A::zero());
        return;
    }
    A::v_scale(isa, y, A::one() / sum);
}

pub(super) fn backward<T: Elem>(
    op: &SoftmaxBwd,
    cfg: &KernelConfig,
    ins: &Inputs<CpuStorage>,
) -> Result<Vec<CpuStorage>> {
    let (ys, yl) = ins.get(0)?;
    let (gs, gl) = ins.get(1)?;
    let y = cpu::slice::<T>(op.name, "y", ys, yl)?;
    let g = cpu::slice::<T>(op.name, "dy", gs, gl)?;
    let dims = yl.dims();
    let t = dims[dims.len() - 1];
    let mut out = cpu::OutBuf::<T>::new(y.len(), cfg.poison);
    let scale = op.scale;
    let isa = Isa::new(op.name, cfg.cpu.simd)?;
    cpu::rows_at(
        &cfg.cpu,
        isa,
        [y, g],
        [&mut out],
        t,
        0,
        |_, [y, g], [dx], _| {
            // ⟨dy, y⟩ and `dy − ⟨dy, y⟩` in f64 (products of f32 values are exact there): for a
            // nearly one-hot row `dy_max − ⟨dy, y⟩` cancels, and in f32 only rounding noise of
            // `⟨dy, y⟩` would be left (relative errors ~1e-4 at logit gaps of ~10).
            let dot = T::A::v_dot_wide(isa, y, g);
            T::A::v_softmax_bwd_row(isa, y, g, dot, scale, dx);
        },
    );
    Ok(vec![T::to_cpu_storage_owned(out.into_vec())])
}
