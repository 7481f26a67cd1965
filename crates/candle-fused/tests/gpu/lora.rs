//! GPU checks of the fused LoRA linear (module of the single GPU test target `tests/gpu/main.rs`,
//! behind the `cuda` feature). Each `pub fn` panics with a readable message on failure and
//! prints one line per comparison (`op what shape dtype rel_err tol PASS|FAIL`).
//!
//! - [`sweep_vs_reference_and_cpu`]: the LoRA cases of `check::sweep` plus odd shapes, r from 1
//!   to 256, every dtype, with and without bias, outputs poisoned: forward and every gradient
//!   (x, W, A, B, bias) vs the f64 reference and vs this crate's CPU backend.
//! - [`large_shapes_vs_composed_f64_on_gpu`]: bench-sized shapes (M up to 4096, K = N = 4096,
//!   r = 16/64) in bf16/f16/f32 vs composed Candle ops in f64 on the GPU (cuBLAS), forward and
//!   gradients of x, A, B.
//! - [`gradient_flags_and_bad_input`]: a frozen W and an untracked x get no gradient; device
//!   mismatches are clear errors.
//! - [`module_trains_merges_and_round_trips`]: `LoraLinear` on the GPU: training lowers the loss
//!   and changes only A and B, its loss curve equals the CPU's step by step; merge = unmerged
//!   output; PEFT save/load round trip.
//! - [`standalone_backward_matches_autograd_and_cpu`]: `lora_linear_backward` (given dy) equals
//!   autograd through the fused op on the GPU and the CPU backend within tolerance.

use candle_core::{DType, Device, Module, Tensor, Var};
use candle_fused::nn::{
    lora_linear as lora_layer, save_adapters, LoraConfig, LoraLinear, PeftAdapters,
};
use candle_fused::ops::lora_linear;
use candle_fused_testkit::check::{self, Case, OpKind};
use candle_fused_testkit::reference;
use candle_fused_testkit::testing::{self, poisoned, rel_err, tolerance};
use candle_nn::{Optimizer, VarBuilder, VarMap};

fn gpu() -> Device {
    Device::new_cuda(0).expect("a CUDA device")
}

fn report(o: &check::Outcome) -> bool {
    let ok = o.pass();
    println!(
        "{:<34} {:<12} {:<16} {:<5} {:>10.3e} {:>8.0e} {}",
        o.op,
        o.what,
        format!("{:?}", o.shape),
        format!("{:?}", o.dtype),
        o.rel_err,
        o.tol,
        if ok { "PASS" } else { "FAIL" }
    );
    ok
}

/// Every LoRA case of the sweep plus odd shapes, on the GPU, vs the f64 reference and the CPU.
pub fn sweep_vs_reference_and_cpu() {
    // f64 has no CUDA kernels (its clear error: gpu.rs, too_long_rows_and_f64_are_clear_errors).
    let dtypes = [DType::F32, DType::F16, DType::BF16];
    let mut cases: Vec<Case> = check::sweep(&dtypes)
        .into_iter()
        .filter(|c| matches!(c.op, OpKind::Lora { .. }))
        .collect();
    for &dtype in &dtypes {
        for (shape, n, r, bias) in [
            (vec![1, 1], 1, 1, true),
            (vec![7, 13], 11, 3, false),
            (vec![2, 5, 127], 129, 17, true),
            (vec![1, 4096], 4096, 16, false),
            (vec![513, 257], 385, 64, true),
            (vec![2, 33, 300], 260, 256, false),
        ] {
            // A single-term product (M = K = N = r = 1) in f16/bf16 is rounding-limited where
            // its two terms cancel (tests/lora.rs checks it against the terms' size instead).
            if shape == [1, 1] && matches!(dtype, DType::F16 | DType::BF16) {
                continue;
            }
            cases.push(Case {
                op: OpKind::Lora { n, r, bias },
                shape,
                dtype,
            });
        }
    }
    let dev = gpu();
    let mut failures = 0;
    let mut n = 0;
    for case in &cases {
        for o in check::run(&poisoned(), case, &dev).unwrap_or_else(|e| panic!("{case:?}: {e}")) {
            n += 1;
            if !report(&o) {
                failures += 1;
            }
        }
    }
    assert!(n >= cases.len() * 8, "only {n} comparisons");
    assert_eq!(failures, 0, "{failures} of {n} LoRA GPU comparisons failed");
}

