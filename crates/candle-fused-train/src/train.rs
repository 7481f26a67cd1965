//! The [`Trainer`]: optimizer steps of `grad_accum` micro-batches (token-weighted), AdamW with
//! a warmup schedule and gradient clipping, held-out loss every N steps, checkpoints every N
//! steps (adapter + optimizer moments + step + data position + dropout RNG, written into a
//! temporary directory and renamed), [`Trainer::resume`] that continues with exactly the loss
//! curve of an uninterrupted run, a stop request from the [`Callback`] that saves a checkpoint,
//! a NaN/inf loss that stops with a clear error keeping the last good checkpoint,
//! `metrics.jsonl` and a loss plot. Data order: a seeded permutation per epoch.

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::Result;
use serde_json::{json, Value};

use crate::backward::LoraGrads;
use crate::data::{make_batch, Row};
use crate::model::Model;
use crate::optim::{clip_grad_norm, AdamW, AdamWConfig, Schedule};
use crate::util::{err, fail, save_safetensors, write_atomic, Context, SplitMix64};

const WHAT: &str = "train";

/// Which backward computes the gradients.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackwardKind {
    /// The explicit backward ([`Model::loss_and_grads`]).
    Explicit,
    /// Candle's tape ([`Model::loss_and_grads_tape`]).
    Tape,
}

/// Training options.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainConfig {
    /// Peak learning rate.
    pub lr: f64,
    pub schedule: Schedule,
    pub warmup_steps: usize,
    /// Optimizer steps in total.
    pub steps: usize,
    /// Rows per micro-batch.
    pub batch_size: usize,
    /// Micro-batches per optimizer step.
    pub grad_accum: usize,
    /// Global gradient-norm clipping (0: off).
    pub max_grad_norm: f64,
    pub adamw: AdamWConfig,
    /// Held-out loss every N steps (0: only at the start and the end).
    pub eval_every: usize,
    /// A checkpoint every N steps (0: none but a stop request's).
    pub save_every: usize,
    /// Checkpoints kept (older ones are deleted).
    pub keep_checkpoints: usize,
    /// Data order seed.
    pub seed: u64,
    /// Token id of the padding.
    pub pad_token: u32,
    pub backward: BackwardKind,
    /// Written into `adapter_config.json`.
    pub base_model_name_or_path: String,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            lr: 2e-4,
            schedule: Schedule::Cosine,
            warmup_steps: 0,
            steps: 100,
            batch_size: 4,
            grad_accum: 1,
            max_grad_norm: 1.0,
            adamw: AdamWConfig::default(),
            eval_every: 0,
            save_every: 0,
            keep_checkpoints: 2,
            seed: 0,
            pad_token: 0,
            backward: BackwardKind::Explicit,
            base_model_name_or_path: String::new(),
        }
    }
}

/// Optimizer steps for `epochs` passes over `rows` rows.
pub fn steps_for_epochs(rows: usize, epochs: f64, batch_size: usize, grad_accum: usize) -> usize {
    ((rows as f64 * epochs) / (batch_size * grad_accum).max(1) as f64)
        .ceil()
        .max(1.0) as usize
}

/// The rows to train and evaluate on.
#[derive(Debug, Clone, Default)]
pub struct TrainData {
    pub train: Vec<Row>,
    pub eval: Vec<Row>,
}

/// One finished optimizer step.
#[derive(Debug, Clone, PartialEq)]
pub struct StepInfo {
    /// Steps done (1-based).
    pub step: usize,
    pub total: usize,
    pub loss: f32,
    pub lr: f64,
    pub grad_norm: f64,
    /// Tokens (without padding) of this step.
    pub tokens: usize,
    pub tokens_per_sec: f64,
    /// Seconds since the run (or the resumed run) started.
    pub elapsed: f64,
}

/// Hooks into a run (progress bars, Ctrl-C, custom logging).
pub trait Callback {
    fn on_step(&mut self, _info: &StepInfo) {}
    fn on_eval(&mut self, _step: usize, _loss: f32) {}
    fn on_checkpoint(&mut self, _step: usize, _dir: &Path) {}
    /// Polled after each step: `true` saves a checkpoint and ends the run.
    fn stop_requested(&mut self) -> bool {
        false
    }
}

