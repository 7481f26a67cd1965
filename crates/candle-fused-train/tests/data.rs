//! Data: the three JSONL formats and their loss masks, chat rendering, packing boundaries
//! (positions restart, no target crosses a boundary), truncation counts, bad lines.

use std::io::Write;

use candle_core::Device;
use candle_fused_train::tokenizer::DEMO_CHAT_TEMPLATE;
use candle_fused_train::{build_rows, load_jsonl, make_batch, split, Message, Overflow, Tokenizer};

fn tok() -> Tokenizer {
    Tokenizer::byte_level()
        .unwrap()
        .with_chat_template(DEMO_CHAT_TEMPLATE)
}

fn jsonl(lines: &[&str]) -> tempfile::NamedTempFile {
    let mut f = tempfile::Builder::new()
        .suffix(".jsonl")
        .tempfile()
        .unwrap();
    for l in lines {
        writeln!(f, "{l}").unwrap();
    }
    f
}

/// The text of the tokens that are targets.
fn target_text(t: &Tokenizer, e: &candle_fused_train::Example) -> String {
    let ids: Vec<u32> = e
        .targets()
        .iter()
        .filter(|&&x| x >= 0)
        .map(|&x| x as u32)
        .collect();
    t.decode(&ids, false).unwrap()
}

#[test]
fn byte_level_tokenizer_round_trips() {
    let t = tok();
    assert_eq!(t.vocab_size(), 261);
    let s = "héllo wörld ->\n\t!";
    let ids = t.encode(s, true).unwrap();
    assert_eq!(ids.len(), s.len(), "one token per byte");
    assert!(ids.iter().all(|&i| i < 256));
    assert_eq!(t.decode(&ids, true).unwrap(), s);
    assert_eq!(t.eos_id(), Some(257));
    assert_eq!(t.encode("<|eos|>", true).unwrap(), vec![257]);
    // Saved and loaded, it is the same tokenizer.
    let dir = tempfile::tempdir().unwrap();
    t.save(dir.path()).unwrap();
    let back = Tokenizer::load(dir.path()).unwrap();
    assert_eq!(back.encode(s, true).unwrap(), ids);
}

#[test]
fn formats_and_loss_masks() {
    let t = tok();
    let f = jsonl(&[
        r#"{"text": "abc"}"#,
        r#"{"prompt": "Q: 2+2?", "completion": " 4"}"#,
        "",
        r#"{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}, {"role": "user", "content": "and?"}, {"role": "assistant", "content": "ok"}]}"#,
    ]);
    let ex = load_jsonl(f.path(), &t).unwrap();
    assert_eq!(ex.len(), 3);
    assert_eq!(ex.iter().map(|e| e.line).collect::<Vec<_>>(), vec![1, 2, 4]);
    // Text: every next token (and EOS).
    assert_eq!(target_text(&t, &ex[0]), "bc<|eos|>");
    // Prompt/completion: the completion and EOS only.
    assert_eq!(target_text(&t, &ex[1]), " 4<|eos|>");
    // Messages: the assistant turns as the template renders them (content, EOS, newline).
    let msgs = [Message {
        role: "user".into(),
        content: "hi".into(),
    }];
    assert_eq!(
        t.render_chat(&msgs, true).unwrap(),
        "<|bos|><|user|>hi\n<|assistant|>"
    );
    assert_eq!(target_text(&t, &ex[2]), "yo<|eos|>\nok<|eos|>\n");
}

