//! The bench's rows, the printed tables and the JSON file.
//!
//! JSON layout (the PyTorch script `scripts/bench_torch.py` writes the same, and
//! `scripts/merge_bench.py` merges them):
//!
//! ```text
//! { "header": { "tool", "date", "device", "device_name", "copy_gbps", "copy_bytes",
//!               "git_commit", "mode", "legend", "notes": [..] },
//!   "rows": [ { "op", "pass", "shape", "dtype", "device", "device_name", "impl",
//!               "median_us", "min_us", "reps", "sets", "bytes", "gbps", "pct_copy",
//!               "flops", "tflops", "baseline", "speedup" }, .. ],
//!   "skipped": [ { "op", "pass", "shape", "dtype", "impl", "error" }, .. ] }
//! ```
//!
//! `speedup` = this row's median / the median of its `baseline` row (the like-for-like
//! measurement of ours, same op, pass, shape and dtype): how many times faster ours is.

use std::collections::BTreeMap;

use serde::Serialize;

use super::timing::Stats;

/// The printed legend (also stored in the JSON header).
pub const LEGEND: &str = "\
Legend. Times are medians after warm-up (CPU: wall clock; CUDA: CUDA events, device \
synchronised around each repetition); small inputs rotate among several random input sets \
('sets') so caches do not hold them.
  N = elements of x, D = last dim, e = bytes per element, M = mask elements.
  GB/s = bytes that must move / median time, inputs read once + outputs written once:
    softmax fwd 2Ne (+ Me with a mask) | bwd 3Ne (y, dy -> dx)
    rms_norm fwd 2Ne + De | bwd 3Ne + 2De (x, dy, w -> dx, dw)
    add_rms_norm fwd 4Ne + De (x, r, w -> normed, sum) | bwd 4Ne + 2De (sum, dnormed, dsum, w -> dx, dw)
    fwd+bwd = fwd bytes + bwd bytes; through the tape with loss = sum(y * probe) reduced per
    row, then over the rows (bench::probe_loss).
  % copy = GB/s / the copy bandwidth measured in this run (one large copy, read + write).
  impls: ours = candle-fused op (bwd: the standalone backward fn, given dy);
    ours_autograd = loss.backward() through our op (bwd only; graph built untimed);
    candle_composed = composed Candle ops in the input dtype (bwd: loss.backward() alone,
      graph built untimed); candle_fused_builtin = candle_nn::ops::{softmax_last_dim, rms_norm}
      (fwd only: no backward). loss = sum(out * probe) with a fixed random probe.
  xfaster = this impl's time / ours' time, like for like: for bwd candle_composed is
    compared with ours_autograd (both time loss.backward()), everything else with ours.
  LoRA (lora_linear, shape MxKxNxr, y = x.W^T + s.(x.A^T).B^T, s = 2, no bias, W frozen):
    TFLOP/s = useful flops / median: fwd 2MKN + 2MKr + 2MrN | fwd+bwd (grads of x, A, B)
    4MKN + 6MNr + 6MKr | base_gemm, base_linear, merged: 2MKN (fwd+bwd 4MKN).
    GB/s: fwd e(MK + NK + rK + Nr + MN) | bwd e(MN + 2MK + NK + 2rK + 2Nr + Mr) |
    base, merged: fwd e(MK + NK + MN), bwd e(MN + NK + MK); fwd+bwd = fwd + bwd bytes.
    impls: base_gemm = x.matmul(w.t()) (Candle's matmul) | base_linear = candle-fused linear
    without adapter | ours = candle_fused::ops::lora_linear | candle_composed = the same
    function from Candle ops (what candle-lora does) | merged = candle-fused linear with
    W' = W + s.B.A (merged untimed). bwd = the backward alone given dy = probe, outside
    autograd: ours = candle_fused::ops::lora_linear_backward (dx, dA, dB), base_gemm = dy.W
    (Candle's matmul). fwd+bwd = forward on Vars, loss = sum(y * probe),
    loss.backward(); Candle's matmul backward (base_gemm, candle_composed) also computes an
    unused dW (not counted in the flops). ours/limit = ours' time / the faster of base_gemm
    and base_linear (target: fwd <= 1.05 for M >= 4096).
  RoPE (rope = [B,H,T,D] half-split, rope_bthd, rope_interleaved; T = tokens, R = rotary dim):
    GB/s fwd and bwd 2Ne + 4TR + 4T (x -> y, the f32 cos/sin rows of the positions, u32
    positions). candle_composed = the rotation from Candle ops (cos/sin gathered each call);
    candle_rotary_emb = candle_nn::rotary_emb::{rope, rope_thd, rope_i} on cos/sin gathered
    before timing (fwd only: no backward). GLU (swiglu, geglu = tanh GELU, swiglu_packed =
    one [N, 2I] input; shape = the output [N, I]): GB/s fwd 3Ne, bwd 5Ne (g, u, dy -> dg, du);
    candle_composed = Tensor::silu / Tensor::gelu times up.
  cross_entropy (shape NxV logits, a tenth of the targets ignored, mean): GB/s: fwd NVe (logits
    read once) | bwd 2NVe (read, write dlogits) | fwd+bwd 3NVe. ours bwd = the standalone
    cross_entropy_backward (one pass); candle_composed = log_softmax + gather in the input dtype.
  linear_cross_entropy (shape NxHxV, loss = CE(h.w^T)): TFLOP/s = 2NHV per GEMM (fwd 1, fwd+bwd
    2, fwd+bwd+dw 3) for every impl; fwd+bwd = frozen head (dh only), fwd+bwd+dw = head trained.
    ours = loss only (fwd) or linear_cross_entropy_forward_backward; ours_autograd = the op on
    Vars, loss.backward(); candle_composed = full logits, log_softmax, gather (its matmul
    backward computes dW even for a frozen head); base_gemm = the GEMMs alone (the limit).
    peak = memory of one call above its inputs (CPU: counting allocator; CUDA: pool peak).";

/// The row of implementation `imp` for the same op, pass, shape and dtype as `r`.
fn peer<'a>(rows: &'a [Row], r: &Row, imp: &str) -> Option<&'a Row> {
    rows.iter().find(|o| {
        o.op == r.op && o.pass == r.pass && o.shape == r.shape && o.dtype == r.dtype && o.imp == imp
    })
}

