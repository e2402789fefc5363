//! Bounded mutation tests, run with the normal suite (cargo-fuzz needs a nightly toolchain): valid inputs
//! mutated with a fixed seed, checked for no panic, bounded time and consistent answers.
//!
//! - Workflow loader: [`WORKFLOW_CASES`] mutations of the shipped workflows and a few test flows: loading
//!   never panics, takes well under a second, and an error is a `WorkflowError` with a position.
//! - Safetensors header reader: [`HEADER_CASES`] mutations of real checkpoint headers checked in memory
//!   (never a panic; accepted headers tile the data exactly; the same verdict as the `safetensors` crate),
//!   and [`FILE_CASES`] mutated files opened through `TensorStore` with every tensor read back.

use dusflow::model::safetensors_header::{header_length, parse_header};
use dusflow::model::TensorStore;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Mutated workflows loaded per run.
const WORKFLOW_CASES: usize = 3000;
/// Mutated headers parsed per run.
const HEADER_CASES: usize = 5000;
/// Mutated checkpoint files opened and read per run.
const FILE_CASES: usize = 400;

fn repo(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(rel)
}

/// Fragments that push a TOML document towards the loader's corners.
const TOKENS: &[&str] = &[
    "[",
    "]",
    "[[",
    "]]",
    "{",
    "}",
    "=",
    "\"",
    "'",
    ",",
    ".",
    "\n",
    "#",
    "\\",
    "inputs",
    "sweep",
    "kind",
    "steps",
    "models",
    "datasets",
    "plugins",
    "defaults",
    "workflow",
    "path",
    "-1",
    "1e400",
    "nan",
    "inf",
    "18446744073709551616",
    "true",
    "\"\"",
    "[]",
    "{}",
    "\u{0}",
    "é",
    "\"../..\"",
    "\"/dev/zero\"",
    "sweep = { lr = [1, 2, 3] }",
    "inputs = { model = \"base\" }",
    "kind = \"merge\"",
];

fn mutate_text(rng: &mut ChaCha8Rng, text: &str) -> String {
    let mut bytes = text.as_bytes().to_vec();
    for _ in 0..rng.random_range(1..=4) {
        let at = rng.random_range(0..=bytes.len());
        match rng.random_range(0..6) {
            0 => {
                let end = (at + rng.random_range(1..64)).min(bytes.len());
                bytes.drain(at..end);
            }
            1 => {
                let token = TOKENS[rng.random_range(0..TOKENS.len())];
                bytes.splice(at..at, token.bytes());
            }
            2 if at < bytes.len() => bytes[at] = rng.random(),
            3 => {
                // Duplicate a line-sized range elsewhere (repeated tables and keys).
                let start = rng.random_range(0..=bytes.len());
                let end = (start + rng.random_range(1..200)).min(bytes.len());
                let piece = bytes[start..end].to_vec();
                let to = rng.random_range(0..=bytes.len());
                bytes.splice(to..to, piece);
            }
            4 => {
                // A digit somewhere becomes a huge or negative number.
                if let Some(p) = bytes[at..].iter().position(u8::is_ascii_digit) {
                    let big: &[u8] = if rng.random() { b"99999999999" } else { b"-7" };
                    bytes.splice(at + p..at + p + 1, big.iter().copied());
                }
            }
            _ => bytes.truncate(at),
        }
    }
    String::from_utf8_lossy(&bytes).into_owned()
}

