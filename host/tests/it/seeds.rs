//! Seeds as replicates: `sweep = { seed = [...] }` on the kinds that draw random numbers gives distinct
//! artifacts and weights; a seed-swept step reads its own seed's point of a seed-swept input; a sweep over a
//! one-artifact slot naming a swept step takes one point per upstream point; and the `report` step folds
//! evaluations and curves that differ only in `seed` into mean ± sample standard deviation.

use crate::common::{dir_of, run_flow, Project};
use dusflow::workflow::Workflow;

const SEEDED: &str = r#"
[workflow]
name = "seeds"
output = "out"
seed = 3

[steps.text]
kind = "synthetic"
task = "text"
count = 60
sweep = { seed = [1, 2] }

[steps.init]
kind = "init"
sweep = { seed = [1, 2] }
hidden_size = 16
intermediate_size = 32
num_hidden_layers = 2
num_attention_heads = 2

[steps.train]
kind = "pretrain"
sweep = { seed = [1, 2] }
inputs = { model = "init", data = ["text[seed=1]"] }
max_steps = 2
seq_len = 32
micro_batch = 2

[steps.grown]
kind = "pretrain"
sweep = { "inputs.model" = ["train"] }
inputs = { data = ["text[seed=2]"] }
max_steps = 1
seq_len = 32
micro_batch = 2
"#;

fn upstream(wf: &Workflow, step: &str) -> Vec<String> {
    let mut up: Vec<String> = wf
        .steps
        .iter()
        .find(|s| s.name == step)
        .unwrap_or_else(|| panic!("no step {step}"))
        .upstream()
        .map(str::to_string)
        .collect();
    up.sort();
    up
}

#[test]
fn seed_sweeps_pair_replicates_and_expand_swept_inputs_point_by_point() {
    let p = Project::new(SEEDED);
    let wf = Workflow::load(&p.workflow(), &dusflow::steps::builtin_registry()).unwrap();
    // train[seed=2] reads init[seed=2] (its own seed), not both points of `init`.
    assert_eq!(
        upstream(&wf, "train[seed=1]"),
        ["init[seed=1]", "text[seed=1]"]
    );
    assert_eq!(
        upstream(&wf, "train[seed=2]"),
        ["init[seed=2]", "text[seed=1]"]
    );
    // A sweep of `inputs.model` over the swept `train` is one point per point of `train`.
    let grown: Vec<&str> = wf
        .steps
        .iter()
        .filter(|s| s.name.starts_with("grown"))
        .map(|s| s.name.as_str())
        .collect();
    assert_eq!(
        grown,
        ["grown[model=train[seed=1]]", "grown[model=train[seed=2]]"]
    );
    assert_eq!(
        upstream(&wf, "grown[model=train[seed=2]]"),
        ["text[seed=2]", "train[seed=2]"]
    );
}

