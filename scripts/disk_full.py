"""Disk full mid-checkpoint: the data directory on a small tmpfs (needs root), a job training
with frequent checkpoints, the disk filled after its first checkpoint. Checks: the job fails with
a clear error, earlier checkpoints stay readable, the database passes its integrity check and
its events are gapless, the server keeps serving, and a new job succeeds once space is freed.

    cargo build && sudo python scripts/disk_full.py [--mount /mnt/qlorad-full] [--size 64m]

Prints a JSON summary; exits non-zero if a check fails.
"""

import argparse
import json
import os
import socket
import sqlite3
import struct
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from qlorad_harness import Server, check_events, ensure_model  # noqa: E402


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def fill(path, leave_bytes):
    """Write zeros into `path` until fewer than `leave_bytes` are free."""
    chunk = b"\0" * (1 << 20)
    with open(path, "wb") as f:
        while True:
            st = os.statvfs(os.path.dirname(path))
            free = st.f_bavail * st.f_frsize
            if free <= leave_bytes:
                break
            try:
                f.write(chunk[: max(4096, min(len(chunk), free - leave_bytes))])
                f.flush()
            except OSError:
                break
    st = os.statvfs(os.path.dirname(path))
    return st.f_bavail * st.f_frsize


def safetensors_ok(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        body = len(f.read())
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    return end == body


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mount", default="/mnt/qlorad-full")
    ap.add_argument("--size", default="64m")
    ap.add_argument("--leave-kb", type=int, default=256,
                    help="free space left after filling: less than a checkpoint, more than a few database pages")
    args = ap.parse_args()
    os.makedirs(args.mount, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={args.size}", "tmpfs", args.mount], check=True)
    summary = {}
    srv = None
    try:
        work = tempfile.mkdtemp(prefix="qlorad-diskfull-")
        models = os.path.join(work, "models")
        ensure_model(models)
        data = os.path.join(args.mount, "data")
        srv = Server(data, models, free_port(), log=os.path.join(work, "server.log")).start()
        fid = srv.upload()
        spec = {"model": "tiny", "training_file": fid, "lora": {"r": 16, "target_modules": "all-linear"},
                "hyperparameters": {"max_steps": 100000, "batch_size": 2}, "checkpoint_every": 3,
                "keep_checkpoints": 100}
        jid = srv.create_job(spec)
        while not any(e["type"] == "checkpoint" for e in srv.events(jid)):
            time.sleep(0.2)
        filler = os.path.join(args.mount, "filler")
        summary["free_after_fill_bytes"] = fill(filler, args.leave_kb * 1024)
        t0 = time.time()
        # While the disk is full the server answers (reads) and the job ends or waits to be recorded.
        health = []
        status = "running"
        while time.time() - t0 < 60:
            health.append(srv.request("GET", "/healthz")[0])
            status = srv.job(jid)["status"]
            if status != "running":
                break
            time.sleep(0.5)
        summary["status_while_full"] = status
        summary["healthz_while_full"] = sorted(set(health))
        summary["upload_while_full"] = srv.request(
            "POST", "/files?filename=x.jsonl", b"".join([b'{"text": "' + b"x" * 1000 + b'"}\n'] * 2000))[0]
        os.remove(filler)
        job = srv.wait_final(jid, timeout=120)
        summary["job_status"] = job["status"]
        summary["job_error"] = job["error"]
        events = srv.events(jid)
        summary["event_problems"] = check_events(events)
        # Earlier checkpoints: listed, on disk, complete.
        run = os.path.join(data, "jobs", jid, "run")
        cks = srv.request("GET", f"/jobs/{jid}/checkpoints")[1]["data"]
        readable = 0
        for c in cks:
            d = os.path.join(run, c["name"])
            try:
                json.load(open(os.path.join(d, "trainer_state.json")))
                if safetensors_ok(os.path.join(d, "adapter_model.safetensors")) and \
                        safetensors_ok(os.path.join(d, "optimizer.safetensors")):
                    readable += 1
            except (OSError, ValueError):
                pass
        summary["checkpoints_listed"] = len(cks)
        summary["checkpoints_readable"] = readable
        summary["partials_left"] = [n for n in os.listdir(run) if n.endswith(".partial")]
        db = sqlite3.connect(os.path.join(data, "qlorad.db"))
        summary["integrity_check"] = db.execute("PRAGMA integrity_check").fetchone()[0]
        db.close()
        # Space freed: the next job succeeds.
        spec2 = {"model": "tiny", "training_file": fid, "lora": {"r": 4},
                 "hyperparameters": {"max_steps": 4, "batch_size": 2}, "checkpoint_every": 2}
        j2 = srv.create_job(spec2)
        summary["next_job_status"] = srv.wait_final(j2, timeout=300)["status"]
        summary["next_job_artifacts"] = srv.artifacts_ok(j2)
    finally:
        if srv:
            srv.stop()
        subprocess.run(["umount", args.mount])
    print(json.dumps(summary, indent=1))
    ok = (summary.get("job_status") == "failed" and summary.get("checkpoints_readable") == summary.get("checkpoints_listed")
          and summary.get("checkpoints_listed", 0) > 0 and summary.get("integrity_check") == "ok"
          and not summary.get("event_problems") and summary.get("next_job_status") == "succeeded"
          and set(summary.get("healthz_while_full", [])) == {200} and not summary.get("partials_left"))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
