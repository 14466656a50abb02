"""GGUF export: tensors, metadata and tokenizer as llama.cpp's converter writes them; the file read
back by transformers' GGUF loader (and llama.cpp when installed) agrees with the in-memory model;
the Ollama Modelfile's Go template renders what the HF chat template renders.

Logit tolerances are max|difference| / max|logit|, measured here (2026-12-01):
  tiny random Llama, all positions  transformers: f32 0, f16 2e-4, bf16 1.7e-3, q8_0 6.4e-3
                                    llama.cpp:    f32 1.9e-4 (its f16 KV cache), f16 5e-4, bf16 2.1e-3, q8_0 7.7e-3
  SmolLM2-135M, first answer token  transformers: f32 3e-7, f16 1.1e-3, bf16 4.1e-3, q8_0 3.8e-2
                                    llama.cpp:    f32 9.5e-4, f16 1.8e-3, bf16 8.9e-3, q8_0 3.8e-2
Asserted with headroom (RELATIVE_TOLERANCE, SMOLLM_TOLERANCE). Greedy first tokens agreed on 5/5
chat prompts everywhere except llama.cpp q8_0 (4/5: a near tie on "What is the capital of France?").
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from conftest import CHAT_TEMPLATE, make_model, make_tokenizer
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from tunesmith.data.render import TEMPLATES
from tunesmith.deploy import gguf_export, llama_consumer
from tunesmith.deploy.errors import ExportError
from tunesmith.deploy.gguf_export import ollama_modelfile, unpermute_qk, verify_gguf, write_gguf

RELATIVE_TOLERANCE = {"f32": 1e-6, "f16": 2e-3, "bf16": 1e-2, "q8_0": 3e-2}
TEXTS = ["<|im_start|>user\nhello world , how are you today ?<|im_end|>\n<|im_start|>assistant\n",
         "the quick brown fox jumps over the lazy dog", "what is the capital of france ? paris . 0123"]


def read_back(path: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()


@torch.no_grad()
def logits(model: torch.nn.Module, tokenizer, text: str) -> torch.Tensor:
    return model(input_ids=torch.tensor([tokenizer(text, add_special_tokens=False).input_ids])).logits[0]  # (T, V)


def field(reader: gguf.GGUFReader, key: str):
    return reader.fields[key].contents()


def assert_same_model(path: Path, model: torch.nn.Module, tokenizer, dtype: str) -> None:
    """Logits of the file read back by transformers match the model's within the dtype's tolerance."""
    back = read_back(path)
    for text in TEXTS:
        want, got = logits(model, tokenizer, text), logits(back, tokenizer, text)
        relative = float((want - got).abs().max() / want.abs().max())
        assert relative <= RELATIVE_TOLERANCE[dtype], (dtype, text, relative)
        agree = float((want.argmax(-1) == got.argmax(-1)).float().mean())
        assert agree == 1.0 if dtype == "f32" else agree >= 0.9, (dtype, agree)


# ------------------------------------------------------------------------------ tiny Llama, tensors


def test_tiny_llama_f32_tensors_equal_the_model_after_undoing_the_permutation(tmp_path, tokenizer):
    model = make_model(len(tokenizer)).eval()
    path = write_gguf(model, tokenizer, tmp_path / "tiny.gguf", dtype="f32", name="tiny")
    assert path == tmp_path / "tiny.gguf" and [p.name for p in tmp_path.iterdir()] == ["tiny.gguf"]
    reader = gguf.GGUFReader(path)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, model.config.num_hidden_layers)
    state = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}  # tied: no output tensor
    expected = {names.get_name(k, try_suffixes=(".weight",)): k for k in state}
    tensors = {t.name: t for t in reader.tensors}
    assert set(tensors) == set(expected) and "output.weight" not in tensors
    heads, kv = model.config.num_attention_heads, model.config.num_key_value_heads
    for gguf_name, hf_name in expected.items():
        t = tensors[gguf_name]
        assert t.tensor_type == gguf.GGMLQuantizationType.F32
        data = torch.from_numpy(np.array(t.data)).reshape(state[hf_name].shape)  # numpy shape = torch shape
        assert tuple(reversed(t.shape.tolist())) == tuple(state[hf_name].shape)  # GGUF lists dims fastest first
        if gguf_name.endswith("attn_q.weight"):
            assert not torch.equal(data, state[hf_name])  # the permutation is real
            data = unpermute_qk(data, heads, heads)
        elif gguf_name.endswith("attn_k.weight"):
            data = unpermute_qk(data, heads, kv)
        assert torch.equal(data, state[hf_name]), gguf_name


def test_tiny_llama_metadata(tmp_path, tokenizer):
    model = make_model(len(tokenizer))
    reader = gguf.GGUFReader(write_gguf(model, tokenizer, tmp_path / "tiny.gguf", dtype="f16", name="tiny-run"))
    expect = {"general.architecture": "llama", "general.name": "tiny-run", "general.file_type": 1,
              "llama.block_count": 2, "llama.context_length": 256, "llama.embedding_length": 32,
              "llama.feed_forward_length": 64, "llama.attention.head_count": 4, "llama.attention.head_count_kv": 2,
              "llama.rope.dimension_count": 8, "llama.rope.freq_base": 10000.0, "llama.vocab_size": len(tokenizer),
              "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt-2", "tokenizer.chat_template": CHAT_TEMPLATE,
              "tokenizer.ggml.eos_token_id": tokenizer.convert_tokens_to_ids("<|im_end|>"),
              "tokenizer.ggml.eot_token_id": tokenizer.convert_tokens_to_ids("<|im_end|>"),
              "tokenizer.ggml.bos_token_id": tokenizer.bos_token_id, "tokenizer.ggml.add_bos_token": False}
    assert {k: field(reader, k) for k in expect} == expect
    assert field(reader, "llama.attention.layer_norm_rms_epsilon") == pytest.approx(model.config.rms_norm_eps)
    tokens, types = field(reader, "tokenizer.ggml.tokens"), field(reader, "tokenizer.ggml.token_type")
    assert tokens == [tokenizer.convert_ids_to_tokens(i) for i in range(len(tokenizer))]
    assert [types[tokenizer.convert_tokens_to_ids(s)] for s in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")] == [3, 3, 3]
    assert types.count(1) == len(tokenizer) - 3  # the rest are normal
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    assert field(reader, "tokenizer.ggml.merges") == [" ".join(m) for m in merges]


def test_dtypes_store_norms_in_f32_and_q8_0_falls_back_to_f16_for_partial_blocks(tmp_path, tokenizer):
    # hidden 48: rows of 48 values are not whole 32-value q8_0 blocks; down_proj's rows (64) are
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=48, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(write_gguf(model, tokenizer, tmp_path / "q.gguf", dtype="q8_0")).tensors}
    assert types["output.weight"] == "F16" and types["token_embd.weight"] == "F16"  # untied: output written
    assert types["blk.0.ffn_down.weight"] == "Q8_0" and types["blk.0.attn_q.weight"] == "F16"
    assert types["blk.0.attn_norm.weight"] == types["output_norm.weight"] == "F32"
    assert_same_model(tmp_path / "q.gguf", model, tokenizer, "q8_0")
    bf16 = {t.name: t.tensor_type.name for t in gguf.GGUFReader(write_gguf(model, tokenizer, tmp_path / "b.gguf", dtype="bf16")).tensors}
    assert bf16["blk.0.attn_q.weight"] == "BF16" and bf16["blk.0.ffn_norm.weight"] == "F32"


# --------------------------------------------------------------------- read back by transformers


@pytest.mark.parametrize("dtype", ["f32", "f16", "bf16", "q8_0"])
def test_transformers_gguf_loader_gives_the_same_logits(tmp_path, tokenizer, dtype):
    model = make_model(len(tokenizer)).eval()
    path = write_gguf(model, tokenizer, tmp_path / f"tiny-{dtype}.gguf", dtype=dtype)
    assert_same_model(path, model, tokenizer, dtype)
    if dtype == "f32":  # exact, not just close
        for text in TEXTS:
            torch.testing.assert_close(logits(read_back(path), tokenizer, text), logits(model, tokenizer, text), atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["mistral", "qwen2"])
def test_mistral_and_qwen2_export_too(tmp_path, tokenizer, family):
    """Mistral is written as llama (q/k permuted), Qwen2 as qwen2 (q/k/v biases, no permutation)."""
    from transformers import MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

    shape = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = (MistralForCausalLM(MistralConfig(**shape)) if family == "mistral" else Qwen2ForCausalLM(Qwen2Config(**shape))).eval()
    if family == "qwen2":
        with torch.no_grad():  # biases start at zero; make them count
            for layer in model.model.layers:
                layer.self_attn.q_proj.bias.normal_()
                layer.self_attn.k_proj.bias.normal_()
    path = write_gguf(model, tokenizer, tmp_path / f"{family}.gguf", dtype="f32")
    reader = gguf.GGUFReader(path)
    assert field(reader, "general.architecture") == ("llama" if family == "mistral" else "qwen2")
    assert ("blk.0.attn_q.bias" in {t.name for t in reader.tensors}) == (family == "qwen2")
    assert_same_model(path, model, tokenizer, "f32")
    if llama_consumer.available():
        result = verify_gguf(path, model, tokenizer, ["hello world"], max_new_tokens=3)
        assert result["agree_all_tokens"] == 1 and result["relative_diff"] < 1e-3, result


def test_without_the_qk_permutation_the_consumer_disagrees(tmp_path, tokenizer, monkeypatch):
    """The permutation is what GGUF readers expect, not a no-op both sides happen to share."""
    model = make_model(len(tokenizer)).eval()
    monkeypatch.setattr(gguf_export, "permute_qk", lambda w, n, k: w)
    back = read_back(write_gguf(model, tokenizer, tmp_path / "wrong.gguf", dtype="f32"))
    assert not torch.allclose(logits(back, tokenizer, TEXTS[1]), logits(model, tokenizer, TEXTS[1]), atol=1e-3)


def test_transformers_gguf_tokenizer_encodes_like_the_hf_tokenizer(tmp_path, tokenizer):
    path = write_gguf(make_model(len(tokenizer)), tokenizer, tmp_path / "tiny.gguf", dtype="f32")
    back = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    for text in [*TEXTS, "  two  spaces\nand a newline\t!", "déjà vu ✓", "<|im_end|><|im_start|>system"]:
        assert back(text, add_special_tokens=False).input_ids == tokenizer(text, add_special_tokens=False).input_ids, text
    assert back.eos_token == "<|im_end|>" and back.chat_template == tokenizer.chat_template


@pytest.mark.parametrize("run", ["alpha-lora", "gamma-full"])
def test_a_finished_run_exports_and_reads_back(tmp_path, finished_runs, run):
    from tunesmith.deploy.loading import load_run

    loaded = load_run(finished_runs[run], merge=True)
    model, tok = loaded.model.cpu().eval(), loaded.tokenizer
    assert type(model).__name__ == "LlamaForCausalLM"  # merged: a plain model
    path = write_gguf(model, tok, tmp_path / f"{run}.gguf", dtype="f32", name=run)
    assert field(gguf.GGUFReader(path), "tokenizer.chat_template") == tok.chat_template
    assert_same_model(path, model, tok, "f32")
    assert_same_model(write_gguf(model, tok, tmp_path / f"{run}-q8.gguf", dtype="q8_0"), model, tok, "q8_0")
    base = make_model(len(tok)).eval()  # the export carries the tuned weights, not the base's
    assert not torch.allclose(logits(read_back(path), tok, TEXTS[1]), logits(base, tok, TEXTS[1]), atol=1e-4)


def test_verify_with_the_transformers_consumer(tmp_path, tokenizer, monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import fails: the fallback consumer
    model = make_model(len(tokenizer)).eval()
    path = write_gguf(model, tokenizer, tmp_path / "tiny.gguf", dtype="f32")
    prompts = ["hello world", "what is the capital of france ?", TEXTS[0]]  # the last one is already rendered
    result = verify_gguf(path, model, tokenizer, prompts, max_new_tokens=5)
    assert result["consumer"].startswith("transformers") and result["prompts"] == 3
    assert "not installed" in result["note"] and "llama.cpp" in result["note"]  # never a silent stand-in
    assert result["agree_first_token"] == result["agree_all_tokens"] == 3
    assert all(d["prompt_ids_equal"] and 1 <= len(d["reference"]) <= 5 for d in result["details"])


@pytest.mark.parametrize("dtype", ["f32", "f16", "bf16", "q8_0"])
def test_llama_cpp_reads_the_tiny_export_with_the_same_tokens_and_logits(tmp_path, tokenizer, dtype):
    """llama.cpp itself (in its child process): same prompt ids, same logits at every position
    (within the dtype's tolerance; its f16 KV cache costs f32 ~2e-4), and the end of turn ends generation."""
    if not llama_consumer.available():
        pytest.skip("llama_cpp is not installed (make llama)")
    untied = LlamaConfig(vocab_size=len(tokenizer), hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)
    torch.manual_seed(1)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    for model in (make_model(len(tokenizer)).eval(), LlamaForCausalLM(untied).eval()):
        path = write_gguf(model, tokenizer, tmp_path / f"tiny-{dtype}.gguf", dtype=dtype)
        run = llama_consumer.run_llama_cpp(path, TEXTS, max_new_tokens=1, n_ctx=256, all_logits=True, eog_ids=[im_end])
        for text, answer in zip(TEXTS, run.answers):
            assert answer.prompt_ids == tokenizer(text, add_special_tokens=False).input_ids, text
            got, want = torch.from_numpy(answer.all_logits), logits(model, tokenizer, text)  # (T, V)
            assert float((want - got).abs().max() / want.abs().max()) <= max(RELATIVE_TOLERANCE[dtype], 1e-3)
            assert float((want.argmax(-1) == got.argmax(-1)).float().mean()) >= 0.9
        assert run.is_eog[im_end] and run.token_eos == im_end


def test_llama_cpp_binding_is_built_without_amx():
    """ggml's AMX backend segfaults on q8_0 prompts on Intel AMX CPUs (llama.cpp issue 20824): the
    Makefile builds the binding with -mno-amx-*, so llama.cpp must not report AMX among its features."""
    if not llama_consumer.available():
        pytest.skip("llama_cpp is not installed (make llama)")
    info = subprocess.run([sys.executable, "-c", "import llama_cpp; print(llama_cpp.llama_print_system_info().decode())"],
                          capture_output=True, text=True, timeout=120)
    assert info.returncode == 0, info.stderr
    assert "AMX_INT8 = 1" not in info.stdout and "AMX" not in info.stdout.replace("AMX_INT8 = 0", ""), info.stdout


def test_a_crash_in_llama_cpp_is_a_failed_verification_not_a_crash(tmp_path, tokenizer, monkeypatch):
    """Native code that dies by a signal (as the AMX backend does) must not take the exporter down:
    the child process's death is reported as a failed verification, naming the signal."""
    crasher = tmp_path / "crash.sh"
    crasher.write_text("#!/bin/sh\nkill -SEGV $$\n")
    crasher.chmod(0o755)
    monkeypatch.setattr(llama_consumer, "available", lambda: True)
    monkeypatch.setattr(llama_consumer.sys, "executable", str(crasher))  # the child: a process that segfaults
    model = make_model(len(tokenizer)).eval()
    path = write_gguf(model, tokenizer, tmp_path / "tiny.gguf", dtype="q8_0")
    result = verify_gguf(path, model, tokenizer, ["hello world"], max_new_tokens=3)
    assert result["error"].startswith("llama.cpp crashed (SIGSEGV, signal 11)"), result
    assert result["consumer"] == "llama.cpp" and "relative_diff" not in result


def test_verify_with_llama_cpp_stops_at_the_end_of_turn(tmp_path, tokenizer):
    """A tiny model trained for a moment to answer "<|im_end|>" at once: llama.cpp stops there."""
    if not llama_consumer.available():
        pytest.skip("llama_cpp is not installed (make llama)")
    model = make_model(len(tokenizer)).train()
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    prompts = ["hello world", "what is the capital of france ?"]
    ids = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, return_dict=False) for p in prompts]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-2)
    for _ in range(30):  # the last position learns to predict the end of turn
        for x in ids:
            loss = -torch.log_softmax(model(input_ids=torch.tensor([x])).logits[0, -1], -1)[im_end]
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    result = verify_gguf(write_gguf(model, tokenizer, tmp_path / "stop.gguf", dtype="f16"), model, tokenizer, prompts)
    assert result["consumer"].startswith("llama.cpp") and result["relative_diff"] < 2e-3, result
    assert result["agree_all_tokens"] == result["stopped_at_end_of_turn"] == 2, result
    assert all(d["consumer"] == [im_end] for d in result["details"]), result


