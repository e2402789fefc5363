//! The one-line commands through the `dus` binary — `dus scale MODEL OUT`, `dus eval MODEL --tasks …` — as
//! one-step workflows (same artifact, cache and errors as a workflow step), the lm-evaluation-harness
//! results layout every evaluation writes, and `dus run` ending with its report's table.

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn dus(args: &[&str], cwd: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_dus"))
        .args(args)
        .current_dir(cwd)
        .output()
        .unwrap()
}

fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).to_string(),
        String::from_utf8_lossy(&o.stderr).to_string(),
    )
}

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/eval")
}

fn json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// The one artifact folder in `dir` whose name starts with `prefix`.
fn artifact(dir: &Path, prefix: &str) -> PathBuf {
    let found: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name().unwrap().to_string_lossy().starts_with(prefix)
                && p.join("manifest.json").exists()
        })
        .collect();
    assert_eq!(found.len(), 1, "{found:?}");
    found[0].clone()
}

#[test]
fn dus_scale_writes_the_scaled_folder_and_reuses_the_cache() {
    let tmp = tempfile::tempdir().unwrap();
    let flow = "[workflow]\nname = \"tiny\"\ndevice = \"cpu\"\noutput = \"runs\"\n[steps.tiny]\nkind = \"init\"\nhidden_size = 32\nintermediate_size = 64\nnum_hidden_layers = 4\nnum_attention_heads = 2\n";
    std::fs::write(tmp.path().join("tiny.toml"), flow).unwrap();
    let made = dus(&["run", "tiny.toml"], tmp.path());
    assert!(made.status.success(), "{:?}", text(&made));
    let model = artifact(&tmp.path().join("runs"), "tiny-");

    let out = tmp.path().join("scaled");
    let args = [
        "scale",
        model.to_str().unwrap(),
        out.to_str().unwrap(),
        "--policy",
        "solar",
        "--m",
        "1",
    ];
    let first = dus(&args, tmp.path());
    let (stdout, stderr) = text(&first);
    assert!(first.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("scaled model in"), "{stdout}");
    assert!(stderr.contains("1 ran, 0 cached"), "{stderr}");
    assert_eq!(json(&out.join("config.json"))["num_hidden_layers"], 6);
    // OUT's files are the artifact's (hard links), the artifact sits under OUT/.dusflow/runs.
    let store = artifact(&out.join(".dusflow/runs"), "scale-");
    {
        use std::os::unix::fs::MetadataExt;
        let a = std::fs::metadata(store.join("model.safetensors")).unwrap();
        let b = std::fs::metadata(out.join("model.safetensors")).unwrap();
        assert_eq!((a.dev(), a.ino()), (b.dev(), b.ino()));
    }
    assert!(out.join("scale_plan.json").exists() && out.join("tokenizer.json").exists());
    assert!(out.join(".dusflow/scale.toml").exists());

    let again = dus(&args, tmp.path());
    assert!(again.status.success());
    assert!(
        text(&again).1.contains("0 ran, 1 cached"),
        "{:?}",
        text(&again)
    );

    // The step's own checks, as in a workflow: m = 4 leaves no layer of a 4-layer model.
    let bad = dus(
        &[
            "scale",
            model.to_str().unwrap(),
            tmp.path().join("bad").to_str().unwrap(),
            "--m",
            "4",
        ],
        tmp.path(),
    );
    assert!(!bad.status.success());
    let (o, e) = text(&bad);
    assert!(e.contains("m = 4") || o.contains("m = 4"), "{o}\n{e}");
}

