"""Generation speed: tunesmith's engine vs llama.cpp and transformers' ``generate``, 1 and 8 streams.

Every side answers the same chat prompts (the alpaca demo instructions, through the model's chat
template), greedy, exactly ``--max-tokens`` new tokens each (end tokens ignored, so every side
does the same work), with the same number of threads, in one process, one side after another,
``--repeats`` passes in alternation (tokens/s is the median over passes):

- ``engine_fp32``: ``generation.engine.Engine`` on the fp32 model (``runtime.INFERENCE_PRECISION``),
  decoding in the caller's thread, as evaluation and ``generate`` run it;
- ``engine_fp32_thread``: the same with the engine's own thread, as ``serve`` runs it;
- ``engine_bf16``: the same engine on a bf16 copy of the weights (half the bytes read per token);
- ``hf_generate``: transformers' ``model.generate`` on the fp32 model (the floor; 8 streams as one
  left-padded batch);
- ``llamacpp_f16``: llama.cpp (llama-cpp-python) on the same weights written by tunesmith's GGUF
  export as f16 (``deploy.gguf_export.write_gguf``). The binding decodes one sequence per
  context, so its 8-stream figure is its one-stream rate over 8 prompts in turn.

1 stream: the prompts one after another; 8 streams: 8 prompts submitted together. Results go to
``benchmarks/results/generate_speed.{json,md}`` with the machine and the load average at the start.

    python benchmarks/generate_speed.py                       # full (about 5 min on 2 cores)
    python benchmarks/generate_speed.py --max-tokens 16 --repeats 1 --prompts 3   # quick
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
DATA = ROOT / "examples" / "data" / "alpaca" / "alpaca_en_demo.json"
OUT = ROOT / "benchmarks" / "results"


def prompts(tokenizer: Any, count: int) -> list[list[int]]:
    """The first ``count`` alpaca demo instructions (with their input), as chat prompt ids."""
    from tunesmith.data.render import encode_prompt

    rows = json.loads(DATA.read_text(encoding="utf-8"))[:count]
    msgs = [[{"role": "user", "content": (r["instruction"] + ("\n\n" + r["input"] if r.get("input") else ""))}]
            for r in rows]
    return [encode_prompt(tokenizer, m, 2048) for m in msgs]


def engine_side(model: Any, tokenizer: Any, batches: list[list[list[int]]], max_tokens: int,
                background: bool = False) -> tuple[int, float, list]:
    """Tokens generated, seconds, and the token ids of each answer (batches submitted in turn)."""
    from tunesmith.generation.engine import Engine, GenerationRequest, SamplingParams

    engine = Engine(model, tokenizer, max_batch_size=max(len(b) for b in batches), per_row_adapters=False,
                    background=background)
    params = SamplingParams(max_tokens=max_tokens)
    try:
        engine.generate([GenerationRequest(batches[0][0], None, SamplingParams(max_tokens=2))])  # warm-up
        t0, n, answers = time.perf_counter(), 0, []
        for batch in batches:
            for r in engine.generate([GenerationRequest(p, None, params) for p in batch]):
                n += r.completion_tokens
                answers.append(r.choices[0].token_ids)
        return n, time.perf_counter() - t0, answers
    finally:
        engine.shutdown()


def hf_side(model: Any, tokenizer: Any, batches: list[list[list[int]]], max_tokens: int) -> tuple[int, float, list]:
    import torch

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    t0, n, answers = time.perf_counter(), 0, []
    with torch.inference_mode():
        for batch in batches:
            width = max(map(len, batch))
            ids = torch.tensor([[pad] * (width - len(p)) + p for p in batch])
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_tokens, min_new_tokens=max_tokens,
                                 do_sample=False, pad_token_id=pad)
            n += (out.shape[1] - width) * len(batch)
            answers += out[:, width:].tolist()
    return n, time.perf_counter() - t0, answers


def llama_side(llm: Any, batches: list[list[list[int]]], max_tokens: int) -> tuple[int, float, list]:
    t0, n, answers = time.perf_counter(), 0, []
    for batch in batches:
        for p in batch:
            llm.reset()
            out = []
            for tok in llm.generate(p, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0, reset=True):
                out.append(tok)
                if len(out) >= max_tokens:
                    break
            n += len(out)
            answers.append(out)
    return n, time.perf_counter() - t0, answers


def agreement(a: list[list[int]], b: list[list[int]]) -> float:
    """Mean share of each answer's tokens that two sides generate alike before they first differ."""
    shares = []
    for x, y in zip(a, b):
        same = next((i for i, (u, v) in enumerate(zip(x, y)) if u != v), min(len(x), len(y)))
        shares.append(same / max(1, min(len(x), len(y))))
    return statistics.mean(shares) if shares else 0.0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--prompts", type=int, default=8, help="prompts per pass (8 streams: all of them at once)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--sides", default="engine_fp32,engine_fp32_thread,engine_bf16,hf_generate,llamacpp_f16")
    ap.add_argument("--out", type=Path, default=OUT / "generate_speed")
    args = ap.parse_args(argv)
    load = os.getloadavg()[0]

    import torch

    from train_throughput import machine
    from tunesmith.models import load_model

    torch.set_num_threads(args.threads)
    model, tok = load_model(args.model)
    model.eval()
    sides = args.sides.split(",")
    models = {"engine_fp32": model, "hf_generate": model}  # engine_fp32_thread: the same model
    if "engine_bf16" in sides:
        import copy

        models["engine_bf16"] = copy.deepcopy(model).to(torch.bfloat16)
    llm = None
    with tempfile.TemporaryDirectory() as tmp:
        if "llamacpp_f16" in sides:
            try:
                from llama_cpp import Llama

                from tunesmith.deploy.gguf_export import write_gguf

                path = write_gguf(model, tok, Path(tmp) / "model-f16.gguf", "f16")
                llm = Llama(str(path), n_ctx=2048, n_threads=args.threads, n_threads_batch=args.threads, verbose=False)
            except ImportError:
                print("llama-cpp-python is not installed (make llama): llamacpp_f16 skipped")
                sides.remove("llamacpp_f16")
        ps = prompts(tok, args.prompts)
        shapes = {"1_stream": [[p] for p in ps], "8_streams": [ps[i : i + 8] for i in range(0, len(ps), 8)]}
        runs: dict[str, dict[str, list[float]]] = {s: {k: [] for k in shapes} for s in sides}
        answers: dict[str, list] = {}
        for rep in range(args.repeats):
            for side in sides:
                for shape, batches in shapes.items():
                    if side == "llamacpp_f16":
                        n, secs, ans = llama_side(llm, batches, args.max_tokens)
                    elif side == "hf_generate":
                        n, secs, ans = hf_side(model, tok, batches, args.max_tokens)
                    else:
                        n, secs, ans = engine_side(models[side.removesuffix("_thread")], tok, batches, args.max_tokens,
                                                   side.endswith("_thread"))
                    runs[side][shape].append(n / secs)
                    answers.setdefault(f"{side}/{shape}", ans)
                    print(f"pass {rep + 1} {side:14s} {shape:9s} {n / secs:7.1f} tokens/s", flush=True)
    results = summarize(runs, answers, vars(args) | {"out": str(args.out)}, machine() | {"load_at_start": load})
    write(args.out, results)
    print(json.dumps(results["targets"], indent=2))
    return 0


