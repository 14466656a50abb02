"""llama.cpp as a consumer of a GGUF file, run in a child process.

llama.cpp is native code: a fault in it (an unsupported CPU path, a corrupt file) ends the whole
process with a signal, not an exception. On Intel CPUs with AMX, for one, ggml's AMX backend
segfaults in ``ggml_backend_amx_mul_mat`` on q8_0 prompts of more than one token (llama.cpp issue
20824). So ``run_llama_cpp`` starts ``python -m tunesmith.deploy.llama_consumer`` for the work and
reads its results from a file: whatever llama.cpp does, the exporter (and a test run) lives on and
gets a ``ConsumerFailed`` that says how the child ended.

The child loads the file with ``llama_cpp.Llama`` and, for each prompt text, tokenizes it as
llama.cpp does (special tokens parsed, no BOS added), evaluates it, and decodes greedily (the
argmax, as llama.cpp's top-k 1 sampler picks) until llama.cpp's own end-of-generation test says
stop or ``max_new_tokens`` are made; it keeps the logits after the prompt, and every position's
with ``all_logits``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunesmith.errors import TunesmithError

import numpy as np

TIMEOUT_S = 600.0  # a tiny model answers in seconds; a 135M one in well under a minute


class ConsumerFailed(TunesmithError, RuntimeError):
    """llama.cpp could not be run on the file: the child process crashed (a signal), exited with an
    error, or ran past its time. The message says which, with the end of its error output."""


@dataclass
class ConsumerAnswer:
    """What llama.cpp made of one prompt text: its prompt ids, the greedy new ids (the last one
    an end-of-generation token when it stopped on one), the (V,) logits after the prompt, and
    with ``all_logits`` the (T, V) logits of every prompt position."""

    prompt_ids: list[int]
    new_ids: list[int]
    first_logits: np.ndarray
    all_logits: np.ndarray | None = None


@dataclass
class ConsumerRun:
    """llama.cpp's answers to every prompt, its name and version, and facts about the vocabulary:
    ``token_eos`` and, for each id asked about in ``eog_ids``, whether llama.cpp ends generation on it."""

    name: str
    answers: list[ConsumerAnswer]
    token_eos: int
    is_eog: dict[int, bool]


def available() -> bool:
    """Whether llama.cpp's Python binding (``llama_cpp``) is installed, without importing it here."""
    import importlib.util

    try:
        return importlib.util.find_spec("llama_cpp") is not None
    except (ImportError, ValueError):  # a stub in sys.modules (tests) or a broken install
        return False


def run_llama_cpp(path: str | Path, texts: list[str], max_new_tokens: int = 8, n_ctx: int = 512,
                  all_logits: bool = False, eog_ids: list[int] | None = None, n_threads: int | None = None,
                  timeout_s: float = TIMEOUT_S) -> ConsumerRun:
    """Run llama.cpp on the GGUF at ``path`` in a child process (see the module docstring).

    ``n_ctx``: llama.cpp's context (tokens; at least the longest prompt plus ``max_new_tokens``).
    Raises ConsumerFailed when the child crashes (the signal is named: SIGSEGV, SIGABRT...), exits
    non-zero (e.g. llama.cpp cannot load the file) or takes longer than ``timeout_s`` seconds.
    """
    request = {"path": str(path), "texts": list(texts), "max_new_tokens": int(max_new_tokens), "n_ctx": int(n_ctx),
               "all_logits": bool(all_logits), "eog_ids": [int(i) for i in eog_ids or []],
               "n_threads": int(n_threads or os.cpu_count() or 1)}
    with tempfile.TemporaryDirectory(prefix="tunesmith-llama-") as tmp:
        (Path(tmp) / "request.json").write_text(json.dumps(request), encoding="utf-8")
        try:
            done = subprocess.run([sys.executable, "-m", "tunesmith.deploy.llama_consumer", tmp], capture_output=True,
                                  text=True, timeout=timeout_s, env=os.environ | {"PYTHONFAULTHANDLER": "1"})
        except subprocess.TimeoutExpired:
            raise ConsumerFailed(f"llama.cpp took longer than {timeout_s:.0f} s on {path}; stopped") from None
        if done.returncode != 0:
            raise ConsumerFailed(f"llama.cpp {_how_it_ended(done.returncode)} while running {path}"
                                 + _tail(done.stderr))
        return _read_results(Path(tmp))


def _how_it_ended(returncode: int) -> str:
    """'crashed (SIGSEGV, signal 11)' for a signal, 'exited with code N' otherwise."""
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = "an unknown signal"
        return f"crashed ({name}, signal {-returncode})"
    return f"exited with code {returncode}"


def _tail(stderr: str, lines: int = 6) -> str:
    kept = [line for line in (stderr or "").strip().splitlines() if line.strip()][-lines:]
    return (": " + " | ".join(kept)) if kept else ""


def _read_results(folder: Path) -> ConsumerRun:
    meta = json.loads((folder / "result.json").read_text(encoding="utf-8"))
    arrays = np.load(folder / "logits.npz")
    answers = [ConsumerAnswer(a["prompt_ids"], a["new_ids"], arrays[f"first_{i}"],
                              arrays[f"all_{i}"] if f"all_{i}" in arrays else None)
               for i, a in enumerate(meta["answers"])]
    return ConsumerRun(meta["name"], answers, meta["token_eos"], {int(k): v for k, v in meta["is_eog"].items()})


# ------------------------------------------------------------------------------ the child process


def _child(folder: Path) -> None:
    """Answer ``folder/request.json``; write ``result.json`` and ``logits.npz`` beside it."""
    import llama_cpp

    req = json.loads((folder / "request.json").read_text(encoding="utf-8"))
    llm = llama_cpp.Llama(model_path=req["path"], n_ctx=req["n_ctx"], n_threads=req["n_threads"],
                          logits_all=req["all_logits"], verbose=False)
    vocab = llm._model.vocab
    answers: list[dict[str, Any]] = []
    arrays: dict[str, np.ndarray] = {}
    try:
        for i, text in enumerate(req["texts"]):
            ids = llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
            llm.reset()
            llm.eval(ids)
            if req["all_logits"]:
                arrays[f"all_{i}"] = np.array(llm.scores[: len(ids)], dtype=np.float32)  # (T, V)
            first = logits = _last_logits(llm)
            out: list[int] = []
            while True:
                out.append(int(logits.argmax()))
                if llama_cpp.llama_vocab_is_eog(vocab, out[-1]) or len(out) >= req["max_new_tokens"]:
                    break  # llama.cpp's own end-of-generation test: what stops llama-cli, llama-server, Ollama
                llm.eval(out[-1:])
                logits = _last_logits(llm)
            arrays[f"first_{i}"] = first
            answers.append({"prompt_ids": list(ids), "new_ids": out})
        meta = {"name": f"llama.cpp (llama-cpp-python {llama_cpp.__version__})", "answers": answers,
                "token_eos": int(llm.token_eos()),
                "is_eog": {str(t): bool(llama_cpp.llama_vocab_is_eog(vocab, t)) for t in req["eog_ids"]}}
    finally:
        llm.close()
    np.savez(folder / "logits.npz", **arrays)
    (folder / "result.json").write_text(json.dumps(meta), encoding="utf-8")


def _last_logits(llm: Any) -> np.ndarray:
    import llama_cpp

    row = llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1)
    return np.ctypeslib.as_array(row, shape=(llm.n_vocab(),)).astype(np.float32, copy=True)  # (V,)


if __name__ == "__main__":
    _child(Path(sys.argv[1]))
