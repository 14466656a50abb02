"""Every file and folder tunesmith writes gets the mode a plain ``open()``/``mkdir`` would give under
the user's umask (0644/0755 under 022, 0600/0700 under 077), so a serving user other than the
trainer can read an export. safetensors >= 0.8 writes 0600 whatever the umask (safetensors
issue 782), ``mkstemp``/``mkdtemp`` too; sqlite writes 0644.

Each umask runs in a fresh process (tunesmith reads the umask once, at import): train a tiny LoRA
run (checkpoints, adapter, evaluation, run index), export it (adapter f32 and f16, merged hf,
GGUF), answer a prompt file, make a rating study; then every path under the folder is checked.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

SCRIPT = r"""
import os, sys
os.umask(int(sys.argv[1], 8))
from pathlib import Path
from tunesmith import finetune, load_config
from tunesmith.deploy.export import export
from tunesmith.deploy.generate import generate_file
from tunesmith.generation.engine import SamplingParams
from tunesmith.studies import create_study

root = Path(sys.argv[2])
run = finetune(load_config(root / "run.yaml"))
for fmt, dtype in [("adapter", "f32"), ("adapter", "f16"), ("hf", "f32"), ("gguf", "f32")]:
    export(run.dir, fmt, dtype)
generate_file(run.dir, root / "prompts.jsonl", root / "out" / "answers.jsonl", SamplingParams(max_tokens=3))
create_study([run.dir], root / "studies" / "s", base=True, examples=2)
"""


def _modes(root: Path) -> dict[str, int]:
    """Every path under ``root`` (``root`` excluded) -> its permission bits."""
    out = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(folder) / name
            out[str(path.relative_to(root))] = stat.S_IMODE(path.lstat().st_mode)
    return out


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_every_file_written_has_the_mode_open_would_give(umask, tmp_path, tiny_model_dir):
    work = tmp_path / "work"
    work.mkdir()
    rows = [{"instruction": f"Say hello {i}", "input": "", "output": f"hello {i} !"} for i in range(16)]
    (work / "inst.json").write_text(json.dumps(rows))
    (work / "prompts.jsonl").write_text("".join(json.dumps({"prompt": f"Say hello {i}"}) + "\n" for i in range(2)))
    cfg = {"name": "modes", "model": str(tiny_model_dir), "task": "instruction", "method": "lora",
           "output_dir": str(work / "runs"),
           "data": {"train": str(work / "inst.json"), "validation_size": 3, "prepare": {"test_size": 3}},
           "lora": {"r": 4, "alpha": 8},
           "train": {"max_steps": 2, "batch_size": 4, "lr": 1e-2, "precision": "fp32", "eval_every": 1, "save_every": 1},
           "eval": {"max_new_tokens": 3, "latency_examples": 0}}
    (work / "run.yaml").write_text(yaml.safe_dump(cfg))
    inputs = set(_modes(work))
    env = {**os.environ, "TUNESMITH_INDEX": str(work / "index" / "runs.sqlite"), "TUNESMITH_HOME": str(work / "home"),
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1] / "src"), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", SCRIPT, oct(umask), str(work)], env=env, capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    written = {p: m for p, m in _modes(work).items() if p not in inputs}
    want_file, want_dir = 0o666 & ~umask, 0o777 & ~umask
    wrong = {p: oct(m) for p, m in written.items()
             if m != (want_dir if (work / p).is_dir() else want_file)}
    assert not wrong, f"not {oct(want_file)}/{oct(want_dir)}: {wrong}"
    for expected in ["runs/modes/adapter/adapter_model.safetensors", "runs/modes/checkpoints/best/trainable.safetensors",
                     "runs/modes/export/adapter-f16/adapter_model.safetensors", "runs/modes/export/hf-f32/model.safetensors",
                     "runs/modes/export/gguf-f32/modes.f32.gguf", "runs/modes/eval.json", "out/answers.jsonl",
                     "studies/s/ratings.sqlite", "index/runs.sqlite"]:
        assert expected in written, sorted(written)
    assert any(p.startswith("runs/modes/checkpoints/step-") for p in written)


def test_default_modes_fixes_a_tree_and_leaves_links(tmp_path):
    from tunesmith.io import default_modes

    umask = os.umask(0)
    os.umask(umask)
    (tmp_path / "d").mkdir()
    os.chmod(tmp_path / "d", 0o700)  # as mkdtemp makes it
    (tmp_path / "d" / "w.safetensors").write_bytes(b"x")
    os.chmod(tmp_path / "d" / "w.safetensors", 0o600)  # as safetensors leaves it
    outside = tmp_path / "outside"
    outside.write_text("not ours")
    os.chmod(outside, 0o640)
    (tmp_path / "d" / "link").symlink_to(outside)
    default_modes(tmp_path / "d")
    assert stat.S_IMODE((tmp_path / "d" / "w.safetensors").stat().st_mode) == 0o666 & ~umask
    assert stat.S_IMODE((tmp_path / "d").stat().st_mode) == 0o777 & ~umask
    assert stat.S_IMODE(outside.stat().st_mode) == 0o640  # a link is not followed
