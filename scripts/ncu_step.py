"""Where the GPU time of one qlorad training step goes, kernel by kernel, under Nsight Compute.

    python scripts/ncu_step.py --qlorad /path/to/qlorad -- --model DIR --device cuda:0 \\
        --seq-len 2048 --batch-size 1 --spec spec.json

Runs `qlorad bench train --steps 1 --profiler-range` under `ncu --profile-from-start off`, which
records every kernel of the first timed step with its duration (kernels run one at a time). Prints
the kernels grouped by name, largest first, with their count and total time, and the sum: compare
it with the step time of an unprofiled run to see how long the GPU sits idle waiting for launches.
"""

import argparse
import collections
import csv
import io
import subprocess
import sys


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--qlorad", required=True)
    ap.add_argument("--ncu", default="ncu")
    ap.add_argument("--top", type=int, default=40)
    ap.add_argument("--raw", help="also keep ncu's CSV here")
    ap.add_argument("rest", nargs=argparse.REMAINDER, help="-- then `qlorad bench train` arguments")
    args = ap.parse_args()
    rest = [a for a in args.rest if a != "--"]
    cmd = [args.ncu, "--profile-from-start", "off", "--metrics", "gpu__time_duration.sum", "--csv",
           "--page", "raw", "--print-units", "base", args.qlorad, "bench", "train", "--steps", "1",
           "--profiler-range", *rest]
    print("+", " ".join(cmd), file=sys.stderr, flush=True)
    p = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    if p.returncode != 0:
        print(p.stdout[-4000:])
        raise SystemExit(f"ncu failed ({p.returncode})")
    if args.raw:
        with open(args.raw, "w") as f:
            f.write(p.stdout)
    lines = p.stdout.splitlines()
    start = next(i for i, l in enumerate(lines) if l.startswith('"ID"'))
    rows = list(csv.DictReader(io.StringIO("\n".join(lines[start:]))))
    by_name = collections.defaultdict(lambda: [0, 0.0])
    total = 0.0
    for r in rows:
        try:
            ns = float(r["gpu__time_duration.sum"].replace(",", ""))
        except (KeyError, ValueError):
            continue  # the units row
        name = r["Kernel Name"].split("(")[0][:90]
        by_name[name][0] += 1
        by_name[name][1] += ns
        total += ns
    print(f"{sum(v[0] for v in by_name.values())} kernels, {total / 1e6:.1f} ms of GPU time in the step")
    for name, (n, ns) in sorted(by_name.items(), key=lambda kv: -kv[1][1])[: args.top]:
        print(f"{ns / 1e6:9.2f} ms {ns / total * 100:5.1f}% {n:6d}  {name}")


if __name__ == "__main__":
    main()