# ------------------------------------------------------------------------------------ refusals


def test_unsupported_architecture_is_refused_by_name(tmp_path, tokenizer):
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=1, n_head=2, n_positions=64))
    with pytest.raises(ExportError, match=r"GPT2LMHeadModel.*LlamaForCausalLM") as e:
        write_gguf(gpt2, tokenizer, tmp_path / "gpt2.gguf")
    assert isinstance(e.value, RuntimeError) and not list(tmp_path.iterdir())


def test_bad_dtype_and_sentencepiece_style_tokenizer_are_refused(tmp_path, tokenizer):
    model = make_model(len(tokenizer))
    with pytest.raises(ExportError, match="q4_k.*f32, f16, bf16, q8_0"):
        write_gguf(model, tokenizer, tmp_path / "x.gguf", dtype="q4_k")
    spm = Tokenizer(models.BPE(byte_fallback=True))  # Llama-2 style: Metaspace, no byte-level alphabet
    spm.pre_tokenizer = pre_tokenizers.Metaspace()
    spm.train_from_iterator(["hello world"] * 3, trainers.BpeTrainer(vocab_size=60, special_tokens=["<|im_start|>", "<|im_end|>"]))
    fast = PreTrainedTokenizerFast(tokenizer_object=spm, eos_token="<|im_end|>")
    fast.chat_template = CHAT_TEMPLATE
    (tmp_path / "x.gguf").write_bytes(b"an older export")
    with pytest.raises(ExportError, match="not a byte-level.*SentencePiece-style.*base model was itself a GGUF.*--format hf"):
        write_gguf(make_model(len(fast)), fast, tmp_path / "x.gguf")
    assert (tmp_path / "x.gguf").read_bytes() == b"an older export" and len(list(tmp_path.iterdir())) == 1  # atomic


