"""Batch generation: prompts from any readable file, answers equal to the engine's, resumable."""

from __future__ import annotations

import json

import pytest

from tunesmith.cli import main
from tunesmith.data.formats import DataError
from tunesmith.data.render import chat_format, encode_prompt
from tunesmith.generation.engine import Engine, GenerationRequest, SamplingParams
from tunesmith.deploy.generate import done_lines, generate_file, read_prompts
from tunesmith.deploy.loading import load_for_serving, run_config


def rows_of(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_prompts_are_built_from_the_usual_layouts(finished_runs, tmp_path):
    cfg = run_config(finished_runs["alpha-lora"])
    (tmp_path / "a.jsonl").write_text(
        json.dumps({"instruction": "Say hello 3", "input": "world", "id": 7}) + "\n"
        + json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "old answer"}]}) + "\n")
    rows = read_prompts(tmp_path / "a.jsonl", cfg)
    assert rows[0].messages == [{"role": "user", "content": "Say hello 3\n\nworld"}] and rows[0].line == 1
    assert rows[1].messages == [{"role": "user", "content": "hi"}]  # the given answer is not part of the prompt
    (tmp_path / "b.csv").write_text("question\nwhat is the capital of france ?\n")
    assert read_prompts(tmp_path / "b.csv", cfg)[0].messages[-1]["content"] == "what is the capital of france ?"


def test_bad_prompt_rows_are_named(finished_runs, tmp_path):
    cfg = run_config(finished_runs["alpha-lora"])
    (tmp_path / "c.jsonl").write_text(json.dumps({"prompt": "ok"}) + "\n" + json.dumps({"prompt": "  "}) + "\n")
    with pytest.raises(DataError, match=r"c.jsonl:2: empty prompt"):
        read_prompts(tmp_path / "c.jsonl", cfg)
    (tmp_path / "d.jsonl").write_text(json.dumps({"a": "x", "b": "y"}) + "\n")
    with pytest.raises(DataError, match="no column holds a prompt.*'a', 'b'"):
        read_prompts(tmp_path / "d.jsonl", cfg)


def test_answers_equal_the_engine_alone_and_a_rerun_generates_nothing(finished_runs, tmp_path):
    run = finished_runs["alpha-lora"]
    prompts = [f"Say hello {i}" for i in range(5)]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"instruction": p, "id": i}) + "\n" for i, p in enumerate(prompts)))
    out = tmp_path / "out.jsonl"
    params = SamplingParams(max_tokens=6)
    done = generate_file(run, tmp_path / "in.jsonl", out, params)
    assert done["generated"] == 5 and done["skipped"] == 0
    rows = rows_of(out)
    assert [r["id"] for r in rows] == list(range(5)) and [r["line"] for r in rows] == [1, 2, 3, 4, 5]

    group = load_for_serving([run])[0]
    engine = Engine(group.model, group.tokenizer)
    stops = tuple(chat_format(group.tokenizer).stop_ids)
    try:
        for p, r in zip(prompts, rows):
            ids = encode_prompt(group.tokenizer, [{"role": "user", "content": p}], 512)
            alone = engine.generate([GenerationRequest(ids, "alpha-lora", SamplingParams(max_tokens=6, stop_ids=stops))])[0]
            assert r["response"] == alone.choices[0].text and r["completion_tokens"] == alone.completion_tokens
    finally:
        engine.shutdown()
    before = out.read_text()
    assert generate_file(run, tmp_path / "in.jsonl", out, params)["generated"] == 0
    assert out.read_text() == before


def test_an_interrupted_job_resumes_without_repeating_rows(finished_runs, tmp_path):
    run = finished_runs["gamma-full"]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"prompt": f"hello {i}"}) + "\n" for i in range(4)))
    out = tmp_path / "out.jsonl"
    generate_file(run, tmp_path / "in.jsonl", out, SamplingParams(max_tokens=3))
    full = rows_of(out)
    lines = out.read_text().splitlines(keepends=True)
    out.write_text("".join(lines[:2]) + lines[2][:10])  # killed while writing the third answer
    assert done_lines(out) == {1, 2} and out.read_text() == "".join(lines[:2])
    done = generate_file(run, tmp_path / "in.jsonl", out, SamplingParams(max_tokens=3))
    assert done["generated"] == 2 and done["skipped"] == 2
    assert rows_of(out) == full


