"""Evaluation on held-out data: loss/perplexity, label-scored classification, ROUGE-L.

Classification with a generative model is done by scoring: for each example, the
log-likelihood of every label's words (and the end-of-turn token) after the prompt; the
most likely label is the prediction. No free text is parsed.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from rich.progress import Progress
from sklearn.metrics import accuracy_score, precision_recall_fscore_support

from tunesmith import runtime
from tunesmith.data.formats import Example
from tunesmith.data.render import collate, encode, encode_all, render
from tunesmith.train import evaluate_loss, target_logprob_per_row


def loss_metrics(model: torch.nn.Module, tokenizer: Any, examples: list[Example], max_seq_len: int,
                 batch_size: int, bf16: bool) -> dict[str, float]:
    """Mean loss per target token and perplexity on the examples' assistant turns."""
    encoded, _ = encode_all(tokenizer, examples, max_seq_len)
    loss = evaluate_loss(model, encoded, batch_size, tokenizer.pad_token_id, bf16)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50))}


@torch.no_grad()
def predict_labels(model: torch.nn.Module, tokenizer: Any, examples: list[Example], label_words: dict[str, str],
                   max_seq_len: int, batch_size: int, bf16: bool,
                   progress: Progress | None = None) -> tuple[list[str], float]:
    """The most likely label of each example, by the summed log-probability of its words.

    Also returns the loss per target token of the true labels, from the same forward passes.
    """
    model.eval()
    dev = next(model.parameters()).device
    keys = list(label_words)
    candidates = []  # one encoding per (example, label), the label's words as the only target
    for ex in examples:
        prompt = [m for m in ex.messages if m["role"] != "assistant"]
        for k in keys:
            candidates.append(encode(tokenizer, Example(prompt + [{"role": "assistant", "content": label_words[k]}]), max_seq_len))
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
    return [keys[j] for j in scores.argmax(dim=1).tolist()], loss


def classification_metrics(y_true: list[str], y_pred: list[str], labels: list[str]) -> dict[str, float]:
    """Accuracy and macro precision/recall/F1 (scikit-learn)."""
    p, r, f1, _ = precision_recall_fscore_support(y_true, y_pred, labels=labels, average="macro", zero_division=0)
    return {"accuracy": float(accuracy_score(y_true, y_pred)), "precision": float(p), "recall": float(r), "f1": float(f1)}


@torch.no_grad()
def generate(model: torch.nn.Module, tokenizer: Any, examples: list[Example], max_new_tokens: int,
             batch_size: int, bf16: bool, progress: Progress | None = None) -> list[str]:
    """Greedy replies to each example's conversation up to its last assistant turn."""
    model.eval()
    dev = next(model.parameters()).device
    prompts = []
    for ex in examples:
        last = max(i for i, m in enumerate(ex.messages) if m["role"] == "assistant")
        prompts.append(render(tokenizer, ex.messages[:last], add_generation_prompt=True))
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


def rouge_l(references: list[str], predictions: list[str]) -> float:
    """Mean ROUGE-L F-measure (``rouge-score``, with stemming)."""
    from rouge_score import rouge_scorer  # here: it pulls in nltk, which training never needs

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    scores = [scorer.score(ref, pred)["rougeL"].fmeasure for ref, pred in zip(references, predictions)]
    return sum(scores) / max(len(scores), 1)


def evaluate_model(model: torch.nn.Module, tokenizer: Any, examples: list[Example], task: str,
                   label_words: dict[str, str], max_seq_len: int, batch_size: int, max_new_tokens: int,
                   bf16: bool, progress: Progress | None = None) -> tuple[dict[str, float], list[str]]:
    """All metrics of ``task`` on ``examples``; also returns the predictions (labels or texts)."""
    if task == "classification":
        preds, loss = predict_labels(model, tokenizer, examples, label_words, max_seq_len, batch_size, bf16, progress)
        metrics = {"loss": loss, "perplexity": math.exp(min(loss, 50))}
        metrics |= classification_metrics([ex.label or "" for ex in examples], preds, list(label_words))
    else:
        metrics = loss_metrics(model, tokenizer, examples, max_seq_len, batch_size, bf16)
        preds = generate(model, tokenizer, examples, max_new_tokens, batch_size, bf16, progress)
        refs = [[m for m in ex.messages if m["role"] == "assistant"][-1]["content"] for ex in examples]
        metrics["rougeL"] = rouge_l(refs, preds)
    return metrics, preds