def test_a_source_gguf_with_another_vocabulary_is_refused(tmp_path, tokenizer):
    src = write_gguf(make_model(len(tokenizer)), tokenizer, tmp_path / "src.gguf", dtype="f32")
    bigger = make_tokenizer()
    bigger.add_tokens(["<extra_a>", "<extra_b>"])
    with pytest.raises(ExportError, match="402"):
        write_gguf(make_model(len(bigger)), bigger, tmp_path / "out.gguf", source_gguf=src)


# ------------------------------------------------------------------- the embedded model's vocab


@pytest.fixture(scope="module")
def smollm_tokenizer():
    from tunesmith.models import ModelError, load_tokenizer

    try:
        return load_tokenizer("default")
    except ModelError as e:
        pytest.skip(str(e))


def raw(reader: gguf.GGUFReader, key: str) -> list[bytes]:
    f = reader.fields[key]
    return [bytes(f.parts[i]) for i in f.data]


def test_source_gguf_tokenizer_is_copied_byte_for_byte_and_hf_vocab_matches_it(tmp_path, smollm_tokenizer):
    """A tiny model with SmolLM2's vocabulary: with source_gguf the tokenizer keys are the source's
    bytes (eos/eot aside); built from the HF tokenizer, tokens, types and merges are the same too
    (the converter's recipe), only the pre-tokenizer name differs: the tokenizer transformers reads
    from a GGUF lost SmolLM2's digit splitting step, so it is plain gpt-2."""
    from tunesmith.models import default_gguf_path

    tok, source = smollm_tokenizer, default_gguf_path()
    model = make_model(len(tok))
    copied = gguf.GGUFReader(write_gguf(model, tok, tmp_path / "copy.gguf", dtype="f32", source_gguf=source))
    built = gguf.GGUFReader(write_gguf(model, tok, tmp_path / "built.gguf", dtype="f32"))
    original = gguf.GGUFReader(source)
    keys = [k for k in original.fields if k.startswith("tokenizer.ggml.")]
    assert "tokenizer.ggml.merges" in keys and len(keys) >= 10
    for key in keys:
        assert raw(copied, key) == raw(original, key), key
        if key not in ("tokenizer.ggml.pre", "tokenizer.ggml.add_space_prefix"):
            assert raw(built, key) == raw(original, key), key
    assert field(built, "tokenizer.ggml.pre") == "gpt-2" and field(copied, "tokenizer.ggml.pre") == "smollm"
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert field(copied, "tokenizer.ggml.eos_token_id") == field(copied, "tokenizer.ggml.eot_token_id") == im_end
    assert field(copied, "tokenizer.chat_template") == tok.chat_template


