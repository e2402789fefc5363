//! Parameters of a `dpo` step: the preference loss, the sDPO chunking, sequence limits, and the training
//! keys of [`TrainStepConfig`] (converted to it, so checks and step counts are shared).

use crate::data::TemplateChoice;
use crate::steps::training::{OptimizerKind, TrainStepConfig};
use crate::steps::ConfigIssue;
use crate::train::dpo::{DpoLossConfig, DpoLossKind, PairLimits};
use crate::train::{ComputeDType, ScheduleKind};
use serde::{Deserialize, Serialize};

/// How the preference data is split into the sDPO chunks D_1..D_T.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ChunkBy {
    /// One chunk per `data` input, in the order given (the paper); `chunks` must equal their number.
    #[default]
    Dataset,
    /// All pairs shuffled with the step's seed, then cut into `chunks` contiguous parts.
    Random,
    /// Easy to hard: all pairs sorted by the initial model's log-prob margin
    /// `log p(chosen) − log p(rejected)`, largest (easiest) first, ties in data order, then cut.
    Margin,
}

/// Parameters of a `dpo` step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DpoStepConfig {
    /// β of the loss.
    #[serde(default = "DpoStepConfig::default_beta")]
    pub beta: f64,
    /// `sigmoid` (default), `ipo`, `hinge` or `robust`.
    #[serde(default)]
    pub loss: DpoLossKind,
    /// ε: assumed fraction of flipped preference labels (`sigmoid`, `robust`).
    #[serde(default)]
    pub label_smoothing: f64,
    /// T: sDPO stages (1 = plain DPO).
    #[serde(default = "DpoStepConfig::default_chunks")]
    pub chunks: usize,
    /// How the data is split into chunks when `chunks > 1`.
    #[serde(default)]
    pub chunk_by: ChunkBy,
    /// Prompt + completion tokens at most (TRL's default 1024; the start is kept).
    #[serde(default = "DpoStepConfig::default_max_length")]
    pub max_length: Option<usize>,
    /// Prompt tokens at most (the end is kept, and a leading BOS); none by default.
    #[serde(default)]
    pub max_prompt_length: Option<usize>,
    /// Peak learning rate (TRL's default 1e-6).
    #[serde(default = "DpoStepConfig::default_lr")]
    pub lr: f64,
    /// Decay after warmup: `cosine`, `linear` or `constant`.
    #[serde(default)]
    pub schedule: ScheduleKind,
    /// Warmup optimizer steps per stage.
    #[serde(default)]
    pub warmup_steps: Option<usize>,
    /// Warmup as a fraction of a stage's steps.
    #[serde(default)]
    pub warmup_ratio: Option<f64>,
    /// Passes over each chunk (default 1).
    #[serde(default)]
    pub epochs: Option<usize>,
    /// Optimizer steps per stage (overrides `epochs`).
    #[serde(default)]
    pub max_steps: Option<usize>,
    /// Pairs per forward pass (each pair is two rows: chosen and rejected); also the reference pass batch.
    #[serde(default = "TrainStepConfig::default_micro_batch")]
    pub micro_batch: usize,
    /// Micro-batches per optimizer step.
    #[serde(default = "TrainStepConfig::default_grad_accum")]
    pub grad_accum: usize,
    /// AdamW decoupled weight decay (matrices only).
    #[serde(default)]
    pub weight_decay: f64,
    /// AdamW (β₁, β₂).
    #[serde(default = "TrainStepConfig::default_betas")]
    pub betas: [f64; 2],
    /// AdamW ε.
    #[serde(default = "TrainStepConfig::default_eps")]
    pub eps: f64,
    /// Global gradient-norm clip (0 = off).
    #[serde(default = "TrainStepConfig::default_clip")]
    pub clip: f64,
    /// Seed offset, combined with the workflow seed.
    #[serde(default)]
    pub seed: u64,
    /// Checkpoint every this many optimizer steps (0 = never).
    #[serde(default = "TrainStepConfig::default_checkpoint_every")]
    pub checkpoint_every: usize,
    /// With `inputs.eval_data`: score the held-out pairs every this many optimizer steps of each stage (0:
    /// after each stage's last step), against that stage's reference; logged as `eval_loss` and
    /// `eval_rewards/…` (TRL's names).
    #[serde(default, skip_serializing_if = "crate::steps::training::is_zero")]
    pub eval_every: usize,
    /// Compute precision.
    #[serde(default)]
    pub dtype: ComputeDType,
    /// Train a LoRA adapter (see the training keys); sDPO's stages continue the same adapter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lora: Option<crate::model::lora::LoraSettings>,
    /// Recompute each decoder layer in the backward pass instead of keeping its activations.
    #[serde(default)]
    pub gradient_checkpointing: bool,
    /// `adamw` or `adamw_8bit` (see the training keys).
    #[serde(default)]
    pub optimizer: OptimizerKind,
    /// Keep f32 master weights when computing in bf16 (`false`: stochastic rounding).
    #[serde(default = "TrainStepConfig::default_true")]
    pub master_weights: bool,
    /// Shuffle pairs every epoch.
    #[serde(default = "TrainStepConfig::default_true")]
    pub shuffle: bool,
    /// Parameters of the data-filter plugins the datasets name, by plugin name.
    #[serde(default)]
    pub filter_params: indexmap::IndexMap<String, serde_json::Value>,
    /// How `orca-dpo` and `ultrafeedback` pairs are rendered: `auto` (the model's chat template, else
    /// ChatML), `model`, `chatml` or `alpaca`.
    #[serde(default, skip_serializing_if = "TemplateChoice::is_auto")]
    pub template: TemplateChoice,
    /// Devices to train on (see the training keys); not part of the cache key.
    #[serde(default, skip_serializing)]
    pub devices: Option<crate::distributed::Devices>,
    /// ZeRO stage, 0 or 1 (see the training keys); not part of the cache key.
    #[serde(default, skip_serializing)]
    pub zero: u8,
}

