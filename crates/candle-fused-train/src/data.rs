//! Training data: JSONL with `{"text"}`, `{"prompt", "completion"}` (loss on the completion
//! only) or `{"messages"}` (loss on the assistant turns only, rendered with the chat template);
//! truncation or packing to `seq_len` with counts of what was cut; a held-out split; batches
//! (rows padded to the longest in the batch, padding ignored by the loss and in its own
//! segment). A bad line is an error naming the file and the line.

use std::path::Path;

use candle_core::{Device, Result, Tensor};
use serde_json::Value;

use crate::model::Batch;
use crate::tokenizer::{Message, Tokenizer};
use crate::util::{fail, SplitMix64};

const WHAT: &str = "data";

/// One tokenized example: `tokens`, and per token whether it is a training target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Example {
    pub tokens: Vec<u32>,
    pub trainable: Vec<bool>,
    /// The 1-based line it came from (0: made in code).
    pub line: usize,
}

impl Example {
    /// Targets shifted for next-token prediction: `targets[t] = tokens[t + 1]` where that
    /// token is trainable, `-100` elsewhere (and at the end).
    pub fn targets(&self) -> Vec<i64> {
        let n = self.tokens.len();
        (0..n)
            .map(|t| {
                if t + 1 < n && self.trainable[t + 1] {
                    self.tokens[t + 1] as i64
                } else {
                    -100
                }
            })
            .collect()
    }
}

/// Tokenizes one JSON record (see the module documentation).
pub fn tokenize_record(v: &Value, tok: &Tokenizer) -> std::result::Result<Example, String> {
    let Some(obj) = v.as_object() else {
        return Err("expected a JSON object".into());
    };
    let eos = tok.eos_id();
    let with_eos = |mut e: Example| {
        if let Some(id) = eos {
            if e.tokens.last() != Some(&id) {
                e.tokens.push(id);
                e.trainable.push(true);
            }
        }
        e
    };
    let str_field = |k: &str| -> std::result::Result<&str, String> {
        match obj.get(k) {
            Some(Value::String(s)) => Ok(s.as_str()),
            Some(other) => Err(format!("\"{k}\" must be a string, got {other}")),
            None => Err(format!("missing \"{k}\"")),
        }
    };
    let enc = |s: &str, special: bool| tok.encode_offsets(s, special).map_err(|e| e.to_string());
    if obj.contains_key("messages") {
        let msgs: Vec<Message> = serde_json::from_value(obj["messages"].clone()).map_err(|e| {
            format!("\"messages\" must be a list of {{\"role\", \"content\"}} strings: {e}")
        })?;
        if msgs.is_empty() {
            return Err("\"messages\" is empty".into());
        }
        if !msgs.iter().any(|m| m.role == "assistant") {
            return Err("\"messages\" has no assistant turn (nothing to learn)".into());
        }
        let full = tok.render_chat(&msgs, false).map_err(|e| e.to_string())?;
        let mut spans = Vec::new();
        for (i, m) in msgs.iter().enumerate() {
            if m.role != "assistant" {
                continue;
            }
            let before = tok
                .render_chat(&msgs[..i], true)
                .map_err(|e| e.to_string())?;
            let upto = tok
                .render_chat(&msgs[..=i], false)
                .map_err(|e| e.to_string())?;
            if !upto.starts_with(&before) || !full.starts_with(&upto) {
                return Err("the chat template does not render conversations prefix by prefix; cannot find the assistant turns".into());
            }
            spans.push((before.len(), upto.len()));
        }
        let (ids, offs) = enc(&full, false)?;
        let trainable = offs
            .iter()
            .map(|&(s, e)| e > s && spans.iter().any(|&(a, b)| e > a && s < b))
            .collect();
        return Ok(Example {
            tokens: ids,
            trainable,
            line: 0,
        });
    }
    if obj.contains_key("prompt") || obj.contains_key("completion") {
        let (p, c) = (str_field("prompt")?, str_field("completion")?);
        if c.is_empty() {
            return Err("\"completion\" is empty".into());
        }
        let text = format!("{p}{c}");
        let (ids, offs) = enc(&text, true)?;
        let trainable = offs.iter().map(|&(s, e)| e > s && e > p.len()).collect();
        return Ok(with_eos(Example {
            tokens: ids,
            trainable,
            line: 0,
        }));
    }
    if obj.contains_key("text") {
        let t = str_field("text")?;
        if t.is_empty() {
            return Err("\"text\" is empty".into());
        }
        let (ids, _) = enc(t, true)?;
        let trainable = vec![true; ids.len()];
        return Ok(with_eos(Example {
            tokens: ids,
            trainable,
            line: 0,
        }));
    }
    let keys: Vec<&String> = obj.keys().collect();
    Err(format!(
        "no \"text\", \"prompt\"/\"completion\" or \"messages\" field (keys: {keys:?})"
    ))
}

/// Reads and tokenizes a JSONL file; blank lines are skipped, a bad line is an error
/// `FILE:LINE: ...`; an empty file is an error.
pub fn load_jsonl(path: &Path, tok: &Tokenizer) -> Result<Vec<Example>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) => fail!(WHAT, "cannot read {}: {e}", path.display()),
    };
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let at = || format!("{}:{}", path.display(), i + 1);
        let v: Value = match serde_json::from_str(line) {
            Ok(v) => v,
            Err(e) => fail!(WHAT, "{}: invalid JSON: {e}", at()),
        };
        match tokenize_record(&v, tok) {
            Ok(mut e) => {
                e.line = i + 1;
                if e.tokens.len() < 2 {
                    fail!(WHAT, "{}: fewer than 2 tokens, nothing to predict", at())
                }
                if !e.trainable[1..].iter().any(|&t| t) {
                    fail!(WHAT, "{}: no token to learn (all masked)", at())
                }
                out.push(e)
            }
            Err(msg) => fail!(WHAT, "{}: {msg}", at()),
        }
    }
    if out.is_empty() {
        fail!(WHAT, "{} holds no examples", path.display())
    }
    Ok(out)
}

