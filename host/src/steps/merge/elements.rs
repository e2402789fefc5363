//! Raw tensor bytes ↔ f32: merges read any float input (f32, bf16, f16) into f32 chunks, compute in f32,
//! and round once to the output dtype (round-to-nearest-even, like `torch.Tensor.to`).

use anyhow::{bail, Result};
use half::{bf16, f16};
use safetensors::Dtype;

/// One input tensor: its little-endian bytes (usually borrowed from a memory map) and element type.
#[derive(Debug, Clone, Copy)]
pub struct Source<'a> {
    /// Raw little-endian element bytes.
    pub bytes: &'a [u8],
    /// Element type.
    pub dtype: Dtype,
}

/// Whether merges compute on this dtype (others are copied from one model).
pub fn is_float(dtype: Dtype) -> bool {
    matches!(dtype, Dtype::F32 | Dtype::BF16 | Dtype::F16)
}

/// Bytes per element of a float dtype merges support.
pub fn element_size(dtype: Dtype) -> Result<usize> {
    Ok(match dtype {
        Dtype::F32 => 4,
        Dtype::BF16 | Dtype::F16 => 2,
        other => bail!("dtype {other:?} cannot be merged (supported: F32, BF16, F16)"),
    })
}

impl Source<'_> {
    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.bytes.len() * 8 / self.dtype.bitsize()
    }

    /// Decodes elements `start .. start + out.len()` into `out` as f32 (exact for every input type).
    pub fn decode(&self, start: usize, out: &mut [f32]) {
        match self.dtype {
            Dtype::F32 => {
                let bytes = &self.bytes[start * 4..(start + out.len()) * 4];
                for (o, b) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                    *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                }
            }
            Dtype::BF16 => {
                let bytes = &self.bytes[start * 2..(start + out.len()) * 2];
                for (o, b) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                    *o = f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16);
                }
            }
            Dtype::F16 => {
                let bytes = &self.bytes[start * 2..(start + out.len()) * 2];
                for (o, b) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                    *o = f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32();
                }
            }
            other => unreachable!("decode of {other:?} (checked by element_size)"),
        }
    }
}

/// Rounds `values` to `dtype` and writes their little-endian bytes into `out` (`values.len()` elements).
pub fn encode(values: &[f32], dtype: Dtype, out: &mut [u8]) {
    match dtype {
        Dtype::F32 => {
            for (v, o) in values.iter().zip(out.chunks_exact_mut(4)) {
                o.copy_from_slice(&v.to_le_bytes());
            }
        }
        Dtype::BF16 => {
            for (v, o) in values.iter().zip(out.chunks_exact_mut(2)) {
                o.copy_from_slice(&bf16::from_f32(*v).to_bits().to_le_bytes());
            }
        }
        Dtype::F16 => {
            for (v, o) in values.iter().zip(out.chunks_exact_mut(2)) {
                o.copy_from_slice(&f16::from_f32(*v).to_bits().to_le_bytes());
            }
        }
        other => unreachable!("encode to {other:?} (checked by element_size)"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_rounds_to_nearest_even() {
        let values = [1.0f32, -2.5, 3.140625, 0.0, -0.0];
        for dtype in [Dtype::F32, Dtype::BF16, Dtype::F16] {
            let mut bytes = vec![0u8; values.len() * element_size(dtype).unwrap()];
            encode(&values, dtype, &mut bytes);
            let mut back = vec![0f32; values.len()];
            Source {
                bytes: &bytes,
                dtype,
            }
            .decode(0, &mut back);
            assert_eq!(back.map_bits(), values.map_bits(), "{dtype:?}");
        }
        // 1 + 2^-8 is halfway between two bf16 values: ties to even (1.0); 1 + 3·2^-9 rounds up.
        let mut bytes = [0u8; 4];
        encode(
            &[1.0 + 1.0 / 256.0, 1.0 + 3.0 / 512.0],
            Dtype::BF16,
            &mut bytes,
        );
        let mut back = [0f32; 2];
        Source {
            bytes: &bytes,
            dtype: Dtype::BF16,
        }
        .decode(0, &mut back);
        assert_eq!(back, [1.0, 1.0 + 1.0 / 128.0]);
    }

    trait Bits {
        fn map_bits(&self) -> Vec<u32>;
    }
    impl Bits for [f32] {
        fn map_bits(&self) -> Vec<u32> {
            self.iter().map(|v| v.to_bits()).collect()
        }
    }
    impl<const N: usize> Bits for [f32; N] {
        fn map_bits(&self) -> Vec<u32> {
            self.iter().map(|v| v.to_bits()).collect()
        }
    }
}