impl Callback for () {}

/// The result of [`Trainer::run`].
#[derive(Debug, Clone, PartialEq)]
pub struct TrainSummary {
    pub steps: usize,
    pub total_steps: usize,
    pub stopped_early: bool,
    pub first_eval: Option<f32>,
    pub last_eval: Option<f32>,
    pub first_loss: Option<f32>,
    pub last_loss: Option<f32>,
    pub tokens: usize,
    pub elapsed: f64,
    pub tokens_per_sec: f64,
    pub last_checkpoint: Option<PathBuf>,
}

/// Fine-tunes a model's LoRA adapters; see the module documentation. Output directory:
/// `adapter_config.json` + `adapter_model.safetensors` (the final adapter, PEFT format),
/// `metrics.jsonl`, `loss.svg`, `checkpoints/step-N/`.
pub struct Trainer {
    pub model: Model,
    cfg: TrainConfig,
    data: TrainData,
    out: PathBuf,
    opt: AdamW,
    step: usize,
    epoch: u64,
    cursor: usize,
    order: Vec<usize>,
    tokens: usize,
    metrics: Vec<Value>,
    first_eval: Option<f32>,
    last_checkpoint: Option<PathBuf>,
}

fn check(cfg: &TrainConfig, data: &TrainData, model: &Model) -> Result<()> {
    if model.lora().is_none() {
        fail!(
            WHAT,
            "the model has no LoRA adapters (add_lora or load_adapter first)"
        )
    }
    if data.train.is_empty() {
        fail!(WHAT, "no training rows")
    }
    if cfg.steps == 0 || cfg.batch_size == 0 || cfg.grad_accum == 0 {
        fail!(WHAT, "steps, batch_size and grad_accum must be >= 1")
    }
    if !(cfg.lr.is_finite() && cfg.lr > 0.0) {
        fail!(WHAT, "lr must be > 0, got {}", cfg.lr)
    }
    Ok(())
}

fn permutation(n: usize, seed: u64, epoch: u64) -> Vec<usize> {
    let mut v: Vec<usize> = (0..n).collect();
    SplitMix64::keyed(seed, epoch, 0xDA7A).shuffle(&mut v);
    v
}

impl Trainer {
    /// A fresh run writing into `out` (created if needed).
    pub fn new(model: Model, data: TrainData, cfg: TrainConfig, out: &Path) -> Result<Self> {
        check(&cfg, &data, &model)?;
        std::fs::create_dir_all(out).context(WHAT, format!("cannot create {}", out.display()))?;
        let order = permutation(data.train.len(), cfg.seed, 0);
        Ok(Self {
            opt: AdamW::new(cfg.adamw)?,
            model,
            cfg,
            data,
            out: out.to_path_buf(),
            step: 0,
            epoch: 0,
            cursor: 0,
            order,
            tokens: 0,
            metrics: Vec::new(),
            first_eval: None,
            last_checkpoint: None,
        })
    }

    /// Continues the run in `out` from its latest checkpoint (same data and configuration:
    /// seed, batch size, accumulation, steps and the number of rows are checked).
    pub fn resume(mut model: Model, data: TrainData, cfg: TrainConfig, out: &Path) -> Result<Self> {
        let Some(ck) = latest_checkpoint(out)? else {
            fail!(
                WHAT,
                "--resume: no checkpoint in {}",
                out.join("checkpoints").display()
            )
        };
        let st_path = ck.join("trainer_state.json");
        let text = std::fs::read_to_string(&st_path)
            .context(WHAT, format!("cannot read {}", st_path.display()))?;
        let st: Value = serde_json::from_str(&text)
            .context(WHAT, format!("invalid JSON in {}", st_path.display()))?;
        let u = |k: &str| -> Result<u64> {
            st.get(k)
                .and_then(Value::as_u64)
                .ok_or_else(|| err(WHAT, format!("{}: missing \"{k}\"", st_path.display())))
        };
        for (k, now) in [
            ("seed", cfg.seed),
            ("batch_size", cfg.batch_size as u64),
            ("grad_accum", cfg.grad_accum as u64),
            ("total_steps", cfg.steps as u64),
            ("train_rows", data.train.len() as u64),
        ] {
            let then = u(k)?;
            if then != now {
                fail!(
                    WHAT,
                    "--resume: the checkpoint was made with {k} = {then}, this run has {now}"
                )
            }
        }
        model.load_adapter(&ck)?;
        model.set_dropout_state(u("dropout_state")?);
        let mut this = Self::new(model, data, cfg, out)?;
        let opt =
            candle_core::safetensors::load(ck.join("optimizer.safetensors"), this.model.device())?;
        this.step = u("step")? as usize;
        this.opt.load_state(opt, this.step as u64)?;
        this.epoch = u("epoch")?;
        this.cursor = u("cursor")? as usize;
        this.tokens = u("tokens")? as usize;
        this.order = permutation(this.data.train.len(), this.cfg.seed, this.epoch);
        this.first_eval = st
            .get("first_eval")
            .and_then(Value::as_f64)
            .map(|x| x as f32);
        let m = ck.join("metrics.jsonl");
        if m.exists() {
            let text = std::fs::read_to_string(&m)
                .context(WHAT, format!("cannot read {}", m.display()))?;
            this.metrics = text
                .lines()
                .filter_map(|l| serde_json::from_str(l).ok())
                .collect();
        }
        this.last_checkpoint = Some(ck);
        Ok(this)
    }

