//! The ready workflows in `workflows/`: each one loads and plans (the SOLAR recipe's steps are only blocked by
//! the downloads it names), and a shrunken quickstart — same steps, same kinds, same wiring, tiny budgets —
//! runs end to end and produces its report with one row per stage; so does a shrunken seam ablation, whose
//! report folds its five seeds per policy into mean ± std.

use dusflow::engine::{self, plan::PlanStatus, RunOptions};
use std::path::{Path, PathBuf};
use tokio_util::sync::CancellationToken;

fn workflows_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../workflows")
}

/// Plans a workflow file with an output folder in a temp dir.
fn plan_of(path: &Path, out: &Path) -> engine::plan::Plan {
    plan_variant(path, None, out)
}

/// Plans a workflow file, with one of its `[variants]` applied, into `out`.
fn plan_variant(path: &Path, variant: Option<&str>, out: &Path) -> engine::plan::Plan {
    let options = RunOptions {
        output: Some(out.to_path_buf()),
        variant: variant.map(str::to_string),
        ..RunOptions::default()
    };
    let workflow = engine::load(path, &dusflow::steps::builtin_registry(), &options)
        .unwrap_or_else(|e| panic!("{} ({variant:?}) does not load: {e:#}", path.display()));
    engine::plan_workflow(workflow, &options).unwrap()
}

/// The names of a workflow file's `[variants.NAME]`.
fn variants_of(path: &Path) -> Vec<String> {
    let value: toml::Value = toml::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    value
        .get("variants")
        .and_then(toml::Value::as_table)
        .map(|t| t.keys().cloned().collect())
        .unwrap_or_default()
}

#[test]
fn every_ready_workflow_loads_and_plans() {
    let mut seen = Vec::new();
    for entry in std::fs::read_dir(workflows_dir()).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            let out = tempfile::tempdir().unwrap();
            let plan = plan_of(&path, out.path());
            assert!(!plan.steps.is_empty(), "{}", path.display());
            for variant in variants_of(&path) {
                let plan = plan_variant(&path, Some(&variant), out.path());
                assert_eq!(plan.workflow.variant.as_deref(), Some(variant.as_str()));
            }
            seen.push(path.file_name().unwrap().to_string_lossy().to_string());
        }
    }
    seen.sort();
    for expected in [
        "ablation-merge.toml",
        "ablation-sdpo.toml",
        "ablation-seam.toml",
        "ablation-sft-mix.toml",
        "quickstart.toml",
        "solar-10.7b.toml",
    ] {
        assert!(
            seen.iter().any(|s| s == expected),
            "missing {expected}: {seen:?}"
        );
    }
}

#[test]
fn the_solar_recipe_is_the_papers_dag_and_waits_only_for_its_downloads() {
    let out = tempfile::tempdir().unwrap();
    let plan = plan_of(&workflows_dir().join("solar-10.7b.toml"), out.path());
    let wf = &plan.workflow;
    let step = |name: &str| {
        wf.steps
            .iter()
            .find(|s| s.name == name)
            .unwrap_or_else(|| panic!("no step {name}"))
    };
    // n = 32, m = 8 → 48 layers.
    assert_eq!(step("scaled").config_json["policy"], "solar");
    assert_eq!(step("scaled").config_json["m"], 8);
    // Tab. 1's sample caps.
    let cap = |d: &str| wf.datasets[d].max_samples;
    assert_eq!(cap("alpaca-gpt4"), Some(52_000));
    assert_eq!(cap("openorca"), Some(100_000));
    assert_eq!(cap("synth-math-instruct"), Some(52_000));
    assert_eq!(cap("orca-dpo-pairs"), Some(12_900));
    assert_eq!(cap("ultrafeedback-cleaned"), Some(60_800));
    assert_eq!(
        step("synth-math-alignment").config_json["max_samples"],
        20_100
    );
    // SFT v3 + v4 averaged; two sDPO candidates merged by Average (0.5, 0.5).
    assert_eq!(step("sft-v3-v4").config_json["method"], "linear");
    let mut up: Vec<&str> = step("cand-2").upstream().collect();
    up.sort();
    assert_eq!(up, ["sft-v3-v4", "synth-math-alignment"]);
    assert_eq!(
        step("merge-v1").config_json["weights"],
        serde_json::json!([0.5, 0.5])
    );
    assert_eq!(step("merge-v4").config_json["method"], "slerp");
    // Nothing fails validation; every step is blocked by a missing download (or a blocked input).
    for s in &plan.steps {
        match &s.status {
            PlanStatus::Blocked(why) => assert!(
                why.contains("does not exist") || why.contains("is blocked"),
                "{}: {why}",
                s.name
            ),
            other => panic!("{} should wait for its downloads, is {other:?}", s.name),
        }
    }
}

