//! Which elements of a task vector (δ = model − base) survive sparsification, decided per element so a
//! tensor is processed in parallel chunks without sorting or copying it.
//!
//! - **Magnitude (TIES)**: keep the `k = max(1, ⌊density · n⌋)` elements of largest |δ| (mergekit's rule).
//!   The cut value is found exactly by a two-pass radix select on the f32 bit patterns of |δ| (a histogram
//!   of the 16 high bits, then the low 16 bits of the elements in the cut's bucket). **Tie rule**: elements strictly above the cut are kept; among elements equal
//!   to the cut, the lowest flat indices are kept until exactly `k` are kept. (mergekit's `argsort` leaves
//!   this order unspecified.)
//! - **Random (DARE)**: element `j` of model `i` in tensor `name` is kept when `u < density`, with
//!   `u = (splitmix64(key + (j + 1)·0x9E3779B97F4A7C15) >> 11) · 2⁻⁵³` and `key` = the first 8 bytes
//!   (little-endian) of BLAKE3(`"dusflow-dare-v1\0"` ‖ seed (u64 LE) ‖ i (u64 LE) ‖ name). The mask
//!   depends only on (seed, model position, tensor name, index): not on chunking, threads or other tensors.

use rayon::prelude::*;

/// Elements per parallel work unit.
pub const CHUNK: usize = 1 << 16;

/// The survival rule of one model's δ over one tensor.
#[derive(Debug, Clone, PartialEq)]
pub enum Keep {
    /// Every element survives (density ≥ 1, or no sparsification).
    All,
    /// Nothing survives (density ≤ 0).
    Nothing,
    /// The `k` largest magnitudes survive.
    TopK(TopK),
    /// Each element survives with probability `density`, from a seeded counter-based generator.
    Random {
        /// Per (seed, model, tensor) key.
        key: u64,
        /// Survival probability.
        density: f64,
    },
}

/// The exact cut of a top-k selection.
#[derive(Debug, Clone, PartialEq)]
pub struct TopK {
    /// Bit pattern of the cut magnitude (|δ| as f32 bits).
    pub threshold: u32,
    /// How many elements equal to the cut survive (the lowest-index ones).
    pub equal_kept: u64,
    /// How many elements equal the cut.
    pub equal_total: u64,
    /// For each chunk, how many elements equal to the cut lie before it (only when `equal_kept < equal_total`).
    pub equal_before_chunk: Vec<u64>,
}

impl Keep {
    /// Writes the survival multipliers (1.0 kept, 0.0 dropped) of chunk `chunk` (elements `chunk·CHUNK ..`)
    /// with differences `deltas` into `mask`, in branch-free passes where possible.
    pub fn mask_chunk(&self, chunk: usize, deltas: &[f32], mask: &mut [f32]) {
        let mask = &mut mask[..deltas.len()];
        match self {
            Keep::All => mask.fill(1.0),
            Keep::Nothing => mask.fill(0.0),
            Keep::TopK(t) if t.equal_kept >= t.equal_total => {
                let cut = t.threshold;
                mask.iter_mut()
                    .zip(deltas)
                    .for_each(|(m, d)| *m = (d.abs().to_bits() >= cut) as u8 as f32);
            }
            Keep::TopK(t) => {
                let cut = t.threshold;
                let mut equal_seen = t.equal_before_chunk[chunk];
                mask.iter_mut()
                    .zip(deltas)
                    .for_each(|(m, d)| *m = (d.abs().to_bits() > cut) as u8 as f32);
                if equal_seen < t.equal_kept {
                    for (m, d) in mask.iter_mut().zip(deltas) {
                        if d.abs().to_bits() == cut {
                            equal_seen += 1;
                            if equal_seen <= t.equal_kept {
                                *m = 1.0;
                            } else {
                                break;
                            }
                        }
                    }
                }
            }
            Keep::Random { key, density } => {
                let start = (chunk * CHUNK) as u64;
                mask.iter_mut().enumerate().for_each(|(j, m)| {
                    *m = (uniform(*key, start + j as u64) < *density) as u8 as f32
                });
            }
        }
    }
}

