//! Unit tests of the row drivers and the output buffers.

use super::*;

/// The drivers initialise every element of their outputs before the kernel runs: zeros
/// normally, NaN under poison (so a kernel that skips an element is caught), for rows the
/// kernel leaves alone as well as for what the kernel writes; the serial and the parallel
/// paths, one and two outputs, empty outputs.
#[test]
fn drivers_initialise_every_output_element() {
    for serial_below in [usize::MAX, 0] {
        let cfg = CpuConfig {
            serial_below,
            task_elems: 64,
            ..CpuConfig::default()
        };
        for poison in [false, true] {
            for (rows, d) in [(0usize, 5usize), (1, 1), (37, 33), (300, 7)] {
                let x: Vec<f32> = (0..rows * d).map(|i| i as f32).collect();
                let (mut a, mut b) = (OutBuf::new(rows * d, poison), OutBuf::new(rows * d, poison));
                // Writes output 0 of even rows only; output 1 never.
                rows_at(
                    &cfg,
                    Isa::Scalar,
                    [&x[..]],
                    [&mut a, &mut b],
                    d,
                    0,
                    |r, [x], [y, _], _| {
                        if r % 2 == 0 {
                            y.copy_from_slice(x)
                        }
                    },
                );
                let (a, b) = (a.into_vec(), b.into_vec());
                assert_eq!((a.len(), b.len()), (rows * d, rows * d));
                for (i, (&va, &vb)) in a.iter().zip(&b).enumerate() {
                    let written = (i / d) % 2 == 0;
                    let untouched = |v: f32| if poison { v.is_nan() } else { v == 0.0 };
                    assert!(
                        if written { va == x[i] } else { untouched(va) },
                        "{rows}x{d} a[{i}] = {va}"
                    );
                    assert!(untouched(vb), "{rows}x{d} b[{i}] = {vb}");
                }
                let mut g: OutBuf<half::bf16> = OutBuf::new(rows * 2 * d, poison);
                par_rows(&cfg, rows, [&mut g], [2 * d], |_, [_]| {});
                let g = g.into_vec();
                assert_eq!(g.len(), rows * 2 * d);
                assert!(g.iter().all(|v| if poison {
                    v.is_nan()
                } else {
                    v.to_f32() == 0.0
                }));
            }
        }
    }
}

#[test]
#[should_panic(expected = "not filled")]
fn an_output_buffer_no_driver_filled_is_refused() {
    let _ = OutBuf::<f32>::new(4, false).into_vec();
}

#[test]
fn task_split_bounds_the_task_count() {
    for &(rows, d) in &[
        (1usize, 1usize),
        (7, 3),
        (1000, 4096),
        (100_000, 2),
        (5, 1 << 20),
    ] {
        let rpt = rows_per_task(1 << 15, rows, d, 64);
        assert!(rpt >= 1 && rpt <= rows);
        assert!(rows.div_ceil(rpt) <= 64, "{rows}x{d}: {rpt} rows per task");
    }
}
