"""Replay, distillation and weight anchoring (issue 12), on tiny random models: seconds each."""

import copy
import json
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
import yaml

from tunesmith.training import loop as train_mod
from tunesmith.config import Config, TrainConfig
from tunesmith.data import collate, encode_all
from tunesmith.data.general import train_texts
from tunesmith.data.formats import Example
from tunesmith.data.render import IGNORE, Encoded, collate_packed, encode
from tunesmith.data.replay import mix, replay_rows
from tunesmith.methods import lora
from tunesmith.models import ModelError, load_model
from tunesmith.training.loop import train
from tunesmith.training.mitigations import Mitigations, build, load_teacher
from tunesmith.training.anchoring import Anchor, estimate_fisher
from tunesmith.training.losses import head_kl_sum, kl_from_logits
from conftest import examples, make_model

LABELS = {"0": "negative", "1": "positive"}


@pytest.fixture
def encoded(tokenizer, sst_files):
    exs = examples(sst_files["train"], "classification", labels=LABELS, system_prompt="Classify the sentiment.")
    return encode_all(tokenizer, exs, 128)[0]


@pytest.fixture(scope="module")
def pool(tokenizer):
    return replay_rows(tokenizer, train_texts("general")[:3], 64)


def tcfg(**kw) -> TrainConfig:
    base = dict(max_steps=1, batch_size=8, grad_accum=1, lr=1e-2, warmup_steps=0, eval_every=100, precision="fp32", seed=0)
    return TrainConfig(**(base | kw))


def lora_model(model, dropout=0.0):
    c = Config(method="lora")
    c.lora.r, c.lora.alpha, c.lora.dropout = 4, 8, dropout
    c.train.precision = "fp32"
    return lora.prepare(model, c)


