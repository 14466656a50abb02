"""Long work is visible wherever the output goes: plain lines with rate and ETA off a terminal."""

from __future__ import annotations

import io

from rich.console import Console

from tunesmith.runtime.progress import describe, hms, make_progress


def test_plain_lines_when_the_output_is_not_a_terminal():
    out = io.StringIO()
    seen = []
    progress = make_progress(Console(file=out, width=200), on_update=lambda *a: seen.append(a))
    progress.line_seconds = 0.0  # a line at every update (30 s by default)
    with progress:
        task = progress.add_task("evaluating tuned", total=4, info="")
        for i in range(4):
            progress.update(task, advance=1, info=f"loss {i}")
    lines = out.getvalue().splitlines()
    assert lines[0] == "evaluating tuned: 0/4 (0%)"
    assert lines[-1].startswith("evaluating tuned: 4/4 (100%)") and "loss 3" in lines[-1]
    assert "━" not in out.getvalue()  # no bars drawn into a log
    assert seen[0][:3] == ("evaluating tuned", 0, 4) and seen[-1][1] == 4


def test_lines_are_spaced_in_time_but_the_end_is_always_said():
    out = io.StringIO()
    with make_progress(Console(file=out, width=200), extra=None) as progress:
        task = progress.add_task("generating", total=1000)
        for _ in range(1000):
            progress.advance(task)
    lines = out.getvalue().splitlines()
    assert lines == ["generating: 0/1,000 (0%)", lines[-1]] and lines[-1].startswith("generating: 1,000/1,000 (100%)")


def test_a_terminal_gets_the_live_bar_and_no_lines():
    out = io.StringIO()
    with make_progress(Console(file=out, force_terminal=True, width=120)) as progress:
        task = progress.add_task("train", total=2, info="")
        progress.advance(task, 2)
    assert "train: " not in out.getvalue() and "train" in out.getvalue()


def test_describe_and_hms():
    assert describe("x", 120, 872, 3.2, 235, {"info": "41 tok/s"}) == "x: 120/872 (14%), 3.20/s, ETA 3m55s, 41 tok/s"
    assert hms(3725) == "1h02m05s" and hms(9) == "9s"


def test_threads_sleep_only_when_other_work_keeps_the_cpus_busy(monkeypatch):
    """Spinning OpenMP threads fight other work for the cores (benchmarks/results/threads.md): they
    sleep when the load is sustained (load average) and present (a sample now); the count stays fixed."""
    from tunesmith.runtime import threads

    def decide(load, busy, env=None):
        monkeypatch.setattr(threads, "_chosen", {})
        monkeypatch.setattr(threads, "cpus_available", lambda: 2)
        monkeypatch.setattr(threads, "load_average", lambda: load)
        monkeypatch.setattr(threads, "busy_elsewhere", lambda *a, **k: busy)
        monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
        monkeypatch.delitem(__import__("sys").modules, "torch", raising=False)  # as when tunesmith is imported first
        if env:
            monkeypatch.setenv("OMP_WAIT_POLICY", env)
        return threads.choose_wait_policy(), __import__("os").environ.get("OMP_WAIT_POLICY")

    assert decide(0.1, 0.0) == ("threads spin between operations (no other work keeps the CPUs busy)", None)
    why, policy = decide(9.7, 1.9)
    assert policy == "PASSIVE" and "other processes are using about 1.9 of the 2 CPUs (load average 9.7 over the last minute)" in why
    assert decide(1.8, 0.1)[1] is None  # the load a finished run left in the average: nobody is busy now
    assert decide(9.7, 1.9, env="ACTIVE") == ("OpenMP wait policy ACTIVE (set in the environment)", "ACTIVE")
    monkeypatch.setattr(threads, "_chosen", {})
    monkeypatch.delenv("OMP_WAIT_POLICY")
    monkeypatch.setitem(__import__("sys").modules, "torch", object())  # torch (and OpenMP) started first: say so
    assert "torch was imported before tunesmith" in threads.choose_wait_policy()


def test_busy_elsewhere_sees_another_busy_process():
    import subprocess
    import sys
    import time

    from tunesmith.runtime.threads import busy_elsewhere

    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)
        assert busy_elsewhere(0.5) > 0.6
    finally:
        hog.kill()


def test_the_thread_count_is_the_cpus_this_process_may_use():
    import torch

    from tunesmith.runtime.threads import cpus_available, use_threads

    said = []
    before = torch.get_num_threads()
    try:
        assert use_threads(None, said.append) == cpus_available() == torch.get_num_threads()
        assert use_threads(1) == 1 == torch.get_num_threads()
    finally:
        torch.set_num_threads(before)
