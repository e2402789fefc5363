//! Read-only access to safetensors checkpoints (one file or a sharded folder), read with positioned reads.
//!
//! Headers are read and checked when the store opens ([`crate::safetensors_header`]); a tensor's bytes are
//! read when a caller asks for them ([`TensorStore::bytes`]). The files are not memory-mapped: a mapped
//! file that another process truncates kills the reader with SIGBUS at the first touch of a lost page,
//! whereas a short read is an error that names the tensor. Every read also checks that the file still has
//! the size and modification time it had when the store opened it, so an input rewritten in place while a
//! step reads it fails that step with a message instead of mixing old and new bytes.

use super::safetensors_header::{header_length, parse_header};
use anyhow::{anyhow, bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use safetensors::Dtype;
use std::collections::BTreeMap;
use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

/// Name of the single-file checkpoint inside a model folder.
pub const SINGLE_FILE: &str = "model.safetensors";
/// Name of the shard index inside a sharded model folder.
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// One open safetensors file and what it looked like when it was opened.
struct StoredFile {
    path: PathBuf,
    file: File,
    len: u64,
    modified: Option<SystemTime>,
}

impl StoredFile {
    /// An error when the file no longer has the size and modification time it had when opened.
    fn check_unchanged(&self) -> Result<()> {
        let meta = self
            .file
            .metadata()
            .with_context(|| format!("reading metadata of {}", self.path.display()))?;
        let modified = meta.modified().ok();
        if meta.len() != self.len || modified != self.modified {
            bail!(
                "{} changed while this step was reading it ({} bytes when opened, {} now{}); an input must not \
                 be rewritten while a step reads it: rerun once it is stable",
                self.path.display(),
                self.len,
                meta.len(),
                if meta.len() == self.len {
                    ", modified since"
                } else {
                    ""
                }
            );
        }
        Ok(())
    }
}

/// Where a tensor lives and what it is.
#[derive(Debug, Clone)]
struct Entry {
    file: usize,
    dtype: Dtype,
    shape: Vec<usize>,
    /// Absolute byte range in the file.
    start: u64,
    end: u64,
}

/// Name, dtype, shape and file of one stored tensor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorMeta<'a> {
    /// Tensor name, e.g. `model.layers.0.mlp.up_proj.weight`.
    pub name: &'a str,
    /// Stored element type.
    pub dtype: Dtype,
    /// Stored shape.
    pub shape: &'a [usize],
    /// File that holds it.
    pub file: &'a Path,
}

impl TensorMeta<'_> {
    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// A set of safetensors files seen as one name → tensor map.
pub struct TensorStore {
    root: PathBuf,
    files: Vec<StoredFile>,
    entries: BTreeMap<String, Entry>,
}

impl std::fmt::Debug for TensorStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TensorStore")
            .field("root", &self.root)
            .field("tensors", &self.entries.len())
            .finish()
    }
}

