//! The `dus` binary: plan/graph output, exit codes, and crash safety of artifacts (kill -9 mid-step).

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn dus() -> Command {
    Command::new(env!("CARGO_BIN_EXE_dus"))
}

fn write_flow(dir: &Path, text: &str) {
    std::fs::write(dir.join("flow.toml"), text).unwrap();
}

const FLOW: &str = r#"
[workflow]
name = "cli"
output = "out"

[steps.first]
kind = "command"
run = "echo one > $DUS_OUT/first.txt"

[steps.slow]
kind = "command"
run = "echo half > $DUS_OUT/part.txt; touch ../started; while [ ! -e ../release ]; do sleep 0.05; done; echo rest >> $DUS_OUT/part.txt"
inputs = { prev = "first" }
files = ["data.txt"]
"#;

fn wait_for(path: &Path) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !path.exists() {
        assert!(
            Instant::now() < deadline,
            "{} never appeared",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn manifests(out: &Path) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(out).unwrap() {
        let p = entry.unwrap().path();
        if p.join("manifest.json").exists() {
            found.push(p.file_name().unwrap().to_string_lossy().to_string());
        }
    }
    found.sort();
    found
}

#[test]
fn a_step_killed_mid_write_is_never_complete_and_the_next_run_redoes_it() {
    let dir = tempfile::tempdir().unwrap();
    let work = dir.path().join("w");
    std::fs::create_dir(&work).unwrap();
    write_flow(&work, FLOW);
    std::fs::write(work.join("data.txt"), "d").unwrap();
    let out = work.join("out");

    let mut child = dus()
        .arg("run")
        .arg(work.join("flow.toml"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // `slow` runs inside .dus/partial; its cwd is the workflow folder, so ../started is in `dir`.
    wait_for(&dir.path().join("started"));
    child.kill().unwrap(); // SIGKILL: no cleanup at all
    child.wait().unwrap();
    // Kill the orphaned shell of the step too.
    let _ = Command::new("pkill")
        .args(["-f", "release ]; do sleep"])
        .status();

    let complete = manifests(&out);
    assert_eq!(complete.len(), 1, "only `first` is complete: {complete:?}");
    assert!(complete[0].starts_with("first-"));
    assert!(!std::fs::read_dir(&out).unwrap().any(|e| e
        .unwrap()
        .file_name()
        .to_string_lossy()
        .starts_with("slow-")));

    std::fs::write(dir.path().join("release"), "").unwrap();
    let plan = dus()
        .arg("plan")
        .arg(work.join("flow.toml"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&plan.stdout);
    assert!(text.contains("1 cached, 1 to run"), "{text}");

    let status = dus()
        .arg("run")
        .arg(work.join("flow.toml"))
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
    let complete = manifests(&out);
    assert_eq!(complete.len(), 2, "{complete:?}");
    let slow = complete.iter().find(|n| n.starts_with("slow-")).unwrap();
    assert_eq!(
        std::fs::read_to_string(out.join(slow).join("part.txt")).unwrap(),
        "half\nrest\n"
    );
}

#[test]
fn invalid_workflows_exit_2_and_print_every_error() {
    let dir = tempfile::tempdir().unwrap();
    write_flow(dir.path(), "[workflow]\nname = \"x\"\n[steps.a]\nkind = \"command\"\nrun = \"true\"\nbogus = 1\n[steps.b]\nkind = \"nope\"\n");
    let out = dus()
        .arg("plan")
        .arg(dir.path().join("flow.toml"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("flow.toml:6:1: steps.a.bogus: unknown field `bogus`"),
        "{err}"
    );
    assert!(
        err.contains("flow.toml:8:8: steps.b.kind: unknown step kind `nope`"),
        "{err}"
    );
}

#[test]
fn a_failing_command_fails_the_run_with_its_log() {
    let dir = tempfile::tempdir().unwrap();
    write_flow(dir.path(), "[workflow]\nname = \"x\"\n[steps.bad]\nkind = \"command\"\nrun = \"echo something broke >&2; exit 3\"\n");
    let out = dus()
        .arg("run")
        .arg(dir.path().join("flow.toml"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("something broke") && err.contains("exit status: 3"),
        "{err}"
    );
}

#[test]
fn graph_prints_mermaid() {
    let dir = tempfile::tempdir().unwrap();
    write_flow(dir.path(), FLOW);
    let out = dus()
        .args(["graph", "--format", "mermaid"])
        .arg(dir.path().join("flow.toml"))
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("flowchart LR") && text.contains("-->|prev|"),
        "{text}"
    );
}

#[test]
fn ctrl_c_cancels_a_run_cleanly_with_exit_130() {
    let dir = tempfile::tempdir().unwrap();
    write_flow(
        dir.path(),
        "[workflow]\nname = \"x\"\noutput = \"out\"\n[steps.wait]\nkind = \"command\"\nrun = \"touch started; sleep 30\"\n",
    );
    let child = dus()
        .arg("run")
        .arg(dir.path().join("flow.toml"))
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for(&dir.path().join("started"));
    let started = Instant::now();
    assert!(Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap()
        .success());
    let out = child.wait_with_output().unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "cancellation took {:?}",
        started.elapsed()
    );
    assert_eq!(
        out.status.code(),
        Some(130),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("cancelled"));
    assert!(manifests(&dir.path().join("out")).is_empty());
}
