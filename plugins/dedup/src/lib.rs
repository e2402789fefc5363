//! Drops records that repeat an earlier record of the same job: exact duplicates of the chosen `fields`
//! (default: the whole record), or, with `normalize`, duplicates after lower-casing and collapsing
//! whitespace. The first occurrence is kept, so the result does not depend on batch boundaries.

use dusflow_sdk::data_filter::{DataFilter, Verdict};
use serde::Deserialize;
use serde_json::Value;
use std::collections::HashSet;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Params {
    /// Fields that make a record's identity (dotted paths not supported); empty = the whole record.
    #[serde(default)]
    fields: Vec<String>,
    /// Compare text lower-cased with runs of whitespace collapsed.
    #[serde(default)]
    normalize: bool,
}

struct Dedup {
    params: Params,
    seen: HashSet<String>,
}

impl Dedup {
    fn key(&self, record: &Value) -> String {
        let raw = if self.params.fields.is_empty() {
            record.to_string()
        } else {
            let parts: Vec<String> = self
                .params
                .fields
                .iter()
                .map(|f| match record.get(f) {
                    Some(Value::String(s)) => s.clone(),
                    Some(other) => other.to_string(),
                    None => String::new(),
                })
                .collect();
            parts.join("\u{1f}")
        };
        if self.params.normalize {
            raw.split_whitespace().map(str::to_lowercase).collect::<Vec<_>>().join(" ")
        } else {
            raw
        }
    }
}

impl DataFilter for Dedup {
    type Params = Params;
    type Record = Value;

    fn new(params: Params) -> Result<Self, String> {
        Ok(Self { params, seen: HashSet::new() })
    }

    fn filter(&mut self, record: Value) -> Result<Verdict, String> {
        if self.seen.insert(self.key(&record)) {
            Ok(Verdict::Keep)
        } else {
            Ok(Verdict::Drop)
        }
    }
}

dusflow_sdk::data_filter!(Dedup);
