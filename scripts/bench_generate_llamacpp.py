"""llama.cpp's prompt and decode throughput on a GGUF, for `qlorad bench generate` beside it.

    python3 scripts/bench_generate_llamacpp.py models/SmolLM2-135M-Instruct.Q4_1.gguf \
        [--prompt-len 128] [--new-tokens 64] [--threads 2] [--lora LORA.gguf]

llama-cpp-python (0.3.36 here) on the CPU: a random prompt of --prompt-len tokens evaluated in
one call, then --new-tokens greedy steps of one token each. Prints one JSON object, the same
fields as `qlorad bench generate`.
"""

import argparse
import json
import random
import time

from llama_cpp import Llama, __version__

ap = argparse.ArgumentParser()
ap.add_argument("gguf")
ap.add_argument("--prompt-len", type=int, default=128)
ap.add_argument("--new-tokens", type=int, default=64)
ap.add_argument("--threads", type=int, default=2)
ap.add_argument("--lora")
args = ap.parse_args()
kw = {"lora_path": args.lora} if args.lora else {}
llm = Llama(model_path=args.gguf, n_ctx=args.prompt_len + args.new_tokens + 8, n_threads=args.threads,
            n_batch=args.prompt_len, verbose=False, **kw)
rng = random.Random(7)
vocab = llm.n_vocab()


def run(new):
    llm.reset()
    prompt = [rng.randrange(100, vocab) for _ in range(args.prompt_len)]
    t0 = time.perf_counter()
    llm.eval(prompt)
    t1 = time.perf_counter()
    for _ in range(new):
        tok = llm.sample(temp=0.0)
        llm.eval([tok])
    return t1 - t0, time.perf_counter() - t1


run(2)  # warm-up
prompt_s, decode_s = run(args.new_tokens)
print(json.dumps({
    "bench": "generate", "engine": f"llama-cpp-python {__version__}", "model": args.gguf, "lora": args.lora,
    "threads": args.threads, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
    "prompt_tokens_per_second": args.prompt_len / prompt_s,
    "decode_tokens_per_second": args.new_tokens / decode_s,
    "decode_ms_per_step": decode_s * 1000 / args.new_tokens,
}, indent=1))
