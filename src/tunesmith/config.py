"""The run configuration: typed dataclasses are the schema.

A config is read from YAML, patched with dotted ``--set a.b=value`` overrides, then checked
field by field against the dataclasses. Every problem is collected and reported at once,
each with its dotted key; an unknown key gets the closest valid one as a suggestion.
"""

from __future__ import annotations

from tunesmith.errors import TunesmithError

import dataclasses
from collections.abc import Callable
import difflib
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml

TASKS = ("classification", "instruction", "chat", "text", "preference")
# headline metrics (eval.metric) and the tasks that have them
METRICS = {"accuracy": ("classification",), "f1": ("classification",), "rougeL": ("instruction", "chat"),
           "rouge1": ("instruction", "chat"), "rouge2": ("instruction", "chat"), "bleu": ("instruction", "chat"),
           "chrf": ("instruction", "chat"), "exact_match": ("instruction", "chat"),
           "perplexity": ("classification", "instruction", "chat", "text"),
           "preference_accuracy": ("preference",)}
TRUNCATION_SIDES = ("middle", "left", "right")
CHAT_TEMPLATES = ("chatml", "alpaca", "gemma")  # named templates (data.chat_template); the Jinja lives in data/render.py
ROLES = ("text", "label", "instruction", "input", "output", "prompt", "completion", "messages", "chosen",
         "rejected")  # data.columns keys
CHAT_ROLES = ("system", "user", "assistant")  # data.extract.turns values
SPLIT_KINDS = ("random", "ordered")  # data.prepare.split
METHODS = ("lora", "full", "prompt")
TRACKERS = ("tensorboard", "mlflow")  # report_to (runs.trackers writes them)
PRECISIONS = ("auto", "bf16", "fp32")
STRATEGIES = ("ddp", "fsdp")  # train.strategy under torchrun: DistributedDataParallel | FSDP2 fully_shard
FORMATS = ("auto", "jsonl", "json", "csv", "tsv", "parquet", "label_text", "text", "folder", "hf")
LAYOUTS = ("text_label", "instruction", "prompt_completion", "chat", "text")
GENERAL = "general"  # the shipped general set (Wikipedia text, general instructions): eval.general, replay.data
INSTRUCTIONS = "instructions"  # replay.data: the shipped everyday instructions the check does not score, base-answered
ANCHORS = ("none", "l2sp", "ewc")
PREFERENCE_OBJECTIVES = ("dpo", "ipo", "simpo", "orpo", "kto")  # preference.objective (training/preference.py)
REFERENCES = ("precomputed", "adapter")  # preference.reference
DISTILL_ON = ("replay", "prompts", "both")


class _Loader(yaml.SafeLoader):
    """YAML 1.2 booleans: only true/false are booleans. YAML 1.1 (PyYAML's default) also reads
    yes/no/on/off as booleans, which turns a label map {yes: spam, no: ham} into {True, False}."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))


def read_yaml(text: str) -> Any:
    """YAML as tunesmith reads it (YAML 1.2 booleans, see ``_Loader``)."""
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


def _override_value(value: str) -> Any:
    """The value of ``--set key=value``, read as YAML; characters YAML gives a meaning (``,`` ``#``
    ``|`` ``&`` ...) standing alone are taken as the text they are, as a user typing them means."""
    text = value.strip()
    if not text:
        return None
    try:
        parsed = read_yaml(text)
    except yaml.YAMLError:
        return text
    if (parsed is None and text not in ("null", "Null", "NULL", "~")) or (parsed == "" and text not in ('""', "''")):
        return text  # "#" (a comment) or "|" (a block scalar): the character itself
    return parsed


class ConfigError(TunesmithError, ValueError):
    """A config has one or more problems; ``problems`` lists each as 'key: message'."""

    def __init__(self, problems: list[str], source: str = "config") -> None:
        self.problems = problems
        self.source = source
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{source}: {len(problems)} problem(s)\n{lines}")


@dataclass
class PrepareConfig:
    """What ``tunesmith prepare`` does to the data before training."""

    clean: bool = True  # Unicode/mojibake repair, whitespace, junk markers (and HTML)
    strip_html: bool = True  # from prompts (inputs); code spans and text about HTML are kept
    strip_html_answers: bool = False  # also from answers (outputs, assistant turns): off, an answer may be HTML
    junk_markers: list[str] = field(default_factory=lambda: ["<|endoftext|>"])
    pii: list[str] = field(default_factory=list)  # kinds to redact: email, phone, credit_card, ip_address, iban, url
    pii_region: str = "US"  # where phone numbers written without +country are from (e.g. GB)
    labeling_functions: str | None = None  # a Python file of @labeling_function's for unlabeled rows
    label_model: str = "dawid_skene"  # or: majority
    weak_label_all: bool = False  # relabel labeled train/validation rows too (their labels become the gold slice)
    min_tokens: int = 1  # in tokens of the chosen model
    max_tokens: int | None = None
    dedup: str = "near"  # none | exact | near
    dedup_threshold: float = 0.85  # Jaccard similarity for near duplicates
    filter_test: bool = False  # de-duplication and length filters drop test rows too (default: report them, keep them)
    test_size: float = 0.0  # fraction (<1) or count (>=1) of train held out as a test split when data.test is not given
    split: str = "random"  # random (seeded draw) | ordered (validation and test are the newest rows: time-ordered data)
    order_by: str | None = None  # split: ordered: a column of dates or numbers that orders the rows (else file order, newest last)
    stratify: bool = True  # classification splits keep the label shares (random splits)
    group_by: str | None = None  # a column whose groups never span two splits (random splits)


@dataclass
class ExtractConfig:
    """Fields marked inside one text (a file of a folder, or a column), split into columns of their own:
    by a regular expression's named groups, or by marker lines (``@subject``) and turn markers (``Human:``)."""

    column: str = "text"  # the column holding the marked text (a folder's files and plain-text lines are read into text)
    regex: str | None = None  # a Python regular expression searched in the text: each named group becomes a column
    markers: dict[str, str] = field(default_factory=dict)  # marker at a line's start -> the field the text after it becomes
    before: str | None = None  # the field the text before the first marker becomes (e.g. an e-mail's body)
    turns: dict[str, str] = field(default_factory=dict)  # marker at a line's start -> chat role: repeated, they become messages


