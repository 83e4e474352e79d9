"""DPO with TRL's DPOTrainer and a PEFT adapter: the reference for preference tuning.

    .venv/bin/python scripts/gen_dpo_fixture.py tests/fixtures/lm

Makes a tiny random Llama over the `tok-chatml` tokenizer (gen_data_fixtures.py) and a LoRA
adapter that is not zero (init_lora_weights=False), then trains it 6 steps with
`trl.DPOTrainer` on `pairs.jsonl` (TRL's conversational prompt/chosen/rejected): 3 pairs per
step in file order (train_sampling_strategy="sequential"), beta 0.5, the sigmoid loss,
max_length 48 (so some pairs are truncated and two, whose prompts fill it, are dropped), AdamW
(lr 1e-3, wd 0.01), linear schedule without warmup, clip 1.0, f32 on the CPU, no dropout,
no gradient checkpointing. The reference is the starting model: TRL copies the adapter into a
frozen "ref" adapter. Writes `dpo/`:

- model/: config.json, model.safetensors and the tokenizer files with its chat template;
- initial-adapter/, final-adapter/ (PEFT);
- pairs.jsonl, strings.jsonl (TRL's plain-text form, which TRL ends with the EOS text);
- tokens.json: TRL's prompt_ids / chosen_ids / rejected_ids of both files, before truncation;
- steps.json: per step the loss, grad_norm, learning_rate and TRL's rewards/* and logps/*.
"""

import copy
import json
import os
import shutil
import sys
import tempfile

import datasets
import peft
import torch
import transformers
import trl
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, TrainerCallback
from trl import DPOConfig, DPOTrainer

root = sys.argv[1]
out = f"{root}/dpo"
tok_dir = os.path.join(os.path.dirname(root.rstrip("/")), "data", "tok-chatml")
os.makedirs(f"{out}/model", exist_ok=True)
for f in ["tokenizer.json", "tokenizer_config.json", "chat_template.jinja"]:
    shutil.copy(f"{tok_dir}/{f}", f"{out}/model/{f}")
tok = AutoTokenizer.from_pretrained(f"{out}/model")

torch.manual_seed(11)
cfg = LlamaConfig(
    vocab_size=len(tok),
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=128,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
    bos_token_id=None,
    eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
    pad_token_id=tok.pad_token_id,
)
model = LlamaForCausalLM(cfg)
# Weights of a trained model's scale, so the log-probabilities are not all alike.
with torch.no_grad():
    for p in model.parameters():
        if p.dim() == 2:
            p.normal_(0, 0.2)
model.save_pretrained(f"{out}/model")
model = LlamaForCausalLM.from_pretrained(f"{out}/model", dtype=torch.float32, attn_implementation="eager")

lcfg = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0, init_lora_weights=False)
pm = get_peft_model(model, lcfg)
with torch.no_grad():
    for n, p in pm.named_parameters():
        if "lora_B" in n:
            p.normal_(0, 0.05)
pm.save_pretrained(f"{out}/initial-adapter")
os.remove(f"{out}/initial-adapter/README.md")


def user(text):
    return [{"role": "user", "content": text}]


def said(text):
    return [{"role": "assistant", "content": text}]


rows = [
    (user("Name a colour."), "Blue, sir.", "blue"),
    (user("What is two and two?"), "Four, sir.", "it is 4"),
    ([{"role": "system", "content": "Be brief."}] + user("Say hi."), "Good day, sir.", "hey"),
    (user("Which planet is red?"), "Mars, sir.", "mars i think"),
    (user("Is water wet? Explain at length, please, with care."), "Indeed it is, sir, most thoroughly so.", "yes"),
    (user("Count to three."), "One, two, three, sir.", "1 2 3"),
    (user("A long question that goes on and on and on and on, does it fill the window?"), "It does, sir.", "yep"),
    (user("Name a fruit."), "An apple, sir.", "apple"),
    (user("What do cats say?"), "Meow, sir.", "they meow a lot, all day and all night long"),
    (user("Where is the sun?"), "In the sky, sir.", "up"),
]
pairs = [{"prompt": p, "chosen": said(c), "rejected": said(r)} for p, c, r in rows]
strings = [
    {"prompt": "Q: " + p[-1]["content"] + "\nA:", "chosen": " " + c, "rejected": " " + r} for p, c, r in rows[:4]
]
for name, recs in [("pairs", pairs), ("strings", strings)]:
    with open(f"{out}/{name}.jsonl", "w") as f:
        for r in recs:
            f.write(json.dumps(r) + "\n")

