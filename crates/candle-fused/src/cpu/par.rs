//! [`par_rows`]: the parallel driver for ops whose outputs differ in row length or whose
//! inputs are not plain rows (RoPE's strided input, GLU's packed layout); tasks sized as in
//! [`super::rows`].

use rayon::prelude::*;

use super::{rows_per_task, OutPtr};
use crate::config::CpuConfig;

/// The parallel driver for ops whose outputs do not share one row length or whose inputs are
/// not plain rows (strided RoPE input, GLU's packed `[.., 2I]` layout): `n_rows` rows, output
/// `k` holding `row_lens[k]` elements per row. Tasks of whole rows (sized as in [`super::rows`], from
/// the elements they write) run `f(rows, [output rows])` with each output's slice for those
/// rows; the op reads its inputs itself and converts half types through its own scratch.
pub(crate) fn par_rows<T: Send + Sync, const M: usize, F>(
    cfg: &CpuConfig,
    n_rows: usize,
    outs: [&mut [T]; M],
    row_lens: [usize; M],
    f: F,
) where
    F: Fn(std::ops::Range<usize>, [&mut [T]; M]) + Sync,
{
    for (o, &l) in outs.iter().zip(&row_lens) {
        assert_eq!(o.len(), n_rows * l, "row driver: output length");
    }
    if n_rows == 0 {
        return;
    }
    let per_row: usize = row_lens.iter().sum::<usize>().max(1);
    let rpt = rows_per_task(cfg.task_elems, n_rows, per_row, usize::MAX);
    let n_tasks = n_rows.div_ceil(rpt);
    let ptrs: [OutPtr<T>; M] = outs.map(|o| OutPtr(o.as_mut_ptr()));
    let run_task = |task: usize| {
        let r = task * rpt..((task + 1) * rpt).min(n_rows);
        // SAFETY: rows r.start..r.end lie inside every output and belong to this task alone;
        // the slices live until the end of the call.
        let o: [&mut [T]; M] = std::array::from_fn(|k| unsafe {
            std::slice::from_raw_parts_mut(
                ptrs[k].0.add(r.start * row_lens[k]),
                r.len() * row_lens[k],
            )
        });
        f(r, o)
    };
    if n_rows * per_row < cfg.serial_below {
        (0..n_tasks).for_each(run_task);
    } else {
        (0..n_tasks).into_par_iter().for_each(run_task);
    }
}
