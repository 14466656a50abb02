"""DPO speed and memory: tunesmith's loop vs TRL's DPOTrainer + PEFT, same model, pairs and settings.

Same model (the embedded SmolLM2-135M, dequantized HF folder), same pairs (the first 1,500 rows of the shipped
HH-RLHF harmless file, as conversations: the shared turns are the prompt), same chat template, DPO sigmoid loss,
beta 0.1, LoRA r=16/alpha=32 on all linear layers, AdamW + cosine with warmup, 8 pairs per optimizer step,
``--steps`` steps, at most ``--max-len`` tokens a side, fp32 (``--bf16`` for CPUs with bf16 math). Each side is its
own process (peak RSS is its own). Sides:

* ``ours_adapter``: the reference computed each step with the adapters switched off, as TRL does with PEFT;
* ``ours_precomputed``: the reference computed once for the rows trained, before training (``reference_seconds``);
* ``trl``: ``trl.DPOTrainer`` with ``peft_config``.

Figures: steady-state real (non-pad) tokens/s (both sides of every pair; the first ``--warmup`` steps apart), peak
RSS, wall seconds. Truncation differs (ours cuts a long prompt's start, TRL's ``keep_start`` the sequence's end):
the real tokens each side ran are what is counted.

    python benchmarks/preference.py                      # writes benchmarks/results/preference_speed.{json,md}
    python benchmarks/preference.py --steps 4 --sides ours_adapter,trl --out /tmp/x
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from train_throughput import _peak_rss_mib, machine  # noqa: E402 - the same machine description and RSS reading

DATA = ROOT / "examples" / "data" / "hh_rlhf" / "harmless_base_2000.jsonl"
SIDES = ("ours_adapter", "ours_precomputed", "trl")


def _rows(path: str, n: int) -> list[Any]:
    from tunesmith.data.preference import read_preferences

    return read_preferences(path, skip_bad=True).rows[:n]


def run_side(side: str, args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from tunesmith.models import load_model

    torch.manual_seed(0)
    model, tok = load_model(args.model)
    rows = _rows(args.data, args.pairs)
    t0 = time.perf_counter()
    steps, extra = (_train_trl(model, tok, rows, args) if side == "trl" else _train_ours(model, tok, rows, args, side))
    wall = time.perf_counter() - t0
    steady = steps[args.warmup:]
    tokens, seconds = sum(s["tokens"] for s in steady), sum(s["seconds"] for s in steady)
    return {"side": side, "steps": len(steps), "steady_seconds": seconds, "real_tokens_per_s": tokens / seconds if seconds else 0.0,
            "real_tokens": sum(s["tokens"] for s in steps), "wall_seconds": wall, "peak_rss_mib": _peak_rss_mib(),
            "losses": [s.get("loss") for s in steps]} | extra


def _train_ours(model, tok, rows, args, side):
    from tunesmith.config import Config, TrainConfig
    from tunesmith.data.pairs import encode_pairs
    from tunesmith.io import read_jsonl
    from tunesmith.methods import prepare
    from tunesmith.training import preference as P
    from tunesmith.training.loop import train

    precision = "bf16" if args.bf16 else "fp32"
    model = prepare(model, Config(method="lora", train=TrainConfig(precision=precision)))  # frozen weights as trained
    pairs, _ = encode_pairs(tok, rows, args.max_len)
    pairs = pairs[: args.steps * args.batch]  # the rows the steps train (one epoch of them)
    reference = "adapter" if side == "ours_adapter" else "precomputed"
    objective = P.PreferenceLoss(P.Settings("dpo", beta=0.1), model, tok.pad_token_id, reference)
    extra = {}
    if reference == "precomputed":
        t = time.perf_counter()
        for p, v in zip(pairs, P.compute_references(model, pairs, tok.pad_token_id, 16, args.bf16, lora=True)):
            p.reference = v
        extra["reference_seconds"] = time.perf_counter() - t
    cfg = TrainConfig(max_steps=args.steps, batch_size=args.batch, lr=1e-4, warmup_steps=3, eval_every=10**9,
                      precision=precision, max_seq_len=args.max_len, seed=0)
    with tempfile.TemporaryDirectory() as run:
        train(model, pairs, pairs[:1], cfg, Path(run), tok.pad_token_id, show_progress=False, objective=objective)
        history = read_jsonl(Path(run) / "metrics.jsonl")
    return [{"tokens": r["tokens"], "seconds": r["step_seconds"], "loss": r["loss"]}
            for r in history if r["type"] == "train"], extra


def _train_trl(model, tok, rows, args):
    import peft
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from tunesmith.config import LoraConfig

    data = [{"prompt": r.prompt, "chosen": [{"role": "assistant", "content": r.chosen}],
             "rejected": [{"role": "assistant", "content": r.rejected}]} for r in rows[: args.steps * args.batch]]
    steps: list[dict[str, Any]] = []
    counted: list[int] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t = time.perf_counter()

        def on_step_end(self, *a, **k):
            steps.append({"tokens": counted[-1] if counted else 0, "seconds": time.perf_counter() - self.t})

        def on_log(self, _args, _state, _control, logs=None, **k):
            if logs and "loss" in logs and steps:
                steps[-1]["loss"] = logs["loss"]

    config = DPOConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=args.batch, max_steps=args.steps,
                       learning_rate=1e-4, lr_scheduler_type="cosine", warmup_steps=3, weight_decay=0.01,
                       max_grad_norm=1.0, bf16=args.bf16, gradient_checkpointing=False, max_length=args.max_len,
                       beta=0.1, logging_steps=1, save_strategy="no", report_to=[], seed=0, dataloader_num_workers=0,
                       use_cpu=True)
    ours = LoraConfig()
    lora = peft.LoraConfig(r=ours.r, lora_alpha=ours.alpha, lora_dropout=ours.dropout, target_modules=ours.target_modules,
                           task_type="CAUSAL_LM")
    trainer = DPOTrainer(model=model, args=config, train_dataset=Dataset.from_list(data), processing_class=tok,
                         peft_config=lora, callbacks=[Timer()])
    collate = trainer.data_collator

    def counting(features):
        batch = collate(features)
        counted.append(int(batch["attention_mask"].sum()))
        return batch

    trainer.data_collator = counting
    trainer.train()
    return steps, {}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--max-len", type=int, default=256)
    ap.add_argument("--pairs", type=int, default=1500)
    ap.add_argument("--data", default=str(DATA), help="a preference file (default: the shipped HH-RLHF pairs)")
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--sides", default=",".join(SIDES))
    ap.add_argument("--side", help=argparse.SUPPRESS)  # a child process: run this side, print its JSON
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args()
    if args.side:
        print("RESULT " + json.dumps(run_side(args.side, args)))
        return
    info = machine() | {"load_average_at_start": os.getloadavg()[0]}
    results = []
    for side in args.sides.split(","):
        cmd = [sys.executable, __file__, "--side", side] + [a for a in sys.argv[1:] if not a.startswith("--sides")]
        out = subprocess.run(cmd, capture_output=True, text=True, env=os.environ | {"TQDM_DISABLE": "1"})
        line = next((ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if line is None:
            raise SystemExit(f"{side} failed:\n{out.stderr[-3000:]}")
        results.append(json.loads(line[7:]) | {"load_average_after": os.getloadavg()[0]})
        print(f"{side}: {results[-1]['real_tokens_per_s']:.0f} real tokens/s, peak RSS {results[-1]['peak_rss_mib']:.0f} MiB",
              flush=True)
    trl = next((r for r in results if r["side"] == "trl"), None)
    for r in results:
        if trl and r is not trl:
            r["speed_vs_trl"] = r["real_tokens_per_s"] / trl["real_tokens_per_s"]
            r["peak_rss_vs_trl"] = r["peak_rss_mib"] / trl["peak_rss_mib"]
    settings = {k: getattr(args, k) for k in ("model", "data", "steps", "warmup", "batch", "max_len", "pairs", "bf16")}
    doc = {"machine": info, "settings": settings, "results": results}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "preference_speed.json").write_text(json.dumps(doc, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
