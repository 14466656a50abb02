"""Classification heads: a BERT-style encoder (LoRA and full) and a causal LM with a head on its last token."""

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import BertConfig, BertModel

from tunesmith.cli import main
from tunesmith.data import Example, collate, encode_for_head
from tunesmith.models import is_causal_lm, load_classifier

from test_cli import write_config


@pytest.fixture
def tiny_bert_dir(tmp_path, tokenizer):
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=256, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    folder = tmp_path / "tiny-bert"
    BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_encoder_detected_and_loaded_with_a_seeded_head(tiny_bert_dir, tiny_model_dir):
    assert not is_causal_lm(str(tiny_bert_dir)) and is_causal_lm(str(tiny_model_dir))
    a, _ = load_classifier(str(tiny_bert_dir), ["neg", "pos"], seed=3)
    b, _ = load_classifier(str(tiny_bert_dir), ["neg", "pos"], seed=3)
    assert a.config.id2label == {0: "neg", 1: "pos"}
    assert torch.equal(a.classifier.weight, b.classifier.weight)  # the base a run starts from is reproducible


def test_head_batches_carry_one_label_per_row(tokenizer):
    exs = [Example([{"role": "user", "content": "a fine film"}, {"role": "assistant", "content": "positive"}], label="1"),
           Example([{"role": "user", "content": "dull"}, {"role": "assistant", "content": "negative"}], label="0")]
    encoded = [encode_for_head(tokenizer, e, {"0": 0, "1": 1}, 64) for e in exs]
    assert [e.class_label for e in encoded] == [1, 0] and all(e.n_targets == 1 for e in encoded)
    batch = collate(encoded, tokenizer.pad_token_id)
    assert batch["labels"].tolist() == [1, 0] and batch["attention_mask"].sum(1).tolist() == [len(e.input_ids) for e in encoded]


@pytest.mark.parametrize("method", ["lora", "full"])
def test_encoder_classifier_trains_and_evaluates(tmp_path, tiny_bert_dir, sst_files, method):
    path = write_config(tmp_path, tiny_bert_dir, sst_files, max_steps=6, lr=1e-2 if method == "lora" else 1e-3)
    cfg = yaml.safe_load(path.read_text())
    cfg["method"] = method
    path.write_text(yaml.safe_dump(cfg))
    assert main(["train", str(path)]) == 0
    run = tmp_path / "runs" / "tiny"
    ev = json.loads((run / "eval.json").read_text())
    assert {"accuracy", "f1", "ci", "confusion"} <= ev["tuned"].keys()
    vals = [json.loads(x)["val_loss"] for x in (run / "metrics.jsonl").read_text().splitlines() if '"eval"' in x]
    assert len(vals) == 3 and vals[-1] < vals[0]  # it learns
    if method == "lora":  # the new head is saved with the adapters
        weights = load_file(str(run / "adapter" / "adapter_model.safetensors"))
        assert any("classifier" in k for k in weights) and any("lora_A" in k for k in weights)
    else:
        assert (run / "model" / "config.json").is_file()
        assert json.loads((run / "model" / "config.json").read_text())["id2label"] == {"0": "0", "1": "1"}


def test_causal_lm_with_a_head_on_the_last_token(tmp_path, tiny_model_dir, sst_files):
    path = write_config(tmp_path, tiny_model_dir, sst_files, max_steps=6, lr=1e-2)
    cfg = yaml.safe_load(path.read_text())
    cfg["classifier"] = "head"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["train", str(path)]) == 0
    ev = json.loads((tmp_path / "runs" / "tiny" / "eval.json").read_text())
    assert 0 <= ev["tuned"]["accuracy"] <= 1 and "score" in "".join(
        load_file(str(tmp_path / "runs" / "tiny" / "adapter" / "adapter_model.safetensors")))


def test_prompt_method_refuses_a_head(tmp_path, tiny_model_dir, sst_files, capsys):
    path = write_config(tmp_path, tiny_model_dir, sst_files)
    assert main(["train", str(path), "--set", "classifier=head", "--set", "method=prompt"]) == 2
    assert "classifier: head cannot be used with method: prompt" in capsys.readouterr().err
