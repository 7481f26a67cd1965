//! GPU tests (the `cuda` feature; run on a machine with an NVIDIA GPU). Every op, forward and
//! backward, f32/f16/bf16, last dims from 1 to 262144 and odd row counts, against the f64
//! reference and against this crate's CPU backend, with outputs poisoned before each launch.
//! Modules: lora, rope, glu, cross_entropy, linear_cross_entropy (one per op), softmax (causal
//! S == T, T > S, T < S, learned masks, the bench shape), mismatch (device mismatch of the
//! arguments not covered here).
#![cfg(feature = "cuda")]

use candle_core::{DType, Device, Tensor, D};
use candle_fused_testkit::check::{self, Case, MaskKind, OpKind};
use candle_fused_testkit::testing::{self, poisoned};

pub(crate) fn gpu() -> Device {
    Device::new_cuda(0).expect("a CUDA device (these tests need a GPU)")
}

/// Runs `check::run` (poisoned outputs) on every case on the GPU, prints each comparison and
/// panics listing every failure and error (the modules' sweeps use it too).
pub(crate) fn run_cases(cases: &[Case]) {
    let dev = gpu();
    let mut failures = Vec::new();
    let mut n = 0;
    for case in cases {
        match check::run(&poisoned(), case, &dev) {
            Ok(outs) => {
                for o in outs {
                    n += 1;
                    println!(
                        "{:<28} {:<16} {:<18} {:<5} {:.2e} (tol {:.0e}) {}",
                        o.op,
                        format!("{:?}", o.shape),
                        o.what,
                        format!("{:?}", o.dtype),
                        o.rel_err,
                        o.tol,
                        if o.pass() { "PASS" } else { "FAIL" }
                    );
                    if !o.pass() {
                        failures.push(format!(
                            "{} {} {:?} {:?}: {:.3e}",
                            o.op, o.what, o.shape, o.dtype, o.rel_err
                        ));
                    }
                }
            }
            Err(e) => failures.push(format!(
                "{} {:?} {:?}: error {e}",
                case.op.name(),
                case.shape,
                case.dtype
            )),
        }
    }
    assert!(n > 0);
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

const DTYPES: [DType; 3] = [DType::F32, DType::F16, DType::BF16];

#[test]
fn sweep_all_ops() {
    run_cases(&check::sweep(&DTYPES));
}

#[test]
fn long_rows_and_odd_row_counts() {
    let mut cases = Vec::new();
    let shapes: Vec<Vec<usize>> = vec![
        vec![3, 8191],
        vec![5, 16384],
        vec![7, 32768],
        vec![3, 131072],
        vec![2, 262144],
        vec![1, 262143],
        vec![33, 4096],
        vec![1025, 1],
        vec![129, 3],
        // Slices of more than 4 packs per thread at 1024 threads (f32 > 16384, 16-bit > 32768
        // columns on one CTA): softmax's forward re-reads those packs from shared memory
        // instead of keeping them in registers.
        vec![3, 20000],
        vec![2, 40000],
    ];
    for &dtype in &DTYPES {
        cases.extend(check::row_cases(&shapes, &[dtype]));
        // Beyond 262144 columns only softmax's kernels run (the norms' backward is limited to
        // 262144: `rms_norm_backward_row_limit`).
        cases.push(Case {
            op: OpKind::Softmax,
            shape: vec![1, 262147],
            dtype,
        });
        for shape in [
            vec![2, 3, 9, 262144 / 8],
            vec![1, 2, 5, 4097],
            vec![1, 2, 3, 40000],
        ] {
            // A mask and causal (the masked kernel), and causal alone (the causal kernel).
            for mask in [MaskKind::Rows, MaskKind::None] {
                let op = OpKind::MaskedSoftmax {
                    scale: 0.3,
                    mask,
                    causal: true,
                };
                cases.push(Case {
                    op,
                    shape: shape.clone(),
                    dtype,
                });
            }
        }
    }
    run_cases(&cases);
}

/// Inputs that start at an odd element offset take the scalar (non-16-byte) path.
#[test]
fn misaligned_views_take_the_scalar_path() {
    let dev = gpu();
    for &dt in &DTYPES {
        let big = testing::randn(&[1, 4 * 1024 + 1], 1.0, dt, &dev).unwrap();
        let x = big
            .narrow(1, 1, 4 * 1024)
            .unwrap()
            .reshape((4, 1024))
            .unwrap();
        let xc = x.to_device(&Device::Cpu).unwrap();
        let w = testing::rand(&[1024], 0.5, 1.5, dt, &dev).unwrap();
        let tol = testing::tolerance(dt);
        let y = poisoned().softmax_last_dim(&x).unwrap();
        let yc = poisoned().softmax_last_dim(&xc).unwrap();
        assert!(testing::rel_err(&y, &yc).unwrap() < tol);
        let y = poisoned().rms_norm(&x, Some(&w), 1e-6).unwrap();
        let yc = poisoned()
            .rms_norm(&xc, Some(&w.to_device(&Device::Cpu).unwrap()), 1e-6)
            .unwrap();
        assert!(testing::rel_err(&y, &yc).unwrap() < tol);
    }
}

/// More rows than one launch's grid covers (the kernels walk rows grid-stride).
#[test]
fn many_rows_grid_stride() {
    let dev = gpu();
    let rows = (1usize << 24) + 3;
    let x = testing::randn(&[rows, 2], 1.0, DType::F32, &dev).unwrap();
    let xc = x.to_device(&Device::Cpu).unwrap();
    let y = poisoned().softmax_last_dim(&x).unwrap();
    let yc = poisoned().softmax_last_dim(&xc).unwrap();
    assert!(testing::rel_err(&y, &yc).unwrap() < 1e-6);
    let y = poisoned().rms_norm(&x, None, 1e-6).unwrap();
    let yc = poisoned().rms_norm(&xc, None, 1e-6).unwrap();
    assert!(testing::rel_err(&y, &yc).unwrap() < 1e-6);
}

#[test]
fn rms_norm_weight_grad_is_deterministic() {
    let dev = gpu();
    for &dt in &DTYPES {
        let x = testing::randn(&[5000, 1024], 1.0, dt, &dev).unwrap();
        let w = testing::rand(&[1024], 0.5, 1.5, dt, &dev).unwrap();
        let dy = testing::randn(&[5000, 1024], 1.0, dt, &dev).unwrap();
        let (_, dw1) = poisoned()
            .rms_norm_backward(&x, Some(&w), &dy, 1e-6)
            .unwrap();
        let (_, dw2) = poisoned()
            .rms_norm_backward(&x, Some(&w), &dy, 1e-6)
            .unwrap();
        let a = dw1
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let b = dw2
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert!(
            a.iter().zip(&b).all(|(p, q)| p.to_bits() == q.to_bits()),
            "{dt:?} dw differs run to run"
        );
    }
}

#[test]
fn non_contiguous_inputs_on_gpu() {
    let dev = gpu();
    let x = testing::randn(&[64, 48], 1.0, DType::F32, &dev)
        .unwrap()
        .t()
        .unwrap();
    let w = testing::rand(&[64], 0.5, 1.5, DType::F32, &dev).unwrap();
    let y = poisoned().rms_norm(&x, Some(&w), 1e-6).unwrap();
    let r = poisoned()
        .rms_norm(&x.contiguous().unwrap(), Some(&w), 1e-6)
        .unwrap();
    assert!(testing::rel_err(&y, &r).unwrap() == 0.0);
    let m = testing::randn(&[64], 1.0, DType::F32, &dev).unwrap();
    let ys = poisoned().masked_softmax(&x, 0.5, Some(&m), true).unwrap();
    let rs = candle_fused_testkit::reference::masked_softmax(&x, 0.5, Some(&m), true).unwrap();
    assert!(testing::rel_err(&ys, &rs).unwrap() < 1e-5);
}

#[test]
fn too_long_rows_and_f64_are_clear_errors() {
    let dev = gpu();
    let x = testing::randn(&[1, 8 << 20], 1.0, DType::F32, &dev).unwrap();
    let e = poisoned().softmax_last_dim(&x).unwrap_err().to_string();
    assert!(e.contains("do not fit on chip"), "{e}");
    // f64: the same clear error from every op (LoRA included).
    let k = poisoned();
    let x = testing::randn(&[2, 8], 1.0, DType::F64, &dev).unwrap();
    let w = testing::rand(&[8], 0.5, 1.5, DType::F64, &dev).unwrap();
    let wl = testing::randn(&[6, 8], 1.0, DType::F64, &dev).unwrap();
    let a = testing::randn(&[2, 8], 1.0, DType::F64, &dev).unwrap();
    let b = testing::randn(&[6, 2], 1.0, DType::F64, &dev).unwrap();
    let dy = testing::randn(&[2, 6], 1.0, DType::F64, &dev).unwrap();
    let errs = [
        ("softmax_last_dim", k.softmax_last_dim(&x).map(|_| ())),
        (
            "masked_softmax",
            k.masked_softmax(&x, 0.5, None, true).map(|_| ()),
        ),
        (
            "softmax_backward",
            k.softmax_backward(&x, &x, 1.0).map(|_| ()),
        ),
        ("rms_norm", k.rms_norm(&x, Some(&w), 1e-5).map(|_| ())),
        (
            "rms_norm_backward",
            k.rms_norm_backward(&x, Some(&w), &x, 1e-5).map(|_| ()),
        ),
        ("add_rms_norm", k.add_rms_norm(&x, &x, &w, 1e-5).map(|_| ())),
        (
            "add_rms_norm_backward",
            k.add_rms_norm_backward(&x, &w, &x, &x, 1e-5).map(|_| ()),
        ),
        (
            "lora_linear",
            k.lora_linear(&x, &wl, None, &a, &b, 0.5).map(|_| ()),
        ),
        (
            "lora_linear_backward",
            k.lora_linear_backward(&x, &wl, None, &a, &b, 0.5, &dy)
                .map(|_| ()),
        ),
        ("linear", k.linear(&x, &wl, None).map(|_| ())),
    ];
    for (op, r) in errs {
        let e = r.expect_err(op).to_string();
        assert!(
            e.contains(&format!("candle-fused {op}:"))
                && e.contains("not supported by the CUDA kernels"),
            "{op}: {e}"
        );
    }
}

/// An argument on another device than `x` is a clear error naming the op and the argument,
/// for every op and every argument that can be misplaced (the CPU-only suites cannot test it).
#[test]
fn device_mismatch_is_a_clear_error_for_every_op() {
    mismatch::every_op();
}

#[test]
fn fully_masked_rows_are_zero_on_gpu() {
    let dev = gpu();
    // T < S: the first S - T rows see nothing under the causal mask.
    let x = testing::randn(&[2, 6, 4], 1.0, DType::BF16, &dev).unwrap();
    let y = poisoned().masked_softmax(&x, 1.0, None, true).unwrap();
    let first = y
        .narrow(1, 0, 2)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .abs()
        .unwrap()
        .sum_all()
        .unwrap();
    assert_eq!(first.to_scalar::<f32>().unwrap(), 0.0);
    let sums = y
        .narrow(1, 2, 4)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .sum(D::Minus1)
        .unwrap();
    let s = sums.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert!(s.iter().all(|v| (v - 1.0).abs() < 1e-2), "{s:?}");
}

/// Small shapes of every op, forward and backward, including the cluster path (a 65536-long row
/// spans several CTAs): what compute-sanitizer runs (scripts/gpu-run.sh sanitize).
#[test]
fn sanitizer_small() {
    let mut cases = Vec::new();
    for dtype in [DType::F32, DType::BF16] {
        let shapes = [vec![3, 7], vec![2, 1000], vec![1, 65536]];
        cases.extend(check::row_cases(&shapes, &[dtype]));
        let op = OpKind::MaskedSoftmax {
            scale: 0.5,
            mask: MaskKind::Learned,
            causal: true,
        };
        cases.push(Case {
            op,
            shape: vec![2, 3, 5, 9],
            dtype,
        });
    }
    run_cases(&cases);
}

mod lora;

#[test]
fn lora_sweep() {
    lora::sweep_vs_reference_and_cpu()
}

#[test]
fn lora_large_shapes() {
    lora::large_shapes_vs_composed_f64_on_gpu()
}

#[test]
fn lora_grad_flags_and_errors() {
    lora::gradient_flags_and_bad_input()
}

#[test]
fn lora_module() {
    lora::module_trains_merges_and_round_trips()
}

#[test]
fn lora_standalone_backward() {
    lora::standalone_backward_matches_autograd_and_cpu()
}

/// The RMSNorm backward keeps each thread's dw columns in registers: at most 16384 columns per
/// CTA, 16 CTAs per row, so rows beyond 262144 are a clear error (and 262144 works).
#[test]
fn rms_norm_backward_row_limit() {
    let dev = gpu();
    let d = 262144 + 8;
    let x = testing::randn(&[2, d], 1.0, DType::F32, &dev).unwrap();
    let w = testing::rand(&[d], 0.5, 1.5, DType::F32, &dev).unwrap();
    let dy = testing::randn(&[2, d], 1.0, DType::F32, &dev).unwrap();
    let y = poisoned().rms_norm(&x, Some(&w), 1e-6).unwrap();
    assert_eq!(y.dims(), &[2, d]);
    let e = poisoned()
        .rms_norm_backward(&x, Some(&w), &dy, 1e-6)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("do not fit on chip") && e.contains("262144"),
        "{e}"
    );
    // The scalar path (odd length) has the same limit; the forward still runs.
    let d = 262147;
    let x = testing::randn(&[1, d], 1.0, DType::BF16, &dev).unwrap();
    let w = testing::rand(&[d], 0.5, 1.5, DType::BF16, &dev).unwrap();
    assert!(poisoned().rms_norm(&x, Some(&w), 1e-6).is_ok());
    let e = poisoned()
        .rms_norm_backward(&x, Some(&w), &x, 1e-6)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("do not fit on chip") && e.contains("at most 262144"),
        "{e}"
    );
}

