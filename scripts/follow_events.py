"""Prints a job's Server-Sent Events as they arrive, one line each (reads the stream on stdin).

    curl -sN -H 'accept: text/event-stream' localhost:8080/jobs/JOB/events | python3 scripts/follow_events.py
"""

import json
import sys

for line in sys.stdin:
    if not line.startswith("data:"):
        continue
    e = json.loads(line[5:])
    d = e.get("data") or {}
    if e["type"] == "metrics":
        parts = [f"step {d.get('step')}"]
        if "loss" in d:
            parts.append(f"loss {d['loss']:.3f}")
        if "eval_loss" in d:
            parts.append(f"eval_loss {d['eval_loss']:.3f}")
        if "learning_rate" in d:
            parts.append(f"lr {d['learning_rate']:.2e}")
        if "tokens_per_second" in d:
            parts.append(f"{d['tokens_per_second']:.0f} tok/s")
        print("  ".join(parts), flush=True)
    else:
        print(f"{e['type']}: {e.get('message', '')} {json.dumps(d)[:100]}", flush=True)
