//! `ModelConfig`: a Hugging Face `config.json` of `LlamaForCausalLM`, `Qwen2ForCausalLM` or
//! `MistralForCausalLM` parsed into what the decoder needs (GQA head counts, head dim, tied or
//! untied embeddings, biases, RMSNorm eps, RoPE theta and scaling, from both the
//! `rope_scaling` of transformers 4 and the `rope_parameters` of transformers 5). Fields that
//! would change the math in a way this crate does not implement (another activation, MLP
//! biases, attention dropout, sliding windows, quantization, unknown RoPE types) are errors
//! naming the field; fields that do not affect the computation are ignored.

use std::path::Path;

use candle_core::Result;
use serde_json::{json, Value};

use crate::kops::RopeScaling;
use crate::util::{fail, Context};

const WHAT: &str = "config";

/// The supported architectures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    /// `LlamaForCausalLM` (Llama 2/3.x, SmolLM, TinyLlama...).
    Llama,
    /// `Qwen2ForCausalLM` (q/k/v biases).
    Qwen2,
    /// `MistralForCausalLM`.
    Mistral,
}

impl Arch {
    /// The `architectures[0]` name.
    pub fn hf_name(self) -> &'static str {
        match self {
            Arch::Llama => "LlamaForCausalLM",
            Arch::Qwen2 => "Qwen2ForCausalLM",
            Arch::Mistral => "MistralForCausalLM",
        }
    }

    /// The `model_type`.
    pub fn model_type(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Qwen2 => "qwen2",
            Arch::Mistral => "mistral",
        }
    }

    fn from_names(arch: Option<&str>, model_type: Option<&str>) -> Result<Self> {
        let by_arch = |a: &str| match a {
            "LlamaForCausalLM" => Some(Arch::Llama),
            "Qwen2ForCausalLM" => Some(Arch::Qwen2),
            "MistralForCausalLM" => Some(Arch::Mistral),
            _ => None,
        };
        let by_type = |t: &str| match t {
            "llama" => Some(Arch::Llama),
            "qwen2" => Some(Arch::Qwen2),
            "mistral" => Some(Arch::Mistral),
            _ => None,
        };
        match (arch, model_type) {
            (Some(a), _) => by_arch(a).ok_or_else(|| {
                crate::util::err(
                    WHAT,
                    format!("unsupported architecture {a:?} (supported: LlamaForCausalLM, Qwen2ForCausalLM, MistralForCausalLM)"),
                )
            }),
            (None, Some(t)) => by_type(t).ok_or_else(|| {
                crate::util::err(
                    WHAT,
                    format!("unsupported model_type {t:?} (supported: llama, qwen2, mistral)"),
                )
            }),
            (None, None) => fail!(WHAT, "neither \"architectures\" nor \"model_type\" is set"),
        }
    }
}

/// The MLP activation (`hidden_act`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// `silu` (SwiGLU MLP).
    Silu,
    /// `gelu_pytorch_tanh` (GeGLU with the tanh approximation).
    GeluTanh,
}

/// The decoder's hyper-parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub arch: Arch,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub max_position_embeddings: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: Option<RopeScaling>,
    pub tie_word_embeddings: bool,
    /// Biases on q/k/v (Qwen2 always; Llama with `attention_bias`).
    pub qkv_bias: bool,
    /// Bias on o_proj (Llama with `attention_bias`).
    pub o_bias: bool,
    pub hidden_act: Activation,
    /// Mistral's `sliding_window` (sequences longer than it are refused).
    pub sliding_window: Option<usize>,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    pub pad_token_id: Option<u32>,
    /// The parsed JSON as read (written back by `merge`); `Null` for configs made in code.
    pub raw: Value,
}

fn get<'a>(v: &'a Value, k: &str) -> Option<&'a Value> {
    v.get(k).filter(|x| !x.is_null())
}

fn usize_field(v: &Value, k: &str) -> Result<Option<usize>> {
    match get(v, k) {
        None => Ok(None),
        Some(x) => match x.as_u64() {
            Some(n) => Ok(Some(n as usize)),
            None => fail!(WHAT, "\"{k}\" must be a non-negative integer, got {x}"),
        },
    }
}

fn need_usize(v: &Value, k: &str) -> Result<usize> {
    usize_field(v, k)?.ok_or_else(|| crate::util::err(WHAT, format!("missing \"{k}\"")))
}

