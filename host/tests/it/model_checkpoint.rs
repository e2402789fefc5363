//! Checkpoint I/O: memory-mapped store (single and sharded), canonical streaming writer, saving and
//! reloading models, and clear errors for broken inputs.

use crate::common::max_abs_diff;
use candle_core::{DType, Device, Tensor};
use dusflow::model::checkpoint_writer::{canonical_order, plan_shards};
use dusflow::model::{
    load_model, load_trainable, save_model, write_checkpoint, write_safetensors, ForwardOptions,
    LlamaConfig, SaveOptions, ShardOptions, StagingDir, TensorSpec, TensorStore, Tokenizer,
};
use safetensors::Dtype;
use std::borrow::Cow;
use std::path::{Path, PathBuf};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/model")
        .join(name)
}

fn specs_of(store: &TensorStore) -> Vec<TensorSpec> {
    store
        .metas()
        .map(|m| TensorSpec::new(m.name, m.dtype, m.shape.to_vec()))
        .collect()
}

fn err_text(e: anyhow::Error) -> String {
    format!("{e:#}")
}

#[test]
fn store_lists_and_borrows_tensors() {
    let store = TensorStore::open(&fixture("llama")).unwrap();
    assert_eq!(store.len(), 21);
    let meta = store.meta("model.layers.1.mlp.down_proj.weight").unwrap();
    assert_eq!((meta.dtype, meta.shape), (Dtype::F32, &[32usize, 64][..]));
    assert!(meta.file.ends_with("model.safetensors"));
    let bytes = store.bytes("model.layers.1.mlp.down_proj.weight").unwrap();
    assert_eq!(bytes.len(), 32 * 64 * 4);
    let t = store
        .tensor("model.layers.1.mlp.down_proj.weight", &Device::Cpu)
        .unwrap();
    let first = f32::from_le_bytes(bytes[..4].try_into().unwrap());
    assert_eq!(
        t.flatten_all()
            .unwrap()
            .get(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap(),
        first
    );
    assert!(err_text(store.meta("nope").unwrap_err()).contains("\"nope\" not found"));
}

/// Rewriting a transformers-written file through the streaming writer (bytes borrowed from the map)
/// reproduces it byte for byte: same canonical order, header and padding as `save_file(..., {"format": "pt"})`.
#[test]
fn writer_is_byte_identical_to_transformers_output() {
    for name in ["llama", "mistral"] {
        let src = fixture(name).join("model.safetensors");
        let store = TensorStore::open_file(&src).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("copy.safetensors");
        write_safetensors(&out, &specs_of(&store), |s| {
            Ok(Cow::Owned(store.bytes(&s.name)?))
        })
        .unwrap();
        assert!(
            std::fs::read(&src).unwrap() == std::fs::read(&out).unwrap(),
            "{name}: bytes differ"
        );
    }
}

#[test]
fn canonical_order_is_dtype_alignment_then_name() {
    let mut specs = vec![
        TensorSpec::new("layers.2.w", Dtype::F32, vec![1]),
        TensorSpec::new("a", Dtype::BF16, vec![1]),
        TensorSpec::new("layers.10.w", Dtype::F32, vec![1]),
        TensorSpec::new("z", Dtype::I64, vec![1]),
    ];
    canonical_order(&mut specs);
    let names: Vec<&str> = specs.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["z", "layers.10.w", "layers.2.w", "a"]);
}

#[test]
fn sharded_write_reads_back_identically() {
    let store = TensorStore::open(&fixture("llama")).unwrap();
    let specs = specs_of(&store);
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("sharded");
    let staging = StagingDir::new(&target).unwrap();
    let opts = ShardOptions {
        max_shard_bytes: Some(40_000),
        ..Default::default()
    };
    let expected_shards = plan_shards(&specs, opts).len();
    assert!(expected_shards >= 3);
    let written = write_checkpoint(staging.path(), &specs, opts, |s| {
        Ok(Cow::Owned(store.bytes(&s.name)?))
    })
    .unwrap();
    assert!(!target.exists(), "nothing visible before commit");
    staging.commit(false).unwrap();
    assert_eq!(written.files.len(), expected_shards);
    assert_eq!(
        written.files[0],
        format!("model-00001-of-{expected_shards:05}.safetensors")
    );
    let index: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(target.join("model.safetensors.index.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        index["metadata"]["total_size"].as_u64().unwrap(),
        store.total_bytes()
    );
    assert_eq!(index["weight_map"].as_object().unwrap().len(), 21);
    let back = TensorStore::open(&target).unwrap();
    assert_eq!(back.files().len(), expected_shards);
    for name in store.names() {
        assert_eq!(
            store.bytes(name).unwrap(),
            back.bytes(name).unwrap(),
            "{name}"
        );
    }
    // Shards are filled in the order given (layers stay together) and none exceeds the limit unless alone.
    for f in back.files() {
        let one = TensorStore::open_file(f).unwrap();
        assert!(one.total_bytes() <= 40_000 || one.len() == 1);
    }
}

#[test]
fn staging_dir_is_removed_unless_committed_and_never_clobbers() {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("out");
    let staging = StagingDir::new(&target).unwrap();
    let tmp = staging.path().to_path_buf();
    std::fs::write(tmp.join("x"), b"1").unwrap();
    drop(staging);
    assert!(!tmp.exists() && !target.exists());
    std::fs::create_dir(&target).unwrap();
    let staging = StagingDir::new(&target).unwrap();
    assert!(err_text(staging.commit(false).unwrap_err()).contains("already exists"));
    let staging = StagingDir::new(&target).unwrap();
    std::fs::write(staging.path().join("y"), b"2").unwrap();
    staging.commit(true).unwrap();
    assert!(target.join("y").exists());
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        1,
        "no temporary folder left behind"
    );
}

