//! Building plugin source folders into components, cached by content hash, and watching them.
//!
//! A source folder is either a Rust crate (`Cargo.toml`, built for `wasm32-wasip2` with the SDK)
//! or any folder with a `plugin.toml` naming its build command:
//!
//! ```toml
//! [build]
//! # Run with `sh -c` in the plugin folder. It must write the component to $DUS_OUT.
//! command = 'componentize-py -d "$DUS_WIT" -w data-filter-plugin componentize app -o "$DUS_OUT"'
//! # Programs that must be on PATH, or files under the toolchains folder ("$DUS_TOOLCHAINS/..."):
//! # when one is missing the build fails with a `MissingTool` error (tests skip on it).
//! requires = ["componentize-py"]
//! ```
//!
//! The command sees `DUS_WIT` (the WIT folder of the newest `dus:plugin` version), `DUS_SDK_TOOLS`
//! (helper scripts in `sdk/tools/`), `DUS_TOOLCHAINS` (where `scripts/install-plugin-toolchains.sh`
//! installs), and a `PATH` with the toolchains' `bin` folders first.

use anyhow::{bail, Context, Result};
use serde::Deserialize;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

/// Bumped when the way plugins are built changes, so cached components are rebuilt.
const BUILD_RECIPE: &str = "dusflow-plugin-build-1";

/// The SDK folder of this source tree (WIT, helper scripts, the Rust SDK crate).
pub fn sdk_dir() -> PathBuf {
    std::env::var_os("DUS_SDK_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../sdk"))
}

/// The WIT folder of the newest `dus:plugin` version.
pub fn wit_dir() -> PathBuf {
    sdk_dir().join("wit").join(
        super::bindings::SUPPORTED_VERSIONS
            .last()
            .expect("a supported version"),
    )
}

/// Where `scripts/install-plugin-toolchains.sh` installs: `$DUS_TOOLCHAINS`, else
/// `~/.cache/dusflow/toolchains`.
pub fn toolchains_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("DUS_TOOLCHAINS") {
        return PathBuf::from(dir);
    }
    home_cache().join("dusflow/toolchains")
}

/// The plugin cache: `$DUS_PLUGIN_CACHE`, else `$XDG_CACHE_HOME/dusflow/plugins`, else
/// `~/.cache/dusflow/plugins`.
pub fn default_cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("DUS_PLUGIN_CACHE") {
        return PathBuf::from(dir);
    }
    home_cache().join("dusflow/plugins")
}

fn home_cache() -> PathBuf {
    if let Some(dir) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(dir);
    }
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir)
        .join(".cache")
}

/// A build needs a tool that is not installed.
#[derive(Debug, thiserror::Error)]
#[error("building plugin {plugin} needs `{tool}`, which is not installed; run scripts/install-plugin-toolchains.sh")]
pub struct MissingTool {
    /// The plugin folder.
    pub plugin: String,
    /// The missing program.
    pub tool: String,
}

/// What kind of source folder a plugin is.
enum Recipe {
    Cargo,
    Command(CommandRecipe),
}

/// `plugin.toml`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PluginToml {
    build: CommandRecipe,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CommandRecipe {
    command: String,
    /// Programs on PATH, or paths under the toolchains folder written `$DUS_TOOLCHAINS/...`.
    #[serde(default)]
    requires: Vec<String>,
}

fn recipe(dir: &Path) -> Result<Recipe> {
    let toml_path = dir.join("plugin.toml");
    if toml_path.exists() {
        let text = std::fs::read_to_string(&toml_path)?;
        let parsed: PluginToml = toml::from_str(&text)
            .with_context(|| format!("{} is not a valid plugin.toml", toml_path.display()))?;
        return Ok(Recipe::Command(parsed.build));
    }
    if dir.join("Cargo.toml").exists() {
        return Ok(Recipe::Cargo);
    }
    bail!(
        "{} is not a plugin folder: expected a Cargo.toml (Rust plugin) or a plugin.toml naming the build command",
        dir.display()
    )
}

/// Folder names never part of a plugin's sources.
fn ignored(name: &str) -> bool {
    name.starts_with('.') || matches!(name, "target" | "node_modules" | "__pycache__")
}

/// The files whose change should rebuild the plugin in `dir`, sorted: every file of the folder
/// (but build outputs, hidden files and `.wasm` files), the files of Rust path dependencies
/// (the SDK and its WIT), and for `plugin.toml` plugins the WIT and SDK helper scripts.
pub fn source_files(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let mut seen_dirs = Vec::new();
    collect_sources(dir, &mut files, &mut seen_dirs);
    if dir.join("plugin.toml").exists() {
        collect_sources(&wit_dir(), &mut files, &mut seen_dirs);
        collect_sources(&sdk_dir().join("tools"), &mut files, &mut seen_dirs);
    }
    files.sort();
    files.dedup();
    files
}

