import json

import pytest

from tunesmith.config import DataConfig
from tunesmith.data import DataError, encode, encode_all, load_splits
from conftest import examples
from tunesmith.data.formats import read_rows
from tunesmith.data.formats import Example
from tunesmith.data.render import IGNORE, render


def expected_labels(tokenizer, messages):
    """Independent reference: token-level prefixes, assistant reply + <|im_end|> targeted."""
    ids = tokenizer(render(tokenizer, messages), add_special_tokens=False)["input_ids"]
    labels = [IGNORE] * len(ids)
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = len(tokenizer(render(tokenizer, messages[:i], add_generation_prompt=True), add_special_tokens=False)["input_ids"])
        end = len(tokenizer(render(tokenizer, messages[: i + 1]), add_special_tokens=False)["input_ids"])
        assert ids[end - 2] == tokenizer.eos_token_id  # "...<|im_end|>" then "\n"
        for k in range(start, end - 1):  # the reply and <|im_end|>, not the newline after it
            labels[k] = ids[k]
    return ids, labels


def targets_text(tokenizer, enc):
    return [tokenizer.decode([t]) for t, lab in zip(enc.input_ids, enc.labels) if lab != IGNORE]


def test_instruction_mask_token_by_token(tokenizer, instruction_file):
    ex = examples(instruction_file, "instruction")[0]
    assert ex.messages[-2]["content"] == "Say hello 0\n\nworld"
    enc = encode(tokenizer, ex, 512)
    ids, labels = expected_labels(tokenizer, ex.messages)
    assert enc.input_ids == ids
    assert enc.labels == labels
    assert "".join(targets_text(tokenizer, enc)) == "hello 0 !<|im_end|>"


def test_multi_turn_chat_mask_token_by_token(tokenizer, tmp_path):
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "hello world"},
        {"role": "user", "content": "how are you ?"},
        {"role": "assistant", "content": "fine , thanks ."},
    ]
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"messages": messages}) + "\n")
    ex = examples(path, "chat")[0]
    enc = encode(tokenizer, ex, 512)
    ids, labels = expected_labels(tokenizer, messages)
    assert enc.input_ids == ids and enc.labels == labels
    assert "".join(targets_text(tokenizer, enc)) == "hello world<|im_end|>fine , thanks .<|im_end|>"


def test_classification_mask_is_label_words_and_end_of_turn(tokenizer, sst_files):
    ex = examples(sst_files["train"], "classification",
                          labels={"0": "negative", "1": "positive"}, system_prompt="Classify.")[0]
    assert ex.label == "1" and ex.messages[0] == {"role": "system", "content": "Classify."}
    enc = encode(tokenizer, ex, 512)
    ids, labels = expected_labels(tokenizer, ex.messages)
    assert enc.labels == labels
    assert "".join(targets_text(tokenizer, enc)) == "positive<|im_end|>"


LONG = " ".join(f"w{i}" for i in range(60))  # 60 distinct words: which survive a cut is visible


def long_example(side_text=LONG, label="1"):
    return Example([{"role": "system", "content": "Classify."}, {"role": "user", "content": side_text},
                    {"role": "assistant", "content": {"0": "negative", "1": "positive"}[label]}], label=label, source="f:1")


@pytest.mark.parametrize("side", ["middle", "left", "right"])
def test_a_long_prompt_is_cut_and_its_answer_kept(tokenizer, side):
    ex = long_example()
    full = encode(tokenizer, ex, 10_000)
    limit = len(full.input_ids) - 40
    enc = encode(tokenizer, ex, limit, side=side)
    assert len(enc.input_ids) == limit and enc.truncated == "prompt"
    assert "".join(targets_text(tokenizer, enc)) == "positive<|im_end|>"  # the answer survives whole
    text = tokenizer.decode(enc.input_ids)
    assert text.startswith("<|im_start|>system\nClassify.<|im_end|>\n<|im_start|>user\n")  # the template is intact
    assert text.endswith("<|im_end|>\n<|im_start|>assistant\npositive<|im_end|>\n")
    kept = text.split("user\n")[1].split("<|im_end|>")[0].split()
    words = LONG.split()
    assert set(kept) < set(words) or kept[0] != words[0] or kept[-1] != words[-1]
    if side == "middle":  # start and end of the review kept, the middle dropped
        assert kept[0] == "w0" and kept[-1] == "w59" and "w30" not in kept
    elif side == "left":
        assert kept[0] != "w0" and kept[-1] == "w59"
    else:
        assert kept[0] == "w0" and kept[-1] != "w59"
    # the cut is exactly the excess, taken out of the question's tokens: the rest is the full encoding
    assert [t for t in enc.input_ids if t not in full.input_ids] == []