/// Nearly one-hot rows (1 − max y ≈ 3e-4): dy_j − ⟨dy, y⟩ cancels, and a plain f32 dot would
/// be off by ~2e-4; the GPU backward keeps the CPU's precision. (Its compensated f32 dot holds
/// down to 1 − max y ≈ 1e-9; beyond that only the CPU's f64 path does.)
#[test]
fn softmax_backward_one_hot_rows_on_gpu() {
    let dev = gpu();
    for &dt in &[DType::F32, DType::BF16] {
        let x = testing::randn(&[64, 1000], 1.0, DType::F32, &Device::Cpu).unwrap();
        let bump = Tensor::zeros((64, 1000), DType::F32, &Device::Cpu)
            .unwrap()
            .slice_assign(
                &[0..64, 7..8],
                &Tensor::full(15f32, (64, 1), &Device::Cpu).unwrap(),
            )
            .unwrap();
        let x = (x + bump).unwrap().to_dtype(dt).unwrap();
        let y = poisoned().softmax_last_dim(&x).unwrap();
        let dy = testing::randn(&[64, 1000], 1.0, dt, &Device::Cpu).unwrap();
        let cpu = poisoned().softmax_backward(&y, &dy, 1.0).unwrap();
        let g = poisoned()
            .softmax_backward(
                &y.to_device(&dev).unwrap(),
                &dy.to_device(&dev).unwrap(),
                1.0,
            )
            .unwrap();
        let err = testing::rel_err(&g, &cpu).unwrap();
        assert!(err < testing::tolerance(dt), "{dt:?}: {err:e}");
    }
}

