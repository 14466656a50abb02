"""Exporting a finished run for the tools its users run: PEFT adapter, merged HF folder, GGUF
(+ Ollama Modelfile), or the prompt of a prompt-method run.

Every export is written atomically (built in a temporary sibling folder, then renamed) and carries
a ``README.md`` model card (base model, data, method, metrics with intervals) and the chat
template the model was trained with. ``verify`` loads the export in its consumer (stock PEFT,
stock transformers, llama.cpp) and compares next-token predictions with the in-memory model.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tunesmith import methods
from tunesmith.config import Config, task_config, train_settings
from tunesmith.runtime.commands import command
from tunesmith.data.formats import DataError
from tunesmith.data.render import chat_format, encode_prompt, fold_system
from tunesmith.deploy.errors import ExportError
from tunesmith.deploy.loading import LoadedRun, load_run, run_config, run_kind
from tunesmith.evaluation.metrics import metric_label
from tunesmith.io import atomic_dir, atomic_write_json
from tunesmith.models import context_length, load_tokenizer, ready_tokenizer, resolve_model
from tunesmith.report.html import load_json

FORMATS = ("adapter", "hf", "gguf", "prompt")
DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
# How far an export's logits may stray from the in-memory fp32 model, as a fraction of the largest
# logit's magnitude: fp32 differs only by summation order (merged vs unmerged), f16 keeps ~3 decimal
# digits, bf16 ~2, q8_0 ~2 (8-bit blocks of 32). Measured on the tiny test models and SmolLM2-135M
# (see tests/test_export.py and README "Deploy").
TOLERANCE = {"f32": 1e-4, "f16": 2e-2, "bf16": 6e-2, "q8_0": 6e-2}
# A GGUF in llama.cpp keeps its KV cache in f16, so even an f32 file differs by ~1e-3 there; measured
# on SmolLM2-135M: f32 9.5e-4, f16 1.8e-3, bf16 8.9e-3, q8_0 3.8e-2 (tests/test_export_gguf.py).
TOLERANCE_GGUF = {"f32": 3e-3, "f16": 5e-3, "bf16": 2e-2, "q8_0": 6e-2}


@dataclass
class Exported:
    """Where an export went (``path``: a folder), its main file, and the verification's result."""

    path: Path
    format: str
    dtype: str
    files: list[str] = field(default_factory=list)
    verify: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)  # what was left out, and why (said with the result)


def export(run_dir: str | Path, format: str, dtype: str | None = None, out: str | Path | None = None,
           verify: bool = False) -> Exported:
    """Export a finished run.

    ``format``: ``adapter`` (LoRA runs: a PEFT adapter folder, with tokenizer and chat template),
    ``hf`` (the merged model as an HF safetensors folder, a classification head included),
    ``gguf`` (llama.cpp file + Ollama ``Modelfile``), ``prompt`` (prompt-method runs: the system
    prompt and shots as JSON). ``dtype``: f32 | f16 | bf16 (| q8_0 for gguf); default f32, f16 for
    gguf. ``out``: the folder to write (default ``<run>/export/<format>-<dtype>``), replaced
    atomically. ``verify``: load the export in its consumer and compare next-token predictions on
    a few test prompts (the result is in ``Exported.verify``; a disagreement beyond the dtype's
    tolerance raises ExportError). Raises RunError for an unfinished run, ExportError for a
    format the run cannot take.
    """
    run_dir = Path(run_dir)
    cfg = run_config(run_dir)
    kind = run_kind(cfg)
    dtype = _check(format, dtype, kind)
    target = Path(out) if out else run_dir / "export" / (format if format == "prompt" else f"{format}-{dtype}")
    if format == "prompt":
        atomic_dir(target, lambda tmp: _write_prompt(run_dir, cfg, tmp))
        return Exported(target, format, "-", sorted(p.name for p in target.iterdir()))
    loaded = load_run(run_dir, merge=format != "adapter")
    writers = {"adapter": _write_adapter, "hf": _write_hf, "gguf": _write_gguf}
    notes: list[str] = []

    def fill(tmp: Path) -> None:
        notes.extend(writers[format](loaded, tmp, dtype) or [])
        (tmp / "README.md").write_text(model_card(loaded, format, dtype, modelfile=(tmp / "Modelfile").exists()))

    atomic_dir(target, fill)
    result = Exported(target, format, dtype, sorted(p.name for p in target.iterdir()), notes=notes)
    if verify:
        result.verify = verify_export(loaded, result)
    return result


