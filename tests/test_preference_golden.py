"""Golden checks of the preference objectives against TRL 1.16's trainers on the same tiny model and batch.

Each test builds the TRL trainer (no training), collates its batch, and takes the loss (and gradients) of
``trainer.compute_loss``; ours runs on the very same token ids and target masks. Known, deliberate differences are
tested as such: TRL also trains the newline a ChatML template writes after ``<|im_end|>`` (never generated: the model
stops at ``<|im_end|>``; our SFT never trains it either), and TRL's ORPO takes its NLL over the prompt's tokens too
(the ORPO paper's is over the answer's; ours follows the paper), so ORPO is compared on its odds-ratio term.
"""

from __future__ import annotations

import copy
import os
import warnings

import pytest
import torch
import torch.nn.functional as F

from conftest import make_model, make_tokenizer
from tunesmith.data.pairs import Pair, encode_pair
from tunesmith.data.preference import PreferenceExample
from tunesmith.data.render import IGNORE, Encoded
from tunesmith.training import preference as P

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
warnings.filterwarnings("ignore", module="trl")
trl = pytest.importorskip("trl")  # a dev dependency (pyproject [dev]); CI installs it

ROWS = [("what is the capital of france ?", "paris .", "the quick brown fox"),
        ("hello world , how are you today ?", "fine , thanks .", "cliches"),
        ("Summarize the text in one sentence.", "a funny film", "one long string of cliches .")]


def _user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def _assistant(text: str) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": text}]


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


@pytest.fixture(scope="module")
def models(tok):
    """A policy and a different reference, weights scaled up so the distributions are far from uniform."""
    out = []
    for seed in (0, 11):  # 11: the KTO reference point (KL) of these rows is above 0, not clamped
        m = make_model(len(tok), seed=seed, attn_implementation="eager")
        with torch.no_grad():
            for p in m.parameters():
                p.mul_(3.0)
        out.append(m.float().eval())
    return out


def _common(tmp_path, n: int) -> dict:
    return dict(output_dir=str(tmp_path), report_to=[], bf16=False, gradient_checkpointing=False,
                per_device_train_batch_size=n, use_cpu=True, save_strategy="no", logging_strategy="no",
                dataloader_num_workers=0, seed=0)


def _paired_dataset():
    from datasets import Dataset

    return Dataset.from_list([{"prompt": _user(p), "chosen": _assistant(c), "rejected": _assistant(r)} for p, c, r in ROWS])


def _rows(ids: torch.Tensor, mask: torch.Tensor, targets: torch.Tensor) -> list[Encoded]:
    """Our encodings of a TRL batch's rows: padding cut off, the tokens where ``targets`` (bool) is set as targets."""
    out = []
    for i in range(len(ids)):
        n = int(mask[i].sum())
        row = ids[i, :n].tolist()
        out.append(Encoded(row, [x if on else IGNORE for x, on in zip(row, targets[i, :n].tolist())]))
    return out


def _pairs(chosen: list[Encoded], rejected: list[Encoded]) -> list[Pair]:
    return [Pair(c.input_ids, c.labels, rejected=r) for c, r in zip(chosen, rejected)]


def _ours(settings: P.Settings, policy, reference, pairs: list[Pair], pad_id: int, kl: bool = False):
    """Our loss (and its backward) on ``pairs`` with ``reference``'s log-probs precomputed."""
    if P.REFERENCE_FREE.count(settings.objective) == 0:
        for p, v in zip(pairs, P.compute_references(reference, pairs, pad_id, 8, False, lora=False)):
            p.reference = v
    objective = P.PreferenceLoss(settings, policy, pad_id)
    objective.begin_step(pairs)
    loss = objective.loss(policy, {}, pairs, 0)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None}, objective


def _grads_close(theirs: torch.nn.Module, ours: dict[str, torch.Tensor]) -> None:
    for name, p in theirs.named_parameters():
        assert p.grad is not None, name
        scale = float(p.grad.abs().max())  # fp32 noise grows with the loss's size (IPO's is ~25)
        torch.testing.assert_close(ours[name], p.grad, rtol=1e-4, atol=1e-5 * scale + 1e-8,
                                   msg=lambda m, name=name: f"{name}: {m}")


