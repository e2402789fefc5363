//! The filter stage: data-filter plugins (or any [`RecordFilter`]) judge records in batches — keep, drop
//! or rewrite — and the stage counts what each filter did.

use super::source::RawRecord;
use anyhow::{bail, Context, Result};
use serde::Serialize;

/// Records per call across the filter boundary (a WebAssembly call per batch, not per record).
pub const FILTER_BATCH: usize = 1000;

/// A filter's answer for one record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Keep the record unchanged.
    Keep,
    /// Drop it.
    Drop,
    /// Replace it with this JSON object.
    Rewrite(String),
}

/// Something that judges batches of JSON records (a data-filter plugin behind an adapter, or native code).
pub trait RecordFilter {
    /// Name for reports (the `[plugins.*]` name).
    fn name(&self) -> &str;
    /// One verdict per record of `records` (JSON objects as text), in order.
    fn filter_batch(&mut self, records: &[String]) -> Result<Vec<Verdict>>;
}

/// A [`RecordFilter`] from a name and a closure (native filters and tests).
pub struct FnFilter<F> {
    name: String,
    judge: F,
}

impl<F: FnMut(&[String]) -> Result<Vec<Verdict>>> FnFilter<F> {
    /// A filter called `name` that answers with `judge`.
    pub fn new(name: impl Into<String>, judge: F) -> Self {
        FnFilter {
            name: name.into(),
            judge,
        }
    }
}

impl<F: FnMut(&[String]) -> Result<Vec<Verdict>>> RecordFilter for FnFilter<F> {
    fn name(&self) -> &str {
        &self.name
    }
    fn filter_batch(&mut self, records: &[String]) -> Result<Vec<Verdict>> {
        (self.judge)(records)
    }
}

/// What one filter did to one dataset.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct FilterCount {
    /// The filter's name.
    pub filter: String,
    /// Records it saw.
    pub seen: usize,
    /// Records kept (unchanged or rewritten).
    pub kept: usize,
    /// Records dropped.
    pub dropped: usize,
    /// Of the kept, how many were rewritten.
    pub rewritten: usize,
}

/// Runs `records` through `filters` in order, `batch` records per call. A rewrite must be a JSON object;
/// otherwise the error names the filter and the record's origin.
pub fn apply_filters(
    mut records: Vec<RawRecord>,
    filters: &mut [Box<dyn RecordFilter + '_>],
    batch: usize,
) -> Result<(Vec<RawRecord>, Vec<FilterCount>)> {
    let mut counts = Vec::with_capacity(filters.len());
    for filter in filters.iter_mut() {
        let mut count = FilterCount {
            filter: filter.name().to_string(),
            seen: records.len(),
            ..Default::default()
        };
        let mut kept = Vec::with_capacity(records.len());
        let mut pending = records.into_iter().peekable();
        while pending.peek().is_some() {
            let chunk: Vec<RawRecord> = pending.by_ref().take(batch.max(1)).collect();
            let texts: Vec<String> = chunk.iter().map(|r| r.value.to_string()).collect();
            let verdicts = filter.filter_batch(&texts).with_context(|| {
                format!(
                    "filter {:?} on records from {}",
                    count.filter, chunk[0].origin
                )
            })?;
            if verdicts.len() != chunk.len() {
                bail!(
                    "filter {:?} returned {} verdicts for {} records",
                    count.filter,
                    verdicts.len(),
                    chunk.len()
                );
            }
            for (mut record, verdict) in chunk.into_iter().zip(verdicts) {
                match verdict {
                    Verdict::Keep => kept.push(record),
                    Verdict::Drop => count.dropped += 1,
                    Verdict::Rewrite(json) => {
                        let value: serde_json::Value = serde_json::from_str(&json)
                            .ok()
                            .filter(serde_json::Value::is_object)
                            .with_context(|| {
                                format!(
                                    "filter {:?} rewrote {} into something that is not a JSON object",
                                    count.filter, record.origin
                                )
                            })?;
                        record.value = value;
                        record.rewritten_by = Some(count.filter.clone());
                        count.rewritten += 1;
                        kept.push(record);
                    }
                }
            }
        }
        count.kept = kept.len();
        counts.push(count);
        records = kept;
    }
    Ok((records, counts))
}
