"""Export round trips on tiny models: the adapter in stock PEFT, the merged model in stock
transformers (logits against the in-memory tuned model), prompt runs as JSON, and the refusals."""

from __future__ import annotations

import json

import peft
import pytest
import torch
import yaml
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from tunesmith.cli import main
from tunesmith.deploy.errors import ExportError
from tunesmith.deploy.export import TOLERANCE, _write_hf, export
from tunesmith.deploy.loading import load_run

PROMPTS = [[1, 5, 9, 12, 40, 41, 7], [1, 60, 61, 62]]


def last_logits(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0, -1].float()


def test_adapter_export_loads_in_stock_peft_with_the_same_logits(finished_runs, tiny_model_dir, tmp_path):
    result = export(finished_runs["alpha-lora"], "adapter", out=tmp_path / "a", verify=True)
    assert {"adapter_config.json", "adapter_model.safetensors", "chat_template.jinja", "README.md"} <= set(result.files)
    tuned = load_run(finished_runs["alpha-lora"]).model
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    stock = peft.PeftModel.from_pretrained(base, str(result.path)).eval()
    for ids in PROMPTS:
        torch.testing.assert_close(last_logits(stock, ids), last_logits(tuned, ids), rtol=0, atol=1e-6)
    assert result.verify["consumer"].startswith("peft") and result.verify["argmax_agree"] == result.verify["prompts"]
    tok = AutoTokenizer.from_pretrained(result.path)  # the training template travels with the adapter
    assert tok.chat_template == load_run(finished_runs["alpha-lora"]).tokenizer.chat_template
    card = (result.path / "README.md").read_text()  # its "Load it" code runs as written
    exec(compile(card.split("```python\n")[1].split("```")[0].replace("<this folder>", str(result.path)), "card", "exec"), {})


def test_merged_export_equals_the_unmerged_tuned_model_and_differs_from_base(finished_runs, tiny_model_dir, tmp_path):
    result = export(finished_runs["alpha-lora"], "hf", out=tmp_path / "m", verify=True)
    merged = AutoModelForCausalLM.from_pretrained(result.path, dtype=torch.float32).eval()
    tuned = load_run(finished_runs["alpha-lora"]).model
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    for ids in PROMPTS:
        want = last_logits(tuned, ids)
        torch.testing.assert_close(last_logits(merged, ids), want, rtol=0, atol=TOLERANCE["f32"] * float(want.abs().max()))
        assert not torch.allclose(last_logits(base, ids), want, atol=1e-4)  # the adapter was trained: B != 0
    assert not any("lora" in k for k in merged.state_dict())
    assert result.verify["relative_diff"] <= TOLERANCE["f32"]