impl TensorStore {
    /// Opens a `.safetensors` file, or a model folder holding `model.safetensors` or
    /// `model.safetensors.index.json` with its shards.
    pub fn open(path: &Path) -> Result<Self> {
        if path.is_dir() {
            let index = path.join(INDEX_FILE);
            let single = path.join(SINGLE_FILE);
            if index.is_file() {
                Self::open_sharded(&index)
            } else if single.is_file() {
                Self::open_file(&single)
            } else {
                bail!(
                    "{}: no {SINGLE_FILE} or {INDEX_FILE} in this folder",
                    path.display()
                )
            }
        } else if path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.ends_with(".index.json"))
        {
            Self::open_sharded(path)
        } else {
            Self::open_file(path)
        }
    }

    /// Opens one safetensors file.
    pub fn open_file(path: &Path) -> Result<Self> {
        let (file, infos) = open_checked(path)?;
        let entries = infos
            .into_iter()
            .map(|(name, info)| (name, Entry { file: 0, ..info }))
            .collect();
        Ok(TensorStore {
            root: path.to_path_buf(),
            files: vec![file],
            entries,
        })
    }

    /// Opens a sharded checkpoint from its `model.safetensors.index.json`: every shard named in the
    /// `weight_map` is opened, and every mapped name must be in the shard that the index names.
    pub fn open_sharded(index_path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(index_path)
            .with_context(|| format!("reading {}", index_path.display()))?;
        let index: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("{}: invalid JSON", index_path.display()))?;
        let weight_map = index
            .get("weight_map")
            .and_then(|w| w.as_object())
            .ok_or_else(|| anyhow!("{}: no \"weight_map\" object", index_path.display()))?;
        let dir = index_path.parent().unwrap_or(Path::new("."));
        let mut shard_names: Vec<&str> = Vec::new();
        for (name, file) in weight_map {
            let file = file.as_str().ok_or_else(|| {
                anyhow!(
                    "{}: weight_map[{name:?}] is not a string",
                    index_path.display()
                )
            })?;
            if !shard_names.contains(&file) {
                shard_names.push(file);
            }
        }
        shard_names.sort();
        let mut files = Vec::new();
        let mut entries = BTreeMap::new();
        let mut per_shard: Vec<BTreeMap<String, Entry>> = Vec::new();
        for shard in &shard_names {
            let (file, infos) = open_checked(&dir.join(shard))?;
            files.push(file);
            per_shard.push(infos);
        }
        for (name, file) in weight_map {
            let file = file.as_str().unwrap_or_default();
            let i = shard_names
                .iter()
                .position(|s| *s == file)
                .expect("shard listed above");
            let info = per_shard[i].get(name).ok_or_else(|| {
                anyhow!(
                    "{}: tensor {name:?} is mapped to {file} but that file does not contain it",
                    index_path.display()
                )
            })?;
            entries.insert(
                name.clone(),
                Entry {
                    file: i,
                    ..info.clone()
                },
            );
        }
        Ok(TensorStore {
            root: dir.to_path_buf(),
            files,
            entries,
        })
    }

    /// The file or folder this store was opened from.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Paths of the files, in shard order.
    pub fn files(&self) -> Vec<&Path> {
        self.files.iter().map(|f| f.path.as_path()).collect()
    }

    /// Tensor names in lexicographic order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.entries.keys().map(String::as_str)
    }

    /// Number of tensors.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when the store holds no tensor.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Whether a tensor of this name exists.
    pub fn contains(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }

    /// Metadata of one tensor, or `None` if absent.
    pub fn get(&self, name: &str) -> Option<TensorMeta<'_>> {
        let (name, e) = self.entries.get_key_value(name)?;
        Some(TensorMeta {
            name,
            dtype: e.dtype,
            shape: &e.shape,
            file: &self.files[e.file].path,
        })
    }

    /// Metadata of one tensor; an error naming the checkpoint if absent.
    pub fn meta(&self, name: &str) -> Result<TensorMeta<'_>> {
        self.get(name)
            .ok_or_else(|| anyhow!("tensor {name:?} not found in {}", self.describe()))
    }

    /// Metadata of every tensor, in name order.
    pub fn metas(&self) -> impl Iterator<Item = TensorMeta<'_>> {
        self.entries.iter().map(|(name, e)| TensorMeta {
            name,
            dtype: e.dtype,
            shape: &e.shape,
            file: &self.files[e.file].path,
        })
    }

    fn entry(&self, name: &str) -> Result<&Entry> {
        self.entries
            .get(name)
            .ok_or_else(|| anyhow!("tensor {name:?} not found in {}", self.describe()))
    }

    /// The raw little-endian bytes of a tensor, read from its file. A file that got shorter, or was
    /// modified, since the store opened it is an error naming the tensor and the file.
    pub fn bytes(&self, name: &str) -> Result<Vec<u8>> {
        let e = self.entry(name)?;
        let f = &self.files[e.file];
        let mut bytes = vec![0u8; (e.end - e.start) as usize];
        if let Err(err) = f.file.read_exact_at(&mut bytes, e.start) {
            let now = f.file.metadata().map(|m| m.len()).unwrap_or(0);
            return Err(anyhow!(err)).with_context(|| {
                format!(
                    "reading tensor {name:?} from {}: expected {} bytes at offset {}, but the file has {now} bytes \
                     now ({} when the step opened it)",
                    f.path.display(),
                    e.end - e.start,
                    e.start,
                    f.len
                )
            });
        }
        f.check_unchanged()
            .with_context(|| format!("reading tensor {name:?}"))?;
        Ok(bytes)
    }

    /// The open file holding a tensor and the absolute offset of its bytes there (for kernel-side
    /// copies, which must check [`TensorStore::check_unchanged`] when done).
    pub fn location(&self, name: &str) -> Result<(&File, u64)> {
        let e = self.entry(name)?;
        Ok((&self.files[e.file].file, e.start))
    }

    /// An error naming the file when any file of the store no longer has the size and modification time
    /// it had when opened.
    pub fn check_unchanged(&self) -> Result<()> {
        self.files.iter().try_for_each(StoredFile::check_unchanged)
    }

    /// Sum of the byte sizes of all tensors.
    pub fn total_bytes(&self) -> u64 {
        self.entries.values().map(|e| e.end - e.start).sum()
    }

    /// Copies a tensor into a candle [`Tensor`] of its stored dtype on `device`.
    pub fn tensor(&self, name: &str, device: &Device) -> Result<Tensor> {
        let meta = self.meta(name)?;
        let dtype = candle_dtype(meta.dtype)
            .with_context(|| format!("tensor {name:?} in {}", meta.file.display()))?;
        Tensor::from_raw_buffer(&self.bytes(name)?, dtype, meta.shape, device)
            .with_context(|| format!("loading tensor {name:?} from {}", meta.file.display()))
    }

    /// Like [`TensorStore::tensor`], checking the shape and converting to `dtype`.
    pub fn tensor_as(
        &self,
        name: &str,
        shape: &[usize],
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        let meta = self.meta(name)?;
        if meta.shape != shape {
            bail!(
                "tensor {name:?} in {} has shape {:?}, expected {:?} from config.json",
                meta.file.display(),
                meta.shape,
                shape
            );
        }
        let t = self.tensor(name, device)?;
        Ok(if t.dtype() == dtype {
            t
        } else {
            t.to_dtype(dtype)?
        })
    }

    /// The file (or the folder and its shard count) for messages.
    pub fn describe(&self) -> String {
        if self.files.len() == 1 {
            self.files[0].path.display().to_string()
        } else {
            format!("{} ({} shards)", self.root.display(), self.files.len())
        }
    }
}

