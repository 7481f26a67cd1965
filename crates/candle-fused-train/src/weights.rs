//! Checkpoint files: a model directory (local, or a hub id found in the `hf-hub` cache, no
//! network), its single `model.safetensors` or sharded `model.safetensors.index.json`,
//! memory-mapped, each tensor checked for its expected shape and converted to the training
//! dtype on load. Missing, truncated or corrupt files and missing tensors are errors naming
//! the file and the tensor.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Result, Tensor};
use serde_json::Value;

use crate::util::{fail, Context};

const WHAT: &str = "weights";
const SINGLE: &str = "model.safetensors";
const INDEX: &str = "model.safetensors.index.json";

/// The default hub cache (`$HF_HOME/hub`, else `~/.cache/huggingface/hub`), `None` when
/// neither `HF_HOME` nor `HOME` is set.
pub fn default_hub_cache() -> Option<hf_hub::Cache> {
    if let Some(home) = std::env::var_os("HF_HOME") {
        return Some(hf_hub::Cache::new(PathBuf::from(home).join("hub")));
    }
    let home = std::env::var_os("HOME")?;
    Some(hf_hub::Cache::new(
        PathBuf::from(home)
            .join(".cache")
            .join("huggingface")
            .join("hub"),
    ))
}

/// A local model directory for `spec`: `spec` itself when it is a directory, else a hub id
/// (`org/name`) looked up in `cache` (offline: the files must have been downloaded before).
pub fn resolve_model_dir(spec: &str, cache: Option<&hf_hub::Cache>) -> Result<PathBuf> {
    let p = Path::new(spec);
    if p.is_dir() {
        return Ok(p.to_path_buf());
    }
    if p.exists() {
        fail!(
            WHAT,
            "{spec} is a file, expected a model directory or a hub id"
        )
    }
    let looks_like_id =
        spec.split('/').count() == 2 && !spec.starts_with('.') && !spec.starts_with('/');
    if !looks_like_id {
        fail!(
            WHAT,
            "{spec}: no such directory (and not a hub id of the form org/name)"
        )
    }
    let Some(cache) = cache else {
        fail!(
            WHAT,
            "{spec}: not a local directory and no hub cache (set HF_HOME or HOME)"
        )
    };
    let repo = cache.model(spec.to_string());
    match repo.get("config.json") {
        Some(cfg) => Ok(cfg
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."))),
        None => fail!(
            WHAT,
            "{spec}: not a local directory and not in the hub cache {} (download it first, e.g. `huggingface-cli download {spec}`; this program does not use the network)",
            cache.path().display()
        ),
    }
}

/// The safetensors files of a checkpoint directory, memory-mapped.
pub struct Weights {
    st: MmapedSafetensors,
    files: Vec<PathBuf>,
}

impl std::fmt::Debug for Weights {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Weights")
            .field("files", &self.files)
            .finish()
    }
}

impl Weights {
    /// Opens `dir/model.safetensors`, or the shards listed by `dir/model.safetensors.index.json`.
    pub fn open(dir: &Path) -> Result<Self> {
        let index = dir.join(INDEX);
        let files: Vec<PathBuf> = if index.exists() {
            let text = std::fs::read_to_string(&index)
                .context(WHAT, format!("cannot read {}", index.display()))?;
            let v: Value = serde_json::from_str(&text)
                .context(WHAT, format!("invalid JSON in {}", index.display()))?;
            let Some(map) = v.get("weight_map").and_then(Value::as_object) else {
                fail!(WHAT, "{} has no \"weight_map\" object", index.display())
            };
            let names: BTreeSet<&str> = map.values().filter_map(Value::as_str).collect();
            if names.is_empty() {
                fail!(WHAT, "{} lists no shard files", index.display())
            }
            names.into_iter().map(|n| dir.join(n)).collect()
        } else {
            let single = dir.join(SINGLE);
            if !single.exists() {
                if dir.join("pytorch_model.bin").exists() {
                    fail!(WHAT, "{} holds pytorch_model.bin (pickle); only safetensors checkpoints are supported", dir.display())
                }
                fail!(WHAT, "no {SINGLE} or {INDEX} in {}", dir.display())
            }
            vec![single]
        };
        for f in &files {
            if !f.exists() {
                fail!(WHAT, "shard {} (listed in {INDEX}) is missing", f.display())
            }
            // Each file checked on its own so a bad one is named (truncated headers, a data
            // section shorter than the header says).
            // SAFETY: the file is mapped read-only; like every mmap, its contents must not be
            // changed by another process while the checkpoint is in use.
            unsafe { MmapedSafetensors::new(f) }.map_err(|e| {
                crate::util::err(
                    WHAT,
                    format!(
                        "{} is not a valid safetensors file (truncated or corrupt?): {e}",
                        f.display()
                    ),
                )
            })?;
        }
        // SAFETY: as above.
        let st = unsafe { MmapedSafetensors::multi(&files) }
            .context(WHAT, "cannot map the checkpoint")?;
        Ok(Self { st, files })
    }

    /// The files backing this checkpoint.
    pub fn files(&self) -> &[PathBuf] {
        &self.files
    }

    /// Whether a tensor named `name` exists.
    pub fn contains(&self, name: &str) -> bool {
        self.st.get(name).is_ok()
    }

    /// Every tensor name.
    pub fn names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.st.tensors().into_iter().map(|(n, _)| n).collect();
        v.sort();
        v
    }

    /// Tensor `name`, checked to have `shape`, converted to `dtype` on `device`.
    pub fn get(
        &self,
        name: &str,
        shape: &[usize],
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        let view = match self.st.get(name) {
            Ok(v) => v,
            Err(_) => fail!(WHAT, "tensor {name:?} is missing from {}", self.describe()),
        };
        if view.shape() != shape {
            fail!(
                WHAT,
                "tensor {name:?} has shape {:?}, expected {shape:?}",
                view.shape()
            )
        }
        let t = self
            .st
            .load(name, &Device::Cpu)
            .context(WHAT, format!("cannot load tensor {name:?}"))?;
        t.to_dtype(dtype)?.to_device(device)
    }

    fn describe(&self) -> String {
        match self.files.as_slice() {
            [one] => one.display().to_string(),
            many => format!(
                "the {} shards in {}",
                many.len(),
                many[0]
                    .parent()
                    .map(|p| p.display().to_string())
                    .unwrap_or_default()
            ),
        }
    }
}
