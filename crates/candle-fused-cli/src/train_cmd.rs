//! The training commands of the `candle-fused` binary, thin layers over `candle_fused_train`:
//! `finetune` (with no `--model`/`--data`: the embedded demo job), `generate`, `eval`, `merge`.
//! Progress bar (indicatif: step, loss, lr, tokens/s, ETA), Ctrl-C saves a checkpoint (ctrlc).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use candle_fused_train::{
    build_rows, demo, generate, load_jsonl, resolve_model_dir, split, steps_for_epochs,
    AdamWConfig, BackwardKind, Callback, GenerateConfig, LoraSpec, Model, Overflow, Schedule,
    StepInfo, Target, Tokenizer, TrainConfig, TrainData, Trainer,
};
use clap::{Args, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};

/// `--device`.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum Dev {
    Cpu,
    Cuda,
}

/// `--dtype`.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum Dt {
    F32,
    Bf16,
    F16,
}

impl Dt {
    fn dtype(self) -> DType {
        match self {
            Dt::F32 => DType::F32,
            Dt::Bf16 => DType::BF16,
            Dt::F16 => DType::F16,
        }
    }
}

fn device(d: Dev) -> Result<Device> {
    match d {
        Dev::Cpu => Ok(Device::Cpu),
        Dev::Cuda => {
            if !candle_core::utils::cuda_is_available() {
                bail!("--device cuda: this binary was built without the `cuda` feature (cargo build --release --features cuda)")
            }
            // One stream, no per-allocation CUDA events (crate::bench::cuda_device); freed
            // device memory stays in the pool for the next step.
            let dev = crate::bench::device_from_name("cuda", false)?;
            candle_fused_train::keep_freed_device_memory(&dev)?;
            Ok(dev)
        }
    }
}

fn model_dir(spec: &str) -> Result<PathBuf> {
    Ok(resolve_model_dir(
        spec,
        candle_fused_train::default_hub_cache().as_ref(),
    )?)
}

/// `candle-fused finetune`.
#[derive(Args, Debug)]
pub struct FinetuneArgs {
    /// Base model: a local Hugging Face checkpoint directory or a hub id in the local cache.
    /// Without --model and --data: the embedded demo job.
    #[arg(long)]
    pub model: Option<String>,
    /// JSONL training data: {"text"}, {"prompt","completion"} or {"messages"} per line.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Output directory (adapter, metrics.jsonl, loss.svg, checkpoints/).
    #[arg(long, default_value = "runs/finetune")]
    pub out: PathBuf,
    /// Replace the results of an earlier run in --out.
    #[arg(long)]
    pub overwrite: bool,
    /// Continue the run in --out from its latest checkpoint.
    #[arg(long)]
    pub resume: bool,
    #[arg(long)]
    pub rank: Option<usize>,
    #[arg(long)]
    pub alpha: Option<f64>,
    #[arg(long, default_value_t = 0.0)]
    pub dropout: f32,
    /// Comma-separated: q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj or all-linear.
    #[arg(long, default_value = "all-linear")]
    pub targets: String,
    /// Rank-stabilised LoRA scaling (alpha / sqrt(r)).
    #[arg(long)]
    pub rslora: bool,
    #[arg(long)]
    pub lr: Option<f64>,
    #[arg(long, default_value = "cosine")]
    pub schedule: String,
    /// Warmup steps.
    #[arg(long)]
    pub warmup: Option<usize>,
    /// Passes over the training data (ignored with --steps).
    #[arg(long)]
    pub epochs: Option<f64>,
    /// Optimizer steps.
    #[arg(long)]
    pub steps: Option<usize>,
    #[arg(long)]
    pub batch_size: Option<usize>,
    #[arg(long, default_value_t = 1)]
    pub grad_accum: usize,
    #[arg(long)]
    pub seq_len: Option<usize>,
    /// Pack several examples into each row (block-diagonal attention, positions restart).
    #[arg(long)]
    pub pack: bool,
    /// Refuse examples longer than --seq-len instead of truncating them.
    #[arg(long)]
    pub no_truncate: bool,
    /// Held-out loss every N steps (0: start and end only).
    #[arg(long)]
    pub eval_every: Option<usize>,
    /// Fraction of the examples held out.
    #[arg(long, default_value_t = 0.05)]
    pub eval_fraction: f64,
    /// Checkpoint every N steps (0: only on Ctrl-C).
    #[arg(long)]
    pub save_every: Option<usize>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[arg(long, value_enum, default_value = "cpu")]
    pub device: Dev,
    #[arg(long, value_enum, default_value = "f32")]
    pub dtype: Dt,
    #[arg(long, default_value_t = 1.0)]
    pub max_grad_norm: f64,
    #[arg(long, default_value_t = 0.0)]
    pub weight_decay: f64,
    /// Gradients through Candle's tape instead of the explicit backward (slower; a baseline).
    #[arg(long)]
    pub tape: bool,
    /// Recompute each layer's activations in the backward (less memory).
    #[arg(long)]
    pub checkpointing: bool,
}

