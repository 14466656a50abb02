"""Fixtures: a tiny tokenizer with a real chat template and a tiny random-init Llama, built here.

Nothing is downloaded; each tiny model trains in well under a second per step.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

# The SmolLM2 (ChatML) template, as the embedded model ships it.
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "a stirring , funny and finally transporting film", "one long string of cliches .",
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face",
    "Classify the sentiment of the movie review as positive or negative.",
    "system user assistant positive negative neutral", "Summarize the text in one sentence.",
    "the quick brown fox jumps over the lazy dog", "what is the capital of france ? paris .",
    "hello world , how are you today ? fine , thanks .", "0123456789 + - * / = ( ) [ ] { } : ; ' \" !",
]


def make_tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 5, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   pad_token="<|im_end|>", unk_token="<|endoftext|>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def make_model(vocab_size: int, seed: int = 0, **overrides: object) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2, **overrides)
    return LlamaForCausalLM(config)


@torch.no_grad()
def generate_alone(model, ids: list[int], adapter: str | None, max_new_tokens: int, stop_ids: list[int],
                   pad_id: int | None) -> list[int]:
    """transformers' greedy ``generate`` on one prompt with one adapter active (None: the base, the
    adapters disabled): the reference the engine and the server are held to, token for token."""
    x = torch.tensor([ids])
    kw = dict(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=list(stop_ids),
              pad_token_id=pad_id if pad_id is not None else stop_ids[0], attention_mask=torch.ones_like(x))
    if adapter is None:
        with model.disable_adapter():
            out = model.generate(input_ids=x, **kw)
    else:
        model.set_adapter(adapter)
        out = model.generate(input_ids=x, **kw)
    return out[0, len(ids):].tolist()


@pytest.fixture(scope="session", autouse=True)
def run_index(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The run index of this test session (never the user's): $TUNESMITH_INDEX, inherited by subprocesses."""
    import os

    path = tmp_path_factory.mktemp("index") / "runs.sqlite"
    old = os.environ.get("TUNESMITH_INDEX")
    os.environ["TUNESMITH_INDEX"] = str(path)
    yield path
    if old is None:
        os.environ.pop("TUNESMITH_INDEX", None)
    else:
        os.environ["TUNESMITH_INDEX"] = old


@pytest.fixture(scope="session")
def tokenizer() -> PreTrainedTokenizerFast:
    return make_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer: PreTrainedTokenizerFast) -> Path:
    """A tiny random Llama and the tiny tokenizer saved as an HF folder (what `model:` can point at)."""
    path = tmp_path_factory.mktemp("tiny-llama")
    make_model(len(tokenizer)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def tiny_model(tokenizer: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    return make_model(len(tokenizer))


SST_LINES = [
    "1 a stirring , funny and finally transporting film", "0 one long string of cliches .",
    "1 funny and transporting", "0 cliches and a lazy dog", "1 the quick brown fox is funny",
    "0 a long lazy string", "1 finally a stirring film", "0 long , long cliches .",
]


@pytest.fixture
def sst_files(tmp_path: Path) -> dict[str, Path]:
    """A tiny SST-2-shaped data set (LABEL TEXT lines) in a temporary folder."""
    train = tmp_path / "train.txt"
    train.write_text("\n".join(SST_LINES * 4) + "\n")
    test = tmp_path / "test.txt"
    test.write_text("\n".join(SST_LINES[:6]) + "\n")
    return {"train": train, "test": test}


@pytest.fixture
def instruction_file(tmp_path: Path) -> Path:
    rows = [{"instruction": f"Say hello {i}", "input": "" if i % 2 else "world", "output": f"hello {i} !"} for i in range(12)]
    path = tmp_path / "inst.json"
    path.write_text(json.dumps(rows))
    return path


def examples(path, task, **data):
    """Examples of one file, read the way a run reads them (format and layout detected)."""
    from tunesmith.config import DataConfig
    from tunesmith.data import load_examples

    return load_examples(str(path), DataConfig(train=str(path), **data), task)


@pytest.fixture(scope="session")
def finished_runs(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> dict[str, Path]:
    """Finished tiny instruction runs on ``tiny_model_dir``: two LoRA runs whose adapters differ
    (``alpha-lora``, ``beta-lora``), one full fine-tuning run (``gamma-full``) and one prompt run
    (``delta-prompt``). Trained once per test session (seconds); tests must not modify them."""
    from tunesmith import finetune, load_config

    root = tmp_path_factory.mktemp("finished-runs")
    rows = [{"instruction": f"Say hello {i}", "input": "" if i % 2 else "world", "output": f"hello {i} !"} for i in range(16)]
    (root / "inst.json").write_text(json.dumps(rows))
    out: dict[str, Path] = {}
    for name, method, lr, seed in [("alpha-lora", "lora", 5e-2, 0), ("beta-lora", "lora", 5e-2, 1),
                                   ("gamma-full", "full", 1e-2, 0), ("delta-prompt", "prompt", 1e-3, 0)]:
        cfg = {"name": name, "model": str(tiny_model_dir), "task": "instruction", "method": method,
               "output_dir": str(root / "runs"),
               "data": {"train": str(root / "inst.json"), "validation_size": 3, "prepare": {"test_size": 3}},
               "lora": {"r": 4, "alpha": 8},
               "train": {"max_steps": 3, "batch_size": 4, "lr": lr, "seed": seed, "precision": "fp32"},
               "eval": {"max_new_tokens": 4, "compare_with_base": False, "latency_examples": 0}}
        path = root / f"{name}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        out[name] = finetune(load_config(path)).dir
    return out


@pytest.fixture(scope="session")
def gen_runs(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> dict[str, Path]:
    """Two finished tiny LoRA instruction runs (``one``, ``two``) on the same 8 test prompts, with
    base and tuned predictions (the outputs a rating study shows). Tests must not modify them."""
    from tunesmith import finetune, load_config

    root = tmp_path_factory.mktemp("study-runs")
    rows = [{"instruction": f"Greet person {i}", "input": "", "output": f"hello person {i} !"} for i in range(40)]
    (root / "inst.json").write_text(json.dumps(rows))
    out = {}
    for name, lr in [("one", 5e-2), ("two", 1e-2)]:
        cfg = {"name": name, "model": str(tiny_model_dir), "task": "instruction", "method": "lora",
               "output_dir": str(root / "runs"),
               "data": {"train": str(root / "inst.json"), "validation_size": 4, "prepare": {"test_size": 8}},
               "lora": {"r": 4, "alpha": 8},
               "train": {"max_steps": 2, "batch_size": 4, "lr": lr, "precision": "fp32"},
               "eval": {"max_new_tokens": 4, "latency_examples": 0}}
        path = root / f"{name}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        out[name] = finetune(load_config(path)).dir
    return out
