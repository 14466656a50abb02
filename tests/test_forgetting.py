"""The forgetting check: general-text perplexity, agreement with the base's replies, KL(base || tuned)."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tunesmith.evaluation import forgetting
from tunesmith.config import load_config
from tunesmith.data import general
from tunesmith.data.formats import DataError



def _cfg(tmp_path: Path, **eval_settings: object):
    return load_config(data={"data": {"train": "x"}, "train": {"max_seq_len": 128},
                             "eval": {"general_tokens": 256, "general_instructions": 4, "general_max_new_tokens": 6}
                             | eval_settings})


@pytest.fixture(autouse=True)
def _home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TUNESMITH_HOME", str(tmp_path / "home"))  # the base replies' cache


def _perturbed(model: torch.nn.Module, scale: float = 0.05) -> torch.nn.Module:
    other = copy.deepcopy(model)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn_like(p) * scale)
    return other


def test_the_same_model_has_forgotten_nothing(tmp_path, tokenizer, tiny_model):
    probe = forgetting.Probe(tokenizer, _cfg(tmp_path), bf16=False)
    block = probe.compare(tiny_model, probe.observe(tiny_model))
    assert block["tuned"]["perplexity"] == pytest.approx(block["base"]["perplexity"], rel=1e-6)
    assert block["change"]["perplexity"] == pytest.approx(0, abs=1e-6)
    assert block["tuned"]["agreement_rougeL"] == pytest.approx(1.0)
    assert block["tuned"]["kl"] == pytest.approx(0, abs=1e-6)
    assert block["general_texts"] == general.EVAL_ARTICLES and block["instructions"] == 4
    assert block["general_tokens"] == general.EVAL_ARTICLES * (256 // general.EVAL_ARTICLES - 1)  # first token is no target


def test_perplexity_and_kl_match_full_logit_references(tmp_path, tokenizer, tiny_model):
    tuned = _perturbed(tiny_model)
    probe = forgetting.Probe(tokenizer, _cfg(tmp_path), bf16=False)
    observed = probe.observe(tiny_model)
    block = probe.compare(tuned, observed)
    # perplexity: transformers' own loss over the same windows, pooled by tokens
    for name, model in (("base", tiny_model), ("tuned", tuned)):
        nll = n = 0.0
        for w in probe.windows:
            ids = torch.tensor([w.input_ids])
            with torch.no_grad():
                loss = model(input_ids=ids, labels=ids).loss
            nll, n = nll + float(loss) * (len(w.input_ids) - 1), n + len(w.input_ids) - 1
        assert block[name]["perplexity"] == pytest.approx(math.exp(nll / n), rel=1e-4)
    # KL(base || tuned) from the full (1, T, V) logits of each instruction + base reply
    total = count = 0.0
    for enc in probe._encoded_replies(observed.replies):
        ids = torch.tensor([enc.input_ids])
        mask = torch.tensor(enc.labels[1:]) != -100
        with torch.no_grad():
            p = F.log_softmax(tiny_model(input_ids=ids).logits[0, :-1][mask], -1)
            q = F.log_softmax(tuned(input_ids=ids).logits[0, :-1][mask], -1)
        total += float(F.kl_div(q, p, log_target=True, reduction="sum"))
        count += int(mask.sum())
    assert block["tuned"]["kl"] == pytest.approx(total / count, rel=1e-4)
    assert block["tuned"]["kl"] > 0
    ci = block["tuned"]["ci"]
    for key in ("perplexity", "agreement_rougeL", "kl"):
        assert ci[key][0] <= block["tuned"][key] <= ci[key][1]
    assert 0 <= block["change"]["p_value"] <= 1


def test_base_replies_are_cached_by_weights(tmp_path, tokenizer, tiny_model, monkeypatch):
    probe = forgetting.Probe(tokenizer, _cfg(tmp_path), bf16=False)
    first = probe.observe(tiny_model).replies
    assert len(list((tmp_path / "home" / "general").glob("replies-*.json"))) == 1
    calls = []
    monkeypatch.setattr("tunesmith.generation.replies.generate", lambda *a, **k: calls.append(1) or ([], 0))
    assert probe.observe(tiny_model).replies == first and not calls  # same weights: from the cache
    probe.observe(_perturbed(tiny_model))  # other weights: generated again
    assert calls


def test_off_and_user_files(tmp_path, tokenizer, tiny_model):
    off = forgetting.Probe(tokenizer, _cfg(tmp_path, general="none"), bf16=False)
    assert off.observe(tiny_model) is None and off.compare(tiny_model, None) is None
    mine = tmp_path / "general.jsonl"
    mine.write_text("\n".join(json.dumps({"id": i, "text": f"the quick brown fox number {i} jumps"}) for i in range(5)))
    probe = forgetting.Probe(tokenizer, _cfg(tmp_path, general=str(mine), general_instructions=0), bf16=False)
    block = probe.compare(tiny_model, probe.observe(tiny_model))
    assert block["general_texts"] == 5 and block["source"] == str(mine) and "kl" not in block["tuned"]
    bad = tmp_path / "two.csv"
    bad.write_text("a,b\nx,y\n")
    with pytest.raises(DataError, match="two.csv.*'text' column"):
        forgetting.Probe(tokenizer, _cfg(tmp_path, general=str(bad)), bf16=False)


def test_scored_and_replayed_articles_never_overlap():
    scored, replayed = general.eval_texts("general"), general.train_texts("general")
    assert len(scored) == general.EVAL_ARTICLES and len(scored) + len(replayed) == len(general.articles())
    assert not set(scored) & set(replayed)


def test_every_run_reports_forgetting(finished_runs):
    ev = json.loads((finished_runs["alpha-lora"] / "eval.json").read_text())
    block = ev["forgetting"]
    assert block["base"]["perplexity"] > 0 and block["tuned"]["perplexity"] > 0
    assert block["tuned"]["kl"] > 0  # the adapter moved the model (lr 5e-2)
    assert "forgetting" in (finished_runs["alpha-lora"] / "report.html").read_text().lower()
    assert "forgetting" not in json.loads((finished_runs["delta-prompt"] / "eval.json").read_text())


def test_compare_shows_forgetting_per_method(finished_runs):
    from dataclasses import asdict

    from tunesmith.report.tables import table
    from tunesmith.runs.compare import measure

    result = measure(finished_runs["alpha-lora"], "instruction", "lora")
    ev = json.loads((finished_runs["alpha-lora"] / "eval.json").read_text())
    assert result.forgetting == pytest.approx(ev["forgetting"]["change"]["perplexity_relative"])
    header, rows = table({"metric": result.metric, "methods": [asdict(result)]})
    assert rows[0][header.index("general ppl change")] == f"{result.forgetting:+.1%}"
    assert rows[0][header.index("general KL")] == f"{ev['forgetting']['tuned']['kl']:.3f}"


def test_a_model_without_chat_template_gets_the_text_measure_only(tmp_path, tokenizer, tiny_model):
    plain = copy.deepcopy(tokenizer)
    plain.chat_template = None
    probe = forgetting.Probe(plain, _cfg(tmp_path), bf16=False)
    block = probe.compare(tiny_model, probe.observe(tiny_model))
    assert block["instructions"] == 0 and "no chat template" in block["note"] and "kl" not in block["tuned"]
    assert block["tuned"]["perplexity"] == pytest.approx(block["base"]["perplexity"])


def test_general_file_mistakes_are_found_before_training(tmp_path):
    from tunesmith.config import ConfigError, load_config

    text = tmp_path / "mine.txt"
    text.write_text("some general text\n")
    with pytest.raises(ConfigError) as e:
        load_config(data={"data": {"train": "x"}, "eval": {"general": str(tmp_path / "nope.txt")}})
    assert "eval.general: file not found" in str(e.value)
    with pytest.raises(ConfigError) as e:
        load_config(data={"data": {"train": "x"}, "eval": {"general": str(text)},
                          "replay": {"ratio": 0.2, "data": str(text)}})
    assert "replay.data: the same file as eval.general" in str(e.value)
    with pytest.raises(ConfigError) as e:
        load_config(data={"data": {"train": "x"}, "distill": {"weight": 1, "on": "prompt"}})
    assert "is not one of" in str(e.value) and "replay.ratio is 0" not in str(e.value)


def test_a_mistyped_run_folder_is_not_looked_up_on_the_hub(tmp_path, monkeypatch):
    from tunesmith.models import ModelError, resolve_model

    (tmp_path / "runs" / "sst2-lora").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelError, match="runs/sst2-lroa .*runs/ holds similar: sst2-lora"):
        resolve_model("runs/sst2-lroa")
    with pytest.raises(ModelError, match=f"{tmp_path}/runs/ holds similar: sst2-lora"):  # absolute: its own folder, not /
        resolve_model(str(tmp_path / "runs" / "sst2-lroa"))


def test_the_scored_text_does_not_depend_on_max_seq_len(tmp_path, tokenizer):
    short = forgetting.Probe(tokenizer, load_config(data={"data": {"train": "x"}, "train": {"max_seq_len": 16},
                                                          "eval": {"general_tokens": 256}}), bf16=False)
    long = forgetting.Probe(tokenizer, load_config(data={"data": {"train": "x"}, "train": {"max_seq_len": 512},
                                                         "eval": {"general_tokens": 256}}), bf16=False)
    assert [w.input_ids for w in short.windows] == [w.input_ids for w in long.windows]
    assert all(len(w.input_ids) == 256 // general.EVAL_ARTICLES for w in long.windows)


@pytest.mark.parametrize("tokens", [64, 2048, 40_000])
def test_windows_from_a_prefix_equal_windows_from_the_whole_text(tokenizer, tokens):
    texts = general.eval_texts("general") + ["ab " * 50, "x"]  # and a short text, and one too short to score
    whole = [tokenizer(t, add_special_tokens=False)["input_ids"][:tokens] for t in texts]
    assert [w.input_ids for w in forgetting._windows(tokenizer, texts, tokens)] == [ids for ids in whole if len(ids) >= 2]


def test_why_forgetting_is_not_measured(tmp_path, tokenizer):
    cfg = _cfg(tmp_path)
    assert forgetting.skipped(cfg, forgetting.Probe(tokenizer, cfg, bf16=False)) is None
    off = _cfg(tmp_path, general="none")
    assert forgetting.skipped(off, forgetting.Probe(tokenizer, off, bf16=False)) == "eval.general: none"
    cfg.method = "prompt"
    assert "prompt method" in forgetting.skipped(cfg, None)


def test_many_short_general_texts_keep_the_token_budget():
    """WikiText-2 style, one paragraph per line (2,891 lines): eval.general_tokens holds, spread over the file."""
    from tunesmith.evaluation.forgetting import MIN_WINDOW, within_budget

    texts = [f"paragraph {i}" for i in range(2891)]
    chosen, per_text = within_budget(texts, 2048)
    assert len(chosen) * per_text <= 2048 and per_text >= MIN_WINDOW and len(chosen) == 2048 // MIN_WINDOW
    assert chosen[0] == "paragraph 0" and chosen[-1].startswith("paragraph 28")  # from the whole file, not its start
    assert within_budget(texts[:8], 2048) == (texts[:8], 256)  # few texts: all of them, evenly
