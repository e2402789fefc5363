//! Per-document metrics as lm-evaluation-harness computes them: acc / acc_norm (argmax of log-likelihood,
//! raw and divided by the choice's length in characters), TruthfulQA mc2, and GSM8K answer extraction
//! (strict `#### N` and the newer flexible extractor) with exact match.

use regex::Regex;
use serde::{Deserialize, Serialize};
use std::sync::OnceLock;

/// Index of the largest value; the first one on ties (NumPy's `argmax`).
pub fn argmax(values: &[f64]) -> usize {
    let mut best = 0;
    for (i, v) in values.iter().enumerate() {
        if *v > values[best] {
            best = i;
        }
    }
    best
}

/// 1.0 when the highest log-likelihood is the gold choice.
pub fn acc(lls: &[f64], gold: usize) -> f64 {
    f64::from(u8::from(argmax(lls) == gold))
}

/// 1.0 when the highest log-likelihood per character of the choice (without the leading space) is gold.
pub fn acc_norm(lls: &[f64], choices: &[String], gold: usize) -> f64 {
    let normed: Vec<f64> = lls
        .iter()
        .zip(choices)
        .map(|(ll, c)| ll / c.chars().count() as f64)
        .collect();
    acc(&normed, gold)
}

/// TruthfulQA mc2: the probability mass of the true answers (the first `n_true`), normalised over all.
pub fn mc2(lls: &[f64], n_true: usize) -> f64 {
    let p: Vec<f64> = lls.iter().map(|l| l.exp()).collect();
    let total: f64 = p.iter().sum();
    p[..n_true].iter().map(|x| x / total).sum()
}

/// How a GSM8K answer is pulled out of generated text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Extraction {
    /// The first `#### N` (the leaderboard's rule).
    #[default]
    Strict,
    /// The last number-like string (lm-eval 0.4's `flexible-extract`).
    Flexible,
}

/// The value the harness uses when nothing matches.
pub const INVALID: &str = "[invalid]";

fn strict_re() -> &'static Regex {
    static RE: OnceLock<Regex> = OnceLock::new();
    RE.get_or_init(|| Regex::new(r"#### (\-?[0-9\.\,]+)").expect("valid regex"))
}

fn flexible_re() -> &'static Regex {
    static RE: OnceLock<Regex> = OnceLock::new();
    RE.get_or_init(|| Regex::new(r"(-?[$0-9.,]{2,})|(-?[0-9]+)").expect("valid regex"))
}

/// lm-eval 0.4's regex filter: the first (strict) or last (flexible) match, its first non-empty group,
/// stripped; [`INVALID`] when nothing matches.
pub fn extract(text: &str, how: Extraction) -> String {
    let re = match how {
        Extraction::Strict => strict_re(),
        Extraction::Flexible => flexible_re(),
    };
    let caps: Vec<regex::Captures> = re.captures_iter(text).collect();
    let chosen = match how {
        Extraction::Strict => caps.first(),
        Extraction::Flexible => caps.last(),
    };
    match chosen {
        None => INVALID.to_string(),
        Some(c) => match (1..c.len())
            .filter_map(|i| c.get(i))
            .map(|m| m.as_str())
            .find(|s| !s.is_empty())
        {
            Some(s) => s.trim().to_string(),
            None => INVALID.to_string(),
        },
    }
}

/// The leaderboard-v1 GSM8K rule: the first `#### N` with commas removed, else [`INVALID`].
pub fn extract_v1(text: &str) -> String {
    match strict_re().captures(text) {
        Some(c) => c[1].trim().replace(',', ""),
        None => INVALID.to_string(),
    }
}

/// lm-eval 0.4's GSM8K `exact_match`: drop `,`, `$`, everything up to `#### ` and a final `.` from both
/// sides, compare case-insensitively.
pub fn gsm8k_exact_match(prediction: &str, reference: &str) -> f64 {
    fn normalise(s: &str) -> String {
        static UPTO: OnceLock<Regex> = OnceLock::new();
        let upto = UPTO.get_or_init(|| Regex::new(r"(?s).*#### ").expect("valid regex"));
        let s = s.replace([',', '$'], "");
        let mut s = upto.replace_all(&s, "").into_owned();
        // Python's `\.$`: a dot at the very end or just before a final newline.
        if s.ends_with(".\n") {
            s.remove(s.len() - 2);
        } else if s.ends_with('.') {
            s.pop();
        }
        s.to_lowercase()
    }
    f64::from(u8::from(normalise(prediction) == normalise(reference)))
}
