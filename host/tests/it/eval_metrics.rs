//! Metrics, answer extraction, prompt details and tables. GSM8K extraction is checked against the pip
//! harness's own filters and exact_match (fixtures/eval/harness/gsm8k_extraction.json).

use dusflow::eval::metrics::{
    acc, acc_norm, extract, extract_v1, gsm8k_exact_match, mc2, Extraction, INVALID,
};
use dusflow::eval::prompts::{
    hellaswag_preprocess, mmlu_description, py_capitalize, DocKind, Format,
};
use dusflow::eval::tables::{markdown_table, Summary, TaskScore};
use dusflow::eval::tasks::{render, CustomKind, CustomTask, TaskSpec};
use dusflow::eval::{h6_average, Mode};
use serde_json::{json, Value};
use std::collections::BTreeMap;

#[test]
fn gsm8k_extraction_and_exact_match_agree_with_the_harness() {
    let path = format!(
        "{}/tests/fixtures/eval/harness/gsm8k_extraction.json",
        env!("CARGO_MANIFEST_DIR")
    );
    let cases: Vec<Value> = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    assert!(cases.len() >= 10);
    for c in cases {
        let text = c["completion"].as_str().unwrap();
        let gold = c["gold"].as_str().unwrap();
        for (how, key) in [
            (Extraction::Strict, "strict"),
            (Extraction::Flexible, "flexible"),
        ] {
            let pred = extract(text, how);
            assert_eq!(pred, c[key].as_str().unwrap(), "{key} on {text:?}");
            let em = gsm8k_exact_match(&pred, gold);
            assert_eq!(
                em,
                c[format!("{key}_exact_match")].as_f64().unwrap(),
                "{key} exact match on {text:?} vs {gold:?}"
            );
        }
    }
}

#[test]
fn leaderboard_v1_gsm8k_rule_strips_commas_and_needs_the_marker() {
    assert_eq!(extract_v1("so 3 + 4 = 7.\n#### 1,007"), "1007");
    assert_eq!(extract_v1("#### -2.5 then #### 9"), "-2.5");
    assert_eq!(extract_v1("the answer is 12"), INVALID);
}

