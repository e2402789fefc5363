//! The walkthroughs in `examples/`, each run in shrunken form: the example's own workflow file with tiny
//! models (made by an `init` step), a few training steps and two evaluation documents patched in.

use crate::common;

use common::dir_of;
use dusflow::engine::{self, PlanStatus, RunOptions, RunSummary};
use std::path::{Path, PathBuf};
use tokio_util::sync::CancellationToken;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn eval_docs() -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/eval/docs")
        .display()
        .to_string()
}

async fn run(workflow: &Path) -> RunSummary {
    let s = engine::run(
        workflow,
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

/// Tiny byte-level Llamas (4 layers), one per seed, made by an `init` step; their folders.
async fn tiny_models(dir: &Path, seeds: &[u64]) -> Vec<PathBuf> {
    let mut flow = String::from("[workflow]\nname = \"tiny\"\ndevice = \"cpu\"\n");
    for s in seeds {
        flow.push_str(&format!(
            "[steps.tiny-{s}]\nkind = \"init\"\nhidden_size = 32\nintermediate_size = 64\nnum_hidden_layers = 4\nnum_attention_heads = 2\nmax_position_embeddings = 512\nseed = {s}\n"
        ));
    }
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("tiny.toml"), flow).unwrap();
    let s = run(&dir.join("tiny.toml")).await;
    seeds
        .iter()
        .map(|seed| dir_of(&s, &format!("tiny-{seed}")))
        .collect()
}

/// The example's workflow as a TOML table, to patch.
fn example(name: &str) -> toml::Table {
    let text =
        std::fs::read_to_string(repo().join("examples").join(name).join("workflow.toml")).unwrap();
    toml::from_str(&text).unwrap()
}

fn set(t: &mut toml::Table, path: &[&str], value: impl Into<toml::Value>) {
    let (last, parents) = path.split_last().unwrap();
    let mut at = t;
    for p in parents {
        at = at
            .get_mut(*p)
            .and_then(toml::Value::as_table_mut)
            .unwrap_or_else(|| panic!("no table {p}"));
    }
    at.insert(last.to_string(), value.into());
}

fn write(dir: &Path, t: &toml::Table) -> PathBuf {
    let file = dir.join("workflow.toml");
    std::fs::write(&file, toml::to_string(t).unwrap()).unwrap();
    file
}

fn shrink_eval(t: &mut toml::Table, step: &str) {
    set(t, &["steps", step, "tasks"], vec!["arc_challenge"]);
    set(t, &["steps", step, "limit"], 2);
    set(t, &["steps", step, "data_dir"], eval_docs());
}

#[tokio::test]
async fn bring_your_own_model_scales_fine_tunes_with_the_models_template_and_reports() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tiny_models(&tmp.path().join("prep"), &[1]).await.remove(0);
    // The user's model ships a chat template (Zephyr's): `template = "auto"` uses it.
    let model = tmp.path().join("my-model");
    std::fs::create_dir(&model).unwrap();
    for e in std::fs::read_dir(&base).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_file() {
            std::fs::copy(e.path(), model.join(e.file_name())).unwrap();
        }
    }
    let zephyr = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/chat/templates/zephyr-7b-beta.jinja");
    std::fs::copy(zephyr, model.join("chat_template.jinja")).unwrap();
    let work = tmp.path().join("work");
    std::fs::create_dir_all(work.join("data")).unwrap();
    let chat = |q: &str, a: &str| {
        serde_json::json!({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})
            .to_string()
    };
    std::fs::write(
        work.join("data/instructions.jsonl"),
        [
            chat("What is 2+2?", "4"),
            chat("What is 3+3?", "6"),
            chat("Name a colour.", "Red."),
        ]
        .join("\n"),
    )
    .unwrap();

    let mut t = example("bring-your-own-model");
    set(&mut t, &["workflow", "dtype"], "f32");
    set(&mut t, &["workflow", "device"], "cpu");
    set(
        &mut t,
        &["models", "base", "path"],
        model.display().to_string(),
    );
    set(&mut t, &["steps", "scaled", "m"], 1);
    for (k, v) in [
        ("seq_len", 128),
        ("micro_batch", 2),
        ("grad_accum", 1),
        ("max_steps", 2),
    ] {
        set(&mut t, &["steps", "sft", k], v);
    }
    shrink_eval(&mut t, "eval");
    let s = run(&write(&work, &t)).await;
    let scaled: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir_of(&s, "scaled").join("config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(scaled["num_hidden_layers"], 6, "4 layers, m = 1: 3 + 3");
    let report = std::fs::read_to_string(dir_of(&s, "report").join("report.md")).unwrap();
    for row in ["| base |", "| scaled |", "| sft |"] {
        assert!(report.contains(row), "{report}");
    }
    let headline = s.step("report").unwrap().headline.clone().unwrap();
    assert_eq!(headline, dir_of(&s, "report").join("report.md"));
}

