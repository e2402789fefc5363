//! The fused op against the materialised oracle: outputs and gradients, every mask kind, odd sizes.

use super::reference::attention_materialised;
use super::{attention, AttentionMask};
use crate::test_support::{max_abs, max_diff};
use candle_core::{DType, Device, Tensor, Var};

/// Sizes of one case: batch, queries, cached keys before them, heads, KV heads, head dim.
#[derive(Debug, Clone, Copy)]
struct Case {
    b: usize,
    s: usize,
    offset: usize,
    nh: usize,
    nkv: usize,
    hd: usize,
}

impl Case {
    fn keys(&self) -> usize {
        self.offset + self.s
    }
}

/// Deterministic pseudo-random values in (-scale, scale).
fn noise(n: usize, seed: u64, scale: f64) -> Vec<f64> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            ((x >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0) * scale
        })
        .collect()
}

fn tensor(shape: (usize, usize, usize, usize), seed: u64, scale: f64) -> Tensor {
    let n = shape.0 * shape.1 * shape.2 * shape.3;
    Tensor::from_vec(noise(n, seed, scale), shape, &Device::Cpu).unwrap()
}

/// The mask kinds the tests go through, for a case.
fn masks(c: &Case) -> Vec<(&'static str, AttentionMask)> {
    let t = c.keys();
    let key_mask: Vec<u8> = (0..c.b * t)
        .map(|x| {
            let (r, j) = (x / t, x % t);
            // Row 0: left padding of 3; row 1: every 7th key padded.
            (if r == 0 { j >= 3 } else { j % 7 != 5 }) as u8
        })
        .collect();
    let docs: Vec<u32> = (0..c.b * t)
        .map(|x| {
            let (r, j) = (x / t, x % t);
            // Documents of uneven lengths, different per row; the last positions form a padding document.
            if j + 2 >= t {
                u32::MAX
            } else {
                (j / (5 + 6 * r)) as u32
            }
        })
        .collect();
    let km = Tensor::from_vec(key_mask, (c.b, t), &Device::Cpu).unwrap();
    let dc = Tensor::from_vec(docs, (c.b, t), &Device::Cpu).unwrap();
    let with = |m: AttentionMask| AttentionMask {
        query_offset: c.offset,
        ..m
    };
    vec![
        ("none", with(AttentionMask::default())),
        ("causal", with(AttentionMask::causal(None, c.offset))),
        (
            "causal + sliding window",
            with(AttentionMask::causal(Some(9), c.offset)),
        ),
        (
            "key mask",
            with(AttentionMask {
                key_mask: Some(km.clone()),
                ..Default::default()
            }),
        ),
        (
            "causal + key mask",
            AttentionMask {
                key_mask: Some(km.clone()),
                ..AttentionMask::causal(None, c.offset)
            },
        ),
        (
            "causal + documents",
            AttentionMask {
                document_ids: Some(dc.clone()),
                ..AttentionMask::causal(None, c.offset)
            },
        ),
        (
            "everything",
            AttentionMask {
                key_mask: Some(km),
                document_ids: Some(dc),
                ..AttentionMask::causal(Some(11), c.offset)
            },
        ),
    ]
}

/// Output and the gradients of `Σ out ⊙ w` with respect to q, k, v.
fn run(
    fused: bool,
    q: &Var,
    k: &Var,
    v: &Var,
    w: &Tensor,
    mask: &AttentionMask,
    scale: f64,
) -> [Tensor; 4] {
    let out = if fused {
        attention(q.as_tensor(), k.as_tensor(), v.as_tensor(), mask, scale).unwrap()
    } else {
        attention_materialised(q.as_tensor(), k.as_tensor(), v.as_tensor(), mask, scale).unwrap()
    };
    let loss = (out.to_dtype(DType::F64).unwrap() * w)
        .unwrap()
        .sum_all()
        .unwrap();
    let grads = loss.backward().unwrap();
    let g = |x: &Var| grads.get(x.as_tensor()).unwrap().clone();
    [out, g(q), g(k), g(v)]
}

