//! `kind = "sft"`: instruction tuning — Alpaca (exact Stanford template), prompt/completion, GSM8K, ARC and
//! chat (ChatML) records; loss on response tokens only; EOS appended; padding or packing.
//!
//! ```toml
//! [steps.sft]
//! kind = "sft"
//! inputs = { model = "pretrain", data = ["alpaca", "math"] }
//! lr = 2e-5
//! seq_len = 512
//! packing = true
//! epochs = 3
//! ```

use super::pretrain::TRAIN_INPUTS;
use crate::data::{load_mixture, pack_examples, sft_segments, tokenize_segments, RecordFormat};
use crate::steps::training::TrainStepConfig;
use crate::steps::training::{
    check_filter_plugins, dependencies, plugin_filters, progress_observer, resolve_inputs,
    train_model,
};
use anyhow::{bail, Result};
use dusflow_core::step::StepContext;
use dusflow_core::step::{
    ArtifactKind, CheckContext, ConfigIssue, Dependencies, InputSlots, Resources, StepKind,
};

/// The formats SFT trains on.
pub const SFT_FORMATS: &[RecordFormat] = &[
    RecordFormat::Alpaca,
    RecordFormat::PromptCompletion,
    RecordFormat::Gsm8k,
    RecordFormat::Arc,
    RecordFormat::Chat,
];

/// The `sft` step kind.
pub struct SftStep;

impl StepKind for SftStep {
    type Config = TrainStepConfig;

    fn name(&self) -> &'static str {
        "sft"
    }

    fn version(&self) -> u32 {
        2 // 2: attention through the fused op (issue 17): the same values up to float rounding
    }

    fn inputs(&self) -> InputSlots {
        InputSlots::Fixed(TRAIN_INPUTS)
    }

    fn output(&self, _: &TrainStepConfig) -> ArtifactKind {
        ArtifactKind::Model
    }

    fn check(&self, c: &TrainStepConfig, ctx: &dyn CheckContext) -> Vec<ConfigIssue> {
        let mut issues = c.issues();
        issues.extend(check_filter_plugins(&c.filter_params, ctx));
        if c.separate_documents {
            issues.push(ConfigIssue::new(
                "separate_documents",
                "is for pretrain; packed SFT examples are always kept apart",
            ));
        }
        issues
    }

    fn dependencies(&self, c: &TrainStepConfig) -> Dependencies {
        dependencies(&c.filter_params)
    }

    fn resources(&self, _: &TrainStepConfig) -> Resources {
        Resources {
            exclusive_device: true,
        }
    }

    fn resumable(&self) -> bool {
        true
    }

    fn run(&self, c: &TrainStepConfig, ctx: &StepContext) -> Result<()> {
        let inputs = resolve_inputs(c, ctx)?;
        let mut filters = plugin_filters(&c.filter_params, ctx);
        let mixture = load_mixture(&inputs.sources, &mut filters, inputs.seed, SFT_FORMATS)?;
        let mut rows = Vec::with_capacity(mixture.examples.len());
        let mut truncated_away = 0usize;
        for e in &mixture.examples {
            let row = tokenize_segments(&inputs.tokenizer, &sft_segments(e)?, c.seq_len)?;
            if row.target_count() > 0 {
                rows.push(row);
            } else {
                truncated_away += 1;
            }
        }
        if truncated_away > 0 {
            tracing::warn!(
                step = %ctx.step,
                "{truncated_away} examples have no response token within seq_len = {} and are not used",
                c.seq_len
            );
        }
        if rows.is_empty() {
            bail!(
                "no SFT example has a response token within seq_len = {}",
                c.seq_len
            );
        }
        if c.packing {
            rows = pack_examples(rows, c.seq_len);
        }
        let pad = inputs
            .tokenizer
            .pad_id()
            .or(inputs.tokenizer.eos_id())
            .unwrap_or(0);
        let device = crate::device::select_device(ctx.settings.device)?;
        let mut observer = progress_observer(ctx);
        train_model(
            c,
            &format!("{}: training loss", ctx.step),
            &inputs.model_dir,
            &rows,
            pad,
            inputs.seed,
            &mixture.reports,
            crate::device::candle_dtype(ctx.settings.dtype),
            &device,
            &ctx.out_dir,
            &mut observer,
        )?;
        Ok(())
    }
}
