//! Content hashes of input files and folders (BLAKE3), cached by path, size, mtime and inode.
//!
//! Entries whose mtime is within [`RACY_WINDOW`] of the moment they were hashed are not cached: a file
//! rewritten within the same timestamp tick with the same size would otherwise keep a stale hash.

use anyhow::{bail, Context, Result};
use dusflow_core::atomic::write_file_atomic;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

/// Files modified this recently are hashed every time.
pub const RACY_WINDOW: Duration = Duration::from_secs(2);

/// Folder entries never part of a content hash: build outputs and VCS metadata.
pub const IGNORED_DIRS: [&str; 5] = ["target", "node_modules", ".git", "__pycache__", "build"];

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Entry {
    size: u64,
    mtime_ns: i128,
    inode: u64,
    hash: String,
}

/// Hashes files and folders, remembering results in a JSON file between runs.
pub struct FileHasher {
    cache_file: Option<PathBuf>,
    entries: Mutex<HashMap<PathBuf, Entry>>,
    /// Whether `entries` changed since it was read (saving rewrites the file only then).
    dirty: std::sync::atomic::AtomicBool,
    /// Bytes of file contents read for hashing (cache misses), for tests and reports.
    hashed_bytes: std::sync::atomic::AtomicU64,
}

impl FileHasher {
    /// A hasher that persists its cache at `cache_file` (a missing or unreadable cache starts empty).
    pub fn persistent(cache_file: PathBuf) -> Self {
        let entries = std::fs::read(&cache_file)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        Self {
            cache_file: Some(cache_file),
            entries: Mutex::new(entries),
            dirty: Default::default(),
            hashed_bytes: Default::default(),
        }
    }

    /// A hasher that keeps nothing between runs.
    pub fn in_memory() -> Self {
        Self {
            cache_file: None,
            entries: Mutex::new(HashMap::new()),
            dirty: Default::default(),
            hashed_bytes: Default::default(),
        }
    }

    /// Hex BLAKE3 of a file's bytes, or of a folder's sorted (relative path, file hash) list.
    /// Folders skip [`IGNORED_DIRS`] and hidden entries.
    pub fn hash_path(&self, path: &Path) -> Result<String> {
        let meta = std::fs::metadata(path)
            .with_context(|| format!("{} does not exist or cannot be read", path.display()))?;
        if !meta.is_dir() && !meta.is_file() {
            bail!(
                "{} is not a regular file or folder (a device, FIFO or socket), which dusflow does not read",
                path.display()
            );
        }
        if meta.is_dir() {
            use rayon::prelude::*;
            let files = list_files(path)?;
            // The shards of a model are hashed at once: a cold disk delivers more to several readers.
            let hashes = files
                .par_iter()
                .map(|f| self.hash_file(f))
                .collect::<Result<Vec<_>>>()?;
            let mut hasher = blake3::Hasher::new();
            for (file, hash) in files.iter().zip(hashes) {
                let rel = file.strip_prefix(path).unwrap_or(file);
                hasher.update(rel.to_string_lossy().as_bytes());
                hasher.update(&[0]);
                hasher.update(hash.as_bytes());
                hasher.update(&[0]);
            }
            Ok(hasher.finalize().to_hex().to_string())
        } else {
            self.hash_file(path)
        }
    }

    fn hash_file(&self, path: &Path) -> Result<String> {
        let meta =
            std::fs::metadata(path).with_context(|| format!("reading {}", path.display()))?;
        if !meta.is_file() {
            bail!(
                "{} is not a regular file (a device, FIFO or socket), which dusflow does not read",
                path.display()
            );
        }
        let mtime = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
        let mtime_ns = mtime
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_nanos() as i128)
            .unwrap_or(0);
        let key = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
        if let Some(e) = self.entries.lock().expect("hash cache").get(&key) {
            if e.size == meta.len() && e.mtime_ns == mtime_ns && e.inode == meta.ino() {
                return Ok(e.hash.clone());
            }
        }
        let hash =
            hash_file_contents(path).with_context(|| format!("hashing {}", path.display()))?;
        self.hashed_bytes
            .fetch_add(meta.len(), std::sync::atomic::Ordering::Relaxed);
        let racy = SystemTime::now()
            .duration_since(mtime)
            .map_or(true, |age| age < RACY_WINDOW);
        if !racy {
            let entry = Entry {
                size: meta.len(),
                mtime_ns,
                inode: meta.ino(),
                hash: hash.clone(),
            };
            self.entries.lock().expect("hash cache").insert(key, entry);
            self.dirty.store(true, std::sync::atomic::Ordering::Relaxed);
        }
        Ok(hash)
    }

    /// Bytes of file contents read so far (files whose cached hash could not be used).
    pub fn hashed_bytes(&self) -> u64 {
        self.hashed_bytes.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Writes the cache file (atomically) if an entry was added since it was read.
    pub fn save(&self) -> Result<()> {
        if !self.dirty.load(std::sync::atomic::Ordering::Relaxed) {
            return Ok(());
        }
        if let Some(file) = &self.cache_file {
            let bytes = serde_json::to_vec(&*self.entries.lock().expect("hash cache"))?;
            write_file_atomic(file, &bytes)?;
        }
        Ok(())
    }
}

