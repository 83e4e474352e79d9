"""Check that a directory written by `qlorad quantize` loads in transformers as a 4-bit model
and holds the weights bitsandbytes itself would have produced.

    .venv/bin/python scripts/check_transformers_load.py ORIGINAL_DIR QLORAD_DIR

Loads QLORAD_DIR with AutoModelForCausalLM.from_pretrained (bitsandbytes 4-bit, CPU), then for
every Linear4bit compares (a) its dequantized weight with bitsandbytes quantizing the original
weight with the same settings and dequantizing, bit for bit, and (b) runs a forward pass from the
dequantized weights to show the model computes. Exits non-zero on any mismatch.
"""

import json
import sys

import bitsandbytes
import bitsandbytes.functional as F
import torch
from transformers import AutoModelForCausalLM

orig_dir, q_dir = sys.argv[1], sys.argv[2]
qcfg = json.load(open(f"{q_dir}/config.json"))["quantization_config"]

model = AutoModelForCausalLM.from_pretrained(q_dir, device_map="cpu")
orig = AutoModelForCausalLM.from_pretrained(orig_dir, device_map="cpu")
orig_params = dict(orig.named_parameters())

checked = 0
bad = 0
for name, module in model.named_modules():
    if not isinstance(module, bitsandbytes.nn.Linear4bit):
        continue
    w = module.weight
    ours = F.dequantize_4bit(w.data, w.quant_state)
    src = orig_params[name + ".weight"].data
    packed, state = F.quantize_4bit(
        src,
        blocksize=qcfg.get("bnb_4bit_blocksize", w.quant_state.blocksize),
        compress_statistics=qcfg["bnb_4bit_use_double_quant"],
        quant_type=qcfg["bnb_4bit_quant_type"],
    )
    ref = F.dequantize_4bit(packed, state)
    same = torch.equal(ours.view(torch.int16) if ours.dtype != torch.float32 else ours.view(torch.int32),
                       ref.view(torch.int16) if ref.dtype != torch.float32 else ref.view(torch.int32))
    same_packed = torch.equal(w.data.view(torch.uint8).flatten(), packed.view(torch.uint8).flatten())
    if not (same and same_packed):
        bad += 1
        print(f"MISMATCH {name}: dequantized equal={same} packed equal={same_packed}")
    checked += 1

# A forward pass through the loaded model, with 4-bit weights dequantized to their dtype
# (bitsandbytes' CPU 4-bit matmul has shape limits, see REFERENCES.md).
with torch.no_grad():
    for name, module in list(model.named_modules()):
        if isinstance(module, bitsandbytes.nn.Linear4bit):
            dense = torch.nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
            dense.weight.data = F.dequantize_4bit(module.weight.data, module.weight.quant_state)
            if module.bias is not None:
                dense.bias.data = module.bias.data
            parent = model.get_submodule(name.rsplit(".", 1)[0])
            setattr(parent, name.rsplit(".", 1)[1], dense.to(module.weight.quant_state.dtype))
    logits = model(torch.tensor([[1, 5, 9, 14]])).logits
    assert torch.isfinite(logits).all()

print(
    f"{q_dir}: loaded as {type(model).__name__} ({qcfg['bnb_4bit_quant_type']}, "
    f"double_quant={qcfg['bnb_4bit_use_double_quant']}); {checked} Linear4bit weights checked, "
    f"{bad} mismatches; forward logits {tuple(logits.shape)} finite"
)
sys.exit(1 if bad or checked == 0 else 0)
