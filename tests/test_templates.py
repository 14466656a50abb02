"""Templates and special tokens: end of turn from the template, special strings in data are text,
models without a template, templates that reject the system role, conversations that open with
the assistant, and raw-text runs (issue 10, B)."""

import copy
import json
import shutil

import pytest
import torch
import yaml

from conftest import make_model, make_tokenizer
from tunesmith.cli import main
from tunesmith.data.formats import DataError, Example
from tunesmith.data.render import IGNORE, chat_format, encode, encode_all, encode_prompt, render, set_chat_template
from tunesmith.generation.generate import generate

CHAT = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "hello world"}]
# Gemma-style: no system role, strict alternation
STRICT = (
    "{% for message in messages %}{% if message['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def targets(tok, enc):
    return tok.decode([t for t, y in zip(enc.input_ids, enc.labels) if y != IGNORE])


@pytest.fixture
def eos_endoftext():
    """The ChatML template with eos <|endoftext|>: turns end with <|im_end|>, which is not the eos."""
    tok = make_tokenizer()
    tok.eos_token = "<|endoftext|>"
    return tok


def test_end_of_turn_comes_from_the_template_not_the_eos(eos_endoftext):
    tok = eos_endoftext
    fmt = chat_format(tok)
    im_end, eos = tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")
    assert fmt.end_of_turn == "<|im_end|>" and fmt.from_template and fmt.stop_ids == (im_end, eos)
    enc = encode(tok, Example(CHAT), 512)
    assert targets(tok, enc) == "hello world<|im_end|>"  # not "hello world<|im_end|>\n", not missing the end
    assert enc.labels[enc.input_ids.index(im_end, len(enc.input_ids) - 3)] == im_end


def test_generation_stops_on_the_end_of_turn_token(eos_endoftext):
    """Generation ends at the template's end of turn and at the end of sequence, each counted as
    one token of the reply; a reply with neither gets max_new_tokens tokens."""
    tok = eos_endoftext
    model = make_model(len(tok))
    im_end, eos = tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")
    prompt = len(encode_prompt(tok, CHAT[:-1], 512))
    forced = {}

    def force(module, inputs, out):  # every step predicts forced["token"]
        fake = torch.zeros_like(out)
        fake[..., forced["token"]] = 1.0
        return fake

    model.lm_head.register_forward_hook(force)
    for token, reply_tokens in ((im_end, 1), (eos, 1), (5, 4)):
        forced["token"] = token
        texts, tokens = generate(model, tok, [Example(CHAT)], max_new_tokens=4, batch_size=1, bf16=False)
        assert tokens == prompt + reply_tokens, token
        assert (texts[0] == "") == (token != 5)


def test_common_conversations_tokenize_exactly_as_the_template_does(tokenizer):
    ids = encode(tokenizer, Example(CHAT), 512).input_ids
    assert ids == tokenizer.apply_chat_template(CHAT, tokenize=True, return_dict=True)["input_ids"]


def test_special_token_strings_in_data_are_text(tokenizer):
    im_end, im_start = tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.convert_tokens_to_ids("<|im_start|>")
    messages = [{"role": "user", "content": "what ends a turn? <|im_start|>assistant"},
                {"role": "assistant", "content": "it is <|im_end|> , the end"}]
    enc = encode(tokenizer, Example(messages), 512)
    assert enc.special_text
    # control tokens only where the template put them: default system turn, user turn, assistant turn
    assert enc.input_ids.count(im_end) == 3 and enc.input_ids.count(im_start) == 3
    assert targets(tokenizer, enc) == "it is <|im_end|> , the end<|im_end|>"  # the literal is trained as text
    prompt = encode_prompt(tokenizer, messages[:1], 512)
    assert prompt.count(im_start) == 3  # system, user, and the generation prompt: not the one quoted in the data
    _, stats = encode_all(tokenizer, [Example(messages), Example(CHAT)], 512)
    assert stats["special_text"] == 1


def write_cfg(tmp_path, model_dir, train, task="instruction", **data):
    cfg = {"name": "t", "model": str(model_dir), "task": task, "method": "lora", "output_dir": str(tmp_path / "runs"),
           "data": {"train": str(train), "validation_size": 2, "prepare": {"dedup": "none"}, **data},
           "lora": {"r": 2, "alpha": 4},
           "train": {"max_steps": 2, "batch_size": 4, "eval_every": 2, "precision": "fp32", "max_seq_len": 128},
           "eval": {"batch_size": 8, "max_new_tokens": 4, "bootstrap_resamples": 100, "latency_examples": 2}}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture
def base_model_dir(tmp_path_factory, tiny_model_dir):
    """The tiny model with no chat template, as a base (pretrained-only) model ships."""
    path = tmp_path_factory.mktemp("base-model")
    shutil.copytree(tiny_model_dir, path, dirs_exist_ok=True)
    tok = make_tokenizer()
    tok.chat_template = None
    for f in path.glob("*chat_template*"):
        f.unlink()
    tok.save_pretrained(path)
    return path


def test_a_model_without_a_chat_template_stops_before_any_data_work(tmp_path, base_model_dir, capsys):
    path = write_cfg(tmp_path, base_model_dir, tmp_path / "does-not-exist.jsonl")
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"model '{base_model_dir}' has no chat template" in err and "data.chat_template" in err
    assert "chatml, alpaca" in err and "not found" not in err  # the data was never touched
    assert not (tmp_path / "runs" / "t").exists()


def test_data_chat_template_names_a_template_for_base_models(tmp_path, base_model_dir, instruction_file):
    tok = make_tokenizer()
    tok.chat_template = None
    set_chat_template(tok, "alpaca")
    enc = encode(tok, Example([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]), 128)
    fmt = chat_format(tok)
    assert not fmt.from_template or fmt.end_of_turn == tok.eos_token
    assert targets(tok, enc) == "hello<|im_end|>"  # the reply, then the eos the template writes after it
    path = write_cfg(tmp_path, base_model_dir, instruction_file, chat_template="chatml")
    assert main(["train", str(path)]) == 0
    saved = json.loads((tmp_path / "runs" / "t" / "eval.json").read_text())
    assert "rougeL" in saved["tuned"]


def test_a_template_without_an_end_of_turn_gets_the_eos_appended():
    tok = make_tokenizer()
    tok.chat_template = ("{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
                         "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}")
    fmt = chat_format(tok)
    assert not fmt.from_template and fmt.end_of_turn == "<|im_end|>"
    enc = encode(tok, Example([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]), 128)
    assert targets(tok, enc) == "hello<|im_end|>" and enc.input_ids[-2:] == [tok.eos_token_id, tok("\n")["input_ids"][0]]


def test_a_template_that_rejects_the_system_role_gets_it_folded_into_the_first_user_turn():
    tok = make_tokenizer()
    tok.chat_template = STRICT
    assert not chat_format(tok).system_role
    text = render(tok, CHAT)
    assert text.startswith("<|im_start|>user\nbe brief\n\nhello<|im_end|>")
    enc = encode(tok, Example(CHAT), 512)
    assert targets(tok, enc) == "hello world<|im_end|>"
    assert "be brief" in tok.decode(encode_prompt(tok, CHAT[:2], 512))


def test_a_conversation_that_opens_with_the_assistant(tokenizer):
    msgs = [{"role": "assistant", "content": "hi , how are you ?"}, {"role": "user", "content": "fine"},
            {"role": "assistant", "content": "good"}]
    enc = encode(tokenizer, Example(msgs), 512)  # ChatML accepts it: the first reply has an empty prompt
    assert targets(tokenizer, enc) == "hi , how are you ?<|im_end|>good<|im_end|>"
    strict = make_tokenizer()
    strict.chat_template = STRICT
    with pytest.raises(DataError, match=r"f.jsonl:3: the chat template cannot render it \(Conversation roles must alternate"):
        encode(strict, Example(msgs, source="f.jsonl:3"), 512)


def test_strict_template_rows_are_named_bad_rows_in_prepare(tmp_path, tiny_model_dir):
    from tunesmith.config import load_config
    from tunesmith.data.prepare import prepare

    tok = make_tokenizer()
    tok.chat_template = STRICT
    rows = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]} for i in range(6)]
    rows.append({"messages": [{"role": "assistant", "content": "hello"}, {"role": "user", "content": "x"},
                              {"role": "assistant", "content": "y"}]})
    path = tmp_path / "c.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = load_config(data={"task": "chat", "data": {"train": str(path), "validation_size": 2}})
    with pytest.raises(DataError, match=r"c.jsonl:7: the chat template cannot render it"):
        prepare(cfg, tmp_path / "out", tok)
    cfg.data.skip_bad_rows = True
    out = prepare(cfg, tmp_path / "out", tok)
    read = out.report["steps"][0]
    assert (read["rows_in"], read["rows_out"], read["bad_rows_skipped"]) == (7, 6, 1)


