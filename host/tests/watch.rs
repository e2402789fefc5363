//! Watch mode: after an edit, exactly the affected steps run again; an invalid edit keeps it watching.

mod common;

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
        let ev = tokio::time::timeout(Duration::from_secs(30), rx.recv()).await.expect("no event within 30 s").expect("open");
        match ev.event {
            Event::StepStarted { step, .. } => {
                started.insert(step);
            }
            Event::RunFinished { .. } => return started,
            _ => {}
        }
    }
}

async fn next_invalid(rx: &mut UnboundedReceiver<Stamped>) -> String {
    loop {
        let ev = tokio::time::timeout(Duration::from_secs(30), rx.recv()).await.expect("no event within 30 s").expect("open");
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
    let options = RunOptions { jobs: Some(2), events: EventSink::default().with_channel(tx), ..RunOptions::default() };
    let shutdown = CancellationToken::new();
    let registry = k.registry.clone();
    let file = p.workflow();
    let token = shutdown.clone();
    let watcher = tokio::spawn(async move { engine::watch::watch(&file, &registry, options, token).await });

    assert_eq!(next_run(&mut rx).await, set(&["a", "b", "c", "other"]));

    p.edit("text = \"B\"", "text = \"B2\"");
    assert_eq!(next_run(&mut rx).await, set(&["b", "c"]), "a parameter edit reruns the step and its dependents");

    p.write("words.txt", "world");
    assert_eq!(next_run(&mut rx).await, set(&["b", "c"]), "a dataset edit reruns its readers");

    p.edit("text = \"O\"", "text = 5");
    let errors = next_invalid(&mut rx).await;
    assert!(errors.contains("steps.other.text"), "{errors}");

    p.edit("text = 5", "text = \"O2\"");
    assert_eq!(next_run(&mut rx).await, set(&["other"]), "after the fix only the edited step runs");

    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(10), watcher).await.expect("watch stops").unwrap().unwrap();
}
