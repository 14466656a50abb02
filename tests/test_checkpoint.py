"""Checkpoints that survive a kill, a full disk and damage on disk; SIGTERM stops cleanly; resume is exact."""

from __future__ import annotations

import errno
import json
import os
import signal
from pathlib import Path

import pytest
import torch

from conftest import examples, make_model
from tunesmith.training import checkpoint as ckpt_mod
from tunesmith.training import losses as losses_mod
from tunesmith.config import Config, TrainConfig
from tunesmith.data import encode_all
from tunesmith.io import atomic_dir, recover_dir
from tunesmith.methods import lora
from tunesmith.training.loop import train

LABELS = {"0": "negative", "1": "positive"}


@pytest.fixture
def data(tokenizer, sst_files):
    exs = examples(sst_files["train"], "classification", labels=LABELS, system_prompt="Classify the sentiment.")
    return (encode_all(tokenizer, exs, 128)[0] * 2)[:40]  # batch 4: an epoch is exactly 10 steps


def cfg(**kw) -> TrainConfig:
    return TrainConfig(**({"max_steps": 10, "batch_size": 4, "lr": 5e-3, "warmup_steps": 2, "eval_every": 100,
                           "save_every": 2, "keep_checkpoints": 3, "precision": "fp32", "seed": 0} | kw))


def fresh(tokenizer):
    torch.manual_seed(0)  # the adapters' random init: the same whatever ran before in this process
    c = Config(method="lora")
    c.lora.r, c.lora.alpha, c.lora.dropout = 4, 8, 0.1  # dropout on: the RNG must be restored too
    c.train.precision = "fp32"
    return lora.prepare(make_model(len(tokenizer)), c)


def weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def squash(text: str) -> str:
    return "".join(text.split())


def losses(result):
    return [r["loss"] for r in result.history if r["type"] == "train"]


@pytest.fixture
def straight(tokenizer, data, tmp_path):
    model = fresh(tokenizer)
    result = train(model, data, data[:4], cfg(), tmp_path / "straight", tokenizer.pad_token_id, show_progress=False)
    return weights(model), losses(result)


def assert_same(model, result, straight):
    want, want_losses = straight
    got = weights(model)
    assert all(torch.equal(got[n], want[n]) for n in want)  # bit-identical
    assert losses(result) == want_losses and result.steps == 10


