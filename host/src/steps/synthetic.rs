//! `kind = "synthetic"`: deterministic synthetic datasets in the shapes of the real tasks, so a whole
//! DUS pipeline can run (and show learning) on a laptop with no downloads.
//!
//! The paper's Synth. Math-Instruct / Math-Alignment idea in miniature. Tasks and their JSONL layouts:
//! - `text`: `{text}` pretraining documents (arithmetic facts in prose);
//! - `arithmetic`: GSM8K layout `{question, answer}`, the answer a worked solution ending in `#### N`;
//! - `multiple-choice`: ARC layout `{id, question, choices: {text, label}, answerKey}`;
//! - `alpaca`: `{instruction, input, output}`;
//! - `preference`: `{prompt, chosen, rejected}`: the prompt `Question: …\nAnswer:` (as GSM8K SFT and eval
//!   render it), the correct worked answer as chosen and, as rejected, either the same steps concluding a
//!   wrong number or the steps without the final `#### N` line (half each); completions after a space.
//!
//! Output: `data.jsonl` and `info.json` (task, count, seed).

use anyhow::{Context, Result};
use dusflow_core::step::StepContext;
use dusflow_core::step::{ArtifactKind, CheckContext, ConfigIssue, InputSlots, StepKind};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::io::Write;

/// Which synthetic task to generate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SyntheticTask {
    /// Pretraining prose.
    Text,
    /// Word problems with `#### N` answers.
    Arithmetic,
    /// Four-way multiple choice.
    MultipleChoice,
    /// Instruction / input / output triples.
    Alpaca,
    /// Prompt with a correct (chosen) and a wrong (rejected) answer.
    Preference,
}

/// Parameters of a `synthetic` step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SyntheticConfig {
    /// The task.
    pub task: SyntheticTask,
    /// How many records.
    pub count: usize,
    /// Largest operand in the arithmetic (difficulty).
    #[serde(default = "SyntheticConfig::default_max_operand")]
    pub max_operand: u32,
    /// Seed offset, combined with the workflow seed (different offsets give disjoint-looking sets).
    #[serde(default)]
    pub seed: u64,
}

impl SyntheticConfig {
    fn default_max_operand() -> u32 {
        20
    }
}

/// The `synthetic` step kind.
pub struct SyntheticStep;

impl StepKind for SyntheticStep {
    type Config = SyntheticConfig;

    fn name(&self) -> &'static str {
        "synthetic"
    }

    fn version(&self) -> u32 {
        3 // 2: preference prompts in `Question: …\nAnswer:` form; 3: unfinished answers as rejected
    }

    fn inputs(&self) -> InputSlots {
        InputSlots::Fixed(&[])
    }

    fn output(&self, _: &SyntheticConfig) -> ArtifactKind {
        ArtifactKind::Dataset
    }

    fn check(&self, c: &SyntheticConfig, _: &dyn CheckContext) -> Vec<ConfigIssue> {
        let mut issues = Vec::new();
        if c.count == 0 || c.count > 10_000_000 {
            issues.push(ConfigIssue::new("count", "must be between 1 and 10000000"));
        }
        if !(4..=100_000).contains(&c.max_operand) {
            issues.push(ConfigIssue::new(
                "max_operand",
                "must be between 4 and 100000",
            ));
        }
        issues
    }

    fn run(&self, c: &SyntheticConfig, ctx: &StepContext) -> Result<()> {
        let seed = ctx.settings.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15)
            ^ c.seed
            ^ (c.task as u64).wrapping_shl(48);
        let records = generate(c.task, c.count, c.max_operand, seed);
        let path = ctx.out_dir.join("data.jsonl");
        let mut out = std::io::BufWriter::new(
            std::fs::File::create(&path).with_context(|| format!("creating {}", path.display()))?,
        );
        ctx.progress.set_length(records.len() as u64);
        for r in &records {
            serde_json::to_writer(&mut out, r)?;
            out.write_all(b"\n")?;
            ctx.progress.inc(1);
        }
        out.flush()?;
        let info = json!({ "task": c.task, "count": records.len(), "seed": seed, "format": format_of(c.task) });
        std::fs::write(
            ctx.out_dir.join("info.json"),
            serde_json::to_vec_pretty(&info)?,
        )?;
        Ok(())
    }
}

