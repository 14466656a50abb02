"""Evaluation on held-out data: loss/perplexity, classification, generation; metrics in ``metrics.py``.

Classification with a generative model is done by label scoring by default: for each
example, the log-likelihood of every label's words (and the end-of-turn token) after the
prompt; the most likely label is the prediction (``label_scoring: mean`` divides by the
number of tokens, for labels of different lengths). ``classify_by: generation`` instead lets
the model answer freely and parses the answer; answers naming no label (or several) count
as wrong and are reported as the invalid-answer rate.

Instruction and chat: greedy replies, stopped at the template's end-of-turn token (or the end
of sequence), scored against the reference answers. Raw text (``task: text``): loss and
perplexity of every token after the first, no chat template.

Every model's loss is kept per example (summed negative log-likelihood and target tokens), so
perplexity gets a bootstrap interval and a paired p-value like every other metric.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from rich.progress import Progress

from tunesmith.evaluation import metrics as M
from tunesmith import runtime
from tunesmith.api import ApiModel
from tunesmith.data.formats import Example
from tunesmith.data.render import PromptCut, collate, encode, encode_for_head, encode_text
from tunesmith.evaluation.scoring import score_candidates
from tunesmith.evaluation.answers import AnswerStore, EvaluationStopped, answer_all
from tunesmith.generation.generate import generate_replies, last_answer
from tunesmith.models import context_length
from tunesmith.training.losses import target_logprob_per_row

NLL = tuple[list[float], list[int]]  # per example: summed negative log-likelihood (nats), target tokens


@torch.no_grad()
def example_nll(model: torch.nn.Module, tokenizer: Any, examples: list[Example], max_seq_len: int, batch_size: int,
                bf16: bool, side: str = "middle") -> tuple[NLL, int]:
    """Each example's summed negative log-likelihood of its final answer (every token after the
    first, for raw text) and its number of target tokens, in example order; and the tokens read.
    An example left with no target after truncation counts 0 tokens (it adds nothing to the loss)."""
    was_training = model.training
    model.eval()
    dev = next(model.parameters()).device
    encoded, owner = [], []  # a long raw text is scored whole, window by window
    for i, ex in enumerate(examples):
        parts = encode_text(tokenizer, ex, max_seq_len) if ex.text is not None else [
            encode(tokenizer, ex, max_seq_len, last_turn_only=True, side=side)]
        encoded += parts
        owner += [i] * len(parts)
    nll = [0.0] * len(examples)
    counts = [0] * len(examples)
    order = sorted((j for j, e in enumerate(encoded) if e.n_targets), key=lambda j: len(encoded[j].input_ids))
    for i in range(0, len(order), batch_size):
        idx = order[i : i + batch_size]
        batch = {k: v.to(dev) for k, v in collate([encoded[j] for j in idx], tokenizer.pad_token_id).items()}
        with runtime.autocast(dev, bf16):
            logprob, count = target_logprob_per_row(model, batch)
        for j, lp, c in zip(idx, logprob.float().tolist(), count.tolist()):
            nll[owner[j]] -= lp
            counts[owner[j]] += c
    model.train(was_training)
    return (nll, counts), sum(len(e.input_ids) for e in encoded if e.n_targets)


@torch.no_grad()
def predict_labels(model: torch.nn.Module, tokenizer: Any, examples: list[Example], label_words: dict[str, str],
                   batch_size: int, bf16: bool, progress: Progress | None = None,
                   normalize: str = "sum", side: str = "middle") -> tuple[list[str], NLL, int, list[PromptCut | None]]:
    """The most likely label of each example, by the log-probability of its words: summed
    (``normalize="sum"``) or per token (``"mean"``).

    Each prompt is read once and every label's words after it (``evaluation.scoring``). Also
    returns each example's negative log-likelihood of its true label (and token count), from the
    same forward passes, the number of tokens read (each prompt once, then every label's own
    tokens: the work done), and each example's prompt cut (None where it fit: a prompt is cut only
    beyond the model's context, never to a training length).
    """
    model.eval()
    keys = list(label_words)
    context = context_length(model, tokenizer)  # the prompt budget is the model's, not train.max_seq_len
    candidates = []  # one encoding per (example, label), the label's words as the only target
    for ex in examples:
        prompt = ex.messages[: last_answer(ex)]  # few-shot turns (and their answers) stay
        for k in keys:
            answer = {"role": "assistant", "content": label_words[k]}
            candidates.append(encode(tokenizer, Example(prompt + [answer], source=ex.source), context,
                                     last_turn_only=True, side=side))
    task = progress.add_task("label scoring", total=len(examples), info="") if progress else None
    per_example = [candidates[i * len(keys) : (i + 1) * len(keys)] for i in range(len(examples))]
    scores, counts, tokens = score_candidates(model, per_example, tokenizer.pad_token_id, batch_size, bf16,
                                              lambda n: progress.update(task, advance=n) if progress is not None else None)
    true = torch.tensor([keys.index(ex.label) for ex in examples]).unsqueeze(1)  # (E, 1)
    nll = ((-scores.gather(1, true).squeeze(1)).tolist(), counts.gather(1, true).squeeze(1).tolist())
    ranking = scores / counts.clamp(min=1) if normalize == "mean" else scores
    cuts = [candidates[i * len(keys)].cut for i in range(len(examples))]  # the first label's prompt stands for all
    return [keys[j] for j in ranking.argmax(dim=1).tolist()], nll, tokens, cuts


@torch.no_grad()
def predict_with_head(model: torch.nn.Module, tokenizer: Any, examples: list[Example], labels: list[str],
                      batch_size: int, bf16: bool, progress: Progress | None = None,
                      side: str = "middle") -> tuple[list[str], NLL, int, list[PromptCut | None]]:
    """Predictions of a sequence-classification head, each example's cross-entropy on its true
    label (one "token" each), the number of tokens read, and each text's cut (None where it fit
    the encoder's context)."""
    model.eval()
    dev = next(model.parameters()).device
    index = {k: i for i, k in enumerate(labels)}
    encoded = [encode_for_head(tokenizer, ex, index, context_length(model, tokenizer), side) for ex in examples]
    task = progress.add_task("classifying", total=len(encoded), info="") if progress else None
    preds: list[str] = [""] * len(encoded)
    nll = [0.0] * len(encoded)
    order = sorted(range(len(encoded)), key=lambda j: len(encoded[j].input_ids))
    for i in range(0, len(order), batch_size):
        idx = order[i : i + batch_size]
        batch = {k: v.to(dev) for k, v in collate([encoded[j] for j in idx], tokenizer.pad_token_id).items()}
        with runtime.autocast(dev, bf16):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        ce = torch.nn.functional.cross_entropy(logits, batch["labels"], reduction="none").tolist()
        for j, k, c in zip(idx, logits.argmax(-1).tolist(), ce):
            preds[j], nll[j] = labels[k], c
        if progress is not None:
            progress.update(task, advance=len(idx))
    return preds, (nll, [1] * len(encoded)), sum(len(e.input_ids) for e in encoded), [e.cut for e in encoded]


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


