//! Each fused op against its composition from candle ops in f64: values and gradients, odd sizes, and bf16
//! within the bounds the composed bf16 ops themselves reach.

use super::cross_entropy::linear_cross_entropy_sum_chunked;
use super::*;
use crate::test_support::{max_abs, max_diff};
use candle_core::{Var, D};

/// Standard normal values from a seeded generator (Box-Muller over a 64-bit LCG).
fn randn(shape: &[usize], seed: u64) -> Tensor {
    let n: usize = shape.iter().product();
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut uniform = move || {
        state = state
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        ((state >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    };
    let values: Vec<f64> = (0..n)
        .map(|_| {
            let (a, b) = (uniform(), uniform());
            (-2.0 * a.ln()).sqrt() * (2.0 * std::f64::consts::PI * b).cos()
        })
        .collect();
    Tensor::from_vec(values, shape, &Device::Cpu).unwrap()
}

/// Value and gradients (w.r.t. each input, through `Σ y · probe`) of `f` at `inputs` cast to `dtype`.
fn value_and_grads(
    f: &dyn Fn(&[Tensor]) -> Result<Tensor>,
    inputs: &[Tensor],
    dtype: DType,
    probe: &Tensor,
) -> (Tensor, Vec<Tensor>) {
    let vars: Vec<Var> = inputs
        .iter()
        .map(|t| Var::from_tensor(&t.to_dtype(dtype).unwrap()).unwrap())
        .collect();
    let tensors: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let y = f(&tensors).unwrap();
    let surrogate = (y.to_dtype(DType::F64).unwrap() * probe)
        .unwrap()
        .sum_all()
        .unwrap();
    let grads = surrogate.backward().unwrap();
    let g = vars
        .iter()
        .map(|v| grads.get(v.as_tensor()).expect("a gradient").clone())
        .collect();
    (y, g)
}

/// Compares the fused op with the composed one: in f32 both within `tol` (relative to the largest value)
/// of the composed f64; in bf16 the fused op's error at most `slack` times the composed bf16 op's own error
/// (plus one bf16 step of the value's scale, for ties).
fn check(
    name: &str,
    fused: &dyn Fn(&[Tensor]) -> Result<Tensor>,
    composed: &dyn Fn(&[Tensor]) -> Result<Tensor>,
    inputs: &[Tensor],
    out_shape: &[usize],
) {
    let probe = randn(out_shape, 99);
    let (want, want_g) = value_and_grads(composed, inputs, DType::F64, &probe);
    let (got, got_g) = value_and_grads(fused, inputs, DType::F32, &probe);
    let rel = |a: &Tensor, b: &Tensor| max_diff(a, b) / max_abs(b).max(1e-30);
    assert!(
        rel(&got, &want) < 1e-5,
        "{name} f32 value: {}",
        rel(&got, &want)
    );
    for (i, (g, w)) in got_g.iter().zip(&want_g).enumerate() {
        assert!(rel(g, w) < 1e-4, "{name} f32 grad {i}: {}", rel(g, w));
    }
    let (got16, got16_g) = value_and_grads(fused, inputs, DType::BF16, &probe);
    let (comp16, comp16_g) = value_and_grads(composed, inputs, DType::BF16, &probe);
    let step = 2f64.powi(-7);
    let e_fused = rel(&got16, &want);
    let e_comp = rel(&comp16, &want);
    assert!(
        e_fused <= e_comp * 1.5 + step,
        "{name} bf16 value: fused {e_fused} composed {e_comp}"
    );
    for (i, ((g, c), w)) in got16_g.iter().zip(&comp16_g).zip(&want_g).enumerate() {
        let (e_fused, e_comp) = (rel(g, w), rel(c, w));
        assert!(
            e_fused <= e_comp * 1.5 + step,
            "{name} bf16 grad {i}: fused {e_fused} composed {e_comp}"
        );
    }
}

fn composed_rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    let dtype = x.dtype();
    // Normalised in f32 for half types, in the input's own dtype otherwise (as the model does).
    let xf = x.to_dtype(match dtype {
        DType::BF16 | DType::F16 => DType::F32,
        d => d,
    })?;
    let var = xf.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = xf.broadcast_mul(&(var + eps)?.sqrt()?.recip()?)?;
    normed.to_dtype(dtype)?.broadcast_mul(w)
}

#[test]
fn rms_norm_equals_its_composition() {
    for (rows, hidden) in [(1, 8), (5, 33), (3, 130)] {
        let x = randn(&[rows, 2, hidden], 1);
        let w = (randn(&[hidden], 2) * 0.5).unwrap();
        check(
            &format!("rms_norm {rows}x{hidden}"),
            &|t| rms_norm(&t[0], &t[1], 1e-5),
            &|t| composed_rms_norm(&t[0], &t[1], 1e-5),
            &[x, w],
            &[rows, 2, hidden],
        );
    }
}

#[test]
fn swiglu_equals_its_composition() {
    for n in [1, 7, 1000, 40_001] {
        let g = (randn(&[n], 3) * 3.0).unwrap();
        let u = randn(&[n], 4);
        check(
            &format!("swiglu {n}"),
            &|t| swiglu(&t[0], &t[1]),
            &|t| candle_nn::ops::silu(&t[0])? * &t[1],
            &[g, u],
            &[n],
        );
    }
}

fn composed_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let d = x.dim(D::Minus1)?;
    let x1 = x.narrow(D::Minus1, 0, d / 2)?;
    let x2 = x.narrow(D::Minus1, d / 2, d / 2)?;
    let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    let cos = Tensor::cat(&[cos, cos], D::Minus1)?.unsqueeze(2)?;
    let sin = Tensor::cat(&[sin, sin], D::Minus1)?.unsqueeze(2)?;
    x.broadcast_mul(&cos)? + rotated.broadcast_mul(&sin)?
}

