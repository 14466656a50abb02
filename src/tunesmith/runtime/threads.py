"""How many CPU threads torch uses, and how they wait: chosen so that other work on the machine
slows a run down gracefully, without making its numbers depend on the machine's load.

Threads: one per CPU this process may run on (its affinity: a container's or taskset's share),
``train.num_threads`` when set. The count is fixed for a machine, so results are the same run
after run (the thread count changes the last bits of a reduction, and with them, e.g., which
trials a search prunes).

Waiting: between parallel operations OpenMP threads spin (fast when each has its core) or sleep
(``OMP_WAIT_POLICY=PASSIVE``). When other work keeps the CPUs busy, spinning threads fight it for
the cores and every operation waits for the slowest: measured on 2 cores
(benchmarks/results/threads.md), a LoRA step of SmolLM2-135M took about 2-2.7 s quiet, but with
two busy processes 10.2 s spinning against 3.7 s sleeping (8.0 s with one thread), and with six
37 s against 10.3 s (15.8 s with one thread); sleeping cost 12-20% on a quiet machine in pairs
measured back to back. So
``choose_wait_policy``, run when tunesmith is imported (before torch starts OpenMP), makes the
threads sleep when other work keeps at least half the CPUs busy, and leaves them spinning
otherwise. ``OMP_WAIT_POLICY`` set by the user is kept. The policy holds
for the whole process: load that starts later is met by spinning threads.
"""

from __future__ import annotations

import os
import sys
import time

WAIT_POLICY = "OMP_WAIT_POLICY"
_chosen: dict[str, str] = {}


def cpus_available() -> int:
    """CPUs this process may run on (its affinity), else the machine's count."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def load_average() -> float | None:
    """The 1-minute load average (processes running or waiting for a CPU), None where unknown."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def busy_elsewhere(seconds: float = 0.5, windows: int = 5) -> float | None:
    """How many CPUs other processes keep busy now, in CPUs: the machine's busy time (``/proc/stat``)
    less this process's own (``/proc/self/stat``), in each of ``windows`` slices of ``seconds``,
    the busiest slice. Other work comes in bursts (a training step, then its data loading), so one
    short sample can catch a lull: a newcomer saw load average 2.7 on 2 CPUs, one 0.2 s sample
    said "not busy", and spinning threads made no progress for 35 s. None off Linux."""
    def sample() -> tuple[float, float, float]:
        with open("/proc/stat", encoding="ascii") as f:
            fields = [float(x) for x in f.readline().split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)  # idle + iowait
        with open("/proc/self/stat", encoding="ascii") as f:
            mine = f.read().rsplit(")", 1)[1].split()
        return sum(fields) - idle, sum(fields), float(mine[11]) + float(mine[12])  # utime + stime, in ticks

    busiest = None
    try:
        before = sample()
        for _ in range(max(1, windows)):
            time.sleep(seconds / max(1, windows))
            after = sample()
            per_cpu = (after[1] - before[1]) / (os.cpu_count() or 1)  # ticks one CPU had in the slice
            if per_cpu > 0:
                busy = max(0.0, (after[0] - before[0] - (after[2] - before[2])) / per_cpu)
                busiest = busy if busiest is None else max(busiest, busy)
            before = after
    except (OSError, ValueError, IndexError):
        return None
    return busiest


def choose_wait_policy() -> str:
    """Set ``OMP_WAIT_POLICY`` for this process (before torch is imported) and say why, once.

    Sleep when other work keeps at least half the CPUs busy both over the last minute (the load
    average: sustained, not a burst) and now (the busiest of five 0.1 s samples of the machine's CPU
    time, taken only when the load average is high, so a run started right after another is not
    misled by the load the first one left in the average). Sleeping threads cost 12-20% on a quiet
    machine and spinning ones 3-4x on a busy one, so a doubtful sample counts as busy."""
    if "why" in _chosen:
        return _chosen["why"]
    if "torch" in sys.modules and not os.environ.get(WAIT_POLICY):  # OpenMP already read its settings
        _chosen["why"] = ("threads spin between operations (torch was imported before tunesmith, so the wait policy "
                          "could not be chosen; set OMP_WAIT_POLICY=PASSIVE before starting Python on a busy machine)")
        return _chosen["why"]
    cpus, load = cpus_available(), load_average()
    busy = busy_elsewhere() if load is not None and load >= cpus / 2 and not os.environ.get(WAIT_POLICY) else None
    if os.environ.get(WAIT_POLICY):
        why = f"OpenMP wait policy {os.environ[WAIT_POLICY]} (set in the environment)"
    elif busy is not None and busy >= cpus / 2:
        os.environ[WAIT_POLICY] = "PASSIVE"
        why = (f"threads sleep between operations: other processes are using about {busy:.1f} of the {cpus} CPUs "
               f"(load average {load:.1f} over the last minute); set OMP_WAIT_POLICY=ACTIVE to make them spin")
    else:
        why = "threads spin between operations (no other work keeps the CPUs busy)"
    _chosen["why"] = why
    return why


def use_threads(setting: int | None = None, say: object = None) -> int:
    """Apply the thread count (``setting``, else ``cpus_available()``) to torch; ``say`` (a print
    function) is told once per process what was chosen and why."""
    import torch

    n = setting or cpus_available()
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    if callable(say) and not _chosen.get("said"):
        _chosen["said"] = "yes"
        origin = "train.num_threads" if setting else "the CPUs this process may use"
        say(f"torch threads: {n} ({origin}); {choose_wait_policy()}")
    return n