@dataclass
class Evaluation:
    """One model's results on a test set: ``metrics`` (JSON-ready, each headline metric with a
    95% bootstrap interval under ``ci``), the predictions, the resamplable metric functions
    (``stats``) that paired comparisons with another model need, the tokens the model read and
    wrote (None for a remote model), each example's loss (None for a remote model), and each
    example's prompt cut (None where the prompt fit the model's context)."""

    metrics: dict[str, Any]
    predictions: list[str]
    stats: dict[str, M.Stat] = field(default_factory=dict)
    tokens: int | None = None
    nll: NLL | None = None
    cuts: list[dict[str, Any] | None] = field(default_factory=list)
    from_store: int = 0  # examples answered by an earlier, stopped evaluation (evaluation.answers)
    fresh_tokens: int = 0  # tokens read and written by the answers made in this sitting


@dataclass
class Predicted:
    """What a model answered: labels (classification) or texts, the metrics that come with the way
    of answering (invalid-answer rate), the tokens read and written, each example's loss, and each
    example's prompt cut (None where it fit)."""

    outputs: list[str]
    metrics: dict[str, Any]
    tokens: int | None
    nll: NLL | None = None
    cuts: list[PromptCut | None] = field(default_factory=list)


def predict(model: torch.nn.Module | ApiModel, tokenizer: Any, examples: list[Example], task: str,
            label_words: dict[str, str], max_seq_len: int, batch_size: int, max_new_tokens: int, bf16: bool,
            progress: Progress | None = None, label_scoring: str = "sum", classify_by: str = "scoring",
            head: bool = False, with_loss: bool = True, side: str = "middle",
            should_stop: Callable[[], bool] | None = None) -> Predicted:
    """The model's answer to every example, as ``evaluate_model`` scores it. ``with_loss=False``
    skips the separate loss pass that free generation otherwise adds (for timing answers alone).
    ``max_seq_len`` bounds the loss pass (as in training); prompts are bounded by the model's context."""
    if isinstance(model, ApiModel):
        before = model.tokens
        answers = _ask(model, examples, max_new_tokens, progress)
        tokens = (model.tokens - before) or None  # when the endpoint reports usage
        if task != "classification":
            return Predicted([a.strip() for a in answers], {}, tokens)
        preds = [parse_label(a, label_words) for a in answers]
        return Predicted(preds, {"invalid_rate": _invalid_rate(preds)}, tokens)
    if task == "text":  # nothing to answer: how well the model predicts each text
        nll, tokens = example_nll(model, tokenizer, examples, max_seq_len, batch_size, bf16, side)
        return Predicted([""] * len(examples), {}, tokens, nll)
    if task == "classification" and (head or classify_by == "scoring"):
        if head:
            preds, nll, tokens, cuts = predict_with_head(model, tokenizer, examples, list(label_words), batch_size, bf16,
                                                         progress, side)
        else:
            preds, nll, tokens, cuts = predict_labels(model, tokenizer, examples, label_words, batch_size, bf16, progress,
                                                      label_scoring, side)
        return Predicted(preds, {}, tokens, nll, cuts)
    texts, tokens, cuts = generate_replies(model, tokenizer, examples, max_new_tokens, batch_size, bf16, progress, side,
                                           should_stop)
    nll = None
    if with_loss:
        nll, read = example_nll(model, tokenizer, examples, max_seq_len, batch_size, bf16, side)
        tokens += read
    if task != "classification":
        return Predicted(texts, {}, tokens, nll, cuts)
    preds = [parse_label(a, label_words) for a in texts]
    return Predicted(preds, {"invalid_rate": _invalid_rate(preds)}, tokens, nll, cuts)


