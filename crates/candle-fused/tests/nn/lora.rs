//! The `LoraLinear` module: PEFT init and names, base output when fresh or disabled,
//! merge/unmerge, training (only the adapter changes), dropout, bad configs.

use candle_core::{DType, Module, Tensor, Var};
use candle_fused::nn::{lora_linear as lora_layer, LoraConfig, LoraLinear};
use candle_fused_testkit::reference;
use candle_fused_testkit::testing::{self, poisoned, rel_err, tolerance};
use candle_nn::{Optimizer, VarBuilder, VarMap};

use candle_fused_testkit::asserts::CPU;

fn layer(varmap: &VarMap, path: &str, i: usize, o: usize, cfg: &LoraConfig) -> LoraLinear {
    let vb = VarBuilder::from_varmap(varmap, DType::F32, &CPU);
    lora_layer(i, o, cfg, vb.pp(path)).unwrap()
}

/// A copy of `l` with a random (nonzero) B.
fn with_random_b(l: &LoraLinear) -> LoraLinear {
    let mut l = l.clone();
    let b = testing::randn(l.lora_b().dims(), 0.5, DType::F32, &CPU).unwrap();
    let a = l.lora_a().clone();
    l.set_adapter(&a, &b, l.scale()).unwrap();
    l
}

#[test]
fn varbuilder_names_and_peft_init() {
    let vm = VarMap::new();
    let cfg = LoraConfig::new(4, 8.0);
    let l = layer(&vm, "blk.fc", 40, 24, &cfg);
    let names: Vec<String> = {
        let data = vm.data().lock().unwrap();
        let mut v: Vec<String> = data.keys().cloned().collect();
        v.sort();
        v
    };
    assert_eq!(
        names,
        [
            "blk.fc.bias",
            "blk.fc.lora_A.weight",
            "blk.fc.lora_B.weight",
            "blk.fc.weight"
        ]
    );
    assert_eq!(l.rank(), 4);
    assert_eq!(l.scale(), 2.0);
    assert_eq!(l.lora_a().dims(), &[4, 40]);
    assert_eq!(l.lora_b().dims(), &[24, 4]);
    // A: uniform in ±1/sqrt(in), not all equal; B: zeros.
    let a = l.lora_a().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let bound = 1.0 / (40f32).sqrt();
    assert!(a.iter().all(|v| v.abs() <= bound));
    let spread =
        a.iter().cloned().fold(f32::MIN, f32::max) - a.iter().cloned().fold(f32::MAX, f32::min);
    assert!(spread > bound, "A looks constant: spread {spread}");
    assert_eq!(testing::max_abs(l.lora_b()).unwrap(), 0.0);
}

#[test]
fn fresh_adapter_and_disabled_adapter_give_the_base_output() {
    let vm = VarMap::new();
    let l = layer(&vm, "fc", 33, 17, &LoraConfig::new(8, 16.0));
    let base = candle_nn::Linear::new(l.weight().clone(), l.bias().cloned());
    let x = testing::randn(&[2, 5, 33], 1.0, DType::F32, &CPU).unwrap();
    let want = base.forward(&x).unwrap();
    assert!(rel_err(&l.forward(&x).unwrap(), &want).unwrap() < 1e-6);
    let mut l = with_random_b(&l);
    let y = l.forward(&x).unwrap();
    assert!(
        rel_err(&y, &want).unwrap() > 1e-3,
        "a nonzero B must change the output"
    );
    l.set_adapter_enabled(false).unwrap();
    assert!(rel_err(&l.forward(&x).unwrap(), &want).unwrap() < 1e-6);
    l.set_adapter_enabled(true).unwrap();
    assert_eq!(rel_err(&l.forward(&x).unwrap(), &y).unwrap(), 0.0);
}

#[test]
fn from_linear_wraps_an_existing_layer() {
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &CPU);
    let base = candle_nn::linear_no_bias(12, 9, vb.pp("base")).unwrap();
    let l = LoraLinear::from_linear(&base, &LoraConfig::new(3, 3.0), vb.pp("base")).unwrap();
    assert!(l.bias().is_none());
    let x = testing::randn(&[7, 12], 1.0, DType::F32, &CPU).unwrap();
    assert!(rel_err(&l.forward(&x).unwrap(), &base.forward(&x).unwrap()).unwrap() < 1e-6);
}

