//! Parity with lm-evaluation-harness 0.4.13 (pip, HF backend) on a tiny random Llama: the same prompts
//! byte for byte, log-likelihoods within 1e-4, the same accuracies, the same GSM8K generations and
//! extractions. Fixtures: fixtures/eval/make_fixtures.py (versions in fixtures/eval/versions.json).

use dusflow::eval::evaluate::{evaluate_task, EvalOptions};
use dusflow::eval::fewshot::Mode;
use dusflow::eval::tasks::{BuiltinOptions, TaskSpec};
use dusflow::eval::{Extraction, Scorer, TaskData, TaskResult};
use dusflow::model::{load_model, Llama, Tokenizer};
use serde_json::Value;
use std::path::PathBuf;

fn dir(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/eval")
        .join(rel)
}

fn model() -> (Llama, Tokenizer) {
    let m = load_model(
        &dir("model"),
        candle_core::DType::F32,
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let t = Tokenizer::from_model_dir(&dir("model")).unwrap();
    (m, t)
}

fn harness(name: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(dir(&format!("harness/{name}.json"))).unwrap())
        .unwrap()
}

fn run(
    task: &str,
    data: &str,
    prefix_reuse: bool,
    batch_size: usize,
    extraction: Extraction,
) -> TaskResult {
    let (model, tok) = model();
    let scorer = Scorer {
        model: &model,
        tokenizer: &tok,
        add_special_tokens: true,
        max_length: model.config().max_position_embeddings,
        batch_size,
        prefix_reuse,
        cancelled: None,
    };
    let spec = TaskSpec::builtin(
        task,
        BuiltinOptions {
            mode: Mode::Harness,
            gsm8k_colon_stop: true,
        },
    )
    .unwrap();
    let data = TaskData::load(&dir(&format!("docs/{data}"))).unwrap();
    let opts = EvalOptions {
        mode: Mode::Harness,
        limit: None,
        extraction,
    };
    evaluate_task(&spec, &data, &scorer, &opts, &mut |_| {}).unwrap()
}

/// Compares our records of `group` (or all) with the harness's documents.
fn compare_loglikelihood(
    ours: &TaskResult,
    fixture: &Value,
    group: Option<&str>,
    our_metric: &str,
    their_metric: &str,
) {
    let docs = fixture["docs"].as_array().unwrap();
    let mine: Vec<_> = ours
        .docs
        .iter()
        .filter(|d| d.group.as_deref() == group)
        .collect();
    assert_eq!(mine.len(), docs.len(), "{}: document count", ours.task);
    for want in docs {
        let id = want["doc_id"].as_u64().unwrap() as usize;
        let got = mine.iter().find(|d| d.doc_id == id).unwrap();
        let reqs: Vec<(String, String)> = want["requests"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                (
                    r[0].as_str().unwrap().to_string(),
                    r[1].as_str().unwrap().to_string(),
                )
            })
            .collect();
        assert_eq!(got.requests, reqs, "{} doc {id}: prompts differ", ours.task);
        let lls: Vec<f64> = want["loglikelihoods"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        assert_eq!(got.loglikelihoods.len(), lls.len());
        for (a, b) in got.loglikelihoods.iter().zip(&lls) {
            assert!(
                (a - b).abs() < 1e-4,
                "{} doc {id}: log-likelihood {a} vs harness {b}",
                ours.task
            );
        }
        for (m_ours, m_theirs) in [(our_metric, their_metric), ("acc_norm", "acc_norm")] {
            if let Some(w) = want["metrics"].get(m_theirs) {
                let g = got.metrics[m_ours];
                let w = w.as_f64().unwrap();
                if m_ours == "mc2" {
                    assert!(
                        (g - w).abs() < 1e-6,
                        "{} doc {id}: mc2 {g} vs {w}",
                        ours.task
                    );
                } else {
                    assert_eq!(g, w, "{} doc {id}: {m_ours}", ours.task);
                }
            }
        }
    }
}

