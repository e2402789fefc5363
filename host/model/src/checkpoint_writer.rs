//! Streaming writer of canonical safetensors checkpoints: one tensor in memory at a time, optional
//! sharding with `model.safetensors.index.json`, and a staging folder renamed into place when complete.
//!
//! Each file has the layout of `safetensors.torch.save_file(tensors, metadata={"format": "pt"})`: the
//! header is produced by the `safetensors` crate's own [`Metadata`] serialisation, tensors are ordered by
//! descending dtype alignment then by name, and the header is padded with spaces to a multiple of 8 bytes.

use anyhow::{bail, Context, Result};
use safetensors::tensor::{Metadata, TensorInfo};
use safetensors::Dtype;
use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use super::tensor_store::{INDEX_FILE, SINGLE_FILE};

/// Name, dtype and shape of a tensor to be written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorSpec {
    /// Tensor name.
    pub name: String,
    /// Element type on disk.
    pub dtype: Dtype,
    /// Shape.
    pub shape: Vec<usize>,
}

impl TensorSpec {
    /// A spec from its parts.
    pub fn new(name: impl Into<String>, dtype: Dtype, shape: Vec<usize>) -> Self {
        TensorSpec {
            name: name.into(),
            dtype,
            shape,
        }
    }

    /// Size of the tensor's data in bytes.
    pub fn byte_len(&self) -> usize {
        self.shape.iter().product::<usize>() * self.dtype.bitsize() / 8
    }
}

/// Sorts specs into the canonical on-disk order: descending dtype alignment, then name.
pub fn canonical_order(specs: &mut [TensorSpec]) {
    specs.sort_by(|a, b| b.dtype.cmp(&a.dtype).then_with(|| a.name.cmp(&b.name)));
}

/// The specs in canonical order (duplicate names refused) and the canonical header for them, for a
/// writer of the safetensors file at `path`.
pub fn ordered_with_header(
    path: &Path,
    specs: &[TensorSpec],
) -> Result<(Vec<TensorSpec>, Vec<u8>)> {
    let mut ordered = specs.to_vec();
    canonical_order(&mut ordered);
    for w in ordered.windows(2) {
        if w[0].name == w[1].name {
            bail!(
                "tensor {:?} is listed twice for {}",
                w[0].name,
                path.display()
            );
        }
    }
    let header = canonical_header(&ordered)
        .with_context(|| format!("building header of {}", path.display()))?;
    Ok((ordered, header))
}

/// Writes one canonical safetensors file. `produce` is called once per tensor, in canonical order, and must
/// return exactly `spec.byte_len()` little-endian bytes; it may borrow (e.g. from a memory map) or compute.
/// The file is written beside `path` under a temporary name and renamed when complete.
pub fn write_safetensors<'a, F>(path: &Path, specs: &[TensorSpec], mut produce: F) -> Result<u64>
where
    F: FnMut(&TensorSpec) -> Result<Cow<'a, [u8]>>,
{
    write_safetensors_recycling(path, specs, true, &mut produce, &mut |_| {})
}

