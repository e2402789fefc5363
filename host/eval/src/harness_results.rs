//! lm-evaluation-harness's results file layout (0.4.x `simple_evaluate` output, as its `--output_path`
//! writes it), so leaderboard scripts and `lm_eval.utils.make_table` read an evaluation unchanged:
//! `results` (per task `alias` and `"METRIC,FILTER"` values with `"METRIC_stderr,FILTER"`), `versions`,
//! `n-shot`, `higher_is_better`, `configs`, `n-samples`, `group_subtasks` and `config`.
//!
//! Metric names and filters are lm-eval's: multiple-choice tasks report `acc` (and `acc_norm`) with filter
//! `none` — TruthfulQA MC2's score is lm-eval's `acc` of `truthfulqa_mc2` —, GSM8K `exact_match` with the
//! filter that extracted the answer (`strict-match` for `#### N`, `flexible-extract` for the last number),
//! perplexity tasks `word_perplexity` (stderr `N/A`, as lm-eval reports it). Standard errors are lm-eval's
//! `mean_stderr`: the sample standard deviation (n − 1) over the square root of n. MMLU is one entry per
//! subject (`mmlu_<subject>`) plus the `mmlu` group holding dusflow's score (the leaderboard's mean of the
//! subject means; its stderr from the subjects' as for a mean of independent means).

use super::evaluate::TaskResult;
use super::fewshot::Mode;
use super::metrics::Extraction;
use super::tasks::{Metric, TaskSpec};
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;

/// What the layout needs beyond the task results.
pub struct HarnessRun<'a> {
    /// The model's name (its input name in the workflow).
    pub model: &'a str,
    /// Its folder.
    pub model_path: &'a str,
    /// The mode the tasks were scored in.
    pub mode: Mode,
    /// Documents per task, if limited.
    pub limit: Option<usize>,
    /// Sequences per forward pass.
    pub batch_size: usize,
    /// GSM8K's extraction (its filter name).
    pub extraction: Extraction,
}

/// The lm-eval version whose task versions and layout this follows.
pub const LM_EVAL_LAYOUT: &str = "0.4";

/// lm-eval 0.4's task version of a built-in task (`None` for user tasks).
fn task_version(task: &str) -> Option<f64> {
    Some(match task {
        "arc_challenge" | "hellaswag" | "winogrande" => 1.0,
        "truthfulqa_mc2" | "gsm8k" => 3.0,
        "mmlu" => 2.0,
        t if t.starts_with("mmlu_") => 1.0,
        _ => return None,
    })
}

/// The metrics a task's entry reports, in lm-eval's names, with the per-document key each is read from.
fn reported_metrics(spec: &TaskSpec, result: &TaskResult) -> Vec<(&'static str, String)> {
    let builtin = task_version(&spec.name).is_some();
    match spec.metric {
        Metric::Acc | Metric::AccNorm => {
            let mut m = vec![("acc", "acc".to_string())];
            if result.metrics.contains_key("acc_norm") {
                m.push(("acc_norm", "acc_norm".to_string()));
            }
            m
        }
        // lm-eval's truthfulqa_mc2 reports its MC2 score as `acc`; a user task keeps the name mc2.
        Metric::Mc2 if builtin => vec![("acc", "mc2".to_string())],
        Metric::Mc2 => vec![("mc2", "mc2".to_string())],
        Metric::ExactMatch => vec![("exact_match", "exact_match".to_string())],
        Metric::WordPerplexity => vec![("word_perplexity", "word_perplexity".to_string())],
    }
}

fn filter_of(spec: &TaskSpec, run: &HarnessRun<'_>) -> &'static str {
    match spec.metric {
        Metric::ExactMatch => match run.extraction {
            Extraction::Strict => "strict-match",
            Extraction::Flexible => "flexible-extract",
        },
        _ => "none",
    }
}

fn output_type(metric: Metric) -> &'static str {
    match metric {
        Metric::Acc | Metric::AccNorm | Metric::Mc2 => "multiple_choice",
        Metric::ExactMatch => "generate_until",
        Metric::WordPerplexity => "loglikelihood_rolling",
    }
}

/// lm-eval's `mean_stderr`: sample standard deviation over √n (`None` below two values).
pub fn mean_stderr(values: &[f64]) -> Option<f64> {
    let n = values.len();
    if n < 2 {
        return None;
    }
    let mean = values.iter().sum::<f64>() / n as f64;
    let var = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
    Some((var / n as f64).sqrt())
}

fn stderr_value(values: &[f64], metric: &str) -> Value {
    if metric == "word_perplexity" {
        return json!("N/A");
    }
    mean_stderr(values).map_or(json!("N/A"), |s| json!(s))
}