#[test]
fn arc_challenge_25_shot_matches_the_harness() {
    let ours = run(
        "arc_challenge",
        "arc_challenge",
        true,
        4,
        Extraction::Strict,
    );
    let fx = harness("arc_challenge");
    compare_loglikelihood(&ours, &fx, None, "acc", "acc");
    assert_eq!(
        ours.metrics["acc_norm"],
        fx["results"]["acc_norm,none"].as_f64().unwrap()
    );
}

#[test]
fn hellaswag_10_shot_matches_the_harness() {
    let ours = run("hellaswag", "hellaswag", true, 4, Extraction::Strict);
    let fx = harness("hellaswag");
    compare_loglikelihood(&ours, &fx, None, "acc", "acc");
    assert_eq!(
        ours.metrics["acc"],
        fx["results"]["acc,none"].as_f64().unwrap()
    );
}

#[test]
fn mmlu_5_shot_matches_the_harness_per_subject() {
    let ours = run("mmlu", "mmlu", true, 4, Extraction::Strict);
    for subject in ["abstract_algebra", "college_physics"] {
        let fx = harness(&format!("mmlu_{subject}"));
        compare_loglikelihood(&ours, &fx, Some(subject), "acc", "acc");
        assert_eq!(
            ours.groups[subject]["acc"],
            fx["results"]["acc,none"].as_f64().unwrap()
        );
    }
}

#[test]
fn truthfulqa_mc2_matches_the_harness() {
    let ours = run(
        "truthfulqa_mc2",
        "truthfulqa_mc2",
        true,
        4,
        Extraction::Strict,
    );
    let fx = harness("truthfulqa_mc2");
    compare_loglikelihood(&ours, &fx, None, "mc2", "acc");
    assert!((ours.score - fx["results"]["acc,none"].as_f64().unwrap()).abs() < 1e-6);
}

#[test]
fn winogrande_partial_scoring_matches_the_harness() {
    let ours = run("winogrande", "winogrande", true, 4, Extraction::Strict);
    let fx = harness("winogrande");
    compare_loglikelihood(&ours, &fx, None, "acc", "acc");
    assert_eq!(ours.score, fx["results"]["acc,none"].as_f64().unwrap());
}

#[test]
fn gsm8k_generation_and_extraction_match_the_harness() {
    let fx = harness("gsm8k");
    for (extraction, filter) in [
        (Extraction::Strict, "strict-match"),
        (Extraction::Flexible, "flexible-extract"),
    ] {
        let ours = run("gsm8k", "gsm8k", true, 2, extraction);
        let docs: Vec<&Value> = fx["docs"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|d| d["filter"] == filter)
            .collect();
        assert_eq!(ours.docs.len(), docs.len());
        for want in docs {
            let id = want["doc_id"].as_u64().unwrap() as usize;
            let got = ours.docs.iter().find(|d| d.doc_id == id).unwrap();
            assert_eq!(
                got.prompt.as_deref(),
                want["prompt"].as_str(),
                "doc {id}: prompt"
            );
            assert_eq!(
                got.generation.as_deref(),
                want["generation"].as_str(),
                "doc {id}: generation"
            );
            assert_eq!(
                got.extracted.as_deref(),
                want["filtered"].as_str(),
                "doc {id}: {filter}"
            );
            assert_eq!(
                got.metrics["exact_match"],
                want["metrics"]["exact_match"].as_f64().unwrap()
            );
        }
    }
}

#[test]
fn prefix_reuse_and_batching_do_not_change_scores() {
    let a = run(
        "arc_challenge",
        "arc_challenge",
        true,
        1,
        Extraction::Strict,
    );
    let b = run(
        "arc_challenge",
        "arc_challenge",
        false,
        3,
        Extraction::Strict,
    );
    for (x, y) in a.docs.iter().zip(&b.docs) {
        assert_eq!(x.requests, y.requests);
        for (p, q) in x.loglikelihoods.iter().zip(&y.loglikelihoods) {
            assert!((p - q).abs() < 1e-4, "{p} vs {q}");
        }
    }
}