def test_checkpoints_carry_a_manifest_that_finds_damage(tokenizer, data, tmp_path):
    train(fresh(tokenizer), data, data[:4], cfg(max_steps=2), tmp_path, tokenizer.pad_token_id, show_progress=False)
    folder = tmp_path / "checkpoints" / "step-2"
    manifest = json.loads((folder / "manifest.json").read_text())
    assert set(manifest["files"]) == {"trainable.safetensors", "optimizer.pt", "scheduler.pt", "rng.pt", "state.json"}
    assert ckpt_mod.verify(folder) is None
    raw = bytearray((folder / "optimizer.pt").read_bytes())
    raw[len(raw) // 2] ^= 0x01  # one flipped bit
    (folder / "optimizer.pt").write_bytes(bytes(raw))
    assert "optimizer.pt does not match its SHA-256" in ckpt_mod.verify(folder)
    (folder / "trainable.safetensors").write_bytes((folder / "trainable.safetensors").read_bytes()[:100])
    (folder / "scheduler.pt").unlink()
    assert ckpt_mod.verify(folder).split("; ") == [  # every damaged file, in the manifest's order
        "optimizer.pt does not match its SHA-256 in the manifest (altered on disk)", "scheduler.pt is missing",
        f"trainable.safetensors has 100 bytes, the manifest says {manifest['files']['trainable.safetensors']['bytes']:,} (truncated?)"]


@pytest.mark.parametrize("damage", ["truncate", "flip", "unreadable manifest"])
def test_a_damaged_checkpoint_is_skipped_for_the_previous_one(tokenizer, data, tmp_path, straight, damage, capsys):
    run = tmp_path / "run"
    first = train(fresh(tokenizer), data, data[:4], cfg(), run, tokenizer.pad_token_id, until_step=6, show_progress=False)
    assert first.interrupted
    newest = run / "checkpoints" / "step-6"
    target = newest / "trainable.safetensors"
    if damage == "truncate":
        target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
    elif damage == "flip":
        raw = bytearray(target.read_bytes())
        raw[-10] ^= 0xFF
        target.write_bytes(bytes(raw))
    else:
        (newest / "manifest.json").write_text("{not json")
    model = fresh(tokenizer)
    result = train(model, data, data[:4], cfg(), run, tokenizer.pad_token_id, resume=True, show_progress=True)
    said = squash(capsys.readouterr().out)  # the console wraps long lines
    assert squash(f"checkpoint {newest} is damaged") in said and squash("resuming from the one before it, step-4") in said
    assert_same(model, result, straight)  # redone from step 4: the same run


def test_no_usable_checkpoint_is_a_clear_error(tokenizer, data, tmp_path):
    train(fresh(tokenizer), data, data[:4], cfg(), tmp_path, tokenizer.pad_token_id, until_step=2, show_progress=False)
    (tmp_path / "checkpoints" / "step-2" / "rng.pt").write_bytes(b"")
    with pytest.raises(ckpt_mod.CheckpointError, match="no usable checkpoint: step-2: rng.pt has 0 bytes"):
        train(fresh(tokenizer), data, data[:4], cfg(), tmp_path, tokenizer.pad_token_id, resume=True, show_progress=False)


def test_a_full_disk_keeps_the_previous_checkpoint_and_the_run_resumable(tokenizer, data, tmp_path, straight,
                                                                        monkeypatch, capsys):
    real = ckpt_mod.save_file
    calls = {"n": 0}

    def disk_full(tensors, path, *a, **k):
        calls["n"] += 1
        if calls["n"] >= 3:  # step-2 and step-4 are written; from step-6 on the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(tensors, path, *a, **k)

    monkeypatch.setattr(ckpt_mod, "save_file", disk_full)
    run = tmp_path / "run"
    result = train(fresh(tokenizer), data, data[:4], cfg(), run, tokenizer.pad_token_id, until_step=8, show_progress=True)
    said = squash(capsys.readouterr().out)
    assert squash("checkpoint step-6 could not be written (No space left on device); the previous one, step-4, is intact") in said
    assert result.interrupted and result.steps == 8
    folders = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert folders == ["step-2", "step-4"]  # nothing half-written, nothing older pruned
    assert ckpt_mod.verify(run / "checkpoints" / "step-4") is None
    monkeypatch.setattr(ckpt_mod, "save_file", real)  # space again: resume from step 4
    model = fresh(tokenizer)
    assert_same(model, train(model, data, data[:4], cfg(), run, tokenizer.pad_token_id, resume=True, show_progress=False),
                straight)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_checkpoints_after_the_step_and_resume_is_exact(tokenizer, data, tmp_path, straight, monkeypatch, sig):
    real = losses_mod.target_loss_sum
    calls = {"n": 0}

    def signalled(*a, **k):
        calls["n"] += 1
        if calls["n"] == 5:  # during step 5's forward pass
            os.kill(os.getpid(), sig)
        return real(*a, **k)

    monkeypatch.setattr(losses_mod, "target_loss_sum", signalled)
    run = tmp_path / "run"
    result = train(fresh(tokenizer), data, data[:4], cfg(save_every=0), run, tokenizer.pad_token_id, show_progress=False)
    assert result.interrupted and result.steps == 5  # the step in flight finished, then it stopped
    assert ckpt_mod.verify(run / "checkpoints" / "step-5") is None
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # handlers restored
    monkeypatch.setattr(losses_mod, "target_loss_sum", real)
    model = fresh(tokenizer)
    assert_same(model, train(model, data, data[:4], cfg(save_every=0), run, tokenizer.pad_token_id, resume=True,
                             show_progress=False), straight)


def test_a_replacement_killed_between_its_renames_is_recovered(tmp_path):
    target = tmp_path / "best"
    atomic_dir(target, lambda d: (d / "x").write_text("first"))
    os.replace(target, tmp_path / ".best.old")  # as if killed after the first rename of a replacement
    recover_dir(target)
    assert (target / "x").read_text() == "first"

    def fails(d: Path) -> None:
        (d / "x").write_text("half")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError):
        atomic_dir(target, fails)
    assert (target / "x").read_text() == "first" and sorted(p.name for p in tmp_path.iterdir()) == ["best"]