#[test]
fn choice_metrics() {
    let lls = [-4.0, -3.0, -3.0, -9.0];
    assert_eq!(acc(&lls, 1), 1.0, "first maximum wins ties");
    assert_eq!(acc(&lls, 2), 0.0);
    // Per character of the choice text: -4/8 = -0.5 beats -3/2 = -1.5.
    let choices: Vec<String> = ["eightchr", "ab", "cd", "x"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    assert_eq!(acc_norm(&lls, &choices, 0), 1.0);
    // Characters, not bytes.
    let choices: Vec<String> = ["éé", "abc"].iter().map(|s| s.to_string()).collect();
    assert_eq!(acc_norm(&[-2.0, -3.3], &choices, 1), 0.0);
    let p = mc2(&[(0.5f64).ln(), (0.3f64).ln(), (0.2f64).ln()], 1);
    assert!((p - 0.5).abs() < 1e-12);
}

#[test]
fn hellaswag_cleaning_and_python_capitalize() {
    assert_eq!(
        hellaswag_preprocess(" Do it [title] Then go [step] now.  "),
        "Do it. Then go now."
    );
    assert_eq!(py_capitalize("then SHE smiles"), "Then she smiles");
    let doc = json!({"activity_label": "Baking", "ctx_a": "A man [title] cooks.", "ctx_b": "then HE", "endings": ["eats [step] it.", "runs", "a", "b"], "label": "1"});
    let f = Format::Hellaswag.format(&doc).unwrap();
    assert_eq!(f.text, "Baking: A man. cooks. Then he");
    assert_eq!(f.target, "runs");
    match f.kind {
        DocKind::Choice { choices, .. } => assert_eq!(choices[0], "eats it."),
        other => panic!("{other:?}"),
    }
}

#[test]
fn arc_numeric_keys_mmlu_and_winogrande_formats() {
    let doc = json!({"question": "Q?", "choices": {"text": ["a", "b", "c"], "label": ["1", "2", "3"]}, "answerKey": "3"});
    assert_eq!(Format::Arc.format(&doc).unwrap().target, "c");
    let doc = json!({"question": " What?\n", "subject": "x", "choices": ["w", "x", "y", "z"], "answer": 2});
    let f = Format::Mmlu.format(&doc).unwrap();
    assert_eq!(f.text, "What?\nA. w\nB. x\nC. y\nD. z\nAnswer:");
    assert_eq!(f.target, "C");
    assert_eq!(mmlu_description("high_school_us_history"), "The following are multiple choice questions (with answers) about high school us history.\n\n");
    let doc = json!({"sentence": "Ann hid from Bo because _ was  scared. ", "option1": "Ann", "option2": "Bo", "answer": "2"});
    let f = Format::Winogrande.format(&doc).unwrap();
    assert_eq!(f.text, "Ann hid from Bo because Bo");
    assert_eq!(f.target, "was  scared.");
    let err = Format::Winogrande
        .format(&json!({"sentence": "no blank", "option1": "a", "option2": "b", "answer": "1"}))
        .unwrap_err();
    assert!(err.to_string().contains("blank"), "{err}");
    let err = Format::Arc
        .format(
            &json!({"question": "Q", "choices": {"text": ["a"], "label": ["A"]}, "answerKey": "Z"}),
        )
        .unwrap_err();
    assert!(err.to_string().contains("answerKey"), "{err}");
}

#[test]
fn templates_and_custom_tasks() {
    let doc = json!({"q": "Why?", "meta": {"n": 3}, "list": ["x", "y"]});
    assert_eq!(
        render("{q} {meta.n} {list.1} {{literal}}", &doc).unwrap(),
        "Why? 3 y {literal}"
    );
    assert!(render("{missing}", &doc)
        .unwrap_err()
        .to_string()
        .contains("missing"));
    assert!(render("{q", &doc).is_err());
    let task = CustomTask {
        name: "t".into(),
        kind: CustomKind::MultipleChoice,
        template: "{q}".into(),
        choices: None,
        choice_list: Some(vec!["no".into(), "yes".into()]),
        choice_fields: None,
        gold: Some("ans".into()),
        labels: None,
        target: None,
        metric: None,
        num_fewshot: 0,
        eval_split: "test".into(),
        fewshot_split: None,
        fewshot_first_n: false,
        description: String::new(),
        until: vec![],
        max_gen_toks: None,
        answer_regex: None,
    };
    let spec = TaskSpec::custom(&task).unwrap();
    for (ans, gold) in [(json!("yes"), 1usize), (json!(0), 0), (json!("1"), 1)] {
        let f = spec.format(&json!({"q": "Is it?", "ans": ans})).unwrap();
        assert_eq!(f.target, ["no", "yes"][gold]);
    }
    assert!(spec
        .format(&json!({"q": "Is it?", "ans": "maybe"}))
        .is_err());
    // Preference pairs: the choices are two fields, gold names the preferred one.
    let pairs = CustomTask {
        choice_list: None,
        choice_fields: Some(vec!["chosen".into(), "rejected".into()]),
        gold: Some("chosen".into()),
        template: "{prompt}".into(),
        ..task.clone()
    };
    let f = TaskSpec::custom(&pairs)
        .unwrap()
        .format(&json!({"prompt": "2+2=", "chosen": " 4", "rejected": " 5"}))
        .unwrap();
    assert_eq!((f.text.as_str(), f.target.as_str()), ("2+2=", " 4"));
    let two = CustomTask {
        choices: Some("list".into()),
        ..pairs
    };
    assert!(TaskSpec::custom(&two)
        .unwrap_err()
        .to_string()
        .contains("exactly one of"));
    let bad = CustomTask {
        choice_list: None,
        ..task
    };
    assert!(TaskSpec::custom(&bad)
        .unwrap_err()
        .to_string()
        .contains("choices"));
}

fn summary(scores: &[(&str, f64)]) -> Summary {
    Summary {
        model: "m".into(),
        mode: Mode::LeaderboardV1,
        limit: None,
        tasks: scores
            .iter()
            .map(|(t, s)| {
                let metric = if *t == "gsm8k" { "exact_match" } else { "acc" };
                (
                    t.to_string(),
                    TaskScore {
                        metric: metric.into(),
                        score: *s,
                        metrics: BTreeMap::new(),
                        num_docs: 1,
                        num_fewshot: 5,
                    },
                )
            })
            .collect(),
        h6: h6_average(&scores.iter().map(|(t, s)| (t.to_string(), *s)).collect()),
    }
}

#[test]
fn tables_show_percentages_and_the_h6_mean() {
    let full = summary(&[
        ("gsm8k", 0.6),
        ("arc_challenge", 0.7),
        ("hellaswag", 0.8),
        ("mmlu", 0.65),
        ("truthfulqa_mc2", 0.5),
        ("winogrande", 0.75),
    ]);
    assert!((full.h6.unwrap() - 66.666_666_666).abs() < 1e-6);
    let partial = summary(&[("arc_challenge", 0.5), ("custom", 0.25)]);
    assert_eq!(partial.h6, None);
    let md = markdown_table(&[("full".into(), full), ("partial".into(), partial)]);
    let lines: Vec<&str> = md.lines().collect();
    assert_eq!(
        lines[0],
        "| Model | H6 (Avg.) | ARC | HellaSwag | MMLU | TruthfulQA | Winogrande | GSM8K | custom |"
    );
    assert_eq!(
        lines[2],
        "| full | 66.67 | 70.00 | 80.00 | 65.00 | 50.00 | 75.00 | 60.00 | – |"
    );
    assert_eq!(
        lines[3],
        "| partial | – | 50.00 | – | – | – | – | – | 25.00 |"
    );
}
