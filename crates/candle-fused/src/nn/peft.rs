//! Adapters in the Hugging Face PEFT format: a directory with `adapter_config.json` and
//! `adapter_model.safetensors`, whose tensors are named
//! `base_model.model.<module path>.lora_A.weight` (`[r, in]`) and `...lora_B.weight`
//! (`[out, r]`). What PEFT's `save_pretrained` writes and `PeftModel.from_pretrained` reads.
//!
//! ```no_run
//! # use candle_core::{DType, Device};
//! # use candle_fused::nn::{save_adapters, LoraConfig, LoraLinear, PeftAdapters};
//! # fn f(mut fc1: LoraLinear, fc2: LoraLinear) -> candle_core::Result<()> {
//! let cfg = LoraConfig::new(8, 16.0);
//! save_adapters("out/adapter", &cfg, &[("fc1", &fc1), ("fc2", &fc2)])?;
//! let loaded = PeftAdapters::load("out/adapter", &Device::Cpu)?;
//! loaded.apply("fc1", &mut fc1)?; // A, B and the scale of module "fc1"
//! # Ok(()) }
//! ```

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::{Device, Result, Tensor};
use serde_json::{json, Value};

use super::{LoraConfig, LoraLinear};
use crate::validate::{err, fail};

const OP: &str = "peft";

/// The prefix PEFT puts before module paths in `adapter_model.safetensors`.
pub const PEFT_PREFIX: &str = "base_model.model.";
const CONFIG_FILE: &str = "adapter_config.json";
const WEIGHTS_FILE: &str = "adapter_model.safetensors";

/// The PEFT tensor name of `which` (`"lora_A"` or `"lora_B"`) of the module at `path`.
pub fn peft_key(path: &str, which: &str) -> String {
    format!("{PEFT_PREFIX}{path}.{which}.weight")
}

fn io_err(what: &str, p: &Path, e: impl std::fmt::Display) -> candle_core::Error {
    err(OP, format!("{what} {}: {e}", p.display()))
}

/// An integral value as a JSON integer (PEFT's `lora_alpha` is an `int`), else a float.
fn num(v: f64) -> Value {
    if v.fract() == 0.0 && v.abs() < 1e15 {
        json!(v as i64)
    } else {
        json!(v)
    }
}

impl LoraConfig {
    /// The `adapter_config.json` PEFT writes for this config (LoRA, `bias = "none"`,
    /// `fan_in_fan_out = false`, no DoRA).
    pub fn to_peft_json(&self) -> Value {
        json!({
            "alpha_pattern": self
                .alpha_pattern
                .iter()
                .map(|(k, &a)| (k.clone(), num(a)))
                .collect::<serde_json::Map<String, Value>>(),
            "auto_mapping": null,
            "base_model_name_or_path": self.base_model_name_or_path,
            "bias": "none",
            "fan_in_fan_out": false,
            "inference_mode": true,
            "init_lora_weights": true,
            "layers_pattern": null,
            "layers_to_transform": null,
            "lora_alpha": num(self.alpha),
            // The f32 as its shortest decimal (0.05, not 0.05000000074505806).
            "lora_dropout": self.dropout.to_string().parse::<f64>().unwrap_or(0.0),
            "modules_to_save": null,
            "peft_type": "LORA",
            "r": self.rank,
            "rank_pattern": self.rank_pattern,
            "revision": null,
            "target_modules": self.target_modules,
            "task_type": self.task_type,
            "use_dora": false,
            "use_rslora": self.use_rslora,
        })
    }

