//! Drop-in `candle_nn` modules built on the fused ops. Unlike candle-nn's, they train: every
//! parameter gets its gradient.

mod lora;
mod peft;
mod rms_norm;

pub use lora::{lora_linear, lora_linear_b, LoraConfig, LoraLinear};
pub use peft::{peft_key, save_adapters, PeftAdapters, PEFT_PREFIX};
pub use rms_norm::{rms_norm, RmsNorm};