#[test]
fn rope_equals_its_composition_with_shared_and_per_row_tables() {
    for (b, s, h, d, table_rows) in [(1, 5, 3, 8, 1), (2, 7, 2, 6, 2), (3, 4, 5, 16, 1)] {
        let x = randn(&[b, s, h, d], 5);
        let angles = (randn(&[table_rows, s, d / 2], 6) * 3.0).unwrap();
        let (cos, sin) = (angles.cos().unwrap(), angles.sin().unwrap());
        let fused = |t: &[Tensor]| {
            let dtype = t[0].dtype();
            rope(&t[0], &cos.to_dtype(dtype)?, &sin.to_dtype(dtype)?)
        };
        let composed = |t: &[Tensor]| {
            let dtype = t[0].dtype();
            composed_rope(&t[0], &cos.to_dtype(dtype)?, &sin.to_dtype(dtype)?)
        };
        check(
            &format!("rope {b}x{s}x{h}x{d}"),
            &fused,
            &composed,
            &[x],
            &[b, s, h, d],
        );
    }
}

#[test]
fn bf16_forwards_round_where_the_composed_ops_round() {
    // Elementwise ops have no sum whose order could differ: bit for bit the composed bf16 result.
    let g = (randn(&[4096], 7) * 4.0)
        .unwrap()
        .to_dtype(DType::BF16)
        .unwrap();
    let u = randn(&[4096], 8).to_dtype(DType::BF16).unwrap();
    let fused = swiglu(&g, &u).unwrap();
    let composed = (candle_nn::ops::silu(&g).unwrap() * &u).unwrap();
    assert_eq!(max_diff(&fused, &composed), 0.0);
    let x = randn(&[2, 9, 3, 8], 9).to_dtype(DType::BF16).unwrap();
    let angles = (randn(&[1, 9, 4], 10) * 3.0).unwrap();
    let (cos, sin) = (
        angles.cos().unwrap().to_dtype(DType::BF16).unwrap(),
        angles.sin().unwrap().to_dtype(DType::BF16).unwrap(),
    );
    let fused = rope(&x, &cos, &sin).unwrap();
    let composed = composed_rope(&x, &cos, &sin).unwrap();
    assert_eq!(max_diff(&fused, &composed), 0.0);
}

fn composed_nll(h: &Tensor, w: &Tensor, targets: &Tensor, weights: &Tensor) -> Result<Tensor> {
    let logits = h.matmul(&w.t()?)?.to_dtype(DType::F64)?;
    let max = logits.max_keepdim(D::Minus1)?.detach();
    let shifted = logits.broadcast_sub(&max)?;
    let logp = shifted.broadcast_sub(&shifted.exp()?.sum_keepdim(D::Minus1)?.log()?)?;
    let picked = logp.gather(&targets.unsqueeze(1)?, 1)?.squeeze(1)?;
    (picked * weights.to_dtype(DType::F64)?)?.sum_all()?.neg()
}

#[test]
fn chunked_cross_entropy_equals_the_whole_batch_loss_and_gradients() {
    let (rows, hidden, vocab) = (11, 6, 37);
    let h = randn(&[rows, hidden], 11);
    let w = (randn(&[vocab, hidden], 12) * 2.0).unwrap();
    let targets = Tensor::from_vec(
        (0..rows as u32)
            .map(|i| (i * 7 + 3) % vocab as u32)
            .collect(),
        rows,
        &Device::Cpu,
    )
    .unwrap();
    // Masked rows (weight 0) and uneven weights, as packing and accumulation give.
    let weights = Tensor::from_vec(
        (0..rows).map(|i| [1.0f32, 0.0, 0.5][i % 3]).collect(),
        rows,
        &Device::Cpu,
    )
    .unwrap();
    for chunk in [1, 4, 11, 64] {
        let probe = Tensor::new(1.7f64, &Device::Cpu).unwrap();
        let scalar = |f: &dyn Fn(&[Tensor]) -> Result<Tensor>, dtype| {
            value_and_grads(f, &[h.clone(), w.clone()], dtype, &probe)
        };
        let (want, want_g) = scalar(
            &|t| composed_nll(&t[0], &t[1], &targets, &weights),
            DType::F64,
        );
        let (got, got_g) = scalar(
            &|t| linear_cross_entropy_sum_chunked(&t[0], &t[1], &targets, &weights, chunk),
            DType::F32,
        );
        let rel = |a: &Tensor, b: &Tensor| max_diff(a, b) / max_abs(b);
        assert!(
            rel(&got, &want) < 1e-6,
            "chunk {chunk}: loss {}",
            rel(&got, &want)
        );
        for (i, (g, wg)) in got_g.iter().zip(&want_g).enumerate() {
            assert!(rel(g, wg) < 1e-5, "chunk {chunk}: grad {i}: {}", rel(g, wg));
        }
        // bf16 projection as the model runs it: near the f64 loss, gradients within bf16 steps.
        let (got16, got16_g) = scalar(
            &|t| linear_cross_entropy_sum_chunked(&t[0], &t[1], &targets, &weights, chunk),
            DType::BF16,
        );
        assert!(rel(&got16, &want) < 2e-2, "chunk {chunk}: bf16 loss");
        for (g, wg) in got16_g.iter().zip(&want_g) {
            assert!(rel(g, wg) < 3e-2, "chunk {chunk}: bf16 grad {}", rel(g, wg));
        }
    }
}
