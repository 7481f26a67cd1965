//! Shared by the parity tests: the committed transformers + PEFT fixtures (`Fixture`), the
//! relative error, and a `Report` that prints every check with its error and tolerance and
//! fails with the list of the checks that did not pass.

#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_fused_train::{Batch, Model};
use serde_json::Value;

pub const ARCHS: [&str; 3] = ["llama", "qwen2", "mistral"];
pub const BATCHES: [&str; 3] = ["plain", "masked", "packed"];

/// Deliberate failures for scratch runs: `CANDLE_FUSED_PARITY_SABOTAGE=what[,what..]` breaks
/// one input so that the checks guarding it must fail (what the tests print then shows each
/// check can fail): `adapter` (the `adapter_trained/` weights where `adapter/` is expected),
/// `packing` (the packed batch without positions and segments), `targets` (one target id
/// changed), `adamw` (weight decay off), `clip` (no gradient clipping), `backward` (one
/// gradient of the explicit backward scaled by 1 + 1e-4), `generate` (one token fewer).
/// Unset in CI.
pub fn sabotage(what: &str) -> bool {
    std::env::var("CANDLE_FUSED_PARITY_SABOTAGE").is_ok_and(|v| v.split(',').any(|w| w == what))
}

/// The fixtures: `CANDLE_FUSED_FIXTURES` if set, else this crate's `tests/fixtures` where it
/// was built, else `crates/candle-fused-train/tests/fixtures` under the working directory (a
/// test binary built here and run from the root of a copy of the tree on a GPU machine).
pub fn fixtures_dir() -> PathBuf {
    if let Some(p) = std::env::var_os("CANDLE_FUSED_FIXTURES") {
        return p.into();
    }
    let built = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    if built.is_dir() {
        return built;
    }
    PathBuf::from("crates/candle-fused-train/tests/fixtures")
}

/// One architecture's fixture: `model/`, adapters, batches, expected tensors and values.
pub struct Fixture {
    pub name: &'static str,
    pub dir: PathBuf,
    pub batches: HashMap<String, Tensor>,
    pub expected: HashMap<String, Tensor>,
    pub info: Value,
}

