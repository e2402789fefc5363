//! Which keys a query may attend: the mask kinds of [`AttentionMask`], checked once, and the per-tile
//! reasoning the kernels use to skip whole tiles or test element by element.

use anyhow::{ensure, Result};
use candle_core::{DType, Tensor};

/// Which keys each query attends. Every kind combines with every other; the default attends everything.
///
/// Query `i` of a forward over `seq` new tokens sits at absolute position `query_offset + i` among the
/// `keys` positions (with a KV cache: the cached length), so the keys must cover `query_offset + seq`.
#[derive(Debug, Clone, Default)]
pub struct AttentionMask {
    /// Query `i` attends only keys `j <= query_offset + i`.
    pub causal: bool,
    /// With `causal`: only the `window` most recent keys, `query_offset + i - j < window` (Mistral's
    /// `sliding_window`).
    pub sliding_window: Option<usize>,
    /// Absolute position of the first query among the keys (the length of a cached prefix).
    pub query_offset: usize,
    /// `(batch, keys)` u8: 1 for a real key, 0 for padding (left-padded prompts, finished rows).
    pub key_mask: Option<Tensor>,
    /// `(batch, keys)` u32: the document of every position; a query (at `query_offset + i`) attends only
    /// keys of its own document (packed rows).
    pub document_ids: Option<Tensor>,
}

impl AttentionMask {
    /// The causal mask of a decoder, with its sliding window if any, for queries after `query_offset`
    /// cached positions.
    pub fn causal(sliding_window: Option<usize>, query_offset: usize) -> Self {
        AttentionMask {
            causal: true,
            sliding_window,
            query_offset,
            ..Default::default()
        }
    }

    /// Checks the mask against a batch of `batch` rows, `seq` queries and `keys` keys, on the queries'
    /// device.
    pub(crate) fn check(
        &self,
        batch: usize,
        seq: usize,
        keys: usize,
        device: &candle_core::Device,
    ) -> Result<()> {
        ensure!(
            self.query_offset + seq <= keys,
            "attention: queries at positions {}..{} need that many keys, got {keys}",
            self.query_offset,
            self.query_offset + seq
        );
        if let Some(w) = self.sliding_window {
            ensure!(w > 0, "attention: sliding_window must be at least 1");
            ensure!(
                self.causal,
                "attention: a sliding window needs the causal mask"
            );
        }
        for (name, t, dtype) in [
            ("key_mask", &self.key_mask, DType::U8),
            ("document_ids", &self.document_ids, DType::U32),
        ] {
            if let Some(t) = t {
                ensure!(
                    t.dims() == [batch, keys],
                    "attention: {name} must have shape ({batch}, {keys}), got {:?}",
                    t.dims()
                );
                ensure!(
                    t.dtype() == dtype,
                    "attention: {name} must be {dtype:?}, got {:?}",
                    t.dtype()
                );
                ensure!(
                    t.device().same_device(device),
                    "attention: {name} is on another device than the queries"
                );
            }
        }
        Ok(())
    }

    /// The same mask with its tensors made contiguous (the kernels index them as plain arrays).
    pub(crate) fn contiguous(&self) -> Result<Self> {
        let c = |t: &Option<Tensor>| -> Result<Option<Tensor>> {
            Ok(match t {
                Some(t) => Some(t.contiguous()?),
                None => None,
            })
        };
        Ok(AttentionMask {
            key_mask: c(&self.key_mask)?,
            document_ids: c(&self.document_ids)?,
            ..self.clone()
        })
    }
}

/// The mask with its per-key arrays on the host, as the CPU kernel reads it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct HostMask<'a> {
    pub causal: bool,
    pub window: Option<usize>,
    pub offset: usize,
    /// Keys per row (the stride of the two arrays).
    pub keys: usize,
    pub key_mask: Option<&'a [u8]>,
    pub docs: Option<&'a [u32]>,
}

/// How a (query tile, key tile) pair is masked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TileMask {
    /// No query of the tile sees any key of the tile.
    Skip,
    /// Every query sees every key.
    Full,
    /// Decide element by element with [`HostMask::visible`].
    Partial,
}