def summarize(runs: dict[str, dict[str, list[float]]], answers: dict[str, list], settings: dict[str, Any],
              info: dict[str, Any]) -> dict[str, Any]:
    med = {s: {k: statistics.median(v) for k, v in shapes.items()} for s, shapes in runs.items()}
    targets: dict[str, Any] = {}
    if "llamacpp_f16" in med:
        for side in ("engine_fp32", "engine_fp32_thread", "engine_bf16", "hf_generate"):
            if side in med:
                targets[f"{side} 1 stream vs llama.cpp f16"] = round(med[side]["1_stream"] / med["llamacpp_f16"]["1_stream"], 2)
    for side in ("engine_fp32", "engine_fp32_thread", "engine_bf16", "hf_generate"):
        if side in med:
            targets[f"{side} 8 streams vs 1 stream"] = round(med[side]["8_streams"] / med[side]["1_stream"], 2)
    ref = answers.get("engine_fp32/1_stream")
    agree = {k: round(agreement(ref, v), 3) for k, v in answers.items() if ref is not None and k != "engine_fp32/1_stream"}
    return {"machine": info, "settings": settings, "tokens_per_s": med, "passes": runs, "targets": targets,
            "greedy_agreement_with_engine_fp32_1_stream": agree}


def write(out: Path, results: dict[str, Any]) -> None:
    from tunesmith.io import atomic_write_json, atomic_write_text

    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out.with_suffix(".json"), results)
    m, s = results["machine"], results["settings"]
    lines = ["# Generation speed: tunesmith's engine vs llama.cpp and transformers' generate", "",
             f"- Date: {m['date']}; load average at start {m['load_at_start']:.2f}",
             f"- Machine: {m['cpu']}, {m['cores']} cores, {s['threads']} threads, flags {', '.join(m['flags'])}",
             f"- Versions: {', '.join(f'{k} {v}' for k, v in m['versions'].items())}",
             f"- Model: {s['model']}; {s['prompts']} alpaca demo prompts, greedy, {s['max_tokens']} new tokens each "
             f"(end tokens ignored); median of {s['repeats']} passes", "",
             "| side | 1 stream tokens/s | 8 streams tokens/s |", "|---|---|---|"]
    for side, v in results["tokens_per_s"].items():
        lines.append(f"| {side} | {v['1_stream']:.1f} | {v['8_streams']:.1f} |")
    lines += ["", "## Ratios", ""] + [f"- {k}: {v}x" for k, v in results["targets"].items()]
    lines += ["", "## Greedy agreement with engine_fp32 (1 stream)", "",
              "Mean share of each answer generated alike before the first differing token.", ""]
    lines += [f"- {k}: {v}" for k, v in results["greedy_agreement_with_engine_fp32_1_stream"].items()]
    atomic_write_text(out.with_suffix(".md"), "\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
