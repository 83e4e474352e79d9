"""Check that an adapter saved by qlorad loads with PEFT and gives qlorad's logits.

    cargo run --release --example lora_interop -- MODEL_DIR OUT_DIR
    .venv/bin/python scripts/check_peft_load.py MODEL_DIR OUT_DIR
"""

import sys

import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

model_dir, out = sys.argv[1], sys.argv[2]
base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
model = PeftModel.from_pretrained(base, f"{out}/adapter")
ref = load_file(f"{out}/logits.safetensors")
with torch.no_grad():
    logits = model(input_ids=ref["input_ids"]).logits
rel = ((logits - ref["logits"]).norm() / ref["logits"].norm()).item()
n = sum(1 for n, _ in model.named_parameters() if "lora_" in n)
print(f"PEFT loaded {n} LoRA tensors from {out}/adapter; logits relative error vs qlorad: {rel:.2e}")
sys.exit(0 if rel <= 1e-5 and n > 0 else 1)
