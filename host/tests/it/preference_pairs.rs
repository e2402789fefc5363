//! The `preference-pairs` step: two aligned question-answer datasets become `{prompt, chosen, rejected}`
//! records that the `dpo` step reads; misaligned input fails naming the record.

use crate::common::artifact;
use dusflow::engine::{self, RunOptions};
use serde_json::Value;
use std::path::Path;
use tokio_util::sync::CancellationToken;

const REPHRASED: &str = r#"{"id": 2, "question": "What is 3+4?", "answer": "3 plus 4 makes 7.\n#### 7"}
{"id": 1, "question": "What is 2+2?", "answer": "Two and two are four.\n#### 4"}
{"id": 3, "question": "What is 5-1?", "answer": "5-1=4\n#### 4"}
"#;
const ORIGINAL: &str = r#"{"id": 1, "question": "What is 2+2?", "answer": "2+2=4\n#### 4"}
{"id": 2, "question": "What is 3+4?", "answer": "3+4=7\n#### 7"}
{"id": 3, "question": "What is 5-1?", "answer": "5-1=4\n#### 4"}
"#;

fn flow(extra: &str) -> String {
    format!(
        r#"
[workflow]
name = "pairs"
output = "out"

[datasets.rephrased]
path = "rephrased.jsonl"

[datasets.original]
path = "original.jsonl"

[steps.pairs]
kind = "preference-pairs"
inputs = {{ chosen = "rephrased", rejected = "original" }}
{extra}
"#
    )
}

