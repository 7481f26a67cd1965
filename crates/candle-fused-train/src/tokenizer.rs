//! Tokenizers: a model directory's `tokenizer.json` (the `tokenizers` crate) with the special
//! tokens and `chat_template` of its `tokenizer_config.json`, rendered with `minijinja` (plus
//! the Python-compatible string methods of `minijinja-contrib` that Hugging Face templates
//! use, `trim_blocks`/`lstrip_blocks` as transformers sets them); and the byte-level tokenizer
//! of the demo (256 byte tokens + specials, no merges, loadable by transformers too).

use std::path::Path;

use candle_core::Result;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::AddedToken;

use crate::util::{fail, write_atomic, Context};

const WHAT: &str = "tokenizer";

/// Byte offsets `(start, end)` of tokens in their text.
pub type Offsets = Vec<(usize, usize)>;

/// One chat message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

/// A tokenizer with its special tokens and chat template.
#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    chat_template: Option<String>,
    bos_token: Option<String>,
    eos_token: Option<String>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("chat_template", &self.chat_template.is_some())
            .finish()
    }
}

/// A special token of `tokenizer_config.json`: a string or `{"content": ..}`.
fn token_str(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(Value::as_str).map(String::from),
        _ => None,
    }
}

impl Tokenizer {
    /// Loads `dir/tokenizer.json` and, when present, `dir/tokenizer_config.json`.
    pub fn load(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        if !path.exists() {
            fail!(
                WHAT,
                "no tokenizer.json in {} (only fast tokenizers are supported)",
                dir.display()
            )
        }
        let inner = tokenizers::Tokenizer::from_file(&path)
            .context(WHAT, format!("cannot load {}", path.display()))?;
        let mut this = Self {
            inner,
            chat_template: None,
            bos_token: None,
            eos_token: None,
        };
        let cfg_path = dir.join("tokenizer_config.json");
        if cfg_path.exists() {
            let text = std::fs::read_to_string(&cfg_path)
                .context(WHAT, format!("cannot read {}", cfg_path.display()))?;
            let v: Value = serde_json::from_str(&text)
                .context(WHAT, format!("invalid JSON in {}", cfg_path.display()))?;
            this.bos_token = token_str(v.get("bos_token"));
            this.eos_token = token_str(v.get("eos_token"));
            this.chat_template = match v.get("chat_template") {
                Some(Value::String(s)) => Some(s.clone()),
                // A list of named templates: the "default" one.
                Some(Value::Array(a)) => a
                    .iter()
                    .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                    .and_then(|t| t.get("template").and_then(Value::as_str))
                    .map(String::from),
                _ => None,
            };
        }
        let jinja = dir.join("chat_template.jinja");
        if this.chat_template.is_none() && jinja.exists() {
            this.chat_template = Some(
                std::fs::read_to_string(&jinja)
                    .context(WHAT, format!("cannot read {}", jinja.display()))?,
            );
        }
        Ok(this)
    }

    /// From a `tokenizers::Tokenizer` and optional specials and template.
    pub fn from_parts(
        inner: tokenizers::Tokenizer,
        bos: Option<String>,
        eos: Option<String>,
        chat_template: Option<String>,
    ) -> Self {
        Self {
            inner,
            chat_template,
            bos_token: bos,
            eos_token: eos,
        }
    }

    /// The vocabulary size with added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Whether a chat template is known.
    pub fn has_chat_template(&self) -> bool {
        self.chat_template.is_some()
    }

    /// The id of the EOS token, if known.
    pub fn eos_id(&self) -> Option<u32> {
        self.eos_token
            .as_deref()
            .and_then(|t| self.inner.token_to_id(t))
    }

    /// The id of the BOS token, if known.
    pub fn bos_id(&self) -> Option<u32> {
        self.bos_token
            .as_deref()
            .and_then(|t| self.inner.token_to_id(t))
    }

    /// Token ids of `text` (`add_special`: the tokenizer's post-processor, e.g. Llama's BOS).
    pub fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>> {
        Ok(self.encode_offsets(text, add_special)?.0)
    }

    /// Token ids and their byte offsets `(start, end)` in `text` (specials: `(0, 0)`).
    pub fn encode_offsets(&self, text: &str, add_special: bool) -> Result<(Vec<u32>, Offsets)> {
        let e = self
            .inner
            .encode(text, add_special)
            .map_err(|e| crate::util::err(WHAT, format!("cannot encode: {e}")))?;
        Ok((e.get_ids().to_vec(), e.get_offsets().to_vec()))
    }

