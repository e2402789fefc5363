//! A model folder in, a trainable model out, and back: loading a Hugging Face folder for training (f32
//! masters, compute in f32 or bf16) and saving the trained weights as a Hugging Face folder.

use crate::optimizer::{set_master, AdamW, AdamWConfig};
use anyhow::{Context, Result};
use candle_core::{DType, Var};
use candle_nn::{VarBuilder, VarMap};
use dusflow_model::lora::{Adapter, LoraSettings};
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

/// Loads model folder `dir` for LoRA training: the base weights frozen (plain tensors, not variables, so
/// they get no gradient and no optimizer state) in the compute dtype, and an adapter whose factors are f32
/// variables — fresh (PEFT's initialisation, from `seed`) or continued from the PEFT adapter folder
/// `start`. The optimizer holds the factors only, named as in PEFT's file
/// (`base_model.model.<module>.lora_A.weight`).
pub fn load_for_lora_training(
    dir: &Path,
    compute: ComputeDType,
    settings: &LoraSettings,
    start: Option<&Path>,
    seed: u64,
    adamw: AdamWConfig,
    device: &candle_core::Device,
) -> Result<(Llama, AdamW, Adapter)> {
    let dtype = match compute {
        ComputeDType::F32 => DType::F32,
        ComputeDType::Bf16 => DType::BF16,
    };
    let cfg = LlamaConfig::from_path(dir)?;
    let base = dusflow_model::load_model(dir, dtype, device)?;
    let mut adapter = match start {
        None => Adapter::init(&cfg, settings, seed, device)?,
        Some(folder) => {
            let a = Adapter::read(folder, &cfg, device)
                .with_context(|| format!("continuing the adapter in {}", folder.display()))?;
            anyhow::ensure!(
                a.settings.r == settings.r && a.layers.keys().eq(adapted_modules_of(&cfg, settings).iter()),
                "the adapter in {} (r = {}, {} layers) is not the one this step trains (r = {}, {} layers)",
                folder.display(),
                a.settings.r,
                a.layers.len(),
                settings.r,
                adapted_modules_of(&cfg, settings).len()
            );
            Adapter {
                settings: settings.clone(),
                layers: a.layers,
            }
        }
    };
    let mut vars = Vec::with_capacity(adapter.layers.len() * 2);
    for (module, pair) in adapter.layers.iter_mut() {
        let a = Var::from_tensor(&pair.a.to_dtype(DType::F32)?)?;
        let b = Var::from_tensor(&pair.b.to_dtype(DType::F32)?)?;
        pair.a = a.as_tensor().clone();
        pair.b = b.as_tensor().clone();
        vars.push((format!("base_model.model.{module}.lora_A.weight"), a));
        vars.push((format!("base_model.model.{module}.lora_B.weight"), b));
    }
    vars.sort_by(|x, y| x.0.cmp(&y.0));
    let model = base.with_adapter(&adapter)?;
    let opt = AdamW::new(vars, adamw)?;
    Ok((model, opt, adapter))
}

fn adapted_modules_of(cfg: &LlamaConfig, settings: &LoraSettings) -> Vec<String> {
    dusflow_model::lora::adapted_modules(cfg, &settings.targets)
}

/// Writes a LoRA run's result at `dst` (atomically, replacing it): the merged model (`W + scaling · B A`
/// as PEFT's `merge_and_unload` computes it, in the base checkpoint's dtype) with the tokenizer files of
/// `base_dir`, and the adapter itself in PEFT's format under `dst/adapter/` (`base_model` names the base
/// in its config).
pub fn save_lora_trained(
    base_dir: &Path,
    adapter: &Adapter,
    base_model: &str,
    dst: &Path,
) -> Result<()> {
    let cpu = candle_core::Device::Cpu;
    let cpu_adapter = Adapter {
        settings: adapter.settings.clone(),
        layers: adapter
            .layers
            .iter()
            .map(|(m, p)| {
                Ok((
                    m.clone(),
                    dusflow_model::lora::LoraPair {
                        a: p.a.to_device(&cpu)?.detach(),
                        b: p.b.to_device(&cpu)?.detach(),
                    },
                ))
            })
            .collect::<Result<_>>()?,
    };
    dusflow_model::lora::write_merged(base_dir, &cpu_adapter, dst)?;
    cpu_adapter.write(&dst.join(ADAPTER_PART), base_model)?;
    Ok(())
}

/// Where a LoRA step's adapter goes inside its artifact (the artifact part other steps name `STEP/adapter`).
pub const ADAPTER_PART: &str = "adapter";
