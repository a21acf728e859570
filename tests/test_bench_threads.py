"""`inference.bench_threads`: its paired figures and its flag checks (the timing itself is a
benchmark, run by hand)."""

from __future__ import annotations

import pytest

from griffin_jax import checks
from inference import bench_threads


def test_paired_changes_are_per_call_and_the_settings_medians_per_batch():
    times = {  # two batches x three passes, seconds
        "helpers": [[0.010, 0.012, 0.011], [0.020, 0.020, 0.022]],
        "xla": [[0.009, 0.012, 0.0099], [0.022, 0.019, 0.022]],
    }
    got = bench_threads.paired(times)
    assert got["helpers_ms"] == pytest.approx((11 + 20) / 2)
    assert got["xla_ms"] == pytest.approx((9.9 + 22) / 2)
    changes = [-0.1, 0.0, -0.1, 0.1, -0.05, 0.0]
    assert got["xla_change_median"] == pytest.approx(-0.025)
    assert got["xla_change_mean"] == pytest.approx(sum(changes) / 6)
    assert got["xla_change_stderr"] > 0


BAD = [["--batch", "0"], ["--passes", "0"], ["--temperature", "-1"], ["--max-new-tokens", "0"]]


@pytest.mark.parametrize("flags", BAD)
def test_bad_flags_are_refused_before_any_model_loads(flags, tmp_path):
    with pytest.raises(checks.InputError):
        bench_threads.main([*flags, "--out", str(tmp_path / "t.json")])
