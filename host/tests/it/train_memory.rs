//! Peak memory of a CPU training step grows linearly with the sequence length (the fused attention keeps no
//! `(seq, seq)` tensor): a tiny model trained one step on 1k, 2k, 4k and 8k tokens, each in a child process
//! (this test binary again, running the ignored `training_step_child`) whose peak resident set (`VmHWM`)
//! it reports.

use candle_core::{DType, Device, Tensor};
use dusflow::model::{init_trainable, ForwardOptions, LlamaConfig};
use dusflow::train::{weighted_nll_sum, AdamW, AdamWConfig};
use std::process::Command;

const SEQ_VAR: &str = "DUSFLOW_MEMORY_PROBE_SEQ";

fn peak_rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .expect("VmHWM in /proc/self/status");
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// One training step (forward, loss, backward, AdamW) on a row of `$DUSFLOW_MEMORY_PROBE_SEQ` tokens;
/// prints the process's peak resident set. Run by `peak_memory_is_linear_in_sequence_length`.
#[test]
#[ignore = "child process of peak_memory_is_linear_in_sequence_length"]
fn training_step_child() {
    let Ok(seq) = std::env::var(SEQ_VAR) else {
        return;
    };
    let seq: usize = seq.parse().unwrap();
    let dev = Device::Cpu;
    let mut cfg = LlamaConfig::tiny(256, 64, 128, 2, 4, 2);
    cfg.max_position_embeddings = seq + 1;
    let (varmap, model) = init_trainable(&cfg, 3, DType::F32, &dev).unwrap();
    let vars = varmap
        .data()
        .lock()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let mut opt = AdamW::new(
        vars,
        AdamWConfig {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
            ..Default::default()
        },
    )
    .unwrap();
    let ids: Vec<u32> = (0..seq as u32 + 1).map(|i| (i * 7919) % 256).collect();
    let ids = Tensor::from_vec(ids, (1, seq + 1), &dev).unwrap();
    let logits = model
        .forward_train(&ids.narrow(1, 0, seq).unwrap(), &ForwardOptions::default())
        .unwrap();
    let targets = ids.narrow(1, 1, seq).unwrap().flatten_all().unwrap();
    let weights = Tensor::ones(seq, DType::F32, &dev).unwrap();
    let loss = (weighted_nll_sum(&logits, &targets, &weights).unwrap() / seq as f64).unwrap();
    drop(logits);
    let grads = loss.backward().unwrap();
    let grads = opt.f32_gradients(&grads).unwrap();
    opt.step(&grads, 1e-3).unwrap();
    println!("peak_rss_kib={}", peak_rss_kib());
}

#[test]
fn peak_memory_is_linear_in_sequence_length() {
    let exe = std::env::current_exe().unwrap();
    let peak = |seq: usize| -> f64 {
        let out = Command::new(&exe)
            .args([
                "train_memory::training_step_child",
                "--exact",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(SEQ_VAR, seq.to_string())
            .env("RAYON_NUM_THREADS", "2")
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "child at {seq} tokens failed: {stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        stdout
            .split("peak_rss_kib=")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .unwrap_or_else(|| panic!("no peak in the child's output: {stdout}"))
            .parse::<f64>()
            .unwrap()
            / 1024.0
    };
    let mib: Vec<(usize, f64)> = [1024, 2048, 4096, 8192]
        .into_iter()
        .map(|s| (s, peak(s)))
        .collect();
    eprintln!("peak RSS (MiB) by sequence length: {mib:?}");
    // Each doubling of the sequence adds about twice what the previous one added (quadratic attention
    // memory would add four times as much: 64 MiB more per head at 4k → 8k in f32 for each score copy).
    let steps: Vec<f64> = mib.windows(2).map(|w| w[1].1 - w[0].1).collect();
    assert!(
        steps[0] > 1.0,
        "the step at 2k tokens should need more memory than at 1k: {mib:?}"
    );
    for w in steps.windows(2) {
        assert!(
            w[1] < 2.8 * w[0],
            "memory grows faster than linearly: increments {steps:?} MiB ({mib:?})"
        );
    }
    // And the absolute level stays that of the activations: at 8k tokens this model's linear terms are
    // ~100 MiB; a single f32 copy of the scores would be 4 heads × 8192² × 4 B = 1 GiB.
    assert!(
        mib[3].1 - mib[0].1 < 600.0,
        "8k tokens need {} MiB more than 1k",
        mib[3].1 - mib[0].1
    );
}