    /// Parses PEFT's `adapter_config.json`. Errors on what this crate cannot run: another
    /// `peft_type`, DoRA, `fan_in_fan_out` (Conv1D-style transposed weights), trained biases.
    pub fn from_peft_json(v: &Value) -> Result<Self> {
        let get = |k: &str| v.get(k).filter(|x| !x.is_null());
        if let Some(t) = get("peft_type").and_then(Value::as_str) {
            if t != "LORA" {
                fail!(
                    OP,
                    "adapter_config.json: peft_type is {t:?}, expected \"LORA\""
                )
            }
        }
        let flag = |k: &str| get(k).and_then(Value::as_bool).unwrap_or(false);
        if flag("use_dora") {
            fail!(
                OP,
                "adapter_config.json: use_dora = true (DoRA) is not supported"
            )
        }
        if flag("fan_in_fan_out") {
            fail!(OP, "adapter_config.json: fan_in_fan_out = true (transposed Conv1D weights) is not supported")
        }
        // Features that change what the adapter computes, or add tensors this crate would
        // silently ignore.
        for k in [
            "modules_to_save",
            "layer_replication",
            "trainable_token_indices",
            "target_parameters",
            "alora_invocation_tokens",
        ] {
            let empty = match get(k) {
                None => true,
                Some(Value::Array(a)) => a.is_empty(),
                Some(Value::Object(o)) => o.is_empty(),
                Some(_) => false,
            };
            if !empty {
                fail!(OP, "adapter_config.json: {k} = {} is not supported", v[k])
            }
        }
        for k in ["use_qalora", "use_bdlora"] {
            if flag(k) {
                fail!(OP, "adapter_config.json: {k} = true is not supported")
            }
        }
        if flag("lora_bias") {
            fail!(
                OP,
                "adapter_config.json: lora_bias = true (a bias on lora_B) is not supported"
            )
        }
        if let Some(b) = get("bias").and_then(Value::as_str) {
            if b != "none" {
                fail!(
                    OP,
                    "adapter_config.json: bias = {b:?} is not supported (only \"none\")"
                )
            }
        }
        let rank = get("r")
            .and_then(Value::as_u64)
            .ok_or_else(|| err(OP, "adapter_config.json: missing or invalid \"r\""))?
            as usize;
        let alpha = get("lora_alpha")
            .and_then(Value::as_f64)
            .ok_or_else(|| err(OP, "adapter_config.json: missing or invalid \"lora_alpha\""))?;
        let dropout = get("lora_dropout").and_then(Value::as_f64).unwrap_or(0.0) as f32;
        let target_modules = match get("target_modules") {
            Some(Value::Array(a)) => a
                .iter()
                .filter_map(|s| s.as_str().map(String::from))
                .collect(),
            Some(Value::String(s)) => vec![s.clone()],
            _ => Vec::new(),
        };
        let str_of = |k: &str| get(k).and_then(Value::as_str).map(String::from);
        let mut rank_pattern = BTreeMap::new();
        if let Some(Value::Object(m)) = get("rank_pattern") {
            for (k, x) in m {
                let r = x.as_u64().ok_or_else(|| {
                    err(
                        OP,
                        format!("adapter_config.json: rank_pattern[{k:?}] is not an integer"),
                    )
                })?;
                rank_pattern.insert(k.clone(), r as usize);
            }
        }
        let mut alpha_pattern = BTreeMap::new();
        if let Some(Value::Object(m)) = get("alpha_pattern") {
            for (k, x) in m {
                let a = x.as_f64().ok_or_else(|| {
                    err(
                        OP,
                        format!("adapter_config.json: alpha_pattern[{k:?}] is not a number"),
                    )
                })?;
                alpha_pattern.insert(k.clone(), a);
            }
        }
        Ok(Self {
            rank,
            alpha,
            dropout,
            use_rslora: flag("use_rslora"),
            target_modules,
            base_model_name_or_path: str_of("base_model_name_or_path"),
            task_type: str_of("task_type"),
            rank_pattern,
            alpha_pattern,
        })
    }
}

/// Saves the adapters of `layers` (module path, layer) in PEFT format under `dir` (created if
/// needed). Each layer's own rank and scale are recorded: where they differ from `config`, as
/// `rank_pattern`/`alpha_pattern` entries for its path. An empty `target_modules` becomes the
/// list of the saved paths. Tensors are saved in the adapters' dtype.
pub fn save_adapters<P: AsRef<Path>>(
    dir: P,
    config: &LoraConfig,
    layers: &[(&str, &LoraLinear)],
) -> Result<()> {
    let dir = dir.as_ref();
    if layers.is_empty() {
        fail!(OP, "save_adapters: no layers given")
    }
    let mut cfg = config.clone();
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    for (path, layer) in layers {
        if path.is_empty() {
            fail!(OP, "save_adapters: empty module path")
        }
        let key_a = peft_key(path, "lora_A");
        if tensors.contains_key(&key_a) {
            fail!(OP, "save_adapters: module path {path:?} given twice")
        }
        let r = layer.rank();
        // alpha such that scale_of(r, alpha) == layer.scale().
        let alpha = if cfg.use_rslora {
            layer.scale() * (r as f64).sqrt()
        } else {
            layer.scale() * r as f64
        };
        let own = cfg.for_module(path);
        if own.rank != r {
            cfg.rank_pattern.insert((*path).to_string(), r);
        }
        if (own.alpha - alpha).abs() > 1e-9 * alpha.abs().max(1.0) {
            cfg.alpha_pattern.insert((*path).to_string(), alpha);
        }
        tensors.insert(key_a, layer.lora_a().detach().contiguous()?);
        tensors.insert(
            peft_key(path, "lora_B"),
            layer.lora_b().detach().contiguous()?,
        );
    }
    if cfg.target_modules.is_empty() {
        cfg.target_modules = layers.iter().map(|(p, _)| (*p).to_string()).collect();
    }
    std::fs::create_dir_all(dir).map_err(|e| io_err("cannot create", dir, e))?;
    let cfg_path = dir.join(CONFIG_FILE);
    let text = serde_json::to_string_pretty(&cfg.to_peft_json()).map_err(|e| err(OP, e))?;
    std::fs::write(&cfg_path, text).map_err(|e| io_err("cannot write", &cfg_path, e))?;
    candle_core::safetensors::save(&tensors, dir.join(WEIGHTS_FILE))
}