impl DpoStepConfig {
    fn default_beta() -> f64 {
        0.1
    }
    fn default_chunks() -> usize {
        1
    }
    fn default_max_length() -> Option<usize> {
        Some(1024)
    }
    fn default_lr() -> f64 {
        1e-6
    }

    /// The training keys as a [`TrainStepConfig`] (`seq_len` = `max_length`).
    pub fn train_config(&self) -> TrainStepConfig {
        TrainStepConfig {
            lr: self.lr,
            schedule: self.schedule,
            warmup_steps: self.warmup_steps,
            warmup_ratio: self.warmup_ratio,
            epochs: self.epochs,
            max_steps: self.max_steps,
            micro_batch: self.micro_batch,
            grad_accum: self.grad_accum,
            seq_len: self.max_length.unwrap_or(usize::MAX),
            weight_decay: self.weight_decay,
            betas: self.betas,
            eps: self.eps,
            clip: self.clip,
            seed: self.seed,
            checkpoint_every: self.checkpoint_every,
            eval_every: self.eval_every,
            packing: false,
            separate_documents: false,
            dtype: self.dtype,
            optimizer: self.optimizer,
            master_weights: self.master_weights,
            lora: self.lora.clone(),
            gradient_checkpointing: self.gradient_checkpointing,
            shuffle: self.shuffle,
            filter_params: self.filter_params.clone(),
            template: self.template,
            devices: self.devices,
            zero: self.zero,
        }
    }

    /// The loss settings.
    pub fn loss_config(&self) -> DpoLossConfig {
        DpoLossConfig {
            kind: self.loss,
            beta: self.beta,
            label_smoothing: self.label_smoothing,
        }
    }

    /// The sequence limits.
    pub fn limits(&self) -> PairLimits {
        PairLimits {
            max_length: self.max_length,
            max_prompt_length: self.max_prompt_length,
        }
    }

