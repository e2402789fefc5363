//! Cache keys that follow the numerics: every built-in kind runs once at toy size
//! (`tests/fixtures/golden/flow.toml`) and each step's output is digested and compared with
//! `tests/fixtures/golden/golden.json`. A kind whose output changes while its `version()` stays the same
//! fails here — artifacts made by the old code would otherwise be reused as if the new code had made them.
//!
//! After an intended change: bump the kind's `version()`, then rerun with `DUSFLOW_BLESS_GOLDEN=1` to record
//! the new digests (blessing refuses a changed digest whose kind version did not change). Floating-point
//! results depend on the CPU's vector units (candle's gemm picks AVX2 or AVX-512 kernels), so digests are
//! kept per platform; a platform with no entry yet is reported and skipped (bless it there once).

use dusflow::engine::{self, RunOptions};
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use tokio_util::sync::CancellationToken;

fn golden_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/golden")
}

/// The vector units the numerics depend on, e.g. `x86_64-avx2-fma`.
fn platform() -> String {
    let mut name = std::env::consts::ARCH.to_string();
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            name.push_str("-avx512f");
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            name.push_str("-avx2");
        }
        if std::arch::is_x86_feature_detected!("fma") {
            name.push_str("-fma");
        }
    }
    name
}

/// Keys whose values are wall-clock measurements, not outputs.
fn is_timing(key: &str) -> bool {
    ["seconds", "per_s", "elapsed", "unix_ms", "duration"]
        .iter()
        .any(|t| key.contains(t))
}

fn without_timings(v: Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.into_iter()
                .filter(|(k, _)| !is_timing(k))
                .map(|(k, v)| (k, without_timings(v)))
                .collect::<Map<_, _>>(),
        ),
        Value::Array(a) => Value::Array(a.into_iter().map(without_timings).collect()),
        other => other,
    }
}

