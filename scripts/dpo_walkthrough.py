"""Supervised fine-tuning, then DPO from its fine-tuned model, on a live qlorad server, driven by
the official `openai` client; then greedy answers of both adapters to held-out questions.

    scripts/fetch_smollm2.sh && python3 scripts/gen_example_dataset.py && python3 scripts/gen_preference_dataset.py
    cargo build --release && target/release/qlorad serve &
    python3 scripts/dpo_walkthrough.py [--base-url http://127.0.0.1:8080] [--model SmolLM2-135M-Instruct.Q4_1.gguf]

1. The Lumenfold chat set (examples/lumenfold/) trains an adapter (OpenAI's supervised method).
2. A DPO job continues that job's `ft:` model on examples/house-style/train.jsonl (OpenAI's
   preference format: answers opening with "Ahoy! " preferred over the same answers plain), with
   the held-out pairs as its validation file: `eval_rewards/margins` on prompts it never trains
   on, at every evaluation.
3. Both adapters answer the held-out questions greedily (`qlorad generate --chat`); the script
   counts the answers in the house style.
Prints each step's metrics and the answers; writes the adapters under runs/.
"""

import argparse
import json
import os
import subprocess
import sys
import time
import urllib.request

from openai import OpenAI

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def upload(client, path):
    with open(path, "rb") as f:
        return client.files.create(file=(os.path.basename(path), f), purpose="fine-tune").id


def wait(client, job_id):
    t0 = time.time()
    while True:
        job = client.fine_tuning.jobs.retrieve(job_id)
        if job.status in ("succeeded", "failed", "cancelled"):
            print(f"{job_id}: {job.status} after {time.time() - t0:.0f} s")
            if job.status != "succeeded":
                sys.exit(f"FAIL: {job.error}")
            return job
        time.sleep(2)


def metrics(client, job_id):
    events = list(client.fine_tuning.jobs.list_events(job_id, limit=100))  # auto-paginates
    return sorted((e.data for e in events if e.type == "metrics"), key=lambda d: (d["step"], "eval_loss" in d))


def download_adapter(base, job_id, out):
    os.makedirs(out, exist_ok=True)
    for name in ["adapter_config.json", "adapter_model.safetensors"]:
        urllib.request.urlretrieve(f"{base}/jobs/{job_id}/artifacts/adapter/{name}", os.path.join(out, name))
    return out


def answer(qlorad, model, adapter, question):
    cmd = [qlorad, "generate", "--model", model, "--chat",
           "--max-tokens", "32", "--prompt", question, "--adapter", adapter]
    return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip()


def run_sft(client, args, ex):
    sft_train = upload(client, f"{ex}/lumenfold/train.jsonl")
    sft_valid = upload(client, f"{ex}/lumenfold/valid.jsonl")
    job = client.fine_tuning.jobs.create(
        model=args.model,
        training_file=sft_train,
        validation_file=sft_valid,
        suffix="lumenfold",
        method={"type": "supervised", "supervised": {"hyperparameters": {
            "n_epochs": 2, "batch_size": 8, "learning_rate_multiplier": 5}}},
        extra_body={"hyperparameters": {"lr_scheduler": "cosine", "warmup_ratio": 0.05, "max_seq_len": 128},
                    "lora": {"r": 16, "alpha": 32, "dropout": 0.05}, "eval_every": 19},
    )
    return wait(client, job.id)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--base-url", default="http://127.0.0.1:8080")
    ap.add_argument("--model", default="SmolLM2-135M-Instruct.Q4_1.gguf")
    ap.add_argument("--model-file", default=os.path.join(ROOT, "models", "SmolLM2-135M-Instruct.Q4_1.gguf"))
    ap.add_argument("--questions", type=int, default=12)
    ap.add_argument("--lr-multiplier", type=float, default=0.5, help="DPO's, over 2e-4")
    ap.add_argument("--sft-job", help="a succeeded supervised job to continue, instead of running one")
    ap.add_argument("--qlorad", default=os.path.join(ROOT, "target", "release", "qlorad"))
    args = ap.parse_args()
    client = OpenAI(base_url=f"{args.base_url}/v1", api_key=os.environ.get("QLORAD_API_KEY", "unused"))

    ex = os.path.join(ROOT, "examples")
    pairs = upload(client, f"{ex}/house-style/train.jsonl")
    heldout = upload(client, f"{ex}/house-style/heldout.jsonl")
    if args.sft_job:
        sft = wait(client, args.sft_job)
    else:
        sft = run_sft(client, args, ex)
    print("SFT validation loss:", [round(m["eval_loss"], 4) for m in metrics(client, sft.id) if "eval_loss" in m])

    method = {"type": "dpo", "dpo": {"hyperparameters": {
        "beta": 0.1, "n_epochs": 2, "batch_size": 8, "learning_rate_multiplier": args.lr_multiplier}}}
    dpo = client.fine_tuning.jobs.create(
        model=sft.fine_tuned_model,
        training_file=pairs,
        validation_file=heldout,
        suffix="house-style",
        method=method,
        extra_body={"hyperparameters": {"max_seq_len": 128}, "eval_every": 4},
    )
    assert dpo.method.type == "dpo" and dpo.method.dpo.hyperparameters.beta == 0.1, dpo.method
    print(f"created {dpo.id} from {sft.fine_tuned_model} with method {dpo.method.to_dict()}")
    dpo = wait(client, dpo.id)
    print("step  loss    margins  accuracies | held-out: loss   margins  accuracies")
    for m in metrics(client, dpo.id):
        if "eval_loss" in m:
            print(f"{m['step']:>4}  {'':>29}|           {m['eval_loss']:.4f} {m['eval_rewards/margins']:>8.3f} "
                  f"{m['eval_rewards/accuracies']:>8.3f}")
        else:
            print(f"{m['step']:>4}  {m['loss']:.4f} {m['rewards/margins']:>8.3f} {m['rewards/accuracies']:>8.3f}"
                  f"   chosen {m['rewards/chosen']:.3f} rejected {m['rewards/rejected']:.3f}")

    runs = os.path.join(ROOT, "runs")
    adapters = {
        "sft": download_adapter(args.base_url, sft.id, f"{runs}/lumenfold-sft-adapter"),
        "dpo": download_adapter(args.base_url, dpo.id, f"{runs}/house-style-dpo-adapter"),
    }
    with open(f"{ex}/house-style/heldout.jsonl") as f:
        questions = [json.loads(line)["input"]["messages"][-1]["content"] for line in f][: args.questions]
    styled = {k: 0 for k in adapters}
    for q in questions:
        print(q)
        for k, a in adapters.items():
            text = answer(args.qlorad, args.model_file, a, q)
            styled[k] += text.startswith("Ahoy")
            print(f"  {k}: {text!r}")
    for k in adapters:
        print(f"{k}: {styled[k]}/{len(questions)} held-out answers open with 'Ahoy!'")


if __name__ == "__main__":
    main()
