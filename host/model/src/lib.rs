//! The Llama/Mistral model family in candle: configs, checkpoints, tokenizers, forward passes (issue 3).
//!
//! - [`config`]: `config.json` ([`LlamaConfig`]), validated.
//! - [`tensor_store`]: reading one safetensors file or a sharded folder (positioned reads, checked headers);
//!   [`safetensors_header`]: the header reader.
//! - [`checkpoint_writer`]: canonical, streaming, sharded, atomic safetensors writing.
//! - [`weights`]: load a folder into a model (trainable or not), fresh initialisation, save a folder.
//! - [`llama`]: the network, with a differentiable training forward and a cached inference forward.
//! - [`attention`]: the fused attention op (forward and backward, CPU and CUDA) every forward calls.
//! - [`tokenizer`]: `tokenizer.json` via the `tokenizers` crate and a built-in byte-level tokenizer.
//! - [`chat_template`]: the folder's chat template (`chat_template.jinja` / `tokenizer_config.json`) and
//!   special-token strings, as transformers reads them.
//! - [`generation`]: batched generation and log-likelihood scoring.
//! - [`lora`]: LoRA adapters in PEFT's format, merged as PEFT merges them.
//! - [`device`]: the workflow's `device` and `dtype` choices as candle devices and dtypes.
//!
//! ```no_run
//! use candle_core::{DType, Device, Tensor};
//! use dusflow_model::{generate, load_model, ForwardOptions, GenerateOptions, Tokenizer};
//! # fn main() -> anyhow::Result<()> {
//! let dir = std::path::Path::new("models/tiny");
//! let model = load_model(dir, DType::F32, &Device::Cpu)?;
//! let tok = Tokenizer::from_model_dir(dir)?;
//! let ids = tok.encode("The capital of France is", true)?;
//! let logits = model.forward(&Tensor::new(ids.as_slice(), &Device::Cpu)?.unsqueeze(0)?, &ForwardOptions::default())?;
//! let out = generate(&model, &tok, &[ids], &GenerateOptions { max_new_tokens: 8, ..Default::default() })?;
//! println!("{:?} {}", logits.dims(), out[0].text);
//! # Ok(()) }
//! ```

pub mod attention;
pub mod chat_template;
pub mod checkpoint_writer;
pub mod config;
pub mod device;
pub mod fused;
pub mod generation;
pub mod in_place_writer;
pub mod llama;
pub mod lora;
pub mod safetensors_header;
pub mod tensor_store;
pub mod tokenizer;
pub mod weights;

#[cfg(test)]
mod test_support;

pub use attention::{attention, AttentionMask};
pub use chat_template::{read_chat_template, special_tokens_map, ModelChatTemplate};
pub use checkpoint_writer::{
    write_checkpoint, write_safetensors, ShardOptions, StagingDir, TensorSpec, WrittenCheckpoint,
};
pub use config::LlamaConfig;
pub use generation::{
    generate, loglikelihood, FinishReason, GenerateOptions, Generation, LogLikelihood, Sampling,
};
pub use llama::{document_ids, key_mask, packed_position_ids, ForwardOptions, KvCache, Llama};
pub use tensor_store::{TensorMeta, TensorStore};
pub use tokenizer::Tokenizer;
pub use weights::{
    check_weights, init_trainable, load_model, load_trainable, save_model, save_tensors,
    save_varmap, SaveOptions,
};
