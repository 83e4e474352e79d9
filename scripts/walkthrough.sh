#!/usr/bin/env bash
# The README walkthrough, end to end: fetch SmolLM2-135M-Instruct (GGUF), start the server,
# upload the Lumenfold dataset, train with a GGUF export, follow the events, download the GGUF.
#
#   scripts/walkthrough.sh [PORT]        # needs curl and python3; writes ./data and ./runs/
set -euo pipefail
cd "$(dirname "$0")/.."
port=${1:-8080}
api=http://127.0.0.1:$port
scripts/fetch_smollm2.sh
cargo build --release
./target/release/qlorad serve --listen 127.0.0.1:$port &
server=$!
trap 'kill $server' EXIT
until curl -sf $api/healthz >/dev/null; do sleep 0.5; done
curl -s $api/models; echo

id() { python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])'; }
train=$(curl -s -X POST --data-binary @examples/lumenfold/train.jsonl "$api/files?filename=train.jsonl" | id)
valid=$(curl -s -X POST --data-binary @examples/lumenfold/valid.jsonl "$api/files?filename=valid.jsonl" | id)
job=$(curl -s -X POST $api/jobs -H 'content-type: application/json' -d @- <<JSON | id
{
  "model": "SmolLM2-135M-Instruct.Q4_1.gguf",
  "training_file": "$train",
  "validation_file": "$valid",
  "hyperparameters": {"n_epochs": 2, "batch_size": 8, "learning_rate": 1e-3,
                      "lr_scheduler": "cosine", "warmup_ratio": 0.05, "max_seq_len": 128},
  "lora": {"r": 16, "alpha": 32, "dropout": 0.05},
  "eval_every": 19,
  "export": {"gguf": ["q8_0"], "gguf_lora": true}
}
JSON
)
echo "job $job"
start=$(date +%s)
# Server-Sent Events until the job ends (the stream closes then).
curl -sN -H 'accept: text/event-stream' $api/jobs/$job/events | python3 scripts/follow_events.py
echo "job took $(( $(date +%s) - start )) s"
curl -s $api/jobs/$job; echo
curl -s $api/jobs/$job/artifacts | python3 -c 'import json,sys; [print(a["name"], a["bytes"]) for a in json.load(sys.stdin)["data"]]'
mkdir -p runs
curl -s -o runs/lumenfold-q8_0.gguf $api/jobs/$job/artifacts/SmolLM2-135M-Instruct.Q4_1-q8_0.gguf
curl -s -o runs/lumenfold-lora.gguf $api/jobs/$job/artifacts/SmolLM2-135M-Instruct.Q4_1-lora.gguf
rm -rf runs/lumenfold-adapter
# The adapter (PEFT format) too, file by file, for `qlorad generate --adapter`.
for f in adapter_config.json adapter_model.safetensors; do
    mkdir -p runs/lumenfold-adapter
    curl -s -o runs/lumenfold-adapter/$f $api/jobs/$job/artifacts/adapter/$f
done
ls -la runs/lumenfold-q8_0.gguf runs/lumenfold-lora.gguf runs/lumenfold-adapter
