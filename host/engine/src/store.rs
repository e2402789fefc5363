//! The artifact store: `<out>/<step>-<hash>/` folders, their manifests, and the crash-safe way they appear.
//!
//! A step writes into a work folder `<out>/.dus/partial/<step>-<hash>/`. On success the folder is renamed to
//! `<out>/<step>-<hash>/` and only then is `manifest.json` written (atomically). An artifact is complete
//! exactly when its manifest exists and names its key; folders without one are leftovers of a crash and
//! are removed by [`ArtifactStore::clean_incomplete`].

use anyhow::{bail, Context, Result};
use dusflow_core::atomic::{sync_dir, write_file_atomic};
use dusflow_core::step::ArtifactKind;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

/// The manifest file name inside every complete artifact.
pub const MANIFEST: &str = "manifest.json";

/// Everything a step's cache key covers. Its canonical JSON hash is the key.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KeyMaterial {
    /// `dusflow/<version>`.
    pub runtime: String,
    /// Step kind name.
    pub kind: String,
    /// Step kind version.
    pub kind_version: u32,
    /// Normalised parameters.
    pub config: serde_json::Value,
    /// Workflow settings that affect outputs.
    pub settings: serde_json::Value,
    /// Input keys by slot: `name:hash`, in order.
    pub inputs: BTreeMap<String, Vec<String>>,
    /// Plugin content hashes by name.
    pub plugins: BTreeMap<String, String>,
    /// Extra file content hashes by path.
    pub files: BTreeMap<String, String>,
}

/// What `manifest.json` records about a complete artifact.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// Step name.
    pub step: String,
    /// The full cache key (hex BLAKE3).
    pub key: String,
    /// What the artifact is.
    pub output: ArtifactKind,
    /// What the key covers.
    pub material: KeyMaterial,
    /// Start, Unix milliseconds.
    pub started_unix_ms: u128,
    /// End, Unix milliseconds.
    pub finished_unix_ms: u128,
}

/// Artifact folders under one output directory.
#[derive(Debug, Clone)]
pub struct ArtifactStore {
    root: PathBuf,
}

/// Holds the output directory for one `dus` process; released on drop.
pub struct RunLock {
    _file: File,
}

impl ArtifactStore {
    /// A store rooted at `root` (created on first write).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// The output directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `<out>/.dus`: hash cache, event log, work folders, lock.
    pub fn state_dir(&self) -> PathBuf {
        self.root.join(".dus")
    }

