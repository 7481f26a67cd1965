//! The benchmark behind `candle-fused bench` (and the pieces `benches/ops.rs` reuses).
//!
//! For each op, shape and dtype it times, side by side in one run, ours against Candle's
//! composed ops and Candle's built-in fused op, for the forward, the backward and
//! forward+backward; measures the device's copy bandwidth in the same run; and reports each
//! row's GB/s, % of copy bandwidth and how many times faster ours is (see [`report::LEGEND`]).
//!
//! Layout: [`timing`] (median timer, CUDA events, copy bandwidth), [`cases`] (the shapes),
//! [`memops`] (inputs, bytes and implementations of the memory-bound ops), [`lora`] (the
//! LoRA linear: flops, bytes, impls), [`gemm`] (the matrix products), [`rope_glu`] (RoPE,
//! SwiGLU/GeGLU), [`report`] (rows, tables, JSON).
//!
//! ## Adding an op family (as [`lora`] does)
//! Write `src/bench/<family>.rs` with a type implementing [`Family`] (its `run` builds random
//! inputs, times each impl with [`timing::Timer`] and calls [`report::Collector::record`]
//! with a [`report::Key`]; compute-bound ops pass `flops` so rows get TFLOP/s), and add it to
//! [`families`]. `scripts/bench_torch.py` has the matching hook for the PyTorch side.

pub mod cases;
pub mod gemm;
pub mod lora;
pub mod loss;
pub mod memops;
pub mod memory;
pub mod report;
pub mod rope_glu;
pub mod timing;
pub mod train;

use candle_core::{Device, Result, Tensor};

use candle_fused::{KernelConfig, Kernels};
use cases::Scope;
use report::{Collector, Header, Report};
use timing::{Budget, Timer};

/// A family of benchmarked ops, selected by name with `--op`.
pub trait Family {
    /// The name `--op` matches (e.g. `softmax`).
    fn name(&self) -> &'static str;
    /// Times every case of the family for `plan`, recording rows (and skips) in `out`.
    fn run(&self, scope: Scope, timer: &Timer, out: &mut Collector);
}

/// A memory-bound family: its cases come from [`cases::mem_cases`].
pub struct MemFamily(pub &'static str);

impl Family for MemFamily {
    fn name(&self) -> &'static str {
        self.0
    }
    fn run(&self, scope: Scope, timer: &Timer, out: &mut Collector) {
        let cases = cases::mem_cases(self.0, scope);
        for (i, case) in cases.iter().enumerate() {
            eprintln!(
                "[{}/{}] {} {} {} ({} input set(s))",
                i + 1,
                cases.len(),
                case.op.name(),
                report::shape_str(&case.shape),
                case.dtype.as_str(),
                memops::sets_for(case.set_bytes())
            );
            memops::run_case(case, timer, out);
            out.checkpoint();
        }
    }
}

/// Every family, in the order they run.
pub fn families() -> Vec<Box<dyn Family>> {
    vec![
        Box::new(MemFamily("softmax")),
        Box::new(MemFamily("masked_softmax")),
        Box::new(MemFamily("rms_norm")),
        Box::new(MemFamily("add_rms_norm")),
        Box::new(lora::LoraFamily),
        Box::new(rope_glu::RopeGluFamily("rope")),
        Box::new(rope_glu::RopeGluFamily("glu")),
        Box::new(loss::LossFamily(loss::CE)),
        Box::new(loss::LossFamily(loss::LCE)),
        Box::new(gemm::GemmFamily),
    ]
}

/// The kernels of the candidate configuration `name` (`KernelConfig::candidates()`).
pub fn kernels_named(name: &str) -> Result<Kernels> {
    let all = KernelConfig::candidates();
    match all.iter().find(|(n, _)| *n == name) {
        Some((_, c)) => Ok(Kernels::new(*c)),
        None => {
            let names: Vec<&str> = all.iter().map(|(n, _)| *n).collect();
            candle_core::bail!(
                "unknown --kernel-config {name:?}, expected one of {}",
                names.join(", ")
            )
        }
    }
}