fn run_v1(task: &str, data: &str) -> TaskResult {
    let (model, tok) = model();
    let scorer = Scorer {
        model: &model,
        tokenizer: &tok,
        add_special_tokens: false,
        max_length: model.config().max_position_embeddings,
        batch_size: 4,
        prefix_reuse: true,
        cancelled: None,
    };
    let spec = TaskSpec::builtin(
        task,
        BuiltinOptions {
            mode: Mode::LeaderboardV1,
            gsm8k_colon_stop: true,
        },
    )
    .unwrap();
    let data = TaskData::load(&dir(&format!("docs/{data}"))).unwrap();
    let opts = EvalOptions {
        mode: Mode::LeaderboardV1,
        limit: None,
        extraction: Extraction::Strict,
    };
    evaluate_task(&spec, &data, &scorer, &opts, &mut |_| {}).unwrap()
}

/// Leaderboard-v1 mode against fixtures/eval/v1 (see `v1_fixture` in the generator): document order,
/// few-shot examples, prompts, BOS-free log-likelihoods and v1 GSM8K generation.
#[test]
fn leaderboard_v1_mode_matches_the_v1_fixtures() {
    for (task, data, fixtures) in [
        (
            "arc_challenge",
            "arc_challenge",
            vec![("arc_challenge", None)],
        ),
        ("hellaswag", "hellaswag", vec![("hellaswag", None)]),
        (
            "truthfulqa_mc2",
            "truthfulqa_mc2",
            vec![("truthfulqa_mc2", None)],
        ),
        ("winogrande", "winogrande", vec![("winogrande", None)]),
        (
            "mmlu",
            "mmlu",
            vec![
                ("mmlu_abstract_algebra", Some("abstract_algebra")),
                ("mmlu_college_physics", Some("college_physics")),
            ],
        ),
        ("gsm8k", "gsm8k", vec![("gsm8k", None)]),
    ] {
        let ours = run_v1(task, data);
        for (name, group) in fixtures {
            let fx: Value = serde_json::from_str(
                &std::fs::read_to_string(dir(&format!("v1/{name}.json"))).unwrap(),
            )
            .unwrap();
            let want = fx["docs"].as_array().unwrap();
            let got: Vec<_> = ours
                .docs
                .iter()
                .filter(|d| d.group.as_deref() == group)
                .collect();
            let order: Vec<u64> = got.iter().map(|d| d.doc_id as u64).collect();
            let want_order: Vec<u64> = want.iter().map(|d| d["doc_id"].as_u64().unwrap()).collect();
            assert_eq!(order, want_order, "{name}: document order");
            for (g, w) in got.iter().zip(want) {
                let shots: Vec<u64> = g.fewshot.iter().map(|&s| s as u64).collect();
                let want_shots: Vec<u64> = w["fewshot"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_u64().unwrap())
                    .collect();
                assert_eq!(
                    shots, want_shots,
                    "{name} doc {}: few-shot examples",
                    g.doc_id
                );
                if task == "gsm8k" {
                    assert_eq!(
                        g.prompt.as_deref(),
                        w["prompt"].as_str(),
                        "{name} doc {}",
                        g.doc_id
                    );
                    assert_eq!(
                        g.generation.as_deref(),
                        w["generation"].as_str(),
                        "{name} doc {}",
                        g.doc_id
                    );
                    assert_eq!(
                        g.extracted.as_deref(),
                        w["extracted"].as_str(),
                        "{name} doc {}",
                        g.doc_id
                    );
                    continue;
                }
                let reqs: Vec<(String, String)> = w["requests"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|r| {
                        (
                            r[0].as_str().unwrap().to_string(),
                            r[1].as_str().unwrap().to_string(),
                        )
                    })
                    .collect();
                assert_eq!(g.requests, reqs, "{name} doc {}: prompts", g.doc_id);
                for (a, b) in g
                    .loglikelihoods
                    .iter()
                    .zip(w["loglikelihoods"].as_array().unwrap())
                {
                    let b = b.as_f64().unwrap();
                    assert!((a - b).abs() < 1e-4, "{name} doc {}: {a} vs {b}", g.doc_id);
                }
            }
        }
    }
}