#[test]
fn the_solar_recipe_has_a_single_gpu_variant_with_lora_and_a_memory_lean_full_fine_tune() {
    let file = workflows_dir().join("solar-10.7b.toml");
    assert!(variants_of(&file).contains(&"single-gpu".to_string()));
    let out = tempfile::tempdir().unwrap();
    let full = plan_of(&file, out.path());
    let lean = plan_variant(&file, Some("single-gpu"), out.path());
    let step = |plan: &engine::plan::Plan, name: &str| {
        let i = plan.workflow.step_index(name).unwrap();
        (
            plan.workflow.steps[i].config_json.clone(),
            plan.steps[i].key.clone(),
        )
    };
    // Same DAG, same data.
    let names = |plan: &engine::plan::Plan| -> Vec<String> {
        plan.workflow.steps.iter().map(|s| s.name.clone()).collect()
    };
    assert_eq!(names(&full), names(&lean));
    // The scaled model is shared through the cache; the training steps are not (the steps after them, such
    // as the merges, get new keys from their inputs' once those exist).
    assert_eq!(step(&full, "scaled").1, step(&lean, "scaled").1);
    for trained in ["base", "sft-v3", "sft-v4", "cand-1", "cand-2"] {
        assert_ne!(step(&full, trained).1, step(&lean, trained).1, "{trained}");
    }
    let (base, _) = step(&lean, "base");
    assert_eq!(base["optimizer"], "adamw_8bit");
    assert_eq!(base["master_weights"], false);
    assert_eq!(base["gradient_checkpointing"], true);
    assert!(
        base["lora"].is_null(),
        "continued pretraining stays full: {base}"
    );
    for tuned in ["sft-v3", "sft-v4", "cand-1", "cand-2"] {
        let (config, _) = step(&lean, tuned);
        assert_eq!(config["lora"]["r"], 16, "{tuned}");
        assert_eq!(config["lora"]["targets"], "all-linear", "{tuned}");
        assert_eq!(config["gradient_checkpointing"], true, "{tuned}");
    }
    // Per-step settings the variant does not touch survive: Cand. 1's own beta, sDPO's three chunks.
    assert_eq!(step(&lean, "cand-1").0["beta"], 0.05);
    assert_eq!(step(&lean, "cand-2").0["chunks"], 3);
    // The variant only waits for the downloads, like the file as written.
    for s in &lean.steps {
        match &s.status {
            PlanStatus::Blocked(why) => assert!(
                why.contains("does not exist") || why.contains("is blocked"),
                "{}: {why}",
                s.name
            ),
            other => panic!("{} should wait for its downloads, is {other:?}", s.name),
        }
    }
}

/// Scales a TOML workflow down: every `count`, `max_steps`, `limit` and the model size become tiny.
fn shrink(value: &mut toml::Value) {
    if let toml::Value::Table(t) = value {
        for (key, v) in t.iter_mut() {
            match (key.as_str(), &mut *v) {
                ("count", toml::Value::Integer(n)) => *n = (*n / 50).max(24),
                ("max_steps", toml::Value::Integer(n)) => *n = (*n / 40).max(2),
                ("limit", toml::Value::Integer(n)) => *n = (*n / 20).max(3),
                ("max_gen_toks", toml::Value::Integer(n)) => *n = 8,
                ("eval_every", toml::Value::Integer(n)) => *n = 1,
                ("hidden_size", toml::Value::Integer(n)) => *n = 32,
                ("intermediate_size", toml::Value::Integer(n)) => *n = 64,
                ("seq_len", toml::Value::Integer(n)) => *n = (*n / 2).max(64),
                _ => shrink(v),
            }
        }
    } else if let toml::Value::Array(items) = value {
        items.iter_mut().for_each(shrink);
    }
}

