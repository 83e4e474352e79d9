"""Example lengths shaped like instruction-tuning data, for `qlorad bench train --lengths`.

    python3 scripts/gen_lengths.py gpu/alpaca-lengths.json [--n 4000] [--seed 7]

Alpaca-style sets are mostly short (a few hundred tokens: an instruction, perhaps an input,
a response) with a long tail; here token counts are drawn log-normally (median 300, sigma 0.6)
and kept to 100..1500. Plain Python, no dependencies.
"""

import argparse
import json
import random

ap = argparse.ArgumentParser()
ap.add_argument("out")
ap.add_argument("--n", type=int, default=4000)
ap.add_argument("--seed", type=int, default=7)
ap.add_argument("--median", type=float, default=300.0)
ap.add_argument("--sigma", type=float, default=0.6)
a = ap.parse_args()
rng = random.Random(a.seed)
mu = __import__("math").log(a.median)
lengths = [min(1500, max(100, int(rng.lognormvariate(mu, a.sigma)))) for _ in range(a.n)]
json.dump(lengths, open(a.out, "w"))
mean = sum(lengths) / len(lengths)
print(f"{len(lengths)} lengths, mean {mean:.0f}, min {min(lengths)}, max {max(lengths)}")