#[test]
fn merge_and_unmerge_are_equivalent() {
    for dtype in [DType::F32, DType::BF16] {
        let vm = VarMap::new();
        let l = layer(&vm, "fc", 64, 48, &LoraConfig::new(8, 16.0));
        let mut l = with_random_b(&l);
        if dtype != DType::F32 {
            let w = l.weight().to_dtype(dtype).unwrap();
            let bias = l.bias().unwrap().to_dtype(dtype).unwrap();
            let a = l.lora_a().to_dtype(dtype).unwrap();
            let b = l.lora_b().to_dtype(dtype).unwrap();
            l = LoraLinear::new(&w, Some(&bias), a, b, l.scale(), 0.0).unwrap();
        }
        let x = testing::randn(&[10, 64], 1.0, dtype, &CPU).unwrap();
        let y = l.forward(&x).unwrap();
        let w0 = l.weight().clone();
        l.merge().unwrap();
        assert!(l.is_merged());
        assert!(l.merge().is_err(), "double merge must fail");
        let ym = l.forward(&x).unwrap();
        let e = rel_err(&ym, &y).unwrap();
        assert!(
            e <= tolerance(dtype),
            "{dtype:?} merged vs unmerged: {e:.3e}"
        );
        l.unmerge().unwrap();
        assert!(l.unmerge().is_err(), "double unmerge must fail");
        let ew = rel_err(l.weight(), &w0).unwrap();
        let tol = if dtype == DType::F32 { 1e-6 } else { 1e-2 };
        assert!(ew <= tol, "{dtype:?} unmerged weight drift {ew:.3e}");
        let e2 = rel_err(&l.forward(&x).unwrap(), &y).unwrap();
        assert!(e2 <= tolerance(dtype), "{dtype:?} after unmerge: {e2:.3e}");
        // Disabling a merged layer unmerges it: the output is the base one.
        l.merge().unwrap();
        l.set_adapter_enabled(false).unwrap();
        assert!(!l.is_merged());
        let base = poisoned().linear(&x, &w0, l.bias()).unwrap();
        assert!(rel_err(&l.forward(&x).unwrap(), &base).unwrap() <= tolerance(dtype));
    }
}

/// Two LoRA layers trained with AdamW: the loss curve through the fused op is the curve of the
/// same training through composed Candle ops (the reference, from the same initial values), the
/// loss falls, and only the adapters change.
#[test]
fn training_lowers_the_loss_and_changes_only_the_adapter() {
    let vm = VarMap::new();
    let cfg = LoraConfig::new(4, 8.0);
    let l1 = layer(&vm, "fc1", 16, 32, &cfg);
    let l2 = layer(&vm, "fc2", 32, 8, &cfg);
    let snapshot = |vm: &VarMap| -> Vec<(String, Tensor)> {
        let data = vm.data().lock().unwrap();
        let mut v: Vec<(String, Tensor)> = data
            .iter()
            .map(|(k, v)| (k.clone(), v.as_tensor().copy().unwrap()))
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    };
    let before = snapshot(&vm);
    let x = testing::randn(&[64, 16], 1.0, DType::F32, &CPU).unwrap();
    // A target the frozen base cannot produce: the base output plus a low-rank change (a
    // constant: detached from the graph that computed it).
    let teacher = testing::randn(&[16, 8], 0.5, DType::F32, &CPU).unwrap();
    let composed = |l: &LoraLinear, x: &Tensor| {
        let (w, b, a, bb) = (l.weight(), l.bias(), l.lora_a(), l.lora_b());
        reference::lora_linear(x, w, b, a, bb, l.scale())
    };
    let fwd = |x: &Tensor, fused: bool| -> Tensor {
        if fused {
            l2.forward(&l1.forward(x).unwrap().relu().unwrap()).unwrap()
        } else {
            composed(&l2, &composed(&l1, x).unwrap().relu().unwrap()).unwrap()
        }
    };
    let target = (fwd(&x, true) + x.matmul(&teacher).unwrap())
        .unwrap()
        .detach();
    let loss = |y: &Tensor| (y - &target).unwrap().sqr().unwrap().mean_all().unwrap();
    const STEPS: usize = 60;
    let train = |fused: bool| -> Vec<f32> {
        for (name, t) in &before {
            vm.data().lock().unwrap()[name].set(t).unwrap();
        }
        let params = candle_nn::ParamsAdamW {
            lr: 1e-2,
            ..Default::default()
        };
        let mut opt = candle_nn::AdamW::new(vm.all_vars(), params).unwrap();
        let mut curve = Vec::with_capacity(STEPS + 1);
        for _ in 0..STEPS {
            let l = loss(&fwd(&x, fused));
            curve.push(l.to_scalar::<f32>().unwrap());
            opt.backward_step(&l).unwrap();
        }
        curve.push(loss(&fwd(&x, fused)).to_scalar::<f32>().unwrap());
        curve
    };
    let reference_curve = train(false);
    let curve = train(true);
    // The same training step by step (f32 rounding differs slightly and grows with the steps:
    // the first 30 steps are compared tightly).
    for (i, (a, b)) in curve.iter().zip(&reference_curve).enumerate().take(30) {
        let e = ((a - b) / b).abs();
        assert!(
            e < 1e-4,
            "step {i}: loss {a} (fused) vs {b} (composed), rel {e:.2e}"
        );
    }
    let (l0, l_end) = (curve[0], curve[STEPS]);
    assert!(
        l_end < 0.5 * l0,
        "loss {l0} -> {l_end} (composed: {} -> {})",
        reference_curve[0],
        reference_curve[STEPS]
    );
    let after = snapshot(&vm);
    for ((name, t0), (_, t1)) in before.iter().zip(&after) {
        let diff = testing::max_abs(&(t1 - t0).unwrap()).unwrap();
        if name.contains("lora_") {
            assert!(diff > 0.0, "{name} did not change");
        } else {
            assert_eq!(diff, 0.0, "frozen {name} changed by {diff}");
        }
    }
}

