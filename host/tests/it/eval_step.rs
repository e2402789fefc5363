//! The `eval` and `report` steps in real workflows: synthetic data in the ARC / GSM8K layouts, the six H6
//! tasks from a folder, custom TOML tasks, and the side-by-side report.

use crate::common;

use common::Project;
use dusflow::engine::{self, RunOptions};
use dusflow::eval::tables::Summary;
use dusflow::workflow::Workflow;
use serde_json::Value;
use std::path::{Path, PathBuf};
use tokio_util::sync::CancellationToken;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/eval")
}

async fn run(p: &Project) -> engine::RunSummary {
    let s = engine::run(
        &p.workflow(),
        &dusflow::steps::builtin_registry(),
        RunOptions {
            jobs: Some(2),
            ..RunOptions::default()
        },
        CancellationToken::new(),
    )
    .await
    .expect("run");
    assert!(s.succeeded(), "{s:#?}");
    s
}

fn artifact(s: &engine::RunSummary, step: &str) -> PathBuf {
    PathBuf::from(&s.step(step).unwrap_or_else(|| panic!("no step {step}")).dir)
}

fn json(path: &Path) -> Value {
    serde_json::from_str(
        &std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())),
    )
    .unwrap()
}

#[tokio::test]
async fn synthetic_suite_custom_tasks_and_report() {
    let model = fixtures().join("model");
    let p = Project::new(&format!(
        r#"
[workflow]
name = "evals"
device = "cpu"
seed = 5

[models.tiny]
path = "{model}"

[models.tiny_copy]
path = "{model}"

[steps.held]
kind = "synthetic"
count = 12
sweep = {{ task = ["multiple-choice", "arithmetic"] }}

[steps.text]
kind = "synthetic"
task = "text"
count = 3

[steps.eval]
kind = "eval"
inputs = {{ model = "tiny", data = ["held", "text"] }}
tasks = ["arc_challenge", "gsm8k"]
data = {{ arc_challenge = "held[task=multiple-choice]", gsm8k = "held[task=arithmetic]", qa = "held[task=multiple-choice]", ppl = "text" }}
num_fewshot = {{ arc_challenge = 3, gsm8k = 1 }}
limit = 4
sweep = {{ "inputs.model" = ["tiny", "tiny_copy"] }}

[[steps.eval.custom]]
name = "qa"
kind = "multiple-choice"
template = "Q: {{question}}\nA:"
choices = "choices.text"
gold = "answerKey"
labels = "choices.label"
metric = "acc_norm"
num_fewshot = 2

[[steps.eval.custom]]
name = "ppl"
kind = "perplexity"
template = "{{text}}"

[steps.report]
kind = "report"
inputs = {{ evals = "eval" }}
title = "Tiny"
names = {{ "eval[model=tiny]" = "first" }}
"#,
        model = model.display()
    ));
    let s = run(&p).await;
    let dir = artifact(&s, "eval[model=tiny]");
    let summary: Summary = serde_json::from_value(json(&dir.join("results.json"))).unwrap();
    assert_eq!(
        summary.tasks.keys().collect::<Vec<_>>(),
        ["arc_challenge", "gsm8k", "qa", "ppl"]
    );
    assert_eq!(summary.h6, None, "not all six tasks ran");
    assert_eq!(summary.tasks["arc_challenge"].num_docs, 4);
    assert_eq!(summary.tasks["arc_challenge"].metric, "acc_norm");
    // Single-file data: few-shot examples come from the same file, never the document itself.
    let arc = json(&dir.join("tasks/arc_challenge.json"));
    for d in arc["docs"].as_array().unwrap() {
        let shots: Vec<u64> = d["fewshot"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap())
            .collect();
        assert_eq!(shots.len(), 3);
        assert!(!shots.contains(&d["doc_id"].as_u64().unwrap()));
        let (ctx, cont) = (
            d["requests"][0][0].as_str().unwrap(),
            d["requests"][0][1].as_str().unwrap(),
        );
        assert!(
            ctx.starts_with("Question: What is")
                && ctx.ends_with("\nAnswer:")
                && cont.starts_with(' ')
        );
        assert_eq!(ctx.matches("\n\n").count(), 3);
        assert_eq!(d["loglikelihoods"].as_array().unwrap().len(), 4);
    }
    let qa = json(&dir.join("tasks/qa.json"));
    let ctx = qa["docs"][0]["requests"][0][0].as_str().unwrap();
    assert!(
        ctx.starts_with("Q: What is") && ctx.ends_with("?\nA:") && ctx.matches("\n\n").count() == 2,
        "{ctx}"
    );
    let gsm = json(&dir.join("tasks/gsm8k.json"));
    assert!(gsm["docs"][0]["prompt"].as_str().unwrap().contains("#### "));
    assert!(gsm["docs"][0]["generation"].is_string());
    let ppl = summary.tasks["ppl"].metrics["word_perplexity"];
    assert!(ppl.is_finite() && ppl > 1.0, "{ppl}");
    let md = std::fs::read_to_string(dir.join("results.md")).unwrap();
    assert!(md.starts_with("| Model | ARC | GSM8K | qa | ppl |"), "{md}");
    // Same weights under another name: identical scores.
    let other: Summary = serde_json::from_value(json(
        &artifact(&s, "eval[model=tiny_copy]").join("results.json"),
    ))
    .unwrap();
    assert_eq!(
        other.tasks["arc_challenge"].score,
        summary.tasks["arc_challenge"].score
    );
    // The report has both rows, renamed where asked (else named after the model), and a chart.
    let report = artifact(&s, "report");
    let md = std::fs::read_to_string(report.join("report.md")).unwrap();
    assert!(md.starts_with("# Tiny\n"), "{md}");
    assert!(
        md.contains("| first |") && md.contains("| tiny_copy |"),
        "{md}"
    );
    let svg = std::fs::read_to_string(report.join("chart.svg")).unwrap();
    assert!(
        svg.starts_with("<svg") && svg.matches("<rect").count() > 4,
        "{svg}"
    );
}

