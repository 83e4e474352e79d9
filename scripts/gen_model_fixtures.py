"""Reference logits, losses and LoRA gradients from transformers and PEFT, on tiny random models.

    .venv/bin/python scripts/gen_model_fixtures.py tests/fixtures/lm

For each model writes `<name>/` (an f32 Hugging Face directory) and `<name>.expected.safetensors`:
input_ids/attention_mask/labels (right-padded batch of 2), f32 `logits` and `loss`; `logits_nf4`
with every linear weight replaced by bitsandbytes' NF4 (double quant, block 64) dequantization;
and for adapters: `<name>-lora/` (a PEFT adapter with non-zero B), `lora_logits`, `lora_loss`
and `grad.<peft tensor name>` for every lora_A and lora_B.
"""

import sys

import bitsandbytes
import bitsandbytes.functional as F
import peft
import torch
import transformers
from peft import LoraConfig, get_peft_model
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, LlamaConfig, Phi3Config, Qwen2Config, Qwen3Config

out = sys.argv[1]
torch.manual_seed(11)

common = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    rms_norm_eps=1e-5,
)
models = {
    "llama-gqa": (LlamaConfig(**common, tie_word_embeddings=False, rope_theta=10000.0), True),
    "llama3-tied": (
        LlamaConfig(
            **{**common, "num_key_value_heads": 1},
            head_dim=32,
            tie_word_embeddings=True,
            rope_theta=500000.0,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16,
            },
        ),
        False,
    ),
    "qwen2": (Qwen2Config(**common, tie_word_embeddings=False, rope_theta=1000000.0), True),
    # q/k norms, no q/k/v bias, a head_dim that is not hidden/heads, tied embeddings.
    "qwen3": (Qwen3Config(**common, head_dim=32, tie_word_embeddings=True, rope_theta=1000000.0), True),
    # Fused qkv_proj and gate_up_proj; a sliding window wider than the sequences.
    "phi3": (
        Phi3Config(**common, tie_word_embeddings=False, rope_theta=10000.0, sliding_window=32,
                   pad_token_id=0, bos_token_id=1, eos_token_id=2),
        True,
    ),
    # LongRoPE: the 8-token batch is longer than the 4-token pretraining length, so the long
    # factors apply, and cos/sin carry the attention factor of max/original = 16.
    "phi3-longrope": (
        Phi3Config(
            **{**common, "max_position_embeddings": 64},
            original_max_position_embeddings=4,
            tie_word_embeddings=True,
            rope_theta=10000.0,
            pad_token_id=0, bos_token_id=1, eos_token_id=2,
            rope_scaling={
                "rope_type": "longrope",
                "short_factor": [1.0, 1.1, 1.3, 1.6, 2.0, 2.5, 3.1, 3.8],
                "long_factor": [1.0, 1.5, 2.2, 3.4, 5.0, 7.5, 11.0, 16.0],
            },
        ),
        True,
    ),
}

input_ids = torch.randint(0, 128, (2, 8))
attention_mask = torch.ones(2, 8, dtype=torch.int64)
attention_mask[1, 5:] = 0
labels = input_ids.clone()
labels[attention_mask == 0] = -100

versions = {
    "generator": "scripts/gen_model_fixtures.py",
    "transformers": transformers.__version__,
    "peft": peft.__version__,
    "bitsandbytes": bitsandbytes.__version__,
    "torch": torch.__version__,
}

for name, (cfg, with_lora) in models.items():
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(0.08 * torch.randn_like(p))
    model.eval()
    model.save_pretrained(f"{out}/{name}")
    expected = {
        "input_ids": input_ids.to(torch.int64),
        "attention_mask": attention_mask,
        "labels": labels,
    }
    with torch.no_grad():
        r = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    expected["logits"] = r.logits.contiguous()
    expected["loss"] = r.loss.reshape(1)

    # The same model on NF4-dequantized linear weights.
    nf4 = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32, attn_implementation="eager")
    nf4.load_state_dict(model.state_dict())
    with torch.no_grad():
        for n, mod in nf4.named_modules():
            if isinstance(mod, torch.nn.Linear) and n != "lm_head":
                # Flat, as bitsandbytes' CUDA kernels see every weight: without the `kernels`
                # package, bitsandbytes 0.50.2's CPU fallback dequantizes a 2-D weight whose rows
                # are not a whole number of blocks with the wrong block scales.
                w = mod.weight.data
                packed, st = F.quantize_4bit(w.flatten(), blocksize=64, compress_statistics=True, quant_type="nf4")
                mod.weight.copy_(F.dequantize_4bit(packed, st).reshape(w.shape))
        expected["logits_nf4"] = nf4(input_ids=input_ids, attention_mask=attention_mask).logits.contiguous()

    if with_lora:
        lcfg = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0, init_lora_weights=False)
        pm = get_peft_model(model, lcfg)
        pm.save_pretrained(f"{out}/{name}-lora")
        r = pm(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
        r.loss.backward()
        expected["lora_logits"] = r.logits.detach().contiguous()
        expected["lora_loss"] = r.loss.detach().reshape(1)
        for n, p in pm.named_parameters():
            if p.requires_grad:
                key = n.replace(".default", "")
                expected["grad." + key] = p.grad.contiguous()
    save_file(expected, f"{out}/{name}.expected.safetensors", metadata=versions)
    print(name, "ok", sorted(k for k in expected if k.startswith("grad."))[:2])
