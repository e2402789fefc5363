//! `dus plugin new`: a plugin folder with a small working example of its kind, in Rust, Python,
//! JavaScript or C, ready for `dus plugin check`.

use super::build::sdk_dir;
use super::types::PluginKind;
use anyhow::{bail, Context, Result};
use std::path::Path;

/// Languages `dus plugin new` scaffolds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Lang {
    /// Rust with the `dusflow-sdk` crate (fastest, smallest components).
    Rust,
    /// Python with componentize-py.
    Python,
    /// JavaScript with componentize-js.
    Js,
    /// C with wit-bindgen c and clang.
    C,
}

/// Every language `dus plugin new` supports.
pub fn languages() -> [Lang; 4] {
    [Lang::Rust, Lang::Python, Lang::Js, Lang::C]
}

/// The example source for (language, kind).
fn template(lang: Lang, kind: PluginKind) -> &'static str {
    use PluginKind::*;
    match (lang, kind) {
        (Lang::Rust, LayerPolicy) => include_str!("templates/rust-layer-policy.rs"),
        (Lang::Rust, DataFilter) => include_str!("templates/rust-data-filter.rs"),
        (Lang::Rust, MergeRule) => include_str!("templates/rust-merge-rule.rs"),
        (Lang::Python, LayerPolicy) => include_str!("templates/python-layer-policy.py"),
        (Lang::Python, DataFilter) => include_str!("templates/python-data-filter.py"),
        (Lang::Python, MergeRule) => include_str!("templates/python-merge-rule.py"),
        (Lang::Js, LayerPolicy) => include_str!("templates/js-layer-policy.js"),
        (Lang::Js, DataFilter) => include_str!("templates/js-data-filter.js"),
        (Lang::Js, MergeRule) => include_str!("templates/js-merge-rule.js"),
        (Lang::C, LayerPolicy) => include_str!("templates/c-layer-policy.c"),
        (Lang::C, DataFilter) => include_str!("templates/c-data-filter.c"),
        (Lang::C, MergeRule) => include_str!("templates/c-merge-rule.c"),
    }
}

/// Creates `dir` with a plugin of `kind` named `name` in `lang`.
pub(crate) fn create(dir: &Path, kind: PluginKind, name: &str, lang: Lang) -> Result<()> {
    let valid = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-';
    if name.is_empty() || !name.chars().all(valid) || name.starts_with('-') {
        bail!("plugin name '{name}' must be lowercase letters, digits and dashes");
    }
    if dir.exists() && std::fs::read_dir(dir)?.next().is_some() {
        bail!("{} already exists and is not empty", dir.display());
    }
    let source = template(lang, kind).replace("{{name}}", name);
    let world = kind.world();
    let files: Vec<(&str, String)> = match lang {
        Lang::Rust => {
            let sdk = std::path::absolute(sdk_dir())?;
            let sdk = sdk.canonicalize().unwrap_or(sdk);
            let manifest = format!(
                r#"[package]
name = "{name}"
version = "0.1.0"
edition = "2021"
description = "{name} ({kind} plugin)"
publish = false

[lib]
crate-type = ["cdylib"]

[dependencies]
dusflow-sdk = {{ path = "{}" }}
serde = {{ version = "1", features = ["derive"] }}
serde_json = "1"

# Built for wasm32-wasip2 by `dus plugin build`; its own workspace.
[workspace]
"#,
                sdk.display()
            );
            vec![("Cargo.toml", manifest), ("src/lib.rs", source)]
        }
        Lang::Python => vec![
            (
                "plugin.toml",
                format!(
                    "[build]\ncommand = 'componentize-py -d \"$DUS_WIT\" -w {world} componentize app -o \"$DUS_OUT\"'\n\
                     requires = [\"componentize-py\"]\n"
                ),
            ),
            ("app.py", source),
        ],
        Lang::Js => vec![
            (
                "plugin.toml",
                format!(
                    "[build]\ncommand = 'node \"$DUS_SDK_TOOLS/componentize-js.mjs\" plugin.js {world}'\n\
                     requires = [\"node\", \"$DUS_TOOLCHAINS/node/node_modules/@bytecodealliance/componentize-js/package.json\"]\n"
                ),
            ),
            ("plugin.js", source),
        ],
        Lang::C => vec![
            (
                "plugin.toml",
                format!(
                    "[build]\ncommand = 'sh \"$DUS_SDK_TOOLS/build-c.sh\" {world} plugin.c'\n\
                     requires = [\"clang-19\", \"wit-bindgen\", \"wasm-tools\", \"$DUS_TOOLCHAINS/wasi_snapshot_preview1.reactor.wasm\"]\n"
                ),
            ),
            ("plugin.c", source),
        ],
    };
    for (rel, text) in files {
        let path = dir.join(rel);
        std::fs::create_dir_all(path.parent().expect("a file in the plugin folder"))?;
        std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(())
}