#[test]
fn dropout_path_matches_the_fused_path_at_tiny_p_and_trains() {
    let vm = VarMap::new();
    let cfg = LoraConfig::new(4, 8.0).with_dropout(1e-7);
    let l = with_random_b(&layer(&vm, "fc", 20, 12, &cfg));
    let x = Var::from_tensor(&testing::randn(&[6, 20], 1.0, DType::F32, &CPU).unwrap()).unwrap();
    let probe = testing::randn(&[6, 12], 1.0, DType::F32, &CPU).unwrap();
    let mut l = l;
    let vars = l.trainable_vars().unwrap();
    let run = |train: bool| {
        let y = l.forward_t(&x, train).unwrap();
        let g = (&y * &probe)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let gs: Vec<Tensor> = [x.as_tensor(), vars[0].as_tensor(), vars[1].as_tensor()]
            .iter()
            .map(|t| g.get(t).unwrap().clone())
            .collect();
        (y, gs)
    };
    let (y_eval, g_eval) = run(false);
    let (y_train, g_train) = run(true);
    assert!(rel_err(&y_train, &y_eval).unwrap() < 1e-5);
    for (a, b) in g_train.iter().zip(&g_eval) {
        assert!(rel_err(a, b).unwrap() < 1e-5);
    }
    // A real dropout changes the training output but not the inference one.
    l.set_dropout(0.5).unwrap();
    let y_t = l.forward_t(&x, true).unwrap();
    assert!(rel_err(&y_t, &y_eval).unwrap() > 1e-4);
    assert_eq!(rel_err(&l.forward(&x).unwrap(), &y_eval).unwrap(), 0.0);
    l.set_training(true);
    assert!(rel_err(&x.apply_t(&l, false).unwrap(), &y_eval).unwrap() > 1e-4);
    l.set_training(false);
    assert_eq!(
        rel_err(&x.apply_t(&l, true).unwrap(), &y_eval).unwrap(),
        0.0
    );
}

#[test]
fn bad_layer_config_is_a_clear_error() {
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &CPU);
    let msg = |r: candle_core::Result<LoraLinear>| r.expect_err("expected an error").to_string();
    let m = msg(lora_layer(8, 6, &LoraConfig::new(0, 1.0), vb.pp("a")));
    assert!(m.contains("rank must be >= 1"), "{m}");
    let m = msg(lora_layer(8, 6, &LoraConfig::new(7, 1.0), vb.pp("b")));
    assert!(m.contains("exceeds min(K, N)"), "{m}");
    let m = msg(lora_layer(
        8,
        6,
        &LoraConfig::new(2, 1.0).with_dropout(1.0),
        vb.pp("c"),
    ));
    assert!(m.contains("dropout must be in [0, 1)"), "{m}");
    let m = msg(lora_layer(8, 6, &LoraConfig::new(2, f64::NAN), vb.pp("d")));
    assert!(m.contains("alpha must be finite"), "{m}");
}