# ---------------------------------------------------------------------------- Ollama Modelfile


def go_render(template: str, messages: list[dict[str, str]]) -> str:
    """A small interpreter for the Go text/template subset Ollama templates use: text, string
    literals, .Field, $vars, :=, if/else if/else/end, range $i, $_ := ..., and eq ne and or not len
    slice, with {{- -}} whitespace trimming as Go defines it."""
    parts = re.split(r'({{(?:[^"}]|"(?:[^"\\]|\\.)*"|}(?!}))*}})', template)  # actions; "}}" may sit in strings
    items: list = []
    for i, part in enumerate(parts):
        if i % 2 == 0:
            items.append(part)
            continue
        if part.startswith("{{- ") and items and isinstance(items[-1], str):
            items[-1] = items[-1].rstrip(" \t\r\n")
        trim_right = part.endswith(" -}}")
        items.append(("action", part.strip("{}").strip("-").strip(), trim_right))
    for i, item in enumerate(items):  # -}} trims the text after it
        if isinstance(item, tuple) and item[2] and i + 1 < len(items) and isinstance(items[i + 1], str):
            items[i + 1] = items[i + 1].lstrip(" \t\r\n")
    tree, _ = _parse(items, 0)
    out: list[str] = []
    ollama = [{"Role": m["role"], "Content": m["content"]} for m in messages]  # Ollama's api.Message fields
    _run(tree, {"$": {"Messages": ollama}}, {"Messages": ollama}, out)
    return "".join(out)


