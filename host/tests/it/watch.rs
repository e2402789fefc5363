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

/// User + system CPU time of process `pid` so far, in clock ticks (fields 14 and 15 of /proc/PID/stat).
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // The command name (field 2) may hold spaces: count fields after its closing parenthesis.
    let after = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

fn ticks_per_second() -> u64 {
    // SAFETY: sysconf has no preconditions.
    (unsafe { libc::sysconf(libc::_SC_CLK_TCK) }).max(1) as u64
}

#[test]
fn dus_watch_rests_after_an_edit() {
    let dir = tempfile::tempdir().unwrap();
    let flow = dir.path().join("flow.toml");
    std::fs::write(dir.path().join("data.txt"), "one\n").unwrap();
    std::fs::write(
        &flow,
        "[workflow]\nname = \"resting\"\noutput = \"out\"\n\n\
         [steps.copy]\nkind = \"command\"\nrun = \"cat data.txt > $DUS_OUT/out.txt; echo v1 >> $DUS_OUT/out.txt\"\n\
         files = [\"data.txt\"]\n",
    )
    .unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_dus"))
        .args(["watch", "flow.toml"])
        .current_dir(dir.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let log = dir.path().join("out/.dus/events.jsonl");
    let runs = || {
        std::fs::read_to_string(&log)
            .map(|t| t.matches("\"event\":\"run_finished\"").count())
            .unwrap_or(0)
    };
    let wait_runs = |n: usize| {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while runs() < n {
            assert!(
                std::time::Instant::now() < deadline,
                "run {n} never finished"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    wait_runs(1);
    // One edit of the workflow and one of a data file it reads.
    std::fs::write(
        &flow,
        std::fs::read_to_string(&flow).unwrap().replace("v1", "v2"),
    )
    .unwrap();
    wait_runs(2);
    std::fs::write(dir.path().join("data.txt"), "two\n").unwrap();
    wait_runs(3);
    // A touch without new content re-plans nothing.
    std::fs::File::options()
        .append(true)
        .open(dir.path().join("data.txt"))
        .unwrap()
        .set_modified(std::time::SystemTime::now())
        .unwrap();
    std::thread::sleep(Duration::from_secs(1)); // let the edits' events settle
    let before = cpu_ticks(child.id());
    let window = Duration::from_secs(5);
    std::thread::sleep(window);
    let used = cpu_ticks(child.id()) - before;
    let share = used as f64 / ticks_per_second() as f64 / window.as_secs_f64();
    eprintln!(
        "dus watch after edits: {used} ticks of CPU in {window:?} ({:.2} % of a core)",
        share * 100.0
    );
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(runs(), 3, "re-planned without a content change");
    assert!(
        share < 0.02,
        "dus watch used {:.1} % of a core while idle",
        share * 100.0
    );
}