fn collect_sources(dir: &Path, files: &mut Vec<PathBuf>, seen_dirs: &mut Vec<PathBuf>) {
    let Ok(canonical) = dir.canonicalize() else {
        return;
    };
    if seen_dirs.contains(&canonical) {
        return;
    }
    seen_dirs.push(canonical);
    walk(dir, files);
    for dep in cargo_path_dependencies(dir) {
        collect_sources(&dep, files, seen_dirs);
    }
}

fn walk(dir: &Path, files: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        if ignored(&name) {
            continue;
        }
        match entry.file_type() {
            Ok(t) if t.is_dir() => walk(&path, files),
            Ok(t) if t.is_file() && !name.ends_with(".wasm") => files.push(path),
            _ => {}
        }
    }
}

/// `path = "..."` dependencies of a Cargo.toml in `dir`.
fn cargo_path_dependencies(dir: &Path) -> Vec<PathBuf> {
    let Ok(text) = std::fs::read_to_string(dir.join("Cargo.toml")) else {
        return Vec::new();
    };
    let Ok(manifest) = text.parse::<toml::Table>() else {
        return Vec::new();
    };
    let mut deps = Vec::new();
    for section in ["dependencies", "build-dependencies"] {
        let Some(table) = manifest.get(section).and_then(toml::Value::as_table) else {
            continue;
        };
        for spec in table.values() {
            if let Some(path) = spec.get("path").and_then(toml::Value::as_str) {
                deps.push(dir.join(path));
            }
        }
    }
    deps
}

/// Content hash of a plugin folder: recipe version, relative paths and contents of
/// [`source_files`].
pub fn content_hash(dir: &Path) -> Result<blake3::Hash> {
    let mut hasher = blake3::Hasher::new();
    hasher.update(BUILD_RECIPE.as_bytes());
    for file in source_files(dir) {
        let rel = file.strip_prefix(dir).unwrap_or(&file);
        hasher.update(rel.to_string_lossy().as_bytes());
        hasher.update(&[0]);
        let bytes =
            std::fs::read(&file).with_context(|| format!("cannot read {}", file.display()))?;
        hasher.update(&(bytes.len() as u64).to_le_bytes());
        hasher.update(&bytes);
    }
    Ok(hasher.finalize())
}

/// Serialises builds within the process, so parallel tests build each plugin once.
static BUILD_LOCK: Mutex<()> = Mutex::new(());

/// An exclusive advisory lock on a file, held until dropped: serialises builds of the same
/// sources across processes (e.g. tests run by nextest, one process per test).
struct FileLock {
    /// Closing the file releases the lock.
    _file: std::fs::File,
}

impl FileLock {
    fn acquire(path: &Path) -> Result<FileLock> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .with_context(|| format!("cannot open the build lock {}", path.display()))?;
        #[cfg(unix)]
        {
            use std::os::fd::AsRawFd;
            // SAFETY: flock on a file descriptor we own; it is released when the file is closed.
            if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
                bail!(
                    "cannot lock {}: {}",
                    path.display(),
                    std::io::Error::last_os_error()
                );
            }
        }
        Ok(FileLock { _file: file })
    }
}

/// The component for `path`: `path` itself if it is a `.wasm` file, else the cached build of the
/// source folder, building it first if its content hash is not cached. Uses
/// [`default_cache_dir`].
pub fn ensure_built(path: &Path) -> Result<PathBuf> {
    ensure_built_in(path, &default_cache_dir())
}

/// The component for `path` without building anything: `path` itself if it is a `.wasm` file, the
/// cached build of a source folder's current sources, or `None` when that folder has none.
pub fn cached_build_in(path: &Path, cache_dir: &Path) -> Result<Option<PathBuf>> {
    if path.is_file() {
        return Ok(Some(path.to_path_buf()));
    }
    if !path.is_dir() {
        bail!(
            "plugin {} does not exist (expected a .wasm component or a plugin source folder)",
            path.display()
        );
    }
    let cached = cache_dir
        .join("builds")
        .join(format!("{}.wasm", content_hash(path)?.to_hex()));
    Ok(cached.exists().then_some(cached))
}

/// What building the source folder `dir` runs, in words, for messages.
pub fn describe_recipe(dir: &Path) -> String {
    match recipe(dir) {
        Ok(Recipe::Cargo) => {
            "`cargo build` (which runs the crate's build scripts and procedural macros)".to_string()
        }
        Ok(Recipe::Command(r)) => format!("the plugin.toml build command `{}`", r.command),
        Err(_) => "its build command".to_string(),
    }
}

