//! LoRA on the decoder's projections: [`Target`]s (q/k/v/o/gate/up/down, default all of them
//! like PEFT's `all-linear`), [`LoraSpec`] (rank, alpha, dropout, rsLoRA), the f32 master
//! parameters, PEFT init (A Kaiming-uniform, B zero: step 0 equals the base model), PEFT key
//! names (`base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight`), and adapter
//! directories read and written in PEFT's format through `candle_fused::nn`'s PEFT I/O
//! (written atomically here).

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{DType, Device, Result, Tensor, Var};
use candle_fused::nn::{peft_key, LoraConfig, PeftAdapters};

use crate::config::ModelConfig;
use crate::util::{fail, save_safetensors, write_atomic, SplitMix64};

const WHAT: &str = "lora";

/// A projection of a decoder layer that can carry an adapter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Target {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
}

impl Target {
    /// All targets, in layer order (PEFT's `all-linear` for these models).
    pub const ALL: [Target; 7] = [
        Target::Q,
        Target::K,
        Target::V,
        Target::O,
        Target::Gate,
        Target::Up,
        Target::Down,
    ];

    /// The module name (`q_proj`, ..., `down_proj`).
    pub fn name(self) -> &'static str {
        match self {
            Target::Q => "q_proj",
            Target::K => "k_proj",
            Target::V => "v_proj",
            Target::O => "o_proj",
            Target::Gate => "gate_proj",
            Target::Up => "up_proj",
            Target::Down => "down_proj",
        }
    }

    /// The parent module (`self_attn` or `mlp`).
    pub fn parent(self) -> &'static str {
        match self {
            Target::Q | Target::K | Target::V | Target::O => "self_attn",
            _ => "mlp",
        }
    }

    /// The index in [`Target::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }

    /// The module path in the Hugging Face model (`model.layers.{layer}.self_attn.q_proj`).
    pub fn module_path(self, layer: usize) -> String {
        format!("model.layers.{layer}.{}.{}", self.parent(), self.name())
    }

    /// Parses `q_proj` or `q` (and so on).
    pub fn parse(s: &str) -> Result<Self> {
        let s = s.trim();
        for t in Self::ALL {
            if s == t.name() || s == t.name().trim_end_matches("_proj") {
                return Ok(t);
            }
        }
        fail!(
            WHAT,
            "unknown target module {s:?} (these models have q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj; or all-linear)"
        )
    }

    /// Parses a comma-separated list; `all-linear` (or `all`) is every target.
    pub fn parse_list(s: &str) -> Result<Vec<Self>> {
        let mut out = Vec::new();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            if part == "all-linear" || part == "all" {
                out.extend(Self::ALL);
            } else {
                out.push(Self::parse(part)?);
            }
        }
        out.sort();
        out.dedup();
        if out.is_empty() {
            fail!(WHAT, "no target modules in {s:?}")
        }
        Ok(out)
    }

    /// `(layer, target)` of a module path `model.layers.{i}.{parent}.{name}`.
    pub fn from_module_path(path: &str) -> Option<(usize, Self)> {
        let rest = path.strip_prefix("model.layers.")?;
        let (i, rest) = rest.split_once('.')?;
        let layer = i.parse().ok()?;
        let (parent, name) = rest.split_once('.')?;
        let t = Self::ALL.into_iter().find(|t| t.name() == name)?;
        (t.parent() == parent).then_some((layer, t))
    }
}

/// LoRA hyper-parameters (PEFT's names in brackets).
#[derive(Debug, Clone, PartialEq)]
pub struct LoraSpec {
    /// Rank [`r`].
    pub r: usize,
    /// [`lora_alpha`]: scale `alpha / r`, or `alpha / √r` with `rslora`.
    pub alpha: f64,
    /// Dropout on the adapter's input in training [`lora_dropout`].
    pub dropout: f32,
    /// Targeted projections [`target_modules`]; default all.
    pub targets: Vec<Target>,
    /// Rank-stabilised scaling [`use_rslora`].
    pub rslora: bool,
    /// Only these layers (`None`: all) [`layers_to_transform`].
    pub layers: Option<Vec<usize>>,
}

impl Default for LoraSpec {
    fn default() -> Self {
        Self {
            r: 16,
            alpha: 32.0,
            dropout: 0.0,
            targets: Target::ALL.to_vec(),
            rslora: false,
            layers: None,
        }
    }
}

