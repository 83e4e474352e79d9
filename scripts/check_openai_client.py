"""Drive a live qlorad server with the official `openai` Python client, unchanged but for
base_url and api_key: upload, create, list, retrieve, events, checkpoints, pause, resume, cancel, chat completions, models, DPO, errors.

    pip install openai
    cargo run --release --example random_model -- models/tiny tiny
    cargo run --release -- serve --model-root models --data-dir /tmp/qlorad-data &
    python scripts/check_openai_client.py [--base-url http://127.0.0.1:8080/v1] [--model tiny] \
        [--api-key KEY]          # a key of the server's --api-keys-file (default: $QLORAD_API_KEY)

Exits non-zero on the first check that fails.
"""

import argparse
import io
import json
import os
import sys
import time

import openai
from openai import OpenAI

DATA = [
    {"messages": [{"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Paris."}]},
    {"messages": [{"role": "user", "content": "Say hello."}, {"role": "assistant", "content": "Hello!"}]},
    {"messages": [{"role": "user", "content": "Boil time?"}, {"role": "assistant", "content": "Ninety seconds."}]},
]

PAIRS = [
    {"input": {"messages": [{"role": "user", "content": "Capital of France?"}]},
     "preferred_output": [{"role": "assistant", "content": "Paris, sir."}],
     "non_preferred_output": [{"role": "assistant", "content": "paris"}]},
    {"input": {"messages": [{"role": "user", "content": "Say hello."}]},
     "preferred_output": [{"role": "assistant", "content": "Good day, sir."}],
     "non_preferred_output": [{"role": "assistant", "content": "hi"}]},
]


def check(cond, what):
    if not cond:
        print(f"FAIL: {what}")
        sys.exit(1)
    print(f"ok   {what}")


