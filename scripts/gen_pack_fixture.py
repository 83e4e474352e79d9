"""TRL's best-fit-decreasing packing of uneven example lengths: the reference for data::pack.

    .venv/bin/python scripts/gen_pack_fixture.py tests/fixtures/data/pack-bfd.json

Lengths are drawn as instruction data runs (many short, a long tail, some ties), every
example's tokens are its own index so the packed rows name the examples they hold, and
`trl.pack_dataset(strategy="bfd")` packs them into rows of `max_len` tokens.
"""

import json
import random
import sys

import datasets
import trl
from datasets import Dataset
from trl import pack_dataset

out = sys.argv[1]
rng = random.Random(11)
cases = []
for max_len, n in [(64, 200), (16, 40), (256, 120)]:
    lengths = [max(1, min(int(rng.lognormvariate(2.6, 0.8)), 2 * max_len)) for _ in range(n)]
    lengths[3] = lengths[7]  # ties keep dataset order
    ds = Dataset.from_dict({"input_ids": [[i] * L for i, L in enumerate(lengths)]})
    packed = pack_dataset(ds, seq_length=max_len, strategy="bfd")
    rows = []
    for r in packed:
        ids, seq_lengths = r["input_ids"], r["seq_lengths"]
        row, at = [], 0
        for L in seq_lengths:
            row.append(ids[at])
            at += L
        rows.append(row)
    cases.append({"max_len": max_len, "lengths": lengths, "rows": rows})
json.dump({"versions": {"trl": trl.__version__, "datasets": datasets.__version__}, "cases": cases},
          open(out, "w"))
print([len(c["rows"]) for c in cases], "rows")
