//! LoRA adapters against PEFT: adapters made by PEFT 0.21 (tests/fixtures/lora, generator committed there)
//! are read, merged into the base exactly as `merge_and_unload` does (f32 and bf16 bases), give PEFT's
//! logits, and are written back in PEFT's layout.

use crate::common::max_abs_diff;
use candle_core::{DType, Device, Tensor};
use dusflow::model::lora::{Adapter, ADAPTER_CONFIG, ADAPTER_WEIGHTS};
use dusflow::model::{load_model, ForwardOptions, Llama, LlamaConfig};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn base_dir() -> PathBuf {
    fixtures().join("model/llama")
}

fn expected(adapter: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(
        fixtures().join(format!("lora/{adapter}/expected.safetensors")),
        &Device::Cpu,
    )
    .unwrap()
}

/// The base model with the adapter merged into its weights, in `dtype`.
fn merged_model(adapter: &Adapter, dtype: DType) -> (Llama, Vec<(String, Tensor)>) {
    let base = load_model(&base_dir(), dtype, &Device::Cpu).unwrap();
    let merged: Vec<(String, Tensor)> = base
        .named_weights()
        .into_iter()
        .map(|(name, w)| {
            let m = name.strip_suffix(".weight").unwrap_or(&name).to_string();
            let merged = adapter.merge_weight(&m, &w).unwrap();
            (name, merged)
        })
        .collect();
    let dir = tempfile::tempdir().unwrap();
    dusflow::model::save_tensors(
        &dir.path().join("merged"),
        base.config(),
        &merged,
        &dusflow::model::SaveOptions {
            dtype,
            ..Default::default()
        },
    )
    .unwrap();
    (
        load_model(&dir.path().join("merged"), dtype, &Device::Cpu).unwrap(),
        merged,
    )
}

#[test]
fn peft_adapters_merge_as_peft_merges_them_and_give_peft_logits() {
    let cfg = LlamaConfig::from_path(&base_dir()).unwrap();
    for name in ["qv_down", "all_linear_rslora"] {
        let adapter = Adapter::read(&fixtures().join(format!("lora/{name}")), &cfg, &Device::Cpu)
            .unwrap_or_else(|e| panic!("{name}: {e:#}"));
        let want = expected(name);
        let modules: Vec<String> = want
            .keys()
            .filter_map(|k| k.strip_prefix("merged.")?.strip_suffix(".weight"))
            .map(String::from)
            .collect();
        assert_eq!(adapter.layers.len(), modules.len(), "{name}");

        // f32 base: PEFT's merge bit for bit (the rank sum in order with fused multiply-adds, as torch).
        let (model, weights) = merged_model(&adapter, DType::F32);
        let by_name: HashMap<&str, &Tensor> =
            weights.iter().map(|(n, t)| (n.as_str(), t)).collect();
        for m in &modules {
            let ours = by_name[format!("{m}.weight").as_str()];
            let theirs = &want[&format!("merged.{m}.weight")];
            let d = max_abs_diff(ours, theirs);
            assert_eq!(d, 0.0, "{name} {m}: merged f32 weight off PEFT's by {d}");
        }
        // bf16 base: PEFT's arithmetic (update in f32, rounded, added in bf16) reproduced bit for bit.
        let (_, weights16) = merged_model(&adapter, DType::BF16);
        let by_name16: HashMap<&str, &Tensor> =
            weights16.iter().map(|(n, t)| (n.as_str(), t)).collect();
        for m in &modules {
            let ours = by_name16[format!("{m}.weight").as_str()]
                .flatten_all()
                .unwrap()
                .to_vec1::<half::bf16>()
                .unwrap();
            let theirs = want[&format!("merged_bf16.{m}.weight")]
                .flatten_all()
                .unwrap()
                .to_vec1::<half::bf16>()
                .unwrap();
            let differ = ours.iter().zip(&theirs).filter(|(a, b)| a != b).count();
            assert_eq!(
                differ, 0,
                "{name} {m}: {differ} bf16 elements differ from PEFT's merge"
            );
        }
        // PEFT's forward with the adapter active equals ours with it merged.
        let ids = &want["input_ids"];
        let logits = model
            .forward(
                &ids.to_dtype(DType::U32).unwrap(),
                &ForwardOptions::default(),
            )
            .unwrap();
        let d = max_abs_diff(&logits, &want["logits"]);
        assert!(d < 1e-4, "{name}: logits off PEFT's by {d}");
    }
}