/// A masked row with NaN among -inf logits is NaN (as in the reference), not a masked zero row.
#[test]
fn nan_in_fully_masked_row_is_nan_on_gpu() {
    let dev = gpu();
    let x = Tensor::new(&[[f32::NAN, 1.0, 2.0], [0.5, 1.0, 2.0]], &dev).unwrap();
    let m = Tensor::new(
        &[
            [f32::NEG_INFINITY, f32::NEG_INFINITY, f32::NEG_INFINITY],
            [0.0, 0.0, 0.0],
        ],
        &dev,
    )
    .unwrap();
    let y = poisoned()
        .masked_softmax(&x, 1.0, Some(&m), false)
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    assert!(y[0].iter().all(|v| v.is_nan()), "{y:?}");
    assert!(y[1].iter().all(|v| v.is_finite()), "{y:?}");
}

mod rope;

#[test]
fn rope_sweep_and_bench_shapes() {
    rope::sweep_and_bench_shapes()
}

#[test]
fn rope_misaligned_strided_and_odd() {
    rope::misaligned_strided_and_odd()
}

#[test]
fn rope_errors_and_stale_positions() {
    rope::errors_and_stale_positions()
}

#[test]
fn rope_sanitizer_small() {
    rope::sanitizer_small()
}

mod glu;

