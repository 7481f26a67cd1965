//! The Rust half of `scripts/peft_interop.py` (interop with Hugging Face PEFT).
//!
//! ```text
//! peft_interop reproduce --dir D [--device cpu|cuda]
//!     loads the base weights D/base.safetensors, the model description D/model.json and the
//!     PEFT adapter D/peft_adapter/, runs D/io.safetensors["x"] through the stack and compares
//!     with PEFT's outputs (adapter on: "y_peft", off: "y_base"), unmerged and merged;
//!     prints one JSON line and exits 1 when a relative error exceeds 1e-4.
//! peft_interop export --dir D [--device cpu|cuda]
//!     trains a fresh adapter of its own (r = 4, alpha = 8, and r = 6, alpha = 18 for "fc2"
//!     through rank_pattern/alpha_pattern; a few AdamW steps) on the same
//!     base, saves it in PEFT format to D/ours_adapter/ and its outputs on "x" to
//!     D/ours_out.safetensors ("y"), for PEFT to load and compare.
//! ```
//!
//! `model.json`: `{"layers": [{"path": "fc1", "in": 64, "out": 96, "bias": true}, ...],
//! "activation": "relu"}` (the activation sits between consecutive layers).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Module, Tensor};
use candle_fused::nn::{save_adapters, LoraConfig, LoraLinear, PeftAdapters};
use candle_nn::{Optimizer, VarBuilder, VarMap};
use serde::Deserialize;

#[derive(Deserialize)]
struct LayerSpec {
    path: String,
    #[serde(rename = "in")]
    in_dim: usize,
    #[serde(rename = "out")]
    out_dim: usize,
    bias: bool,
}

#[derive(Deserialize)]
struct ModelSpec {
    layers: Vec<LayerSpec>,
    activation: String,
}

struct Stack {
    layers: Vec<(String, LoraLinear)>,
    activation: String,
}