#[test]
fn a_seed_with_no_matching_point_upstream_is_an_error_naming_it() {
    let p = Project::new(&SEEDED.replace(
        "[steps.train]\nkind = \"pretrain\"\nsweep = { seed = [1, 2] }",
        "[steps.train]\nkind = \"pretrain\"\nsweep = { seed = [1, 2, 3] }",
    ));
    let Err(err) = Workflow::load(&p.workflow(), &dusflow::steps::builtin_registry()) else {
        panic!("a seed with no matching point upstream loaded");
    };
    let err = format!("{err:#}");
    assert!(
        err.contains("steps.train.inputs.model")
            && err.contains("`init` is swept over `seed` but has no point with seed = 3"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sweep_of_seeds_yields_distinct_artifacts_and_distinct_weights() {
    let p = Project::new(SEEDED);
    let summary = run_flow(p.path("").as_path()).await;
    assert!(summary.succeeded(), "{summary:#?}");
    let bytes = |step: &str, file: &str| std::fs::read(dir_of(&summary, step).join(file)).unwrap();
    for (one, two, file) in [
        ("text[seed=1]", "text[seed=2]", "data.jsonl"),
        ("init[seed=1]", "init[seed=2]", "model.safetensors"),
        ("train[seed=1]", "train[seed=2]", "model.safetensors"),
        (
            "grown[model=train[seed=1]]",
            "grown[model=train[seed=2]]",
            "model.safetensors",
        ),
    ] {
        assert_ne!(dir_of(&summary, one), dir_of(&summary, two), "{one}");
        assert_ne!(
            bytes(one, file),
            bytes(two, file),
            "{one}: {file} is the same for both seeds"
        );
    }
}

/// `ev`: an `evaluation` artifact with one task `acc` whose score is the step's seed / 10; `ev_train`: a
/// `metrics.jsonl` whose losses are the seed plus 2, 1, 0.
const REPORTED: &str = r#"
[workflow]
name = "report-seeds"
output = "out"

[steps.ev]
kind = "command"
output = "evaluation"
sweep = { seed = [1, 2, 4] }
run = """
s=$(echo "$DUS_STEP" | sed 's/.*seed=\\([0-9]*\\).*/\\1/')
printf '{"model":"m","mode":"harness","limit":null,"tasks":{"acc":{"metric":"acc","score":0.%s,"metrics":{},"num_docs":10,"num_fewshot":0}},"h6":null}' "$s" > "$DUS_OUT/results.json"
"""

[steps.ev_train]
kind = "command"
sweep = { seed = [1, 2, 4] }
run = """
s=$(echo "$DUS_STEP" | sed 's/.*seed=\\([0-9]*\\).*/\\1/')
for l in 2 1 0; do printf '{"loss": %s}\\n' "$((s + l))" >> "$DUS_OUT/metrics.jsonl"; done
"""

[steps.single]
kind = "command"
output = "evaluation"
run = """printf '{"model":"o","mode":"harness","limit":null,"tasks":{"acc":{"metric":"acc","score":0.5,"metrics":{},"num_docs":10,"num_fewshot":0}},"h6":null}' > "$DUS_OUT/results.json" """

[steps.report]
kind = "report"
inputs = { evals = ["ev", "single"], curves = "ev_train" }
names = { "ev" = "three seeds", "ev_train" = "three seeds" }
"#;

#[tokio::test]
async fn the_report_gives_mean_and_sample_std_over_seeds() {
    let p = Project::new(REPORTED);
    let summary = run_flow(p.path("").as_path()).await;
    assert!(summary.succeeded(), "{summary:#?}");
    let dir = dir_of(&summary, "report");
    let md = std::fs::read_to_string(dir.join("report.md")).unwrap();
    // Scores 0.1, 0.2, 0.4: mean 0.23333, sample std sqrt(0.07/3) = 0.15275 (population std would be 0.12472).
    assert!(md.contains("| Model | n | acc |"), "{md}");
    assert!(md.contains("| three seeds | 3 | 23.33 ± 15.28 |"), "{md}");
    assert!(md.contains("| o | 1 | 50.00 |"), "{md}");
    // Losses (3, 2, 1), (4, 3, 2), (6, 5, 4): means 4.3333, 3.3333, 2.3333, std 1.5275 at every step.
    assert!(
        md.contains("| three seeds | 3 | 3 | 4.3333 ± 1.5275 | 3.3333 ± 1.5275 | 3.3333 ± 1.5275 | 2.3333 ± 1.5275 |"),
        "{md}"
    );
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("report.json")).unwrap()).unwrap();
    let acc = &json[0]["tasks"]["acc"];
    assert_eq!(json[0]["n"], 3);
    assert!(
        (acc["mean"].as_f64().unwrap() - 0.7 / 3.0).abs() < 1e-12,
        "{json}"
    );
    assert!(
        (acc["std"].as_f64().unwrap() - (0.07f64 / 3.0).sqrt()).abs() < 1e-12,
        "{json}"
    );
    let svg = std::fs::read_to_string(dir.join("curves.svg")).unwrap();
    assert!(svg.contains("<polygon"), "the curve has no band");
}
