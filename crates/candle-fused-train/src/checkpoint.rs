//! Checkpoints of the base model: loading a Hugging Face directory (config + safetensors,
//! converted to the training dtype), seeded random models (tests, the demo), and writing a
//! model back as a Hugging Face checkpoint (optionally with the adapters merged).

use std::path::Path;
use std::sync::atomic::AtomicU64;

use candle_core::{DType, Device, Result, Tensor};
use candle_fused::Kernels;

use crate::config::ModelConfig;
use crate::kops::{RopeConfig, RopeTable};
use crate::lora::Target;
use crate::model::{Layer, Model, ROPE_CAP, WHAT};
use crate::util::{fail, save_safetensors, write_atomic, SplitMix64};
use crate::weights::Weights;

impl Model {
    /// Loads `dir/config.json` and the safetensors weights, converted to `dtype`.
    pub fn load(dir: &Path, dtype: DType, device: &Device) -> Result<Model> {
        let cfg = ModelConfig::from_file(&dir.join("config.json"))?;
        let w = Weights::open(dir)?;
        Self::from_weights(cfg, &w, dtype, device)
    }

    /// The model of `cfg` from opened weights.
    pub fn from_weights(
        cfg: ModelConfig,
        w: &Weights,
        dtype: DType,
        device: &Device,
    ) -> Result<Model> {
        check_dtype(dtype)?;
        let (h, v) = (cfg.hidden_size, cfg.vocab_size);
        let embed = w.get("model.embed_tokens.weight", &[v, h], dtype, device)?;
        let mut layers = Vec::with_capacity(cfg.num_layers);
        for l in 0..cfg.num_layers {
            let norm = |n: &str| w.get(&name(l, n), &[h], dtype, device);
            let mut proj = Vec::with_capacity(7);
            let mut bias: [Option<Tensor>; 7] = Default::default();
            for t in Target::ALL {
                let (out, inp) = cfg.proj_shape(t);
                let path = t.module_path(l);
                proj.push(w.get(&format!("{path}.weight"), &[out, inp], dtype, device)?);
                if has_bias(&cfg, t) {
                    bias[t.index()] =
                        Some(w.get(&format!("{path}.bias"), &[out], dtype, device)?);
                }
            }
            layers.push(Layer {
                input_norm: norm("input_layernorm.weight")?,
                post_norm: norm("post_attention_layernorm.weight")?,
                proj: proj
                    .try_into()
                    .map_err(|_| crate::util::err(WHAT, "internal: projections"))?,
                bias,
            });
        }
        let norm = w.get("model.norm.weight", &[h], dtype, device)?;
        let lm_head = if cfg.tie_word_embeddings {
            None
        } else {
            Some(w.get("lm_head.weight", &[v, h], dtype, device)?)
        };
        Self::assemble(cfg, dtype, device, embed, layers, norm, lm_head)
    }

    pub(crate) fn assemble(
        cfg: ModelConfig,
        dtype: DType,
        device: &Device,
        embed: Tensor,
        layers: Vec<Layer>,
        norm: Tensor,
        lm_head: Option<Tensor>,
    ) -> Result<Model> {
        let rope = RopeTable::new(
            &RopeConfig {
                head_dim: cfg.head_dim,
                rotary_dim: cfg.head_dim,
                theta: cfg.rope_theta,
                max_positions: cfg.max_position_embeddings.clamp(1, ROPE_CAP),
                scaling: cfg.rope_scaling,
            },
            device,
        )?;
        Ok(Model {
            cfg,
            dtype,
            device: device.clone(),
            kernels: Kernels::default(),
            embed,
            layers,
            norm,
            lm_head,
            rope,
            lora: None,
            checkpointing: false,
            dropout_state: AtomicU64::new(0),
        })
    }

    /// A randomly initialised model of `cfg` (weights normal with std 0.02, norms 1, biases
    /// small normal), seeded: what the demo and the tests train on.
    pub fn random(cfg: ModelConfig, dtype: DType, device: &Device, seed: u64) -> Result<Model> {
        Self::random_with(cfg, dtype, device, seed, 0.02, 0.02)
    }

