"""Long work is visible wherever the output goes: plain lines with rate and ETA off a terminal."""

from __future__ import annotations

import io

from rich.console import Console

from tunesmith.progress import describe, hms, make_progress


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


def test_threads_follow_the_cpus_other_work_leaves_free():
    """Under load, threads that share a core make every step wait (benchmarks/results/threads.md)."""
    import subprocess
    import sys

    from tunesmith import runtime

    assert runtime.choose_threads(busy=0.1, cpus=2)[0] == 2
    assert runtime.choose_threads(busy=1.9, cpus=2) == (1, runtime.choose_threads(busy=1.9, cpus=2)[1])
    assert "other work keeps 1.9 busy" in runtime.choose_threads(busy=1.9, cpus=2)[1]
    assert runtime.choose_threads(busy=9.0, cpus=2)[0] == 1 and runtime.choose_threads(busy=2.6, cpus=8)[0] == 5
    assert runtime.choose_threads(3, cpus=2, busy=5.0) == (3, "train.num_threads: 3")  # the setting wins
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        import time

        time.sleep(0.5)
        assert runtime.busy_elsewhere(0.5) > 0.6  # one busy process is seen
    finally:
        hog.kill()