    /// The text of `ids`.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special)
            .map_err(|e| crate::util::err(WHAT, format!("cannot decode: {e}")))
    }

    /// Renders `messages` with the chat template (`add_generation_prompt`: end with the
    /// assistant's turn header).
    pub fn render_chat(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let Some(tmpl) = &self.chat_template else {
            fail!(WHAT, "the tokenizer has no chat_template (tokenizer_config.json), so {{\"messages\"}} data cannot be rendered")
        };
        let mut env = minijinja::Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<String, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    msg,
                ))
            },
        );
        env.add_function("strftime_now", |_fmt: String| -> String {
            "26 Jul 2024".to_string()
        });
        env.add_template("chat", tmpl)
            .context(WHAT, "invalid chat_template")?;
        let t = env
            .get_template("chat")
            .context(WHAT, "invalid chat_template")?;
        t.render(minijinja::context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token.clone().unwrap_or_default(),
            eos_token => self.eos_token.clone().unwrap_or_default(),
        })
        .context(WHAT, "cannot render the chat template")
    }

    /// With `template` as the chat template.
    pub fn with_chat_template(mut self, template: &str) -> Self {
        self.chat_template = Some(template.to_string());
        self
    }

    /// The demo's byte-level tokenizer: ids 0..256 the bytes (GPT-2's byte-to-unicode
    /// alphabet), then `<|bos|>`, `<|eos|>`, `<|pad|>`, `<|user|>`, `<|assistant|>`; no chat
    /// template (the demo data is prompt/completion; [`DEMO_CHAT_TEMPLATE`] is one to add).
    pub fn byte_level() -> Result<Self> {
        let chars = bytes_to_unicode();
        let vocab: Vec<(String, u32)> = chars
            .iter()
            .enumerate()
            .map(|(i, c)| (c.to_string(), i as u32))
            .collect();
        let bpe = BPE::builder()
            .vocab_and_merges(
                vocab
                    .into_iter()
                    .collect::<tokenizers::models::bpe::Vocab>(),
                vec![],
            )
            .build()
            .map_err(|e| crate::util::err(WHAT, e))?;
        let mut inner = tokenizers::Tokenizer::new(bpe);
        inner.with_pre_tokenizer(Some(ByteLevel::new(false, true, false)));
        inner.with_decoder(Some(ByteLevel::new(false, true, false)));
        let specials: Vec<AddedToken> = DEMO_SPECIALS
            .iter()
            .map(|s| AddedToken::from(*s, true))
            .collect();
        inner
            .add_special_tokens(specials)
            .map_err(|e| crate::util::err(WHAT, e))?;
        Ok(Self {
            inner,
            chat_template: None,
            bos_token: Some("<|bos|>".into()),
            eos_token: Some("<|eos|>".into()),
        })
    }

    /// Writes `tokenizer.json` and `tokenizer_config.json` into `dir` (atomically).
    pub fn save(&self, dir: &Path) -> Result<()> {
        let text = self
            .inner
            .to_string(true)
            .map_err(|e| crate::util::err(WHAT, e))?;
        write_atomic(&dir.join("tokenizer.json"), text.as_bytes())?;
        let cfg = json!({
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "pad_token": self.eos_token,
            "chat_template": self.chat_template,
            "clean_up_tokenization_spaces": false,
            "model_max_length": 1_000_000,
        });
        write_atomic(
            &dir.join("tokenizer_config.json"),
            serde_json::to_string_pretty(&cfg)
                .map_err(|e| crate::util::err(WHAT, e))?
                .as_bytes(),
        )
    }
}

/// The demo tokenizer's special tokens (ids 256..).
pub const DEMO_SPECIALS: [&str; 5] = ["<|bos|>", "<|eos|>", "<|pad|>", "<|user|>", "<|assistant|>"];

/// The demo's chat template.
pub const DEMO_CHAT_TEMPLATE: &str = "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}<|user|>{{ m['content'] }}\n{% elif m['role'] == 'assistant' %}<|assistant|>{{ m['content'] }}{{ eos_token }}\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}";

/// GPT-2's byte-to-unicode table: the character of each byte.
fn bytes_to_unicode() -> Vec<char> {
    let printable =
        |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
    let mut n = 0;
    (0u32..256)
        .map(|b| {
            if printable(b) {
                char::from_u32(b).unwrap_or('?')
            } else {
                n += 1;
                char::from_u32(255 + n).unwrap_or('?')
            }
        })
        .collect()
}
