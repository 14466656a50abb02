"""Evaluation on held-out data: loss/perplexity, classification, generation; metrics in ``metrics.py``.

Classification with a generative model is done by label scoring by default: for each
example, the log-likelihood of every label's words (and the end-of-turn token) after the
prompt; the most likely label is the prediction (``label_scoring: mean`` divides by the
number of tokens, for labels of different lengths). ``classify_by: generation`` instead lets
the model answer freely and parses the answer; answers naming no label (or several) count
as wrong and are reported as the invalid-answer rate.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from rich.progress import Progress

from tunesmith import metrics as M
from tunesmith import runtime
from tunesmith.api import ApiModel
from tunesmith.data.formats import Example
from tunesmith.data.render import collate, encode, encode_all, encode_for_head, render
from tunesmith.train import evaluate_loss, target_logprob_per_row


def loss_metrics(model: torch.nn.Module, tokenizer: Any, examples: list[Example], max_seq_len: int,
                 batch_size: int, bf16: bool) -> tuple[dict[str, float], int]:
    """Mean loss per target token and perplexity on each example's final assistant turn, and the
    number of tokens read."""
    encoded, stats = encode_all(tokenizer, examples, max_seq_len, last_turn_only=True)
    loss = evaluate_loss(model, encoded, batch_size, tokenizer.pad_token_id, bf16)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50))}, stats["tokens"]


@torch.no_grad()
def predict_labels(model: torch.nn.Module, tokenizer: Any, examples: list[Example], label_words: dict[str, str],
                   max_seq_len: int, batch_size: int, bf16: bool,
                   progress: Progress | None = None, normalize: str = "sum") -> tuple[list[str], float, int]:
    """The most likely label of each example, by the log-probability of its words: summed
    (``normalize="sum"``) or per token (``"mean"``).

    Also returns the loss per target token of the true labels, from the same forward passes, and
    the number of tokens read (every label's candidate counts: that is the work done).
    """
    model.eval()
    dev = next(model.parameters()).device
    keys = list(label_words)
    candidates = []  # one encoding per (example, label), the label's words as the only target
    for ex in examples:
        prompt = ex.messages[: _last_answer(ex)]  # few-shot turns (and their answers) stay
        for k in keys:
            answer = {"role": "assistant", "content": label_words[k]}
            candidates.append(encode(tokenizer, Example(prompt + [answer]), max_seq_len, last_turn_only=True))
    task = progress.add_task("label scoring", total=len(candidates), info="") if progress else None
    scores = torch.empty(len(candidates))
    counts = torch.empty(len(candidates), dtype=torch.long)
    order = sorted(range(len(candidates)), key=lambda j: len(candidates[j].input_ids))  # similar lengths: little padding
    for i in range(0, len(order), batch_size):
        idx = order[i : i + batch_size]
        batch = {k: v.to(dev) for k, v in collate([candidates[j] for j in idx], tokenizer.pad_token_id).items()}
        with runtime.autocast(dev, bf16):
            logprob, count = target_logprob_per_row(model, batch)
        scores[idx] = logprob.float().cpu()
        counts[idx] = count.cpu()
        if progress is not None:
            progress.update(task, advance=len(idx))
    scores, counts = scores.view(len(examples), len(keys)), counts.view(len(examples), len(keys))
    true = torch.tensor([keys.index(ex.label) for ex in examples]).unsqueeze(1)  # (E, 1)
    loss = float(-scores.gather(1, true).sum() / counts.gather(1, true).sum().clamp(min=1))
    ranking = scores / counts.clamp(min=1) if normalize == "mean" else scores
    return [keys[j] for j in ranking.argmax(dim=1).tolist()], loss, sum(len(c.input_ids) for c in candidates)


@torch.no_grad()
def predict_with_head(model: torch.nn.Module, tokenizer: Any, examples: list[Example], labels: list[str],
                      max_seq_len: int, batch_size: int, bf16: bool,
                      progress: Progress | None = None) -> tuple[list[str], float, int]:
    """Predictions of a sequence-classification head, its mean cross-entropy on the true labels,
    and the number of tokens read."""
    model.eval()
    dev = next(model.parameters()).device
    index = {k: i for i, k in enumerate(labels)}
    encoded = [encode_for_head(tokenizer, ex, index, max_seq_len) for ex in examples]
    task = progress.add_task("classifying", total=len(encoded), info="") if progress else None
    preds: list[str] = [""] * len(encoded)
    loss = 0.0
    order = sorted(range(len(encoded)), key=lambda j: len(encoded[j].input_ids))
    for i in range(0, len(order), batch_size):
        idx = order[i : i + batch_size]
        batch = {k: v.to(dev) for k, v in collate([encoded[j] for j in idx], tokenizer.pad_token_id).items()}
        with runtime.autocast(dev, bf16):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        loss += float(torch.nn.functional.cross_entropy(logits, batch["labels"], reduction="sum"))
        for j, k in zip(idx, logits.argmax(-1).tolist()):
            preds[j] = labels[k]
        if progress is not None:
            progress.update(task, advance=len(idx))
    return preds, loss / max(len(encoded), 1), sum(len(e.input_ids) for e in encoded)


INVALID = "<invalid>"


def parse_label(answer: str, label_words: dict[str, str]) -> str:
    """The label a free-text answer names: the one whose words equal the answer, else the only
    one whose words occur in it (whole words, case-insensitive); otherwise ``INVALID``."""
    said = M.normalize(answer)
    exact = [k for k, w in label_words.items() if M.normalize(w) == said]
    if exact:
        return exact[0]
    found = [k for k, w in label_words.items() if re.search(rf"(?<!\w){re.escape(M.normalize(w))}(?!\w)", said)]
    return found[0] if len(found) == 1 else INVALID


@torch.no_grad()
def generate(model: torch.nn.Module, tokenizer: Any, examples: list[Example], max_new_tokens: int,
             batch_size: int, bf16: bool, progress: Progress | None = None) -> tuple[list[str], int]:
    """Greedy replies to each example's conversation up to its last assistant turn, and the number
    of tokens read and written (prompt tokens, then each reply up to its end-of-turn token)."""
    model.eval()
    dev = next(model.parameters()).device
    prompts = [render(tokenizer, ex.messages[: _last_answer(ex)], add_generation_prompt=True) for ex in examples]
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # generation continues from the right edge
    task = progress.add_task("generating", total=len(prompts), info="") if progress else None
    out, tokens = [], 0
    try:
        for i in range(0, len(prompts), batch_size):
            enc = tokenizer(prompts[i : i + batch_size], return_tensors="pt", padding=True, add_special_tokens=False).to(dev)
            with runtime.autocast(dev, bf16):
                gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                     pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
            new = gen[:, enc["input_ids"].shape[1] :]
            out += tokenizer.batch_decode(new, skip_special_tokens=True)
            tokens += int(enc["attention_mask"].sum()) + _reply_tokens(new, tokenizer.eos_token_id)
            if progress is not None:
                progress.update(task, advance=len(prompts[i : i + batch_size]))
    finally:
        tokenizer.padding_side = side
    return [s.strip() for s in out], tokens


def _reply_tokens(new: torch.Tensor, eos: int | None) -> int:
    """Tokens generated per row up to and including the first end token (padding after it excluded)."""
    if eos is None or new.shape[1] == 0:
        return new.numel()
    ended = new == eos
    first = torch.where(ended.any(1), ended.int().argmax(1) + 1, torch.full_like(ended[:, 0], new.shape[1], dtype=torch.long))
    return int(first.sum())


@dataclass
class Evaluation:
    """One model's results on a test set: ``metrics`` (JSON-ready, each headline metric with a
    95% bootstrap interval under ``ci``), the predictions, the resamplable metric functions
    (``stats``) that paired comparisons with another model need, and the tokens the model read
    and wrote (None for a remote model)."""

    metrics: dict[str, Any]
    predictions: list[str]
    stats: dict[str, M.Stat] = field(default_factory=dict)
    tokens: int | None = None


@dataclass
class Predicted:
    """What a model answered: labels (classification) or texts, the metrics that come with the way
    of answering (loss, perplexity, invalid-answer rate), and the tokens read and written."""

    outputs: list[str]
    metrics: dict[str, Any]
    tokens: int | None


def predict(model: torch.nn.Module | ApiModel, tokenizer: Any, examples: list[Example], task: str,
            label_words: dict[str, str], max_seq_len: int, batch_size: int, max_new_tokens: int, bf16: bool,
            progress: Progress | None = None, label_scoring: str = "sum", classify_by: str = "scoring",
            head: bool = False, with_loss: bool = True) -> Predicted:
    """The model's answer to every example, as ``evaluate_model`` scores it. ``with_loss=False``
    skips the separate loss pass that free generation otherwise adds (for timing answers alone)."""
    if isinstance(model, ApiModel):
        before = model.tokens
        answers = _ask(model, examples, max_new_tokens, progress)
        tokens = (model.tokens - before) or None  # when the endpoint reports usage
        if task != "classification":
            return Predicted([a.strip() for a in answers], {}, tokens)
        preds = [parse_label(a, label_words) for a in answers]
        return Predicted(preds, {"invalid_rate": _invalid_rate(preds)}, tokens)
    if task == "classification" and (head or classify_by == "scoring"):
        if head:
            preds, loss, tokens = predict_with_head(model, tokenizer, examples, list(label_words), max_seq_len,
                                                    batch_size, bf16, progress)
        else:
            preds, loss, tokens = predict_labels(model, tokenizer, examples, label_words, max_seq_len, batch_size, bf16,
                                                 progress, label_scoring)
        return Predicted(preds, {"loss": loss, "perplexity": math.exp(min(loss, 50))}, tokens)
    texts, tokens = generate(model, tokenizer, examples, max_new_tokens, batch_size, bf16, progress)
    metrics: dict[str, Any] = {}
    if with_loss:
        metrics, read = loss_metrics(model, tokenizer, examples, max_seq_len, batch_size, bf16)
        tokens += read
    if task != "classification":
        return Predicted(texts, metrics, tokens)
    preds = [parse_label(a, label_words) for a in texts]
    return Predicted(preds, metrics | {"invalid_rate": _invalid_rate(preds)}, tokens)


def evaluate_model(model: torch.nn.Module | ApiModel, tokenizer: Any, examples: list[Example], task: str,
                   label_words: dict[str, str], max_seq_len: int, batch_size: int, max_new_tokens: int,
                   bf16: bool, progress: Progress | None = None, label_scoring: str = "sum",
                   classify_by: str = "scoring", resamples: int = M.RESAMPLES, head: bool = False) -> Evaluation:
    """All metrics of ``task`` on ``examples``, with intervals, and the predictions (labels or texts).

    ``head``: the model is a sequence classifier (logits per label) rather than a generative model.
    An ``ApiModel`` (a remote endpoint) answers freely; its answers are parsed (classification)
    or scored as generations, with no loss (an API gives no log-likelihoods to compare).
    """
    p = predict(model, tokenizer, examples, task, label_words, max_seq_len, batch_size, max_new_tokens, bf16,
                progress, label_scoring, classify_by, head)
    return scored(p.metrics, p.outputs, [reference(ex) for ex in examples], task, label_words, resamples, p.tokens)


def scored(metrics: dict[str, Any], preds: list[str], refs: list[str], task: str, label_words: dict[str, str],
           resamples: int = M.RESAMPLES, tokens: int | None = None) -> Evaluation:
    """An ``Evaluation`` of ``preds`` against ``refs``: the task's metrics added to ``metrics``, each
    headline metric with its 95% bootstrap interval."""
    values, stats = task_metrics(task, refs, preds, label_words)
    metrics = dict(metrics) | values
    metrics["ci"] = {k: [v["low"], v["high"]] for k, v in M.with_intervals(metrics, stats, len(preds), resamples).items()}
    return Evaluation(metrics, preds, stats, tokens)


def task_metrics(task: str, refs: list[str], preds: list[str],
                 label_words: dict[str, str]) -> tuple[dict[str, Any], dict[str, M.Stat]]:
    """The task's metrics of ``preds`` against ``refs`` and their resamplable forms (for intervals
    and paired tests)."""
    if task == "classification":
        return (M.classification(refs, preds, list(label_words)),
                M.classification_stats(refs, preds, list(label_words)))
    return M.generation(refs, preds)


def latency(model: torch.nn.Module | ApiModel, tokenizer: Any, examples: list[Example], task: str,
            label_words: dict[str, str], max_seq_len: int, max_new_tokens: int, bf16: bool, label_scoring: str = "sum",
            classify_by: str = "scoring", head: bool = False, progress: Progress | None = None) -> dict[str, float]:
    """Milliseconds to answer one example on its own (batch size 1, as a user waiting for a reply
    sees it), over ``examples`` after one untimed warm-up: median, 95th percentile and the count.

    A remote model is not asked again (requests cost money): its figures are the wall times of
    the requests it has answered so far, each made as part of the concurrent evaluation.
    """
    if isinstance(model, ApiModel):
        times = model.request_ms
        return _summary(times) if times else {}
    bar = progress.add_task("latency, one at a time", total=len(examples), info="") if progress else None

    def once(ex: Example) -> float:
        t0 = time.perf_counter()
        predict(model, tokenizer, [ex], task, label_words, max_seq_len, max(1, len(label_words)), max_new_tokens, bf16,
                None, label_scoring, classify_by, head, with_loss=False)  # one example: its label candidates in one batch
        return 1000 * (time.perf_counter() - t0)

    if not examples:
        return {}
    once(examples[0])
    times = []
    for ex in examples:
        times.append(once(ex))
        if progress is not None:
            progress.update(bar, advance=1)
    return _summary(times)


def _summary(times_ms: list[float]) -> dict[str, float]:
    return {"median_ms": float(np.median(times_ms)), "p95_ms": float(np.percentile(times_ms, 95)), "examples": len(times_ms)}


def _ask(model: ApiModel, examples: list[Example], max_new_tokens: int, progress: Progress | None) -> list[str]:
    bar = progress.add_task(f"asking {model.name}", total=len(examples), info="") if progress else None
    tick = (lambda: progress.update(bar, advance=1)) if progress is not None else None
    return model.chat_many([ex.messages[: _last_answer(ex)] for ex in examples], max_new_tokens, tick)


def _invalid_rate(preds: list[str]) -> float:
    return sum(p == INVALID for p in preds) / max(len(preds), 1)


def _last_answer(ex: Example) -> int:
    """Index of the final assistant turn (the answer to score), or the end when there is none."""
    return max((i for i, m in enumerate(ex.messages) if m["role"] == "assistant"), default=len(ex.messages))


def reference(ex: Example) -> str:
    """What a perfect model answers: the gold label, or the last assistant turn."""
    if ex.label is not None:
        return ex.label
    return [m for m in ex.messages if m["role"] == "assistant"][-1]["content"]


def compare(a: Evaluation, b: Evaluation, n: int, resamples: int = M.RESAMPLES) -> dict[str, dict[str, float]]:
    """For every metric both have: A's value minus B's and the paired bootstrap p-value."""
    out = {}
    for name in a.stats.keys() & b.stats.keys():
        out[name] = {"difference": float(a.metrics[name] - b.metrics[name]),
                     "p_value": M.paired_p_value(a.stats[name], b.stats[name], n, resamples)}
    return out