/// `cpu` or `cuda` (GPU 0). Without the `cuda` feature, `cuda` is a clear error.
/// `cuda_events`: keep cudarc's event tracking (Candle's default); see [`cuda_device`].
pub fn device_from_name(name: &str, cuda_events: bool) -> Result<Device> {
    match name {
        "cpu" => Ok(Device::Cpu),
        "cuda" => {
            #[cfg(feature = "cuda")]
            {
                cuda_device(cuda_events)
            }
            #[cfg(not(feature = "cuda"))]
            {
                let _ = cuda_events;
                candle_core::bail!(
                    "candle-fused: built without CUDA (rebuild with --features cuda)"
                )
            }
        }
        other => candle_core::bail!("candle-fused: unknown device {other:?}, expected cpu or cuda"),
    }
}

/// GPU 0. cudarc (under Candle) by default creates two CUDA events with every allocation and
/// records them at every use, to order work between streams; Candle and candle-fused run all
/// work of a device on its one stream, so a program that makes no other stream (this CLI)
/// can go without them (`events` false): a host-side cost of every op (BENCHMARKS.md,
/// 2026-12-02 s5).
#[cfg(feature = "cuda")]
pub fn cuda_device(events: bool) -> Result<Device> {
    let d = Device::new_cuda(0)?;
    if !events {
        if let Device::Cuda(c) = &d {
            // SAFETY: no tensor of this device exists yet, and this program launches work on
            // Candle's one stream only (no other stream is created), which is the condition
            // cudarc states for turning the tracking off.
            unsafe { c.disable_event_tracking() };
        }
    }
    Ok(d)
}

/// The bench's training-like loss `Σ y ⊙ probe` (its gradient for `y` is `probe`), reduced in
/// two stages: over the last dim (one result per row, in parallel), then over the rows.
/// With `sum_all` alone (Candle's CUDA reduction of a whole tensor to one value) the RoPE bf16
/// [1, 32, 4096, 128] fwd+bwd row took 1,671 µs on an H200 (2026-12-02) against 22 µs for each
/// of its forward and standalone backward: the rows timed Candle's reduction, not the op.
pub(crate) fn probe_loss(y: &Tensor, probe: &Tensor) -> Result<Tensor> {
    let p = (y * probe)?;
    let last = p.dim(candle_core::D::Minus1)?;
    p.reshape(((), last))?.sum(1)?.sum_all()
}

/// What to bench.
#[derive(Debug, Clone)]
pub struct Config {
    pub device: Device,
    pub quick: bool,
    /// Family names to run (`None`: all).
    pub ops: Option<Vec<String>>,
    /// Save the rows measured so far here after each case (the caller writes the final
    /// report over it).
    pub checkpoint: Option<std::path::PathBuf>,
    /// The kernel configuration ours run on, with its name (one of
    /// `KernelConfig::candidates()`; recorded in the report).
    pub kernels: (String, Kernels),
    /// The seed of the random inputs (recorded in the report; `CANDLE_FUSED_SEED` reruns it).
    pub seed: u64,
    /// Calls per timed sample ([`Budget::stream`]; 1: each call alone).
    pub stream: usize,
    /// CUDA: whether `device` keeps cudarc's event tracking ([`cuda_device`]; recorded).
    pub cuda_events: bool,
    /// Keep freed host memory in glibc's heap (`candle_fused_train::keep_freed_memory`, as
    /// `finetune` runs; recorded): outputs reuse warm pages instead of faulting in fresh ones.
    pub keep_freed_memory: bool,
}

/// Bytes of the copy that measures the copy bandwidth: 1 GiB per buffer on a GPU, 256 MiB on
/// the CPU.
fn copy_bytes(device: &Device) -> usize {
    if device.is_cpu() {
        256 << 20
    } else {
        1 << 30
    }
}

