//! Device mismatch (one input on the GPU, another on the CPU) is a clear error naming the op
//! and the argument, for the arguments the other tests leave out: the backwards of RoPE,
//! SwiGLU, cross-entropy and LoRA linear, the forward of linear + cross-entropy with CPU
//! targets, its forward-backward with a CPU `w`, and the learned mask of the masked softmax.
//! (The rest: `device_mismatch_is_a_clear_error_for_every_op` in `main.rs`, and the RoPE, GLU,
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