pub fn read_json(p: &Path) -> Value {
    let text =
        std::fs::read_to_string(p).unwrap_or_else(|e| panic!("reading {}: {e}", p.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("parsing {}: {e}", p.display()))
}

impl Fixture {
    pub fn load(name: &'static str) -> Self {
        let dir = fixtures_dir().join(name);
        let st = |f: &str| {
            let p = dir.join(f);
            candle_core::safetensors::load(&p, &Device::Cpu)
                .unwrap_or_else(|e| panic!("loading {}: {e}", p.display()))
        };
        Self {
            name,
            batches: st("batches.safetensors"),
            expected: st("expected.safetensors"),
            info: read_json(&dir.join("expected.json")),
            dir,
        }
    }

    /// The checkpoint in f32 on the CPU, with the PEFT adapter of `adapter` (a fixture subdir).
    pub fn model(&self, adapter: Option<&str>) -> Model {
        self.model_on(adapter, DType::F32, &Device::Cpu)
    }

    /// [`Fixture::model`] with the base weights in `dtype` on `device` (the adapters are f32).
    pub fn model_on(&self, adapter: Option<&str>, dtype: DType, device: &Device) -> Model {
        let mut m = Model::load(&self.dir.join("model"), dtype, device)
            .unwrap_or_else(|e| panic!("{}: Model::load({dtype:?}, {device:?}): {e}", self.name));
        if let Some(a) = adapter {
            let a = if a == "adapter" && sabotage("adapter") {
                "adapter_trained"
            } else {
                a
            };
            m.load_adapter(&self.dir.join(a))
                .unwrap_or_else(|e| panic!("{}: load_adapter({a}): {e}", self.name));
        }
        m
    }

    fn batch_tensor(&self, key: &str) -> Tensor {
        self.batches
            .get(key)
            .unwrap_or_else(|| panic!("{}: batches.safetensors has no {key}", self.name))
            .clone()
    }

    /// Batch `name` (`plain`, `masked`, `packed`, `eval`). Unpacked batches get no positions
    /// or segments (the model's defaults); the packed one both.
    pub fn batch(&self, name: &str) -> Batch {
        let tokens = self
            .batch_tensor(&format!("{name}.tokens"))
            .to_dtype(DType::U32)
            .unwrap();
        let mut targets = self.batch_tensor(&format!("{name}.targets"));
        if sabotage("targets") {
            let mut t: Vec<Vec<i64>> = targets.to_vec2().unwrap();
            let j = t[0].iter().position(|&x| x != -100).unwrap();
            t[0][j] = (t[0][j] - 3) % 250 + 5; // another ordinary token
            targets = Tensor::new(t, &Device::Cpu).unwrap();
        }
        let mut b = Batch::new(tokens, targets);
        if name == "packed" && !sabotage("packing") {
            b.positions = Some(self.batch_tensor(&format!("{name}.positions")));
            b.segments = Some(self.batch_tensor(&format!("{name}.segments")));
        }
        b
    }

    /// [`Fixture::batch`] with every tensor on `device`.
    pub fn batch_on(&self, name: &str, device: &Device) -> Batch {
        let b = self.batch(name);
        let mv = |t: &Tensor| t.to_device(device).unwrap();
        Batch {
            tokens: mv(&b.tokens),
            targets: mv(&b.targets),
            positions: b.positions.as_ref().map(mv),
            segments: b.segments.as_ref().map(mv),
        }
    }

    pub fn expected(&self, key: &str) -> Tensor {
        self.expected
            .get(key)
            .unwrap_or_else(|| panic!("{}: expected.safetensors has no {key}", self.name))
            .clone()
    }

    /// transformers' loss of batch `b` (`which` = base or adapter).
    pub fn loss(&self, b: &str, which: &str) -> f64 {
        self.info["losses"][b][which]
            .as_f64()
            .unwrap_or_else(|| panic!("{}: expected.json has no losses.{b}.{which}", self.name))
    }
}

/// `||a - b|| / ||b||` in f64 (`a` and `b` of the same shape; a shape mismatch is infinite).
pub fn rel(a: &Tensor, b: &Tensor) -> f64 {
    if a.dims() != b.dims() {
        return f64::INFINITY;
    }
    let f = |t: &Tensor| {
        t.to_device(&Device::Cpu)
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
    };
    let (a, b) = (f(a), f(b));
    let num = (&a - &b)
        .unwrap()
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
        .sqrt();
    let den = b
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
        .sqrt();
    if den == 0.0 {
        if num == 0.0 {
            0.0
        } else {
            f64::INFINITY
        }
    } else {
        num / den
    }
}

/// Every check printed; the test fails at `finish` with the list of failures.
pub struct Report {
    title: String,
    lines: Vec<String>,
    fails: Vec<String>,
}

impl Report {
    pub fn new(title: &str) -> Self {
        Self {
            title: title.into(),
            lines: vec![],
            fails: vec![],
        }
    }

    /// `err <= tol` (NaN fails).
    pub fn check(&mut self, what: &str, err: f64, tol: f64) {
        let ok = err <= tol;
        let line = format!(
            "{:<4} {what}: {err:.3e} (tol {tol:.0e})",
            if ok { "PASS" } else { "FAIL" }
        );
        if !ok {
            self.fails.push(line.clone());
        }
        self.lines.push(line);
    }

    pub fn check_eq<T: PartialEq + std::fmt::Debug>(&mut self, what: &str, got: T, want: T) {
        if got == want {
            let v = format!("{got:?}");
            self.lines.push(if v.len() <= 80 {
                format!("PASS {what}: {v}")
            } else {
                format!("PASS {what}")
            });
        } else {
            self.fail(format!("{what}: got {got:?}, expected {want:?}"));
        }
    }

    pub fn fail(&mut self, msg: String) {
        let line = format!("FAIL {msg}");
        self.fails.push(line.clone());
        self.lines.push(line);
    }

    pub fn finish(self) {
        println!("{}:\n  {}", self.title, self.lines.join("\n  "));
        assert!(!self.lines.is_empty(), "{}: no check ran", self.title);
        assert!(
            self.fails.is_empty(),
            "{}: {} of {} checks failed:\n  - {}",
            self.title,
            self.fails.len(),
            self.lines.len(),
            self.fails.join("\n  - ")
        );
    }
}