#[test]
fn written_adapters_have_peft_keys_and_bytes() {
    let cfg = LlamaConfig::from_path(&base_dir()).unwrap();
    let src = fixtures().join("lora/qv_down");
    let adapter = Adapter::read(&src, &cfg, &Device::Cpu).unwrap();
    let dir = tempfile::tempdir().unwrap();
    adapter
        .write(dir.path(), "host/tests/fixtures/model/llama")
        .unwrap();
    // Same tensors, names, dtypes and shapes as PEFT's own file.
    let theirs = candle_core::safetensors::load(src.join(ADAPTER_WEIGHTS), &Device::Cpu).unwrap();
    let ours =
        candle_core::safetensors::load(dir.path().join(ADAPTER_WEIGHTS), &Device::Cpu).unwrap();
    assert_eq!(
        theirs.keys().collect::<std::collections::BTreeSet<_>>(),
        ours.keys().collect::<std::collections::BTreeSet<_>>()
    );
    for (k, t) in &theirs {
        assert_eq!(t.dtype(), ours[k].dtype(), "{k}");
        assert_eq!(max_abs_diff(t, &ours[k]), 0.0, "{k}");
    }
    // Every key of ours is one PEFT wrote, with the same value where the settings say the same thing.
    let read = |p: &Path| -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(p.join(ADAPTER_CONFIG)).unwrap()).unwrap()
    };
    let (peft, mine) = (read(&src), read(dir.path()));
    for (k, v) in mine.as_object().unwrap() {
        assert!(peft.get(k).is_some(), "PEFT writes no key {k}");
        if [
            "r",
            "lora_alpha",
            "lora_dropout",
            "peft_type",
            "task_type",
            "bias",
            "use_rslora",
        ]
        .contains(&k.as_str())
        {
            assert_eq!(&peft[k], v, "{k}");
        }
    }
    let metadata = safetensors::SafeTensors::read_metadata(
        &std::fs::read(dir.path().join(ADAPTER_WEIGHTS)).unwrap(),
    )
    .unwrap()
    .1;
    assert_eq!(
        metadata
            .metadata()
            .as_ref()
            .and_then(|m| m.get("format"))
            .map(String::as_str),
        Some("pt")
    );
}

#[test]
fn adapters_of_another_model_or_with_unsupported_options_are_refused_by_name() {
    let cfg = LlamaConfig::from_path(&base_dir()).unwrap();
    let src = fixtures().join("lora/qv_down");
    let dir = tempfile::tempdir().unwrap();
    for f in [ADAPTER_CONFIG, ADAPTER_WEIGHTS] {
        std::fs::copy(src.join(f), dir.path().join(f)).unwrap();
    }
    let mut config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(src.join(ADAPTER_CONFIG)).unwrap()).unwrap();
    config["use_dora"] = true.into();
    std::fs::write(dir.path().join(ADAPTER_CONFIG), config.to_string()).unwrap();
    let err = format!(
        "{:#}",
        Adapter::read(dir.path(), &cfg, &Device::Cpu).unwrap_err()
    );
    assert!(
        err.contains("use_dora") && err.contains(ADAPTER_CONFIG),
        "{err}"
    );

    // A base with a wider hidden size: the factors do not fit.
    let wider = LlamaConfig::tiny(259, 64, 64, 2, 4, 4);
    let err = format!(
        "{:#}",
        Adapter::read(&src, &wider, &Device::Cpu).unwrap_err()
    );
    assert!(
        err.contains("lora_A.weight has shape [4, 32], expected [4, 64]"),
        "{err}"
    );
    // A base with one layer: layer 1's factors belong to nothing.
    let shallow = LlamaConfig::tiny(259, 32, 64, 1, 4, 4);
    let err = format!(
        "{:#}",
        Adapter::read(&src, &shallow, &Device::Cpu).unwrap_err()
    );
    assert!(
        err.contains("model.layers.1") && err.contains("belongs to no adapted layer"),
        "{err}"
    );
}

