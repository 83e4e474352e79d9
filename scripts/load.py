"""A bounded load run over loopback: mixed API traffic (lists, gets, event pages, short SSE
reads, uploads, job creation and cancellation, health and metrics) from several client threads
at a fixed total rate, alongside one long training job. Reports the error rate, latency
percentiles, and the job's step time with and without the load (quiet, loaded, quiet windows).

    cargo build && python scripts/load.py [--rate 50] [--window 30] [--clients 8]

Prints a JSON summary; exits non-zero if any request failed.
"""

import argparse
import json
import os
import random
import socket
import sys
import tempfile
import threading
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from qlorad_harness import Server, ensure_model  # noqa: E402

ALICE, BOB = "alice-load-key-0123456789", "bob-load-key-0123456789"


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def step_rate(srv, jid, seconds):
    """Seconds per optimizer step over a window, from the job's progress."""
    s0 = srv.job(jid, ALICE)["progress"]["step"]
    t0 = time.time()
    time.sleep(seconds)
    s1 = srv.job(jid, ALICE)["progress"]["step"]
    return (time.time() - t0) / max(1, s1 - s0), s1 - s0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rate", type=float, default=50, help="requests per second, all clients together")
    ap.add_argument("--window", type=float, default=30)
    ap.add_argument("--clients", type=int, default=8)
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="qlorad-load-")
    models = os.path.join(work, "models")
    ensure_model(models)
    keys = os.path.join(work, "keys")
    open(keys, "w").write(f"alice:{ALICE}\nbob:{BOB}\n")
    # One worker trains; a second key's jobs only queue and get cancelled.
    srv = Server(os.path.join(work, "data"), models, free_port(), keys_file=keys).start()
    fid = srv.upload(ALICE)
    bob_fid = srv.upload(BOB)
    spec = {"model": "tiny", "training_file": fid, "lora": {"r": 8},
            "hyperparameters": {"max_steps": 1000000, "batch_size": 2}, "checkpoint_every": 1000000}
    jid = srv.create_job(spec, ALICE)
    while srv.job(jid, ALICE)["progress"]["step"] < 3:
        time.sleep(0.2)

    ops = [
        ("GET /jobs", lambda: srv.request("GET", "/jobs?limit=20", key=ALICE)),
        ("GET /jobs/{id}", lambda: srv.request("GET", f"/jobs/{jid}", key=ALICE)),
        ("GET /jobs/{id}/events", lambda: srv.request("GET", f"/jobs/{jid}/events?limit=50", key=ALICE)),
        ("GET /jobs/{id}/checkpoints", lambda: srv.request("GET", f"/jobs/{jid}/checkpoints", key=ALICE)),
        ("GET /files", lambda: srv.request("GET", "/files", key=BOB)),
        ("GET /v1/fine_tuning/jobs", lambda: srv.request("GET", "/v1/fine_tuning/jobs", key=ALICE)),
        ("GET /v1/fine_tuning/jobs/{id}/events", lambda: srv.request("GET", f"/v1/fine_tuning/jobs/{jid}/events", key=ALICE)),
        ("GET /models", lambda: srv.request("GET", "/models", key=BOB)),
        ("GET /healthz", lambda: srv.request("GET", "/healthz")),
        ("GET /metrics", lambda: srv.request("GET", "/metrics")),
        ("POST /files", lambda: srv.request("POST", "/files?filename=t.jsonl", b'{"text": "hello there"}\n' * 20, key=BOB)),
        ("POST /jobs + cancel", None),
        ("SSE read", None),
    ]
    weights = [10, 10, 8, 4, 6, 4, 4, 2, 4, 2, 2, 2, 2]

    def create_cancel():
        s, j = srv.request("POST", "/jobs", {"model": "tiny", "training_file": bob_fid}, key=BOB)
        if s != 201:
            return s, j
        return srv.request("POST", f"/jobs/{j['id']}/cancel", key=BOB)

    def sse_read():
        req = urllib.request.Request(f"{srv.base}/jobs/{jid}/events",
                                     headers={"accept": "text/event-stream", "authorization": f"Bearer {ALICE}",
                                              "last-event-id": "1"})
        with urllib.request.urlopen(req, timeout=30) as r:
            r.readline()
            return r.status, None

    lat = {}
    errors = []
    lock = threading.Lock()
    stop = threading.Event()
    period = args.clients / args.rate

    def client(i):
        rnd = random.Random(i)
        nxt = time.time() + rnd.uniform(0, period)
        while not stop.is_set():
            time.sleep(max(0, nxt - time.time()))
            nxt += period
            k = rnd.choices(range(len(ops)), weights)[0]
            name, fn = ops[k]
            fn = fn or (create_cancel if name.startswith("POST /jobs") else sse_read)
            t0 = time.perf_counter()
            try:
                status, body = fn()
            except Exception as e:  # noqa: BLE001
                status, body = 0, str(e)
            dt = time.perf_counter() - t0
            with lock:
                lat.setdefault(name, []).append(dt)
                if not 200 <= status < 300:
                    errors.append((name, status, str(body)[:200]))

    quiet1 = step_rate(srv, jid, args.window)
    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(args.clients)]
    for t in threads:
        t.start()
    loaded = step_rate(srv, jid, args.window)
    stop.set()
    for t in threads:
        t.join(30)
    quiet2 = step_rate(srv, jid, args.window)
    srv.request("POST", f"/jobs/{jid}/cancel", key=ALICE)
    srv.wait_final(jid, ALICE, timeout=120)
    srv.stop()

    def pct(xs, p):
        xs = sorted(xs)
        return xs[min(len(xs) - 1, int(p / 100 * len(xs)))] * 1000 if xs else None

    everything = [x for v in lat.values() for x in v]
    quiet = (quiet1[0] + quiet2[0]) / 2
    summary = {
        "requests": len(everything), "errors": len(errors), "error_rate": len(errors) / max(1, len(everything)),
        "achieved_rps": len(everything) / args.window,
        "p50_ms": pct(everything, 50), "p99_ms": pct(everything, 99), "max_ms": pct(everything, 100),
        "p99_ms_by_route": {k: round(pct(v, 99), 2) for k, v in sorted(lat.items())},
        "step_seconds_quiet_before": quiet1[0], "step_seconds_loaded": loaded[0], "step_seconds_quiet_after": quiet2[0],
        "steps_in_windows": [quiet1[1], loaded[1], quiet2[1]],
        "step_time_change_pct": 100 * (loaded[0] - quiet) / quiet,
        "first_errors": errors[:5],
    }
    print(json.dumps(summary, indent=1))
    sys.exit(1 if errors else 0)


if __name__ == "__main__":
    main()
