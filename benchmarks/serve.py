"""Serving throughput: ``tunesmith serve`` under sequential and concurrent clients, base vs adapters.

The server runs in its own process on 127.0.0.1 (a free port), serving the base model
(``--model``, the embedded SmolLM2-135M by default), LoRA adapters on it, and a merged copy of
the first adapter as a plain model. Adapters are the ``--runs`` folders if given, otherwise two
fresh LoRA adapters (r=16, every linear layer, PEFT's default init: B = 0, so the merged copy has
the base's weights; an adapter's cost does not depend on its values). Clients are threads using
the official ``openai`` client, streaming (for the time to first token), greedy, every request
asking for ``--max-tokens`` tokens; throughput counts the tokens actually generated.

Scenarios (each bounded by ``--requests-per-client`` and ``--max-seconds``, run ``--repeats`` times
in alternation; throughput is the median over the passes):
  base at 1 (sequential), 8 and 32 concurrent clients;
  one unmerged adapter and its merged copy, at 1 and 8 clients;
  mixed adapters (base, adapter 1, adapter 2 in turn) at 8 clients.

    python benchmarks/serve.py                                   # writes benchmarks/results/serve.{json,md}
    python benchmarks/serve.py --threads 1                       # ... serve_threads1.{json,md}
    python benchmarks/serve.py --requests-per-client 1 --max-tokens 16 --max-seconds 60   # quick
    python benchmarks/serve.py --runs runs/a runs/b              # real adapters (LoRA runs on --model)
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
DATA = ROOT / "examples" / "data" / "alpaca" / "alpaca_en_demo.json"
MERGED = "merged-adapter"


# ---------------------------------------------------------------- the server (a child process)


def build_groups(model: str, runs: list[str]) -> tuple[list[Any], list[str]]:
    """The served groups and the adapter names: real runs, or two fresh adapters; plus a merged copy."""
    import peft

    from tunesmith.deploy.loading import ServedGroup, load_for_serving, load_run
    from tunesmith.models import load_model, resolve_model

    if runs:
        groups = load_for_serving(runs, base=model)
        adapters = [n for n, a in groups[0].names.items() if a is not None]
        merged = load_run(runs[0], merge=True)
        return groups + [ServedGroup(merged.model, merged.tokenizer, {MERGED: None}, model)], adapters
    base, tok = load_model(model)
    cfg = peft.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM")
    pm = peft.get_peft_model(base, cfg, adapter_name="adapter-1")
    pm.add_adapter("adapter-2", cfg)
    pm.eval()
    plain, _ = load_model(model)  # B = 0: merging adapter-1 changes no weight, so the merged model is the base
    name = resolve_model(model).display_name
    groups = [ServedGroup(pm, tok, {name: None, "adapter-1": "adapter-1", "adapter-2": "adapter-2"}, model),
              ServedGroup(plain.eval(), tok, {MERGED: None}, model)]
    return groups, ["adapter-1", "adapter-2"]


def run_server(args: argparse.Namespace) -> None:
    import torch
    import uvicorn

    from tunesmith.deploy.server import ServeSettings, create_app

    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # load as `tunesmith serve` does: the engines' threads own the only OpenMP teams
    groups, adapters = build_groups(args.model, args.runs)
    torch.set_num_threads(threads)
    base = next(n for n, a in groups[0].names.items() if a is None)
    app = create_app(groups, ServeSettings(max_batch_size=args.max_batch_size, max_waiting=512,
                                           max_tokens=args.max_tokens))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))  # never another interface: this server has no key
    print(json.dumps({"port": sock.getsockname()[1], "base": base, "adapters": adapters,
                      "server_threads": torch.get_num_threads()}), flush=True)
    uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=30)).run(sockets=[sock])


def step_costs(args: argparse.Namespace) -> dict[str, Any]:
    """Milliseconds per decoding step (engine forward of one token per row, no HTTP), alternating
    the variants step block by step block so a busy spell of the machine hits them all alike:
    the merged model (plain), the base rows of the PEFT model, one unmerged adapter, and mixed
    rows (base, adapter 1, adapter 2 in turn). Medians over ``--step-repeats`` blocks of 10 steps."""
    import torch
    from transformers import DynamicCache

    from tunesmith.generation.adapters import AdapterRouter

    if args.threads:
        torch.set_num_threads(args.threads)
    groups, (a1, a2) = build_groups(args.model, args.runs)
    peft_model, plain = groups[0].model, groups[-1].model
    router = AdapterRouter(peft_model, torch.device("cpu"))
    out: dict[str, Any] = {}
    with torch.inference_mode():
        for rows in (1, 8, 32):
            variants = {"merged": (plain, [None] * rows), "base_rows": (peft_model, [None] * rows),
                        "adapter": (peft_model, [a1] * rows),
                        # rows of each adapter together, as the engine keeps them (generation.batch)
                        "mixed": (peft_model, sorted([(None, a1, a2)[i % 3] for i in range(rows)], key=lambda a: a or ""))}
            times: dict[str, list[float]] = {k: [] for k in variants}
            for _ in range(args.step_repeats):
                for name, (model, adapters) in variants.items():
                    cache = DynamicCache()
                    model(input_ids=torch.randint(0, 1000, (rows, 64)), cache=cache, use_cache=True, logits_to_keep=1)
                    t0 = time.perf_counter()
                    for _ in range(10):
                        with router.route(adapters):
                            model(input_ids=torch.randint(0, 1000, (rows, 1)), cache=cache, use_cache=True,
                                  logits_to_keep=1)
                    times[name].append((time.perf_counter() - t0) / 10 * 1000)
            out[str(rows)] = {k: statistics.median(v) for k, v in times.items()}
            shown = ", ".join(f"{k} {v:.1f}" for k, v in out[str(rows)].items())
            print(f"step ms at {rows} rows: {shown}", flush=True)
    router.close()
    return out


# ---------------------------------------------------------------- the clients


def prompts(n: int) -> list[list[dict[str, str]]]:
    rows = json.loads(DATA.read_text())
    out = []
    for r in rows[:n]:
        user = r["instruction"] + (f"\n\n{r['input']}" if r.get("input") else "")
        out.append([{"role": "user", "content": user[:1500]}])
    return out


def one_request(client: Any, model: str, messages: list[dict[str, str]], max_tokens: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    ttft, tokens = None, 0
    stream = client.chat.completions.create(model=model, messages=messages, temperature=0, max_tokens=max_tokens,
                                            stream=True, stream_options={"include_usage": True})
    for chunk in stream:
        if ttft is None and chunk.choices and chunk.choices[0].delta.content:
            ttft = time.perf_counter() - t0
        if chunk.usage:
            tokens = chunk.usage.completion_tokens
    return {"latency": time.perf_counter() - t0, "ttft": ttft if ttft is not None else time.perf_counter() - t0,
            "tokens": tokens}


def scenario(port: int, models: list[str], clients: int, per_client: int, max_tokens: int,
             max_seconds: float, convs: list[list[dict[str, str]]]) -> dict[str, Any]:
    """``clients`` threads, each sending ``per_client`` requests in turn (models in rotation)."""
    import openai

    results: list[dict[str, Any]] = []
    errors: list[str] = []
    lock = threading.Lock()
    deadline = time.perf_counter() + max_seconds
    counter = iter(range(clients * per_client))

    def worker() -> None:
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=max_seconds)
        while time.perf_counter() < deadline:
            with lock:
                i = next(counter, None)
            if i is None:
                return
            try:
                r = one_request(c, models[i % len(models)], convs[i % len(convs)], max_tokens)
                with lock:
                    results.append(r)
            except Exception as e:  # noqa: BLE001 - a benchmark counts errors, it does not stop on them
                with lock:
                    errors.append(f"{type(e).__name__}: {e}"[:200])

    before = engine_counters(port)
    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    after = engine_counters(port)
    return {"results": results, "errors": errors, "wall": wall, "steps": after["steps"] - before["steps"],
            "rows": after["rows"] - before["rows"], "load_average": os.getloadavg()[0]}


def summarize(runs: list[dict[str, Any]], clients: int, models: list[str]) -> dict[str, Any]:
    """One scenario over its repeats: throughput is the median of the repeats' (tokens / wall
    time); latencies are percentiles of every request of every repeat; errors are summed."""

    def pct(xs: list[float], q: float) -> float:
        if not xs:
            return float("nan")
        xs = sorted(xs)
        return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]

    results = [r for run in runs for r in run["results"]]
    errors = [e for run in runs for e in run["errors"]]
    lat = [r["latency"] for r in results]
    ttft = [r["ttft"] for r in results]
    tokens = sum(r["tokens"] for r in results)
    wall = sum(run["wall"] for run in runs)
    steps = sum(run["steps"] for run in runs)
    mean_batch = sum(run["rows"] for run in runs) / steps if steps else 0.0
    per_run = [sum(r["tokens"] for r in run["results"]) / run["wall"] for run in runs if run["wall"]]
    return {"clients": clients, "models": models, "repeats": len(runs), "requests": len(results),
            "errors": len(errors), "error_examples": errors[:3], "wall_s": wall, "completion_tokens": tokens,
            "tokens_per_s": statistics.median(per_run) if per_run else 0.0, "tokens_per_s_runs": per_run,
            "requests_per_s": len(results) / wall if wall else 0.0,
            "latency_p50_s": pct(lat, 0.5), "latency_p95_s": pct(lat, 0.95), "ttft_p50_s": pct(ttft, 0.5),
            "ttft_p95_s": pct(ttft, 0.95), "mean_tokens_per_request": statistics.mean([r["tokens"] for r in results])
            if results else 0.0, "mean_batch_rows": mean_batch,
            "load_average_after": [run["load_average"] for run in runs]}  # this benchmark's own load is ~2-3


def engine_counters(port: int) -> dict[str, float]:
    """Decoding steps and rows summed over all engines, from /metrics."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30).read().decode()
    out = {"steps": 0.0, "rows": 0.0}
    for line in text.splitlines():
        for key, name in (("steps", "tunesmith_engine_steps_total"), ("rows", "tunesmith_engine_rows_total")):
            if line.startswith(name + "{"):
                out[key] += float(line.rsplit(" ", 1)[1])
    return out


