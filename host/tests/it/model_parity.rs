//! Parity with transformers: logits and greedy generation of two tiny random models (fixtures made by
//! `host/tests/fixtures/model/make_fixtures.py`), and agreement of our training, inference and cached forwards.

use crate::common::max_abs_diff;
use candle_core::{DType, Device, Tensor};
use dusflow::model::{
    generate, load_model, ForwardOptions, GenerateOptions, KvCache, Llama, Sampling, TensorStore,
    Tokenizer,
};
use std::path::PathBuf;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/model")
        .join(name)
}

fn ids(store: &TensorStore, name: &str) -> Tensor {
    store
        .tensor(name, &Device::Cpu)
        .unwrap()
        .to_dtype(DType::U32)
        .unwrap()
}

fn load(name: &str) -> (Llama, TensorStore) {
    let dir = fixture(name);
    let model = load_model(&dir, DType::F32, &Device::Cpu).unwrap();
    let expected = TensorStore::open_file(&dir.join("expected.safetensors")).unwrap();
    (model, expected)
}

fn check_logits(name: &str) {
    let (model, expected) = load(name);
    let input = ids(&expected, "input_ids");
    let want = expected.tensor("logits", &Device::Cpu).unwrap();
    let train = model
        .forward_train(&input, &ForwardOptions::default())
        .unwrap();
    let infer = model.forward(&input, &ForwardOptions::default()).unwrap();
    let d_train = max_abs_diff(&train, &want);
    let d_infer = max_abs_diff(&infer, &want);
    eprintln!("{name}: max |Δlogits| train {d_train:.2e}, inference {d_infer:.2e}");
    assert!(
        d_train < 1e-4,
        "{name}: training forward differs from transformers by {d_train}"
    );
    assert!(
        d_infer < 1e-4,
        "{name}: inference forward differs from transformers by {d_infer}"
    );
    assert!(max_abs_diff(&train, &infer) < 1e-5);
}

#[test]
fn llama_logits_match_transformers() {
    check_logits("llama");
}

#[test]
fn mistral_gqa_tied_sliding_window_logits_match_transformers() {
    check_logits("mistral");
}

/// Feeding tokens one by one through the KV cache gives the logits of the full forward (past the sliding
/// window too), both with room to spare and with buffers that must grow at every step.
#[test]
fn kv_cache_incremental_matches_full_forward() {
    for (name, headroom) in [
        ("llama", 256),
        ("mistral", 256),
        ("llama", 1),
        ("mistral", 1),
    ] {
        let (model, expected) = load(name);
        let input = ids(&expected, "input_ids");
        let full = model
            .forward_train(&input, &ForwardOptions::default())
            .unwrap();
        let mut cache = KvCache::with_headroom(model.config().num_hidden_layers, headroom);
        let prefix = model
            .forward_cached(
                &input.narrow(1, 0, 3).unwrap(),
                &mut cache,
                &ForwardOptions::default(),
                false,
            )
            .unwrap();
        assert!(max_abs_diff(&prefix, &full.narrow(1, 0, 3).unwrap()) < 1e-5);
        for t in 3..input.dim(1).unwrap() {
            let step = model
                .forward_cached(
                    &input.narrow(1, t, 1).unwrap(),
                    &mut cache,
                    &ForwardOptions::default(),
                    true,
                )
                .unwrap();
            let d = max_abs_diff(&step, &full.narrow(1, t, 1).unwrap());
            assert!(d < 1e-5, "{name}: cached step {t} differs by {d}");
        }
        assert_eq!(cache.len(), input.dim(1).unwrap());
    }
}

/// Batched greedy generation from left-padded prompts reproduces transformers' `generate`.
#[test]
fn greedy_generation_matches_transformers() {
    for name in ["llama", "mistral"] {
        let (model, expected) = load(name);
        let prompts: Vec<Vec<u32>> = ids(&expected, "gen_prompt_ids").to_vec2().unwrap();
        let mask: Vec<Vec<u32>> = ids(&expected, "gen_attention_mask").to_vec2().unwrap();
        let want: Vec<Vec<u32>> = ids(&expected, "gen_output_ids").to_vec2().unwrap();
        let prompts: Vec<Vec<u32>> = prompts
            .iter()
            .zip(&mask)
            .map(|(p, m)| {
                p.iter()
                    .zip(m)
                    .filter(|(_, m)| **m == 1)
                    .map(|(t, _)| *t)
                    .collect()
            })
            .collect();
        let opts = GenerateOptions {
            max_new_tokens: 8,
            sampling: Sampling::Greedy,
            ..Default::default()
        };
        let out = generate(&model, &Tokenizer::byte_level(), &prompts, &opts).unwrap();
        for (g, w) in out.iter().zip(&want) {
            assert_eq!(
                g.tokens,
                w[6..].to_vec(),
                "{name}: generated tokens differ from transformers"
            );
        }
    }
}