/// The dataset `format` name (see `[datasets]`) of a task's records.
pub fn format_of(task: SyntheticTask) -> &'static str {
    match task {
        SyntheticTask::Text => "text",
        SyntheticTask::Arithmetic => "gsm8k",
        SyntheticTask::MultipleChoice => "arc",
        SyntheticTask::Alpaca => "alpaca",
        SyntheticTask::Preference => "preference",
    }
}

/// Generates `count` records of `task`, deterministically from `seed`.
pub fn generate(
    task: SyntheticTask,
    count: usize,
    max_operand: u32,
    seed: u64,
) -> Vec<serde_json::Value> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..count)
        .map(|i| match task {
            SyntheticTask::Text => json!({ "text": text_document(&mut rng, max_operand) }),
            SyntheticTask::Arithmetic => {
                let p = problem(&mut rng, max_operand);
                json!({ "question": p.question, "answer": p.solution() })
            }
            SyntheticTask::MultipleChoice => multiple_choice(&mut rng, max_operand, i),
            SyntheticTask::Alpaca => alpaca(&mut rng, max_operand),
            SyntheticTask::Preference => {
                let p = problem(&mut rng, max_operand);
                // Half the rejected answers conclude a wrong number, half stop before the `#### N` line.
                let rejected = if rng.random_bool(0.5) {
                    p.solution_with(p.wrong_answer(&mut rng))
                } else {
                    p.unfinished()
                };
                json!({
                    "prompt": crate::data::question_prompt(&p.question),
                    "chosen": format!(" {}", p.solution()),
                    "rejected": format!(" {rejected}"),
                })
            }
        })
        .collect()
}

const NAMES: [&str; 8] = ["Tom", "Ana", "Ravi", "Mei", "Omar", "Lena", "Kofi", "Sara"];
const THINGS: [&str; 8] = [
    "apples", "books", "coins", "marbles", "pencils", "stamps", "shells", "cards",
];

/// A word problem and its worked solution.
pub struct Problem {
    /// The question text.
    pub question: String,
    /// Worked steps, e.g. `3 + 5 = 8`.
    pub steps: Vec<String>,
    /// Final answer.
    pub answer: i64,
}

impl Problem {
    /// Worked solution in GSM8K style, ending in `#### N`.
    pub fn solution(&self) -> String {
        self.solution_with(self.answer)
    }

    /// The same worked solution but concluding `answer` (for wrong, rejected answers).
    pub fn solution_with(&self, answer: i64) -> String {
        let mut steps = self.steps.clone();
        if answer != self.answer {
            if let Some(last) = steps.last_mut() {
                if let Some((lhs, _)) = last.rsplit_once(" = ") {
                    *last = format!("{lhs} = {answer}");
                }
            }
        }
        format!("{}.\n#### {answer}", steps.join(". "))
    }

    /// The worked steps without the final `#### N` line (an answer that never states its result).
    pub fn unfinished(&self) -> String {
        format!("{}.", self.steps.join(". "))
    }

    fn wrong_answer(&self, rng: &mut ChaCha8Rng) -> i64 {
        let delta = rng.random_range(1..=3) * if rng.random_bool(0.5) { 1 } else { -1 };
        self.answer + delta
    }
}

