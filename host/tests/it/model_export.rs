//! Writes model folders for the transformers load check (`host/tests/fixtures/model/check_hf_load.py`,
//! driven by `scripts/check-model-hf.sh`). Ignored in normal runs: it needs a Python side to be meaningful.

use candle_core::{DType, Device, Tensor};
use dusflow::model::{
    init_trainable, load_model, save_model, ForwardOptions, LlamaConfig, SaveOptions, ShardOptions,
    Tokenizer,
};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

const TEXTS: &[&str] = &["Hello, world!", "naïve café 😀", "</s> and <s> inside"];

fn logits_of(dir: &Path, ids: &Tensor) -> Tensor {
    let model = load_model(dir, DType::F32, &Device::Cpu).unwrap();
    model.forward(ids, &ForwardOptions::default()).unwrap()
}

#[test]
#[ignore = "writes folders for check_hf_load.py; run scripts/check-model-hf.sh"]
fn export_for_transformers_check() {
    let out = PathBuf::from(std::env::var("DUSFLOW_EXPORT_DIR").expect("set DUSFLOW_EXPORT_DIR"));
    std::fs::create_dir_all(&out).unwrap();
    let dev = Device::Cpu;
    let fixtures = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/model");
    let tok_src = tempfile::tempdir().unwrap();
    Tokenizer::save_byte_level(tok_src.path()).unwrap();

    // 1. A fresh model from a config (tied, GQA), byte-level tokenizer, bf16, sharded.
    let mut cfg = LlamaConfig::tiny(259, 64, 128, 3, 4, 2);
    cfg.tie_word_embeddings = true;
    cfg.initializer_range = 0.2;
    cfg.bos_token_id = Some(256);
    cfg.eos_token_id = Some(dusflow::model::config::TokenIds::One(257));
    cfg.pad_token_id = Some(258);
    let (_, fresh) = init_trainable(&cfg, 1234, DType::F32, &dev).unwrap();
    let opts = SaveOptions {
        dtype: DType::BF16,
        shards: ShardOptions {
            max_shard_bytes: Some(60_000),
            ..Default::default()
        },
        copy_from: Some(tok_src.path().to_path_buf()),
        replace: true,
    };
    save_model(&out.join("fresh_tied_bf16"), &fresh, &opts).unwrap();
    // 2. The Llama fixture re-saved in f32, sharded, with its generation config.
    let llama = load_model(&fixtures.join("llama"), DType::F32, &dev).unwrap();
    let opts = SaveOptions {
        dtype: DType::F32,
        shards: ShardOptions {
            max_shard_bytes: Some(50_000),
            ..Default::default()
        },
        copy_from: Some(fixtures.join("llama")),
        replace: true,
    };
    save_model(&out.join("llama_f32_sharded"), &llama, &opts).unwrap();
    // 3. The Mistral fixture (tied, sliding window) as one bf16 file.
    let mistral = load_model(&fixtures.join("mistral"), DType::F32, &dev).unwrap();
    let opts = SaveOptions {
        dtype: DType::BF16,
        replace: true,
        ..Default::default()
    };
    save_model(&out.join("mistral_bf16"), &mistral, &opts).unwrap();

    let ids = Tensor::new(
        &[
            [256u32, 72, 101, 108, 108, 111, 44, 32, 119, 111],
            [256, 1, 2, 3, 90, 91, 92, 93, 94, 95],
        ],
        &dev,
    )
    .unwrap();
    let mut outputs: HashMap<String, Tensor> = HashMap::new();
    let small: Vec<Vec<u32>> = ids
        .to_vec2::<u32>()
        .unwrap()
        .iter()
        .map(|r| r.iter().map(|t| t % 97).collect())
        .collect();
    let small_ids = Tensor::new(small, &dev).unwrap();
    outputs.insert("input_ids".into(), ids.to_dtype(DType::I64).unwrap());
    outputs.insert(
        "mistral_input_ids".into(),
        small_ids.to_dtype(DType::I64).unwrap(),
    );
    for name in ["fresh_tied_bf16", "llama_f32_sharded"] {
        outputs.insert(format!("{name}.logits"), logits_of(&out.join(name), &ids));
    }
    outputs.insert(
        "mistral_bf16.logits".into(),
        logits_of(&out.join("mistral_bf16"), &small_ids),
    );
    let tok = Tokenizer::from_model_dir(&out.join("fresh_tied_bf16")).unwrap();
    for (i, text) in TEXTS.iter().enumerate() {
        let ids = tok.encode(text, true).unwrap();
        outputs.insert(
            format!("text{i}.ids"),
            Tensor::new(ids.as_slice(), &dev)
                .unwrap()
                .to_dtype(DType::I64)
                .unwrap(),
        );
    }
    candle_core::safetensors::save(&outputs, out.join("rust_outputs.safetensors")).unwrap();
    std::fs::write(
        out.join("texts.json"),
        serde_json::to_string(TEXTS).unwrap(),
    )
    .unwrap();
}
