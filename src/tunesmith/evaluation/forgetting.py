"""Forgetting: how much of what the base model knew a tuned model lost, measured in every run.

Three measures on general data (``data/general.py``; ``eval.general``), base vs tuned:

- **General-text perplexity**: each model's perplexity on held-out general text (the shipped
  Wikipedia articles the run never trained on, or the user's file), at most ``eval.general_tokens``
  tokens, split evenly over the texts (one scored window per text, from its start).
- **Agreement**: ROUGE-L F1 of the tuned model's greedy replies to ``eval.general_instructions``
  everyday instructions against the base model's own greedy replies (1.0 = it still answers as
  the base did).
- **KL**: the mean per-token KL divergence KL(base || tuned) of the next-token distributions,
  teacher-forced on the base model's replies: sum_v p_base(v) (log p_base(v) - log p_tuned(v)),
  in nats per token (0 = the same distributions).

Each comes with a 95% bootstrap interval over texts / instructions, and the perplexity change
with a paired bootstrap p-value, like every other metric. The base and the tuned model are
observed one after the other (``Probe.observe`` then ``Probe.compare``), because a merged LoRA
model may share its weights with the base; the base's replies are cached under
``$TUNESMITH_HOME/general/`` by a fingerprint of its weights, so runs on one base generate them once.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from rich.progress import Progress

from tunesmith.evaluation import metrics as M
from tunesmith import runtime
from tunesmith.config import Config
from tunesmith.data import general
from tunesmith.data.formats import Example
from tunesmith.data.render import IGNORE, Encoded, collate, encode, encode_document
from tunesmith.generation.replies import cached_replies
from tunesmith.training.losses import plain_head, target_hidden, target_logprob_per_row
from tunesmith.models import unwrap

MIN_WINDOW = 32  # tokens scored per general text at least, whatever eval.general_tokens says


@dataclass
class Observed:
    """What the base model did on the general data: per window summed NLL and token count, its
    replies, and its next-token log-probabilities over those replies ((N, V) per instruction)."""

    nll: tuple[list[float], list[int]]
    replies: list[str]
    logprobs: list[torch.Tensor]
    seconds: float


class Probe:
    """The forgetting check of one run: ``observe(base)``, then ``compare(tuned, observed)``.

    ``enabled`` is False when ``eval.general`` is ``none``; then both calls do nothing."""

    def __init__(self, tokenizer: Any, cfg: Config, bf16: bool, batch_size: int = 8,
                 should_stop: Callable[[], bool] | None = None) -> None:
        self.tokenizer, self.cfg, self.bf16, self.batch_size = tokenizer, cfg, bf16, batch_size
        self.should_stop = should_stop  # a stop request ends the replies (EvaluationStopped); what is cached stays
        e = cfg.eval
        self.enabled = str(e.general).lower() != "none"
        if not self.enabled:
            return
        texts = general.eval_texts(e.general)
        self.available = len(texts)
        texts, per_text = within_budget(texts, e.general_tokens)
        self.windows = _windows(tokenizer, texts, per_text)  # not cut to train.max_seq_len: runs stay comparable
        self.instructions = general.eval_instructions(e.general_instructions)
        self.note = None
        if self.instructions and not getattr(tokenizer, "chat_template", None):  # a base model: no way to ask it
            self.instructions = []
            self.note = "the model has no chat template: agreement and KL on general instructions were skipped"
        self.source = "general (shipped: Wikipedia articles 1-8, everyday instructions)" if e.general == "general" else e.general

    @torch.no_grad()
    def observe(self, base: torch.nn.Module, progress: Progress | None = None) -> Observed | None:
        """The base model's side: general-text losses, greedy replies (cached), log-probs on them."""
        if not self.enabled or not plain_head(unwrap(base)):
            return None
        t0 = time.perf_counter()
        nll = self._nll(base)
        replies = self._base_replies(base, progress) if self.instructions else []
        logprobs = [lp.cpu() for lp in self._reply_logprobs(base, replies)] if replies else []
        return Observed(nll, replies, logprobs, time.perf_counter() - t0)

    @torch.no_grad()
    def compare(self, tuned: torch.nn.Module, observed: Observed | None, progress: Progress | None = None,
                resamples: int = M.RESAMPLES) -> dict[str, Any] | None:
        """The ``forgetting`` block of eval.json: each measure for base and tuned with intervals, and
        the changes; None when the check is off or the model has no language-model head."""
        if observed is None:
            return None
        t0 = time.perf_counter()
        n_text = len(self.windows)
        base_values, base_stats = M.language_model(*observed.nll)
        tuned_nll = self._nll(tuned)
        tuned_values, tuned_stats = M.language_model(*tuned_nll)
        block: dict[str, Any] = {
            "source": self.source, "general_texts": n_text, "general_tokens": int(sum(observed.nll[1])),
            **({"general_texts_available": self.available} if self.available > n_text else {}),
            "instructions": len(self.instructions), **({"note": self.note} if self.note else {}),
            "base": {"perplexity": base_values["perplexity"],
                     "ci": _ci(base_values, {"perplexity": base_stats["perplexity"]}, n_text, resamples)},
            "tuned": {"perplexity": tuned_values["perplexity"],
                      "ci": _ci(tuned_values, {"perplexity": tuned_stats["perplexity"]}, n_text, resamples)},
        }
        p = M.paired_p_value(tuned_stats["loss"], base_stats["loss"], n_text, resamples) if n_text else float("nan")
        change = tuned_values["perplexity"] / base_values["perplexity"] - 1 if base_values["perplexity"] else float("nan")
        block["change"] = {"perplexity": tuned_values["perplexity"] - base_values["perplexity"],
                           "perplexity_relative": change, "p_value": p, "p_floor": 1 / (1 + resamples)}
        if self.instructions:
            replies = cached_replies(tuned, self.tokenizer, self._conversations(), self.cfg.eval.general_max_new_tokens,
                                     self.batch_size, self.bf16, progress, self.should_stop)
            agree_values, agree_stats = _agreement(observed.replies, replies)
            kl_values, kl_stats = _mean_per_token(self._kl(tuned, observed))
            n = len(self.instructions)
            block["tuned"] |= agree_values | kl_values
            block["tuned"]["ci"] |= _ci(agree_values | kl_values, agree_stats | kl_stats, n, resamples)
            block["examples"] = [{"instruction": q, "base": b, "tuned": t}
                                 for q, b, t in list(zip(self.instructions, observed.replies, replies))[:4]]
        block["seconds"] = observed.seconds + time.perf_counter() - t0
        return block

    # ------------------------------------------------------------ the pieces

    def _nll(self, model: torch.nn.Module) -> tuple[list[float], list[int]]:
        """Summed NLL (nats) and target count of each general-text window."""
        dev = next(model.parameters()).device
        was = model.training
        model.eval()
        nll, counts = [], []
        for i in range(0, len(self.windows), self.batch_size):
            batch = {k: v.to(dev) for k, v in collate(self.windows[i : i + self.batch_size], self.tokenizer.pad_token_id).items()}
            with runtime.autocast(dev, self.bf16):
                logprob, count = target_logprob_per_row(model, batch)
            nll += (-logprob.float()).tolist()
            counts += count.tolist()
        model.train(was)
        return nll, counts

    def _conversations(self) -> list[Example]:
        return [Example([{"role": "user", "content": q}], source=f"general instruction {i + 1}")
                for i, q in enumerate(self.instructions)]

    def _base_replies(self, base: torch.nn.Module, progress: Progress | None) -> list[str]:
        """The base model's greedy replies, from the cache when this base (by its weights) made them."""
        return cached_replies(base, self.tokenizer, self._conversations(), self.cfg.eval.general_max_new_tokens,
                              self.batch_size, self.bf16, progress, self.should_stop)

    def _encoded_replies(self, replies: list[str]) -> list[Encoded]:
        """Each instruction with the base reply as its answer; the reply (and end of turn) are the targets."""
        return [encode(self.tokenizer, Example(ex.messages + [{"role": "assistant", "content": r}], source=ex.source),
                       self.cfg.train.max_seq_len, last_turn_only=True)
                for ex, r in zip(self._conversations(), replies)]

    def _reply_logprobs(self, model: torch.nn.Module, replies: list[str]) -> list[torch.Tensor]:
        """Per instruction, the model's next-token log-probabilities at each reply target: (N_i, V) fp32."""
        dev = next(model.parameters()).device
        was = model.training
        model.eval()
        out: list[torch.Tensor] = []
        head = unwrap(model).get_output_embeddings()
        encoded = self._encoded_replies(replies)
        for i in range(0, len(encoded), self.batch_size):
            part = encoded[i : i + self.batch_size]
            batch = {k: v.to(dev) for k, v in collate(part, self.tokenizer.pad_token_id).items()}
            with runtime.autocast(dev, self.bf16):
                h, _, rows = target_hidden(model, batch)  # (N, d), targets of the batch in row order
                for r in range(len(part)):  # (N_r, V) per reply: the whole batch's (N, V) never at once
                    out.append(F.log_softmax(head(h[rows == r]).float(), dim=-1))
        model.train(was)
        return out

    def _kl(self, tuned: torch.nn.Module, observed: Observed) -> list[tuple[float, int]]:
        """Per instruction: summed KL(base || tuned) over the reply's tokens (nats), and their count."""
        out = []
        for base_lp, tuned_lp in zip(observed.logprobs, self._reply_logprobs(tuned, observed.replies)):
            kl = (base_lp.exp() * (base_lp - tuned_lp.cpu())).sum(-1)  # (N,)
            out.append((float(kl.sum()), int(kl.numel())))
        return out