fn problem(rng: &mut ChaCha8Rng, max: u32) -> Problem {
    let name = NAMES[rng.random_range(0..NAMES.len())];
    let thing = THINGS[rng.random_range(0..THINGS.len())];
    let a = rng.random_range(2..=max) as i64;
    let b = rng.random_range(1..=max) as i64;
    match rng.random_range(0..4) {
        0 => Problem {
            question: format!(
                "{name} has {a} {thing} and gets {b} more. How many {thing} does {name} have now?"
            ),
            steps: vec![format!("{a} + {b} = {}", a + b)],
            answer: a + b,
        },
        1 => {
            let (hi, lo) = (a.max(b), a.min(b));
            Problem {
                question: format!(
                    "{name} has {hi} {thing} and gives away {lo}. How many {thing} are left?"
                ),
                steps: vec![format!("{hi} - {lo} = {}", hi - lo)],
                answer: hi - lo,
            }
        }
        2 => {
            let k = rng.random_range(2..=9) as i64;
            Problem {
                question: format!(
                    "{name} buys {k} boxes with {a} {thing} in each box. How many {thing} is that?"
                ),
                steps: vec![format!("{k} * {a} = {}", k * a)],
                answer: k * a,
            }
        }
        _ => {
            let c = rng.random_range(1..=a);
            Problem {
                question: format!(
                    "{name} has {a} {thing}, finds {b} more, then loses {c}. How many {thing} does {name} have?"
                ),
                steps: vec![format!("{a} + {b} = {}", a + b), format!("{} - {c} = {}", a + b, a + b - c)],
                answer: a + b - c,
            }
        }
    }
}

fn text_document(rng: &mut ChaCha8Rng, max: u32) -> String {
    let n = rng.random_range(3..=6);
    let mut sentences = Vec::with_capacity(n);
    for _ in 0..n {
        let a = rng.random_range(0..=max);
        let b = rng.random_range(0..=max);
        sentences.push(match rng.random_range(0..4) {
            0 => format!("{a} plus {b} is {}.", a + b),
            1 => format!("{} minus {b} is {a}.", a + b),
            2 => format!("{a} times {} is {}.", b % 10, a * (b % 10)),
            _ => {
                let p = problem(rng, max);
                format!("{} The answer is {}.", p.question, p.answer)
            }
        });
    }
    sentences.join(" ")
}

fn multiple_choice(rng: &mut ChaCha8Rng, max: u32, index: usize) -> serde_json::Value {
    let a = rng.random_range(1..=max) as i64;
    let b = rng.random_range(1..=max) as i64;
    let (question, answer) = match rng.random_range(0..3) {
        0 => (format!("What is {a} plus {b}?"), a + b),
        1 => (format!("What is {} minus {b}?", a + b), a),
        _ => (format!("What is {a} times {}?", b % 10), a * (b % 10)),
    };
    let mut options = vec![answer];
    while options.len() < 4 {
        let candidate = answer + rng.random_range(-5..=5);
        if candidate >= 0 && !options.contains(&candidate) {
            options.push(candidate);
        }
    }
    options.shuffle(rng);
    let labels = ["A", "B", "C", "D"];
    let key = labels[options
        .iter()
        .position(|&o| o == answer)
        .expect("answer is an option")];
    json!({
        "id": format!("synth-mc-{index}"),
        "question": question,
        "choices": { "text": options.iter().map(|o| o.to_string()).collect::<Vec<_>>(), "label": labels },
        "answerKey": key,
    })
}

