//! Tokenizers: any Hugging Face `tokenizer.json` through the `tokenizers` crate, plus a built-in byte-level
//! tokenizer for tiny models. The built-in one is itself a `tokenizer.json` (256 byte tokens and three
//! specials), so it behaves identically in Rust and in Python (`transformers.AutoTokenizer`).

use anyhow::{anyhow, Context, Result};
use serde_json::{json, Value};
use std::path::Path;

/// Id of `<s>` in the byte-level tokenizer.
pub const BYTE_BOS: u32 = 256;
/// Id of `</s>` in the byte-level tokenizer.
pub const BYTE_EOS: u32 = 257;
/// Id of `<pad>` in the byte-level tokenizer.
pub const BYTE_PAD: u32 = 258;
/// Vocabulary size of the byte-level tokenizer (256 bytes + 3 specials).
pub const BYTE_VOCAB: usize = 259;

/// A token's `(start, end)` byte range in the encoded text.
pub type ByteRange = (usize, usize);

/// A text tokenizer with its special-token ids.
#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    bos: Option<u32>,
    eos: Option<u32>,
    pad: Option<u32>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab", &self.vocab_size())
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .finish()
    }
}

impl Tokenizer {
    /// Loads `tokenizer.json` from a model folder. Special tokens come from `tokenizer_config.json` or
    /// `special_tokens_map.json` (`bos_token`, `eos_token`, `pad_token`), else from `config.json` ids.
    pub fn from_model_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        let inner = tokenizers::Tokenizer::from_file(&path)
            .map_err(|e| anyhow!("loading {}: {e}", path.display()))?;
        let mut tok = Tokenizer {
            inner,
            bos: None,
            eos: None,
            pad: None,
        };
        for file in ["tokenizer_config.json", "special_tokens_map.json"] {
            if let Some(v) = read_json(&dir.join(file))? {
                tok.bos = tok.bos.or_else(|| tok.special_id(&v, "bos_token"));
                tok.eos = tok.eos.or_else(|| tok.special_id(&v, "eos_token"));
                tok.pad = tok.pad.or_else(|| tok.special_id(&v, "pad_token"));
            }
        }
        if let Some(cfg) = read_json(&dir.join("config.json"))? {
            let id = |k: &str| {
                cfg.get(k)
                    .and_then(|v| v.as_u64().or_else(|| v.get(0).and_then(Value::as_u64)))
            };
            tok.bos = tok.bos.or(id("bos_token_id").map(|v| v as u32));
            tok.eos = tok.eos.or(id("eos_token_id").map(|v| v as u32));
            tok.pad = tok.pad.or(id("pad_token_id").map(|v| v as u32));
        }
        Ok(tok)
    }

    /// The built-in byte-level tokenizer: ids 0..=255 are the bytes, then `<s>`, `</s>`, `<pad>`;
    /// BOS is added when encoding with special tokens.
    pub fn byte_level() -> Self {
        let inner = tokenizers::Tokenizer::from_bytes(byte_level_json().to_string().as_bytes())
            .expect("the built-in byte-level tokenizer.json is valid");
        Tokenizer {
            inner,
            bos: Some(BYTE_BOS),
            eos: Some(BYTE_EOS),
            pad: Some(BYTE_PAD),
        }
    }

    /// Writes the byte-level tokenizer into `dir`: `tokenizer.json`, `tokenizer_config.json` and
    /// `special_tokens_map.json`, loadable by [`Tokenizer::from_model_dir`] and by transformers.
    pub fn save_byte_level(dir: &Path) -> Result<()> {
        let specials = json!({"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"});
        let mut config = specials.clone();
        let obj = config.as_object_mut().expect("object");
        obj.insert("tokenizer_class".into(), json!("PreTrainedTokenizerFast"));
        obj.insert("add_bos_token".into(), json!(true));
        obj.insert("add_eos_token".into(), json!(false));
        obj.insert("clean_up_tokenization_spaces".into(), json!(false));
        obj.insert("model_max_length".into(), json!(1_000_000_000u64));
        for (name, v) in [
            ("tokenizer.json", byte_level_json()),
            ("tokenizer_config.json", config),
            ("special_tokens_map.json", specials),
        ] {
            let path = dir.join(name);
            std::fs::write(&path, serde_json::to_string_pretty(&v)? + "\n")
                .with_context(|| format!("writing {}", path.display()))?;
        }
        Ok(())
    }

    /// Token ids of `text`; `add_special_tokens` applies the tokenizer's template (e.g. a leading BOS).
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, add_special_tokens)
            .map_err(|e| anyhow!("encoding failed: {e}"))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Token ids of `text` and each token's byte range in `text` (added tokens such as `<|im_end|>` are
    /// recognised in the text either way; `add_special_tokens` applies the post-processor, e.g. BOS).
    pub fn encode_with_offsets(
        &self,
        text: &str,
        add_special_tokens: bool,
    ) -> Result<(Vec<u32>, Vec<ByteRange>)> {
        let enc = self
            .inner
            .encode(text, add_special_tokens)
            .map_err(|e| anyhow!("encoding failed: {e}"))?;
        Ok((enc.get_ids().to_vec(), enc.get_offsets().to_vec()))
    }

    /// Text of `ids`, optionally dropping special tokens.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| anyhow!("decoding failed: {e}"))
    }

    /// Begin-of-sequence id, if known.
    pub fn bos_id(&self) -> Option<u32> {
        self.bos
    }

    /// End-of-sequence id, if known.
    pub fn eos_id(&self) -> Option<u32> {
        self.eos
    }

    /// Padding id, if known.
    pub fn pad_id(&self) -> Option<u32> {
        self.pad
    }

    /// Whether encoding with special tokens puts BOS first (Llama and Mistral tokenizers do).
    pub fn adds_bos(&self) -> bool {
        match (self.bos, self.encode("a", true)) {
            (Some(bos), Ok(ids)) => ids.first() == Some(&bos),
            _ => false,
        }
    }

    /// Number of ids including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Id of a token string, if in the vocabulary.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The underlying `tokenizers` tokenizer.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    fn special_id(&self, config: &Value, key: &str) -> Option<u32> {
        let v = config.get(key)?;
        let text = v
            .as_str()
            .or_else(|| v.get("content").and_then(Value::as_str))?;
        self.inner.token_to_id(text)
    }
}

