//! Engine benchmark: `dus plan` time on a generated 200-step workflow, and watch latency
//! (file save -> first affected step starts).
//!
//! Run: `cargo run -p dusflow --example bench_engine` (add `--release` for release numbers).

use dusflow::engine::{self, Event, EventSink, RunOptions};
use std::fmt::Write;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

const STEPS: usize = 200;

fn generated_workflow() -> String {
    let mut w =
        String::from("[workflow]\nname = \"bench\"\n\n[datasets.data]\npath = \"data.txt\"\n\n");
    for i in 0..STEPS {
        let _ = writeln!(
            w,
            "[steps.s{i}]\nkind = \"command\"\nrun = [\"true\", \"{i}\"]"
        );
        let mut inputs = Vec::new();
        if i > 0 {
            inputs.push(format!("\"s{}\"", i - 1));
        }
        if i > 1 {
            inputs.push(format!("\"s{}\"", i / 2));
        }
        if i % 10 == 0 {
            inputs.push("\"data\"".to_string());
        }
        if !inputs.is_empty() {
            let _ = writeln!(w, "inputs = {{ prev = [{}] }}", inputs.join(", "));
        }
        w.push('\n');
    }
    w
}

async fn wait_finished(rx: &mut tokio::sync::mpsc::UnboundedReceiver<engine::Stamped>) {
    loop {
        let ev = tokio::time::timeout(Duration::from_secs(30), rx.recv())
            .await
            .expect("timeout")
            .expect("open");
        if matches!(ev.event, Event::RunFinished { .. }) {
            return;
        }
    }
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let registry = dusflow::steps::builtin_registry();
    let dir = tempfile::tempdir()?;
    std::fs::write(dir.path().join("data.txt"), "x".repeat(1 << 20))?;
    let flow = dir.path().join("bench.toml");
    std::fs::write(&flow, generated_workflow())?;
    let options = RunOptions::default();

    // Plan time: load + validate + hash + cache lookups. First call hashes the dataset cold.
    let mut times = Vec::new();
    for _ in 0..11 {
        let t = Instant::now();
        let wf = engine::load(&flow, &registry, &options)?;
        let plan = engine::plan_workflow(wf, &options)?;
        assert_eq!(plan.steps.len(), STEPS);
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let cold = times[0];
    let warm = median(&mut times[1..]);
    println!("plan, {STEPS}-step workflow: first {cold:.1} ms, median of 10 more {warm:.1} ms");

    // Watch latency.
    let wdir = tempfile::tempdir()?;
    std::fs::write(wdir.path().join("input.txt"), "0")?;
    let wflow = wdir.path().join("watch.toml");
    std::fs::write(
        &wflow,
        "[workflow]\nname = \"w\"\n[steps.a]\nkind = \"command\"\nrun = \"cat input.txt > $DUS_OUT/x\"\nfiles = [\"input.txt\"]\n[steps.b]\nkind = \"command\"\nrun = \"true\"\n",
    )?;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let opts = RunOptions {
        events: EventSink::default().with_channel(tx),
        ..RunOptions::default()
    };
    let shutdown = CancellationToken::new();
    let token = shutdown.clone();
    let reg = registry.clone();
    let wf2 = wflow.clone();
    let handle = tokio::spawn(async move { engine::watch::watch(&wf2, &reg, opts, token).await });
    wait_finished(&mut rx).await;
    let mut latencies = Vec::new();
    for i in 1..=10 {
        let t0 = Instant::now();
        std::fs::write(wdir.path().join("input.txt"), i.to_string())?;
        loop {
            let ev = tokio::time::timeout(Duration::from_secs(30), rx.recv())
                .await?
                .expect("open");
            if let Event::StepStarted { step, .. } = ev.event {
                assert_eq!(step, "a");
                latencies.push(t0.elapsed().as_secs_f64() * 1e3);
                break;
            }
        }
        wait_finished(&mut rx).await;
    }
    shutdown.cancel();
    handle.await??;
    let min = latencies.iter().cloned().fold(f64::INFINITY, f64::min);
    let max = latencies.iter().cloned().fold(0.0, f64::max);
    println!(
        "watch latency (save -> affected step starts), 10 edits: median {:.0} ms, min {min:.0} ms, max {max:.0} ms (debounce {} ms)",
        median(&mut latencies),
        engine::watch::DEBOUNCE.as_millis()
    );
    Ok(())
}
