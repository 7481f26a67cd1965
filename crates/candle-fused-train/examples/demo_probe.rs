//! Probe of the demo job's settings: `demo_probe STEPS LR RANK BATCH` trains the demo model on
//! the demo data and prints the held-out loss every 25 steps and a few greedy generations.

use candle_core::{DType, Device};
use candle_fused_train::{
    build_rows, demo, generate, load_jsonl, split, GenerateConfig, LoraSpec, Model, Overflow,
    Tokenizer, TrainConfig, TrainData, Trainer,
};

fn main() -> candle_core::Result<()> {
    let a: Vec<String> = std::env::args().collect();
    let arg = |i: usize, d: &str| a.get(i).cloned().unwrap_or_else(|| d.to_string());
    let steps: usize = arg(1, "300").parse().unwrap();
    let lr: f64 = arg(2, "3e-3").parse().unwrap();
    let rank: usize = arg(3, "16").parse().unwrap();
    let batch: usize = arg(4, "16").parse().unwrap();
    let dir = std::env::temp_dir().join(format!("demo_probe_{}", std::process::id()));
    let n: usize = arg(5, "800").parse().unwrap();
    let shout = arg(6, "count") == "shout";
    let files = demo::prepare_with(&dir, n, shout)?;
    let tok = Tokenizer::load(&files.model_dir)?;
    let mut model = Model::load(&files.model_dir, DType::F32, &Device::Cpu)?;
    let ex = load_jsonl(&files.data, &tok)?;
    let (tr, ev) = split(ex, 0.05, 0);
    let (train, _) = build_rows(&tr, 128, true, Overflow::Truncate)?;
    let (eval, _) = build_rows(&ev, 128, false, Overflow::Truncate)?;
    model.add_lora(&LoraSpec::new(rank, 2.0 * rank as f64), 0)?;
    let cfg = TrainConfig {
        lr,
        warmup_steps: 20,
        steps,
        batch_size: batch,
        eval_every: 25,
        pad_token: 258,
        ..Default::default()
    };
    let mut t = Trainer::new(model, TrainData { train, eval }, cfg, &dir.join("out"))?;
    struct P(std::time::Instant);
    impl candle_fused_train::Callback for P {
        fn on_eval(&mut self, s: usize, l: f32) {
            println!(
                "{:>6.1}s step {s}: eval {l:.4}",
                self.0.elapsed().as_secs_f64()
            );
        }
    }
    let s = t.run(&mut P(std::time::Instant::now()))?;
    println!("{s:?}");
    for p in [
        "count down from 7 ->",
        "count up from 2 by two ->",
        "shout: red fox ->",
        "shout: candle graph ->",
    ] {
        let ids = tok.encode(p, true)?;
        let out = generate(
            &t.model,
            &ids,
            &GenerateConfig {
                max_new_tokens: 24,
                stop_tokens: Some(vec![257]),
                ..Default::default()
            },
            |_| {},
        )?;
        println!("{p}{:?}", tok.decode(&out, true)?);
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
