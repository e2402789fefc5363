//! Evaluation: the Open LLM Leaderboard's six tasks (H6) scored the way lm-evaluation-harness scores
//! them, user tasks from TOML, and result tables.
//!
//! - [`pyrandom`]: CPython's `random` (Mersenne Twister, `shuffle`, `sample`), for the harness's few-shot order.
//! - [`data`]: task data in Hugging Face field layouts from local JSONL files.
//! - [`prompts`]: the built-in tasks' prompt texts.
//! - [`tasks`]: task definitions (built-in and custom).
//! - [`fewshot`]: document order and few-shot selection per [`Mode`].
//! - [`scoring`]: log-likelihoods (batched, shared-prefix reuse), generation, rolling log-likelihood.
//! - [`metrics`]: acc, acc_norm, mc2, GSM8K extraction and exact match.
//! - [`evaluate`]: one task end to end, per-document records kept.
//! - [`tables`]: `results.json` / Markdown tables with the H6 average, and the comparison bar chart.
//! - [`harness_results`]: the same results in lm-evaluation-harness 0.4's results-file layout.

pub mod data;
pub mod evaluate;
pub mod fewshot;
pub mod harness_results;
pub mod metrics;
pub mod prompts;
pub mod pyrandom;
pub mod scoring;
pub mod tables;
pub mod tasks;

pub use data::TaskData;
pub use evaluate::{evaluate_task, DocRecord, EvalOptions, Progress, TaskResult};
pub use fewshot::Mode;
pub use metrics::Extraction;
pub use pyrandom::PyRandom;
pub use scoring::Scorer;
pub use tables::{h6_average, markdown_table, Summary};
pub use tasks::{CustomTask, Metric, TaskSpec, H6};