fn alpaca(rng: &mut ChaCha8Rng, max: u32) -> serde_json::Value {
    let words = [
        "cat", "river", "stone", "light", "garden", "music", "paper", "cloud",
    ];
    match rng.random_range(0..4) {
        0 => {
            let (a, b) = (rng.random_range(0..=max), rng.random_range(0..=max));
            json!({ "instruction": "Add the two numbers.", "input": format!("{a} and {b}"), "output": format!("{}", a + b) })
        }
        1 => {
            let w = words[rng.random_range(0..words.len())];
            json!({ "instruction": "Write the word backwards.", "input": w, "output": w.chars().rev().collect::<String>() })
        }
        2 => {
            let mut v: Vec<u32> = (0..4).map(|_| rng.random_range(0..=max)).collect();
            let input = v.iter().map(u32::to_string).collect::<Vec<_>>().join(", ");
            v.sort_unstable();
            let output = v.iter().map(u32::to_string).collect::<Vec<_>>().join(", ");
            json!({ "instruction": "Sort the numbers from smallest to largest.", "input": input, "output": output })
        }
        _ => {
            let p = problem(rng, max);
            json!({ "instruction": p.question, "input": "", "output": p.solution() })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_records_different_seed_different_records() {
        for task in [
            SyntheticTask::Text,
            SyntheticTask::Arithmetic,
            SyntheticTask::MultipleChoice,
            SyntheticTask::Alpaca,
            SyntheticTask::Preference,
        ] {
            assert_eq!(generate(task, 50, 20, 7), generate(task, 50, 20, 7));
            assert_ne!(generate(task, 50, 20, 7), generate(task, 50, 20, 8));
        }
    }

    #[test]
    fn worked_answers_are_correct_and_gsm8k_extractable() {
        for r in generate(SyntheticTask::Arithmetic, 300, 50, 1) {
            let answer = r["answer"].as_str().unwrap();
            let (work, last) = answer.rsplit_once("\n#### ").unwrap();
            let work = work.strip_suffix('.').unwrap();
            let n: i64 = last.parse().unwrap();
            // The last worked step ends in the same number.
            assert!(work.ends_with(&format!("= {n}")), "{answer}");
            // Every step's arithmetic holds.
            for step in work.split(". ") {
                let (lhs, rhs) = step.rsplit_once(" = ").unwrap();
                let parts: Vec<&str> = lhs.split(' ').collect();
                let (x, op, y): (i64, &str, i64) = (
                    parts[0].parse().unwrap(),
                    parts[1],
                    parts[2].parse().unwrap(),
                );
                let v = match op {
                    "+" => x + y,
                    "-" => x - y,
                    "*" => x * y,
                    _ => panic!("{op}"),
                };
                assert_eq!(v.to_string(), rhs, "{step}");
            }
        }
    }

    #[test]
    fn preference_pairs_differ_only_in_the_conclusion_or_its_absence() {
        for r in generate(SyntheticTask::Preference, 200, 20, 3) {
            let chosen = r["chosen"].as_str().unwrap();
            let rejected = r["rejected"].as_str().unwrap();
            assert_ne!(chosen, rejected);
            let prompt = r["prompt"].as_str().unwrap();
            assert!(prompt.starts_with("Question: ") && prompt.ends_with("\nAnswer:"));
            assert!(chosen.starts_with(' ') && rejected.starts_with(' '));
            let c: i64 = chosen.rsplit_once("#### ").unwrap().1.parse().unwrap();
            match rejected.rsplit_once("#### ") {
                Some((_, w)) => assert!((1..=3).contains(&(c - w.parse::<i64>().unwrap()).abs())),
                None => assert!(chosen.starts_with(rejected.trim_end_matches('.'))),
            }
        }
    }

    #[test]
    fn multiple_choice_has_four_distinct_options_including_the_key() {
        for r in generate(SyntheticTask::MultipleChoice, 200, 20, 4) {
            let texts: Vec<&str> = r["choices"]["text"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_str().unwrap())
                .collect();
            let mut dedup = texts.clone();
            dedup.sort();
            dedup.dedup();
            assert_eq!(dedup.len(), 4);
            let key = r["answerKey"].as_str().unwrap();
            let idx = ["A", "B", "C", "D"].iter().position(|l| *l == key).unwrap();
            let q = r["question"].as_str().unwrap();
            let nums: Vec<i64> = q
                .trim_end_matches('?')
                .split(' ')
                .filter_map(|w| w.parse().ok())
                .collect();
            let expected = if q.contains("plus") {
                nums[0] + nums[1]
            } else if q.contains("minus") {
                nums[0] - nums[1]
            } else {
                nums[0] * nums[1]
            };
            assert_eq!(texts[idx], expected.to_string(), "{r}");
        }
    }
}