@dataclass
class DataConfig:
    """Where the data is and how its columns map onto the task."""

    train: str = ""
    validation: str | None = None  # held out from train when omitted (see validation_size)
    test: str | None = None  # evaluation split; the validation split when omitted
    format: str = "auto"  # by file extension (or content) when auto
    delimiter: str | None = None  # CSV delimiter; sniffed from the file when omitted
    encoding: str | None = None  # text encoding; UTF-8, else detected (and reported), when omitted
    layout: str | None = None  # detected from the column names when omitted
    columns: dict[str, str] = field(default_factory=dict)  # role -> column, "{template} of {columns}", or constant text
    validation_columns: dict[str, str] = field(default_factory=dict)  # overrides of columns for the validation file
    test_columns: dict[str, str] = field(default_factory=dict)  # overrides of columns for the test file
    references: list[str] = field(default_factory=list)  # extra gold answers (columns/templates) for generation metrics
    extract: ExtractConfig | None = None  # fields marked inside a text (regex groups or marker lines) become columns
    skip_bad_rows: bool = False  # skip and count bad records instead of stopping
    labels: dict[str, str] = field(default_factory=dict)  # raw label -> target words
    system_prompt: str | None = None
    chat_template: str | None = None  # for models without one (or to replace it): a Jinja template, or chatml | alpaca | gemma
    truncation_side: str = "middle"  # an over-long prompt loses its middle | left (start) | right (end); the answer is kept
    validation_size: float = 0.1  # fraction (<1) or count (>=1) of train held out
    max_train_examples: int | None = None
    max_validation_examples: int | None = None
    max_test_examples: int | None = None
    prepare: PrepareConfig = field(default_factory=PrepareConfig)


@dataclass
class ApiConfig:
    """An OpenAI-compatible chat-completions endpoint to prompt instead of the local model."""

    base_url: str | None = None  # e.g. https://api.openai.com/v1 or http://localhost:8000/v1; unset = local model
    model: str = ""  # the endpoint's model name
    api_key_env: str = "OPENAI_API_KEY"  # environment variable holding the key (unset: a placeholder key is sent)
    max_concurrency: int = 4  # requests in flight
    timeout_s: float = 60.0
    max_retries: int = 4  # on 429 and 5xx, with exponential backoff (Retry-After honoured)


@dataclass
class PromptConfig:
    """The prompt-engineering method: no training; ``shots`` training examples go into the prompt."""

    shots: int = 0  # 0 = zero-shot (system prompt only)
    selection: str = "random"  # random (the same shots for every question) | similar (TF-IDF nearest, per question)
    api: ApiConfig = field(default_factory=ApiConfig)  # prompt a remote model instead of the local one


@dataclass
class FullConfig:
    """Full fine-tuning settings that differ from the adapter methods'."""

    lr: float | None = None  # replaces train.lr for method full (all weights move: usually 10x smaller)


@dataclass
class LoraConfig:
    """LoRA adapter settings (passed to PEFT's LoraConfig)."""

    r: int = 16
    alpha: int = 32
    dropout: float = 0.0  # PEFT's default; any dropout costs ~25% of a CPU step (random masks)
    target_modules: Union[str, list[str]] = "all-linear"


@dataclass
class EarlyStoppingConfig:
    patience: int = 3  # evaluations without improvement before stopping; 0 disables
    min_delta: float = 0.0  # improvement in validation loss that counts


@dataclass
class TrainConfig:
    epochs: int = 1
    max_steps: int | None = None  # optimizer steps; overrides epochs when set
    batch_size: int = 8  # examples per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    batch_tokens: int = 0  # at most this many (padded) tokens per micro-batch, splitting steps of long examples; 0 = no cap
    group_by_length: bool = True  # batch examples of similar length together (less padding)
    packing: bool = False  # pack each micro-batch's examples into rows of max_seq_len, no padding
    gradient_checkpointing: bool = False  # recompute activations in backward: far less memory, ~30% slower steps
    lr: float = 2.0e-4
    weight_decay: float = 0.01
    warmup_steps: int = 0
    max_grad_norm: float = 1.0
    max_seq_len: int = 512
    dropout: float | None = None  # sets the model's attention dropout when given
    eval_every: int = 50  # optimizer steps between validations (and at each epoch end)
    save_every: int = 0  # optimizer steps between checkpoints; 0 = at each validation
    keep_checkpoints: int = 2
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)
    seed: int = 0
    precision: str = "auto"  # bf16 autocast where the CPU/GPU supports it, else fp32
    num_threads: int | None = None
    strategy: str = "ddp"  # several processes (torchrun): ddp (a whole copy each) | fsdp (FSDP2: parameters, gradients and optimizer state sharded)


@dataclass
class EvalConfig:
    metric: str = "auto"  # headline metric for compare, p-values, verdict; auto: accuracy | rougeL | perplexity by task
    batch_size: int = 16
    compare_with_base: bool = True
    max_new_tokens: int = 64  # for generation tasks (ROUGE), and classify_by: generation
    label_scoring: str = "sum"  # sum | mean: label log-likelihood summed, or per token
    classify_by: str = "scoring"  # scoring | generation: score each label, or parse a free answer
    bootstrap_resamples: int = 1000  # for 95% intervals and paired p-values
    latency_examples: int = 32  # tuned model answers this many test examples one at a time (ms each); 0 = skip
    general: str = GENERAL  # forgetting check: general (shipped set) | a text/JSONL file of general text | none
    general_tokens: int = 2048  # general-text tokens scored per model (perplexity); caps the check's cost
    general_instructions: int = 16  # general instructions answered greedily by base and tuned (0: skip agreement, KL)
    general_max_new_tokens: int = 48  # reply length for those instructions
    previous_tasks: bool = True  # a run started from another run (model: runs/X) is also tested on that run's tasks


@dataclass
class ReplayConfig:
    """Replay: general data mixed into training (plain language modelling on those rows)."""

    data: str = GENERAL  # general (shipped Wikipedia text) | instructions (shipped, base-answered) | a file
    ratio: float = 0.0  # share of the training mix that is replay, in [0, 1): by examples or by target tokens; 0 = off
    by: str = "examples"  # examples | tokens
    replies: str = "base"  # instructions/conversations: base (the base model's greedy replies) | data (the file's own)
    max_new_tokens: int = 128  # replies: base: the longest reply the base model writes


@dataclass
class DistillConfig:
    """Distillation: a KL term pulling the student's next-token distributions toward a teacher's."""

    weight: float = 0.0  # 0 = off; loss = task loss + weight * KL (per token)
    teacher: str = "base"  # base (LoRA: adapters disabled; full: a frozen copy) | a run folder | a model path or id
    temperature: float = 1.0  # both distributions softened by T; the KL is scaled by T^2 (Hinton et al. 2015)
    direction: str = "forward"  # forward: KL(teacher || student) | reverse: KL(student || teacher)
    on: str = "replay"  # replay rows | prompts (task rows' non-target positions) | both


@dataclass
class AnchorConfig:
    """Weight anchoring: a penalty on trainable weights moving from where training started."""

    method: str = "none"  # none | l2sp (Li et al. 2018) | ewc (diagonal Fisher, Kirkpatrick et al. 2017)
    strength: float = 0.0  # loss += strength / 2 * sum_i F_i (w_i - w0_i)^2 (F_i = 1 for l2sp)
    fisher_examples: int = 64  # ewc: general-text windows the diagonal Fisher is estimated on
    fisher_data: str = GENERAL  # ewc: general | a file of general text


