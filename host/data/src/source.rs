//! Where records come from: JSONL and Parquet files, `[datasets.*]` specs and dataset artifacts of other
//! steps, read into [`RawRecord`]s that remember their file and line.

use super::format::{FieldMap, RecordFormat};
use anyhow::{bail, Context, Result};
use dusflow_core::record_format::FormatChoice;
use dusflow_core::spec::{DatasetSpec, OnError};
use dusflow_core::step::{ArtifactKind, InputArtifact};
use serde_json::Value;
use std::fmt;
use std::io::BufRead;
use std::path::{Path, PathBuf};

/// A record's place of origin: file and 1-based line (JSONL) or row (Parquet).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    /// The file.
    pub file: PathBuf,
    /// 1-based line or row number.
    pub line: usize,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.file.display(), self.line)
    }
}

/// One record as read: its origin and its JSON value.
#[derive(Debug, Clone)]
pub struct RawRecord {
    /// Where it was read.
    pub origin: Origin,
    /// The record.
    pub value: Value,
    /// The filter that last rewrote it, if any: a rewrite that does not parse is that filter's fault.
    pub rewritten_by: Option<String>,
}

/// Everything needed to load one dataset: files, layout, caps, filters and error policy.
#[derive(Debug, Clone)]
pub struct DatasetSource {
    /// Name for reports (the `[datasets.*]` or step name).
    pub name: String,
    /// Files to read, in order.
    pub files: Vec<PathBuf>,
    /// The layout, or `None` to detect it from the first record.
    pub format: Option<RecordFormat>,
    /// Layout field → file field renames.
    pub fields: FieldMap,
    /// Keep at most this many records (after filters), sampled with the seed.
    pub max_samples: Option<u64>,
    /// Data-filter plugin names, applied in order.
    pub filters: Vec<String>,
    /// Fail on or skip malformed records.
    pub on_error: OnError,
}

impl DatasetSource {
    /// Resolves a step input: a `[datasets.*]` spec (paths already absolute) or another step's dataset
    /// artifact folder (`data.jsonl` + `info.json` naming its `format`).
    pub fn from_input(input: &InputArtifact) -> Result<Self> {
        if let Some(spec) = &input.dataset {
            return Self::from_spec(&input.name, spec);
        }
        if input.kind != ArtifactKind::Dataset {
            bail!("input {:?} is a {}, not a dataset", input.name, input.kind);
        }
        let info_path = input.path.join("info.json");
        let format = match std::fs::read(&info_path) {
            Ok(bytes) => {
                let info: Value = serde_json::from_slice(&bytes)
                    .with_context(|| format!("reading {}", info_path.display()))?;
                match info.get("format").and_then(Value::as_str) {
                    Some(name) => Some(
                        RecordFormat::from_name(name)
                            .with_context(|| format!("in {}", info_path.display()))?,
                    ),
                    None => None,
                }
            }
            Err(_) => None,
        };
        Ok(DatasetSource {
            name: input.name.clone(),
            files: expand_paths(std::slice::from_ref(&input.path))?,
            format,
            fields: FieldMap::default(),
            max_samples: None,
            filters: Vec::new(),
            on_error: OnError::Fail,
        })
    }

    /// From a `[datasets.NAME]` spec whose paths are absolute.
    pub fn from_spec(name: &str, spec: &DatasetSpec) -> Result<Self> {
        let format = match spec.format {
            FormatChoice::Auto => None,
            FormatChoice::Known(f) => Some(f),
        };
        let fields = FieldMap(spec.fields.clone());
        if let Some(f) = format {
            fields
                .validate(f)
                .with_context(|| format!("dataset {name:?}"))?;
        }
        Ok(DatasetSource {
            name: name.to_string(),
            files: expand_paths(&spec.path.paths()).with_context(|| format!("dataset {name:?}"))?,
            format,
            fields,
            max_samples: spec.max_samples,
            filters: spec.filters.clone(),
            on_error: spec.on_error,
        })
    }
}

