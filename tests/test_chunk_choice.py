"""Where the CPU kernels split their calls, chosen per round shape: `cpu_kernels.chunks_here`
inside the programs, `Budget.chunks`, and `measure_round_costs(choose_chunks=True)`, which times
every shape on the library's helper threads and on XLA's pool."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from griffin_jax import budget as budget_lib
from griffin_jax import cpu_kernels, speculative, vanilla
from griffin_jax.config import TreeConfig

TREE = TreeConfig(top_k=2, depth=3, total_tokens=8)
PROMPTS = [[5, 6, 7, 8, 9, 10], [11, 12, 13]]
SHORT = dict(repeats=1, segment=4, short=1, prompt_len=16, max_new=32)  # a quick measurement

needs_kernels = pytest.mark.skipif(
    not cpu_kernels.enabled(), reason="the project's CPU kernels are not in use here"
)


@needs_kernels
def test_a_program_sets_the_threads_where_it_says_and_keeps_its_values():
    @jax.jit
    def here(choice, x):
        return cpu_kernels.chunks_here(choice, x) + 1

    cpu_kernels.set_chunk_threads(None)
    x = jnp.arange(5, dtype=jnp.int32)
    try:
        np.testing.assert_array_equal(here(jnp.int32(1), x), np.arange(1, 6))
        assert cpu_kernels.chunk_threads_now() == 1  # XLA's pool from there on
        here(jnp.int32(budget_lib.KEEP_CHUNKS), x).block_until_ready()
        assert cpu_kernels.chunk_threads_now() == 1  # left as it was
        here(jnp.int32(0), x).block_until_ready()
        assert cpu_kernels.chunk_threads_now() == 0  # the helpers
    finally:
        cpu_kernels.restore_chunk_threads()
    assert cpu_kernels.chunk_threads_now() == -1  # as GRIFFIN_CPU_THREADS says


@needs_kernels
def test_shapes_on_their_own_threads_decode_vanilla_s_tokens_and_put_the_setting_back(pair):
    cfg, dcfg, base, draft = pair
    shapes = budget_lib.auto_shapes(TREE)
    want = vanilla.generate(base, cfg, PROMPTS, max_new_tokens=16).output_ids
    run = dict(max_new_tokens=16, draft_head=None)
    mixes = ([0] * len(shapes), [1] * len(shapes), [0] + [1] * (len(shapes) - 1))
    sizes = None
    cpu_kernels.set_chunk_threads("xla")
    try:
        for chunks in mixes:
            # every shape in turn, two rounds each: each segment sets its shape's threads
            schedule = [i for i in range(len(shapes)) for _ in range(2)] * 4
            b = budget_lib.make_budget(shapes, schedule=schedule, chunks=chunks)
            got = speculative.generate(base, cfg, draft, dcfg, PROMPTS, tree_cfg=b, **run)
            assert got.output_ids == want, chunks
            assert {i for row in got.round_shapes for i in row} == set(range(len(shapes)))
            assert cpu_kernels.chunk_threads_now() == 1  # put back as the caller had it
            now = speculative.run_segment._cache_size()
            assert sizes is None or now == sizes, "a change of Budget.chunks recompiled"
            sizes = now
    finally:
        cpu_kernels.set_chunk_threads(None)
    with pytest.raises(ValueError, match="chunks"):
        budget_lib.make_budget(shapes, chunks=[3] * len(shapes))
    with pytest.raises(ValueError, match="chunks"):
        budget_lib.make_budget(shapes, chunks=[0])


@needs_kernels
def test_the_measurement_times_every_shape_on_both_and_picks_each_ones_threads(pair):
    cfg, dcfg, base, draft = pair
    shapes = budget_lib.auto_shapes(TREE)
    b = budget_lib.make_budget(shapes)
    kw = dict(batch=2, greedy=True, **SHORT)
    both = speculative.measure_round_costs(base, cfg, draft, dcfg, b, choose_chunks=True, **kw)
    n = len(shapes)
    assert len(both) == 2 * n + 2 and budget_lib.round_costs_valid(both, n)
    assert set(both[n + 2 :]) <= {0.0, 1.0}
    assert cpu_kernels.chunk_threads_now() == -1  # the measurement put the setting back
    one = speculative.measure_round_costs(base, cfg, draft, dcfg, b, **kw)
    assert len(one) == n + 2 and budget_lib.round_costs_valid(one, n)


def test_cached_costs_are_read_only_in_their_own_layout():
    assert budget_lib.round_costs_valid([1.0, 2.0, 0.01, 0.5], 2)
    assert budget_lib.round_costs_valid([1.0, 2.0, 0.01, 0.5, 0.0, 1.0], 2)
    assert not budget_lib.round_costs_valid([1.0, 2.0, 0.01, 0.5, 0.0, 2.0], 2)  # no setting 2
    assert not budget_lib.round_costs_valid([1.0, 2.0, 0.01, 0.5, 0.0], 2)
    assert not budget_lib.round_costs_valid([1.0, 0.0, 0.01, 0.5], 2)  # a free round
    assert budget_lib.round_costs_valid([1.0, 2.0, 3.0, 0.01, 0.5])  # any count without it


@needs_kernels
@pytest.mark.parametrize("adaptive", [True, False])
def test_a_model_measures_each_shapes_threads_once_unless_the_variable_is_given(
    pair, tmp_path, monkeypatch, capsys, adaptive
):
    """With GRIFFIN_CPU_THREADS unset the costs carry each shape's setting, in a cache entry of
    their own, and the budget runs them (a fixed tree as a one-shape budget); with it set, as
    before: the costs alone, and a fixed tree as it is."""
    from inference.api import SpeculativeModel

    cfg, dcfg, base, draft = pair
    monkeypatch.setenv("GRIFFIN_COST_CACHE", str(tmp_path / "costs.json"))
    measure = speculative.measure_round_costs
    calls = []

    def short(*a, **kw):
        calls.append(kw["choose_chunks"])
        return measure(*a, **{**kw, **SHORT})

    monkeypatch.setattr(speculative, "measure_round_costs", short)

    def model():
        m = SpeculativeModel(base, cfg, draft_params=draft, dcfg=dcfg, tree_cfg=TREE)
        m.adaptive = adaptive
        return m

    monkeypatch.delenv("GRIFFIN_CPU_THREADS")
    if not cpu_kernels.chunk_choice_applies():
        pytest.skip("one CPU: nothing to split")
    m = model()
    n = len(m.shapes)
    b = m.budget(2, greedy=True)
    what = "the adaptive draft budget" if adaptive else "the tree"
    assert f"round costs of {what}, and where the CPU kernels" in capsys.readouterr().err
    costs = m.round_costs(2, greedy=True)
    assert calls == [True] and len(costs) == 2 * n + 2
    assert m.measured_costs() == {"batch 2, greedy": costs}  # what a benchmark report lists
    assert isinstance(b, budget_lib.Budget) and b.shapes == m.shapes
    np.testing.assert_array_equal(b.chunks, [int(c) for c in costs[n + 2 :]])
    want = vanilla.generate(base, cfg, PROMPTS, max_new_tokens=12).output_ids
    assert m.generate(PROMPTS, max_new_tokens=12).output_ids == want
    assert cpu_kernels.chunk_threads_now() == -1
    model().budget(2, greedy=True)  # read back from the file
    assert calls == [True]
    monkeypatch.setenv("GRIFFIN_CPU_THREADS", "helpers")
    m = model()
    b = m.budget(2, greedy=True)
    if adaptive:
        assert calls == [True, False] and len(m.round_costs(2, greedy=True)) == n + 2
        assert set(b.chunks.tolist()) == {budget_lib.KEEP_CHUNKS}
    else:
        assert calls == [True] and b == TREE  # nothing measured for a fixed tree
    entries = json.loads((tmp_path / "costs.json").read_text())
    assert len(entries) == (2 if adaptive else 1)


def test_shapes_of_a_kind_share_the_faster_setting_and_a_near_tie_keeps_the_helpers():
    plain = [True, False, False]
    got = speculative.chunk_choice([[1.0, 0.9], [2.0, 1.5], [3.0, 2.8]], plain)
    assert got.tolist() == [1, 1, 1]
    # The drafting shapes together: XLA's pool, though one of them alone ran slower there.
    got = speculative.chunk_choice([[1.0, 0.99], [2.0, 2.2], [3.0, 2.5]], plain)
    assert got.tolist() == [0, 1, 1]
    got = speculative.chunk_choice([[1.0, 0.985], [2.0, 1.99], [3.0, 2.95]], plain)
    assert got.tolist() == [0, 0, 0]  # within CHUNK_MARGIN
    assert speculative.chunk_choice([[2.0, 1.0]], [False]).tolist() == [1]  # a fixed tree