fn read_json(path: &Path) -> Result<Option<Value>> {
    if !path.is_file() {
        return Ok(None);
    }
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(Some(serde_json::from_str(&text).with_context(|| {
        format!("{}: invalid JSON", path.display())
    })?))
}

/// GPT-2's reversible byte → printable character map used by byte-level BPE.
fn byte_to_char(b: u8) -> char {
    let printable = |b: u8| {
        (b'!'..=b'~').contains(&b) || (0xA1..=0xAC).contains(&b) || (0xAE..=0xFF).contains(&b)
    };
    if printable(b) {
        return char::from(b);
    }
    let rank = (0..b).filter(|&x| !printable(x)).count() as u32;
    char::from_u32(256 + rank).expect("valid char")
}

/// The `tokenizer.json` of the byte-level tokenizer.
fn byte_level_json() -> Value {
    let mut vocab = serde_json::Map::new();
    for b in 0..=255u8 {
        vocab.insert(byte_to_char(b).to_string(), json!(b as u32));
    }
    let special = |id: u32, content: &str| {
        json!({"id": id, "content": content, "single_word": false, "lstrip": false, "rstrip": false,
               "normalized": false, "special": true})
    };
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [special(BYTE_BOS, "<s>"), special(BYTE_EOS, "</s>"), special(BYTE_PAD, "<pad>")],
        "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false},
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {"<s>": {"id": "<s>", "ids": [BYTE_BOS], "tokens": ["<s>"]}}
        },
        "decoder": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
            "vocab": vocab, "merges": []
        }
    })
}
