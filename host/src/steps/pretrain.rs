//! `kind = "pretrain"`: continued pretraining (DUS step 2) — text datasets, tokenised with EOS per
//! document, packed into `seq_len` blocks, causal LM loss; output a Hugging Face model folder.
//!
//! ```toml
//! [steps.pretrain]
//! kind = "pretrain"
//! inputs = { model = "scale", data = ["corpus"] }
//! lr = 3e-4
//! seq_len = 256
//! micro_batch = 8
//! grad_accum = 2
//! max_steps = 200
//! ```

use crate::data::{load_mixture, pack_documents, tokenize_document, RecordFormat};
use crate::steps::training::TrainStepConfig;
use crate::steps::training::{
    check_filter_plugins, dependencies, plugin_filters, progress_observer, resolve_inputs,
    train_model,
};
use anyhow::{bail, Result};
use dusflow_core::step::StepContext;
use dusflow_core::step::{
    ArtifactKind, CheckContext, ConfigIssue, Dependencies, InputSlot, InputSlots, Resources,
    StepKind,
};

/// The `pretrain` step kind.
pub struct PretrainStep;

/// Inputs of the training kinds: one model, one or more datasets.
pub const TRAIN_INPUTS: &[InputSlot] = &[
    InputSlot {
        name: "model",
        accepts: &[ArtifactKind::Model],
        many: false,
        required: true,
    },
    InputSlot {
        name: "data",
        accepts: &[ArtifactKind::Dataset],
        many: true,
        required: true,
    },
];

impl StepKind for PretrainStep {
    type Config = TrainStepConfig;

    fn name(&self) -> &'static str {
        "pretrain"
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
        if c.packing {
            issues.push(ConfigIssue::new(
                "packing",
                "pretraining always packs; use separate_documents to keep documents apart",
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
        let mixture = load_mixture(
            &inputs.sources,
            &mut filters,
            inputs.seed,
            &[RecordFormat::Text],
        )?;
        let mut docs = Vec::with_capacity(mixture.examples.len());
        for e in &mixture.examples {
            if let crate::data::Example::Text(text) = e {
                docs.push(tokenize_document(&inputs.tokenizer, text)?);
            }
        }
        let rows = pack_documents(&docs, c.seq_len, c.separate_documents);
        if rows.is_empty() {
            let tokens: usize = docs.iter().map(Vec::len).sum();
            bail!(
                "the data has {tokens} tokens, fewer than one block of seq_len = {}",
                c.seq_len
            );
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
