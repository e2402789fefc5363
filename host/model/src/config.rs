//! `config.json` of a Hugging Face Llama-family model, validated for what our implementation supports.

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// Architectures (the `architectures` entry of `config.json`) this implementation runs.
pub const SUPPORTED_ARCHITECTURES: &[&str] = &["LlamaForCausalLM", "MistralForCausalLM"];

/// One token id or several (`eos_token_id` may be a list in newer checkpoints).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TokenIds {
    /// A single id.
    One(u32),
    /// Several ids, any of which plays the role.
    Many(Vec<u32>),
}

impl TokenIds {
    /// All ids as a list.
    pub fn to_vec(&self) -> Vec<u32> {
        match self {
            TokenIds::One(id) => vec![*id],
            TokenIds::Many(ids) => ids.clone(),
        }
    }
}

/// A Llama/Mistral `config.json`. Field names are exactly those of the file; keys we do not model are kept in
/// `extra` so that rewriting a config (e.g. changing `num_hidden_layers`) preserves everything else.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LlamaConfig {
    /// Model classes, e.g. `["LlamaForCausalLM"]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub architectures: Option<Vec<String>>,
    /// `"llama"` or `"mistral"`.
    #[serde(default = "default_model_type")]
    pub model_type: String,
    /// Vocabulary size (rows of the embedding).
    pub vocab_size: usize,
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Width of the SwiGLU MLP.
    pub intermediate_size: usize,
    /// Number of decoder layers.
    pub num_hidden_layers: usize,
    /// Number of query heads.
    pub num_attention_heads: usize,
    /// Number of key/value heads (GQA); defaults to `num_attention_heads`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_key_value_heads: Option<usize>,
    /// Per-head width; defaults to `hidden_size / num_attention_heads`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head_dim: Option<usize>,
    /// Activation of the MLP gate; only `"silu"` is supported.
    #[serde(default = "default_hidden_act")]
    pub hidden_act: String,
    /// Longest sequence the model was configured for.
    #[serde(default = "default_max_positions")]
    pub max_position_embeddings: usize,
    /// Standard deviation of the normal initialisation of fresh weights.
    #[serde(default = "default_initializer_range")]
    pub initializer_range: f64,
    /// Epsilon of RMSNorm.
    #[serde(default = "default_rms_norm_eps")]
    pub rms_norm_eps: f64,
    /// RoPE base (legacy top-level form; newer transformers write it inside `rope_parameters`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_theta: Option<f64>,
    /// Legacy RoPE scaling block; only absent/null or `{"rope_type": "default"}` is supported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_scaling: Option<serde_json::Value>,
    /// RoPE parameters as written by transformers 5 (`{"rope_type": "default", "rope_theta": ...}`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_parameters: Option<serde_json::Value>,
    /// Whether `lm_head` shares the embedding matrix.
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// Begin-of-sequence token id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bos_token_id: Option<u32>,
    /// End-of-sequence token id(s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eos_token_id: Option<TokenIds>,
    /// Padding token id, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pad_token_id: Option<u32>,
    /// Biases on the attention projections; unsupported when true.
    #[serde(default)]
    pub attention_bias: bool,
    /// Biases on the MLP projections; unsupported when true.
    #[serde(default)]
    pub mlp_bias: bool,
    /// Mistral sliding-window attention width (`null` = full causal attention).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sliding_window: Option<usize>,
    /// Every other key of the file, preserved verbatim.
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

fn default_model_type() -> String {
    "llama".into()
}
fn default_hidden_act() -> String {
    "silu".into()
}
fn default_max_positions() -> usize {
    2048
}
fn default_initializer_range() -> f64 {
    0.02
}
fn default_rms_norm_eps() -> f64 {
    1e-6
}

impl LlamaConfig {
    /// A small Llama config with the given shape, for models made from scratch (defaults as transformers).
    pub fn tiny(
        vocab_size: usize,
        hidden_size: usize,
        intermediate_size: usize,
        num_hidden_layers: usize,
        num_attention_heads: usize,
        num_key_value_heads: usize,
    ) -> Self {
        LlamaConfig {
            architectures: Some(vec!["LlamaForCausalLM".into()]),
            model_type: "llama".into(),
            vocab_size,
            hidden_size,
            intermediate_size,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads: Some(num_key_value_heads),
            head_dim: None,
            hidden_act: "silu".into(),
            max_position_embeddings: 2048,
            initializer_range: 0.02,
            rms_norm_eps: 1e-6,
            rope_theta: Some(10000.0),
            rope_scaling: None,
            rope_parameters: None,
            tie_word_embeddings: false,
            bos_token_id: None,
            eos_token_id: None,
            pad_token_id: None,
            attention_bias: false,
            mlp_bias: false,
            sliding_window: None,
            extra: Default::default(),
        }
    }

    /// Reads and validates `config.json` (a file, or a model folder containing one).
    pub fn from_path(path: &Path) -> Result<Self> {
        let file = if path.is_dir() {
            path.join("config.json")
        } else {
            path.to_path_buf()
        };
        let text = std::fs::read_to_string(&file)
            .with_context(|| format!("reading {}", file.display()))?;
        Self::from_json_str(&text).with_context(|| format!("in {}", file.display()))
    }

