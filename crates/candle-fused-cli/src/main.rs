//! `candle-fused`: the correctness sweep (`check`) and the benchmark (`bench`).

use std::process::ExitCode;

use anyhow::{Context, Result};
use candle_core::{DType, Device};
use candle_fused_cli::bench;
use candle_fused_testkit::{check, testing};
use clap::{Parser, Subcommand, ValueEnum};

#[derive(Parser)]
#[command(
    name = "candle-fused",
    version,
    about = "Fused, trainable softmax / RMSNorm / add+RMSNorm for Candle: correctness check and benchmark"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, ValueEnum)]
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
        /// add_rms_norm, lora_linear, rope, glu.
        #[arg(long, value_delimiter = ',')]
        op: Option<Vec<String>>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let res = match cli.cmd {
        Cmd::Check { device, quick } => run_check(device, quick),
        Cmd::Bench {
            device,
            json,
            quick,
            op,
        } => run_bench(device, json, quick, op),
    };
    match res {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn device(arg: DeviceArg) -> Result<Device> {
    // The message alone: a backtrace (RUST_BACKTRACE) adds nothing to "built without CUDA".
    bench::device_from_name(arg.name())
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

fn run_check(arg: DeviceArg, quick: bool) -> Result<ExitCode> {
    let dev = device(arg)?;
    testing::set_poison(true);
    let mut dtypes = vec![DType::F32, DType::F16, DType::BF16];
    // f64 runs on the CPU; on a GPU it is tried, and if the first f64 case errors it is
    // reported as not supported there (not as a failure).
    dtypes.push(DType::F64);
    let mut cases = check::sweep(&dtypes);
    if quick {
        cases.retain(|c| c.shape.iter().product::<usize>() <= 8192);
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
        let res = check::run(case, &dev);
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
                    op: case.op.name(),
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
    println!(
        "\ncandle-fused check on {} ({}): {} cases, {pass} PASS, {fail} FAIL, {errors} ERROR in {:.1} s",
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

fn run_bench(
    arg: DeviceArg,
    json: Option<std::path::PathBuf>,
    quick: bool,
    ops: Option<Vec<String>>,
) -> Result<ExitCode> {
    let cfg = bench::Config {
        device: device(arg)?,
        quick,
        ops,
        checkpoint: json.clone(),
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
