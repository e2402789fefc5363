//! Validation errors that point into the workflow file: `file:line:column: key: message`.

use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

/// One problem found in a workflow file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    /// The workflow file.
    pub file: PathBuf,
    /// 1-based line of the offending text.
    pub line: usize,
    /// 1-based column (in characters) of the offending text.
    pub column: usize,
    /// Dotted key path, e.g. `steps.sft.lr`; empty for problems not tied to one key.
    pub key: String,
    /// What is wrong and, where possible, what to do.
    pub message: String,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}: ", self.file.display(), self.line, self.column)?;
        if !self.key.is_empty() {
            write!(f, "{}: ", self.key)?;
        }
        f.write_str(&self.message)
    }
}

/// All problems found in one workflow; a workflow with any problem does not run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkflowError {
    /// The problems, in file order (the first 100 found).
    pub diagnostics: Vec<Diagnostic>,
    /// Problems found beyond those, not listed.
    pub omitted: usize,
}

/// Problems listed per workflow: a mangled file can have thousands, and the first ones say enough.
const MAX_DIAGNOSTICS: usize = 100;

/// Longest key or message shown; longer ones (a name pasted by accident) are cut.
const MAX_SHOWN: usize = 300;

fn clip(text: String) -> String {
    if text.len() <= MAX_SHOWN {
        return text;
    }
    let cut = floor_char_boundary(&text, MAX_SHOWN / 2);
    format!("{}… ({} bytes more)", &text[..cut], text.len() - cut)
}

impl fmt::Display for WorkflowError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.diagnostics.len() + self.omitted;
        writeln!(
            f,
            "workflow is invalid ({n} error{}):",
            if n == 1 { "" } else { "s" }
        )?;
        for d in &self.diagnostics {
            writeln!(f, "  {d}")?;
        }
        if self.omitted > 0 {
            writeln!(f, "  … and {} more", self.omitted)?;
        }
        Ok(())
    }
}

impl std::error::Error for WorkflowError {}

/// Collects diagnostics against one source text, turning byte spans into line:column.
pub(crate) struct DiagnosticSink<'s> {
    file: PathBuf,
    source: &'s str,
    diagnostics: Vec<(usize, Diagnostic)>,
    omitted: usize,
}

impl<'s> DiagnosticSink<'s> {
    pub(crate) fn new(file: &Path, source: &'s str) -> Self {
        Self {
            file: file.to_path_buf(),
            source,
            diagnostics: Vec::new(),
            omitted: 0,
        }
    }

    /// Records a problem at `span` (byte offsets into the source).
    pub(crate) fn error(
        &mut self,
        span: Range<usize>,
        key: impl Into<String>,
        message: impl Into<String>,
    ) {
        if self.diagnostics.len() >= MAX_DIAGNOSTICS {
            self.omitted += 1;
            return;
        }
        let (line, column) = line_column(self.source, span.start);
        let diagnostic = Diagnostic {
            file: self.file.clone(),
            line,
            column,
            key: clip(key.into()),
            message: clip(message.into()),
        };
        if !self.diagnostics.iter().any(|(_, d)| d == &diagnostic) {
            self.diagnostics.push((span.start, diagnostic));
        }
    }

    pub(crate) fn has_errors(&self) -> bool {
        !self.diagnostics.is_empty()
    }

    /// Ends collection: `Err` with every problem sorted by position, or `Ok` when there was none.
    pub(crate) fn finish(mut self) -> Result<(), WorkflowError> {
        if self.diagnostics.is_empty() {
            return Ok(());
        }
        self.diagnostics.sort_by_key(|(pos, _)| *pos);
        Err(WorkflowError {
            diagnostics: self.diagnostics.into_iter().map(|(_, d)| d).collect(),
            omitted: self.omitted,
        })
    }
}

/// 1-based line and column (in characters) of byte offset `pos`.
pub(crate) fn line_column(source: &str, pos: usize) -> (usize, usize) {
    let pos = pos.min(source.len());
    let before = &source[..floor_char_boundary(source, pos)];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    (line, before[line_start..].chars().count() + 1)
}

fn floor_char_boundary(s: &str, mut i: usize) -> usize {
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

/// The closest candidate to `word` by edit distance, for "did you mean" hints.
pub(crate) fn did_you_mean<'a>(
    word: &str,
    candidates: impl IntoIterator<Item = &'a str>,
) -> Option<&'a str> {
    // A name this long is no typo of a key; the distance is quadratic in the lengths.
    if word.len() > MAX_SUGGESTED_LEN {
        return None;
    }
    let allowed = |c: &str| c.len().max(word.len()).div_ceil(3).max(1);
    candidates
        .into_iter()
        // The distance is at least the difference of the lengths: most candidates need no table.
        .filter(|c| c.len() <= MAX_SUGGESTED_LEN && c.len().abs_diff(word.len()) <= allowed(c))
        .map(|c| (edit_distance(word, c), c))
        .filter(|(d, c)| *d <= allowed(c))
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

/// Names longer than this get no "did you mean".
const MAX_SUGGESTED_LEN: usize = 128;

/// Optimal-string-alignment distance: insertions, deletions, substitutions and adjacent swaps cost 1.
fn edit_distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    let mut d = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for (i, row) in d.iter_mut().enumerate() {
        row[0] = i;
    }
    for (j, cell) in d[0].iter_mut().enumerate() {
        *cell = j;
    }
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            d[i][j] = (d[i - 1][j] + 1)
                .min(d[i][j - 1] + 1)
                .min(d[i - 1][j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                d[i][j] = d[i][j].min(d[i - 2][j - 2] + 1);
            }
        }
    }
    d[a.len()][b.len()]
}

/// " (did you mean `x`?)" or nothing.
pub(crate) fn hint<'a>(word: &str, candidates: impl IntoIterator<Item = &'a str>) -> String {
    did_you_mean(word, candidates)
        .map(|c| format!(" (did you mean `{c}`?)"))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_and_column_are_one_based_and_count_characters() {
        let src = "a = 1\nbé = 2\n";
        assert_eq!(line_column(src, 0), (1, 1));
        assert_eq!(line_column(src, 6), (2, 1));
        assert_eq!(line_column(src, src.find('=').unwrap()), (1, 3));
        assert_eq!(line_column(src, src.rfind('=').unwrap()), (2, 4));
    }

    #[test]
    fn suggestions_pick_the_nearest_name() {
        assert_eq!(
            did_you_mean("pretrian", ["pretrain", "sft", "dpo"]),
            Some("pretrain")
        );
        assert_eq!(did_you_mean("zzz", ["pretrain", "sft"]), None);
    }

    #[test]
    fn suggestions_for_huge_names_cost_nothing() {
        let huge = "x".repeat(1 << 20);
        let started = std::time::Instant::now();
        for _ in 0..100 {
            assert_eq!(
                did_you_mean(&huge, ["pretrain", "sft", huge.as_str()]),
                None
            );
            assert_eq!(did_you_mean("pretrain", [huge.as_str()]), None);
        }
        // Quadratic in 1 MB would be ~10^12 steps: anything near a second means the bound is gone.
        assert!(started.elapsed() < std::time::Duration::from_secs(2));
    }
}