@pytest.mark.parametrize("dtype,torch_dtype", [("f16", torch.float16), ("bf16", torch.bfloat16)])
def test_merged_export_in_half_precision_stays_within_its_tolerance(finished_runs, tmp_path, dtype, torch_dtype):
    result = export(finished_runs["alpha-lora"], "hf", dtype, out=tmp_path / dtype, verify=True)
    with safe_open(str(result.path / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch_dtype}
    assert result.verify["relative_diff"] <= TOLERANCE[dtype] and result.verify["argmax_agree"] == result.verify["prompts"]


def test_full_fine_tuning_export_is_exact(finished_runs, tmp_path):
    result = export(finished_runs["gamma-full"], "hf", out=tmp_path / "f", verify=True)
    assert result.verify["max_abs_diff"] == 0.0


def test_generation_config_stops_at_the_end_of_turn_and_the_eos(finished_runs, tmp_path):
    run = load_run(finished_runs["gamma-full"])
    run.tokenizer.eos_token = "<|endoftext|>"  # a template whose turn end is not the eos (as SmolLM2's base models)
    _write_hf(run, tmp_path, "f32")
    gen = json.loads((tmp_path / "generation_config.json").read_text())
    ids = run.tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    assert sorted(gen["eos_token_id"]) == sorted(ids)


def test_prompt_run_exports_its_messages(finished_runs, tmp_path):
    result = export(finished_runs["delta-prompt"], "prompt", out=tmp_path / "p")
    doc = json.loads((result.path / "prompt.json").read_text())
    assert doc["task"] == "instruction" and isinstance(doc["messages"], list) and "usage" in doc
    assert (result.path / "README.md").is_file()


@pytest.mark.parametrize("run,fmt,dtype,message", [
    ("delta-prompt", "hf", None, "no trained weights"),
    ("gamma-full", "adapter", None, "needs a LoRA run"),
    ("alpha-lora", "prompt", None, "for prompt-method runs"),
    ("alpha-lora", "onnx", None, "unknown export format"),
    ("alpha-lora", "hf", "q8_0", "not available for hf"),
])
def test_impossible_exports_are_named(finished_runs, run, fmt, dtype, message, tmp_path):
    with pytest.raises(ExportError, match=message):
        export(finished_runs[run], fmt, dtype, out=tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_a_failed_export_leaves_the_previous_one_intact(finished_runs, tmp_path, monkeypatch):
    out = tmp_path / "m"
    export(finished_runs["gamma-full"], "hf", out=out)
    before = (out / "model.safetensors").read_bytes()

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr("tunesmith.deploy.export._write_hf", boom)
    with pytest.raises(OSError):
        export(finished_runs["gamma-full"], "hf", out=out)
    assert (out / "model.safetensors").read_bytes() == before and not list(tmp_path.glob(".m.*"))


def test_classification_head_run_exports_with_its_head(tmp_path, tiny_model_dir, sst_files):
    from tunesmith import finetune, load_config

    cfg = {"name": "head", "model": str(tiny_model_dir), "task": "classification", "classifier": "head", "method": "full",
           "output_dir": str(tmp_path / "runs"),
           "data": {"train": str(sst_files["train"]), "test": str(sst_files["test"]), "validation_size": 4,
                    "labels": {"0": "negative", "1": "positive"}, "prepare": {"dedup": "none"}},
           "train": {"max_steps": 2, "batch_size": 4, "precision": "fp32"},
           "eval": {"compare_with_base": False, "latency_examples": 0}}
    path = tmp_path / "head.yaml"
    path.write_text(yaml.safe_dump(cfg))
    run = finetune(load_config(path))
    result = export(run.dir, "hf", out=tmp_path / "h", verify=True)
    model = AutoModelForSequenceClassification.from_pretrained(result.path)
    assert model.config.id2label == {0: "negative", 1: "positive"} and result.verify["max_abs_diff"] == 0.0
    with pytest.raises(ExportError, match="cannot be exported to GGUF"):
        export(run.dir, "gguf")


def test_export_verb(finished_runs, tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["export", str(finished_runs["beta-lora"]), "--format", "adapter", "--out", str(out), "--verify"]) == 0
    printed = capsys.readouterr().out
    assert str(out) in printed and "verified" in printed and (out / "adapter_model.safetensors").is_file()
    assert main(["export", str(finished_runs["gamma-full"]), "--format", "adapter"]) == 2
    assert "needs a LoRA run" in capsys.readouterr().err
    assert main(["export", str(tmp_path), "--format", "hf"]) == 2
    assert "not a run folder" in capsys.readouterr().err


def test_gguf_export_of_a_run_verifies_and_has_a_modelfile(finished_runs, tmp_path):
    from gguf import GGUFReader

    result = export(finished_runs["alpha-lora"], "gguf", "f32", out=tmp_path / "g", verify=True)
    assert {"alpha-lora.f32.gguf", "Modelfile", "README.md"} <= set(result.files)
    v = result.verify
    assert v["relative_diff"] <= v["tolerance"] and v["agree_first_token"] == v["prompts"]
    reader = GGUFReader(str(result.path / "alpha-lora.f32.gguf"))
    template = bytes(reader.fields["tokenizer.chat_template"].parts[-1]).decode()
    assert template == load_run(finished_runs["alpha-lora"]).tokenizer.chat_template
    assert "FROM ./alpha-lora.f32.gguf" in (result.path / "Modelfile").read_text()
    assert "PARAMETER stop" in (result.path / "Modelfile").read_text()


def test_a_template_ollama_cannot_express_still_gets_its_gguf_with_a_note(finished_runs, tmp_path, monkeypatch):
    """A chat template with no Ollama form (one that rewrites messages or depends on position): the
    GGUF is written anyway (llama.cpp applies the template stored in it), with a note, and the
    model card does not point at a Modelfile that is not there."""
    from tunesmith.deploy import gguf_export
    from tunesmith.deploy.errors import ExportError
    from tunesmith.deploy.export import describe

    def refuse(*a, **k):
        raise ExportError("the chat template is not a fixed prefix + content + suffix per role")

    monkeypatch.setattr(gguf_export, "ollama_modelfile", refuse)
    result = export(finished_runs["alpha-lora"], "gguf", "f32", out=tmp_path / "g")
    assert set(result.files) == {"alpha-lora.f32.gguf", "README.md"}
    said = describe(result)
    assert "note: no Ollama Modelfile: the chat template is not a fixed prefix" in said and "llama.cpp" in said
    card = (result.path / "README.md").read_text()
    assert "ollama create" not in card and "no Modelfile was written" in card


NO_SYSTEM_TEMPLATE = (  # a template that refuses the system role (as Gemma's and Mistral's do)
    "{% for message in messages %}{% if message['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _run(tmp_path, tiny_model_dir, name, method, data=None, **sections):
    from tunesmith import finetune, load_config

    rows = [{"instruction": f"Say hello {i}", "input": "", "output": f"hello {i} !"} for i in range(16)]
    (tmp_path / "inst.json").write_text(json.dumps(rows))
    cfg = {"name": name, "model": str(tiny_model_dir), "task": "instruction", "method": method,
           "output_dir": str(tmp_path / "runs"),
           "data": {"train": str(tmp_path / "inst.json"), "validation_size": 3, "prepare": {"test_size": 4},
                    "system_prompt": "Answer briefly.", **(data or {})},
           "train": {"max_steps": 2, "batch_size": 2, "lr": 1e-3, "precision": "fp32"},
           "eval": {"max_new_tokens": 3, "latency_examples": 0, "compare_with_base": False}, **sections}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return finetune(load_config(path)).dir


def test_model_card_numbers_are_what_was_trained_and_evaluated(tmp_path, tiny_model_dir):
    run = _run(tmp_path, tiny_model_dir, "capped", "full", {"max_train_examples": 5, "max_test_examples": 2},
               full={"lr": 0.02})
    card = (export(run, "hf", out=tmp_path / "h").path / "README.md").read_text()
    assert json.loads((run / "eval.json").read_text())["test_examples"] == 2
    assert "rows used of those prepared: train 5 of 9, validation 3 of 3, test 2 of 4" in card, card
    assert "Measured on 2 held-out test examples" in card and "lr 0.02," in card  # full.lr, not train.lr
    assert "test 4 rows" not in card
    assert "- evaluated in fp32, the precision `tunesmith serve` and `generate` answer in" in card
    # the card's "Load it" code runs as written and asks with the run's system prompt
    code = card.split("```python\n")[1].split("```")[0].replace("<this folder>", str(tmp_path / "h"))
    assert "'Answer briefly.'" in code or "Answer briefly." in code
    exec(compile(code, "model card", "exec"), {})
    # a classifier evaluated by label scoring: free answers may differ, and the card says so (a newcomer's finding)
    from tunesmith.deploy.export import _card_header
    from tunesmith.deploy.loading import run_config

    cfg = run_config(run)
    cfg.task, cfg.eval.classify_by = "classification", "scoring"
    header = _card_header(run, cfg, "hf", "fp32")
    assert "by scoring each label and taking the likeliest" in header and "greedy answers there equal" not in header


@pytest.mark.parametrize("shots", [2, 0])
def test_prompt_export_folds_the_system_prompt_when_the_template_refuses_it(tmp_path, tiny_model_dir, shots):
    from tunesmith.data.render import render

    run = _run(tmp_path, tiny_model_dir, f"nosys-{shots}", "prompt", {"chat_template": NO_SYSTEM_TEMPLATE},
               prompt={"shots": shots})
    doc = json.loads((export(run, "prompt", out=tmp_path / "p").path / "prompt.json").read_text())
    assert all(m["role"] != "system" for m in doc["messages"])
    tok = load_run(run).tokenizer
    question = {"role": "user", "content": "Say hello 3"}
    if shots:
        assert len(doc["messages"]) == 2 * shots and doc["messages"][0]["content"].startswith("Answer briefly.\n\n")
        assert "user_prefix" not in doc
        sent = doc["messages"] + [question]
    else:
        assert doc["messages"] == [] and doc["user_prefix"] == "Answer briefly.\n\n" and "user_prefix" in doc["usage"]
        sent = [{"role": "user", "content": doc["user_prefix"] + question["content"]}]
    # what a client sends renders exactly as training and evaluation rendered the conversation
    saved = json.loads((run / "prompt" / "prompt.json").read_text())
    turns = [m for shot in saved.get("examples") or [] for m in shot if m["role"] != "system"]
    trained = [{"role": "system", "content": "Answer briefly."}, *turns, question]
    assert tok.apply_chat_template(sent, add_generation_prompt=True, tokenize=False) == render(tok, trained, True)
