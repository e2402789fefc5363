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
                if let Some(halves) = as_u16(bytes) {
                    // Aligned little-endian fast path (vectorises).
                    with_wide_vectors!(decode_bf16(halves: &[u16], out: &mut [f32]));
                    return;
                }
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

impl<'a> Source<'a> {
    /// Elements `start .. start + len` as bf16 bit patterns, when the input is BF16 and suitably aligned on
    /// a little-endian machine: the fused kernels then read it without decoding into a buffer first.
    pub fn bf16_bits(&self, start: usize, len: usize) -> Option<&'a [u16]> {
        if self.dtype != Dtype::BF16 {
            return None;
        }
        as_u16(&self.bytes[start * 2..(start + len) * 2])
    }
}

/// `bytes` as bf16 bit patterns to write, when aligned on a little-endian machine (see [`Source::bf16_bits`]).
pub fn bf16_bits_mut(bytes: &mut [u8]) -> Option<&mut [u16]> {
    as_u16_mut(bytes)
}

/// bf16 bits → f32 (exact).
#[inline(always)]
pub fn bf16_to_f32(h: u16) -> f32 {
    f32::from_bits((h as u32) << 16)
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
            if let Some(halves) = as_u16_mut(out) {
                // Aligned little-endian fast path: branch-free round-to-nearest-even (vectorises).
                with_wide_vectors!(encode_bf16(values: &[f32], halves: &mut [u16]));
                return;
            }
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

/// Calls the `#[inline(always)]` function `f(args)` compiled for AVX2 when the CPU has it (twice the vector
/// width of the x86-64 baseline), else as is. Same operations, same results: only the instruction
/// encoding differs (Rust never fuses or reorders float operations on its own).
macro_rules! with_wide_vectors {
    ($f:ident($($arg:ident: $ty:ty),*) $(-> $ret:ty)?) => {{
        #[cfg(target_arch = "x86_64")]
        {
            // FMA lets `mul_add` be one instruction (without it, a correct but slow library call); Rust
            // never fuses a separate multiply and add on its own, so other kernels compute the same.
            #[target_feature(enable = "avx2,fma")]
            unsafe fn wide($($arg: $ty),*) $(-> $ret)? { $f($($arg),*) }
            if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
                // SAFETY: the CPU supports AVX2 and FMA (checked just above).
                unsafe { wide($($arg),*) }
            } else {
                $f($($arg),*)
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            $f($($arg),*)
        }
    }};
}
pub(crate) use with_wide_vectors;

/// bf16 bits → f32 (exact).
#[inline(always)]
fn decode_bf16(halves: &[u16], out: &mut [f32]) {
    // One 64-byte cache line of input per block, each block asking for the line PREFETCH_AHEAD bytes on.
    const LINE: usize = 32;
    let len = out.len().min(halves.len());
    let (halves, out) = (&halves[..len], &mut out[..len]);
    for (k, (o, h)) in out
        .chunks_exact_mut(LINE)
        .zip(halves.chunks_exact(LINE))
        .enumerate()
    {
        prefetch(
            halves
                .as_ptr()
                .wrapping_add(k * LINE + PREFETCH_AHEAD / 2)
                .cast(),
        );
        for (o, h) in o.iter_mut().zip(h) {
            *o = f32::from_bits((*h as u32) << 16);
        }
    }
    let tail = len / LINE * LINE;
    for (o, h) in out[tail..].iter_mut().zip(&halves[tail..]) {
        *o = f32::from_bits((*h as u32) << 16);
    }
}

/// How far ahead (bytes) streaming reads ask for input: memory-mapped inputs live in scattered 4 KiB pages,
/// and the CPU's own prefetcher stops at every page boundary.
pub(crate) const PREFETCH_AHEAD: usize = 8192;

/// Hints the CPU to start loading the cache line at `p` (any address: a prefetch never faults).
#[inline(always)]
pub(crate) fn prefetch(p: *const u8) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: prefetch instructions have no architectural effect and never fault, for any address.
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(p.cast());
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

/// f32 → bf16 bits (see [`bf16_bits`]).
#[inline(always)]
fn encode_bf16(values: &[f32], halves: &mut [u16]) {
    for (v, h) in values.iter().zip(halves) {
        *h = bf16_bits(*v);
    }
}

/// f32 → bf16 bits, round to nearest even; NaN stays NaN (quiet), like `half::bf16::from_f32`.
#[inline(always)]
pub fn bf16_bits(v: f32) -> u16 {
    let bits = v.to_bits();
    let rounded = (bits.wrapping_add(0x7FFF + ((bits >> 16) & 1)) >> 16) as u16;
    let nan = ((bits >> 16) as u16) | 0x0040;
    if v.is_nan() {
        nan
    } else {
        rounded
    }
}

/// `bytes` as native u16s when the platform is little-endian and the slice is 2-byte aligned.
fn as_u16(bytes: &[u8]) -> Option<&[u16]> {
    if cfg!(target_endian = "big") {
        return None;
    }
    // SAFETY: every bit pattern is a valid u16; align_to only returns a correctly aligned middle part.
    let (head, mid, tail) = unsafe { bytes.align_to::<u16>() };
    (head.is_empty() && tail.is_empty()).then_some(mid)
}

/// Mutable form of [`as_u16`].
fn as_u16_mut(bytes: &mut [u8]) -> Option<&mut [u16]> {
    if cfg!(target_endian = "big") {
        return None;
    }
    // SAFETY: as in `as_u16`; writing any u16 leaves valid bytes.
    let (head, mid, tail) = unsafe { bytes.align_to_mut::<u16>() };
    (head.is_empty() && tail.is_empty()).then_some(mid)
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

    #[test]
    fn fast_bf16_rounding_matches_half() {
        let mut x = 0x1234_5678u32;
        for _ in 0..1_000_000 {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            let v = f32::from_bits(x);
            assert_eq!(bf16_bits(v), bf16::from_f32(v).to_bits(), "{v:e} ({x:#x})");
        }
        for v in [
            f32::INFINITY,
            -f32::INFINITY,
            f32::MAX,
            -0.0,
            0.0,
            f32::MIN_POSITIVE,
            1e-45,
        ] {
            assert_eq!(bf16_bits(v), bf16::from_f32(v).to_bits(), "{v:e}");
        }
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