/// What the run defaults to: the demo job's values, or general ones for a real checkpoint.
struct Defaults {
    rank: usize,
    alpha: f64,
    lr: f64,
    warmup: usize,
    epochs: f64,
    steps: Option<usize>,
    batch: usize,
    seq_len: usize,
    pack: bool,
    eval_every: usize,
    save_every: usize,
}

/// Files written by a run (removed by --overwrite; nothing else in --out is touched).
const RUN_FILES: &[&str] = &[
    "adapter_config.json",
    "adapter_model.safetensors",
    "metrics.jsonl",
    "loss.svg",
    "checkpoints",
    "demo",
];

struct Progress {
    bar: ProgressBar,
    stop: Arc<AtomicBool>,
}

impl Progress {
    fn line(&self, text: String) {
        if self.bar.is_hidden() {
            println!("{text}");
        } else {
            self.bar.println(text);
        }
    }
}

impl Callback for Progress {
    fn on_step(&mut self, s: &StepInfo) {
        if self.bar.is_hidden() && (s.step.is_multiple_of(25) || s.step == s.total) {
            // No terminal (a log file): a line every 25 steps instead of the bar.
            println!(
                "step {:>5}/{}: loss {:.4}  lr {:.2e}  {:.0} tok/s  {:.0} s",
                s.step, s.total, s.loss, s.lr, s.tokens_per_sec, s.elapsed
            );
        }
        self.bar.set_position(s.step as u64);
        self.bar.set_message(format!(
            "loss {:.4}  lr {:.2e}  {:.0} tok/s",
            s.loss, s.lr, s.tokens_per_sec
        ));
    }
    fn on_eval(&mut self, step: usize, loss: f32) {
        self.line(format!(
            "step {step:>5}: held-out loss {loss:.4} (perplexity {:.2})",
            (loss as f64).exp()
        ));
    }
    fn on_checkpoint(&mut self, step: usize, dir: &Path) {
        self.line(format!("step {step:>5}: checkpoint {}", dir.display()));
    }
    fn stop_requested(&mut self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }
}

