//! The preference data of a `dpo` step: each `data` input loaded (caps, filters, file:line errors) and
//! tokenised like TRL, then split into the sDPO chunks D_1..D_T.

use super::config::ChunkBy;
use crate::data::{load_dataset, DatasetReport, DatasetSource, FilterFactory, Templates};
use crate::model::Tokenizer;
use crate::train::dpo::{tokenize_pair, PairLimits, PreferencePair};
use anyhow::{bail, Context, Result};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

/// A pair and where it came from.
#[derive(Debug, Clone)]
pub struct SourcedPair {
    /// Index of its `data` input.
    pub dataset: usize,
    /// Its index among that dataset's loaded examples (after filters and caps).
    pub record: usize,
    /// The tokens.
    pub pair: PreferencePair,
}

/// The tokenised pairs of every `data` input, in input order.
pub struct PreferenceData {
    /// Per input: name, pairs.
    pub datasets: Vec<(String, Vec<SourcedPair>)>,
    /// Per input: read/filter/cap counts.
    pub reports: Vec<DatasetReport>,
    /// Per input: pairs dropped because the prompt alone fills `max_length`.
    pub dropped_too_long: Vec<usize>,
}

/// Loads every source as preference pairs, renders conversational ones with `templates`, and tokenises
/// them.
pub fn load_preference_data(
    sources: &[DatasetSource],
    make_filter: &mut FilterFactory<'_>,
    seed: u64,
    tok: &Tokenizer,
    templates: &Templates,
    limits: PairLimits,
) -> Result<PreferenceData> {
    let mut out = PreferenceData {
        datasets: Vec::new(),
        reports: Vec::new(),
        dropped_too_long: Vec::new(),
    };
    for (d, source) in sources.iter().enumerate() {
        let loaded = load_dataset(source, make_filter, seed)?;
        if !loaded.format.is_preference() {
            bail!(
                "dataset {:?} has format {}, but dpo needs preference pairs (formats preference, orca-dpo or ultrafeedback)",
                source.name,
                loaded.format.name()
            );
        }
        let mut pairs = Vec::with_capacity(loaded.examples.len());
        let mut dropped = 0;
        for (i, e) in loaded.examples.iter().enumerate() {
            let text = templates
                .preference(e)
                .with_context(|| format!("dataset {:?}: record {i}", source.name))?;
            match tokenize_pair(
                tok,
                &text.prompt,
                &text.chosen,
                &text.rejected,
                text.add_special_tokens,
                limits,
            )? {
                Some(pair) => pairs.push(SourcedPair {
                    dataset: d,
                    record: i,
                    pair,
                }),
                None => dropped += 1,
            }
        }
        if dropped > 0 {
            tracing::warn!(
                "dataset {:?}: {dropped} pairs dropped: their prompt alone fills max_length = {:?}",
                source.name,
                limits.max_length
            );
        }
        out.datasets.push((source.name.clone(), pairs));
        out.reports.push(loaded.report);
        out.dropped_too_long.push(dropped);
    }
    Ok(out)
}

/// Which pairs one chunk holds, for the report.
#[derive(Debug, Clone, Serialize)]
pub struct ChunkOrigin {
    /// Dataset name → number of its pairs in the chunk.
    pub datasets: indexmap::IndexMap<String, usize>,
    /// Dataset name → its records in the chunk, as ascending half-open index ranges `[start, end)`.
    pub records: indexmap::IndexMap<String, Vec<[usize; 2]>>,
}

/// Splits the pairs into `t` chunks. `margins` (needed for [`ChunkBy::Margin`]) gives the initial model's
/// `log p(chosen) − log p(rejected)` of every pair in [`all_pairs`] order. With `t = 1` everything is one
/// chunk, whatever `by` says.
pub fn split_chunks(
    data: &PreferenceData,
    t: usize,
    by: ChunkBy,
    seed: u64,
    margins: Option<&[f32]>,
) -> Result<Vec<Vec<SourcedPair>>> {
    let all: Vec<SourcedPair> = all_pairs(data);
    let chunks = if t == 1 {
        vec![all]
    } else {
        match by {
            ChunkBy::Dataset => {
                if data.datasets.len() != t {
                    bail!(
                        "chunks = {t} but chunk_by = \"dataset\" needs one data input per chunk, and there are {}",
                        data.datasets.len()
                    );
                }
                data.datasets.iter().map(|(_, p)| p.clone()).collect()
            }
            ChunkBy::Random => {
                let mut all = all;
                all.shuffle(&mut ChaCha8Rng::seed_from_u64(seed));
                cut(all, t)
            }
            ChunkBy::Margin => {
                let Some(m) = margins else {
                    bail!("chunk_by = \"margin\" needs the initial model's margins");
                };
                let mut order: Vec<usize> = (0..all.len()).collect();
                // Stable: equal margins keep data order.
                order.sort_by(|&a, &b| m[b].total_cmp(&m[a]));
                cut(order.into_iter().map(|i| all[i].clone()).collect(), t)
            }
        }
    };
    for (i, c) in chunks.iter().enumerate() {
        if c.is_empty() {
            let what = match by {
                ChunkBy::Dataset if t > 1 => format!(" (dataset {:?})", data.datasets[i].0),
                _ => String::new(),
            };
            bail!(
                "chunk {} of {t}{what} has no preference pairs to train on (empty data, everything filtered \
                 out or longer than max_length, or fewer pairs than chunks)",
                i + 1
            );
        }
    }
    Ok(chunks)
}

