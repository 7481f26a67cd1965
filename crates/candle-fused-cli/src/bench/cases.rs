//! The shapes the bench runs, per device and mode.
//!
//! CUDA (full) has the list: [1,128,1024] f32 (the seeds' shape), [4096,4096] f32 and
//! bf16, [32768,4096] bf16, [8192,32768] bf16, [16384,8192] f32, [1024,262144] f32, and the
//! attention softmax [32,32,2048,2048] bf16 (scale 1/8; causal, and with an [S,T] mask).
//! The CPU (full) scales the big ones down so the run takes a few minutes on a small machine.
//! `--quick` is a few small shapes (under a minute on a CPU).
//!
//! LoRA ([`lora_shapes`]) has the (M, K, N, r) list on CUDA; the CPU runs the two
//! small ones plus a 1024³ case. The losses ([`ce_shapes`], [`lce_shapes`]): the issue's
//! 8192 tokens with Llama 3's (4096 × 128256) and Qwen2.5-0.5B's (896 × 151936) heads on CUDA,
//! scaled down on the CPU. RoPE and GLU: [`rope_shapes`], [`glu_shapes`].

use candle_core::DType::{self, BF16, F32};

use super::memops::{MemCase, SCALE};
use candle_fused::ops::{GluKind, RopeLayout, RopeStyle};
use candle_fused::Kernels;
use candle_fused_testkit::check::{MaskKind, OpKind};

/// What a run covers: which shapes (device kind and mode) and the kernels ours run on.
#[derive(Debug, Clone, Copy)]
pub struct Scope {
    pub cuda: bool,
    pub quick: bool,
    /// The kernel configuration of our ops (one of `KernelConfig::candidates()`).
    pub kernels: Kernels,
}

/// Shapes of the row-wise ops (softmax, rms_norm, add_rms_norm).
pub fn row_shapes(scope: Scope) -> Vec<(Vec<usize>, DType)> {
    match (scope.cuda, scope.quick) {
        (true, false) => vec![
            (vec![1, 128, 1024], F32),
            (vec![4096, 4096], F32),
            (vec![4096, 4096], BF16),
            (vec![32768, 4096], BF16),
            (vec![8192, 32768], BF16),
            (vec![16384, 8192], F32),
            (vec![1024, 262144], F32),
        ],
        (true, true) => vec![(vec![1, 128, 1024], F32), (vec![4096, 4096], BF16)],
        (false, false) => vec![
            (vec![1, 128, 1024], F32),
            (vec![1024, 1024], BF16),
            (vec![4096, 4096], F32),
            (vec![4096, 4096], BF16),
            (vec![16, 262144], F32),
        ],
        (false, true) => vec![(vec![1, 128, 1024], F32), (vec![64, 4096], BF16)],
    }
}

/// Shapes of the attention softmax: (scores shape, dtype, mask, causal).
pub fn attn_shapes(scope: Scope) -> Vec<(Vec<usize>, DType, MaskKind, bool)> {
    match (scope.cuda, scope.quick) {
        (true, false) => vec![
            (vec![32, 32, 2048, 2048], BF16, MaskKind::None, true),
            (vec![32, 32, 2048, 2048], BF16, MaskKind::Rows, false),
        ],
        (true, true) => vec![(vec![4, 8, 512, 512], BF16, MaskKind::None, true)],
        (false, false) => vec![
            (vec![2, 8, 512, 512], BF16, MaskKind::None, true),
            (vec![2, 8, 512, 512], F32, MaskKind::None, true),
            (vec![2, 8, 512, 512], F32, MaskKind::Rows, false),
        ],
        (false, true) => vec![(vec![1, 4, 128, 128], F32, MaskKind::None, true)],
    }
}

/// Shapes `(M, K, N, r)` and dtypes of the LoRA family (`lora_linear`): the list on
/// CUDA (the seeds' shape in f32, the large ones in bf16); on the CPU the first two plus
/// 1024³ r16 in f32 and bf16. `--quick`: the seeds' shape (CUDA: also 4096³ r16 bf16, the
/// first shape where the forward target applies).
pub fn lora_shapes(scope: Scope) -> Vec<([usize; 4], DType)> {
    match (scope.cuda, scope.quick) {
        (true, false) => vec![
            ([128, 512, 512, 8], F32),
            ([1, 4096, 4096, 16], BF16),
            ([4096, 4096, 4096, 16], BF16),
            ([16384, 4096, 4096, 16], BF16),
            ([16384, 4096, 14336, 64], BF16),
        ],
        (true, true) => vec![([128, 512, 512, 8], F32), ([4096, 4096, 4096, 16], BF16)],
        (false, false) => vec![
            ([128, 512, 512, 8], F32),
            ([1, 4096, 4096, 16], BF16),
            ([1024, 1024, 1024, 16], F32),
            ([1024, 1024, 1024, 16], BF16),
        ],
        (false, true) => vec![([128, 512, 512, 8], F32)],
    }
}