def wait(client, job_id, statuses, timeout=120):
    t0 = time.time()
    while time.time() - t0 < timeout:
        job = client.fine_tuning.jobs.retrieve(job_id)
        if job.status in statuses:
            return job
        time.sleep(0.2)
    raise SystemExit(f"FAIL: job {job_id} did not reach {statuses} in {timeout}s")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--base-url", default="http://127.0.0.1:8080/v1")
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--api-key", default=os.environ.get("QLORAD_API_KEY", "unused"))
    args = ap.parse_args()
    client = OpenAI(base_url=args.base_url, api_key=args.api_key)
    print(f"openai {openai.__version__} against {args.base_url}")

    body = "".join(json.dumps(r) + "\n" for r in DATA).encode()
    f = client.files.create(file=("train.jsonl", io.BytesIO(body)), purpose="fine-tune")
    check(f.object == "file" and f.id.startswith("file-") and f.bytes == len(body), f"files.create -> {f.id}")
    check(f.purpose == "fine-tune" and f.status == "processed" and f.filename == "train.jsonl", "file fields")
    check(abs(f.created_at - time.time()) < 120, "created_at is Unix seconds")
    files = client.files.list()
    check(any(x.id == f.id for x in files.data), "files.list has the upload")
    check(client.files.retrieve(f.id).id == f.id, "files.retrieve")
    check(client.files.content(f.id).read() == body, "files.content returns the bytes")

    job = client.fine_tuning.jobs.create(
        model=args.model,
        training_file=f.id,
        hyperparameters={"n_epochs": "auto", "batch_size": 3, "learning_rate_multiplier": 2.0},
        suffix="demo",
        seed=7,
        metadata={"purpose": "check"},
        extra_body={"lora": {"r": 4, "alpha": 8}, "checkpoint_every": 2},
    )
    check(job.object == "fine_tuning.job" and job.status in ("queued", "running"), f"jobs.create -> {job.id} {job.status}")
    check(job.hyperparameters.batch_size == 3 and abs(job.hyperparameters.learning_rate_multiplier - 2.0) < 1e-9,
          "hyperparameters echo (batch_size 3, lr multiplier 2)")
    check(job.seed == 7 and job.user_provided_suffix == "demo" and job.metadata == {"purpose": "check"},
          "seed, suffix, metadata")
    check(job.model_extra.get("spec", {}).get("lora", {}).get("r") == 4, "extra field lora.r reached the spec")

    done = wait(client, job.id, {"succeeded", "failed", "cancelled"})
    check(done.status == "succeeded", f"job finished: {done.status} {done.error}")
    check(done.fine_tuned_model == f"ft:{args.model}:qlorad:demo:{job.id}", f"fine_tuned_model {done.fine_tuned_model}")
    check((done.trained_tokens or 0) > 0 and done.finished_at >= done.created_at, f"trained_tokens {done.trained_tokens}")

    page = client.fine_tuning.jobs.list(limit=10)
    check(page.data[0].id == job.id, "jobs.list newest first")
    check(client.fine_tuning.jobs.retrieve(job.id).id == job.id, "jobs.retrieve")

    # The status changes a moment before its event is written: wait for the event.
    for _ in range(50):
        events = client.fine_tuning.jobs.list_events(job.id, limit=100)
        if events.data[0].message == "succeeded":
            break
        time.sleep(0.1)
    kinds = [e.type for e in events.data]
    check(all(e.object == "fine_tuning.job.event" for e in events.data), f"{len(events.data)} events")
    check(events.data[0].message == "succeeded", "events newest first")
    metrics = [e for e in events.data if e.type == "metrics"]
    check(len(metrics) >= 3 and "train_loss" in metrics[0].data, f"metrics events: {kinds.count('metrics')}")
    small = client.fine_tuning.jobs.list_events(job.id, limit=2)
    check(small.has_more and len(small.data) == 2, "events page has_more")
    paged = [e.id for e in client.fine_tuning.jobs.list_events(job.id, limit=2)]  # auto-paginates
    check(paged == [e.id for e in events.data], "events auto-pagination with after= sees every event once")

    ckpts = client.fine_tuning.jobs.checkpoints.list(job.id)
    steps = [c.step_number for c in ckpts.data]
    check(steps == sorted(steps, reverse=True) and steps[0] == 3 and 2 in steps, f"checkpoints {steps}")
    c0 = ckpts.data[0]
    check(c0.object == "fine_tuning.job.checkpoint" and c0.fine_tuning_job_id == job.id
          and c0.metrics.train_loss is not None, "checkpoint fields")

    long = client.fine_tuning.jobs.create(
        model=args.model, training_file=f.id, hyperparameters={"batch_size": 3},
        extra_body={"hyperparameters": {"max_steps": 100000, "batch_size": 3}},
    )
    wait(client, long.id, {"running"})
    paused = client.fine_tuning.jobs.pause(long.id)
    check(paused.id == long.id, f"jobs.pause -> {paused.status}")
    check(wait(client, long.id, {"paused"}).status == "paused", "paused job stops at a checkpoint")
    resumed = client.fine_tuning.jobs.resume(long.id)
    check(resumed.status in ("queued", "running"), f"jobs.resume -> {resumed.status}")
    wait(client, long.id, {"running"})
    cancelled = client.fine_tuning.jobs.cancel(long.id)
    check(cancelled.id == long.id, f"jobs.cancel -> {cancelled.status}")
    check(wait(client, long.id, {"cancelled"}).status == "cancelled", "cancelled job stops")
    every = [j.id for j in client.fine_tuning.jobs.list(limit=1)]  # auto-paginates
    check(every[:2] == [long.id, job.id], "jobs auto-pagination")

    # Chat with the fine-tuned model, whole and streamed; it is listed among the models.
    ask = [{"role": "user", "content": "Capital of France?"}]
    whole = client.chat.completions.create(model=done.fine_tuned_model, messages=ask, temperature=0, max_tokens=8)
    text = whole.choices[0].message.content
    check(whole.object == "chat.completion" and whole.choices[0].message.role == "assistant"
          and whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens,
          f"chat.completions.create -> {text!r}, usage {whole.usage.completion_tokens} tokens")
    pieces = client.chat.completions.create(model=done.fine_tuned_model, messages=ask, temperature=0, max_tokens=8,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(pieces)
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    check(streamed == text and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens,
          "chat.completions.create(stream=True) streams the same text, then the usage")
    legacy = client.completions.create(model=done.fine_tuned_model, prompt="Paris is", max_tokens=4, temperature=0)
    check(legacy.object == "text_completion" and isinstance(legacy.choices[0].text, str), "completions.create")
    listed = [m.id for m in client.models.list()]
    check(done.fine_tuned_model in listed and args.model in listed, f"models.list has the base and the fine-tuned model")
    try:
        client.chat.completions.create(model="ft:nope:qlorad::job-x", messages=ask)
        check(False, "an unknown model is an error")
    except openai.NotFoundError as e:
        check(e.param == "model", f"chat with an unknown model: NotFoundError param=model")

    # DPO from the supervised job's model, on OpenAI's preference records, `method` as OpenAI has it.
    pairs = "".join(json.dumps(r) + "\n" for r in PAIRS).encode()
    pf = client.files.create(file=("pairs.jsonl", io.BytesIO(pairs)), purpose="fine-tune")
    method = {"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.2, "batch_size": 2, "n_epochs": 2}}}
    dpo = client.fine_tuning.jobs.create(model=done.fine_tuned_model, training_file=pf.id, method=method)
    check(dpo.method.type == "dpo" and dpo.method.dpo.hyperparameters.beta == 0.2
          and dpo.method.dpo.hyperparameters.batch_size == 2, f"DPO jobs.create -> {dpo.id}, method {dpo.method.type}")
    dpo_done = wait(client, dpo.id, {"succeeded", "failed"})
    check(dpo_done.status == "succeeded", f"DPO job finished: {dpo_done.status} {dpo_done.error}")
    dm = [e.data for e in client.fine_tuning.jobs.list_events(dpo.id, limit=100).data if e.type == "metrics"]
    check(len(dm) == 2 and all("rewards/margins" in d and "logps/chosen" in d for d in dm),
          f"DPO metrics events carry TRL's rewards/* and logps/*: {sorted(dm[0])}")
    try:
        client.fine_tuning.jobs.create(model=args.model, training_file=pf.id)
        check(False, "preference pairs in a supervised job are an error")
    except openai.UnprocessableEntityError as e:
        check(e.param == "training_file", f"UnprocessableEntityError param=training_file: {e.message}")

    try:
        client.fine_tuning.jobs.retrieve("job-does-not-exist")
        check(False, "unknown job is an error")
    except openai.NotFoundError as e:
        check(e.status_code == 404 and e.param == "fine_tuning_job_id", f"NotFoundError: {e.message}")
    try:
        client.fine_tuning.jobs.create(model="no-such-model", training_file=f.id)
        check(False, "unknown model is an error")
    except openai.BadRequestError as e:
        check(e.param == "model" and e.type == "invalid_request_error", f"BadRequestError param=model: {e.message}")
    try:
        client.fine_tuning.jobs.create(model=args.model, training_file=f.id, hyperparameters={"n_epochs": 0})
        check(False, "n_epochs 0 is an error")
    except openai.BadRequestError as e:
        check(e.param == "hyperparameters.n_epochs", f"BadRequestError param=hyperparameters.n_epochs")
    try:
        client.files.create(file=("x.jsonl", io.BytesIO(b'{"nope": 1}\n')), purpose="fine-tune")
        check(False, "an invalid dataset is an error")
    except openai.BadRequestError as e:
        check(e.param == "file", f"invalid dataset rejected: {e.message}")
    print("all checks passed")


if __name__ == "__main__":
    main()