#[test]
fn mutated_workflows_load_or_fail_cleanly() {
    let registry = dusflow::steps::builtin_registry();
    let mut seeds: Vec<String> = [
        "workflows/quickstart.toml",
        "workflows/solar-10.7b.toml",
        "workflows/ablation-seam.toml",
    ]
    .iter()
    .map(|f| std::fs::read_to_string(repo(f)).unwrap())
    .collect();
    seeds.push(
        "[workflow]\nname = \"w\"\n\n[models.base]\npath = \"m\"\n\n[datasets.d]\npath = \"d.jsonl\"\nfilters = [\"f\"]\n\n\
         [plugins.f]\npath = \"p.wasm\"\nlimits = { timeout_ms = 5 }\n\n[defaults.merge]\nmethod = \"linear\"\n\n\
         [steps.a]\nkind = \"merge\"\ninputs = { models = [\"base\", \"base\"] }\nsweep = { weights = [[1, 2], [3, 4]] }\n\n\
         [steps.b]\nkind = \"command\"\nrun = \"true\"\ninputs = { prev = \"a\" }\n"
            .to_string(),
    );
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("flow.toml");
    let mut rng = ChaCha8Rng::seed_from_u64(0x5eed_0001);
    let started = Instant::now();
    let (mut loaded, mut refused, mut slowest) = (0usize, 0usize, Duration::ZERO);
    for case in 0..WORKFLOW_CASES {
        let text = mutate_text(&mut rng, &seeds[case % seeds.len()]);
        std::fs::write(&file, &text).unwrap();
        let t = Instant::now();
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            dusflow::workflow::Workflow::load(&file, &registry)
        }));
        let took = t.elapsed();
        slowest = slowest.max(took);
        match result {
            Err(_) => panic!("case {case}: the loader panicked on:\n{text}"),
            Ok(Ok(_)) => loaded += 1,
            Ok(Err(e)) => {
                let shown = e.to_string();
                assert!(
                    shown.contains("flow.toml:"),
                    "case {case}: an error without a position: {shown}\n{text}"
                );
                refused += 1;
            }
        }
        assert!(
            took < Duration::from_secs(2),
            "case {case}: loading took {took:?}:\n{text}"
        );
    }
    eprintln!(
        "{WORKFLOW_CASES} mutated workflows: {loaded} loaded, {refused} refused, slowest {slowest:?}, total {:?}",
        started.elapsed()
    );
}

/// The headers and data of small real checkpoints.
fn checkpoint_seeds() -> Vec<Vec<u8>> {
    [
        "host/tests/fixtures/merge/models/a/model.safetensors",
        "host/tests/fixtures/merge/models/a32/model.safetensors",
        "host/tests/fixtures/scale/models/base/model.safetensors",
    ]
    .iter()
    .map(|f| std::fs::read(repo(f)).unwrap())
    .collect()
}

/// A mutation of a whole checkpoint file, concentrated on the length field and the JSON header.
fn mutate_file(rng: &mut ChaCha8Rng, file: &[u8]) -> Vec<u8> {
    let mut bytes = file.to_vec();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    match rng.random_range(0..8) {
        // The declared header length.
        0 => {
            let new = match rng.random_range(0..4) {
                0 => rng.random::<u64>(),
                1 => n as u64 + rng.random_range(1..100),
                2 => (n as u64).saturating_sub(rng.random_range(1..100)),
                _ => bytes.len() as u64,
            };
            bytes[..8].copy_from_slice(&new.to_le_bytes());
        }
        // A number inside the header (offsets, shapes) changed in place.
        1 | 2 => {
            let header = &bytes[8..8 + n];
            let digits: Vec<usize> = (0..header.len())
                .filter(|&i| header[i].is_ascii_digit())
                .collect();
            if !digits.is_empty() {
                let i = 8 + digits[rng.random_range(0..digits.len())];
                bytes[i] = b'0' + rng.random_range(0..10);
            }
        }
        // A header byte flipped.
        3 => {
            let i = 8 + rng.random_range(0..n);
            bytes[i] ^= 1 << rng.random_range(0..8);
        }
        // Data truncated or extended.
        4 => {
            let cut = rng.random_range(0..bytes.len());
            bytes.truncate(cut);
        }
        5 => bytes.extend(std::iter::repeat_n(0u8, rng.random_range(1..64))),
        // A dtype name replaced.
        6 => {
            let text = String::from_utf8_lossy(&bytes[8..8 + n]).into_owned();
            let dtypes = [
                "\"F32\"",
                "\"BF16\"",
                "\"F16\"",
                "\"U8\"",
                "\"I64\"",
                "\"F64\"",
                "\"BOOL\"",
                "\"F8_E4M3\"",
            ];
            let from = dtypes[rng.random_range(0..dtypes.len())];
            let to = dtypes[rng.random_range(0..dtypes.len())];
            let replaced = text.replacen(from, to, 1);
            if replaced.len() == text.len() {
                bytes[8..8 + n].copy_from_slice(replaced.as_bytes());
            }
        }
        // Header text spliced: a token inserted, the length field kept consistent.
        _ => {
            let at = 8 + rng.random_range(0..=n);
            let token: &[u8] = [
                &b"{"[..],
                b"}",
                b",",
                b"\"x\":",
                b"[0,4]",
                b"\"__metadata__\":{\"a\":1},",
                b"-1",
            ][rng.random_range(0..7)];
            bytes.splice(at..at, token.iter().copied());
            let new_n = (n + token.len()) as u64;
            bytes[..8].copy_from_slice(&new_n.to_le_bytes());
        }
    }
    bytes
}