# ---------------------------------------------------------------- the whole benchmark


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="default")
    p.add_argument("--runs", nargs="*", default=[], help="LoRA run folders on --model (default: fresh adapters)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--requests-per-client", type=int, default=2, help="each client's requests (sequential: 8 at least)")
    p.add_argument("--max-seconds", type=float, default=300, help="per scenario; unfinished requests are not counted")
    p.add_argument("--repeats", type=int, default=3, help="passes over the scenarios (medians of throughput)")
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=0, help="the server's torch threads (0: torch's default)")
    p.add_argument("--scenarios", default="", help="comma-separated names to run (default: all)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--step-repeats", type=int, default=5, help="blocks of 10 steps per variant (0: skip step costs)")
    p.add_argument("--server", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--step-costs", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.server:
        run_server(args)
        return 0
    if args.step_costs:
        print(json.dumps(step_costs(args)))
        return 0
    from train_throughput import machine  # the same machine description as the other benchmarks

    info = machine() | {"load_average_at_start": os.getloadavg()[0]}
    cmd = [sys.executable, __file__, "--server", "--model", args.model, "--max-tokens", str(args.max_tokens),
           "--max-batch-size", str(args.max_batch_size), "--threads", str(args.threads),
           *(["--runs", *args.runs] if args.runs else [])]
    server = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    try:
        hello = json.loads(server.stdout.readline())  # type: ignore[union-attr]
        info["server_torch_threads"] = hello["server_threads"]
        wait_ready(hello["port"])
        results = run_scenarios(args, hello)
    finally:
        server.send_signal(signal.SIGTERM)  # graceful: what a deployment does
        server.wait(60)
    steps = measure_step_costs(args) if args.step_repeats else {}
    settings = {k: v for k, v in vars(args).items() if k not in ("server", "step_costs")}
    write_results(Path(args.out), {"machine": info, "settings": settings, "server_exit_code": server.returncode,
                                   "scenarios": results, "step_ms": steps, "summary": derive(results, steps)})
    return 0


def measure_step_costs(args: argparse.Namespace) -> dict[str, Any]:
    """``step_costs`` in a child process of its own (after the server has gone)."""
    cmd = [sys.executable, __file__, "--step-costs", "--model", args.model, "--threads", str(args.threads),
           "--step-repeats", str(args.step_repeats), *(["--runs", *args.runs] if args.runs else [])]
    child = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    last = ""
    for line in child.stdout:  # type: ignore[union-attr] - progress as it comes; the last line is the JSON
        if last:
            print(last, end="", flush=True)
        last = line
    if child.wait() != 0:
        print("step costs failed (see above)", file=sys.stderr)
        return {}
    return json.loads(last)


def wait_ready(port: int) -> None:
    deadline = time.time() + 600
    while time.time() < deadline:
        try:
            if urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5).status == 200:
                return
        except OSError:
            time.sleep(0.5)
    raise SystemExit("the server did not come up")


