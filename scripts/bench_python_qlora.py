"""The Python QLoRA recipe's training speed and memory on a GPU: transformers + PEFT +
bitsandbytes, NF4 with double quantization, bf16 compute, LoRA r=16 on all linear layers,
gradient checkpointing, AdamW. The peer `qlorad bench train` is measured against.

    pip install bitsandbytes-0.50.2-*.whl            # the host has torch, transformers, peft
    python scripts/bench_python_qlora.py --shape llama-3.2-1b --seq-len 2048 --batch-size 1 --steps 10

Random weights of a real model's shape (values do not matter for speed), saved as bf16
safetensors and loaded back 4-bit exactly as artidoro/qlora does. Prints one JSON line: tokens/s,
step time, peak GPU memory, and MFU against 989 TFLOP/s (dense bf16 of an H100 SXM), counting
per token 4·N_linear (forward and input gradient of the frozen linears, LM head included) plus
attention, 6·layers·seq·hidden (QKᵀ and PV forward, twice that backward, halved by causality).
"""

import argparse
import json
import os
import tempfile
import time

import torch
from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig

SHAPES = {
    "llama-3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                         tie_word_embeddings=True),
    "llama-3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                       tie_word_embeddings=False),
}


def linear_params(c):
    h, i, kv = c["hidden_size"], c["intermediate_size"], c["num_key_value_heads"]
    head = h // c["num_attention_heads"]
    per_layer = h * h * 2 + 2 * h * kv * head + 3 * h * i
    return per_layer * c["num_hidden_layers"] + c["vocab_size"] * h  # + LM head


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", choices=sorted(SHAPES), default="llama-3.2-1b")
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--model-dir", help="reuse or keep the random model here")
    ap.add_argument("--make-only", action="store_true", help="write the random model and stop")
    ap.add_argument("--no-gradient-checkpointing", action="store_true",
                    help="keep activations instead of recomputing them in the backward")
    ap.add_argument("--layers", type=int, help="fewer decoder layers than the shape has (profiling)")
    args = ap.parse_args()
    shape = dict(SHAPES[args.shape])
    if args.layers:
        shape["num_hidden_layers"] = args.layers
    cfg = LlamaConfig(**shape, rope_theta=500000.0, max_position_embeddings=8192, torch_dtype="bfloat16")
    model_dir = args.model_dir or tempfile.mkdtemp(prefix=f"{args.shape}-")
    t0 = time.time()
    if not os.path.exists(os.path.join(model_dir, "config.json")):
        torch.manual_seed(0)
        with torch.device("cuda"):
            m = AutoModelForCausalLM.from_config(cfg, torch_dtype=torch.bfloat16)
        m.save_pretrained(model_dir)
        del m
        torch.cuda.empty_cache()
    made = time.time() - t0
    if args.make_only:
        print(json.dumps({"model_dir": model_dir, "make_model_seconds": made}))
        return
    torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    model = AutoModelForCausalLM.from_pretrained(
        model_dir,
        quantization_config=BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16),
        torch_dtype=torch.bfloat16, device_map={"": 0}, attn_implementation="sdpa")
    model = prepare_model_for_kbit_training(
        model, use_gradient_checkpointing=not args.no_gradient_checkpointing)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear",
                                             task_type="CAUSAL_LM"))
    # from_pretrained leaves the model in eval mode, where transformers skips gradient
    # checkpointing and PEFT skips LoRA dropout: train as a Trainer would.
    model.train()
    load = time.time() - t0
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    ids = torch.randint(0, shape["vocab_size"], (args.batch_size, args.seq_len), device="cuda")
    times = []
    for step in range(args.steps + 2):
        torch.cuda.synchronize()
        t = time.time()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        if step >= 2:  # two warm-up steps
            times.append(time.time() - t)
    step_s = sorted(times)[len(times) // 2]
    tokens = args.batch_size * args.seq_len
    tps = tokens / step_s
    c = shape
    attn = 6 * c["num_hidden_layers"] * args.seq_len * c["hidden_size"]
    flops_per_token = 4 * linear_params(c) + attn
    print(json.dumps({
        "stack": f"transformers {__import__('transformers').__version__} + peft {__import__('peft').__version__}"
                 f" + bitsandbytes {__import__('bitsandbytes').__version__}, torch {torch.__version__}",
        "device": torch.cuda.get_device_name(0),
        "shape": args.shape, "seq_len": args.seq_len, "batch_size": args.batch_size,
        "gradient_checkpointing": not args.no_gradient_checkpointing, "training": model.training,
        "checkpointing_active": bool(getattr(model, "is_gradient_checkpointing", False)),
        "steps_timed": len(times), "step_seconds_median": step_s, "tokens_per_second": tps,
        "peak_gpu_memory_gib": torch.cuda.max_memory_allocated() / 2**30,
        "peak_gpu_reserved_gib": torch.cuda.max_memory_reserved() / 2**30,
        "mfu": tps * flops_per_token / 989e12,
        "make_model_seconds": made, "load_quantize_seconds": load,
    }))


if __name__ == "__main__":
    main()
