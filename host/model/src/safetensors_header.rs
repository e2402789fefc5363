//! Reading and checking the header of a safetensors file without trusting it: every error names the file
//! and, where there is one, the tensor, with the numbers that disagree.
//!
//! A safetensors file is an 8-byte little-endian header length `n`, `n` bytes of JSON (`{name: {dtype,
//! shape, data_offsets: [start, end]}, "__metadata__": {...}}`), then the data section, where each tensor's
//! bytes lie at `[start, end)` and the tensors tile the section exactly.

use anyhow::{anyhow, bail, Context, Result};
use safetensors::Dtype;
use std::collections::BTreeMap;
use std::path::Path;

/// Headers larger than this are refused (safetensors' own limit).
pub const MAX_HEADER_BYTES: u64 = 100 << 20;

/// One tensor as the header describes it, its range checked against its dtype and shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeaderTensor {
    /// Element type.
    pub dtype: Dtype,
    /// Shape.
    pub shape: Vec<usize>,
    /// Byte range within the data section.
    pub start: u64,
    /// End of that range (exclusive).
    pub end: u64,
}

/// A checked header: where the data section starts and every tensor, by name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// Offset of the data section in the file (8 + header length).
    pub data_start: u64,
    /// Tensors by name.
    pub tensors: BTreeMap<String, HeaderTensor>,
    /// The `__metadata__` strings.
    pub metadata: BTreeMap<String, String>,
}

/// The header length a file declares in its first 8 bytes, checked against the file's length.
pub fn header_length(path: &Path, first8: [u8; 8], file_len: u64) -> Result<u64> {
    let declared = u64::from_le_bytes(first8);
    if declared > MAX_HEADER_BYTES {
        bail!(
            "{}: corrupt header: it declares {declared} header bytes (more than the {} MiB safetensors allows)",
            path.display(),
            MAX_HEADER_BYTES >> 20
        );
    }
    if declared > file_len.saturating_sub(8) {
        bail!(
            "{}: corrupt or truncated header: it declares {declared} header bytes but the file has {file_len} bytes",
            path.display()
        );
    }
    Ok(declared)
}

/// Parses the JSON `header` of `path` (whose whole length is `file_len`) and checks every tensor: a known
/// dtype, a byte range that holds exactly dtype × shape, ranges that tile the data section in order, and a
/// data section that ends where the file ends.
pub fn parse_header(path: &Path, header: &[u8], file_len: u64) -> Result<Header> {
    let at = || path.display().to_string();
    let text = std::str::from_utf8(header)
        .map_err(|e| anyhow!("{}: corrupt header: not UTF-8 ({e})", at()))?;
    let json: serde_json::Value = serde_json::from_str(text)
        .map_err(|e| anyhow!("{}: corrupt header: not JSON ({e})", at()))?;
    let object = json
        .as_object()
        .ok_or_else(|| anyhow!("{}: corrupt header: not a JSON object", at()))?;
    let data_start = 8 + header.len() as u64;
    let mut tensors = BTreeMap::new();
    let mut metadata = BTreeMap::new();
    for (name, value) in object {
        if name == "__metadata__" {
            let map = value.as_object().ok_or_else(|| {
                anyhow!(
                    "{}: corrupt header: __metadata__ is not an object of strings",
                    at()
                )
            })?;
            for (k, v) in map {
                let v = v.as_str().ok_or_else(|| {
                    anyhow!(
                        "{}: corrupt header: __metadata__[{k:?}] is not a string",
                        at()
                    )
                })?;
                metadata.insert(k.clone(), v.to_string());
            }
            continue;
        }
        let tensor = parse_tensor(value)
            .with_context(|| format!("{}: corrupt header: tensor {name:?}", path.display()))?;
        tensors.insert(name.clone(), tensor);
    }
    check_layout(path, &tensors, data_start, file_len)?;
    Ok(Header {
        data_start,
        tensors,
        metadata,
    })
}

fn parse_tensor(value: &serde_json::Value) -> Result<HeaderTensor> {
    let object = value
        .as_object()
        .ok_or_else(|| anyhow!("is not an object"))?;
    let dtype_name = object
        .get("dtype")
        .and_then(serde_json::Value::as_str)
        .ok_or_else(|| anyhow!("has no string `dtype`"))?;
    let dtype: Dtype = serde_json::from_value(serde_json::Value::String(dtype_name.into()))
        .map_err(|_| anyhow!("has unknown dtype {dtype_name:?}"))?;
    let shape = object
        .get("shape")
        .and_then(serde_json::Value::as_array)
        .ok_or_else(|| anyhow!("has no `shape` list"))?
        .iter()
        .map(|d| {
            d.as_u64()
                .and_then(|d| usize::try_from(d).ok())
                .ok_or_else(|| anyhow!("has a shape entry {d} that is not a size"))
        })
        .collect::<Result<Vec<usize>>>()?;
    let offsets = object
        .get("data_offsets")
        .and_then(serde_json::Value::as_array)
        .filter(|o| o.len() == 2)
        .ok_or_else(|| anyhow!("has no `data_offsets` pair"))?;
    let offset = |i: usize| {
        offsets[i]
            .as_u64()
            .ok_or_else(|| anyhow!("has a data offset {} that is not a size", offsets[i]))
    };
    let (start, end) = (offset(0)?, offset(1)?);
    if end < start {
        bail!("has data_offsets [{start}, {end}] that end before they start");
    }
    let bits = shape
        .iter()
        .try_fold(1u64, |n, &d| n.checked_mul(d as u64))
        .and_then(|n| n.checked_mul(dtype.bitsize() as u64))
        .ok_or_else(|| anyhow!("has a shape {shape:?} too large to address"))?;
    if bits % 8 != 0 {
        bail!("has {bits} bits of {dtype} {shape:?}, not a whole number of bytes");
    }
    let needed = bits / 8;
    if end - start != needed {
        bail!(
            "holds {} bytes (data_offsets [{start}, {end}]) but {dtype} {shape:?} needs {needed}",
            end - start
        );
    }
    Ok(HeaderTensor {
        dtype,
        shape,
        start,
        end,
    })
}

