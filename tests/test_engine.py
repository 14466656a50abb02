"""The continuous-batching engine alone, on the tiny finished runs (fp32, CPU, seconds).

The reference for correctness is transformers' own greedy ``generate`` on one prompt with one
adapter active: every answer the engine gives in a mixed batch (adapters and the base, requests
joining mid-way) must equal it token for token.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from conftest import generate_alone
from tunesmith.data.render import chat_format, encode_prompt
from tunesmith.deploy.loading import load_for_serving
from tunesmith.generation.engine import Engine, EngineClosed, EngineError, GenerationRequest, QueueFull, SamplingParams
from tunesmith.generation.rows import partial_stop

QUESTIONS = ["Say hello 3", "Say hello 12 to the quick brown fox", "what is the capital of france ?"]


@pytest.fixture(scope="module")
def group(finished_runs):
    (g,) = load_for_serving([finished_runs["alpha-lora"], finished_runs["beta-lora"]])
    return g


@pytest.fixture
def engine(group):
    eng = Engine(group.model, group.tokenizer, max_batch_size=16)
    yield eng
    eng.shutdown(drain=False, timeout=10)


def prompt(tokenizer, question: str) -> list[int]:
    return encode_prompt(tokenizer, [{"role": "user", "content": question}], 10**6)


def greedy(tokenizer, max_tokens: int = 10, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, stop_ids=chat_format(tokenizer).stop_ids, **kw)


_REFERENCES: dict[tuple, list[int]] = {}


@torch.no_grad()
def reference(group, ids: list[int], adapter: str | None, max_tokens: int) -> list[int]:
    """transformers' greedy generate on this prompt alone, with this adapter alone (memoized: slow)."""
    key = (id(group.model), tuple(ids), adapter, max_tokens)
    if key not in _REFERENCES:
        _REFERENCES[key] = _generate(group, ids, adapter, max_tokens)
    return list(_REFERENCES[key])


def _generate(group, ids: list[int], adapter: str | None, max_tokens: int) -> list[int]:
    return generate_alone(group.model, ids, adapter, max_tokens, list(chat_format(group.tokenizer).stop_ids),
                          group.tokenizer.pad_token_id)


def test_alone_equals_transformers_generate(engine, group):
    tok = group.tokenizer
    for adapter in ("alpha-lora", "beta-lora", None):
        ids = prompt(tok, QUESTIONS[1])
        got = engine.submit(GenerationRequest(ids, adapter, greedy(tok, 12))).result()
        assert got.choices[0].token_ids == reference(group, ids, adapter, 12), adapter
        assert got.choices[0].text == tok.decode(got.choices[0].token_ids, skip_special_tokens=True)
        assert got.completion_tokens == len(got.choices[0].token_ids)


def test_adapters_really_differ(engine, group):
    tok = group.tokenizer
    ids = prompt(tok, QUESTIONS[0])
    answers = [engine.submit(GenerationRequest(ids, a, greedy(tok, 12))).result().choices[0].token_ids
               for a in ("alpha-lora", "beta-lora", None)]
    assert len({tuple(a) for a in answers}) == 3  # else the mixed-batch test below proves little


def test_mixed_batch_joining_midway_equals_alone(group):
    """Alpha, beta and the base in one batch, prompts of different lengths, half of them joining
    while the first ones are decoding: each answer equals that model's answer computed alone."""
    tok = group.tokenizer
    jobs = [(prompt(tok, q), a) for q in QUESTIONS for a in ("alpha-lora", None, "beta-lora")]
    expected = [reference(group, ids, a, 24) for ids, a in jobs]
    eng = Engine(group.model, group.tokenizer, max_batch_size=16)
    try:
        first = [eng.submit(GenerationRequest(ids, a, greedy(tok, 24))) for ids, a in jobs[:4]]
        it = iter(first[0])
        head = next(it)  # the first requests are decoding now
        later = [eng.submit(GenerationRequest(ids, a, greedy(tok, 24))) for ids, a in jobs[4:]]
        first_ids = list(head.token_ids) + [t for d in it for t in d.token_ids]
        results = [h.result() for h in first[1:] + later]
    finally:
        eng.shutdown()
    assert eng.stats.max_rows > 1 and eng.stats.joined > 0
    assert first_ids == expected[0]
    assert [r.choices[0].token_ids for r in results] == expected[1:]


