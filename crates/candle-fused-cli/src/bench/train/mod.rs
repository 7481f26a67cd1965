//! `candle-fused bench --op train`: the LoRA training step (all-linear, r 16, AdamW) on
//! random-init models of given configurations, ours with the explicit backward, ours with
//! activation checkpointing, and ours through Candle's tape; the peer is
//! `scripts/bench_train_torch.py` (PyTorch + PEFT), merged by `scripts/merge_train_bench.py`.
//!
//! Each (configuration, variant) runs in a fresh process (this binary with a hidden
//! `--train-worker`), so its peak memory is its own. The step and every figure follow the
//! PyTorch script (see [`LEGEND`]); the JSON rows have the same fields.

use std::path::PathBuf;
use std::time::Instant;

use candle_core::{DType, Device, Result, Tensor};
use candle_fused_train::{AdamW, AdamWConfig, Batch, LoraSpec, Model, ModelConfig, SplitMix64};
use serde_json::{json, Value};

use super::report;

mod mem;
mod profile;
pub mod shapes;

pub use shapes::{matmul_flops, Shape, SHAPES};

/// LoRA rank, alpha and the AdamW learning rate of the step (as in the PyTorch script).
pub const RANK: usize = 16;
pub const ALPHA: f64 = 32.0;
const LR: f64 = 1e-4;

pub const LEGEND: &str = "\
The step (what is timed, per iteration): loss_and_grads (explicit backward: frozen base weights \
get no dW; the loss through linear + cross-entropy, never the full logits) or \
loss_and_grads_tape (the same forward on Candle's tape, Tensor::backward), then AdamW.step on \
the LoRA parameters (lr 1e-4, PyTorch's defaults otherwise). ours_ckpt = the explicit backward \
with activation checkpointing (each layer saves its input and is recomputed in the backward). \
Every variant of ours runs as finetune does: keep_freed_memory (glibc keeps freed chunks in \
its heap, none mmap'ed, and does not trim it, so a step reuses the pages of the one before; \
keep_freed_memory in the JSON; --host-heap release turns it off) and, on CUDA, \
keep_freed_device_memory (freed device memory stays in the pool instead of going back to the \
driver at each step's synchronisation, like PyTorch's caching allocator; --cuda-pool release \
turns it off); the PyTorch script keeps freed host memory the same way (its --host-heap, \
host_heap in its rows). Ours run on the kernel configuration named by --kernel-config \
(default: default; kernel_config in the JSON header). \
Model: random-init model of the named configuration (Model::random), frozen base in --dtype, \
LoRA r 16, alpha 32 on q/k/v/o/gate/up/down (PEFT init, then B ~ N(0, 0.01^2) like a model in \
the middle of training), f32 adapters; random tokens and targets over all B*T positions.
Each (config, variant) runs in a fresh process. Peak memory: CPU: the process's RSS high-water \
mark (getrusage ru_maxrss) at the end (peak_delta: minus the RSS at start); heap_peak: the \
counting global allocator's high-water mark over the timed steps (weights, adapters, optimizer \
state and the step's buffers). CUDA: the high-water mark of the memory pool Candle allocates \
from (CU_MEMPOOL_ATTR_USED_MEM_HIGH), reset before the timed steps.
Timing: warm-up steps, then the median of the timed steps (wall clock, device synchronised). \
tokens/s = B*T / median step time. fwd_ms: the forward and the loss alone (Model::loss), \
opt_ms: AdamW.step alone, medians. \
gemm_ms (the profile): every GEMM shape of the step timed alone with ops::matmul (CPU: the \
gemm crate, batched products one per thread-pool task; CUDA: Candle's cuBLAS matmul; \
contiguous operands, median of 5), times its count, summed: what the matmuls alone would take; \
the rest of the step (step - gemm_ms) is everything else (attention softmax, norms, RoPE, \
elementwise, copies, allocation, the optimizer).
GEMM efficiency: the step's matmul FLOPs / median step time, as a fraction of the GEMM rate \
measured in the same process (ops::matmul, CPU: [B*T, hidden] x [hidden, intermediate]; \
CUDA: [8192, 8192] x [8192, 8192] in --dtype). Matmul FLOPs (M = B*T, per linear K -> N): base \
forward 2MKN + backward dX 2MKN (no dW); LoRA 6Mr(K+N); attention QK^T and PV: forward \
4*B*H*T^2*hd + backward 8*B*H*T^2*hd; LM head 4*M*hidden*V. The tape's extra dW GEMMs of the \
frozen weights are not counted (they are the waste the explicit backward removes).";

/// A variant of ours.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Variant {
    Explicit,
    Checkpointed,
    Tape,
}

impl Variant {
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "ours" | "explicit" => Ok(Variant::Explicit),
            "ours_ckpt" | "ckpt" => Ok(Variant::Checkpointed),
            "ours_tape" | "tape" => Ok(Variant::Tape),
            o => candle_core::bail!(
                "bench --op train: unknown variant {o:?}, expected ours, ours_ckpt or ours_tape"
            ),
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Variant::Explicit => "ours",
            Variant::Checkpointed => "ours_ckpt",
            Variant::Tape => "ours_tape",
        }
    }
}

