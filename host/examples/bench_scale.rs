//! Benchmark helper for the `scale` step, driven by `scripts/bench-scale.sh` (which times it with
//! `/usr/bin/time -v` beside `cp` and mergekit):
//!
//! - `bench_scale make-model DIR [LAYERS]`: writes a random bf16 Llama (hidden 2048, MLP 5632, 32 heads,
//!   4 KV heads, vocab 32000, untied head; 16 layers ≈ 837 M parameters ≈ 1.67 GB) as a HF folder.
//! - `bench_scale scale SRC OUT M`: SOLAR-scales SRC (layers `[0, n−M)` + `[M, n)`) into OUT, exactly as the
//!   step does (memory-mapped inputs, streaming canonical writer, staging folder renamed into place);
//!   `--no-fsync` writes as a workflow with `durable = false` does.

use anyhow::{bail, Context, Result};
use dusflow::model::checkpoint_writer::{write_checkpoint, ShardOptions, StagingDir, TensorSpec};
use dusflow::steps::scale::{
    builtin_plan, write_scaled, BuiltinPolicy, PolicyParams, SourceModel, WriteOptions,
};
use safetensors::Dtype;
use std::borrow::Cow;
use std::path::Path;
use std::time::Instant;

const HIDDEN: usize = 2048;
const MLP: usize = 5632;
const HEADS: usize = 32;
const KV_HEADS: usize = 4;
const VOCAB: usize = 32000;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        ["make-model", dir] => make_model(Path::new(dir), 16),
        ["make-model", dir, layers] => make_model(Path::new(dir), layers.parse()?),
        ["scale", src, out, m] => scale(Path::new(src), Path::new(out), m.parse()?, true),
        ["scale", src, out, m, "--no-fsync"] => {
            scale(Path::new(src), Path::new(out), m.parse()?, false)
        }
        _ => bail!(
            "usage: bench_scale make-model DIR [LAYERS] | bench_scale scale SRC OUT M [--no-fsync]"
        ),
    }
}

fn make_model(dir: &Path, layers: usize) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    let head_dim = HIDDEN / HEADS;
    let kv = KV_HEADS * head_dim;
    let mut specs = vec![
        TensorSpec::new(
            "model.embed_tokens.weight",
            Dtype::BF16,
            vec![VOCAB, HIDDEN],
        ),
        TensorSpec::new("model.norm.weight", Dtype::BF16, vec![HIDDEN]),
        TensorSpec::new("lm_head.weight", Dtype::BF16, vec![VOCAB, HIDDEN]),
    ];
    for l in 0..layers {
        let p = format!("model.layers.{l}.");
        for (name, shape) in [
            ("input_layernorm.weight", vec![HIDDEN]),
            ("post_attention_layernorm.weight", vec![HIDDEN]),
            ("self_attn.q_proj.weight", vec![HIDDEN, HIDDEN]),
            ("self_attn.k_proj.weight", vec![kv, HIDDEN]),
            ("self_attn.v_proj.weight", vec![kv, HIDDEN]),
            ("self_attn.o_proj.weight", vec![HIDDEN, HIDDEN]),
            ("mlp.gate_proj.weight", vec![MLP, HIDDEN]),
            ("mlp.up_proj.weight", vec![MLP, HIDDEN]),
            ("mlp.down_proj.weight", vec![HIDDEN, MLP]),
        ] {
            specs.push(TensorSpec::new(format!("{p}{name}"), Dtype::BF16, shape));
        }
    }
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    write_checkpoint(dir, &specs, ShardOptions::default(), |spec| {
        let mut bytes = vec![0u8; spec.byte_len()];
        for chunk in bytes.chunks_exact_mut(8) {
            // xorshift64, each 16-bit lane made a finite bf16 of magnitude ~2^-7.
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let v = (state & 0x807F_807F_807F_807F) | 0x3C00_3C00_3C00_3C00;
            chunk.copy_from_slice(&v.to_le_bytes());
        }
        Ok(Cow::Owned(bytes))
    })?;
    let config = serde_json::json!({
        "architectures": ["LlamaForCausalLM"],
        "bos_token_id": 1,
        "eos_token_id": 2,
        "hidden_act": "silu",
        "hidden_size": HIDDEN,
        "intermediate_size": MLP,
        "max_position_embeddings": 4096,
        "model_type": "llama",
        "num_attention_heads": HEADS,
        "num_hidden_layers": layers,
        "num_key_value_heads": KV_HEADS,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": false,
        "torch_dtype": "bfloat16",
        "vocab_size": VOCAB,
    });
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_string_pretty(&config)? + "\n",
    )?;
    let size: usize = specs.iter().map(TensorSpec::byte_len).sum();
    println!(
        "wrote {} ({layers} layers, {:.2} GB)",
        dir.display(),
        size as f64 / 1e9
    );
    Ok(())
}

fn scale(src: &Path, out: &Path, m: usize, durable: bool) -> Result<()> {
    let start = Instant::now();
    let models = vec![SourceModel::open("base", src)?];
    let names = vec!["base".to_string()];
    let counts = vec![models[0].num_layers];
    let plan = builtin_plan(
        BuiltinPolicy::Solar,
        &PolicyParams {
            m: Some(m),
            ..Default::default()
        },
        &names,
        &counts,
    )?;
    let staging = StagingDir::new(out)?;
    let report = write_scaled(
        &models,
        &plan,
        "solar",
        staging.path(),
        &WriteOptions {
            shard: ShardOptions {
                durable,
                ..Default::default()
            },
            ..Default::default()
        },
        &mut |_, _| Ok(()),
    )
    .context("scaling")?;
    staging.commit(true)?;
    println!(
        "scaled {} -> {} layers, {:.2} GB in {:.2} s",
        counts[0],
        report.layers,
        report.total_size as f64 / 1e9,
        start.elapsed().as_secs_f64()
    );
    Ok(())
}
