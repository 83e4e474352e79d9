"""bitsandbytes' AdamW8bit on the CPU, step by step: the golden values of qlorad's
`adamw_bnb_8bit` optimizer.

Usage: .venv/bin/python scripts/gen_optim_fixture.py tests/fixtures/optim

Three parameters: two over bitsandbytes' `min_8bit_size` (4,096 elements), with 8-bit blockwise
states (blocks of 256; one with a partial last block), and one under it, whose states stay in
f32. Four steps with seeded gradients, weight decay on. Writes `adamw_8bit.safetensors`: the
parameters before, each step's gradients, the parameters after every step, the final states and
absmax, and the unsigned dynamic map bitsandbytes quantizes the second moment with.
"""

import json
import os
import sys

import bitsandbytes as bnb
import bitsandbytes.functional as F
import numpy as np
import safetensors
import torch
from safetensors.numpy import save_file

SHAPES = {"wide": (32, 160), "ragged": (4100,), "small": (16, 64)}
STEPS = 4
LR, BETAS, EPS, WD = 1e-3, (0.9, 0.999), 1e-8, 0.01


def main(out):
    torch.manual_seed(0)
    params = {k: torch.nn.Parameter(torch.randn(*s) * 0.1) for k, s in SHAPES.items()}
    tensors = {f"p0.{k}": p.detach().numpy().copy() for k, p in params.items()}
    opt = bnb.optim.AdamW8bit(list(params.values()), lr=LR, betas=BETAS, eps=EPS, weight_decay=WD)
    for step in range(1, STEPS + 1):
        for k, p in params.items():
            g = torch.randn_like(p) * (0.01 * step)
            p.grad = g
            tensors[f"grad{step}.{k}"] = g.numpy().copy()
        opt.step()
        for k, p in params.items():
            tensors[f"p{step}.{k}"] = p.detach().numpy().copy()
    for k, p in params.items():
        st = opt.state[p]
        for name in ("state1", "state2", "absmax1", "absmax2"):
            if name in st:
                tensors[f"{name}.{k}"] = st[name].numpy().copy()
    tensors["udynamic"] = F.create_dynamic_map(signed=False).numpy().astype(np.float32)
    meta = {
        "made_by": "scripts/gen_optim_fixture.py",
        "bitsandbytes": bnb.__version__,
        "torch": torch.__version__,
        "safetensors": safetensors.__version__,
        "optimizer": json.dumps({"lr": LR, "betas": BETAS, "eps": EPS, "weight_decay": WD, "steps": STEPS}),
    }
    os.makedirs(out, exist_ok=True)
    save_file(tensors, os.path.join(out, "adamw_8bit.safetensors"), metadata=meta)


if __name__ == "__main__":
    main(sys.argv[1])