/// `(train, held_out)`: `eval_fraction` of the examples (at least one when > 0 and there are
/// two or more), chosen by a seeded shuffle; order otherwise kept.
pub fn split(
    examples: Vec<Example>,
    eval_fraction: f64,
    seed: u64,
) -> (Vec<Example>, Vec<Example>) {
    let n = examples.len();
    let k = if eval_fraction <= 0.0 || n < 2 {
        0
    } else {
        ((n as f64 * eval_fraction).round() as usize).clamp(1, n - 1)
    };
    let mut idx: Vec<usize> = (0..n).collect();
    SplitMix64::new(seed ^ 0xE7A1).shuffle(&mut idx);
    let held: std::collections::HashSet<usize> = idx[..k].iter().copied().collect();
    let (mut tr, mut ev) = (Vec::new(), Vec::new());
    for (i, e) in examples.into_iter().enumerate() {
        if held.contains(&i) {
            ev.push(e)
        } else {
            tr.push(e)
        }
    }
    (tr, ev)
}

/// What longer examples do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Overflow {
    /// Cut to `seq_len` (counted in [`DataStats`]).
    Truncate,
    /// An error naming the line.
    Error,
}

/// Counts of what [`build_rows`] made and cut.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DataStats {
    pub examples: usize,
    pub rows: usize,
    pub tokens: usize,
    pub target_tokens: usize,
    pub truncated_examples: usize,
    pub truncated_tokens: usize,
}

/// One training row (at most `seq_len` tokens): tokens, shifted targets, positions and
/// segment ids (packed examples restart their positions and have their own segment).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    pub tokens: Vec<u32>,
    pub targets: Vec<i64>,
    pub positions: Vec<u32>,
    pub segments: Vec<u32>,
}

/// Rows of at most `seq_len` tokens: one example per row, or with `pack` several examples
/// per row (in order, a new row when the next does not fit).
pub fn build_rows(
    examples: &[Example],
    seq_len: usize,
    pack: bool,
    overflow: Overflow,
) -> Result<(Vec<Row>, DataStats)> {
    if seq_len < 2 {
        fail!(WHAT, "seq_len must be >= 2, got {seq_len}")
    }
    let mut st = DataStats {
        examples: examples.len(),
        ..Default::default()
    };
    let mut rows: Vec<Row> = Vec::new();
    let mut cur: Option<Row> = None;
    for e in examples {
        let mut e = e.clone();
        if e.tokens.len() > seq_len {
            if overflow == Overflow::Error {
                fail!(
                    WHAT,
                    "line {}: {} tokens exceed seq_len {seq_len}",
                    e.line,
                    e.tokens.len()
                )
            }
            st.truncated_examples += 1;
            st.truncated_tokens += e.tokens.len() - seq_len;
            e.tokens.truncate(seq_len);
            e.trainable.truncate(seq_len);
        }
        let targets = e.targets();
        let n = e.tokens.len();
        st.tokens += n;
        st.target_tokens += targets.iter().filter(|&&t| t != -100).count();
        let fits = cur
            .as_ref()
            .is_some_and(|r| pack && r.tokens.len() + n <= seq_len);
        if !fits {
            rows.extend(cur.take());
            cur = Some(Row {
                tokens: Vec::new(),
                targets: Vec::new(),
                positions: Vec::new(),
                segments: Vec::new(),
            });
        }
        let r = cur.as_mut().expect("a row");
        let seg = r.segments.last().map(|s| s + 1).unwrap_or(0);
        r.tokens.extend(&e.tokens);
        r.targets.extend(targets);
        r.positions.extend(0..n as u32);
        r.segments.extend(std::iter::repeat_n(seg, n));
    }
    rows.extend(cur);
    st.rows = rows.len();
    Ok((rows, st))
}

/// A batch of `rows`, padded to the longest (`pad` token, target -100, a segment of its own).
pub fn make_batch(rows: &[&Row], pad: u32, device: &Device) -> Result<Batch> {
    if rows.is_empty() {
        fail!(WHAT, "make_batch: no rows")
    }
    let t = rows.iter().map(|r| r.tokens.len()).max().unwrap_or(0);
    let b = rows.len();
    let (mut tk, mut tg, mut ps, mut sg) = (
        Vec::with_capacity(b * t),
        Vec::with_capacity(b * t),
        Vec::with_capacity(b * t),
        Vec::with_capacity(b * t),
    );
    // Padding alone needs no mask (it comes after every real token, which causal attention
    // never lets a real token see); packed rows do.
    let packed = rows
        .iter()
        .any(|r| r.segments.last().copied().unwrap_or(0) > 0);
    for r in rows {
        let n = r.tokens.len();
        tk.extend(&r.tokens);
        tg.extend(&r.targets);
        ps.extend(&r.positions);
        sg.extend(&r.segments);
        tk.extend(std::iter::repeat_n(pad, t - n));
        tg.extend(std::iter::repeat_n(-100i64, t - n));
        ps.extend(0..(t - n) as u32);
        sg.extend(std::iter::repeat_n(u32::MAX, t - n));
    }
    let mut batch = Batch::new(
        Tensor::from_vec(tk, (b, t), device)?,
        Tensor::from_vec(tg, (b, t), device)?,
    );
    batch.positions = Some(Tensor::from_vec(ps, (b, t), device)?);
    if packed {
        batch.segments = Some(Tensor::from_vec(sg, (b, t), device)?);
    }
    Ok(batch)
}
