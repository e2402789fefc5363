//! dusflow's integration tests, one binary with a module per area (one link of wasmtime, candle and
//! parquet instead of one per file). `common` holds the engine tests' step kinds and the shared helpers,
//! `plugins_common` the plugin tests' host and fixtures.

mod chat_templates;
mod cli;
mod common;
mod data_sources;
mod distributed;
mod dpo;
mod engine;
mod eval_metrics;
mod eval_parity;
mod eval_random;
mod eval_step;
mod examples;
mod fuzz;
mod golden;
mod inputs;
mod lora;
mod lora_training;
mod merge_mergekit;
mod merge_parity;
mod merge_step;
mod model_checkpoint;
mod model_config;
mod model_export;
mod model_generation;
mod model_grad;
mod model_parity;
mod model_tokenizer;
mod one_step;
mod plugins_cli;
mod plugins_common;
mod plugins_kinds;
mod plugins_languages;
mod plugins_run;
mod plugins_sandbox;
mod preference_pairs;
mod scale_mergekit;
mod scale_plugin;
mod scale_step;
mod seeds;
mod train_loop;
mod train_memory;
mod train_steps;
mod watch;
mod workflows;