    /// Folder name of a step's artifact: the step name made file-safe, then 12 hex digits of its key.
    pub fn folder_name(step: &str, key: &str) -> String {
        let safe: String = step
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || "_-.,=+[]".contains(c) {
                    c
                } else {
                    '_'
                }
            })
            .take(120)
            .collect();
        format!("{safe}-{}", &key[..12.min(key.len())])
    }

    /// Where the complete artifact lives.
    pub fn artifact_dir(&self, step: &str, key: &str) -> PathBuf {
        self.root.join(Self::folder_name(step, key))
    }

    /// Where the step writes while it runs.
    pub fn partial_dir(&self, step: &str, key: &str) -> PathBuf {
        self.state_dir()
            .join("partial")
            .join(Self::folder_name(step, key))
    }

    /// The manifest of a complete artifact with this key, if there is one.
    pub fn complete(&self, step: &str, key: &str) -> Option<Manifest> {
        let dir = self.artifact_dir(step, key);
        let bytes = std::fs::read(dir.join(MANIFEST)).ok()?;
        let manifest: Manifest = serde_json::from_slice(&bytes).ok()?;
        (manifest.key == key).then_some(manifest)
    }

    /// Takes the output directory for this process; fails if another `dus` is running on it.
    pub fn lock(&self) -> Result<RunLock> {
        let dir = self.state_dir();
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join("lock"))?;
        match file.try_lock() {
            Ok(()) => Ok(RunLock { _file: file }),
            Err(std::fs::TryLockError::WouldBlock) => {
                bail!(
                    "another dus process is using {}; wait for it or stop it",
                    self.root.display()
                )
            }
            Err(std::fs::TryLockError::Error(e)) => Err(e).context("locking the output directory"),
        }
    }

    /// Prepares the work folder. A resumable step keeps what an interrupted run left there.
    pub fn begin(&self, step: &str, key: &str, resumable: bool) -> Result<PathBuf> {
        let dir = self.partial_dir(step, key);
        if dir.exists() && !resumable {
            std::fs::remove_dir_all(&dir).with_context(|| format!("clearing {}", dir.display()))?;
        }
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(dir)
    }

    /// Turns a finished work folder into the artifact: rename into place, then write the manifest last.
    pub fn commit(&self, partial: &Path, manifest: &Manifest) -> Result<PathBuf> {
        let target = self.artifact_dir(&manifest.step, &manifest.key);
        if target.exists() {
            // A forced rerun replaces the old artifact: retire it first so a crash leaves no manifest behind.
            let retired = self
                .state_dir()
                .join("retired")
                .join(Self::folder_name(&manifest.step, &manifest.key));
            if retired.exists() {
                std::fs::remove_dir_all(&retired)?;
            }
            std::fs::create_dir_all(retired.parent().expect("retired parent"))?;
            std::fs::rename(&target, &retired)
                .with_context(|| format!("moving aside {}", target.display()))?;
            let _ = std::fs::remove_dir_all(&retired);
        }
        std::fs::create_dir_all(&self.root)?;
        std::fs::rename(partial, &target)
            .with_context(|| format!("renaming {} to {}", partial.display(), target.display()))?;
        sync_dir(&self.root);
        write_file_atomic(
            &target.join(MANIFEST),
            &serde_json::to_vec_pretty(manifest)?,
        )?;
        Ok(target)
    }

    /// Drops a failed or cancelled step's work folder (kept for resumable steps).
    pub fn abandon(&self, partial: &Path, resumable: bool) {
        if !resumable {
            let _ = std::fs::remove_dir_all(partial);
        }
    }

    /// Removes artifact folders that have no manifest (an interrupted commit); returns what it removed.
    pub fn clean_incomplete(&self) -> Result<Vec<PathBuf>> {
        let mut removed = Vec::new();
        let Ok(entries) = std::fs::read_dir(&self.root) else {
            return Ok(removed);
        };
        for entry in entries {
            let path = entry?.path();
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().to_string())
                .unwrap_or_default();
            if name.starts_with('.') || !path.is_dir() || !looks_like_artifact(&name) {
                continue;
            }
            if !path.join(MANIFEST).exists() {
                std::fs::remove_dir_all(&path)
                    .with_context(|| format!("removing incomplete {}", path.display()))?;
                removed.push(path);
            }
        }
        let _ = std::fs::remove_dir_all(self.state_dir().join("retired"));
        Ok(removed)
    }
}

/// `<name>-<12 hex digits>`.
fn looks_like_artifact(name: &str) -> bool {
    name.rsplit_once('-')
        .is_some_and(|(_, h)| h.len() == 12 && h.chars().all(|c| c.is_ascii_hexdigit()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest(step: &str, key: &str) -> Manifest {
        Manifest {
            step: step.into(),
            key: key.into(),
            output: ArtifactKind::Files,
            material: KeyMaterial {
                runtime: "t".into(),
                kind: "k".into(),
                kind_version: 1,
                config: serde_json::json!({}),
                settings: serde_json::json!({}),
                inputs: Default::default(),
                plugins: Default::default(),
                files: Default::default(),
            },
            started_unix_ms: 0,
            finished_unix_ms: 0,
        }
    }

    #[test]
    fn an_artifact_is_complete_only_with_its_manifest() {
        let dir = tempfile::tempdir().unwrap();
        let store = ArtifactStore::new(dir.path());
        let key = "0123456789abcdef0123";
        let work = store.begin("s", key, false).unwrap();
        std::fs::write(work.join("out.txt"), "x").unwrap();
        assert!(store.complete("s", key).is_none());
        let done = store.commit(&work, &manifest("s", key)).unwrap();
        assert!(store.complete("s", key).is_some());
        assert_eq!(std::fs::read_to_string(done.join("out.txt")).unwrap(), "x");
        // A crash between rename and manifest leaves a folder without manifest: it is cleaned.
        std::fs::remove_file(done.join(MANIFEST)).unwrap();
        assert!(store.complete("s", key).is_none());
        assert_eq!(store.clean_incomplete().unwrap(), vec![done.clone()]);
        assert!(!done.exists());
    }

    #[test]
    fn a_second_lock_on_the_same_output_fails() {
        let dir = tempfile::tempdir().unwrap();
        let store = ArtifactStore::new(dir.path());
        let _held = store.lock().unwrap();
        assert!(store.lock().is_err());
    }
}