/// Fused vs materialised for every mask kind of `c`, in `dtype`: each of output, dq, dk, dv must differ by
/// at most `rel` times the largest magnitude of the oracle's (computed in f64 from the same inputs).
fn check(c: Case, dtype: DType, rel: f64) {
    let t = c.keys();
    let scale = 1.0 / (c.hd as f64).sqrt();
    let q64 = tensor((c.b, c.s, c.nh, c.hd), 1, 2.0);
    let k64 = tensor((c.b, t, c.nkv, c.hd), 2, 2.0);
    let v64 = tensor((c.b, t, c.nkv, c.hd), 3, 1.0);
    let w = tensor((c.b, c.s, c.nh, c.hd), 4, 1.0);
    // Round the inputs to `dtype` once, so both sides see the same values.
    let (q, k, v) = (
        q64.to_dtype(dtype).unwrap(),
        k64.to_dtype(dtype).unwrap(),
        v64.to_dtype(dtype).unwrap(),
    );
    let var = |x: &Tensor, d| Var::from_tensor(&x.to_dtype(d).unwrap()).unwrap();
    for (name, mask) in masks(&c) {
        let fused = run(
            true,
            &var(&q, dtype),
            &var(&k, dtype),
            &var(&v, dtype),
            &w,
            &mask,
            scale,
        );
        let oracle = run(
            false,
            &var(&q, DType::F64),
            &var(&k, DType::F64),
            &var(&v, DType::F64),
            &w,
            &mask,
            scale,
        );
        for (what, a, b) in [
            ("output", &fused[0], &oracle[0]),
            ("dq", &fused[1], &oracle[1]),
            ("dk", &fused[2], &oracle[2]),
            ("dv", &fused[3], &oracle[3]),
        ] {
            assert_eq!(a.dtype(), dtype, "{what} dtype");
            assert_eq!(a.dims(), b.dims(), "{what} shape");
            let (d, m) = (max_diff(a, b), max_abs(b));
            assert!(
                d <= rel * m.max(1e-6),
                "{c:?} {dtype:?} mask {name}: {what} differs by {d:e} (largest |oracle| {m:e})"
            );
            assert!(m > 1e-3, "{c:?} mask {name}: {what} is trivially small");
        }
    }
}

#[test]
fn f64_matches_the_materialised_path_for_every_mask_and_head_dim() {
    for hd in [64, 80, 128] {
        check(
            Case {
                b: 2,
                s: 70,
                offset: 0,
                nh: 4,
                nkv: 1,
                hd,
            },
            DType::F64,
            1e-12,
        );
    }
}

#[test]
fn f64_matches_with_grouped_heads_odd_sizes_and_a_query_offset() {
    for (nh, nkv) in [(3, 3), (8, 2), (8, 1)] {
        for (s, offset, hd) in [(1, 9, 16), (13, 0, 7), (67, 5, 24), (130, 70, 8)] {
            check(
                Case {
                    b: 2,
                    s,
                    offset,
                    nh,
                    nkv,
                    hd,
                },
                DType::F64,
                1e-12,
            );
        }
    }
}

#[test]
fn f32_is_within_single_precision_of_the_f64_oracle() {
    check(
        Case {
            b: 2,
            s: 150,
            offset: 3,
            nh: 8,
            nkv: 2,
            hd: 64,
        },
        DType::F32,
        2e-5,
    );
}

/// bf16 inputs: scores and sums in f32, results rounded to bf16 once; bound: 1 % of the largest magnitude
/// (bf16 keeps 8 significant bits, a relative step of 0.4 %).
#[test]
fn bf16_and_f16_are_within_a_stated_bound_of_the_f64_oracle() {
    let c = Case {
        b: 2,
        s: 97,
        offset: 0,
        nh: 4,
        nkv: 1,
        hd: 80,
    };
    check(c, DType::BF16, 1e-2);
    check(c, DType::F16, 2e-3);
}