    /// Parses and validates the text of a `config.json`.
    pub fn from_json_str(text: &str) -> Result<Self> {
        let de = &mut serde_json::Deserializer::from_str(text);
        let cfg: LlamaConfig =
            serde_path_to_error::deserialize(de).context("invalid config.json")?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Pretty JSON as written to `config.json`.
    pub fn to_json_string(&self) -> Result<String> {
        Ok(serde_json::to_string_pretty(self)? + "\n")
    }

    /// Checks that the architecture and every option is one we implement, with a message saying what is not.
    pub fn validate(&self) -> Result<()> {
        if let Some(archs) = &self.architectures {
            for a in archs {
                if !SUPPORTED_ARCHITECTURES.contains(&a.as_str()) {
                    bail!(
                        "unsupported architecture {a:?}: dusflow runs {SUPPORTED_ARCHITECTURES:?}"
                    );
                }
            }
        }
        if !matches!(self.model_type.as_str(), "llama" | "mistral") {
            bail!(
                "unsupported model_type {:?}: dusflow runs \"llama\" and \"mistral\"",
                self.model_type
            );
        }
        if self.hidden_act != "silu" {
            bail!(
                "unsupported hidden_act {:?}: only \"silu\" (SwiGLU) is implemented",
                self.hidden_act
            );
        }
        if self.attention_bias || self.mlp_bias {
            bail!("attention_bias / mlp_bias = true is not supported (Llama and Mistral have no biases)");
        }
        for (name, v) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_kv_heads()),
        ] {
            if v == 0 {
                bail!("{name} must be positive");
            }
        }
        if self.head_dim.is_none() && !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            bail!(
                "hidden_size {} is not a multiple of num_attention_heads {}",
                self.hidden_size,
                self.num_attention_heads
            );
        }
        if !self.head_dim().is_multiple_of(2) {
            bail!("head_dim {} must be even for RoPE", self.head_dim());
        }
        if !self.num_attention_heads.is_multiple_of(self.num_kv_heads()) {
            bail!(
                "num_attention_heads {} is not a multiple of num_key_value_heads {}",
                self.num_attention_heads,
                self.num_kv_heads()
            );
        }
        check_rope_block("rope_scaling", self.rope_scaling.as_ref())?;
        check_rope_block("rope_parameters", self.rope_parameters.as_ref())?;
        if let Some(w) = self.sliding_window {
            if w == 0 {
                bail!("sliding_window must be positive or null");
            }
        }
        Ok(())
    }

    /// Number of key/value heads.
    pub fn num_kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    /// Per-head width.
    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads)
    }

    /// RoPE base: `rope_parameters.rope_theta`, else `rope_theta`, else 10000 (the transformers default).
    pub fn rope_base(&self) -> f64 {
        self.rope_parameters
            .as_ref()
            .and_then(|p| p.get("rope_theta"))
            .and_then(|v| v.as_f64())
            .or(self.rope_theta)
            .unwrap_or(10000.0)
    }

    /// The checkpoint's declared dtype (`dtype`, or legacy `torch_dtype`), if it is one candle computes in.
    pub fn declared_dtype(&self) -> Option<candle_core::DType> {
        let name = self
            .extra
            .get("dtype")
            .or_else(|| self.extra.get("torch_dtype"))?
            .as_str()?;
        match name {
            "float32" => Some(candle_core::DType::F32),
            "bfloat16" => Some(candle_core::DType::BF16),
            "float16" => Some(candle_core::DType::F16),
            _ => None,
        }
    }

    /// End-of-sequence ids (possibly several, possibly none).
    pub fn eos_ids(&self) -> Vec<u32> {
        self.eos_token_id
            .as_ref()
            .map(TokenIds::to_vec)
            .unwrap_or_default()
    }

    /// Every weight the model needs, with its shape, in the order of the model's layers.
    pub fn weight_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let (h, i, v) = (self.hidden_size, self.intermediate_size, self.vocab_size);
        let q = self.num_attention_heads * self.head_dim();
        let kv = self.num_kv_heads() * self.head_dim();
        let mut out = vec![("model.embed_tokens.weight".to_string(), vec![v, h])];
        for l in 0..self.num_hidden_layers {
            let p = format!("model.layers.{l}");
            out.push((format!("{p}.input_layernorm.weight"), vec![h]));
            out.push((format!("{p}.self_attn.q_proj.weight"), vec![q, h]));
            out.push((format!("{p}.self_attn.k_proj.weight"), vec![kv, h]));
            out.push((format!("{p}.self_attn.v_proj.weight"), vec![kv, h]));
            out.push((format!("{p}.self_attn.o_proj.weight"), vec![h, q]));
            out.push((format!("{p}.post_attention_layernorm.weight"), vec![h]));
            out.push((format!("{p}.mlp.gate_proj.weight"), vec![i, h]));
            out.push((format!("{p}.mlp.up_proj.weight"), vec![i, h]));
            out.push((format!("{p}.mlp.down_proj.weight"), vec![h, i]));
        }
        out.push(("model.norm.weight".to_string(), vec![h]));
        if !self.tie_word_embeddings {
            out.push(("lm_head.weight".to_string(), vec![v, h]));
        }
        out
    }

    /// Total number of parameters (tied embeddings counted once).
    pub fn num_parameters(&self) -> usize {
        self.weight_shapes()
            .iter()
            .map(|(_, s)| s.iter().product::<usize>())
            .sum()
    }
}

fn check_rope_block(key: &str, block: Option<&serde_json::Value>) -> Result<()> {
    let Some(block) = block else { return Ok(()) };
    if block.is_null() {
        return Ok(());
    }
    let kind = block
        .get("rope_type")
        .or_else(|| block.get("type"))
        .and_then(|t| t.as_str());
    match kind {
        None | Some("default") => {
            if let Some(f) = block.get("partial_rotary_factor").and_then(|f| f.as_f64()) {
                if f != 1.0 {
                    bail!("{key}.partial_rotary_factor = {f} is not supported (only full rotary embeddings)");
                }
            }
            Ok(())
        }
        Some(other) => bail!(
            "unsupported {key} type {other:?}: dusflow implements plain RoPE only (no linear/dynamic/yarn/llama3 scaling)"
        ),
    }
}