def within_budget(texts: list[str], tokens: int) -> tuple[list[str], int]:
    """The texts to score and the window per text so that at most ``tokens`` are scored in all:
    every text with ``tokens // len(texts)`` each while that is at least ``MIN_WINDOW``; else (a
    file of many short lines, e.g. one paragraph per line) ``tokens // MIN_WINDOW`` texts spread
    evenly over the file, ``MIN_WINDOW`` or more each."""
    if not texts:
        return [], MIN_WINDOW
    n = min(len(texts), max(1, tokens // MIN_WINDOW))
    if n < len(texts):
        texts = [texts[i * len(texts) // n] for i in range(n)]  # evenly spread, the first included
    return texts, max(1, tokens // n)


def _windows(tokenizer: Any, texts: list[str], per_text: int) -> list[Encoded]:
    """One window per text: its first ``per_text`` tokens, every token but the first a target. The
    same whatever the run's ``train.max_seq_len``, so every run on one base scores the same text."""
    out = []
    for text in texts:
        # a prefix is enough (whole articles took ~0.5 s per run); with a margin of tokens beyond the
        # window, the cut word cannot change the window's tokens; else the whole text
        ids = encode_document(tokenizer, text[: per_text * 12])
        if len(ids) < per_text + 32 and len(text) > per_text * 12:
            ids = encode_document(tokenizer, text)
        ids = ids[:per_text]
        if len(ids) >= 2:
            out.append(Encoded(ids, [IGNORE] + ids[1:], source="general text"))
    return out


def _ci(values: dict[str, float], stats: dict[str, M.Stat], n: int, resamples: int) -> dict[str, list[float]]:
    """95% bootstrap intervals as eval.json writes them: ``{metric: [low, high]}``."""
    return {k: [v["low"], v["high"]] for k, v in M.with_intervals(values, stats, n, resamples).items()}


def _agreement(base: list[str], tuned: list[str]) -> tuple[dict[str, float], dict[str, M.Stat]]:
    """Mean ROUGE-L F1 of each tuned reply against the base's; an identical reply scores 1 (ROUGE
    gives 0 to replies with no word characters, even equal ones)."""
    scores = np.asarray([1.0 if t == b else r for b, t, r in zip(base, tuned, M.rouge([[b] for b in base], tuned)["rougeL"])])
    stats: dict[str, M.Stat] = {"agreement_rougeL": lambda idx: float(scores[idx].mean())}
    return {"agreement_rougeL": stats["agreement_rougeL"](np.arange(len(scores)))}, stats


def _mean_per_token(kl: list[tuple[float, int]]) -> tuple[dict[str, float], dict[str, M.Stat]]:
    """Token-weighted mean KL over instructions, resamplable by instruction."""
    s = np.asarray([k for k, _ in kl], dtype=float)
    c = np.asarray([n for _, n in kl], dtype=float)
    stats: dict[str, M.Stat] = {"kl": lambda idx: float(s[idx].sum() / max(c[idx].sum(), 1.0))}
    return {"kl": stats["kl"](np.arange(len(s)))}, stats


def skipped(cfg: Config, probe: Probe | None, head: bool = False) -> str | None:
    """Why a run measures no forgetting (a phrase for the console), or None when it does."""
    if cfg.method == "prompt":
        return "the prompt method leaves the base model's weights as they are"
    if probe is not None and not probe.enabled:
        return "eval.general: none"
    if head:
        return "a classification head has no language-model head to compare"
    return None


def summary_line(block: dict[str, Any]) -> str:
    """One console line for a ``forgetting`` block."""
    b, t, c = block["base"], block["tuned"], block["change"]
    line = (f"forgetting ({block['general_texts']} general texts, {block['general_tokens']:,} tokens): perplexity "
            f"{b['perplexity']:.2f} -> {t['perplexity']:.2f} ({c['perplexity_relative']:+.1%}, {M.p_is(c['p_value'], c.get('p_floor'))})")
    if "agreement_rougeL" in t:
        line += (f"; agreement with the base's replies (ROUGE-L) {t['agreement_rougeL']:.2f}; "
                 f"KL(base||tuned) {t['kl']:.3f} nats/token")
    return line + f"; {block['seconds']:.1f} s"