/// Every pair of every dataset, in input order.
pub fn all_pairs(data: &PreferenceData) -> Vec<SourcedPair> {
    data.datasets
        .iter()
        .flat_map(|(_, p)| p.iter().cloned())
        .collect()
}

/// Contiguous parts of sizes differing by at most one, larger parts first.
fn cut(items: Vec<SourcedPair>, t: usize) -> Vec<Vec<SourcedPair>> {
    let (base, extra) = (items.len() / t, items.len() % t);
    let mut it = items.into_iter();
    (0..t)
        .map(|i| it.by_ref().take(base + (i < extra) as usize).collect())
        .collect()
}

/// The report entry of a chunk.
pub fn chunk_origin(data: &PreferenceData, chunk: &[SourcedPair]) -> ChunkOrigin {
    let mut indices: indexmap::IndexMap<String, Vec<usize>> = indexmap::IndexMap::new();
    for p in chunk {
        let name = &data.datasets[p.dataset].0;
        indices.entry(name.clone()).or_default().push(p.record);
    }
    let mut origin = ChunkOrigin {
        datasets: indexmap::IndexMap::new(),
        records: indexmap::IndexMap::new(),
    };
    for (name, mut idx) in indices {
        origin.datasets.insert(name.clone(), idx.len());
        idx.sort_unstable();
        let mut ranges: Vec<[usize; 2]> = Vec::new();
        for i in idx {
            match ranges.last_mut() {
                Some(r) if r[1] == i => r[1] = i + 1,
                _ => ranges.push([i, i + 1]),
            }
        }
        origin.records.insert(name, ranges);
    }
    origin
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(sizes: &[usize]) -> PreferenceData {
        let datasets = sizes
            .iter()
            .enumerate()
            .map(|(d, &n)| {
                let pairs = (0..n)
                    .map(|i| SourcedPair {
                        dataset: d,
                        record: i,
                        pair: PreferencePair {
                            prompt: vec![i as u32],
                            chosen: vec![1],
                            rejected: vec![2],
                        },
                    })
                    .collect();
                (format!("d{d}"), pairs)
            })
            .collect();
        PreferenceData {
            datasets,
            reports: Vec::new(),
            dropped_too_long: Vec::new(),
        }
    }

    #[test]
    fn chunks_by_dataset_random_and_margin() {
        let d = data(&[3, 2]);
        let by_ds = split_chunks(&d, 2, ChunkBy::Dataset, 0, None).unwrap();
        assert_eq!((by_ds[0].len(), by_ds[1].len()), (3, 2));
        assert!(by_ds[1].iter().all(|p| p.dataset == 1));
        let random = split_chunks(&d, 2, ChunkBy::Random, 5, None).unwrap();
        assert_eq!((random[0].len(), random[1].len()), (3, 2));
        let margins = [0.5, -1.0, 2.0, 0.5, 3.0];
        let easy_first = split_chunks(&d, 2, ChunkBy::Margin, 0, Some(&margins)).unwrap();
        let order: Vec<(usize, usize)> = easy_first
            .iter()
            .flatten()
            .map(|p| (p.dataset, p.record))
            .collect();
        assert_eq!(order, vec![(1, 1), (0, 2), (0, 0), (1, 0), (0, 1)]);
        let origin = chunk_origin(&d, &easy_first[0]);
        assert_eq!(origin.records["d0"], vec![[0, 1], [2, 3]]);
        assert_eq!(origin.records["d1"], vec![[1, 2]]);
        assert_eq!(origin.datasets["d0"], 2);
        let all = chunk_origin(&d, &by_ds[0]);
        assert_eq!(all.records["d0"], vec![[0, 3]]);
        let err = split_chunks(&d, 3, ChunkBy::Dataset, 0, None).unwrap_err();
        assert!(err.to_string().contains("chunks = 3"), "{err}");
        let err = split_chunks(&data(&[2, 0]), 2, ChunkBy::Dataset, 0, None).unwrap_err();
        assert!(
            err.to_string().contains("chunk 2 of 2 (dataset \"d1\")"),
            "{err}"
        );
    }
}
