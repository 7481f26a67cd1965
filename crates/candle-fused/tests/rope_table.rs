//! `RopeTable` (cos/sin from `rope_theta` and the `rope_scaling` kinds `linear`, `dynamic`,
//! `llama3`, `yarn`) against the transformers formulas (an independent plain-f64 transcription
//! of `modeling_rope_utils`, below) and against values derived by hand. The op itself:
//! `rope.rs`.

mod common;

use candle_fused::ops::{RopeConfig, RopeScaling, RopeTable};
use common::*;

// ---------------------------------------------------------------------------------------------
// The table against the transformers formulas.

/// Transformers' inverse frequencies, written out again here in plain f64 from its
/// `_compute_*_parameters` (an independent transcription, array-style as transformers does
/// it): `(inv_freq, attention_factor)`.
fn hf_inv_freq(
    dim: usize,
    base: f64,
    seq_len: usize,
    scaling: Option<RopeScaling>,
) -> (Vec<f64>, f64) {
    let pow_inv = |b: f64| -> Vec<f64> {
        (0..dim)
            .step_by(2)
            .map(|j| 1.0 / b.powf(j as f64 / dim as f64))
            .collect()
    };
    let pi = std::f64::consts::PI;
    match scaling {
        None => (pow_inv(base), 1.0),
        Some(RopeScaling::Linear { factor }) => {
            (pow_inv(base).iter().map(|f| f / factor).collect(), 1.0)
        }
        Some(RopeScaling::Dynamic {
            factor,
            original_max_positions: m,
        }) => {
            let seq = seq_len.max(m) as f64;
            let b = base
                * ((factor * seq / m as f64) - (factor - 1.0))
                    .powf(dim as f64 / (dim as f64 - 2.0));
            (pow_inv(b), 1.0)
        }
        Some(RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_positions,
        }) => {
            let old = original_max_positions as f64;
            let inv = pow_inv(base);
            let wavelen: Vec<f64> = inv.iter().map(|f| 2.0 * pi / f).collect();
            let (low_wl, high_wl) = (old / low_freq_factor, old / high_freq_factor);
            let llama: Vec<f64> = inv
                .iter()
                .zip(&wavelen)
                .map(|(&f, &w)| if w > low_wl { f / factor } else { f })
                .collect();
            let out = llama.iter().zip(&wavelen).map(|(&f, &w)| {
                let smooth = (old / w - low_freq_factor) / (high_freq_factor - low_freq_factor);
                let smoothed = (1.0 - smooth) * f / factor + smooth * f;
                let medium = w >= high_wl && w <= low_wl; // ~(w < high) & ~(w > low)
                if medium {
                    smoothed
                } else {
                    f
                }
            });
            (out.collect(), 1.0)
        }
        Some(RopeScaling::Yarn {
            factor,
            original_max_positions,
            beta_fast,
            beta_slow,
            mscale,
            mscale_all_dim,
            attention_factor,
        }) => {
            let get_mscale = |s: f64, m: f64| {
                if s <= 1.0 {
                    1.0
                } else {
                    0.1 * m * s.ln() + 1.0
                }
            };
            let att = attention_factor.unwrap_or(match (mscale, mscale_all_dim) {
                (Some(a), Some(b)) if a != 0.0 && b != 0.0 => {
                    get_mscale(factor, a) / get_mscale(factor, b)
                }
                _ => get_mscale(factor, 1.0),
            });
            let find_dim = |rot: f64| {
                (dim as f64 * (original_max_positions as f64 / (rot * 2.0 * pi)).ln())
                    / (2.0 * base.ln())
            };
            let low = find_dim(beta_fast).floor().max(0.0);
            let high = find_dim(beta_slow).ceil().min(dim as f64 - 1.0);
            let high = if low == high { high + 0.001 } else { high };
            let pos_freqs: Vec<f64> = (0..dim)
                .step_by(2)
                .map(|j| base.powf(j as f64 / dim as f64))
                .collect();
            let out = pos_freqs.iter().enumerate().map(|(i, &p)| {
                let ramp = ((i as f64 - low) / (high - low)).clamp(0.0, 1.0);
                let extra = 1.0 - ramp;
                (1.0 / (factor * p)) * (1.0 - extra) + (1.0 / p) * extra
            });
            (out.collect(), att)
        }
    }
}

