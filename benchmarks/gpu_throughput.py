"""Training throughput on a GPU: a 1B-class Llama built from a config, trained by our loop unchanged.

Random weights (speed does not depend on them) and random token data: lengths uniform in
[seq_len/2, seq_len], the last 60% of each example are targets, batched by length as usual.
The loop picks the GPU, bf16 autocast and SDPA by itself; nothing here is GPU-specific but
the preset. Reports steady-state tokens/s (first ``--warmup`` steps apart), MFU against the
H200's nominal dense bf16 peak (989 TFLOP/s) and against a bf16 matmul measured in this run,
and peak GPU memory.

    python benchmarks/gpu_throughput.py                       # 1B preset, on the GPU
    python benchmarks/gpu_throughput.py --preset tiny --steps 3 --out /tmp/x   # anywhere, in seconds
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
NOMINAL_PEAK = {"NVIDIA H200": 989e12, "NVIDIA H100 80GB HBM3": 989e12}  # dense bf16, vendor datasheet
PRESETS = {  # Llama-3.2-1B's shape; tiny for the test suite
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512, tie_word_embeddings=True),
}


def build_model(preset: str, seq_len: int, device: Any) -> Any:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**PRESETS[preset], max_position_embeddings=max(seq_len, 2048), attn_implementation="sdpa")
    torch.manual_seed(0)
    with torch.device(device):
        return LlamaForCausalLM(cfg)  # fp32 master weights; the loop autocasts to bf16


def random_data(n: int, seq_len: int, vocab: int, seed: int = 0) -> list[Any]:
    from tunesmith.data import IGNORE, Encoded

    rng = random.Random(seed)
    out = []
    for _ in range(n):
        length = rng.randint(seq_len // 2, seq_len)
        ids = [rng.randrange(vocab) for _ in range(length)]
        cut = int(length * 0.4)
        out.append(Encoded(ids, [IGNORE] * cut + ids[cut:]))
    return out


def run_method(method: str, args: argparse.Namespace, device: Any) -> dict[str, Any]:
    import torch

    from tunesmith import runtime
    from tunesmith.training import flops
    from tunesmith.config import Config, TrainConfig
    from tunesmith.methods import count_parameters, prepare
    from tunesmith.training.loop import train

    model = prepare(build_model(args.preset, args.seq_len, device), Config(method=method))
    trainable, total = count_parameters(model)
    vocab = PRESETS[args.preset]["vocab_size"]
    data = random_data(args.steps * args.micro_batch, args.seq_len, vocab)
    cfg = TrainConfig(max_steps=args.steps, batch_size=args.micro_batch, grad_accum=1, warmup_steps=2,
                      eval_every=10**9, max_seq_len=args.seq_len, keep_checkpoints=1, seed=0)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as run:
        result = train(model, data, data[:2], cfg, Path(run), pad_id=0, show_progress=False)
    wall = time.perf_counter() - t0
    steps = [r for r in result.history if r["type"] == "train"]
    steady = steps[args.warmup :]
    tokens = sum(r["tokens"] for r in steady)
    seconds = sum(r["step_seconds"] for r in steady)
    tok_s = tokens / seconds if seconds else 0.0
    lengths = [len(e.input_ids) for e in data]
    share = sum(e.n_targets for e in data) / sum(lengths)
    fpt = flops.flops_per_token(model, sum(lengths) / len(lengths), share)
    bf16 = runtime.use_bf16(cfg.precision, device)
    measured = flops.matmul_peak(device.type, bf16)
    name = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu"
    nominal = NOMINAL_PEAK.get(name)
    out = {
        "method": method, "trainable_params": trainable, "total_params": total, "bf16": bf16,
        "steps": len(steps), "warmup_seconds": sum(r["step_seconds"] for r in steps[: args.warmup]),
        "tokens_per_s": tok_s, "flops_per_token": fpt, "measured_matmul_peak": measured,
        "mfu_vs_measured": fpt * tok_s / measured, "mfu_vs_nominal": fpt * tok_s / nominal if nominal else None,
        "final_loss": steps[-1]["loss"], "first_loss": steps[0]["loss"], "wall_seconds": wall,
        "peak_gpu_mib": torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None,
    }
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="1b")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--micro-batch", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--methods", default="lora,full")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = p.parse_args(argv)
    import torch
    import transformers

    from tunesmith import runtime

    device = runtime.device()
    info = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
            "versions": {"python": platform.python_version(), "torch": torch.__version__,
                         "transformers": transformers.__version__, "peft": __import__("peft").__version__}}
    print(json.dumps(info), flush=True)
    results = []
    for method in [m for m in args.methods.split(",") if m]:
        r = run_method(method, args, device)
        results.append(r)
        print(json.dumps(r), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    doc = {"machine": info, "settings": vars(args), "results": results}
    (out / "gpu_throughput.json").write_text(json.dumps(doc, indent=2) + "\n")
    lines = [f"# Training throughput on {info['device']}: {args.preset} Llama (random weights), our loop", "",
             f"- Date: {info['date']}; versions: {', '.join(f'{k} {v}' for k, v in info['versions'].items())}",
             f"- {args.steps} steps of {args.micro_batch} sequences, lengths uniform in [{args.seq_len // 2}, {args.seq_len}], "
             f"60% of tokens are targets; first {args.warmup} steps apart", "",
             "| method | trainable params | tokens/s | MFU (nominal bf16) | MFU (measured bf16 matmul) | peak GPU MiB | warm-up s |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        nominal = f"{r['mfu_vs_nominal']:.1%}" if r["mfu_vs_nominal"] is not None else "n/a"
        gpu = f"{r['peak_gpu_mib']:.0f}" if r["peak_gpu_mib"] is not None else "n/a"
        lines.append(f"| {r['method']} | {r['trainable_params']:,} | {r['tokens_per_s']:,.0f} | {nominal} | "
                     f"{r['mfu_vs_measured']:.1%} | {gpu} | {r['warmup_seconds']:.1f} |")
    (out / "gpu_throughput.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "src"))
    raise SystemExit(main())