def test_truncation_counts_are_true(tokenizer):
    exs = [long_example(), long_example("short one", "0"), long_example(LONG + " " + LONG, "0")]
    limit = len(encode(tokenizer, exs[0], 10_000).input_ids) - 10
    kept, stats = encode_all(tokenizer, exs, limit)
    assert stats["truncated_prompt"] == 2 and stats["truncated_answer"] == 0 and stats["dropped_no_target"] == 0
    assert stats["truncated"] == 2 and len(kept) == 3
    assert ["".join(targets_text(tokenizer, e)) for e in kept] == ["positive<|im_end|>", "negative<|im_end|>",
                                                                    "negative<|im_end|>"]
    # too short for even the template and the answer: the end is cut; an example with no answer token left is dropped
    header = len(encode(tokenizer, long_example("x"), 10_000).input_ids) - 3
    kept, stats = encode_all(tokenizer, exs, header)
    assert stats["dropped_no_target"] + stats["truncated_answer"] + stats["truncated_prompt"] == 3
    assert len(kept) == 3 - stats["dropped_no_target"]


def test_label_scoring_keeps_the_answer_and_drops_the_oldest_shots_first(tokenizer):
    shots = []
    for i in range(4):
        shots += [{"role": "user", "content": f"shot {i} " + LONG}, {"role": "assistant", "content": "negative"}]
    ex = Example([{"role": "system", "content": "Classify."}, *shots, {"role": "user", "content": "the question"},
                  {"role": "assistant", "content": "positive"}], label="1")
    one_shot = len(encode(tokenizer, Example(ex.messages[:1] + shots[-2:] + ex.messages[-2:]), 10_000,
                          last_turn_only=True).input_ids)
    enc = encode(tokenizer, ex, one_shot + 5, last_turn_only=True)
    text = tokenizer.decode(enc.input_ids)
    assert "shot 3" in text and "shot 0" not in text and "the question" in text and "Classify." in text
    assert "".join(targets_text(tokenizer, enc)) == "positive<|im_end|>" and enc.truncated is None


def test_bad_rows_name_file_line_and_field(tmp_path):
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "a", \n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: invalid JSON"):
        read_rows(bad_json)
    missing = tmp_path / "missing.jsonl"
    missing.write_text('{"instruction": "a", "output": "b"}\n\n{"instruction": "a"}\n')
    with pytest.raises(DataError, match=r"missing.jsonl:3: missing field 'output'"):
        examples(missing, "instruction")
    labels = tmp_path / "labels.txt"
    labels.write_text("1 good\n7 what\n")
    with pytest.raises(DataError, match=r"labels.txt:2: field 'label': unknown label '7'"):
        examples(labels, "classification", labels={"0": "neg", "1": "pos"})
    csv_file = tmp_path / "d.csv"
    csv_file.write_text('text,label\n"fine",1\n"",0\n')
    with pytest.raises(DataError, match=r"d.csv:3: field 'text' is empty"):
        examples(csv_file, "classification", labels={"0": "neg", "1": "pos"})
    chat = tmp_path / "c.jsonl"
    chat.write_text(json.dumps({"messages": [{"role": "robot", "content": "x"}]}) + "\n")
    with pytest.raises(DataError, match=r"c.jsonl:1: field messages\[0\].role: 'robot'"):
        examples(chat, "chat")
    with pytest.raises(DataError, match="the file is empty"):
        (tmp_path / "e.jsonl").write_text("")
        read_rows(tmp_path / "e.jsonl")


