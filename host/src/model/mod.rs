//! The Llama/Mistral model family in candle: configs, checkpoints, tokenizers, forward passes (issue 3).
