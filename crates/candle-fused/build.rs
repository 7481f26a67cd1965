//! With the `cuda` feature, compiles every `src/ops/*/*.cu` kernel file to PTX with nvcc: one
//! PTX for Hopper (`compute_90`: thread-block clusters, distributed shared memory) and one
//! fallback for older GPUs (`compute_80`, no clusters, so shorter rows on chip). The Rust side
//! embeds both and loads the one that matches the device. Without the feature nothing is built
//! and no CUDA toolkit is needed.

use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=CUDA_HOME");
    println!("cargo:rerun-if-env-changed=NVCC");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
    let nvcc = nvcc();
    println!("cargo:rerun-if-changed=src/cuda/common.cuh");
    let mut sources: Vec<PathBuf> = std::fs::read_dir("src/ops")
        .expect("src/ops")
        .flatten()
        .flat_map(|op| std::fs::read_dir(op.path()).into_iter().flatten().flatten())
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "cu"))
        .collect();
    sources.sort();
    for src in &sources {
        println!("cargo:rerun-if-changed={}", src.display());
        let stem = src.file_stem().unwrap().to_string_lossy().to_string();
        for (tag, arch) in [("sm90", "compute_90"), ("sm80", "compute_80")] {
            let dst = out.join(format!("{stem}.{tag}.ptx"));
            compile(&nvcc, src, &dst, arch);
        }
    }
}

fn nvcc() -> PathBuf {
    if let Some(p) = std::env::var_os("NVCC") {
        return PathBuf::from(p);
    }
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Some(home) = std::env::var_os(var) {
            let p = Path::new(&home).join("bin/nvcc");
            if p.exists() {
                return p;
            }
        }
    }
    PathBuf::from("nvcc")
}

fn compile(nvcc: &Path, src: &Path, dst: &Path, arch: &str) {
    let status = Command::new(nvcc)
        .args(["--ptx", "-O3", "-std=c++17", "-lineinfo", "--expt-relaxed-constexpr"])
        .arg(format!("-arch={arch}"))
        .arg("-Isrc/cuda")
        .arg("-o")
        .arg(dst)
        .arg(src)
        .status()
        .unwrap_or_else(|e| {
            panic!(
                "candle-fused: could not run nvcc ({}): {e}. Install the CUDA toolkit \
                 (bash scripts/setup-cuda.sh && source .cuda/env.sh) or build without --features cuda",
                nvcc.display()
            )
        });
    assert!(
        status.success(),
        "candle-fused: nvcc failed on {} for {arch}",
        src.display()
    );
}
