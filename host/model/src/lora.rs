//! LoRA adapters in PEFT's on-disk format: what a training step writes beside its merged model and what
//! users load elsewhere (`peft.PeftModel.from_pretrained`), and base + adapter merged exactly as PEFT's
//! `merge_and_unload` computes it.
//!
//! PEFT's files: `adapter_config.json` (`peft_type = "LORA"`, `r`, `lora_alpha`, `target_modules`, …) and
//! `adapter_model.safetensors` with, per adapted linear layer `<module>` (e.g.
//! `model.layers.0.self_attn.q_proj`), `base_model.model.<module>.lora_A.weight` of shape (r, in) and
//! `base_model.model.<module>.lora_B.weight` of shape (out, r). The layer computes
//! `x Wᵀ + scaling · dropout(x) Aᵀ Bᵀ` with `scaling = lora_alpha / r` (`lora_alpha / √r` with rsLoRA).

use crate::config::LlamaConfig;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

/// The linear layers of a Llama/Mistral decoder layer, by their module names (PEFT's `target_modules`).
pub const LINEAR_MODULES: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

/// The adapter file names PEFT reads and writes.
pub const ADAPTER_CONFIG: &str = "adapter_config.json";
/// See [`ADAPTER_CONFIG`].
pub const ADAPTER_WEIGHTS: &str = "adapter_model.safetensors";

const KEY_PREFIX: &str = "base_model.model.";

/// Which linear layers get an adapter, as PEFT users write it: a list of module names (a module matches when
/// its full name is the target or ends with `.target`), or `"all-linear"` (every linear layer of the decoder
/// layers; not `lm_head`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum LoraTargets {
    /// `"all-linear"`.
    All(AllLinear),
    /// Module names.
    Names(Vec<String>),
}

/// The string `"all-linear"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum AllLinear {
    /// `"all-linear"`.
    #[serde(rename = "all-linear")]
    AllLinear,
}

impl Default for LoraTargets {
    fn default() -> Self {
        LoraTargets::Names(
            ["q_proj", "k_proj", "v_proj", "o_proj"]
                .map(String::from)
                .to_vec(),
        )
    }
}

impl LoraTargets {
    /// Whether the linear layer `module` (full name, e.g. `model.layers.3.mlp.up_proj`) is adapted.
    pub fn matches(&self, module: &str) -> bool {
        match self {
            LoraTargets::All(_) => {
                module.starts_with("model.layers.")
                    && LINEAR_MODULES
                        .iter()
                        .any(|m| module.ends_with(&format!(".{m}")))
            }
            LoraTargets::Names(names) => names
                .iter()
                .any(|t| module == t || module.ends_with(&format!(".{t}"))),
        }
    }
}

/// The `lora = { ... }` table of a training step (PEFT's names in parentheses).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoraSettings {
    /// Rank (`r`).
    pub r: usize,
    /// Scale numerator (`lora_alpha`); the update is scaled by `alpha / r`.
    #[serde(default = "LoraSettings::default_alpha")]
    pub alpha: f64,
    /// Dropout on the adapter's input while training (`lora_dropout`).
    #[serde(default)]
    pub dropout: f64,
    /// Adapted layers (`target_modules`): names or `"all-linear"`; default the attention projections.
    #[serde(default)]
    pub targets: LoraTargets,
    /// rsLoRA: scale by `alpha / √r` (`use_rslora`).
    #[serde(default)]
    pub rslora: bool,
}

impl LoraSettings {
    fn default_alpha() -> f64 {
        16.0
    }

    /// The factor applied to `B A`.
    pub fn scaling(&self) -> f64 {
        if self.rslora {
            self.alpha / (self.r as f64).sqrt()
        } else {
            self.alpha / self.r as f64
        }
    }

