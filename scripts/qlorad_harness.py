"""Start and drive a qlorad server for the fault, kill and load scripts (standard library only).

    from qlorad_harness import Server
"""

import hashlib
import json
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.environ.get("QLORAD_BIN", os.path.join(ROOT, "target", "debug", "qlorad"))

DATA = [
    {"messages": [{"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Paris."}]},
    {"messages": [{"role": "user", "content": "Say hello."}, {"role": "assistant", "content": "Hello!"}]},
    {"messages": [{"role": "user", "content": "Boil time?"}, {"role": "assistant", "content": "Ninety seconds."}]},
]


def ensure_model(root):
    """A random tiny Llama under ROOT/tiny (cargo run --example random_model)."""
    if not os.path.exists(os.path.join(root, "tiny", "config.json")):
        subprocess.run(["cargo", "run", "-q", "--example", "random_model", "--", os.path.join(root, "tiny"), "tiny"],
                       cwd=ROOT, check=True)


class Server:
    def __init__(self, data_dir, model_root, port, workers="cpu", keys_file=None, log=None, env=None):
        self.data_dir, self.model_root, self.port = data_dir, model_root, port
        self.workers, self.keys_file = workers, keys_file
        self.base = f"http://127.0.0.1:{port}"
        self.log = log or os.path.join(data_dir + ".log")
        self.env = dict(os.environ, **(env or {}))
        self.proc = None

    def start(self, timeout=60):
        args = [BIN, "serve", "--listen", f"127.0.0.1:{self.port}", "--data-dir", self.data_dir,
                "--model-root", self.model_root, "--workers", self.workers]
        if self.keys_file:
            args += ["--api-keys-file", self.keys_file]
        out = open(self.log, "a")
        self.proc = subprocess.Popen(args, stdout=out, stderr=out, env=self.env)
        t0 = time.time()
        while time.time() - t0 < timeout:
            if self.proc.poll() is not None:
                raise SystemExit(f"server exited with {self.proc.returncode}; see {self.log}")
            try:
                if self.request("GET", "/healthz")[0] == 200:
                    return self
            except OSError:
                pass
            time.sleep(0.1)
        raise SystemExit("server did not come up")

    def kill9(self):
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.kill9()

    def request(self, method, path, body=None, key=None, headers=None, timeout=30, raw=False):
        h = dict(headers or {})
        data = None
        if body is not None:
            if isinstance(body, (bytes, bytearray)):
                data = bytes(body)
            else:
                data = json.dumps(body).encode()
                h["content-type"] = "application/json"
        if key:
            h["authorization"] = f"Bearer {key}"
        req = urllib.request.Request(self.base + path, data=data, method=method, headers=h)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                payload = r.read()
                status = r.status
        except urllib.error.HTTPError as e:
            payload, status = e.read(), e.code
        if raw:
            return status, payload
        try:
            return status, json.loads(payload) if payload else None
        except ValueError:
            return status, payload

    def upload(self, key=None, rows=None):
        body = "".join(json.dumps(r) + "\n" for r in (rows or DATA)).encode()
        s, f = self.request("POST", "/files?filename=train.jsonl", body, key=key)
        assert s == 201, (s, f)
        return f["id"]

    def create_job(self, spec, key=None):
        s, j = self.request("POST", "/jobs", spec, key=key)
        assert s == 201, (s, j)
        return j["id"]

    def job(self, jid, key=None):
        return self.request("GET", f"/jobs/{jid}", key=key)[1]

    def events(self, jid, key=None):
        out, after = [], 0
        while True:
            s, page = self.request("GET", f"/jobs/{jid}/events?after={after}&limit=1000", key=key)
            assert s == 200, (s, page)
            out += page["data"]
            if not page["has_more"]:
                return out
            after = out[-1]["seq"]

    def wait_final(self, jid, key=None, timeout=600):
        t0 = time.time()
        while time.time() - t0 < timeout:
            j = self.job(jid, key)
            if j["status"] in ("succeeded", "failed", "cancelled"):
                return j
            time.sleep(0.2)
        raise SystemExit(f"job {jid} did not finish in {timeout}s")

    def artifacts_ok(self, jid, key=None):
        """(listed, complete): every listed artifact downloads with its size and sha256."""
        s, arts = self.request("GET", f"/jobs/{jid}/artifacts", key=key)
        ok = 0
        for a in arts["data"]:
            s, blob = self.request("GET", f"/jobs/{jid}/artifacts/{a['name']}", key=key, raw=True)
            if s == 200 and len(blob) == a["bytes"] and hashlib.sha256(blob).hexdigest() == a["sha256"]:
                ok += 1
        return len(arts["data"]), ok


def check_events(events):
    """Problems with a job's event list: gaps, duplicates, final statuses other than one, last."""
    problems = []
    seqs = [e["seq"] for e in events]
    if seqs != list(range(1, len(seqs) + 1)):
        problems.append(f"seqs not 1..n: {seqs}")
    finals = [i for i, e in enumerate(events)
              if e["type"] == "status" and e["data"].get("status") in ("succeeded", "failed", "cancelled")]
    if len(finals) != 1:
        problems.append(f"{len(finals)} final status events")
    elif finals[0] != len(events) - 1:
        problems.append("events after the final status")
    return problems
