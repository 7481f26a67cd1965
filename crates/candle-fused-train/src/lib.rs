//! # candle-fused-train
//!
//! LoRA fine-tuning of Llama-family checkpoints (`LlamaForCausalLM`, `Qwen2ForCausalLM`,
//! `MistralForCausalLM`) on the candle-fused kernels, with a training step whose backward is
//! written out explicitly (frozen weights get no dW, each layer saves only what its backward
//! needs) and, as its reference, the same forward on Candle's tape.
//!
//! ```no_run
//! use candle_core::{DType, Device, Tensor};
//! use candle_fused_train::{AdamW, AdamWConfig, Batch, LoraSpec, Model};
//! # fn main() -> candle_core::Result<()> {
//! let dev = Device::Cpu;
//! let mut model = Model::load("path/to/checkpoint".as_ref(), DType::F32, &dev)?;
//! model.add_lora(&LoraSpec::new(16, 32.0), 0)?;
//! let tokens = Tensor::new(&[[1u32, 2, 3, 4]], &dev)?;
//! let targets = Tensor::new(&[[2i64, 3, 4, -100]], &dev)?;
//! let batch = Batch::new(tokens, targets);
//! let (loss, grads) = model.loss_and_grads(&batch)?;
//! let mut opt = AdamW::new(AdamWConfig::default())?;
//! opt.step(&model.lora_vars(), &grads, 1e-4)?;
//! model.save_adapter("out/adapter".as_ref(), "path/to/checkpoint")?;
//! # let _ = loss; Ok(()) }
//! ```
//!
//! ## API (what the CLI and the parity tests code against)
//! - [`ModelConfig`] (`from_file`, `from_json`, [`Arch`]), [`Model`] (`load`, `random`,
//!   `add_lora`, `load_adapter`, `save_adapter`, `forward` → logits `[B, T, V]` on the tape,
//!   `loss`, `loss_and_grads` (explicit backward), `loss_and_grads_tape`, `lora_params`,
//!   `lora_vars`, `save` (optionally merged)).
//! - [`Batch`]: `tokens` u32 `[B, T]`, `targets` i64 `[B, T]` **already shifted** (the target
//!   of position `t` is token `t + 1`; `-100` ignored), optional `positions` and `segments`
//!   (packing).
//! - [`LoraGrads`]: f32 gradients keyed by PEFT key
//!   (`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`).
//! - [`LoraSpec`] / [`Target`], [`AdamW`] / [`AdamWConfig`], [`Schedule`], [`clip_grad_norm`].
//!
//! - [`Trainer`] (`new(model, data, cfg, out)`, `resume`, `run(&mut dyn Callback)`),
//!   [`TrainConfig`], [`TrainData`] of [`Row`]s ([`load_jsonl`], [`split`], [`build_rows`],
//!   [`make_batch`]), [`Callback`], [`generate`] / [`GenerateConfig`] / [`KvCache`],
//!   [`Tokenizer`], [`demo`].
//!
//! Beyond the names agreed in the task: `Model::random` / `random_with` (seeded random
//! checkpoints), `Model::loss` (eval loss outside autograd), `Model::loss_and_grads_scaled`
//! (gradients of `dloss · loss`, for accumulation), `Model::forward_cached`, `Model::save(dir,
//! merge_lora)`, `Model::lora_vars` (what the optimizer updates), `set_activation_checkpointing`,
//! `set_kernels`, `set_dropout_state`. `generate` returns the new tokens only.
//!
//! Conventions worth knowing when comparing with transformers + PEFT: the loss is the mean over
//! non-ignored targets of the batch (HF shifts `labels` inside the model; here `targets` come
//! shifted); LoRA dropout draws its masks from the model's own seeded stream (so the tape and
//! explicit paths see the same masks), not torch's; the RoPE table is f32 (angles `p·inv_freq`
//! in f32, like HF) and is capped at 32768 positions; the tape path computes the full logits and
//! cross-entropy, the explicit path never builds them.
//!
//! The model runs the fused ops of `candle_fused::ops` (RoPE, SwiGLU/GeGLU, RMSNorm,
//! add+RMSNorm, masked softmax, LoRA linear, linear + cross-entropy) with the model's
//! `Kernels`; the explicit backward calls their standalone backwards.

pub mod backward;
mod checkpoint;
pub mod config;
pub mod data;
pub mod demo;
pub mod generate;
pub mod lora;
pub mod model;
pub mod optim;
mod plot;
pub mod tokenizer;
pub mod train;
pub(crate) mod util;
pub mod weights;

/// The ops the model runs: the fused ops of `candle_fused::ops`.
pub(crate) use candle_fused::ops as kops;

pub use backward::LoraGrads;
pub use candle_fused::ops::RopeScaling;
pub use config::{Activation, Arch, ModelConfig};
pub use data::{build_rows, load_jsonl, make_batch, split, DataStats, Example, Overflow, Row};
pub use generate::{generate, GenerateConfig, KvCache};
pub use lora::{Adapter, Lora, LoraSpec, Target};
pub use model::{Batch, Model};
pub use optim::{clip_grad_norm, AdamW, AdamWConfig, Schedule};
pub use plot::loss_plot;
pub use tokenizer::{Message, Tokenizer};
pub use train::{
    steps_for_epochs, BackwardKind, Callback, StepInfo, TrainConfig, TrainData, TrainSummary,
    Trainer,
};
pub use util::{keep_freed_device_memory, keep_freed_memory, write_atomic, SplitMix64};
pub use weights::{default_hub_cache, resolve_model_dir, Weights};
