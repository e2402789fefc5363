//! {{name}}: a data filter. Params arrive as JSON from the step's TOML table.
//! Example: drop records whose `text` is shorter than `min_chars`.

use dusflow_sdk::data_filter::{DataFilter, Verdict};
use serde::Deserialize;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Params {
    #[serde(default)]
    min_chars: usize,
}

/// The fields of a record this filter reads; other fields are ignored.
#[derive(Deserialize)]
struct Record {
    #[serde(default)]
    text: String,
}

struct Filter(Params);

impl DataFilter for Filter {
    type Params = Params;
    type Record = Record;

    fn new(params: Params) -> Result<Self, String> {
        Ok(Self(params))
    }

    fn filter(&mut self, record: Record) -> Result<Verdict, String> {
        Ok(if record.text.chars().count() >= self.0.min_chars { Verdict::Keep } else { Verdict::Drop })
    }
}

dusflow_sdk::data_filter!(Filter);