    /// Range checks: (key, message) pairs.
    pub fn issues(&self) -> Vec<(&'static str, String)> {
        let mut out = Vec::new();
        if self.r == 0 {
            out.push(("r", "must be at least 1".to_string()));
        }
        if !(self.alpha.is_finite() && self.alpha > 0.0) {
            out.push(("alpha", "must be positive".to_string()));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            out.push(("dropout", "must be in [0, 1)".to_string()));
        }
        if let LoraTargets::Names(names) = &self.targets {
            if names.is_empty() {
                out.push(("targets", "names no layer".to_string()));
            }
            for n in names {
                let last = n.rsplit('.').next().unwrap_or(n);
                if !LINEAR_MODULES.contains(&last) {
                    out.push((
                        "targets",
                        format!(
                            "{n:?} is not a linear layer of the model (its layers: {}, or \"all-linear\")",
                            LINEAR_MODULES.join(", ")
                        ),
                    ));
                }
            }
        }
        out
    }
}

/// The full names of the adapted linear layers of a model with `cfg`, in layer order.
pub fn adapted_modules(cfg: &LlamaConfig, targets: &LoraTargets) -> Vec<String> {
    let mut out = Vec::new();
    for layer in 0..cfg.num_hidden_layers {
        for m in LINEAR_MODULES {
            let group = if ["gate_proj", "up_proj", "down_proj"].contains(&m) {
                "mlp"
            } else {
                "self_attn"
            };
            let name = format!("model.layers.{layer}.{group}.{m}");
            if targets.matches(&name) {
                out.push(name);
            }
        }
    }
    out
}

/// (out, in) of linear layer `module` in a model with `cfg`.
pub fn module_shape(cfg: &LlamaConfig, module: &str) -> Result<(usize, usize)> {
    let q = cfg.num_attention_heads * cfg.head_dim();
    let kv = cfg.num_kv_heads() * cfg.head_dim();
    let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
    let last = module.rsplit('.').next().unwrap_or(module);
    Ok(match last {
        "q_proj" => (q, h),
        "k_proj" | "v_proj" => (kv, h),
        "o_proj" => (h, q),
        "gate_proj" | "up_proj" => (i, h),
        "down_proj" => (h, i),
        other => bail!("{module:?}: {other:?} is not a linear layer of a Llama/Mistral model"),
    })
}

/// One adapted layer's factors, f32.
#[derive(Debug, Clone)]
pub struct LoraPair {
    /// (r, in).
    pub a: Tensor,
    /// (out, r).
    pub b: Tensor,
}

/// A LoRA adapter: its settings and one [`LoraPair`] per adapted layer, by full module name.
#[derive(Debug, Clone)]
pub struct Adapter {
    /// r, alpha, dropout, targets.
    pub settings: LoraSettings,
    /// Factors by module name (e.g. `model.layers.0.self_attn.q_proj`).
    pub layers: BTreeMap<String, LoraPair>,
}

/// `adapter_config.json` as PEFT writes it (the keys we read; others are kept when rewriting is not needed).
#[derive(Debug, Clone, Deserialize)]
struct PeftConfig {
    peft_type: String,
    r: usize,
    lora_alpha: f64,
    #[serde(default)]
    lora_dropout: f64,
    target_modules: TargetModules,
    #[serde(default)]
    use_rslora: bool,
    #[serde(default)]
    use_dora: bool,
    #[serde(default = "PeftConfig::default_bias")]
    bias: String,
    #[serde(default)]
    fan_in_fan_out: bool,
    #[serde(default)]
    modules_to_save: Option<Vec<String>>,
    #[serde(default)]
    layers_to_transform: Option<serde_json::Value>,
    #[serde(default)]
    rank_pattern: BTreeMap<String, serde_json::Value>,
    #[serde(default)]
    alpha_pattern: BTreeMap<String, serde_json::Value>,
    #[serde(default)]
    lora_bias: bool,
}