/// The unmerged forward (adapter beside the frozen weights) gives PEFT's logits and equals the merged model.
#[test]
fn the_adapter_beside_the_weights_equals_peft_and_the_merge() {
    let cfg = LlamaConfig::from_path(&base_dir()).unwrap();
    for name in ["qv_down", "all_linear_rslora"] {
        let adapter =
            Adapter::read(&fixtures().join(format!("lora/{name}")), &cfg, &Device::Cpu).unwrap();
        let want = expected(name);
        let ids = want["input_ids"].to_dtype(DType::U32).unwrap();
        let base = load_model(&base_dir(), DType::F32, &Device::Cpu).unwrap();
        let adapted = base.with_adapter(&adapter).unwrap();
        let ours = adapted.forward(&ids, &ForwardOptions::default()).unwrap();
        let train = adapted
            .forward_train(&ids, &ForwardOptions::default())
            .unwrap();
        let (merged, _) = merged_model(&adapter, DType::F32);
        let merged = merged.forward(&ids, &ForwardOptions::default()).unwrap();
        let d = max_abs_diff(&ours, &want["logits"]);
        assert!(d < 1e-4, "{name}: unmerged logits off PEFT's by {d}");
        assert!(
            max_abs_diff(&ours, &merged) < 1e-4,
            "{name}: unmerged vs merged"
        );
        let base_train = base_for_diff(&ids);
        let d_train = max_abs_diff(&ours, &train);
        assert!(
            d_train <= 2.0 * base_train.max(1e-6),
            "{name}: training vs inference forward off by {d_train} (without adapter: {base_train})"
        );
    }
}

/// Gradients of a small loss on the fixture model, by parameter name, with or without checkpointing.
fn gradients(
    checkpointing: bool,
    adapter: Option<&Adapter>,
    dropout_seed: Option<u64>,
) -> Vec<(String, Tensor)> {
    gradients_of(checkpointing, adapter, dropout_seed, false)
}

/// As [`gradients`]; with `frozen_base` the base weights are plain tensors (a LoRA run) and only the
/// adapter's factors get gradients.
fn gradients_of(
    checkpointing: bool,
    adapter: Option<&Adapter>,
    dropout_seed: Option<u64>,
    frozen_base: bool,
) -> Vec<(String, Tensor)> {
    let (varmap, model) =
        dusflow::model::load_trainable(&base_dir(), DType::F32, &Device::Cpu).unwrap();
    let (mut model, mut named) = if frozen_base {
        let plain = load_model(&base_dir(), DType::F32, &Device::Cpu).unwrap();
        (plain.with_checkpointing(checkpointing), Vec::new())
    } else {
        let named: Vec<(String, Tensor)> = varmap
            .data()
            .lock()
            .unwrap()
            .iter()
            .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
            .collect();
        (model.with_checkpointing(checkpointing), named)
    };
    if let Some(a) = adapter {
        // Trainable factors, as a LoRA step makes them.
        let mut trainable = a.clone();
        for (m, pair) in trainable.layers.iter_mut() {
            let av = candle_core::Var::from_tensor(&pair.a).unwrap();
            let bv = candle_core::Var::from_tensor(&pair.b).unwrap();
            named.push((format!("{m}.lora_A"), av.as_tensor().clone()));
            named.push((format!("{m}.lora_B"), bv.as_tensor().clone()));
            pair.a = av.as_tensor().clone();
            pair.b = bv.as_tensor().clone();
        }
        model = model.with_adapter(&trainable).unwrap();
    }
    model.set_dropout_seed(dropout_seed);
    let ids = Tensor::new(&[[256u32, 72, 101, 108, 108, 111, 33, 10]], &Device::Cpu).unwrap();
    let logits = model
        .forward_train(&ids.narrow(1, 0, 7).unwrap(), &ForwardOptions::default())
        .unwrap();
    let targets = ids.narrow(1, 1, 7).unwrap().flatten_all().unwrap();
    let weights = Tensor::ones(7, DType::F32, &Device::Cpu).unwrap();
    let loss = dusflow::train::weighted_nll_sum(&logits, &targets, &weights).unwrap();
    let mut grads = loss.backward().unwrap();
    model.merge_recomputed_grads(&mut grads).unwrap();
    named.sort_by(|a, b| a.0.cmp(&b.0));
    named
        .into_iter()
        .map(|(n, t)| {
            let g = grads
                .get(&t)
                .unwrap_or_else(|| panic!("{n} received no gradient"))
                .clone();
            (n, g)
        })
        .collect()
}

