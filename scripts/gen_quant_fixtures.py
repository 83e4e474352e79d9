"""Golden NF4/FP4 fixtures made by bitsandbytes itself, on the CPU.

    python -m venv .venv && .venv/bin/pip install -r scripts/requirements-ref.txt
    .venv/bin/python scripts/gen_quant_fixtures.py tests/fixtures/quant

Writes `codec.safetensors`: for every case its input, bitsandbytes' packed bytes, absmax (or the
nested 8-bit absmax with its offset, nested absmax and code) and the dequantized values, plus
bitsandbytes' codebooks and signed dynamic map. `__metadata__` lists the cases and the versions.
"""

import json
import sys

import bitsandbytes
import bitsandbytes.functional as F
import torch
from safetensors.torch import save_file

torch.manual_seed(1234)
out_dir = sys.argv[1]

tensors = {}
cases = []


def midpoints(quant_type):
    code = F.get_4bit_type(quant_type, device="cpu")
    s = torch.sort(code).values
    return (s[:-1] + s[1:]) / 2


def special_data(n, quant_type):
    """Exact midpoints and their neighbours, +-0, subnormals, all-zero blocks, huge values."""
    x = torch.zeros(n, dtype=torch.float32)
    mids = midpoints(quant_type)
    i = 0
    # Block 0..: absmax exactly 1 (or 2) so scaling is exact and midpoints stay midpoints.
    for scale in (1.0, 2.0):
        x[i] = scale
        i += 1
        for m in mids:
            m = m * scale
            for v in (m, torch.nextafter(m, torch.tensor(10.0)), torch.nextafter(m, torch.tensor(-10.0))):
                x[i] = v
                x[i + 1] = -v
                i += 2
    # a run of signed zeros
    x[i : i + 8] = torch.tensor([0.0, -0.0] * 4)
    i += 8
    # subnormals (f32) and tiny normals
    sub = torch.tensor([1e-40, -3e-39, 1e-45, 1.2e-38, -1e-38, 5e-39], dtype=torch.float32)
    x[i : i + len(sub)] = sub
    i += len(sub)
    # very large magnitudes
    big = torch.tensor([3.0e38, -1.7e38, 1e30, -2e20, 6.5e4, -6.5e4], dtype=torch.float32)
    x[i : i + len(big)] = big
    i += len(big)
    # tiny positive values around fp4's smallest step, then noise; leave a long run of zeros at the end
    x[i : i + 8] = torch.tensor([1e-4, 2e-3, 2.6e-3, 2.7e-3, -1e-4, -2e-3, -2.6e-3, -2.7e-3]) 
    i += 8
    tail = n - 300
    if tail > i:
        x[i:tail] = torch.randn(tail - i) * 0.02
    return x


def add_case(name, x, dtype, quant_type, blocksize, double_quant, shape):
    x = x.reshape(shape).to(dtype)
    packed, state = F.quantize_4bit(
        x, blocksize=blocksize, compress_statistics=double_quant, quant_type=quant_type
    )
    dq_native = F.dequantize_4bit(packed, state)
    # Dequantize to f32 through the same kernel by swapping the state's dtype.
    saved = state.dtype
    state.dtype = torch.float32
    dq_f32 = F.dequantize_4bit(packed, state)
    state.dtype = saved
    p = name + "."
    tensors[p + "input"] = x.contiguous()
    tensors[p + "packed"] = packed.contiguous()
    tensors[p + "absmax"] = state.absmax.contiguous()
    tensors[p + "dq_native"] = dq_native.contiguous()
    if dtype != torch.float32:
        tensors[p + "dq_f32"] = dq_f32.contiguous()
    if double_quant:
        tensors[p + "offset"] = state.offset.reshape(1).contiguous()
        tensors[p + "nested_absmax"] = state.state2.absmax.contiguous()
    cases.append(
        {
            "name": name,
            "dtype": str(dtype).removeprefix("torch."),
            "quant_type": quant_type,
            "blocksize": blocksize,
            "double_quant": double_quant,
            "shape": list(shape),
        }
    )


dtypes = [torch.float32, torch.bfloat16, torch.float16]
for quant_type in ("nf4", "fp4"):
    for blocksize in (64, 128, 4096, 32):
        for double_quant in (False, True):
            for dtype in dtypes:
                dn = str(dtype).removeprefix("torch.")
                tag = f"{quant_type}_b{blocksize}_{'dq' if double_quant else 'plain'}_{dn}"
                if blocksize == 32 and dtype != torch.float32:
                    continue
                # normal data, ragged (not a multiple of 64/128/4096); with 64-blocks, double
                # quantization sees 305 absmax values: one full nested block of 256 and a ragged one
                rows = 150 if (blocksize == 64 and double_quant and dtype != torch.float16) else 30
                add_case(f"{tag}_normal", torch.randn(rows * 130), dtype, quant_type, blocksize, double_quant, (rows, 130))
                # uniform data, exact multiple of the block size
                add_case(f"{tag}_uniform", torch.rand(32 * 128) * 2 - 1, dtype, quant_type, blocksize, double_quant, (32, 128))
                if dtype == torch.float32:
                    # special values; 2 * 1251 = 2502 elements: ragged and with an odd last dimension
                    add_case(f"{tag}_special", special_data(2 * 1251, quant_type), dtype, quant_type, blocksize, double_quant, (2, 1251))
                    # an odd total count (packing pads the last nibble)
                    add_case(f"{tag}_odd", torch.randn(7 * 9 * 5), dtype, quant_type, blocksize, double_quant, (7, 45))

code_nf4 = F.get_4bit_type("nf4", device="cpu")
code_fp4 = F.get_4bit_type("fp4", device="cpu")
tensors["code.nf4"] = code_nf4
tensors["code.fp4"] = code_fp4
tensors["code.dynamic_signed"] = F.create_dynamic_map(signed=True)

meta = {
    "generator": "scripts/gen_quant_fixtures.py",
    "bitsandbytes": bitsandbytes.__version__,
    "torch": torch.__version__,
    "cpu_capability": torch.backends.cpu.get_cpu_capability(),
    "cases": json.dumps(cases),
}
save_file(tensors, f"{out_dir}/codec.safetensors", metadata=meta)

# How far is torch's float32 mean (bitsandbytes' offset) from the exactly rounded mean?
diffs = 0
for c in cases:
    if c["double_quant"]:
        x = tensors[c["name"] + ".input"].float().reshape(-1)
        _, st = F.quantize_4bit(x.to(getattr(torch, c["dtype"])), blocksize=c["blocksize"], quant_type=c["quant_type"])
        exact = torch.tensor(st.absmax.double().mean().item(), dtype=torch.float32)
        if exact.item() != tensors[c["name"] + ".offset"].item():
            diffs += 1
print(f"{len(cases)} cases; offsets differing from the exactly rounded mean: {diffs}")
