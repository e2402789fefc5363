//! Forward throughput of our Llama implementation on CPU (no gradient), for comparison with transformers.
//! Run by `scripts/bench-model-forward.sh`; alone: `cargo bench -p dusflow --bench model_forward -- <model dir>
//! [batch] [seq] [repeats]`. Prints one line per forward kind: median and fastest run, seconds and tokens/s.

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use dusflow::model::{load_model, ForwardOptions, Llama};
use std::time::Instant;

/// (median, fastest) seconds over `repeats` timed runs after one warm-up run.
fn time_runs(repeats: usize, mut f: impl FnMut() -> Result<()>) -> Result<(f64, f64)> {
    f()?; // warm-up
    let mut times = Vec::with_capacity(repeats);
    for _ in 0..repeats {
        let t = Instant::now();
        f()?;
        times.push(t.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    Ok((times[times.len() / 2], times[0]))
}

fn input(model: &Llama, batch: usize, seq: usize) -> Result<Tensor> {
    // Same deterministic ids as the Python side: (i * 7919 + 13) % vocab.
    let vocab = model.config().vocab_size;
    let ids: Vec<u32> = (0..batch * seq)
        .map(|i| ((i * 7919 + 13) % vocab) as u32)
        .collect();
    Ok(Tensor::from_vec(ids, (batch, seq), model.device())?)
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let dir = args
        .first()
        .context("usage: model_forward <model dir> [batch] [seq] [repeats]")?;
    let batch: usize = args.get(1).map(|s| s.parse()).transpose()?.unwrap_or(4);
    let seq: usize = args.get(2).map(|s| s.parse()).transpose()?.unwrap_or(256);
    let repeats: usize = args.get(3).map(|s| s.parse()).transpose()?.unwrap_or(5);
    let model = load_model(std::path::Path::new(dir), DType::F32, &Device::Cpu)?;
    let ids = input(&model, batch, seq)?;
    let tokens = (batch * seq) as f64;
    let params = model.config().num_parameters();
    println!(
        "dusflow: {params} parameters, batch {batch} x seq {seq}, f32, {} threads",
        candle_core::utils::get_num_threads()
    );
    let opts = ForwardOptions::default();
    let (t, best) = time_runs(repeats, || {
        model.forward(&ids, &opts)?;
        Ok(())
    })?;
    println!(
        "dusflow inference forward (fused ops): median {t:.3} s = {:.0} tokens/s; best {best:.3} s = {:.0} tokens/s",
        tokens / t,
        tokens / best
    );
    let (t, best) = time_runs(repeats, || {
        model.forward_train(&ids, &opts)?;
        Ok(())
    })?;
    println!(
        "dusflow training forward (differentiable ops, graph kept, no backward): median {t:.3} s = {:.0} tokens/s; best {best:.3} s = {:.0} tokens/s",
        tokens / t,
        tokens / best
    );
    Ok(())
}