#[test]
fn glu_sweep_and_bench_shapes() {
    glu::sweep_and_bench_shapes()
}

#[test]
fn glu_misaligned_and_odd() {
    glu::misaligned_and_odd()
}

#[test]
fn glu_sanitizer_small() {
    glu::sanitizer_small()
}

mod cross_entropy;
mod linear_cross_entropy;

#[test]
fn cross_entropy_sweep() {
    cross_entropy::sweep_vs_reference_and_cpu()
}

#[test]
fn cross_entropy_misaligned_and_many_rows() {
    cross_entropy::misaligned_and_many_rows()
}

#[test]
fn cross_entropy_deterministic_and_device_mismatch() {
    cross_entropy::deterministic_and_device_mismatch()
}

#[test]
fn linear_cross_entropy_sweep() {
    linear_cross_entropy::sweep_vs_reference_and_cpu()
}

#[test]
fn linear_cross_entropy_large_shapes() {
    linear_cross_entropy::large_shapes_vs_composed_f64()
}

#[test]
fn linear_cross_entropy_memory() {
    linear_cross_entropy::memory_is_chunk_sized()
}

#[test]
fn linear_cross_entropy_device_mismatch() {
    linear_cross_entropy::device_mismatch()
}

mod mismatch;
mod softmax;

#[test]
fn causal_softmax_square_offsets_and_learned_masks() {
    softmax::causal_square_offsets_and_masks();
}

#[test]
fn causal_softmax_bench_shape_bf16() {
    softmax::causal_bench_shape_bf16();
}

#[test]
fn device_mismatch_remaining_arguments() {
    mismatch::remaining_arguments();
}