def _check(format: str, dtype: str | None, kind: str) -> str:
    if format not in FORMATS:
        raise ExportError(f"unknown export format {format!r}; choose one of: {', '.join(FORMATS)}")
    dtype = dtype or ("f16" if format == "gguf" else "f32")
    allowed = (*DTYPES, "q8_0") if format == "gguf" else tuple(DTYPES)
    if format != "prompt" and dtype not in allowed:
        raise ExportError(f"--dtype {dtype!r} is not available for {format}; choose one of: {', '.join(allowed)}")
    if kind == "prompt" and format != "prompt":
        raise ExportError("a prompt-method run has no trained weights: export it with --format prompt "
                          "(its system prompt and shots, for any client of the base model)")
    if format == "prompt" and kind != "prompt":
        raise ExportError(f"--format prompt is for prompt-method runs; this is a {kind} run: use adapter, hf or gguf")
    if format == "adapter" and kind not in ("lora", "head"):
        raise ExportError(f"--format adapter needs a LoRA run; this is a {kind} run: use hf (or gguf)")
    if format == "gguf" and kind == "head":
        raise ExportError("a classification-head run cannot be exported to GGUF (llama.cpp runs language models); "
                          "use --format hf (the head included) or --format adapter")
    return dtype


def _write_adapter(run: LoadedRun, out: Path, dtype: str) -> None:
    """The PEFT adapter as trained (``adapter_config.json`` + ``adapter_model.safetensors``), in
    ``dtype``, with the tokenizer and its chat template beside it."""
    if run.kind == "head" and run.config.method != "lora":
        raise ExportError("--format adapter needs a LoRA run; this head was trained in full: use --format hf")
    artifact = run.dir / methods.lora.ARTIFACT
    if dtype == "f32":
        for name in ("adapter_config.json", "adapter_model.safetensors"):
            shutil.copy2(artifact / name, out / name)
    else:
        from safetensors.torch import load_file, save_file

        shutil.copy2(artifact / "adapter_config.json", out / "adapter_config.json")
        tensors = load_file(str(artifact / "adapter_model.safetensors"))
        save_file({k: v.to(DTYPES[dtype]) for k, v in tensors.items()}, str(out / "adapter_model.safetensors"),
                  metadata={"format": "pt"})
    run.tokenizer.save_pretrained(out)


def _write_hf(run: LoadedRun, out: Path, dtype: str) -> None:
    """The merged model in ``dtype`` (safetensors), its tokenizer and chat template, and a generation
    config that stops at the end of the assistant's turn."""
    model = run.model.to(DTYPES[dtype])  # in place: the loaded run now holds the exported weights
    if run.kind != "head":
        stops = list(chat_format(run.tokenizer).stop_ids)
        gen = model.generation_config
        gen.eos_token_id = stops if len(stops) > 1 else stops[0]
        gen.pad_token_id = run.tokenizer.pad_token_id
    else:  # a pipeline then names the class by its words ("positive"), not its key in the data ("1")
        words = [run.config.data.labels[k] or k for k in run.config.data.labels]
        model.config.id2label = dict(enumerate(words))
        model.config.label2id = {w: i for i, w in enumerate(words)}
    model.config.name_or_path = run.name
    model.save_pretrained(out)
    run.tokenizer.save_pretrained(out)


def _write_gguf(run: LoadedRun, out: Path, dtype: str) -> list[str]:
    """``<run>.gguf`` (llama.cpp's format, written with the ``gguf`` package) and an Ollama
    ``Modelfile`` when Ollama's template language can express the chat template; else the GGUF
    alone and a note saying why (llama.cpp itself reads the template from the GGUF)."""
    from tunesmith.deploy import gguf_export

    source = resolve_model(run.config.model)
    source_gguf = Path(source.location) if source.kind == "gguf" else None
    name = f"{run.name}.{dtype}.gguf"
    gguf_export.write_gguf(run.model, run.tokenizer, out / name, dtype=dtype, name=run.name, source_gguf=source_gguf)
    try:
        modelfile = gguf_export.ollama_modelfile(run.tokenizer, name, system_prompt=run.config.data.system_prompt)
    except ExportError as e:
        return [f"no Ollama Modelfile: {e}. The GGUF carries the chat template, which llama.cpp (llama-cli, llama-server) "
                "applies itself"]
    (out / "Modelfile").write_text(modelfile)
    return []