def run_scenarios(args: argparse.Namespace, hello: dict[str, Any]) -> dict[str, Any]:
    base, (a1, a2) = hello["base"], hello["adapters"][:2]
    per = args.requests_per_client
    plan = {  # name -> (models in rotation, clients, requests per client)
        "base_sequential": ([base], 1, max(8, per)), "base_8": ([base], 8, per), "base_32": ([base], 32, per),
        "adapter_sequential": ([a1], 1, max(8, per)), "merged_sequential": ([MERGED], 1, max(8, per)),
        "adapter_8": ([a1], 8, per), "merged_8": ([MERGED], 8, per), "mixed_8": ([base, a1, a2], 8, per),
    }
    chosen = [s for s in args.scenarios.split(",") if s] or list(plan)
    convs = prompts(200)
    one_request_warmup(hello["port"], [base, a1, MERGED], convs[0])
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in chosen}
    for rep in range(args.repeats):  # alternate: A B C A B C ..., so a slow spell of the machine hits every scenario
        for name in chosen:
            models, clients, n = plan[name]
            runs[name].append(scenario(hello["port"], models, clients, n, args.max_tokens, args.max_seconds, convs))
            r = summarize(runs[name][-1:], clients, models)
            print(f"{name} #{rep + 1}: {r['requests']} requests, {r['errors']} errors, {r['tokens_per_s']:.1f} tok/s, "
                  f"p50 {r['latency_p50_s']:.2f}s p95 {r['latency_p95_s']:.2f}s, TTFT p50 {r['ttft_p50_s']:.2f}s, "
                  f"mean batch {r['mean_batch_rows']:.1f}", flush=True)
    return {name: summarize(rs, plan[name][1], plan[name][0]) for name, rs in runs.items()}