def test_column_mapping_and_csv(tmp_path):
    path = tmp_path / "qa.csv"
    path.write_text("question,answer\nwhat is 1+1?,2\n")
    ex = examples(path, "instruction", columns={"instruction": "question", "output": "answer"})
    assert ex[0].messages == [{"role": "user", "content": "what is 1+1?"}, {"role": "assistant", "content": "2"}]
    with pytest.raises(DataError, match="data.columns: unknown role 'question'"):
        examples(path, "classification", columns={"question": "q"}, labels={"2": "two"})


def test_splits_hold_out_validation_deterministically(sst_files, tmp_path):
    from tunesmith.config import Config

    def splits(seed, out):
        cfg = Config(task="classification")
        cfg.data = DataConfig(train=str(sst_files["train"]), test=str(sst_files["test"]), validation_size=0.25,
                              labels={"0": "negative", "1": "positive"})
        cfg.data.prepare.dedup = "none"  # the tiny fixture repeats its lines on purpose
        cfg.train.seed = seed
        return load_splits(cfg, tmp_path / out)

    a, b = splits(3, "a"), splits(3, "b")
    assert len(a.validation) == 8 and len(a.train) == 24 and len(a.test) == 6
    assert [e.source for e in a.validation] == [e.source for e in b.validation]
    assert not {e.source for e in a.validation} & {e.source for e in a.train}
    assert sum(e.label == "1" for e in a.validation) == 4  # stratified: half of each label
    c = splits(4, "c")
    assert [e.source for e in c.validation] != [e.source for e in a.validation]
    assert not a.reused and splits(3, "a").reused  # same inputs and settings: the prepared files are reused


def test_an_answer_is_cut_rather_than_the_example_dropped_when_the_question_cannot_absorb_it(tokenizer):
    """max_seq_len barely above the prompt's skeleton: the question keeps a quarter of the budget and
    the answer's end goes, instead of the whole example (a long summary of a long dialogue)."""
    reply = " ".join(f"r{i}" for i in range(40))
    ex = Example([{"role": "user", "content": LONG}, {"role": "assistant", "content": reply}])
    skeleton = len(encode(tokenizer, Example([{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]),
                          10_000).input_ids)
    limit = skeleton + 40
    enc = encode(tokenizer, ex, limit)
    assert len(enc.input_ids) == limit and enc.truncated == "answer" and enc.n_targets > 5
    assert targets_text(tokenizer, enc)[0].strip() == "r" or "r0" in "".join(targets_text(tokenizer, enc))
    question = tokenizer.decode(enc.input_ids).split("user\n")[1].split("<|im_end|>")[0]
    assert len(tokenizer(question)["input_ids"]) >= limit // 4 - 1
    _, stats = encode_all(tokenizer, [ex], limit)
    assert stats["truncated_answer"] == 1 and stats["dropped_no_target"] == 0


def test_the_truncation_line_gives_how_many_were_longer():
    """The console line counts the examples longer than max_seq_len, then how each was cut (a newcomer
    read "of those longer than max_seq_len=256, 50 had their answer cut" and could not tell of how many)."""
    from rich.console import Console

    from tunesmith.config import load_config
    from tunesmith.runs.data import print_data_summary

    cfg = load_config(data={"name": "x", "data": {"train": "x.jsonl"}, "train": {"max_seq_len": 256}})
    console = Console(record=True, width=300)
    report = {"encoded": {"train": {"examples": 6910, "truncated_prompt": 12, "truncated_answer": 50, "dropped_no_target": 3}}}
    print_data_summary(report, cfg, console, 0)
    assert ("train (6,910 examples): 62 longer than max_seq_len=256: 12 had their prompt shortened (middle), the answer "
            "kept, 50 had their answer cut too; 3 dropped (no answer token left within max_seq_len)") in console.export_text()
