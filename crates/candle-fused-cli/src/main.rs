//! `candle-fused`: LoRA fine-tuning (`finetune`, `generate`, `eval`, `merge`), the correctness
//! sweep (`check`) and the benchmark (`bench`, with `--op train` the LoRA training step).

use std::process::ExitCode;

use anyhow::{Context, Result};
use candle_core::{DType, Device};
use candle_fused::Kernels;
use candle_fused_cli::bench;
use candle_fused_cli::train_cmd;
use candle_fused_testkit::{check, check_loss, rng, testing};
use clap::{Parser, Subcommand, ValueEnum};

/// Counts heap bytes so the bench can report each variant's peak (`bench --op train`, the
/// linear cross-entropy rows); forwards to the system allocator.
#[global_allocator]
static ALLOC: candle_fused_cli::alloc::CountingAlloc = candle_fused_cli::alloc::CountingAlloc;

#[derive(Parser)]
#[command(
    name = "candle-fused",
    version,
    about = "LoRA fine-tuning of Llama / Qwen2 / Mistral checkpoints on fused, trainable Candle kernels; correctness check and benchmark of the kernels"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, ValueEnum)]
enum OnOff {
    On,
    Off,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum DeviceArg {
    Cpu,
    Cuda,
}

impl DeviceArg {
    fn name(self) -> &'static str {
        match self {
            DeviceArg::Cpu => "cpu",
            DeviceArg::Cuda => "cuda",
        }
    }
}

#[derive(Subcommand)]
enum Cmd {
    /// LoRA fine-tuning of a Hugging Face checkpoint on a JSONL file; with no --model/--data,
    /// the embedded demo job (under a minute on 2 idle CPU cores).
    Finetune(Box<train_cmd::FinetuneArgs>),
    /// Text from a checkpoint (and adapter), KV-cached, streamed to stdout.
    Generate(train_cmd::GenerateArgs),
    /// Loss and perplexity of a checkpoint (and adapter) on a JSONL file.
    Eval(train_cmd::EvalArgs),
    /// Writes the checkpoint with the adapter merged into its weights.
    Merge(train_cmd::MergeArgs),
    /// Every op forward and backward, each dtype, several shapes, against the f64 reference
    /// (on a GPU also against our CPU backend), with output poisoning; non-zero exit on a FAIL.
    Check {
        #[arg(long, value_enum, default_value = "cpu")]
        device: DeviceArg,
        /// Only the small shapes.
        #[arg(long)]
        quick: bool,
    },
    /// Times ours vs Candle's composed and built-in ops (fwd, bwd, fwd+bwd), with GB/s and %
    /// of the copy bandwidth measured in the same run.
    Bench {
        #[arg(long, value_enum, default_value = "cpu")]
        device: DeviceArg,
        /// Also write the rows as JSON to this file.
        #[arg(long)]
        json: Option<std::path::PathBuf>,
        /// A few small shapes (under a minute on a CPU).
        #[arg(long)]
        quick: bool,
        /// Only these op families (comma-separated): softmax, masked_softmax, rms_norm,
        /// add_rms_norm, lora_linear, cross_entropy, linear_cross_entropy, matmul, rope, glu; or
        /// `train` alone: the LoRA training step (see bench::train; its own options below).
        #[arg(long, value_delimiter = ',')]
        op: Option<Vec<String>>,
        /// The kernel configuration ours run on, by name: default, or another of
        /// `KernelConfig::candidates()` (softmax-cache-on, softmax-cache-off, rms-bwd-cols16,
        /// rms-bwd-cols32, rope-hpt2, rope-hpt4, rope-hpt8, rope-hpt16, rope-unbounded, rope-ctas4,
        /// skinny-off, skinny-16, skinny-64).
        #[arg(long, default_value = "default")]
        kernel_config: String,
        /// Calls per timed sample: 1 (default) times each call alone, the device synchronised
        /// before it; N > 1 issues N calls back to back and reports the time per call (the
        /// host's work overlaps the device's, as in a training step).
        #[arg(long, default_value_t = 1)]
        stream: usize,
        /// CUDA: cudarc's per-allocation event tracking, `on` (Candle's default: what a Candle
        /// program gets) or `off` (as `finetune` runs: one stream, no events).
        #[arg(long, value_enum, default_value = "on")]
        cuda_events: OnOff,
        /// Freed host memory: `keep` (glibc keeps it in the heap for the next call, as
        /// `finetune` runs: `keep_freed_memory`) or `release` (glibc's defaults: large chunks
        /// go back to the kernel on free, and each call faults in fresh pages).
        #[arg(long, value_enum, default_value = "keep")]
        host_heap: PoolArg,
        #[command(flatten)]
        train: TrainArgs,
    },
}