fn logits(dir: &Path, dtype: DType) -> Tensor {
    let model = load_model(dir, dtype, &Device::Cpu).unwrap();
    let ids = Tensor::new(&[[1u32, 5, 9, 200, 3, 77]], &Device::Cpu).unwrap();
    model
        .forward(&ids, &ForwardOptions::default())
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
}

/// f32 → bf16 sharded folder (with copied tokenizer/generation files) → reload as f32 trainable vars.
#[test]
fn save_bf16_sharded_and_reload() {
    let src = fixture("llama");
    let dir = tempfile::tempdir().unwrap();
    let with_tok = dir.path().join("src");
    std::fs::create_dir(&with_tok).unwrap();
    for f in ["config.json", "model.safetensors", "generation_config.json"] {
        std::fs::copy(src.join(f), with_tok.join(f)).unwrap();
    }
    Tokenizer::save_byte_level(&with_tok).unwrap();
    let model = load_model(&with_tok, DType::F32, &Device::Cpu).unwrap();
    let out = dir.path().join("bf16");
    let opts = SaveOptions {
        dtype: DType::BF16,
        shards: ShardOptions {
            max_shard_bytes: Some(20_000),
            ..Default::default()
        },
        copy_from: Some(with_tok.clone()),
        replace: false,
    };
    let written = save_model(&out, &model, &opts).unwrap();
    assert!(written.files.len() > 1);
    for f in [
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
        "model.safetensors.index.json",
    ] {
        assert!(out.join(f).is_file(), "{f} missing");
    }
    let store = TensorStore::open(&out).unwrap();
    assert!(store.metas().all(|m| m.dtype == Dtype::BF16));
    let cfg = LlamaConfig::from_path(&out).unwrap();
    assert_eq!(cfg.extra["dtype"], "bfloat16");
    assert_eq!(cfg.num_hidden_layers, 2);
    // bf16 rounding only: logits stay close, and the reloaded f32 vars are exactly the bf16 values.
    let d = max_abs_diff(&logits(&src, DType::F32), &logits(&out, DType::F32));
    assert!(d > 0.0 && d < 0.15, "bf16 round trip changed logits by {d}");
    let (varmap, _) = load_trainable(&out, DType::F32, &Device::Cpu).unwrap();
    let v = varmap.data().lock().unwrap()["model.norm.weight"]
        .as_tensor()
        .clone();
    assert_eq!(v.dtype(), DType::F32);
    let want = store
        .tensor("model.norm.weight", &Device::Cpu)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap();
    assert_eq!(max_abs_diff(&v, &want), 0.0);
    assert!(Tokenizer::from_model_dir(&out).unwrap().adds_bos());
}

fn copy_fixture(name: &str, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(fixture(name).join(f), to.join(f)).unwrap();
    }
}

#[test]
fn truncated_file_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    copy_fixture("llama", dir.path());
    let file = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&file).unwrap();
    std::fs::write(&file, &bytes[..bytes.len() - 100]).unwrap();
    let e = err_text(TensorStore::open(dir.path()).unwrap_err());
    assert!(
        e.contains("model.safetensors") && e.contains("truncated"),
        "{e}"
    );
    std::fs::write(&file, &bytes[..4]).unwrap();
    let e = err_text(TensorStore::open(dir.path()).unwrap_err());
    assert!(
        e.contains("model.safetensors") && e.contains("too short"),
        "{e}"
    );
    std::fs::write(&file, &bytes[..500]).unwrap();
    let e = err_text(TensorStore::open(dir.path()).unwrap_err());
    assert!(
        e.contains("model.safetensors") && e.contains("header"),
        "{e}"
    );
}

#[test]
fn corrupt_header_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    copy_fixture("llama", dir.path());
    let file = dir.path().join("model.safetensors");
    let mut bytes = std::fs::read(&file).unwrap();
    bytes[9] = b'#';
    std::fs::write(&file, &bytes).unwrap();
    let e = err_text(TensorStore::open(dir.path()).unwrap_err());
    assert!(
        e.contains("model.safetensors") && e.contains("corrupt header"),
        "{e}"
    );
}