/// The cases of one memory-bound family (`softmax`, `masked_softmax`, `rms_norm`,
/// `add_rms_norm`).
pub fn mem_cases(family: &str, scope: Scope) -> Vec<MemCase> {
    let rows = |op: OpKind| {
        row_shapes(scope)
            .into_iter()
            .map(move |(shape, dtype)| MemCase {
                op,
                shape,
                dtype,
                kernels: scope.kernels,
            })
            .collect()
    };
    match family {
        "softmax" => rows(OpKind::Softmax),
        "rms_norm" => rows(OpKind::RmsNorm { weight: true }),
        "add_rms_norm" => rows(OpKind::AddRmsNorm),
        "masked_softmax" => attn_shapes(scope)
            .into_iter()
            .map(|(shape, dtype, mask, causal)| MemCase {
                op: OpKind::MaskedSoftmax {
                    scale: SCALE,
                    mask,
                    causal,
                },
                shape,
                dtype,
                kernels: scope.kernels,
            })
            .collect(),
        _ => vec![],
    }
}

/// RoPE shapes `(x shape in the layout's order, layout, style, dtype)`: Llama's q
/// `[1, 32, 4096, 128]` and Qwen2.5-0.5B's `[4, 14, 2048, 64]` (CPU as well: they fit),
/// plus the `[B, T, H, D]` layout and the interleaved style; `--quick`: smaller.
pub fn rope_shapes(scope: Scope) -> Vec<([usize; 4], RopeLayout, RopeStyle, DType)> {
    use RopeLayout::{Bhtd, Bthd};
    use RopeStyle::{HalfSplit, Interleaved};
    match (scope.cuda, scope.quick) {
        (true, false) => vec![
            ([1, 32, 4096, 128], Bhtd, HalfSplit, BF16),
            ([1, 32, 4096, 128], Bhtd, HalfSplit, F32),
            ([4, 14, 2048, 64], Bhtd, HalfSplit, BF16),
            ([1, 4096, 32, 128], Bthd, HalfSplit, BF16),
            ([1, 32, 4096, 128], Bhtd, Interleaved, BF16),
        ],
        (true, true) => vec![
            ([1, 32, 4096, 128], Bhtd, HalfSplit, BF16),
            ([4, 14, 2048, 64], Bhtd, HalfSplit, BF16),
        ],
        (false, false) => vec![
            ([1, 32, 4096, 128], Bhtd, HalfSplit, F32),
            ([1, 32, 4096, 128], Bhtd, HalfSplit, BF16),
            ([4, 14, 2048, 64], Bhtd, HalfSplit, BF16),
            ([1, 4096, 32, 128], Bthd, HalfSplit, BF16),
            ([1, 32, 4096, 128], Bhtd, Interleaved, F32),
        ],
        (false, true) => vec![
            ([1, 8, 512, 128], Bhtd, HalfSplit, F32),
            ([2, 14, 256, 64], Bhtd, HalfSplit, BF16),
        ],
    }
}

/// GLU shapes `(output shape, kind, packed, dtype)`: Llama-3-8B's MLP `[8192, 14336]` on
/// CUDA; on the CPU Qwen2.5-0.5B's intermediate size for 1024 tokens `[1024, 4864]`;
/// `--quick`: 64 tokens.
pub fn glu_shapes(scope: Scope) -> Vec<(Vec<usize>, GluKind, bool, DType)> {
    use GluKind::{GeGluTanh, SwiGlu};
    match (scope.cuda, scope.quick) {
        (true, false) => vec![
            (vec![8192, 14336], SwiGlu, false, BF16),
            (vec![8192, 14336], SwiGlu, true, BF16),
            (vec![8192, 14336], SwiGlu, false, F32),
            (vec![8192, 14336], GeGluTanh, false, BF16),
        ],
        (true, true) => vec![
            (vec![8192, 14336], SwiGlu, false, BF16),
            (vec![8192, 14336], SwiGlu, true, BF16),
        ],
        (false, false) => vec![
            (vec![1024, 4864], SwiGlu, false, F32),
            (vec![1024, 4864], SwiGlu, false, BF16),
            (vec![1024, 4864], SwiGlu, true, BF16),
            (vec![1024, 4864], GeGluTanh, false, F32),
        ],
        (false, true) => vec![
            (vec![64, 4864], SwiGlu, false, F32),
            (vec![64, 4864], SwiGlu, true, BF16),
        ],
    }
}

/// Shapes `[N, V]` and dtypes of `cross_entropy` (logits of the linear cross-entropy shapes).
pub fn ce_shapes(scope: Scope) -> Vec<([usize; 2], DType)> {
    match (scope.cuda, scope.quick) {
        (true, false) => vec![
            ([8192, 128256], BF16),
            ([8192, 151936], BF16),
            ([4096, 32000], F32),
        ],
        (true, true) => vec![([4096, 32000], BF16)],
        (false, false) => vec![
            ([1024, 32000], F32),
            ([512, 32000], BF16),
            ([64, 128256], BF16),
        ],
        (false, true) => vec![([64, 32000], F32)],
    }
}

/// Shapes `[N, H, V]` and dtypes of `linear_cross_entropy`: tokens × hidden × vocabulary.
pub fn lce_shapes(scope: Scope) -> Vec<([usize; 3], DType)> {
    match (scope.cuda, scope.quick) {
        (true, false) => vec![([8192, 4096, 128256], BF16), ([8192, 896, 151936], BF16)],
        (true, true) => vec![([2048, 896, 151936], BF16)],
        (false, false) => vec![
            ([1024, 256, 16384], F32),
            ([2048, 128, 32000], F32),
            ([256, 256, 32000], BF16),
        ],
        (false, true) => vec![([256, 64, 4096], F32)],
    }
}