#[test]
fn bad_lines_name_file_and_line() {
    let t = tok();
    let cases = [
        (vec![r#"{"text": "ok"}"#, "{oops"], ":2: invalid JSON"),
        (vec![r#"{"prompt": "a"}"#], ":1: missing \"completion\""),
        (vec![r#"{"text": 5}"#], ":1: \"text\" must be a string"),
        (vec![r#"{"foo": "bar"}"#], ":1: no \"text\""),
        (vec![r#"[1, 2]"#], ":1: expected a JSON object"),
        (vec![r#"{"text": ""}"#], ":1: \"text\" is empty"),
        (
            vec![r#"{"messages": [{"role": "user", "content": "hi"}]}"#],
            ":1: \"messages\" has no assistant turn",
        ),
        (
            vec![r#"{"messages": [{"role": "user"}]}"#],
            ":1: \"messages\" must be a list",
        ),
    ];
    for (lines, want) in cases {
        let f = jsonl(&lines);
        let e = load_jsonl(f.path(), &t).unwrap_err().to_string();
        assert!(
            e.contains(&f.path().display().to_string()) && e.contains(want),
            "{e}\nwanted {want}"
        );
    }
    let f = jsonl(&["", "  "]);
    let e = load_jsonl(f.path(), &t).unwrap_err().to_string();
    assert!(e.contains("holds no examples"), "{e}");
    let e = load_jsonl("/nonexistent/data.jsonl".as_ref(), &t)
        .unwrap_err()
        .to_string();
    assert!(e.contains("cannot read /nonexistent/data.jsonl"), "{e}");
    // Messages without a chat template.
    let f = jsonl(&[
        r#"{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}"#,
    ]);
    let e = load_jsonl(f.path(), &Tokenizer::byte_level().unwrap())
        .unwrap_err()
        .to_string();
    assert!(e.contains(":1:") && e.contains("no chat_template"), "{e}");
}

#[test]
fn packing_truncation_and_batches() {
    let t = tok();
    let lines: Vec<String> = (0..7)
        .map(|i| {
            format!(
                r#"{{"prompt": "p{i}", "completion": "{}"}}"#,
                "c".repeat(i + 1)
            )
        })
        .collect();
    let refs: Vec<&str> = lines.iter().map(String::as_str).collect();
    let f = jsonl(&refs);
    let ex = load_jsonl(f.path(), &t).unwrap();
    // Example i has 2 + (i + 1) + 1 tokens.
    let (rows, st) = build_rows(&ex, 9, true, Overflow::Truncate).unwrap();
    assert_eq!(st.examples, 7);
    assert_eq!(st.truncated_examples, 1, "the 10-token example is cut to 9");
    assert_eq!(st.truncated_tokens, 1);
    assert!(rows.iter().all(|r| r.tokens.len() <= 9));
    assert_eq!(
        rows.iter().map(|r| r.tokens.len()).sum::<usize>(),
        st.tokens
    );
    for r in &rows {
        // Positions restart at each segment start, and no target crosses a boundary.
        for i in 0..r.tokens.len() {
            let start = i == 0 || r.segments[i] != r.segments[i - 1];
            assert_eq!(r.positions[i] == 0, start);
            let end = i + 1 == r.tokens.len() || r.segments[i + 1] != r.segments[i];
            if end {
                assert_eq!(r.targets[i], -100, "a target crossing a packing boundary");
            } else if r.targets[i] != -100 {
                assert_eq!(r.targets[i], r.tokens[i + 1] as i64);
            }
        }
    }
    assert!(
        rows.iter().any(|r| r.segments.last() > Some(&0)),
        "something was packed"
    );
    let e = build_rows(&ex, 9, true, Overflow::Error)
        .unwrap_err()
        .to_string();
    assert!(e.contains("line 7: 10 tokens exceed seq_len 9"), "{e}");
    // Unpacked: one example per row; a batch pads with -100 targets.
    let (rows, _) = build_rows(&ex, 64, false, Overflow::Truncate).unwrap();
    assert_eq!(rows.len(), 7);
    let b = make_batch(&[&rows[0], &rows[6]], 258, &Device::Cpu).unwrap();
    assert_eq!(b.tokens.dims(), &[2, 10]);
    let tg: Vec<Vec<i64>> = b.targets.to_vec2().unwrap();
    assert!(tg[0][4..].iter().all(|&x| x == -100));
    let tk: Vec<Vec<u32>> = b.tokens.to_vec2().unwrap();
    assert!(tk[0][4..].iter().all(|&x| x == 258));
    // Held-out split: deterministic, disjoint, covers everything.
    let (a, h) = split(ex.clone(), 0.3, 5);
    let (a2, h2) = split(ex.clone(), 0.3, 5);
    assert_eq!((a.len(), h.len()), (5, 2));
    assert_eq!((a, h), (a2, h2));
}