async fn run(dir: &Path, flow: &str, files: &[(&str, &str)]) -> engine::RunSummary {
    for (name, text) in files {
        std::fs::write(dir.join(name), text).unwrap();
    }
    std::fs::write(dir.join("flow.toml"), flow).unwrap();
    engine::run(
        &dir.join("flow.toml"),
        &dusflow::steps::builtin_registry(),
        RunOptions::default(),
        CancellationToken::new(),
    )
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn aligned_by_key_with_the_gsm8k_template() {
    let dir = tempfile::tempdir().unwrap();
    let files = [("rephrased.jsonl", REPHRASED), ("original.jsonl", ORIGINAL)];
    let summary = run(
        dir.path(),
        &flow("key = \"id\"\ntemplate = \"gsm8k\""),
        &files,
    )
    .await;
    assert!(summary.succeeded(), "{summary:?}");
    let a = artifact(&dir.path().join("out"), "pairs");
    let rows: Vec<Value> = std::fs::read_to_string(a.join("data.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 2, "the identical pair (id 3) is left out");
    assert_eq!(rows[0]["prompt"], "Question: What is 3+4?\nAnswer:");
    assert_eq!(rows[0]["chosen"], " 3 plus 4 makes 7.\n#### 7");
    assert_eq!(rows[0]["rejected"], " 3+4=7\n#### 7");
    assert_eq!(rows[1]["chosen"], " Two and two are four.\n#### 4");
    let info: Value = serde_json::from_slice(&std::fs::read(a.join("info.json")).unwrap()).unwrap();
    assert_eq!(info["format"], "preference");
    assert_eq!(info["identical_left_out"], 1);
    // The output is a preference dataset the readers accept.
    let source = dusflow::data::DatasetSource::from_input(&dusflow::steps::InputArtifact {
        name: "pairs".into(),
        kind: dusflow::steps::ArtifactKind::Dataset,
        path: a.clone(),
        dataset: None,
        merge: None,
    })
    .unwrap();
    assert_eq!(source.format, Some(dusflow::data::RecordFormat::Preference));
}

#[tokio::test(flavor = "multi_thread")]
async fn misaligned_records_are_named() {
    let dir = tempfile::tempdir().unwrap();
    // Row order: the questions of row 1 differ.
    let files = [("rephrased.jsonl", REPHRASED), ("original.jsonl", ORIGINAL)];
    let s = run(dir.path(), &flow(""), &files).await;
    let msg = format!("{s:?}");
    assert!(!s.succeeded());
    assert!(
        msg.contains("rephrased.jsonl:1") && msg.contains("original.jsonl:1"),
        "{msg}"
    );
    assert!(msg.contains("questions differ"), "{msg}");

    // By key: id 9 has no partner.
    let dir = tempfile::tempdir().unwrap();
    let extra = format!("{REPHRASED}{{\"id\": 9, \"question\": \"q\", \"answer\": \"a\"}}\n");
    let files = [
        ("rephrased.jsonl", extra.as_str()),
        ("original.jsonl", ORIGINAL),
    ];
    let s = run(dir.path(), &flow("key = \"id\""), &files).await;
    let msg = format!("{s:?}");
    assert!(
        msg.contains("rephrased.jsonl:4") && msg.contains("no record in the rejected dataset"),
        "{msg}"
    );

    // A record without the key field.
    let dir = tempfile::tempdir().unwrap();
    let missing = ORIGINAL.replace("{\"id\": 2, ", "{");
    let files = [
        ("rephrased.jsonl", REPHRASED),
        ("original.jsonl", missing.as_str()),
    ];
    let s = run(dir.path(), &flow("key = \"id\""), &files).await;
    let msg = format!("{s:?}");
    assert!(
        msg.contains("original.jsonl:2") && msg.contains("missing key field"),
        "{msg}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn max_samples_keeps_a_seeded_subset_in_input_order() {
    let mut rephrased = String::new();
    let mut original = String::new();
    for i in 0..50 {
        rephrased.push_str(&format!(
            "{{\"id\": {i}, \"question\": \"q{i}\", \"answer\": \"good {i}\"}}\n"
        ));
        original.push_str(&format!(
            "{{\"id\": {i}, \"question\": \"q{i}\", \"answer\": \"bad {i}\"}}\n"
        ));
    }
    let files = [
        ("rephrased.jsonl", rephrased.as_str()),
        ("original.jsonl", original.as_str()),
    ];
    let mut picks = Vec::new();
    for _ in 0..2 {
        let dir = tempfile::tempdir().unwrap();
        let summary = run(dir.path(), &flow("key = \"id\"\nmax_samples = 10"), &files).await;
        assert!(summary.succeeded(), "{summary:?}");
        let a = artifact(&dir.path().join("out"), "pairs");
        let ids: Vec<usize> = std::fs::read_to_string(a.join("data.jsonl"))
            .unwrap()
            .lines()
            .map(|l| {
                let v: Value = serde_json::from_str(l).unwrap();
                v["prompt"].as_str().unwrap()[1..].parse().unwrap()
            })
            .collect();
        assert_eq!(ids.len(), 10);
        assert!(ids.windows(2).all(|w| w[0] < w[1]), "input order: {ids:?}");
        assert_ne!(
            ids,
            (0..10).collect::<Vec<_>>(),
            "a random subset, not the first ten"
        );
        let info: Value =
            serde_json::from_str(&std::fs::read_to_string(a.join("info.json")).unwrap()).unwrap();
        assert_eq!(
            (info["count"].as_u64(), info["paired"].as_u64()),
            (Some(10), Some(50))
        );
        picks.push(ids);
    }
    assert_eq!(picks[0], picks[1], "the same seed picks the same pairs");
}

/// A dataset's filters run after pairing: a pair whose chosen record is dropped is left out (counted), a
/// rewritten record is used as rewritten, and a capped input dataset is refused when the workflow loads.
#[tokio::test(flavor = "multi_thread")]
async fn dataset_filters_drop_or_rewrite_pairs_and_caps_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let plugin = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../plugins/length-filter")
        .canonicalize()
        .unwrap();
    let chosen = r#"{"id": 1, "question": "Q1", "answer": "  short one #### 1 "}
{"id": 2, "question": "Q2", "answer": "a very long answer that the filter drops #### 2"}
{"id": 3, "question": "Q3", "answer": "three #### 3"}
"#;
    let rejected = r#"{"id": 3, "question": "Q3", "answer": "3"}
{"id": 1, "question": "Q1", "answer": "1"}
{"id": 2, "question": "Q2", "answer": "2"}
"#;
    let flow = |cap: &str| {
        format!(
            r#"
[workflow]
name = "pairs"
output = "out"

[plugins.len]
path = "{}"
build = true

[datasets.rephrased]
path = "rephrased.jsonl"
filters = ["len"]
{cap}

[datasets.original]
path = "original.jsonl"

[steps.pairs]
kind = "preference-pairs"
inputs = {{ chosen = "rephrased", rejected = "original" }}
key = "id"
filter_params.len = {{ field = "answer", max_chars = 20, trim = true }}
"#,
            plugin.display()
        )
    };
    let files = [("rephrased.jsonl", chosen), ("original.jsonl", rejected)];
    let s = run(dir.path(), &flow(""), &files).await;
    assert!(s.succeeded(), "{s:?}");
    let out = artifact(&dir.path().join("out"), "pairs");
    let pairs: Vec<Value> = std::fs::read_to_string(out.join("data.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(
        pairs,
        vec![
            serde_json::json!({"prompt": "Q1", "chosen": "short one #### 1", "rejected": "1"}),
            serde_json::json!({"prompt": "Q3", "chosen": "three #### 3", "rejected": "3"}),
        ]
    );
    let info: Value =
        serde_json::from_slice(&std::fs::read(out.join("info.json")).unwrap()).unwrap();
    assert_eq!(info["filtered_out"], 1, "{info}");
    let f = &info["filters"]["chosen"][0];
    assert_eq!(
        (
            f["seen"].as_u64(),
            f["kept"].as_u64(),
            f["dropped"].as_u64(),
            f["rewritten"].as_u64()
        ),
        (Some(3), Some(2), Some(1), Some(1)),
        "{info}"
    );

    std::fs::write(dir.path().join("flow.toml"), flow("max_samples = 2")).unwrap();
    let err = match dusflow::workflow::Workflow::load(
        &dir.path().join("flow.toml"),
        &dusflow::steps::builtin_registry(),
    ) {
        Ok(_) => panic!("a capped input dataset should be refused"),
        Err(e) => e.to_string(),
    };
    assert!(
        err.contains("steps.pairs.inputs.chosen") && err.contains("max_samples = 2"),
        "{err}"
    );
}
