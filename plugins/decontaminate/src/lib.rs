//! Decontamination: drops training records that share a word n-gram with any benchmark text.
//! Benchmark files (one text per line, or JSONL whose string values are the texts) are read from
//! `benchmarks_dir`, which the workflow must grant: `[plugins.decontaminate] grants.read = [DIR]`.

use dusflow_sdk::data_filter::{DataFilter, Verdict};
use serde::Deserialize;
use serde_json::Value;
use std::collections::HashSet;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Params {
    benchmarks_dir: String,
    #[serde(default = "default_field")]
    field: String,
    /// Words per n-gram (13 in the GPT-3 paper).
    #[serde(default = "default_n")]
    n: usize,
}

fn default_field() -> String {
    "text".into()
}

fn default_n() -> usize {
    13
}

struct Decontaminate {
    field: String,
    n: usize,
    ngrams: HashSet<u64>,
}

/// Lower-cased alphanumeric words.
fn words(text: &str) -> Vec<String> {
    text.split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(str::to_lowercase)
        .collect()
}

fn ngram_hashes(text: &str, n: usize) -> impl Iterator<Item = u64> {
    let words = words(text);
    let count = (words.len() + 1).saturating_sub(n);
    (0..count).map(move |i| {
        // FNV-1a: deterministic across runs, unlike std's RandomState.
        let mut h: u64 = 0xcbf29ce484222325;
        for w in &words[i..i + n] {
            for b in w.bytes().chain([b' ']) {
                h = (h ^ u64::from(b)).wrapping_mul(0x100000001b3);
            }
        }
        h
    })
}

fn texts_of(line: &str) -> Vec<String> {
    match serde_json::from_str::<Value>(line) {
        Ok(Value::Object(map)) => map
            .values()
            .filter_map(Value::as_str)
            .map(String::from)
            .collect(),
        _ => vec![line.to_string()],
    }
}

impl DataFilter for Decontaminate {
    type Params = Params;
    type Record = Value;

    fn new(params: Params) -> Result<Self, String> {
        if params.n == 0 {
            return Err("n must be at least 1".into());
        }
        let dir = std::fs::read_dir(&params.benchmarks_dir).map_err(|e| {
            format!(
                "cannot list benchmarks_dir {} (is it granted to the plugin?): {e}",
                params.benchmarks_dir
            )
        })?;
        let mut ngrams = HashSet::new();
        for entry in dir {
            let path = entry.map_err(|e| e.to_string())?.path();
            let text = std::fs::read_to_string(&path)
                .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
            for line in text.lines().filter(|l| !l.trim().is_empty()) {
                for t in texts_of(line) {
                    ngrams.extend(ngram_hashes(&t, params.n));
                }
            }
        }
        eprintln!(
            "decontaminate: {} benchmark {}-grams",
            ngrams.len(),
            params.n
        );
        Ok(Self {
            field: params.field,
            n: params.n,
            ngrams,
        })
    }

    fn filter(&mut self, record: Value) -> Result<Verdict, String> {
        let text = record
            .get(&self.field)
            .and_then(Value::as_str)
            .unwrap_or("");
        let contaminated = ngram_hashes(text, self.n).any(|h| self.ngrams.contains(&h));
        Ok(if contaminated {
            Verdict::Drop
        } else {
            Verdict::Keep
        })
    }
}

dusflow_sdk::data_filter!(Decontaminate);