/// Like [`write_safetensors`]; every owned buffer `produce` returns is handed to `recycle` once its bytes
/// are written, so a producer can reuse its allocations (no page faults on fresh memory per tensor).
/// `durable` as in [`ShardOptions::durable`].
pub fn write_safetensors_recycling<'a>(
    path: &Path,
    specs: &[TensorSpec],
    durable: bool,
    produce: &mut dyn FnMut(&TensorSpec) -> Result<Cow<'a, [u8]>>,
    recycle: &mut dyn FnMut(Vec<u8>),
) -> Result<u64> {
    let (ordered, header) = ordered_with_header(path, specs)?;
    write_through_temp(path, |tmp| {
        let file =
            std::fs::File::create(tmp).with_context(|| format!("creating {}", tmp.display()))?;
        let mut out = BufWriter::with_capacity(1 << 20, file);
        out.write_all(&(header.len() as u64).to_le_bytes())?;
        out.write_all(&header)?;
        let mut written = 0u64;
        let mut writeback = Writeback::new(durable);
        for spec in &ordered {
            writeback.start(&mut out)?;
            let bytes =
                produce(spec).with_context(|| format!("producing tensor {:?}", spec.name))?;
            if bytes.len() != spec.byte_len() {
                bail!(
                    "tensor {:?}: got {} bytes, {} {:?} needs {}",
                    spec.name,
                    bytes.len(),
                    spec.dtype,
                    spec.shape,
                    spec.byte_len()
                );
            }
            out.write_all(&bytes)
                .with_context(|| format!("writing {}", tmp.display()))?;
            written += bytes.len() as u64;
            if let Cow::Owned(buffer) = bytes {
                recycle(buffer);
            }
        }
        let file = out.into_inner().map_err(|e| e.into_error())?;
        if durable {
            file.sync_all()?;
        }
        Ok(written)
    })
}

/// Writes the file `path` through a temporary sibling: `write(tmp)` creates and fills it and returns the
/// bytes of tensor data written; the file is then renamed onto `path` (so it appears only when complete).
/// On error the temporary file is removed and the error names `path`.
pub fn write_through_temp(path: &Path, write: impl FnOnce(&Path) -> Result<u64>) -> Result<u64> {
    let tmp = temp_sibling(path);
    match write(&tmp) {
        Ok(n) => {
            std::fs::rename(&tmp, path)
                .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))?;
            Ok(n)
        }
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            Err(e.context(format!("writing {}", path.display())))
        }
    }
}

/// The header bytes (JSON padded to 8) of a canonical file holding `ordered` (already in canonical order).
pub fn canonical_header(ordered: &[TensorSpec]) -> Result<Vec<u8>> {
    let mut offset = 0;
    let mut infos = Vec::with_capacity(ordered.len());
    for s in ordered {
        let n = s.byte_len();
        infos.push((
            s.name.clone(),
            TensorInfo {
                dtype: s.dtype,
                shape: s.shape.clone(),
                data_offsets: (offset, offset + n),
            },
        ));
        offset += n;
    }
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    let metadata = Metadata::new(Some(meta), infos)?;
    let mut header = serde_json::to_string(&metadata)?.into_bytes();
    header.resize(header.len().next_multiple_of(8), b' ');
    Ok(header)
}

/// How to write a checkpoint's files: how to split them, and whether to make them durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShardOptions {
    /// Largest data size of one shard in bytes; `None` writes a single `model.safetensors`. A tensor larger
    /// than the limit gets a shard of its own.
    pub max_shard_bytes: Option<u64>,
    /// fsync every file before it is renamed into place (the default), so a completed checkpoint survives
    /// a power loss. `false` (the workflow's `durable = false`) skips it: the rename still makes a file
    /// appear only when complete, so a killed process leaves no partial file, but after a power loss the
    /// data may be lost (like git's `core.fsync` off). Meant for scratch or tmpfs outputs.
    pub durable: bool,
}

impl Default for ShardOptions {
    fn default() -> Self {
        ShardOptions {
            max_shard_bytes: None,
            durable: true,
        }
    }
}

/// What [`write_checkpoint`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WrittenCheckpoint {
    /// File names (relative to the folder), in shard order.
    pub files: Vec<String>,
    /// Sum of the tensor data sizes.
    pub total_size: u64,
}