/// Runs the bench. The copy bandwidth is measured before and after the ops; the higher of
/// the two is the reference for % copy (both are in the header's notes).
pub fn run(cfg: &Config) -> Result<Report> {
    let heap_kept = cfg.keep_freed_memory && candle_fused_train::keep_freed_memory();
    let fams = families();
    let selected: Vec<&Box<dyn Family>> = match &cfg.ops {
        None => fams.iter().collect(),
        Some(names) => {
            for n in names {
                if !fams.iter().any(|f| f.name() == n) {
                    let known: Vec<_> = fams.iter().map(|f| f.name()).collect();
                    candle_core::bail!(
                        "candle-fused bench: unknown --op {n:?}, expected one of {}",
                        known.join(", ")
                    )
                }
            }
            fams.iter()
                .filter(|f| names.iter().any(|n| n == f.name()))
                .collect()
        }
    };
    let device = &cfg.device;
    let budget = Budget {
        stream: cfg.stream.max(1),
        ..Budget::new(device, cfg.quick)
    };
    let timer = Timer::new(device, budget)?;
    let scope = Scope {
        cuda: device.is_cuda(),
        quick: cfg.quick,
        kernels: cfg.kernels.1,
    };
    let device_name = timing::device_name(device);
    let cb = copy_bytes(device);
    eprintln!(
        "candle-fused bench on {device_name}: measuring copy bandwidth ({} MiB)...",
        cb >> 20
    );
    let before = timing::copy_bandwidth(&timer, cb)?;
    eprintln!("copy bandwidth: {:.1} GB/s", before.gbps);
    let dev_kind = if device.is_cpu() { "cpu" } else { "cuda" };
    let header = |copy_gbps: f64, mode: &str, notes: Vec<String>| Header {
        tool: "candle-fused bench".into(),
        date: report::utc_now(),
        device: dev_kind.into(),
        device_name: device_name.clone(),
        copy_gbps,
        copy_bytes: cb,
        git_commit: report::git_commit(),
        mode: mode.into(),
        kernel_config: cfg.kernels.0.clone(),
        host_heap: if heap_kept { "keep" } else { "release" }.into(),
        seed: cfg.seed,
        legend: report::LEGEND.into(),
        notes,
    };
    let mut out = Collector {
        device: dev_kind.into(),
        device_name: device_name.clone(),
        copy_gbps: before.gbps,
        rows: vec![],
        skipped: vec![],
        checkpoint: cfg.checkpoint.clone().map(|p| {
            let note = "partial: the run was cut short; % copy uses the copy bandwidth measured \
                        before the ops"
                .to_string();
            (p, header(before.gbps, "partial", vec![note]))
        }),
    };
    for f in selected {
        f.run(scope, &timer, &mut out);
    }
    let after = timing::copy_bandwidth(&timer, cb)?;
    let copy_gbps = before.gbps.max(after.gbps);
    for r in &mut out.rows {
        r.pct_copy = 100.0 * r.gbps / copy_gbps;
    }
    out.finish();
    let mut notes = vec![format!(
        "copy bandwidth {:.1} GB/s before the ops and {:.1} GB/s after ({} MiB copy, {} reps); \
         % copy uses the higher",
        before.gbps,
        after.gbps,
        cb >> 20,
        before.stats.reps
    )];
    if device.is_cpu() {
        notes.push(format!("rayon threads: {}", rayon::current_num_threads()));
    }
    notes.push(if heap_kept {
        "host heap kept (--host-heap keep: freed memory stays in glibc's heap, nothing is \
         mmap'ed, outputs reuse warm pages)"
            .to_string()
    } else {
        "host heap released (glibc's defaults: chunks above its mmap threshold go back to the \
         kernel on free)"
            .to_string()
    });
    if device.is_cuda() {
        notes.push(format!(
            "cudarc event tracking {} (--cuda-events)",
            if cfg.cuda_events { "on" } else { "off" }
        ));
    }
    if budget.stream > 1 {
        notes.push(format!(
            "stream mode: {} calls back to back per sample, time per call (the host's work \
             overlaps the device's)",
            budget.stream
        ));
    }
    let mode = match (cfg.quick, budget.stream > 1) {
        (true, false) => "quick",
        (false, false) => "full",
        (true, true) => "quick, stream",
        (false, true) => "full, stream",
    };
    Ok(Report {
        header: header(copy_gbps, mode, notes),
        rows: out.rows,
        skipped: out.skipped,
    })
}