def test_generate_keeps_order_and_batches(group):
    tok = group.tokenizer
    reqs = [GenerationRequest(prompt(tok, q), a, greedy(tok, 8)) for q in QUESTIONS for a in ("beta-lora", None)]
    eng = Engine(group.model, tok, max_batch_size=4, max_waiting=2)  # fewer slots than requests: blocks, queues
    try:
        results = eng.generate(reqs)
    finally:
        eng.shutdown()
    want = [reference(group, list(r.prompt_ids), r.adapter, 8) for r in reqs]
    assert [r.choices[0].token_ids for r in results] == want
    assert eng.stats.max_rows == 4


def test_foreground_engine_answers_alike_reports_in_order_and_stops_between_steps(group):
    """background=False: generate decodes in the caller's thread with the same answers (mixed
    adapters, fewer rows than requests), reports each answer in request order, stops between
    decoding steps with EvaluationStopped and an empty batch, and refuses streaming submits."""
    from tunesmith.runtime.stopping import EvaluationStopped

    tok = group.tokenizer
    reqs = [GenerationRequest(prompt(tok, q), a, greedy(tok, 8)) for q in QUESTIONS for a in ("beta-lora", None)]
    eng = Engine(group.model, tok, max_batch_size=4, background=False)
    try:
        seen: list[int] = []
        results = eng.generate(reqs, on_result=lambda i, r: seen.append(i))
        assert [r.choices[0].token_ids for r in results] == [reference(group, list(r.prompt_ids), r.adapter, 8)
                                                             for r in reqs]
        assert seen == list(range(len(reqs)))
        steps, reported = [], {}
        long_first = [GenerationRequest(reqs[0].prompt_ids, None, greedy(tok, 40))] + [
            GenerationRequest(r.prompt_ids, r.adapter, greedy(tok, 2)) for r in reqs[1:]]
        with pytest.raises(EvaluationStopped, match="stopped while generating"):
            eng.generate(long_first, should_stop=lambda: steps.append(1) or len(steps) > 6,
                         on_result=lambda i, r: reported.update({i: r}))
        assert 0 not in reported and set(reported) == set(range(1, len(reqs)))  # made behind the long one: kept
        assert eng.snapshot().running == 0 and eng.snapshot().waiting == 0
        again = eng.generate(reqs[:2])  # still usable after a stop
        assert [r.choices[0].token_ids for r in again] == [r.choices[0].token_ids for r in results[:2]]
        with pytest.raises(EngineError, match="use generate"):
            eng.submit(reqs[0])
    finally:
        eng.shutdown()
    assert not eng.running


def test_full_finetuned_model(finished_runs):
    (g,) = load_for_serving([finished_runs["gamma-full"]])
    eng = Engine(g.model, g.tokenizer)
    try:
        ids = prompt(g.tokenizer, QUESTIONS[0])
        got = eng.submit(GenerationRequest(ids, None, greedy(g.tokenizer, 6))).result()
        with pytest.raises(EngineError, match="unknown adapter"):
            eng.submit(GenerationRequest(ids, "alpha-lora"))
    finally:
        eng.shutdown()
    ref = g.model.generate(input_ids=torch.tensor([ids]), max_new_tokens=6, do_sample=False,
                           eos_token_id=list(chat_format(g.tokenizer).stop_ids), pad_token_id=g.tokenizer.pad_token_id)
    assert got.choices[0].token_ids == ref[0, len(ids):].tolist()