/// [`ensure_built`] with an explicit cache folder.
pub fn ensure_built_in(path: &Path, cache_dir: &Path) -> Result<PathBuf> {
    if let Some(wasm) = cached_build_in(path, cache_dir)? {
        return Ok(wasm);
    }
    let builds = cache_dir.join("builds");
    let cached = |hash: blake3::Hash| builds.join(format!("{}.wasm", hash.to_hex()));
    let before = content_hash(path)?;
    let _guard = BUILD_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    std::fs::create_dir_all(&builds)
        .with_context(|| format!("cannot create {}", builds.display()))?;
    let _lock = FileLock::acquire(&builds.join(format!("{}.lock", before.to_hex())))?;
    if cached(before).exists() {
        return Ok(cached(before));
    }
    let tmp = builds.join(format!("{}.tmp{}", before.to_hex(), std::process::id()));
    tracing::warn!(
        "building plugin {} from source: running {} on this machine, outside the sandbox",
        path.display(),
        describe_recipe(path)
    );
    build(path, &tmp, cache_dir)?;
    std::fs::rename(&tmp, cached(before))?;
    // A first build may write files that belong to the sources (Cargo.lock): cache under the new
    // hash too, so the next call finds it.
    let after = content_hash(path)?;
    if after != before {
        std::fs::copy(cached(before), cached(after))?;
    }
    Ok(cached(after))
}

/// Builds the plugin in `dir` into the component file `out`, whatever its cache state.
pub fn build(dir: &Path, out: &Path, cache_dir: &Path) -> Result<()> {
    let dir = &std::path::absolute(dir)?;
    let started = std::time::Instant::now();
    match recipe(dir)? {
        Recipe::Cargo => build_cargo(dir, out, cache_dir)?,
        Recipe::Command(r) => build_command(dir, out, &r)?,
    }
    if !out.exists() {
        bail!(
            "building {} reported success but wrote no component to {}",
            dir.display(),
            out.display()
        );
    }
    tracing::info!(plugin = %dir.display(), seconds = started.elapsed().as_secs_f32(), "built plugin");
    Ok(())
}

fn toolchain_path() -> std::ffi::OsString {
    let tc = toolchains_dir();
    let mut paths = vec![
        tc.join("bin"),
        tc.join("venv/bin"),
        tc.join("node/node_modules/.bin"),
    ];
    if let Some(path) = std::env::var_os("PATH") {
        paths.extend(std::env::split_paths(&path));
    }
    std::env::join_paths(paths).unwrap_or_default()
}

fn find_on_path(tool: &str, path: &std::ffi::OsStr) -> bool {
    std::env::split_paths(path).any(|dir| dir.join(tool).is_file())
}

fn build_cargo(dir: &Path, out: &Path, cache_dir: &Path) -> Result<()> {
    let manifest = dir.join("Cargo.toml");
    let text = std::fs::read_to_string(&manifest)?;
    let parsed: toml::Table = toml::from_str(&text)
        .with_context(|| format!("{} is not valid TOML", manifest.display()))?;
    let lib_name = parsed
        .get("lib")
        .and_then(|l| l.get("name"))
        .or_else(|| parsed.get("package").and_then(|p| p.get("name")))
        .and_then(toml::Value::as_str)
        .with_context(|| format!("{} has no package name", manifest.display()))?
        .replace('-', "_");
    let target_dir = std::env::var_os("DUS_WASM_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| cache_dir.join("cargo-target"));
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let output = Command::new(cargo)
        .args([
            "build",
            "--release",
            "--target",
            "wasm32-wasip2",
            "--manifest-path",
        ])
        .arg(&manifest)
        .arg("--target-dir")
        .arg(&target_dir)
        .current_dir(dir)
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_BUILD_RUSTFLAGS")
        .env("CARGO_ENCODED_RUSTFLAGS", "-Ctarget-feature=+simd128")
        .output()
        .context("cannot run cargo")?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let hint = if stderr.contains("target may not be installed")
            || stderr.contains("can't find crate for `core`")
        {
            "\nhint: run scripts/install-plugin-toolchains.sh rust (adds the wasm32-wasip2 target)"
        } else {
            ""
        };
        bail!(
            "cargo failed to build plugin {}:\n{}{hint}",
            dir.display(),
            tail(&stderr, 60)
        );
    }
    let wasm = target_dir
        .join("wasm32-wasip2/release")
        .join(format!("{lib_name}.wasm"));
    std::fs::copy(&wasm, out).with_context(|| {
        format!(
            "cargo built {} but {} is missing",
            dir.display(),
            wasm.display()
        )
    })?;
    Ok(())
}