def _write_prompt(run_dir: Path, cfg: Config, out: Path) -> None:
    """``prompt.json``: the messages to send before each question (system prompt and, for random
    shot selection, the fixed shots), as the run's evaluation sent them, ready for any
    chat-completions client of the base model."""
    saved = load_json(run_dir / methods.prompt.ARTIFACT / "prompt.json")
    messages, prefix = _prompt_messages(cfg, saved)
    doc: dict[str, Any] = {
        "model": resolve_model(cfg.model).display_name, "base_model": cfg.model, "task": cfg.task,
        "messages": messages,
        "usage": "send these messages, then the user's question as the last user message",
        "shots": saved.get("shots"), "selection": saved.get("selection"),
    }
    if prefix is not None:
        doc["user_prefix"] = prefix
        doc["usage"] = ("the model's chat template has no system role: put user_prefix (the system prompt) before the "
                        "first user message you send, as training and evaluation did; then send "
                        + ("these messages and the question" if messages else "the question as the only message"))
    if cfg.prompt.selection != "random" and cfg.prompt.shots:
        doc["note"] = (f"shots are chosen per question ({cfg.prompt.selection}) from the training split; "
                       "only the system prompt is fixed. tunesmith eval applies the selection.")
    if cfg.task == "classification":
        doc["labels"] = dict(cfg.data.labels)
    atomic_write_json(out / "prompt.json", doc)
    (out / "README.md").write_text(_card_header(run_dir, cfg, "prompt", "-") + _card_metrics(run_dir))


def _prompt_messages(cfg: Config, saved: dict[str, Any]) -> tuple[list[dict[str, str]], str | None]:
    """The system prompt and fixed shots as messages, and the text to put before the first user
    message (None unless the model's chat template refuses the system role and no shot's user turn
    can carry the system prompt). Folded as ``data.render`` folds them in training and evaluation;
    a remote model (``prompt.api``) gets the system role as it did in evaluation."""
    system = [{"role": "system", "content": cfg.data.system_prompt}] if cfg.data.system_prompt else []
    turns = [m for shot in saved.get("examples") or [] for m in shot if m["role"] != "system"]
    if not system or cfg.prompt.api.base_url or _has_system_role(cfg):
        return system + turns, None
    if turns:
        return fold_system(system + turns), None
    return [], fold_system(system + [{"role": "user", "content": ""}])[0]["content"]


def _has_system_role(cfg: Config) -> bool:
    """Whether the base model's chat template (``data.chat_template`` applied) takes a system turn."""
    tokenizer = ready_tokenizer(load_tokenizer(cfg.model), cfg)
    try:
        return chat_format(tokenizer).system_role
    except DataError:  # no chat template: nothing to fold into
        return True


def model_card(run: LoadedRun, format: str, dtype: str, modelfile: bool = True) -> str:
    """A short README: what the model is, how it was made and measured, and how to load this export."""
    how = {
        "adapter": ("```python\nfrom peft import PeftModel\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n"
                    "# the base weights the adapter was trained on (on this machine; elsewhere, the same model's folder)\n"
                    f"base = AutoModelForCausalLM.from_pretrained({_base_folder(run.config)!r})\n"
                    "model = PeftModel.from_pretrained(base, \"<this folder>\")\n"
                    "tokenizer = AutoTokenizer.from_pretrained(\"<this folder>\")\n" + _ask(run) + "```\n"
                    "vLLM: `vllm serve <base folder> --enable-lora --lora-modules "
                    f"{run.name}=<this folder>`\n"),
        "hf": ("```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n"
               "model = AutoModelForCausalLM.from_pretrained(\"<this folder>\")\n"
               "tokenizer = AutoTokenizer.from_pretrained(\"<this folder>\")\n" + _ask(run) + "```\n"
               "vLLM: `vllm serve <this folder>`; tunesmith: `tunesmith serve` on the run folder\n"),
        "gguf": (f"llama.cpp: `llama-cli -m {run.name}.{dtype}.gguf -cnv` (or `llama-server -m ...`)"
                 + (f"; Ollama: `ollama create {run.name} -f Modelfile && ollama run {run.name}`\n" if modelfile else
                    " (it applies the chat template stored in the file; Ollama's template language cannot express this "
                    "model's template, so no Modelfile was written)\n")),
    }[format]
    return _card_header(run.dir, run.config, format, dtype) + _card_metrics(run.dir) + "\n## Load it\n\n" + how


