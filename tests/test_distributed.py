"""Two CPU processes (torchrun, gloo; DDP and FSDP2) train as one process does on the same global steps."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from test_cli import write_config
from tunesmith.cli import EXIT_RESUMABLE, main

pytestmark = pytest.mark.slow

TOL = {"rtol": 1e-5, "atol": 1e-6}  # reached on this machine: max abs diff 1.3e-7 (LoRA), 1.1e-7 (full), 4 AdamW steps


def _config(tmp_path: Path, tiny_model_dir: Path, sst_files, method: str) -> Path:
    path = write_config(tmp_path, tiny_model_dir, sst_files)
    cfg = yaml.safe_load(path.read_text())
    cfg["method"] = method
    cfg["lora"] = {"r": 4, "alpha": 8, "dropout": 0.0}  # no dropout: the processes' random streams differ
    cfg["train"] |= {"max_steps": 4, "batch_size": 2, "grad_accum": 3, "eval_every": 2, "lr": 1e-3}  # 3 micro-batches: 2 + 1
    cfg["eval"] = {"compare_with_base": False, "latency_examples": 0, "max_new_tokens": 2, "general": "none"}
    path.write_text(yaml.safe_dump(cfg))
    return path


def _weights(run: Path, method: str) -> dict[str, torch.Tensor]:
    if method == "lora":
        return load_file(str(run / "adapter" / "adapter_model.safetensors"))
    return load_file(str(next((run / "model").glob("*.safetensors"))))


def _losses(run: Path) -> list[float]:
    return [json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines() if '"train"' in x]


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
@pytest.mark.parametrize("method", ["lora", "full"])
def test_two_processes_reproduce_one(tmp_path, tiny_model_dir, sst_files, method, strategy):
    path = _config(tmp_path, tiny_model_dir, sst_files, method)
    assert main(["train", str(path), "--set", "name=one"]) == 0
    assert main(["train", str(path), "--set", "name=two", "--nproc", "2", "--set", f"train.strategy={strategy}"]) == 0
    one, two = tmp_path / "runs" / "one", tmp_path / "runs" / "two"
    a, b = _weights(one, method), _weights(two, method)
    assert a.keys() == b.keys()
    for n in a:
        torch.testing.assert_close(b[n], a[n], **TOL)
    assert _losses(two) == pytest.approx(_losses(one), rel=1e-5)
    assert len(_losses(two)) == 4  # process 0 alone logs
    assert json.loads((two / "eval.json").read_text())["test_examples"] == 6  # and evaluates
    assert (two / "checkpoints" / "step-4" / "manifest.json").is_file()
    rng = torch.load(two / "checkpoints" / "step-4" / "rng.pt", weights_only=False)
    assert len(rng) == 2  # every process's random state
    shards = sorted(p.name for p in (two / "checkpoints" / "step-4" / "dcp").glob("*")) if strategy == "fsdp" else []
    assert shards == ([".metadata", "__0_0.distcp", "__1_0.distcp"] if strategy == "fsdp" else [])  # a file per process
    manifest = json.loads((two / "checkpoints" / "step-4" / "manifest.json").read_text())["files"]
    assert all(f"dcp/{name}" in manifest for name in shards)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_resume_at_another_world_size(tmp_path, tiny_model_dir, sst_files, strategy):
    path = _config(tmp_path, tiny_model_dir, sst_files, "lora")
    assert main(["train", str(path), "--set", "name=one"]) == 0
    cfg = yaml.safe_load(path.read_text())
    cfg["train"]["strategy"] = strategy  # fsdp: sharded checkpoints (Distributed Checkpoint), even on one process
    path.write_text(yaml.safe_dump(cfg))
    # 2 processes, stopped after step 2, resumed on 1; and the reverse
    assert main(["train", str(path), "--set", "name=two-one", "--nproc", "2", "--until-step", "2"]) == EXIT_RESUMABLE
    assert main(["train", str(path), "--set", "name=two-one", "--resume"]) == 0
    assert main(["train", str(path), "--set", "name=one-two", "--until-step", "2"]) == EXIT_RESUMABLE
    assert main(["train", str(path), "--set", "name=one-two", "--resume", "--nproc", "2"]) == 0
    want = _weights(tmp_path / "runs" / "one", "lora")
    for name in ("two-one", "one-two"):
        got = _weights(tmp_path / "runs" / name, "lora")
        for n in want:
            torch.testing.assert_close(got[n], want[n], **TOL)
        assert _losses(tmp_path / "runs" / name) == pytest.approx(_losses(tmp_path / "runs" / "one"), rel=1e-5)


def test_sigterm_to_the_launcher_stops_every_process_resumably(tmp_path, tiny_model_dir, sst_files):
    import os
    import signal
    import subprocess
    import sys
    import time

    path = _config(tmp_path, tiny_model_dir, sst_files, "lora")
    cfg = yaml.safe_load(path.read_text())
    cfg["train"] |= {"max_steps": 400, "eval_every": 1000}
    path.write_text(yaml.safe_dump(cfg))
    proc = subprocess.Popen([sys.executable, "-m", "tunesmith", "train", str(path), "--nproc", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = tmp_path / "runs" / "tiny" / "metrics.jsonl"
    deadline = time.time() + 240
    while not (metrics.is_file() and metrics.read_text().count("\n") >= 2) and time.time() < deadline:
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)  # to the launcher only, as a scheduler would
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode == EXIT_RESUMABLE, out[-3000:]
    assert "stopped after step" in out and out.count("stopped after step") == 1  # process 0 alone says it
    result = json.loads((tmp_path / "runs" / "tiny" / "train_result.json").read_text())
    assert result["interrupted"] and result["steps"] < 400
    assert not os.path.exists(tmp_path / "runs" / "tiny" / "adapter")  # stopped, not finished


def test_planned_stops_and_refusals_under_the_launcher_are_not_crashes(tmp_path, tiny_model_dir, sst_files):
    """`--nproc`: a resumable stop exits 75 and a refused resume 2, without torchrun's failure
    traceback; process 0 alone prints the error; the continue hint keeps --nproc."""
    import subprocess
    import sys

    path = _config(tmp_path, tiny_model_dir, sst_files, "lora")
    cmd = [sys.executable, "-m", "tunesmith", "train", str(path), "--nproc", "2"]
    out = subprocess.run(cmd + ["--until-step", "2"], capture_output=True, text=True, timeout=300)
    said = " ".join((out.stdout + out.stderr).split())
    assert out.returncode == EXIT_RESUMABLE, said[-2000:]
    assert "ChildFailedError" not in said and "FAILED" not in said
    assert "--resume --nproc 2" in said
    result = json.loads((tmp_path / "runs" / "tiny" / "train_result.json").read_text())
    assert result["processes"] == 2 and result["strategy"] == "ddp"
    out = subprocess.run(cmd + ["--resume", "--set", "lora.r=8"], capture_output=True, text=True, timeout=300)
    said = " ".join((out.stdout + out.stderr).split())
    assert out.returncode == 2 and said.count("cannot resume") == 1 and "ChildFailedError" not in said, said[-2000:]


@pytest.mark.parametrize("who", [0, 1])
def test_a_failure_inside_main_first_stops_every_process(tmp_path, who):
    """Whichever process fails in a main-first section (process 0 preparing data, or a follower
    reading it), all stop promptly; process 0 names the failure; nobody waits for a collective."""
    import subprocess
    import sys

    script = tmp_path / "mf.py"
    script.write_text(
        "import sys\n"
        "from tunesmith.training import distributed\n"
        "w = distributed.init()\n"
        "try:\n"
        "    with distributed.main_first():\n"
        f"        if w.rank == {who}:\n"
        "            raise ValueError('bad rows in data.jsonl')\n"
        "except distributed.MainFailed as e:\n"
        "    print(f'rank {w.rank}: MainFailed: {e}', flush=True)\n"
        "except ValueError as e:\n"
        "    print(f'rank {w.rank}: own error: {e}', flush=True)\n"
        "distributed.shutdown()\n")
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(script)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    other = 1 - who
    assert f"rank {who}: own error: bad rows in data.jsonl" in out.stdout
    assert f"rank {other}: MainFailed: process {who}" in out.stdout and "bad rows in data.jsonl" in out.stdout