def evaluate_model(model: torch.nn.Module | ApiModel, tokenizer: Any, examples: list[Example], task: str,
                   label_words: dict[str, str], max_seq_len: int, batch_size: int, max_new_tokens: int,
                   bf16: bool, progress: Progress | None = None, label_scoring: str = "sum",
                   classify_by: str = "scoring", resamples: int = M.RESAMPLES, head: bool = False,
                   side: str = "middle", store: AnswerStore | None = None,
                   should_stop: Callable[[], bool] | None = None, description: str = "evaluating") -> Evaluation:
    """All metrics of ``task`` on ``examples``, with intervals, and the predictions (labels or texts).

    ``head``: the model is a sequence classifier (logits per label) rather than a generative model.
    An ``ApiModel`` (a remote endpoint) answers freely; its answers are parsed (classification)
    or scored as generations, with no loss (an API gives no log-likelihoods to compare).
    Answers are made ``batch_size`` examples at a time (free generation: decoded together by the
    generation engine) and kept in ``store`` (``evaluation.answers``:
    a stopped evaluation continues from there); ``should_stop()`` is checked between batches and
    between decoding steps (EvaluationStopped). ``progress`` shows one bar named ``description``.
    """
    task_bar = progress.add_task(description, total=len(examples), info="") if progress else None

    def answer(batch: list[Example]) -> tuple[list[str], NLL | None, int, list[Any]]:
        p = predict(model, tokenizer, batch, task, label_words, max_seq_len, batch_size, max_new_tokens, bf16, None,
                    label_scoring, classify_by, head, side=side, should_stop=should_stop)
        return p.outputs, p.nll, p.tokens or 0, p.cuts or [None] * len(batch)

    remote = isinstance(model, ApiModel)
    done_so_far = [0]

    def advance(n: int, kept: bool) -> None:  # kept answers are not this sitting's work: the rate starts after them
        done_so_far[0] += n
        if kept:
            progress.reset(task_bar, total=len(examples), completed=done_so_far[0])
        else:
            progress.update(task_bar, advance=n)

    done = answer_all(examples, answer, batch_size, store or AnswerStore(None, ""), should_stop or (lambda: False),
                      advance if progress is not None else None,
                      with_nll=not remote)  # every local way of answering also gives each example's loss
    nll = done.nll if not remote else None
    metrics: dict[str, Any] = {}
    if task == "classification" and (remote or (classify_by != "scoring" and not head)):
        metrics["invalid_rate"] = _invalid_rate(done.outputs)
    tokens = done.tokens if not remote or done.tokens else None
    result = scored(metrics, done.outputs, [references(ex) for ex in examples], task, label_words, resamples, tokens, nll)
    result.cuts, result.from_store, result.fresh_tokens = done.cuts, done.from_store, done.fresh_tokens
    return result


def scored(metrics: dict[str, Any], preds: list[str], refs: list[list[str]], task: str, label_words: dict[str, str],
           resamples: int = M.RESAMPLES, tokens: int | None = None, nll: NLL | None = None) -> Evaluation:
    """An ``Evaluation`` of ``preds`` against ``refs`` (each example's references, the first being
    the training target): the task's metrics added to ``metrics``, each with its 95% bootstrap interval."""
    values, stats = task_metrics(task, refs, preds, label_words, nll)
    metrics = dict(metrics) | values
    metrics["ci"] = {k: [v["low"], v["high"]] for k, v in M.with_intervals(metrics, stats, len(preds), resamples).items()}
    return Evaluation(metrics, preds, stats, tokens, nll)


