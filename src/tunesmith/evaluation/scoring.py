"""Label scoring with each prompt read once: the log-probability of every candidate answer.

A classification example asks the same prompt once per label; the candidates differ only after
the prompt. ``score_candidates`` runs the prompts of a batch of examples once (right-padded, no
attention mask: the causal kernel), keeps their KV cache, and then runs only each candidate's own
tokens on a copy of its example's cache. The sums are those of scoring each whole candidate
(the same forward pass, split at the prompt's end), while the prompt's work is done once instead
of once per label: about K times less work for K labels when prompts are long and answers short.
The tokens all prompts of a batch start with (a system prompt) run once too (``training.prefix``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from tunesmith import runtime
from tunesmith.data.render import IGNORE, Encoded
from tunesmith.models import unwrap
from tunesmith.training.losses import plain_head
from tunesmith.training.prefix import can_share, decode_shared, shared_length

SUFFIX_POSITIONS = 512  # candidate rows x answer positions whose log-probabilities are held at once


def shared_prefix(candidates: list[Encoded]) -> int:
    """Tokens every candidate of one example starts with, up to the first target token of any
    (the prompt): at least 1. Raises ValueError when the candidates share no first token."""
    first_target = min(next((j for j, y in enumerate(c.labels) if y != IGNORE), len(c.labels)) for c in candidates)
    ids = [c.input_ids for c in candidates]
    same = next((j for j in range(min(map(len, ids))) if len({x[j] for x in ids}) > 1), min(map(len, ids)))
    prefix = min(first_target, same)
    if prefix < 1:
        raise ValueError("candidate answers share no prompt token; nothing to score them after")
    return prefix


@torch.no_grad()
def score_candidates(model: torch.nn.Module, candidates: list[list[Encoded]], pad_id: int, batch_size: int, bf16: bool,
                     on_batch: Callable[[int], None] | None = None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Each candidate's summed log-probability of its target tokens (E, K) and their count (E, K),
    and the tokens read (each prompt once, then every candidate's own tokens).

    ``candidates[e]``: the K encodings of example ``e`` (prompt and one answer each; targets
    marked in ``labels``). Prompts are run ``batch_size`` examples at a time, shortest first;
    ``on_batch(n)`` is told of each batch of ``n`` examples done. The model is used as it stands
    (eval mode, active adapter); ``bf16`` autocasts the forward passes."""
    dev = next(model.parameters()).device
    n_ex, k = len(candidates), len(candidates[0]) if candidates else 0
    scores, counts = torch.zeros(n_ex, k), torch.zeros(n_ex, k, dtype=torch.long)
    prefixes = [shared_prefix(c) for c in candidates]
    order = sorted(range(n_ex), key=lambda e: prefixes[e])
    window = sliding_window(model)
    tokens = 0
    for idx in _batches(order, prefixes, candidates, max(1, batch_size), window):
        with runtime.autocast(dev, bf16):
            s, c = _score_batch(model, [candidates[e] for e in idx], [prefixes[e] for e in idx], pad_id, dev)
        scores[idx], counts[idx] = s, c
        tokens += sum(prefixes[e] + sum(len(x.input_ids) - prefixes[e] for x in candidates[e]) for e in idx)
        if on_batch is not None:
            on_batch(len(idx))
    return scores, counts, tokens


def sliding_window(model: torch.nn.Module) -> int | None:
    """The attention window (tokens) of the model's sliding-window layers, or None when every layer
    attends to all earlier tokens (``layer_types`` of Gemma 2/3; Mistral's ``sliding_window``)."""
    config = unwrap(model).config
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)
    if not window or (types is not None and "sliding_attention" not in types):
        return None
    return int(window)


def _batches(order: list[int], prefixes: list[int], candidates: list[list[Encoded]], size: int,
             window: int | None) -> list[list[int]]:
    """Examples in batches of ``size``, shortest prompt first. With a sliding window that a batch's
    padded prompt plus its longest answer could exceed, only prompts of one length share a batch:
    a shorter prompt's padding would sit inside the window (it counts cache slots, not tokens) and
    push real tokens out of it."""
    out = [order[i : i + size] for i in range(0, len(order), size)]
    if window is None:
        return out
    split = []
    for idx in out:
        width = max(prefixes[e] for e in idx)
        longest = max(len(c.input_ids) - prefixes[e] for e in idx for c in candidates[e])
        if width + longest <= window or len({prefixes[e] for e in idx}) == 1:
            split.append(idx)
        else:
            for length in sorted({prefixes[e] for e in idx}):
                split.append([e for e in idx if prefixes[e] == length])
    return split


