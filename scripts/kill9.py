"""Kill -9 under load: queue jobs, attach SSE followers, kill the server at random moments and
restart it, then check that every job ended exactly once, every event sequence (stored, and as
each follower received it across reconnects) is gapless without duplicates, and every listed
artifact downloads complete (size and sha256 match).

    cargo build && python scripts/kill9.py [--jobs 20] [--rounds 10] [--workers cpu,cpu]

Prints a JSON summary; exits non-zero if any check fails.
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
from qlorad_harness import Server, check_events, ensure_model  # noqa: E402


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


class Follower(threading.Thread):
    """Follows one job's SSE stream, reconnecting with Last-Event-ID, until the final status."""

    def __init__(self, base, jid):
        super().__init__(daemon=True)
        self.base, self.jid = base, jid
        self.seqs, self.reconnects, self.done = [], 0, False

    def run(self):
        last = None
        while not self.done:
            try:
                h = {"accept": "text/event-stream"}
                if last is not None:
                    h["last-event-id"] = str(last)
                req = urllib.request.Request(f"{self.base}/jobs/{self.jid}/events", headers=h)
                with urllib.request.urlopen(req, timeout=120) as r:
                    data = None
                    for line in r:
                        line = line.decode().rstrip("\n")
                        if line.startswith("data: "):
                            data = json.loads(line[6:])
                        elif line == "" and data is not None:
                            self.seqs.append(data["seq"])
                            last = data["seq"]
                            if data["type"] == "status" and data["data"].get("status") in ("succeeded", "failed", "cancelled"):
                                self.done = True
                                return
                            data = None
            except Exception:
                pass
            self.reconnects += 1
            time.sleep(0.3)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--workers", default="cpu,cpu")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--steps", type=int, default=60, help="optimizer steps of the shortest job")
    args = ap.parse_args()
    rng = random.Random(args.seed)
    work = tempfile.mkdtemp(prefix="qlorad-kill9-")
    models = os.path.join(work, "models")
    ensure_model(models)
    srv = Server(os.path.join(work, "data"), models, free_port(), workers=args.workers).start()
    fid = srv.upload()
    jobs = []
    for i in range(args.jobs):
        spec = {"model": "tiny", "training_file": fid, "lora": {"r": 4},
                "hyperparameters": {"max_steps": args.steps + 5 * (i % 4), "batch_size": 2, "seed": i},
                "checkpoint_every": 4,
                "export": {"gguf_lora": i % 2 == 0, "merged_safetensors": i % 5 == 0}}
        jobs.append(srv.create_job(spec))
    followers = [Follower(srv.base, j) for j in jobs]
    for f in followers:
        f.start()
    rounds = []
    for r in range(args.rounds):
        time.sleep(rng.uniform(0.5, 4.0))
        counts = {}
        for j in jobs:
            st = srv.job(j)["status"]
            counts[st] = counts.get(st, 0) + 1
        srv.kill9()
        srv.start()
        # Right after a restart: no job has more than one end, none has events after its end.
        bad = []
        for j in jobs:
            ev = srv.events(j)
            finals = [e for e in ev if e["type"] == "status" and e["data"].get("status") in ("succeeded", "failed", "cancelled")]
            seqs = [e["seq"] for e in ev]
            if len(finals) > 1 or seqs != list(range(1, len(seqs) + 1)):
                bad.append(j)
            if finals and ev[-1] is not finals[-1]:
                bad.append(j)
        rounds.append({"round": r + 1, "before_kill": counts, "inconsistent_after_restart": bad})
        print(json.dumps(rounds[-1]), flush=True)
    results = {}
    for j in jobs:
        results[j] = srv.wait_final(j, timeout=900)["status"]
    for f in followers:
        f.join(60)
    problems = {}
    artifacts = [0, 0]
    for j, f in zip(jobs, followers):
        p = check_events(srv.events(j))
        if f.seqs != list(range(1, len(f.seqs) + 1)):
            p.append(f"follower saw {f.seqs}")
        if not f.done:
            p.append("follower never saw the end")
        listed, ok = srv.artifacts_ok(j)
        artifacts[0] += listed
        artifacts[1] += ok
        if listed != ok:
            p.append(f"{listed - ok} incomplete artifacts")
        if results[j] == "succeeded" and listed == 0:
            p.append("succeeded without artifacts")
        if p:
            problems[j] = p
    srv.stop()
    summary = {
        "jobs": len(jobs), "rounds": args.rounds,
        "final_statuses": {s: list(results.values()).count(s) for s in set(results.values())},
        "follower_reconnects": sum(f.reconnects for f in followers),
        "events_checked": sum(len(f.seqs) for f in followers),
        "artifacts_listed": artifacts[0], "artifacts_complete": artifacts[1],
        "rounds_with_inconsistency": sum(1 for r in rounds if r["inconsistent_after_restart"]),
        "problems": problems, "work_dir": work,
    }
    print(json.dumps(summary, indent=1))
    sys.exit(1 if problems or summary["rounds_with_inconsistency"] else 0)


if __name__ == "__main__":
    main()
