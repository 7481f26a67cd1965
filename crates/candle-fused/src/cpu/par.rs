//! [`par_rows`]: the parallel driver for ops whose outputs differ in row length or whose
//! inputs are not plain rows (RoPE's strided input, GLU's packed layout); tasks sized as in
//! [`super::rows`].

use rayon::prelude::*;

use super::{init_range, rows_per_task, Elem, OutBuf, OutPtr};
use crate::config::CpuConfig;

/// The parallel driver for ops whose outputs do not share one row length or whose inputs are
/// not plain rows (strided RoPE input, GLU's packed `[.., 2I]` layout): `n_rows` rows, output
/// `k` holding `row_lens[k]` elements per row. Tasks of whole rows (sized as in [`super::rows`], from
/// the elements they write) run `f(rows, [output rows])` with each output's slice for those
/// rows; the op reads its inputs itself and converts half types through its own scratch.
pub(crate) fn par_rows<T: Elem, const M: usize, F>(
    cfg: &CpuConfig,
    n_rows: usize,
    outs: [&mut OutBuf<T>; M],
    row_lens: [usize; M],
    f: F,
) where
    F: Fn(std::ops::Range<usize>, [&mut [T]; M]) + Sync,
{
    for (o, &l) in outs.iter().zip(&row_lens) {
        assert_eq!(o.len(), n_rows * l, "row driver: output length");
    }
    let poison: [bool; M] = std::array::from_fn(|k| outs[k].poison());
    let ptrs: [OutPtr<T>; M] = std::array::from_fn(|k| outs[k].ptr());
    if n_rows > 0 {
        let per_row: usize = row_lens.iter().sum::<usize>().max(1);
        let rpt = rows_per_task(cfg.task_elems, n_rows, per_row, usize::MAX);
        let n_tasks = n_rows.div_ceil(rpt);
        let run_task = |task: usize| {
            let r = task * rpt..((task + 1) * rpt).min(n_rows);
            // SAFETY: rows r.start..r.end lie inside every output and belong to this task
            // alone: they are initialised here, and the slices live until the end of the call.
            let o: [&mut [T]; M] = std::array::from_fn(|k| unsafe {
                let (a, b) = (r.start * row_lens[k], r.end * row_lens[k]);
                init_range(ptrs[k], a, b, poison[k]);
                std::slice::from_raw_parts_mut(ptrs[k].0.add(a), b - a)
            });
            f(r, o)
        };
        if n_rows * per_row < cfg.serial_below {
            (0..n_tasks).for_each(run_task);
        } else {
            (0..n_tasks).into_par_iter().for_each(run_task);
        }
    }
    for o in outs {
        // SAFETY: the tasks initialised every row of every output (length n_rows * row_len).
        unsafe { o.assume_filled() };
    }
}