/// What `bench --op train` runs.
#[derive(Debug, Clone)]
pub struct Options {
    pub device: String,
    pub dtype: DType,
    pub configs: Vec<String>,
    pub variants: Vec<Variant>,
    /// Batch size; 0: the largest power of two that fits.
    pub batch: usize,
    pub seq: usize,
    pub warmup: usize,
    pub iters: usize,
    pub seed: u64,
    /// Also time each GEMM shape of the step alone (the `gemm_ms` profile).
    pub profile: bool,
    pub json: Option<PathBuf>,
    /// CUDA: keep cudarc's event tracking (see `bench::cuda_device`).
    pub cuda_events: bool,
    /// CUDA: keep freed device memory in the pool (`keep_freed_device_memory`, as `finetune`
    /// runs); false: Candle's default, released at every synchronisation.
    pub keep_freed_device_memory: bool,
    /// Keep freed host memory in glibc's heap (`keep_freed_memory`, as `finetune` runs);
    /// false: glibc's defaults.
    pub keep_freed_memory: bool,
    /// The kernel configuration ours run on: a name among `KernelConfig::candidates()`.
    pub kernel_config: String,
}

impl Options {
    /// The defaults of a device: CPU f32, the cpu-* configs, batch 4 x 256; CUDA bf16, the
    /// model configs, sequence 2048, the largest batch that fits (`batch` 0 = auto).
    pub fn defaults(device: &str) -> Self {
        let cuda = device == "cuda";
        Self {
            device: device.into(),
            dtype: if cuda { DType::BF16 } else { DType::F32 },
            configs: SHAPES
                .iter()
                .filter(|s| s.name.starts_with("cpu-") != cuda)
                .map(|s| s.name.to_string())
                .collect(),
            variants: vec![Variant::Explicit, Variant::Checkpointed, Variant::Tape],
            batch: if cuda { 0 } else { 4 },
            seq: if cuda { 2048 } else { 256 },
            warmup: 3,
            iters: 10,
            seed: 0,
            profile: !cuda,
            json: None,
            cuda_events: true,
            keep_freed_device_memory: true,
            keep_freed_memory: true,
            kernel_config: "default".into(),
        }
    }

