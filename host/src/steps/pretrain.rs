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

use super::training::{LmRows, LmTrainStep, TrainInputs, TrainStepConfig};
use crate::data::{pack_documents, tokenize_document, Example, RecordFormat};
use crate::steps::{ConfigIssue, StepContext};
use anyhow::{bail, Result};

/// The `pretrain` step kind.
pub type PretrainStep = LmTrainStep<Pretrain>;

/// Continued pretraining's rows: every text document tokenised with EOS, packed into `seq_len` blocks.
#[derive(Default)]
pub struct Pretrain;

impl LmRows for Pretrain {
    const NAME: &'static str = "pretrain";
    // 2: attention through the fused op (issue 17): the same values up to float rounding.
    const VERSION: u32 = 2;
    const FORMATS: &'static [RecordFormat] = &[RecordFormat::Text];

    fn check(c: &TrainStepConfig) -> Vec<ConfigIssue> {
        let mut issues = Vec::new();
        if c.packing {
            issues.push(ConfigIssue::new(
                "packing",
                "pretraining always packs; use separate_documents to keep documents apart",
            ));
        }
        if !c.template.is_auto() {
            issues.push(ConfigIssue::new(
                "template",
                "is for sft and dpo; pretraining reads plain text",
            ));
        }
        issues
    }

    fn rows(
        c: &TrainStepConfig,
        inputs: &TrainInputs,
        examples: &[Example],
        _ctx: &StepContext,
    ) -> Result<Vec<crate::data::TrainSequence>> {
        let mut docs = Vec::with_capacity(examples.len());
        for e in examples {
            if let Example::Text(text) = e {
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
        Ok(rows)
    }
}
