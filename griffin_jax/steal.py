"""Wall-clock timing that notices when a hypervisor took the CPUs away.

On a shared virtual machine the host may run other guests on this guest's CPUs: Linux counts
that time as `steal` in `/proc/stat`. It comes in bursts of seconds, and a timed call that
meets one can take twice as long with no change in its own work (on the 2-CPU machine this
project is developed on, 16 identical batch-8 vanilla generations took 2.1-5.7 s of wall time
while 0.1-5.2 CPU-seconds were stolen, their own CPU time staying within 3.5-4.2 s).
Comparisons of speed (`inference.benchmark`) and the adaptive budget's round costs
(`speculative.measure_round_costs`, cached for good) should not keep such measurements.

`cpu_counters()` reads the counters; `Stolen` measures the share of the machine's CPU time
stolen over a span; `timed` runs a call again while too much was stolen. Where `/proc/stat`
is missing (not Linux) nothing is ever stolen, and every call is kept.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Generic, TypeVar

PROC_STAT = "/proc/stat"
MAX_STEAL = 0.05  # a measurement is redone when over 5% of the CPUs' time was stolen
TRIES = 6  # at most this many runs of one measurement; the least stolen one is kept

R = TypeVar("R")


def cpu_counters(path: str = PROC_STAT) -> tuple[int, int] | None:
    """(stolen, total) clock ticks of all CPUs since boot, or None where unreadable.

    The first line of `/proc/stat` is `cpu user nice system idle iowait irq softirq steal
    guest guest_nice`; guest time is already inside user and nice, so the total is the sum
    of the first eight fields.
    """
    try:
        with open(path) as f:
            fields = f.readline().split()
    except OSError:
        return None
    if len(fields) < 9 or fields[0] != "cpu":
        return None
    try:
        ticks = [int(x) for x in fields[1:9]]
    except ValueError:
        return None
    return ticks[7], sum(ticks)


class Stolen:
    """The share of all CPUs' time stolen between `start()` and `share()` (0 where unknown)."""

    def __init__(self, path: str = PROC_STAT) -> None:
        self.path = path
        self._start: tuple[int, int] | None = None

    def start(self) -> Stolen:
        self._start = cpu_counters(self.path)
        return self

    def share(self) -> float:
        end = cpu_counters(self.path)
        if self._start is None or end is None:
            return 0.0
        stolen, total = end[0] - self._start[0], end[1] - self._start[1]
        return stolen / total if total > 0 else 0.0


@dataclasses.dataclass
class Timed(Generic[R]):
    """One kept measurement: the call's result, its wall seconds, the stolen share meanwhile
    and how many runs it took (more than one when earlier runs met stolen time)."""

    result: R
    seconds: float
    steal: float
    runs: int


def timed(
    fn: Callable[[], R],
    *,
    max_steal: float = MAX_STEAL,
    tries: int = TRIES,
    path: str = PROC_STAT,
) -> Timed[R]:
    """Runs `fn` and times it by the wall clock; while more than `max_steal` of the CPUs' time
    was stolen during a run, runs it again, `tries` runs at most, and keeps the least stolen.

    `fn` must be safe to repeat (every run does the same work). `max_steal >= 1` never
    repeats.
    """
    if tries < 1:
        raise ValueError(f"tries must be >= 1, got {tries}")
    best: Timed[R] | None = None
    for run in range(1, tries + 1):
        clock = Stolen(path).start()
        t0 = time.perf_counter()
        result = fn()
        seconds = time.perf_counter() - t0
        share = clock.share()
        if best is None or share < best.steal:
            best = Timed(result, seconds, share, run)
        if share <= max_steal:
            break
    best.runs = run
    return best
