//! The losses in the bench: `--op cross_entropy` and `--op linear_cross_entropy`.
//!
//! **cross_entropy**, shape `[N, V]` (logits), targets uniform in `0..V` with a tenth ignored,
//! default options (mean, no smoothing):
//!
//! | pass    | ours                                   | ours_autograd          | candle_composed |
//! |---------|----------------------------------------|------------------------|-----------------|
//! | fwd     | `Kernels::cross_entropy` (plain tensors; every `ours` on the bench's `--kernel-config`) |                        | `reference::cross_entropy` (log_softmax + gather) in the input dtype |
//! | bwd     | `ops::cross_entropy_backward` (one pass) | `loss.backward()` through ours (graph built untimed) | `loss.backward()` (graph built untimed) |
//! | fwd+bwd | forward on a `Var`, `loss.backward()`  |                        | the same through the composed ops |
//!
//! Bytes (`e` bytes per element): fwd `N·V·e` (the logits read once), bwd `2·N·V·e` (read,
//! write dlogits), fwd+bwd `3·N·V·e`. GB/s and % copy are against those.
//!
//! **linear_cross_entropy**, shape `[N, H, V]`: `h [N, H] ~ N(0, 1)`, `w [V, H] ~ N(0, 1/H)`,
//! targets as above. Passes: `fwd` (the loss), `fwd+bwd` (frozen head: dh only, the LoRA case)
//! and `fwd+bwd+dw` (the head trained too).
//!
//! | impl            | fwd                  | fwd+bwd, fwd+bwd+dw                                      |
//! |-----------------|----------------------|----------------------------------------------------------|
//! | `ours`          | `ops::linear_cross_entropy`, nothing tracked (loss only) | `linear_cross_entropy_forward_backward` (need_dw for +dw) |
//! | `ours_autograd` |                      | `linear_cross_entropy` on `Var`s (h; and w for +dw), `loss.backward()` |
//! | `candle_composed` | `reference::linear_cross_entropy` (full logits `h·wᵀ`, log_softmax, gather) | the same on `Var`s, `loss.backward()` (Candle's matmul backward computes dW even for a frozen head) |
//! | `base_gemm`     | `h·wᵀ` alone         | the GEMMs alone: `L = h·wᵀ`, `L·w` (+ `Lᵀ·h` for +dw)    |
//!
//! `base_gemm` is the limit ours is compared with (`ours/limit` in the summary: the GPU target
//! is fwd+bwd <= 1.15x its GEMMs). Flops: `2·N·H·V` per GEMM (fwd 1, fwd+bwd 2, +dw 3), for
//! every impl. Bytes: fwd `e(NH + VH)`, fwd+bwd `e(2NH + VH)`, +dw `e(2NH + 2VH)`. Each
//! fwd+bwd impl also gets its **peak memory** above its inputs (one untimed run; CPU: the
//! binary's counting allocator, CUDA: the memory pool's high-water mark), printed after the
//! summary and stored as `peak_mib`.
//!
//! Before timing, ours' loss is checked against the composed one on the first input set; an
//! impl that disagrees is reported as skipped, not timed.

use candle_core::{DType, Device, Result, Tensor, Var};
use candle_fused::ops::CrossEntropyConfig;
use candle_fused::Kernels;
use candle_fused_testkit::{check_loss, reference};

use super::cases::{self, Scope};
use super::memops::sets_for;
use super::memory;
use super::report::{self, Collector, Key};
use super::timing::Timer;
use super::Family;

pub const CE: &str = "cross_entropy";
pub const LCE: &str = "linear_cross_entropy";

fn randn(shape: &[usize], std: f64, dtype: DType, dev: &Device) -> Result<Tensor> {
    Tensor::randn(0f32, std as f32, shape, dev)?.to_dtype(dtype)
}

fn cfg() -> CrossEntropyConfig {
    CrossEntropyConfig::default()
}