    fn worker_args(&self, config: &str, v: Variant) -> Vec<String> {
        let mut a = vec![
            "bench".into(),
            "--op".into(),
            "train".into(),
            "--device".into(),
            self.device.clone(),
            "--dtype".into(),
            self.dtype.as_str().into(),
            "--batch".into(),
            if self.batch == 0 {
                "auto".into()
            } else {
                self.batch.to_string()
            },
            "--seq".into(),
            self.seq.to_string(),
            "--warmup".into(),
            self.warmup.to_string(),
            "--iters".into(),
            self.iters.to_string(),
            "--seed".into(),
            self.seed.to_string(),
            "--profile".into(),
            self.profile.to_string(),
            "--cuda-events".into(),
            if self.cuda_events { "on" } else { "off" }.into(),
            "--cuda-pool".into(),
            if self.keep_freed_device_memory {
                "keep"
            } else {
                "release"
            }
            .into(),
            "--host-heap".into(),
            if self.keep_freed_memory {
                "keep"
            } else {
                "release"
            }
            .into(),
            "--kernel-config".into(),
            self.kernel_config.clone(),
        ];
        a.push("--train-worker".into());
        a.push(format!("{config}:{}", v.name()));
        a
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn rss_mb(field: &str) -> Option<f64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let l = s.lines().find(|l| l.starts_with(field))?;
    Some(l.split_whitespace().nth(1)?.parse::<f64>().ok()? / 1024.0)
}

fn random_batch(s: &Shape, batch: usize, seq: usize, seed: u64, dev: &Device) -> Result<Batch> {
    let mut rng = SplitMix64::new(seed ^ 0x7261_696e);
    let ids: Vec<u32> = (0..batch * (seq + 1))
        .map(|_| rng.below(s.vocab) as u32)
        .collect();
    let all = Tensor::from_vec(ids, (batch, seq + 1), dev)?;
    let tokens = all.narrow(1, 0, seq)?.contiguous()?;
    let targets = all.narrow(1, 1, seq)?.to_dtype(DType::I64)?.contiguous()?;
    Ok(Batch::new(tokens, targets))
}

/// `--batch auto` (0): the largest power of two whose step (loss and gradients) runs, one
/// step each (an allocation failure is an error, not a crash, in Candle).
fn largest_batch(model: &Model, s: &Shape, o: &Options, v: Variant, dev: &Device) -> Result<usize> {
    let mut best = None;
    for b in (0..10).map(|i| 1usize << i) {
        let batch = random_batch(s, b, o.seq, o.seed, dev)?;
        let r = match v {
            Variant::Tape => model.loss_and_grads_tape(&batch),
            _ => model.loss_and_grads(&batch),
        };
        dev.synchronize()?;
        match r {
            Ok(_) => best = Some(b),
            Err(e) => {
                eprintln!(
                    "  batch {b}: {}",
                    e.to_string().lines().next().unwrap_or("")
                );
                break;
            }
        }
    }
    best.ok_or_else(|| candle_core::Error::Msg("bench --op train: batch 1 does not fit".into()))
}

/// One (config, variant) in this process: builds, times, prints `ROW {json}`.
pub fn worker(o: &Options, spec: &str) -> Result<()> {
    // As `finetune` runs: freed buffers stay in the process for the next step.
    let kept = o.keep_freed_memory && candle_fused_train::keep_freed_memory();
    let rss_start = rss_mb("VmRSS:");
    let (config, variant) = spec
        .split_once(':')
        .ok_or_else(|| candle_core::Error::Msg(format!("bad --train-worker {spec:?}")))?;
    let (s, v) = (Shape::by_name(config)?, Variant::parse(variant)?);
    let dev = super::device_from_name(&o.device, o.cuda_events)?;
    if o.keep_freed_device_memory {
        candle_fused_train::keep_freed_device_memory(&dev)?;
    }
    let cfg = ModelConfig::from_json(&s.hf_config(o.seq))?;
    let mut model = Model::random(cfg, o.dtype, &dev, o.seed)?;
    model.set_kernels(super::kernels_named(&o.kernel_config)?);
    model.add_lora(&LoraSpec::new(RANK, ALPHA), o.seed + 1)?;
    let mut rng = SplitMix64::new(o.seed + 2);
    for (k, var) in model.lora_vars() {
        if k.contains("lora_B") {
            let n = var.elem_count();
            let vals: Vec<f32> = (0..n).map(|_| (0.01 * rng.normal()) as f32).collect();
            var.set(&Tensor::from_vec(vals, var.shape(), &dev)?)?;
        }
    }
    model.set_activation_checkpointing(v == Variant::Checkpointed);
    let lora_params: usize = model.lora_vars().iter().map(|(_, v)| v.elem_count()).sum();
    let nb = match o.batch {
        0 => largest_batch(&model, &s, o, v, &dev)?,
        b => b,
    };
    let batch = random_batch(&s, nb, o.seq, o.seed, &dev)?;
    let mut opt = AdamW::new(AdamWConfig::default())?;
    let (mut step_s, mut fwd_s, mut opt_s, mut losses) = (vec![], vec![], vec![], vec![]);
    let pool = mem::Pool::new(&dev)?;
    crate::alloc::reset_peak();
    pool.reset_peak()?;
    for i in 0..o.warmup + o.iters {
        dev.synchronize()?;
        let t0 = Instant::now();
        let (loss, grads) = match v {
            Variant::Tape => model.loss_and_grads_tape(&batch)?,
            _ => model.loss_and_grads(&batch)?,
        };
        let t1 = Instant::now();
        opt.step(&model.lora_vars(), &grads, LR)?;
        dev.synchronize()?;
        let (t2, dt) = (Instant::now(), t0.elapsed().as_secs_f64());
        drop(grads);
        losses.push(loss);
        if !loss.is_finite() {
            candle_core::bail!("bench --op train: loss {loss} at step {i} ({config}, {variant})")
        }
        if i >= o.warmup {
            step_s.push(dt);
            opt_s.push((t2 - t1).as_secs_f64());
        }
        eprintln!(
            "  {config} {} step {}/{}: {:.1} ms, loss {loss:.4}",
            v.name(),
            i + 1,
            o.warmup + o.iters,
            dt * 1e3
        );
    }
    let heap_peak =
        crate::alloc::installed().then(|| crate::alloc::peak() as f64 / (1 << 20) as f64);
    let dev_peak = pool.peak_mb()?;
    for _ in 0..3.min(o.iters) {
        dev.synchronize()?;
        let t0 = Instant::now();
        model.loss(&batch)?;
        dev.synchronize()?;
        fwd_s.push(t0.elapsed().as_secs_f64());
    }
    let med = median(step_s.clone());
    let (rate, gemm_shape) = profile::gemm_rate(&s, nb * o.seq, o.dtype, &dev)?;
    let (gemm_ms, gemm_shapes) = if o.profile {
        let (t, rows) = profile::gemm_profile(&s, nb, o.seq, RANK, o.dtype, &dev)?;
        (Some(t), rows)
    } else {
        (None, Value::Null)
    };
    let flops = matmul_flops(&s, nb, o.seq, RANK);
    let hwm = rss_mb("VmHWM:");
    let (peak, kind) = match dev_peak {
        Some(p) => (
            Some(p),
            "CUDA memory pool high-water mark (CU_MEMPOOL_ATTR_USED_MEM_HIGH) over the timed steps",
        ),
        None => (
            hwm,
            "process RSS high-water mark (VmHWM), fresh process per row",
        ),
    };
    let row = json!({
        "op": "train", "impl": v.name(), "variant": v.name(), "config": config, "model": s.json(),
        "batch": nb, "seq": o.seq, "dtype": o.dtype.as_str(), "device": o.device, "rank": RANK,
        "alpha": ALPHA, "lora_params": lora_params, "threads": rayon::current_num_threads(),
        "warmup": o.warmup, "iters": o.iters,
        "step_ms": step_s.iter().map(|t| t * 1e3).collect::<Vec<_>>(), "median_step_ms": med * 1e3,
        "tokens_per_s": (nb * o.seq) as f64 / med, "losses": losses,
        "fwd_ms": median(fwd_s) * 1e3, "opt_ms": median(opt_s) * 1e3,
        "matmul_flops": flops, "tflops": flops / med / 1e12, "gemm_rate_tflops": rate,
        "gemm_shape": gemm_shape, "gemm_efficiency": flops / med / 1e12 / rate,
        "gemm_ms": gemm_ms, "gemm_shapes": gemm_shapes,
        "keep_freed_memory": kept,
        "peak_mem_mb": peak, "mem_kind": kind, "heap_peak_mb": heap_peak,
        "peak_delta_mb": hwm.zip(rss_start).map(|(h, s)| h - s), "rss_at_start_mb": rss_start,
    });
    println!("ROW {row}");
    Ok(())
}

/// Runs every (config, variant) in a fresh process of this binary; returns the JSON report.
pub fn run(o: &Options) -> Result<Value> {
    let exe = std::env::current_exe()?;
    let dev = super::device_from_name(&o.device, o.cuda_events)?;
    let header = |rows_done: usize| {
        json!({
            "tool": "candle-fused bench --op train", "date": report::utc_now(), "device": o.device,
            "device_name": super::timing::device_name(&dev), "git_commit": report::git_commit(),
            "cuda_events": o.cuda_events, "keep_freed_device_memory": o.keep_freed_device_memory,
            "kernel_config": o.kernel_config,
            "threads": rayon::current_num_threads(), "cpu_count": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
            "load": std::fs::read_to_string("/proc/loadavg").ok().map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" ")),
            "mode": if rows_done == usize::MAX { "full".to_string() } else { format!("partial ({rows_done} rows)") },
            "legend": LEGEND,
        })
    };
    let (mut rows, mut skipped) = (vec![], vec![]);
    for c in &o.configs {
        Shape::by_name(c)?;
        for &v in &o.variants {
            eprintln!("{c} / {}: fresh process", v.name());
            let out = std::process::Command::new(&exe)
                .args(o.worker_args(c, v))
                .stderr(std::process::Stdio::inherit())
                .output()?;
            let text = String::from_utf8_lossy(&out.stdout);
            match text.lines().rev().find_map(|l| l.strip_prefix("ROW ")) {
                Some(r) if out.status.success() => {
                    let r: Value = serde_json::from_str(r)
                        .map_err(|e| candle_core::Error::Msg(format!("worker row: {e}")))?;
                    eprintln!(
                        "{c} / {}: {:.1} ms/step, {:.0} tokens/s, peak {:.0} MB, GEMM efficiency {:.1}%",
                        v.name(), r["median_step_ms"].as_f64().unwrap_or(0.0), r["tokens_per_s"].as_f64().unwrap_or(0.0),
                        r["peak_mem_mb"].as_f64().unwrap_or(0.0), 100.0 * r["gemm_efficiency"].as_f64().unwrap_or(0.0)
                    );
                    rows.push(r);
                }
                _ => {
                    let why = format!("worker exited with {}", out.status);
                    eprintln!("{c} / {}: skipped: {why}", v.name());
                    skipped.push(
                        json!({ "op": "train", "config": c, "variant": v.name(), "error": why }),
                    );
                }
            }
            if let Some(p) = &o.json {
                write_json(
                    p,
                    &json!({ "header": header(rows.len()), "rows": rows, "skipped": skipped }),
                )?;
            }
        }
    }
    Ok(json!({ "header": header(usize::MAX), "rows": rows, "skipped": skipped }))
}

