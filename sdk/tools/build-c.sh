#!/bin/sh
# Builds a C plugin into a component: wit-bindgen c generates the bindings of WORLD, clang-19
# compiles for wasm32-wasi (preview 1, reactor), and wasm-tools adapts the module to a WASI 0.2 component
# with the reactor adapter. Usage (from a plugin.toml build command):
#   sh "$DUS_SDK_TOOLS/build-c.sh" WORLD SOURCE.c...
# Reads DUS_WIT, DUS_OUT, DUS_TOOLCHAINS; the tools come from scripts/install-plugin-toolchains.sh.
set -eu
world="$1"
shift
gen="$(mktemp -d)"
trap 'rm -rf "$gen"' EXIT
wit-bindgen c "$DUS_WIT" --world "$world" --out-dir "$gen" >/dev/null
snake="$(echo "$world" | tr '-' '_')"
clang-19 --target=wasm32-wasi -mexec-model=reactor --sysroot=/usr -O2 -msimd128 \
  -I "$gen" -o "$gen/core.wasm" "$@" "$gen/$snake.c" "$gen/${snake}_component_type.o"
wasm-tools component new "$gen/core.wasm" \
  --adapt "wasi_snapshot_preview1=$DUS_TOOLCHAINS/wasi_snapshot_preview1.reactor.wasm" -o "$DUS_OUT"
