"""20 steps of LoRA training with PEFT and a plain torch loop: the loss-parity reference.

    .venv/bin/python scripts/gen_train_fixture.py tests/fixtures/lm

Uses the `llama-gqa` model made by gen_model_fixtures.py. Writes `train-parity/`:
examples.json (token ids and labels, prompt tokens -100), initial-adapter/ (PEFT,
init_lora_weights=False), final-adapter/, and steps.json (loss, learning rate and gradient
norm per optimizer step). Batches: examples in order, 2 per micro-batch, right-padded; 2
micro-batches per step, each loss divided by 2; clip 1.0; AdamW(lr 1e-3, wd 0.01); linear
schedule with 2 warmup steps over 20; f32; dropout 0.
"""

import json
import sys

import peft
import torch
import transformers
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, get_linear_schedule_with_warmup

root = sys.argv[1]
out = f"{root}/train-parity"
torch.manual_seed(3)

model = AutoModelForCausalLM.from_pretrained(f"{root}/llama-gqa", dtype=torch.float32, attn_implementation="eager")
cfg = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0, init_lora_weights=False)
pm = get_peft_model(model, cfg)
pm.save_pretrained(f"{out}/initial-adapter")

examples = []
g = torch.Generator().manual_seed(5)
for i in range(16):
    n = int(torch.randint(5, 13, (1,), generator=g))
    ids = torch.randint(3, 128, (n,), generator=g).tolist()
    labels = [-100] * 3 + ids[3:]
    examples.append({"input_ids": ids, "labels": labels})
json.dump(examples, open(f"{out}/examples.json", "w"))

def batches():
    while True:
        for i in range(0, len(examples), 2):
            chunk = examples[i : i + 2]
            s = max(len(e["input_ids"]) for e in chunk)
            ids = torch.zeros(len(chunk), s, dtype=torch.long)
            mask = torch.zeros(len(chunk), s, dtype=torch.long)
            labels = torch.full((len(chunk), s), -100, dtype=torch.long)
            for j, e in enumerate(chunk):
                n = len(e["input_ids"])
                ids[j, :n] = torch.tensor(e["input_ids"])
                mask[j, :n] = 1
                labels[j, :n] = torch.tensor(e["labels"])
            yield ids, mask, labels

params = [p for p in pm.parameters() if p.requires_grad]
opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01, betas=(0.9, 0.999), eps=1e-8)
sched = get_linear_schedule_with_warmup(opt, num_warmup_steps=2, num_training_steps=20)
it = batches()
steps = []
for step in range(20):
    opt.zero_grad()
    losses = []
    for _ in range(2):
        ids, mask, labels = next(it)
        loss = pm(input_ids=ids, attention_mask=mask, labels=labels).loss
        (loss / 2).backward()
        losses.append(loss.item())
    norm = torch.nn.utils.clip_grad_norm_(params, 1.0).item()
    lr = sched.get_last_lr()[0]
    opt.step()
    sched.step()
    steps.append({"step": step + 1, "loss": sum(losses) / 2, "learning_rate": lr, "grad_norm": norm})
pm.save_pretrained(f"{out}/final-adapter")
json.dump({"versions": {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__},
           "steps": steps}, open(f"{out}/steps.json", "w"), indent=1)
print("losses", [round(s["loss"], 4) for s in steps])