#[test]
fn missing_tensor_and_shape_mismatch_name_the_tensor() {
    let store = TensorStore::open(&fixture("llama")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    copy_fixture("llama", dir.path());
    let mut specs = specs_of(&store);
    specs.retain(|s| s.name != "model.layers.1.self_attn.k_proj.weight");
    write_safetensors(&dir.path().join("model.safetensors"), &specs, |s| {
        Ok(Cow::Owned(store.bytes(&s.name)?))
    })
    .unwrap();
    let e = err_text(load_model(dir.path(), DType::F32, &Device::Cpu).unwrap_err());
    assert!(
        e.contains("model.layers.1.self_attn.k_proj.weight") && e.contains("missing"),
        "{e}"
    );

    let mut cfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixture("llama").join("config.json")).unwrap(),
    )
    .unwrap();
    cfg["intermediate_size"] = 48.into();
    std::fs::write(dir.path().join("config.json"), cfg.to_string()).unwrap();
    std::fs::copy(
        fixture("llama").join("model.safetensors"),
        dir.path().join("model.safetensors"),
    )
    .unwrap();
    let e = err_text(load_model(dir.path(), DType::F32, &Device::Cpu).unwrap_err());
    assert!(
        e.contains("model.layers.0.mlp.gate_proj.weight")
            && e.contains("[64, 32]")
            && e.contains("model.safetensors"),
        "{e}"
    );
}

#[test]
fn sharded_index_pointing_to_wrong_file_is_an_error() {
    let store = TensorStore::open(&fixture("llama")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    write_checkpoint(
        dir.path(),
        &specs_of(&store),
        ShardOptions {
            max_shard_bytes: Some(60_000),
            ..Default::default()
        },
        |s| Ok(Cow::Owned(store.bytes(&s.name)?)),
    )
    .unwrap();
    let path = dir.path().join("model.safetensors.index.json");
    let mut index: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    index["weight_map"]["model.norm.weight"] = "model-00001-of-00003.safetensors".into();
    std::fs::write(&path, index.to_string()).unwrap();
    let e = err_text(TensorStore::open(dir.path()).unwrap_err());
    assert!(
        e.contains("model.norm.weight") && e.contains("does not contain it"),
        "{e}"
    );
}

/// f16 checkpoints load, and the model also computes in bf16 / f16 (close to f32 logits).
#[test]
fn half_precision_checkpoints_and_compute() {
    let src = fixture("llama");
    let reference = logits(&src, DType::F32);
    let dir = tempfile::tempdir().unwrap();
    let model = load_model(&src, DType::F32, &Device::Cpu).unwrap();
    let out = dir.path().join("f16");
    save_model(
        &out,
        &model,
        &SaveOptions {
            dtype: DType::F16,
            ..Default::default()
        },
    )
    .unwrap();
    assert!(TensorStore::open(&out)
        .unwrap()
        .metas()
        .all(|m| m.dtype == Dtype::F16));
    let d = max_abs_diff(&reference, &logits(&out, DType::F32));
    assert!(d > 0.0 && d < 0.02, "f16 weights changed logits by {d}");
    let ids = Tensor::new(&[[1u32, 5, 9, 200, 3, 77]], &Device::Cpu).unwrap();
    for dtype in [DType::BF16, DType::F16] {
        let d = max_abs_diff(&reference, &logits(&src, dtype));
        assert!(d < 0.3, "{dtype:?} compute differs by {d}");
        // A converted copy computes the same as a model loaded in that dtype.
        let copy = model.to(dtype, &Device::Cpu).unwrap();
        assert_eq!(copy.dtype(), dtype);
        let c = copy
            .forward(&ids, &ForwardOptions::default())
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap();
        assert_eq!(max_abs_diff(&c, &logits(&src, dtype)), 0.0);
    }
}

/// Trainable variables (f32 masters) saved with `save_varmap` reload to the same values.
#[test]
fn save_varmap_round_trips() {
    let src = fixture("mistral");
    let (varmap, model) = load_trainable(&src, DType::F32, &Device::Cpu).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("saved");
    dusflow::model::save_varmap(&out, model.config(), &varmap, &SaveOptions::default()).unwrap();
    let a = TensorStore::open(&src).unwrap();
    let b = TensorStore::open(&out).unwrap();
    assert_eq!(a.len(), b.len());
    for name in a.names() {
        assert_eq!(a.bytes(name).unwrap(), b.bytes(name).unwrap(), "{name}");
    }
}

/// A producer returning the wrong number of bytes, or a duplicated name, fails and leaves no file behind.
#[test]
fn writer_rejects_bad_input_and_cleans_up() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.safetensors");
    let specs = vec![TensorSpec::new("a", Dtype::F32, vec![2, 2])];
    let e =
        err_text(write_safetensors(&path, &specs, |_| Ok(Cow::Owned(vec![0u8; 12]))).unwrap_err());
    assert!(
        e.contains("\"a\"") && e.contains("12 bytes") && e.contains("16"),
        "{e}"
    );
    let twice = vec![specs[0].clone(), specs[0].clone()];
    let e =
        err_text(write_safetensors(&path, &twice, |_| Ok(Cow::Owned(vec![0u8; 16]))).unwrap_err());
    assert!(e.contains("listed twice"), "{e}");
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        0,
        "no partial or temporary file left"
    );
}