    /// Range and combination checks; `data_inputs` is the number of `data` artifacts when known.
    pub fn issues(&self, data_inputs: Option<usize>) -> Vec<ConfigIssue> {
        let mut out: Vec<ConfigIssue> = self
            .train_config()
            .issues()
            .into_iter()
            .map(|i| {
                if i.key == "seq_len" {
                    ConfigIssue::new("max_length", i.message)
                } else {
                    i
                }
            })
            .collect();
        let mut need = |ok: bool, key: &str, msg: String| {
            if !ok {
                out.push(ConfigIssue::new(key, msg));
            }
        };
        need(
            self.beta > 0.0 && self.beta.is_finite(),
            "beta",
            "must be positive".into(),
        );
        need(
            (0.0..0.5).contains(&self.label_smoothing),
            "label_smoothing",
            "must be in [0, 0.5)".into(),
        );
        need(
            self.label_smoothing == 0.0
                || matches!(self.loss, DpoLossKind::Sigmoid | DpoLossKind::Robust),
            "label_smoothing",
            "applies to the sigmoid and robust losses only".into(),
        );
        need(self.chunks >= 1, "chunks", "must be at least 1".into());
        if let (ChunkBy::Dataset, Some(n)) = (self.chunk_by, data_inputs) {
            need(
                self.chunks == 1 || self.chunks == n,
                "chunks",
                format!(
                    "is {} but chunk_by = \"dataset\" makes one chunk per data input, and there are {n} \
                     (set chunks = {n}, or chunk_by = \"random\" or \"margin\")",
                    self.chunks
                ),
            );
        }
        need(
            self.max_prompt_length.is_none_or(|p| p >= 1),
            "max_prompt_length",
            "must be at least 1".into(),
        );
        need(
            match (self.max_prompt_length, self.max_length) {
                (Some(p), Some(m)) => p < m,
                _ => true,
            },
            "max_prompt_length",
            "must be below max_length (no room is left for completions)".into(),
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The training keys `dpo` repeats from [`TrainStepConfig`] (serde cannot flatten a struct into a
    /// `deny_unknown_fields` one) cannot drift: every key of one is a key of the other with the same default,
    /// but for the keys listed here with why.
    #[test]
    fn dpo_repeats_every_training_key_with_the_same_default() {
        // Keys of the language-model kinds only: packing and document separation make no sense for pairs,
        // and DPO's sequence limit is `max_length`.
        let lm_only = ["packing", "separate_documents", "seq_len"];
        // Keys with DPO's own default: TRL's learning rate (1e-6).
        let own_default = ["lr"];
        // Keys of DPO only.
        let dpo_only = [
            "beta",
            "loss",
            "label_smoothing",
            "chunks",
            "chunk_by",
            "max_length",
            "max_prompt_length",
        ];
        let train = serde_json::to_value(toml::from_str::<TrainStepConfig>("").unwrap()).unwrap();
        let dpo = serde_json::to_value(toml::from_str::<DpoStepConfig>("").unwrap()).unwrap();
        let (train, dpo) = (train.as_object().unwrap(), dpo.as_object().unwrap());
        for (key, default) in train {
            if lm_only.contains(&key.as_str()) {
                assert!(!dpo.contains_key(key), "{key} is listed as LM-only");
                continue;
            }
            let Some(dpo_default) = dpo.get(key) else {
                panic!("training key `{key}` is missing from DpoStepConfig");
            };
            if !own_default.contains(&key.as_str()) {
                assert_eq!(dpo_default, default, "default of `{key}` differs");
            }
        }
        for key in dpo.keys() {
            assert!(
                train.contains_key(key) || dpo_only.contains(&key.as_str()),
                "`{key}` is neither a training key nor listed as DPO-only"
            );
        }
        // And every repeated key reaches the training config.
        let tuned: DpoStepConfig = toml::from_str(
            "micro_batch = 3\ngrad_accum = 5\nweight_decay = 0.1\nclip = 0.5\nshuffle = false\n\
             checkpoint_every = 7\neval_every = 2\neps = 1e-6\nbetas = [0.8, 0.9]\nschedule = \"linear\"\n\
             optimizer = \"adamw_8bit\"\nmaster_weights = false\ngradient_checkpointing = true\n\
             lora = { r = 4, alpha = 8.0 }\n\
             warmup_steps = 2\nepochs = 4\nmax_steps = 9\nseed = 3\ndtype = \"bf16\"",
        )
        .unwrap();
        // The execution keys (devices, zero) are not serialised (not part of the cache key): checked apart.
        let executed: DpoStepConfig = toml::from_str("devices = \"all\"\nzero = 1").unwrap();
        let train_exec: TrainStepConfig = toml::from_str("devices = \"all\"\nzero = 1").unwrap();
        assert_eq!(executed.train_config().devices, train_exec.devices);
        assert_eq!(executed.train_config().zero, train_exec.zero);
        let defaults: DpoStepConfig = toml::from_str("").unwrap();
        let train_defaults: TrainStepConfig = toml::from_str("").unwrap();
        assert_eq!(
            (defaults.devices, defaults.zero),
            (train_defaults.devices, train_defaults.zero)
        );
        let converted = serde_json::to_value(tuned.train_config()).unwrap();
        let tuned = serde_json::to_value(&tuned).unwrap();
        for (key, value) in tuned.as_object().unwrap() {
            if train.contains_key(key) {
                assert_eq!(&converted[key], value, "`{key}` is not passed on");
            }
        }
    }
}
