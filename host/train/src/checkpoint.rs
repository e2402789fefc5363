//! Training checkpoints in the step's work folder: master weights, AdamW moments and the step counter,
//! written to a temporary folder, synced and renamed, so a crash leaves either the old or the new one.

use super::optimizer::{set_master, AdamW, Moment, Quantized8};
use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Where the loop stood when a checkpoint was written.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrainState {
    /// Optimizer steps completed.
    pub step: usize,
    /// Input tokens processed so far.
    pub tokens_seen: u64,
    /// Digest of the training options and data; a checkpoint of another run is refused.
    pub fingerprint: String,
}

const STATE_FILE: &str = "trainer_state.json";
const TENSORS_FILE: &str = "optimizer.safetensors";

/// Writes a checkpoint of `opt` and `state` under `root/step-NNNNNNNN/` atomically, then deletes older ones.
pub fn save_checkpoint(root: &Path, opt: &AdamW, state: &TrainState) -> Result<PathBuf> {
    std::fs::create_dir_all(root).with_context(|| format!("creating {}", root.display()))?;
    let name = format!("step-{:08}", state.step);
    let tmp = root.join(format!(".tmp-{name}"));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp)?;
    }
    std::fs::create_dir(&tmp)?;
    let mut tensors: HashMap<String, Tensor> = HashMap::with_capacity(opt.params.len() * 3);
    for p in &opt.params {
        tensors.insert(format!("master/{}", p.name), p.master.clone());
        for (kind, moment) in [("m", &p.m), ("v", &p.v)] {
            match moment {
                Moment::F32(t) => {
                    tensors.insert(format!("{kind}/{}", p.name), t.clone());
                }
                Moment::Blockwise8(q) => {
                    let dev = &Device::Cpu;
                    let codes = Tensor::from_vec(q.codes.clone(), q.codes.len(), dev)?;
                    let absmax = Tensor::from_vec(q.absmax.clone(), q.absmax.len(), dev)?;
                    tensors.insert(format!("{kind}.codes/{}", p.name), codes);
                    tensors.insert(format!("{kind}.absmax/{}", p.name), absmax);
                }
            }
        }
    }
    candle_core::safetensors::save(&tensors, tmp.join(TENSORS_FILE))?;
    std::fs::write(tmp.join(STATE_FILE), serde_json::to_vec_pretty(state)?)?;
    for f in [TENSORS_FILE, STATE_FILE] {
        std::fs::File::open(tmp.join(f))?.sync_all()?;
    }
    let dst = root.join(&name);
    if dst.exists() {
        std::fs::remove_dir_all(&dst)?;
    }
    std::fs::rename(&tmp, &dst)
        .with_context(|| format!("publishing checkpoint {}", dst.display()))?;
    std::fs::File::open(root)?.sync_all()?;
    for (old, _) in list_checkpoints(root)? {
        if old != dst {
            std::fs::remove_dir_all(&old)
                .with_context(|| format!("removing old checkpoint {}", old.display()))?;
        }
    }
    Ok(dst)
}

/// Completed checkpoints under `root`, oldest first.
pub fn list_checkpoints(root: &Path) -> Result<Vec<(PathBuf, usize)>> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(root) else {
        return Ok(out);
    };
    for e in entries {
        let path = e?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if let Some(step) = name
            .strip_prefix("step-")
            .and_then(|s| s.parse::<usize>().ok())
        {
            if path.join(STATE_FILE).is_file() {
                out.push((path, step));
            }
        }
    }
    out.sort_by_key(|(_, s)| *s);
    Ok(out)
}

/// The newest completed checkpoint under `root`, if any.
pub fn latest_checkpoint(root: &Path) -> Result<Option<PathBuf>> {
    Ok(list_checkpoints(root)?.pop().map(|(p, _)| p))
}

/// Restores `opt` (masters, compute weights, moments, step count) from checkpoint folder `dir`.
pub fn load_checkpoint(dir: &Path, opt: &mut AdamW, device: &Device) -> Result<TrainState> {
    let state: TrainState = serde_json::from_slice(&std::fs::read(dir.join(STATE_FILE))?)
        .with_context(|| format!("reading {}", dir.join(STATE_FILE).display()))?;
    let mut tensors = candle_core::safetensors::load(dir.join(TENSORS_FILE), device)
        .with_context(|| format!("reading {}", dir.join(TENSORS_FILE).display()))?;
    for p in &mut opt.params {
        let shape = p.master.dims().to_vec();
        let mut take = |key: String, want: &[usize]| -> Result<Tensor> {
            match tensors.remove(&key) {
                Some(t) if t.dims() == want => Ok(t),
                Some(t) => bail!(
                    "checkpoint {}: {key} has shape {:?}, expected {:?}",
                    dir.display(),
                    t.dims(),
                    want
                ),
                None => bail!("checkpoint {}: missing {key}", dir.display()),
            }
        };
        let w = take(format!("master/{}", p.name), &shape)?;
        for kind in ["m", "v"] {
            let moment = if kind == "m" { &mut p.m } else { &mut p.v };
            match moment {
                Moment::F32(t) => *t = take(format!("{kind}/{}", p.name), &shape)?,
                Moment::Blockwise8(q) => {
                    let codes = take(format!("{kind}.codes/{}", p.name), &[q.codes.len()])?;
                    let absmax = take(format!("{kind}.absmax/{}", p.name), &[q.absmax.len()])?;
                    *q = Quantized8 {
                        codes: codes.to_vec1::<u8>()?,
                        absmax: absmax.to_vec1::<f32>()?,
                        signed: q.signed,
                        root: q.root,
                    };
                }
            }
        }
        // Without masters the checkpoint holds the variable's own (bf16) weights.
        let w = w.to_dtype(p.master.dtype())?;
        set_master(p, w)?;
    }
    opt.steps = state.step;
    Ok(state)
}
