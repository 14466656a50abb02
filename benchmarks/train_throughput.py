"""Training throughput: tunesmith's loop vs TRL's SFTTrainer + PEFT, same model, data and settings.

Same model (the embedded SmolLM2-135M, dequantized HF folder), same data (alpaca_en_demo.json),
same chat template, loss on completion tokens only, LoRA r=16/alpha=32 on all linear layers,
AdamW + cosine with warmup, same examples per optimizer step and number of steps, same seed.
Each run is its own process (so peak RSS is its own); sides alternate (A B A B ...) and the
medians over ``--repeats`` are reported. Figures: steady-state real (non-pad) tokens/s with
the first ``--warmup`` steps apart, peak RSS, eval loss on a fixed held-out slice (computed by
the same function for every side), and MFU against the matmul peaks measured in this run.

    python benchmarks/train_throughput.py                 # full run, writes benchmarks/results/
    python benchmarks/train_throughput.py --steps 6 --repeats 1 --sides ours_bf16,trl_bf16
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "examples" / "data" / "alpaca" / "alpaca_en_demo.json"
SIDES = {  # name -> (implementation, method, bf16, packing)
    "ours_bf16": ("ours", "lora", True, False),
    "ours_bf16_budget": ("ours", "lora", True, False),  # micro-batches capped at --batch-tokens padded tokens
    "ours_bf16_packed": ("ours", "lora", True, True),
    "ours_fp32_budget": ("ours", "lora", False, False),  # as ours_bf16_budget, fp32 (CPUs without bf16 math: AVX2)
    "trl_bf16": ("trl", "lora", True, False),
    "trl_bf16_same": ("trl", "lora", True, False),  # fed exactly our steps' examples, in order (for the eval loss)
    "trl_fp32": ("trl", "lora", False, False),
    "trl_fp32_grouped": ("trl", "lora", False, False),  # train_sampling_strategy="group_by_length" (its best on AVX2)
    "trl_bf16_grouped": ("trl", "lora", True, False),  # the same, bf16 (its best where the CPU has bf16 math)
    "ours_full_bf16": ("ours", "full", True, False),
    "trl_full_bf16": ("trl", "full", True, False),
}
EVAL_EXAMPLES = 48  # the last rows of the data set, never trained on


def conversations(path: Path) -> list[list[dict[str, str]]]:
    rows = json.loads(path.read_text())
    out = []
    for r in rows:
        user = r["instruction"] + (f"\n\n{r['input']}" if r.get("input") else "")
        out.append([{"role": "user", "content": user}, {"role": "assistant", "content": r["output"]}])
    return out


# ---------------------------------------------------------------- one run (a child process)


def run_side(side: str, args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from tunesmith.data import Example, encode_all
    from tunesmith.models import load_model
    from tunesmith.training.losses import evaluate_loss

    impl, method, bf16, packing = SIDES[side]
    torch.manual_seed(0)
    model, tok = load_model(args.model)
    convs = conversations(Path(args.data))
    train_convs, eval_convs = convs[:-EVAL_EXAMPLES], convs[-EVAL_EXAMPLES:]
    eval_set, _ = encode_all(tok, [Example(c) for c in eval_convs], args.max_len)
    t0 = time.perf_counter()
    if impl == "ours":
        model, steps = _train_ours(model, tok, train_convs, method, bf16, packing, args, side)
    else:
        model, steps = _train_trl(model, tok, train_convs, method, bf16, args, same=side == "trl_bf16_same",
                                  grouped=side.endswith("_grouped"))
    wall = time.perf_counter() - t0
    eval_loss = evaluate_loss(model, eval_set, args.micro_batch, tok.pad_token_id, bf16=bf16)  # same batch for every side
    steady = steps[args.warmup :]
    tokens = sum(s["tokens"] for s in steady)
    seconds = sum(s["seconds"] for s in steady)
    return {"side": side, "method": method, "bf16": bf16, "packing": packing, "steps": len(steps),
            "warmup_seconds": sum(s["seconds"] for s in steps[: args.warmup]), "steady_seconds": seconds,
            "real_tokens_per_s": tokens / seconds if seconds else 0.0, "padded_tokens": sum(s.get("padded", 0) for s in steps),
            "real_tokens": sum(s["tokens"] for s in steps), "wall_seconds": wall, "eval_loss": eval_loss,
            "peak_rss_mib": _peak_rss_mib(), "flops_per_token": _flops(model, tok, train_convs, args)}


def _train_ours(model, tok, convs, method, bf16, packing, args, side):
    from tunesmith.config import Config, TrainConfig
    from tunesmith.data import Example, encode_all
    from tunesmith.io import read_jsonl
    from tunesmith.methods import prepare

    cfg = Config(method=method)
    model = prepare(model, cfg)
    data, _ = encode_all(tok, [Example(c) for c in convs], args.max_len)
    # same examples per optimizer step as TRL; smaller micro-batches cost nothing in quality (the
    # loss is normalised over the whole step) and cut activation memory about 4x
    micro = min(args.micro_batch, args.batch)
    budget = args.batch_tokens if side.endswith("_budget") else 0
    if budget:  # the whole step is one "batch", split by the token budget alone
        micro = args.batch
    tcfg = TrainConfig(max_steps=args.steps, batch_size=micro, grad_accum=args.batch // micro, batch_tokens=budget,
                       lr=args.lr, warmup_steps=3, eval_every=10**9,
                       precision="bf16" if bf16 else "fp32", packing=packing, max_seq_len=args.max_len, seed=0)
    from tunesmith.training.loop import train

    with tempfile.TemporaryDirectory() as run:
        train(model, data, data[:1], tcfg, Path(run), tok.pad_token_id, show_progress=False)
        history = read_jsonl(Path(run) / "metrics.jsonl")
    steps = [{"tokens": r["tokens"], "seconds": r["step_seconds"]} for r in history if r["type"] == "train"]
    return model, steps


def _our_order(tok, convs, args) -> list[int]:
    """The conversations our loop trains on, step by step (length-grouped plan, seed 0)."""
    import math

    from tunesmith.config import TrainConfig
    from tunesmith.data import Example, encode
    from tunesmith.training.loop import step_batches

    encoded = [encode(tok, Example(c), args.max_len) for c in convs]
    kept = [i for i, e in enumerate(encoded) if e.n_targets > 0]  # what encode_all keeps, in order
    lengths = [len(encoded[i].input_ids) for i in kept]
    plan = TrainConfig(batch_size=args.batch, grad_accum=1, seed=0)  # a step's examples do not depend on its split
    per_epoch = math.ceil(len(kept) / args.batch)
    order = []
    for step in range(args.steps):
        epoch, pos = divmod(step, per_epoch)
        order += [kept[i] for mb in step_batches(lengths, plan, epoch, pos) for i in mb]
    return order


def _train_trl(model, tok, convs, method, bf16, args, same=False, grouped=False):
    import peft
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    rows = [{"prompt": c[:-1], "completion": c[-1:]} for c in convs]
    if same:  # our steps' examples, in our order, read sequentially
        rows = [rows[i] for i in _our_order(tok, convs, args)]
    steps: list[dict[str, Any]] = []
    counted: list[tuple[int, int]] = []  # (real, padded) tokens of each batch the collator built

    class Timer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t = time.perf_counter()

        def on_step_end(self, *a, **k):
            real, padded = counted[-1] if counted else (0, 0)
            steps.append({"tokens": real, "padded": padded, "seconds": time.perf_counter() - self.t})

    config = SFTConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=args.batch, max_steps=args.steps,
                       learning_rate=args.lr, lr_scheduler_type="cosine", warmup_steps=3, weight_decay=0.01,
                       max_grad_norm=1.0, bf16=bf16, max_length=args.max_len, packing=False, logging_steps=1,
                       save_strategy="no", report_to=[], seed=0, dataloader_num_workers=0, use_cpu=True,
                       train_sampling_strategy="group_by_length" if grouped else "random")
    from tunesmith.config import LoraConfig

    ours = LoraConfig()  # the same adapter settings as our side's defaults: r 16, alpha 32, dropout 0, all linear
    lora = peft.LoraConfig(r=ours.r, lora_alpha=ours.alpha, lora_dropout=ours.dropout, target_modules=ours.target_modules,
                           task_type="CAUSAL_LM") if method == "lora" else None
    trainer = SFTTrainer(model=model, args=config, train_dataset=Dataset.from_list(rows), processing_class=tok,
                         peft_config=lora, callbacks=[Timer()])
    collate = trainer.data_collator

    def counting(features):
        batch = collate(features)
        counted.append((int(batch["attention_mask"].sum()), int(batch["attention_mask"].numel())))
        return batch

    trainer.data_collator = counting
    if same:
        from torch.utils.data import SequentialSampler

        trainer._get_train_sampler = lambda ds=None, *a, **k: SequentialSampler(ds if ds is not None else trainer.train_dataset)
    trainer.train()
    return trainer.model, steps


def _flops(model, tok, convs, args) -> float:
    from tunesmith.data import Example, encode_all
    from tunesmith.training.flops import flops_per_token

    data, _ = encode_all(tok, [Example(c) for c in convs[:400]], args.max_len)
    lengths = [len(e.input_ids) for e in data]
    share = sum(e.n_targets for e in data) / sum(lengths)
    return flops_per_token(model, sum(lengths) / len(lengths), share)


def _peak_rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---------------------------------------------------------------- the whole benchmark


def machine() -> dict[str, Any]:
    import torch
    import transformers

    cpu = "unknown"
    flags: list[str] = []
    try:
        info = Path("/proc/cpuinfo").read_text()
        cpu = next(ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name"))
        flags = sorted({f for f in info.split() if f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")})
    except (OSError, StopIteration):
        pass
    versions = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__}
    for name in ("peft", "trl", "accelerate"):
        try:
            versions[name] = __import__(name).__version__
        except ImportError:
            versions[name] = "not installed"
    return {"cpu": cpu, "flags": flags, "cores": os.cpu_count(), "threads": torch.get_num_threads(),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "versions": versions}


def length_histogram(model: str, data: Path, max_len: int) -> dict[str, Any]:
    from tunesmith.data import Example, encode_all
    from tunesmith.models import load_model

    _, tok = load_model(model)
    enc, stats = encode_all(tok, [Example(c) for c in conversations(data)], max_len)
    edges = [0, 64, 128, 192, 256, 320, 384, 448, 512, 10**9]
    counts = [sum(a <= len(e.input_ids) < b for e in enc) for a, b in zip(edges, edges[1:])]
    return {"bins": [f"{a}-{b - 1 if b < 10**9 else ''}" for a, b in zip(edges, edges[1:])], "counts": counts,
            "truncated": stats["truncated"], "examples": len(enc)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="default")
    p.add_argument("--data", default=str(DATA))
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=3, help="first steps reported apart (warm-up, allocations)")
    p.add_argument("--batch", type=int, default=8, help="examples per optimizer step (both sides)")
    p.add_argument("--micro-batch", type=int, default=4, help="our micro-batch (accumulated to --batch)")
    p.add_argument("--batch-tokens", type=int, default=1024, help="token budget per micro-batch (sides *_budget)")
    p.add_argument("--max-len", type=int, default=512)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--sides", default=",".join(SIDES))
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--force", action="store_true", help="run even when the machine is busy")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(run_side(args.child, args)))
        return 0
    sides = [s for s in args.sides.split(",") if s]
    unknown = set(sides) - set(SIDES)
    if unknown:
        p.error(f"unknown sides {sorted(unknown)}; choose from {', '.join(SIDES)}")
    load = os.getloadavg()[0]
    if load > 0.5 * (os.cpu_count() or 1) and not args.force:
        print(f"refusing to measure: load average {load:.2f} on {os.cpu_count()} cores (another process is busy); "
              "wait, or pass --force", file=sys.stderr)
        return 3
    from tunesmith.training.flops import matmul_peak

    info = machine() | {"load_average_at_start": load}
    info["matmul_peak_flops"] = {"bf16": matmul_peak("cpu", True), "fp32": matmul_peak("cpu", False)}
    hist = length_histogram(args.model, Path(args.data), args.max_len)
    print("token lengths:", dict(zip(hist["bins"], hist["counts"])), flush=True)
    runs: dict[str, list[dict[str, Any]]] = {s: [] for s in sides}
    passthrough = [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
                   if k in ("model", "data", "steps", "warmup", "batch", "micro_batch", "batch_tokens", "max_len", "lr")]
    for r in range(args.repeats):
        for side in sides:  # alternate: A B A B ...
            out = subprocess.run([sys.executable, __file__, "--child", side, *passthrough], capture_output=True, text=True)
            if out.returncode != 0:
                print(out.stderr[-3000:], file=sys.stderr)
                raise SystemExit(f"{side} failed (repeat {r + 1})")
            result = json.loads(out.stdout.strip().splitlines()[-1])
            runs[side].append(result)
            print(f"{side} #{r + 1}: {result['real_tokens_per_s']:.1f} real tok/s, RSS {result['peak_rss_mib']:.0f} MiB, "
                  f"eval loss {result['eval_loss']:.4f}", flush=True)
    summary = summarize(runs, info)
    write_results(Path(args.out), {"machine": info, "settings": {k: v for k, v in vars(args).items() if k != "child"},
                                   "token_length_histogram": hist, "summary": summary, "runs": runs})
    return 0


def summarize(runs: dict[str, list[dict[str, Any]]], info: dict[str, Any]) -> dict[str, Any]:
    med = {side: {k: statistics.median(r[k] for r in rs) for k in
                  ("real_tokens_per_s", "peak_rss_mib", "eval_loss", "warmup_seconds", "wall_seconds", "flops_per_token")}
           for side, rs in runs.items() if rs}
    for side, m in med.items():
        m["mfu_vs_bf16_peak"] = m["flops_per_token"] * m["real_tokens_per_s"] / info["matmul_peak_flops"]["bf16"]
        m["mfu_vs_fp32_peak"] = m["flops_per_token"] * m["real_tokens_per_s"] / info["matmul_peak_flops"]["fp32"]
        m["mfu_own_precision"] = m["mfu_vs_bf16_peak"] if SIDES[side][2] else m["mfu_vs_fp32_peak"]
        for base in ("trl_bf16", "trl_fp32", "trl_full_bf16"):
            if base in med and med[base]["real_tokens_per_s"]:
                m[f"speed_vs_{base}"] = m["real_tokens_per_s"] / med[base]["real_tokens_per_s"]
                m[f"rss_vs_{base}"] = m["peak_rss_mib"] / med[base]["peak_rss_mib"]
                m[f"eval_loss_vs_{base}"] = m["eval_loss"] / med[base]["eval_loss"] - 1
        best = best_trl(med, SIDES[side][1])  # TRL at its best in this run: its fastest side of the same method
        if best:
            m["trl_best"] = best
            m["speed_vs_trl_best"] = m["real_tokens_per_s"] / med[best]["real_tokens_per_s"]
            m["rss_vs_trl_best"] = m["peak_rss_mib"] / med[best]["peak_rss_mib"]
            m["eval_loss_vs_trl_best"] = m["eval_loss"] / med[best]["eval_loss"] - 1
    return med


def best_trl(med: dict[str, dict[str, float]], method: str) -> str | None:
    """The fastest TRL side (real tokens/s) of ``method`` measured in this run, or None."""
    trl = [s for s in med if SIDES[s][0] == "trl" and SIDES[s][1] == method and s != "trl_bf16_same"]
    return max(trl, key=lambda s: med[s]["real_tokens_per_s"]) if trl else None


def write_results(out: Path, results: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "train_throughput.json").write_text(json.dumps(results, indent=2) + "\n")
    m, s = results["machine"], results["settings"]
    lines = [
        "# Training throughput: tunesmith vs TRL SFTTrainer + PEFT", "",
        f"- Date: {m['date']}; load average at start {m['load_average_at_start']:.2f}",
        f"- Machine: {m['cpu']}, {m['cores']} cores ({m['threads']} torch threads), flags {', '.join(m['flags'])}",
        f"- Versions: {', '.join(f'{k} {v}' for k, v in m['versions'].items())}",
        f"- Measured matmul peak: bf16 {m['matmul_peak_flops']['bf16'] / 1e9:.0f} GFLOP/s, fp32 {m['matmul_peak_flops']['fp32'] / 1e9:.0f} GFLOP/s",
        f"- Settings: {s['steps']} steps of {s['batch']} examples (ours: micro-batches of {s['micro_batch']}), max length {s['max_len']}, lr {s['lr']}, "
        f"first {s['warmup']} steps apart, {s['repeats']} repeats (medians), data {Path(s['data']).name}",
        f"- Token lengths: {dict(zip(results['token_length_histogram']['bins'], results['token_length_histogram']['counts']))}",
        "", "Ratios against TRL at its best in this run: the fastest TRL side of the same method (LoRA or full). "
        "MFU against the measured matmul peak of the side's own precision (bf16 sides: bf16 peak; fp32: fp32 peak). "
        "Eval loss change against the same TRL side.", "",
        "| side | precision | real tok/s | vs TRL at its best (side) | peak RSS MiB | RSS vs that side | eval loss "
        "| eval loss vs that side | MFU (own precision's peak) | warm-up s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    nan = float("nan")
    for side, r in results["summary"].items():
        best = r.get("trl_best", "")
        lines.append(f"| {side} | {'bf16' if SIDES[side][2] else 'fp32'} | {r['real_tokens_per_s']:.1f} | "
                     f"{r.get('speed_vs_trl_best', nan):.2f}x ({best}) | {r['peak_rss_mib']:.0f} | "
                     f"{r.get('rss_vs_trl_best', nan):.2f} | {r['eval_loss']:.4f} | {r.get('eval_loss_vs_trl_best', nan):+.2%} | "
                     f"{r['mfu_own_precision']:.1%} | {r['warmup_seconds']:.1f} |")
    lines += ["", "FLOPs model: see `src/tunesmith/training/flops.py` (4N + 12·L·d·T + 6·N_lora for LoRA, 6N + 12·L·d·T for full;",
              "the LM head counted only at target positions for our loop, as it runs)."]
    (out / "train_throughput.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "src"))
    raise SystemExit(main())
