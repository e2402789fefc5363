//! Training correctness: every trainable tensor receives a gradient through the training forward, and the
//! gradient agrees with finite differences on a tiny f64 model.

use crate::common::{max_abs, max_abs_diff};
use candle_core::{DType, Device, Tensor, Var, D};
use candle_nn::VarMap;
use dusflow::model::{
    document_ids, init_trainable, packed_position_ids, ForwardOptions, Llama, LlamaConfig,
};

fn tiny(tied: bool, kv_heads: usize) -> LlamaConfig {
    let mut cfg = LlamaConfig::tiny(50, 16, 24, 2, 4, kv_heads);
    cfg.tie_word_embeddings = tied;
    cfg.initializer_range = 0.3;
    cfg
}

fn batch(dev: &Device) -> Tensor {
    Tensor::new(
        &[[3u32, 7, 11, 2, 40, 9, 9, 1], [5, 5, 17, 33, 2, 0, 48, 6]],
        dev,
    )
    .unwrap()
}

/// Mean next-token cross-entropy, from differentiable ops only.
fn loss(model: &Llama, ids: &Tensor, opts: &ForwardOptions) -> Tensor {
    let (b, s) = ids.dims2().unwrap();
    let logits = model
        .forward_train(
            &ids.narrow(1, 0, s - 1).unwrap(),
            &ForwardOptions {
                position_ids: opts
                    .position_ids
                    .as_ref()
                    .map(|p| p.narrow(1, 0, s - 1).unwrap()),
                key_mask: opts
                    .key_mask
                    .as_ref()
                    .map(|m| m.narrow(1, 0, s - 1).unwrap()),
                document_ids: opts
                    .document_ids
                    .as_ref()
                    .map(|m| m.narrow(1, 0, s - 1).unwrap()),
            },
        )
        .unwrap();
    let logp = candle_nn::ops::log_softmax(&logits, D::Minus1).unwrap();
    let targets = ids.narrow(1, 1, s - 1).unwrap().unsqueeze(2).unwrap();
    let picked = logp.gather(&targets.contiguous().unwrap(), 2).unwrap();
    (picked.sum_all().unwrap() * (-1.0 / (b * (s - 1)) as f64)).unwrap()
}

fn vars(varmap: &VarMap) -> Vec<(String, Var)> {
    let mut v: Vec<(String, Var)> = varmap
        .data()
        .lock()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

fn assert_all_grads_nonzero(cfg: &LlamaConfig, opts: &ForwardOptions) {
    let dev = Device::Cpu;
    let (varmap, model) = init_trainable(cfg, 7, DType::F32, &dev).unwrap();
    let all = vars(&varmap);
    assert_eq!(all.len(), cfg.weight_shapes().len(), "one Var per weight");
    let l = loss(&model, &batch(&dev), opts);
    let grads = l.backward().unwrap();
    for (name, var) in &all {
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("no gradient reached {name}"));
        let m = max_abs(g);
        assert!(m > 0.0 && m.is_finite(), "{name}: gradient max |g| = {m}");
    }
}

#[test]
fn every_weight_gets_a_gradient_untied_mha() {
    assert_all_grads_nonzero(&tiny(false, 4), &ForwardOptions::default());
}

#[test]
fn every_weight_gets_a_gradient_tied_gqa_sliding_window() {
    let mut cfg = tiny(true, 2);
    cfg.sliding_window = Some(3);
    assert_all_grads_nonzero(&cfg, &ForwardOptions::default());
}

#[test]
fn every_weight_gets_a_gradient_with_packed_documents() {
    let dev = Device::Cpu;
    let docs = vec![
        vec![0u32, 0, 0, 1, 1, 1, 1, 1],
        vec![0, 0, 0, 0, 0, 2, 2, 2],
    ];
    let opts = ForwardOptions {
        position_ids: Some(packed_position_ids(&docs, &dev).unwrap()),
        key_mask: None,
        document_ids: Some(document_ids(&docs, &dev).unwrap()),
    };
    assert_all_grads_nonzero(&tiny(false, 2), &opts);
}

/// Packing with a block-diagonal mask and reset positions gives each document the logits it has alone.
#[test]
fn packed_documents_match_separate_forwards() {
    let dev = Device::Cpu;
    let (_, model) = init_trainable(&tiny(false, 2), 3, DType::F32, &dev).unwrap();
    let a = [4u32, 8, 15];
    let b = [16u32, 23, 42, 1, 2];
    let packed = Tensor::new(&[[4u32, 8, 15, 16, 23, 42, 1, 2]], &dev).unwrap();
    let docs = vec![vec![0u32, 0, 0, 1, 1, 1, 1, 1]];
    let opts = ForwardOptions {
        position_ids: Some(packed_position_ids(&docs, &dev).unwrap()),
        key_mask: None,
        document_ids: Some(document_ids(&docs, &dev).unwrap()),
    };
    let got = model.forward_train(&packed, &opts).unwrap();
    let la = model
        .forward_train(
            &Tensor::new(&[a], &dev).unwrap(),
            &ForwardOptions::default(),
        )
        .unwrap();
    let lb = model
        .forward_train(
            &Tensor::new(&[b], &dev).unwrap(),
            &ForwardOptions::default(),
        )
        .unwrap();
    let want = Tensor::cat(&[&la, &lb], 1).unwrap();
    let d = max_abs_diff(&got, &want);
    assert!(d < 1e-5, "packed logits differ by {d}");
}

