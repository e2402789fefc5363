//! A model folder in, a trainable model out, and back: loading a Hugging Face folder for training (f32
//! masters, compute in f32 or bf16) and saving the trained weights as a Hugging Face folder.

use crate::optimizer::{set_master, AdamW, AdamWConfig};
use anyhow::{Context, Result};
use candle_core::{DType, Var};
use candle_nn::{VarBuilder, VarMap};
use dusflow_model::{load_trainable, save_tensors, Llama, LlamaConfig, SaveOptions};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// Compute precision of the forward/backward pass (masters and moments are always f32).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ComputeDType {
    /// 32-bit float (the right choice on CPU).
    #[default]
    F32,
    /// bfloat16 compute with f32 master weights.
    Bf16,
}

/// Saves the trained weights (the f32 masters, in `save_dtype`) as a Hugging Face folder at `dst`,
/// atomically, with the tokenizer files of `copy_from`. An existing `dst` is replaced.
pub fn save_trained(
    model: &Llama,
    opt: &AdamW,
    copy_from: &Path,
    dst: &Path,
    save_dtype: DType,
) -> Result<()> {
    let masters: std::collections::HashMap<&str, &candle_core::Tensor> = opt
        .params
        .iter()
        .map(|p| (p.name.as_str(), &p.master))
        .collect();
    let tensors: Vec<(String, candle_core::Tensor)> = model
        .named_weights()
        .into_iter()
        .map(|(n, t)| {
            (
                n.clone(),
                masters.get(n.as_str()).map(|m| (*m).clone()).unwrap_or(t),
            )
        })
        .collect();
    let save = SaveOptions {
        dtype: save_dtype,
        copy_from: Some(copy_from.to_path_buf()),
        replace: true,
        ..Default::default()
    };
    save_tensors(dst, model.config(), &tensors, &save)?;
    Ok(())
}

/// Moves every entry of folder `src` into `dst` (same file system), then removes `src`.
pub fn move_contents(src: &Path, dst: &Path) -> Result<()> {
    for entry in std::fs::read_dir(src).with_context(|| format!("reading {}", src.display()))? {
        let entry = entry?;
        let to = dst.join(entry.file_name());
        std::fs::rename(entry.path(), &to)
            .with_context(|| format!("moving {} to {}", entry.path().display(), to.display()))?;
    }
    std::fs::remove_dir(src)?;
    Ok(())
}

/// Loads a model folder for training: f32 master weights; compute variables in `compute` precision.
pub fn load_for_training(
    dir: &Path,
    compute: ComputeDType,
    adamw: AdamWConfig,
    device: &candle_core::Device,
) -> Result<(Llama, AdamW)> {
    let (varmap, model) = load_trainable(dir, DType::F32, device)?;
    match compute {
        ComputeDType::F32 => Ok((model, AdamW::new(sorted_vars(&varmap), adamw)?)),
        ComputeDType::Bf16 => {
            let cfg = LlamaConfig::from_path(dir)?;
            let masters = sorted_vars(&varmap);
            let half = VarMap::new();
            {
                let mut data = half.data().lock().expect("varmap lock");
                for (name, var) in &masters {
                    data.insert(name.clone(), Var::from_tensor(&var.to_dtype(DType::BF16)?)?);
                }
            }
            let model = Llama::new(&cfg, VarBuilder::from_varmap(&half, DType::BF16, device))?;
            let mut opt = AdamW::new(sorted_vars(&half), adamw)?;
            if adamw.masters {
                // The f32 weights as read, not their bf16 rounding.
                for (p, (_, master)) in opt.params.iter_mut().zip(&masters) {
                    set_master(p, master.as_tensor().clone())?;
                }
            }
            Ok((model, opt))
        }
    }
}

/// The variables of `varmap`, sorted by name (a fixed order for the optimizer and checkpoints).
pub fn sorted_vars(varmap: &VarMap) -> Vec<(String, Var)> {
    let data = varmap.data().lock().expect("varmap lock");
    let mut vars: Vec<(String, Var)> = data.iter().map(|(n, v)| (n.clone(), v.clone())).collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    vars
}