/// Runs the shipped workflow `name` shrunk to test size in a fresh folder (kept alive by the returned
/// guard) and checks that every step succeeded.
async fn run_shrunken(name: &str) -> (tempfile::TempDir, engine::RunSummary) {
    let text = std::fs::read_to_string(workflows_dir().join(name)).unwrap();
    let mut value: toml::Value = toml::from_str(&text).unwrap();
    shrink(&mut value);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(name);
    std::fs::write(&path, toml::to_string(&value).unwrap()).unwrap();
    let summary = engine::run(
        &path,
        &dusflow::steps::builtin_registry(),
        RunOptions::default(),
        CancellationToken::new(),
    )
    .await
    .unwrap();
    assert!(summary.succeeded(), "{summary:#?}");
    (dir, summary)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shrunken_quickstart_runs_every_stage_and_reports_them() {
    let (_dir, summary) = run_shrunken("quickstart.toml").await;

    let report = summary.steps.iter().find(|s| s.name == "report").unwrap();
    let table = std::fs::read_to_string(report.dir.join("report.md")).unwrap();
    for stage in [
        "tiny",
        "pretrain",
        "scaled",
        "cpt",
        "sft_math",
        "sft_mc",
        "sft_merged",
        "sdpo_random/stage-1",
        "sdpo_random",
        "sdpo_margin",
        "final_avg",
        "final_slerp",
    ] {
        assert!(
            table.contains(&format!("| {stage} |")),
            "no row {stage}:\n{table}"
        );
    }
    let header = table.lines().find(|l| l.starts_with("| Model")).unwrap();
    for column in ["ARC", "GSM8K", "pref", "ppl"] {
        assert!(header.contains(column), "{table}");
    }
    // The scaled model has 12 layers, built from the 8-layer one.
    let scaled = summary.steps.iter().find(|s| s.name == "scaled").unwrap();
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(scaled.dir.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["num_hidden_layers"], 12);
    // sDPO wrote its intermediate model and two reference passes.
    let sdpo = summary
        .steps
        .iter()
        .find(|s| s.name == "sdpo_random")
        .unwrap();
    assert!(sdpo.dir.join("stage-1/model.safetensors").is_file());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shrunken_seam_ablation_reports_every_policy_over_five_seeds() {
    let (_dir, summary) = run_shrunken("ablation-seam.toml").await;
    // Every scaled variant has s = 12 layers.
    for policy in ["solar", "stack", "wide", "interleave"] {
        let step = summary.steps.iter().find(|s| s.name == policy).unwrap();
        let config: serde_json::Value =
            serde_json::from_slice(&std::fs::read(step.dir.join("config.json")).unwrap()).unwrap();
        assert_eq!(config["num_hidden_layers"], 12, "{policy}");
    }
    let report = summary.steps.iter().find(|s| s.name == "report").unwrap();
    let table = std::fs::read_to_string(report.dir.join("report.md")).unwrap();
    for row in [
        "| base | 1 |",
        "| solar | 1 |",
        "| solar + cpt | 5 |",
        "| stack + cpt | 5 |",
        "| wide + cpt | 5 |",
        "| interleave + cpt | 5 |",
        "| base (8) + cpt | 5 |",
        "| scratch (12) | 5 |",
    ] {
        assert!(table.contains(row), "no row `{row}`:\n{table}");
    }
    let svg = std::fs::read_to_string(report.dir.join("curves.svg")).unwrap();
    assert_eq!(svg.matches("<polygon").count(), 6, "one band per group");
    // The held-out loss along the recovery curve: scored after each of the 2 shrunken steps.
    assert!(
        table.contains("| Run | n | step 1 | step 2 |"),
        "no held-out table:\n{table}"
    );
    assert!(table.contains("| solar + cpt | 5 | "), "{table}");
    let held = std::fs::read_to_string(report.dir.join("held_out.svg")).unwrap();
    assert_eq!(held.matches("<polygon").count(), 6, "one band per group");
}