impl LoraSpec {
    /// Rank `r`, alpha `alpha`, all targets, no dropout.
    pub fn new(r: usize, alpha: f64) -> Self {
        Self {
            r,
            alpha,
            ..Self::default()
        }
    }

    /// The adapter scale.
    pub fn scale(&self) -> f64 {
        if self.rslora {
            self.alpha / (self.r as f64).sqrt()
        } else {
            self.alpha / self.r as f64
        }
    }

    /// Checks the spec against a model configuration.
    pub fn check(&self, cfg: &ModelConfig) -> Result<()> {
        if self.r == 0 {
            fail!(WHAT, "rank must be >= 1, got 0")
        }
        if !self.alpha.is_finite() || self.alpha == 0.0 {
            fail!(
                WHAT,
                "alpha must be finite and non-zero, got {}",
                self.alpha
            )
        }
        if !(0.0..1.0).contains(&self.dropout) {
            fail!(WHAT, "dropout must be in [0, 1), got {}", self.dropout)
        }
        if self.targets.is_empty() {
            fail!(WHAT, "no target modules")
        }
        for &t in &self.targets {
            let (out, inp) = cfg.proj_shape(t);
            if self.r > out.min(inp) {
                fail!(
                    WHAT,
                    "rank {} exceeds min(in, out) = min({inp}, {out}) of {}",
                    self.r,
                    t.name()
                )
            }
        }
        if let Some(ls) = &self.layers {
            if let Some(&l) = ls.iter().find(|&&l| l >= cfg.num_layers) {
                fail!(
                    WHAT,
                    "layer {l} does not exist (the model has {})",
                    cfg.num_layers
                )
            }
        }
        Ok(())
    }

    /// Whether layer `l` gets adapters.
    pub fn has_layer(&self, l: usize) -> bool {
        self.layers.as_ref().is_none_or(|ls| ls.contains(&l))
    }

    /// The PEFT `LoraConfig` of this spec (for `adapter_config.json`).
    pub fn to_peft(&self, base_model_name_or_path: &str) -> LoraConfig {
        let mut c = LoraConfig::new(self.r, self.alpha)
            .with_dropout(self.dropout)
            .with_target_modules(&self.targets.iter().map(|t| t.name()).collect::<Vec<_>>());
        c.use_rslora = self.rslora;
        c.base_model_name_or_path = Some(base_model_name_or_path.to_string());
        c.task_type = Some("CAUSAL_LM".into());
        c
    }
}

/// One adapter: f32 master parameters `A [r, in]`, `B [out, r]` and its scale.
#[derive(Debug, Clone)]
pub struct Adapter {
    pub a: Var,
    pub b: Var,
    pub scale: f64,
}

/// The adapters of a model, per layer and target.
#[derive(Debug, Clone)]
pub struct Lora {
    pub spec: LoraSpec,
    /// `adapters[layer][target.index()]`.
    pub adapters: Vec<[Option<Adapter>; 7]>,
}

impl Lora {
    /// Fresh PEFT-initialised adapters: `A` uniform in `±1/√in` (Kaiming-uniform with
    /// `a = √5`), `B` zero. Seeded: each (layer, target) has its own stream of `seed`.
    pub fn init(cfg: &ModelConfig, spec: &LoraSpec, seed: u64, device: &Device) -> Result<Self> {
        spec.check(cfg)?;
        let mut adapters = Vec::with_capacity(cfg.num_layers);
        for l in 0..cfg.num_layers {
            let mut row: [Option<Adapter>; 7] = Default::default();
            if spec.has_layer(l) {
                for &t in &spec.targets {
                    let (out, inp) = cfg.proj_shape(t);
                    let mut rng = SplitMix64::keyed(seed, l as u64, t.index() as u64);
                    let bound = 1.0 / (inp as f64).sqrt();
                    let a: Vec<f32> = (0..spec.r * inp)
                        .map(|_| rng.uniform(-bound, bound) as f32)
                        .collect();
                    row[t.index()] = Some(Adapter {
                        a: Var::from_tensor(&Tensor::from_vec(a, (spec.r, inp), device)?)?,
                        b: Var::zeros((out, spec.r), DType::F32, device)?,
                        scale: spec.scale(),
                    });
                }
            }
            adapters.push(row);
        }
        Ok(Self {
            spec: spec.clone(),
            adapters,
        })
    }

