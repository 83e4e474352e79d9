"""Greedy generation with transformers' `generate`: the reference for qlorad's KV-cache decoder.

    .venv/bin/python scripts/gen_generate_fixture.py tests/fixtures/lm

For the f32 models of gen_model_fixtures.py (llama-gqa, llama3-tied, qwen2, qwen3) and for
llama-gqa with its PEFT adapter unmerged, three prompts of random token ids (lengths 3, 9 and
17) continued greedily by 24 tokens (`do_sample=False`, no EOS stop). Writes
`generate/expected.json`: per case the prompts, the continuations, and the smallest gap between
the two best logits over all steps (a tie would make any implementation's choice arbitrary;
every gap here is far above f32 rounding).
"""

import json
import sys

import peft
import torch
import transformers
from peft import PeftModel
from transformers import AutoModelForCausalLM

root = sys.argv[1]
NEW = 24
g = torch.Generator().manual_seed(21)
prompts = [torch.randint(3, 128, (n,), generator=g).tolist() for n in (3, 9, 17)]
cases = {}
for name, adapter in [("llama-gqa", None), ("llama3-tied", None), ("qwen2", None), ("qwen3", None),
                      ("llama-gqa", "llama-gqa-lora")]:
    model = AutoModelForCausalLM.from_pretrained(f"{root}/{name}", dtype=torch.float32, attn_implementation="eager")
    if adapter:
        model = PeftModel.from_pretrained(model, f"{root}/{adapter}")
    model.eval()
    outs, gap = [], float("inf")
    for p in prompts:
        with torch.no_grad():
            r = model.generate(torch.tensor([p]), max_new_tokens=NEW, do_sample=False, eos_token_id=None,
                               pad_token_id=0, output_scores=True, return_dict_in_generate=True)
        outs.append(r.sequences[0, len(p):].tolist())
        for s in r.scores:
            top = torch.topk(s[0], 2).values
            gap = min(gap, float(top[0] - top[1]))
    key = name if adapter is None else f"{name}+{adapter}"
    cases[key] = {"model": name, "adapter": adapter, "prompts": prompts, "continuations": outs, "min_top2_gap": gap}
    print(key, "min gap", gap)
json.dump({"versions": {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__},
           "max_new_tokens": NEW, "cases": cases}, open(f"{root}/generate/expected.json", "w"), indent=1)