/// The candle dtype for a safetensors dtype (floating-point and common integer types).
pub fn candle_dtype(dtype: Dtype) -> Result<DType> {
    Ok(match dtype {
        Dtype::F32 => DType::F32,
        Dtype::F16 => DType::F16,
        Dtype::BF16 => DType::BF16,
        Dtype::F64 => DType::F64,
        Dtype::U8 => DType::U8,
        Dtype::U32 => DType::U32,
        Dtype::I64 => DType::I64,
        other => bail!("unsupported dtype {other}"),
    })
}

/// The safetensors dtype for a candle dtype.
pub fn safetensors_dtype(dtype: DType) -> Result<Dtype> {
    Ok(match dtype {
        DType::F32 => Dtype::F32,
        DType::F16 => Dtype::F16,
        DType::BF16 => Dtype::BF16,
        DType::F64 => Dtype::F64,
        DType::U8 => Dtype::U8,
        DType::U32 => Dtype::U32,
        DType::I64 => Dtype::I64,
        other => bail!("unsupported dtype {other:?}"),
    })
}

/// Opens `path`, reads and checks its header, and returns its tensors (file index 0).
fn open_checked(path: &Path) -> Result<(StoredFile, BTreeMap<String, Entry>)> {
    let mut file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let meta = file
        .metadata()
        .with_context(|| format!("reading metadata of {}", path.display()))?;
    if !meta.is_file() {
        bail!("{}: not a regular file", path.display());
    }
    let len = meta.len();
    if len < 8 {
        bail!(
            "{}: truncated safetensors file ({len} bytes, too short for the 8-byte header length)",
            path.display()
        );
    }
    let mut first8 = [0u8; 8];
    file.read_exact(&mut first8)
        .with_context(|| format!("reading {}", path.display()))?;
    let n = header_length(path, first8, len)?;
    let mut header = vec![0u8; n as usize];
    file.read_exact(&mut header)
        .with_context(|| format!("reading the header of {}", path.display()))?;
    let parsed = parse_header(path, &header, len)?;
    let entries = parsed
        .tensors
        .into_iter()
        .map(|(name, t)| {
            let entry = Entry {
                file: 0,
                dtype: t.dtype,
                shape: t.shape,
                start: parsed.data_start + t.start,
                end: parsed.data_start + t.end,
            };
            (name, entry)
        })
        .collect();
    let stored = StoredFile {
        path: path.to_path_buf(),
        file,
        len,
        modified: meta.modified().ok(),
    };
    Ok((stored, entries))
}
