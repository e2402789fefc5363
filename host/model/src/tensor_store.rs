//! Read-only access to safetensors checkpoints (one file or a sharded folder) through memory maps.
//!
//! Nothing is copied until a caller asks for a candle [`Tensor`]: [`TensorStore::bytes`] borrows the raw
//! little-endian bytes straight from the map, which is what streaming steps (scale, merge) need.

use anyhow::{anyhow, bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use memmap2::Mmap;
use safetensors::tensor::TensorInfo;
use safetensors::{Dtype, SafeTensorError, SafeTensors};
use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

/// Name of the single-file checkpoint inside a model folder.
pub const SINGLE_FILE: &str = "model.safetensors";
/// Name of the shard index inside a sharded model folder.
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// One memory-mapped safetensors file.
struct MappedFile {
    path: PathBuf,
    map: Mmap,
    /// Offset of the data section (8 + header length).
    data_start: usize,
}

/// Where a tensor lives and what it is.
#[derive(Debug, Clone)]
struct Entry {
    file: usize,
    dtype: Dtype,
    shape: Vec<usize>,
    /// Byte range relative to the file's data section.
    start: usize,
    end: usize,
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

/// A set of memory-mapped safetensors files seen as one name → tensor map.
pub struct TensorStore {
    root: PathBuf,
    files: Vec<MappedFile>,
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
        let (file, infos) = map_file(path)?;
        let mut entries = BTreeMap::new();
        for (name, info) in infos {
            entries.insert(name, entry(0, &info));
        }
        Ok(TensorStore {
            root: path.to_path_buf(),
            files: vec![file],
            entries,
        })
    }

    /// Opens a sharded checkpoint from its `model.safetensors.index.json`: every shard named in the
    /// `weight_map` is mapped, and every mapped name must be in the shard that the index names.
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
        let mut per_shard: Vec<BTreeMap<String, TensorInfo>> = Vec::new();
        for shard in &shard_names {
            let (file, infos) = map_file(&dir.join(shard))?;
            files.push(file);
            per_shard.push(infos.into_iter().collect());
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
            entries.insert(name.clone(), entry(i, info));
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

    /// Paths of the mapped files, in shard order.
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

    /// The raw little-endian bytes of a tensor, borrowed from the memory map (no copy).
    pub fn bytes(&self, name: &str) -> Result<&[u8]> {
        let e = self
            .entries
            .get(name)
            .ok_or_else(|| anyhow!("tensor {name:?} not found in {}", self.describe()))?;
        let f = &self.files[e.file];
        Ok(&f.map[f.data_start + e.start..f.data_start + e.end])
    }

    /// Sum of the byte sizes of all tensors.
    pub fn total_bytes(&self) -> u64 {
        self.entries
            .values()
            .map(|e| (e.end - e.start) as u64)
            .sum()
    }

    /// Copies a tensor into a candle [`Tensor`] of its stored dtype on `device`.
    pub fn tensor(&self, name: &str, device: &Device) -> Result<Tensor> {
        let meta = self.meta(name)?;
        let dtype = candle_dtype(meta.dtype)
            .with_context(|| format!("tensor {name:?} in {}", meta.file.display()))?;
        Tensor::from_raw_buffer(self.bytes(name)?, dtype, meta.shape, device)
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

    fn describe(&self) -> String {
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

fn entry(file: usize, info: &TensorInfo) -> Entry {
    Entry {
        file,
        dtype: info.dtype,
        shape: info.shape.clone(),
        start: info.data_offsets.0,
        end: info.data_offsets.1,
    }
}

fn map_file(path: &Path) -> Result<(MappedFile, Vec<(String, TensorInfo)>)> {
    let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let len = file
        .metadata()
        .with_context(|| format!("reading metadata of {}", path.display()))?
        .len();
    if len < 8 {
        bail!(
            "{}: truncated safetensors file ({len} bytes, too short for the 8-byte header length)",
            path.display()
        );
    }
    // SAFETY: the map is read-only; checkpoints are not modified while a step reads them.
    let map = unsafe { Mmap::map(&file) }
        .with_context(|| format!("memory-mapping {}", path.display()))?;
    let (header_len, metadata) =
        SafeTensors::read_metadata(&map).map_err(|e| header_error(path, &map, e))?;
    let mut infos: Vec<(String, TensorInfo)> = metadata
        .tensors()
        .into_iter()
        .map(|(name, info)| (name, info.clone()))
        .collect();
    infos.sort_by(|a, b| a.0.cmp(&b.0));
    Ok((
        MappedFile {
            path: path.to_path_buf(),
            map,
            data_start: 8 + header_len,
        },
        infos,
    ))
}

fn header_error(path: &Path, map: &[u8], e: SafeTensorError) -> anyhow::Error {
    let declared = u64::from_le_bytes(map[..8].try_into().expect("8 bytes"));
    let what = match e {
        SafeTensorError::InvalidHeaderLength | SafeTensorError::HeaderTooLarge => format!(
            "corrupt or truncated header: it declares {declared} header bytes but the file has {} bytes",
            map.len()
        ),
        SafeTensorError::MetadataIncompleteBuffer => {
            "truncated or padded data: the tensors in the header do not end where the file ends".to_string()
        }
        SafeTensorError::InvalidOffset(name) => {
            format!("corrupt header: tensor {name:?} has offsets that do not follow the previous tensor")
        }
        SafeTensorError::TensorInvalidInfo => {
            "corrupt header: a tensor's byte range does not match its dtype and shape".to_string()
        }
        other => format!("corrupt header: {other}"),
    };
    anyhow!("{}: {what}", path.display())
}