    /// Steps done.
    pub fn step(&self) -> usize {
        self.step
    }

    /// The metrics records so far.
    pub fn metrics(&self) -> &[Value] {
        &self.metrics
    }

    /// The output directory.
    pub fn out_dir(&self) -> &Path {
        &self.out
    }

    fn next_rows(&mut self, n: usize) -> Vec<usize> {
        let mut v = Vec::with_capacity(n);
        while v.len() < n {
            if self.cursor >= self.order.len() {
                self.epoch += 1;
                self.cursor = 0;
                self.order = permutation(self.data.train.len(), self.cfg.seed, self.epoch);
            }
            v.push(self.order[self.cursor]);
            self.cursor += 1;
        }
        v
    }

    /// Token-weighted mean loss over the held-out rows (no dropout); `None` without them.
    pub fn evaluate(&self) -> Result<Option<f32>> {
        eval_rows(
            &self.model,
            &self.data.eval,
            self.cfg.batch_size,
            self.cfg.pad_token,
        )
    }

    /// One optimizer step; returns its info.
    fn train_step(&mut self, started: Instant) -> Result<StepInfo> {
        let t0 = Instant::now();
        let lr = self.cfg.schedule.lr(
            self.cfg.lr,
            self.step,
            self.cfg.warmup_steps,
            self.cfg.steps,
        );
        let mut micro = Vec::with_capacity(self.cfg.grad_accum);
        let mut tokens = 0;
        for _ in 0..self.cfg.grad_accum {
            let idx = self.next_rows(self.cfg.batch_size);
            let rows: Vec<&Row> = idx.iter().map(|&i| &self.data.train[i]).collect();
            tokens += rows.iter().map(|r| r.tokens.len()).sum::<usize>();
            let b = make_batch(&rows, self.cfg.pad_token, self.model.device())?;
            let n = b.n_valid()?;
            micro.push((b, n));
        }
        let total: usize = micro.iter().map(|(_, n)| n).sum();
        let mut grads = LoraGrads::default();
        let mut loss = 0f64;
        for (b, n) in &micro {
            let w = if total == 0 {
                0.0
            } else {
                *n as f64 / total as f64
            };
            let (l, g) = match self.cfg.backward {
                BackwardKind::Explicit => self.model.loss_and_grads_scaled(b, w)?,
                BackwardKind::Tape => {
                    let (l, mut g) = self.model.loss_and_grads_tape(b)?;
                    g.scale(w)?;
                    (l, g)
                }
            };
            loss += l as f64 * w;
            grads.add_scaled(&g, 1.0)?;
        }
        let loss = loss as f32;
        let grad_norm = clip_grad_norm(&mut grads, self.cfg.max_grad_norm)?;
        if !loss.is_finite() || !grad_norm.is_finite() {
            let last = match &self.last_checkpoint {
                Some(p) => format!("the last good checkpoint is {}", p.display()),
                None => "no checkpoint was saved yet".to_string(),
            };
            fail!(
                WHAT,
                "the loss became {} at step {} (lr {lr:.3e}, gradient norm {grad_norm}); stopped without applying the update; {last}",
                if loss.is_finite() { format!("{loss} with a non-finite gradient") } else { loss.to_string() },
                self.step + 1
            )
        }
        self.opt.step(&self.model.lora_vars(), &grads, lr)?;
        self.step += 1;
        self.tokens += tokens;
        let dt = t0.elapsed().as_secs_f64();
        let info = StepInfo {
            step: self.step,
            total: self.cfg.steps,
            loss,
            lr,
            grad_norm,
            tokens,
            tokens_per_sec: tokens as f64 / dt.max(1e-9),
            elapsed: started.elapsed().as_secs_f64(),
        };
        self.metrics.push(json!({
            "step": info.step, "loss": info.loss, "lr": info.lr, "grad_norm": info.grad_norm,
            "tokens": info.tokens, "tokens_per_sec": info.tokens_per_sec, "elapsed_s": info.elapsed,
        }));
        Ok(info)
    }