fn f64_field(v: &Value, k: &str) -> Result<Option<f64>> {
    match get(v, k) {
        None => Ok(None),
        Some(x) => match x.as_f64() {
            Some(n) => Ok(Some(n)),
            None => fail!(WHAT, "\"{k}\" must be a number, got {x}"),
        },
    }
}

fn bool_field(v: &Value, k: &str) -> Result<Option<bool>> {
    match get(v, k) {
        None => Ok(None),
        Some(x) => match x.as_bool() {
            Some(b) => Ok(Some(b)),
            None => fail!(WHAT, "\"{k}\" must be a boolean, got {x}"),
        },
    }
}

fn token_ids(v: &Value, k: &str) -> Result<Vec<u32>> {
    match get(v, k) {
        None => Ok(Vec::new()),
        Some(Value::Array(a)) => a
            .iter()
            .map(|x| {
                x.as_u64().map(|n| n as u32).ok_or_else(|| {
                    crate::util::err(WHAT, format!("\"{k}\" holds {x}, not a token id"))
                })
            })
            .collect(),
        Some(x) => match x.as_u64() {
            Some(n) => Ok(vec![n as u32]),
            None => fail!(
                WHAT,
                "\"{k}\" must be a token id or a list of them, got {x}"
            ),
        },
    }
}

/// `rope_scaling` (or transformers 5's `rope_parameters`) as a [`RopeScaling`].
fn parse_rope_scaling(rs: &Value, max_pos: usize) -> Result<Option<RopeScaling>> {
    let ty = get(rs, "rope_type")
        .or_else(|| get(rs, "type"))
        .and_then(Value::as_str)
        .unwrap_or("default");
    let f = |k: &str| -> Result<f64> {
        f64_field(rs, k)?.ok_or_else(|| {
            crate::util::err(WHAT, format!("rope_scaling of type {ty:?} needs \"{k}\""))
        })
    };
    let orig = || -> Result<usize> {
        Ok(usize_field(rs, "original_max_position_embeddings")?.unwrap_or(max_pos))
    };
    Ok(match ty {
        "default" => None,
        "linear" => Some(RopeScaling::Linear { factor: f("factor")? }),
        "dynamic" => Some(RopeScaling::Dynamic {
            factor: f("factor")?,
            original_max_positions: orig()?,
        }),
        "llama3" => Some(RopeScaling::Llama3 {
            factor: f("factor")?,
            low_freq_factor: f("low_freq_factor")?,
            high_freq_factor: f("high_freq_factor")?,
            original_max_positions: need_usize(rs, "original_max_position_embeddings")?,
        }),
        "yarn" => Some(RopeScaling::Yarn {
            factor: f("factor")?,
            original_max_positions: orig()?,
            beta_fast: f64_field(rs, "beta_fast")?.unwrap_or(32.0),
            beta_slow: f64_field(rs, "beta_slow")?.unwrap_or(1.0),
            mscale: f64_field(rs, "mscale")?,
            mscale_all_dim: f64_field(rs, "mscale_all_dim")?,
            attention_factor: f64_field(rs, "attention_factor")?,
        }),
        other => fail!(
            WHAT,
            "unsupported rope_scaling type {other:?} (supported: default, linear, dynamic, llama3, yarn)"
        ),
    })
}