def test_stop_string_cut_and_never_streamed(engine, group):
    tok = group.tokenizer
    ids = prompt(tok, QUESTIONS[2])
    full = engine.submit(GenerationRequest(ids, "alpha-lora", greedy(tok, 24))).result().choices[0].text
    assert len(full) > 12
    stop = full[6:10]  # a stop string that starts mid-answer, likely across token boundaries
    h = engine.submit(GenerationRequest(ids, "alpha-lora", greedy(tok, 24, stop=(stop, "never-seen"))))
    deltas = list(h)
    text = "".join(d.text for d in deltas)
    assert text == full[: full.find(stop)]
    assert deltas[-1].finish_reason == "stop"


def test_partial_stop_holds_back_possible_starts():
    assert partial_stop("hello wor", ("world",)) == 3
    assert partial_stop("hello", ("xyz",)) == 0
    assert partial_stop("ab", ("abc", "b")) == 2
    assert partial_stop("a", ()) == 0


def test_max_tokens_and_length(engine, group):
    tok = group.tokenizer
    r = engine.submit(GenerationRequest(prompt(tok, QUESTIONS[0]), None, SamplingParams(max_tokens=5))).result()
    assert r.choices[0].finish_reason == "length" and r.completion_tokens == 5 == len(r.choices[0].token_ids)


def test_seeded_sampling_is_reproducible_in_any_batch(engine, group):
    tok = group.tokenizer
    ids = prompt(tok, QUESTIONS[0])
    params = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, seed=7, n=3)
    alone = engine.submit(GenerationRequest(ids, "beta-lora", params)).result()
    crowd = [engine.submit(GenerationRequest(prompt(tok, q), None, SamplingParams(max_tokens=12, temperature=1.0)))
             for q in QUESTIONS]
    again = engine.submit(GenerationRequest(ids, "beta-lora", params)).result()
    for h in crowd:
        h.result()
    assert [c.token_ids for c in again.choices] == [c.token_ids for c in alone.choices]
    assert len({tuple(c.token_ids) for c in alone.choices}) == 3  # the n choices differ
    other = engine.submit(GenerationRequest(ids, "beta-lora", SamplingParams(max_tokens=12, temperature=1.0, seed=8)))
    assert other.result().choices[0].token_ids != alone.choices[0].token_ids


def test_greedy_n_choices_are_identical(engine, group):
    tok = group.tokenizer
    r = engine.submit(GenerationRequest(prompt(tok, QUESTIONS[1]), "alpha-lora", greedy(tok, 8, n=3))).result()
    assert len(r.choices) == 3 and r.choices[0].token_ids == r.choices[1].token_ids == r.choices[2].token_ids
    assert r.completion_tokens == sum(len(c.token_ids) for c in r.choices)


def test_cancel_frees_the_slot_and_queue_limit(group):
    tok = group.tokenizer
    eng = Engine(group.model, tok, max_batch_size=1, max_waiting=1)
    try:
        long = eng.submit(GenerationRequest(prompt(tok, QUESTIONS[0]), None, SamplingParams(max_tokens=10_000)))
        it = iter(long)
        next(it)  # running, in the only row
        waiting = eng.submit(GenerationRequest(prompt(tok, QUESTIONS[1]), "alpha-lora", greedy(tok, 4)))
        with pytest.raises(QueueFull):
            eng.submit(GenerationRequest(prompt(tok, QUESTIONS[2]), None, greedy(tok, 4)))
        long.cancel()
        assert [d.finish_reason for d in it][-1] == "abort"
        assert waiting.result().choices[0].finish_reason in ("stop", "length")
    finally:
        eng.shutdown()
    s = eng.snapshot()
    assert s.running == 0 and s.waiting == 0


def test_shutdown_drains_running_requests(group):
    tok = group.tokenizer
    eng = Engine(group.model, tok, max_batch_size=2)
    handles = [eng.submit(GenerationRequest(prompt(tok, q), "beta-lora", SamplingParams(max_tokens=20)))
               for q in QUESTIONS]
    eng.shutdown(drain=True, timeout=60)
    assert not eng.running
    assert all(h.result().choices[0].finish_reason == "length" and h.completion_tokens == 20 for h in handles)
    with pytest.raises(EngineClosed):
        eng.submit(GenerationRequest(prompt(tok, QUESTIONS[0])))


