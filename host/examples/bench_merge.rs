//! Merge benchmark helper; `scripts/bench-merge.sh` drives it side by side with mergekit and prints ratios.
//!
//! - `bench_merge gen DIR [LAYERS]`: writes three random bf16 Llamas (`DIR/base`, `DIR/a`, `DIR/b`; hidden
//!   2048, MLP 5632, 32 heads / 4 KV heads, vocab 32000, untied head; 16 layers ≈ 836 M parameters,
//!   1.67 GB each). `a` and `b` are `base` plus independent noise, like two fine-tunes.
//! - `bench_merge merge METHOD DIR OUT`: our merge (`linear` = average of a and b, `slerp` t = 0.5 from a
//!   to b, `ties` = a and b over base, density 0.5), bf16 output, printing the wall time.
//! - `bench_merge compare X Y`: share of identical elements and the largest bf16 ulp distance.

use anyhow::{bail, Context, Result};
use dusflow::model::{write_checkpoint, ShardOptions, TensorSpec, TensorStore};
use dusflow::steps::merge::elements::Source;
use dusflow::steps::merge::stream::{merge, NamedModel};
use dusflow::steps::merge::MergeConfig;
use indicatif::ProgressBar;
use rayon::prelude::*;
use safetensors::Dtype;
use std::borrow::Cow;
use std::path::{Path, PathBuf};
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
        ["gen", dir] => gen(Path::new(dir), 16),
        ["gen", dir, layers] => gen(Path::new(dir), layers.parse()?),
        ["merge", method, dir, out] => run_merge(method, Path::new(dir), Path::new(out)),
        ["compare", x, y] => compare(Path::new(x), Path::new(y)),
        _ => bail!(
            "usage: bench_merge gen DIR [LAYERS] | merge linear|slerp|ties DIR OUT | compare X Y"
        ),
    }
}

fn shapes(layers: usize) -> Vec<(String, Vec<usize>)> {
    let kv = HIDDEN / HEADS * KV_HEADS;
    let mut s = vec![("model.embed_tokens.weight".to_string(), vec![VOCAB, HIDDEN])];
    for i in 0..layers {
        let p = format!("model.layers.{i}");
        s.push((format!("{p}.self_attn.q_proj.weight"), vec![HIDDEN, HIDDEN]));
        s.push((format!("{p}.self_attn.k_proj.weight"), vec![kv, HIDDEN]));
        s.push((format!("{p}.self_attn.v_proj.weight"), vec![kv, HIDDEN]));
        s.push((format!("{p}.self_attn.o_proj.weight"), vec![HIDDEN, HIDDEN]));
        s.push((format!("{p}.mlp.gate_proj.weight"), vec![MLP, HIDDEN]));
        s.push((format!("{p}.mlp.up_proj.weight"), vec![MLP, HIDDEN]));
        s.push((format!("{p}.mlp.down_proj.weight"), vec![HIDDEN, MLP]));
        s.push((format!("{p}.input_layernorm.weight"), vec![HIDDEN]));
        s.push((format!("{p}.post_attention_layernorm.weight"), vec![HIDDEN]));
    }
    s.push(("model.norm.weight".to_string(), vec![HIDDEN]));
    s.push(("lm_head.weight".to_string(), vec![VOCAB, HIDDEN]));
    s
}