def _parse(items, i, stop=("end",)):
    body = []
    while i < len(items):
        item = items[i]
        if isinstance(item, str):
            body.append(("text", item))
            i += 1
            continue
        code = item[1]
        word = code.split()[0]
        if word in ("end", "else"):
            return body, i
        if word == "if":
            branches, i = [], i
            cond = code[3:]
            while True:
                block, i = _parse(items, i + 1)
                branches.append((cond, block))
                code = items[i][1]
                if code.startswith("else if "):
                    cond = code[8:]
                    continue
                if code == "else":
                    block, i = _parse(items, i + 1)
                    branches.append(("true", block))
                break
            body.append(("if", branches))
        elif word == "range":
            m = re.match(r"range \$(\w+), \$(\w+) := (.*)", code)
            block, i = _parse(items, i + 1)
            body.append(("range", m.group(1), m.group(2), m.group(3), block))
        elif re.match(r"\$\w+ :=", code):
            name, expr = code.split(":=", 1)
            body.append(("set", name.strip(), expr))
        elif re.match(r"\$\w+ =", code):  # assignment to a variable declared in an enclosing scope
            name, expr = code.split("=", 1)
            body.append(("assign", name.strip(), expr))
        else:
            body.append(("print", code))
        i += 1
    return body, i


def _run(tree, env, dot, out):
    for node in tree:
        if node[0] == "text":
            out.append(node[1])
        elif node[0] == "print":
            out.append(str(_eval(node[1], env, dot)))
        elif node[0] == "set":
            env[node[1]] = [_eval(node[2], env, dot)]  # a box: blocks copy env, an assignment reaches the declaration
        elif node[0] == "assign":
            env[node[1]][0] = _eval(node[2], env, dot)
        elif node[0] == "if":
            for cond, block in node[1]:
                if cond == "true" or _eval(cond, env, dot):
                    _run(block, dict(env), dot, out)
                    break
        elif node[0] == "range":
            for i, item in enumerate(_eval(node[3], env, dot)):
                _run(node[4], {**env, "$" + node[1]: i, "$" + node[2]: item}, item, out)