def test_the_cli_exit_code_says_interrupted_and_resumable(tmp_path, tiny_model_dir, sst_files, monkeypatch):
    from test_cli import write_config
    from tunesmith.cli import EXIT_RESUMABLE, main

    real = losses_mod.target_loss_sum
    calls = {"n": 0}

    def signalled(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*a, **k)

    monkeypatch.setattr(losses_mod, "target_loss_sum", signalled)
    path = write_config(tmp_path, tiny_model_dir, sst_files)
    assert main(["train", str(path)]) == EXIT_RESUMABLE == 75
    monkeypatch.setattr(losses_mod, "target_loss_sum", real)
    assert main(["train", str(path), "--resume"]) == 0


def test_files_and_folders_written_atomically_get_the_usual_modes(tmp_path):
    from tunesmith.io import atomic_write_text

    old = os.umask(0o022)
    try:
        import importlib

        import tunesmith.io as io_mod

        importlib.reload(io_mod)  # the umask is read at import
        io_mod.atomic_write_text(tmp_path / "a.json", "{}")
        io_mod.atomic_dir(tmp_path / "d", lambda d: (d / "x").write_text("1"))
        assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o644  # not mkstemp's 0600
        assert (tmp_path / "d").stat().st_mode & 0o777 == 0o755  # not mkdtemp's 0700
    finally:
        os.umask(old)
        importlib.reload(io_mod)
    assert atomic_write_text  # the public name used elsewhere


def test_fsdp_checkpoints_use_distributed_checkpoint_and_resume_exactly(tokenizer, data, tmp_path, straight, capsys):
    """train.strategy: fsdp writes weights and optimizer state with Distributed Checkpoint (dcp/, in
    the manifest), which loads at any number of processes: here one. A flipped byte in a shard is found."""
    run = tmp_path / "run"
    first = train(fresh(tokenizer), data, data[:4], cfg(strategy="fsdp"), run, tokenizer.pad_token_id, until_step=6,
                  show_progress=False)
    assert first.interrupted
    newest = run / "checkpoints" / "step-6"
    files = json.loads((newest / "manifest.json").read_text())["files"]
    assert {"dcp/.metadata", "dcp/__0_0.distcp", "scheduler.pt", "rng.pt", "state.json"} <= set(files)
    assert "trainable.safetensors" not in files and "optimizer.pt" not in files
    shard = newest / "dcp" / "__0_0.distcp"
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    shard.write_bytes(bytes(raw))
    model = fresh(tokenizer)
    result = train(model, data, data[:4], cfg(strategy="fsdp"), run, tokenizer.pad_token_id, resume=True)
    said = squash(capsys.readouterr().out)
    assert squash("dcp/__0_0.distcp does not match its SHA-256") in said and squash("the one before it, step-4") in said
    assert_same(model, result, straight)  # the same run as the plain one, bit for bit
    assert not list((run / "checkpoints").glob(".*"))  # no staging folder left behind


def test_a_sharded_run_refuses_whole_weight_checkpoints_clearly(tokenizer, data, tmp_path):
    train(fresh(tokenizer), data, data[:4], cfg(), tmp_path, tokenizer.pad_token_id, until_step=2, show_progress=False)
    model = fresh(tokenizer)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW(params.values())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    with pytest.raises(ckpt_mod.CheckpointError, match="train.strategy: ddp.*--set train.strategy=ddp"):
        ckpt_mod.load_checkpoint(tmp_path, params, opt, sched, model=model, sharded=True)


def test_verify_hashes_an_untouched_checkpoint_once_per_process(tmp_path, monkeypatch):
    folder = tmp_path / "step-1"
    folder.mkdir()
    (folder / "state.json").write_text('{"step": 1}')
    (folder / "w.bin").write_bytes(b"x" * 1000)
    ckpt_mod.write_manifest(folder, {"step": 1})
    for p in folder.iterdir():
        os.utime(p, ns=(10**18, 10**18))  # written long ago (a fresh file is hashed every time, as git does)
    assert ckpt_mod.verify(folder) is None
    monkeypatch.setattr(ckpt_mod, "_sha256", lambda path: pytest.fail("hashed twice"))
    assert ckpt_mod.verify(folder) is None  # the resume's second look is free
    (folder / "w.bin").write_bytes(b"y" * 999)  # changed: looked at again
    monkeypatch.undo()
    assert "w.bin has 999 bytes" in ckpt_mod.verify(folder)