def test_pair_masks_match_trl_token_by_token_but_the_newline_after_end_of_turn(tmp_path, tok, models):
    trainer = trl.DPOTrainer(model=copy.deepcopy(models[0]), ref_model=copy.deepcopy(models[1]),
                             args=trl.DPOConfig(beta=0.1, max_length=1024, **_common(tmp_path, 3)),
                             train_dataset=_paired_dataset(), processing_class=tok)
    for i, (prompt, chosen, rejected) in enumerate(ROWS):
        batch = trainer.data_collator([trainer.train_dataset[i]])
        ours = encode_pair(tok, PreferenceExample(_user(prompt), chosen, rejected), 512)
        for side, enc in enumerate(ours.sides()):
            keep = batch["attention_mask"][side].bool()
            ids, mask = batch["input_ids"][side][keep].tolist(), batch["completion_mask"][side][keep].tolist()
            assert enc.input_ids == ids
            mine = [int(x != IGNORE) for x in enc.labels]
            assert ids[-2:] == tok.convert_tokens_to_ids(["<|im_end|>", "Ċ"])
            assert mine[:-1] == mask[:-1] and mask[-1] == 1 and mine[-1] == 0  # the trailing newline alone differs


@pytest.mark.parametrize("objective, loss_type, weights", [("dpo", ["sigmoid"], None), ("ipo", ["ipo"], None),
                                                           ("dpo", ["sigmoid", "sft"], [1.0, 0.5])])
def test_dpo_loss_and_gradients_equal_trl(tmp_path, tok, models, objective, loss_type, weights):
    kw = {"loss_weights": weights} if weights else {}
    theirs = copy.deepcopy(models[0]).train()
    trainer = trl.DPOTrainer(model=theirs, ref_model=copy.deepcopy(models[1]),
                             args=trl.DPOConfig(beta=0.1, loss_type=loss_type, max_length=1024, **kw,
                                                **_common(tmp_path, 3)),
                             train_dataset=_paired_dataset(), processing_class=tok)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(3)])
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    rows = _rows(batch["input_ids"], batch["attention_mask"], batch["completion_mask"].bool())
    pairs = _pairs(rows[:3], rows[3:])
    settings = P.Settings(objective, beta=0.1, sft_weight=weights[1] if weights else 0.0)
    policy = copy.deepcopy(models[0]).train()
    mine, grads, obj = _ours(settings, policy, models[1], pairs, tok.pad_token_id)
    torch.testing.assert_close(mine, loss.detach(), rtol=1e-5, atol=1e-6)
    _grads_close(theirs, grads)
    logged = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    parts = obj.parts()
    assert parts["rewards_chosen"] == pytest.approx(logged["rewards/chosen"], rel=1e-4, abs=1e-6)
    assert parts["reward_margin"] == pytest.approx(logged["rewards/margins"], rel=1e-4, abs=1e-6)


def _cpo_batch(tmp_path, tok, model, trainer_cls, config_cls, **kw):
    trainer = trainer_cls(model=model, args=config_cls(max_length=1024, **kw, **_common(tmp_path, 3)),
                          train_dataset=_paired_dataset(), processing_class=tok)
    return trainer, trainer.data_collator([trainer.train_dataset[i] for i in range(3)])


def _cpo_pairs(batch) -> list[Pair]:
    chosen = _rows(batch["chosen_input_ids"], batch["chosen_attention_mask"], batch["chosen_labels"] != IGNORE)
    rejected = _rows(batch["rejected_input_ids"], batch["rejected_attention_mask"], batch["rejected_labels"] != IGNORE)
    return _pairs(chosen, rejected)


def test_simpo_loss_and_gradients_equal_trl_cpo(tmp_path, tok, models):
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    theirs = copy.deepcopy(models[0]).train()
    trainer, batch = _cpo_batch(tmp_path, tok, theirs, CPOTrainer, CPOConfig, loss_type="simpo", beta=2.0,
                                simpo_gamma=0.5, cpo_alpha=0.0)
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    policy = copy.deepcopy(models[0]).train()
    mine, grads, _ = _ours(P.Settings("simpo", beta=2.0, simpo_gamma=0.5), policy, None, _cpo_pairs(batch),
                           tok.pad_token_id)
    torch.testing.assert_close(mine, loss.detach(), rtol=1e-5, atol=1e-6)
    _grads_close(theirs, grads)


