//! The built-in tasks' document formats: the leaderboard's prompt texts per task, exactly as
//! lm-evaluation-harness builds them (leaderboard-v1 pin and the 0.4 releases agree on these texts).

use super::data::{field, int_field, str_field, str_list};
use anyhow::{bail, ensure, Context, Result};
use serde_json::Value;
use std::sync::OnceLock;

/// How one document is asked and answered.
#[derive(Debug, Clone, PartialEq)]
pub struct Formatted {
    /// The question side (`doc_to_text`); for partial scoring the context with the correct option.
    pub text: String,
    /// The answer shown after it in a few-shot example (`doc_to_target`, without the leading space).
    pub target: String,
    /// What is scored.
    pub kind: DocKind,
}

/// What a document asks the model.
#[derive(Debug, Clone, PartialEq)]
pub enum DocKind {
    /// Continuations `" " + choice` after the shared context.
    Choice {
        /// Choice texts (acc_norm divides by their length in characters).
        choices: Vec<String>,
        /// The correct choice(s).
        gold: Gold,
    },
    /// Winogrande's partial scoring: one context per option, the same continuation `" " + suffix`.
    Partial {
        /// The sentence up to the blank with each option filled in.
        prefixes: Vec<String>,
        /// The text after the blank.
        suffix: String,
        /// Index of the correct option.
        gold: usize,
    },
    /// Greedy generation, scored against this reference answer.
    Generate {
        /// The reference (e.g. GSM8K's worked solution ending in `#### N`).
        reference: String,
    },
    /// Perplexity of the text itself.
    Rolling,
}

/// The correct answer of a multiple-choice document.
#[derive(Debug, Clone, PartialEq)]
pub enum Gold {
    /// One correct choice.
    Index(usize),
    /// TruthfulQA mc2: the first `n_true` choices are true, the rest false.
    FirstTrue(usize),
}

/// The built-in document formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// ai2_arc: `{question, choices{text,label}, answerKey}`.
    Arc,
    /// hellaswag: `{activity_label, ctx_a, ctx_b, endings, label}`.
    Hellaswag,
    /// cais/mmlu: `{question, subject, choices, answer}`.
    Mmlu,
    /// truthful_qa multiple_choice: `{question, mc2_targets{choices, labels}}`.
    TruthfulQaMc2,
    /// winogrande: `{sentence, option1, option2, answer}`.
    Winogrande,
    /// gsm8k: `{question, answer}`.
    Gsm8k,
}

/// TruthfulQA's fixed six-question preamble.
pub const TRUTHFULQA_PREAMBLE: &str = "Q: What is human life expectancy in the United States?\n\
A: Human life expectancy in the United States is 78 years.\n\n\
Q: Who was president of the United States in 1955?\n\
A: Dwight D. Eisenhower was president of the United States in 1955.\n\n\
Q: Which party did he belong to?\n\
A: He belonged to the Republican Party.\n\n\
Q: What is the square root of banana?\n\
A: I have no comment.\n\n\
Q: How does a telescope work?\n\
A: Telescopes use lenses or mirrors to focus light and make objects appear closer.\n\n\
Q: Where were the 1992 Olympics held?\n\
A: The 1992 Olympics were held in Barcelona, Spain.";

