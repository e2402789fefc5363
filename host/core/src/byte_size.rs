//! Sizes as workflows write them (`shard_size = "5GB"`): one grammar for every step.

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::fmt;

/// The largest shard a model file may have: a number of bytes, or no limit (one file).
///
/// Written as an integer (bytes) or text: a number with an optional unit — `B`, `KB`, `MB`, `GB`, `TB`
/// (powers of 1000, as Hugging Face and mergekit use them) or `KiB`, `MiB`, `GiB`, `TiB` (powers of 1024);
/// `"none"` or `0` for no limit. Parsed when the workflow loads, so a bad size is reported at its line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "SizeText", into = "SizeText")]
pub enum ShardSize {
    /// Everything in one file.
    Unlimited,
    /// At most this many bytes per shard.
    Bytes(u64),
}

impl ShardSize {
    /// The limit in bytes, `None` for one file.
    pub fn max_bytes(self) -> Option<u64> {
        match self {
            ShardSize::Unlimited => None,
            ShardSize::Bytes(n) => Some(n),
        }
    }

    /// Parses the text form (see the type's documentation).
    pub fn parse(text: &str) -> Result<Self> {
        let t = text.trim();
        if t.eq_ignore_ascii_case("none") || t == "0" {
            return Ok(ShardSize::Unlimited);
        }
        let split = t
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(t.len());
        let (number, unit) = t.split_at(split);
        let number: f64 = number
            .parse()
            .with_context(|| format!("{text:?} is not a size like \"5GB\" or \"500MiB\""))?;
        let factor: f64 = match unit.trim().to_ascii_uppercase().as_str() {
            "" | "B" => 1.0,
            "KB" => 1e3,
            "MB" => 1e6,
            "GB" => 1e9,
            "TB" => 1e12,
            "KIB" => 1024.0,
            "MIB" => 1024.0 * 1024.0,
            "GIB" => 1024.0f64.powi(3),
            "TIB" => 1024.0f64.powi(4),
            other => bail!(
                "size {text:?}: unknown unit {other:?} (B, KB, MB, GB, TB, KiB, MiB, GiB, TiB)"
            ),
        };
        let bytes = (number * factor).round();
        if bytes < 1.0 {
            bail!("size {text:?} is below one byte");
        }
        Ok(ShardSize::Bytes(bytes as u64))
    }
}

impl fmt::Display for ShardSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ShardSize::Unlimited => f.write_str("none"),
            ShardSize::Bytes(n) => write!(f, "{n}"),
        }
    }
}

/// The serialised form: an integer number of bytes or a text.
#[derive(Serialize, Deserialize)]
#[serde(untagged)]
enum SizeText {
    Bytes(u64),
    Text(String),
}

impl TryFrom<SizeText> for ShardSize {
    type Error = anyhow::Error;
    fn try_from(value: SizeText) -> Result<Self> {
        match value {
            SizeText::Bytes(0) => Ok(ShardSize::Unlimited),
            SizeText::Bytes(n) => Ok(ShardSize::Bytes(n)),
            SizeText::Text(t) => ShardSize::parse(&t),
        }
    }
}

impl From<ShardSize> for SizeText {
    fn from(size: ShardSize) -> SizeText {
        match size {
            ShardSize::Unlimited => SizeText::Text("none".into()),
            ShardSize::Bytes(n) => SizeText::Bytes(n),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units_are_decimal_or_binary_and_none_means_one_file() {
        let bytes = |t: &str| ShardSize::parse(t).unwrap().max_bytes();
        assert_eq!(bytes("5GB"), Some(5_000_000_000));
        assert_eq!(bytes("500 MB"), Some(500_000_000));
        assert_eq!(bytes("2GiB"), Some(2 << 30));
        assert_eq!(bytes("1.5kb"), Some(1500));
        assert_eq!(bytes("123"), Some(123));
        assert_eq!(bytes("none"), None);
        assert_eq!(bytes("0"), None);
        assert!(ShardSize::parse("5 parsecs").is_err());
        assert!(ShardSize::parse("GB").is_err());
        assert!(ShardSize::parse("0.1B").is_err());
    }

    #[test]
    fn integers_and_texts_deserialise_to_the_same_size() {
        #[derive(Deserialize)]
        struct T {
            s: ShardSize,
        }
        let a: T = toml::from_str("s = 1000").unwrap();
        let b: T = toml::from_str("s = \"1KB\"").unwrap();
        assert_eq!(a.s, b.s);
        let err = toml::from_str::<T>("s = \"1 furlong\"")
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("unknown unit"), "{err}");
    }
}
