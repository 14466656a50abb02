"""Crash soak: training runs killed with SIGKILL at random moments, resumed, and compared.

Each soak run is `python -m tunesmith train` on a small random-init Llama (the embedded model's
tokenizer, real SST-2 reviews), killed with SIGKILL (the whole process group: torchrun and its
workers too) after a random delay, resumed with `--resume` (or started again when no checkpoint
was written yet), killed again with probability ``--rekill``, until it finishes. Its final model
and its metrics log (loss, learning rate and gradient norm of every step) are compared with an
uninterrupted run of the same config: bit-identical for one process; within ``--tolerance`` for
two processes (gradients are summed in another order). Where each kill landed is recorded from
what it left on disk: before the first checkpoint, mid-step, mid-evaluation (the step's train
line written, its eval line not), or mid-checkpoint-write (a temporary checkpoint folder left).

    python benchmarks/crash_soak.py       # 20 single-process runs + 4 two-process DDP + 3 two-process FSDP2
    python benchmarks/crash_soak.py --runs 3 --runs-ddp 0 --runs-fsdp 0 --max-minutes 5      # quick

A third of the kills (``--at-checkpoint``) wait for a checkpoint to be being written (its
temporary folder, or FSDP's shard staging folder, appears) and kill a few milliseconds later, so
that "mid-checkpoint-write" is really exercised rather than left to chance.

Writes benchmarks/results/crash_soak.{json,md}. Local only (it kills processes): not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))


def build_model(folder: Path) -> None:
    """A small random Llama with the embedded model's tokenizer, saved as an HF folder."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tunesmith.models import load_tokenizer

    tok = load_tokenizer("default")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)


def write_config(folder: Path, model: Path, steps: int) -> Path:
    import yaml

    sst = ROOT / "examples" / "data" / "sst2"
    cfg = {"name": "ref", "model": str(model), "task": "classification", "method": "lora",
           "output_dir": str(folder / "runs"),
           "data": {"train": str(sst / "stsa.binary.train"), "test": str(sst / "stsa.binary.dev"),
                    "labels": {"0": "negative", "1": "positive"}, "system_prompt": "Classify the sentiment.",
                    "validation_size": 32, "max_train_examples": 400, "max_test_examples": 32},
           "lora": {"r": 8, "alpha": 16, "dropout": 0.1},  # dropout on: the RNG must be restored exactly
           "train": {"max_steps": steps, "batch_size": 4, "grad_accum": 2, "lr": 1e-3, "warmup_steps": 3,
                     "eval_every": 10, "save_every": 3, "keep_checkpoints": 2, "precision": "fp32", "seed": 0,
                     "max_seq_len": 128},
           "eval": {"compare_with_base": False, "latency_examples": 0, "general": "none", "bootstrap_resamples": 100}}
    path = folder / "soak.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def command(config: Path, name: str, nproc: int, resume: bool, strategy: str = "ddp") -> list[str]:
    cmd = [sys.executable, "-m", "tunesmith", "train", str(config), "--set", f"name={name}",
           "--set", f"train.strategy={strategy}"]
    cmd += ["--resume"] if resume else ["--overwrite"]
    return cmd + (["--nproc", str(nproc)] if nproc > 1 else [])


def writing(run: Path) -> bool:
    """A checkpoint is being written: its temporary folder (or FSDP's shard staging folder) exists."""
    ckpts = run / "checkpoints"
    try:
        return any(p.name.endswith((".tmp", ".dcp")) for p in ckpts.iterdir())
    except OSError:
        return False


def killed_at_checkpoint(cmd: list[str], run: Path, timeout: float, log: Path, rng: random.Random) -> int | None:
    """Start ``cmd``; SIGKILL its process group 0-20 ms after a checkpoint write is seen to begin
    (or after ``timeout`` s); the exit code if it ended first."""
    with open(log, "a") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        end = time.perf_counter() + timeout
        while proc.poll() is None:
            if writing(run) or time.perf_counter() > end:
                time.sleep(rng.uniform(0.0, 0.02))
                kill_tree(proc.pid)
                proc.wait()
                return None
            time.sleep(0.002)
        return proc.returncode


