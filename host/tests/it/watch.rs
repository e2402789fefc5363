//! Watch mode: after an edit, exactly the affected steps run again; an invalid edit keeps it watching.

use crate::common;

use common::{test_kinds, Project};
use dusflow::engine::{self, Event, EventSink, RunOptions, Stamped};
use std::collections::BTreeSet;
use std::time::Duration;
use tokio::sync::mpsc::UnboundedReceiver;
use tokio_util::sync::CancellationToken;

const FLOW: &str = r#"
[workflow]
name = "watched"

[datasets.words]
path = "words.txt"

[steps.a]
kind = "text"
text = "A"

[steps.b]
kind = "text"
text = "B"
inputs = { from = ["a", "words"] }

[steps.c]
kind = "text"
text = "C"
inputs = { from = ["b"] }

[steps.other]
kind = "text"
text = "O"
"#;

/// Receives events until a run finishes; returns the steps that started.
async fn next_run(rx: &mut UnboundedReceiver<Stamped>) -> BTreeSet<String> {
    let mut started = BTreeSet::new();
    loop {
        let ev = tokio::time::timeout(Duration::from_secs(30), rx.recv())
            .await
            .expect("no event within 30 s")
            .expect("open");
        match ev.event {
            Event::StepStarted { step, .. } => {
                started.insert(step);
            }
            Event::RunFinished { .. } => return started,
            _ => {}
        }
    }
}

/// Like [`next_run`], but skips reruns that started nothing: one save can reach the watcher as two
/// debounced batches, and the second finds every step cached.
async fn next_working_run(rx: &mut UnboundedReceiver<Stamped>) -> BTreeSet<String> {
    loop {
        let started = next_run(rx).await;
        if !started.is_empty() {
            return started;
        }
    }
}

async fn next_invalid(rx: &mut UnboundedReceiver<Stamped>) -> String {
    loop {
        let ev = tokio::time::timeout(Duration::from_secs(30), rx.recv())
            .await
            .expect("no event within 30 s")
            .expect("open");
        if let Event::WorkflowInvalid { errors } = ev.event {
            return errors;
        }
    }
}

fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| s.to_string()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_reruns_exactly_the_affected_steps() {
    let k = test_kinds();
    let p = Project::new(FLOW);
    p.write("words.txt", "hello");
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let options = RunOptions {
        jobs: Some(2),
        events: EventSink::default().with_channel(tx),
        ..RunOptions::default()
    };
    let shutdown = CancellationToken::new();
    let registry = k.registry.clone();
    let file = p.workflow();
    let token = shutdown.clone();
    let watcher =
        tokio::spawn(async move { engine::watch::watch(&file, &registry, options, token).await });

    assert_eq!(
        next_working_run(&mut rx).await,
        set(&["a", "b", "c", "other"])
    );

    p.edit("text = \"B\"", "text = \"B2\"");
    assert_eq!(
        next_working_run(&mut rx).await,
        set(&["b", "c"]),
        "a parameter edit reruns the step and its dependents"
    );

    p.write("words.txt", "world");
    assert_eq!(
        next_working_run(&mut rx).await,
        set(&["b", "c"]),
        "a dataset edit reruns its readers"
    );

    p.edit("text = \"O\"", "text = 5");
    let errors = next_invalid(&mut rx).await;
    assert!(errors.contains("steps.other.text"), "{errors}");

    p.edit("text = 5", "text = \"O2\"");
    assert_eq!(
        next_working_run(&mut rx).await,
        set(&["other"]),
        "after the fix only the edited step runs"
    );

    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(10), watcher)
        .await
        .expect("watch stops")
        .unwrap()
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edit_cancels_the_running_step_it_affects_and_restarts_it() {
    let k = test_kinds();
    let p = Project::new("[workflow]\nname = \"w\"\n[steps.long]\nkind = \"hold\"\ntag = \"1\"\n[steps.quick]\nkind = \"text\"\ntext = \"q\"\n");
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let options = RunOptions {
        jobs: Some(2),
        events: EventSink::default().with_channel(tx),
        ..RunOptions::default()
    };
    let shutdown = CancellationToken::new();
    let (registry, file, token) = (k.registry.clone(), p.workflow(), shutdown.clone());
    let watcher =
        tokio::spawn(async move { engine::watch::watch(&file, &registry, options, token).await });

    // First run: wait until `quick` finished and `long` is running.
    let (mut quick_done, mut long_started) = (false, false);
    while !(quick_done && long_started) {
        let ev = tokio::time::timeout(Duration::from_secs(30), rx.recv())
            .await
            .expect("event")
            .expect("open");
        match ev.event {
            Event::StepStarted { step, .. } if step == "long" => long_started = true,
            Event::StepFinished { step, .. } if step == "quick" => quick_done = true,
            _ => {}
        }
    }
    let started = k.hold_started.clone();
    tokio::task::spawn_blocking(move || common::wait_hold_started(&started, 1))
        .await
        .unwrap();
    p.edit("tag = \"1\"", "tag = \"2\"");
    // The old `long` is cancelled, a new `long` (new key) starts; `quick` is not rerun.
    let mut seen = Vec::new();
    while !(seen.iter().any(|s: &String| s == "started long")
        && seen.iter().any(|s| s == "cancelled long"))
    {
        let ev = tokio::time::timeout(Duration::from_secs(30), rx.recv())
            .await
            .expect("event")
            .expect("open");
        match ev.event {
            Event::StepStarted { step, .. } => seen.push(format!("started {step}")),
            Event::StepFinished { step, status, .. } => seen.push(format!("{status} {step}")),
            _ => {}
        }
    }
    assert!(!seen.iter().any(|s| s == "started quick"), "{seen:?}");
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(10), watcher)
        .await
        .expect("watch stops")
        .unwrap()
        .unwrap();
}
