"""Chat-template renderings and token ids from transformers, with a small real BPE tokenizer.

    LLAMA_CPP=path/to/llama.cpp .venv/bin/python scripts/gen_data_fixtures.py tests/fixtures/data

Trains a byte-level BPE tokenizer (vocab 512) with the `tokenizers` library on a fixed text and
adds the special tokens of Llama-3 and ChatML. For each chat template (Llama-3 Instruct, ChatML
as Qwen2-Instruct ships it, Mistral-Instruct/Llama-2 [INST], and Qwen3's own template with its
thinking blocks, and Phi-3.5-mini-instruct's, read from llama.cpp's `models/templates/` in the
llama-cpp-python 0.3.36 sdist) writes a tokenizer directory
`tok-<name>/` (tokenizer.json + tokenizer_config.json with the template) and, in
`templates.json`, what `apply_chat_template` renders and its token ids for a few conversations,
with and without `add_generation_prompt`.
"""

import json
import os
import sys

import tokenizers
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

out = sys.argv[1]

TEMPLATES = {
    "llama3": {
        "template": "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}",
        "bos": "<|begin_of_text|>",
        "eos": "<|eot_id|>",
    },
    "chatml": {
        "template": "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}",
        "bos": None,
        "eos": "<|im_end|>",
    },
    "mistral": {
        "template": "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}",
        "bos": "<s>",
        "eos": "</s>",
    },
}

with open(os.path.join(os.environ["LLAMA_CPP"], "models/templates/Qwen-Qwen3-0.6B.jinja")) as f:
    TEMPLATES["qwen3"] = {"template": f.read(), "bos": None, "eos": "<|im_end|>"}
with open(os.path.join(os.environ["LLAMA_CPP"], "models/templates/microsoft-Phi-3.5-mini-instruct.jinja")) as f:
    # Phi-3's own tokens are added to this tokenizer alone, so the others keep their ids.
    TEMPLATES["phi3"] = {"template": f.read(), "bos": "<s>", "eos": "<|endoftext|>",
                         "extra": ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "<|endoftext|>"]}

SPECIALS = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|im_start|>",
            "<|im_end|>", "<s>", "</s>", "<pad>"]

CORPUS = [
    "The Zephyr 9 kettle boils a litre of water in ninety seconds.",
    "What is the capital of France? The capital of France is Paris.",
    "You are a helpful assistant. Answer briefly and politely.",
    "Translate to French: good morning -> bonjour. Thank you -> merci.",
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.",
    "### Instruction:\n### Input:\n### Response:",
    "[INST] user assistant system [/INST] Hello! How can I help you today?",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12 42 100 2024.",
] * 20

tok = Tokenizer(models.BPE())
tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
tok.decoder = decoders.ByteLevel()
trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
tok.train_from_iterator(CORPUS, trainer)

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"},
     {"role": "assistant", "content": "Paris."}],
    [{"role": "system", "content": "You are a helpful assistant."},
     {"role": "user", "content": "Boil time of the Zephyr 9?"},
     {"role": "assistant", "content": " Ninety seconds. "},
     {"role": "user", "content": "Thanks!"},
     {"role": "assistant", "content": "You are welcome."}],
    [{"role": "user", "content": "  spaces  and\nnewlines\n"}],
    [{"role": "user", "content": "What is 2 + 2?"},
     {"role": "assistant", "content": "<think>\nTwo and two.\n</think>\n\n4"},
     {"role": "user", "content": "And 3 + 3?"},
     {"role": "assistant", "content": "<think>\nThree and three.\n</think>\n\n6"}],
]

fixtures = {"versions": {"transformers": transformers.__version__, "tokenizers": tokenizers.__version__,
                         "generator": "scripts/gen_data_fixtures.py"}, "cases": []}
for name, t in TEMPLATES.items():
    d = f"{out}/tok-{name}"
    os.makedirs(d, exist_ok=True)
    own = tok
    if t.get("extra"):
        own = Tokenizer.from_str(tok.to_str())
        own.add_special_tokens(t["extra"])
    fast = PreTrainedTokenizerFast(tokenizer_object=own, bos_token=t["bos"], eos_token=t["eos"], pad_token="<pad>")
    fast.chat_template = t["template"]
    fast.save_pretrained(d)
    for i, conv in enumerate(CONVERSATIONS):
        if name == "mistral" and conv[0]["role"] == "system":
            continue
        for gen in (False, True):
            if gen and conv[-1]["role"] == "assistant":
                continue
            text = fast.apply_chat_template(conv, tokenize=False, add_generation_prompt=gen)
            ids = fast.apply_chat_template(conv, tokenize=True, add_generation_prompt=gen)
            if isinstance(ids, dict) or hasattr(ids, "keys"):
                ids = ids["input_ids"]
            fixtures["cases"].append({"template": name, "conversation": i, "add_generation_prompt": gen,
                                      "text": text, "ids": list(ids)})
    # plain-text encodings with the tokenizer's own special-token handling
    fixtures.setdefault("encodings", []).append({"template": name, "text": "Hello! How can I help you today?",
                                                 "ids": fast("Hello! How can I help you today?")["input_ids"]})
# Whether transformers puts BOS before a plain text (`tokenizer(text)`), for each tokenizer above
# and for `tok-bos`, the same vocabulary with Llama 3's post-processor (BOS, then the text).
from tokenizers import processors
from transformers import AutoTokenizer

bos_tok = Tokenizer.from_str(tok.to_str())
bos_tok.post_processor = processors.TemplateProcessing(
    single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B",
    special_tokens=[("<|begin_of_text|>", bos_tok.token_to_id("<|begin_of_text|>"))])
PreTrainedTokenizerFast(tokenizer_object=bos_tok, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
                        pad_token="<pad>").save_pretrained(f"{out}/tok-bos")
fixtures["bos_added"] = {}
for name in [*TEMPLATES, "bos"]:
    t = AutoTokenizer.from_pretrained(f"{out}/tok-{name}")
    ids = t("Hello there")["input_ids"]
    fixtures["bos_added"][name] = t.bos_token_id is not None and ids[0] == t.bos_token_id
fixtures["conversations"] = CONVERSATIONS
with open(f"{out}/templates.json", "w") as f:
    json.dump(fixtures, f, indent=1, ensure_ascii=False)
print(len(fixtures["cases"]), "cases")
