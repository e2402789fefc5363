//! Task definitions: the six H6 tasks of the Open LLM Leaderboard (v1) and user tasks written in TOML.

use super::data::{field, str_list};
use super::fewshot::Mode;
use super::prompts::{DocKind, Format, Formatted, Gold};
use anyhow::{bail, ensure, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The metric a task reports first (the one the tables show).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Metric {
    /// Argmax log-likelihood is the gold choice.
    Acc,
    /// Argmax log-likelihood per character is the gold choice.
    AccNorm,
    /// TruthfulQA's normalised probability of the true answers.
    Mc2,
    /// Extracted answer equals the reference.
    ExactMatch,
    /// Perplexity per word of a text set (lower is better).
    WordPerplexity,
}

impl Metric {
    /// The metric's name in results (`acc`, `acc_norm`, ...).
    pub fn name(self) -> &'static str {
        match self {
            Metric::Acc => "acc",
            Metric::AccNorm => "acc_norm",
            Metric::Mc2 => "mc2",
            Metric::ExactMatch => "exact_match",
            Metric::WordPerplexity => "word_perplexity",
        }
    }
}

/// The H6 tasks in the paper's column order.
pub const H6: [&str; 6] = [
    "arc_challenge",
    "hellaswag",
    "mmlu",
    "truthfulqa_mc2",
    "winogrande",
    "gsm8k",
];

/// A task the user defines in TOML (`[[steps.NAME.custom]]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CustomTask {
    /// Task name (results key).
    pub name: String,
    /// What is scored.
    pub kind: CustomKind,
    /// Prompt template; `{field}` / `{a.b}` insert fields of the document, `{{`/`}}` are literal braces.
    pub template: String,
    /// Field holding the list of choice texts (multiple-choice).
    #[serde(default)]
    pub choices: Option<String>,
    /// Fixed choice texts for every document (instead of `choices`).
    #[serde(default)]
    pub choice_list: Option<Vec<String>>,
    /// Fields each holding one choice's text, in order (instead of `choices`), e.g. `["chosen", "rejected"]`
    /// with `gold = "chosen"` scores preference pairs.
    #[serde(default)]
    pub choice_fields: Option<Vec<String>>,
    /// Field holding the answer: a choice index, a label (see `labels`), a choice text, or the reference
    /// answer of a generation task.
    #[serde(default)]
    pub gold: Option<String>,
    /// Field holding the choices' labels (e.g. `choices.label`) that `gold` names.
    #[serde(default)]
    pub labels: Option<String>,
    /// Template of the answer shown in few-shot examples (default: the gold choice or the gold field).
    #[serde(default)]
    pub target: Option<String>,
    /// Metric (default: acc for multiple-choice, exact_match for generate, word_perplexity for perplexity).
    #[serde(default)]
    pub metric: Option<Metric>,
    /// Few-shot examples per document.
    #[serde(default)]
    pub num_fewshot: usize,
    /// Split evaluated.
    #[serde(default = "default_eval_split")]
    pub eval_split: String,
    /// Split the examples come from (default: `train`, or the evaluated documents for a single file).
    #[serde(default)]
    pub fewshot_split: Option<String>,
    /// Take the first k examples in order instead of random ones.
    #[serde(default)]
    pub fewshot_first_n: bool,
    /// Text put before everything.
    #[serde(default)]
    pub description: String,
    /// Stop strings of a generation task.
    #[serde(default)]
    pub until: Vec<String>,
    /// Most generated tokens.
    #[serde(default)]
    pub max_gen_toks: Option<usize>,
    /// Regex whose first group is the answer in both generation and reference (default: whole text, trimmed).
    #[serde(default)]
    pub answer_regex: Option<String>,
}

fn default_eval_split() -> String {
    "test".into()
}

/// What a custom task scores.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CustomKind {
    /// Log-likelihood of each choice after the prompt.
    MultipleChoice,
    /// Greedy generation compared with a reference.
    Generate,
    /// Perplexity of the rendered template.
    Perplexity,
}

/// How a task's documents are formatted.
#[derive(Debug, Clone, PartialEq)]
pub enum DocFormat {
    /// A built-in format.
    Builtin(Format),
    /// A user template.
    Custom(Box<CustomTask>),
}

/// Everything needed to evaluate one task.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskSpec {
    /// Results key.
    pub name: String,
    /// Document format.
    pub format: DocFormat,
    /// Few-shot examples per document.
    pub num_fewshot: usize,
    /// Split evaluated.
    pub eval_split: String,
    /// Split of the few-shot examples (`None`: zero-shot only).
    pub fewshot_split: Option<String>,
    /// First k examples in order (MMLU) instead of random ones.
    pub fewshot_first_n: bool,
    /// Evaluate per value of this field and average the groups (MMLU's `subject`).
    pub group_by: Option<String>,
    /// The metric the tables show.
    pub metric: Metric,
    /// Fixed text before the examples.
    pub description: String,
    /// Stop strings for generation.
    pub until: Vec<String>,
    /// Most generated tokens.
    pub max_gen_toks: usize,
    /// GSM8K-style `#### N` answers (extracted and compared per the mode).
    pub gsm8k_answers: bool,
    /// The harness config has no test split (nor few-shot split), so lm-eval 0.4 draws one example more
    /// and drops the evaluated document (see [`super::fewshot::ShotPool::SeparateDrawOneMore`]).
    pub harness_draws_one_more: bool,
}