/// Assigns tensors to shards: filled greedily in the order given (model order keeps layers together).
pub fn plan_shards(specs: &[TensorSpec], opts: ShardOptions) -> Vec<Vec<TensorSpec>> {
    let Some(limit) = opts.max_shard_bytes else {
        return vec![specs.to_vec()];
    };
    let mut shards: Vec<Vec<TensorSpec>> = Vec::new();
    let mut current: Vec<TensorSpec> = Vec::new();
    let mut size = 0u64;
    for s in specs {
        let n = s.byte_len() as u64;
        if !current.is_empty() && size + n > limit {
            shards.push(std::mem::take(&mut current));
            size = 0;
        }
        current.push(s.clone());
        size += n;
    }
    if !current.is_empty() || shards.is_empty() {
        shards.push(current);
    }
    shards
}

/// Writes the tensors of a checkpoint into the folder `dir` (which must already exist, typically a
/// [`StagingDir`]): `model.safetensors`, or `model-0000i-of-0000N.safetensors` shards plus
/// `model.safetensors.index.json`. `produce` is called once per tensor.
pub fn write_checkpoint<'a, F>(
    dir: &Path,
    specs: &[TensorSpec],
    opts: ShardOptions,
    mut produce: F,
) -> Result<WrittenCheckpoint>
where
    F: FnMut(&TensorSpec) -> Result<Cow<'a, [u8]>>,
{
    write_checkpoint_recycling(dir, specs, opts, &mut produce, &mut |_| {})
}

/// Like [`write_checkpoint`], handing every owned buffer back to `recycle` once written (see
/// [`write_safetensors_recycling`]).
pub fn write_checkpoint_recycling<'a>(
    dir: &Path,
    specs: &[TensorSpec],
    opts: ShardOptions,
    produce: &mut dyn FnMut(&TensorSpec) -> Result<Cow<'a, [u8]>>,
    recycle: &mut dyn FnMut(Vec<u8>),
) -> Result<WrittenCheckpoint> {
    write_sharded(dir, specs, opts, |path, shard| {
        write_safetensors_recycling(path, shard, opts.durable, produce, recycle)
    })
}

/// The sharding around a single-file writer: plans the shards, names their files, calls
/// `write_file(path, shard_specs) -> bytes written` for each, and writes the index when there are several.
pub fn write_sharded<F>(
    dir: &Path,
    specs: &[TensorSpec],
    opts: ShardOptions,
    mut write_file: F,
) -> Result<WrittenCheckpoint>
where
    F: FnMut(&Path, &[TensorSpec]) -> Result<u64>,
{
    let shards = plan_shards(specs, opts);
    let n = shards.len();
    let mut files = Vec::new();
    let mut weight_map = BTreeMap::new();
    let mut total_size = 0u64;
    for (i, shard) in shards.iter().enumerate() {
        let name = if n == 1 {
            SINGLE_FILE.to_string()
        } else {
            format!("model-{:05}-of-{:05}.safetensors", i + 1, n)
        };
        total_size += write_file(&dir.join(&name), shard)?;
        for s in shard {
            weight_map.insert(s.name.clone(), serde_json::Value::String(name.clone()));
        }
        files.push(name);
    }
    if n > 1 {
        write_index(dir, specs, weight_map, total_size)?;
    }
    Ok(WrittenCheckpoint { files, total_size })
}

/// Writes `model.safetensors.index.json` for a sharded checkpoint: `metadata.total_parameters` and
/// `total_size`, and the tensor -> shard `weight_map`, keys sorted and 2-space indented as transformers writes it.
pub fn write_index(
    dir: &Path,
    specs: &[TensorSpec],
    weight_map: BTreeMap<String, serde_json::Value>,
    total_size: u64,
) -> Result<()> {
    let total_parameters: usize = specs
        .iter()
        .map(|s| s.shape.iter().product::<usize>())
        .sum();
    let index = serde_json::json!({
        "metadata": { "total_parameters": total_parameters, "total_size": total_size },
        "weight_map": weight_map,
    });
    let text = serde_json::to_string_pretty(&index)? + "\n";
    let path = dir.join(INDEX_FILE);
    std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))
}