/// Our verdict on a whole file, checked in memory: the parsed header, or the error text.
fn our_verdict(bytes: &[u8]) -> Result<dusflow::model::safetensors_header::Header, String> {
    let path = Path::new("fuzz.safetensors");
    let len = bytes.len() as u64;
    if len < 8 {
        return Err("too short".into());
    }
    let n = header_length(path, bytes[..8].try_into().unwrap(), len).map_err(|e| e.to_string())?;
    parse_header(path, &bytes[8..8 + n as usize], len).map_err(|e| format!("{e:#}"))
}

#[test]
fn mutated_safetensors_headers_are_parsed_or_refused_like_the_reference() {
    let seeds = checkpoint_seeds();
    let mut rng = ChaCha8Rng::seed_from_u64(0x5eed_0002);
    let started = Instant::now();
    let (mut accepted, mut refused) = (0usize, 0usize);
    for case in 0..HEADER_CASES {
        let bytes = mutate_file(&mut rng, &seeds[case % seeds.len()]);
        let ours = std::panic::catch_unwind(|| our_verdict(&bytes))
            .unwrap_or_else(|_| panic!("case {case}: the header reader panicked"));
        let theirs = safetensors::SafeTensors::read_metadata(&bytes);
        match &ours {
            Ok(header) => {
                accepted += 1;
                // Accepted: the tensors tile the data section exactly, each holding dtype × shape bytes.
                let mut ranges: Vec<(u64, u64)> =
                    header.tensors.values().map(|t| (t.start, t.end)).collect();
                ranges.sort();
                let mut next = 0;
                for (s, e) in ranges {
                    assert_eq!(s, next, "case {case}: a gap or overlap was accepted");
                    next = e;
                }
                assert_eq!(header.data_start + next, bytes.len() as u64, "case {case}");
                for (name, t) in &header.tensors {
                    let numel: u64 = t.shape.iter().map(|&d| d as u64).product();
                    assert_eq!(
                        (t.end - t.start) * 8,
                        numel * t.dtype.bitsize() as u64,
                        "case {case}: {name}"
                    );
                }
            }
            Err(_) => refused += 1,
        }
        assert_eq!(
            ours.is_ok(),
            theirs.is_ok(),
            "case {case}: we say {:?}, the safetensors crate says {:?}",
            ours.as_ref().err(),
            theirs.as_ref().err()
        );
    }
    eprintln!(
        "{HEADER_CASES} mutated headers: {accepted} accepted, {refused} refused, in {:?}",
        started.elapsed()
    );
}

#[test]
fn mutated_checkpoint_files_open_and_read_or_fail_cleanly() {
    let seeds = checkpoint_seeds();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("model.safetensors");
    let mut rng = ChaCha8Rng::seed_from_u64(0x5eed_0003);
    let started = Instant::now();
    let (mut opened, mut refused) = (0usize, 0usize);
    for case in 0..FILE_CASES {
        let bytes = mutate_file(&mut rng, &seeds[case % seeds.len()]);
        std::fs::write(&file, &bytes).unwrap();
        let result = std::panic::catch_unwind(|| -> anyhow::Result<usize> {
            let store = TensorStore::open_file(&file)?;
            let mut total = 0;
            for meta in store.metas() {
                let data = store.bytes(meta.name)?;
                assert_eq!(data.len() * 8, meta.numel() * meta.dtype.bitsize());
                total += data.len();
            }
            Ok(total)
        });
        match result {
            Err(_) => panic!("case {case}: opening or reading panicked"),
            Ok(Ok(_)) => opened += 1,
            Ok(Err(e)) => {
                assert!(
                    format!("{e:#}").contains("model.safetensors"),
                    "case {case}: the error does not name the file: {e:#}"
                );
                refused += 1;
            }
        }
    }
    eprintln!(
        "{FILE_CASES} mutated checkpoint files: {opened} opened and read, {refused} refused, in {:?}",
        started.elapsed()
    );
}