fn build_command(dir: &Path, out: &Path, recipe: &CommandRecipe) -> Result<()> {
    let path = toolchain_path();
    for tool in &recipe.requires {
        let present = match tool.strip_prefix("$DUS_TOOLCHAINS/") {
            Some(rel) => toolchains_dir().join(rel).exists(),
            None => find_on_path(tool, &path),
        };
        if !present {
            return Err(MissingTool {
                plugin: dir.display().to_string(),
                tool: tool.clone(),
            }
            .into());
        }
    }
    let tc = toolchains_dir();
    let output = Command::new("sh")
        .arg("-c")
        .arg(&recipe.command)
        .current_dir(dir)
        .env("PATH", &path)
        .env("DUS_OUT", std::path::absolute(out)?)
        .env("DUS_WIT", std::path::absolute(wit_dir())?)
        .env(
            "DUS_SDK_TOOLS",
            std::path::absolute(sdk_dir().join("tools"))?,
        )
        .env("DUS_TOOLCHAINS", &tc)
        .env("NODE_PATH", tc.join("node/node_modules"))
        .output()
        .context("cannot run sh")?;
    if !output.status.success() {
        bail!(
            "the build command of plugin {} failed ({}):\n  command: {}\n{}{}",
            dir.display(),
            output.status,
            recipe.command,
            tail(&String::from_utf8_lossy(&output.stdout), 20),
            tail(&String::from_utf8_lossy(&output.stderr), 40)
        );
    }
    Ok(())
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Watches a plugin folder and rebuilds it whenever one of its [`source_files`] changes, calling
/// `on_build` with the new component (or the build error) after each rebuild. Builds once at the
/// start. Returns when `on_build` says [`ControlFlow::Break`], or when the watcher fails.
pub fn watch(
    dir: &Path,
    cache_dir: &Path,
    mut on_build: impl FnMut(Result<PathBuf>) -> ControlFlow<()>,
) -> Result<()> {
    use notify_debouncer_mini::{new_debouncer, notify::RecursiveMode};
    let (tx, rx) = std::sync::mpsc::channel();
    let mut debouncer = new_debouncer(std::time::Duration::from_millis(300), tx)?;
    let mut roots: Vec<PathBuf> = Vec::new();
    for file in source_files(dir) {
        let parent = file.parent().unwrap_or(dir).to_path_buf();
        if !roots.iter().any(|r| parent.starts_with(r)) {
            roots.retain(|r| !r.starts_with(&parent));
            roots.push(parent);
        }
    }
    roots.push(dir.to_path_buf());
    roots.sort();
    roots.dedup();
    for root in &roots {
        debouncer.watcher().watch(root, RecursiveMode::Recursive)?;
    }
    if on_build(ensure_built_in(dir, cache_dir)).is_break() {
        return Ok(());
    }
    let mut last = content_hash(dir)?;
    for events in rx {
        events.map_err(|e| anyhow::anyhow!("watching {} failed: {e}", dir.display()))?;
        // Only a change of the content hash matters: edits to build outputs or ignored files hash
        // the same.
        let now = content_hash(dir)?;
        if now != last {
            last = now;
            if on_build(ensure_built_in(dir, cache_dir)).is_break() {
                return Ok(());
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn source_files_skip_build_outputs_and_hash_follows_content() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("plugin.toml"),
            "[build]\ncommand = 'true'\n",
        )
        .unwrap();
        std::fs::write(dir.path().join("app.py"), "x = 1\n").unwrap();
        std::fs::create_dir_all(dir.path().join("__pycache__")).unwrap();
        std::fs::write(dir.path().join("__pycache__/app.pyc"), "junk").unwrap();
        std::fs::write(dir.path().join("old.wasm"), "junk").unwrap();
        let files = source_files(dir.path());
        assert!(files.contains(&dir.path().join("app.py")));
        assert!(!files
            .iter()
            .any(|f| f.to_string_lossy().contains("__pycache__") || f.ends_with("old.wasm")));
        assert!(
            files.iter().any(|f| f.ends_with("plugin.wit")),
            "the WIT is part of the sources"
        );
        let before = content_hash(dir.path()).unwrap();
        std::fs::write(dir.path().join("__pycache__/app.pyc"), "other junk").unwrap();
        assert_eq!(before, content_hash(dir.path()).unwrap());
        std::fs::write(dir.path().join("app.py"), "x = 2\n").unwrap();
        assert_ne!(before, content_hash(dir.path()).unwrap());
    }
}