    fn record_eval(&mut self, cb: &mut dyn Callback) -> Result<Option<f32>> {
        let e = self.evaluate()?;
        if let Some(l) = e {
            if self.first_eval.is_none() {
                self.first_eval = Some(l);
            }
            self.metrics
                .push(json!({"step": self.step, "eval_loss": l}));
            cb.on_eval(self.step, l);
        }
        Ok(e)
    }

    /// Runs to `cfg.steps` (or a stop request); writes the final adapter, metrics and plot.
    pub fn run(&mut self, cb: &mut dyn Callback) -> Result<TrainSummary> {
        let started = Instant::now();
        let tokens_before = self.tokens;
        let mut last_eval = None;
        if self.step == 0 {
            last_eval = self.record_eval(cb)?;
        }
        let mut stopped = false;
        while self.step < self.cfg.steps {
            let info = self.train_step(started)?;
            cb.on_step(&info);
            let s = self.step;
            let done = s == self.cfg.steps;
            if done || (self.cfg.eval_every > 0 && s.is_multiple_of(self.cfg.eval_every)) {
                last_eval = self.record_eval(cb)?.or(last_eval);
            }
            let stop = !done && cb.stop_requested();
            if stop || (self.cfg.save_every > 0 && s.is_multiple_of(self.cfg.save_every) && !done) {
                let dir = self.save_checkpoint()?;
                cb.on_checkpoint(s, &dir);
                self.write_metrics()?;
            }
            if stop {
                stopped = true;
                break;
            }
        }
        self.model
            .save_adapter(&self.out, &self.cfg.base_model_name_or_path)?;
        self.write_metrics()?;
        let losses: Vec<f32> = self
            .metrics
            .iter()
            .filter_map(|m| m.get("loss").and_then(Value::as_f64))
            .map(|x| x as f32)
            .collect();
        let elapsed = started.elapsed().as_secs_f64();
        let tokens = self.tokens - tokens_before;
        Ok(TrainSummary {
            steps: self.step,
            total_steps: self.cfg.steps,
            stopped_early: stopped,
            first_eval: self.first_eval,
            last_eval,
            first_loss: losses.first().copied(),
            last_loss: losses.last().copied(),
            tokens,
            elapsed,
            tokens_per_sec: tokens as f64 / elapsed.max(1e-9),
            last_checkpoint: self.last_checkpoint.clone(),
        })
    }

    /// Writes `metrics.jsonl` and `loss.svg` (atomically).
    pub fn write_metrics(&self) -> Result<()> {
        let mut text = String::new();
        for m in &self.metrics {
            text.push_str(&m.to_string());
            text.push('\n');
        }
        write_atomic(&self.out.join("metrics.jsonl"), text.as_bytes())?;
        let pick = |k: &str| -> Vec<(f64, f64)> {
            self.metrics
                .iter()
                .filter_map(|m| Some((m.get("step")?.as_f64()?, m.get(k)?.as_f64()?)))
                .collect()
        };
        crate::plot::loss_plot(
            &self.out.join("loss.svg"),
            "LoRA fine-tuning",
            &pick("loss"),
            &pick("eval_loss"),
        )
    }

