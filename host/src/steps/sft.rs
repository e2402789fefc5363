//! `kind = "sft"`: instruction tuning — Alpaca (exact Stanford template), prompt/completion, GSM8K, ARC and
//! chat records (the model's own chat template, or ChatML / SOLAR's Alpaca-styled template: `template`);
//! loss on response tokens only (assistant turns of conversations); padding or packing.
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

use super::training::{LmRows, LmTrainStep, TrainInputs, TrainStepConfig};
use crate::data::{pack_examples, tokenize_sft, Example, RecordFormat, Templates};
use crate::model::read_chat_template;
use crate::steps::{ConfigIssue, StepContext};
use anyhow::{bail, Context, Result};

/// The `sft` step kind.
pub type SftStep = LmTrainStep<Sft>;

/// The formats SFT trains on.
pub const SFT_FORMATS: &[RecordFormat] = &[
    RecordFormat::Alpaca,
    RecordFormat::PromptCompletion,
    RecordFormat::Gsm8k,
    RecordFormat::Arc,
    RecordFormat::Chat,
];

/// Instruction tuning's rows: each example rendered, tokenised with loss on its response only; packed
/// several to a row when `packing` is set.
#[derive(Default)]
pub struct Sft;

impl LmRows for Sft {
    const NAME: &'static str = "sft";
    // 2: chat records rendered with the `template` choice (the model's own chat template when it has one)
    // and tokenised whole, the loss on the assistant turns found by incremental rendering.
    // 3: attention through the fused op (issue 17): the same values up to float rounding.
    const VERSION: u32 = 3;
    const FORMATS: &'static [RecordFormat] = SFT_FORMATS;

    fn check(c: &TrainStepConfig) -> Vec<ConfigIssue> {
        if c.separate_documents {
            vec![ConfigIssue::new(
                "separate_documents",
                "is for pretrain; packed SFT examples are always kept apart",
            )]
        } else {
            Vec::new()
        }
    }

    fn rows(
        c: &TrainStepConfig,
        inputs: &TrainInputs,
        examples: &[Example],
        ctx: &StepContext,
    ) -> Result<Vec<crate::data::TrainSequence>> {
        let model_name = &ctx.input("model")?.name;
        let templates = Templates::resolve(
            c.template,
            read_chat_template(&inputs.model_dir)?.as_ref(),
            model_name,
        )?;
        tracing::info!(step = %ctx.step, "{}", templates.describe());
        let mut rows = Vec::with_capacity(examples.len());
        let mut truncated_away = 0usize;
        for (i, e) in examples.iter().enumerate() {
            let text = templates
                .sft(e)
                .with_context(|| format!("example {i} of the mixture"))?;
            let row = tokenize_sft(&inputs.tokenizer, &text, c.seq_len)?;
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
        Ok(rows)
    }
}
