//! Criterion benches (CPU): forward and backward of ours vs Candle's composed ops vs Candle's
//! built-in fused op, for a couple of shapes per op. Kept short (10 samples, ~1 s each); the
//! full side-by-side table with GB/s is `cargo run --release -- bench`.
//!
//! The inputs, impls and graph building are the bench module's (`candle_fused_cli::bench::memops`):
//! bwd of ours = the standalone backward fn; bwd of the composed ops = `loss.backward()` on a
//! graph built outside the timed region (`iter_batched`); `ours_autograd` the same through our op.

use std::time::Duration;

use candle_core::{DType, Device};
use candle_fused::Kernels;
use candle_fused_cli::bench::memops::{Impl, MemCase, SCALE};
use candle_fused_testkit::check::{MaskKind, OpKind};
use criterion::{criterion_group, criterion_main, BatchSize, Criterion};

fn cases() -> Vec<MemCase> {
    let mut v = Vec::new();
    for op in [
        OpKind::Softmax,
        OpKind::RmsNorm { weight: true },
        OpKind::AddRmsNorm,
    ] {
        for (shape, dtype) in [
            (vec![1, 128, 1024], DType::F32),
            (vec![256, 4096], DType::BF16),
        ] {
            v.push(MemCase {
                op,
                shape,
                dtype,
                kernels: Kernels::default(),
            });
        }
    }
    v.push(MemCase {
        op: OpKind::MaskedSoftmax {
            scale: SCALE,
            mask: MaskKind::None,
            causal: true,
        },
        shape: vec![1, 4, 128, 128],
        dtype: DType::F32,
        kernels: Kernels::default(),
    });
    v
}

fn bench_ops(c: &mut Criterion) {
    let dev = Device::Cpu;
    for case in cases() {
        let set = case.inputs(&dev, &mut case.stream()).expect("inputs");
        let id = format!(
            "{}/{}-{}",
            case.op.name(),
            case.shape
                .iter()
                .map(|d| d.to_string())
                .collect::<Vec<_>>()
                .join("x"),
            case.dtype.as_str()
        );
        let mut g = c.benchmark_group(id);
        g.sample_size(10)
            .warm_up_time(Duration::from_millis(300))
            .measurement_time(Duration::from_secs(1));
        let builtin = matches!(case.op, OpKind::Softmax | OpKind::RmsNorm { .. });
        let fwd_impls: &[Impl] = if builtin {
            &[Impl::Ours, Impl::Builtin, Impl::Composed]
        } else {
            &[Impl::Ours, Impl::Composed]
        };
        for &imp in fwd_impls {
            g.bench_function(format!("fwd/{}", imp.as_str()), |b| {
                b.iter(|| case.forward(imp, &set).expect("forward"))
            });
        }
        g.bench_function("bwd/ours", |b| {
            b.iter(|| case.backward(&set).expect("backward"))
        });
        for (name, fused) in [("ours_autograd", true), ("candle_composed", false)] {
            g.bench_function(format!("bwd/{name}"), |b| {
                b.iter_batched(
                    || case.graph(fused, &set).expect("graph"),
                    |(loss, vars)| (loss.backward().expect("backward"), vars),
                    BatchSize::PerIteration,
                )
            });
        }
        g.finish();
    }
}

criterion_group!(benches, bench_ops);
criterion_main!(benches);
