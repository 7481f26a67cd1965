//! The Rust side of `scripts/make_fixtures.py --check` (the live comparison with PEFT): eval
//! and train on token batches from a safetensors file, so that both sides see the same tokens.
//!
//! ```text
//! parity eval  --model DIR [--adapter DIR] --batches FILE --batch NAME
//! parity train --model DIR --batches FILE --batch NAME --steps N --lr LR --rank R --alpha A
//!              --seed S --out DIR [--eval-batch NAME]
//! parity merge --model DIR --adapter DIR --batches FILE --out DIR
//! parity resave --model DIR --adapter DIR --batches FILE --out DIR
//! ```
//! `--batches` holds `<name>.tokens` / `.targets` (and `.positions` / `.segments` for a packed
//! batch), as `make_fixtures.py` writes them. `train` adds a fresh LoRA (all-linear, PEFT init,
//! `--seed`), takes `--steps` AdamW steps (lr `--lr`, PyTorch's defaults otherwise) on the
//! batch with the explicit backward, and saves the adapter with `Model::save_adapter`.
//! `resave` loads a PEFT adapter and writes it again with `Model::save_adapter`; `merge` writes
//! base + adapter merged as a Hugging Face checkpoint (`Model::save(.., true)`).
//! Each command prints one JSON line (`{"loss": ..}` / `{"losses": [..], "eval_loss": ..}`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use candle_core::{DType, Device, Result, Tensor};
use candle_fused_train::{AdamW, AdamWConfig, Batch, LoraSpec, Model};

fn usage() -> ! {
    eprintln!(
        "usage: parity eval --model DIR [--adapter DIR] --batches FILE --batch NAME\n       \
         parity train --model DIR --batches FILE --batch NAME --steps N --lr LR --rank R \
         --alpha A --seed S --out DIR [--eval-batch NAME]\n       \
         parity merge|resave --model DIR --adapter DIR --batches FILE --out DIR"
    );
    std::process::exit(2)
}

struct Args(HashMap<String, String>);

impl Args {
    fn parse(rest: &[String]) -> Self {
        let mut m = HashMap::new();
        let mut it = rest.iter();
        while let Some(k) = it.next() {
            let Some(name) = k.strip_prefix("--") else {
                usage()
            };
            let Some(v) = it.next() else { usage() };
            m.insert(name.to_string(), v.clone());
        }
        Self(m)
    }
    fn get(&self, k: &str) -> Result<&str> {
        self.0
            .get(k)
            .map(String::as_str)
            .ok_or_else(|| candle_core::Error::Msg(format!("parity: missing --{k}")))
    }
    fn num<T: std::str::FromStr>(&self, k: &str) -> Result<T> {
        self.get(k)?
            .parse()
            .map_err(|_| candle_core::Error::Msg(format!("parity: --{k} is not a number")))
    }
}

/// Batch `name` of `file`; positions and segments are passed when the file has them and the
/// batch is packed (more than one segment).
fn batch(file: &Path, name: &str) -> Result<Batch> {
    let t: HashMap<String, Tensor> = candle_core::safetensors::load(file, &Device::Cpu)?;
    let get = |k: &str| {
        t.get(&format!("{name}.{k}")).cloned().ok_or_else(|| {
            candle_core::Error::Msg(format!("parity: {} has no {name}.{k}", file.display()))
        })
    };
    let mut b = Batch::new(get("tokens")?.to_dtype(DType::U32)?, get("targets")?);
    if let (Ok(pos), Ok(seg)) = (get("positions"), get("segments")) {
        if seg
            .max_keepdim(1)?
            .flatten_all()?
            .max(0)?
            .to_dtype(DType::I64)?
            .to_scalar::<i64>()?
            > 0
        {
            b.positions = Some(pos);
            b.segments = Some(seg);
        }
    }
    Ok(b)
}

fn run() -> Result<()> {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let Some((cmd, rest)) = argv.split_first() else {
        usage()
    };
    let a = Args::parse(rest);
    let model_dir = PathBuf::from(a.get("model")?);
    let file = PathBuf::from(a.get("batches")?);
    let mut model = Model::load(&model_dir, DType::F32, &Device::Cpu)?;
    match cmd.as_str() {
        "eval" => {
            if let Ok(ad) = a.get("adapter") {
                model.load_adapter(Path::new(ad))?;
            }
            let b = batch(&file, a.get("batch")?)?;
            println!(
                "{}",
                serde_json::json!({ "loss": model.loss(&b)?, "targets": b.n_valid()? })
            );
        }
        "train" => {
            let spec = LoraSpec::new(a.num("rank")?, a.num("alpha")?);
            model.add_lora(&spec, a.num("seed")?)?;
            let b = batch(&file, a.get("batch")?)?;
            let mut opt = AdamW::new(AdamWConfig {
                weight_decay: 0.01,
                ..AdamWConfig::default()
            })?;
            let lr: f64 = a.num("lr")?;
            let mut losses = vec![];
            for _ in 0..a.num::<usize>("steps")? {
                let (loss, grads) = model.loss_and_grads(&b)?;
                opt.step(&model.lora_vars(), &grads, lr)?;
                losses.push(loss);
            }
            let out = PathBuf::from(a.get("out")?);
            model.save_adapter(&out, &model_dir.to_string_lossy())?;
            let eval = match a.get("eval-batch") {
                Ok(n) => Some(model.loss(&batch(&file, n)?)?),
                Err(_) => None,
            };
            println!(
                "{}",
                serde_json::json!({ "losses": losses, "eval_loss": eval, "adapter": out })
            );
        }
        "resave" => {
            model.load_adapter(Path::new(a.get("adapter")?))?;
            let out = PathBuf::from(a.get("out")?);
            model.save_adapter(&out, &model_dir.to_string_lossy())?;
            println!("{}", serde_json::json!({ "adapter": out }));
        }
        "merge" => {
            model.load_adapter(Path::new(a.get("adapter")?))?;
            let out = PathBuf::from(a.get("out")?);
            model.save(&out, true)?;
            println!("{}", serde_json::json!({ "merged": out }));
        }
        _ => usage(),
    }
    Ok(())
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("parity: {e}");
            ExitCode::FAILURE
        }
    }
}