pub fn finetune(a: FinetuneArgs) -> Result<()> {
    // Each step reuses the freed pages of the one before (no fresh page faults per step).
    candle_fused_train::keep_freed_memory();
    let dev = device(a.device)?;
    if a.overwrite && a.resume {
        bail!("--overwrite and --resume exclude each other")
    }
    let out = a.out.clone();
    if out.exists() {
        let used = RUN_FILES.iter().any(|f| out.join(f).exists());
        if used && !a.overwrite && !a.resume {
            bail!("{} holds an earlier run; pass --overwrite to replace it or --resume to continue it", out.display())
        }
        if !out.is_dir() {
            bail!("--out {} exists and is not a directory", out.display())
        }
        if a.overwrite {
            for f in RUN_FILES {
                let p = out.join(f);
                if p.is_dir() {
                    std::fs::remove_dir_all(&p)
                        .with_context(|| format!("cannot remove {}", p.display()))?;
                } else if p.exists() {
                    std::fs::remove_file(&p)
                        .with_context(|| format!("cannot remove {}", p.display()))?;
                }
            }
        }
    } else if a.resume {
        bail!("--resume: {} does not exist", out.display())
    }
    let (dir, data, base_name, d) = match (&a.model, &a.data) {
        (None, None) => {
            println!("No --model/--data: the embedded demo job (a small Llama model made on the spot, task: `shout: red fox ->` -> ` RED FOX!`).");
            let files = demo::prepare(&out.join("demo"), 2400)?;
            let name = files.model_dir.display().to_string();
            let d = Defaults {
                rank: 16,
                alpha: 32.0,
                lr: 3e-3,
                warmup: 20,
                epochs: 1.0,
                steps: Some(250),
                batch: 8,
                seq_len: 128,
                pack: true,
                eval_every: 25,
                save_every: 100,
            };
            (files.model_dir, files.data, name, d)
        }
        (Some(m), Some(data)) => {
            let d = Defaults {
                rank: 16,
                alpha: 32.0,
                lr: 2e-4,
                warmup: 0,
                epochs: 1.0,
                steps: None,
                batch: 4,
                seq_len: 512,
                pack: false,
                eval_every: 0,
                save_every: 200,
            };
            (model_dir(m)?, data.clone(), m.clone(), d)
        }
        _ => bail!("pass both --model and --data (or neither, for the demo job)"),
    };
    let tok = Tokenizer::load(&dir)?;
    let mut model = Model::load(&dir, a.dtype.dtype(), &dev)?;
    if tok.vocab_size() > model.config().vocab_size {
        bail!("the tokenizer has {} tokens but the model's embedding only {} (vocab_size): wrong tokenizer for this checkpoint?", tok.vocab_size(), model.config().vocab_size)
    }
    let examples = load_jsonl(&data, &tok)?;
    let (train_ex, eval_ex) = split(examples, a.eval_fraction, a.seed);
    let seq_len = a.seq_len.unwrap_or(d.seq_len);
    let pack = a.pack || d.pack;
    let overflow = if a.no_truncate {
        Overflow::Error
    } else {
        Overflow::Truncate
    };
    let (train, st) = build_rows(&train_ex, seq_len, pack, overflow)?;
    let (eval, _) = build_rows(&eval_ex, seq_len, false, overflow)?;
    println!(
        "data: {} examples ({} held out), {} rows of <= {seq_len} tokens{}, {} target tokens; truncated {} examples ({} tokens cut)",
        st.examples + eval_ex.len(), eval_ex.len(), st.rows, if pack { " (packed)" } else { "" }, st.target_tokens, st.truncated_examples, st.truncated_tokens
    );
    let spec = LoraSpec {
        r: a.rank.unwrap_or(d.rank),
        alpha: a.alpha.unwrap_or(d.alpha),
        dropout: a.dropout,
        targets: Target::parse_list(&a.targets)?,
        rslora: a.rslora,
        layers: None,
    };
    model.add_lora(&spec, a.seed)?;
    model.set_activation_checkpointing(a.checkpointing);
    let batch_size = a.batch_size.unwrap_or(d.batch);
    let steps = match (a.steps, a.epochs) {
        (Some(s), _) => s,
        (None, Some(e)) => steps_for_epochs(train.len(), e, batch_size, a.grad_accum),
        (None, None) => d
            .steps
            .unwrap_or_else(|| steps_for_epochs(train.len(), d.epochs, batch_size, a.grad_accum)),
    };
    let pad = model.config().pad_token_id.or(tok.eos_id()).unwrap_or(0);
    let cfg = TrainConfig {
        lr: a.lr.unwrap_or(d.lr),
        schedule: Schedule::parse(&a.schedule)?,
        warmup_steps: a.warmup.unwrap_or(d.warmup),
        steps,
        batch_size,
        grad_accum: a.grad_accum,
        max_grad_norm: a.max_grad_norm,
        adamw: AdamWConfig {
            weight_decay: a.weight_decay,
            ..AdamWConfig::default()
        },
        eval_every: a.eval_every.unwrap_or(d.eval_every),
        save_every: a.save_every.unwrap_or(d.save_every),
        keep_checkpoints: 2,
        seed: a.seed,
        pad_token: pad,
        backward: if a.tape {
            BackwardKind::Tape
        } else {
            BackwardKind::Explicit
        },
        base_model_name_or_path: base_name,
    };
    let c = model.config();
    println!(
        "model: {:?} {} layers, hidden {}, heads {}/{} (kv), vocab {}, {:?} on {:?}; LoRA r {} alpha {} on {} ({} parameters); {} steps of {} x {} rows, lr {} {}",
        c.arch, c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.vocab_size, a.dtype, a.device,
        spec.r, spec.alpha, spec.targets.iter().map(|t| t.name()).collect::<Vec<_>>().join(","),
        model.lora_params().iter().map(|(_, t)| t.elem_count()).sum::<usize>(),
        cfg.steps, cfg.grad_accum, cfg.batch_size, cfg.lr, cfg.schedule.name()
    );
    let data = TrainData { train, eval };
    let mut trainer = if a.resume {
        Trainer::resume(model, data, cfg.clone(), &out)?
    } else {
        Trainer::new(model, data, cfg.clone(), &out)?
    };
    if a.resume {
        println!("resuming at step {}", trainer.step());
    }
    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        ctrlc::set_handler(move || {
            if stop.swap(true, Ordering::SeqCst) {
                std::process::exit(130);
            }
            eprintln!(
                "\nCtrl-C: saving a checkpoint after this step (press again to quit at once)"
            );
        })
        .context("cannot install the Ctrl-C handler")?;
    }
    let bar = ProgressBar::new(cfg.steps as u64);
    bar.set_style(
        ProgressStyle::with_template(
            "{bar:30} {pos}/{len} {msg} [{elapsed_precise} < {eta_precise}]",
        )
        .expect("a valid template"),
    );
    bar.set_position(trainer.step() as u64);
    bar.reset_eta();
    let mut cb = Progress {
        bar: bar.clone(),
        stop,
    };
    let s = trainer.run(&mut cb)?;
    bar.finish_and_clear();
    println!(
        "{} after {}/{} steps in {:.1} s ({:.0} tokens/s): train loss {} -> {}, held-out loss {} -> {}",
        if s.stopped_early { "stopped" } else { "done" },
        s.steps, s.total_steps, s.elapsed, s.tokens_per_sec,
        fmt_loss(s.first_loss), fmt_loss(s.last_loss), fmt_loss(s.first_eval), fmt_loss(s.last_eval)
    );
    println!(
        "adapter: {} (PEFT format), metrics: {}, plot: {}",
        out.display(),
        out.join("metrics.jsonl").display(),
        out.join("loss.svg").display()
    );
    if let Some(ck) = &s.last_checkpoint {
        println!("last checkpoint: {} (continue with --resume)", ck.display());
    }
    if a.model.is_none() {
        println!("try it: cargo run --release -- generate --model {} --adapter {} --prompt \"shout: red fox ->\"", dir.display(), out.display());
    }
    Ok(())
}

