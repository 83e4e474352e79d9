"""llama.cpp loads what `qlorad merge` writes, and computes what the merged model computes.

    cargo build --release
    .venv/bin/pip install llama-cpp-python==0.3.36      # builds llama.cpp (CPU), 5-20 minutes
    .venv/bin/python scripts/check_llama_cpp.py target/release/qlorad /tmp/qlorad-gguf-check

For a byte-level BPE Llama (Llama-3 style), a BPE Qwen2 (ChatML), a Qwen3 and a SentencePiece-style
Llama (byte fallback, Llama-2 style) with random weights (rows of 256, so k-quants apply) and a
PEFT adapter with non-zero B, runs `qlorad merge` to f32/f16/q8_0/q4_0/q4_k_m GGUF, a GGUF LoRA
and merged safetensors, then checks with llama-cpp-python (f32 KV cache):
  - logits of every GGUF vs transformers on the merged safetensors (itself checked against
    PEFT on base + adapter);
  - llama.cpp's tokenization of sample strings vs the Hugging Face tokenizer's;
  - base GGUF + GGUF LoRA vs the merged GGUF.
Exits non-zero if f16 > 1e-2 or q8_0 > 3e-2 relative error, or any tokenization differs.
"""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import torch
from llama_cpp import Llama
from peft import LoraConfig, PeftModel, get_peft_model
from tokenizers import Tokenizer, decoders, models, normalizers, trainers
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, PreTrainedTokenizerFast, Qwen2Config, Qwen3Config

qlorad, work = sys.argv[1], sys.argv[2]
here = os.path.dirname(os.path.abspath(__file__))
fixtures = os.path.join(here, "..", "tests", "fixtures", "data")
shutil.rmtree(work, ignore_errors=True)
os.makedirs(work)
torch.manual_seed(0)

QWEN2_REGEX = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"

SAMPLES = ["Hello world", "  leading spaces and   runs", "unicode: héllo wörld 你好 🦙", "tabs\tand\nnewlines\n\n",
           "The Zephyr 9 kettle boils a litre of water in ninety seconds.", "3.14159 1000000 42"]

def spm_tokenizer(d):
    specials = ["<unk>", "<s>", "</s>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    corpus = [l for l in open(os.path.join(here, "gen_data_fixtures.py")).read().split("\n") if l.strip()] * 3
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=specials + [f"<0x{i:02X}>" for i in range(256)])
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(d)

def build(name, cfg, tok):
    d = f"{work}/{name}"
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_((1.0 + 0.1 * torch.randn_like(p)) if "norm" in n else 0.05 * torch.randn_like(p))
    model.save_pretrained(d)
    if tok == "spm":
        spm_tokenizer(d)
    elif tok == "qwen2":
        # transformers' Qwen2Tokenizer always applies Qwen2's pre-tokenizer; give tokenizer.json the
        # same one (as real Qwen2 checkpoints have) so both sides tokenize alike.
        for f in os.listdir(os.path.join(fixtures, "tok-chatml")):
            shutil.copy(os.path.join(fixtures, "tok-chatml", f), d)
        t = json.load(open(f"{d}/tokenizer.json"))
        t["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": QWEN2_REGEX}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}]}
        json.dump(t, open(f"{d}/tokenizer.json", "w"), ensure_ascii=False)
    else:
        for f in os.listdir(os.path.join(fixtures, tok)):
            shutil.copy(os.path.join(fixtures, tok, f), d)
    pm = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0,
                                          init_lora_weights=False))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.mul_(0.2)
    pm.save_pretrained(f"{d}-lora")
    return d

common = dict(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5)
cases = [
    ("bpe-llama", LlamaConfig(**common, bos_token_id=0, eos_token_id=3, tie_word_embeddings=False), "tok-llama3"),
    ("bpe-qwen2", Qwen2Config(**common, tie_word_embeddings=True), "qwen2"),
    # q/k norms and a head_dim that is not hidden/heads.
    ("bpe-qwen3", Qwen3Config(**common, head_dim=32, tie_word_embeddings=False), "qwen2"),
    ("spm-llama", LlamaConfig(**common, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False), "spm"),
]

def rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))

def gguf_logits(path, tokens, lora=None):
    llm = Llama(model_path=path, lora_path=lora, n_ctx=64, logits_all=True, type_k=0, type_v=0, verbose=False, seed=0)
    llm.eval(tokens)
    return np.array(llm.scores[: len(tokens)], dtype=np.float64), llm

failed = False
for name, cfg, tok in cases:
    d = build(name, cfg, tok)
    out = f"{work}/{name}-out"
    subprocess.run([qlorad, "merge", "--model", d, "--adapter", f"{d}-lora", "--out", out,
                    "--gguf", "f32,f16,q8_0,q4_0,q4_k_m", "--gguf-lora", "--safetensors"], check=True)
    subprocess.run([qlorad, "merge", "--model", d, "--out", f"{out}-base", "--gguf", "f32"], check=True)
    hf_tok = AutoTokenizer.from_pretrained(d)
    tokens = hf_tok.encode("The Zephyr 9 kettle boils water", add_special_tokens=False)[:24]
    merged = AutoModelForCausalLM.from_pretrained(f"{out}/merged", dtype=torch.float32, attn_implementation="eager")
    base = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32, attn_implementation="eager")
    peft_model = PeftModel.from_pretrained(base, f"{d}-lora")
    with torch.no_grad():
        ids = torch.tensor([tokens])
        ref = merged(ids).logits[0].double().numpy()
        peft_ref = peft_model(ids).logits[0].double().numpy()
    print(f"\n{name}: merged safetensors vs PEFT base+adapter: {rel(ref, peft_ref):.2e}")
    failed |= rel(ref, peft_ref) > 1e-5
    for ty, limit in [("f32", 1e-4), ("f16", 1e-2), ("q8_0", 3e-2), ("q4_0", None), ("q4_k_m", None)]:
        logits, llm = gguf_logits(f"{out}/{name}-{ty}.gguf", tokens)
        r = rel(logits, ref)
        ok = limit is None or r <= limit
        failed |= not ok
        print(f"  {ty:7s} logits relative error {r:.2e}" + ("" if limit is None else f"  (limit {limit:g}) {'ok' if ok else 'FAIL'}"))
        if ty == "f32":
            for s in SAMPLES:
                mine = llm.tokenize(s.encode(), add_bos=False, special=True)
                want = hf_tok.encode(s, add_special_tokens=False)
                if mine != want:
                    failed = True
                    print(f"  tokenization differs for {s!r}: llama.cpp {mine} vs HF {want}")
            print(f"  tokenization of {len(SAMPLES)} samples checked")
            merged_f32 = logits
    lora_logits, _ = gguf_logits(f"{out}-base/{name}-f32.gguf", tokens, lora=f"{out}/{name}-lora.gguf")
    r = rel(lora_logits, merged_f32)
    failed |= r > 1e-4
    print(f"  base GGUF + GGUF LoRA vs merged GGUF: {r:.2e}")

print("\nFAILED" if failed else "\nall checks passed")
sys.exit(1 if failed else 0)
