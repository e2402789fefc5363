//! `config.json` parsing: both RoPE spellings, and clear refusals of what we do not implement.

use dusflow::model::LlamaConfig;

const LEGACY: &str = r#"{"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 32000,
 "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 48, "num_attention_heads": 32,
 "num_key_value_heads": 8, "rope_theta": 10000.0, "rope_scaling": null, "rms_norm_eps": 1e-5,
 "max_position_embeddings": 4096, "tie_word_embeddings": false, "bos_token_id": 1, "eos_token_id": 2,
 "torch_dtype": "bfloat16", "use_cache": false}"#;

#[test]
fn legacy_solar_like_config_parses_and_round_trips() {
    let cfg = LlamaConfig::from_json_str(LEGACY).unwrap();
    assert_eq!(
        (cfg.num_kv_heads(), cfg.head_dim(), cfg.rope_base()),
        (8, 128, 10000.0)
    );
    assert_eq!(cfg.eos_ids(), vec![2]);
    assert_eq!(cfg.extra["torch_dtype"], "bfloat16");
    assert_eq!(cfg.declared_dtype(), Some(candle_core::DType::BF16));
    // ~10.7B parameters: the SOLAR shape.
    let n = cfg.num_parameters() as f64;
    assert!((10.6e9..10.8e9).contains(&n), "{n}");
    let again = LlamaConfig::from_json_str(&cfg.to_json_string().unwrap()).unwrap();
    assert_eq!(cfg, again);
}

#[test]
fn transformers5_rope_parameters_and_eos_list() {
    let text = LEGACY
        .replace(
            r#""rope_theta": 10000.0, "rope_scaling": null"#,
            r#""rope_parameters": {"rope_type": "default", "rope_theta": 500000.0}"#,
        )
        .replace(r#""eos_token_id": 2"#, r#""eos_token_id": [2, 7]"#);
    let cfg = LlamaConfig::from_json_str(&text).unwrap();
    assert_eq!(cfg.rope_base(), 500000.0);
    assert_eq!(cfg.eos_ids(), vec![2, 7]);
}

fn refused(text: &str) -> String {
    format!("{:#}", LlamaConfig::from_json_str(text).unwrap_err())
}

#[test]
fn unsupported_options_are_refused_clearly() {
    let e = refused(&LEGACY.replace(
        r#""rope_scaling": null"#,
        r#""rope_scaling": {"rope_type": "llama3", "factor": 8.0}"#,
    ));
    assert!(e.contains("rope_scaling") && e.contains("llama3"), "{e}");
    let e = refused(&LEGACY.replace("LlamaForCausalLM", "GemmaForCausalLM"));
    assert!(
        e.contains("GemmaForCausalLM") && e.contains("unsupported architecture"),
        "{e}"
    );
    let e = refused(&LEGACY.replace(r#""use_cache": false"#, r#""attention_bias": true"#));
    assert!(e.contains("attention_bias"), "{e}");
    let e = refused(&LEGACY.replace(r#""num_key_value_heads": 8"#, r#""num_key_value_heads": 5"#));
    assert!(e.contains("num_key_value_heads"), "{e}");
    let e = refused(&LEGACY.replace(r#""hidden_size": 4096,"#, ""));
    assert!(e.contains("hidden_size"), "{e}");
}