/// BLAKE3 of a file read in 16 MiB chunks, each hashed on all cores: fast on multi-GB checkpoints without
/// mapping them (which would count the whole file in this process's resident memory). A reader thread
/// fills the next chunk while the current one is hashed, so a cold file costs its read time, not read
/// time plus hash time.
fn hash_file_contents(path: &Path) -> std::io::Result<String> {
    use std::io::Read;
    use std::sync::mpsc;
    const CHUNK: usize = 16 << 20;
    let mut file = std::fs::File::open(path)?;
    let mut hasher = blake3::Hasher::new();
    // Two chunks in flight at most: one being hashed, one being read.
    let (full_tx, full_rx) = mpsc::sync_channel::<std::io::Result<Vec<u8>>>(1);
    let (empty_tx, empty_rx) = mpsc::channel::<Vec<u8>>();
    std::thread::scope(|scope| {
        scope.spawn(move || loop {
            let mut buf = empty_rx.try_recv().unwrap_or_default();
            buf.resize(CHUNK, 0);
            let mut filled = 0;
            while filled < CHUNK {
                match file.read(&mut buf[filled..]) {
                    Ok(0) => break,
                    Ok(n) => filled += n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        let _ = full_tx.send(Err(e));
                        return;
                    }
                }
            }
            buf.truncate(filled);
            let last = filled < CHUNK;
            if filled > 0 && full_tx.send(Ok(buf)).is_err() {
                return;
            }
            if last {
                return;
            }
        });
        for chunk in full_rx {
            let chunk = chunk?;
            hasher.update_rayon(&chunk);
            let _ = empty_tx.send(chunk);
        }
        Ok(hasher.finalize().to_hex().to_string())
    })
}

/// Every file under `dir`, sorted, skipping [`IGNORED_DIRS`] and hidden entries.
pub fn list_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).with_context(|| format!("listing {}", d.display()))? {
            let entry = entry?;
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if name.starts_with('.') || IGNORED_DIRS.contains(&name.as_ref()) {
                continue;
            }
            let ty = entry.file_type()?;
            if ty.is_dir() {
                stack.push(entry.path());
            } else {
                out.push(entry.path());
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Hex BLAKE3 of `value` as canonical JSON (object keys sorted at every level).
pub fn hash_json(value: &serde_json::Value) -> String {
    blake3::hash(canonical_json(value).as_bytes())
        .to_hex()
        .to_string()
}

/// `value` serialised with object keys sorted at every level.
pub fn canonical_json(value: &serde_json::Value) -> String {
    fn sort(v: &serde_json::Value) -> serde_json::Value {
        match v {
            serde_json::Value::Object(map) => {
                let mut keys: Vec<&String> = map.keys().collect();
                keys.sort();
                serde_json::Value::Object(
                    keys.into_iter()
                        .map(|k| (k.clone(), sort(&map[k])))
                        .collect(),
                )
            }
            serde_json::Value::Array(items) => {
                serde_json::Value::Array(items.iter().map(sort).collect())
            }
            other => other.clone(),
        }
    }
    sort(value).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_hashes_are_blake3_of_the_bytes_across_chunk_boundaries() {
        let dir = tempfile::tempdir().unwrap();
        for len in [
            0usize,
            1,
            (16 << 20) - 1,
            16 << 20,
            (16 << 20) + 5,
            40 << 20,
        ] {
            let bytes: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
            let file = dir.path().join(format!("f{len}"));
            std::fs::write(&file, &bytes).unwrap();
            assert_eq!(
                hash_file_contents(&file).unwrap(),
                blake3::hash(&bytes).to_hex().to_string(),
                "{len} bytes"
            );
        }
    }

    #[test]
    fn canonical_json_ignores_key_order() {
        let a: serde_json::Value = serde_json::from_str(r#"{"b":1,"a":{"y":2,"x":3}}"#).unwrap();
        let b: serde_json::Value = serde_json::from_str(r#"{"a":{"x":3,"y":2},"b":1}"#).unwrap();
        assert_eq!(hash_json(&a), hash_json(&b));
        assert_ne!(hash_json(&a), hash_json(&serde_json::json!({"a": 1})));
    }

    #[test]
    fn folder_hash_changes_with_content_and_names_and_skips_build_dirs() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.txt"), "one").unwrap();
        let h = FileHasher::in_memory();
        let first = h.hash_path(dir.path()).unwrap();
        std::fs::create_dir(dir.path().join("target")).unwrap();
        std::fs::write(dir.path().join("target/x.o"), "junk").unwrap();
        assert_eq!(
            h.hash_path(dir.path()).unwrap(),
            first,
            "build output must not change the hash"
        );
        std::fs::write(dir.path().join("a.txt"), "two").unwrap();
        let second = h.hash_path(dir.path()).unwrap();
        assert_ne!(second, first);
        std::fs::rename(dir.path().join("a.txt"), dir.path().join("b.txt")).unwrap();
        assert_ne!(h.hash_path(dir.path()).unwrap(), second);
    }
}