#[test]
fn dus_eval_prints_the_table_and_writes_the_lm_eval_layout() {
    let tmp = tempfile::tempdir().unwrap();
    let model = fixtures().join("model");
    let docs = fixtures().join("docs");
    let out = tmp.path().join("evals");
    let o = dus(
        &[
            "eval",
            model.to_str().unwrap(),
            "--tasks",
            "arc,mmlu,gsm8k",
            "--limit",
            "2",
            "--mode",
            "harness",
            "--data-dir",
            docs.to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
        ],
        tmp.path(),
    );
    let (stdout, stderr) = text(&o);
    assert!(o.status.success(), "{stdout}\n{stderr}");
    assert!(
        stdout.contains("| Model |") && stdout.contains("| ARC |"),
        "{stdout}"
    );
    assert!(
        stdout.contains("| model |"),
        "row named after the model folder: {stdout}"
    );
    let dir = artifact(&out, "eval-model-");
    let ours = json(&dir.join("results.json"));
    let lm = json(&dir.join("lm_eval_results.json"));

    // The keys lm-eval's make_table and leaderboard scripts read.
    let results = lm["results"].as_object().unwrap();
    for (task, entry) in results {
        for key in [
            "versions",
            "n-shot",
            "higher_is_better",
            "configs",
            "n-samples",
        ] {
            assert!(lm[key].get(task).is_some(), "{key} lacks {task}");
        }
        assert!(entry["alias"].is_string(), "{task}");
        for (k, v) in entry.as_object().unwrap() {
            if k == "alias" {
                continue;
            }
            let (metric, filter) = k.split_once(',').unwrap_or_else(|| panic!("{task}: {k}"));
            assert!(!filter.is_empty(), "{task}: {k}");
            if !metric.ends_with("_stderr") {
                let stderr = format!("{metric}_stderr,{filter}");
                assert!(entry.get(&stderr).is_some(), "{task}: no {stderr}");
                assert!(v.is_number(), "{task}: {k} = {v}");
                assert_eq!(
                    lm["higher_is_better"][task][metric], true,
                    "{task}: {metric}"
                );
            }
        }
    }
    let close = |a: &Value, b: &Value| (a.as_f64().unwrap() - b.as_f64().unwrap()).abs() < 1e-12;
    assert!(close(
        &results["arc_challenge"]["acc_norm,none"],
        &ours["tasks"]["arc_challenge"]["score"]
    ));
    assert!(results["arc_challenge"].get("acc,none").is_some());
    assert!(close(
        &results["gsm8k"]["exact_match,strict-match"],
        &ours["tasks"]["gsm8k"]["score"]
    ));
    assert!(close(
        &results["mmlu"]["acc,none"],
        &ours["tasks"]["mmlu"]["score"]
    ));
    let subjects = lm["group_subtasks"]["mmlu"].as_array().unwrap();
    assert!(!subjects.is_empty());
    for s in subjects {
        assert!(results[s.as_str().unwrap()]["acc,none"].is_number(), "{s}");
    }
    assert_eq!(lm["n-shot"]["arc_challenge"], 25);
    assert_eq!(lm["versions"]["gsm8k"], 3.0);
    assert_eq!(lm["config"]["limit"], 2);
    // Four documents with acc ∈ {0, 1} give lm-eval's sample stderr; check one against the documents.
    let accs: Vec<f64> = json(&dir.join("tasks/arc_challenge.json"))["docs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["metrics"]["acc"].as_f64().unwrap())
        .collect();
    let se = dusflow::eval::harness_results::mean_stderr(&accs).unwrap();
    assert!(
        (results["arc_challenge"]["acc_stderr,none"]
            .as_f64()
            .unwrap()
            - se)
            .abs()
            < 1e-12
    );

    // The same command again: cached, same table.
    let again = dus(
        &[
            "eval",
            model.to_str().unwrap(),
            "--tasks",
            "arc,mmlu,gsm8k",
            "--limit",
            "2",
            "--mode",
            "harness",
            "--data-dir",
            docs.to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
        ],
        tmp.path(),
    );
    assert!(
        text(&again).1.contains("0 ran, 1 cached"),
        "{:?}",
        text(&again)
    );
    assert_eq!(text(&again).0, stdout);

    // An unknown task fails like the workflow step would: at the generated file's line, naming the task.
    let bad = dus(
        &[
            "eval",
            model.to_str().unwrap(),
            "--tasks",
            "arcc",
            "-o",
            out.to_str().unwrap(),
        ],
        tmp.path(),
    );
    assert!(!bad.status.success());
    assert!(
        text(&bad).1.contains("unknown task `arcc`"),
        "{:?}",
        text(&bad)
    );
}

#[test]
fn dus_run_ends_with_the_report_table_and_its_folder() {
    let tmp = tempfile::tempdir().unwrap();
    let flow = format!(
        r#"
[workflow]
name = "ends"
device = "cpu"
output = "runs"

[models.tiny]
path = "{model}"

[steps.eval]
kind = "eval"
inputs = {{ model = "tiny" }}
tasks = ["arc_challenge"]
limit = 2
data_dir = "{docs}"

[steps.report]
kind = "report"
inputs = {{ evals = ["eval"] }}
title = "The end"
"#,
        model = fixtures().join("model").display(),
        docs = fixtures().join("docs").display()
    );
    std::fs::write(tmp.path().join("flow.toml"), flow).unwrap();
    for pass in ["ran", "cached"] {
        let o = dus(&["run", "flow.toml"], tmp.path());
        let (stdout, stderr) = text(&o);
        assert!(o.status.success(), "{stdout}\n{stderr}");
        let report = artifact(&tmp.path().join("runs"), "report-");
        assert!(
            stdout.contains(&format!("report ({pass}): {}", report.display())),
            "{stdout}"
        );
        assert!(
            stdout.contains("# The end") && stdout.contains("| tiny |"),
            "{stdout}"
        );
        assert!(
            stderr.contains(" run "),
            "the summary's time column is run time: {stderr}"
        );
    }
}

#[test]
fn dus_merge_runs_a_mergekit_config_as_a_one_step_workflow() {
    // mergekit's own example layout: the config beside the model folders, relative paths.
    let merge = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/merge");
    let tmp = tempfile::tempdir().unwrap();
    let case = merge.join("outputs/card_ties");
    let models = merge.join("models");
    let config = tmp.path().join("ties.yml");
    let yaml = std::fs::read_to_string(case.join("config.yml"))
        .unwrap()
        .replace("./", &format!("{}/", models.display()));
    std::fs::write(&config, &yaml).unwrap();
    let out = tmp.path().join("merged");
    let args = ["merge", config.to_str().unwrap(), out.to_str().unwrap()];
    let first = dus(&args, tmp.path());
    let (stdout, stderr) = text(&first);
    assert!(first.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("merged model in"), "{stdout}");
    for file in [
        "model.safetensors",
        "config.json",
        "README.md",
        "mergekit_config.yml",
    ] {
        assert!(
            out.join(file).is_file(),
            "{file} missing in {}",
            out.display()
        );
    }
    assert_eq!(
        std::fs::read_to_string(out.join("mergekit_config.yml")).unwrap(),
        yaml
    );
    // The workflow underneath, runnable with `dus run`; a second call is served from the cache.
    assert!(out.join(".dusflow/merge.toml").is_file());
    let again = dus(&args, tmp.path());
    assert!(again.status.success(), "{:?}", text(&again));
    assert!(text(&again).1.contains("cached"), "{:?}", text(&again));
    // A model path that is no folder: the config file and the model are named.
    std::fs::write(&config, yaml.replace("/a\n", "/nope\n")).unwrap();
    let bad = dus(&args, tmp.path());
    assert!(!bad.status.success());
    let (_, err) = text(&bad);
    assert!(err.contains("ties.yml") && err.contains("nope"), "{err}");
}
