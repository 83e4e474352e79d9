"""Receive qlorad's webhooks and verify them with the official `openai` client's
`webhooks.unwrap(body, headers, secret=...)`, unchanged: a job created through the client must
arrive as a `fine_tuning.job.succeeded` event that unwraps into the client's own event type.

    pip install openai
    cargo run --release -- serve --model-root models --data-dir /tmp/qlorad-data \
        --webhook-url http://127.0.0.1:18099/hook --webhook-secret whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw &
    python scripts/check_webhooks.py [--base-url http://127.0.0.1:8080/v1] [--model tiny] [--port 18099]

Exits non-zero on the first check that fails.
"""

import argparse
import http.server
import io
import json
import queue
import sys
import threading

from openai import OpenAI

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
DATA = [
    {"messages": [{"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Paris."}]},
    {"messages": [{"role": "user", "content": "Say hello."}, {"role": "assistant", "content": "Hello!"}]},
]


def check(cond, what):
    if not cond:
        print(f"FAIL: {what}")
        sys.exit(1)
    print(f"ok   {what}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--base-url", default="http://127.0.0.1:8080/v1")
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--port", type=int, default=18099)
    ap.add_argument("--api-key", default="none")
    args = ap.parse_args()
    client = OpenAI(base_url=args.base_url, api_key=args.api_key)
    got = queue.Queue()

    class Hook(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers["content-length"]))
            got.put((body, dict(self.headers.items())))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *a):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", args.port), Hook)
    threading.Thread(target=server.serve_forever, daemon=True).start()

    data = io.BytesIO("\n".join(json.dumps(d) for d in DATA).encode())
    f = client.files.create(file=("train.jsonl", data), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(model=args.model, training_file=f.id,
                                         extra_body={"hyperparameters": {"max_steps": 2, "batch_size": 2}})
    body, headers = got.get(timeout=120)
    check({"webhook-id", "webhook-timestamp", "webhook-signature"} <= {k.lower() for k in headers},
          "Standard Webhooks headers")
    event = client.webhooks.unwrap(body, headers, secret=SECRET)
    check(type(event).__name__ == "FineTuningJobSucceededWebhookEvent", f"unwrap -> {type(event).__name__}")
    check(event.data.id == job.id and event.type == "fine_tuning.job.succeeded", f"event for {event.data.id}")
    try:
        client.webhooks.unwrap(body, headers, secret="whsec_" + "QUJD" * 8)
        check(False, "a wrong secret is refused")
    except Exception as e:  # openai.InvalidWebhookSignatureError
        check(type(e).__name__ == "InvalidWebhookSignatureError", "a wrong secret is refused")
    print("all checks passed")


if __name__ == "__main__":
    main()