/// One measured row.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub op: String,
    pub pass: String,
    pub shape: Vec<usize>,
    pub dtype: String,
    pub device: String,
    pub device_name: String,
    #[serde(rename = "impl")]
    pub imp: String,
    pub median_us: f64,
    pub min_us: f64,
    pub reps: usize,
    /// Input sets rotated among.
    pub sets: usize,
    pub bytes: f64,
    pub gbps: f64,
    pub pct_copy: f64,
    /// Floating-point operations of one call, where the op is compute-bound (LoRA).
    pub flops: Option<f64>,
    pub tflops: Option<f64>,
    /// The impl whose time `speedup` divides by (`None` for ours).
    pub baseline: Option<String>,
    pub speedup: Option<f64>,
    /// Peak memory of one call above its inputs, MiB (rows that measure it: the losses).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peak_mib: Option<f64>,
    /// CUDA: the host's time to issue one call, µs ([`super::timing::Stats::host_us`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host_us: Option<f64>,
}

/// A measurement that could not be made (error, out of memory, not supported).
#[derive(Debug, Clone, Serialize)]
pub struct Skipped {
    pub op: String,
    pub pass: String,
    pub shape: Vec<usize>,
    pub dtype: String,
    #[serde(rename = "impl")]
    pub imp: String,
    pub error: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Header {
    pub tool: String,
    pub date: String,
    pub device: String,
    pub device_name: String,
    pub copy_gbps: f64,
    pub copy_bytes: usize,
    pub git_commit: Option<String>,
    pub mode: String,
    /// The name of the kernel configuration ours ran on (`KernelConfig::candidates()`).
    pub kernel_config: String,
    /// `keep` (freed host memory stays in glibc's heap: `--host-heap keep`) or `release`.
    pub host_heap: String,
    /// The seed of the random inputs (`CANDLE_FUSED_SEED=<seed>` reruns them).
    pub seed: u64,
    pub legend: String,
    pub notes: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub header: Header,
    pub rows: Vec<Row>,
    pub skipped: Vec<Skipped>,
}

/// What identifies a measurement.
#[derive(Debug, Clone)]
pub struct Key {
    pub op: String,
    pub pass: &'static str,
    pub shape: Vec<usize>,
    pub dtype: String,
    pub imp: &'static str,
}

/// Collects rows while the bench runs; prints one progress line per measurement to stderr.
pub struct Collector {
    pub device: String,
    pub device_name: String,
    pub copy_gbps: f64,
    pub rows: Vec<Row>,
    pub skipped: Vec<Skipped>,
    /// Where to save the rows so far after each case (mode "partial"), so that a run cut
    /// short (e.g. by a time limit on a GPU machine) still leaves its measurements.
    pub checkpoint: Option<(std::path::PathBuf, Header)>,
}

impl Collector {
    /// Writes the rows so far to the checkpoint file, if any (speedups are filled only in
    /// the final file; `scripts/merge_bench.py` recomputes them anyway).
    pub fn checkpoint(&self) {
        if let Some((path, header)) = &self.checkpoint {
            let partial = Report {
                header: header.clone(),
                rows: self.rows.clone(),
                skipped: self.skipped.clone(),
            };
            if let Err(e) = std::fs::write(path, partial.to_json()) {
                eprintln!("warning: cannot write {}: {e}", path.display());
            }
        }
    }

