#!/usr/bin/env python3
"""The queue's read throughput and event delivery on SQLite and on PostgreSQL, side by side.

Starts `qlorad serve --workers none` on each store (SQLite in a fresh data directory; a fresh
PostgreSQL database on TEST_DATABASE_URL's server, as scripts/test_services.sh gives), then:
  * GET /jobs/{id}: requests a second from 16 client threads for a few seconds;
  * SSE delivery: a follower on one API process, `POST /jobs/{id}/cancel` of a queued job on
    another (on PostgreSQL: a second process, so the event crosses LISTEN/NOTIFY; on SQLite the
    same process), milliseconds from the cancel's answer to the follower's `cancelled` event.

  source scripts/test_services.sh
  cargo run --release --example random_model -- /tmp/bench-models/tiny tiny
  python3 scripts/bench_service.py --bin target/release/qlorad --models /tmp/bench-models
Standard library only.
"""

import argparse
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid

DATA = '{"messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]}\n'


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def request(port, method, path, body=None):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    c.request(method, path, body=body, headers={"content-type": "application/json"})
    r = c.getresponse()
    data = r.read()
    c.close()
    return r.status, json.loads(data) if data else None


def start(bin, data_dir, database_url, models):
    port = free_port()
    args = [bin, "serve", "--workers", "none", "--listen", f"127.0.0.1:{port}",
            "--data-dir", data_dir, "--model-root", models]
    if database_url:
        args += ["--database-url", database_url]
    p = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(300):
        try:
            if request(port, "GET", "/healthz")[0] == 200:
                return p, port
        except OSError:
            pass
        time.sleep(0.05)
    raise SystemExit(f"{bin} did not start")


def fresh_postgres():
    server = os.environ.get("TEST_DATABASE_URL")
    if not server:
        raise SystemExit("TEST_DATABASE_URL is unset: source scripts/test_services.sh")
    name = f"qlorad_bench_{uuid.uuid4().hex}"
    subprocess.run(["psql", server, "-qc", f"CREATE DATABASE {name}"], check=True)
    return server.rsplit("/", 1)[0] + "/" + name


def queued_job(port, file_id):
    spec = {"model": "tiny", "training_file": file_id, "hyperparameters": {"max_steps": 1}}
    status, job = request(port, "POST", "/jobs", json.dumps(spec))
    assert status == 201, job
    return job["id"]


def read_throughput(port, job_id, seconds, threads=16):
    count = [0] * threads
    stop = time.time() + seconds

    def loop(i):
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        while time.time() < stop:
            c.request("GET", f"/jobs/{job_id}")
            r = c.getresponse()
            r.read()
            assert r.status == 200
            count[i] += 1
        c.close()

    ts = [threading.Thread(target=loop, args=(i,)) for i in range(threads)]
    t0 = time.time()
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return sum(count) / (time.time() - t0)


def delivery_ms(follow_port, act_port, job_id):
    c = http.client.HTTPConnection("127.0.0.1", follow_port, timeout=30)
    c.request("GET", f"/jobs/{job_id}/events", headers={"accept": "text/event-stream"})
    r = c.getresponse()
    # The replay (the queued event) first: the stream is live once it is read.
    while not r.fp.readline().startswith(b"data:"):
        pass
    t0 = time.perf_counter()
    status, _ = request(act_port, "POST", f"/jobs/{job_id}/cancel")
    t1 = time.perf_counter()
    assert status == 200
    while True:
        line = r.fp.readline()
        if line.startswith(b"data:") and b'"cancelled"' in line:
            t2 = time.perf_counter()
            break
    c.close()
    return (t2 - t1) * 1000, (t2 - t0) * 1000


def bench(name, bin, database_url, models, seconds, n):
    with tempfile.TemporaryDirectory() as tmp:
        procs = []
        a, pa = start(bin, os.path.join(tmp, "a"), database_url, models)
        procs.append(a)
        pb = pa
        if database_url:
            b, pb = start(bin, os.path.join(tmp, "b"), database_url, models)
            procs.append(b)
        try:
            c = http.client.HTTPConnection("127.0.0.1", pa, timeout=30)
            c.request("POST", "/files?filename=t.jsonl", body=DATA)
            r = c.getresponse()
            file_id = json.loads(r.read())["id"]
            job = queued_job(pa, file_id)
            rps = read_throughput(pa, job, seconds)
            after, total = [], []
            for _ in range(n):
                j = queued_job(pa, file_id)
                x, y = delivery_ms(pa, pb, j)
                after.append(x)
                total.append(y)
            return {
                "store": name,
                "get_job_per_second": round(rps),
                "sse_after_answer_ms_median": round(statistics.median(after), 2),
                "sse_from_request_ms_median": round(statistics.median(total), 2),
                "sse_from_request_ms_p90": round(sorted(total)[int(0.9 * len(total)) - 1], 2),
                "processes": len(procs),
            }
        finally:
            for p in procs:
                p.terminate()
                p.wait()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default="target/release/qlorad")
    ap.add_argument("--seconds", type=float, default=5)
    ap.add_argument("--n", type=int, default=50)
    ap.add_argument("--models", required=True, help="a model root with a model named tiny")
    a = ap.parse_args()
    rows = [bench("sqlite", a.bin, None, a.models, a.seconds, a.n),
            bench("postgres", a.bin, fresh_postgres(), a.models, a.seconds, a.n)]
    for r in rows:
        print(json.dumps(r))


if __name__ == "__main__":
    sys.exit(main())
