//! Device mismatch (one input on the GPU, another on the CPU) is a clear error naming the op
//! and the argument, for the arguments the other tests leave out: the backwards of RoPE,
//! SwiGLU, cross-entropy and LoRA linear, the forward of linear + cross-entropy with CPU
//! targets, its forward-backward with a CPU `w`, and the learned mask of the masked softmax.
//! ([`every_op`]: every op's main arguments; the rest in the RoPE, GLU,
//! cross-entropy and linear + cross-entropy modules. `softmax_last_dim` and `glu_packed` take
//! one tensor: nothing can differ.)

use candle_core::{DType, Device, Tensor, Var};
use candle_fused::ops::{
    CrossEntropyConfig, GluKind, RopeConfig, RopeLayout, RopeStyle, RopeTable,
};
use candle_fused_testkit::check_loss;
use candle_fused_testkit::testing::{self, poisoned};

use super::gpu;

pub fn remaining_arguments() {
    let (dev, cpu) = (gpu(), Device::Cpu);
    let k = poisoned();
    let dt = DType::F32;
    let on = |shape: &[usize], d: &Device| testing::randn(shape, 1.0, dt, d).unwrap();
    let to_cpu = |t: &Tensor| t.to_device(&cpu).unwrap();
    let ce = CrossEntropyConfig::default();
    // RoPE backward: the table and the positions.
    let tab = |d: &Device| RopeTable::new(&RopeConfig::new(8, 10_000.0, 16), d).unwrap();
    let (l, s) = (RopeLayout::Bhtd, RopeStyle::HalfSplit);
    let dy_r = on(&[1, 2, 3, 8], &dev);
    let pos = Tensor::new(&[0u32, 1, 2], &dev).unwrap();
    // SwiGLU, cross-entropy, linear + cross-entropy, LoRA linear.
    let (g, u) = (on(&[2, 6], &dev), on(&[2, 6], &dev));
    let logits = on(&[4, 10], &dev);
    let t = check_loss::random_targets(&[4], 10, 0.0, -100, &dev).unwrap();
    let (h, w) = (on(&[4, 8], &dev), on(&[10, 8], &dev));
    let (x, wl, a, b, bias, dy) = (
        on(&[2, 8], &dev),
        on(&[6, 8], &dev),
        on(&[2, 8], &dev),
        on(&[6, 2], &dev),
        on(&[6], &dev),
        on(&[2, 6], &dev),
    );
    let scores = on(&[2, 3, 4], &dev);
    let learned = Var::from_tensor(&on(&[3, 4], &cpu)).unwrap();
    let cases: Vec<(&str, &str, candle_core::Result<()>)> = vec![
        (
            "rope_backward",
            "the table",
            k.rope_backward(&dy_r, &tab(&cpu), &pos, l, s).map(|_| ()),
        ),
        (
            "rope_backward",
            "positions",
            k.rope_backward(&dy_r, &tab(&dev), &to_cpu(&pos), l, s)
                .map(|_| ()),
        ),
        (
            "glu_backward",
            "up",
            k.glu_backward(GluKind::SwiGlu, &g, &to_cpu(&u), &g)
                .map(|_| ()),
        ),
        (
            "cross_entropy_backward",
            "targets",
            k.cross_entropy_backward(&logits, &to_cpu(&t), &ce, 1.0)
                .map(|_| ()),
        ),
        (
            "cross_entropy",
            "targets",
            k.cross_entropy(&logits, &to_cpu(&t), &ce).map(|_| ()),
        ),
        (
            "linear_cross_entropy",
            "targets",
            k.linear_cross_entropy(&h, &w, &to_cpu(&t), &ce, None)
                .map(|_| ()),
        ),
        (
            "linear_cross_entropy_forward_backward",
            "w",
            k.linear_cross_entropy_forward_backward(&h, &to_cpu(&w), &t, &ce, None, true, 1.0)
                .map(|_| ()),
        ),
        (
            "lora_linear_backward",
            "w",
            k.lora_linear_backward(&x, &to_cpu(&wl), Some(&bias), &a, &b, 0.5, &dy)
                .map(|_| ()),
        ),
        (
            "lora_linear_backward",
            "a",
            k.lora_linear_backward(&x, &wl, Some(&bias), &to_cpu(&a), &b, 0.5, &dy)
                .map(|_| ()),
        ),
        (
            "lora_linear_backward",
            "b",
            k.lora_linear_backward(&x, &wl, Some(&bias), &a, &to_cpu(&b), 0.5, &dy)
                .map(|_| ()),
        ),
        (
            "lora_linear_backward",
            "bias",
            k.lora_linear_backward(&x, &wl, Some(&to_cpu(&bias)), &a, &b, 0.5, &dy)
                .map(|_| ()),
        ),
        (
            "masked_softmax",
            "mask",
            k.masked_softmax(&scores, 0.5, Some(learned.as_tensor()), true)
                .map(|_| ()),
        ),
    ];
    let mut fails = vec![];
    for (op, arg, r) in cases {
        match r {
            Ok(()) => fails.push(format!("{op} {arg}: no error")),
            Err(e) => {
                let e = e.to_string();
                let ok = e.contains(&format!("candle-fused {op}:"))
                    && e.contains(&format!("{arg} is on device"));
                println!(
                    "{op} {arg} on the CPU: {} ({e})",
                    if ok { "PASS" } else { "FAIL" }
                );
                if !ok {
                    fails.push(format!("{op} {arg}: {e}"));
                }
            }
        }
    }
    assert!(fails.is_empty(), "device mismatch:\n{}", fails.join("\n"));
}

