//! Loading datasets and mixtures: read → filter → parse into [`Example`]s → cap (`max_samples`) → mix and
//! shuffle, all deterministic for a seed, with a per-dataset report of counts.

use super::filter::{apply_filters, FilterCount, RecordFilter, FILTER_BATCH};
use super::format::{Example, RecordFormat};
use super::source::{read_records, skip_or_fail, DatasetSource, RawRecord, ReadStats};
use anyhow::{bail, Context, Result};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

/// Makes the filter called `name` (a `[plugins.*]` name) for a dataset.
pub type FilterFactory<'a> = dyn FnMut(&str) -> Result<Box<dyn RecordFilter>> + 'a;

/// Counts for one dataset, from file to training examples.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct DatasetReport {
    /// Dataset name.
    pub name: String,
    /// Its layout.
    pub format: String,
    /// Well-formed records read.
    pub read: usize,
    /// Malformed records skipped (`on_error = "skip"`), while reading and while parsing.
    pub skipped_malformed: usize,
    /// The first skipped record's place and problem.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_skipped: Option<String>,
    /// What each filter did, in order.
    pub filters: Vec<FilterCount>,
    /// Records after filters and parsing.
    pub available: usize,
    /// Records used (after the `max_samples` cap).
    pub used: usize,
}

/// One dataset's examples and report.
#[derive(Debug, Clone)]
pub struct LoadedDataset {
    /// The layout the records were read as.
    pub format: RecordFormat,
    /// The examples, in file order (a capped dataset keeps a seeded sample, still in file order).
    pub examples: Vec<Example>,
    /// Counts.
    pub report: DatasetReport,
}

/// A seed for `tag` derived from `seed` (stable across runs and platforms).
pub fn derive_seed(seed: u64, tag: &str) -> u64 {
    let mut h = blake3::Hasher::new();
    h.update(&seed.to_le_bytes());
    h.update(tag.as_bytes());
    let bytes = h.finalize();
    u64::from_le_bytes(bytes.as_bytes()[..8].try_into().expect("8 bytes"))
}

/// Runs `source`'s filters (made by `make_filter`, in order) over `records`: the survivors, rewritten where a
/// filter rewrote them, and each filter's counts.
pub fn filter_records(
    records: Vec<RawRecord>,
    source: &DatasetSource,
    make_filter: &mut FilterFactory<'_>,
) -> Result<(Vec<RawRecord>, Vec<FilterCount>)> {
    let mut filters = Vec::with_capacity(source.filters.len());
    for name in &source.filters {
        filters.push(
            make_filter(name)
                .with_context(|| format!("dataset {:?}: filter {name:?}", source.name))?,
        );
    }
    apply_filters(records, &mut filters, FILTER_BATCH)
}

/// Loads one dataset: reads its files, runs its filters (made by `make_filter`), parses records as its
/// format (detected from the first record for `auto`), and keeps a seeded sample of `max_samples`.
pub fn load_dataset(
    source: &DatasetSource,
    make_filter: &mut FilterFactory<'_>,
    seed: u64,
) -> Result<LoadedDataset> {
    let mut stats = ReadStats::default();
    let records = read_records(&source.files, source.on_error, &mut stats)?;
    let read = records.len();
    let (records, filter_counts) = filter_records(records, source, make_filter)?;
    let format = match source.format {
        Some(f) => f,
        None => match records.first() {
            Some(r) => super::format::detect_format(&r.value, &source.fields).with_context(|| {
                format!(
                    "{}: cannot tell the dataset format from this record; set `format` on dataset {:?}",
                    r.origin, source.name
                )
            })?,
            None => RecordFormat::Text,
        },
    };
    let mut examples = Vec::with_capacity(records.len());
    for r in &records {
        match (Example::parse(&r.value, format, &source.fields), &r.rewritten_by) {
            (Ok(e), _) => examples.push(e),
            // The input record was fine: the plugin's answer is wrong, whatever `on_error` says.
            (Err(e), Some(filter)) => bail!(
                "{}: filter plugin {filter:?} rewrote this record into one that is not a valid {} record of \
                 dataset {:?}: {e}",
                r.origin,
                format.name(),
                source.name
            ),
            (Err(e), None) => {
                skip_or_fail(source.on_error, &mut stats, &r.origin, &e.to_string())?
            }
        }
    }
    let available = examples.len();
    if let Some(cap) = source.max_samples {
        examples = sample_in_order(
            examples,
            cap as usize,
            derive_seed(seed, &format!("cap/{}", source.name)),
        );
    }
    let report = DatasetReport {
        name: source.name.clone(),
        format: format.name().to_string(),
        read,
        skipped_malformed: stats.skipped,
        first_skipped: stats.first_error,
        filters: filter_counts,
        available,
        used: examples.len(),
    };
    Ok(LoadedDataset {
        format,
        examples,
        report,
    })
}

/// A uniformly random subset of `cap` items (seeded), in their original order.
pub fn sample_in_order<T>(items: Vec<T>, cap: usize, seed: u64) -> Vec<T> {
    if items.len() <= cap {
        return items;
    }
    let mut idx: Vec<usize> = (0..items.len()).collect();
    idx.shuffle(&mut ChaCha8Rng::seed_from_u64(seed));
    let mut keep = vec![false; items.len()];
    for &i in &idx[..cap] {
        keep[i] = true;
    }
    items
        .into_iter()
        .zip(keep)
        .filter_map(|(x, k)| k.then_some(x))
        .collect()
}

/// Several datasets loaded, capped and mixed.
#[derive(Debug, Clone)]
pub struct Mixture {
    /// All examples, shuffled with the seed.
    pub examples: Vec<Example>,
    /// One report per dataset, in input order.
    pub reports: Vec<DatasetReport>,
}

/// Loads each source (see [`load_dataset`]), concatenates, and shuffles the result with `seed`.
/// `accept` says which formats the caller can train on; another format is an error naming the dataset.
pub fn load_mixture(
    sources: &[DatasetSource],
    make_filter: &mut FilterFactory<'_>,
    seed: u64,
    accept: &[RecordFormat],
) -> Result<Mixture> {
    let mut examples = Vec::new();
    let mut reports = Vec::new();
    for source in sources {
        let loaded = load_dataset(source, make_filter, seed)?;
        if !accept.contains(&loaded.format) {
            bail!(
                "dataset {:?} has format {}, which this step cannot use (accepted: {})",
                source.name,
                loaded.format.name(),
                accept
                    .iter()
                    .map(|f| f.name())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        examples.extend(loaded.examples);
        reports.push(loaded.report);
    }
    examples.shuffle(&mut ChaCha8Rng::seed_from_u64(derive_seed(seed, "mixture")));
    Ok(Mixture { examples, reports })
}
