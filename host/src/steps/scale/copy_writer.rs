//! Canonical safetensors files (the layout of [`crate::model::checkpoint_writer`], same header, same order,
//! same shard plan) whose tensors are either copied from a byte range of another file, kernel-side with
//! `copy_file_range` (no pass through user memory: as fast as `cp`), or given as bytes (transformed tensors).
//!
//! Scaling is mostly copying; the generic writer takes every tensor as bytes, which costs a page fault and
//! a user-memory copy per page. The tests check this writer against the generic one byte for byte.

use crate::model::checkpoint_writer::{
    ordered_with_header, write_sharded, write_through_temp, ShardOptions, TensorSpec, Writeback,
    WrittenCheckpoint,
};
use anyhow::{bail, Context, Result};
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;

/// Where the bytes of one tensor come from.
pub enum TensorData<'a> {
    /// `len` bytes of `file` starting at `offset`.
    FileRange {
        /// The source file.
        file: &'a File,
        /// Absolute byte offset in it.
        offset: u64,
    },
    /// The bytes themselves.
    Bytes(Vec<u8>),
}

/// Writes the checkpoint of `specs` into the existing folder `dir`, like
/// [`crate::model::checkpoint_writer::write_checkpoint`]; `produce` is called once per tensor.
pub fn write_checkpoint_copying<'a, F>(
    dir: &Path,
    specs: &[TensorSpec],
    opts: ShardOptions,
    mut produce: F,
) -> Result<WrittenCheckpoint>
where
    F: FnMut(&TensorSpec) -> Result<TensorData<'a>>,
{
    write_sharded(dir, specs, opts, |path, shard| {
        write_file(path, shard, opts.durable, &mut produce)
    })
}

fn write_file<'a, F>(
    path: &Path,
    specs: &[TensorSpec],
    durable: bool,
    produce: &mut F,
) -> Result<u64>
where
    F: FnMut(&TensorSpec) -> Result<TensorData<'a>>,
{
    let (ordered, header) = ordered_with_header(path, specs)?;
    write_through_temp(path, |tmp| {
        let file = File::create(tmp).with_context(|| format!("creating {}", tmp.display()))?;
        let mut out = BufWriter::with_capacity(1 << 20, file);
        out.write_all(&(header.len() as u64).to_le_bytes())?;
        out.write_all(&header)?;
        let mut written = 0u64;
        let mut writeback = Writeback::new(durable);
        for spec in &ordered {
            writeback.start(&mut out)?;
            let len = spec.byte_len();
            match produce(spec).with_context(|| format!("producing tensor {:?}", spec.name))? {
                TensorData::Bytes(bytes) => {
                    if bytes.len() != len {
                        bail!(
                            "tensor {:?}: got {} bytes, {} {:?} needs {len}",
                            spec.name,
                            bytes.len(),
                            spec.dtype,
                            spec.shape
                        );
                    }
                    out.write_all(&bytes)?;
                }
                TensorData::FileRange { file, offset } => {
                    out.flush()?;
                    copy_range(file, offset, out.get_mut(), len as u64)
                        .with_context(|| format!("copying tensor {:?}", spec.name))?;
                }
            }
            written += len as u64;
        }
        let file = out.into_inner().map_err(|e| e.into_error())?;
        if durable {
            file.sync_all()?;
        }
        Ok(written)
    })
}

/// Appends `len` bytes of `from` starting at `offset` to `to` (at its current position).
fn copy_range(from: &File, offset: u64, to: &mut File, len: u64) -> Result<()> {
    let mut done = 0u64;
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        while done < len {
            let mut off_in = (offset + done) as libc::loff_t;
            let chunk = (len - done).min(1 << 30) as usize;
            // SAFETY: valid open descriptors; `off_in` is a live local; a null `off_out` means "use and
            // advance the output file's position".
            let n = unsafe {
                libc::copy_file_range(
                    from.as_raw_fd(),
                    &mut off_in,
                    to.as_raw_fd(),
                    std::ptr::null_mut(),
                    chunk,
                    0,
                )
            };
            if n > 0 {
                done += n as u64;
                continue;
            }
            let err = std::io::Error::last_os_error();
            if n == 0 {
                bail!("source file ended {} bytes early", len - done);
            }
            match err.raw_os_error() {
                Some(libc::EINTR) => continue,
                // Not supported between these files (other file system, old kernel): copy through memory.
                Some(libc::EXDEV | libc::ENOSYS | libc::EOPNOTSUPP | libc::EINVAL) => break,
                _ => return Err(err.into()),
            }
        }
    }
    if done < len {
        use std::os::unix::fs::FileExt;
        let mut buf = vec![0u8; (len - done).min(8 << 20) as usize];
        while done < len {
            let n = buf.len().min((len - done) as usize);
            from.read_exact_at(&mut buf[..n], offset + done)?;
            to.write_all(&buf[..n])?;
            done += n as u64;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::checkpoint_writer::write_checkpoint;
    use safetensors::Dtype;
    use std::borrow::Cow;

    #[test]
    fn copied_and_given_tensors_make_the_same_files_as_the_generic_writer() {
        let dir = tempfile::tempdir().unwrap();
        // A source file holding arbitrary bytes at unaligned offsets.
        let source: Vec<u8> = (0..10_000u32).map(|i| (i * 7 % 251) as u8).collect();
        std::fs::write(dir.path().join("src.bin"), &source).unwrap();
        let src = File::open(dir.path().join("src.bin")).unwrap();
        let specs = vec![
            TensorSpec::new("b.weight", Dtype::BF16, vec![3, 5]),
            TensorSpec::new("a.weight", Dtype::F32, vec![7, 11]),
            TensorSpec::new("layers.10.w", Dtype::BF16, vec![100]),
            TensorSpec::new("layers.2.w", Dtype::BF16, vec![1000]),
        ];
        let offset_of = |name: &str| -> u64 { name.len() as u64 * 131 + 3 };
        for (shard, durable) in [(None, true), (Some(2_100), true), (Some(2_100), false)] {
            let (a, b) = (
                dir.path().join(format!("a{shard:?}{durable}")),
                dir.path().join(format!("b{shard:?}{durable}")),
            );
            std::fs::create_dir(&a).unwrap();
            std::fs::create_dir(&b).unwrap();
            let opts = ShardOptions {
                max_shard_bytes: shard,
                durable,
            };
            write_checkpoint(&a, &specs, opts, |s| {
                let o = offset_of(&s.name) as usize;
                Ok(Cow::Borrowed(&source[o..o + s.byte_len()]))
            })
            .unwrap();
            write_checkpoint_copying(&b, &specs, opts, |s| {
                let o = offset_of(&s.name);
                Ok(if s.dtype == Dtype::F32 {
                    TensorData::Bytes(source[o as usize..o as usize + s.byte_len()].to_vec())
                } else {
                    TensorData::FileRange {
                        file: &src,
                        offset: o,
                    }
                })
            })
            .unwrap();
            let mut names: Vec<_> = std::fs::read_dir(&a)
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .collect();
            names.sort();
            assert_eq!(
                names.len(),
                if shard.is_some() { 3 } else { 1 },
                "{names:?}"
            );
            for n in names {
                assert_eq!(
                    std::fs::read(a.join(&n)).unwrap(),
                    std::fs::read(b.join(&n)).unwrap(),
                    "{n:?}"
                );
            }
        }
    }
}
