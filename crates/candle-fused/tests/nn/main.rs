//! The nn modules, together: `LoraLinear` (`nn/lora.rs`: PEFT init and names, base output when
//! fresh or disabled, merge/unmerge, training, dropout, bad configs), the PEFT adapter files
//! (`nn/peft.rs`) and `RmsNorm` (`nn/rms_norm.rs`).

mod lora;
mod peft;
mod rms_norm;