def params_of(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


# ---------------------------------------------------------------- distillation loss


@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_kl_is_zero_when_student_equals_teacher(direction):
    g = torch.Generator().manual_seed(0)
    h, w = torch.randn(7, 16, generator=g), torch.randn(50, 16, generator=g)
    assert abs(float(head_kl_sum(h, w, h, w, 2.0, direction, chunk=3))) < 1e-5


@pytest.mark.parametrize("direction", ["forward", "reverse"])
@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_fused_kl_and_its_gradients_equal_autograd_on_full_logits(direction, temperature):
    g = torch.Generator().manual_seed(1)
    h = torch.randn(9, 16, generator=g, requires_grad=True)
    w = torch.randn(50, 16, generator=g, requires_grad=True)
    h_t, w_t = torch.randn(9, 16, generator=g), torch.randn(50, 16, generator=g)
    ours = head_kl_sum(h, w, h_t, w_t, temperature, direction, chunk=4)  # 3 chunks, the last one short
    ref = kl_from_logits(h @ w.t(), h_t @ w_t.t(), temperature, direction).sum()
    # an independent formula: torch's kl_div(input=log q, target=log p) = sum p (log p - log q)
    ls, lt = F.log_softmax(h @ w.t() / temperature, -1), F.log_softmax(h_t @ w_t.t() / temperature, -1)
    p, q = (lt, ls) if direction == "forward" else (ls, lt)
    torch_kl = F.kl_div(q, p, log_target=True, reduction="sum") * temperature**2
    torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(ref, torch_kl)
    assert float(ours.detach()) > 0
    g_ours = torch.autograd.grad(3.0 * ours, [h, w])  # an outer factor: backward scales the saved gradients
    g_ref = torch.autograd.grad(3.0 * torch_kl, [h, w])
    for a, b in zip(g_ours, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- anchoring


def test_l2sp_is_zero_at_the_start_and_its_gradient_points_back_to_w0(tiny_model):
    model = lora_model(tiny_model)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    anchor = Anchor(params, strength=0.5)
    assert anchor.penalty() == 0.0
    w0 = params_of(model)
    with torch.no_grad():
        for p in params.values():
            p.add_(0.01 * torch.randn_like(p))
    moved = {n: p.detach().clone() - w0[n] for n, p in params.items()}
    # the formula by autograd: 0.5 / 2 * sum (w - w0)^2
    ref = 0.25 * sum(((p - w0[n]) ** 2).sum() for n, p in params.items())
    ref_grads = torch.autograd.grad(ref, list(params.values()))
    value = anchor.add_grad()
    assert math.isclose(value, float(ref.detach()), rel_tol=1e-5)
    for (n, p), rg in zip(params.items(), ref_grads):
        torch.testing.assert_close(p.grad, rg)
        assert float((-p.grad * (-moved[n])).sum()) > 0  # a descent step moves w toward w0


class TwoParams(torch.nn.Module):
    """Vocabulary {0, 1}; the logit of token 1 after token x is a + b x (token 0's is 0)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Parameter(torch.tensor(0.3))
        self.b = torch.nn.Parameter(torch.tensor(-0.7))

    def forward(self, input_ids, **_):
        z = self.a + self.b * input_ids.float()  # (B, T)
        return SimpleNamespace(logits=torch.stack([torch.zeros_like(z), z], -1))


def test_ewc_fisher_equals_a_hand_computation():
    model = TwoParams()
    windows = [Encoded([1, 0, 1, 1], [IGNORE, 0, 1, 1]), Encoded([0, 0, 1], [IGNORE, 0, 1]),
               Encoded([1, 1], [IGNORE, 1])]
    fisher = estimate_fisher(model, dict(model.named_parameters()), windows, pad_id=0)
    a, b = 0.3, -0.7
    expected = [0.0, 0.0]
    for w in windows:  # d/d(a, b) of the window's mean NLL, squared, averaged over windows
        ga = gb = 0.0
        pairs = list(zip(w.input_ids[:-1], w.input_ids[1:]))
        for x, y in pairs:
            s = 1 / (1 + math.exp(-(a + b * x)))  # P(next = 1); d NLL / dz = s - y
            ga += (s - y) / len(pairs)
            gb += (s - y) * x / len(pairs)
        expected[0] += ga**2 / len(windows)
        expected[1] += gb**2 / len(windows)
    assert math.isclose(float(fisher["a"]), expected[0], rel_tol=1e-5)
    assert math.isclose(float(fisher["b"]), expected[1], rel_tol=1e-5)


# ---------------------------------------------------------------- replay


@pytest.mark.parametrize("by", ["examples", "tokens"])
def test_replay_ratio_holds_over_an_epoch(encoded, pool, by):
    assert all(e.kind == "replay" and e.labels[0] == IGNORE for e in pool)
    mixed, summary = mix(encoded, pool, 0.3, by, seed=3)
    assert mixed[: len(encoded)] == encoded and summary["rows"] == len(mixed) - len(encoded)
    cfg = tcfg(batch_size=4)
    lengths = [len(e.input_ids) for e in mixed]
    steps = math.ceil(len(mixed) / 4)
    seen = [mixed[i] for pos in range(steps) for mb in train_mod.step_batches(lengths, cfg, 0, pos) for i in mb]
    assert sorted(map(id, seen)) == sorted(map(id, mixed))  # one epoch visits every row once
    replay = [e for e in seen if e.kind == "replay"]
    share = len(replay) / len(seen) if by == "examples" else \
        sum(e.n_targets for e in replay) / sum(e.n_targets for e in seen)
    assert abs(share - 0.3) < 0.01, share
    assert summary[f"achieved_ratio_{by}"] == pytest.approx(share)
    assert mix(encoded, pool, 0.3, by, seed=3)[0] == mixed  # deterministic with the seed
    assert mix(encoded, pool, 0.3, by, seed=4)[0] != mixed


def test_length_grouping_spreads_replay_rows_over_the_steps():
    """Replay rows longer than the task rows used to fill whole steps (some all replay, others none):
    each step now gets its share of each kind, and still one epoch visits every row once."""
    from tunesmith.data.render import Encoded

    task = [Encoded(list(range(5 + i % 4)), [1] * (5 + i % 4)) for i in range(90)]
    replay = [Encoded(list(range(60 + i % 9)), [1] * (60 + i % 9), kind="replay") for i in range(30)]
    rows = task + replay  # 25% replay, all longer than every task row
    lengths = [len(e.input_ids) for e in rows]
    cfg = tcfg(batch_size=4, grad_accum=2)  # 8 per step: 2 replay rows each
    groups = [e.kind for e in rows]
    steps = [[i for mb in train_mod.step_batches(lengths, cfg, 0, pos, groups) for i in mb] for pos in range(15)]
    assert sorted(i for st in steps for i in st) == list(range(120))
    assert [sum(rows[i].kind == "replay" for i in st) for st in steps] == [2] * 15
    old = [[i for mb in train_mod.step_batches(lengths, cfg, 0, pos) for i in mb] for pos in range(15)]
    assert max(sum(rows[i].kind == "replay" for i in st) for st in old) == 8  # without groups: all-replay steps
    for st in steps:  # micro-batches still hold rows of similar lengths: the step's longest first
        assert [lengths[i] for i in st] == sorted((lengths[i] for i in st), reverse=True)


def test_replay_repeats_windows_when_the_general_text_is_short(encoded, pool):
    mixed, summary = mix(encoded, pool[:2], 0.5, "examples", seed=0)
    assert summary["rows"] == len(encoded) and summary["repeated"] and "repeat" in summary["note"]
    assert mix(encoded, pool, 0.0, "examples", seed=0)[0] == encoded


# ---------------------------------------------------------------- teacher and distilled positions


def test_lora_base_teacher_gives_the_base_models_logits(tiny_model_dir, tokenizer, encoded, tmp_path):
    student = lora_model(load_model(str(tiny_model_dir))[0])
    train(student, encoded, encoded[:4], tcfg(), tmp_path, tokenizer.pad_token_id, show_progress=False)  # B != 0
    teacher = load_teacher("base", student, tokenizer, Config(method="lora"))
    assert teacher.adapters_off
    alone = load_model(str(tiny_model_dir))[0].eval()
    batch = collate(encoded[:4], tokenizer.pad_token_id)
    with torch.no_grad():
        ref = alone(input_ids=batch["input_ids"]).logits
        tuned = student.eval()(input_ids=batch["input_ids"]).logits
    torch.testing.assert_close(teacher.logits(batch), ref, rtol=1e-5, atol=1e-5)
    assert (tuned - ref).abs().max() > 1e-4  # the student itself is not the base


def test_a_teacher_with_another_vocabulary_is_refused(tiny_model, tokenizer, tmp_path):
    other = copy.deepcopy(tokenizer)
    other.add_tokens(["zzzextra"])
    make_model(len(other)).save_pretrained(tmp_path / "other")
    other.save_pretrained(tmp_path / "other")
    with pytest.raises(ModelError, match="vocabulary differs"):
        load_teacher(str(tmp_path / "other"), tiny_model, tokenizer, Config(method="full"))


def test_distilled_positions_follow_the_packed_layout(encoded, pool, tokenizer):
    rows = [pool[0], encoded[0], pool[1], encoded[1]]
    m = Mitigations(on="both", packing=True, max_seq_len=256)
    batch = collate_packed(rows, tokenizer.pad_token_id, 256)
    mask = m.positions(rows, tuple(batch["input_ids"].shape))
    assert int(mask.sum()) == sum(sum(m.distilled(e)) for e in rows)
    only_replay = Mitigations(on="replay", packing=True, max_seq_len=256)
    batch = collate_packed(pool[:3], tokenizer.pad_token_id, 256)
    torch.testing.assert_close(only_replay.positions(pool[:3], tuple(batch["input_ids"].shape)),
                               batch["labels"][:, 1:] != IGNORE)
    prompts = Mitigations(on="prompts").distilled(encoded[0])  # the prompt predicting its next token, no answer
    assert prompts == [y == IGNORE for y in encoded[0].labels[1:]] and any(prompts) and not all(prompts)


# ---------------------------------------------------------------- the loop


def mitigation_config(tmp_path, **kw) -> Config:
    c = Config(method="lora", output_dir=str(tmp_path))
    c.train = tcfg(**kw)
    c.distill.weight, c.distill.on, c.distill.temperature, c.distill.direction = 0.5, "both", 2.0, "reverse"
    c.anchor.method, c.anchor.strength, c.anchor.fisher_examples = "ewc", 100.0, 3
    c.train.max_seq_len = 64
    return c


def test_distillation_is_normalised_over_the_step(tokenizer, encoded, pool, tmp_path):
    data, _ = mix(encoded, pool, 0.3, "examples", seed=0)
    c = mitigation_config(tmp_path)
    a = lora_model(make_model(len(tokenizer)))
    b = copy.deepcopy(a)
    for m, (bs, acc) in ((a, (8, 1)), (b, (2, 4))):
        objective, _ = build(c, m, tokenizer, tmp_path / f"r{bs}", False, tokenizer.pad_token_id)
        train(m, data, encoded[:4], tcfg(batch_size=bs, grad_accum=acc, max_steps=2), tmp_path / f"r{bs}",
              tokenizer.pad_token_id, show_progress=False, objective=objective)
    pa, pb = params_of(a), params_of(b)
    for n in pa:
        torch.testing.assert_close(pa[n], pb[n], msg=n)


def test_resume_with_ewc_and_distillation_is_exact(tokenizer, encoded, pool, tmp_path):
    data, _ = mix((encoded * 2)[:28], pool, 0.3, "examples", seed=0)  # 40 rows, batch 4: 10 steps
    c = mitigation_config(tmp_path, max_steps=10, batch_size=4, lr=5e-3, warmup_steps=2)

    def run(folder, resume=False, until=None):
        model = lora_model(make_model(len(tokenizer)), dropout=0.1)  # a fresh process starts from the base
        objective, summary = build(c, model, tokenizer, tmp_path / folder, resume, tokenizer.pad_token_id)
        r = train(model, data, data[:4], c.train, tmp_path / folder, tokenizer.pad_token_id, resume=resume,
                  until_step=until, show_progress=False, objective=objective)
        return model, r, summary

    straight, r1, s1 = run("straight")
    _, r2, _ = run("resumed", until=5)
    assert r2.interrupted and r2.steps == 5 and "estimated" in s1["anchor"]["fisher"]
    second, r3, s3 = run("resumed", resume=True)
    assert s3["anchor"]["fisher"] == "read back from the run folder"
    p1, p3 = params_of(straight), params_of(second)
    for n in p1:
        assert torch.equal(p1[n], p3[n]), n
    lines = lambda r: [(x["loss"], x["ce"], x["kl"], x["anchor"]) for x in r.history if x["type"] == "train"]  # noqa: E731
    assert lines(r1) == lines(r3) and len(lines(r3)) == 10
    assert lines(r1)[0][3] == 0.0 and lines(r1)[-1][3] > 0  # the anchor starts at zero, then pulls


def test_finetune_with_replay_distillation_and_anchoring(tiny_model_dir, tmp_path):
    from tunesmith import finetune, load_config

    rows = [{"instruction": f"Say hello {i}", "input": "" if i % 2 else "world", "output": f"hello {i} !"} for i in range(16)]
    (tmp_path / "inst.json").write_text(json.dumps(rows))
    cfg = {"name": "mitigated", "model": str(tiny_model_dir), "task": "instruction", "method": "lora",
           "output_dir": str(tmp_path / "runs"),
           "data": {"train": str(tmp_path / "inst.json"), "validation_size": 3, "prepare": {"test_size": 3}},
           "lora": {"r": 4, "alpha": 8},
           "train": {"max_steps": 3, "batch_size": 4, "lr": 1e-2, "precision": "fp32", "max_seq_len": 64},
           "replay": {"ratio": 0.25, "by": "tokens"},
           "distill": {"weight": 0.5, "on": "both", "temperature": 2.0},
           "anchor": {"method": "l2sp", "strength": 10.0},
           "eval": {"max_new_tokens": 4, "compare_with_base": False, "latency_examples": 0}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    run = finetune(load_config(tmp_path / "c.yaml"))
    lines = [json.loads(x) for x in (run.dir / "metrics.jsonl").read_text().splitlines()]
    steps = [x for x in lines if x["type"] == "train"]
    assert len(steps) == 3 and all({"ce", "kl", "anchor"} <= x.keys() for x in steps)
    for x in steps:
        assert x["loss"] == pytest.approx(x["ce"] + 0.5 * x["kl"] + x["anchor"], rel=1e-5)
    assert any(x["kl"] > 0 for x in steps)
    result = json.loads((run.dir / "train_result.json").read_text())["mitigations"]
    assert result["replay"]["rows"] > 0 and abs(result["replay"]["achieved_ratio_tokens"] - 0.25) < 0.01
    trained = sum(x["replay_target_tokens"] for x in steps) / sum(x["target_tokens"] for x in steps)
    assert 0 < trained < 1 and result["replay"]["trained_ratio_tokens"] == pytest.approx(trained)  # what 3 steps saw
    assert result["distill"]["teacher"].startswith("base") and result["anchor"]["method"] == "l2sp"


def test_config_refuses_what_cannot_work():
    from tunesmith.config import validate

    c = Config(task="text")
    c.distill.weight, c.distill.on = 1.0, "prompts"
    c.anchor.method = "ewc"  # no strength
    problems = validate(c)
    assert any(p.startswith("distill.on: prompts") for p in problems)
    assert any(p.startswith("anchor.strength") for p in problems)
    c = Config()
    c.distill.weight = 1.0  # on replay, but no replay
    assert any("replay.ratio is 0" in p for p in validate(c))


# ---------------------------------------------------------------- replay of instructions answered by the base


def test_instruction_replay_trains_on_the_base_models_own_replies(tiny_model, tokenizer, encoded, tmp_path, monkeypatch):
    from tunesmith.data.general import EVAL_INSTRUCTIONS, eval_instructions, train_instructions
    from tunesmith.generation.generate import generate
    from tunesmith.training.mitigations import with_replay

    monkeypatch.setenv("TUNESMITH_HOME", str(tmp_path / "home"))
    assert not set(eval_instructions(99)) & set(train_instructions())  # never the scored ones
    assert len(eval_instructions(99)) == EVAL_INSTRUCTIONS and len(train_instructions()) == 112
    cfg = Config(task="classification")
    cfg.train.precision, cfg.train.max_seq_len = "fp32", 128
    cfg.replay.data, cfg.replay.ratio, cfg.replay.max_new_tokens = "instructions", 0.25, 5
    tiny_model.train()
    mixed, summary = with_replay(cfg, tokenizer, encoded, tiny_model)
    assert tiny_model.training  # the mode it was in
    assert summary["kind"] == "conversations, replies by the base model" and summary["rows"] == len(mixed) - len(encoded)
    assert abs(summary["achieved_ratio_examples"] - 0.25) < 0.01
    replayed = mixed[len(encoded):]
    # each row: a shipped instruction, the base's greedy reply as the only target (token for token)
    first = replayed[0]
    number = int(first.source.split()[-1])  # "instruction N": the N-th of the shipped set
    asked = [Example([{"role": "user", "content": train_instructions()[number - 1 - EVAL_INSTRUCTIONS]}])]
    reply = generate(tiny_model, tokenizer, asked, 5, 4, False)[0][0]
    want = encode(tokenizer, Example(asked[0].messages + [{"role": "assistant", "content": reply}]), 128)
    assert (first.input_ids, first.labels, first.kind) == (want.input_ids, want.labels, "replay")
    # the replies are cached by the model's weights: a second run asks nothing
    monkeypatch.setattr("tunesmith.generation.replies.generate", lambda *a, **k: pytest.fail("asked again"))
    assert with_replay(cfg, tokenizer, encoded, tiny_model)[0] == mixed


@pytest.mark.parametrize("replies", ["base", "data"])
def test_a_replay_file_of_instructions_or_text(tiny_model, tokenizer, encoded, tmp_path, monkeypatch, replies):
    from tunesmith.data.formats import DataError
    from tunesmith.training.mitigations import with_replay

    monkeypatch.setenv("TUNESMITH_HOME", str(tmp_path / "home"))
    (tmp_path / "alpaca.json").write_text(json.dumps(
        [{"instruction": f"Name a colour number {i}", "input": "", "output": f"blue {i}"} for i in range(6)]))
    cfg = Config(task="classification")
    cfg.train.precision, cfg.train.max_seq_len = "fp32", 128
    cfg.replay.data, cfg.replay.ratio, cfg.replay.replies, cfg.replay.max_new_tokens = str(tmp_path / "alpaca.json"), 0.2, replies, 4
    mixed, summary = with_replay(cfg, tokenizer, encoded, tiny_model)
    rows = mixed[len(encoded):]
    targets = [tokenizer.decode([t for t in r.labels if t != IGNORE]) for r in rows]
    assert summary["kind"].endswith("base model" if replies == "base" else "data")
    if replies == "data":
        assert all(t.startswith("blue") for t in targets)
    # instructions alone: answered by the base; with replies: data it is an error naming the file
    (tmp_path / "asks.jsonl").write_text("\n".join(json.dumps({"instruction": f"Say {i}"}) for i in range(4)))
    cfg.replay.data = str(tmp_path / "asks.jsonl")
    if replies == "data":
        with pytest.raises(DataError, match="asks.jsonl.*no replies"):
            with_replay(cfg, tokenizer, encoded, tiny_model)
    else:
        assert with_replay(cfg, tokenizer, encoded, tiny_model)[1]["kind"].endswith("base model")
    # a file of text stays language modelling
    (tmp_path / "wiki.txt").write_text("The cat sat on the mat.\nA second line of text.\n")
    cfg.replay.data = str(tmp_path / "wiki.txt")
    assert with_replay(cfg, tokenizer, encoded, tiny_model)[1]["kind"] == "text"


def test_config_checks_instruction_replay():
    from tunesmith.config import validate

    c = Config()
    c.replay.ratio, c.replay.data, c.replay.replies = 0.1, "instructions", "data"
    c.anchor.method, c.anchor.strength, c.anchor.fisher_data = "ewc", 1.0, "instructions"
    problems = validate(c)
    assert any(p.startswith("replay.replies: data needs replies") for p in problems)
    assert any(p.startswith("anchor.fisher_data") for p in problems)
    c.replay.replies, c.replay.max_new_tokens = "teacher", 0
    problems = validate(c)
    assert any("'teacher' is not one of base, data" in p for p in problems) and any("max_new_tokens" in p for p in problems)


def test_replay_by_examples_says_when_it_dominates_the_tokens(encoded, pool):
    mixed, summary = mix(encoded, pool, 0.1, "examples", seed=0)  # text windows of 64 tokens next to one-word labels
    assert summary["achieved_ratio_tokens"] > 0.3
    assert f"{summary['achieved_ratio_tokens']:.0%} of the trained target tokens are replay for 10% of the rows" in summary["note"]
    assert "note" not in mix(encoded, pool, 0.1, "tokens", seed=0)[1]


def test_a_replay_file_without_replies_fails_before_the_data_is_prepared(tiny_model_dir, tmp_path):
    from tunesmith import finetune, load_config
    from tunesmith.data.formats import DataError

    rows = [{"instruction": f"Say hello {i}", "output": f"hello {i} !"} for i in range(16)]
    (tmp_path / "inst.json").write_text(json.dumps(rows))
    (tmp_path / "asks.jsonl").write_text("".join(json.dumps({"instruction": f"Tell me {i}"}) + "\n" for i in range(4)))
    cfg = {"name": "r", "model": str(tiny_model_dir), "task": "instruction", "method": "lora",
           "output_dir": str(tmp_path / "runs"), "data": {"train": str(tmp_path / "inst.json")},
           "replay": {"ratio": 0.2, "data": str(tmp_path / "asks.jsonl"), "replies": "data"}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(DataError, match="asks.jsonl.*no replies"):
        finetune(load_config(tmp_path / "c.yaml"))
    assert not (tmp_path / "runs" / "r" / "data").exists()  # nothing prepared before the check


def test_the_report_lists_mitigations_key_by_key_not_as_json():
    from tunesmith.report.html import _kv_table

    html_table = _kv_table({"steps": 3, "mitigations": {"replay": {"rows": 12, "kind": "text", "achieved_ratio_tokens": 0.25}}})
    assert "<td>mitigations.replay.rows</td><td>12</td>" in html_table
    assert "<td>mitigations.replay.achieved_ratio_tokens</td><td>0.25</td>" in html_table
    assert "{" not in html_table
