//! `candle_fused::nn::RmsNorm`: a drop-in for `candle_nn::RmsNorm` (same constructor, same
//! weight name, same forward) whose weight trains.

use std::collections::BTreeSet;

use candle_core::{DType, Module, Tensor, Var};
use candle_fused::nn;
use candle_fused_testkit::asserts::*;
use candle_fused_testkit::reference;
use candle_nn::{Optimizer, VarBuilder, VarMap};

fn keys(vm: &VarMap) -> BTreeSet<String> {
    vm.data().lock().unwrap().keys().cloned().collect()
}

#[test]
fn same_weight_name_and_init_as_candle_nn() {
    for dt in [DType::F32, DType::BF16] {
        let (ours, theirs) = (VarMap::new(), VarMap::new());
        let a = nn::rms_norm(
            16,
            1e-5,
            VarBuilder::from_varmap(&ours, dt, &CPU).pp("norm"),
        )
        .unwrap();
        let b = candle_nn::rms_norm(
            16,
            1e-5,
            VarBuilder::from_varmap(&theirs, dt, &CPU).pp("norm"),
        )
        .unwrap();
        assert_eq!(keys(&ours), keys(&theirs));
        assert_eq!(keys(&ours), BTreeSet::from(["norm.weight".to_string()]));
        assert_same("init", a.weight(), b.weight());
        assert_eq!(vec64(a.weight()), vec![1.0; 16]);
        assert_eq!(a.weight().dtype(), dt);
        assert_eq!(a.eps(), b.eps());
    }
}

#[test]
fn loads_the_same_stored_weight_as_candle_nn() {
    // Checkpoints name it `weight` or (older PyTorch) `gamma`: both modules pick the same.
    for name in ["weight", "gamma"] {
        let w = randn(&[8], 1.0, DType::F32);
        let tensors = std::collections::HashMap::from([(format!("ln.{name}"), w.clone())]);
        let vb = VarBuilder::from_tensors(tensors, DType::F32, &CPU);
        let a = nn::rms_norm(8, 1e-6, vb.pp("ln")).unwrap();
        let b = candle_nn::rms_norm(8, 1e-6, vb.pp("ln")).unwrap();
        assert_same(name, a.weight(), &w);
        assert_same(name, b.weight(), &w);
    }
}

#[test]
fn forward_equals_candle_nn() {
    for &dt in &DTYPES {
        let w = randn(&[64], 1.0, dt);
        let eps = 1e-5;
        let ours = nn::RmsNorm::new(w.clone(), eps);
        let theirs = candle_nn::RmsNorm::new(w.clone(), eps);
        let from: nn::RmsNorm = theirs.clone().into();
        for x in [
            randn(&[3, 5, 64], 2.0, dt),
            randn(&[64, 7], 2.0, dt).t().unwrap(), // candle-nn's non-fused path
        ] {
            let a = ours.forward(&x).unwrap();
            // Candle's fused CPU op rounds eps to f32 and accumulates halves in f32 too. It
            // has no f64 kernel (ours has): skip the comparison there.
            match theirs.forward(&x) {
                Ok(b) => assert_close("vs candle_nn::RmsNorm", &a, &b, dt),
                Err(e) => assert!(
                    dt == DType::F64 && x.is_contiguous(),
                    "candle-nn failed for {dt:?}: {e}"
                ),
            }
            assert_same("From<candle_nn::RmsNorm>", &from.forward(&x).unwrap(), &a);
            let r = reference::rms_norm(&f64t(&x), Some(&f64t(&w)), eps).unwrap();
            assert_close("vs the f64 reference", &a, &r, dt);
        }
    }
}

