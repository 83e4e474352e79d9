"""qlorad's GGUF import computes what llama.cpp computes on the same file.

    scripts/fetch_smollm2.sh
    cargo build --release --example gguf_check
    python3 scripts/check_gguf_import.py models/SmolLM2-135M-Instruct.Q4_1.gguf   # with llama-cpp-python and gguf installed

With llama-cpp-python 0.3.36 (llama.cpp's CPU build, f32 KV cache): tokenizes sample strings
(special tokens parsed, no BOS added) with both and requires identical ids; evaluates a chat
prompt with both and reports the relative error ‖qlorad − llama.cpp‖/‖llama.cpp‖ of the last
position's logits and the top-5 tokens, twice:
  - on an f32 copy of the file made by gguf-py (llama.cpp's dequantization, independent of
    candle's): both compute in f32 on identical weights, so they must agree to 1e-4;
  - on the stored file: llama.cpp multiplies Q4_1/Q8_0 weights with activations rounded to
    8 bits (Q8_1), qlorad with the exactly dequantized weights, so they agree only to that
    rounding (≤ 0.15, at least 4 of the top 5 shared).
"""

import json
import os
import subprocess
import sys
import tempfile

import gguf
import numpy as np
from llama_cpp import Llama

EXAMPLE = "target/release/examples/gguf_check"

STRINGS = [
    "Hello world",
    " Hello world",
    "Hello World!",
    "The quick brown fox jumps over the lazy dog.",
    "It's 3.14159 - not 22/7; isn't it?",
    "   leading spaces and trailing   ",
    "tabs\tand\nnewlines\n\n\nend",
    "Ünïcödé: café, naïve, Straße, 日本語, 🦙🚀",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "def f(x):\n    return x**2  # square\n",
    "1234567890 12 345 6789",
    "'s 're 've 'll 'd 'm 't",
]


def f32_copy(src, dst):
    """The same model with every tensor dequantized to f32 by gguf-py (llama.cpp's own Python)."""
    r = gguf.GGUFReader(src)
    w = gguf.GGUFWriter(dst, arch=r.fields["general.architecture"].contents())
    for k, f in r.fields.items():
        if k.startswith("GGUF.") or k == "general.architecture":
            continue
        if f.types[0] == gguf.GGUFValueType.ARRAY:
            w.add_key_value(k, f.contents(), f.types[0], sub_type=f.types[-1])
        else:
            w.add_key_value(k, f.contents(), f.types[0])
    for t in r.tensors:
        a = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        w.add_tensor(t.name, a.reshape([int(x) for x in reversed(t.shape)]))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def compare_logits(model, prompt):
    out = json.loads(subprocess.run([EXAMPLE, "logits", model, prompt], capture_output=True, text=True, check=True).stdout)
    ids = out["ids"]
    llm = Llama(model_path=model, n_ctx=512, logits_all=True, verbose=False, n_threads=2, type_k=0, type_v=0)
    llm.eval(ids)
    ref = np.array(llm.scores[len(ids) - 1], dtype=np.float64)
    q = np.array(out["logits"], dtype=np.float64)
    rel = np.linalg.norm(q - ref) / np.linalg.norm(ref)
    top_ref, top_q = np.argsort(-ref)[:5].tolist(), np.argsort(-q)[:5].tolist()
    print(f"{os.path.basename(model)}: logits over {len(ids)} prompt tokens: relative error {rel:.2e}, max abs {np.abs(q - ref).max():.4f}")
    print(f"  top-5 llama.cpp {top_ref} {[llm.detokenize([t]).decode(errors='replace') for t in top_ref]}")
    print(f"  top-5 qlorad    {top_q}")
    return rel, top_ref, top_q


def main():
    model = sys.argv[1]
    llm = Llama(model_path=model, n_ctx=512, verbose=False, vocab_only=True)
    ours = json.loads(
        subprocess.run(
            [EXAMPLE, "tokenize", model], input=json.dumps(STRINGS), capture_output=True, text=True, check=True
        ).stdout
    )
    bad = 0
    for s, q in zip(STRINGS, ours):
        ref = llm.tokenize(s.encode(), add_bos=False, special=True)
        if ref != q:
            bad += 1
            print(f"tokenization differs for {s!r}:\n  llama.cpp {ref}\n  qlorad    {q}")
    print(f"tokenization: {len(STRINGS) - bad}/{len(STRINGS)} strings identical")

    prompt = (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    )
    with tempfile.TemporaryDirectory() as tmp:
        dense = os.path.join(tmp, "f32.gguf")
        f32_copy(model, dense)
        # Same weights, both in f32: only the order of floating-point operations differs.
        rel_dense, _, _ = compare_logits(dense, prompt)
    # The stored file: llama.cpp rounds activations to 8 bits for its quantized matmuls.
    rel_stored, top_ref, top_q = compare_logits(model, prompt)
    ok = bad == 0 and rel_dense <= 1e-4 and rel_stored <= 0.15 and len(set(top_ref) & set(top_q)) >= 4
    print("OK" if ok else "FAILED")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
