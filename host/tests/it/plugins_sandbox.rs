//! The sandbox: time-outs, memory exhaustion, denied files, sockets, env and clock, traps and
//! malformed answers all fail the job cleanly, and the host keeps working after each.

use crate::plugins_common;

use dusflow::plugins::{Plugin, PluginGrants, PluginLimits, Verdict};
use plugins_common::*;
use std::time::{Duration, Instant};

fn misbehave(grants: &PluginGrants, limits: &PluginLimits) -> Plugin {
    load_with("misbehaving-filter", grants, limits)
}

fn run(plugin: &Plugin, params: serde_json::Value) -> anyhow::Result<Vec<Verdict>> {
    plugin
        .data_filter(&params.to_string())?
        .filter_batch(&[r#"{"text": "x"}"#.to_string()])
}

/// The plugin still works in a new job after a failure.
fn assert_still_works(plugin: &Plugin) {
    let verdicts =
        run(plugin, serde_json::json!({"mode": "ok"})).expect("a new job after the failure works");
    assert_eq!(verdicts, vec![Verdict::Keep]);
}

#[test]
fn an_endless_loop_is_stopped_at_its_deadline() {
    let limits = PluginLimits {
        timeout_ms: 300,
        ..Default::default()
    };
    let plugin = misbehave(&PluginGrants::default(), &limits);
    let started = Instant::now();
    let err = format!(
        "{:#}",
        run(&plugin, serde_json::json!({"mode": "loop"})).unwrap_err()
    );
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(300) && took < Duration::from_millis(2000),
        "stopped after {took:?}"
    );
    assert!(
        err.contains("plugin 'misbehaving-filter' failed in data-filter.filter-batch"),
        "{err}"
    );
    assert!(err.contains("exceeded its time limit of 300 ms"), "{err}");
    assert_still_works(&plugin);
}

#[test]
fn unbounded_allocation_fails_at_the_memory_limit() {
    let limits = PluginLimits {
        memory_mb: 64,
        ..Default::default()
    };
    let plugin = misbehave(&PluginGrants::default(), &limits);
    let err = format!(
        "{:#}",
        run(&plugin, serde_json::json!({"mode": "alloc"})).unwrap_err()
    );
    assert!(err.contains("exceeded its memory limit of 64 MiB"), "{err}");
    assert_still_works(&plugin);
}

#[test]
fn files_are_readable_only_inside_granted_directories() {
    let dir = tempfile::tempdir().unwrap();
    let inside = dir.path().join("allowed.txt");
    std::fs::write(&inside, "granted content").unwrap();
    let outside = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(outside.path(), "secret").unwrap();
    let read = |plugin: &Plugin, path: &std::path::Path| {
        run(
            plugin,
            serde_json::json!({"mode": "read-file", "path": path}),
        )
    };

    let denied = misbehave(&PluginGrants::default(), &PluginLimits::default());
    let err = format!("{:#}", read(&denied, &inside).unwrap_err());
    assert!(err.contains("cannot read"), "{err}");
    assert!(read(&denied, std::path::Path::new("/etc/passwd")).is_err());

    let grants = PluginGrants {
        read: vec![dir.path().to_path_buf()],
        ..Default::default()
    };
    let granted = misbehave(&grants, &PluginLimits::default());
    let verdicts = read(&granted, &inside).unwrap();
    assert_eq!(
        verdicts,
        vec![Verdict::Rewrite(r#"{"content":"granted content"}"#.into())]
    );
    let err = format!("{:#}", read(&granted, outside.path()).unwrap_err());
    assert!(err.contains("cannot read"), "{err}");
    assert_still_works(&granted);
}

#[test]
fn read_grants_are_read_only_and_write_grants_writable() {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("out.txt");
    let write = |plugin: &Plugin| {
        run(
            plugin,
            serde_json::json!({"mode": "write-file", "path": &target}),
        )
    };

    let read_only = PluginGrants {
        read: vec![dir.path().to_path_buf()],
        ..Default::default()
    };
    let err = format!(
        "{:#}",
        write(&misbehave(&read_only, &PluginLimits::default())).unwrap_err()
    );
    assert!(err.contains("cannot write"), "{err}");
    assert!(!target.exists());

    let writable = PluginGrants {
        write: vec![dir.path().to_path_buf()],
        ..Default::default()
    };
    assert_eq!(
        write(&misbehave(&writable, &PluginLimits::default())).unwrap(),
        vec![Verdict::Keep]
    );
    assert_eq!(
        std::fs::read_to_string(&target).unwrap(),
        "written by a plugin"
    );
}

#[test]
fn sockets_are_denied() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let plugin = misbehave(&PluginGrants::default(), &PluginLimits::default());
    let err = format!(
        "{:#}",
        run(
            &plugin,
            serde_json::json!({"mode": "connect", "addr": addr})
        )
        .unwrap_err()
    );
    assert!(err.contains(&format!("cannot connect to {addr}")), "{err}");
    assert_eq!(
        listener.accept().unwrap_err().kind(),
        std::io::ErrorKind::WouldBlock,
        "nothing connected"
    );
    assert_still_works(&plugin);
}

#[test]
fn environment_and_clock_are_hidden_unless_granted() {
    // cargo sets CARGO_PKG_NAME for test binaries; reading it needs no set_var racing other threads.
    let (var, value) = ("CARGO_PKG_NAME", env!("CARGO_PKG_NAME"));
    assert_eq!(
        std::env::var(var).as_deref(),
        Ok(value),
        "the host process has the variable"
    );
    let env = serde_json::json!({"mode": "env", "var": var});
    let clock = serde_json::json!({"mode": "clock"});

    let denied = misbehave(&PluginGrants::default(), &PluginLimits::default());
    assert!(run(&denied, env.clone()).is_err());
    assert_eq!(
        run(&denied, clock.clone()).unwrap(),
        vec![Verdict::Rewrite(r#"{"unix_secs":0}"#.into())]
    );

    let grants = PluginGrants {
        env: vec![var.into()],
        clock: true,
        ..Default::default()
    };
    let granted = misbehave(&grants, &PluginLimits::default());
    let expected = serde_json::json!({ "value": value }).to_string();
    assert_eq!(
        run(&granted, env).unwrap(),
        vec![Verdict::Rewrite(expected)]
    );
    let Verdict::Rewrite(json) = &run(&granted, clock).unwrap()[0] else {
        panic!("expected a rewrite")
    };
    let secs = serde_json::from_str::<serde_json::Value>(json).unwrap()["unix_secs"]
        .as_u64()
        .unwrap();
    assert!(secs > 1_700_000_000, "{json}");
}

#[test]
fn a_panic_fails_with_its_message_and_the_instance_refuses_more_calls() {
    let plugin = misbehave(&PluginGrants::default(), &PluginLimits::default());
    let mut job = plugin.data_filter(r#"{"mode": "panic"}"#).unwrap();
    let record = [r#"{"text": "x"}"#.to_string()];
    let err = format!("{:#}", job.filter_batch(&record).unwrap_err());
    assert!(
        err.contains("failed in data-filter.filter-batch: trapped"),
        "{err}"
    );
    assert!(
        err.contains("misbehaving-filter panics on purpose"),
        "stderr is shown: {err}"
    );
    let again = format!("{:#}", job.filter_batch(&record).unwrap_err());
    assert!(again.contains("start a new job"), "{again}");
    assert_still_works(&plugin);
}

#[test]
fn malformed_answers_and_plugin_output_are_reported() {
    let plugin = misbehave(&PluginGrants::default(), &PluginLimits::default());
    let err = format!(
        "{:#}",
        run(&plugin, serde_json::json!({"mode": "bad-json"})).unwrap_err()
    );
    assert!(
        err.contains("returned a malformed answer: record 0 rewritten to invalid JSON"),
        "{err}"
    );
    let err = format!(
        "{:#}",
        run(&plugin, serde_json::json!({"mode": "stderr"})).unwrap_err()
    );
    assert!(
        err.contains("returned an error: failed after writing to stderr"),
        "{err}"
    );
    assert!(err.contains("| misbehaving-filter: about to fail"), "{err}");
    assert_still_works(&plugin);
}

#[test]
fn a_chatty_plugin_keeps_working() {
    let plugin = misbehave(&PluginGrants::default(), &PluginLimits::default());
    let verdicts = run(&plugin, serde_json::json!({"mode": "chatty"})).unwrap();
    assert_eq!(
        verdicts,
        vec![Verdict::Keep],
        "megabytes of logging do not break the plugin"
    );
}

#[test]
fn a_file_that_is_not_a_component_fails_to_load_cleanly() {
    let file = tempfile::Builder::new().suffix(".wasm").tempfile().unwrap();
    std::fs::write(file.path(), b"\0asm not really").unwrap();
    let err = format!(
        "{:#}",
        host()
            .load(
                file.path(),
                &PluginGrants::default(),
                &PluginLimits::default()
            )
            .unwrap_err()
    );
    assert!(err.contains("not a valid WebAssembly component"), "{err}");
    let err = format!(
        "{:#}",
        host()
            .load(
                "no/such/plugin".as_ref(),
                &PluginGrants::default(),
                &PluginLimits::default()
            )
            .unwrap_err()
    );
    assert!(err.contains("does not exist"), "{err}");
}

#[test]
fn a_plugin_blocked_in_a_wasi_sleep_is_stopped_at_its_deadline() {
    // A sleep runs no guest code, so epoch interruption alone never fires: the call itself must end.
    let limits = PluginLimits {
        timeout_ms: 1000,
        ..Default::default()
    };
    let plugin = misbehave(&PluginGrants::default(), &limits);
    for ms in [20_000, 0] {
        let started = Instant::now();
        let err = format!(
            "{:#}",
            run(&plugin, serde_json::json!({"mode": "sleep", "ms": ms})).unwrap_err()
        );
        let took = started.elapsed();
        assert!(
            took >= Duration::from_millis(1000) && took < Duration::from_millis(3000),
            "a {ms} ms sleep under a 1000 ms limit stopped after {took:?}"
        );
        assert!(err.contains("exceeded its time limit of 1000 ms"), "{err}");
    }
    assert_still_works(&plugin);
}

#[test]
fn cancellation_stops_a_call_whether_it_sleeps_or_computes() {
    for mode in ["sleep", "loop"] {
        let token = tokio_util::sync::CancellationToken::new();
        let plugin = misbehave(
            &PluginGrants::default(),
            &PluginLimits {
                timeout_ms: 600_000,
                ..Default::default()
            },
        )
        .cancelled_by(token.clone());
        let canceller = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            let at = Instant::now();
            token.cancel();
            at
        });
        let err = run(&plugin, serde_json::json!({"mode": mode, "ms": 0})).unwrap_err();
        let stopped = Instant::now();
        let cancelled_at = canceller.join().unwrap();
        assert!(
            stopped.duration_since(cancelled_at) < Duration::from_secs(1),
            "{mode}: stopped {:?} after the cancellation",
            stopped.duration_since(cancelled_at)
        );
        assert!(
            err.is::<dusflow::step::Cancelled>(),
            "{mode}: a cancellation, not a failure: {err:#}"
        );
    }
}

#[test]
fn links_that_leave_a_write_grant_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (readable, writable) = (dir.path().join("read"), dir.path().join("write"));
    std::fs::create_dir_all(&readable).unwrap();
    std::fs::create_dir_all(&writable).unwrap();
    std::fs::write(readable.join("bench.txt"), "read-only data").unwrap();
    let grants = PluginGrants {
        read: vec![readable.clone()],
        write: vec![writable.clone()],
        ..Default::default()
    };
    let plugin = misbehave(&grants, &PluginLimits::default());
    let link = writable.join("escape");
    for (mode, target) in [
        ("symlink", "/etc/passwd".to_string()),
        ("symlink", "../read/bench.txt".to_string()),
        ("symlink", "inside.txt".to_string()),
        (
            "hardlink",
            readable.join("bench.txt").to_string_lossy().into_owned(),
        ),
    ] {
        let err = format!(
            "{:#}",
            run(
                &plugin,
                serde_json::json!({"mode": mode, "path": link, "target": target})
            )
            .unwrap_err()
        );
        assert!(
            err.contains(&format!(
                "cannot create {}",
                mode.replace("hardlink", "hard link")
            )),
            "{err}"
        );
        assert!(
            std::fs::symlink_metadata(&link).is_err(),
            "{mode} to {target} was created"
        );
    }
    assert_eq!(
        std::fs::read_to_string(readable.join("bench.txt")).unwrap(),
        "read-only data"
    );
    assert_still_works(&plugin);
}

#[test]
fn a_filter_cannot_make_the_host_keep_more_than_its_output_ratio() {
    let plugin = misbehave(&PluginGrants::default(), &PluginLimits::default());
    let records: Vec<String> = (0..10).map(|i| format!(r#"{{"text": "r{i}"}}"#)).collect();
    let mut job = plugin
        .data_filter(r#"{"mode": "inflate", "size": 100000}"#)
        .unwrap();
    let err = format!("{:#}", job.filter_batch(&records).unwrap_err());
    assert!(err.contains("plugin 'misbehaving-filter'"), "{err}");
    assert!(
        err.contains("more than limits.output_ratio = 4 times the 140 bytes it was given"),
        "{err}"
    );
    // Growth within the ratio is fine.
    let mut job = plugin
        .data_filter(r#"{"mode": "inflate", "size": 20}"#)
        .unwrap();
    assert_eq!(job.filter_batch(&records).unwrap().len(), 10);
}

#[test]
fn source_folders_are_built_only_when_asked() {
    let dir = tempfile::tempdir().unwrap();
    let (source, cache) = (dir.path().join("probe"), dir.path().join("cache"));
    std::fs::create_dir_all(&source).unwrap();
    let component = load("length-filter").wasm_path().to_path_buf();
    let marker = dir.path().join("build-ran");
    std::fs::write(
        source.join("plugin.toml"),
        format!(
            "[build]\ncommand = 'touch {} && cp {} \"$DUS_OUT\"'\n",
            marker.display(),
            component.display()
        ),
    )
    .unwrap();
    let host = dusflow::plugins::PluginHost::with_cache_dir(&cache).unwrap();
    let (grants, limits) = (PluginGrants::default(), PluginLimits::default());
    let err = format!("{:#}", host.load(&source, &grants, &limits).unwrap_err());
    assert!(!marker.exists(), "loading ran the build command");
    assert!(err.contains("dus plugin build"), "{err}");
    assert!(err.contains("build = true"), "{err}");
    assert!(
        err.contains("the plugin.toml build command `touch"),
        "{err}"
    );

    let spec = |build: bool| dusflow::workflow::PluginSpec {
        path: source.clone(),
        build,
        grants: grants.clone(),
        limits: limits.clone(),
        description: None,
    };
    assert!(host.load_spec(&spec(false)).is_err());
    assert!(!marker.exists());
    host.load_spec(&spec(true)).unwrap();
    assert!(marker.exists(), "build = true builds");
    // Once built, the cached component of these exact sources loads without building again.
    std::fs::remove_file(&marker).unwrap();
    host.load(&source, &grants, &limits).unwrap();
    assert!(!marker.exists());
}