def _eval(expr, env, dot):
    tokens = re.findall(r'"(?:[^"\\]|\\.)*"|[()]|[^\s()]+', expr)
    value, rest = _expr(tokens, env, dot)
    assert not rest, expr
    return value


FUNCS = {"eq": lambda a, b: a == b, "ne": lambda a, b: a != b, "and": lambda *a: all(a), "or": lambda *a: any(a),
         "not": lambda a: not a, "len": len, "slice": lambda x, i: x[i:]}


def _expr(tokens, env, dot):
    """A command: a function and its arguments, or a single operand."""
    if tokens[0] in FUNCS:
        fn, args, rest = FUNCS[tokens[0]], [], tokens[1:]
        while rest and rest[0] != ")":
            arg, rest = _operand(rest, env, dot)
            args.append(arg)
        return fn(*args), rest
    return _operand(tokens, env, dot)


def _operand(tokens, env, dot):
    tok, rest = tokens[0], tokens[1:]
    if tok == "(":
        value, rest = _expr(rest, env, dot)
        assert rest[0] == ")"
        return value, rest[1:]
    if tok.startswith('"'):
        return json.loads(tok), rest
    if tok.startswith("$."):
        return env["$"][tok[2:]], rest
    if tok.startswith("$"):
        value = env[tok]
        return (value[0] if isinstance(value, list) else value), rest  # := variables are boxed (see _run)
    if tok.startswith("."):
        return dot[tok[1:]], rest
    if tok.isdigit():
        return int(tok), rest
    raise AssertionError(f"unknown operand {tok}")