impl ModelConfig {
    /// Reads and parses `config.json` at `path`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .context(WHAT, format!("cannot read {}", path.display()))?;
        Self::from_json(&text)
            .map_err(|e| crate::util::err(WHAT, format!("{}: {e}", path.display())))
    }

    /// Parses the text of a `config.json`.
    pub fn from_json(text: &str) -> Result<Self> {
        let v: Value = serde_json::from_str(text).context(WHAT, "invalid JSON")?;
        Self::from_value(&v)
    }

    /// Parses a `config.json` already read as JSON.
    pub fn from_value(v: &Value) -> Result<Self> {
        if !v.is_object() {
            fail!(WHAT, "expected a JSON object")
        }
        let archs = get(v, "architectures").and_then(Value::as_array);
        if archs.is_some_and(|a| a.len() > 1) {
            fail!(WHAT, "several architectures {:?}; expected one", archs)
        }
        let arch_name = archs.and_then(|a| a.first()).and_then(Value::as_str);
        let arch = Arch::from_names(arch_name, get(v, "model_type").and_then(Value::as_str))?;
        if get(v, "quantization_config").is_some() {
            fail!(
                WHAT,
                "quantized checkpoints (\"quantization_config\") are not supported"
            )
        }
        let hidden_size = need_usize(v, "hidden_size")?;
        let num_heads = need_usize(v, "num_attention_heads")?;
        let num_kv_heads = usize_field(v, "num_key_value_heads")?.unwrap_or(num_heads);
        let num_layers = need_usize(v, "num_hidden_layers")?;
        let vocab_size = need_usize(v, "vocab_size")?;
        let intermediate_size = need_usize(v, "intermediate_size")?;
        for (k, n) in [
            ("hidden_size", hidden_size),
            ("num_attention_heads", num_heads),
            ("num_key_value_heads", num_kv_heads),
            ("num_hidden_layers", num_layers),
            ("vocab_size", vocab_size),
            ("intermediate_size", intermediate_size),
        ] {
            if n == 0 {
                fail!(WHAT, "\"{k}\" must be >= 1")
            }
        }
        if num_heads % num_kv_heads != 0 {
            fail!(
                WHAT,
                "num_attention_heads {num_heads} is not a multiple of num_key_value_heads {num_kv_heads}"
            )
        }
        let head_dim = match usize_field(v, "head_dim")? {
            Some(d) => d,
            None => {
                if hidden_size % num_heads != 0 {
                    fail!(WHAT, "hidden_size {hidden_size} is not a multiple of num_attention_heads {num_heads} (and no head_dim)")
                }
                hidden_size / num_heads
            }
        };
        if head_dim == 0 || head_dim % 2 != 0 {
            fail!(WHAT, "head_dim {head_dim} must be even and >= 2")
        }
        let hidden_act = match get(v, "hidden_act")
            .and_then(Value::as_str)
            .unwrap_or("silu")
        {
            "silu" | "swish" => Activation::Silu,
            "gelu_pytorch_tanh" => Activation::GeluTanh,
            other => fail!(
                WHAT,
                "unsupported hidden_act {other:?} (supported: silu, gelu_pytorch_tanh)"
            ),
        };
        if bool_field(v, "mlp_bias")? == Some(true) {
            fail!(WHAT, "mlp_bias = true is not supported")
        }
        if f64_field(v, "attention_dropout")?.is_some_and(|p| p != 0.0) {
            fail!(
                WHAT,
                "attention_dropout = {} is not supported (only 0)",
                v["attention_dropout"]
            )
        }
        if let Some(p) = f64_field(v, "partial_rotary_factor")? {
            if p != 1.0 {
                fail!(
                    WHAT,
                    "partial_rotary_factor = {p} is not supported (only 1)"
                )
            }
        }
        let max_position_embeddings = usize_field(v, "max_position_embeddings")?.unwrap_or(2048);
        // transformers 5 moved rope_theta and rope_scaling into rope_parameters.
        let rope_params = get(v, "rope_parameters");
        let rope_theta = match rope_params {
            Some(rp) => f64_field(rp, "rope_theta")?,
            None => None,
        }
        .or(f64_field(v, "rope_theta")?)
        .unwrap_or(10000.0);
        let rope_scaling = match get(v, "rope_scaling").or(rope_params) {
            Some(rs) if rs.is_object() => parse_rope_scaling(rs, max_position_embeddings)?,
            Some(rs) => fail!(WHAT, "\"rope_scaling\" must be an object, got {rs}"),
            None => None,
        };
        let attention_bias = bool_field(v, "attention_bias")?.unwrap_or(false);
        let (qkv_bias, o_bias) = match arch {
            Arch::Llama => (attention_bias, attention_bias),
            Arch::Qwen2 => (true, false),
            Arch::Mistral => {
                if attention_bias {
                    fail!(
                        WHAT,
                        "attention_bias = true is not supported for MistralForCausalLM"
                    )
                }
                (false, false)
            }
        };
        let sliding_window = match arch {
            Arch::Mistral => usize_field(v, "sliding_window")?,
            Arch::Qwen2 => {
                if bool_field(v, "use_sliding_window")? == Some(true) {
                    fail!(
                        WHAT,
                        "use_sliding_window = true is not supported for Qwen2ForCausalLM"
                    )
                }
                None
            }
            Arch::Llama => None,
        };
        if let Some(Value::Array(lt)) = get(v, "layer_types") {
            if let Some(bad) = lt.iter().find(|x| x.as_str() != Some("full_attention")) {
                fail!(
                    WHAT,
                    "layer_types holds {bad}; only \"full_attention\" is supported"
                )
            }
        }
        Ok(Self {
            arch,
            vocab_size,
            hidden_size,
            intermediate_size,
            num_layers,
            num_heads,
            num_kv_heads,
            head_dim,
            max_position_embeddings,
            rms_norm_eps: f64_field(v, "rms_norm_eps")?.unwrap_or(1e-6),
            rope_theta,
            rope_scaling,
            tie_word_embeddings: bool_field(v, "tie_word_embeddings")?.unwrap_or(false),
            qkv_bias,
            o_bias,
            hidden_act,
            sliding_window,
            bos_token_id: token_ids(v, "bos_token_id")?.first().copied(),
            eos_token_ids: token_ids(v, "eos_token_id")?,
            pad_token_id: token_ids(v, "pad_token_id")?.first().copied(),
            raw: v.clone(),
        })
    }

    /// The `config.json` of this configuration: the JSON it was parsed from when there is one
    /// (so unknown fields survive a merge), else one made from the fields (transformers 4
    /// layout, which transformers 5 also reads).
    pub fn to_json(&self) -> Value {
        if self.raw.is_object() {
            return self.raw.clone();
        }
        let rope_scaling = match &self.rope_scaling {
            None => Value::Null,
            Some(RopeScaling::Linear { factor }) => {
                json!({"rope_type": "linear", "factor": factor})
            }
            Some(RopeScaling::Dynamic {
                factor,
                original_max_positions,
            }) => json!({
                "rope_type": "dynamic", "factor": factor,
                "original_max_position_embeddings": original_max_positions}),
            Some(RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_positions,
            }) => json!({
                "rope_type": "llama3", "factor": factor, "low_freq_factor": low_freq_factor,
                "high_freq_factor": high_freq_factor,
                "original_max_position_embeddings": original_max_positions}),
            Some(RopeScaling::Yarn {
                factor,
                original_max_positions,
                beta_fast,
                beta_slow,
                mscale,
                mscale_all_dim,
                attention_factor,
            }) => json!({
                "rope_type": "yarn", "factor": factor,
                "original_max_position_embeddings": original_max_positions,
                "beta_fast": beta_fast, "beta_slow": beta_slow, "mscale": mscale,
                "mscale_all_dim": mscale_all_dim, "attention_factor": attention_factor}),
        };
        let mut v = json!({
            "architectures": [self.arch.hf_name()],
            "model_type": self.arch.model_type(),
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": rope_scaling,
            "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": match self.hidden_act { Activation::Silu => "silu", Activation::GeluTanh => "gelu_pytorch_tanh" },
            "attention_dropout": 0.0,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": match self.eos_token_ids.as_slice() { [] => Value::Null, [one] => json!(one), many => json!(many) },
            "pad_token_id": self.pad_token_id,
            "torch_dtype": "float32",
        });
        let m = v.as_object_mut().expect("an object");
        match self.arch {
            Arch::Llama => {
                m.insert("attention_bias".into(), json!(self.qkv_bias));
                m.insert("mlp_bias".into(), json!(false));
            }
            Arch::Qwen2 => {
                m.insert("use_sliding_window".into(), json!(false));
            }
            Arch::Mistral => {
                m.insert("sliding_window".into(), json!(self.sliding_window));
            }
        }
        v
    }

    /// Query heads per key/value head.
    pub fn kv_groups(&self) -> usize {
        self.num_heads / self.num_kv_heads
    }

    /// `(out, in)` of a projection.
    pub fn proj_shape(&self, t: crate::lora::Target) -> (usize, usize) {
        use crate::lora::Target::*;
        let (h, i, d) = (self.hidden_size, self.intermediate_size, self.head_dim);
        match t {
            Q => (self.num_heads * d, h),
            K | V => (self.num_kv_heads * d, h),
            O => (h, self.num_heads * d),
            Gate | Up => (i, h),
            Down => (h, i),
        }
    }
}
