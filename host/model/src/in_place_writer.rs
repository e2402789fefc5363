//! Canonical safetensors files (same header, order and shard plan as [`super::checkpoint_writer`]) whose
//! tensors are written in place at their final offsets, by any number of threads at once.
//!
//! A merge computes a tensor in chunks on every core; with this writer each chunk goes to the file the
//! moment it is computed, while it is still in the CPU cache, instead of being collected into a
//! tensor-sized buffer in memory and copied out again by a writer thread (which costs a round trip
//! through main memory per byte and a third thread competing for the cores).

use super::checkpoint_writer::{
    ordered_with_header, write_sharded, write_through_temp, ShardOptions, TensorSpec, Writeback,
    WrittenCheckpoint,
};
use anyhow::{bail, Context, Result};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

/// The place of one tensor's data in the file being written. Shared between threads: each writes its own
/// byte ranges.
pub struct TensorSlot<'a> {
    file: &'a File,
    name: &'a str,
    start: u64,
    len: usize,
    written: AtomicU64,
}

impl TensorSlot<'_> {
    /// Writes `bytes` at byte `offset` of the tensor's data. Callers write disjoint ranges that together
    /// cover the tensor exactly once (the writer checks the byte count).
    pub fn write_at(&self, offset: usize, bytes: &[u8]) -> Result<()> {
        if offset + bytes.len() > self.len {
            bail!(
                "tensor {:?}: {} bytes at offset {offset} run past its {} bytes",
                self.name,
                bytes.len(),
                self.len
            );
        }
        self.file
            .write_all_at(bytes, self.start + offset as u64)
            .with_context(|| format!("writing tensor {:?}", self.name))?;
        self.written
            .fetch_add(bytes.len() as u64, Ordering::Relaxed);
        Ok(())
    }
}

/// Writes the tensors of a checkpoint into the existing folder `dir`, like
/// [`super::checkpoint_writer::write_checkpoint`] (same files, byte for byte), but `fill(spec, slot)` writes
/// each tensor's bytes into its `slot` itself, from as many threads as it likes. `fill` is called once per
/// tensor, file by file, in each file's canonical order.
pub fn write_checkpoint_in_place(
    dir: &Path,
    specs: &[TensorSpec],
    opts: ShardOptions,
    fill: &mut dyn FnMut(&TensorSpec, &TensorSlot) -> Result<()>,
) -> Result<WrittenCheckpoint> {
    write_sharded(dir, specs, opts, |path, shard| {
        write_file(path, shard, opts.durable, fill)
    })
}

fn write_file(
    path: &Path,
    specs: &[TensorSpec],
    durable: bool,
    fill: &mut dyn FnMut(&TensorSpec, &TensorSlot) -> Result<()>,
) -> Result<u64> {
    let (ordered, header) = ordered_with_header(path, specs)?;
    write_through_temp(path, |tmp| {
        let file = File::create(tmp).with_context(|| format!("creating {}", tmp.display()))?;
        let data_start = 8 + header.len() as u64;
        let data_len: u64 = ordered.iter().map(|s| s.byte_len() as u64).sum();
        file.set_len(data_start + data_len)?;
        file.write_all_at(&(header.len() as u64).to_le_bytes(), 0)?;
        file.write_all_at(&header, 8)?;
        let mut writeback = Writeback::new(durable);
        let mut offset = data_start;
        for spec in &ordered {
            let slot = TensorSlot {
                file: &file,
                name: &spec.name,
                start: offset,
                len: spec.byte_len(),
                written: AtomicU64::new(0),
            };
            fill(spec, &slot).with_context(|| format!("producing tensor {:?}", spec.name))?;
            let written = slot.written.into_inner();
            if written != spec.byte_len() as u64 {
                bail!(
                    "tensor {:?}: {written} bytes were written, {} {:?} needs {}",
                    spec.name,
                    spec.dtype,
                    spec.shape,
                    spec.byte_len()
                );
            }
            offset += written;
            writeback.start_to(&file, offset);
        }
        if durable {
            file.sync_all()?;
        }
        Ok(data_len)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint_writer::write_checkpoint;
    use rayon::prelude::*;
    use safetensors::Dtype;
    use std::borrow::Cow;

    fn bytes_of(spec: &TensorSpec) -> Vec<u8> {
        let seed = spec.name.len() as u32;
        (0..spec.byte_len() as u32)
            .map(|i| (i.wrapping_mul(31) ^ seed) as u8)
            .collect()
    }

    #[test]
    fn chunks_written_out_of_order_by_many_threads_make_the_generic_writers_files() {
        let dir = tempfile::tempdir().unwrap();
        let specs = vec![
            TensorSpec::new("b.weight", Dtype::BF16, vec![3, 5]),
            TensorSpec::new("a.weight", Dtype::F32, vec![7, 11]),
            TensorSpec::new("layers.10.w", Dtype::BF16, vec![100]),
            TensorSpec::new("layers.2.w", Dtype::BF16, vec![1000]),
            TensorSpec::new("empty", Dtype::F32, vec![0]),
        ];
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
            let written_a =
                write_checkpoint(&a, &specs, opts, |s| Ok(Cow::Owned(bytes_of(s)))).unwrap();
            let written_b = write_checkpoint_in_place(&b, &specs, opts, &mut |s, slot| {
                let data = bytes_of(s);
                let chunks: Vec<(usize, &[u8])> = data.chunks(13).enumerate().collect();
                // Last chunk first, in parallel.
                chunks
                    .par_iter()
                    .rev()
                    .try_for_each(|(i, c)| slot.write_at(i * 13, c))
            })
            .unwrap();
            assert_eq!(written_a, written_b);
            for name in &written_a.files {
                assert_eq!(
                    std::fs::read(a.join(name)).unwrap(),
                    std::fs::read(b.join(name)).unwrap(),
                    "{name}"
                );
            }
            if shard.is_some() {
                assert_eq!(
                    std::fs::read(a.join("model.safetensors.index.json")).unwrap(),
                    std::fs::read(b.join("model.safetensors.index.json")).unwrap()
                );
            }
        }
    }

    #[test]
    fn a_tensor_left_short_or_overrun_fails_and_leaves_no_file() {
        let dir = tempfile::tempdir().unwrap();
        let specs = vec![TensorSpec::new("w", Dtype::F32, vec![4])];
        let err = write_checkpoint_in_place(
            dir.path(),
            &specs,
            ShardOptions::default(),
            &mut |_, slot| slot.write_at(0, &[0u8; 8]),
        )
        .unwrap_err();
        assert!(
            format!("{err:#}").contains("8 bytes were written"),
            "{err:#}"
        );
        let err = write_checkpoint_in_place(
            dir.path(),
            &specs,
            ShardOptions::default(),
            &mut |_, slot| slot.write_at(12, &[0u8; 8]),
        )
        .unwrap_err();
        assert!(
            format!("{err:#}").contains("run past its 16 bytes"),
            "{err:#}"
        );
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}