/// The results file of `results` (in evaluation order, with their specs).
pub fn harness_results(run: &HarnessRun<'_>, tasks: &[(&TaskSpec, &TaskResult)]) -> Value {
    let mut results = Map::new();
    let mut versions = Map::new();
    let mut n_shot = Map::new();
    let mut higher = Map::new();
    let mut configs = Map::new();
    let mut n_samples = Map::new();
    let mut group_subtasks = Map::new();
    for (spec, r) in tasks {
        let filter = filter_of(spec, run);
        let metrics = reported_metrics(spec, r);
        let hib: Map<String, Value> = metrics
            .iter()
            .map(|(name, _)| (name.to_string(), json!(*name != "word_perplexity")))
            .collect();
        let metric_list: Vec<Value> = metrics
            .iter()
            .map(|(name, _)| {
                json!({"metric": name, "aggregation": if *name == "word_perplexity" { "weighted_perplexity" } else { "mean" },
                       "higher_is_better": *name != "word_perplexity"})
            })
            .collect();
        let mut add = |name: &str,
                       alias: &str,
                       values: Map<String, Value>,
                       docs: usize,
                       subtasks: Vec<Value>| {
            let mut entry = Map::new();
            entry.insert("alias".into(), json!(alias));
            entry.extend(values);
            results.insert(name.to_string(), Value::Object(entry));
            if let Some(v) = task_version(name) {
                versions.insert(name.to_string(), json!(v));
            } else {
                versions.insert(name.to_string(), json!("N/A"));
            }
            n_shot.insert(name.to_string(), json!(spec.num_fewshot));
            higher.insert(name.to_string(), Value::Object(hib.clone()));
            n_samples.insert(
                name.to_string(),
                json!({"original": docs, "effective": docs}),
            );
            configs.insert(
                name.to_string(),
                json!({
                    "task": name,
                    "test_split": spec.eval_split,
                    "fewshot_split": spec.fewshot_split,
                    "num_fewshot": spec.num_fewshot,
                    "output_type": output_type(spec.metric),
                    "metric_list": metric_list,
                    "metadata": {"version": task_version(name).map_or(json!("N/A"), |v| json!(v)),
                                 "scored_by": format!("dusflow {} mode", mode_name(run.mode))},
                }),
            );
            group_subtasks.insert(name.to_string(), Value::Array(subtasks));
        };
        let per_doc = |key: &str, group: Option<&str>| -> Vec<f64> {
            r.docs
                .iter()
                .filter(|d| group.is_none() || d.group.as_deref() == group)
                .filter_map(|d| d.metrics.get(key).copied())
                .collect()
        };
        if r.groups.is_empty() {
            let mut values = Map::new();
            for (name, key) in &metrics {
                let value = r.metrics.get(key).copied().unwrap_or(r.score);
                values.insert(format!("{name},{filter}"), json!(value));
                values.insert(
                    format!("{name}_stderr,{filter}"),
                    stderr_value(&per_doc(key, None), name),
                );
            }
            add(&spec.name, &spec.name, values, r.num_docs, vec![]);
        } else {
            // A grouped task (MMLU): one entry per subject, then the group.
            let mut subject_stderrs: BTreeMap<String, Vec<f64>> = BTreeMap::new();
            let mut names = Vec::new();
            for (group, means) in &r.groups {
                let sub = format!("{}_{group}", spec.name);
                let mut values = Map::new();
                let docs = r
                    .docs
                    .iter()
                    .filter(|d| d.group.as_deref() == Some(group.as_str()))
                    .count();
                for (name, key) in &metrics {
                    let value = means.get(key).copied().unwrap_or(f64::NAN);
                    let se = mean_stderr(&per_doc(key, Some(group)));
                    subject_stderrs
                        .entry(name.to_string())
                        .or_default()
                        .push(se.unwrap_or(0.0));
                    values.insert(format!("{name},{filter}"), json!(value));
                    values.insert(
                        format!("{name}_stderr,{filter}"),
                        se.map_or(json!("N/A"), |s| json!(s)),
                    );
                }
                add(&sub, &format!(" - {group}"), values, docs, vec![]);
                names.push(json!(sub));
            }
            let mut values = Map::new();
            for (name, key) in &metrics {
                let value = r.metrics.get(key).copied().unwrap_or(r.score);
                let ses = &subject_stderrs[*name];
                let k = ses.len() as f64;
                let se = ses.iter().map(|s| s * s).sum::<f64>().sqrt() / k;
                values.insert(format!("{name},{filter}"), json!(value));
                values.insert(format!("{name}_stderr,{filter}"), json!(se));
            }
            add(&spec.name, &spec.name, values, r.num_docs, names);
        }
    }
    json!({
        "results": results,
        "group_subtasks": group_subtasks,
        "configs": configs,
        "versions": versions,
        "n-shot": n_shot,
        "higher_is_better": higher,
        "n-samples": n_samples,
        "config": {
            "model": "dusflow",
            "model_args": format!("pretrained={}", run.model_path),
            "model_name": run.model,
            "batch_size": run.batch_size,
            "limit": run.limit,
            "mode": mode_name(run.mode),
        },
        "lm_eval_layout": LM_EVAL_LAYOUT,
        "dusflow_version": env!("CARGO_PKG_VERSION"),
    })
}

fn mode_name(mode: Mode) -> &'static str {
    match mode {
        Mode::LeaderboardV1 => "leaderboard-v1",
        Mode::Harness => "harness",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stderr_is_the_sample_deviation_over_root_n_as_lm_eval_computes_it() {
        // lm-eval 0.4.13 reported acc_stderr 0.28867513459481287 for acc 0.5 over four documents.
        let se = mean_stderr(&[1.0, 1.0, 0.0, 0.0]).unwrap();
        assert!((se - 0.28867513459481287).abs() < 1e-15, "{se}");
        assert_eq!(mean_stderr(&[1.0]), None);
    }
}