impl PeftConfig {
    fn default_bias() -> String {
        "none".into()
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum TargetModules {
    List(Vec<String>),
    Pattern(String),
}

impl Adapter {
    /// Fresh factors for the adapted layers of a model with `cfg`, initialised as PEFT does by default:
    /// A Kaiming-uniform (a = √5, i.e. U(−1/√in, 1/√in)), B zero — so the adapted model starts equal to the
    /// base.
    pub fn init(
        cfg: &LlamaConfig,
        settings: &LoraSettings,
        seed: u64,
        device: &Device,
    ) -> Result<Self> {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let mut layers = BTreeMap::new();
        for module in adapted_modules(cfg, &settings.targets) {
            let (out, inp) = module_shape(cfg, &module)?;
            let bound = 1.0 / (inp as f32).sqrt();
            let a: Vec<f32> = (0..settings.r * inp)
                .map(|_| rng.random_range(-bound..bound))
                .collect();
            let a = Tensor::from_vec(a, (settings.r, inp), device)?;
            let b = Tensor::zeros((out, settings.r), DType::F32, device)?;
            layers.insert(module, LoraPair { a, b });
        }
        if layers.is_empty() {
            bail!("the LoRA targets match no linear layer of the model");
        }
        Ok(Adapter {
            settings: settings.clone(),
            layers,
        })
    }

    /// Reads a PEFT LoRA adapter folder and checks it against the base model's config: every factor
    /// present with the rank and the layer's shape. PEFT options this implementation does not have
    /// (DoRA, trained biases, `modules_to_save`, per-layer ranks, …) are refused by name.
    pub fn read(dir: &Path, base: &LlamaConfig, device: &Device) -> Result<Self> {
        let config_path = dir.join(ADAPTER_CONFIG);
        let text = std::fs::read_to_string(&config_path)
            .with_context(|| format!("reading {}", config_path.display()))?;
        let cfg: PeftConfig = serde_json::from_str(&text)
            .with_context(|| format!("{}: not a PEFT adapter config", config_path.display()))?;
        let place = config_path.display();
        if cfg.peft_type != "LORA" {
            bail!(
                "{place}: peft_type is {:?}; only LORA adapters are supported",
                cfg.peft_type
            );
        }
        let refuse = |what: &str| -> Result<()> { bail!("{place}: {what} is not supported") };
        if cfg.use_dora {
            refuse("use_dora = true (DoRA)")?;
        }
        if cfg.bias != "none" || cfg.lora_bias {
            refuse(&format!("bias = {:?} (trained biases)", cfg.bias))?;
        }
        if cfg.fan_in_fan_out {
            refuse("fan_in_fan_out = true (Conv1D layers)")?;
        }
        if cfg.modules_to_save.as_ref().is_some_and(|m| !m.is_empty()) {
            refuse("modules_to_save (fully trained extra modules)")?;
        }
        if cfg
            .layers_to_transform
            .as_ref()
            .is_some_and(|v| !v.is_null())
        {
            refuse("layers_to_transform")?;
        }
        if !cfg.rank_pattern.is_empty() || !cfg.alpha_pattern.is_empty() {
            refuse("rank_pattern / alpha_pattern (per-layer ranks)")?;
        }
        let targets = match cfg.target_modules {
            TargetModules::List(names) => LoraTargets::Names(names),
            TargetModules::Pattern(p) if p == "all-linear" => {
                LoraTargets::All(AllLinear::AllLinear)
            }
            TargetModules::Pattern(p) => {
                bail!("{place}: target_modules is the pattern {p:?}; list the module names instead")
            }
        };
        let settings = LoraSettings {
            r: cfg.r,
            alpha: cfg.lora_alpha,
            dropout: cfg.lora_dropout,
            targets,
            rslora: cfg.use_rslora,
        };

        let weights_path = dir.join(ADAPTER_WEIGHTS);
        let mut tensors: HashMap<String, Tensor> =
            candle_core::safetensors::load(&weights_path, device)
                .with_context(|| format!("reading {}", weights_path.display()))?;
        let wplace = weights_path.display();
        let mut layers = BTreeMap::new();
        for module in adapted_modules(base, &settings.targets) {
            let (out, inp) = module_shape(base, &module)?;
            let mut take = |factor: &str, shape: (usize, usize)| -> Result<Tensor> {
                let key = format!("{KEY_PREFIX}{module}.{factor}.weight");
                let t = tensors
                    .remove(&key)
                    .with_context(|| format!("{wplace}: missing tensor {key}"))?;
                if t.dims() != [shape.0, shape.1] {
                    bail!(
                        "{wplace}: {key} has shape {:?}, expected [{}, {}] (r = {}, layer {out} x {inp})",
                        t.dims(),
                        shape.0,
                        shape.1,
                        settings.r
                    );
                }
                Ok(t.to_dtype(DType::F32)?)
            };
            let a = take("lora_A", (settings.r, inp))?;
            let b = take("lora_B", (out, settings.r))?;
            layers.insert(module, LoraPair { a, b });
        }
        if layers.is_empty() {
            bail!("{place}: target_modules match no linear layer of the base model");
        }
        if let Some(extra) = tensors.keys().min() {
            bail!(
                "{wplace}: tensor {extra} belongs to no adapted layer of the base model (is it the adapter \
                 of another model?)"
            );
        }
        Ok(Adapter { settings, layers })
    }

    /// Writes the adapter as PEFT does (`adapter_config.json`, `adapter_model.safetensors` with f32 factors
    /// and `format = pt` metadata), so `peft.PeftModel.from_pretrained(base, dir)` loads it.
    /// `base_model` goes into `base_model_name_or_path`.
    pub fn write(&self, dir: &Path, base_model: &str) -> Result<()> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let targets = match &self.settings.targets {
            LoraTargets::All(_) => serde_json::json!(self.layers.keys().collect::<Vec<_>>()),
            LoraTargets::Names(n) => serde_json::json!(n),
        };
        let config = serde_json::json!({
            "alpha_pattern": {},
            "auto_mapping": null,
            "base_model_name_or_path": base_model,
            "bias": "none",
            "fan_in_fan_out": false,
            "inference_mode": true,
            "init_lora_weights": true,
            "layers_pattern": null,
            "layers_to_transform": null,
            // PEFT types lora_alpha as an int; write whole numbers as one.
            "lora_alpha": if self.settings.alpha.fract() == 0.0 {
                serde_json::json!(self.settings.alpha as i64)
            } else {
                serde_json::json!(self.settings.alpha)
            },
            "lora_dropout": self.settings.dropout,
            "modules_to_save": null,
            "peft_type": "LORA",
            "r": self.settings.r,
            "rank_pattern": {},
            "revision": null,
            "target_modules": targets,
            "task_type": "CAUSAL_LM",
            "use_dora": false,
            "use_rslora": self.settings.rslora,
        });
        crate::checkpoint_writer::write_through_temp(&dir.join(ADAPTER_CONFIG), |tmp| {
            let text = serde_json::to_string_pretty(&config)? + "\n";
            std::fs::write(tmp, &text)?;
            Ok(text.len() as u64)
        })?;
        let mut named: Vec<(String, Vec<u8>, Vec<usize>)> = Vec::new();
        for (module, pair) in &self.layers {
            for (factor, t) in [("lora_A", &pair.a), ("lora_B", &pair.b)] {
                named.push((
                    format!("{KEY_PREFIX}{module}.{factor}.weight"),
                    crate::weights::tensor_bytes(t, DType::F32)?,
                    t.dims().to_vec(),
                ));
            }
        }
        let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = named
            .iter()
            .map(|(n, bytes, shape)| {
                Ok((
                    n.clone(),
                    safetensors::tensor::TensorView::new(
                        safetensors::Dtype::F32,
                        shape.clone(),
                        bytes,
                    )?,
                ))
            })
            .collect::<Result<_>>()?;
        let metadata: HashMap<String, String> = [("format".to_string(), "pt".to_string())].into();
        crate::checkpoint_writer::write_through_temp(&dir.join(ADAPTER_WEIGHTS), |tmp| {
            safetensors::serialize_to_file(views, Some(metadata), tmp)?;
            Ok(std::fs::metadata(tmp)?.len())
        })?;
        Ok(())
    }

    /// `scaling · B A` of `module` in f32, or `None` when the layer is not adapted. `B A` is summed over the
    /// rank in order with fused multiply-adds, as torch's CPU matmul does, so merges equal PEFT's bit for bit.
    pub fn delta(&self, module: &str) -> Result<Option<Tensor>> {
        let Some(pair) = self.layers.get(module) else {
            return Ok(None);
        };
        let (r, inp) = pair.a.dims2()?;
        let (out, _) = pair.b.dims2()?;
        let a = pair
            .a
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let b = pair
            .b
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let scaling = self.settings.scaling() as f32;
        let mut delta = vec![0f32; out * inp];
        use rayon::prelude::*;
        delta.par_chunks_mut(inp).enumerate().for_each(|(o, row)| {
            fma_row(row, &b[o * r..(o + 1) * r], &a, inp);
            for v in row.iter_mut() {
                *v *= scaling;
            }
        });
        Ok(Some(Tensor::from_vec(delta, (out, inp), pair.a.device())?))
    }

    /// The merged weight of linear layer `module`: `W + scaling · B A` as PEFT's `merge_and_unload`
    /// computes it with f32 factors (PEFT keeps adapter weights in f32 even on a bf16 base): the update in
    /// f32, added to `W` in f32 (`weight.data += delta` promotes), rounded once to `W`'s dtype. `W` itself
    /// when the layer is not adapted.
    pub fn merge_weight(&self, module: &str, weight: &Tensor) -> Result<Tensor> {
        match self.delta(module)? {
            None => Ok(weight.clone()),
            Some(delta) => {
                if delta.dims() != weight.dims() {
                    bail!(
                        "{module}: the adapter's update is {:?} but the weight is {:?}",
                        delta.dims(),
                        weight.dims()
                    );
                }
                let delta = delta.to_device(weight.device())?;
                Ok(weight
                    .to_dtype(DType::F32)?
                    .add(&delta)?
                    .to_dtype(weight.dtype())?)
            }
        }
    }
}

/// Writes `base_dir` with `adapter` merged into it (as `merge_and_unload`, in the base checkpoint's dtype)
/// as a Hugging Face folder at `dst`, atomically (replacing `dst`), with the base's tokenizer files.
pub fn write_merged(base_dir: &Path, adapter: &Adapter, dst: &Path) -> Result<()> {
    let cfg = LlamaConfig::from_path(base_dir)?;
    let store = crate::TensorStore::open(base_dir)?;
    let cpu = Device::Cpu;
    let mut dtype = DType::F32;
    let mut tensors = Vec::new();
    for (name, _) in cfg.weight_shapes() {
        if name == "lm_head.weight" && cfg.tie_word_embeddings {
            continue;
        }
        let w = store.tensor(&name, &cpu)?;
        if name == "model.embed_tokens.weight" {
            dtype = w.dtype();
        }
        let module = name.strip_suffix(".weight").unwrap_or(&name);
        let merged = adapter.merge_weight(module, &w)?;
        tensors.push((name, merged));
    }
    let save = crate::SaveOptions {
        dtype,
        copy_from: Some(base_dir.to_path_buf()),
        replace: true,
        ..Default::default()
    };
    crate::save_tensors(dst, &cfg, &tensors, &save)?;
    Ok(())
}

/// The model folder `base_dir` with the PEFT adapter in `adapter_dir` merged in, written at `dst` (see
/// [`write_merged`]); errors name the adapter folder.
pub fn merge_adapter_folder(base_dir: &Path, adapter_dir: &Path, dst: &Path) -> Result<()> {
    let cfg = LlamaConfig::from_path(base_dir)?;
    let adapter = Adapter::read(adapter_dir, &cfg, &Device::Cpu).with_context(|| {
        format!(
            "adapter {} for the model in {}",
            adapter_dir.display(),
            base_dir.display()
        )
    })?;
    write_merged(base_dir, &adapter, dst)
}

/// One row of `B A`: `row[j] = Σ_k b[k] a[k, j]`, accumulated in k order with fused multiply-adds starting
/// from the rounded first product.
fn fma_row(row: &mut [f32], b: &[f32], a: &[f32], inp: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("fma") && std::arch::is_x86_feature_detected!("avx2")
        {
            // SAFETY: the CPU has the features the function is compiled for (checked just above).
            unsafe { fma_row_avx2(row, b, a, inp) };
            return;
        }
    }
    fma_row_portable(row, b, a, inp);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn fma_row_avx2(row: &mut [f32], b: &[f32], a: &[f32], inp: usize) {
    // The same code as the portable one: compiled here with FMA, `mul_add` becomes vectorised vfmadd.
    fma_row_portable(row, b, a, inp)
}

#[inline(always)]
fn fma_row_portable(row: &mut [f32], b: &[f32], a: &[f32], inp: usize) {
    let Some((&b0, rest)) = b.split_first() else {
        row.fill(0.0);
        return;
    };
    for (v, &x) in row.iter_mut().zip(&a[..inp]) {
        *v = b0 * x;
    }
    for (k, &bk) in rest.iter().enumerate() {
        let a_k = &a[(k + 1) * inp..(k + 2) * inp];
        for (v, &x) in row.iter_mut().zip(a_k) {
            *v = bk.mul_add(x, *v);
        }
    }
}

/// The linear layer a checkpoint tensor name belongs to (`model.layers.0.mlp.up_proj.weight` →
/// `model.layers.0.mlp.up_proj`), for tensors of the adapted kind.
pub fn module_of(tensor_name: &str) -> Option<&str> {
    tensor_name.strip_suffix(".weight")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> LlamaConfig {
        LlamaConfig::tiny(259, 32, 64, 2, 4, 2)
    }

    #[test]
    fn targets_match_as_peft_matches_module_names() {
        let qv = LoraTargets::Names(vec!["q_proj".into(), "model.layers.1.mlp.up_proj".into()]);
        assert!(qv.matches("model.layers.0.self_attn.q_proj"));
        assert!(!qv.matches("model.layers.0.self_attn.k_proj"));
        assert!(qv.matches("model.layers.1.mlp.up_proj"));
        assert!(!qv.matches("model.layers.0.mlp.up_proj"));
        let all: LoraTargets = serde_json::from_str("\"all-linear\"").unwrap();
        assert_eq!(adapted_modules(&cfg(), &all).len(), 14);
        assert!(!all.matches("lm_head"));
        let bad = LoraSettings {
            r: 0,
            alpha: 16.0,
            dropout: 1.5,
            targets: LoraTargets::Names(vec!["qproj".into()]),
            rslora: false,
        };
        let keys: Vec<&str> = bad.issues().iter().map(|(k, _)| *k).collect();
        assert_eq!(keys, ["r", "dropout", "targets"]);
    }

    #[test]
    fn a_fresh_adapter_changes_nothing_and_round_trips_through_peft_files() {
        let settings = LoraSettings {
            r: 4,
            alpha: 8.0,
            dropout: 0.0,
            targets: LoraTargets::All(AllLinear::AllLinear),
            rslora: false,
        };
        let adapter = Adapter::init(&cfg(), &settings, 1, &Device::Cpu).unwrap();
        let w = Tensor::ones((32, 64), DType::F32, &Device::Cpu).unwrap();
        let merged = adapter
            .merge_weight("model.layers.0.mlp.down_proj", &w)
            .unwrap();
        assert_eq!(
            merged.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            vec![1.0; 32 * 64]
        );
        let dir = tempfile::tempdir().unwrap();
        adapter.write(dir.path(), "base").unwrap();
        let back = Adapter::read(dir.path(), &cfg(), &Device::Cpu).unwrap();
        assert_eq!(back.settings.r, 4);
        assert_eq!(back.layers.len(), 14);
        for (m, pair) in &adapter.layers {
            let other = &back.layers[m];
            let diff = (&pair.a - &other.a)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert_eq!(diff, 0.0, "{m}");
        }
    }
}