MAX_LENGTH, BATCH, STEPS, BETA = 48, 3, 6, 0.5
tmp = tempfile.mkdtemp()
args = DPOConfig(
    output_dir=tmp,
    per_device_train_batch_size=BATCH,
    gradient_accumulation_steps=1,
    max_steps=STEPS,
    learning_rate=1e-3,
    lr_scheduler_type="linear",
    warmup_steps=0,
    weight_decay=0.01,
    max_grad_norm=1.0,
    beta=BETA,
    max_length=MAX_LENGTH,
    logging_steps=1,
    report_to=[],
    save_strategy="no",
    use_cpu=True,
    bf16=False,
    gradient_checkpointing=False,
    train_sampling_strategy="sequential",
    seed=0,
    dataloader_num_workers=0,
)


class Steps(TrainerCallback):
    def __init__(self):
        self.steps = []

    def on_log(self, args, state, control, logs=None, **kw):
        if logs and "loss" in logs:
            keep = ["loss", "grad_norm", "learning_rate", "rewards/chosen", "rewards/rejected",
                    "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected"]
            self.steps.append({"step": state.global_step, **{k: float(logs[k]) for k in keep}})


# The tokenization of both files as TRL prepares it (untruncated: the collator truncates).
tokens = {}
untruncated = copy.deepcopy(args)
untruncated.max_length = None
for name in ["pairs", "strings"]:
    ds = Dataset.from_json(f"{out}/{name}.jsonl")
    trainer = DPOTrainer(model=pm, args=untruncated, train_dataset=ds, processing_class=tok)
    prepared = trainer.train_dataset
    tokens[name] = [{k: r[k] for k in ["prompt_ids", "chosen_ids", "rejected_ids"]} for r in prepared]
    del trainer
    pm.delete_adapter("ref")

steps = Steps()
trainer = DPOTrainer(
    model=pm, args=args, train_dataset=Dataset.from_json(f"{out}/pairs.jsonl"), processing_class=tok, callbacks=[steps]
)
assert "ref" in pm.peft_config, "the reference is a copy of the starting adapter"
kept = len(trainer.train_dataset)
trainer.train()
pm.set_adapter("default")
pm.save_pretrained(f"{out}/final-adapter", selected_adapters=["default"])
# save_pretrained puts non-default adapters in subfolders; keep the default one only.
for d in os.listdir(f"{out}/final-adapter"):
    if os.path.isdir(f"{out}/final-adapter/{d}"):
        shutil.rmtree(f"{out}/final-adapter/{d}")
os.remove(f"{out}/final-adapter/README.md")

versions = {
    "torch": torch.__version__,
    "transformers": transformers.__version__,
    "peft": peft.__version__,
    "trl": trl.__version__,
    "datasets": datasets.__version__,
}
json.dump(tokens, open(f"{out}/tokens.json", "w"))
json.dump(
    {"versions": versions, "max_length": MAX_LENGTH, "batch_size": BATCH, "beta": BETA, "pairs_kept": kept,
     "steps": steps.steps},
    open(f"{out}/steps.json", "w"),
    indent=1,
)
shutil.rmtree(tmp)
lens = [(len(t["prompt_ids"]), len(t["chosen_ids"]), len(t["rejected_ids"])) for t in tokens["pairs"]]
print("lengths", lens)
print("kept", kept, "losses", [round(s["loss"], 4) for s in steps.steps])