/// Central differences on a few entries of every kind of weight agree with backprop (f64 model).
#[test]
fn gradient_matches_finite_differences() {
    let dev = Device::Cpu;
    for tied in [false, true] {
        let cfg = tiny(tied, 2);
        let (varmap, model) = init_trainable(&cfg, 11, DType::F64, &dev).unwrap();
        let ids = batch(&dev);
        let opts = ForwardOptions::default();
        let grads = loss(&model, &ids, &opts).backward().unwrap();
        let eps = 1e-5;
        let mut checked = 0;
        for (name, var) in vars(&varmap) {
            let analytic: Vec<f64> = grads
                .get(var.as_tensor())
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let original = var.as_tensor().copy().unwrap();
            let flat: Vec<f64> = original.flatten_all().unwrap().to_vec1().unwrap();
            // The entry with the largest gradient and one fixed entry.
            let top = (0..flat.len())
                .max_by(|&a, &b| analytic[a].abs().total_cmp(&analytic[b].abs()))
                .unwrap();
            for idx in [top, flat.len() / 3] {
                let eval = |delta: f64| {
                    let mut v = flat.clone();
                    v[idx] += delta;
                    var.set(&Tensor::from_vec(v, original.shape(), &dev).unwrap())
                        .unwrap();
                    loss(&model, &ids, &opts).to_scalar::<f64>().unwrap()
                };
                let numeric = (eval(eps) - eval(-eps)) / (2.0 * eps);
                var.set(&original).unwrap();
                let a = analytic[idx];
                let err = (numeric - a).abs() / a.abs().max(numeric.abs()).max(1e-6);
                assert!(
                    err < 1e-4 || (numeric - a).abs() < 1e-9,
                    "{name}[{idx}] (tied={tied}): backprop {a:e}, finite difference {numeric:e}"
                );
                checked += 1;
            }
        }
        assert_eq!(checked, 2 * cfg.weight_shapes().len());
    }
}

/// Fresh initialisation follows transformers: normal(0, initializer_range), norms 1, zero padding row;
/// and it is deterministic per seed.
#[test]
fn fresh_initialisation_statistics() {
    let dev = Device::Cpu;
    let mut cfg = LlamaConfig::tiny(300, 64, 160, 2, 4, 2);
    cfg.pad_token_id = Some(7);
    let (varmap, _) = init_trainable(&cfg, 42, DType::F32, &dev).unwrap();
    let data = varmap.data().lock().unwrap();
    let embed = data["model.embed_tokens.weight"].as_tensor();
    let values: Vec<f32> = embed.flatten_all().unwrap().to_vec1().unwrap();
    let n = values.len() as f64;
    let mean = values.iter().map(|v| *v as f64).sum::<f64>() / n;
    let std = (values
        .iter()
        .map(|v| (*v as f64 - mean).powi(2))
        .sum::<f64>()
        / n)
        .sqrt();
    assert!(
        mean.abs() < 2e-3 && (std - 0.02).abs() < 1e-3,
        "mean {mean}, std {std}"
    );
    let pad_row: Vec<f32> = embed.get(7).unwrap().to_vec1().unwrap();
    assert!(pad_row.iter().all(|v| *v == 0.0));
    let norm: Vec<f32> = data["model.layers.1.post_attention_layernorm.weight"]
        .as_tensor()
        .to_vec1()
        .unwrap();
    assert!(norm.iter().all(|v| *v == 1.0));
    drop(data);
    let (again, _) = init_trainable(&cfg, 42, DType::F32, &dev).unwrap();
    let (other, _) = init_trainable(&cfg, 43, DType::F32, &dev).unwrap();
    let q = |m: &VarMap| -> Vec<f32> {
        m.data().lock().unwrap()["model.layers.0.self_attn.q_proj.weight"]
            .as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    };
    assert_eq!(q(&varmap), q(&again));
    assert_ne!(q(&varmap), q(&other));
}

/// f32 master weights with a bf16 forward: gradients reach every f32 variable, and the logits are exactly
/// those of a bf16 copy of the model.
#[test]
fn bf16_compute_over_f32_masters() {
    let dev = Device::Cpu;
    let cfg = tiny(false, 2);
    let (varmap, model) = init_trainable(&cfg, 5, DType::F32, &dev).unwrap();
    let mixed = model.clone().with_compute_dtype(DType::BF16);
    assert_eq!(
        (mixed.dtype(), mixed.compute_dtype()),
        (DType::F32, DType::BF16)
    );
    let ids = batch(&dev);
    let logits = mixed
        .forward_train(&ids, &ForwardOptions::default())
        .unwrap();
    assert_eq!(logits.dtype(), DType::BF16);
    let copy = model.to(DType::BF16, &dev).unwrap();
    let want = copy
        .forward_train(&ids, &ForwardOptions::default())
        .unwrap();
    let d = max_abs_diff(
        &logits.to_dtype(DType::F32).unwrap(),
        &want.to_dtype(DType::F32).unwrap(),
    );
    assert_eq!(d, 0.0);
    let inference = mixed.forward(&ids, &ForwardOptions::default()).unwrap();
    assert_eq!(inference.dtype(), DType::BF16);
    let grads = loss(&mixed, &ids, &ForwardOptions::default())
        .backward()
        .unwrap();
    for (name, var) in vars(&varmap) {
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("no gradient reached {name}"));
        assert_eq!(g.dtype(), DType::F32, "{name}");
        let m = max_abs(g);
        assert!(m > 0.0 && m.is_finite(), "{name}: {m}");
    }
}