    /// Saves a checkpoint of the current state to `out/checkpoints/step-N` (built in a
    /// temporary directory, then renamed) and prunes old ones.
    pub fn save_checkpoint(&mut self) -> Result<PathBuf> {
        let root = self.out.join("checkpoints");
        let dir = root.join(format!("step-{}", self.step));
        let tmp = root.join(format!(".step-{}.tmp", self.step));
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp)
                .context(WHAT, format!("cannot remove {}", tmp.display()))?;
        }
        std::fs::create_dir_all(&tmp).context(WHAT, format!("cannot create {}", tmp.display()))?;
        let res = (|| -> Result<()> {
            self.model
                .save_adapter(&tmp, &self.cfg.base_model_name_or_path)?;
            save_safetensors(
                &tmp.join("optimizer.safetensors"),
                &self.opt.state_tensors(),
                None,
            )?;
            let st = json!({
                "step": self.step, "epoch": self.epoch, "cursor": self.cursor, "tokens": self.tokens,
                "dropout_state": self.model.dropout_state(), "seed": self.cfg.seed,
                "batch_size": self.cfg.batch_size, "grad_accum": self.cfg.grad_accum,
                "total_steps": self.cfg.steps, "train_rows": self.data.train.len(),
                "first_eval": self.first_eval,
            });
            write_atomic(
                &tmp.join("trainer_state.json"),
                serde_json::to_string_pretty(&st)
                    .map_err(|e| err(WHAT, e))?
                    .as_bytes(),
            )?;
            let mut text = String::new();
            for m in &self.metrics {
                text.push_str(&m.to_string());
                text.push('\n');
            }
            write_atomic(&tmp.join("metrics.jsonl"), text.as_bytes())?;
            if dir.exists() {
                std::fs::remove_dir_all(&dir)
                    .context(WHAT, format!("cannot replace {}", dir.display()))?;
            }
            std::fs::rename(&tmp, &dir).context(
                WHAT,
                format!("cannot rename {} to {}", tmp.display(), dir.display()),
            )
        })();
        if let Err(e) = res {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(e);
        }
        self.last_checkpoint = Some(dir.clone());
        // Prune: keep the newest `keep_checkpoints`.
        let mut all = list_checkpoints(&self.out)?;
        let keep = self.cfg.keep_checkpoints.max(1);
        if all.len() > keep {
            all.sort();
            for (_, p) in &all[..all.len() - keep] {
                let _ = std::fs::remove_dir_all(p);
            }
        }
        Ok(dir)
    }
}

/// Token-weighted mean loss of `model` over `rows` in batches (no dropout).
pub fn eval_rows(model: &Model, rows: &[Row], batch_size: usize, pad: u32) -> Result<Option<f32>> {
    if rows.is_empty() {
        return Ok(None);
    }
    let (mut sum, mut n) = (0f64, 0usize);
    for chunk in rows.chunks(batch_size.max(1)) {
        let refs: Vec<&Row> = chunk.iter().collect();
        let b = make_batch(&refs, pad, model.device())?;
        let k = b.n_valid()?;
        if k == 0 {
            continue;
        }
        sum += model.loss(&b)? as f64 * k as f64;
        n += k;
    }
    Ok((n > 0).then(|| (sum / n as f64) as f32))
}

fn list_checkpoints(out: &Path) -> Result<Vec<(usize, PathBuf)>> {
    let root = out.join("checkpoints");
    if !root.exists() {
        return Ok(Vec::new());
    }
    let mut v = Vec::new();
    for e in std::fs::read_dir(&root).context(WHAT, format!("cannot list {}", root.display()))? {
        let e = e.context(WHAT, format!("cannot list {}", root.display()))?;
        let name = e.file_name().to_string_lossy().into_owned();
        if let Some(n) = name
            .strip_prefix("step-")
            .and_then(|s| s.parse::<usize>().ok())
        {
            if e.path().join("trainer_state.json").exists() {
                v.push((n, e.path()));
            }
        }
    }
    Ok(v)
}

/// The newest complete checkpoint under `out/checkpoints`.
pub fn latest_checkpoint(out: &Path) -> Result<Option<PathBuf>> {
    Ok(list_checkpoints(out)?.into_iter().max().map(|(_, p)| p))
}