/// A tensor on the CPU among GPU arguments, for every op's main arguments.
pub fn every_op() {
    let dev = gpu();
    let cpu = Device::Cpu;
    let k = poisoned();
    let dt = DType::F32;
    let on = |shape: &[usize], d: &Device| testing::randn(shape, 1.0, dt, d).unwrap();
    let x = on(&[2, 8], &dev);
    let (x_c, w_c, m_c) = (on(&[2, 8], &cpu), on(&[8], &cpu), on(&[2, 8], &cpu));
    let w = on(&[8], &dev);
    let (wl, a, b, bias) = (
        on(&[6, 8], &dev),
        on(&[2, 8], &dev),
        on(&[6, 2], &dev),
        on(&[6], &dev),
    );
    let (wl_c, a_c, b_c, bias_c) = (
        on(&[6, 8], &cpu),
        on(&[2, 8], &cpu),
        on(&[6, 2], &cpu),
        on(&[6], &cpu),
    );
    let dy = on(&[2, 6], &dev);
    let dy_c = on(&[2, 6], &cpu);
    let cases: Vec<(&str, &str, candle_core::Result<()>)> = vec![
        (
            "masked_softmax",
            "mask",
            k.masked_softmax(&x, 0.5, Some(&m_c), false).map(|_| ()),
        ),
        (
            "softmax_backward",
            "dy",
            k.softmax_backward(&x, &x_c, 1.0).map(|_| ()),
        ),
        (
            "rms_norm",
            "weight",
            k.rms_norm(&x, Some(&w_c), 1e-5).map(|_| ()),
        ),
        (
            "rms_norm_backward",
            "weight",
            k.rms_norm_backward(&x, Some(&w_c), &x, 1e-5).map(|_| ()),
        ),
        (
            "rms_norm_backward",
            "dy",
            k.rms_norm_backward(&x, Some(&w), &x_c, 1e-5).map(|_| ()),
        ),
        (
            "add_rms_norm",
            "residual",
            k.add_rms_norm(&x, &x_c, &w, 1e-5).map(|_| ()),
        ),
        (
            "add_rms_norm",
            "weight",
            k.add_rms_norm(&x, &x, &w_c, 1e-5).map(|_| ()),
        ),
        (
            "add_rms_norm_backward",
            "weight",
            k.add_rms_norm_backward(&x, &w_c, &x, &x, 1e-5).map(|_| ()),
        ),
        (
            "add_rms_norm_backward",
            "d_normed",
            k.add_rms_norm_backward(&x, &w, &x_c, &x, 1e-5).map(|_| ()),
        ),
        (
            "add_rms_norm_backward",
            "d_sum",
            k.add_rms_norm_backward(&x, &w, &x, &x_c, 1e-5).map(|_| ()),
        ),
        (
            "lora_linear",
            "w",
            k.lora_linear(&x, &wl_c, None, &a, &b, 0.5).map(|_| ()),
        ),
        (
            "lora_linear",
            "a",
            k.lora_linear(&x, &wl, None, &a_c, &b, 0.5).map(|_| ()),
        ),
        (
            "lora_linear",
            "b",
            k.lora_linear(&x, &wl, None, &a, &b_c, 0.5).map(|_| ()),
        ),
        (
            "lora_linear",
            "bias",
            k.lora_linear(&x, &wl, Some(&bias_c), &a, &b, 0.5)
                .map(|_| ()),
        ),
        (
            "lora_linear_backward",
            "dy",
            k.lora_linear_backward(&x, &wl, Some(&bias), &a, &b, 0.5, &dy_c)
                .map(|_| ()),
        ),
        ("linear", "w", k.linear(&x, &wl_c, None).map(|_| ())),
        (
            "linear",
            "bias",
            k.linear(&x, &wl, Some(&bias_c)).map(|_| ()),
        ),
    ];
    let _ = (&dy, &x_c);
    for (op, arg, r) in cases {
        let e = r.expect_err(op).to_string();
        assert!(
            e.contains(&format!("candle-fused {op}:"))
                && e.contains(&format!("{arg} is on device"))
                && e.contains("expected"),
            "{op} {arg}: {e}"
        );
    }
}