/// The top-`k` rule for a tensor of `numel` elements. `magnitudes(chunk, out)` fills `out` with the
/// |δ| bit patterns of chunk `chunk` (its length is the chunk's length).
pub fn top_k<F>(numel: usize, k: usize, magnitudes: F) -> Keep
where
    F: Fn(usize, &mut [u32]) + Sync,
{
    if k == 0 {
        return Keep::Nothing;
    }
    if k >= numel {
        return Keep::All;
    }
    let chunks = numel.div_ceil(CHUNK);
    let chunk_len = |c: usize| CHUNK.min(numel - c * CHUNK);
    // First pass: counts of the high 16 bits.
    let high_hist = (0..chunks)
        .into_par_iter()
        .fold(Scratch::lease, |mut s, c| {
            let Scratch { hist, buf } = &mut *s;
            let buf_c = &mut buf[..chunk_len(c)];
            magnitudes(c, buf_c);
            buf_c.iter().for_each(|&b| hist[(b >> 16) as usize] += 1);
            s
        })
        .reduce(Scratch::lease, |mut a, b| {
            a.hist.iter_mut().zip(&b.hist).for_each(|(x, y)| *x += y);
            a
        });
    let high_hist = &high_hist.hist;
    // Walk buckets from the largest down until `need` elements are covered.
    let find = |hist: &[u64], need: u64| -> (usize, u64) {
        let mut above = 0u64;
        for bucket in (0..hist.len()).rev() {
            if above + hist[bucket] >= need {
                return (bucket, above);
            }
            above += hist[bucket];
        }
        unreachable!("k <= numel")
    };
    let (high, above_high) = find(high_hist, k as u64);
    // Second pass: the low 16 bits of the elements in bucket `high`, kept per chunk in order (one bucket
    // of 65536: few elements), which gives the exact cut and the per-chunk tie counts without a third pass.
    let high = high as u32;
    let lows: Vec<Vec<u16>> = (0..chunks)
        .into_par_iter()
        .map_init(Scratch::lease, |s, c| {
            let buf_c = &mut s.buf[..chunk_len(c)];
            magnitudes(c, buf_c);
            buf_c
                .iter()
                .filter(|&&b| b >> 16 == high)
                .map(|&b| (b & 0xFFFF) as u16)
                .collect()
        })
        .collect();
    let mut low_hist = vec![0u64; 1 << 16];
    lows.iter()
        .flatten()
        .for_each(|&l| low_hist[l as usize] += 1);
    let need = k as u64 - above_high;
    let (low, above_low) = find(&low_hist, need);
    let threshold = (high << 16) | low as u32;
    let equal_total = low_hist[low];
    let equal_kept = need - above_low;
    let equal_before_chunk = if equal_kept < equal_total {
        let mut before = Vec::with_capacity(chunks);
        let mut sum = 0;
        for chunk_lows in &lows {
            before.push(sum);
            sum += chunk_lows.iter().filter(|&&l| l as usize == low).count() as u64;
        }
        before
    } else {
        Vec::new()
    };
    Keep::TopK(TopK {
        threshold,
        equal_kept,
        equal_total,
        equal_before_chunk,
    })
}

/// Working memory of one top-k work unit: a histogram of 16-bit keys and a chunk of magnitudes.
struct Scratch {
    hist: Vec<u64>,
    buf: Vec<u32>,
}

/// Scratch returned by dropped [`Lease`]s, reused by later selections: a fresh histogram and chunk per
/// work unit would each be a new mapping to fault in and zero.
static SCRATCH_POOL: std::sync::Mutex<Vec<Scratch>> = std::sync::Mutex::new(Vec::new());

/// A [`Scratch`] from the pool (histogram zeroed, chunk contents arbitrary), returned to it on drop.
struct Lease(Option<Scratch>);