/// `got` within `tol` (relative) of `want`, both scalars. `want` is the composed loss on f32
/// copies of the inputs: in bf16 Candle's composed loss is itself far off (its CPU sum
/// accumulates in bf16: 2.5 instead of 12.4 for 2048 × 32000 random logits).
fn agree(what: &str, got: &Tensor, want: &Tensor, dtype: DType) -> Result<()> {
    let g = got.to_dtype(DType::F64)?.to_scalar::<f64>()?;
    let w = want.to_dtype(DType::F64)?.to_scalar::<f64>()?;
    let tol = if matches!(dtype, DType::F32 | DType::F64) {
        1e-4
    } else {
        2e-2
    };
    let rel = (g - w).abs() / w.abs().max(1e-30);
    if rel.is_finite() && rel <= tol {
        Ok(())
    } else {
        candle_core::bail!("candle-fused bench: {what} loss {g} differs from the composed {w} ({rel:.2e} > {tol:.0e}); not timed")
    }
}

// ---------------------------------------------------------------------------------------------
// cross_entropy

struct CeSet {
    x: Tensor,
    t: Tensor,
}

fn ce_run(
    kern: &Kernels,
    (n, v, dtype): (usize, usize, DType),
    timer: &Timer,
    out: &mut Collector,
) {
    let dev = timer.device();
    let e = dtype.size_in_bytes() as f64;
    let nv = (n * v) as f64 * e;
    let key = |pass: &'static str, imp: &'static str| Key {
        op: CE.to_string(),
        pass,
        shape: vec![n, v],
        dtype: dtype.as_str().to_string(),
        imp,
    };
    let rows: [(&str, &str, f64, Option<&'static str>); 7] = [
        ("fwd", "ours", nv, None),
        ("fwd", "candle_composed", nv, Some("ours")),
        ("bwd", "ours", 2.0 * nv, None),
        ("bwd", "ours_autograd", 2.0 * nv, None),
        ("bwd", "candle_composed", 2.0 * nv, Some("ours_autograd")),
        ("fwd+bwd", "ours", 3.0 * nv, None),
        ("fwd+bwd", "candle_composed", 3.0 * nv, Some("ours")),
    ];
    let k = sets_for(n * v * dtype.size_in_bytes());
    let sets: Result<Vec<CeSet>> = (0..k)
        .map(|_| {
            Ok(CeSet {
                x: randn(&[n, v], 2.0, dtype, dev)?,
                t: check_loss::random_targets(&[n], v, 0.1, -100, dev)?,
            })
        })
        .collect();
    let sets = match sets {
        Ok(s) => s,
        Err(e) => return out.skip_all(rows.iter().map(|r| key(r.0, r.1)).collect(), &e),
    };
    let c = cfg();
    let check = (|| {
        let s = &sets[0];
        let want = reference::cross_entropy(&s.x.to_dtype(DType::F32)?, &s.t, &c)?;
        agree(CE, &kern.cross_entropy(&s.x, &s.t, &c)?, &want, dtype)
    })();
    let graph = |fused: bool, s: &CeSet| -> Result<(Tensor, Var)> {
        let v = Var::from_tensor(&s.x)?;
        let loss = if fused {
            kern.cross_entropy(v.as_tensor(), &s.t, &c)?
        } else {
            reference::cross_entropy(v.as_tensor(), &s.t, &c)?
        };
        Ok((loss, v))
    };
    for (pass, imp, bytes, baseline) in rows {
        let fused = imp != "candle_composed";
        let res = match (&check, pass, imp) {
            (Err(e), _, _) if fused => Err(candle_core::Error::Msg(e.to_string())),
            (_, "fwd", "ours") => {
                timer.time(|i| kern.cross_entropy(&sets[i % k].x, &sets[i % k].t, &c))
            }
            (_, "fwd", _) => {
                timer.time(|i| reference::cross_entropy(&sets[i % k].x, &sets[i % k].t, &c))
            }
            (_, "bwd", "ours") => {
                timer.time(|i| kern.cross_entropy_backward(&sets[i % k].x, &sets[i % k].t, &c, 1.0))
            }
            (_, "bwd", _) => timer.time_with_setup(
                |i| graph(fused, &sets[i % k]),
                |(loss, v)| Ok((loss.backward()?, loss, v)),
            ),
            _ => timer.time(|i| {
                let (loss, v) = graph(fused, &sets[i % k])?;
                Ok((loss.backward()?, v))
            }),
        };
        out.record(key(pass, imp), bytes, None, k, baseline, res);
    }
}

// ---------------------------------------------------------------------------------------------
// linear_cross_entropy

struct LceSet {
    h: Tensor,
    w: Tensor,
    t: Tensor,
}

/// One measurement of the linear family: pass, impl, and whether dw is wanted.
#[derive(Clone, Copy)]
struct LceRow {
    pass: &'static str,
    imp: &'static str,
    dw: bool,
}

const LCE_ROWS: [LceRow; 11] = [
    LceRow {
        pass: "fwd",
        imp: "ours",
        dw: false,
    },
    LceRow {
        pass: "fwd",
        imp: "candle_composed",
        dw: false,
    },
    LceRow {
        pass: "fwd",
        imp: "base_gemm",
        dw: false,
    },
    LceRow {
        pass: "fwd+bwd",
        imp: "ours",
        dw: false,
    },
    LceRow {
        pass: "fwd+bwd",
        imp: "ours_autograd",
        dw: false,
    },
    LceRow {
        pass: "fwd+bwd",
        imp: "candle_composed",
        dw: false,
    },
    LceRow {
        pass: "fwd+bwd",
        imp: "base_gemm",
        dw: false,
    },
    LceRow {
        pass: "fwd+bwd+dw",
        imp: "ours",
        dw: true,
    },
    LceRow {
        pass: "fwd+bwd+dw",
        imp: "ours_autograd",
        dw: true,
    },
    LceRow {
        pass: "fwd+bwd+dw",
        imp: "candle_composed",
        dw: true,
    },
    LceRow {
        pass: "fwd+bwd+dw",
        imp: "base_gemm",
        dw: true,
    },
];

/// GPU only: ours at forced chunk sizes (`ours_c{rows}`), to choose the default chunk from
/// data (a chunk's `dh` GEMM has only `C × H` outputs over a `K = V` reduction: small chunks
/// leave most SMs idle unless cuBLAS splits K).
const LCE_CHUNK_ROWS: [LceRow; 6] = [
    LceRow {
        pass: "fwd",
        imp: "ours_c2048",
        dw: false,
    },
    LceRow {
        pass: "fwd+bwd",
        imp: "ours_c1024",
        dw: false,
    },
    LceRow {
        pass: "fwd+bwd",
        imp: "ours_c2048",
        dw: false,
    },
    LceRow {
        pass: "fwd+bwd",
        imp: "ours_c4096",
        dw: false,
    },
    LceRow {
        pass: "fwd+bwd+dw",
        imp: "ours_c272",
        dw: true,
    },
    LceRow {
        pass: "fwd+bwd+dw",
        imp: "ours_c1024",
        dw: true,
    },
];

/// The forced chunk of an `ours_c{rows}` impl (None: the default).
fn forced_chunk(imp: &str) -> Option<usize> {
    imp.strip_prefix("ours_c").and_then(|n| n.parse().ok())
}

/// Runs one linear measurement once on `s`; returns what must outlive the clock.
fn lce_once(kern: &Kernels, r: LceRow, s: &LceSet) -> Result<Vec<Tensor>> {
    let c = cfg();
    // `ours` or `ours_c{rows}` (ours at a forced chunk).
    let chunk = forced_chunk(r.imp);
    let ours = r.imp == "ours" || chunk.is_some();
    if r.pass == "fwd" {
        return Ok(vec![match r.imp {
            _ if ours => kern.linear_cross_entropy(&s.h, &s.w, &s.t, &c, chunk)?,
            "candle_composed" => reference::linear_cross_entropy(&s.h, &s.w, &s.t, &c)?,
            _ => s.h.matmul(&s.w.t()?)?,
        }]);
    }
    match r.imp {
        _ if ours => {
            let g =
                kern.linear_cross_entropy_forward_backward(&s.h, &s.w, &s.t, &c, chunk, r.dw, 1.0)?;
            Ok(std::iter::once(g.dh).chain(g.dw).collect())
        }
        "base_gemm" => {
            let l = s.h.matmul(&s.w.t()?)?;
            let dh = l.matmul(&s.w)?;
            let mut v = vec![dh];
            if r.dw {
                v.push(l.t()?.matmul(&s.h)?);
            }
            Ok(v)
        }
        imp => {
            let hv = Var::from_tensor(&s.h)?;
            let wv = Var::from_tensor(&s.w)?;
            let w = if r.dw {
                wv.as_tensor().clone()
            } else {
                s.w.clone()
            };
            let loss = if imp == "ours_autograd" {
                kern.linear_cross_entropy(hv.as_tensor(), &w, &s.t, &c, None)?
            } else {
                reference::linear_cross_entropy(hv.as_tensor(), &w, &s.t, &c)?
            };
            let g = loss.backward()?;
            Ok([g.get(&hv).cloned(), g.get(&wv).cloned()]
                .into_iter()
                .flatten()
                .collect())
        }
    }
}

fn lce_run(
    kern: &Kernels,
    (n, hd, v, dtype): (usize, usize, usize, DType),
    timer: &Timer,
    out: &mut Collector,
) {
    let dev = timer.device();
    let e = dtype.size_in_bytes() as f64;
    let (nf, hf, vf) = (n as f64, hd as f64, v as f64);
    let gemm = 2.0 * nf * hf * vf;
    let key = |r: LceRow| Key {
        op: LCE.to_string(),
        pass: r.pass,
        shape: vec![n, hd, v],
        dtype: dtype.as_str().to_string(),
        imp: r.imp,
    };
    let k = sets_for((n * hd + v * hd) * dtype.size_in_bytes());
    let sets: Result<Vec<LceSet>> = (0..k)
        .map(|_| {
            Ok(LceSet {
                h: randn(&[n, hd], 1.0, dtype, dev)?,
                w: randn(&[v, hd], 1.0 / hf.sqrt(), dtype, dev)?,
                t: check_loss::random_targets(&[n], v, 0.1, -100, dev)?,
            })
        })
        .collect();
    let sets = match sets {
        Ok(s) => s,
        Err(e) => return out.skip_all(LCE_ROWS.iter().map(|&r| key(r)).collect(), &e),
    };
    let c = cfg();
    let check = (|| {
        let s = &sets[0];
        let ours = kern.linear_cross_entropy(&s.h, &s.w, &s.t, &c, None)?;
        let f32 = |t: &Tensor| t.to_dtype(DType::F32);
        let want = reference::linear_cross_entropy(&f32(&s.h)?, &f32(&s.w)?, &s.t, &c)?;
        agree(LCE, &ours, &want, dtype)
    })();
    let extra: &[LceRow] = if dev.is_cpu() { &[] } else { &LCE_CHUNK_ROWS };
    for &r in LCE_ROWS.iter().chain(extra) {
        let (flops, bytes) = match (r.pass, r.dw) {
            ("fwd", _) => (gemm, e * (nf * hf + vf * hf)),
            (_, false) => (2.0 * gemm, e * (2.0 * nf * hf + vf * hf)),
            (_, true) => (3.0 * gemm, e * (2.0 * nf * hf + 2.0 * vf * hf)),
        };
        let ours_impl = r.imp.starts_with("ours");
        let res = match &check {
            Err(e) if ours_impl => Err(candle_core::Error::Msg(e.to_string())),
            _ => timer.time(|i| lce_once(kern, r, &sets[i % k])),
        };
        let ok = res.is_ok();
        let baseline = (!ours_impl).then_some("ours");
        out.record(key(r), bytes, Some(flops), k, baseline, res);
        if ok && r.pass != "fwd" {
            if let Ok((_, Some(b))) = memory::peak_during(dev, || lce_once(kern, r, &sets[0])) {
                out.set_peak(b);
            }
        }
    }
}

/// The two loss families.
pub struct LossFamily(pub &'static str);

impl Family for LossFamily {
    fn name(&self) -> &'static str {
        self.0
    }
    fn run(&self, scope: Scope, timer: &Timer, out: &mut Collector) {
        if self.0 == CE {
            let shapes = cases::ce_shapes(scope);
            for (i, ([n, v], dt)) in shapes.iter().enumerate() {
                eprintln!(
                    "[{}/{}] {CE} {} {}",
                    i + 1,
                    shapes.len(),
                    report::shape_str(&[*n, *v]),
                    dt.as_str()
                );
                ce_run(&scope.kernels, (*n, *v, *dt), timer, out);
                out.checkpoint();
            }
        } else {
            let shapes = cases::lce_shapes(scope);
            for (i, ([n, h, v], dt)) in shapes.iter().enumerate() {
                eprintln!(
                    "[{}/{}] {LCE} {} {}",
                    i + 1,
                    shapes.len(),
                    report::shape_str(&[*n, *h, *v]),
                    dt.as_str()
                );
                lce_run(&scope.kernels, (*n, *h, *v, *dt), timer, out);
                out.checkpoint();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::bench::test_util::collector;

    fn timer() -> Timer {
        crate::bench::test_util::timer(2)
    }

    /// Ours run on the bench's `--kernel-config` (a SIMD level this CPU lacks: every row of
    /// ours fails, the peers' rows are timed).
    #[test]
    fn ours_run_on_the_given_kernel_config() {
        let mut out = collector();
        let k = crate::bench::test_util::unavailable_simd();
        ce_run(&k, (7, 33, DType::F32), &timer(), &mut out);
        lce_run(&k, (9, 8, 21, DType::F32), &timer(), &mut out);
        out.finish();
        crate::bench::test_util::ours_skipped_others_timed(&out);
    }

    #[test]
    fn every_row_is_recorded() {
        let mut out = collector();
        let k = Kernels::default();
        ce_run(&k, (7, 33, DType::F32), &timer(), &mut out);
        lce_run(&k, (9, 8, 21, DType::BF16), &timer(), &mut out);
        out.finish();
        assert!(out.skipped.is_empty(), "{:?}", out.skipped);
        assert_eq!(out.rows.len(), 7 + LCE_ROWS.len());
        for r in &out.rows {
            assert!(r.median_us > 0.0);
            assert_eq!(
                r.speedup.is_some(),
                r.baseline.is_some(),
                "{} {}",
                r.pass,
                r.imp
            );
        }
        assert!(!report::compute_summary(&out.rows).is_empty());
    }

    #[test]
    fn every_impl_computes_the_same_gradients() {
        let dev = Device::Cpu;
        let s = LceSet {
            h: randn(&[10, 6], 1.0, DType::F32, &dev).unwrap(),
            w: randn(&[17, 6], 0.4, DType::F32, &dev).unwrap(),
            t: check_loss::random_targets(&[10], 17, 0.1, -100, &dev).unwrap(),
        };
        let rel = |a: &Tensor, b: &Tensor| {
            let d = (a - b)
                .unwrap()
                .sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            let n = b
                .sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            (d / n).sqrt()
        };
        for dw in [false, true] {
            let pass = if dw { "fwd+bwd+dw" } else { "fwd+bwd" };
            let get = |imp| lce_once(&Kernels::default(), LceRow { pass, imp, dw }, &s).unwrap();
            let (a, b, c) = (get("ours"), get("ours_autograd"), get("candle_composed"));
            assert_eq!(a.len(), 1 + usize::from(dw));
            for i in 0..a.len() {
                assert!(rel(&a[i], &b[i]) < 1e-6 && rel(&a[i], &c[i]) < 1e-5);
            }
        }
    }
}
