"""griffin_jax.steal: the stolen share of CPU time from /proc/stat, and timing that redoes a
call which met stolen time."""

import pytest

from griffin_jax import steal


def write_stat(path, stolen: int, busy: int) -> None:
    """A /proc/stat whose first line has `busy` user ticks and `stolen` steal ticks (plus guest
    ticks, which are already counted in user time and must not add to the total)."""
    path.write_text(f"cpu  {busy} 0 0 1000 0 0 0 {stolen} 77 0\ncpu0 1 2 3 4 5 6 7 8 9 10\n")


def test_counters_are_steal_and_the_first_eight_fields(tmp_path):
    stat = tmp_path / "stat"
    write_stat(stat, stolen=50, busy=450)
    assert steal.cpu_counters(str(stat)) == (50, 450 + 1000 + 50)
    assert steal.cpu_counters(str(tmp_path / "missing")) is None
    stat.write_text("intr 1 2 3\n")
    assert steal.cpu_counters(str(stat)) is None
    stat.write_text("cpu 1 2 x 4 5 6 7 8\n")
    assert steal.cpu_counters(str(stat)) is None


def test_real_counters_where_linux_has_them():
    counters = steal.cpu_counters()
    if counters is None:
        pytest.skip("no /proc/stat here")
    stolen, total = counters
    assert 0 <= stolen <= total and total > 0
    share = steal.Stolen().start().share()
    assert 0.0 <= share <= 1.0


class Host:
    """A fake /proc/stat: each call of the timed function adds 100 ticks, `stolen[i]` of
    them stolen on its i-th run."""

    def __init__(self, path, stolen: list[int]) -> None:
        self.path, self.stolen, self.calls = path, stolen, 0
        self.steal = self.busy = 0
        write_stat(path, 0, 0)

    def __call__(self) -> int:
        s = self.stolen[self.calls]
        self.steal += s
        self.busy += 100 - s
        self.calls += 1
        write_stat(self.path, self.steal, self.busy)
        return self.calls


def test_timed_redoes_runs_that_met_stolen_time(tmp_path):
    stat = tmp_path / "stat"
    host = Host(stat, [40, 20, 3, 0])
    got = steal.timed(host, max_steal=0.05, path=str(stat))
    assert host.calls == 3 and got.result == 3 and got.runs == 3
    assert got.steal == pytest.approx(3 / 100) and got.seconds >= 0


def test_timed_keeps_the_least_stolen_run_when_every_run_met_some(tmp_path):
    stat = tmp_path / "stat"
    host = Host(stat, [40, 10, 30])
    got = steal.timed(host, max_steal=0.05, tries=3, path=str(stat))
    assert host.calls == 3 and got.runs == 3
    assert got.result == 2 and got.steal == pytest.approx(0.10)


def test_timed_never_repeats_without_counters_or_with_limit_one(tmp_path):
    calls = []
    got = steal.timed(lambda: calls.append(1), path=str(tmp_path / "missing"))
    assert calls == [1] and got.steal == 0.0 and got.runs == 1
    stat = tmp_path / "stat"
    host = Host(stat, [90])
    assert steal.timed(host, max_steal=1.0, path=str(stat)).runs == 1
    with pytest.raises(ValueError, match="tries"):
        steal.timed(host, tries=0)
