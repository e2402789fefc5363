//! Step params: JSON (the step's TOML table) deserialised into the plugin's own type.

use serde::de::DeserializeOwned;
use serde::Deserialize;

/// Params type of a plugin that takes none: accepts `{}` (and ignores nothing: unknown keys fail).
#[derive(Debug, Clone, Copy, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NoParams {}

/// Parses the step's params; the error says which key was wrong, in serde's words.
pub fn parse_params<P: DeserializeOwned>(json: &str) -> Result<P, String> {
    serde_json::from_str(json).map_err(|e| format!("invalid params {json}: {e}"))
}