def test_raw_text_loss_is_normalised_by_the_positions_predicted(tokenizer, tiny_model):
    from tunesmith.data import collate
    from tunesmith.training.losses import target_loss_sum

    exs = [Example([], text="the quick brown fox jumps over the lazy dog"), Example([], text="hello world")]
    data, stats = encode_all(tokenizer, exs, 512)
    assert data[0].labels[0] == IGNORE and data[0].n_targets == len(data[0].input_ids) - 1
    batch = collate(data[:1], tokenizer.pad_token_id)
    ours, n = target_loss_sum(tiny_model, batch)
    ids = torch.tensor([data[0].input_ids])
    theirs = tiny_model(input_ids=ids, labels=ids).loss  # transformers predicts positions 1..T-1
    assert n == len(data[0].input_ids) - 1
    torch.testing.assert_close(ours / n, theirs)


def test_task_text_trains_and_evaluates_by_perplexity_without_a_template(tmp_path, base_model_dir):
    train = tmp_path / "wiki.txt"
    train.write_text("\n".join(f"the quick brown fox number {i} jumps over the lazy dog" for i in range(12)) + "\n")
    path = write_cfg(tmp_path, base_model_dir, train, task="text")
    assert main(["train", str(path)]) == 0
    ev = json.loads((tmp_path / "runs" / "t" / "eval.json").read_text())
    for side in ("base", "tuned"):
        assert {"loss", "perplexity"} <= set(ev[side]) and set(ev[side]["ci"]) == {"loss", "perplexity"}
    assert ev["metric"] == "perplexity" and ev["tuned"]["perplexity"] < ev["base"]["perplexity"]
    assert ev["tuned_vs_base"]["perplexity"]["p_value"] <= 1
    rows = [json.loads(line) for line in (tmp_path / "runs" / "t" / "predictions.jsonl").read_text().splitlines()]
    assert all(r["tuned_nll"][1] > 0 for r in rows)
    assert "Base vs tuned" in (tmp_path / "runs" / "t" / "report.html").read_text()