impl Stack {
    /// Base weights from `base.safetensors`, fresh adapters of `cfg` (per module, with its
    /// rank/alpha patterns) in `vm`.
    fn load(dir: &Path, cfg: &LoraConfig, vm: &VarMap, dev: &Device) -> Result<Self> {
        let spec: ModelSpec =
            serde_json::from_str(&std::fs::read_to_string(dir.join("model.json"))?)?;
        let base = candle_core::safetensors::load(dir.join("base.safetensors"), dev)?;
        let base_vb = VarBuilder::from_tensors(base, DType::F32, dev);
        let lora_vb = VarBuilder::from_varmap(vm, DType::F32, dev);
        let mut layers = Vec::new();
        for l in &spec.layers {
            let lin = candle_nn::linear_b(l.in_dim, l.out_dim, l.bias, base_vb.pp(&l.path))
                .with_context(|| format!("base weights of {}", l.path))?;
            let lora =
                LoraLinear::from_linear(&lin, &cfg.for_module(&l.path), lora_vb.pp(&l.path))?;
            layers.push((l.path.clone(), lora));
        }
        Ok(Self {
            layers,
            activation: spec.activation,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = x.clone();
        for (i, (_, l)) in self.layers.iter().enumerate() {
            h = l.forward(&h)?;
            if i + 1 < self.layers.len() {
                h = match self.activation.as_str() {
                    "relu" => h.relu()?,
                    "gelu" => h.gelu_erf()?,
                    "identity" => h,
                    a => bail!("unknown activation {a:?}"),
                };
            }
        }
        Ok(h)
    }
}

fn rel_err(a: &Tensor, b: &Tensor) -> Result<f64> {
    Ok(candle_fused_testkit::testing::rel_err(a, b)?)
}

fn io(dir: &Path, dev: &Device) -> Result<HashMap<String, Tensor>> {
    Ok(candle_core::safetensors::load(
        dir.join("io.safetensors"),
        dev,
    )?)
}

fn reproduce(dir: &Path, dev: &Device) -> Result<bool> {
    let adapters = PeftAdapters::load(dir.join("peft_adapter"), dev)?;
    let vm = VarMap::new();
    let mut stack = Stack::load(dir, &adapters.config, &vm, dev)?;
    for (path, l) in stack.layers.iter_mut() {
        adapters.apply(path, l)?;
    }
    let io = io(dir, dev)?;
    let x = &io["x"];
    let y = stack.forward(x)?;
    let e_on = rel_err(&y, &io["y_peft"])?;
    for (_, l) in stack.layers.iter_mut() {
        l.set_adapter_enabled(false)?;
    }
    let e_off = rel_err(&stack.forward(x)?, &io["y_base"])?;
    for (_, l) in stack.layers.iter_mut() {
        l.set_adapter_enabled(true)?;
        l.merge()?;
    }
    let e_merged = rel_err(&stack.forward(x)?, &io["y_peft"])?;
    let adapter_effect = rel_err(&io["y_peft"], &io["y_base"])?;
    let ok = e_on < 1e-4 && e_off < 1e-4 && e_merged < 1e-4;
    println!(
        "{}",
        serde_json::json!({
            "mode": "reproduce",
            "device": format!("{:?}", dev.location()),
            "modules": adapters.module_paths(),
            "r": adapters.config.rank,
            "lora_alpha": adapters.config.alpha,
            "scales": adapters
                .module_paths()
                .iter()
                .map(|p| adapters.scale_for(p))
                .collect::<candle_core::Result<Vec<f64>>>()?,
            "rel_err_adapter_on": e_on,
            "rel_err_adapter_off": e_off,
            "rel_err_merged": e_merged,
            "adapter_effect_rel": adapter_effect,
            "tolerance": 1e-4,
            "pass": ok,
        })
    );
    Ok(ok)
}

fn export(dir: &Path, dev: &Device) -> Result<bool> {
    // r = 4, alpha = 8, except fc2: r = 6, alpha = 18 (rank_pattern/alpha_pattern for PEFT).
    let mut cfg = LoraConfig::new(4, 8.0);
    cfg.rank_pattern.insert("fc2".into(), 6);
    cfg.alpha_pattern.insert("fc2".into(), 18.0);
    let vm = VarMap::new();
    let stack = Stack::load(dir, &cfg, &vm, dev)?;
    let io = io(dir, dev)?;
    let x = &io["x"];
    // A few AdamW steps toward a random target so that B is far from zero.
    let target = candle_fused_testkit::testing::randn(io["y_base"].dims(), 1.0, DType::F32, dev)?;
    let mut opt = candle_nn::AdamW::new(
        vm.all_vars(),
        candle_nn::ParamsAdamW {
            lr: 2e-2,
            ..Default::default()
        },
    )?;
    let loss = |y: &Tensor| -> Result<Tensor> { Ok((y - &target)?.sqr()?.mean_all()?) };
    let l0 = loss(&stack.forward(x)?)?.to_scalar::<f32>()?;
    for _ in 0..10 {
        opt.backward_step(&loss(&stack.forward(x)?)?)?;
    }
    let l1 = loss(&stack.forward(x)?)?.to_scalar::<f32>()?;
    let y = stack.forward(x)?;
    let refs: Vec<(&str, &LoraLinear)> =
        stack.layers.iter().map(|(p, l)| (p.as_str(), l)).collect();
    save_adapters(dir.join("ours_adapter"), &cfg, &refs)?;
    let mut out = HashMap::new();
    out.insert("y".to_string(), y.to_device(&Device::Cpu)?);
    candle_core::safetensors::save(&out, dir.join("ours_out.safetensors"))?;
    let b_norm = stack
        .layers
        .iter()
        .map(|(_, l)| candle_fused_testkit::testing::max_abs(l.lora_b()))
        .collect::<candle_core::Result<Vec<f64>>>()?;
    let ok = l1 < l0 && b_norm.iter().all(|&b| b > 0.0);
    println!(
        "{}",
        serde_json::json!({
            "mode": "export",
            "device": format!("{:?}", dev.location()),
            "r": cfg.rank,
            "lora_alpha": cfg.alpha,
            "rank_pattern": cfg.rank_pattern,
            "alpha_pattern": cfg.alpha_pattern,
            "train_loss_before": l0,
            "train_loss_after": l1,
            "max_abs_lora_b": b_norm,
            "pass": ok,
        })
    );
    Ok(ok)
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let usage = "usage: peft_interop reproduce|export --dir DIR [--device cpu|cuda]";
    let mode = args.first().context(usage)?.clone();
    let mut dir: Option<PathBuf> = None;
    let mut device = "cpu".to_string();
    let mut it = args[1..].iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--dir" => dir = Some(PathBuf::from(it.next().context(usage)?)),
            "--device" => device = it.next().context(usage)?.clone(),
            _ => bail!("unknown argument {a:?}; {usage}"),
        }
    }
    let dir = dir.context(usage)?;
    let dev = match device.as_str() {
        "cpu" => Device::Cpu,
        "cuda" => Device::new_cuda(0)?,
        d => bail!("unknown device {d:?}; {usage}"),
    };
    let ok = match mode.as_str() {
        "reproduce" => reproduce(&dir, &dev)?,
        "export" => export(&dir, &dev)?,
        m => bail!("unknown mode {m:?}; {usage}"),
    };
    if !ok {
        std::process::exit(1);
    }
    Ok(())
}