/// Activation checkpointing recomputes each layer in the backward pass: every gradient equals the plain
/// pass's (f32, 1e-6 of the largest), with and without an adapter and its dropout.
#[test]
fn checkpointed_gradients_equal_plain_ones() {
    let cfg = LlamaConfig::from_path(&base_dir()).unwrap();
    let adapter = Adapter::read(&fixtures().join("lora/qv_down"), &cfg, &Device::Cpu).unwrap();
    for (adapter, seed) in [
        (None, None),
        (Some(&adapter), Some(7)),
        (Some(&adapter), None),
    ] {
        let plain = gradients(false, adapter, seed);
        let checkpointed = gradients(true, adapter, seed);
        assert_eq!(plain.len(), checkpointed.len());
        for ((name, a), (_, b)) in plain.iter().zip(&checkpointed) {
            let scale = a
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
                .max(1e-12);
            let d = max_abs_diff(a, b);
            assert!(
                d <= 1e-6 * scale,
                "{name}: checkpointed gradient off by {d} (scale {scale})"
            );
        }
    }
    // A frozen base (a LoRA run): only the factors are variables, the checkpointed layers still backpropagate.
    let plain = gradients_of(false, Some(&adapter), Some(3), true);
    let checkpointed = gradients_of(true, Some(&adapter), Some(3), true);
    assert_eq!(plain.len(), 2 * adapter.layers.len());
    for ((name, a), (_, b)) in plain.iter().zip(&checkpointed) {
        let scale = a
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
            .max(1e-12);
        assert!(max_abs_diff(a, b) <= 1e-6 * scale, "{name} (frozen base)");
    }
    // Dropout changes the gradients (the masks are applied), deterministically per seed.
    let (a, b) = (
        gradients(false, Some(&adapter), Some(7)),
        gradients(false, Some(&adapter), Some(7)),
    );
    let c = gradients(false, Some(&adapter), Some(8));
    let name = "model.layers.0.self_attn.q_proj.lora_A";
    let pick = |g: &[(String, Tensor)]| g.iter().find(|(n, _)| n == name).unwrap().1.clone();
    assert_eq!(max_abs_diff(&pick(&a), &pick(&b)), 0.0);
    assert!(max_abs_diff(&pick(&a), &pick(&c)) > 0.0);
}

/// How far the base model's training and inference forwards are apart (fused vs composed norm and rope).
fn base_for_diff(ids: &Tensor) -> f32 {
    let base = load_model(&base_dir(), DType::F32, &Device::Cpu).unwrap();
    let a = base.forward(ids, &ForwardOptions::default()).unwrap();
    let b = base.forward_train(ids, &ForwardOptions::default()).unwrap();
    max_abs_diff(&a, &b)
}
