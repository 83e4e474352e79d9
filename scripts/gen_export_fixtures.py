"""Reference GGUF files made by llama.cpp's own converter, for the export tests.

    LLAMA_CPP=path/to/llama.cpp .venv/bin/python scripts/gen_export_fixtures.py tests/fixtures/export

llama.cpp's sources come with the llama-cpp-python sdist (`pip download --no-deps --no-binary
:all: llama-cpp-python==0.3.36`, vendor/llama.cpp). Makes a tiny random Llama (vocab 512, GQA,
llama3 rope scaling) with the byte-level BPE tokenizer of tests/fixtures/data/tok-llama3, and
Qwen2 and Qwen3 twins; converts each with `convert_hf_to_gguf.py --outtype f32`. The tiny tokenizer's
pre-tokenizer hash is not in llama.cpp's table, so the converter is told "gpt-2" (its regex).
Also converts a PEFT adapter with `convert_lora_to_gguf.py`.
"""

import os
import shutil
import subprocess
import sys

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config, Qwen3Config

out = sys.argv[1]
llama_cpp = os.environ["LLAMA_CPP"]
tok_dir = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "data", "tok-llama3")
torch.manual_seed(21)

common = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5,
              bos_token_id=0, eos_token_id=3)
configs = {
    "llama": LlamaConfig(**common, tie_word_embeddings=False, rope_theta=500000.0,
                         rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
    "qwen2": Qwen2Config(**common, tie_word_embeddings=True, rope_theta=1000000.0),
    "qwen3": Qwen3Config(**common, head_dim=32, tie_word_embeddings=False, rope_theta=1000000.0),
}

patch = (
    "import sys, runpy; sys.path.insert(0, sys.argv[1] + '/gguf-py'); sys.path.insert(0, sys.argv[1]);"
    "import conversion.base as b; b.TextModel.get_vocab_base_pre = lambda self, tok: 'gpt-2';"
    "sys.argv = sys.argv[2:]; runpy.run_path(sys.argv[0], run_name='__main__')"
)

for name, cfg in configs.items():
    d = f"{out}/{name}"
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_((1.0 + 0.1 * torch.randn_like(p)) if "norm" in n else 0.1 * torch.randn_like(p))
    model.save_pretrained(d)
    for f in os.listdir(tok_dir):
        shutil.copy(os.path.join(tok_dir, f), d)
    subprocess.run([sys.executable, "-c", patch, llama_cpp, f"{llama_cpp}/convert_hf_to_gguf.py", d,
                    "--outtype", "f32", "--outfile", f"{out}/{name}.f32.gguf"], check=True)
    if name == "llama":
        pm = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                              lora_dropout=0.0, init_lora_weights=False))
        pm.save_pretrained(f"{out}/{name}-lora")
        os.remove(f"{out}/{name}-lora/README.md")
        subprocess.run([sys.executable, "-c", patch, llama_cpp, f"{llama_cpp}/convert_lora_to_gguf.py",
                        f"{out}/{name}-lora", "--base", d, "--outtype", "f32",
                        "--outfile", f"{out}/{name}-lora.f32.gguf"], check=True)
print("ok")
