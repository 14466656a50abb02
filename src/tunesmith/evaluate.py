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
from dataclasses import dataclass, field
from typing import Any

import torch
from rich.progress import Progress

from tunesmith import metrics as M
from tunesmith import runtime
from tunesmith.api import ApiModel
from tunesmith.data.formats import Example
from tunesmith.data.render import collate, encode, encode_all, encode_for_head, render
from tunesmith.train import evaluate_loss, target_logprob_per_row


def loss_metrics(model: torch.nn.Module, tokenizer: Any, examples: list[Example], max_seq_len: int,
                 batch_size: int, bf16: bool) -> dict[str, float]:
    """Mean loss per target token and perplexity on each example's final assistant turn."""
    encoded, _ = encode_all(tokenizer, examples, max_seq_len, last_turn_only=True)
    loss = evaluate_loss(model, encoded, batch_size, tokenizer.pad_token_id, bf16)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50))}


@torch.no_grad()
def predict_labels(model: torch.nn.Module, tokenizer: Any, examples: list[Example], label_words: dict[str, str],
                   max_seq_len: int, batch_size: int, bf16: bool,
                   progress: Progress | None = None, normalize: str = "sum") -> tuple[list[str], float]:
    """The most likely label of each example, by the log-probability of its words: summed
    (``normalize="sum"``) or per token (``"mean"``).

    Also returns the loss per target token of the true labels, from the same forward passes.
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
    return [keys[j] for j in ranking.argmax(dim=1).tolist()], loss


@torch.no_grad()
def predict_with_head(model: torch.nn.Module, tokenizer: Any, examples: list[Example], labels: list[str],
                      max_seq_len: int, batch_size: int, bf16: bool,
                      progress: Progress | None = None) -> tuple[list[str], float]:
    """Predictions of a sequence-classification head, and its mean cross-entropy on the true labels."""
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
    return preds, loss / max(len(encoded), 1)


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
             batch_size: int, bf16: bool, progress: Progress | None = None) -> list[str]:
    """Greedy replies to each example's conversation up to its last assistant turn."""
    model.eval()
    dev = next(model.parameters()).device
    prompts = [render(tokenizer, ex.messages[: _last_answer(ex)], add_generation_prompt=True) for ex in examples]
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # generation continues from the right edge
    task = progress.add_task("generating", total=len(prompts), info="") if progress else None
    out = []
    try:
        for i in range(0, len(prompts), batch_size):
            enc = tokenizer(prompts[i : i + batch_size], return_tensors="pt", padding=True, add_special_tokens=False).to(dev)
            with runtime.autocast(dev, bf16):
                gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                     pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
            out += tokenizer.batch_decode(gen[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
            if progress is not None:
                progress.update(task, advance=len(prompts[i : i + batch_size]))
    finally:
        tokenizer.padding_side = side
    return [s.strip() for s in out]


@dataclass
class Evaluation:
    """One model's results on a test set: ``metrics`` (JSON-ready, each headline metric with a
    95% bootstrap interval under ``ci``), the predictions, and the resamplable metric functions
    (``stats``) that paired comparisons with another model need."""

    metrics: dict[str, Any]
    predictions: list[str]
    stats: dict[str, M.Stat] = field(default_factory=dict)


def evaluate_model(model: torch.nn.Module, tokenizer: Any, examples: list[Example], task: str,
                   label_words: dict[str, str], max_seq_len: int, batch_size: int, max_new_tokens: int,
                   bf16: bool, progress: Progress | None = None, label_scoring: str = "sum",
                   classify_by: str = "scoring", resamples: int = M.RESAMPLES, head: bool = False) -> Evaluation:
    """All metrics of ``task`` on ``examples``, with intervals, and the predictions (labels or texts).

    ``head``: the model is a sequence classifier (logits per label) rather than a generative model.
    An ``ApiModel`` (a remote endpoint) answers freely; its answers are parsed (classification)
    or scored as generations, with no loss (an API gives no log-likelihoods to compare).
    """
    refs = [reference(ex) for ex in examples]
    if isinstance(model, ApiModel):
        return _evaluate_api(model, examples, refs, task, label_words, max_new_tokens, progress, resamples)
    metrics: dict[str, Any]
    if task == "classification":
        if head:
            preds, loss = predict_with_head(model, tokenizer, examples, list(label_words), max_seq_len, batch_size, bf16,
                                            progress)
            metrics = {"loss": loss, "perplexity": math.exp(min(loss, 50))}
        elif classify_by == "generation":
            answers = generate(model, tokenizer, examples, max_new_tokens, batch_size, bf16, progress)
            preds = [parse_label(a, label_words) for a in answers]
            metrics = loss_metrics(model, tokenizer, examples, max_seq_len, batch_size, bf16)
            metrics["invalid_rate"] = sum(p == INVALID for p in preds) / max(len(preds), 1)
        else:
            preds, loss = predict_labels(model, tokenizer, examples, label_words, max_seq_len, batch_size, bf16,
                                         progress, label_scoring)
            metrics = {"loss": loss, "perplexity": math.exp(min(loss, 50))}
        metrics |= M.classification(refs, preds, list(label_words))
        stats = M.classification_stats(refs, preds, list(label_words))
    else:
        metrics = loss_metrics(model, tokenizer, examples, max_seq_len, batch_size, bf16)
        preds = generate(model, tokenizer, examples, max_new_tokens, batch_size, bf16, progress)
        values, stats = M.generation(refs, preds)
        metrics |= values
    return _finish(metrics, preds, stats, resamples)


def _evaluate_api(model: ApiModel, examples: list[Example], refs: list[str], task: str, label_words: dict[str, str],
                  max_new_tokens: int, progress: Progress | None, resamples: int) -> Evaluation:
    bar = progress.add_task(f"asking {model.name}", total=len(examples), info="") if progress else None
    tick = (lambda: progress.update(bar, advance=1)) if progress is not None else None
    answers = model.chat_many([ex.messages[: _last_answer(ex)] for ex in examples], max_new_tokens, tick)
    if task == "classification":
        preds = [parse_label(a, label_words) for a in answers]
        metrics: dict[str, Any] = {"invalid_rate": sum(p == INVALID for p in preds) / max(len(preds), 1)}
        metrics |= M.classification(refs, preds, list(label_words))
        stats = M.classification_stats(refs, preds, list(label_words))
    else:
        preds = [a.strip() for a in answers]
        metrics, stats = M.generation(refs, preds)
    return _finish(metrics, preds, stats, resamples)


def _finish(metrics: dict[str, Any], preds: list[str], stats: dict[str, M.Stat], resamples: int) -> Evaluation:
    """Add the 95% bootstrap interval of every resamplable metric."""
    n = len(preds)
    metrics["ci"] = {k: [v["low"], v["high"]] for k, v in M.with_intervals(metrics, stats, n, resamples).items()}
    return Evaluation(metrics, preds, stats)


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