/// Options of `bench --op train` (defaults per device: see bench::train::Options::defaults).
#[derive(clap::Args)]
struct TrainArgs {
    /// Model configurations (comma-separated): cpu-h256, cpu-h512, qwen2.5-0.5b,
    /// llama-3.2-1b, llama-3-8b.
    #[arg(long, value_delimiter = ',')]
    configs: Option<Vec<String>>,
    /// Variants (comma-separated): ours, ours_ckpt, ours_tape.
    #[arg(long, value_delimiter = ',')]
    variants: Option<Vec<String>>,
    /// Base weight dtype: f32, bf16, f16.
    #[arg(long)]
    dtype: Option<String>,
    /// Batch size, or `auto`: the largest power of two that fits (for a GPU).
    #[arg(long)]
    batch: Option<String>,
    #[arg(long)]
    seq: Option<usize>,
    #[arg(long)]
    warmup: Option<usize>,
    /// Timed steps.
    #[arg(long)]
    iters: Option<usize>,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Also time each GEMM shape of the step alone (default: on for the CPU).
    #[arg(long)]
    profile: Option<bool>,
    /// CUDA: freed device memory `keep` (in the pool for the next step, as `finetune` runs)
    /// or `release` (Candle's default: handed back to the driver at every synchronisation).
    #[arg(long, value_enum, default_value = "keep")]
    cuda_pool: PoolArg,
    /// Internal: run one CONFIG:VARIANT in this process and print its row.
    #[arg(long, hide = true)]
    train_worker: Option<String>,
}