/// Adapters loaded from a PEFT directory.
#[derive(Debug, Clone)]
pub struct PeftAdapters {
    /// The parsed `adapter_config.json`.
    pub config: LoraConfig,
    tensors: HashMap<String, Tensor>,
}

impl PeftAdapters {
    /// Reads `adapter_config.json` and `adapter_model.safetensors` from `dir` onto `device`
    /// (tensors keep the file's dtype; [`Self::apply`] converts to the layer's).
    pub fn load<P: AsRef<Path>>(dir: P, device: &Device) -> Result<Self> {
        let dir = dir.as_ref();
        let cfg_path = dir.join(CONFIG_FILE);
        let text =
            std::fs::read_to_string(&cfg_path).map_err(|e| io_err("cannot read", &cfg_path, e))?;
        let v: Value =
            serde_json::from_str(&text).map_err(|e| io_err("invalid JSON in", &cfg_path, e))?;
        let config = LoraConfig::from_peft_json(&v)?;
        let w_path = dir.join(WEIGHTS_FILE);
        if !w_path.exists() {
            if dir.join("adapter_model.bin").exists() {
                fail!(
                    OP,
                    "{} holds adapter_model.bin (pickle); only safetensors is supported",
                    dir.display()
                )
            }
            fail!(OP, "{} not found", w_path.display())
        }
        let tensors = candle_core::safetensors::load(&w_path, device)?;
        let this = Self { config, tensors };
        if this.module_paths().is_empty() {
            fail!(
                OP,
                "{} has no `{PEFT_PREFIX}<path>.lora_A.weight` tensors",
                w_path.display()
            )
        }
        Ok(this)
    }

    /// The module paths with a LoRA adapter, sorted.
    pub fn module_paths(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .tensors
            .keys()
            .filter_map(|k| k.strip_prefix(PEFT_PREFIX)?.strip_suffix(".lora_A.weight"))
            .map(String::from)
            .collect();
        v.sort();
        v
    }

    /// `(A, B)` of the module at `path`.
    pub fn get(&self, path: &str) -> Result<(&Tensor, &Tensor)> {
        let find = |which| {
            let k = peft_key(path, which);
            self.tensors.get(&k).ok_or_else(|| {
                err(
                    OP,
                    format!(
                        "no tensor {k:?} in the adapter (modules: {:?})",
                        self.module_paths()
                    ),
                )
            })
        };
        let (a, b) = (find("lora_A")?, find("lora_B")?);
        let (r, _) = a.dims2()?;
        let (_, rb) = b.dims2()?;
        if rb != r {
            fail!(
                OP,
                "module {path:?}: lora_A is {:?} but lora_B is {:?} (ranks differ)",
                a.dims(),
                b.dims()
            )
        }
        Ok((a, b))
    }

    /// The scale of the module at `path` (its `alpha_pattern` entry or `lora_alpha`, over its
    /// rank as stored).
    pub fn scale_for(&self, path: &str) -> Result<f64> {
        let (a, _) = self.get(path)?;
        let r = a.dims()[0];
        let c = self.config.for_module(path);
        Ok(self.config.scale_of(r, c.alpha))
    }

    /// Loads the adapter of module `path` into `layer` (converted to its dtype and device), with
    /// the scale and dropout of the config.
    pub fn apply(&self, path: &str, layer: &mut LoraLinear) -> Result<()> {
        let (a, b) = self.get(path)?;
        let (r, k) = a.dims2()?;
        let (n, _) = b.dims2()?;
        if k != layer.in_dim() || n != layer.out_dim() {
            fail!(
                OP,
                "module {path:?}: adapter is {n}x{k} (out x in, rank {r}) but the layer is {}x{}",
                layer.out_dim(),
                layer.in_dim()
            )
        }
        layer.set_adapter(a, b, self.scale_for(path)?)?;
        layer.set_dropout(self.config.dropout)
    }
}