/// The tensors must tile `[0, data length)` in order of their offsets, and the data must end at the end of
/// the file.
fn check_layout(
    path: &Path,
    tensors: &BTreeMap<String, HeaderTensor>,
    data_start: u64,
    file_len: u64,
) -> Result<()> {
    let mut by_offset: Vec<(&String, &HeaderTensor)> = tensors.iter().collect();
    by_offset.sort_by_key(|(name, t)| (t.start, t.end, name.as_str()));
    let mut next = 0u64;
    for (name, t) in &by_offset {
        if t.start != next {
            bail!(
                "{}: corrupt header: tensor {name:?} starts at data byte {} but the previous tensor ends at {next} \
                 (tensors must follow each other without gaps or overlaps)",
                path.display(),
                t.start
            );
        }
        next = t.end;
    }
    let available = file_len.saturating_sub(data_start);
    if next > available {
        let (name, t) = by_offset
            .iter()
            .find(|(_, t)| t.end > available)
            .expect("some tensor ends past the data");
        bail!(
            "{}: truncated tensor data: tensor {name:?} needs data bytes [{}, {}) but the file holds only {available} \
             data bytes ({} bytes of tensor data expected, {file_len} bytes in the file)",
            path.display(),
            t.start,
            t.end,
            next
        );
    }
    if next < available {
        bail!(
            "{}: {} bytes after the last tensor: the header's tensors hold {next} data bytes but the file has \
             {available} (a damaged or padded file)",
            path.display(),
            available - next
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(header: &str, data: usize) -> (Vec<u8>, u64) {
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend(header.as_bytes());
        bytes.extend(std::iter::repeat_n(0u8, data));
        let len = bytes.len() as u64;
        (bytes, len)
    }

    fn parse(header: &str, data: usize) -> Result<Header> {
        let (bytes, len) = file(header, data);
        let path = Path::new("m.safetensors");
        let n = header_length(path, bytes[..8].try_into().unwrap(), len)?;
        parse_header(path, &bytes[8..8 + n as usize], len)
    }

    const TWO: &str = r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"BF16","shape":[3],"data_offsets":[8,14]}}"#;

    #[test]
    fn a_well_formed_header_parses() {
        let h = parse(TWO, 14).unwrap();
        assert_eq!(h.tensors.len(), 2);
        assert_eq!(h.tensors["b"].start, 8);
        assert_eq!(h.data_start, 8 + TWO.len() as u64);
    }

    #[test]
    fn errors_name_the_tensor_and_the_numbers() {
        let err = |header: &str, data: usize| format!("{:#}", parse(header, data).unwrap_err());
        let truncated = err(TWO, 10);
        assert!(
            truncated.contains("truncated tensor data: tensor \"b\""),
            "{truncated}"
        );
        assert!(truncated.contains("[8, 14)"), "{truncated}");
        assert!(truncated.contains("only 10 data bytes"), "{truncated}");
        let padded = err(TWO, 20);
        assert!(padded.contains("6 bytes after the last tensor"), "{padded}");
        let wrong = err(
            r#"{"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}"#,
            8,
        );
        assert!(wrong.contains("tensor \"a\""), "{wrong}");
        assert!(
            wrong.contains("holds 8 bytes") && wrong.contains("needs 12"),
            "{wrong}"
        );
        let gap = err(
            r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}"#,
            8,
        );
        assert!(gap.contains("tensor \"a\" starts at data byte 4"), "{gap}");
        let dtype = err(
            r#"{"a":{"dtype":"F33","shape":[1],"data_offsets":[0,4]}}"#,
            4,
        );
        assert!(dtype.contains("unknown dtype \"F33\""), "{dtype}");
        let huge = err(
            r#"{"a":{"dtype":"F32","shape":[18446744073709551615,4],"data_offsets":[0,4]}}"#,
            4,
        );
        assert!(huge.contains("too large"), "{huge}");
    }

    #[test]
    fn a_header_length_past_the_file_is_refused_before_reading() {
        let path = Path::new("m.safetensors");
        let err = header_length(path, 1000u64.to_le_bytes(), 100).unwrap_err();
        assert!(err
            .to_string()
            .contains("declares 1000 header bytes but the file has 100"));
        assert!(header_length(path, u64::MAX.to_le_bytes(), 100).is_err());
    }
}
