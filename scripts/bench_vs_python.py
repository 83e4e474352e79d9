"""qlorad against the Python QLoRA stack (transformers + PEFT + bitsandbytes), side by side on
one GPU in one run: the same random-weight model of a real shape, the same recipe (NF4, double
quantization, bf16 compute, LoRA r=16 alpha 32 dropout 0.05 on all linear layers, gradient
checkpointing unless --no-gradient-checkpointing, AdamW lr 2e-4), the same sequence length and
batch.

    python scripts/bench_vs_python.py --qlorad /path/to/qlorad-with-cuda \\
        --shapes llama-3.2-1b llama-3-8b --seq-len 2048 --batch-size 1 --steps 6

Needs torch, transformers and peft; bitsandbytes is installed from a wheel in gpu/ when absent.
First `qlorad bench kernels` (4-bit kernels against the CPU and against a device copy), then per
shape: write the model once (bf16 safetensors), `qlorad bench train`, the Python recipe, and a
table of both with the ratio. Every JSON report is also written under --out.
"""

import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))


def run_json(cmd, log):
    print("+", " ".join(cmd), file=sys.stderr, flush=True)
    p = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    with open(log, "w") as f:
        f.write(p.stdout)
    if p.returncode != 0:
        raise SystemExit(f"{cmd[0]} failed ({p.returncode}); output in {log}")
    text = p.stdout.strip()
    try:
        return json.loads(text)  # qlorad: the whole of stdout
    except json.JSONDecodeError:
        return json.loads(text.splitlines()[-1])  # the Python script: its last line


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--qlorad", required=True, help="a qlorad binary built with --features cuda")
    ap.add_argument("--shapes", nargs="+", default=["llama-3.2-1b", "llama-3-8b"])
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--work", default=tempfile.gettempdir(), help="where the random models go")
    ap.add_argument("--out", default=os.environ.get("OUT", "."), help="where the reports go")
    ap.add_argument("--skip-kernels", action="store_true")
    ap.add_argument("--no-gradient-checkpointing", action="store_true",
                    help="both stacks keep activations instead of recomputing them in the backward")
    ap.add_argument("--profile", action="store_true",
                    help="also run qlorad once more with --profile: where its step time goes")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        wheels = glob.glob(os.path.join(HERE, "..", "gpu", "bitsandbytes-*.whl"))
        if not wheels:
            raise SystemExit("bitsandbytes is not installed and no wheel is in gpu/")
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", wheels[0]], check=True)
    card = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                          stdout=subprocess.PIPE, text=True).stdout.strip()
    print(f"card: {card}")
    if not args.skip_kernels:
        k = run_json([args.qlorad, "bench", "kernels", "--device", "cuda:0"], os.path.join(args.out, "kernels.json"))
        print(json.dumps(k, indent=1))
    spec = os.path.join(args.out, "spec.json")
    with open(spec, "w") as f:
        json.dump({
            "hyperparameters": {"gradient_checkpointing": not args.no_gradient_checkpointing, "learning_rate": 2e-4, "lr_scheduler": "constant",
                                "warmup_ratio": 0.0, "max_seq_len": max(args.seq_len, 2048)},
            "lora": {"r": 16, "alpha": 32, "dropout": 0.05},
            "quantization": {"type": "nf4", "block_size": 64, "double_quant": True, "compute_dtype": "bf16"},
        }, f)
    rows = []
    for shape in args.shapes:
        model_dir = os.path.join(args.work, f"qlorad-bench-{shape}")
        py = [sys.executable, os.path.join(HERE, "bench_python_qlora.py"), "--shape", shape, "--model-dir", model_dir,
              "--seq-len", str(args.seq_len), "--batch-size", str(args.batch_size), "--steps", str(args.steps)]
        if args.no_gradient_checkpointing:
            py.append("--no-gradient-checkpointing")
        run_json(py + ["--make-only"], os.path.join(args.out, f"make-{shape}.json"))
        q = run_json([args.qlorad, "bench", "train", "--model", model_dir, "--device", "cuda:0", "--spec", spec,
                      "--seq-len", str(args.seq_len), "--batch-size", str(args.batch_size), "--steps", str(args.steps)],
                     os.path.join(args.out, f"qlorad-{shape}.json"))
        if args.profile:
            prof = run_json([args.qlorad, "bench", "train", "--model", model_dir, "--device", "cuda:0", "--spec", spec,
                             "--seq-len", str(args.seq_len), "--batch-size", str(args.batch_size), "--steps", "3",
                             "--profile"], os.path.join(args.out, f"qlorad-profile-{shape}.json"))
            step = prof["step_seconds_median"]
            print(f"\nqlorad {shape}: where a step goes (profiled run, {step:.3f} s/step with a sync around each group)")
            for name, v in sorted(prof["profile_seconds_per_step"].items(), key=lambda kv: -kv[1]["seconds"]):
                print(f"  {v['seconds'] * 1e3:8.1f} ms  {v['seconds'] / step * 100:5.1f}%  {name}")
        p = run_json(py, os.path.join(args.out, f"python-{shape}.json"))
        rows.append((shape, q, p))
    ckpt = "off" if args.no_gradient_checkpointing else "on"
    print(f"\ncard: {card}; seq {args.seq_len}, batch {args.batch_size}, gradient checkpointing {ckpt}, "
          f"median of {args.steps} steps after 2 warm-up")
    print("| shape | stack | step s | tokens/s | peak GPU GiB | MFU |")
    print("| --- | --- | --- | --- | --- | --- |")
    for shape, q, p in rows:
        print(f"| {shape} | qlorad | {q['step_seconds_median']:.3f} | {q['tokens_per_second']:,.0f} | "
              f"{q['peak_gpu_memory_gib']:.1f} (device) | {q['mfu'] * 100:.1f}% |")
        print(f"| {shape} | {p['stack']} | {p['step_seconds_median']:.3f} | {p['tokens_per_second']:,.0f} | "
              f"{p['peak_gpu_memory_gib']:.1f} ({p['peak_gpu_reserved_gib']:.1f} reserved) | {p['mfu'] * 100:.1f}% |")
        print(f"| {shape} | qlorad / Python | {p['step_seconds_median'] / q['step_seconds_median']:.2f}x faster | "
              f"{q['tokens_per_second'] / p['tokens_per_second']:.2f}x | "
              f"{q['peak_gpu_memory_gib'] / p['peak_gpu_reserved_gib']:.2f}x of reserved | |")


if __name__ == "__main__":
    main()