def task_metrics(task: str, refs: list[Any], preds: list[str], label_words: dict[str, str],
                 nll: NLL | None = None) -> tuple[dict[str, Any], dict[str, M.Stat]]:
    """The task's metrics of ``preds`` against ``refs`` (and loss/perplexity from ``nll``), and their
    resamplable forms (for intervals and paired tests)."""
    values: dict[str, Any] = {}
    stats: dict[str, M.Stat] = {}
    if task == "classification":
        primary = [r[0] if isinstance(r, list) else r for r in refs]
        values, stats = (M.classification(primary, preds, list(label_words)),
                         M.classification_stats(primary, preds, list(label_words)))
    elif task != "text":
        values, stats = M.generation(refs, preds)
    if nll is not None:
        lm_values, lm_stats = M.language_model(*nll)
        values, stats = values | lm_values, stats | lm_stats
    return values, stats


def latency(model: torch.nn.Module | ApiModel, tokenizer: Any, examples: list[Example], task: str,
            label_words: dict[str, str], max_seq_len: int, max_new_tokens: int, bf16: bool, label_scoring: str = "sum",
            classify_by: str = "scoring", head: bool = False, progress: Progress | None = None,
            side: str = "middle", should_stop: Callable[[], bool] | None = None) -> dict[str, float]:
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
                None, label_scoring, classify_by, head, with_loss=False, side=side)  # one example: its label candidates in one batch
        return 1000 * (time.perf_counter() - t0)

    if not examples:
        return {}
    once(examples[0])
    times = []
    for ex in examples:
        if should_stop is not None and should_stop():
            raise EvaluationStopped("stopped while timing answers one at a time (latency is measured again)")
        times.append(once(ex))
        if progress is not None:
            progress.update(bar, advance=1)
    return _summary(times)


def _summary(times_ms: list[float]) -> dict[str, float]:
    return {"median_ms": float(np.median(times_ms)), "p95_ms": float(np.percentile(times_ms, 95)), "examples": len(times_ms)}


def _ask(model: ApiModel, examples: list[Example], max_new_tokens: int, progress: Progress | None) -> list[str]:
    bar = progress.add_task(f"asking {model.name}", total=len(examples), info="") if progress else None
    tick = (lambda: progress.update(bar, advance=1)) if progress is not None else None
    return model.chat_many([ex.messages[: last_answer(ex)] for ex in examples], max_new_tokens, tick)


def _invalid_rate(preds: list[str]) -> float:
    return sum(p == INVALID for p in preds) / max(len(preds), 1)


def reference(ex: Example) -> str:
    """What a perfect model answers: the gold label, the last assistant turn, or the raw text."""
    if ex.label is not None:
        return ex.label
    if ex.text is not None:
        return ex.text
    return [m for m in ex.messages if m["role"] == "assistant"][-1]["content"]


def references(ex: Example) -> list[str]:
    """Every gold answer of an example: ``reference(ex)`` first, then ``data.references`` (no repeats)."""
    return list(dict.fromkeys([reference(ex), *ex.references]))


def compare(a: Evaluation, b: Evaluation, n: int, resamples: int = M.RESAMPLES) -> dict[str, dict[str, float]]:
    """For every metric both have: A's value minus B's, the paired bootstrap p-value and its floor
    (1 / (1 + resamples), the value when no resample was as extreme).

    Perplexity is exp(loss): "same perplexity" and "same loss" are one hypothesis, so perplexity
    takes the loss's p-value (the shifted bootstrap test is not invariant to the exp, and two
    p-values for one question would disagree)."""
    out = {}
    for name in sorted(a.stats.keys() & b.stats.keys(), key=lambda k: k == "perplexity"):
        p = out["loss"]["p_value"] if name == "perplexity" and "loss" in out else \
            M.paired_p_value(a.stats[name], b.stats[name], n, resamples)
        out[name] = {"difference": float(a.metrics[name] - b.metrics[name]), "p_value": p,
                     "p_floor": 1 / (1 + resamples)}  # the smallest p the bootstrap can give
    return out


SMALL_TEST = 30  # below this many test examples, intervals and p-values mean little


def small_test_warning(n: int) -> str | None:
    """A warning for a test set too small for its intervals and p-values to be trusted."""
    if n >= SMALL_TEST:
        return None
    return (f"only {n} test examples: bootstrap intervals and p-values are unreliable below about {SMALL_TEST} "
            "(they can show p<0.05 for a difference of one or two examples); use a larger test split")