/// Keys and values read in place from a larger buffer (a KV cache's layout) and queries through a
/// transposed view give what contiguous copies give.
#[test]
fn strided_views_are_read_in_place() {
    let (b, s, nh, nkv, hd, cap) = (2, 9, 4, 2, 16, 40);
    let buffer_k = tensor((b, cap, nkv, hd), 5, 1.0);
    let buffer_v = tensor((b, cap, nkv, hd), 6, 1.0);
    let (k, v) = (
        buffer_k.narrow(1, 0, 20).unwrap(),
        buffer_v.narrow(1, 0, 20).unwrap(),
    );
    assert!(!k.is_contiguous());
    let q = tensor((b, nh, s, hd), 7, 1.0).transpose(1, 2).unwrap();
    let mask = AttentionMask::causal(Some(6), 11);
    let got = attention(&q, &k, &v, &mask, 0.25).unwrap();
    let want = attention(
        &q.contiguous().unwrap(),
        &k.contiguous().unwrap(),
        &v.contiguous().unwrap(),
        &mask,
        0.25,
    )
    .unwrap();
    assert_eq!(max_diff(&got, &want), 0.0);
    assert!(
        max_diff(
            &got,
            &attention_materialised(&q, &k, &v, &mask, 0.25).unwrap()
        ) < 1e-12
    );
}

/// A query that sees no key (a padding row) gets zeros and passes no gradient; bad inputs are refused
/// with the offending argument named.
#[test]
fn fully_masked_rows_and_bad_inputs() {
    let (b, s, h, hd) = (1, 4, 2, 8);
    let q = Var::from_tensor(&tensor((b, s, h, hd), 8, 1.0)).unwrap();
    let k = Var::from_tensor(&tensor((b, s, h, hd), 9, 1.0)).unwrap();
    let v = Var::from_tensor(&tensor((b, s, h, hd), 10, 1.0)).unwrap();
    let key_mask = Tensor::new(&[[0u8, 0, 1, 1]], &Device::Cpu).unwrap();
    let mask = AttentionMask {
        key_mask: Some(key_mask),
        ..AttentionMask::causal(None, 0)
    };
    let out = attention(q.as_tensor(), k.as_tensor(), v.as_tensor(), &mask, 0.3).unwrap();
    assert_eq!(max_abs(&out.narrow(1, 0, 2).unwrap()), 0.0);
    assert!(max_abs(&out.narrow(1, 2, 2).unwrap()) > 0.0);
    let grads = out.sum_all().unwrap().backward().unwrap();
    let dq = grads.get(q.as_tensor()).unwrap();
    assert_eq!(max_abs(&dq.narrow(1, 0, 2).unwrap()), 0.0);
    let dk = grads.get(k.as_tensor()).unwrap();
    assert_eq!(max_abs(&dk.narrow(1, 0, 2).unwrap()), 0.0);

    let err = |r: anyhow::Result<Tensor>| r.unwrap_err().to_string();
    let (qt, kt) = (q.as_tensor(), k.as_tensor());
    let three = tensor((b, s, 3, hd), 11, 1.0);
    assert!(err(attention(qt, &three, &three, &mask, 1.0)).contains("not a multiple"));
    let short = AttentionMask::causal(None, 1);
    assert!(err(attention(qt, kt, kt, &short, 1.0)).contains("need that many keys"));
    let wrong = AttentionMask {
        key_mask: Some(Tensor::new(&[[1u8, 1, 1]], &Device::Cpu).unwrap()),
        ..Default::default()
    };
    assert!(err(attention(qt, kt, kt, &wrong, 1.0)).contains("key_mask must have shape (1, 4)"));
    let window = AttentionMask {
        sliding_window: Some(2),
        ..Default::default()
    };
    assert!(err(attention(qt, kt, kt, &window, 1.0)).contains("needs the causal mask"));
}
