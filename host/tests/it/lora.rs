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