impl Scratch {
    fn lease() -> Lease {
        let reused = SCRATCH_POOL.lock().unwrap_or_else(|e| e.into_inner()).pop();
        let scratch = match reused {
            Some(mut s) => {
                s.hist.fill(0);
                s
            }
            None => Scratch {
                hist: vec![0; 1 << 16],
                buf: vec![0; CHUNK],
            },
        };
        Lease(Some(scratch))
    }
}

impl std::ops::Deref for Lease {
    type Target = Scratch;
    fn deref(&self) -> &Scratch {
        self.0.as_ref().expect("leased scratch")
    }
}

impl std::ops::DerefMut for Lease {
    fn deref_mut(&mut self) -> &mut Scratch {
        self.0.as_mut().expect("leased scratch")
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if let Some(s) = self.0.take() {
            SCRATCH_POOL
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(s);
        }
    }
}

/// mergekit's `k` for a magnitude sparsification: `max(1, int(density · numel))`, 0 for an empty tensor.
pub fn magnitude_count(density: f64, numel: usize) -> usize {
    if numel == 0 {
        return 0;
    }
    ((density * numel as f64) as usize).max(1)
}

/// The DARE key of model position `model` in tensor `name` under `seed`.
pub fn random_key(seed: u64, model: usize, name: &str) -> u64 {
    let mut h = blake3::Hasher::new();
    h.update(b"dusflow-dare-v1\0");
    h.update(&seed.to_le_bytes());
    h.update(&(model as u64).to_le_bytes());
    h.update(name.as_bytes());
    let bytes = h.finalize();
    u64::from_le_bytes(bytes.as_bytes()[..8].try_into().expect("8 bytes"))
}

/// The uniform in [0, 1) of element `index` under `key` (SplitMix64 of the counter).
#[inline]
pub fn uniform(key: u64, index: u64) -> f64 {
    let mut z = key.wrapping_add(index.wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    (z >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kept(values: &[f32], k: usize) -> Vec<bool> {
        let keep = top_k(values.len(), k, |c, out| {
            let start = c * CHUNK;
            for (o, v) in out.iter_mut().zip(&values[start..]) {
                *o = v.abs().to_bits();
            }
        });
        let mut mask = vec![0f32; CHUNK];
        values
            .chunks(CHUNK)
            .enumerate()
            .flat_map(|(c, chunk)| {
                keep.mask_chunk(c, chunk, &mut mask);
                mask[..chunk.len()]
                    .iter()
                    .map(|m| *m == 1.0)
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    #[test]
    fn top_k_matches_a_sort_with_lowest_index_ties() {
        // Across several chunks, with many exact ties at the cut.
        let n = CHUNK * 3 + 123;
        let values: Vec<f32> = (0..n)
            .map(|j| ((j * 7919 % 1000) as f32 - 500.0) / 64.0)
            .collect();
        for k in [1, 17, n / 10, n / 2, n - 1] {
            let mut order: Vec<usize> = (0..n).collect();
            order.sort_by(|&a, &b| values[b].abs().total_cmp(&values[a].abs()).then(a.cmp(&b)));
            let mut expected = vec![false; n];
            order[..k].iter().for_each(|&j| expected[j] = true);
            assert_eq!(kept(&values, k), expected, "k = {k}");
        }
        assert!(kept(&values, n).iter().all(|&x| x));
        assert!(kept(&values, 0).iter().all(|&x| !x));
    }

    #[test]
    fn random_masks_have_the_asked_density_and_depend_on_the_key_only() {
        let key = random_key(42, 1, "model.layers.0.mlp.up_proj.weight");
        let n = 200_000;
        let kept = (0..n).filter(|&j| uniform(key, j) < 0.3).count() as f64 / n as f64;
        assert!((kept - 0.3).abs() < 0.005, "{kept}");
        assert_ne!(key, random_key(42, 0, "model.layers.0.mlp.up_proj.weight"));
        assert_ne!(key, random_key(43, 1, "model.layers.0.mlp.up_proj.weight"));
        assert_eq!(key, random_key(42, 1, "model.layers.0.mlp.up_proj.weight"));
        assert_eq!(magnitude_count(0.5, 7), 3);
        assert_eq!(magnitude_count(0.01, 7), 1);
    }
}
