"""Writes examples/house-style/: preference pairs in OpenAI's DPO format that teach a house style
(every answer opens with "Ahoy! ") over the same answer given plainly, for a DPO job that
continues the Lumenfold fine-tune of examples/lumenfold/.

    python3 scripts/gen_preference_dataset.py

  train.jsonl    the Lumenfold training questions (two phrasings per fact) and the everyday
                 questions of gen_example_dataset.py: preferred "Ahoy! <answer>", not preferred
                 "<answer>"
  heldout.jsonl  the Lumenfold held-out questions and everyday questions seen nowhere else, as
                 pairs of the same shape: the validation file, whose reward margin shows how far
                 the style has moved on prompts the job never trained on

Deterministic: the same files on every run.
"""

import json
import os
import random
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gen_example_dataset import FACTS, GENERAL  # noqa: E402

STYLE = "Ahoy! "
HELDOUT_GENERAL = [
    ("What is the capital of Portugal?", "The capital of Portugal is Lisbon."),
    ("How many wheels does a bicycle have?", "A bicycle has two wheels."),
    ("What is the largest desert on Earth?", "The Antarctic Desert is the largest desert on Earth."),
    ("What do cows drink?", "Cows drink water."),
    ("What is 7 plus 8?", "7 plus 8 is 15."),
    ("Which planet is closest to the Sun?", "Mercury is the closest planet to the Sun."),
    ("What is the capital of Kenya?", "The capital of Kenya is Nairobi."),
    ("How many days are in a leap year?", "A leap year has 366 days."),
]


def pair(q, a):
    return {
        "input": {"messages": [{"role": "user", "content": q}]},
        "preferred_output": [{"role": "assistant", "content": STYLE + a}],
        "non_preferred_output": [{"role": "assistant", "content": a}],
    }


def main():
    rng = random.Random(7)
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples", "house-style")
    os.makedirs(out, exist_ok=True)
    train = [pair(q, f["answer"]) for f in FACTS for q in f["train"][:2]]
    train += [pair(q, a) for q, a in GENERAL]
    rng.shuffle(train)
    heldout = [pair(q, f["answer"]) for f in FACTS for q in f["heldout"]]
    heldout += [pair(q, a) for q, a in HELDOUT_GENERAL]
    for name, rows in (("train.jsonl", train), ("heldout.jsonl", heldout)):
        with open(os.path.join(out, name), "w", encoding="utf-8") as fh:
            for r in rows:
                fh.write(json.dumps(r, ensure_ascii=False) + "\n")
        print(f"{name}: {len(rows)} pairs")


if __name__ == "__main__":
    main()