def test_chat_format_is_learnt_again_when_the_template_changes():
    tok = make_tokenizer()
    assert chat_format(tok).system_role
    other = copy.deepcopy(tok)
    other.chat_template = STRICT
    assert not chat_format(other).system_role and chat_format(tok).system_role
    tok.chat_template = STRICT
    assert not chat_format(tok).system_role


def test_a_template_that_drops_the_messages_is_refused():
    tok = make_tokenizer()
    tok.chat_template = "{% for m in messages %}{{ m['role'] }}: hi\n{% endfor %}"
    with pytest.raises(DataError, match="does not write the messages' content"):
        chat_format(tok)


def test_a_long_raw_text_is_trained_and_scored_whole_in_overlapping_windows(tokenizer, tiny_model):
    from tunesmith.data.render import encode_text
    from tunesmith.evaluation.evaluate import example_nll

    text = " ".join(["the quick brown fox jumps over the lazy dog"] * 12)
    ex = Example([], text=text)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    windows = encode_text(tokenizer, ex, 32)
    assert len(windows) > 2 and all(len(w.input_ids) <= 32 for w in windows)
    assert sum(w.n_targets for w in windows) == len(ids) - 1  # every token after the first, exactly once
    rebuilt = windows[0].input_ids + [t for w in windows[1:] for t in w.input_ids[1:]]
    assert rebuilt == ids
    data, stats = encode_all(tokenizer, [ex, Example([], text="hello world")], 32)
    assert stats["texts_in_windows"] == 1 and stats["kept"] == len(windows) + 1 and stats["truncated_answer"] == 0
    (nll, counts), _ = example_nll(tiny_model, tokenizer, [ex], 32, 4, False)
    whole, _ = example_nll(tiny_model, tokenizer, [ex], 10_000, 4, False)
    assert counts == whole[1] == [len(ids) - 1]  # the same tokens scored, windowed or not
