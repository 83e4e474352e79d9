"""Tiny causal LMs and their bitsandbytes 4-bit copies, made by transformers on the CPU.

    .venv/bin/python scripts/gen_bnb_model_fixture.py tests/fixtures/models

For each architecture (llama, qwen2 with q/k/v bias, qwen3 with q/k norms, phi3 with fused
linears) writes:
  <arch>/           a random-weight bf16 model directory (save_pretrained)
  <arch>-bnb-nf4/   the same model loaded with BitsAndBytesConfig(load_in_4bit, nf4, double quant)
                    and saved again: the `*-bnb-4bit` layout users download
  <arch>-bnb-nf4.dequant.safetensors
                    every 4-bit linear dequantized by bitsandbytes, in bf16
"""

import copy
import json
import sys

import bitsandbytes
import bitsandbytes.functional as F
import torch
import transformers
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, Phi3Config, Qwen2Config, Qwen3Config

out = sys.argv[1]
torch.manual_seed(7)

common = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=160,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    tie_word_embeddings=False,
)
configs = {
    "llama": LlamaConfig(**common),
    "qwen2": Qwen2Config(**common),
    "qwen3": Qwen3Config(**common, head_dim=32),
    # fused qkv_proj and gate_up_proj, each one 4-bit weight
    "phi3": Phi3Config(**common, pad_token_id=0, bos_token_id=1, eos_token_id=2),
}

for arch, cfg in configs.items():
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    # from_config leaves some weights at exact init values; make every weight distinct
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p, dtype=torch.float32).mul_(0.05).to(p.dtype))
    model.save_pretrained(f"{out}/{arch}")

    qcfg = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
    q = AutoModelForCausalLM.from_pretrained(f"{out}/{arch}", quantization_config=qcfg, device_map="cpu")
    q.save_pretrained(f"{out}/{arch}-bnb-nf4")

    deq = {}
    for name, module in q.named_modules():
        if isinstance(module, bitsandbytes.nn.Linear4bit):
            w = module.weight
            # Flat, as the CUDA kernels see it: without the `kernels` package, bitsandbytes
            # 0.50.2's CPU fallback gets 2-D weights whose rows are not whole blocks wrong.
            st = copy.copy(w.quant_state)
            st.shape = torch.Size([st.shape.numel()])
            deq[name + ".weight"] = F.dequantize_4bit(w.data, st).reshape(w.quant_state.shape).contiguous()
    save_file(
        deq,
        f"{out}/{arch}-bnb-nf4.dequant.safetensors",
        metadata={
            "generator": "scripts/gen_bnb_model_fixture.py",
            "bitsandbytes": bitsandbytes.__version__,
            "transformers": transformers.__version__,
            "torch": torch.__version__,
        },
    )
    print(arch, sorted(deq)[:3], len(deq))
