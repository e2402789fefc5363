//! Edits top-level values of a config.json in place, keeping every other byte of the file as it was.
//!
//! mergekit writes the source config back through transformers with only `num_hidden_layers` (and the dtype,
//! when casting) changed; for a config that transformers wrote, that is the same text with those values
//! replaced, which is what this produces (float formatting, key order and indentation stay untouched).

use anyhow::{bail, Result};
use std::ops::Range;

/// Byte ranges of each top-level key's value in a JSON object text (value text only, no whitespace).
fn top_level_values(text: &str) -> Result<Vec<(String, Range<usize>)>> {
    let bytes = text.as_bytes();
    let mut out = Vec::new();
    let mut depth = 0usize;
    let mut i = 0;
    let mut key: Option<String> = None;
    let mut value_start: Option<usize> = None;
    let mut expecting_key = false;
    while i < bytes.len() {
        let c = bytes[i];
        match c {
            b'"' => {
                let start = i;
                i += 1;
                while i < bytes.len() && bytes[i] != b'"' {
                    i += if bytes[i] == b'\\' { 2 } else { 1 };
                }
                if i >= bytes.len() {
                    bail!("unterminated string");
                }
                if depth == 1 && expecting_key {
                    key = Some(serde_json::from_str(&text[start..=i])?);
                    expecting_key = false;
                } else if depth == 1 && value_start.is_none() && key.is_some() {
                    value_start = Some(start);
                }
            }
            b'{' | b'[' => {
                if depth == 1 && value_start.is_none() && key.is_some() {
                    value_start = Some(i);
                }
                depth += 1;
                if depth == 1 {
                    expecting_key = true;
                }
            }
            b'}' | b']' | b',' => {
                if depth == 1 {
                    if let (Some(k), Some(s)) = (key.take(), value_start.take()) {
                        let end = s + text[s..i].trim_end().len();
                        out.push((k, s..end));
                    }
                    expecting_key = c == b',';
                }
                if c != b',' {
                    depth = depth
                        .checked_sub(1)
                        .ok_or_else(|| anyhow::anyhow!("unbalanced brackets"))?;
                }
            }
            b':' => {}
            c if c.is_ascii_whitespace() => {}
            _ => {
                if depth == 1 && value_start.is_none() && key.is_some() {
                    value_start = Some(i);
                }
            }
        }
        i += 1;
    }
    Ok(out)
}

/// Returns `text` with the value of top-level `key` replaced by `value` (JSON text); `None` when the key is absent.
pub fn replace_value(text: &str, key: &str, value: &str) -> Result<Option<String>> {
    let values = top_level_values(text)?;
    Ok(values
        .into_iter()
        .find(|(k, _)| k == key)
        .map(|(_, r)| format!("{}{value}{}", &text[..r.start], &text[r.end..])))
}

/// Returns `text` with `"key": value` appended as the object's last member, indented like its first member.
pub fn append_member(text: &str, key: &str, value: &str) -> Result<String> {
    let values = top_level_values(text)?;
    let close = text
        .rfind('}')
        .ok_or_else(|| anyhow::anyhow!("not a JSON object"))?;
    let key_json = serde_json::to_string(key)?;
    let Some((_, last)) = values.last() else {
        return Ok(format!(
            "{}{key_json}: {value}{}",
            &text[..close],
            &text[close..]
        ));
    };
    let indent = {
        let first_key = text.find('"').unwrap_or(0);
        let line_start = text[..first_key].rfind('\n').map_or(0, |p| p + 1);
        text[line_start..first_key].to_string()
    };
    let sep = if text[..values[0].1.start].contains('\n') {
        format!(",\n{indent}")
    } else {
        ", ".to_string()
    };
    Ok(format!(
        "{}{sep}{key_json}: {value}{}",
        &text[..last.end],
        &text[last.end..]
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONFIG: &str = "{\n  \"a\": {\"x\": [1, 2], \"num_hidden_layers\": 3},\n  \"num_hidden_layers\": 32,\n  \"rms_norm_eps\": 1e-06,\n  \"s\": \"q\\\"}\"\n}\n";

    #[test]
    fn only_the_top_level_value_changes() {
        let out = replace_value(CONFIG, "num_hidden_layers", "48")
            .unwrap()
            .unwrap();
        assert_eq!(
            out,
            CONFIG.replace("\"num_hidden_layers\": 32", "\"num_hidden_layers\": 48")
        );
        let out = replace_value(CONFIG, "s", "\"bfloat16\"").unwrap().unwrap();
        assert!(out.ends_with("\"s\": \"bfloat16\"\n}\n"), "{out}");
        assert_eq!(replace_value(CONFIG, "x", "1").unwrap(), None);
    }

    #[test]
    fn appended_members_follow_the_indentation() {
        let out = append_member(CONFIG, "torch_dtype", "\"bfloat16\"").unwrap();
        assert!(
            out.ends_with("\"s\": \"q\\\"}\",\n  \"torch_dtype\": \"bfloat16\"\n}\n"),
            "{out}"
        );
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["torch_dtype"], "bfloat16");
        assert_eq!(append_member("{}", "k", "1").unwrap(), "{\"k\": 1}");
    }
}