impl HostMask<'_> {
    /// Whether query `i` (relative to the forward's first query) of row `b` attends key `j`.
    #[inline]
    pub(crate) fn visible(&self, b: usize, i: usize, j: usize) -> bool {
        let qpos = self.offset + i;
        if self.causal && j > qpos {
            return false;
        }
        if let Some(w) = self.window {
            if qpos - j >= w {
                return false;
            }
        }
        if let Some(m) = self.key_mask {
            if m[b * self.keys + j] == 0 {
                return false;
            }
        }
        if let Some(d) = self.docs {
            if d[b * self.keys + j] != d[b * self.keys + qpos] {
                return false;
            }
        }
        true
    }

    /// The keys `lo..hi` that some query of `i0..i1` may see (from causality and the window alone).
    pub(crate) fn key_range(&self, i0: usize, i1: usize) -> (usize, usize) {
        let hi = if self.causal {
            (self.offset + i1).min(self.keys)
        } else {
            self.keys
        };
        let lo = match self.window {
            Some(w) => (self.offset + i0 + 1).saturating_sub(w),
            None => 0,
        };
        (lo.min(hi), hi)
    }

    /// The queries `lo..hi` (of `seq`) that may see some key of `j0..j1` (from causality and the window).
    pub(crate) fn query_range(&self, j0: usize, j1: usize, seq: usize) -> (usize, usize) {
        let lo = if self.causal {
            j0.saturating_sub(self.offset).min(seq)
        } else {
            0
        };
        let hi = match self.window {
            Some(w) => (j1 - 1 + w).saturating_sub(self.offset).min(seq),
            None => seq,
        };
        (lo, hi.max(lo))
    }

    /// Classifies queries `i0..i1` against keys `j0..j1` of row `b`.
    pub(crate) fn classify(
        &self,
        b: usize,
        i0: usize,
        i1: usize,
        j0: usize,
        j1: usize,
    ) -> TileMask {
        let (q_first, q_last) = (self.offset + i0, self.offset + i1 - 1);
        let mut full = true;
        if self.causal {
            if j0 > q_last {
                return TileMask::Skip;
            }
            full &= j1 - 1 <= q_first;
        }
        if let Some(w) = self.window {
            if q_first >= j1 - 1 + w {
                return TileMask::Skip;
            }
            full &= q_last < j0 + w;
        }
        let row = b * self.keys;
        if let Some(m) = self.key_mask {
            let tile = &m[row + j0..row + j1];
            let valid = tile.iter().filter(|&&x| x != 0).count();
            if valid == 0 {
                return TileMask::Skip;
            }
            full &= valid == tile.len();
        }
        if let Some(d) = self.docs {
            let range = |s: &[u32]| {
                s.iter()
                    .fold((u32::MAX, 0u32), |(lo, hi), &x| (lo.min(x), hi.max(x)))
            };
            let (qlo, qhi) = range(&d[row + q_first..=row + q_last]);
            let (klo, khi) = range(&d[row + j0..row + j1]);
            if qhi < klo || khi < qlo {
                return TileMask::Skip;
            }
            full &= qlo == qhi && klo == khi && qlo == klo;
        }
        if full {
            TileMask::Full
        } else {
            TileMask::Partial
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The tile classification agrees with the element test on every tile of a mask with every kind.
    #[test]
    fn tiles_agree_with_elements() {
        let (b, seq, offset) = (2usize, 13usize, 4usize);
        let keys = offset + seq;
        let key_mask: Vec<u8> = (0..b * keys).map(|x| (x % 5 != 1) as u8).collect();
        let docs: Vec<u32> = (0..b * keys)
            .map(|x| ((x % keys) / 6) as u32 + (x / keys) as u32)
            .collect();
        for causal in [false, true] {
            for window in [None, Some(1), Some(3), Some(8)] {
                if window.is_some() && !causal {
                    continue;
                }
                for (km, dc) in [(false, false), (true, false), (false, true), (true, true)] {
                    let m = HostMask {
                        causal,
                        window,
                        offset,
                        keys,
                        key_mask: km.then_some(key_mask.as_slice()),
                        docs: dc.then_some(docs.as_slice()),
                    };
                    for (bq, bk) in [(1, 1), (3, 4), (5, 7), (13, 17)] {
                        for r in 0..b {
                            for i0 in (0..seq).step_by(bq) {
                                let i1 = (i0 + bq).min(seq);
                                let (lo, hi) = m.key_range(i0, i1);
                                for j0 in (0..keys).step_by(bk) {
                                    let j1 = (j0 + bk).min(keys);
                                    let seen: Vec<bool> = (i0..i1)
                                        .flat_map(|i| (j0..j1).map(move |j| (i, j)))
                                        .map(|(i, j)| m.visible(r, i, j))
                                        .collect();
                                    match m.classify(r, i0, i1, j0, j1) {
                                        TileMask::Skip => assert!(seen.iter().all(|v| !v)),
                                        TileMask::Full => assert!(seen.iter().all(|v| *v)),
                                        TileMask::Partial => {}
                                    }
                                    for j in j0..j1 {
                                        let any = (i0..i1).any(|i| m.visible(r, i, j));
                                        if any {
                                            assert!(
                                                lo <= j && j < hi,
                                                "key {j} outside {lo}..{hi}"
                                            );
                                            let (qlo, qhi) = m.query_range(j, j + 1, seq);
                                            for i in i0..i1 {
                                                if m.visible(r, i, j) {
                                                    assert!(qlo <= i && i < qhi);
                                                }
                                            }
                                        }
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}