def _ask(run: LoadedRun) -> str:
    """Python lines that ask the exported model one question as the run was trained: its system
    prompt first (folded into the user turn where the chat template has no system role)."""
    if run.config.task == "text" or not getattr(run.tokenizer, "chat_template", None):
        return ""
    system = run.config.data.system_prompt
    try:
        fmt = chat_format(run.tokenizer)
    except DataError:
        fmt = None
    folds = bool(system) and fmt is not None and not fmt.system_role
    # replies were trained to end with the template's end of turn: stock generate stops on the eos only
    stop = f", eos_token_id={list(fmt.stop_ids)}" if fmt is not None and len(fmt.stop_ids) > 1 else ""
    if system and not folds:
        messages = f"[{{\"role\": \"system\", \"content\": {system!r}}}, {{\"role\": \"user\", \"content\": \"...\"}}]"
    else:
        user = (system + "\n\n..." if folds else "...")
        messages = f"[{{\"role\": \"user\", \"content\": {user!r}}}]"
    if fmt is not None and fmt.reply_prefix:  # e.g. Qwen3's empty thinking block: trained as part of the prompt
        encode = (f"text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) + {fmt.reply_prefix!r}\n"
                  "ids = tokenizer(text, add_special_tokens=False, return_tensors=\"pt\")[\"input_ids\"]\n")
    else:
        encode = ("ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True, "
                  "return_tensors=\"pt\")[\"input_ids\"]\n")
    return (f"messages = {messages}  # as in training\n" + encode +
            f"print(tokenizer.decode(model.generate(ids, max_new_tokens=64{stop})[0, ids.shape[1]:], skip_special_tokens=True))\n")


def _base_folder(cfg: Config) -> str:
    """The folder (or hub id) the adapter's base weights load from: for a GGUF base, its dequantized
    copy, which is what the adapter was trained on."""
    from tunesmith.models import model_folder

    return model_folder(cfg.model)


def _card_header(run_dir: Path, cfg: Config, format: str, dtype: str) -> str:
    """Title, source model, method, data and training: every number as the run's files record it."""
    report, ev = load_json(run_dir / "data_report.json"), load_json(run_dir / "eval.json")
    result = load_json(run_dir / "train_result.json")
    lines = [f"# {run_dir.name}", "",
             f"Fine-tuned with tunesmith from **{resolve_model(cfg.model).display_name}** "
             f"(`{cfg.model}`). Export: {format}" + (f", {dtype}" if dtype != "-" else "") + ".", "",
             (f"- tasks: {', '.join(t.name for t in cfg.tasks)} (multi-task)" if cfg.tasks else f"- task: {cfg.task}")
             + f"; method: {cfg.method}"
             + (f" (LoRA r={cfg.lora.r}, alpha={cfg.lora.alpha}, target modules {cfg.lora.target_modules})" if cfg.method == "lora" else "")]
    if cfg.tasks:
        for t in cfg.tasks:
            c = task_config(cfg, t)
            lines.append(f"- data, task {t.name} ({c.task}): `{c.data.train}`"
                         + _rows_used((report.get("tasks") or {}).get(t.name) or {}, ((ev.get("tasks") or {}).get(t.name) or {})))
    else:
        lines.append(f"- data: `{cfg.data.train}`" + _rows_used(report, ev))
    if cfg.method == "prompt":
        lines.append(f"- no training: {cfg.prompt.shots} shots ({cfg.prompt.selection}) in the prompt")
    else:
        lr = train_settings(cfg).lr
        lines.append(f"- training: {result.get('steps', 0)} steps, lr {lr}, max_seq_len {cfg.train.max_seq_len}, "
                     f"seed {cfg.train.seed}")
    if cfg.data.system_prompt:
        lines.append(f"- system prompt: {cfg.data.system_prompt!r}")
    if ev.get("precision") and cfg.task == "classification" and cfg.eval.classify_by == "scoring":
        lines.append(f"- evaluated in {ev['precision']} by scoring each label and taking the likeliest; `tunesmith "
                     "serve` and `generate` answer by free generation (same precision), which can name another "
                     "label or none: the metrics describe label scoring, not free answers")
    elif ev.get("precision"):  # what the metrics describe: the model as served
        lines.append(f"- evaluated in {ev['precision']}, the precision `tunesmith serve` and `generate` answer in "
                     "(greedy answers there equal the evaluated ones)")
    return "\n".join(lines) + "\n"


