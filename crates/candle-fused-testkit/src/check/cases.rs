//! The case lists of the sweep: the row ops on a list of shapes, and `candle-fused check`'s
//! full sweep.

use candle_core::DType;

use super::{Case, MaskKind, OpKind};
use crate::check_rope_glu;

/// The row ops (softmax, RMSNorm with and without weight, add+RMSNorm) on every shape in
/// every dtype.
pub fn row_cases(shapes: &[Vec<usize>], dtypes: &[DType]) -> Vec<Case> {
    let ops = [
        OpKind::Softmax,
        OpKind::RmsNorm { weight: true },
        OpKind::RmsNorm { weight: false },
        OpKind::AddRmsNorm,
    ];
    let mut cases = Vec::new();
    for &dtype in dtypes {
        for shape in shapes {
            for op in ops {
                cases.push(Case {
                    op,
                    shape: shape.clone(),
                    dtype,
                });
            }
        }
    }
    cases
}

/// The sweep of `candle-fused check`: every op, each dtype, several shapes (including last
/// dims 1, odd, prime, 4097 and 65536, a masked-softmax family, LoRA linear shapes up to
/// rank 256, and the RoPE / GLU cases of [`check_rope_glu::sweep`]).
pub fn sweep(dtypes: &[DType]) -> Vec<Case> {
    let row_shapes: Vec<Vec<usize>> = vec![
        vec![1],
        vec![3, 1],
        vec![4, 7],
        vec![2, 3, 1000],
        vec![5, 4097],
        vec![2, 65536],
    ];
    let attn_shapes: Vec<Vec<usize>> = vec![vec![2, 3, 5, 7], vec![1, 4, 16, 64], vec![2, 9, 130]];
    let mut cases = Vec::new();
    for &dtype in dtypes {
        cases.extend(row_cases(&row_shapes, &[dtype]));
        for shape in &attn_shapes {
            for (mask, causal) in [
                (MaskKind::None, true),
                (MaskKind::Cols, false),
                (MaskKind::Rows, true),
                (MaskKind::Full, false),
                (MaskKind::Learned, true),
                (MaskKind::Learned, false),
            ] {
                let op = OpKind::MaskedSoftmax {
                    scale: 0.125,
                    mask,
                    causal,
                };
                cases.push(Case {
                    op,
                    shape: shape.clone(),
                    dtype,
                });
            }
        }
        // LoRA linear: x shape, N, r, bias (the seeds' 128x512x512 r8 among them).
        for (shape, n, r, bias) in [
            (vec![4, 7], 5, 1, false),
            (vec![2, 3, 33], 17, 8, true),
            (vec![64, 96], 80, 16, true),
            (vec![128, 512], 512, 8, false),
            (vec![3, 300], 280, 256, true),
        ] {
            cases.push(Case {
                op: OpKind::Lora { n, r, bias },
                shape,
                dtype,
            });
        }
        cases.extend(check_rope_glu::sweep(dtype));
    }
    cases
}