    /// `(PEFT key, Var)` of every parameter, layer by layer, targets in order, A before B.
    pub fn vars(&self) -> Vec<(String, Var)> {
        let mut v = Vec::new();
        for (l, row) in self.adapters.iter().enumerate() {
            for t in Target::ALL {
                if let Some(ad) = &row[t.index()] {
                    let path = t.module_path(l);
                    v.push((peft_key(&path, "lora_A"), ad.a.clone()));
                    v.push((peft_key(&path, "lora_B"), ad.b.clone()));
                }
            }
        }
        v
    }

    /// Loads a PEFT adapter directory for a model of `cfg`.
    pub fn load(dir: &Path, cfg: &ModelConfig, device: &Device) -> Result<Self> {
        let p = PeftAdapters::load(dir, &Device::Cpu)?;
        if let Some(t) = p.config.task_type.as_deref() {
            if t != "CAUSAL_LM" {
                fail!(
                    WHAT,
                    "{}: task_type {t:?}, expected \"CAUSAL_LM\"",
                    dir.display()
                )
            }
        }
        let mut adapters: Vec<[Option<Adapter>; 7]> = vec![Default::default(); cfg.num_layers];
        let mut targets = Vec::new();
        let mut layers = std::collections::BTreeSet::new();
        for path in p.module_paths() {
            let Some((l, t)) = Target::from_module_path(&path) else {
                fail!(
                    WHAT,
                    "{}: adapter module {path:?} is not a projection of these models",
                    dir.display()
                )
            };
            if l >= cfg.num_layers {
                fail!(
                    WHAT,
                    "{}: adapter for layer {l}, the model has {} layers",
                    dir.display(),
                    cfg.num_layers
                )
            }
            let (a, b) = p.get(&path)?;
            let (out, inp) = cfg.proj_shape(t);
            let (r, k) = a.dims2()?;
            let (n, _) = b.dims2()?;
            if k != inp || n != out {
                fail!(WHAT, "{}: module {path:?} adapter is {n}x{k} (out x in, rank {r}), the model's {} is {out}x{inp}", dir.display(), t.name())
            }
            adapters[l][t.index()] = Some(Adapter {
                a: Var::from_tensor(&a.to_dtype(DType::F32)?.to_device(device)?)?,
                b: Var::from_tensor(&b.to_dtype(DType::F32)?.to_device(device)?)?,
                scale: p.scale_for(&path)?,
            });
            targets.push(t);
            layers.insert(l);
        }
        targets.sort();
        targets.dedup();
        let spec = LoraSpec {
            r: p.config.rank,
            alpha: p.config.alpha,
            dropout: p.config.dropout,
            targets,
            rslora: p.config.use_rslora,
            layers: (layers.len() != cfg.num_layers).then(|| layers.into_iter().collect()),
        };
        Ok(Self { spec, adapters })
    }

    /// Writes the adapters as a PEFT directory (`adapter_config.json`,
    /// `adapter_model.safetensors` in f32), each file atomically.
    pub fn save(&self, dir: &Path, base_model_name_or_path: &str) -> Result<()> {
        let mut cfg = self.spec.to_peft(base_model_name_or_path);
        let mut tensors = Vec::new();
        let mut ranks = BTreeMap::new();
        for (l, row) in self.adapters.iter().enumerate() {
            for t in Target::ALL {
                if let Some(ad) = &row[t.index()] {
                    let path = t.module_path(l);
                    let r = ad.a.dim(0)?;
                    if r != self.spec.r {
                        ranks.insert(path.clone(), r);
                    }
                    let alpha = if self.spec.rslora {
                        ad.scale * (r as f64).sqrt()
                    } else {
                        ad.scale * r as f64
                    };
                    if (alpha - self.spec.alpha).abs() > 1e-9 * alpha.abs().max(1.0) {
                        cfg.alpha_pattern.insert(path.clone(), alpha);
                    }
                    tensors.push((peft_key(&path, "lora_A"), ad.a.as_tensor().detach()));
                    tensors.push((peft_key(&path, "lora_B"), ad.b.as_tensor().detach()));
                }
            }
        }
        cfg.rank_pattern = ranks;
        if let Some(ls) = &self.spec.layers {
            let _ = ls; // recorded through the saved module paths; PEFT reads them as given
        }
        std::fs::create_dir_all(dir)
            .map_err(|e| crate::util::err(WHAT, format!("cannot create {}: {e}", dir.display())))?;
        save_safetensors(&dir.join("adapter_model.safetensors"), &tensors, None)?;
        let text = serde_json::to_string_pretty(&cfg.to_peft_json())
            .map_err(|e| crate::util::err(WHAT, e))?;
        write_atomic(&dir.join("adapter_config.json"), text.as_bytes())
    }
}