def _rows_used(report: dict[str, Any], ev: dict[str, Any]) -> str:
    """`` (rows used of those prepared: train 8 of 24, validation 6 of 6, test 60 of 872)``: training
    and validation as encoded for training (``data.max_*_examples`` applied, rows with no target
    dropped), test as evaluated (eval.json); '' when the data was not prepared."""
    prepared = {s: v.get("rows") for s, v in (report.get("splits") or {}).items() if v.get("rows") is not None}
    used = {s: v.get("kept", v.get("examples")) for s, v in (report.get("encoded") or {}).items()}
    if ev.get("test_examples") is not None:
        used["test"] = ev["test_examples"]
    if not prepared:
        return ""
    parts = [f"{s} {used[s]:,} of {n:,}" if used.get(s) is not None else f"{s} {n:,} prepared" for s, n in prepared.items()]
    return " (rows used of those prepared: " + ", ".join(parts) + ")"


def _card_metrics(run_dir: Path) -> str:
    ev = load_json(run_dir / "eval.json")
    if not ev.get("tuned"):
        return (f"\n## Measured\n\nNot evaluated yet: `{command('eval', run_dir)}` measures it against the base "
                "model on the test split, then export again to put the results here.\n")
    out = ["", f"## Measured on {ev.get('test_examples', '?')} held-out test examples", "", _metric_table(ev)]
    for name, task in (ev.get("tasks") or {}).items():  # a multi-task run: the macro average above, each task here
        out += ["", f"### {name} ({task.get('test_examples', '?')} test examples)", "", _metric_table(task)]
    return "\n".join(out) + "\n"


def _metric_table(ev: dict[str, Any]) -> str:
    """Base and tuned values of every metric in ``ev`` (one evaluation's results), tuned with its 95% interval."""
    rows = ["| metric | base | tuned [95% CI] |", "|---|---|---|"]
    for k, v in (ev.get("tuned") or {}).items():
        if not isinstance(v, (int, float)) or isinstance(v, bool) or k in ("seconds", "examples_per_s", "tokens_per_s"):
            continue
        ci = (ev["tuned"].get("ci") or {}).get(k)
        base = (ev.get("base") or {}).get(k)
        rows.append(f"| {metric_label(k)} | {base:.4f} |" if isinstance(base, (int, float)) else f"| {metric_label(k)} | - |")
        rows[-1] += f" {v:.4f}" + (f" [{ci[0]:.4f}, {ci[1]:.4f}]" if ci else "") + " |"
    return "\n".join(rows)


def verify_prompts(run: LoadedRun, n: int = 5) -> list[list[int]]:
    """Token ids of up to ``n`` test prompts of the run (its prepared test split), chat-rendered as
    in training; a few plain questions when the split cannot be read."""
    try:
        from tunesmith.data.prepare import load_splits

        if run.config.task == "preference":  # the pairs' prompts
            from tunesmith.data.preference import load_preference_splits

            conversations = [ex.prompt for ex in load_preference_splits(run.config, run.dir / "data").test[:n]]
        else:
            test = load_splits(run.config, run.dir / "data", run.tokenizer).test[:n]
            conversations = [ex.messages[: max(i for i, m in enumerate(ex.messages) if m["role"] == "assistant")]
                             for ex in test if any(m["role"] == "assistant" for m in ex.messages)]
    except Exception:  # the data moved away: any prompt shows whether two models agree
        conversations = []
    if not conversations:
        conversations = [[{"role": "user", "content": q}] for q in
                         ("What is the capital of France?", "Write one sentence about the sea.", "Say hello.")]
    context = context_length(run.model, run.tokenizer) - 1  # the prompt rule of every answering path
    return [encode_prompt(run.tokenizer, c, context) for c in conversations[:n]]


