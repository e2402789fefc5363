//! Evaluation throughput: documents per second of one task on a model folder, as dusflow scores it.
//!
//!   cargo run --release -p dusflow --example bench_eval -- MODEL_DIR TASK_DATA TASK NUM_FEWSHOT [MODE] [BATCH]
//!
//! `scripts/bench-eval.py` runs this and lm-evaluation-harness (HF backend) on the same model and documents
//! and prints both rates and their ratio. Timing covers reading the task data, building prompts and
//! scoring; loading the model is excluded (as for the harness, whose model is loaded before timing).

use anyhow::{Context, Result};
use dusflow::eval::evaluate::{evaluate_task, EvalOptions};
use dusflow::eval::tasks::{BuiltinOptions, TaskSpec};
use dusflow::eval::{Extraction, Mode, Scorer, TaskData};
use dusflow::model::{load_model, Tokenizer};
use std::path::PathBuf;
use std::time::Instant;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    anyhow::ensure!(
        args.len() >= 4,
        "usage: bench_eval MODEL_DIR TASK_DATA TASK NUM_FEWSHOT [leaderboard-v1|harness] [BATCH]"
    );
    let model_dir = PathBuf::from(&args[0]);
    let data_path = PathBuf::from(&args[1]);
    let task = &args[2];
    let k: usize = args[3].parse().context("NUM_FEWSHOT")?;
    let mode = match args.get(4).map(String::as_str) {
        None | Some("harness") => Mode::Harness,
        Some("leaderboard-v1") => Mode::LeaderboardV1,
        Some(other) => anyhow::bail!("unknown mode {other}"),
    };
    let batch: usize = args.get(5).map(|b| b.parse()).transpose()?.unwrap_or(8);
    let model = load_model(
        &model_dir,
        candle_core::DType::F32,
        &candle_core::Device::Cpu,
    )?;
    let tokenizer = Tokenizer::from_model_dir(&model_dir)?;
    let mut spec = TaskSpec::builtin(
        task,
        BuiltinOptions {
            mode,
            gsm8k_colon_stop: true,
        },
    )?;
    spec.num_fewshot = k;
    let opts = EvalOptions {
        mode,
        limit: None,
        extraction: Extraction::Strict,
    };
    for prefix_reuse in [true, false] {
        let scorer = Scorer {
            model: &model,
            tokenizer: &tokenizer,
            add_special_tokens: mode == Mode::Harness,
            max_length: model.config().max_position_embeddings,
            batch_size: batch,
            prefix_reuse,
            cancelled: None,
        };
        let start = Instant::now();
        let data = TaskData::load(&data_path)?;
        let result = evaluate_task(&spec, &data, &scorer, &opts, &mut |_| {})?;
        let secs = start.elapsed().as_secs_f64();
        println!(
            "dusflow {task} {k}-shot prefix_reuse={prefix_reuse} batch={batch}: {} docs in {secs:.2} s = {:.2} docs/s ({} = {:.4})",
            result.num_docs,
            result.num_docs as f64 / secs,
            result.metric,
            result.score
        );
    }
    Ok(())
}