def test_an_output_written_for_another_input_is_refused_not_mixed(finished_runs, tmp_path):
    """A newcomer copied the answers to one file as the output for another: it said "23 of 24 rows
    already answered" and left 23 prompts unanswered. Each answered row must answer the input row
    of its line (the fields it carries), else nothing is generated and the message names both."""
    run = finished_runs["gamma-full"]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"prompt": f"hello {i}", "id": i}) + "\n" for i in range(3)))
    (tmp_path / "b.jsonl").write_text("".join(json.dumps({"prompt": f"bye {i}", "id": i}) + "\n" for i in range(3)))
    out = tmp_path / "out.jsonl"
    generate_file(run, tmp_path / "a.jsonl", out, SamplingParams(max_tokens=2))
    before = out.read_text()
    with pytest.raises(DataError, match=r"out.jsonl:1: answers another input's line 1: field 'prompt' is 'hello 0' "
                                        r"there, 'bye 0' in .*b.jsonl; choose another --output"):
        generate_file(run, tmp_path / "b.jsonl", out, SamplingParams(max_tokens=2))
    (tmp_path / "c.jsonl").write_text(json.dumps({"prompt": "hello 0", "id": 0}) + "\n")
    with pytest.raises(DataError, match=r"out.jsonl:2: answers line 2, which .*c.jsonl does not have"):
        generate_file(run, tmp_path / "c.jsonl", out, SamplingParams(max_tokens=2))
    assert out.read_text() == before  # nothing written, nothing lost
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"prompt": f"hi {i}", "response": "gold"}) + "\n" for i in range(2)))
    generate_file(run, tmp_path / "d.jsonl", tmp_path / "d-out.jsonl", SamplingParams(max_tokens=2))  # 'response' overwritten
    assert generate_file(run, tmp_path / "d.jsonl", tmp_path / "d-out.jsonl", SamplingParams(max_tokens=2))["skipped"] == 2
    assert generate_file(run, tmp_path / "a.jsonl", out, SamplingParams(max_tokens=2))["generated"] == 0


def test_generate_says_which_columns_it_read_when_the_layout_differs(finished_runs, tmp_path, capsys):
    """Mappings of the training data that a new input lacks give way to its own prompt columns; the
    note names what was read. A row's own system message replaces the run's (as in training): said."""
    from tunesmith.config import load_config

    cfg = load_config(data={"name": "x", "data": {"train": "x.jsonl", "columns": {"text": "instruction", "label": "category"},
                                                   "system_prompt": "Pick a category."}, "task": "instruction"})
    path = tmp_path / "m.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n"
                    + json.dumps({"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "yo"}]}) + "\n")
    notes = []
    rows = read_prompts(path, cfg, notes=notes)
    assert rows[0].messages[0] == {"role": "system", "content": "Pick a category."}
    assert rows[1].messages[0] == {"role": "system", "content": "Be brief."}
    assert notes == [f"{path}: the run read text from 'instruction' (data.columns.text), which this file lacks; "
                     "prompts are read from column 'messages'",
                     f"{path}: 1 row(s) bring their own system message, which replaces the run's system prompt (as in training)"]


def test_generate_verb_with_sampling_options(finished_runs, tmp_path, capsys):
    (tmp_path / "in.jsonl").write_text(json.dumps({"prompt": "hello"}) + "\n")
    out = tmp_path / "o.jsonl"
    args = ["generate", str(finished_runs["beta-lora"]), "--input", str(tmp_path / "in.jsonl"), "--output", str(out),
            "--max-tokens", "4", "--temperature", "0.8", "--seed", "3", "--n", "2"]
    assert main(args) == 0
    first = rows_of(out)[0]
    assert len(first["responses"]) == 2 and first["completion_tokens"] <= 8
    out.unlink()
    assert main(args) == 0 and rows_of(out)[0]["responses"] == first["responses"]  # seeded: reproducible
    assert main(args[:-2] + ["--n", "0"]) == 2 and "--n must be at least 1" in capsys.readouterr().err
    (tmp_path / "bad.jsonl").write_text("not json\n")
    assert main(["generate", str(finished_runs["beta-lora"]), "--input", str(tmp_path / "in.jsonl"),
                 "--output", str(tmp_path / "bad.jsonl")]) == 2
    assert "not a line tunesmith generate wrote" in capsys.readouterr().err


def test_bad_rows_can_be_skipped_and_are_counted(finished_runs, tmp_path, capsys):
    (tmp_path / "q.csv").write_text("question\nhello\n\"  \"\nworld\n")
    out = tmp_path / "o.jsonl"
    args = ["generate", str(finished_runs["gamma-full"]), "--input", str(tmp_path / "q.csv"), "--output", str(out),
            "--max-tokens", "2"]
    assert main(args) == 2 and "q.csv:3: empty prompt" in capsys.readouterr().err and not out.exists()
    assert main(args + ["--skip-bad-rows"]) == 0
    assert [r["line"] for r in rows_of(out)] == [2, 4]
    printed = " ".join(capsys.readouterr().out.split())  # the terminal wraps long lines
    assert "skipped: " in printed and "q.csv:3: empty prompt" in printed and "1 bad skipped" in printed
    lengths = sum(r["finish_reason"] == "length" for r in rows_of(out))  # answers cut by --max-tokens are counted
    assert (f"{lengths} of 2 answers ran to --max-tokens (2) without ending" in printed) == (lengths > 0)
