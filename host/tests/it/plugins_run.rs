//! Plugin limits where users meet them, through the `dus` binary: a sleeping filter stopped at its
//! deadline, Ctrl-C stopping a plugin call at once (in `run` and in `watch`, where the fixed step then
//! reruns), the host's memory bounded under a filter that inflates records, a merge rule's NaN refused,
//! a rewrite of the wrong type named, and `dus plugin check` with a granted folder.

use crate::plugins_common::{load, plugin_dir};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

fn dus() -> Command {
    Command::new(env!("CARGO_BIN_EXE_dus"))
}

/// Runs `dus ARGS` to the end (killed after `limit`), returning its output and wall time.
fn run_dus(args: &[&str], dir: &Path, limit: Duration) -> (Output, Duration) {
    let started = Instant::now();
    let child = dus()
        .args(args)
        .current_dir(dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let output = wait_with_limit(child, limit);
    (output, started.elapsed())
}

/// Waits for `child`, reading its pipes meanwhile (a full pipe would block it); kills it after `limit`.
fn wait_with_limit(child: Child, limit: Duration) -> Output {
    let pid = child.id();
    let killer = std::thread::spawn(move || {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
            if !Path::new(&format!("/proc/{pid}")).exists() {
                return false;
            }
        }
        // SAFETY: kill(2) on our child's pid; at worst it has exited and is not yet reaped.
        unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
        true
    });
    let output = child.wait_with_output().unwrap();
    assert!(
        !killer.join().unwrap() || output.status.code().is_some(),
        "dus ran past {limit:?}; stderr:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A preference-pairs workflow whose `chosen` dataset goes through the misbehaving filter with `params`.
fn filter_flow(dir: &Path, params: &str, limits: &str, records: usize) {
    load("misbehaving-filter"); // built now, so no test times a build
    let mut chosen = String::new();
    let mut rejected = String::new();
    for i in 0..records {
        chosen.push_str(&format!(
            "{{\"id\": {i}, \"question\": \"Q{i}\", \"answer\": \"good {i}\", \"text\": \"t{i}\"}}\n"
        ));
        rejected.push_str(&format!(
            "{{\"id\": {i}, \"question\": \"Q{i}\", \"answer\": \"bad {i}\", \"text\": \"u{i}\"}}\n"
        ));
    }
    std::fs::write(dir.join("chosen.jsonl"), chosen).unwrap();
    std::fs::write(dir.join("rejected.jsonl"), rejected).unwrap();
    std::fs::write(
        dir.join("flow.toml"),
        format!(
            r#"
[workflow]
name = "filtered"
output = "out"

[plugins.bad]
path = "{}"
build = true
limits = {limits}

[datasets.chosen]
path = "chosen.jsonl"
filters = ["bad"]

[datasets.rejected]
path = "rejected.jsonl"

[steps.pairs]
kind = "preference-pairs"
inputs = {{ chosen = "chosen", rejected = "rejected" }}
key = "id"
filter_params.bad = {params}

[steps.other]
kind = "command"
run = "echo fine > $DUS_OUT/out.txt"
"#,
            plugin_dir("misbehaving-filter").display()
        ),
    )
    .unwrap();
}

/// Waits until the events log says `step` started.
fn wait_started(out: &Path, step: &str) {
    let log = out.join(".dus/events.jsonl");
    let needle = format!(r#""event":"step_started","step":"{step}""#);
    let deadline = Instant::now() + Duration::from_secs(120);
    while !std::fs::read_to_string(&log).is_ok_and(|t| t.contains(&needle)) {
        assert!(Instant::now() < deadline, "{step} never started");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn interrupt(child: &Child) {
    // SAFETY: kill(2) on the pid of a child we spawned and have not reaped.
    assert_eq!(
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGINT) },
        0
    );
}

#[test]
fn a_filter_sleeping_past_its_limit_fails_its_step_at_the_deadline() {
    let dir = tempfile::tempdir().unwrap();
    filter_flow(
        dir.path(),
        r#"{ mode = "sleep", ms = 20000 }"#,
        "{ timeout_ms = 1000 }",
        3,
    );
    let (out, took) = run_dus(&["run", "flow.toml"], dir.path(), Duration::from_secs(60));
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("plugin 'misbehaving-filter' failed in data-filter.filter-batch: exceeded its time limit of 1000 ms"),
        "{err}"
    );
    // 20 s of sleep would show; the rest is start-up and the other step.
    assert!(took < Duration::from_secs(15), "dus run took {took:?}");
}

#[test]
fn ctrl_c_stops_a_plugin_sleeping_forever_within_a_second() {
    let dir = tempfile::tempdir().unwrap();
    filter_flow(
        dir.path(),
        r#"{ mode = "sleep", ms = 0 }"#,
        "{ timeout_ms = 3600000 }",
        3,
    );
    let child = dus()
        .args(["run", "flow.toml"])
        .current_dir(dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_started(&dir.path().join("out"), "pairs");
    std::thread::sleep(Duration::from_millis(300)); // inside the plugin's sleep by now
    let interrupted = Instant::now();
    interrupt(&child);
    let out = wait_with_limit(child, Duration::from_secs(30));
    let took = interrupted.elapsed();
    let err = stderr(&out);
    eprintln!("dus run exited {took:?} after Ctrl-C");
    assert!(
        took < Duration::from_secs(1),
        "exited {took:?} after Ctrl-C:\n{err}"
    );
    assert_eq!(out.status.code(), Some(130), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn watch_mode_interrupts_a_hung_plugin_reruns_the_fixed_step_and_stops_on_ctrl_c() {
    let dir = tempfile::tempdir().unwrap();
    filter_flow(
        dir.path(),
        r#"{ mode = "sleep", ms = 0 }"#,
        "{ timeout_ms = 3600000 }",
        3,
    );
    let child = dus()
        .args(["watch", "flow.toml"])
        .current_dir(dir.path())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = dir.path().join("out");
    wait_started(&out, "pairs");
    // The fix: the filter now keeps everything. The hung call is cancelled and the step reruns.
    let flow = std::fs::read_to_string(dir.path().join("flow.toml")).unwrap();
    std::fs::write(
        dir.path().join("flow.toml"),
        flow.replace(r#"{ mode = "sleep", ms = 0 }"#, r#"{ mode = "ok" }"#),
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !std::fs::read_dir(&out).unwrap().any(|e| {
        let p = e.unwrap().path();
        p.file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("pairs-")
            && p.join("manifest.json").exists()
    }) {
        assert!(Instant::now() < deadline, "the fixed step never completed");
        std::thread::sleep(Duration::from_millis(50));
    }
    let interrupted = Instant::now();
    interrupt(&child);
    let output = wait_with_limit(child, Duration::from_secs(30));
    let err = stderr(&output);
    assert!(interrupted.elapsed() < Duration::from_secs(2), "{err}");
    assert_eq!(output.status.code(), Some(130), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

/// Peak resident memory (VmHWM, KiB) of `child` until it exits, and its exit code.
fn peak_rss_kib(mut child: Child, limit: Duration) -> (Option<i32>, u64) {
    let status = PathBuf::from(format!("/proc/{}/status", child.id()));
    let deadline = Instant::now() + limit;
    let mut peak = 0u64;
    loop {
        if let Ok(text) = std::fs::read_to_string(&status) {
            if let Some(kib) = text
                .lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            {
                peak = peak.max(kib);
            }
        }
        if let Some(exit) = child.try_wait().unwrap() {
            return (exit.code(), peak);
        }
        assert!(Instant::now() < deadline, "dus did not finish in {limit:?}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn a_filter_inflating_records_cannot_inflate_the_host() {
    // 20 batches of 1000 records, each rewritten to 100 kB: 2 GB kept by the host without the bound,
    // while the plugin's own memory stays under its 256 MiB limit batch by batch.
    let dir = tempfile::tempdir().unwrap();
    filter_flow(
        dir.path(),
        r#"{ mode = "inflate", size = 100000 }"#,
        "{ memory_mb = 256 }",
        20_000,
    );
    let log = dir.path().join("stderr.txt");
    let child = dus()
        .args(["run", "flow.toml"])
        .current_dir(dir.path())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let (code, peak_kib) = peak_rss_kib(child, Duration::from_secs(300));
    let err = std::fs::read_to_string(&log).unwrap();
    eprintln!("peak RSS of dus run: {} MiB", peak_kib >> 10);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("plugin 'misbehaving-filter'") && err.contains("limits.output_ratio = 4"),
        "{err}"
    );
    assert!(
        peak_kib < 1 << 20,
        "dus run peaked at {} MiB",
        peak_kib >> 10
    );
}

#[test]
fn a_rewrite_with_a_field_of_the_wrong_type_names_the_plugin_and_the_record() {
    let dir = tempfile::tempdir().unwrap();
    filter_flow(dir.path(), r#"{ mode = "wrong-type" }"#, "{}", 2);
    let flow = std::fs::read_to_string(dir.path().join("flow.toml")).unwrap();
    // The filter sets `text` to a number; answers come from `text`, so the wrong type is met.
    std::fs::write(
        dir.path().join("flow.toml"),
        flow.replace("key = \"id\"", "key = \"id\"\nanswer = \"text\""),
    )
    .unwrap();
    let (out, _) = run_dus(&["run", "flow.toml"], dir.path(), Duration::from_secs(120));
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("chosen.jsonl:1"), "{err}");
    assert!(
        err.contains("field \"text\" must be a string, got 5 (in the rewrite of this record by filter plugin \"bad\")"),
        "{err}"
    );
}

#[test]
fn plugin_check_runs_a_plugin_that_reads_a_granted_folder() {
    load("decontaminate");
    let dir = tempfile::tempdir().unwrap();
    let bench = dir.path().join("benchmarks");
    std::fs::create_dir_all(&bench).unwrap();
    std::fs::write(
        bench.join("test.txt"),
        "the quick brown fox jumps over the lazy dog near the river bank today\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("sample.jsonl"),
        "{\"text\": \"so the quick brown fox jumps over the lazy dog near the river bank today, again\"}\n\
         {\"text\": \"nothing in common with any benchmark\"}\n",
    )
    .unwrap();
    let params = format!(r#"{{"benchmarks_dir": "{}"}}"#, bench.display());
    let plugin = plugin_dir("decontaminate");
    let (out, _) = run_dus(
        &[
            "plugin",
            "check",
            plugin.to_str().unwrap(),
            "--grant-read",
            bench.to_str().unwrap(),
            "--params",
            &params,
            "--sample",
            "sample.jsonl",
        ],
        dir.path(),
        Duration::from_secs(300),
    );
    let (text, err) = (String::from_utf8_lossy(&out.stdout), stderr(&out));
    assert!(out.status.success(), "{text}\n{err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(text.contains("drop"), "{text}");
    assert!(text.contains("keep"), "{text}");

    // A plugin opening a socket is refused with an error, not a panic of the host.
    load("misbehaving-filter");
    let plugin = plugin_dir("misbehaving-filter");
    let (out, _) = run_dus(
        &[
            "plugin",
            "check",
            plugin.to_str().unwrap(),
            "--params",
            r#"{"mode": "connect", "addr": "127.0.0.1:9"}"#,
        ],
        dir.path(),
        Duration::from_secs(300),
    );
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("cannot connect to 127.0.0.1:9"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

fn merge_flow(dir: &Path, value: &str, extra: &str) {
    load("misbehaving-merge");
    let models = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/merge/models");
    std::fs::write(
        dir.join("flow.toml"),
        format!(
            r#"
[workflow]
name = "nan"
output = "out"

[models.a]
path = "{a}"

[models.b]
path = "{b}"

[plugins.rule]
path = "{plugin}"
build = true

[steps.merged]
kind = "merge"
inputs = {{ models = ["a", "b"] }}
plugin = "rule"
plugin_params = {{ value = "{value}" }}
{extra}
"#,
            a = models.join("a").display(),
            b = models.join("b").display(),
            plugin = plugin_dir("misbehaving-merge").display(),
        ),
    )
    .unwrap();
}

#[test]
fn a_merge_rule_answering_nan_fails_the_step_naming_plugin_and_tensor() {
    for value in ["nan", "-inf"] {
        let dir = tempfile::tempdir().unwrap();
        merge_flow(dir.path(), value, "");
        let (out, _) = run_dus(&["run", "flow.toml"], dir.path(), Duration::from_secs(120));
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(
            err.contains("merge-rule plugin `rule` produced a non-finite value (NaN or infinity) at element 0 of tensor \"model.layers.0."),
            "{err}"
        );
        assert!(err.contains("allow_non_finite = true"), "{err}");
        let complete = std::fs::read_dir(dir.path().join("out"))
            .unwrap()
            .filter(|e| e.as_ref().unwrap().path().join("manifest.json").exists())
            .count();
        assert_eq!(complete, 0, "no artifact is marked complete");
    }
    let dir = tempfile::tempdir().unwrap();
    merge_flow(dir.path(), "nan", "allow_non_finite = true");
    let (out, _) = run_dus(&["run", "flow.toml"], dir.path(), Duration::from_secs(120));
    assert!(
        out.status.success(),
        "the opt-out writes them: {}",
        stderr(&out)
    );
}
