"""How often a model answers the held-out Lumenfold questions correctly, with qlorad and llama.cpp.

    python3 scripts/eval_lumenfold.py qlorad  --model models/SmolLM2-135M-Instruct.Q4_1.gguf [--adapter DIR]
    python3 scripts/eval_lumenfold.py llamacpp --gguf FILE.gguf [--lora LORA.gguf]

`examples/lumenfold/heldout.jsonl` holds questions worded unlike any training or validation
example, each with the words a right answer contains (any one of them, case-insensitive).
Greedy decoding, at most 48 new tokens, the model's own chat template. qlorad mode runs
`qlorad generate --chat` (the binary from `cargo build --release`); llamacpp mode needs
llama-cpp-python. Also asks four unrelated questions to show the model still answers them.
Prints each answer and the rate; writes nothing.
"""

import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
GENERAL = [
    "What is the capital of France?",
    "Name three primary colors.",
    "How many days are in a week?",
    "What is the largest animal on Earth?",
]


def load_questions():
    with open(os.path.join(ROOT, "examples", "lumenfold", "heldout.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def qlorad_answer(args, question):
    cmd = [os.path.join(ROOT, "target", "release", "qlorad"), "generate", "--model", args.model, "--chat",
           "--max-tokens", "48", "--prompt", question]
    if args.adapter:
        cmd += ["--adapter", args.adapter]
    return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("engine", choices=["qlorad", "llamacpp"])
    p.add_argument("--model")
    p.add_argument("--adapter")
    p.add_argument("--gguf")
    p.add_argument("--lora")
    args = p.parse_args()
    if args.engine == "qlorad":
        answer = lambda q: qlorad_answer(args, q)  # noqa: E731
    else:
        from llama_cpp import Llama

        kw = {"lora_path": args.lora} if args.lora else {}
        llm = Llama(model_path=args.gguf, n_ctx=512, verbose=False, n_threads=2, **kw)

        def answer(q):
            r = llm.create_chat_completion(messages=[{"role": "user", "content": q}], temperature=0.0, max_tokens=48)
            return r["choices"][0]["message"]["content"].strip()

    right = 0
    questions = load_questions()
    for item in questions:
        a = answer(item["question"])
        ok = any(e.lower() in a.lower() for e in item["expect"])
        right += ok
        print(f"[{'x' if ok else ' '}] {item['question']}\n      {a!r}")
    print("general questions:")
    for q in GENERAL:
        print(f"  {q}\n      {answer(q)!r}")
    print(f"correct: {right}/{len(questions)} ({100.0 * right / len(questions):.0f}%)")


if __name__ == "__main__":
    sys.exit(main())