fn fmt_loss(l: Option<f32>) -> String {
    l.map(|x| format!("{x:.4}")).unwrap_or_else(|| "-".into())
}

/// `candle-fused generate`.
#[derive(Args, Debug)]
pub struct GenerateArgs {
    #[arg(long)]
    pub model: String,
    /// A PEFT adapter directory.
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    #[arg(long)]
    pub prompt: String,
    #[arg(long, default_value_t = 64)]
    pub max_new_tokens: usize,
    /// 0: greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f64,
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Do not apply the chat template even if the tokenizer has one.
    #[arg(long)]
    pub raw: bool,
    #[arg(long, value_enum, default_value = "cpu")]
    pub device: Dev,
    #[arg(long, value_enum, default_value = "f32")]
    pub dtype: Dt,
}

pub fn generate_cmd(a: GenerateArgs) -> Result<()> {
    use std::io::Write;
    let dev = device(a.device)?;
    let dir = model_dir(&a.model)?;
    let tok = Tokenizer::load(&dir)?;
    let mut model = Model::load(&dir, a.dtype.dtype(), &dev)?;
    if let Some(ad) = &a.adapter {
        model.load_adapter(ad)?;
    }
    let prompt = if tok.has_chat_template() && !a.raw {
        let msgs = [candle_fused_train::Message {
            role: "user".into(),
            content: a.prompt.clone(),
        }];
        tok.encode(&tok.render_chat(&msgs, true)?, false)?
    } else {
        tok.encode(&a.prompt, true)?
    };
    let mut stops = model.config().eos_token_ids.clone();
    stops.extend(tok.eos_id());
    let cfg = GenerateConfig {
        max_new_tokens: a.max_new_tokens,
        temperature: a.temperature,
        top_k: a.top_k,
        top_p: a.top_p,
        seed: a.seed,
        stop_tokens: Some(stops),
    };
    print!("{}", a.prompt);
    let mut out = std::io::stdout();
    let mut ids: Vec<u32> = Vec::new();
    let mut shown = 0;
    let t0 = std::time::Instant::now();
    let gen = generate(&model, &prompt, &cfg, |t| {
        ids.push(t);
        // Stream: print the text decoded so far beyond what was shown.
        if let Ok(text) = tok.decode(&ids, true) {
            if text.len() > shown && text.is_char_boundary(shown) {
                let _ = write!(out, "{}", &text[shown..]);
                let _ = out.flush();
                shown = text.len();
            }
        }
    })?;
    println!();
    eprintln!(
        "[{} tokens in {:.2} s]",
        gen.len(),
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}

/// `candle-fused eval`.
#[derive(Args, Debug)]
pub struct EvalArgs {
    #[arg(long)]
    pub model: String,
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    #[arg(long)]
    pub data: PathBuf,
    #[arg(long, default_value_t = 512)]
    pub seq_len: usize,
    #[arg(long, default_value_t = 4)]
    pub batch_size: usize,
    #[arg(long, value_enum, default_value = "cpu")]
    pub device: Dev,
    #[arg(long, value_enum, default_value = "f32")]
    pub dtype: Dt,
}

pub fn eval_cmd(a: EvalArgs) -> Result<()> {
    let dev = device(a.device)?;
    let dir = model_dir(&a.model)?;
    let tok = Tokenizer::load(&dir)?;
    let mut model = Model::load(&dir, a.dtype.dtype(), &dev)?;
    if let Some(ad) = &a.adapter {
        model.load_adapter(ad)?;
    }
    let ex = load_jsonl(&a.data, &tok)?;
    let (rows, st) = build_rows(&ex, a.seq_len, false, Overflow::Truncate)?;
    let pad = model.config().pad_token_id.or(tok.eos_id()).unwrap_or(0);
    let loss = candle_fused_train::train::eval_rows(&model, &rows, a.batch_size, pad)?
        .context("no target tokens in the data")?;
    println!(
        "{} examples, {} target tokens ({} examples truncated): loss {loss:.4}, perplexity {:.3}",
        st.examples,
        st.target_tokens,
        st.truncated_examples,
        (loss as f64).exp()
    );
    Ok(())
}

/// `candle-fused merge`.
#[derive(Args, Debug)]
pub struct MergeArgs {
    #[arg(long)]
    pub model: String,
    #[arg(long)]
    pub adapter: PathBuf,
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long)]
    pub overwrite: bool,
    #[arg(long, value_enum, default_value = "f32")]
    pub dtype: Dt,
}

pub fn merge_cmd(a: MergeArgs) -> Result<()> {
    if a.out.exists() && !a.overwrite {
        bail!("{} exists; pass --overwrite to replace it", a.out.display())
    }
    let dir = model_dir(&a.model)?;
    let mut model = Model::load(&dir, a.dtype.dtype(), &Device::Cpu)?;
    model.load_adapter(&a.adapter)?;
    model.save(&a.out, true)?;
    for f in [
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "generation_config.json",
        "chat_template.jinja",
    ] {
        let src = dir.join(f);
        if src.exists() {
            let bytes =
                std::fs::read(&src).with_context(|| format!("cannot read {}", src.display()))?;
            candle_fused_train::write_atomic(&a.out.join(f), &bytes)?;
        }
    }
    println!(
        "merged {} into {}: {}",
        a.adapter.display(),
        dir.display(),
        a.out.display()
    );
    Ok(())
}