def test_shutdown_without_drain_aborts(group):
    tok = group.tokenizer
    eng = Engine(group.model, tok, max_batch_size=1)
    handles = [eng.submit(GenerationRequest(prompt(tok, q), None, SamplingParams(max_tokens=10_000)))
               for q in QUESTIONS]
    next(iter(handles[0]))
    eng.shutdown(drain=False, timeout=30)
    assert [h.result().choices[0].finish_reason for h in handles] == ["abort"] * 3


def test_bad_requests_are_refused_up_front(engine, group):
    tok = group.tokenizer
    with pytest.raises(EngineError, match="empty"):
        engine.submit(GenerationRequest([]))
    with pytest.raises(EngineError, match="context"):
        engine.submit(GenerationRequest([5] * engine.context_length))
    with pytest.raises(EngineError, match="unknown adapter"):
        engine.submit(GenerationRequest(prompt(tok, "hi"), "nope"))
    with pytest.raises(EngineError, match="n must be"):
        engine.submit(GenerationRequest(prompt(tok, "hi"), None, SamplingParams(n=99)))


def test_a_failing_step_fails_its_requests_not_the_engine(engine, group, monkeypatch):
    tok = group.tokenizer
    real = engine._forward
    calls = {"n": 0}

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("boom")
        return real(*a, **k)

    monkeypatch.setattr(engine, "_forward", flaky)
    bad = engine.submit(GenerationRequest(prompt(tok, "hi"), None, greedy(tok, 4))).result()
    assert bad.choices[0].finish_reason == "error" and "boom" in bad.choices[0].error
    good = engine.submit(GenerationRequest(prompt(tok, "hi"), None, greedy(tok, 4))).result()
    assert good.choices[0].finish_reason in ("stop", "length")


def test_async_stream(engine, group):
    import asyncio

    tok = group.tokenizer

    async def collect():
        h = engine.submit(GenerationRequest(prompt(tok, QUESTIONS[0]), "alpha-lora", greedy(tok, 8)))
        return [d async for d in h.stream()]

    deltas = asyncio.run(collect())
    ids = [t for d in deltas for t in d.token_ids]
    assert ids == reference(group, prompt(tok, QUESTIONS[0]), "alpha-lora", 8)
    assert deltas[-1].finish_reason in ("stop", "length")


def test_prefill_groups_bound_padding():
    from tunesmith.generation.batch import PREFILL_PADDING, prefill_groups
    from tunesmith.generation.requests import RequestHandle

    handles = [RequestHandle(GenerationRequest([1] * n)) for n in (10, 100, 11, 12, 95, 300, 10)]
    groups = prefill_groups(handles)
    assert sorted(h.prompt_tokens for g in groups for h in g) == sorted(h.prompt_tokens for h in handles)
    for g in groups:
        assert max(h.prompt_tokens for h in g) * len(g) <= PREFILL_PADDING * sum(h.prompt_tokens for h in g)
    assert len(groups) == 3  # the short four, the two near 100, the long one


def test_engine_leaves_the_model_as_it_found_it(group):
    from peft.tuners.lora import LoraLayer

    layers = [m for m in group.model.modules() if isinstance(m, LoraLayer)]
    state = lambda: [(len(m._forward_pre_hooks), m.__dict__.get("forward")) for m in layers]  # noqa: E731
    before = state()
    eng = Engine(group.model, group.tokenizer)
    assert state() != before
    eng.shutdown()
    assert state() == before