@dataclass
class PreferenceConfig:
    """``task: preference``: how the pairs (or thumbs up/down) train the model (training/preference.py has the formulas)."""

    objective: str = "dpo"  # dpo | ipo | simpo (no reference) | orpo (no reference) | kto (unpaired rows)
    beta: float = 0.1  # strength: DPO/IPO/KTO's KL weight, SimPO's reward scale (use ~2), ORPO's odds-ratio weight
    label_smoothing: float = 0.0  # dpo/simpo: the share of labels assumed flipped (cDPO)
    sft_weight: float = 0.0  # adds this times the chosen answers' token cross-entropy (TRL's rpo_alpha)
    simpo_gamma: float = 0.5  # simpo: the target reward margin
    desirable_weight: float = 1.0  # kto: weight of the good answers' loss
    undesirable_weight: float = 1.0  # kto: weight of the bad answers' loss
    reference: str = "precomputed"  # precomputed (once, saved with the run) | adapter (lora: each step, adapters off)
    max_prompt_len: int | None = None  # tokens of prompt kept when a pair is too long (default: max_seq_len / 2)
    length_examples: int = 32  # test prompts answered by base and tuned (greedy) to compare answer lengths; 0 = skip


@dataclass
class TaskConfig:
    """One task of a multi-task run: its own data, task type and weight (``tasks:``)."""

    name: str = ""
    config: str | None = None  # a single-task config file to take task, data and eval.metric from
    task: str | None = None
    data: DataConfig | None = None
    metric: str = "auto"
    weight: float = 1.0  # sampling weight (mixing.by: weight)


@dataclass
class MixingConfig:
    """How a multi-task run samples its tasks."""

    by: str = "weight"  # weight: shares proportional to tasks[].weight | temperature: to size^(1/T) | size: as the data
    temperature: float = 2.0  # for by: temperature (1 = as the data; large = uniform)


@dataclass
class EstimateConfig:
    """What a run will cost (``tunesmith estimate``; ``train`` prints it at start)."""

    price_per_hour: float = 0.0  # what an hour of this machine costs (any currency); 0 = no cost shown
    device_tflops: float | None = None  # a device's sustained training TFLOP/s: predict time from it instead of calibrating
    calibrate_seconds: float = 20.0  # tunesmith estimate: seconds of real training steps timed on this machine
    device_memory_gib: float | None = None  # check the predicted peak against this device's memory (with device_tflops)


@dataclass
class SearchParam:
    """One searched setting: a range (``low``..``high``, ``log`` scale, integer keys in ``step``s) or ``choices``."""

    low: float | None = None
    high: float | None = None
    log: bool = False  # sample on a log scale (learning rates, weight decay)
    step: float | None = None  # a grid within the range (integers: 1 unless given)
    choices: list[float] | None = None  # instead of a range: one of these values


@dataclass
class SearchConfig:
    """``tunesmith search``: Optuna's TPE sampler over ``params``; trials are ordinary runs."""

    trials: int = 12  # trials to run in all (a resumed search counts the ones done)
    params: dict[str, SearchParam] = field(default_factory=dict)  # dotted config key -> its range, e.g. train.lr
    pruner: str = "median"  # median (stop a trial whose validation loss is worse than the median so far) | none
    startup_trials: int = 2  # trials that are never pruned (the median needs a few to compare with)
    seed: int = 0  # the sampler's seed: the same search picks the same settings
    include_config: bool = True  # trial 0 runs the config's own values (when inside the ranges): the baseline to beat


@dataclass
class MlflowConfig:
    """Where ``report_to: [mlflow]`` writes (``runs.trackers``)."""

    tracking_uri: str | None = None  # default: sqlite:///<output_dir>/mlflow.db (artifacts in <output_dir>/mlartifacts)
    experiment: str = "tunesmith"