    /// Records a measurement (or its error). `baseline` names the ours-impl it is compared
    /// with (`None` for ours itself).
    pub fn record(
        &mut self,
        key: Key,
        bytes: f64,
        flops: Option<f64>,
        sets: usize,
        baseline: Option<&'static str>,
        res: candle_core::Result<Stats>,
    ) {
        match res {
            Ok(st) => {
                let gbps = bytes / (st.median_us * 1e3);
                let row = Row {
                    op: key.op,
                    pass: key.pass.into(),
                    shape: key.shape,
                    dtype: key.dtype,
                    device: self.device.clone(),
                    device_name: self.device_name.clone(),
                    imp: key.imp.into(),
                    median_us: st.median_us,
                    min_us: st.min_us,
                    reps: st.reps,
                    sets,
                    bytes,
                    gbps,
                    pct_copy: 100.0 * gbps / self.copy_gbps,
                    flops,
                    tflops: flops.map(|f| f / (st.median_us * 1e6)),
                    baseline: baseline.map(String::from),
                    speedup: None,
                    peak_mib: None,
                    host_us: st.host_us,
                };
                eprintln!(
                    "  {:<28} {:<8} {:<18} {:<5} {:<22} {:>12.1} us {:>8.1} GB/s{}{}",
                    row.op,
                    row.pass,
                    shape_str(&row.shape),
                    row.dtype,
                    row.imp,
                    row.median_us,
                    row.gbps,
                    row.tflops
                        .map(|t| format!(" {:>8} TFLOP/s", fmt_tflops(t)))
                        .unwrap_or_default(),
                    row.host_us
                        .map(|h| format!("  host {h:.1} us/call"))
                        .unwrap_or_default()
                );
                self.rows.push(row);
            }
            Err(e) => {
                let error = first_line(&e.to_string());
                eprintln!(
                    "  {:<28} {:<8} {:<18} {:<5} {:<22} SKIPPED: {error}",
                    key.op,
                    key.pass,
                    shape_str(&key.shape),
                    key.dtype,
                    key.imp
                );
                self.skipped.push(Skipped {
                    op: key.op,
                    pass: key.pass.into(),
                    shape: key.shape,
                    dtype: key.dtype,
                    imp: key.imp.into(),
                    error,
                })
            }
        }
    }

    /// `n` input sets from `make`; when one cannot be made (e.g. out of memory) every
    /// measurement of the case (`keys`) is recorded as skipped with the error, and `None`
    /// returned.
    pub fn input_sets<S>(
        &mut self,
        n: usize,
        make: impl FnMut(usize) -> candle_core::Result<S>,
        keys: impl FnOnce() -> Vec<Key>,
    ) -> Option<Vec<S>> {
        match (0..n).map(make).collect() {
            Ok(sets) => Some(sets),
            Err(e) => {
                self.skip_all(keys(), &e);
                None
            }
        }
    }

    /// Sets the peak memory (`bytes`) of the row recorded last.
    pub fn set_peak(&mut self, bytes: usize) {
        if let Some(r) = self.rows.last_mut() {
            r.peak_mib = Some(bytes as f64 / (1024.0 * 1024.0));
        }
    }

    /// Records the same error for every measurement of a case that could not even be set up.
    pub fn skip_all(&mut self, keys: Vec<Key>, error: &candle_core::Error) {
        for k in keys {
            self.record(
                k,
                0.0,
                None,
                0,
                None,
                Err(candle_core::Error::Msg(error.to_string())),
            );
        }
    }