/// Options that change built-in task definitions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BuiltinOptions {
    /// Whose behaviour to reproduce.
    pub mode: Mode,
    /// Keep `:` among GSM8K's stop strings in leaderboard-v1 mode (it cuts worked answers like `Step 1:`).
    pub gsm8k_colon_stop: bool,
}

impl TaskSpec {
    /// A built-in task by name: `arc_challenge`, `hellaswag`, `mmlu`, `truthfulqa_mc2` (or `truthfulqa`),
    /// `winogrande`, `gsm8k`.
    pub fn builtin(name: &str, opts: BuiltinOptions) -> Result<TaskSpec> {
        let base = |name: &str, format, k, eval: &str, shots: Option<&str>, metric| TaskSpec {
            name: name.to_string(),
            format: DocFormat::Builtin(format),
            num_fewshot: k,
            eval_split: eval.to_string(),
            fewshot_split: shots.map(str::to_string),
            fewshot_first_n: false,
            group_by: None,
            metric,
            description: String::new(),
            until: vec![],
            max_gen_toks: 256,
            gsm8k_answers: false,
            harness_draws_one_more: false,
        };
        Ok(match name {
            "arc_challenge" | "arc" => base("arc_challenge", Format::Arc, 25, "test", Some("train"), Metric::AccNorm),
            "hellaswag" => TaskSpec {
                harness_draws_one_more: true,
                ..base("hellaswag", Format::Hellaswag, 10, "validation", Some("train"), Metric::AccNorm)
            },
            "mmlu" => TaskSpec {
                fewshot_first_n: true,
                group_by: Some("subject".into()),
                ..base("mmlu", Format::Mmlu, 5, "test", Some("dev"), Metric::Acc)
            },
            "truthfulqa_mc2" | "truthfulqa" => base("truthfulqa_mc2", Format::TruthfulQaMc2, 0, "validation", None, Metric::Mc2),
            "winogrande" => TaskSpec {
                harness_draws_one_more: true,
                ..base("winogrande", Format::Winogrande, 5, "validation", Some("train"), Metric::Acc)
            },
            "gsm8k" => {
                let until: Vec<String> = match opts.mode {
                    Mode::LeaderboardV1 if opts.gsm8k_colon_stop => vec![":".into(), "Question:".into(), "Question".into()],
                    Mode::LeaderboardV1 => vec!["Question:".into(), "Question".into()],
                    Mode::Harness => vec!["Question:".into(), "</s>".into(), "<|im_end|>".into()],
                };
                TaskSpec { until, gsm8k_answers: true, ..base("gsm8k", Format::Gsm8k, 5, "test", Some("train"), Metric::ExactMatch) }
            }
            other => bail!(
                "unknown task `{other}` (built-in: arc_challenge, hellaswag, mmlu, truthfulqa_mc2, winogrande, gsm8k; \
                 or define it in a [[custom]] table)"
            ),
        })
    }

    /// A user task.
    pub fn custom(task: &CustomTask) -> Result<TaskSpec> {
        let metric = task.metric.unwrap_or(match task.kind {
            CustomKind::MultipleChoice => Metric::Acc,
            CustomKind::Generate => Metric::ExactMatch,
            CustomKind::Perplexity => Metric::WordPerplexity,
        });
        let allowed: &[Metric] = match task.kind {
            CustomKind::MultipleChoice => &[Metric::Acc, Metric::AccNorm, Metric::Mc2],
            CustomKind::Generate => &[Metric::ExactMatch],
            CustomKind::Perplexity => &[Metric::WordPerplexity],
        };
        ensure!(
            allowed.contains(&metric),
            "task `{}`: metric `{}` does not fit kind {:?}",
            task.name,
            metric.name(),
            task.kind
        );
        if task.kind == CustomKind::MultipleChoice {
            let given = [
                task.choices.is_some(),
                task.choice_list.is_some(),
                task.choice_fields.is_some(),
            ];
            ensure!(
                given.iter().filter(|g| **g).count() == 1,
                "task `{}`: give exactly one of `choices` (a field), `choice_list` or `choice_fields`",
                task.name
            );
        }
        if task.kind != CustomKind::Perplexity {
            ensure!(
                task.gold.is_some(),
                "task `{}`: `gold` (the answer field) is required",
                task.name
            );
        }
        if let Some(re) = &task.answer_regex {
            regex::Regex::new(re)
                .with_context(|| format!("task `{}`: invalid answer_regex", task.name))?;
        }
        Ok(TaskSpec {
            name: task.name.clone(),
            format: DocFormat::Custom(Box::new(task.clone())),
            num_fewshot: task.num_fewshot,
            eval_split: task.eval_split.clone(),
            fewshot_split: Some(task.fewshot_split.clone().unwrap_or_else(|| "train".into())),
            fewshot_first_n: task.fewshot_first_n,
            group_by: None,
            metric,
            description: task.description.clone(),
            until: task.until.clone(),
            max_gen_toks: task.max_gen_toks.unwrap_or(256),
            gsm8k_answers: false,
            harness_draws_one_more: false,
        })
    }

