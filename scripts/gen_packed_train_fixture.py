"""Packed training with PEFT and a plain torch loop: the reference for sample packing.

    .venv/bin/python scripts/gen_packed_train_fixture.py tests/fixtures/lm

Uses `llama-gqa` (gen_model_fixtures.py) and the examples and initial adapter of
`train-parity/` (gen_train_fixture.py). The examples are packed into rows of 24 tokens by
`trl.pack_dataset(strategy="bfd")`; a micro-batch is 2 rows laid end to end in one row, as TRL's
padding-free collator lays them, with `position_ids` restarting per example and no attention
mask, so transformers confines attention to each example; each example's first label is -100.
Rows in order (no shuffle), 2 micro-batches per step, and the step's loss is its summed token
losses over the label tokens of the whole step (so accumulation equals one big batch); clip
1.0; AdamW(lr 1e-3, wd 0.01); linear schedule with 2 warmup steps over 8; f32; dropout 0.
Writes `train-packed/`: rows.json (the packed rows as example indices), steps.json (loss,
learning rate and gradient norm per step) and final-adapter/.
"""

import json
import sys

import datasets
import peft
import torch
import transformers
import trl
from datasets import Dataset
from peft import PeftModel
from transformers import AutoModelForCausalLM, get_linear_schedule_with_warmup
from trl import pack_dataset

root = sys.argv[1]
out = f"{root}/train-packed"
MAX_LEN, ROWS_PER_BATCH, ACCUM, STEPS = 24, 2, 2, 8

examples = json.load(open(f"{root}/train-parity/examples.json"))
ds = Dataset.from_dict({"input_ids": [[i] * len(e["input_ids"]) for i, e in enumerate(examples)]})
packed = pack_dataset(ds, seq_length=MAX_LEN, strategy="bfd")
rows = []
for r in packed:
    row, at = [], 0
    for n in r["seq_lengths"]:
        row.append(r["input_ids"][at])
        at += n
    rows.append(row)

model = AutoModelForCausalLM.from_pretrained(f"{root}/llama-gqa", dtype=torch.float32, attn_implementation="eager")
pm = PeftModel.from_pretrained(model, f"{root}/train-parity/initial-adapter", is_trainable=True)
pm.train()


def micro_batches():
    while True:
        for i in range(0, len(rows), ROWS_PER_BATCH):
            ids, labels, pos = [], [], []
            for r in rows[i : i + ROWS_PER_BATCH]:
                for j in r:
                    e = examples[j]
                    ids += e["input_ids"]
                    labels += [-100] + e["labels"][1:]
                    pos += list(range(len(e["input_ids"])))
            yield torch.tensor([ids]), torch.tensor([labels]), torch.tensor([pos])


def token_nll(logits, labels):
    # Position i predicts label i + 1; an example's first label is -100, so nothing crosses.
    logits, labels = logits[0, :-1], labels[0, 1:]
    return torch.nn.functional.cross_entropy(logits, labels, ignore_index=-100, reduction="sum")


params = [p for p in pm.parameters() if p.requires_grad]
opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01, betas=(0.9, 0.999), eps=1e-8)
sched = get_linear_schedule_with_warmup(opt, num_warmup_steps=2, num_training_steps=STEPS)
it = micro_batches()
steps = []
for step in range(STEPS):
    opt.zero_grad()
    batch = [next(it) for _ in range(ACCUM)]
    n = sum(int((l[0, 1:] != -100).sum()) for _, l, _ in batch)
    total = 0.0
    for ids, labels, pos in batch:
        logits = pm(input_ids=ids, position_ids=pos, use_cache=False).logits
        loss = token_nll(logits, labels) / n
        loss.backward()
        total += loss.item()
    norm = torch.nn.utils.clip_grad_norm_(params, 1.0).item()
    lr = sched.get_last_lr()[0]
    opt.step()
    sched.step()
    steps.append({"step": step + 1, "loss": total, "learning_rate": lr, "grad_norm": norm, "label_tokens": n})

# The packed forward equals each example run alone: attention stays inside examples.
with torch.no_grad():
    ids, labels, pos = next(micro_batches())
    packed_logits = pm(input_ids=ids, position_ids=pos, use_cache=False).logits[0]
    at = 0
    for j in rows[0] + rows[1]:
        e = torch.tensor([examples[j]["input_ids"]])
        alone = pm(input_ids=e, use_cache=False).logits[0]
        assert torch.allclose(packed_logits[at : at + e.shape[1]], alone, atol=1e-5), j
        at += e.shape[1]

import os

os.makedirs(out, exist_ok=True)
pm.save_pretrained(f"{out}/final-adapter")
json.dump(rows, open(f"{out}/rows.json", "w"))
json.dump({"versions": {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
                        "trl": trl.__version__, "datasets": datasets.__version__},
           "steps": steps}, open(f"{out}/steps.json", "w"), indent=1)
print("rows", rows)
print("losses", [round(s["loss"], 4) for s in steps])