def template_of(modelfile: str) -> str:
    return re.search(r'^TEMPLATE """(.*?)"""$', modelfile, flags=re.S | re.M).group(1)


CONVERSATIONS = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "2+2?"}],
    [{"role": "system", "content": "You classify."}, {"role": "user", "content": "a {{ .Content }} \"quoted\"\nline"},
     {"role": "assistant", "content": "positive"}, {"role": "user", "content": "  spaces  "},
     {"role": "assistant", "content": "negative\n"}, {"role": "user", "content": "déjà ✓ <|im_end|>"}],
]


@pytest.mark.parametrize("template", ["smollm", "chatml", "alpaca"])
def test_modelfile_template_renders_what_the_chat_template_renders(template):
    tok = make_tokenizer()
    if template != "smollm":
        tok.chat_template = TEMPLATES[template]
    go = template_of(ollama_modelfile(tok, "m.gguf"))
    for messages in CONVERSATIONS:
        want = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert go_render(go, messages) == want, messages
        # a final assistant message is continued (Ollama's prefill), as continue_final_message renders it
        prefill = [*messages, {"role": "assistant", "content": "Sure"}]
        assert go_render(go, prefill) == tok.apply_chat_template(prefill, tokenize=False, continue_final_message=True)


def test_modelfile_lines():
    tok = make_tokenizer()
    text = ollama_modelfile(tok, "run.q8_0.gguf", system_prompt="Classify the review.",
                            parameters={"temperature": 0, "stop": ["###"], "num_ctx": 2048})
    lines = text.splitlines()
    assert lines[0] == "FROM ./run.q8_0.gguf"
    assert 'SYSTEM """Classify the review."""' in lines
    assert [ln for ln in lines if ln.startswith("PARAMETER")] == [
        'PARAMETER stop "<|im_end|>"', "PARAMETER temperature 0", 'PARAMETER stop "###"', "PARAMETER num_ctx 2048"]
    assert "SmolLM" in template_of(text)  # the default system turn the template adds without a system message
    tok.eos_token = "<|endoftext|>"  # ChatML models whose eos is not the end of turn stop on both
    assert 'PARAMETER stop "<|endoftext|>"' in ollama_modelfile(tok, "m.gguf")


@pytest.mark.parametrize("template", [
    "{% for m in messages %}{{ m['role'] + ': ' + m['content'] | upper + '\n' }}{% endfor %}",  # rewrites content
    "{% for m in messages %}{{ loop.index|string + ' ' + m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}",  # numbers turns
    "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system') }}{% endif %}"
    "{{ loop.index|string + m['content'] }}{% endfor %}",  # no system role, and numbers turns
])
def test_templates_ollama_cannot_express_are_refused(template):
    tok = make_tokenizer()
    tok.chat_template = template
    with pytest.raises(ExportError, match="template"):
        ollama_modelfile(tok, "m.gguf")


# ------------------------------------------------------------------ the embedded model (slow)

SMOLLM_TOLERANCE = {"f16": 5e-3, "q8_0": 6e-2}  # see the module docstring
CHAT_PROMPTS = ["What is the capital of France?", "Say hello.", "Reply with one word: is the sky blue?",
                "Write one sentence about the sea.", "Name a primary colour."]


@pytest.fixture(scope="module")
def default_model():
    from tunesmith.models import ModelError, load_model

    try:
        model, tok = load_model("default")
    except ModelError as e:
        pytest.skip(str(e))
    return model.eval(), tok


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["q8_0", "f16"])
def test_default_model_export_reads_back_in_transformers(tmp_path, default_model, dtype, monkeypatch):
    from tunesmith.models import default_gguf_path

    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # transformers' GGUF loader, whether or not llama.cpp is here
    model, tok = default_model
    path = write_gguf(model, tok, tmp_path / f"smol.{dtype}.gguf", dtype=dtype, source_gguf=default_gguf_path())
    result = verify_gguf(path, model, tok, CHAT_PROMPTS, max_new_tokens=3)
    assert result["consumer"].startswith("transformers")
    assert all(d["prompt_ids_equal"] for d in result["details"]), result
    assert result["agree_first_token"] >= 4, result  # q8_0 may flip a near tie
    assert result["relative_diff"] <= SMOLLM_TOLERANCE[dtype], result