    /// Fills every row's `speedup` from its baseline row.
    pub fn finish(&mut self) {
        let mut ours: BTreeMap<(String, String, Vec<usize>, String, String), f64> = BTreeMap::new();
        for r in &self.rows {
            if r.baseline.is_none() {
                let k = (
                    r.op.clone(),
                    r.pass.clone(),
                    r.shape.clone(),
                    r.dtype.clone(),
                );
                ours.insert((k.0, k.1, k.2, k.3, r.imp.clone()), r.median_us);
            }
        }
        for r in &mut self.rows {
            if let Some(b) = &r.baseline {
                let k = (
                    r.op.clone(),
                    r.pass.clone(),
                    r.shape.clone(),
                    r.dtype.clone(),
                    b.clone(),
                );
                r.speedup = ours.get(&k).map(|t| r.median_us / t);
            }
        }
    }
}

/// TFLOP/s with two decimals, or four below 0.1 (a CPU, a tiny shape).
fn fmt_tflops(t: f64) -> String {
    if t < 0.1 {
        format!("{t:.4}")
    } else {
        format!("{t:.2}")
    }
}

fn first_line(s: &str) -> String {
    s.lines().next().unwrap_or("").chars().take(200).collect()
}

pub fn shape_str(shape: &[usize]) -> String {
    shape
        .iter()
        .map(|d| d.to_string())
        .collect::<Vec<_>>()
        .join("x")
}

/// The full table: one line per measurement.
pub fn table(rows: &[Row]) -> String {
    let mut s = format!(
        "{:<28} {:<8} {:<18} {:<5} {:<22} {:>12} {:>9} {:>7} {:>9} {:>9}\n",
        "op", "pass", "shape", "dtype", "impl", "median us", "GB/s", "% copy", "TFLOP/s", "xfaster"
    );
    s.push_str(&"-".repeat(s.len() - 1));
    s.push('\n');
    let mut last: Option<(&str, &[usize], &str)> = None;
    for r in rows {
        let group = (r.op.as_str(), r.shape.as_slice(), r.dtype.as_str());
        if last.is_some() && last != Some(group) {
            s.push('\n');
        }
        last = Some(group);
        s.push_str(&format!(
            "{:<28} {:<8} {:<18} {:<5} {:<22} {:>12.1} {:>9.1} {:>6.1}% {:>9} {:>9}\n",
            r.op,
            r.pass,
            shape_str(&r.shape),
            r.dtype,
            r.imp,
            r.median_us,
            r.gbps,
            r.pct_copy,
            r.tflops.map(fmt_tflops).unwrap_or_default(),
            r.speedup.map(|x| format!("{x:.2}x")).unwrap_or_default()
        ));
    }
    s
}

/// The compact summary of the memory-bound ops: one line per op, shape, dtype and pass with
/// ours' time and % of copy bandwidth and how many times faster ours is than each other impl
/// (compute-bound rows, those with flops, are in [`compute_summary`]); empty if there are none.
pub fn summary(rows: &[Row]) -> String {
    if !rows.iter().any(|r| r.imp == "ours" && r.flops.is_none()) {
        return String::new();
    }
    let mut s = format!(
        "{:<28} {:<18} {:<5} {:<8} {:>11} {:>7} {:>10} {:>10} {:>10}\n",
        "op", "shape", "dtype", "pass", "ours us", "% copy", "x composed", "x builtin", "autograd%"
    );
    s.push_str(&"-".repeat(s.len() - 1));
    s.push('\n');
    let find = |r: &Row, imp: &str| peer(rows, r, imp);
    for r in rows.iter().filter(|r| r.imp == "ours" && r.flops.is_none()) {
        let sp = |imp: &str| {
            find(r, imp)
                .and_then(|o| o.speedup)
                .map(|x| format!("{x:.2}x"))
                .unwrap_or_else(|| "-".into())
        };
        // For bwd: the % of copy bandwidth that loss.backward() through our op reaches.
        let ag = find(r, "ours_autograd")
            .map(|o| format!("{:.1}%", o.pct_copy))
            .unwrap_or_else(|| "-".into());
        s.push_str(&format!(
            "{:<28} {:<18} {:<5} {:<8} {:>11.1} {:>6.1}% {:>10} {:>10} {:>10}\n",
            r.op,
            shape_str(&r.shape),
            r.dtype,
            r.pass,
            r.median_us,
            r.pct_copy,
            sp("candle_composed"),
            sp("candle_fused_builtin"),
            ag
        ));
    }
    s
}

/// The summary of the compute-bound rows (those with flops: LoRA), empty if there are none:
/// one line per op, shape, dtype and pass with ours' time and TFLOP/s, the limit (the faster
/// of `base_gemm` and `base_linear`), ours / limit, and how many times faster ours is than
/// the composed ops and the merged weights.
pub fn compute_summary(rows: &[Row]) -> String {
    let ours: Vec<&Row> = rows
        .iter()
        .filter(|r| r.imp == "ours" && r.flops.is_some())
        .collect();
    if ours.is_empty() {
        return String::new();
    }
    let mut s = format!(
        "{:<28} {:<18} {:<5} {:<8} {:>11} {:>8} {:>11} {:>10} {:>10} {:>10}\n",
        "op",
        "shape",
        "dtype",
        "pass",
        "ours us",
        "TFLOP/s",
        "limit us",
        "ours/limit",
        "x composed",
        "x merged"
    );
    s.push_str(&"-".repeat(s.len() - 1));
    s.push('\n');
    let find = |r: &Row, imp: &str| peer(rows, r, imp);
    for r in ours {
        let sp = |imp: &str| {
            find(r, imp)
                .map(|o| format!("{:.2}x", o.median_us / r.median_us))
                .unwrap_or_else(|| "-".into())
        };
        let limit = ["base_gemm", "base_linear"]
            .iter()
            .filter_map(|imp| find(r, imp).map(|o| o.median_us))
            .min_by(|a, b| a.total_cmp(b));
        s.push_str(&format!(
            "{:<28} {:<18} {:<5} {:<8} {:>11.1} {:>8} {:>11} {:>10} {:>10} {:>10}\n",
            r.op,
            shape_str(&r.shape),
            r.dtype,
            r.pass,
            r.median_us,
            r.tflops.map(fmt_tflops).unwrap_or_default(),
            limit
                .map(|t| format!("{t:.1}"))
                .unwrap_or_else(|| "-".into()),
            limit
                .map(|t| format!("{:.3}", r.median_us / t))
                .unwrap_or_else(|| "-".into()),
            sp("candle_composed"),
            sp("merged")
        ));
    }
    s
}

/// Today's date and time in UTC, ISO 8601 (civil-from-days conversion, no extra dependency).
pub fn utc_now() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

/// The git commit: `$CANDLE_FUSED_COMMIT` when set (`scripts/gpu-run.sh` sets it to the commit
/// the bundle's binaries were built from: the GPU machine's copy of the tree may carry a stale
/// `.git`); else `git describe --always --dirty` in the current directory (or the crate's source
/// directory); else the file `.gpu/COMMIT` that `scripts/build-gpu-bundle.sh` writes.
pub fn git_commit() -> Option<String> {
    if let Ok(c) = std::env::var("CANDLE_FUSED_COMMIT") {
        return Some(c);
    }
    let describe = |dir: &std::path::Path| -> Option<String> {
        let out = std::process::Command::new("git")
            .args(["describe", "--always", "--dirty", "--abbrev=12"])
            .current_dir(dir)
            .output()
            .ok()?;
        let s = String::from_utf8(out.stdout).ok()?.trim().to_string();
        (out.status.success() && !s.is_empty()).then_some(s)
    };
    let cwd = std::env::current_dir().ok();
    cwd.as_deref()
        .and_then(describe)
        .or_else(|| describe(std::path::Path::new(env!("CARGO_MANIFEST_DIR"))))
        .or_else(|| {
            let s = std::fs::read_to_string(cwd?.join(".gpu/COMMIT")).ok()?;
            let s = s.trim().to_string();
            (!s.is_empty()).then_some(s)
        })
}

/// The peak memory of the rows that measured it (the losses), empty if none did.
pub fn peak_summary(rows: &[Row]) -> String {
    let with: Vec<&Row> = rows.iter().filter(|r| r.peak_mib.is_some()).collect();
    if with.is_empty() {
        return String::new();
    }
    let mut s = format!(
        "{:<28} {:<18} {:<5} {:<11} {:<16} {:>11} {:>11}\n",
        "op", "shape", "dtype", "pass", "impl", "peak MiB", "median us"
    );
    s.push_str(&"-".repeat(s.len() - 1));
    s.push('\n');
    for r in with {
        s.push_str(&format!(
            "{:<28} {:<18} {:<5} {:<11} {:<16} {:>11.1} {:>11.1}\n",
            r.op,
            shape_str(&r.shape),
            r.dtype,
            r.pass,
            r.imp,
            r.peak_mib.unwrap_or(0.0),
            r.median_us
        ));
    }
    s
}