    /// Formats one document.
    pub fn format(&self, doc: &Value) -> Result<Formatted> {
        match &self.format {
            DocFormat::Builtin(f) => f.format(doc),
            DocFormat::Custom(t) => format_custom(t, doc),
        }
    }
}

/// Fills `{field.path}` placeholders from `doc`; `{{` and `}}` are literal braces.
pub fn render(template: &str, doc: &Value) -> Result<String> {
    let mut out = String::with_capacity(template.len());
    let mut rest = template;
    while let Some(i) = rest.find(['{', '}']) {
        out.push_str(&rest[..i]);
        let c = rest.as_bytes()[i];
        if rest[i + 1..].starts_with(c as char) {
            out.push(c as char);
            rest = &rest[i + 2..];
            continue;
        }
        ensure!(c == b'{', "unmatched `}}` in template {template:?}");
        let end = rest[i..]
            .find('}')
            .with_context(|| format!("unclosed `{{` in template {template:?}"))?
            + i;
        let name = rest[i + 1..end].trim();
        match field(doc, name) {
            Some(Value::String(s)) => out.push_str(s),
            Some(Value::Null) | None => {
                bail!("template field `{name}` is missing from the document")
            }
            Some(v) => out.push_str(&v.to_string()),
        }
        rest = &rest[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

fn format_custom(t: &CustomTask, doc: &Value) -> Result<Formatted> {
    let text = render(&t.template, doc)?;
    match t.kind {
        CustomKind::Perplexity => Ok(Formatted {
            text,
            target: String::new(),
            kind: DocKind::Rolling,
        }),
        CustomKind::Generate => {
            let gold = t.gold.as_deref().expect("checked");
            let reference = match field(doc, gold) {
                Some(Value::String(s)) => s.clone(),
                Some(v) if !v.is_null() => v.to_string(),
                _ => bail!("missing field `{gold}`"),
            };
            let target = match &t.target {
                Some(tpl) => render(tpl, doc)?,
                None => reference.clone(),
            };
            Ok(Formatted {
                text,
                target,
                kind: DocKind::Generate { reference },
            })
        }
        CustomKind::MultipleChoice => {
            let choices = match (&t.choices, &t.choice_list, &t.choice_fields) {
                (Some(f), _, _) => str_list(doc, f)?,
                (None, Some(list), _) => list.clone(),
                (None, None, Some(fields)) => fields
                    .iter()
                    .map(|f| match field(doc, f) {
                        Some(Value::String(s)) => Ok(s.clone()),
                        Some(v) if !v.is_null() => Ok(v.to_string()),
                        _ => bail!("missing choice field `{f}`"),
                    })
                    .collect::<Result<_>>()?,
                (None, None, None) => bail!("no choices"),
            };
            let gold_field = t.gold.as_deref().expect("checked");
            let metric_mc2 = t.metric == Some(Metric::Mc2);
            let gold = if metric_mc2 {
                // mc2: `gold` holds 0/1 labels, true answers first.
                let labels: Vec<i64> = match field(doc, gold_field) {
                    Some(Value::Array(a)) => a
                        .iter()
                        .map(|v| v.as_i64().context("mc2 labels must be 0/1"))
                        .collect::<Result<_>>()?,
                    _ => bail!("mc2 needs `{gold_field}` to be a list of 0/1 labels"),
                };
                let n_true = labels.iter().position(|l| *l == 0).unwrap_or(labels.len());
                ensure!(n_true > 0, "`{gold_field}`: no true answer first");
                Gold::FirstTrue(n_true)
            } else {
                Gold::Index(gold_index(doc, gold_field, t.labels.as_deref(), &choices)?)
            };
            let first = match gold {
                Gold::Index(i) => i,
                Gold::FirstTrue(_) => 0,
            };
            let target = match &t.target {
                Some(tpl) => render(tpl, doc)?,
                None => choices[first].clone(),
            };
            Ok(Formatted {
                text,
                target,
                kind: DocKind::Choice { choices, gold },
            })
        }
    }
}

fn gold_index(doc: &Value, gold: &str, labels: Option<&str>, choices: &[String]) -> Result<usize> {
    let v = field(doc, gold).with_context(|| format!("missing field `{gold}`"))?;
    let idx = match (v, labels) {
        (Value::Number(n), _) => n.as_u64().map(|n| n as usize),
        (Value::String(s), Some(lf)) => str_list(doc, lf)?.iter().position(|l| l == s),
        (Value::String(s), None) => choices
            .iter()
            .position(|c| c == s)
            .or_else(|| s.trim().parse().ok()),
        _ => None,
    };
    match idx {
        Some(i) if i < choices.len() => Ok(i),
        _ => bail!("`{gold}` = {v} names none of the {} choices", choices.len()),
    }
}