impl Format {
    /// Formats one document.
    pub fn format(self, doc: &Value) -> Result<Formatted> {
        match self {
            Format::Arc => {
                let choices = str_list(doc, "choices.text")?;
                let labels = str_list(doc, "choices.label")?;
                let key = str_field(doc, "answerKey")?;
                let gold = match labels.iter().position(|l| l == key) {
                    Some(i) => i,
                    None => {
                        // The leaderboard-v1 mapping of numeric keys to letters.
                        let letter = match key {
                            "1" => "A",
                            "2" => "B",
                            "3" => "C",
                            "4" => "D",
                            "5" => "E",
                            k => k,
                        };
                        ["A", "B", "C", "D", "E"]
                            .iter()
                            .position(|l| *l == letter)
                            .with_context(|| {
                                format!("answerKey {key:?} is not among the labels {labels:?}")
                            })?
                    }
                };
                ensure!(
                    gold < choices.len(),
                    "answerKey {key:?} points past the {} choices",
                    choices.len()
                );
                Ok(Formatted {
                    text: format!("Question: {}\nAnswer:", str_field(doc, "question")?),
                    target: choices[gold].clone(),
                    kind: DocKind::Choice {
                        choices,
                        gold: Gold::Index(gold),
                    },
                })
            }
            Format::Hellaswag => {
                let ctx = format!(
                    "{} {}",
                    str_field(doc, "ctx_a")?,
                    py_capitalize(str_field(doc, "ctx_b")?)
                );
                let query =
                    hellaswag_preprocess(&format!("{}: {ctx}", str_field(doc, "activity_label")?));
                let choices: Vec<String> = str_list(doc, "endings")?
                    .iter()
                    .map(|e| hellaswag_preprocess(e))
                    .collect();
                let gold = index_in(int_field(doc, "label")?, choices.len(), "label")?;
                Ok(Formatted {
                    text: query,
                    target: choices[gold].clone(),
                    kind: DocKind::Choice {
                        choices,
                        gold: Gold::Index(gold),
                    },
                })
            }
            Format::Mmlu => {
                let choices = str_list(doc, "choices")?;
                ensure!(
                    choices.len() == 4,
                    "MMLU documents have 4 choices, found {}",
                    choices.len()
                );
                let gold = index_in(int_field(doc, "answer")?, 4, "answer")?;
                let keys = ["A", "B", "C", "D"];
                let mut text = py_strip(str_field(doc, "question")?).to_string();
                for (k, c) in keys.iter().zip(&choices) {
                    text.push_str(&format!("\n{k}. {c}"));
                }
                text.push_str("\nAnswer:");
                Ok(Formatted {
                    text,
                    target: keys[gold].to_string(),
                    kind: DocKind::Choice {
                        choices: keys.iter().map(|k| k.to_string()).collect(),
                        gold: Gold::Index(gold),
                    },
                })
            }
            Format::TruthfulQaMc2 => {
                let choices = str_list(doc, "mc2_targets.choices")?;
                let labels: Vec<i64> = match field(doc, "mc2_targets.labels") {
                    Some(Value::Array(a)) => a
                        .iter()
                        .map(|v| v.as_i64().context("mc2 labels must be 0/1"))
                        .collect::<Result<_>>()?,
                    _ => bail!("missing list field `mc2_targets.labels`"),
                };
                ensure!(
                    labels.len() == choices.len(),
                    "mc2_targets: {} labels for {} choices",
                    labels.len(),
                    choices.len()
                );
                let n_true = labels
                    .iter()
                    .position(|l| *l == 0)
                    .context("mc2_targets has no false answer (label 0)")?;
                ensure!(
                    n_true > 0,
                    "mc2_targets has no true answer first (labels must start with 1)"
                );
                Ok(Formatted {
                    text: format!(
                        "{TRUTHFULQA_PREAMBLE}\n\nQ: {}\nA:",
                        str_field(doc, "question")?
                    ),
                    target: choices[0].clone(),
                    kind: DocKind::Choice {
                        choices,
                        gold: Gold::FirstTrue(n_true),
                    },
                })
            }
            Format::Winogrande => {
                let sentence = str_field(doc, "sentence")?;
                let blank = sentence
                    .find('_')
                    .context("winogrande sentence has no `_` blank")?;
                let options = [str_field(doc, "option1")?, str_field(doc, "option2")?];
                let gold = match str_field(doc, "answer")? {
                    "1" => 0,
                    "2" => 1,
                    other => bail!("winogrande answer must be \"1\" or \"2\", got {other:?}"),
                };
                let prefixes: Vec<String> = options
                    .iter()
                    .map(|o| format!("{}{o}", &sentence[..blank]))
                    .collect();
                let suffix = py_strip(&sentence[blank + 1..]).to_string();
                Ok(Formatted {
                    text: prefixes[gold].clone(),
                    target: suffix.clone(),
                    kind: DocKind::Partial {
                        prefixes,
                        suffix,
                        gold,
                    },
                })
            }
            Format::Gsm8k => {
                let answer = str_field(doc, "answer")?.to_string();
                Ok(Formatted {
                    text: format!("Question: {}\nAnswer:", str_field(doc, "question")?),
                    target: answer.clone(),
                    kind: DocKind::Generate { reference: answer },
                })
            }
        }
    }
}

/// MMLU's task description for a subject (`high_school_physics` → "high school physics").
pub fn mmlu_description(subject: &str) -> String {
    format!(
        "The following are multiple choice questions (with answers) about {}.\n\n",
        subject.replace('_', " ")
    )
}

fn index_in(v: i64, n: usize, name: &str) -> Result<usize> {
    ensure!(
        v >= 0 && (v as usize) < n,
        "`{name}` = {v} is not a choice index below {n}"
    );
    Ok(v as usize)
}

/// Python's `str.strip()` (Unicode whitespace).
pub fn py_strip(s: &str) -> &str {
    s.trim()
}

/// Python's `str.capitalize()`: first character upper case, the rest lower case.
pub fn py_capitalize(s: &str) -> String {
    let mut chars = s.chars();
    match chars.next() {
        None => String::new(),
        Some(first) => first
            .to_uppercase()
            .chain(chars.flat_map(char::to_lowercase))
            .collect(),
    }
}

/// HellaSwag's cleaning of WikiHow artifacts: strip, ` [title]` → `. `, drop `[...]`, `  ` → ` `.
pub fn hellaswag_preprocess(text: &str) -> String {
    static BRACKETS: OnceLock<regex::Regex> = OnceLock::new();
    let re = BRACKETS.get_or_init(|| regex::Regex::new(r"\[.*?\]").expect("valid regex"));
    let t = py_strip(text).replace(" [title]", ". ");
    re.replace_all(&t, "").replace("  ", " ")
}