impl Report {
    /// Legend, full table, skipped measurements and the summary, in that order (the summary
    /// last: it is what the tail of a log shows).
    pub fn render(&self) -> String {
        let h = &self.header;
        let mut s = String::new();
        s.push_str(report::LEGEND);
        s.push_str("\n\n");
        s.push_str(&report::table(&self.rows));
        if !self.skipped.is_empty() {
            s.push_str("\nSkipped:\n");
            for k in &self.skipped {
                s.push_str(&format!(
                    "  {} {} {} {} {}: {}\n",
                    k.op,
                    k.pass,
                    report::shape_str(&k.shape),
                    k.dtype,
                    k.imp,
                    k.error
                ));
            }
        }
        s.push_str(&format!(
            "\nSummary ({} on {}, {}, copy bandwidth {:.1} GB/s, commit {}, kernel config {}, \
             host heap {}, seed {}):\n",
            h.device,
            h.device_name,
            h.date,
            h.copy_gbps,
            h.git_commit.as_deref().unwrap_or("?"),
            h.kernel_config,
            h.host_heap,
            h.seed
        ));
        let parts = [
            report::summary(&self.rows),
            report::compute_summary(&self.rows),
            report::peak_summary(&self.rows),
        ];
        let parts: Vec<&String> = parts.iter().filter(|p| !p.is_empty()).collect();
        for (i, p) in parts.iter().enumerate() {
            if i > 0 {
                s.push('\n');
            }
            s.push_str(p);
        }
        s
    }

    /// The JSON file's content.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("the report serialises")
    }
}

/// Test helpers shared by the families' tests.
#[cfg(test)]
pub(crate) mod test_util {
    use candle_fused::config::{CpuConfig, KernelConfig};
    use candle_fused::{Kernels, SimdLevel};

    /// Kernels on a SIMD level this CPU lacks: every CPU kernel run on them fails, so a row
    /// of ours that is timed anyway did not run on the configuration it was given.
    pub fn unavailable_simd() -> Kernels {
        let level = if cfg!(target_arch = "x86_64") {
            SimdLevel::Neon
        } else {
            SimdLevel::Avx512
        };
        Kernels::new(KernelConfig {
            cpu: CpuConfig {
                simd: level,
                ..CpuConfig::default()
            },
            ..KernelConfig::default()
        })
    }

    /// An empty CPU collector (copy bandwidth 1 GB/s, no checkpoint file).
    pub fn collector() -> super::report::Collector {
        super::report::Collector {
            device: "cpu".into(),
            device_name: "test".into(),
            copy_gbps: 1.0,
            rows: vec![],
            skipped: vec![],
            checkpoint: None,
        }
    }

    /// A CPU timer of one warm-up and `reps` timed calls.
    pub fn timer(reps: usize) -> super::timing::Timer {
        let b = super::timing::Budget {
            warmup: 1,
            min_reps: reps,
            max_reps: reps,
            target_s: 0.0,
            stream: 1,
        };
        super::timing::Timer::new(&candle_core::Device::Cpu, b).expect("a CPU timer")
    }

    /// Every `ours*` row was skipped with the SIMD error, every other one timed.
    pub fn ours_skipped_others_timed(out: &super::report::Collector) {
        assert!(!out.skipped.is_empty(), "no row of ours was skipped");
        for k in &out.skipped {
            assert!(k.imp.starts_with("ours"), "a peer row was skipped: {k:?}");
            assert!(k.error.contains("SIMD level"), "{k:?}");
        }
        assert!(out.rows.iter().all(|r| !r.imp.starts_with("ours")));
        assert!(!out.rows.is_empty(), "no peer row was timed");
    }
}