/// What happens to freed memory (`bench --host-heap`, `bench --op train --cuda-pool`).
#[derive(Clone, Copy, clap::ValueEnum)]
enum PoolArg {
    Keep,
    Release,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let res = match cli.cmd {
        Cmd::Finetune(a) => train_cmd::finetune(*a).map(|_| ExitCode::SUCCESS),
        Cmd::Generate(a) => train_cmd::generate_cmd(a).map(|_| ExitCode::SUCCESS),
        Cmd::Eval(a) => train_cmd::eval_cmd(a).map(|_| ExitCode::SUCCESS),
        Cmd::Merge(a) => train_cmd::merge_cmd(a).map(|_| ExitCode::SUCCESS),
        Cmd::Check { device, quick } => run_check(device, quick),
        Cmd::Bench {
            device,
            json,
            quick,
            op,
            kernel_config,
            stream,
            cuda_events,
            host_heap,
            train,
        } => {
            let events = matches!(cuda_events, OnOff::On);
            let keep_heap = matches!(host_heap, PoolArg::Keep);
            if op
                .as_deref()
                .is_some_and(|o| o.iter().any(|n| n == "train"))
            {
                let op = op.unwrap_or_default();
                run_train_bench(device, json, op, train, &kernel_config, events, keep_heap)
            } else {
                run_bench(
                    device,
                    json,
                    quick,
                    op,
                    &kernel_config,
                    (stream, events, keep_heap),
                )
            }
        }
    };
    match res {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn device(arg: DeviceArg, cuda_events: bool) -> Result<Device> {
    // The message alone: a backtrace (RUST_BACKTRACE) adds nothing to "built without CUDA".
    bench::device_from_name(arg.name(), cuda_events)
        .map_err(|e| anyhow::anyhow!("{}", e.to_string().lines().next().unwrap_or("")))
}

fn dtype_str(dt: DType) -> &'static str {
    dt.as_str()
}

struct CheckLine {
    op: String,
    shape: String,
    dtype: &'static str,
    what: String,
    err: String,
    tol: String,
    status: &'static str,
}

/// The run's seed (`CANDLE_FUSED_SEED` or a fresh one), printed so a run can be repeated.
fn seed() -> Result<u64> {
    let seed = rng::init().map_err(|e| anyhow::anyhow!("{e}"))?;
    eprintln!(
        "random inputs from seed {seed} (rerun with {}={seed})",
        rng::SEED_VAR
    );
    Ok(seed)
}

/// One case of the check: what it is, and how to run it on a device.
struct Job {
    op: String,
    shape: Vec<usize>,
    dtype: DType,
    /// Elements of its largest input (for `--quick`).
    elems: usize,
    #[allow(clippy::type_complexity)]
    run: Box<dyn Fn(&Device) -> candle_core::Result<Vec<check::Outcome>>>,
}

fn run_check(arg: DeviceArg, quick: bool) -> Result<ExitCode> {
    let dev = device(arg, true)?;
    let seed = seed()?;
    let kernels = testing::poisoned();
    let mut dtypes = vec![DType::F32, DType::F16, DType::BF16];
    // f64 runs on the CPU; on a GPU it is tried, and if the first f64 case errors it is
    // reported as not supported there (not as a failure).
    dtypes.push(DType::F64);
    let mut cases: Vec<Job> = check::sweep(&dtypes)
        .into_iter()
        .map(|c| Job {
            op: c.op.name(),
            shape: c.shape.clone(),
            dtype: c.dtype,
            elems: c.shape.iter().product(),
            run: Box::new(move |d: &Device| check::run(&kernels, &c, d)),
        })
        .collect();
    // The losses (integer targets): their own sweep, see check_loss.
    cases.extend(check_loss::sweep(&dtypes).into_iter().map(|c| Job {
        op: c.name(),
        shape: c.shape(),
        dtype: c.dtype,
        elems: c.rows.iter().product::<usize>() * c.v,
        run: Box::new(move |d: &Device| check_loss::run(&kernels, &c, d)),
    }));
    if quick {
        cases.retain(|c| c.elems <= 8192);
    }
    let mut lines: Vec<CheckLine> = Vec::new();
    let mut notes: Vec<String> = Vec::new();
    let (mut pass, mut fail, mut errors) = (0usize, 0usize, 0usize);
    let mut f64_state: Option<bool> = None; // on a GPU: Some(supported) after the first f64 case
    let t0 = std::time::Instant::now();
    for (i, case) in cases.iter().enumerate() {
        let f64_on_gpu = case.dtype == DType::F64 && !dev.is_cpu();
        if f64_on_gpu && f64_state == Some(false) {
            continue;
        }
        let shape = bench::report::shape_str(&case.shape);
        let res = (case.run)(&dev);
        if f64_on_gpu && f64_state.is_none() {
            f64_state = Some(res.is_ok());
            if let Err(e) = &res {
                notes.push(format!(
                    "f64 on {}: not supported ({}); f64 cases skipped",
                    arg.name(),
                    e.to_string().lines().next().unwrap_or("")
                ));
                continue;
            }
        }
        match res {
            Ok(outs) => {
                for o in outs {
                    let ok = o.pass();
                    if ok {
                        pass += 1
                    } else {
                        fail += 1
                    }
                    lines.push(CheckLine {
                        op: o.op,
                        shape: shape.clone(),
                        dtype: dtype_str(o.dtype),
                        what: o.what,
                        err: format!("{:.2e}", o.rel_err),
                        tol: format!("{:.0e}", o.tol),
                        status: if ok { "PASS" } else { "FAIL" },
                    });
                }
            }
            Err(e) => {
                errors += 1;
                lines.push(CheckLine {
                    op: case.op.clone(),
                    shape,
                    dtype: dtype_str(case.dtype),
                    what: format!("error: {}", e.to_string().lines().next().unwrap_or("")),
                    err: "-".into(),
                    tol: "-".into(),
                    status: "ERROR",
                });
            }
        }
        if (i + 1) % 25 == 0 {
            eprintln!("  {}/{} cases...", i + 1, cases.len());
        }
    }
    let header = format!(
        "{:<34} {:<12} {:<5} {:<20} {:>9} {:>6}  {}",
        "op", "shape", "dtype", "what", "rel err", "tol", "result"
    );
    let fmt = |l: &CheckLine| {
        format!(
            "{:<34} {:<12} {:<5} {:<20} {:>9} {:>6}  {}",
            l.op, l.shape, l.dtype, l.what, l.err, l.tol, l.status
        )
    };
    println!("{header}\n{}", "-".repeat(header.len()));
    for l in &lines {
        println!("{}", fmt(l));
    }
    let bad: Vec<&CheckLine> = lines.iter().filter(|l| l.status != "PASS").collect();
    if !bad.is_empty() {
        println!("\nFailures and errors:");
        for l in &bad {
            println!("{}", fmt(l));
        }
    }
    for n in &notes {
        println!("note: {n}");
    }
    if !bad.is_empty() {
        println!(
            "rerun with the same inputs: {}={seed} candle-fused check ...",
            rng::SEED_VAR
        );
    }
    println!(
        "\ncandle-fused check on {} ({}, seed {seed}): {} cases, {pass} PASS, {fail} FAIL, {errors} ERROR in {:.1} s",
        arg.name(),
        bench::timing::device_name(&dev),
        cases.len(),
        t0.elapsed().as_secs_f64()
    );
    Ok(if fail == 0 && errors == 0 && pass > 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// The kernel configuration named `name` among `KernelConfig::candidates()`.
fn kernel_config(name: &str) -> Result<(String, Kernels)> {
    Ok((name.to_string(), bench::kernels_named(name)?))
}

fn run_bench(
    arg: DeviceArg,
    json: Option<std::path::PathBuf>,
    quick: bool,
    ops: Option<Vec<String>>,
    kernel_config_name: &str,
    (stream, cuda_events, keep_freed_memory): (usize, bool, bool),
) -> Result<ExitCode> {
    if stream == 0 {
        anyhow::bail!("bench: --stream must be at least 1 (calls per timed sample), got 0");
    }
    let cfg = bench::Config {
        device: device(arg, cuda_events)?,
        cuda_events,
        quick,
        ops,
        checkpoint: json.clone(),
        kernels: kernel_config(kernel_config_name)?,
        seed: seed()?,
        stream,
        keep_freed_memory,
    };
    let report = bench::run(&cfg)?;
    if let Some(path) = &json {
        std::fs::write(path, report.to_json())
            .with_context(|| format!("writing {}", path.display()))?;
    }
    println!("{}", report.render());
    if let Some(path) = &json {
        println!("JSON written to {}", path.display());
    }
    Ok(ExitCode::SUCCESS)
}

fn run_train_bench(
    arg: DeviceArg,
    json: Option<std::path::PathBuf>,
    op: Vec<String>,
    t: TrainArgs,
    kernel_config_name: &str,
    cuda_events: bool,
    keep_freed_memory: bool,
) -> Result<ExitCode> {
    use bench::train;
    if op.len() != 1 {
        anyhow::bail!("bench: --op train runs alone (got --op {})", op.join(","));
    }
    let mut o = train::Options::defaults(arg.name());
    o.cuda_events = cuda_events;
    o.keep_freed_device_memory = matches!(t.cuda_pool, PoolArg::Keep);
    o.keep_freed_memory = keep_freed_memory;
    kernel_config(kernel_config_name)?;
    o.kernel_config = kernel_config_name.to_string();
    if let Some(c) = t.configs {
        o.configs = c;
    }
    if let Some(v) = t.variants {
        o.variants = v
            .iter()
            .map(|s| train::Variant::parse(s))
            .collect::<candle_core::Result<_>>()?;
    }
    if let Some(d) = t.dtype {
        o.dtype = match d.as_str() {
            "f32" => DType::F32,
            "bf16" => DType::BF16,
            "f16" => DType::F16,
            other => anyhow::bail!(
                "bench --op train: unknown --dtype {other:?}, expected f32, bf16 or f16"
            ),
        };
    }
    o.batch = match t.batch.as_deref() {
        None => o.batch,
        Some("auto") => 0,
        Some(b) => b.parse().ok().filter(|&n| n > 0).with_context(|| {
            format!("bench --op train: --batch {b:?} is not a positive number or auto")
        })?,
    };
    o.seq = t.seq.unwrap_or(o.seq);
    o.warmup = t.warmup.unwrap_or(o.warmup);
    o.iters = t.iters.unwrap_or(o.iters).max(1);
    o.seed = t.seed;
    o.profile = t.profile.unwrap_or(o.profile);
    o.json = json.clone();
    if let Some(spec) = t.train_worker {
        train::worker(&o, &spec)?;
        return Ok(ExitCode::SUCCESS);
    }
    let report = train::run(&o)?;
    if let Some(path) = &json {
        train::write_json(path, &report).with_context(|| format!("writing {}", path.display()))?;
    }
    println!("{}", train::render(&report));
    if let Some(path) = &json {
        println!("JSON written to {}", path.display());
    }
    Ok(ExitCode::SUCCESS)
}