def test_orpo_odds_ratio_term_equals_trl_and_our_gradient_equals_plain_autograd(tmp_path, tok, models):
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    trainer, batch = _cpo_batch(tmp_path, tok, copy.deepcopy(models[0]), ORPOTrainer, ORPOConfig, beta=0.1)
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, batch)
    nll_theirs = trainer._stored_metrics["train"]["nll_loss"][-1]
    pairs = _cpo_pairs(batch)
    policy = copy.deepcopy(models[0]).train()
    mine, grads, obj = _ours(P.Settings("orpo", beta=0.1), policy, None, pairs, tok.pad_token_id)
    nll_ours = obj.parts()["nll_chosen"]
    assert float(mine) - nll_ours == pytest.approx(float(loss) - nll_theirs, rel=1e-5, abs=1e-6)
    # the whole loss's gradient, against the formula written with plain autograd over full logits
    ref = copy.deepcopy(models[0]).train()
    logp, n = [], []
    for side in ([p.sides()[0] for p in pairs], [p.rejected for p in pairs]):
        for e in side:
            ids = torch.tensor([e.input_ids])
            lp = torch.log_softmax(ref(input_ids=ids).logits[0, :-1].float(), -1)
            y = torch.tensor(e.labels[1:])
            on = y != IGNORE
            logp.append(lp[on].gather(1, y[on][:, None]).sum())
            n.append(on.sum())
    logp, n = torch.stack(logp), torch.stack(n).float()
    c, r, nc, nr = logp[:3], logp[3:], n[:3], n[3:]
    ac, ar = c / nc, r / nr
    odds = (ac - ar) - (torch.log1p(-torch.exp(ac)) - torch.log1p(-torch.exp(ar)))
    plain = -c.sum() / nc.sum() - 0.1 * F.logsigmoid(odds).mean()
    plain.backward()
    torch.testing.assert_close(mine, plain.detach(), rtol=1e-5, atol=1e-6)
    _grads_close(ref, grads)


def test_kto_loss_and_gradients_equal_trl(tmp_path, tok, models):
    from datasets import Dataset

    data = Dataset.from_list([{"prompt": _user(p), "completion": _assistant(a), "label": good}
                              for p, c, r in ROWS for a, good in ((c, True), (r, False))])
    theirs = copy.deepcopy(models[0]).train()
    trainer = trl.KTOTrainer(model=theirs, ref_model=copy.deepcopy(models[1]),
                             args=trl.KTOConfig(beta=0.1, max_length=1024, **_common(tmp_path, 6)),
                             train_dataset=data, processing_class=tok)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(6)])
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    rows = _rows(batch["input_ids"], batch["attention_mask"], batch["completion_mask"].bool())
    kl = _rows(batch["KL_input_ids"], batch["KL_attention_mask"], batch["KL_completion_mask"].bool())
    pairs = [Pair(r.input_ids, r.labels, desirable=bool(good), kl=k) for r, k, good in zip(rows, kl, batch["label"])]
    policy = copy.deepcopy(models[0]).train()
    mine, grads, obj = _ours(P.Settings("kto", beta=0.1), policy, models[1], pairs, tok.pad_token_id)
    assert obj.parts()["kl"] > 0  # the reference point is not clamped away: the KL rows matter
    torch.testing.assert_close(mine, loss.detach(), rtol=1e-5, atol=1e-6)
    _grads_close(theirs, grads)


def test_head_logprob_gradient_equals_plain_log_softmax():
    torch.manual_seed(0)
    h = torch.randn(37, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(50, 16, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 50, (37,))
    g = torch.randn(37, dtype=torch.float64)
    P.HeadLogProb.apply(h, w, y, 8).mul(g).sum().backward()
    h2, w2 = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    torch.log_softmax(h2 @ w2.t(), -1).gather(1, y[:, None]).squeeze(1).mul(g).sum().backward()
    torch.testing.assert_close(h.grad, h2.grad)
    torch.testing.assert_close(w.grad, w2.grad)