#[tokio::test]
async fn the_merge_ablation_is_one_sweep_of_averages_plus_slerp_in_one_table() {
    let tmp = tempfile::tempdir().unwrap();
    let cands = tiny_models(&tmp.path().join("prep"), &[1, 2]).await;
    let mut t = example("merge-ablation");
    set(&mut t, &["workflow", "dtype"], "f32");
    set(&mut t, &["workflow", "device"], "cpu");
    set(
        &mut t,
        &["models", "cand-1", "path"],
        cands[0].display().to_string(),
    );
    set(
        &mut t,
        &["models", "cand-2", "path"],
        cands[1].display().to_string(),
    );
    shrink_eval(&mut t, "eval");
    let work = tmp.path().join("work");
    std::fs::create_dir_all(&work).unwrap();
    let s = run(&write(&work, &t)).await;
    assert_eq!(
        s.count("ran"),
        3 + 1 + 6 + 1,
        "3 averages, SLERP, 6 evaluations, report"
    );
    let report = std::fs::read_to_string(dir_of(&s, "report").join("report.md")).unwrap();
    for row in [
        "| Cand. 1 |",
        "| Cand. 2 |",
        "| Merge v1: Average (0.5, 0.5) |",
        "| Merge v2: Average (0.4, 0.6) |",
        "| Merge v3: Average (0.6, 0.4) |",
        "| Merge v4: SLERP |",
    ] {
        assert!(report.contains(row), "{row} missing from\n{report}");
    }
}

#[test]
fn the_solar_recipe_on_real_downloads_plans_and_names_what_is_missing() {
    let file = repo().join("examples/solar-on-real-downloads/workflow.toml");
    let registry = dusflow::steps::builtin_registry();
    let out = tempfile::tempdir().unwrap();
    let options = RunOptions {
        output: Some(out.path().to_path_buf()),
        ..RunOptions::default()
    };
    let workflow = engine::load(&file, &registry, &options).unwrap();
    let plan = engine::plan_workflow(workflow, &options).unwrap();
    assert!(plan.steps.len() > 20, "{} steps", plan.steps.len());
    let blocked: Vec<&str> = plan
        .steps
        .iter()
        .filter_map(|s| match &s.status {
            PlanStatus::Blocked(why) => Some(why.as_str()),
            _ => None,
        })
        .collect();
    assert!(
        blocked.iter().any(|w| w.contains("Mistral-7B-v0.1")),
        "{blocked:?}"
    );
}

#[tokio::test]
async fn the_python_data_filter_example_filters_an_sft_steps_data() {
    let plugin = repo().join("examples/python-data-filter/keep-answered");
    let host = dusflow::plugins::PluginHost::new().unwrap();
    match host.load_or_build(
        &plugin,
        &Default::default(),
        &dusflow::spec::PluginLimits {
            timeout_ms: 60_000,
            memory_mb: 512,
            ..Default::default()
        },
    ) {
        Ok(_) => {}
        Err(e)
            if e.downcast_ref::<dusflow::plugins::build::MissingTool>()
                .is_some() =>
        {
            eprintln!("SKIPPED python-data-filter example: {e}");
            return;
        }
        Err(e) => panic!("building keep-answered: {e:#}"),
    }
    let tmp = tempfile::tempdir().unwrap();
    let base = tiny_models(&tmp.path().join("prep"), &[3]).await.remove(0);
    let work = tmp.path().join("work");
    std::fs::create_dir_all(work.join("data")).unwrap();
    std::fs::copy(
        repo().join("examples/python-data-filter/data/chats.jsonl"),
        work.join("data/chats.jsonl"),
    )
    .unwrap();
    let mut t = example("python-data-filter");
    set(&mut t, &["workflow", "device"], "cpu");
    set(
        &mut t,
        &["models", "base", "path"],
        base.display().to_string(),
    );
    set(
        &mut t,
        &["plugins", "keep-answered", "path"],
        plugin.display().to_string(),
    );
    for (k, v) in [("seq_len", 128), ("micro_batch", 2), ("max_steps", 1)] {
        set(&mut t, &["steps", "sft", k], v);
    }
    let s = run(&write(&work, &t)).await;
    let report: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir_of(&s, "sft").join("train_report.json")).unwrap(),
    )
    .unwrap();
    let filter = &report["datasets"][0]["filters"][0];
    assert_eq!(filter["filter"], "keep-answered", "{report}");
    assert_eq!(
        (
            filter["seen"].as_u64(),
            filter["kept"].as_u64(),
            filter["dropped"].as_u64()
        ),
        (Some(6), Some(4), Some(2)),
        "{filter}"
    );
}
