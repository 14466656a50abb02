"""Every verb, fed bad input of each kind a user makes, answers ``error: ...`` with exit 2 and no
traceback: every error written for the user derives from ``errors.TunesmithError``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tunesmith import errors
from tunesmith.cli import main


def _config(tmp_path: Path, **changes) -> str:
    words = ["apple", "river", "stone", "cloud", "piano", "tiger", "lemon", "candle", "forest", "mirror", "rocket", "garden"]
    rows = [{"text": f"{words[i % 12]} {words[(i * 5) % 12]} {words[(i * 7 + 3) % 12]} {i} was {'good' if i % 2 else 'bad'}",
             "label": str(i % 2)} for i in range(24)]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = {"name": "bad-input", "model": "default", "task": "classification", "output_dir": str(tmp_path / "runs"),
           "data": {"train": str(data), "labels": {"0": "negative", "1": "positive"}, "prepare": {"dedup": "none"}}}
    for key, value in changes.items():
        node = cfg
        *parents, last = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def _not_a_run(tmp_path: Path) -> str:
    folder = tmp_path / "empty-folder"
    folder.mkdir(exist_ok=True)
    return str(folder)


def _bad_json_data(tmp_path: Path) -> str:
    path = _config(tmp_path)
    bad = tmp_path / "broken.jsonl"
    bad.write_text('{"text": "fine", "label": "1"}\n{"text": "no end", "label": \n')
    cfg = yaml.safe_load(Path(path).read_text())
    cfg["data"]["train"] = str(bad)
    Path(path).write_text(yaml.safe_dump(cfg))
    return path


def _lf_syntax_error(tmp_path: Path) -> str:
    lfs = tmp_path / "lfs.py"
    lfs.write_text("def lf_spam(x):\n    return 'spam' if 'win' in x.text else\n")
    return _config(tmp_path, **{"data.prepare.labeling_functions": str(lfs)})


def _prepared_only(tmp_path: Path) -> str:
    path = _config(tmp_path)
    assert main(["prepare", path]) == 0
    return str(tmp_path / "runs" / "bad-input")


def _not_gguf(tmp_path: Path) -> str:
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"<html>not found</html>")
    return _config(tmp_path, model=str(fake))


def _busy_port() -> int:
    import socket

    held = socket.socket()
    held.bind(("127.0.0.1", 0))
    held.listen()
    _HELD.append(held)  # kept open until the test process ends
    return held.getsockname()[1]


_HELD: list = []

CASES = {
    "train: missing config": (lambda t: ["train", str(t / "nope.yaml")], "file not found"),
    "train: typo in a key": (lambda t: ["train", _config(t, **{"train.batchsize": 4})], "did you mean 'train.batch_size'"),
    "train: bad value": (lambda t: ["train", _config(t, **{"train.batch_size": -3})], "train.batch_size: must be >= 1"),
    "train: missing data file": (lambda t: ["train", _config(t, **{"data.train": str(t / "gone.jsonl")})], "gone.jsonl: file not found"),
    "train: broken JSONL": (lambda t: ["train", _bad_json_data(t)], "broken.jsonl:2: invalid JSON"),
    "train: unknown model": (lambda t: ["train", _config(t, model=str(t / "no-model-here"))], "model not found"),
    "train: --set not KEY=VALUE": (lambda t: ["train", _config(t), "--set", "train.lr"], "expected KEY=VALUE"),
    "train: --resume of nothing": (lambda t: ["train", _config(t), "--resume"], "no checkpoint to resume from"),
    "prepare: labeling functions with a syntax error": (lambda t: ["prepare", _lf_syntax_error(t)], "lfs.py:2: syntax error"),
    "prepare: missing labeling-function file": (lambda t: ["prepare", _config(t, **{"data.prepare.labeling_functions": str(t / "x.py")})], "x.py: labeling-function file not found"),
    "prepare: broken JSONL": (lambda t: ["prepare", _bad_json_data(t)], "broken.jsonl:2: invalid JSON"),
    "eval: only prepared, never trained": (lambda t: ["eval", _prepared_only(t)], "no checkpoint to resume from; train it first"),
    "prepare: model file that is no GGUF": (lambda t: ["prepare", _not_gguf(t)], "not a GGUF file"),
    "serve: port out of range": (lambda t: ["serve", "--model", "default", "--port", "70000"], "from 0 to 65535"),
    "serve: port in use": (lambda t: ["serve", "--model", "default", "--port", str(_busy_port())], "cannot listen on"),
    "ui: port in use": (lambda t: ["ui", "--port", str(_busy_port())], "cannot listen on"),
    "estimate: negative --device-tflops": (lambda t: ["estimate", _config(t), "--device-tflops", "-5"], "must be greater than 0"),
    "train: --nproc below 0": (lambda t: ["train", _config(t), "--nproc", "-1"], "is below 0"),
    "train: --nnodes without --nproc": (lambda t: ["train", _config(t), "--nnodes", "2"], "need --nproc N"),
    "eval: not a run": (lambda t: ["eval", _not_a_run(t)], "not a run folder"),
    "eval: missing folder": (lambda t: ["eval", str(t / "runs" / "nothing")], "no such folder"),
    "compare: bad --data-sizes": (lambda t: ["compare", _config(t), "--data-sizes", "64,lots"], "--data-sizes"),
    "compare: unknown method": (lambda t: ["compare", _config(t), "--methods", "lora,magic"], "unknown method"),
    "export: not a run": (lambda t: ["export", _not_a_run(t), "--format", "adapter"], "not a run folder"),
    "serve: missing run": (lambda t: ["serve", str(t / "runs" / "nothing")], "no such folder"),
    "serve: nothing to serve": (lambda t: ["serve"], "nothing to serve"),
    "generate: not a run": (lambda t: ["generate", _not_a_run(t), "--input", str(t / "in.jsonl"), "--output", str(t / "o.jsonl")], "not a run folder"),
    "generate: bad sampling": (lambda t: ["generate", _not_a_run(t), "--input", "x", "--output", "y", "--top-p", "2"], "--top-p must be in (0, 1]"),
    "estimate: typo in a key": (lambda t: ["estimate", _config(t, **{"lora.rank": 8})], "lora.rank: unknown key"),
    "search: no search block": (lambda t: ["search", _config(t)], "search.params"),
    "runs: unknown runs to diff": (lambda t: ["runs", "--diff", "no-such-a", "no-such-b"], "no run named or at 'no-such-a'"),
    "runs: bad --since": (lambda t: ["runs", "--since", "last tuesday"], "is not a date"),
    "study create: missing run": (lambda t: ["study", "create", str(t / "runs" / "nothing")], "no such folder"),
    "study report: not a study": (lambda t: ["study", "report", _not_a_run(t)], "not a study folder"),
    "study invite: not a study": (lambda t: ["study", "invite", _not_a_run(t), "ann"], "not a study folder"),
    "study export: not a study": (lambda t: ["study", "export", _not_a_run(t)], "not a study folder"),
    "study judge: not a study": (lambda t: ["study", "judge", _not_a_run(t), "--base-url", "http://127.0.0.1:9/v1", "--model", "m"], "not a study folder"),
    "ui: public address without a token": (lambda t: ["ui", "--host", "0.0.0.0", "--token", ""], "without a token"),
    "demo: typo in --set": (lambda t: ["demo", "--set", "train.max_step=3"], "did you mean 'train.max_steps'"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_an_error_message_not_a_traceback(case, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TUNESMITH_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("TUNESMITH_API_KEY", raising=False)
    make_argv, expected = CASES[case]
    try:
        code = main(make_argv(tmp_path))
    except SystemExit as e:  # argparse: a flag's value refused before any verb runs
        code = e.code
    out, err = capsys.readouterr()
    assert code == 2, (case, code, out[-2000:], err[-2000:])
    assert err.startswith("error: ") or "\nerror: " in err or ": error: argument" in err, (case, err[-2000:])
    assert "Traceback" not in out + err, (case, err[-2000:])
    assert expected in err, (case, expected, err[-2000:])  # the error it is about, not an earlier one


def test_every_error_class_of_tunesmith_derives_from_the_one_base():
    import importlib
    import inspect
    import pkgutil

    import tunesmith

    found = []
    for info in pkgutil.walk_packages(tunesmith.__path__, "tunesmith."):
        if info.name.endswith("__main__"):
            continue
        module = importlib.import_module(info.name)
        for name, cls in inspect.getmembers(module, inspect.isclass):
            if cls.__module__ == info.name and issubclass(cls, Exception) and name.endswith("Error"):
                found.append(cls)
    outside = [f"{c.__module__}.{c.__name__}" for c in found if not issubclass(c, errors.TunesmithError)
               and c.__name__ not in ("APIError",)]  # the server's HTTP error becomes an OpenAI error body, never reaches the CLI
    assert len(found) > 15 and not outside, outside