def verify_export(run: LoadedRun, exported: Exported) -> dict[str, Any]:
    """Load ``exported`` in its consumer and compare its next-token logits on the run's test prompts
    with the in-memory model's. Returns {consumer, prompts, max_abs_diff, relative_diff, tolerance,
    argmax_agree}; raises ExportError when the relative difference exceeds ``TOLERANCE[dtype]``."""
    prompts = verify_prompts(run)
    if exported.format == "gguf":
        from tunesmith.deploy import gguf_export

        gguf_file = next(exported.path.glob("*.gguf"))
        texts = [run.tokenizer.decode(p) for p in prompts]  # rendered prompts, taken as they are
        result = gguf_export.verify_gguf(gguf_file, run.model, run.tokenizer, texts)
        if "error" in result:  # llama.cpp crashed or refused the file: the export stays, unverified
            raise ExportError(f"verification failed: {result['error']}. The export is written ({exported.path}) but "
                              "unverified" + _crash_advice(result["error"], exported.dtype))
        result["tolerance"] = limit = TOLERANCE_GGUF[exported.dtype]
        result["max_new_tokens"] = 8  # agree_all_tokens and stopped_at_end_of_turn count within these tokens
        if result.get("relative_diff") is None or result["relative_diff"] > limit:
            raise ExportError(f"verification failed: {result['consumer']}'s next-token logits differ from the tuned "
                              f"model's by {result.get('relative_diff')} of their scale (tolerance for {exported.dtype}: "
                              f"{limit:.0e}); {result}")
        return result
    reference = load_run(run.dir, merge=False)  # the tuned model as trained, fp32, adapters unmerged
    if exported.format == "adapter":
        import peft
        from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

        auto = AutoModelForSequenceClassification if run.kind == "head" else AutoModelForCausalLM
        kwargs = {"num_labels": len(run.config.data.labels)} if run.kind == "head" else {}
        base = auto.from_pretrained(_base_folder(run.config), dtype=torch.float32, **kwargs)
        if run.kind == "head":
            base.config.pad_token_id = run.tokenizer.pad_token_id
        consumer = peft.PeftModel.from_pretrained(base, str(exported.path), torch_dtype=torch.float32).eval()
        name = f"peft {peft.__version__}"
    else:
        import transformers
        from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

        auto = AutoModelForSequenceClassification if run.kind == "head" else AutoModelForCausalLM
        consumer = auto.from_pretrained(str(exported.path), dtype=DTYPES[exported.dtype]).eval()
        name = f"transformers {transformers.__version__}"
    return _compare_logits(reference.model, consumer, prompts, exported.dtype, name)


def _crash_advice(error: str, dtype: str) -> str:
    """What to do when llama.cpp crashed on an export: AMX builds crash on q8_0 (llama.cpp issue 20824)."""
    if "crashed" not in error:
        return ""
    return ("; a llama.cpp built with Intel AMX crashes this way on q8_0 files (llama.cpp issue 20824): rebuild "
            "llama-cpp-python without AMX (`make llama` does: CFLAGS/CXXFLAGS -mno-amx-tile -mno-amx-int8 -mno-amx-bf16)"
            + (", or export --dtype f16" if dtype == "q8_0" else ""))


@torch.no_grad()
def _compare_logits(reference: torch.nn.Module, consumer: torch.nn.Module, prompts: list[list[int]],
                    dtype: str, consumer_name: str) -> dict[str, Any]:
    worst, scale, agree = 0.0, 0.0, 0
    for ids in prompts:
        x = torch.tensor([ids], device=next(reference.parameters()).device)
        want, got = (_last(m(input_ids=x).logits) for m in (reference, consumer.to(x.device)))
        worst = max(worst, float((want - got).abs().max()))
        scale = max(scale, float(want.abs().max()))
        agree += int(want.argmax() == got.argmax())
    relative = worst / max(scale, 1e-12)
    result = {"consumer": consumer_name, "prompts": len(prompts), "max_abs_diff": worst, "relative_diff": relative,
              "tolerance": TOLERANCE[dtype], "argmax_agree": agree}
    if relative > TOLERANCE[dtype]:
        raise ExportError(f"verification failed: the export's next-token logits differ from the tuned model's by "
                          f"{relative:.2e} of their scale (tolerance for {dtype}: {TOLERANCE[dtype]:.0e}); {result}")
    return result


def _last(logits: torch.Tensor) -> torch.Tensor:
    """The logits that decide the answer: (B, T, V) -> the next token's (V,); a head's (B, L) -> (L,)."""
    return (logits[0, -1] if logits.dim() == 3 else logits[0]).float()


def describe(result: Exported) -> str:
    """One paragraph for the terminal: where the export is and what the verification found."""
    text = f"exported {result.format}" + (f" ({result.dtype})" if result.dtype != "-" else "") + f" to {result.path}: {', '.join(result.files)}"
    text += "".join(f"\nnote: {n}" for n in result.notes)
    if result.verify:
        text += "\nverified: " + json.dumps({k: v for k, v in result.verify.items() if k not in ("details", "note")})
        if result.verify.get("note"):
            text += "\nnote: " + result.verify["note"]
    return text