/// A toy regression: learn `w` so that `rms_norm(x) ⊙ w` matches targets made with a random
/// `w_true`. Returns (losses, initial weight, final weight).
fn train(
    module: &dyn Module,
    weight: &Var,
    steps: usize,
    x: &Tensor,
    target: &Tensor,
) -> (Vec<f32>, Vec<f64>, Vec<f64>) {
    let w0 = vec64(weight.as_tensor());
    let params = candle_nn::ParamsAdamW {
        lr: 0.05,
        ..Default::default()
    };
    let mut opt = candle_nn::AdamW::new(vec![weight.clone()], params).unwrap();
    let mut losses = Vec::new();
    for _ in 0..steps {
        let y = module.forward(x).unwrap();
        let loss = (y - target).unwrap().sqr().unwrap().mean_all().unwrap();
        losses.push(loss.to_scalar::<f32>().unwrap());
        opt.backward_step(&loss).unwrap();
    }
    (losses, w0, vec64(weight.as_tensor()))
}

fn toy_problem(d: usize) -> (Tensor, Tensor) {
    let x = randn(&[64, d], 1.0, DType::F32);
    let w_true = rand(&[d], -2.0, 2.0, DType::F32);
    let target = reference::rms_norm(&x, Some(&w_true), 1e-5).unwrap();
    (x, target)
}

#[test]
fn it_trains() {
    let d = 32;
    let (x, target) = toy_problem(d);
    let vm = VarMap::new();
    let norm = nn::rms_norm(d, 1e-5, VarBuilder::from_varmap(&vm, DType::F32, &CPU)).unwrap();
    let var = vm.all_vars().pop().expect("one variable");
    // The first gradient is the reference's (autograd through the composed ops, in f64).
    let loss = |y: Tensor, t: &Tensor| (y - t).unwrap().sqr().unwrap().mean_all().unwrap();
    let g = loss(norm.forward(&x).unwrap(), &target).backward().unwrap();
    let g = g.get(var.as_tensor()).expect("the weight gets a gradient");
    let w64 = Var::from_tensor(&f64t(var.as_tensor())).unwrap();
    let r = loss(
        reference::rms_norm(&f64t(&x), Some(w64.as_tensor()), 1e-5).unwrap(),
        &f64t(&target),
    )
    .backward()
    .unwrap();
    assert_close("dweight", g, r.get(w64.as_tensor()).unwrap(), DType::F32);

    let (losses, w0, w1) = train(&norm, &var, 60, &x, &target);
    let (first, last) = (losses[0], *losses.last().unwrap());
    assert!(
        last < 0.1 * first,
        "loss did not drop: {first} -> {last} ({losses:?})"
    );
    assert!(
        losses.windows(2).filter(|p| p[1] < p[0]).count() > 40,
        "{losses:?}"
    );
    let moved = w0
        .iter()
        .zip(&w1)
        .map(|(a, b)| (a - b).abs())
        .fold(0f64, f64::max);
    assert!(moved > 0.1, "weight barely changed: max |Δw| = {moved}");
    // The module holds the trained variable (the VarMap's), not a copy.
    assert_same("module weight is the var", norm.weight(), var.as_tensor());
}

/// The bug this module fixes: candle-nn's `RmsNorm` forward uses a fused op without a
/// backward on contiguous input (candle-nn 0.11.1), so its weight gets no gradient and an
/// optimizer never moves it.
#[test]
fn candle_nn_rms_norm_weight_gets_no_gradient() {
    let d = 32;
    let (x, target) = toy_problem(d);
    let vm = VarMap::new();
    let norm =
        candle_nn::rms_norm(d, 1e-5, VarBuilder::from_varmap(&vm, DType::F32, &CPU)).unwrap();
    let var = vm.all_vars().pop().expect("one variable");
    let y = norm.forward(&x).unwrap();
    let loss = (y - &target).unwrap().sqr().unwrap().mean_all().unwrap();
    let grads = loss.backward().unwrap();
    assert!(
        grads.get(var.as_tensor()).is_none(),
        "candle-nn now has a gradient"
    );
    let (losses, w0, w1) = train(&norm, &var, 10, &x, &target);
    assert_eq!(w0, w1, "candle-nn's weight moved");
    assert!(losses.windows(2).all(|p| p[0] == p[1]), "{losses:?}");
    // Ours, from the very same candle-nn module, trains.
    let ours: nn::RmsNorm = norm.into();
    let (losses, w0, w1) = train(&ours, &var, 10, &x, &target);
    assert_ne!(w0, w1);
    assert!(losses.last().unwrap() < &losses[0]);
}