@dataclass
class Config:
    """One run: a base model, data, a method and how to train and evaluate."""

    name: str = "run"
    model: str = "default"  # "default" | HF folder | hub id | .gguf file
    task: str = "instruction"
    method: str = "lora"
    classifier: str = "auto"  # classification: lm (label scoring) | head (sequence-classification head) | auto (head for encoders)
    output_dir: str = "runs"
    data: DataConfig = field(default_factory=DataConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)
    full: FullConfig = field(default_factory=FullConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    replay: ReplayConfig = field(default_factory=ReplayConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    anchor: AnchorConfig = field(default_factory=AnchorConfig)
    preference: PreferenceConfig = field(default_factory=PreferenceConfig)
    tasks: list[TaskConfig] = field(default_factory=list)  # several tasks trained together (then data/task per task)
    mixing: MixingConfig = field(default_factory=MixingConfig)
    estimate: EstimateConfig = field(default_factory=EstimateConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    report_to: list[str] = field(default_factory=list)  # trackers to write the run to: tensorboard, mlflow
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name


# ---------------------------------------------------------------- reading and checking


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    data: dict[str, Any] | None = None,
) -> Config:
    """Read a YAML config (or a dict), apply ``a.b=value`` overrides, validate, return it.

    Relative data paths are resolved against the config file's folder when they exist there.
    Raises ConfigError listing every problem found.
    """
    source = str(path) if path is not None else "config"
    raw: dict[str, Any] = {}
    problems: list[str] = []
    if path is not None:
        try:
            loaded = read_yaml(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError([f"file not found: {path}"], source) from None
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
            what = " ".join(str(getattr(e, "problem", None) or e).split())
            raise ConfigError([f"not valid YAML: {where}{what}"], source) from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(["the top level must be a mapping of keys to values"], source)
        raw = loaded or {}
    if data:
        raw = _deep_merge(raw, data)
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            problems.append(f"--set {item!r}: expected KEY=VALUE, e.g. train.lr=2e-4")
            continue
        _set_dotted(raw, key.strip(), _override_value(value))
    base = Path(path).parent if path is not None else Path.cwd()
    if isinstance(raw.get("report_to"), str):  # report_to: tensorboard means [tensorboard]
        raw["report_to"] = [raw["report_to"]]
    if isinstance(raw.get("tasks"), list):
        raw["tasks"] = [_task_from_file(entry, i, base, problems) for i, entry in enumerate(raw["tasks"])]
    cfg = _build(Config, raw, "", problems)
    problems += validate(cfg)
    if problems:
        raise ConfigError(_blame_overrides(problems, overrides or []), source)
    typed = {item.partition("=")[0].strip() for item in overrides or []}
    _resolve_data_paths(cfg, base, typed)
    problems = _general_files(cfg)  # found now, not after training
    if problems:
        raise ConfigError(problems, source)
    return cfg


def _blame_overrides(problems: list[str], overrides: list[str]) -> list[str]:
    """Each problem about a key given on the command line says so: ``... (from --set KEY=VALUE)``,
    so that an error is not looked for in the file."""
    given = {item.partition("=")[0].strip(): item for item in overrides if "=" in item}
    return [f"{p} (from --set {given[k]})" if (k := p.partition(":")[0].strip()) in given else p for p in problems]


def _general_files(cfg: Config) -> list[str]:
    """Problems with the general-text files (eval.general, replay.data, anchor.fisher_data): missing
    files, and replaying or estimating on the very text the forgetting check scores."""
    p: list[str] = []
    used = {"eval.general": cfg.eval.general,
            "replay.data": cfg.replay.data if cfg.replay.ratio > 0 else None,
            "anchor.fisher_data": cfg.anchor.fisher_data if cfg.anchor.method == "ewc" else None}
    for key, value in used.items():
        if value and value not in (GENERAL, INSTRUCTIONS, "none") and not Path(value).exists():
            p.append(f"{key}: file not found: {value}")
    for key in ("replay.data", "anchor.fisher_data"):
        if used[key] and used[key] not in (GENERAL, INSTRUCTIONS, "none") and used[key] == used["eval.general"]:
            p.append(f"{key}: the same file as eval.general ({used[key]}): the forgetting check would score text the run "
                     "trained on; give the check other text (or leave both at general: they are kept apart)")
    return p


def _task_from_file(entry: Any, i: int, base: Path, problems: list[str]) -> Any:
    """A ``tasks[i]`` entry with ``config: FILE`` filled from that single-task config: its task,
    data (paths resolved as that file resolves them) and eval.metric. Keys the entry gives itself
    win; its ``data:`` is merged key by key over the file's. The file path is relative to ``base``
    (the multi-task config's folder). A missing file is a problem, except in a saved run config
    (the entry already holds task and data). Problems go to ``problems`` as ``tasks[i].config: ...``.
    """
    if not isinstance(entry, dict) or not entry.get("config"):
        return entry
    where = f"tasks[{i}].config"
    if not isinstance(entry["config"], str):
        problems.append(f"{where}: expected a path to a single-task config file, got {entry['config']!r}")
        return entry
    file = Path(entry["config"]).expanduser()
    file = file if file.is_absolute() else base / file
    if not file.is_file():
        if not (entry.get("task") and isinstance(entry.get("data"), dict)):
            problems.append(f"{where}: file not found: {file}")
        return entry
    try:
        sub = load_config(file)
    except ConfigError as e:
        problems += [f"{where} ({file.name}): {p}" for p in e.problems]
        return entry
    if sub.tasks:
        problems.append(f"{where}: {file.name} is itself a multi-task config; point at a single-task config")
        return entry
    own_data = entry.get("data") if isinstance(entry.get("data"), dict) else {}
    return {"task": sub.task, "metric": sub.eval.metric, **entry, "config": str(file.resolve()),
            "data": _deep_merge(to_dict(sub)["data"], own_data)}


def train_settings(cfg: Config) -> TrainConfig:
    """The training settings the run's method uses: ``train``, with ``full.lr`` in place of
    ``train.lr`` for method ``full`` when it is set (all weights move: usually a 10x smaller rate)."""
    if cfg.method == "full" and cfg.full.lr is not None:
        return dataclasses.replace(cfg.train, lr=cfg.full.lr)
    return cfg.train


def task_config(cfg: Config, t: TaskConfig) -> Config:
    """The single-task config of task ``t`` of multi-task run ``cfg``: its task type, data and
    metric, everything else (model, method, train, eval settings) from ``cfg``."""
    return dataclasses.replace(cfg, name=t.name, task=t.task or cfg.task, data=t.data or DataConfig(),
                               eval=dataclasses.replace(cfg.eval, metric=t.metric), tasks=[])


def _checker() -> tuple[list[str], Callable[[bool, str], None]]:
    """A list of problems and ``check(ok, message)``, which adds the message when not ok."""
    problems: list[str] = []

    def check(ok: bool, message: str) -> None:
        if not ok:
            problems.append(message)

    return problems, check


def validate(cfg: Config) -> list[str]:
    """Check values (types are checked on reading); return every problem found."""
    p, check = _checker()
    check(cfg.task in TASKS, f"task: {cfg.task!r} is not one of {', '.join(TASKS)}")
    check(cfg.method in METHODS, f"method: {cfg.method!r} is not one of {', '.join(METHODS)}")
    check(bool(cfg.name) and "/" not in cfg.name, "name: must be a non-empty folder name")
    check(bool(cfg.data.train) or bool(cfg.tasks), "data.train: required (path to the training file)")
    p += _data_problems(cfg) + _train_problems(cfg) + _method_problems(cfg) + _validate_forgetting(cfg)
    return p


def _data_problems(cfg: Config) -> list[str]:
    """The data section's problems."""
    p, check = _checker()
    check(cfg.data.format in FORMATS, f"data.format: {cfg.data.format!r} is not one of {', '.join(FORMATS)}")
    check(cfg.data.validation_size > 0 and (cfg.data.validation_size < 1 or float(cfg.data.validation_size).is_integer()),
          "data.validation_size: a fraction below 1 or a whole number of rows (> 0)")
    pp = cfg.data.prepare
    check(pp.dedup in ("none", "exact", "near"), f"data.prepare.dedup: {pp.dedup!r} is not one of none, exact, near")
    check(0 < pp.dedup_threshold <= 1, "data.prepare.dedup_threshold: must be in (0, 1]")
    check(pp.label_model in ("dawid_skene", "majority"), f"data.prepare.label_model: {pp.label_model!r} is not one of dawid_skene, majority")
    bad_pii = sorted(set(pp.pii) - {"email", "phone", "credit_card", "ip_address", "iban", "url"})
    check(not bad_pii, f"data.prepare.pii: unknown kind(s) {bad_pii}; kinds are email, phone, credit_card, ip_address, iban, url")
    check(pp.test_size >= 0 and (pp.test_size < 1 or float(pp.test_size).is_integer()),
          "data.prepare.test_size: a fraction below 1 or a whole number of rows")
    check(cfg.data.layout is None or cfg.data.layout in LAYOUTS,
          f"data.layout: {cfg.data.layout!r} is not one of {', '.join(LAYOUTS)}")
    ct = cfg.data.chat_template
    if ct is not None and "{" not in ct and ct not in CHAT_TEMPLATES:
        close = difflib.get_close_matches(ct, CHAT_TEMPLATES, n=1, cutoff=0.5)
        p.append(f"data.chat_template: {ct!r} is neither a template name ({', '.join(CHAT_TEMPLATES)}) nor a Jinja "
                 "template" + (f"; did you mean {close[0]!r}?" if close else ""))
    for key in ("columns", "validation_columns", "test_columns"):
        for role in getattr(cfg.data, key):
            if role not in ROLES:
                close = difflib.get_close_matches(role, ROLES, n=1, cutoff=0.5)
                p.append(f"data.{key}.{role}: unknown role" + (f"; did you mean {close[0]!r}?" if close else "")
                         + f" (roles: {', '.join(ROLES)})")
    check(cfg.data.truncation_side in TRUNCATION_SIDES,
          f"data.truncation_side: {cfg.data.truncation_side!r} is not one of {', '.join(TRUNCATION_SIDES)}")
    check(cfg.data.delimiter is None or len(cfg.data.delimiter.encode().decode("unicode_escape")) == 1
          or cfg.data.delimiter.lower() == "tab", f"data.delimiter: {cfg.data.delimiter!r} must be one character, e.g. ';' or '\\t'")
    for key in ("validation_columns", "test_columns"):
        check(getattr(cfg.data, key) == {} or getattr(cfg.data, key.split("_")[0]) is not None,
              f"data.{key}: there is no data.{key.split('_')[0]} file to apply it to")
    p += _extract_problems(cfg.data.extract) + _split_problems(cfg.data.prepare)
    check(not (cfg.data.references and cfg.task in ("classification", "text")),
          f"data.references: only generation tasks (instruction, chat) are scored against references, not {cfg.task}")
    if cfg.eval.metric != "auto":
        tasks = METRICS.get(cfg.eval.metric)
        check(tasks is not None, f"eval.metric: {cfg.eval.metric!r} is not one of auto, {', '.join(METRICS)}")
        check(tasks is None or cfg.task in tasks, f"eval.metric: {cfg.eval.metric!r} is not measured for task {cfg.task}")
    if cfg.task == "classification":
        check(bool(cfg.data.labels), "data.labels: required for classification, e.g. {0: negative, 1: positive}")
        words = list(cfg.data.labels.values())
        check(len(set(words)) == len(words), "data.labels: two labels map to the same words")
    return p


def _train_problems(cfg: Config) -> list[str]:
    """The train section's problems."""
    p, check = _checker()
    t = cfg.train
    check(t.epochs >= 1, "train.epochs: must be >= 1")
    check(t.max_steps is None or t.max_steps >= 1, "train.max_steps: must be >= 1")
    check(t.batch_size >= 1, "train.batch_size: must be >= 1")
    check(t.grad_accum >= 1, "train.grad_accum: must be >= 1")
    check(t.batch_tokens >= 0, "train.batch_tokens: must be >= 0 (0 = no cap)")
    check(t.lr > 0, "train.lr: must be > 0")
    check(t.weight_decay >= 0, "train.weight_decay: must be >= 0")
    check(t.warmup_steps >= 0, "train.warmup_steps: must be >= 0")
    check(t.max_grad_norm > 0, "train.max_grad_norm: must be > 0")
    check(t.max_seq_len >= 8, "train.max_seq_len: must be >= 8")
    check(t.dropout is None or 0 <= t.dropout < 1, "train.dropout: must be in [0, 1)")
    check(t.eval_every >= 1, "train.eval_every: must be >= 1")
    check(t.save_every >= 0, "train.save_every: must be >= 0")
    check(t.keep_checkpoints >= 1, "train.keep_checkpoints: must be >= 1")
    check(t.early_stopping.patience >= 0, "train.early_stopping.patience: must be >= 0")
    check(t.early_stopping.min_delta >= 0, "train.early_stopping.min_delta: must be >= 0")
    check(t.strategy in STRATEGIES, f"train.strategy: {t.strategy!r} is not one of {', '.join(STRATEGIES)}")
    check(t.precision in PRECISIONS, f"train.precision: {t.precision!r} is not one of {', '.join(PRECISIONS)}")
    return p


def _method_problems(cfg: Config) -> list[str]:
    """The method's settings (classifier, prompt, full, lora) and the evaluation's."""
    p, check = _checker()
    check(cfg.classifier in ("auto", "lm", "head"), f"classifier: {cfg.classifier!r} is not one of auto, lm, head")
    check(cfg.classifier != "head" or cfg.task == "classification", "classifier: head needs task: classification")
    check(not (cfg.classifier == "head" and cfg.method == "prompt"), "classifier: head cannot be used with method: prompt "
          "(prompting needs a generative model scoring label words)")
    check(not (cfg.method == "prompt" and cfg.task == "text"),
          "method: prompt needs a task with answers to prompt for; task text has none (use lora or full)")
    check(cfg.prompt.shots >= 0, "prompt.shots: must be >= 0")
    api = cfg.prompt.api
    if api.base_url:
        check(api.base_url.startswith(("http://", "https://")), "prompt.api.base_url: must start with http:// or https://")
        check(bool(api.model), "prompt.api.model: required with prompt.api.base_url (the endpoint's model name)")
        check(api.max_concurrency >= 1, "prompt.api.max_concurrency: must be >= 1")
        check(api.timeout_s > 0, "prompt.api.timeout_s: must be > 0")
    check(cfg.prompt.selection in ("random", "similar"),
          f"prompt.selection: {cfg.prompt.selection!r} is not one of random, similar")
    check(cfg.full.lr is None or cfg.full.lr > 0, "full.lr: must be > 0")
    check(cfg.lora.r >= 1, "lora.r: must be >= 1")
    check(cfg.lora.alpha > 0, "lora.alpha: must be > 0")
    check(0 <= cfg.lora.dropout < 1, "lora.dropout: must be in [0, 1)")
    check(cfg.eval.batch_size >= 1, "eval.batch_size: must be >= 1")
    check(cfg.eval.max_new_tokens >= 1, "eval.max_new_tokens: must be >= 1")
    check(cfg.eval.label_scoring in ("sum", "mean"), f"eval.label_scoring: {cfg.eval.label_scoring!r} is not one of sum, mean")
    check(cfg.eval.classify_by in ("scoring", "generation"),
          f"eval.classify_by: {cfg.eval.classify_by!r} is not one of scoring, generation")
    check(cfg.eval.bootstrap_resamples >= 100, "eval.bootstrap_resamples: must be >= 100")
    check(cfg.eval.latency_examples >= 0, "eval.latency_examples: must be >= 0 (0 skips the latency measurement)")
    return p


def _closest_hint(value: str, valid: tuple[str, ...]) -> str:
    """``; did you mean 'x'?`` for the closest valid value, or ``""``."""
    close = difflib.get_close_matches(value, valid, n=1, cutoff=0.5)
    return f"; did you mean {close[0]!r}?" if close else ""


def _extract_problems(e: ExtractConfig | None) -> list[str]:
    """Every problem of ``data.extract``: no way given, two ways given, a regex that does not compile
    or names no group, a turn role that is not a chat role, blank or repeated markers."""
    if e is None:
        return []
    k, p = "data.extract", []
    if e.regex is None and not e.markers and not e.turns:
        p.append(f"{k}: give regex (its named groups become columns), or markers and/or turns (marker lines)")
    if e.regex is not None:
        if e.markers or e.turns or e.before:
            p.append(f"{k}.regex: give either regex or markers/turns/before, not both")
        try:
            named = re.compile(e.regex).groupindex
        except re.error as err:
            p.append(f"{k}.regex: not a valid regular expression ({err})")
        else:
            if not named:
                p.append(f"{k}.regex: no named group; name each field with (?P<name>...), e.g. "
                         r"'(?s)(?P<body>.*)\n@subject\n(?P<subject>.*)'")
    if e.before is not None and not (e.markers or e.turns):
        p.append(f"{k}.before: names the text before the first marker; give markers or turns too")
    if not e.column.strip():
        p.append(f"{k}.column: the column holding the marked text (text for a folder of files)")
    seen: dict[str, str] = {}
    for kind, mapping in (("markers", e.markers), ("turns", e.turns)):
        for marker, value in mapping.items():
            where, key = f"{k}.{kind}[{marker!r}]", marker.strip()
            if not key:
                p.append(f"{where}: a blank marker")
            elif key in seen:
                p.append(f"{where}: the same marker as {seen[key]} (markers are compared without surrounding whitespace)")
            seen.setdefault(key, where)
            if kind == "turns" and value not in CHAT_ROLES:
                means = {"human": "user", "gpt": "assistant", "bot": "assistant", "ai": "assistant", "model": "assistant"}
                hint = f"; did you mean {means[value.lower()]!r}?" if value.lower() in means else _closest_hint(value, CHAT_ROLES)
                p.append(f"{where}: {value!r} is not a chat role ({', '.join(CHAT_ROLES)}){hint}")
            if kind == "markers" and (not value.strip() or (value == "messages" and e.turns)):
                p.append(f"{where}: needs a field name" + (" other than messages (the turns go there)" if value.strip() else ""))
    return p


def _split_problems(pp: PrepareConfig) -> list[str]:
    """Problems of the split settings: an unknown split kind, order_by without an ordered split,
    group_by with one."""
    p = []
    if pp.split not in SPLIT_KINDS:
        p.append(f"data.prepare.split: {pp.split!r} is not one of {', '.join(SPLIT_KINDS)}{_closest_hint(pp.split, SPLIT_KINDS)}")
    if pp.order_by is not None and pp.split != "ordered":
        p.append("data.prepare.order_by: orders the rows of an ordered split; set data.prepare.split: ordered (or remove it)")
    if pp.group_by is not None and pp.split == "ordered":
        p.append("data.prepare.group_by: cannot be combined with split: ordered (an ordered split cuts by time, "
                 "a grouped one places whole groups)")
    return p


def _validate_forgetting(cfg: Config) -> list[str]:
    """Problems in the forgetting check, the mitigations (replay, distill, anchor), multi-task,
    search, tracker and estimate settings."""
    p, check = _checker()
    e = cfg.eval
    check(e.general_tokens >= 0, "eval.general_tokens: must be >= 0")
    check(0 <= e.general_instructions <= 16, "eval.general_instructions: 0 to 16 (the shipped instructions that are "
          "scored; the others are replay.data: instructions; 0 skips agreement and KL)")
    check(e.general_max_new_tokens >= 1, "eval.general_max_new_tokens: must be >= 1")
    check(bool(e.general), f"eval.general: {GENERAL} (the shipped set), a file of general text, or none")
    r, d, a = cfg.replay, cfg.distill, cfg.anchor
    trains = cfg.method != "prompt"
    check(0 <= r.ratio < 1, "replay.ratio: the share of replay in the training mix, in [0, 1)")
    check(r.by in ("examples", "tokens"), f"replay.by: {r.by!r} is not one of examples, tokens")
    check(bool(r.data), f"replay.data: {GENERAL} (the shipped Wikipedia text), {INSTRUCTIONS} (the shipped everyday "
          "instructions, answered by the base model) or a file of general text or instructions")
    check(r.replies in ("base", "data"), f"replay.replies: {r.replies!r} is not one of base, data")
    check(not (r.data == INSTRUCTIONS and r.replies == "data"),
          "replay.replies: data needs replies in the file; the shipped instructions have none (use base)")
    check(r.max_new_tokens >= 1, "replay.max_new_tokens: must be >= 1")
    check(d.weight >= 0, "distill.weight: must be >= 0 (0 = off)")
    check(d.temperature > 0, "distill.temperature: must be > 0")
    check(d.direction in ("forward", "reverse"), f"distill.direction: {d.direction!r} is not one of forward, reverse")
    check(d.on in DISTILL_ON, f"distill.on: {d.on!r} is not one of {', '.join(DISTILL_ON)}")
    check(bool(d.teacher), "distill.teacher: base, a run folder, or a model path or hub id")
    if d.weight > 0 and d.on in DISTILL_ON:
        check(d.on == "prompts" or r.ratio > 0, f"distill.on: {d.on} distils on replay rows, but replay.ratio is 0 "
              "(set replay.ratio > 0, or distill.on: prompts)")
        check(trains, "distill.weight: method prompt trains nothing to distil into")
    check(a.method in ANCHORS, f"anchor.method: {a.method!r} is not one of {', '.join(ANCHORS)}")
    check(a.strength >= 0, "anchor.strength: must be >= 0")
    check(a.method == "none" or a.strength > 0, f"anchor.strength: anchor.method {a.method} needs a strength > 0")
    check(a.fisher_examples >= 1, "anchor.fisher_examples: must be >= 1")
    check(bool(a.fisher_data) and a.fisher_data != INSTRUCTIONS,
          f"anchor.fisher_data: {GENERAL} (the shipped Wikipedia text) or a file of general text")
    check(not (d.weight > 0 and d.on == "prompts" and cfg.task == "text"), "distill.on: prompts distils the prompt "
          "tokens of task rows, but task text has none (every token is a target); use replay or both")
    check(not (a.method != "none" and not trains), "anchor.method: method prompt trains nothing to anchor")
    for key, on in (("distill.weight", d.weight > 0), ("anchor.method", a.method != "none")):
        check(not (on and cfg.train.strategy == "fsdp"), f"{key}: not available with train.strategy: fsdp yet (the teacher "
              "and anchor read whole weights); use train.strategy: ddp")
    check(not (r.ratio > 0 and not trains), "replay.ratio: method prompt trains nothing to replay into")
    return p + _tasks_problems(cfg) + _search_problems(cfg) + _other_problems(cfg) + _preference_problems(cfg)


def _tasks_problems(cfg: Config) -> list[str]:
    """The multi-task settings' problems (tasks[], mixing)."""
    p, check = _checker()
    names = [t.name for t in cfg.tasks]
    for i, t in enumerate(cfg.tasks):
        where = f"tasks[{i}]"
        check(bool(t.name) and "/" not in t.name, f"{where}.name: required, a short folder name (e.g. sst2)")
        check(t.config is not None or (t.task is not None and t.data is not None),
              f"{where}: give config: (a single-task config file) or both task: and data:")
        check(t.task is None or t.task in TASKS, f"{where}.task: {t.task!r} is not one of {', '.join(TASKS)}")
        check(t.weight > 0, f"{where}.weight: must be > 0")
        check(t.metric == "auto" or t.metric in METRICS, f"{where}.metric: {t.metric!r} is not one of auto, {', '.join(METRICS)}")
        if t.task in TASKS and t.data is not None:  # the task's own data and metric, checked as a single-task run's
            p.extend(f"{where}.{m.removeprefix('eval.')}" for m in validate(task_config(cfg, t))
                     if m.startswith(("data.", "eval.metric:")))
    if cfg.tasks:  # a multi-task run: the top-level task and data are not used (each task has its own)
        check(not cfg.data.train, "data: a multi-task run takes each task's data from tasks[]; remove the top-level "
              "data: (the top-level task: is ignored too)")
        check(cfg.eval.metric == "auto", "eval.metric: a multi-task run scores each task by tasks[].metric; "
              "leave eval.metric at auto")
        check(cfg.method != "prompt", "tasks: method prompt cannot be multi-task (prompt each task's run instead)")
        check(cfg.classifier != "head", "classifier: head cannot be multi-task (each task has its own labels); use lm")
        check(len({t.data.chat_template for t in cfg.tasks if t.data}) <= 1,
              "tasks: the tasks share one tokenizer: give data.chat_template the same in every task (or none)")
    dup = sorted({n for n in names if names.count(n) > 1})
    check(not dup, f"tasks: names must differ ({', '.join(dup)} repeated)")
    check(cfg.mixing.by in ("weight", "temperature", "size"),
          f"mixing.by: {cfg.mixing.by!r} is not one of weight, temperature, size")
    check(cfg.mixing.temperature > 0, "mixing.temperature: must be > 0")
    return p


def _preference_problems(cfg: Config) -> list[str]:
    """The ``preference:`` block, and the settings ``task: preference`` cannot train with."""
    p, check = _checker()
    pr = cfg.preference
    if pr.objective not in PREFERENCE_OBJECTIVES:
        close = difflib.get_close_matches(pr.objective, PREFERENCE_OBJECTIVES, n=1, cutoff=0.5)
        p.append(f"preference.objective: {pr.objective!r} is not one of {', '.join(PREFERENCE_OBJECTIVES)}"
                 + (f"; did you mean {close[0]!r}?" if close else ""))
    check(pr.reference in REFERENCES, f"preference.reference: {pr.reference!r} is not one of {', '.join(REFERENCES)}")
    check(pr.beta > 0, "preference.beta: must be > 0")
    check(0 <= pr.label_smoothing < 0.5, "preference.label_smoothing: must be in [0, 0.5)")
    check(pr.sft_weight >= 0, "preference.sft_weight: must be >= 0")
    check(pr.length_examples >= 0, "preference.length_examples: must be >= 0")
    check(pr.desirable_weight > 0 and pr.undesirable_weight > 0, "preference.desirable_weight, undesirable_weight: must be > 0")
    check(pr.max_prompt_len is None or 1 <= pr.max_prompt_len < cfg.train.max_seq_len,
          "preference.max_prompt_len: must be at least 1 and below train.max_seq_len")
    if cfg.task != "preference":
        return p
    check(pr.reference != "adapter" or cfg.method == "lora",
          f"preference.reference: adapter needs method: lora (method {cfg.method} has no adapters to switch off; "
          "use precomputed)")
    check(cfg.method in ("lora", "full"), f"method: {cfg.method} cannot learn from preferences (use lora or full)")
    check(not cfg.train.packing, "train.packing: preference pairs are trained side by side, not packed; set it false")
    check(cfg.classifier != "head", "classifier: head cannot learn from preferences")
    check(cfg.replay.ratio == 0 and cfg.distill.weight == 0 and cfg.anchor.method == "none",
          "replay, distill and anchor are not yet combined with task: preference (the objective's own reference, "
          "beta, keeps the model near where it started)")
    check(cfg.train.strategy != "fsdp", "train.strategy: fsdp is not yet supported with task: preference (use ddp)")
    check(not cfg.tasks, "tasks: a preference run is single-task")
    return p


def _other_problems(cfg: Config) -> list[str]:
    """Trackers (report_to) and the estimate's settings."""
    p, check = _checker()
    for name in cfg.report_to:
        if name not in TRACKERS:
            close = difflib.get_close_matches(name, TRACKERS, n=1, cutoff=0.5)
            p.append(f"report_to: {name!r} is not a tracker" + (f"; did you mean '{close[0]}'?" if close else
                                                                   f" ({', '.join(TRACKERS)})"))
    check(cfg.estimate.price_per_hour >= 0, "estimate.price_per_hour: must be >= 0")
    check(cfg.estimate.device_tflops is None or cfg.estimate.device_tflops > 0, "estimate.device_tflops: must be > 0")
    check(cfg.estimate.device_memory_gib is None or cfg.estimate.device_memory_gib > 0,
          "estimate.device_memory_gib: must be > 0")
    check(cfg.estimate.calibrate_seconds >= 0, "estimate.calibrate_seconds: must be >= 0 (0: no calibration run)")
    return p


def _search_problems(cfg: Config) -> list[str]:
    """Every problem of the ``search:`` block: unknown or non-numeric keys (with the closest valid
    one), empty or reversed ranges, log scales through zero."""
    p: list[str] = []
    s = cfg.search
    if s.trials < 1:
        p.append("search.trials: must be at least 1")
    if s.pruner not in ("median", "none"):
        p.append(f"search.pruner: {s.pruner!r} is not one of median, none")
    if s.startup_trials < 0:
        p.append("search.startup_trials: must be >= 0")
    keys = {k: v for k, v in flatten(cfg).items() if not k.startswith("search.")}
    numeric = [k for k, v in keys.items() if v is None or (isinstance(v, (int, float)) and not isinstance(v, bool))]
    for key, spec in s.params.items():
        where = f"search.params.{key}"
        if key not in keys:
            close = difflib.get_close_matches(key, numeric, n=1, cutoff=0.5)
            p.append(f"{where}: no such setting" + (f"; did you mean '{close[0]}'?" if close else ""))
            continue
        if key not in numeric:
            p.append(f"{where}: only numeric settings can be searched ({key} is {keys[key]!r})")
            continue
        if spec.choices is not None:
            if not spec.choices:
                p.append(f"{where}.choices: give at least one value")
            if spec.low is not None or spec.high is not None:
                p.append(f"{where}: give either choices or low/high, not both")
            continue
        if spec.low is None or spec.high is None:
            p.append(f"{where}: give low and high (or choices)")
            continue
        if spec.low >= spec.high:
            p.append(f"{where}: low ({spec.low:g}) must be below high ({spec.high:g})")
        if spec.log and spec.low <= 0:
            p.append(f"{where}: a log scale needs low > 0 (got {spec.low:g})")
        if spec.log and spec.step is not None:
            p.append(f"{where}: give either log or step, not both")
        current = keys[key]
        if isinstance(current, int) and not float(spec.low).is_integer() or isinstance(current, int) and not float(spec.high).is_integer():
            p.append(f"{where}: {key} is a whole number: low and high must be whole numbers (got {spec.low:g}, {spec.high:g})")
    return p


def to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def flatten(cfg: Any, prefix: str = "") -> dict[str, Any]:
    """A config (or part of one) as ``{dotted.key: value}``, one entry per leaf setting."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            out |= flatten(value, f"{prefix}{f.name}.")
        else:
            out[f"{prefix}{f.name}"] = value
    return out


def diff(old: Config, new: Config) -> dict[str, tuple[Any, Any]]:
    """The settings that differ between two configs: ``{dotted.key: (old value, new value)}``."""
    a, b = flatten(old), flatten(new)
    return {k: (a.get(k), b.get(k)) for k in a.keys() | b.keys() if a.get(k) != b.get(k)}


def save_config(cfg: Config, path: Path) -> None:
    """Write the fully resolved config as YAML (atomically)."""
    from tunesmith.io import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True))


def _resolve_data_paths(cfg: Config, base: Path, typed: set[str] = frozenset()) -> None:  # type: ignore[assignment]
    """Make data paths absolute. A path written in the config file is relative to the config's
    folder (else the working folder); one typed on the command line (``typed``: its dotted keys)
    is relative to the working folder (else the config's). A path found in neither place is made
    absolute in the first, so the error that follows shows where it was looked for.

    The saved run config then works from any folder.
    """
    for t in cfg.tasks:  # a task's inline data is written relative to this config (a config: file's is absolute already)
        for holder, attr in ((t.data, "train"), (t.data, "validation"), (t.data, "test"),
                             (t.data and t.data.prepare, "labeling_functions")):
            value = getattr(holder, attr) if holder is not None else None
            if value and not Path(value).is_absolute() and not value.startswith("hf:"):
                found = next((c for c in (base / value, Path.cwd() / value) if c.exists()), base / value)
                setattr(holder, attr, str(found.resolve()))
    for key, holder, attr in (("data.train", cfg.data, "train"), ("data.validation", cfg.data, "validation"),
                              ("data.test", cfg.data, "test"),
                              ("data.prepare.labeling_functions", cfg.data.prepare, "labeling_functions"),
                              ("eval.general", cfg.eval, "general"), ("replay.data", cfg.replay, "data"),
                              ("anchor.fisher_data", cfg.anchor, "fisher_data"), ("distill.teacher", cfg.distill, "teacher"),
                              ("model", cfg, "model")):
        value = getattr(holder, attr)
        if not value or Path(value).is_absolute() or value.startswith("hf:") or value in (GENERAL, INSTRUCTIONS, "none", "base", "default"):
            continue
        if key in ("distill.teacher", "model") and not any(c.exists() for c in (base / value, Path.cwd() / value)):
            continue  # a hub id or a built-in name, not a path
        places = [Path.cwd() / value, base / value] if key in typed else [base / value, Path.cwd() / value]
        found = next((c for c in places if c.exists()), places[0])
        setattr(holder, attr, str(found.resolve()))


def _deep_merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for k, v in b.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = raw
    for part in parts[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[parts[-1]] = value


# The names other tools give our settings (transformers' TrainingArguments, PEFT's LoraConfig, TRL),
# suggested for an unknown key when spelling alone finds nothing close ("learning_rate" -> "lr").
SYNONYMS = {
    "learning_rate": "lr", "num_train_epochs": "epochs", "num_epochs": "epochs", "max_length": "max_seq_len",
    "max_seq_length": "max_seq_len", "per_device_train_batch_size": "batch_size", "train_batch_size": "batch_size",
    "gradient_accumulation_steps": "grad_accum", "warmup": "warmup_steps", "gradient_clipping": "max_grad_norm",
    "rank": "r", "lora_r": "r", "lora_alpha": "alpha", "lora_dropout": "dropout", "target": "target_modules",
    "eval_steps": "eval_every", "save_steps": "save_every", "save_total_limit": "keep_checkpoints",
    "bf16": "precision", "fp16": "precision", "model_name": "model", "model_name_or_path": "model",
    "per_device_eval_batch_size": "batch_size", "max_new_token": "max_new_tokens", "system": "system_prompt",
}


def _build(cls: type, raw: Any, prefix: str, problems: list[str]) -> Any:
    """Turn a mapping into dataclass ``cls``, appending every problem to ``problems``."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        problems.append(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {type(raw).__name__}")
        return cls()
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        key = str(key)
        if key not in names:
            close = [SYNONYMS[key]] if SYNONYMS.get(key) in names else difflib.get_close_matches(key, names, n=1, cutoff=0.5)
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else f"; valid keys: {', '.join(names)}"
            problems.append(f"{prefix}{key}: unknown key{hint}")
            continue
        typ = hints[key]
        inner = _dataclass_in(typ)
        if dataclasses.is_dataclass(typ):
            kwargs[key] = _build(typ, value, f"{prefix}{key}.", problems)
        elif inner is not None and typing.get_origin(typ) is dict:  # a mapping of sections, e.g. search.params
            if not isinstance(value, dict):
                problems.append(f"{prefix}{key}: expected a mapping, got {value!r}")
                continue
            kwargs[key] = {str(k): _build(inner, v, f"{prefix}{key}.{k}.", problems) for k, v in value.items()}
        elif inner is not None and typing.get_origin(typ) is list:  # a list of sections, e.g. tasks:
            if not isinstance(value, list):
                problems.append(f"{prefix}{key}: expected a list of mappings, got {value!r}")
                continue
            kwargs[key] = [_build(inner, v, f"{prefix}{key}[{i}].", problems) for i, v in enumerate(value)]
        elif inner is not None:  # an optional section: absent (null) or a mapping
            kwargs[key] = None if value is None else _build(inner, value, f"{prefix}{key}.", problems)
        else:
            ok, converted = _coerce(value, typ)
            if ok:
                kwargs[key] = converted
            else:
                problems.append(f"{prefix}{key}: expected {_type_name(typ)}, got {value!r}")
    return cls(**kwargs)


def _dataclass_in(typ: Any) -> type | None:
    """The dataclass inside ``list[X]`` or ``X | None``, else None."""
    for arg in typing.get_args(typ):
        if dataclasses.is_dataclass(arg):
            return arg
    return None


def _coerce(value: Any, typ: Any) -> tuple[bool, Any]:
    origin = typing.get_origin(typ)
    if origin in (Union, types.UnionType):
        for arg in typing.get_args(typ):
            ok, out = _coerce(value, arg)
            if ok:
                return True, out
        return False, None
    if typ is type(None):
        return value is None, None
    if typ is bool:
        return isinstance(value, bool), value
    if typ is int:
        if isinstance(value, bool):
            return False, None
        if isinstance(value, int):
            return True, value
        if isinstance(value, float) and value.is_integer():
            return True, int(value)
        return False, None
    if typ is float:
        if isinstance(value, bool):
            return False, None
        if isinstance(value, (int, float)):
            return True, float(value)
        if isinstance(value, str):  # YAML 1.1 reads `3e-4` as a string
            try:
                return True, float(value)
            except ValueError:
                return False, None
        return False, None
    if typ is str:
        return (True, value) if isinstance(value, str) else (False, None)
    if origin is list:
        (inner,) = typing.get_args(typ)
        if not isinstance(value, list):
            return False, None
        out = []
        for v in value:
            ok, c = _coerce(v, inner)
            if not ok:
                return False, None
            out.append(c)
        return True, out
    if origin is dict:
        if not isinstance(value, dict):
            return False, None
        # keys and values of label maps may be written as numbers in YAML: keep them as text
        return True, {str(k): str(v) for k, v in value.items()}
    return False, None


def _type_name(typ: Any) -> str:
    origin = typing.get_origin(typ)
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(typ))
    if typ is type(None):
        return "null"
    if origin is list:
        return f"a list of {_type_name(typing.get_args(typ)[0])}"
    if origin is dict:
        return "a mapping"
    return getattr(typ, "__name__", str(typ))