def one_request_warmup(port: int, models: list[str], conv: list[dict[str, str]]) -> None:
    import openai

    c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=300)
    for m in models:
        one_request(c, m, conv, 4)


def derive(r: dict[str, Any], steps: dict[str, Any]) -> dict[str, Any]:
    def ratio(a: str, b: str) -> float | None:
        return r[a]["tokens_per_s"] / r[b]["tokens_per_s"] if a in r and b in r and r[b]["tokens_per_s"] else None

    def cost(a: str, b: str) -> float | None:  # seconds per token of a against b, minus 1
        x = ratio(b, a)
        return x - 1 if x is not None else None

    return {"throughput_8_vs_sequential": ratio("base_8", "base_sequential"),
            "throughput_32_vs_sequential": ratio("base_32", "base_sequential"),
            "unmerged_adapter_cost_vs_merged_sequential": cost("adapter_sequential", "merged_sequential"),
            "unmerged_adapter_cost_vs_merged_8": cost("adapter_8", "merged_8"),
            "adapter_cost_vs_base_sequential": cost("adapter_sequential", "base_sequential"),
            "mixed_8_vs_base_8": ratio("mixed_8", "base_8"),
            "errors_32_clients": r.get("base_32", {}).get("errors"),
            "step_cost_vs_merged": {rows: {k: v / s["merged"] - 1 for k, v in s.items() if k != "merged"}
                                    for rows, s in steps.items()}}