    /// [`Model::random`] with embeddings of standard deviation `embed_std` and an untied LM
    /// head of `head_std`. The head's scale bounds the logits a unit-RMS hidden state can
    /// reach (about `head_std·H`): with 0.02 and H = 128 that is 2.6, which caps the loss near
    /// 3 whatever the adapter learns, so the demo uses a larger one.
    ///
    /// On the CPU every value comes from one [`SplitMix64`] stream of `seed`, in a fixed order
    /// (embedding, then per layer the seven projections with their biases and the two norms,
    /// the final norm, the head): the same model on every machine. On another device (CUDA,
    /// Metal) drawing billions of values on the host one at a time would take minutes for an
    /// 8B configuration, so the device's own generator draws them: `device.set_seed(seed)`,
    /// then `Tensor::randn` in f32 on the device (converted to `dtype`), in the same order
    /// and with the same distributions. Such a model is reproducible on that device for a
    /// seed, but it is not the CPU model of the same seed.
    pub fn random_with(
        cfg: ModelConfig,
        dtype: DType,
        device: &Device,
        seed: u64,
        embed_std: f64,
        head_std: f64,
    ) -> Result<Model> {
        check_dtype(dtype)?;
        let mut rng = SplitMix64::new(seed);
        let on_host = device.is_cpu();
        if !on_host {
            device.set_seed(seed)?;
        }
        let mut randn = |shape: &[usize], std: f64| -> Result<Tensor> {
            if !on_host {
                return Tensor::randn(0f32, std as f32, shape, device)?.to_dtype(dtype);
            }
            let n: usize = shape.iter().product();
            let v: Vec<f32> = (0..n).map(|_| (rng.normal() * std) as f32).collect();
            Tensor::from_vec(v, shape, device)?.to_dtype(dtype)
        };
        let (h, v) = (cfg.hidden_size, cfg.vocab_size);
        let embed = randn(&[v, h], embed_std)?;
        let mut layers = Vec::new();
        for _ in 0..cfg.num_layers {
            let mut proj = Vec::new();
            let mut bias: [Option<Tensor>; 7] = Default::default();
            for t in Target::ALL {
                let (out, inp) = cfg.proj_shape(t);
                proj.push(randn(&[out, inp], 0.02)?);
                if has_bias(&cfg, t) {
                    bias[t.index()] = Some(randn(&[out], 0.02)?);
                }
            }
            layers.push(Layer {
                input_norm: (randn(&[h], 0.1)? + 1.0)?,
                post_norm: (randn(&[h], 0.1)? + 1.0)?,
                proj: proj
                    .try_into()
                    .map_err(|_| crate::util::err(WHAT, "internal: projections"))?,
                bias,
            });
        }
        let norm = (randn(&[h], 0.1)? + 1.0)?;
        let lm_head = if cfg.tie_word_embeddings {
            None
        } else {
            Some(randn(&[v, h], head_std)?)
        };
        Self::assemble(cfg, dtype, device, embed, layers, norm, lm_head)
    }

    /// Writes the model as a Hugging Face checkpoint directory (`config.json`,
    /// `model.safetensors`), atomically per file; with `merge_lora`, the adapters folded into
    /// the weights (`W + s·B·A`, computed in f32).
    pub fn save(&self, dir: &Path, merge_lora: bool) -> Result<()> {
        let mut tensors = vec![("model.embed_tokens.weight".to_string(), self.embed.clone())];
        for (l, layer) in self.layers.iter().enumerate() {
            tensors.push((name(l, "input_layernorm.weight"), layer.input_norm.clone()));
            tensors.push((
                name(l, "post_attention_layernorm.weight"),
                layer.post_norm.clone(),
            ));
            for t in Target::ALL {
                let path = t.module_path(l);
                let mut w = layer.proj[t.index()].clone();
                if merge_lora {
                    if let Some(ad) = self
                        .lora
                        .as_ref()
                        .and_then(|lo| lo.adapters[l][t.index()].as_ref())
                    {
                        let delta = (ad.b.as_tensor().matmul(ad.a.as_tensor())? * ad.scale)?;
                        w = (w.to_dtype(DType::F32)? + delta)?.to_dtype(self.dtype)?;
                    }
                }
                tensors.push((format!("{path}.weight"), w));
                if let Some(b) = &layer.bias[t.index()] {
                    tensors.push((format!("{path}.bias"), b.clone()));
                }
            }
        }
        tensors.push(("model.norm.weight".into(), self.norm.clone()));
        if let Some(h) = &self.lm_head {
            tensors.push(("lm_head.weight".into(), h.clone()));
        }
        std::fs::create_dir_all(dir)
            .map_err(|e| crate::util::err(WHAT, format!("cannot create {}: {e}", dir.display())))?;
        let meta = std::collections::HashMap::from([("format".to_string(), "pt".to_string())]);
        save_safetensors(&dir.join("model.safetensors"), &tensors, Some(meta))?;
        let mut cfg = self.cfg.to_json();
        if let Some(m) = cfg.as_object_mut() {
            let dt = match self.dtype {
                DType::BF16 => "bfloat16",
                DType::F16 => "float16",
                _ => "float32",
            };
            m.insert("torch_dtype".into(), serde_json::json!(dt));
        }
        let text = serde_json::to_string_pretty(&cfg).map_err(|e| crate::util::err(WHAT, e))?;
        write_atomic(&dir.join("config.json"), text.as_bytes())
    }
}

fn has_bias(cfg: &ModelConfig, t: Target) -> bool {
    match t {
        Target::Q | Target::K | Target::V => cfg.qkv_bias,
        Target::O => cfg.o_bias,
        _ => false,
    }
}

fn check_dtype(dtype: DType) -> Result<()> {
    if !matches!(dtype, DType::F32 | DType::BF16 | DType::F16) {
        fail!(
            WHAT,
            "training dtype must be f32, bf16 or f16, got {dtype:?}"
        )
    }
    Ok(())
}

fn name(l: usize, rest: &str) -> String {
    format!("model.layers.{l}.{rest}")
}
