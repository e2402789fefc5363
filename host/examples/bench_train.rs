//! Training throughput of dusflow's loop on CPU (the Rust half of `host/examples/bench_train.py`, which
//! runs transformers + torch AdamW on the same model and tokens and prints the ratio).
//!
//! `cargo run --example bench_train -- MODEL_DIR TOKENS_FILE BATCH SEQ STEPS WARMUP [lora:R:ALPHA]`
//! TOKENS_FILE holds little-endian u32 token ids (at least BATCH·SEQ·(STEPS+WARMUP)). With `lora:R:ALPHA` an
//! adapter of rank R on every linear layer trains on the frozen model instead (no dropout). Prints one JSON
//! line.

use anyhow::{ensure, Context, Result};
use candle_core::Device;
use dusflow::data::TrainSequence;
use dusflow::train::load_for_training;
use dusflow::train::{AdamWConfig, ComputeDType};

#[path = "support/timed_training.rs"]
mod timed_training;
use timed_training::timed_training;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    ensure!(
        args.len() == 6 || args.len() == 7,
        "usage: bench_train MODEL_DIR TOKENS_FILE BATCH SEQ STEPS WARMUP [lora:R:ALPHA]"
    );
    let num = |i: usize| -> Result<usize> {
        args[i]
            .parse()
            .with_context(|| format!("argument {}", i + 1))
    };
    let (batch, seq, steps, warmup) = (num(2)?, num(3)?, num(4)?, num(5)?);
    let bytes = std::fs::read(&args[1]).with_context(|| format!("reading {}", args[1]))?;
    let ids: Vec<u32> = bytes
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    let total = steps + warmup;
    ensure!(ids.len() >= batch * seq * total, "not enough tokens");
    let rows: Vec<TrainSequence> = ids[..batch * seq * total]
        .chunks_exact(seq)
        .map(|r| TrainSequence {
            ids: r.to_vec(),
            learn: vec![true; seq],
            doc_ids: None,
        })
        .collect();

    let adamw = AdamWConfig {
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.0,
        ..Default::default()
    };
    let (model, mut opt) = match args.get(6) {
        None => load_for_training(args[0].as_ref(), ComputeDType::F32, adamw, &Device::Cpu)?,
        Some(lora) => {
            let parts: Vec<&str> = lora.split(':').collect();
            ensure!(
                parts.len() == 3 && parts[0] == "lora",
                "expected lora:R:ALPHA, got {lora}"
            );
            let settings: dusflow::model::lora::LoraSettings =
                serde_json::from_value(serde_json::json!({
                    "r": parts[1].parse::<usize>()?,
                    "alpha": parts[2].parse::<f64>()?,
                    "targets": "all-linear",
                }))?;
            let (model, opt, _) = dusflow::train::load_for_lora_training(
                args[0].as_ref(),
                ComputeDType::F32,
                &settings,
                None,
                0,
                adamw,
                &Device::Cpu,
            )?;
            (model, opt)
        }
    };
    let run = timed_training(&model, &mut opt, &rows, batch, warmup)?;
    let timed = run.timed_seconds.unwrap_or(run.total_seconds);
    let tokens = (batch * seq * steps) as f64;
    println!(
        "{}",
        serde_json::json!({
            "impl": "dusflow",
            "tokens_per_s": tokens / timed,
            "seconds": timed,
            "steps": steps,
            "first_loss": run.losses.first(),
            "last_loss": run.losses.last(),
        })
    );
    Ok(())
}