def _score_batch(model: torch.nn.Module, batch: list[list[Encoded]], prefixes: list[int], pad_id: int,
                 dev: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, K) summed target log-probabilities and counts of one batch of examples."""
    b, k, width = len(batch), len(batch[0]), max(prefixes)
    ids = torch.full((b, width), pad_id, dtype=torch.long)
    for r, (cands, p) in enumerate(zip(batch, prefixes)):
        ids[r, :p] = torch.tensor(cands[0].input_ids[:p])
    cache = DynamicCache()
    first = _prompt_logprobs(model, ids.to(dev), torch.tensor(prefixes, device=dev), cache)  # (B, V)
    prompt_mask = (torch.arange(width) < torch.tensor(prefixes).unsqueeze(1)).long()  # (B, P)
    rows = [(r, j) for r in range(b) for j in range(k)]
    longest = max(len(c.input_ids) - p for cands, p in zip(batch, prefixes) for c in cands)
    step = max(1, SUFFIX_POSITIONS // longest)
    scores, counts = torch.zeros(b * k), torch.zeros(b * k, dtype=torch.long)
    for start in range(0, len(rows), step):
        part = rows[start : start + step]
        owner = torch.tensor([r for r, _ in part])
        suffix = [batch[r][j].input_ids[prefixes[r]:] for r, j in part]
        targets = [batch[r][j].labels[prefixes[r]:] for r, j in part]
        s_ids = torch.tensor([x + [pad_id] * (longest - len(x)) for x in suffix])  # (R, S) right-padded
        s_tgt = torch.tensor([y + [IGNORE] * (longest - len(y)) for y in targets])
        s_mask = torch.arange(longest) < torch.tensor([len(x) for x in suffix]).unsqueeze(1)  # (R, S)
        mask = torch.cat([prompt_mask.index_select(0, owner), s_mask.long()], 1)  # prompt pads masked out
        pos = torch.tensor([prefixes[r] for r, _ in part]).unsqueeze(1) + torch.arange(longest)
        sub = _rows_of(cache, owner.to(dev))
        logits = model(input_ids=s_ids.to(dev), attention_mask=mask.to(dev), position_ids=pos.to(dev), cache=sub,
                       use_cache=True).logits
        # the token at suffix position j is predicted by the prompt's last position (j = 0) or suffix position j-1
        tgt = s_tgt.clamp(min=0).to(dev)
        lp0 = first.index_select(0, owner.to(dev)).gather(1, tgt[:, :1])  # (R, 1)
        rest = logits[:, :-1].float()  # (R, S-1, V)
        lp_rest = rest.gather(2, tgt[:, 1:].unsqueeze(2)).squeeze(2) - rest.logsumexp(-1)  # (R, S-1)
        lp = torch.cat([lp0, lp_rest], 1).cpu()  # (R, S)
        hit = s_tgt != IGNORE
        flat = torch.tensor([r * k + j for r, j in part])
        scores[flat], counts[flat] = (lp * hit).sum(1), hit.sum(1)
    return scores.view(b, k), counts.view(b, k)


def _rows_of(cache: DynamicCache, owner: torch.Tensor) -> DynamicCache:
    """A cache of the prompt rows ``owner`` names (R,), each row's keys and values copied once
    (not the whole batch's cache copied, then cut down)."""
    return DynamicCache(ddp_cache_data=[(layer.keys.index_select(0, owner), layer.values.index_select(0, owner))
                                        for layer in cache.layers])


def _prompt_logprobs(model: torch.nn.Module, ids: torch.Tensor, lengths: torch.Tensor, cache: DynamicCache) -> torch.Tensor:
    """Log-probabilities (B, V) of the token after each row's prompt (``lengths`` real tokens,
    right-padded ``ids``), filling ``cache`` with the prompts' keys and values."""
    rows = torch.arange(ids.shape[0], device=ids.device)
    base = unwrap(model)
    if plain_head(base):  # the head on each row's last prompt position only
        decoder = base.get_decoder()
        q = shared_length(ids, most=int(lengths.min()) - 1)  # the prompts' common start (a system prompt)
        if q and can_share(model, decoder):
            hidden, _ = decode_shared(decoder, ids, q, cache)  # (B, P-q, d), cache of all P positions
        else:
            q, hidden = 0, decoder(input_ids=ids, cache=cache, use_cache=True).last_hidden_state
        logits = base.get_output_embeddings()(hidden[rows, lengths - 1 - q])
    else:  # models that post-process logits (soft-capping): their own full path
        logits = model(input_ids=ids, cache=cache, use_cache=True).logits[rows, lengths - 1]
    return F.log_softmax(logits.float(), -1)