def write_results(out: Path, results: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    threads = results["settings"]["threads"]
    stem = f"serve_threads{threads}" if threads else "serve"  # a run with --threads does not overwrite the default's
    (out / f"{stem}.json").write_text(json.dumps(results, indent=2) + "\n")
    m, s, d = results["machine"], results["settings"], results["summary"]

    def f(x: float | None, spec: str, unit: str = "") -> str:
        return "not measured" if x is None else format(x, spec) + unit

    lines = [
        "# Serving throughput: tunesmith serve (continuous batching, LoRA adapters unmerged)", "",
        f"- Date: {m['date']}; load average at start {m['load_average_at_start']:.2f}",
        f"- Machine: {m['cpu']}, {m['cores']} cores (server: {m['server_torch_threads']} torch threads), "
        f"flags {', '.join(m['flags'])}",
        f"- Versions: {', '.join(f'{k} {v}' for k, v in m['versions'].items())}",
        f"- Model: {s['model']}; adapters: {', '.join(s['runs']) or 'two fresh LoRA adapters (r=16, all linear)'}; "
        f"fp32; server and clients in separate processes on 127.0.0.1",
        f"- Requests: chat, greedy, streamed, max_tokens {s['max_tokens']}, alpaca demo instructions; "
        f"{s['requests_per_client']} per client (8 at least sequentially); max batch {s['max_batch_size']} rows; "
        f"{s['repeats']} passes over the scenarios, alternating (tokens/s: median of the passes)",
        "", "## Targets", "",
        f"- 8 concurrent vs sequential throughput: {f(d['throughput_8_vs_sequential'], '.2f', 'x')} (target >= 4x); "
        f"32 concurrent: {f(d['throughput_32_vs_sequential'], '.2f', 'x')}",
        "- Unmerged adapter vs merged model, time per token: "
        f"{f(d['unmerged_adapter_cost_vs_merged_sequential'], '+.1%')} sequential, "
        f"{f(d['unmerged_adapter_cost_vs_merged_8'], '+.1%')} at 8 clients (target <= +10%)",
        f"- 32 concurrent clients: {f(d['errors_32_clients'], 'd', ' errors')} (target 0)",
        f"- Mixed adapters (base, adapter 1, adapter 2) at 8 clients vs base alone at 8: "
        f"{f(d['mixed_8_vs_base_8'], '.2f', 'x')} throughput",
        "- Decoding step time against the merged model (engine alone, no HTTP, alternating blocks): "
        + "; ".join(f"{rows} rows: " + ", ".join(f"{k} {v:+.1%}" for k, v in c.items())
                    for rows, c in d["step_cost_vs_merged"].items()),
        "", "## Scenarios", "",
        "| scenario | clients | requests | errors | tokens/s | req/s | p50 latency s | p95 latency s | TTFT p50 s "
        "| TTFT p95 s | tokens/request | mean batch rows | tokens/s of each pass | load avg after each pass |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results["scenarios"].items():
        lines.append(f"| {name} | {r['clients']} | {r['requests']} | {r['errors']} | {r['tokens_per_s']:.1f} | "
                     f"{r['requests_per_s']:.2f} | {r['latency_p50_s']:.2f} | {r['latency_p95_s']:.2f} | "
                     f"{r['ttft_p50_s']:.2f} | {r['ttft_p95_s']:.2f} | {r['mean_tokens_per_request']:.1f} | "
                     f"{r['mean_batch_rows']:.1f} | {', '.join(f'{x:.1f}' for x in r['tokens_per_s_runs'])} | "
                     f"{', '.join(f'{x:.1f}' for x in r['load_average_after'])} |")
    if results["step_ms"]:
        lines += ["", "## Decoding step time (ms), engine alone", "",
                  "| rows | merged model | base rows (PEFT model) | one adapter | mixed (base, 1, 2) |",
                  "|---|---|---|---|---|"]
        lines += [f"| {rows} | {c['merged']:.1f} | {c['base_rows']:.1f} | {c['adapter']:.1f} | {c['mixed']:.1f} |"
                  for rows, c in results["step_ms"].items()]
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "src"))
    raise SystemExit(main())