@pytest.mark.slow
def test_default_model_in_llama_cpp_agrees_and_stops_at_the_end_of_turn(tmp_path, default_model):
    if not llama_consumer.available():
        pytest.skip("llama_cpp is not installed (make llama)")
    from tunesmith.models import default_gguf_path

    model, tok = default_model
    path = write_gguf(model, tok, tmp_path / "smol.q8_0.gguf", dtype="q8_0", source_gguf=default_gguf_path())
    result = verify_gguf(path, model, tok, CHAT_PROMPTS, max_new_tokens=24)
    assert result["consumer"].startswith("llama.cpp")
    assert all(d["prompt_ids_equal"] for d in result["details"]), result
    assert result["agree_first_token"] >= 4, result
    assert result["relative_diff"] <= SMOLLM_TOLERANCE["q8_0"], result
    # llama.cpp stops at <|im_end|> (the GGUF's end of turn): some short answer ends with it within 24 tokens,
    # and no answer goes on past one. (How many end within 24 tokens depends on the CPU's q8_0 kernels: 2 of 5
    # on AVX-512 machines, 1 of 5 on an AVX2-only AMD EPYC, 2026-12-07.)
    eot = tok.convert_tokens_to_ids("<|im_end|>")
    assert result["stopped_at_end_of_turn"] >= 1, result
    assert all(eot not in d["consumer"][:-1] for d in result["details"]), result


LLAMA_CONVERTER = Path(sys.prefix) / "llama.cpp-convert" / "convert_hf_to_gguf.py"  # `make llama-convert`
# metadata that may differ from llama.cpp's converter: the name, its size label, and what we copy from the
# source GGUF (add_space_prefix) or add on purpose (eot_token_id: the end of turn, so llama.cpp stops there)
CONVERTER_DIFFERENCES = {"general.name", "general.size_label", "tokenizer.ggml.add_space_prefix",
                         "tokenizer.ggml.eot_token_id"}


@pytest.mark.slow
def test_default_model_gguf_equals_llama_cpp_converter_output(tmp_path, default_model, dtype="q8_0"):
    """Our file is llama.cpp's own: the same model saved as an HF folder and converted by llama.cpp's
    convert_hf_to_gguf.py (vendored in llama-cpp-python's source) gives byte-identical tensors and
    the same metadata. So a crash of llama.cpp on our q8_0 file (Intel AMX) is llama.cpp's, not the file's.
    (f16 was checked the same way once, 2026-12-06: 272 of 272 tensors identical.)"""
    if not LLAMA_CONVERTER.is_file():
        pytest.skip(f"{LLAMA_CONVERTER} is missing (make llama-convert)")
    from tunesmith.models import default_gguf_path

    model, tok = default_model
    model.save_pretrained(tmp_path / "hf")
    tok.save_pretrained(tmp_path / "hf")
    ours = write_gguf(model, tok, tmp_path / f"ours.{dtype}.gguf", dtype=dtype, source_gguf=default_gguf_path())
    theirs = tmp_path / f"theirs.{dtype}.gguf"
    done = subprocess.run([sys.executable, str(LLAMA_CONVERTER), str(tmp_path / "hf"), "--outtype", dtype, "--outfile",
                           str(theirs)], capture_output=True, text=True, timeout=900,
                          env={**os.environ, "PYTHONPATH": str(LLAMA_CONVERTER.parent / "gguf-py")})
    assert done.returncode == 0, done.stderr[-2000:]
    a, b = gguf.GGUFReader(ours), gguf.GGUFReader(theirs)
    mine, other = {t.name: t for t in a.tensors}, {t.name: t for t in b.tensors}
    assert sorted(mine) == sorted(other)
    for name, t in mine.items():
        assert (t.tensor_type, list(t.shape)) == (other[name].tensor_type, list(other[name].shape)), name
        assert np.array_equal(np.asarray(t.data).view(np.uint8), np.asarray(other[name].data).view(np.uint8)), name
    keys = {k for k in a.fields if not k.startswith("GGUF.")} | {k for k in b.fields if not k.startswith("GGUF.")}
    for key in sorted(keys - CONVERTER_DIFFERENCES):
        assert key in a.fields and key in b.fields, key
        assert field(a, key) == field(b, key), key