#[tokio::test]
async fn the_six_h6_tasks_from_a_folder_give_the_h6_average() {
    let p = Project::new(&format!(
        r#"
[workflow]
name = "h6"
device = "cpu"

[models.tiny]
path = "{model}"

[steps.eval]
kind = "eval"
inputs = {{ model = "tiny" }}
data_dir = "{docs}"
mode = "harness"
limit = 2
"#,
        model = fixtures().join("model").display(),
        docs = fixtures().join("docs").display()
    ));
    let s = run(&p).await;
    let dir = artifact(&s, "eval");
    let summary: Summary = serde_json::from_value(json(&dir.join("results.json"))).unwrap();
    assert_eq!(summary.tasks.len(), 6);
    let mean = 100.0 * summary.tasks.values().map(|t| t.score).sum::<f64>() / 6.0;
    assert!((summary.h6.unwrap() - mean).abs() < 1e-12);
    let mmlu = json(&dir.join("tasks/mmlu.json"));
    assert_eq!(mmlu["groups"].as_object().unwrap().len(), 2, "two subjects");
    assert_eq!(
        summary.tasks["mmlu"].num_docs, 4,
        "limit applies per subject"
    );
    let md = std::fs::read_to_string(dir.join("results.md")).unwrap();
    assert!(
        md.contains(&format!("| tiny | {:.2} |", summary.h6.unwrap())),
        "{md}"
    );
}

#[test]
fn bad_parameters_are_reported_with_their_keys() {
    let p = Project::new(
        r#"
[workflow]
name = "bad"
[models.m]
path = "m"
[steps.e]
kind = "eval"
inputs = { model = "m" }
tasks = ["arc_challenge", "hellaswagg"]
num_fewshot = { gsm8k = 3 }
batch_size = 0

[[steps.e.custom]]
name = "c"
kind = "generate"
template = "{q}"
metric = "acc"
"#,
    );
    let err = match Workflow::load(&p.workflow(), &dusflow::steps::builtin_registry()) {
        Ok(_) => panic!("bad parameters accepted"),
        Err(e) => e.to_string(),
    };
    for needle in [
        "tasks[1]",
        "unknown task `hellaswagg`",
        "gsm8k",
        "batch_size",
        "custom[0]",
        "does not fit",
    ] {
        assert!(err.contains(needle), "missing {needle:?} in:\n{err}");
    }
}

#[tokio::test]
async fn data_from_paths_and_a_clear_error_for_unknown_inputs() {
    let p = Project::new(&format!(
        r#"
[workflow]
name = "paths"
device = "cpu"

[models.tiny]
path = "{model}"

[steps.ok]
kind = "eval"
inputs = {{ model = "tiny" }}
tasks = ["winogrande"]
data_paths = {{ winogrande = "{docs}/winogrande" }}

[steps.bad]
kind = "eval"
inputs = {{ model = "tiny" }}
tasks = ["winogrande"]
data = {{ winogrande = "nope" }}

[datasets.capped-docs]
path = "{docs}/winogrande"
max_samples = 2

[steps.capped]
kind = "eval"
inputs = {{ model = "tiny", data = ["capped-docs"] }}
tasks = ["winogrande"]
"#,
        model = fixtures().join("model").display(),
        docs = fixtures().join("docs").display()
    ));
    let s = engine::run(
        &p.workflow(),
        &dusflow::steps::builtin_registry(),
        RunOptions::default(),
        CancellationToken::new(),
    )
    .await
    .expect("run");
    let ok: Summary =
        serde_json::from_value(json(&artifact(&s, "ok").join("results.json"))).unwrap();
    assert_eq!(ok.tasks["winogrande"].num_docs, 4);
    let bad = format!("{:?}", s.step("bad").unwrap().status);
    assert!(
        bad.contains("`nope` is not an input of the `data` slot"),
        "{bad}"
    );
    // A dataset's sample cap is not silently ignored: evaluation caps with `limit`.
    let capped = format!("{:?}", s.step("capped").unwrap().status);
    assert!(
        capped.contains("max_samples = 2") && capped.contains("`limit`"),
        "{capped}"
    );
}