/// Files behind `paths`: files as given (`.jsonl`, `.ndjson`, `.json` as JSON lines, `.parquet`); folders
/// contribute their `*.jsonl`, `*.ndjson` and `*.parquet` files in name order.
pub fn expand_paths(paths: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for p in paths {
        if p.is_dir() {
            let mut found: Vec<PathBuf> = std::fs::read_dir(p)
                .with_context(|| format!("listing {}", p.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|f| {
                    f.is_file()
                        && matches!(
                            f.extension().and_then(|e| e.to_str()),
                            Some("jsonl" | "ndjson" | "parquet")
                        )
                })
                .collect();
            found.sort();
            if found.is_empty() {
                bail!(
                    "{}: no .jsonl or .parquet files in this folder",
                    p.display()
                );
            }
            out.extend(found);
        } else if p.is_file() {
            if file_kind(p).is_none() {
                bail!(
                    "{}: unsupported file type (expected .jsonl, .json or .parquet)",
                    p.display()
                );
            }
            out.push(p.clone());
        } else {
            bail!("{}: no such file or folder", p.display());
        }
    }
    Ok(out)
}

#[derive(Clone, Copy)]
enum FileKind {
    JsonLines,
    Parquet,
}

fn file_kind(p: &Path) -> Option<FileKind> {
    match p.extension()?.to_str()? {
        "jsonl" | "json" | "ndjson" => Some(FileKind::JsonLines),
        "parquet" => Some(FileKind::Parquet),
        _ => None,
    }
}

/// What [`read_records`] skipped under `on_error = "skip"`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReadStats {
    /// Malformed records skipped.
    pub skipped: usize,
    /// The first skipped record's place and problem, for the report.
    pub first_error: Option<String>,
}

/// Reads every record of `files`. A line that is not a JSON object fails with its file and line, or is
/// skipped and counted when `on_error` is `Skip`. Blank lines are ignored. A file without a single line
/// or row is an error naming it: an empty dataset file is a mistake, whatever a later step would say.
pub fn read_records(
    files: &[PathBuf],
    on_error: OnError,
    stats: &mut ReadStats,
) -> Result<Vec<RawRecord>> {
    let mut out = Vec::new();
    for file in files {
        let (before, skipped) = (out.len(), stats.skipped);
        match file_kind(file) {
            Some(FileKind::Parquet) => read_parquet(file, &mut out)?,
            _ => read_jsonl(file, on_error, stats, &mut out)?,
        }
        if out.len() == before && stats.skipped == skipped {
            bail!("{}: the dataset file is empty (no records)", file.display());
        }
    }
    Ok(out)
}

fn read_jsonl(
    file: &Path,
    on_error: OnError,
    stats: &mut ReadStats,
    out: &mut Vec<RawRecord>,
) -> Result<()> {
    let f = std::fs::File::open(file).with_context(|| format!("opening {}", file.display()))?;
    for (i, line) in std::io::BufReader::new(f).lines().enumerate() {
        let origin = Origin {
            file: file.to_path_buf(),
            line: i + 1,
        };
        let line = line.with_context(|| format!("{origin}: reading line"))?;
        if line.trim().is_empty() {
            continue;
        }
        let parsed = serde_json::from_str::<Value>(&line)
            .map_err(|e| format!("not valid JSON ({e})"))
            .and_then(|v| {
                if v.is_object() {
                    Ok(v)
                } else {
                    Err("not a JSON object".to_string())
                }
            });
        match parsed {
            Ok(value) => out.push(RawRecord {
                origin,
                value,
                rewritten_by: None,
            }),
            Err(msg) => skip_or_fail(on_error, stats, &origin, &msg)?,
        }
    }
    Ok(())
}

/// Applies the error policy to a malformed record: an error naming its origin, or a counted skip.
pub fn skip_or_fail(
    on_error: OnError,
    stats: &mut ReadStats,
    origin: &Origin,
    msg: &str,
) -> Result<()> {
    match on_error {
        OnError::Fail => {
            bail!("{origin}: malformed record: {msg} (set on_error = \"skip\" on the dataset to skip such records)")
        }
        OnError::Skip => {
            stats.skipped += 1;
            if stats.first_error.is_none() {
                stats.first_error = Some(format!("{origin}: {msg}"));
            }
            Ok(())
        }
    }
}

fn read_parquet(file: &Path, out: &mut Vec<RawRecord>) -> Result<()> {
    use parquet::file::reader::{FileReader, SerializedFileReader};
    let f = std::fs::File::open(file).with_context(|| format!("opening {}", file.display()))?;
    let reader = SerializedFileReader::new(f)
        .with_context(|| format!("{}: not a readable Parquet file", file.display()))?;
    let rows = reader
        .get_row_iter(None)
        .with_context(|| format!("{}: reading rows", file.display()))?;
    for (i, row) in rows.enumerate() {
        let origin = Origin {
            file: file.to_path_buf(),
            line: i + 1,
        };
        let row = row.with_context(|| format!("{origin}: reading Parquet row"))?;
        out.push(RawRecord {
            origin,
            value: row.to_json_value(),
            rewritten_by: None,
        });
    }
    Ok(())
}