/// BLAKE3 of an artifact's files (sorted by path), JSON with its timing fields left out; outputs may name
/// their inputs' paths, so the run's folder `root` is written as `<run>` and each artifact folder name in
/// `folders` (`<step>-<key>`, whose key follows every upstream parameter) as `<step>`. The manifest (keys,
/// clock times) is not output.
fn digest(dir: &Path, root: &Path, folders: &[(String, String)]) -> String {
    let root = root.to_string_lossy().into_owned();
    let mut files = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else if p.file_name().unwrap() != "manifest.json" {
                files.push(p);
            }
        }
    }
    files.sort();
    let mut hasher = blake3::Hasher::new();
    for f in files {
        let rel = f.strip_prefix(dir).unwrap().to_string_lossy().into_owned();
        let mut bytes = std::fs::read(&f).unwrap();
        if let Ok(text) = std::str::from_utf8(&bytes) {
            let mut text = text.replace(&root, "<run>");
            for (folder, step) in folders {
                text = text.replace(folder.as_str(), step);
            }
            bytes = text.into_bytes();
        }
        let text = std::str::from_utf8(&bytes).ok();
        let content = match f.extension().and_then(|e| e.to_str()) {
            Some("json") => {
                serde_json::to_vec(&without_timings(serde_json::from_slice(&bytes).unwrap()))
                    .unwrap()
            }
            Some("jsonl") => text
                .unwrap()
                .lines()
                .filter(|l| !l.trim().is_empty())
                .map(|l| without_timings(serde_json::from_str(l).unwrap()).to_string() + "\n")
                .collect::<String>()
                .into_bytes(),
            _ => bytes,
        };
        hasher.update(rel.as_bytes());
        hasher.update(&(content.len() as u64).to_le_bytes());
        hasher.update(&content);
    }
    hasher.finalize().to_hex()[..16].to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_kinds_output_is_pinned_to_its_version() {
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(golden_dir()).unwrap() {
        let p = entry.unwrap().path();
        if p.extension().is_some_and(|e| e == "toml" || e == "jsonl") {
            std::fs::copy(&p, dir.path().join(p.file_name().unwrap())).unwrap();
        }
    }
    let registry = dusflow::steps::builtin_registry();
    let summary = engine::run(
        &dir.path().join("flow.toml"),
        &registry,
        RunOptions::default(),
        CancellationToken::new(),
    )
    .await
    .unwrap();
    assert!(summary.succeeded(), "{summary:#?}");
    let workflow =
        dusflow::workflow::Workflow::load(&dir.path().join("flow.toml"), &registry).unwrap();
    let kinds_run: std::collections::BTreeSet<&str> =
        workflow.steps.iter().map(|s| s.kind.name()).collect();
    let all_kinds: std::collections::BTreeSet<&str> = registry.names().collect();
    assert_eq!(
        kinds_run, all_kinds,
        "the golden workflow must use every built-in kind"
    );

    let folders: Vec<(String, String)> = summary
        .steps
        .iter()
        .map(|s| {
            let folder = s.dir.file_name().unwrap().to_string_lossy().into_owned();
            (folder, format!("<{}>", s.name))
        })
        .collect();
    // step -> {kind, version, digest}
    let mut now: BTreeMap<String, Value> = BTreeMap::new();
    for step in &workflow.steps {
        let report = summary.step(&step.name).unwrap();
        now.insert(
            step.name.clone(),
            json!({
                "kind": step.kind.name(),
                "version": step.kind.version(),
                "digest": digest(&report.dir, dir.path(), &folders),
            }),
        );
    }

    let golden_file = golden_dir().join("golden.json");
    let mut golden: BTreeMap<String, BTreeMap<String, Value>> = std::fs::read(&golden_file)
        .map(|b| serde_json::from_slice(&b).unwrap())
        .unwrap_or_default();
    let platform = platform();
    let recorded = golden.get(&platform).cloned().unwrap_or_default();
    let mut problems = Vec::new();
    // A step whose input changed writes different output without its own kind being at fault.
    let mut changed: std::collections::HashSet<&str> = std::collections::HashSet::new();
    for step in &workflow.steps {
        let entry = &now[&step.name];
        let Some(old) = recorded.get(&step.name) else {
            continue;
        };
        let same_version = old["version"] == entry["version"];
        let same_digest = old["digest"] == entry["digest"];
        let inputs_changed = step.upstream().any(|u| changed.contains(u));
        if !same_digest {
            changed.insert(step.name.as_str());
        }
        let step = &step.name;
        if !same_digest && same_version && !inputs_changed {
            problems.push(format!(
                "step `{step}`: kind `{}` (version {}) now writes different output ({} -> {}): bump the \
                 kind's version() so old artifacts are not reused, then rerun with DUSFLOW_BLESS_GOLDEN=1",
                entry["kind"].as_str().unwrap(),
                entry["version"],
                old["digest"].as_str().unwrap(),
                entry["digest"].as_str().unwrap()
            ));
        } else if !same_version || (!same_digest && !inputs_changed) {
            problems.push(format!(
                "step `{step}`: kind `{}` is version {} (golden: {}): rerun with DUSFLOW_BLESS_GOLDEN=1 to record it",
                entry["kind"].as_str().unwrap(),
                entry["version"],
                old["version"]
            ));
        }
    }
    let blessing = std::env::var_os("DUSFLOW_BLESS_GOLDEN").is_some();
    if blessing {
        let refused: Vec<&String> = problems.iter().filter(|p| p.contains("bump")).collect();
        assert!(refused.is_empty(), "not blessed:\n{refused:#?}");
        golden.insert(platform.clone(), now.into_iter().collect());
        let text = serde_json::to_string_pretty(&golden).unwrap() + "\n";
        std::fs::write(&golden_file, text).unwrap();
        eprintln!("golden digests recorded for {platform}");
        return;
    }
    if recorded.is_empty() {
        eprintln!(
            "no golden digests for platform {platform} (recorded: {:?}); bless them with DUSFLOW_BLESS_GOLDEN=1",
            golden.keys().collect::<Vec<_>>()
        );
        return;
    }
    let missing: Vec<&String> = now.keys().filter(|s| !recorded.contains_key(*s)).collect();
    assert!(
        missing.is_empty(),
        "steps without golden digests: {missing:?}; bless them"
    );
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}
