//! Keeps records whose text has between `min_chars` and `max_chars` characters (Unicode scalar
//! values); with `trim`, rewrites records whose text has surrounding whitespace.
//! The Python plugin `length-filter-py` implements the same rule, for comparison.

use dusflow_sdk::data_filter::{DataFilter, Verdict};
use serde::Deserialize;
use serde_json::Value;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Params {
    /// Field holding the text.
    #[serde(default = "default_field")]
    field: String,
    #[serde(default)]
    min_chars: usize,
    #[serde(default = "default_max")]
    max_chars: usize,
    /// Rewrite records whose text has leading or trailing whitespace.
    #[serde(default)]
    trim: bool,
}

fn default_field() -> String {
    "text".into()
}

fn default_max() -> usize {
    usize::MAX
}

struct LengthFilter(Params);

impl DataFilter for LengthFilter {
    type Params = Params;
    type Record = Value;

    fn new(params: Params) -> Result<Self, String> {
        if params.min_chars > params.max_chars {
            return Err(format!(
                "min_chars {} > max_chars {}",
                params.min_chars, params.max_chars
            ));
        }
        Ok(Self(params))
    }

    fn filter(&mut self, mut record: Value) -> Result<Verdict, String> {
        let p = &self.0;
        let Some(text) = record.get(&p.field).and_then(Value::as_str) else {
            return Ok(Verdict::Drop);
        };
        let text = if p.trim { text.trim() } else { text };
        let chars = text.chars().count();
        if chars < p.min_chars || chars > p.max_chars {
            return Ok(Verdict::Drop);
        }
        if p.trim && text.len() != record[&p.field].as_str().map_or(0, str::len) {
            record[&p.field] = Value::String(text.to_string());
            return Ok(Verdict::rewrite(&record));
        }
        Ok(Verdict::Keep)
    }
}

dusflow_sdk::data_filter!(LengthFilter);