def run_to_end(cmd: list[str], log: Path) -> tuple[int, float]:
    t0 = time.perf_counter()
    with open(log, "a") as out:
        code = subprocess.call(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    return code, time.perf_counter() - t0


def kill_tree(pid: int) -> None:
    """SIGKILL ``pid`` and every process below it (torchrun runs in a session of its own, so a
    process-group kill of the launcher would leave it and its workers)."""
    from tunesmith.training.distributed import children

    todo, found = [pid], []
    while todo:  # collect the whole tree first, then kill it at once
        p = todo.pop()
        found.append(p)
        todo += children(p)
    for p in found:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def killed_after(cmd: list[str], delay: float, log: Path) -> int | None:
    """Start ``cmd``, SIGKILL its whole process group after ``delay`` s; the exit code if it ended first."""
    with open(log, "a") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            return proc.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            kill_tree(proc.pid)
            proc.wait()
            return None


def where(run: Path) -> str:
    """What a kill interrupted, from what it left on disk."""
    ckpts = run / "checkpoints"
    if ckpts.is_dir() and any(p.name.endswith((".tmp", ".dcp", ".old")) for p in ckpts.iterdir()):
        return "mid-checkpoint-write"
    if not ckpts.is_dir() or not any(p.name.startswith("step-") for p in ckpts.iterdir()):
        return "before the first checkpoint"
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()] \
        if (run / "metrics.jsonl").is_file() else []
    if lines and lines[-1]["type"] == "train" and lines[-1]["step"] % 10 == 0:
        return "mid-evaluation"
    if (run / "eval.json").exists() or (run / "adapter").exists():
        return "after training (saving or testing)"
    return "mid-step"


def outcome(run: Path) -> tuple[dict[str, Any], list[tuple[float, float, float]]]:
    from safetensors.torch import load_file

    weights = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    steps = [(r["loss"], r["lr"], r["grad_norm"]) for r in
             (json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()) if r["type"] == "train"]
    return weights, steps


def compare(ref: Path, run: Path) -> dict[str, Any]:
    (w0, s0), (w1, s1) = outcome(ref), outcome(run)
    diff = max(float((w0[k] - w1[k]).abs().max()) for k in w0)
    identical = all(bool((w0[k] == w1[k]).all()) for k in w0)
    log_diff = max((abs(a - b) for x, y in zip(s0, s1) for a, b in zip(x, y)), default=0.0)
    return {"bit_identical": identical, "max_abs_diff": diff, "metrics_equal": s0 == s1, "metrics_max_diff": log_diff,
            "steps_logged": len(s1), "steps_expected": len(s0)}