/// Real checkpoints' configs: the inverse frequencies and the table rows at positions up to
/// and past the original context, against the transcription above.
#[test]
fn table_matches_the_transformers_formulas() {
    let llama31 = RopeScaling::Llama3 {
        factor: 8.0,
        low_freq_factor: 1.0,
        high_freq_factor: 4.0,
        original_max_positions: 8192,
    };
    type Config = (&'static str, usize, usize, f64, usize, Option<RopeScaling>);
    let configs: Vec<Config> = vec![
        ("llama2", 128, 128, 10_000.0, 4096, None),
        (
            "linear x4",
            128,
            128,
            10_000.0,
            16_384,
            Some(RopeScaling::Linear { factor: 4.0 }),
        ),
        (
            "dynamic within context",
            64,
            64,
            10_000.0,
            2048,
            Some(RopeScaling::Dynamic {
                factor: 2.0,
                original_max_positions: 4096,
            }),
        ),
        (
            "dynamic past context",
            64,
            64,
            10_000.0,
            12_000,
            Some(RopeScaling::Dynamic {
                factor: 2.0,
                original_max_positions: 4096,
            }),
        ),
        ("llama3.1", 128, 128, 500_000.0, 131_072, Some(llama31)),
        (
            "qwen2.5 yarn",
            128,
            128,
            1_000_000.0,
            131_072,
            Some(yarn(4.0, 32_768)),
        ),
        ("qwen2.5-0.5b", 64, 64, 1_000_000.0, 32_768, None),
        ("partial rotary (neox)", 80, 20, 10_000.0, 4096, None),
        (
            "deepseek yarn mscale",
            64,
            64,
            10_000.0,
            8192,
            Some(RopeScaling::Yarn {
                factor: 40.0,
                original_max_positions: 4096,
                beta_fast: 32.0,
                beta_slow: 1.0,
                mscale: Some(1.0),
                mscale_all_dim: Some(0.5),
                attention_factor: None,
            }),
        ),
        (
            "yarn explicit attention factor",
            64,
            32,
            10_000.0,
            8192,
            Some(RopeScaling::Yarn {
                factor: 8.0,
                original_max_positions: 2048,
                beta_fast: 16.0,
                beta_slow: 2.0,
                mscale: None,
                mscale_all_dim: None,
                attention_factor: Some(0.75),
            }),
        ),
    ];
    for (name, head, rot, theta, maxp, scaling) in configs {
        let cfg = RopeConfig {
            head_dim: head,
            rotary_dim: rot,
            theta,
            max_positions: maxp,
            scaling,
        };
        let tab = RopeTable::new(&cfg, &CPU).unwrap();
        let (want, att) = hf_inv_freq(rot, theta, maxp, scaling);
        assert_eq!(tab.inv_freq().len(), rot / 2);
        for (i, (&g, &w)) in tab.inv_freq().iter().zip(&want).enumerate() {
            assert!(
                ((g - w) / w).abs() < 1e-13,
                "{name}: inv_freq[{i}] {g} vs {w}"
            );
        }
        assert!(
            (tab.attention_factor() - att).abs() < 1e-15,
            "{name}: attention factor"
        );
        let (cos, sin) = (
            tab.cos().to_vec2::<f32>().unwrap(),
            tab.sin().to_vec2::<f32>().unwrap(),
        );
        assert_eq!((cos.len(), cos[0].len()), (maxp, rot / 2));
        for p in [
            0,
            1,
            7,
            2047,
            2048,
            4095,
            4096,
            8191,
            8192,
            20_000,
            32_767,
            32_768,
            100_000,
            maxp - 1,
        ] {
            if p >= maxp {
                continue;
            }
            for i in 0..rot / 2 {
                let ang = p as f64 * want[i];
                for (got, w, what) in [
                    (cos[p][i], att * ang.cos(), "cos"),
                    (sin[p][i], att * ang.sin(), "sin"),
                ] {
                    // One rounding to f32 (plus the angle's f64 rounding, ~p·1e-16).
                    let tol = 6e-8 * att + p as f64 * 1e-15;
                    assert!(
                        (got as f64 - w).abs() <= tol,
                        "{name}: {what}[{p}][{i}] = {got} vs {w}"
                    );
                }
            }
        }
    }
}

/// Values derived by hand from the published formulas (θ = 10⁴, rotary dim 4, so the
/// default frequencies are `[1, 10⁴^(−1/2)] = [1, 0.01]`).
#[test]
fn table_spot_values_by_hand() {
    let inv = |scaling, maxp| table(4, 4, maxp, scaling).inv_freq().to_vec();
    let close = |a: f64, b: f64| (a - b).abs() <= 1e-15 * b.abs().max(1.0);
    assert!(close(inv(None, 8)[1], 0.01));
    // Linear ×2: [0.5, 0.005].
    let v = inv(Some(RopeScaling::Linear { factor: 2.0 }), 8);
    assert!(close(v[0], 0.5) && close(v[1], 0.005), "{v:?}");
    // Dynamic ×2 past a context of 1000 with 2000 positions: base 10⁴·(2·2000/1000 − 1)^(4/2)
    // = 90000, so [1, 1/300]; within the context the base is unchanged.
    let dynamic = RopeScaling::Dynamic {
        factor: 2.0,
        original_max_positions: 1000,
    };
    let v = inv(Some(dynamic), 2000);
    assert!(close(v[0], 1.0) && close(v[1], 1.0 / 300.0), "{v:?}");
    assert!(close(inv(Some(dynamic), 1000)[1], 0.01));
    // Llama3 ×8, low 1, high 4, context 1000: wavelengths 2π (< 250: kept) and 200π ≈ 628.3
    // (between 250 and 1000): s = (1000/(200π) − 1)/3 = 0.197183..., (1 − s)·0.01/8 + s·0.01
    // = 0.0029753525...
    let l3 = |orig| RopeScaling::Llama3 {
        factor: 8.0,
        low_freq_factor: 1.0,
        high_freq_factor: 4.0,
        original_max_positions: orig,
    };
    let v = inv(Some(l3(1000)), 8);
    assert!(
        close(v[0], 1.0) && (v[1] - 0.002_975_352_506_846_947).abs() < 1e-15,
        "{v:?}"
    );
    // ... and with context 100 the 628-wavelength frequency is past 100: 0.01/8.
    assert!(close(inv(Some(l3(100)), 8)[1], 0.00125));
    // YaRN ×4, context 1000, β 32/1: corr(32) = 4·ln(1000/(64π))/(2 ln 10⁴) = 0.348 -> low 0,
    // corr(1) = 1.101 -> high 2; ramp [0, 0.5]: [1, 0.0025·0.5 + 0.01·0.5] = [1, 0.00625];
    // attention factor 0.1·ln 4 + 1 = 1.1386294361...
    let t = table(4, 4, 200, Some(yarn(4.0, 1000)));
    assert!(
        close(t.inv_freq()[0], 1.0) && close(t.inv_freq()[1], 0.00625),
        "{:?}",
        t.inv_freq()
    );
    assert!((t.attention_factor() - 1.138_629_436_111_989).abs() < 1e-15);
    // Position 160, frequency 0.00625: angle 1; the table holds a·cos 1 and a·sin 1.
    let c = t.cos().to_vec2::<f32>().unwrap()[160][1] as f64;
    let s = t.sin().to_vec2::<f32>().unwrap()[160][1] as f64;
    assert!(
        (c - 1.138_629_436_111_989 * 0.540_302_305_868_139_8).abs() < 1e-7,
        "{c}"
    );
    assert!(
        (s - 1.138_629_436_111_989 * 0.841_470_984_807_896_5).abs() < 1e-7,
        "{s}"
    );
    // Default table at position 100: angles [100, 1].
    let t = table(4, 4, 128, None);
    let c = t.cos().to_vec2::<f32>().unwrap()[100].clone();
    assert!(
        (c[1] as f64 - 0.540_302_305_868_139_8).abs() < 6e-8
            && (c[0] as f64 - 100f64.cos()).abs() < 6e-8
    );
    // YaRN with mscale 1 and mscale_all_dim 0.5, ×40: (0.1·ln 40 + 1)/(0.05·ln 40 + 1) = 1.15572...
    let y = RopeScaling::Yarn {
        factor: 40.0,
        original_max_positions: 1000,
        beta_fast: 32.0,
        beta_slow: 1.0,
        mscale: Some(1.0),
        mscale_all_dim: Some(0.5),
        attention_factor: None,
    };
    assert!((table(4, 4, 8, Some(y)).attention_factor() - 1.155_721_990_196_260_8).abs() < 1e-14);
}
