//! Task data: records in the Hugging Face field layouts, read from local JSONL or Parquet files.
//!
//! A task's data is either a folder of split files (`train.jsonl`, `validation.parquet`, `test.jsonl`,
//! `dev.jsonl`, ...) or a single file that serves every split (then few-shot examples are drawn from
//! the evaluated documents themselves, never the document being evaluated). Files are read by the shared
//! dataset reader ([`dusflow_data::read_records`]), so errors name the file and line.

use anyhow::{bail, Context, Result};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The splits of one task's data.
#[derive(Debug, Clone)]
pub struct TaskData {
    /// Where the data came from (for messages).
    pub source: PathBuf,
    /// Records by split name; a single-file source has the one split `*`.
    splits: BTreeMap<String, Vec<Value>>,
}

/// Name of the split a single-file source provides for every split.
const ANY_SPLIT: &str = "*";

impl TaskData {
    /// Reads a folder of `<split>.jsonl` files, or one JSONL file used for every split.
    pub fn load(path: &Path) -> Result<Self> {
        let mut splits = BTreeMap::new();
        if path.is_dir() {
            let entries =
                std::fs::read_dir(path).with_context(|| format!("reading {}", path.display()))?;
            for entry in entries {
                let file = entry?.path();
                if matches!(
                    file.extension().and_then(|e| e.to_str()),
                    Some("jsonl" | "parquet")
                ) {
                    let split = file
                        .file_stem()
                        .and_then(|s| s.to_str())
                        .unwrap_or_default()
                        .to_string();
                    splits.insert(split, read_task_file(&file)?);
                }
            }
            if splits.is_empty() {
                bail!(
                    "{}: no <split>.jsonl or <split>.parquet files (expected e.g. test.jsonl, train.jsonl)",
                    path.display()
                );
            }
        } else if path.is_file() {
            splits.insert(ANY_SPLIT.to_string(), read_task_file(path)?);
        } else {
            bail!("task data {} does not exist", path.display());
        }
        Ok(TaskData {
            source: path.to_path_buf(),
            splits,
        })
    }

    /// Data built in memory (tests, callers with their own reader).
    pub fn from_splits(source: impl Into<PathBuf>, splits: BTreeMap<String, Vec<Value>>) -> Self {
        TaskData {
            source: source.into(),
            splits,
        }
    }

    /// Whether this is one file used for every split.
    pub fn is_single_file(&self) -> bool {
        self.splits.contains_key(ANY_SPLIT)
    }

    /// The records of `split` (a single-file source returns its records for any split).
    pub fn split(&self, split: &str) -> Result<&[Value]> {
        if let Some(all) = self.splits.get(ANY_SPLIT) {
            return Ok(all);
        }
        match self.splits.get(split) {
            Some(rows) => Ok(rows),
            None => bail!(
                "{}: no split `{split}` (found: {})",
                self.source.display(),
                self.splits.keys().cloned().collect::<Vec<_>>().join(", ")
            ),
        }
    }

    /// Whether `split` exists (always true for a single file).
    pub fn has_split(&self, split: &str) -> bool {
        self.is_single_file() || self.splits.contains_key(split)
    }
}

/// Reads every record of one JSONL or Parquet file; errors name the file and line.
pub fn read_task_file(path: &Path) -> Result<Vec<Value>> {
    let mut stats = dusflow_data::ReadStats::default();
    let records = dusflow_data::read_records(
        &[path.to_path_buf()],
        dusflow_core::spec::OnError::Fail,
        &mut stats,
    )?;
    Ok(records.into_iter().map(|r| r.value).collect())
}

/// The value at a dotted path (`choices.text`, `mc2_targets.labels`); list elements by number (`choices.0`).
pub fn field<'a>(doc: &'a Value, path: &str) -> Option<&'a Value> {
    let mut v = doc;
    for part in path.split('.') {
        v = match v {
            Value::Object(m) => m.get(part)?,
            Value::Array(a) => a.get(part.parse::<usize>().ok()?)?,
            _ => return None,
        };
    }
    Some(v)
}

/// A string field, with an error naming the field when it is missing or not a string.
pub fn str_field<'a>(doc: &'a Value, path: &str) -> Result<&'a str> {
    match field(doc, path) {
        Some(Value::String(s)) => Ok(s),
        Some(other) => bail!("field `{path}` is not a string: {other}"),
        None => bail!("missing field `{path}`"),
    }
}

/// A list of strings.
pub fn str_list(doc: &Value, path: &str) -> Result<Vec<String>> {
    match field(doc, path) {
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| match v {
                Value::String(s) => Ok(s.clone()),
                other => bail!("field `{path}` holds a non-string element: {other}"),
            })
            .collect(),
        Some(other) => bail!("field `{path}` is not a list: {other}"),
        None => bail!("missing field `{path}`"),
    }
}

/// An integer field, also accepted as a string of digits (`"label": "2"`).
pub fn int_field(doc: &Value, path: &str) -> Result<i64> {
    match field(doc, path) {
        Some(Value::Number(n)) if n.is_i64() => Ok(n.as_i64().expect("i64")),
        Some(Value::String(s)) => s
            .trim()
            .parse()
            .with_context(|| format!("field `{path}` = {s:?} is not an integer")),
        Some(other) => bail!("field `{path}` is not an integer: {other}"),
        None => bail!("missing field `{path}`"),
    }
}

#[cfg(test)]
mod parquet_tests {
    use super::*;

    #[test]
    fn task_data_reads_parquet_files_and_split_folders() {
        let fixture =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/train/alpaca.parquet");
        let single = TaskData::load(&fixture).unwrap();
        let rows = single.split("test").unwrap();
        assert!(!rows.is_empty());
        assert!(rows
            .iter()
            .all(|r| r.get("instruction").is_some_and(Value::is_string)));

        let dir = tempfile::tempdir().unwrap();
        std::fs::copy(&fixture, dir.path().join("validation.parquet")).unwrap();
        std::fs::write(dir.path().join("train.jsonl"), "{\"instruction\": \"x\"}\n").unwrap();
        let folder = TaskData::load(dir.path()).unwrap();
        assert_eq!(folder.split("validation").unwrap().len(), rows.len());
        assert_eq!(folder.split("train").unwrap().len(), 1);
        assert!(folder.split("test").is_err());
    }
}