@torch.no_grad()
def test_router_logits_equal_peft_mixed_batch_bit_for_bit(group):
    """One forward pass, rows on alpha, the base, beta and alpha: the engine's LoRA routing gives
    exactly the logits of PEFT's own ``adapter_names`` path, and the uniform batches those of
    PEFT's active-adapter path."""
    from tunesmith.generation.adapters import AdapterRouter

    model = group.model
    x = torch.randint(0, len(group.tokenizer), (4, 7), generator=torch.Generator().manual_seed(0))
    names = ["alpha-lora", None, "beta-lora", "alpha-lora"]
    want = model(input_ids=x, adapter_names=[n or "__base__" for n in names]).logits
    model.set_adapter("beta-lora")
    want_beta = model(input_ids=x).logits
    with model.disable_adapter():
        want_base = model(input_ids=x).logits
    router = AdapterRouter(model, torch.device("cpu"))
    try:
        with router.route(names):
            got = model(input_ids=x).logits
        with router.route(["beta-lora"] * 4):
            got_beta = model(input_ids=x).logits
        with router.route([None] * 4):
            got_base = model(input_ids=x).logits
        outside = model(input_ids=x).logits  # no step running: PEFT's own behaviour (beta active)
    finally:
        router.close()
    assert torch.equal(got, want) and torch.equal(got_beta, want_beta) and torch.equal(got_base, want_base)
    assert torch.equal(outside, want_beta)
    assert not torch.equal(want[0], want_base[0]) and not torch.equal(want[2], want_base[2])  # adapters matter


@pytest.mark.slow
def test_real_model_mixed_batch_equals_each_alone():
    """SmolLM2-135M with two adapters (B perturbed so they change the answers): eight alpaca
    prompts, base and both adapters mixed in one batch, 24 greedy tokens each, equal to
    transformers' generate for that prompt and that adapter alone."""
    import json
    from pathlib import Path

    import peft

    from tunesmith.models import load_model

    model, tok = load_model("default")
    cfg = peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"], task_type="CAUSAL_LM")
    torch.manual_seed(0)  # before the adapters are made: lora_A's initialisation draws from it too (a test
    model = peft.get_peft_model(model, cfg, adapter_name="one")  # seeded after it drew other adapters each run)
    model.add_adapter("two", cfg)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    model.eval()
    rows = json.loads((Path(__file__).parents[1] / "examples/data/alpaca/alpaca_en_demo.json").read_text())[:8]
    prompts = [prompt(tok, r["instruction"] + (f"\n\n{r['input']}" if r.get("input") else "")) for r in rows]
    adapters = [("one", None, "two")[i % 3] for i in range(len(prompts))]
    g = SimpleNamespace(model=model, tokenizer=tok)
    want = [_generate(g, p, a, 24) for p, a in zip(prompts, adapters)]
    assert len({tuple(_generate(g, prompts[0], a, 24)) for a in ("one", None, "two")}) == 3
    eng = Engine(model, tok, max_batch_size=8)
    try:
        got = eng.generate([GenerationRequest(p, a, greedy(tok, 24)) for p, a in zip(prompts, adapters)])
    finally:
        eng.shutdown()
    assert [r.choices[0].token_ids for r in got] == want


def test_spare_room_cache_layer_equals_dynamic_layer_and_writes_in_place():
    """The engine's cache layer holds what transformers' DynamicLayer holds after every update,
    writes decoding steps into its buffer (no new buffer per step), and takes keys/values that
    were assigned from outside (rows merged or dropped) into a new buffer at the next update."""
    from transformers.cache_utils import DynamicLayer

    from tunesmith.generation.batch import SPARE_POSITIONS, SpareRoomLayer

    ours, ref = SpareRoomLayer(), DynamicLayer()
    torch.manual_seed(0)
    steps = [torch.randn(2, 3, 7, 4)] + [torch.randn(2, 3, 1, 4) for _ in range(SPARE_POSITIONS + 5)]
    buffers = set()
    with torch.inference_mode():
        for i, k in enumerate(steps):
            got, want = ours.update(k, -k), ref.update(k, -k)
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), i
            buffers.add(ours._buf_k.data_ptr())
        assert len(buffers) == 2  # the first buffer, and one more once the spare room ran out
        ours.keys, ours.values = ours.keys[:1], ours.values[:1]  # a row dropped from outside
        ref.keys, ref.values = ref.keys[:1], ref.values[:1]
        k = torch.randn(1, 3, 1, 4)
        got, want = ours.update(k, k), ref.update(k, k)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        assert ours.get_seq_length() == ref.get_seq_length() == 7 + SPARE_POSITIONS + 6
