"""Loading finished runs for inference: one function for export, serving and batch generation.

A run folder (``runs/<name>/``) holds its resolved ``config.yaml`` and its artifact: ``adapter/``
(LoRA, a PEFT folder), ``model/`` (full fine-tuning or a classification head, an HF folder) or
``prompt/prompt.json`` (the prompt method). The tokenizer is always made ready exactly as in
training (``models.ready_tokenizer``: ``data.chat_template`` applied), so the chat template and the
stop tokens used for serving are the ones the model was trained with.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tunesmith import methods, runtime
from tunesmith.config import Config
from tunesmith.runtime.commands import command
from tunesmith.models import load_classifier, load_model, resolve_model
from tunesmith.models import ready_tokenizer, uses_head
from tunesmith.runs import RunError
from tunesmith.runs.folder import run_config

KINDS = ("lora", "full", "head", "prompt")


@dataclass
class LoadedRun:
    """A finished run ready for inference (eval mode, on ``runtime.device()``).

    ``model``: for ``kind == "lora"`` a ``peft.PeftModel`` (adapter named ``"default"``) unless
    loaded with ``merge=True`` (then a plain merged model); for ``full``/``prompt`` a causal LM
    (``prompt``: the base model); for ``head`` a sequence classifier.
    """

    name: str
    dir: Path
    config: Config
    kind: str  # one of KINDS
    model: torch.nn.Module
    tokenizer: Any


def run_kind(cfg: Config) -> str:
    """``lora``, ``full``, ``head`` (a classification head, trained in full or beside LoRA) or ``prompt``."""
    if uses_head(cfg):
        return "head"
    return cfg.method


def load_run(run_dir: str | Path, merge: bool = False, dtype: torch.dtype = torch.float32) -> LoadedRun:
    """Load a finished run's tuned model and its tokenizer, ready as in training.

    ``merge``: fold a LoRA adapter into the base weights (PEFT ``merge_and_unload``). ``dtype``:
    the weights' dtype (float32 by default, as trained). Raises RunError for an unfinished run,
    ModelError when the base model cannot be loaded.
    """
    run_dir = Path(run_dir)
    cfg = run_config(run_dir)
    kind = run_kind(cfg)
    artifact = run_dir / methods.METHODS[cfg.method].ARTIFACT
    labels = list(cfg.data.labels)
    if kind == "head":
        if cfg.method == "lora":
            base, tokenizer = load_classifier(cfg.model, labels, cfg.train.seed, dtype=dtype)
            model = methods.lora.load(base, artifact)
            model = model.merge_and_unload() if merge else model
        else:
            model, tokenizer = load_classifier(str(artifact), labels, dtype=dtype)
    elif kind == "lora":
        base, tokenizer = load_model(cfg.model, dtype=dtype)
        model = methods.lora.load(base, artifact)
        model = model.merge_and_unload() if merge else model
    elif kind == "full":
        model, tokenizer = load_model(str(artifact), dtype=dtype)
    else:
        model, tokenizer = load_model(cfg.model, dtype=dtype)
    ready_tokenizer(tokenizer, cfg)
    model.to(runtime.device()).eval()
    return LoadedRun(run_dir.name, run_dir, cfg, kind, model, tokenizer)


@dataclass
class ServedGroup:
    """Models that share one set of weights in memory: a base model and any number of LoRA
    adapters on it (``names`` maps each served model name to its PEFT adapter name, or None for
    the base itself), or one fully fine-tuned model (``names == {run_name: None}``)."""

    model: torch.nn.Module  # peft.PeftModel when adapters are present, else the plain model
    tokenizer: Any
    names: dict[str, str | None] = field(default_factory=dict)
    base: str = ""  # the config's ``model:`` value these weights came from
    runs: dict[str, Path] = field(default_factory=dict)  # served name -> run folder (not for the base)


def load_for_serving(run_dirs: list[str | Path], base: str | None = None) -> list[ServedGroup]:
    """Load runs (and optionally a base model) for serving, sharing weights wherever possible.

    LoRA runs on the same base model and chat template become adapters of one ``PeftModel``,
    each under its run's name; the base model is served too under its display name (e.g.
    ``SmolLM2-135M-Instruct``; its ``model:`` value, e.g. ``gemma3-270m``, is accepted too). Runs on
    one base with different chat templates get one copy of the base's weights per template (the
    base served once). Full fine-tuning runs are served each as its own model. ``base``
    (a config ``model:`` value) serves a base model with no run, or names the base of the LoRA
    runs. Raises RunError for classification-head runs (nothing to generate), prompt runs, two
    runs with the same name, or a run that is not finished.
    """
    import peft

    groups: list[ServedGroup] = []
    lora: dict[tuple[str, str | None], list[tuple[str, Path]]] = {}
    seen: set[str] = set()
    for d in map(Path, run_dirs):
        cfg = run_config(d)
        kind, name = run_kind(cfg), d.name
        if name in seen:
            raise RunError(f"two runs are both named {name!r}: serve runs with different folder names")
        seen.add(name)
        if kind == "head":
            raise RunError(f"{d}: a classification-head run predicts labels, it does not generate text; "
                           f"serve a run trained with classifier: lm, or export it with {command('export', d, '--format', 'hf')}")
        if kind == "prompt":
            raise RunError(f"{d}: a prompt-method run has no weights of its own; serve its base model "
                           f"(--model {cfg.model}) and send the prompt from {command('export', d, '--format', 'prompt')}")
        if kind == "full":
            loaded = load_run(d)
            groups.append(ServedGroup(loaded.model, loaded.tokenizer, {name: None}, cfg.model, {name: d}))
        else:
            lora.setdefault((cfg.model, cfg.data.chat_template), []).append((name, d))
    if base is not None and not any(m == base for m, _ in lora):
        lora.setdefault((base, None), [])
    bases_served: set[str] = set()
    for (spec, template), runs in lora.items():
        model, tokenizer = load_model(spec)
        if runs:
            ready_tokenizer(tokenizer, run_config(runs[0][1]))
        else:
            from tunesmith.data.render import set_chat_template
            set_chat_template(tokenizer, template)
        base_name = resolve_model(spec).display_name
        # runs on one base with different chat templates (alpaca and a task: text run's none) get a
        # copy of the base each; the base itself is served once, with the first one's template
        names: dict[str, str | None] = {} if spec in bases_served else {base_name: None}
        bases_served.add(spec)
        paths: dict[str, Path] = {}
        for i, (name, d) in enumerate(runs):
            artifact = str(d / methods.lora.ARTIFACT)
            if i == 0:
                model = peft.PeftModel.from_pretrained(model, artifact, adapter_name=name)
            else:
                model.load_adapter(artifact, adapter_name=name)
            names[name], paths[name] = name, d
        model.to(runtime.device()).eval()
        groups.append(ServedGroup(model, tokenizer, names, spec, paths))
    clash = [n for g in groups for n in g.names]
    dupes = sorted({n for n in clash if clash.count(n) > 1})
    if dupes:
        raise RunError(f"served model names clash: {', '.join(dupes)} (a run is named like a base model?)")
    return groups