/// SplitMix64 → uniform in [-1, 1).
fn noise(seed: u64, i: u64) -> f32 {
    let mut z = seed.wrapping_add((i + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    (z >> 40) as f32 / (1u64 << 23) as f32 - 1.0
}

fn gen(dir: &Path, layers: usize) -> Result<()> {
    let specs: Vec<TensorSpec> = shapes(layers)
        .into_iter()
        .map(|(n, s)| TensorSpec::new(n, Dtype::BF16, s))
        .collect();
    let params: usize = specs
        .iter()
        .map(|s| s.shape.iter().product::<usize>())
        .sum();
    for (model, seed) in [("base", None), ("a", Some(1u64)), ("b", Some(2u64))] {
        let out = dir.join(model);
        std::fs::create_dir_all(&out)?;
        let started = Instant::now();
        write_checkpoint(&out, &specs, ShardOptions::default(), |spec| {
            let tseed = blake3::hash(spec.name.as_bytes()).as_bytes()[..8]
                .iter()
                .fold(0u64, |a, b| a << 8 | *b as u64);
            let n: usize = spec.shape.iter().product();
            let norm = spec.shape.len() == 1;
            let mut bytes = vec![0u8; n * 2];
            bytes
                .par_chunks_mut(2 << 16)
                .enumerate()
                .for_each(|(c, chunk)| {
                    for (k, o) in chunk.chunks_exact_mut(2).enumerate() {
                        let i = (c * (1 << 16) + k) as u64;
                        let mut v = if norm { 1.0 } else { 0.04 * noise(tseed, i) };
                        if let Some(s) = seed {
                            v += 0.01 * noise(tseed ^ s.wrapping_mul(0x5851_F42D_4C95_7F2D), i);
                        }
                        o.copy_from_slice(&half::bf16::from_f32(v).to_bits().to_le_bytes());
                    }
                });
            Ok(Cow::Owned(bytes))
        })?;
        let config = serde_json::json!({
            "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN,
            "intermediate_size": MLP, "num_hidden_layers": layers, "num_attention_heads": HEADS,
            "num_key_value_heads": KV_HEADS, "vocab_size": VOCAB, "max_position_embeddings": 4096,
            "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": false, "hidden_act": "silu",
            "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "bfloat16"
        });
        std::fs::write(
            out.join("config.json"),
            serde_json::to_string_pretty(&config)?,
        )?;
        eprintln!(
            "{model}: {params} parameters in {:.1} s",
            started.elapsed().as_secs_f64()
        );
    }
    Ok(())
}

fn run_merge(method: &str, dir: &Path, out: &Path) -> Result<()> {
    let toml = match method {
        "linear" => "method = \"linear\"\nweights = [0.5, 0.5]",
        "slerp" => "method = \"slerp\"\nt = 0.5",
        "ties" => "method = \"ties\"\nweights = [1.0, 1.0]\ndensity = 0.5",
        other => bail!("unknown method {other}"),
    };
    let config: MergeConfig = toml::from_str(&format!("{toml}\ndtype = \"bfloat16\""))?;
    let named = |m: &str| NamedModel {
        name: m.into(),
        path: dir.join(m),
    };
    let base = (method == "ties").then(|| named("base"));
    std::fs::create_dir_all(out)?;
    let started = Instant::now();
    let summary = merge(
        &config,
        &[named("a"), named("b")],
        base.as_ref(),
        0,
        out,
        true,
        &ProgressBar::hidden(),
        &|| false,
    )?;
    eprintln!(
        "dusflow {method}: {} tensors, {} bytes in {:.2} s",
        summary.tensors,
        summary.bytes,
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn compare(x: &Path, y: &Path) -> Result<()> {
    let (a, b) = (TensorStore::open(x)?, TensorStore::open(y)?);
    let (mut total, mut same, mut max_ulps) = (0usize, 0usize, 0u32);
    for name in a.names() {
        let decode = |s: &TensorStore| -> Result<Vec<f32>> {
            let meta = s
                .meta(name)
                .with_context(|| PathBuf::from(y).display().to_string())?;
            let mut v = vec![0f32; meta.numel()];
            Source {
                bytes: &s.bytes(name)?,
                dtype: meta.dtype,
            }
            .decode(0, &mut v);
            Ok(v)
        };
        let (va, vb) = (decode(&a)?, decode(&b)?);
        let key = |v: f32| {
            let bits = (v.to_bits() >> 16) as i32;
            if bits < 0 {
                i32::MIN - bits
            } else {
                bits
            }
        };
        for (p, q) in va.iter().zip(&vb) {
            total += 1;
            same += (p.to_bits() == q.to_bits()) as usize;
            max_ulps = max_ulps.max(key(*p).abs_diff(key(*q)));
        }
    }
    println!(
        "identical {same} of {total} ({:.5} %), max {max_ulps} bf16 ulp",
        same as f64 / total as f64 * 100.0
    );
    Ok(())
}