/// Bench-sized shapes vs composed ops in f64 on the GPU.
pub fn large_shapes_vs_composed_f64_on_gpu() {
    let dev = gpu();
    let mut failures = Vec::new();
    for &(m, k, n, r, dtype) in &[
        (128usize, 512usize, 512usize, 8usize, DType::F32),
        (1, 4096, 4096, 16, DType::BF16),
        (4096, 4096, 4096, 16, DType::BF16),
        (2048, 4096, 4096, 64, DType::F16),
        (1024, 4096, 4096, 16, DType::F32),
    ] {
        let sk = 1.0 / (k as f64).sqrt();
        let x = testing::randn(&[m, k], 1.0, dtype, &dev).unwrap();
        let w = testing::randn(&[n, k], sk, dtype, &dev).unwrap();
        let bias = testing::randn(&[n], 0.5, dtype, &dev).unwrap();
        let a = testing::randn(&[r, k], sk, dtype, &dev).unwrap();
        let s = 2.0 / r as f64;
        // The adapter term as large as the base term (see check::OpKind::Lora).
        let b = testing::randn(&[n, r], 1.0 / (s * (r as f64).sqrt()), dtype, &dev).unwrap();
        let probe = testing::randn(&[m, n], 1.0, dtype, &dev).unwrap();
        let run = |fused: bool, t: [&Tensor; 6]| {
            let vars: Vec<Var> = [t[0], t[2], t[3]]
                .iter()
                .map(|v| Var::from_tensor(v).unwrap())
                .collect();
            let (xv, av, bv) = (
                vars[0].as_tensor(),
                vars[1].as_tensor(),
                vars[2].as_tensor(),
            );
            let y = if fused {
                lora_linear(xv, t[1], Some(t[4]), av, bv, s).unwrap()
            } else {
                reference::lora_linear(xv, t[1], Some(t[4]), av, bv, s).unwrap()
            };
            let g = (&y * t[5]).unwrap().sum_all().unwrap().backward().unwrap();
            let mut outs = vec![y];
            outs.extend(vars.iter().map(|v| g.get(v).unwrap().clone()));
            outs
        };
        let got = run(true, [&x, &w, &a, &b, &bias, &probe]);
        let up = |t: &Tensor| t.to_dtype(DType::F64).unwrap();
        let want = run(
            false,
            [&up(&x), &up(&w), &up(&a), &up(&b), &up(&bias), &up(&probe)],
        );
        for (name, (g, w)) in ["fwd", "dx", "da", "db"].iter().zip(got.iter().zip(&want)) {
            let e = rel_err(g, w).unwrap();
            let floor = rel_err(&w.to_dtype(dtype).unwrap(), w).unwrap();
            let tol = tolerance(dtype).max(2.0 * floor);
            let ok = e <= tol;
            println!(
                "lora_linear {name:<4} M={m} K={k} N={n} r={r} {dtype:?}: rel err {e:.3e} tol {tol:.0e} {}",
                if ok { "PASS" } else { "FAIL" }
            );
            if !ok {
                failures.push(format!("{name} {m}x{k}x{n} r{r} {dtype:?}: {e:.3e}"));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Gradient bookkeeping and device errors on the GPU.
pub fn gradient_flags_and_bad_input() {
    let dev = gpu();
    let x = testing::randn(&[8, 24], 1.0, DType::F32, &dev).unwrap();
    let w = testing::randn(&[16, 24], 0.2, DType::F32, &dev).unwrap();
    let a = Var::from_tensor(&testing::randn(&[4, 24], 0.2, DType::F32, &dev).unwrap()).unwrap();
    let b = Var::from_tensor(&testing::randn(&[16, 4], 0.5, DType::F32, &dev).unwrap()).unwrap();
    let wv = Var::from_tensor(&w).unwrap();
    let y = lora_linear(&x, &wv.as_tensor().detach(), None, &a, &b, 0.5).unwrap();
    let g = y.sqr().unwrap().sum_all().unwrap().backward().unwrap();
    assert!(g.get(&wv).is_none() && g.get(&x).is_none());
    assert!(g.get(&a).is_some() && g.get(&b).is_some());
    // A tracked W gets dW = dyᵀ·x.
    let y = lora_linear(&x, &wv, None, &a, &b, 0.5).unwrap();
    let g = y.sum_all().unwrap().backward().unwrap();
    let dw = g.get(&wv).expect("dW for a tracked W");
    let ones = Tensor::ones((8, 16), DType::F32, &dev).unwrap();
    let want = ones.t().unwrap().matmul(&x).unwrap();
    assert!(rel_err(dw, &want).unwrap() < 1e-5);
    // Device mismatch.
    let w_cpu = w.to_device(&Device::Cpu).unwrap();
    let e = lora_linear(&x, &w_cpu, None, &a, &b, 0.5)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("candle-fused lora_linear: w is on device"),
        "{e}"
    );
    let b_cpu = b.as_tensor().to_device(&Device::Cpu).unwrap();
    let e = lora_linear(&x, &w, None, &a, &b_cpu, 0.5)
        .unwrap_err()
        .to_string();
    assert!(e.contains("b is on device"), "{e}");
    println!("lora_linear gradient flags and device errors: PASS");
}

/// `LoraLinear` on the GPU: training, merge, PEFT round trip.
pub fn module_trains_merges_and_round_trips() {
    let dev = gpu();
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &dev);
    let cfg = LoraConfig::new(8, 16.0);
    let l1 = lora_layer(64, 96, &cfg, vb.pp("fc1")).unwrap();
    let l2 = lora_layer(96, 48, &cfg, vb.pp("fc2")).unwrap();
    let frozen: Vec<(String, Tensor)> = {
        let d = vm.data().lock().unwrap();
        d.iter()
            .filter(|(k, _)| !k.contains("lora_"))
            .map(|(k, v)| (k.clone(), v.as_tensor().copy().unwrap()))
            .collect()
    };
    let x = testing::randn(&[128, 64], 1.0, DType::F32, &dev).unwrap();
    let fwd = |x: &Tensor| l2.forward(&l1.forward(x).unwrap().relu().unwrap()).unwrap();
    // A rank-4 change of the output, which the rank-8 adapters can represent (a full-rank
    // teacher left the reachable loss to its spectrum: 0.35-0.65 of the start across seeds).
    let u = testing::randn(&[64, 4], 0.5, DType::F32, &dev).unwrap();
    let v = testing::randn(&[4, 48], 0.5, DType::F32, &dev).unwrap();
    let teacher = u.matmul(&v).unwrap();
    let target = (fwd(&x) + x.matmul(&teacher).unwrap()).unwrap().detach();
    // The same layers, data and steps on the CPU: the loss curves must agree step by step.
    let vm_cpu = VarMap::new();
    let vb_cpu = VarBuilder::from_varmap(&vm_cpu, DType::F32, &Device::Cpu);
    let c1 = lora_layer(64, 96, &cfg, vb_cpu.pp("fc1")).unwrap();
    let c2 = lora_layer(96, 48, &cfg, vb_cpu.pp("fc2")).unwrap();
    {
        let g = vm.data().lock().unwrap();
        let c = vm_cpu.data().lock().unwrap();
        for (k, var) in g.iter() {
            c[k].set(&var.as_tensor().to_device(&Device::Cpu).unwrap())
                .unwrap();
        }
    }
    let to_cpu = |t: &Tensor| t.to_device(&Device::Cpu).unwrap();
    let (x_cpu, target_cpu) = (to_cpu(&x), to_cpu(&target));
    let train = |vm: &VarMap, x: &Tensor, target: &Tensor, f: &dyn Fn(&Tensor) -> Tensor| {
        let loss = |y: &Tensor| (y - target).unwrap().sqr().unwrap().mean_all().unwrap();
        let params = candle_nn::ParamsAdamW {
            lr: 1e-2,
            ..Default::default()
        };
        let mut opt = candle_nn::AdamW::new(vm.all_vars(), params).unwrap();
        let mut curve = Vec::new();
        for _ in 0..60 {
            let l = loss(&f(x));
            curve.push(l.to_scalar::<f32>().unwrap());
            opt.backward_step(&l).unwrap();
        }
        curve.push(loss(&f(x)).to_scalar::<f32>().unwrap());
        curve
    };
    let fwd_cpu = |x: &Tensor| c2.forward(&c1.forward(x).unwrap().relu().unwrap()).unwrap();
    let curve = train(&vm, &x, &target, &fwd);
    let curve_cpu = train(&vm_cpu, &x_cpu, &target_cpu, &fwd_cpu);
    for (i, (g, c)) in curve.iter().zip(&curve_cpu).enumerate().take(30) {
        let e = ((g - c) / c).abs();
        assert!(
            e < 1e-3,
            "step {i}: loss {g} (CUDA) vs {c} (CPU), rel {e:.2e}"
        );
    }
    let (l0, l_end) = (curve[0], curve[60]);
    assert!(
        l_end < 0.5 * l0,
        "loss {l0} -> {l_end} (CPU: {} -> {})",
        curve_cpu[0],
        curve_cpu[60]
    );
    let d = vm.data().lock().unwrap();
    for (k, t0) in &frozen {
        let t1 = d[k].as_tensor();
        assert_eq!(
            testing::max_abs(&(t1 - t0).unwrap()).unwrap(),
            0.0,
            "{k} changed"
        );
    }
    drop(d);
    // Merge.
    let y = fwd(&x);
    let mut m1: LoraLinear = l1.clone();
    m1.merge().unwrap();
    let ym = l2
        .forward(&m1.forward(&x).unwrap().relu().unwrap())
        .unwrap();
    assert!(rel_err(&ym, &y).unwrap() < 1e-5);
    // PEFT round trip.
    let dir = std::env::temp_dir().join(format!("candle-fused-gpu-lora-{}", std::process::id()));
    save_adapters(&dir, &cfg, &[("fc1", &l1), ("fc2", &l2)]).unwrap();
    let loaded = PeftAdapters::load(&dir, &dev).unwrap();
    let mut c1 = l1.clone();
    let mut c2 = l2.clone();
    let z = |t: &Tensor| t.zeros_like().unwrap();
    c1.set_adapter(&z(l1.lora_a()), &z(l1.lora_b()), 1.0)
        .unwrap();
    c2.set_adapter(&z(l2.lora_a()), &z(l2.lora_b()), 1.0)
        .unwrap();
    loaded.apply("fc1", &mut c1).unwrap();
    loaded.apply("fc2", &mut c2).unwrap();
    let yc = c2
        .forward(&c1.forward(&x).unwrap().relu().unwrap())
        .unwrap();
    assert_eq!(rel_err(&yc, &y).unwrap(), 0.0);
    std::fs::remove_dir_all(&dir).ok();
    println!("LoraLinear on CUDA: loss {l0:.4} -> {l_end:.4}, merge and PEFT round trip: PASS");
}

/// The standalone backward (`lora_linear_backward`, what the bench's `bwd` rows time) on the
/// GPU: equal to autograd through the fused op there, and to the CPU backend within the
/// dtype's tolerance; outputs poisoned.
pub fn standalone_backward_matches_autograd_and_cpu() {
    let dev = gpu();
    for dtype in [DType::F32, DType::BF16, DType::F16] {
        for &(m, k, n, r) in &[
            (1usize, 1usize, 1usize, 1usize),
            (65, 96, 80, 16),
            (300, 257, 129, 8),
        ] {
            let cpu = Device::Cpu;
            let x = testing::randn(&[m, k], 1.0, dtype, &cpu).unwrap();
            let w = testing::randn(&[n, k], 1.0 / (k as f64).sqrt(), dtype, &cpu).unwrap();
            let bias = testing::randn(&[n], 0.5, dtype, &cpu).unwrap();
            let a = testing::randn(&[r, k], 1.0 / (k as f64).sqrt(), dtype, &cpu).unwrap();
            let s = 2.0 / r as f64;
            let b = testing::randn(&[n, r], 1.0 / (s * (r as f64).sqrt()), dtype, &cpu).unwrap();
            let dy = testing::randn(&[m, n], 1.0, dtype, &cpu).unwrap();
            let on = |t: &Tensor| t.to_device(&dev).unwrap();
            let g_cpu = poisoned()
                .lora_linear_backward(&x, &w, Some(&bias), &a, &b, s, &dy)
                .unwrap();
            let (xg, wg, biasg, ag, bg, dyg) = (on(&x), on(&w), on(&bias), on(&a), on(&b), on(&dy));
            let g = poisoned()
                .lora_linear_backward(&xg, &wg, Some(&biasg), &ag, &bg, s, &dyg)
                .unwrap();
            let vars: Vec<Var> = [&xg, &biasg, &ag, &bg]
                .iter()
                .map(|t| Var::from_tensor(t).unwrap())
                .collect();
            let [xv, biasv, av, bv] = [0, 1, 2, 3].map(|i| vars[i].as_tensor().clone());
            let y = poisoned()
                .lora_linear(&xv, &wg, Some(&biasv), &av, &bv, s)
                .unwrap();
            let auto = (&y * &dyg).unwrap().sum_all().unwrap().backward().unwrap();
            let rows = [
                ("dx", &g.dx, &g_cpu.dx, auto.get(&vars[0]).unwrap()),
                (
                    "dbias",
                    g.dbias.as_ref().unwrap(),
                    g_cpu.dbias.as_ref().unwrap(),
                    auto.get(&vars[1]).unwrap(),
                ),
                ("dA", &g.da, &g_cpu.da, auto.get(&vars[2]).unwrap()),
                ("dB", &g.db, &g_cpu.db, auto.get(&vars[3]).unwrap()),
            ];
            // The independent reference: autograd through the composed ops in f64 (on shapes
            // with enough outputs that the norm-wise error is not one cancelling element; the
            // 1×1×1×1 case is checked against the CPU backend, itself checked against f64 by
            // tests/lora.rs).
            let want = if m * n > 1 {
                let f = |t: &Tensor| Var::from_tensor(&t.to_dtype(DType::F64).unwrap()).unwrap();
                let v64 = [f(&x), f(&bias), f(&a), f(&b)];
                let y = reference::lora_linear(
                    v64[0].as_tensor(),
                    &w.to_dtype(DType::F64).unwrap(),
                    Some(v64[1].as_tensor()),
                    v64[2].as_tensor(),
                    v64[3].as_tensor(),
                    s,
                )
                .unwrap();
                let dy64 = dy.to_dtype(DType::F64).unwrap();
                let g64 = (&y * &dy64).unwrap().sum_all().unwrap().backward().unwrap();
                Some(v64.map(|v| g64.get(&v).unwrap().clone()))
            } else {
                None
            };
            for (i, (what, got, cpu_ref, via_autograd)) in rows.into_iter().enumerate() {
                if let Some(want) = &want {
                    let rf = &want[i];
                    let floor = rel_err(&rf.to_dtype(dtype).unwrap(), rf).unwrap();
                    let tol = tolerance(dtype).max(2.0 * floor);
                    let e = rel_err(&got.to_device(&cpu).unwrap(), rf).unwrap();
                    let ok = report(&check::Outcome {
                        op: "lora_linear_backward".into(),
                        what: format!("{what} vs f64"),
                        shape: vec![m, k, n, r],
                        dtype,
                        rel_err: e,
                        tol,
                    });
                    assert!(ok, "{what} {dtype:?} {m}x{k}x{n}: vs f64 reference {e:.3e}");
                }
                let same = rel_err(got, &via_autograd.to_dtype(DType::F64).unwrap()).unwrap();
                let vs_cpu = rel_err(
                    &got.to_device(&cpu).unwrap(),
                    &cpu_ref.to_dtype(DType::F64).unwrap(),
                )
                .unwrap();
                let tol = tolerance(dtype);
                let ok = same <= 1e-6 && vs_cpu <= tol;
                report(&check::Outcome {
                    op: "lora_linear_backward".into(),
                    what: format!("{what} vs cpu"),
                    shape: vec![m, k, n, r],
                    dtype,
                    rel_err: vs_cpu,
                    tol,
                });
                assert!(
                    ok,
                    "{what} {dtype:?} {m}x{k}x{n}x{r}: vs autograd {same:.3e}, vs cpu {vs_cpu:.3e}"
                );
            }
        }
    }
}