/// Early writeback of a file being written durably: each call asks the kernel to start writing what was
/// written since the last call (`sync_file_range(SYNC_FILE_RANGE_WRITE)`, which does not wait), so the
/// disk works while the next tensors are produced and the final fsync has little left to do.
pub struct Writeback {
    enabled: bool,
    started_to: u64,
}

impl Writeback {
    /// Early writeback when `enabled` (durable writes); otherwise every call does nothing.
    pub fn new(enabled: bool) -> Self {
        Writeback {
            enabled,
            started_to: 0,
        }
    }

    /// Flushes `out` and starts writeback of the bytes written since the last call. Errors only when the
    /// flush fails (writeback is a hint; the final fsync reports any I/O error).
    pub fn start(&mut self, out: &mut BufWriter<std::fs::File>) -> Result<()> {
        if !self.enabled {
            return Ok(());
        }
        out.flush()?;
        self.start_file(out.get_ref())
    }

    /// Like [`Writeback::start`] for an unbuffered file, up to its current position.
    pub fn start_file(&mut self, file: &std::fs::File) -> Result<()> {
        if !self.enabled {
            return Ok(());
        }
        use std::io::Seek;
        let end = (&*file).stream_position()?;
        self.start_to(file, end);
        Ok(())
    }

    /// Starts writeback of `file`'s bytes from the end of the last call up to `end` (for files written
    /// with positioned writes, which do not move the file position).
    pub fn start_to(&mut self, file: &std::fs::File, end: u64) {
        if !self.enabled {
            return;
        }
        #[cfg(target_os = "linux")]
        {
            use std::os::fd::AsRawFd;
            if end > self.started_to {
                // SAFETY: a valid open descriptor; the call only schedules writeback of a byte range.
                unsafe {
                    libc::sync_file_range(
                        file.as_raw_fd(),
                        self.started_to as libc::off64_t,
                        (end - self.started_to) as libc::off64_t,
                        libc::SYNC_FILE_RANGE_WRITE,
                    );
                }
                self.started_to = end;
            }
        }
        #[cfg(not(target_os = "linux"))]
        let _ = (file, end);
    }
}

/// A temporary folder beside its destination, renamed onto the destination by [`StagingDir::commit`] and
/// removed if dropped uncommitted, so a reader never sees a half-written model folder.
#[derive(Debug)]
pub struct StagingDir {
    staging: PathBuf,
    target: PathBuf,
    committed: bool,
}

impl StagingDir {
    /// Creates the staging folder for `target` (in the same parent folder, so the rename is atomic).
    pub fn new(target: &Path) -> Result<Self> {
        let parent = match target.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        std::fs::create_dir_all(&parent)
            .with_context(|| format!("creating {}", parent.display()))?;
        let staging = temp_sibling(target);
        std::fs::create_dir(&staging).with_context(|| format!("creating {}", staging.display()))?;
        Ok(StagingDir {
            staging,
            target: target.to_path_buf(),
            committed: false,
        })
    }

    /// The folder to write into.
    pub fn path(&self) -> &Path {
        &self.staging
    }

    /// Moves the staging folder onto the target. An existing target folder is replaced only when
    /// `replace` is true (it is removed first; the rename itself is atomic).
    pub fn commit(mut self, replace: bool) -> Result<PathBuf> {
        if self.target.exists() {
            if !replace {
                bail!("{} already exists", self.target.display());
            }
            std::fs::remove_dir_all(&self.target)
                .with_context(|| format!("removing old {}", self.target.display()))?;
        }
        std::fs::rename(&self.staging, &self.target).with_context(|| {
            format!(
                "renaming {} to {}",
                self.staging.display(),
                self.target.display()
            )
        })?;
        self.committed = true;
        Ok(self.target.clone())
    }
}

impl Drop for StagingDir {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_dir_all(&self.staging);
        }
    }
}

fn temp_sibling(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "out".into());
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    path.with_file_name(format!(".{name}.tmp-{}-{nanos}", std::process::id()))
}