/// Writes `v` to `path` atomically (temp + rename).
pub fn write_json(path: &std::path::Path, v: &Value) -> Result<()> {
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, serde_json::to_string_pretty(v).unwrap_or_default())?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

/// A text table of the rows.
pub fn render(report: &Value) -> String {
    let mut s = format!(
        "{:<14} {:<10} {:>5} {:>9} {:>9} {:>8} {:>9} {:>8} {:>9}\n",
        "config",
        "impl",
        "batch",
        "ms/step",
        "tokens/s",
        "peak MB",
        "heap MB",
        "GEMM eff",
        "GEMM ms"
    );
    for r in report["rows"].as_array().into_iter().flatten() {
        s += &format!(
            "{:<14} {:<10} {:>5} {:>9.1} {:>9.0} {:>8.0} {:>9.0} {:>7.1}% {:>9.1}\n",
            r["config"].as_str().unwrap_or(""),
            r["impl"].as_str().unwrap_or(""),
            r["batch"].as_u64().unwrap_or(0),
            r["median_step_ms"].as_f64().unwrap_or(0.0),
            r["tokens_per_s"].as_f64().unwrap_or(0.0),
            r["peak_mem_mb"].as_f64().unwrap_or(0.0),
            r["heap_peak_mb"].as_f64().unwrap_or(0.0),
            100.0 * r["gemm_efficiency"].as_f64().unwrap_or(0.0),
            r["gemm_ms"].as_f64().unwrap_or(f64::NAN)
        );
    }
    for k in report["skipped"].as_array().into_iter().flatten() {
        s += &format!(
            "skipped: {} {}: {}\n",
            k["config"], k["variant"], k["error"]
        );
    }
    s
}
