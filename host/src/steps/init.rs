//! `kind = "init"`: a new Llama model from scratch — a config from the step's parameters, weights drawn
//! as transformers initialises them (seeded), and the built-in byte-level tokenizer — written as a Hugging
//! Face folder. The starting point of the quickstart (tiny model → pretrain on synthetic text → …).
//!
//! ```toml
//! [steps.tiny]
//! kind = "init"
//! hidden_size = 64
//! intermediate_size = 176
//! num_hidden_layers = 4
//! num_attention_heads = 4
//! ```

use crate::data::derive_seed;
use crate::model::tokenizer::{BYTE_BOS, BYTE_EOS, BYTE_PAD, BYTE_VOCAB};
use crate::model::{init_trainable, save_model, LlamaConfig, SaveOptions, Tokenizer};
use anyhow::Result;
use candle_core::{DType, Device};
use dusflow_core::step::StepContext;
use dusflow_core::step::{ArtifactKind, CheckContext, ConfigIssue, InputSlots, StepKind};
use serde::{Deserialize, Serialize};

/// Parameters of an `init` step (names as in `config.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InitConfig {
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Width of the MLP.
    pub intermediate_size: usize,
    /// Decoder layers.
    pub num_hidden_layers: usize,
    /// Attention heads.
    pub num_attention_heads: usize,
    /// Key/value heads (grouped-query attention); default = `num_attention_heads`.
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    /// Longest sequence the model is meant for.
    #[serde(default = "InitConfig::default_max_position_embeddings")]
    pub max_position_embeddings: usize,
    /// Share the embedding matrix with the output head.
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// Standard deviation of the initial weights.
    #[serde(default = "InitConfig::default_initializer_range")]
    pub initializer_range: f64,
    /// Seed offset, combined with the workflow seed.
    #[serde(default)]
    pub seed: u64,
    /// Embedding rows; default the byte-level tokenizer's 259. A larger value gives a model the size of one
    /// with a real vocabulary (e.g. 32000 for a Mistral-shaped memory or speed test); the rows past the
    /// tokenizer's are never produced by it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vocab_size: Option<usize>,
}

impl InitConfig {
    fn default_max_position_embeddings() -> usize {
        2048
    }
    fn default_initializer_range() -> f64 {
        0.02
    }

    /// The model config: byte-level vocabulary and special-token ids.
    pub fn llama_config(&self) -> LlamaConfig {
        let mut cfg = LlamaConfig::tiny(
            self.vocab_size.unwrap_or(BYTE_VOCAB),
            self.hidden_size,
            self.intermediate_size,
            self.num_hidden_layers,
            self.num_attention_heads,
            self.num_key_value_heads.unwrap_or(self.num_attention_heads),
        );
        cfg.max_position_embeddings = self.max_position_embeddings;
        cfg.tie_word_embeddings = self.tie_word_embeddings;
        cfg.initializer_range = self.initializer_range;
        cfg.bos_token_id = Some(BYTE_BOS);
        cfg.eos_token_id = Some(crate::model::config::TokenIds::One(BYTE_EOS));
        cfg.pad_token_id = Some(BYTE_PAD);
        cfg
    }
}

/// The `init` step kind.
pub struct InitStep;

impl StepKind for InitStep {
    type Config = InitConfig;

    fn name(&self) -> &'static str {
        "init"
    }

    fn inputs(&self) -> InputSlots {
        InputSlots::Fixed(&[])
    }

    fn output(&self, _: &InitConfig) -> ArtifactKind {
        ArtifactKind::Model
    }

    fn check(&self, c: &InitConfig, _: &dyn CheckContext) -> Vec<ConfigIssue> {
        if c.vocab_size.is_some_and(|v| v < BYTE_VOCAB) {
            return vec![ConfigIssue::new(
                "vocab_size",
                format!("must be at least the byte-level tokenizer's {BYTE_VOCAB}"),
            )];
        }
        match c.llama_config().validate() {
            Ok(()) => Vec::new(),
            Err(e) => vec![ConfigIssue::new("", format!("{e:#}"))],
        }
    }

    fn run(&self, c: &InitConfig, ctx: &StepContext) -> Result<()> {
        let cfg = c.llama_config();
        let seed = derive_seed(ctx.settings.seed, &format!("init/{}", c.seed));
        let (_, model) = init_trainable(&cfg, seed, DType::F32, &Device::Cpu)?;
        let staging = ctx.out_dir.join(".model");
        let opts = SaveOptions {
            dtype: crate::device::candle_dtype(ctx.settings.dtype),
            replace: true,
            ..Default::default()
        };
        save_model(&staging, &model, &opts)?;
        for entry in std::fs::read_dir(&staging)? {
            let entry = entry?;
            std::fs::rename(entry.path(), ctx.out_dir.join(entry.file_name()))?;
        }
        std::fs::remove_dir(&staging)?;
        Tokenizer::save_byte_level(&ctx.out_dir)?;
        Ok(())
    }
}