def soak(config: Path, folder: Path, nproc: int, runs: int, rekill: float, deadline: float, rng: random.Random,
         strategy: str = "ddp", at_checkpoint: float = 1 / 3) -> dict[str, Any]:
    tag = "single" if nproc == 1 else strategy
    log = folder / f"{tag}.log"
    code, ref_seconds = run_to_end(command(config, f"ref-{tag}", nproc, False, strategy), log)
    if code != 0:
        raise SystemExit(f"the uninterrupted {tag} run failed (exit {code}); see {log}")
    ref = folder / "runs" / f"ref-{tag}"
    results = []
    for i in range(runs):
        if time.time() > deadline:
            break
        name = f"{tag}-{i}"
        run = folder / "runs" / name
        kills, places, starts = 0, [], 0
        resume = False
        while True:
            cmd = command(config, name, nproc, resume, strategy)
            starts += 1
            if kills == 0 or (rng.random() < rekill and kills < 4):
                t0 = time.perf_counter()
                if rng.random() < at_checkpoint:
                    code = killed_at_checkpoint(cmd, run, 0.9 * ref_seconds, log, rng)
                else:
                    code = killed_after(cmd, rng.uniform(0.5, 0.9 * ref_seconds), log)
                if code is None:
                    kills += 1
                    places.append(where(run))
                    resume = (run / "checkpoints").is_dir() and any(
                        p.name.startswith("step-") for p in (run / "checkpoints").iterdir())
                    continue
                if kills == 0 and code == 0:  # it finished before its kill (the machine sped up): again, sooner
                    ref_seconds = min(ref_seconds, time.perf_counter() - t0)
                    resume, starts = False, 0
                    continue
            else:
                code, _ = run_to_end(cmd, log)
            if code == 0:
                break
            if code != 0 and starts > 12:
                raise SystemExit(f"{name}: did not finish after {starts} starts (last exit {code}); see {log}")
            resume = True
        results.append({"run": name, "kills": kills, "where": places, "starts": starts} | compare(ref, run))
        print(json.dumps(results[-1]), flush=True)
    return {"processes": nproc, "strategy": strategy, "reference_seconds": round(ref_seconds, 1), "runs": results}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=20, help="single-process soak runs")
    p.add_argument("--runs-ddp", type=int, default=4, help="two-process DDP soak runs (torchrun, gloo)")
    p.add_argument("--runs-fsdp", type=int, default=3, help="two-process FSDP2 soak runs (sharded checkpoints)")
    p.add_argument("--at-checkpoint", type=float, default=1 / 3, help="share of kills aimed at a checkpoint write")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--rekill", type=float, default=0.4, help="chance that a resumed start is killed again")
    p.add_argument("--tolerance", type=float, default=1e-5, help="two processes: max abs weight difference allowed")
    p.add_argument("--max-minutes", type=float, default=25.0, help="stop starting new runs after this long")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = p.parse_args(argv)

    from train_throughput import machine

    rng = random.Random(args.seed)
    deadline = time.time() + 60 * args.max_minutes
    with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
        folder = Path(tmp)
        build_model(folder / "model")
        config = write_config(folder, folder / "model", args.steps)
        doc: dict[str, Any] = {"machine": machine(), "settings": vars(args)}
        start = time.time()  # the time is shared: single-process runs until 60% of it, DDP until 80%, FSDP2 the rest
        share = {"single": 0.6 if args.runs_ddp or args.runs_fsdp else 1.0, "ddp": 0.8 if args.runs_fsdp else 1.0, "fsdp": 1.0}
        until = {k: start + (deadline - start) * v for k, v in share.items()}
        doc["single"] = soak(config, folder, 1, args.runs, args.rekill, until["single"], rng, at_checkpoint=args.at_checkpoint)
        for strategy, n in (("ddp", args.runs_ddp), ("fsdp", args.runs_fsdp)):
            if n:
                doc[strategy] = soak(config, folder, 2, n, args.rekill, until[strategy], rng, strategy, args.at_checkpoint)
    single = doc["single"]["runs"]
    verdict = {"single_bit_identical": f"{sum(r['bit_identical'] and r['metrics_equal'] for r in single)}/{len(single)}"}
    for strategy in ("ddp", "fsdp"):
        if strategy in doc:
            done = doc[strategy]["runs"]
            verdict[f"{strategy}_within_tolerance"] = f"{sum(r['max_abs_diff'] <= args.tolerance for r in done)}/{len(done)}"
    doc["verdict"] = verdict
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "crash_soak.json").write_text(json.dumps(doc, indent=2) + "\n")
    (out / "crash_soak.md").write_text(markdown(doc) + "\n")
    print(markdown(doc))
    return 0


def markdown(doc: dict[str, Any]) -> str:
    m = doc["machine"]
    lines = [f"Crash soak on {m['cpu']} ({m['cores']} cores), {m['date']}; torch {m['versions']['torch']}.", "",
             f"Verdict: {json.dumps(doc['verdict'])}", "",
             "| run | processes | kills | where the kills landed | starts | bit-identical | max abs weight diff | metrics log equal |",
             "|---|---|---|---|---|---|---|---|"]
    for part in ("single", "ddp", "fsdp"):
        for r in doc.get(part, {}).get("runs", []):
            procs = f"{doc[part]['processes']}" + (f" ({part})" if part != "single" else "")
            lines.append(f"| {r['run']} | {procs} | {r['kills']} | {', '.join(r['where'])} | {r['starts']} | "
                         f"{'yes' if r['bit_identical'] else 'no'} | {r['max_abs_diff']:.1e} | "
                         + ("yes |" if r["metrics_equal"] else f"no (max diff {r['metrics_max_diff']:.1e}) |"))
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
