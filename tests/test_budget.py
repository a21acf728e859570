"""The adaptive draft budget: the policy's arithmetic, and the engine under any choice of shapes."""

from __future__ import annotations

import collections
import functools
import itertools
import json
import re
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from spec_models import aligned_pair, base_config, draft_config, prefilled, random_pair

from griffin_jax import budget, sampling, speculative, vanilla
from griffin_jax.config import TreeConfig
from griffin_jax.model import unstack_layers

TREE = TreeConfig(top_k=2, depth=3, total_tokens=8)
# Four shapes (plain and three trees) exercise the policy; `auto_shapes` makes three of TREE.
SHAPES = (
    None,
    TreeConfig(top_k=2, depth=0, total_tokens=3),
    TreeConfig(top_k=2, depth=1, total_tokens=5),
    TREE,
)
PROMPTS = [[5, 6, 7, 8, 9], [10, 11, 12], list(range(20, 38)), [40]]


def test_auto_shapes_are_plain_decoding_and_prefixes_of_the_tree():
    assert budget.auto_shapes(TREE) == (None, SHAPES[1], TREE)
    chain = budget.auto_shapes(TreeConfig(top_k=1, depth=6, total_tokens=8, draft_vocab=64))
    assert [budget.describe(s) for s in chain] == ["none", "1,0,2,64", "1,3,5,64", "1,6,8,64"]
    wide = budget.auto_shapes(TreeConfig(top_k=10, depth=5, total_tokens=60))
    assert [budget.describe(s) for s in wide] == ["none", "10,0,11", "10,3,41", "10,5,60"]
    # depth 0 stored: plain decoding and that one level
    assert budget.auto_shapes(TreeConfig(top_k=3, depth=0, total_tokens=4)) == (
        None,
        TreeConfig(top_k=3, depth=0, total_tokens=4),
    )


def _stats(per_level_accept: list[float], rounds: int = 200, levels: int = 4):
    """Counts of `rounds` rounds of a `levels`-level tree whose path continues past level i
    with probability per_level_accept[i] (expected counts, one row)."""
    hits = np.zeros(levels)
    trials = np.zeros(levels)
    reach = 1.0
    for i, p in enumerate(per_level_accept[:levels]):
        trials[i] = rounds * reach
        reach *= p
        hits[i] = rounds * reach
    return jnp.asarray(hits[None], jnp.float32), jnp.asarray(trials[None], jnp.float32)


def test_expected_tokens_follow_the_acceptance():
    hits, trials = _stats([1.0, 1.0, 1.0, 1.0])
    e = np.asarray(budget.expected_tokens(hits, trials, SHAPES))[0]
    np.testing.assert_allclose(e, [1, 2, 3, 5], rtol=0.02)  # 1 + levels (depth + 1)
    hits, trials = _stats([0.0, 0.0, 0.0, 0.0])
    np.testing.assert_allclose(budget.expected_tokens(hits, trials, SHAPES)[0], 1, atol=0.02)
    # Only level 1 ever tried, at 50%: deeper levels borrow that estimate.
    hits, trials = _stats([0.5, 0.0, 0.0, 0.0], levels=1)
    hits = jnp.pad(hits, ((0, 0), (0, 3)))
    trials = jnp.pad(trials, ((0, 0), (0, 3)))
    e = np.asarray(budget.expected_tokens(hits, trials, SHAPES))[0]
    np.testing.assert_allclose(e, [1, 1.5, 1.75, 1.9375], rtol=0.02)
    # No statistics at all: the optimistic prior, so a fresh row drafts.
    zero = jnp.zeros((1, 4))
    assert budget.expected_tokens(zero, zero, SHAPES)[0, -1] == pytest.approx(
        1 + sum(budget.PRIOR**i for i in range(1, 5))
    )


# Jitted: the policy tests call it hundreds of times, and op-by-op it costs ~0.1 s a call.
_choose_jit = jax.jit(budget.choose)
_keep_plain_jit = jax.jit(budget.keep_plain)


def _choose(b, hits, trials, *, streak=0, wait=budget.PROBE_EVERY, step=0, current=0,
            active=(True,), remaining=None, slots=0, level=None, known=(True,)):  # fmt: skip
    """`choose`; `level` [B]: the next round's level-1 chance (the draft's confidence), known
    where `known`."""
    first = {}
    if level is not None:
        first = dict(first_level=jnp.asarray(level, jnp.float32), first_known=jnp.asarray(known))
    return int(
        _choose_jit(
            b,
            hits,
            trials,
            jnp.asarray(active),
            jnp.int32(streak),
            jnp.int32(wait),
            jnp.int32(step),
            jnp.int32(current),
            remaining=None if remaining is None else jnp.asarray(remaining, jnp.int32),
            catch_up_slots=jnp.int32(slots),
            **first,
        )  # fmt: skip
    )


@functools.partial(jax.jit, static_argnames="rounds")
def _picks(b, hits, trials, *, rounds: int) -> jax.Array:
    drafting = jnp.asarray([s is not None for s in b.shapes])
    active = jnp.ones(hits.shape[:1], bool)

    def one(carry, _):
        streak, wait, current = carry
        pick = budget.choose(b, hits, trials, active, streak, wait, jnp.int32(1 << 20), current)
        plain = budget.next_probe(streak, wait, drafted=False, budget=b)
        drafted = budget.next_probe(streak, wait, drafted=True, budget=b)
        streak, wait = jax.tree.map(lambda d, p: jnp.where(drafting[pick], d, p), drafted, plain)
        return (streak, wait, pick), pick

    init = (jnp.int32(0), jnp.int32(b.probe_every), jnp.int32(0))
    return jax.lax.scan(one, init, None, length=rounds)[1]


def _simulate(b, stats, rounds: int) -> list[int]:
    """The policy's picks over `rounds` rounds with fixed statistics."""
    return [int(p) for p in _picks(b, *stats, rounds=rounds)]


def test_policy_drafts_deep_when_the_draft_hits_and_decodes_plainly_when_it_misses():
    b = budget.make_budget(SHAPES, costs=[1.0, 1.4, 1.8, 2.6])
    good = _stats([0.9, 0.9, 0.9, 0.9])
    bad = _stats([0.05, 0.05, 0.05, 0.05])
    assert _choose(b, *good) == 3
    assert _choose(b, *bad) == 0
    # Costs decide, not this machine's constants: with free verification even a poor draft
    # pays; with expensive trees a good one does not.
    assert _choose(budget.make_budget(SHAPES, costs=[1.0, 1.0, 1.0, 1.0]), *bad) == 3
    assert _choose(budget.make_budget(SHAPES, costs=[1.0, 3.0, 5.0, 9.0]), *good) == 0
    # Finished rows do not count: a running row with a bad draft decides alone.
    both = tuple(jnp.concatenate([g, x]) for g, x in zip(good, bad, strict=True))
    assert _choose(b, *both, active=(False, True)) == 0
    assert _choose(b, *both, active=(True, False)) == 3


def test_a_fixed_batch_is_weighed_by_its_slowest_row():
    # Two running rows, one drafting well and one not: the summed rate drafts; a batch
    # that ends together (`finish`, speculative.generate) goes as fast as the poor row allows,
    # unless that row is nearly done.
    good, bad = _stats([0.9] * 4), _stats([0.05] * 4)
    both = tuple(jnp.concatenate([g, x]) for g, x in zip(good, bad, strict=True))
    rate = budget.make_budget(SHAPES, costs=[1.0, 1.4, 1.8, 2.6])
    finish = rate.replace(finish=True)
    assert _choose(rate, *both, active=(True, True), remaining=(30, 30)) == 1
    assert _choose(finish, *both, active=(True, True), remaining=(30, 30)) == 0
    assert _choose(finish, *both, active=(True, True), remaining=(30, 1)) == 3
    assert _choose(finish, *both, active=(True, False), remaining=(30, 30)) == 3


@pytest.mark.parametrize("finish", [False, True])
def test_resuming_drafting_pays_the_catch_up_over_the_rounds_left(finish):
    # A draft a little better than plain decoding: (1 + 0.5) tokens for 1.3 plain steps.
    shapes = (None, TreeConfig(top_k=1, depth=0, total_tokens=2))
    b = budget.make_budget(shapes, costs=[1.0, 1.3], catch_up=0.05).replace(finish=finish)
    stats = _stats([0.5], levels=1)
    assert _choose(b, *stats, remaining=(96,)) == 1  # nothing pending: it drafts
    # 256 queued positions cost 12.8 plain steps before the first drafting round; 96 tokens
    # by drafting save ~12.5 steps, less the 5% margin: not worth it...
    assert _choose(b, *stats, remaining=(96,), slots=256) == 0
    # ...but paid once over 2,000 tokens it is; so is a catch-up of 16 slots over 96.
    assert _choose(b, *stats, remaining=(2000,), slots=256) == 1
    assert _choose(b, *stats, remaining=(96,), slots=16) == 1
    # Unmeasured (catch_up 0) or no horizon known (`remaining` None): no charge.
    assert _choose(b.replace(catch_up=jnp.float32(0)), *stats, remaining=(96,), slots=256) == 1
    if not finish:
        assert _choose(b, *stats, slots=256) == 1


def test_the_drafts_confidence_picks_the_drafting_shape_not_whether_to_draft():
    b = budget.make_budget((None, SHAPES[1], TREE), costs=[1.0, 1.4, 2.4])
    # A confident draft this round: level 1 nearly sure, so the deep tree pays...
    fair = _stats([0.7] * 4)
    assert _choose(b, *fair) == 1
    assert _choose(b, *fair, level=[0.99]) == 2
    # ...a doubtful one: only the one-level tree still does.
    better = _stats([0.8] * 4)
    assert _choose(b, *better) == 2
    assert _choose(b, *better, level=[0.3]) == 1
    # Unknown (the trunk not caught up after plain rounds): the running estimate decides.
    assert _choose(b, *fair, level=[0.99], known=(False,)) == 1
    # Whether to draft at all stays the running estimates' call: a confident draft whose rows
    # keep missing does not bring drafting back, nor does a doubtful one stop it.
    bad, good = _stats([0.05] * 4), _stats([0.9] * 4)
    assert _choose(b, *bad, level=[0.99]) == 0
    assert _choose(b, *good, level=[0.05]) != 0
    assert _choose(b, *bad, level=[0.99], current=2) == 0  # nor keeps a drafting shape going
    # A fixed batch weighs its remaining rounds, which one round's confidence says little of.
    finish = b.replace(finish=True)
    for level in (0.05, 0.99):
        assert _choose(finish, *fair, level=[level], remaining=(40,)) == _choose(
            finish, *fair, remaining=(40,)
        )
    # The chance scales every level's reach: with the running estimate itself, no change.
    for stats in (fair, better, good):
        p1 = float(budget.level_acceptance(*stats)[0, 0])
        for current in range(3):
            assert _choose(b, *stats, level=[p1], current=current) == _choose(
                b, *stats, current=current
            )


def test_a_static_zero_catch_up_skips_the_rounds_left_but_chooses_alike():
    """After a drafting round nothing is pending: the choice passes a static 0 and skips the
    rounds-left estimate (`finish_rounds`), which only spreads a catch-up; a fixed batch
    still weighs by it."""
    for finish in (False, True):
        b = budget.make_budget(SHAPES, costs=[1.0, 1.4, 1.8, 2.6]).replace(finish=finish)
        for accept in (0.05, 0.5, 0.7, 0.9):
            hits, trials = _stats([accept] * 4)
            both = tuple(jnp.concatenate([x, x * 0.5]) for x in (hits, trials))
            args = (b, *both, jnp.ones(2, bool), jnp.int32(0), jnp.int32(8), jnp.int32(0))
            remaining = jnp.asarray([40, 12], jnp.int32)
            for current in range(4):
                traced = _choose_jit(*args, jnp.int32(current), remaining=remaining,
                                     catch_up_slots=jnp.int32(0))  # fmt: skip
                static = budget.choose(*args, jnp.int32(current), remaining=remaining,
                                       catch_up_slots=0)  # fmt: skip
                assert int(traced) == int(static)


def test_conf_acceptance_reads_the_rows_bin_over_its_class_prior():
    b = budget.make_budget(SHAPES)
    conf = jnp.asarray([0.05, 0.55, 0.999, 0.55])
    zero = jnp.zeros((4, 2, budget.CONF_BINS))
    sampled = jnp.asarray([False, False, False, True])
    # nothing learnt: each bin's centre
    np.testing.assert_allclose(
        budget.conf_acceptance(b, conf, zero, sampled), [0.05, 0.55, 0.95, 0.55], rtol=1e-6
    )
    # a row's own counts move its bin only: 8 hits in 8 trials at bin 5 (0.5 <= conf < 0.6)
    counts = zero.at[:, :, 5].set(8.0)
    w = budget.CONF_PRIOR_WEIGHT
    np.testing.assert_allclose(
        budget.conf_acceptance(b, conf, counts, sampled),
        [0.05, (0.55 * w + 8) / (w + 8), 0.95, (0.55 * w + 8) / (w + 8)],
        rtol=1e-6,
    )
    # history's calibration per class: greedy rows hit 90% at bin 5, sampled ones 10%
    hist = budget.History(b.max_levels)
    learnt = np.zeros((2, 2, budget.CONF_BINS))
    learnt[0, :, 5] = [90.0, 100.0]
    learnt[1, :, 5] = [10.0, 100.0]
    rows = np.stack([learnt[0], learnt[1]])
    hist.observe(np.zeros((2, 4)), np.zeros((2, 4)), [False, True], conf_counts=rows)
    level = budget.conf_acceptance(hist.apply(b, sampled=False), conf, zero, sampled)
    np.testing.assert_allclose(
        level, [0.05, (0.55 * w + 90) / (w + 100), 0.95, (0.55 * w + 10) / (w + 100)], rtol=1e-6
    )


def test_update_conf_counts_level_one_in_the_bin_the_round_entered_with():
    counts = jnp.zeros((3, 2, budget.CONF_BINS))
    conf = jnp.asarray([0.0, 0.42, 1.0])  # bins 0, 4 and the last (1.0 is clipped into it)
    hit, tried = jnp.asarray([1.0, 0.25, 0.0]), jnp.asarray([1.0, 1.0, 1.0])
    out = budget.update_conf(counts, conf, hit, tried, jnp.asarray([True, True, False]))
    expect = np.zeros((3, 2, budget.CONF_BINS))
    expect[0, :, 0] = [1.0, 1.0]
    expect[1, :, 4] = [0.25, 1.0]  # a sampled row counts the chance it had
    np.testing.assert_allclose(out, expect)  # the finished row keeps its counts
    again = budget.update_conf(out, conf, hit, tried, jnp.ones(3, bool))
    np.testing.assert_allclose(again[:2], 2 * expect[:2])  # counts add up, no decay


def test_history_keeps_a_bounded_memory_of_the_calibration():
    hist = budget.History(4)
    row = np.zeros((1, 2, budget.CONF_BINS))
    row[0, :, 3] = [0.0, 200.0]  # 200 misses
    hist.observe(np.zeros((1, 4)), np.zeros((1, 4)), [False], conf_counts=row)
    row[0, :, 3] = [200.0, 200.0]  # then 200 hits: the older trials fade to keep CONF_MEMORY
    hist.observe(np.zeros((1, 4)), np.zeros((1, 4)), [False], conf_counts=row)
    hits, trials = hist.conf[0, :, 3]
    assert trials == pytest.approx(budget.CONF_MEMORY)
    assert hits / trials == pytest.approx(0.5)
    assert (hist.conf[1] == 0).all()  # the sampled class learnt nothing


def test_generation_counts_level_one_by_the_drafts_confidence(pair, small_pending):
    """Every drafting round adds its level-1 outcome to the bin of the confidence the draft
    entered it with; plain rounds add nothing. An aligned draft is always right."""
    cfg = base_config("llama")
    dcfg = draft_config(cfg)
    base, draft = aligned_pair(cfg, dcfg)
    sched = [0, 1, 2, 0, 0, 3, 1] * 8
    b = budget.make_budget(SHAPES, schedule=sched)
    res = speculative.generate(base, cfg, draft, dcfg, PROMPTS, tree_cfg=b, max_new_tokens=24)
    counts = np.asarray(res.conf_counts)  # [B, 2, bins]
    for row, shapes in enumerate(res.round_shapes):
        drafted = sum(1 for s in shapes if SHAPES[s] is not None)
        assert counts[row, 1].sum() == pytest.approx(drafted)
        np.testing.assert_allclose(counts[row, 0], counts[row, 1])  # every level 1 accepted
    hist = budget.History.for_shapes(SHAPES)
    hist.observe(res.level_hits, res.level_trials, False, conf_counts=res.conf_counts)
    np.testing.assert_allclose(hist.conf[0], counts.sum(0))


def _simulated_finish(accept: float, n_levels: int, rows: int, remaining: int, runs: int):
    """Mean over `runs` of the rounds until every one of `rows` rows committed `remaining`
    tokens, each level accepted with chance `accept` once the one above was."""
    rng = np.random.default_rng(0)
    draws = rng.random((runs, 4 * remaining, rows, max(n_levels, 1))) < accept
    accepted = np.cumprod(draws, axis=-1)[..., :n_levels].sum(-1)  # [runs, rounds, rows]
    done_after = np.argmax(np.cumsum(1 + accepted, axis=1) >= remaining, axis=1) + 1
    return float(done_after.max(axis=1).mean())


@pytest.mark.parametrize("rows", [1, 8])
def test_finish_rounds_follow_a_simulation(rows):
    hits, trials = _stats([0.8] * 4)
    hits, trials = jnp.repeat(hits, rows, 0), jnp.repeat(trials, rows, 0)
    mean, var = budget.round_tokens(hits, trials, SHAPES)
    for remaining in (8, 30):
        got = budget.finish_rounds(
            mean, var, jnp.full((rows,), remaining), jnp.ones((rows,), bool)
        )  # fmt: skip
        want = [_simulated_finish(0.8, budget.levels(s), rows, remaining, 2000) for s in SHAPES]
        np.testing.assert_allclose(np.asarray(got), want, rtol=0.05)
    assert budget.expected_max_normal(1) == 0.0
    assert budget.expected_max_normal(2) == pytest.approx(1 / np.sqrt(np.pi), abs=1e-4)


def test_a_large_fixed_batch_prefers_shallower_trees():
    """Deeper trees commit more a round but vary more: alone a row drafts deep; in a batch
    of eight that ends with its unluckiest row, the cheaper shallow tree finishes first."""
    b = budget.make_budget(SHAPES, costs=[1.0, 1.5, 2.0, 2.6]).replace(finish=True)
    hits, trials = _stats([0.8] * 4)
    for rows, want in ((1, 3), (8, 1)):
        stats = jnp.repeat(hits, rows, 0), jnp.repeat(trials, rows, 0)
        assert _choose(b, *stats, active=(True,) * rows, remaining=(30,) * rows) == want


def test_policy_probes_after_a_plain_streak_and_keeps_its_shape_on_near_ties():
    b = budget.make_budget(SHAPES, costs=[1.0, 1.4, 1.8, 2.6])
    bad = _stats([0.05, 0.05, 0.05, 0.05])
    assert _choose(b, *bad, streak=budget.PROBE_EVERY - 1) == 0
    # a probe: PROBE_ROUNDS rounds of the cheapest drafting shape
    streak, wait, picks = jnp.int32(budget.PROBE_EVERY), jnp.int32(budget.PROBE_EVERY), []
    for _ in range(budget.PROBE_ROUNDS + 1):
        picks.append(_choose(b, *bad, streak=int(streak), wait=int(wait)))
        drafted = b.shapes[picks[-1]] is not None
        streak, wait = budget.next_probe(streak, wait, drafted=drafted, budget=b)
    assert picks == [1] * budget.PROBE_ROUNDS + [0]
    grown = budget.PROBE_GROWTH * budget.PROBE_EVERY
    assert int(wait) == grown  # the probe failed: the next one waits longer
    # the next one too
    for _ in range(grown - 2):  # the streak is 1 after the plain pick above
        streak, wait = budget.next_probe(streak, wait, drafted=False, budget=b)
    assert _choose(b, *bad, streak=int(streak), wait=int(wait)) == 0
    streak, wait = budget.next_probe(streak, wait, drafted=False, budget=b)
    picks = []
    for _ in range(budget.PROBE_ROUNDS):
        picks.append(_choose(b, *bad, streak=int(streak), wait=int(wait)))
        streak, wait = budget.next_probe(streak, wait, drafted=True, budget=b)
    assert picks == [1] * budget.PROBE_ROUNDS and int(wait) == budget.PROBE_GROWTH * grown
    assert int(budget.probe_shape(budget.make_budget(SHAPES, costs=[1.0, 2.0, 1.5, 3.0]))) == 2
    # Drafting runs only while it beats plain decoding by PLAIN_MARGIN, whatever ran last.
    even = budget.make_budget([None, TREE], costs=[1.0, 1.0])
    near = _stats([0.02, 0.0, 0.0, 0.0])  # the tree promises ~2% more tokens per ms
    assert _choose(even, *near, current=0) == 0
    assert _choose(even, *near, current=1) == 0
    clear = _stats([0.08, 0.0, 0.0, 0.0])  # ~8% more
    assert _choose(even, *clear, current=0) == 1
    assert _choose(even, *clear, current=1) == 1
    # Two drafting shapes within HYSTERESIS of each other: the current one stays.
    two = budget.make_budget([None, SHAPES[1], TREE], costs=[2.0, 1.0, 1.02])
    hits, trials = _stats([0.9, 0.0, 0.0, 0.0])  # level 1 only: both promise ~1.9 tokens
    assert _choose(two, hits, trials, current=1) == 1
    assert _choose(two, hits, trials, current=2) == 2


@pytest.mark.parametrize("growth", [budget.PROBE_GROWTH, 2])
def test_failing_probes_back_off_to_a_bounded_share_of_the_time(growth):
    costs = [1.0, 3.5, 4.0, 5.0]
    b = budget.make_budget(SHAPES, costs=costs, probe_growth=growth)
    cap = int(budget.probe_cap(b))
    assert cap == int(np.ceil((budget.PROBE_ROUNDS + 1) * 3.5 / (budget.PROBE_SHARE * 1.0)))
    # A measured catch-up is priced by the slots of the one that started the probe.
    priced = budget.make_budget(SHAPES, costs=costs, catch_up=0.0137)
    for slots in (0, 16, 512):
        want = (budget.PROBE_ROUNDS * 3.5 + 0.0137 * slots) / (budget.PROBE_SHARE * 1.0)
        assert int(budget.probe_cap(priced, slots)) == int(np.ceil(want))
        streak, wait = budget.next_probe(
            jnp.int32(cap), jnp.int32(cap), drafted=True, budget=priced, catch_up_slots=slots
        )  # a probe starts: the wait grows up to that cap
        assert int(wait) == min(growth * cap, int(np.ceil(want))), slots
    with pytest.raises(ValueError, match="catch_up"):
        budget.make_budget(SHAPES, costs=costs, catch_up=-1.0)
    # A call with a probe due runs the adaptive program where the plain decoder's could have
    # run it: what that call costs more is the probe's too.
    called = budget.make_budget(SHAPES, costs=costs, catch_up=0.0137, probe_call=2.5)
    want = (budget.PROBE_ROUNDS * 3.5 + 0.0137 * 16 + 2.5) / (budget.PROBE_SHARE * 1.0)
    assert int(budget.probe_cap(called, 16)) == int(np.ceil(want))
    assert int(budget.probe_cap(called, 16)) > int(budget.probe_cap(priced, 16))
    with pytest.raises(ValueError, match="probe_call"):
        budget.make_budget(SHAPES, costs=costs, probe_call=-1.0)
    picks = _simulate(b, _stats([0.05] * 4), 4000)
    starts = [i for i in range(1, len(picks)) if picks[i] in (1, 3) and picks[i - 1] == 0]
    assert {picks[i] for i in starts} == {1}
    gaps = np.diff(starts) - budget.PROBE_ROUNDS  # plain rounds between probes
    ramp = [budget.PROBE_EVERY * growth**i for i in range(1, 20)
            if budget.PROBE_EVERY * growth**i < cap]  # fmt: skip
    assert ramp and list(gaps[: len(ramp)]) == ramp and set(gaps[len(ramp) :]) == {cap}
    # In the long run the probes take at most PROBE_SHARE of the time of the plain rounds.
    tail = picks[starts[len(ramp)] : starts[-1]]  # whole probe + gap periods
    time = {
        k: sum(costs[p] for p in tail if (p == 0) == (k == "plain")) for k in ("plain", "probe")
    }
    assert time["probe"] <= budget.PROBE_SHARE * time["plain"] * 1.02
    # Without a plain shape there is nothing to back off from.
    assert int(budget.probe_cap(budget.make_budget(SHAPES[1:], costs=costs[1:]))) == (
        budget.PROBE_EVERY
    )


def test_a_probe_forgets_the_levels_it_does_not_draft():
    """Counts from before a plain streak say the deep levels missed; a one-level probe finds
    level 1 good again: the deeper levels borrow its fresh estimate and the policy drafts deep
    (it would stay shallow on the stale counts)."""
    b = budget.make_budget(SHAPES, costs=[1.0, 1.4, 1.8, 2.6])
    hits, trials = _stats([0.9, 0.1, 0.1, 0.1])
    active = jnp.asarray([True])
    probe = budget.levels(SHAPES[1])
    for probing in (False, True):
        h, t = budget.forget_untried(
            hits, trials, probe, probing=jnp.asarray(probing), active=active
        )  # fmt: skip
        assert _choose(b, h, t, current=1) == (3 if probing else 1)
        np.testing.assert_array_equal(np.asarray(h)[:, :probe], np.asarray(hits)[:, :probe])
    # finished rows keep their counts (`History` learns from them)
    h, _ = budget.forget_untried(
        hits, trials, probe, probing=jnp.asarray(True), active=jnp.asarray([False])
    )  # fmt: skip
    np.testing.assert_array_equal(np.asarray(h), np.asarray(hits))


def test_drafting_on_its_own_shrinks_the_wait_round_by_round():
    """Each round the policy drafts on its own divides the wait by `probe_growth`, down to
    `probe_every`: drafting that comes back brings the probes back within a few rounds, while
    a round or two after a lucky probe (a sampled row near the break-even) leave the wait long
    instead of sending the next probes 8, 32, 128 rounds later."""
    b = budget.make_budget(SHAPES, costs=[1.0, 1.4, 1.8, 2.6])
    good = _stats([0.9] * 4)
    streak, wait = jnp.int32(0), jnp.int32(64)  # after several failed probes
    # the policy drafts on its own (the probe's statistics were good)
    assert _choose(b, *good, streak=0, wait=64) == 3
    waits = []
    for _ in range(3):
        streak, wait = budget.next_probe(streak, wait, drafted=True, budget=b)
        waits.append(int(wait))
        assert int(streak) == 0
    growth = budget.PROBE_GROWTH
    assert waits == [64 // growth, max(64 // growth**2, budget.PROBE_EVERY), budget.PROBE_EVERY]
    # at the cap, one round of drafting leaves the wait a probe_growth-th of it
    cap = int(budget.probe_cap(b))
    _, wait = budget.next_probe(jnp.int32(0), jnp.int32(cap), drafted=True, budget=b)
    assert int(wait) == max(cap // growth, budget.PROBE_EVERY) > budget.PROBE_EVERY
    # a plain round leaves it, a probe's rounds (negative streak) leave it too
    assert int(budget.next_probe(jnp.int32(3), jnp.int32(cap), drafted=False, budget=b)[1]) == cap
    assert int(budget.next_probe(jnp.int32(-2), jnp.int32(cap), drafted=True, budget=b)[1]) == cap


@pytest.fixture
def small_pending(monkeypatch):
    """A pending buffer of 16 plain rounds, so that 20 plain rounds in a row overflow it."""
    monkeypatch.setattr(speculative, "PENDING", 16)


def test_generation_starts_from_its_own_kind_of_history(pair, small_pending):
    """A greedy generation's rows start from the greedy history, a sampled one's from the
    sampled history: the first round follows it."""
    cfg, dcfg, base, draft = pair
    hist = budget.History(4)
    hist.observe([[0.0] * 4], [[30.0] * 4], [False])  # greedy: the draft never matched
    hist.observe([[30.0] * 4], [[30.0] * 4], [True])  # sampled: it always did
    b = budget.make_budget(SHAPES, costs=[1.0, 1.4, 1.8, 2.6])
    for temperature, first in ((0.0, 0), (1.0, 3)):
        # PROMPTS and a small pending buffer, as the forced-switch tests below: the programs
        # are compiled once
        res = speculative.generate(
            base, cfg, draft, dcfg, PROMPTS, tree_cfg=hist.apply(b, sampled=temperature > 0),
            max_new_tokens=40, temperature=temperature,
        )  # fmt: skip
        assert [shapes[0] for shapes in res.round_shapes] == [first] * len(PROMPTS), temperature


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_a_batch_decoded_plainly_throughout_runs_the_plain_program(
    pair, small_pending, temperature
):  # fmt: skip
    """When the budget would run every round of a batch as a plain step, the plain decoder's
    program runs it, with the same tokens and the same record as the adaptive program's: round
    shapes, accepted lengths, draft statistics, and the probe wait and plain streak that
    `History` carries to the next request. A probe falling due, a draft worth running or a
    forced schedule keep the adaptive program."""
    cfg, dcfg, base, draft = pair
    sampled = temperature > 0
    costs = [1.0, 1.4, 1.8, 2.6]
    hist = budget.History(4)
    hist.observe([[0.0] * 4], [[30.0] * 4], [sampled], probe_wait=100, plain_streak=50)
    b = hist.apply(budget.make_budget(SHAPES, costs=costs), sampled=sampled)
    run = dict(max_new_tokens=20, temperature=temperature, seed=3)
    plain = speculative.generate(base, cfg, draft, dcfg, PROMPTS, tree_cfg=b, **run)
    # the host loop always runs the adaptive program
    adaptive = speculative.generate(base, cfg, draft, dcfg, PROMPTS, tree_cfg=b, loop="host",
                                    **run)  # fmt: skip
    assert plain.plain_program and not adaptive.plain_program
    want = vanilla.generate(base, cfg, PROMPTS, **run).output_ids
    assert plain.output_ids == adaptive.output_ids == want
    for field in ("accept_lengths", "rounds", "round_shapes", "probe_wait", "plain_streak"):
        assert getattr(plain, field) == getattr(adaptive, field), field
    assert plain.plain_streak == 50 + max(len(ids) for ids in want) - 1
    np.testing.assert_array_equal(plain.level_hits, adaptive.level_hits)
    np.testing.assert_array_equal(plain.level_trials, adaptive.level_trials)

    good = budget.History(4)
    good.observe([[30.0] * 4], [[30.0] * 4], [sampled], probe_wait=100, plain_streak=50)
    others = {
        "a probe falls due": b.replace(start_streak=np.int32(100 - 18)),
        "inside a probe": b.replace(start_streak=np.int32(-1)),
        "a good draft": good.apply(budget.make_budget(SHAPES, costs=costs), sampled=sampled),
        "a schedule": b.replace(schedule=np.asarray([0] * 64, np.int32)),
    }
    for why, other in others.items():
        res = speculative.generate(base, cfg, draft, dcfg, PROMPTS, tree_cfg=other, **run)
        assert not res.plain_program, why
        assert res.output_ids == want, why
    one = b.replace(start_streak=np.int32(100 - 19))  # the last choice sees a streak of 99
    assert speculative.generate(base, cfg, draft, dcfg, PROMPTS, tree_cfg=one, **run).plain_program


def test_the_opening_choice_runs_only_when_it_decides_the_program(monkeypatch):
    """`plain_throughout` reads the budget's opening choice (a device call and a host sync)
    only when nothing cheaper rules the plain program out; a forced schedule (the warm-up's)
    still runs it, unread, so that it compiles there."""
    hist = budget.History(4)
    hist.observe([[0.0] * 4], [[30.0] * 4], [True], probe_wait=100, plain_streak=50)
    b = hist.apply(budget.make_budget(SHAPES, costs=[1.0, 1.4, 1.8, 2.6]), sampled=True)
    lengths = np.asarray([len(p) for p in PROMPTS])
    shapes = speculative.plan_shapes(lengths, 20, SHAPES, prompt_pending=True)
    knobs = speculative.make_knobs(vanilla.SamplingKnobs(1.0, 1.0, 0), max_new_tokens=20,
                                   eos_ids=[1])  # fmt: skip
    calls = []
    real = speculative._opening_choice

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(speculative, "_opening_choice", spy)
    for why, other, plain, reads in [
        ("plain throughout", b, True, 1),
        ("a probe falls due", b.replace(start_streak=np.int32(100 - 18)), False, 0),
        ("inside a probe", b.replace(start_streak=np.int32(-1)), False, 0),
        ("drafting: the wait is probe_every", budget.make_budget(SHAPES), False, 0),
        ("a schedule (the warm-up's)", b.replace(schedule=np.zeros(64, np.int32)), False, 1),
    ]:
        calls.clear()
        got = speculative.plain_throughout(other, knobs, lengths, max_new_tokens=20, greedy=False,
                                           shapes=shapes)  # fmt: skip
        assert (got, len(calls)) == (plain, reads), why


def test_warm_up_compiles_both_programs_a_call_may_run(pair, small_pending):
    """Whether a call runs the adaptive program or the plain decoder's depends on what earlier
    calls taught the budget: after `SpeculativeModel.warm_up` neither compiles anything."""
    from inference.api import SpeculativeModel

    cfg, dcfg, base, draft = pair
    model = SpeculativeModel(base, cfg, draft_params=draft, dcfg=dcfg, tree_cfg=TREE)
    model.adaptive = True
    model._costs[(len(PROMPTS), False)] = [1.0, 1.4, 2.6, 0.01, 0.0]  # no start-up measurement
    run = dict(temperature=1.0, max_new_tokens=20, seed=5)

    def taught(streak: int) -> None:  # a poor draft, the probe wait 100, this plain streak
        model.history().observe([[0.0] * 4], [[30.0] * 4], [True], probe_wait=100,
                                plain_streak=streak)  # fmt: skip

    taught(0)  # the warm-up's own call runs the plain decoder's program
    jax.clear_caches()
    model.warm_up(PROMPTS, **run)
    programs = (vanilla.generate_device_jit, speculative.prefill, speculative.run_segment,
                speculative._opening_choice)  # fmt: skip
    sizes = [f._cache_size() for f in programs]
    want = model.vanilla_generate(PROMPTS, **run).output_ids
    for streak, plain in ((0, True), (99, False), (0, True)):  # 99: a probe falls due
        taught(streak)
        out = model.generate(PROMPTS, **run)
        assert out.plain_program == plain and out.output_ids == want, streak
        assert [f._cache_size() for f in programs] == sizes, streak


def test_keep_plain_is_the_policy_when_no_statistics_changed():
    """What plain rounds after a segment's first use instead of `choose`: the same pick
    whenever the last choice was plain (a due probe, the schedule), for any streak and wait."""
    bad = _stats([0.05, 0.05, 0.05, 0.05])
    for schedule in (None, [-1] * 10 + [2, 0, 3]):
        b = budget.make_budget(SHAPES, costs=[1.0, 1.4, 1.8, 2.6], schedule=schedule)
        for streak, wait, step in itertools.product(range(0, 40, 3), (8, 16, 100), range(9, 14)):
            want = _choose(b, *bad, streak=streak, wait=wait, step=step, current=0)
            got = _keep_plain_jit(b, jnp.int32(streak), jnp.int32(wait), jnp.int32(step),
                                    jnp.int32(0))  # fmt: skip
            assert int(got) == want, (schedule, streak, wait, step)


def test_schedule_forces_the_shape_then_the_policy_takes_over():
    b = budget.make_budget(SHAPES, costs=[1.0, 1.4, 1.8, 2.6], schedule=[2, -1, 1])
    good = _stats([0.9, 0.9, 0.9, 0.9])
    assert [_choose(b, *good, step=i) for i in range(5)] == [2, 3, 1, 3, 3]


def test_update_stats_decays_and_adds_each_tried_level():
    b = budget.make_budget(SHAPES)
    hits, trials = budget.init_stats(b, 3, 0.0, greedy=None)
    assert hits.shape == trials.shape == (3, 4) and not np.any(trials)  # no history: PRIOR
    hit = jnp.asarray([[0.0, 0, 0, 0], [1, 1, 0.25, 0], [1, 1, 1, 1]])
    tried = jnp.asarray([[1.0, 1, 0, 0], [1, 1, 1, 1], [1, 1, 1, 1]])
    active = jnp.asarray([True, True, False])
    hits, trials = budget.update_stats(hits, trials, hit, tried, active)
    np.testing.assert_array_equal(hits, [[0, 0, 0, 0], [1, 1, 0.25, 0], [0, 0, 0, 0]])
    np.testing.assert_array_equal(trials, [[1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]])
    hits, trials = budget.update_stats(hits, trials, hit, tried, jnp.ones(3, bool))
    np.testing.assert_allclose(trials[0], [budget.DECAY + 1, budget.DECAY + 1, 0, 0])
    np.testing.assert_allclose(hits[1, 2], 0.25 * budget.DECAY + 0.25)


def _tree(parents: list[int]):
    """One row's tree arrays from its parent list (node 0 the root): (parents, mask, depths)."""
    m = len(parents)
    mask = np.eye(m, dtype=bool)
    for n in range(1, m):
        mask[n] |= mask[parents[n]]
    depths = mask.sum(-1) - 1
    return (jnp.asarray([parents], jnp.int32), jnp.asarray(mask[None]),
            jnp.asarray(depths[None], jnp.int32))  # fmt: skip


def test_reach_stats_count_levels_as_the_walk_went():
    # a chain root -> 11 -> 12 -> 13 -> 14; the base's token after each node: 11, 99, 13, 14, 7
    parents, mask, depths = _tree([0, 0, 1, 2, 3])
    tokens = jnp.asarray([[0, 11, 12, 13, 14]], jnp.int32)
    targets = jnp.asarray([[11, 99, 13, 14, 7]], jnp.int32)
    chance = sampling.parent_draw_chance(tokens, parents, targets, None, 0.0)
    np.testing.assert_array_equal(chance[0, 1:], [1, 0, 1, 1])
    hit, tried = budget.reach_stats(chance, mask, depths, 4, 6)
    # one token accepted: levels 1 and 2 tried, level 1 hit (what counting accept_len gives)
    np.testing.assert_array_equal(hit, [[1, 0, 0, 0, 0, 0]])
    np.testing.assert_array_equal(tried, [[1, 1, 0, 0, 0, 0]])
    hit, tried = budget.reach_stats(jnp.ones((1, 5)), mask, depths, 4, 6)
    np.testing.assert_array_equal(tried, [[1, 1, 1, 1, 0, 0]])  # no level past the drafted


def test_reach_stats_sum_siblings_and_sampled_rows_count_the_chance():
    # root 0 with children 5 and 6 (nodes 1, 2); node 1 has child 7 (node 3).
    parents, mask, depths = _tree([0, 0, 0, 1])
    tokens = jnp.asarray([[0, 5, 6, 7]], jnp.int32)
    targets = jnp.asarray([[6, 2, 1, 1]], jnp.int32)  # greedy: root -> 6 (node 2), then stop
    probs = np.full((1, 4, 10), 1e-9)
    probs[0, 0, [5, 6]] = [0.3, 0.5]
    probs[0, 1, 7] = 0.4
    logprobs = jnp.log(jnp.asarray(probs, jnp.float32))
    greedy = sampling.parent_draw_chance(tokens, parents, targets, None, 0.0)
    sampled = sampling.parent_draw_chance(tokens, parents, targets, logprobs, 1.0)
    np.testing.assert_allclose(sampled[0, 1:], [0.3, 0.5, 0.4], rtol=1e-5)
    hit, tried = budget.reach_stats(greedy, mask, depths, 2, 2)
    np.testing.assert_array_equal(hit, [[1, 0]])
    np.testing.assert_array_equal(tried, [[1, 1]])
    # sampled: level 1 is reached with 0.3 + 0.5, level 2 only through node 1: 0.3 x 0.4
    hit, tried = budget.reach_stats(sampled, mask, depths, 2, 2)
    np.testing.assert_allclose(hit, [[0.8, 0.12]], rtol=1e-5)
    np.testing.assert_allclose(tried, [[1.0, 0.8]], rtol=1e-5)
    mixed = sampling.parent_draw_chance(
        jnp.tile(tokens, (2, 1)), jnp.tile(parents, (2, 1)), jnp.tile(targets, (2, 1)),
        jnp.tile(logprobs, (2, 1, 1)), jnp.asarray([0.0, 0.7]),
    )  # fmt: skip
    np.testing.assert_allclose(mixed, np.concatenate([greedy, sampled]), rtol=1e-5)


def test_history_starts_fresh_rows_at_earlier_rates():
    b = budget.make_budget(SHAPES)
    hist = budget.History(b.max_levels)
    same = hist.apply(b, sampled=False)
    np.testing.assert_array_equal(same.prior_weight, [0, 0])  # nothing learnt: PRIOR
    assert int(same.start_wait) == budget.PROBE_EVERY
    # A greedy row that hit 90% at level 1 and 50% at 2 (level 3 never tried), a sampled one
    # at 20% over level 1 only.
    hits = np.asarray([[18.0, 9.0, 0, 0], [4.0, 0, 0, 0]])
    trials = np.asarray([[20.0, 18.0, 0, 0], [20.0, 0, 0, 0]])
    hist.observe(hits, trials, [False, True])
    hist.observe(hits[1:], trials[1:], [True], probe_wait=64, plain_streak=40)
    b2 = hist.apply(b, sampled=True)
    np.testing.assert_allclose(b2.prior, [[0.9, 0.5, 0.5, 0.5], [0.2] * 4], rtol=1e-6)
    np.testing.assert_array_equal(b2.prior_weight, [budget.HISTORY_WEIGHT] * 2)
    assert (int(b2.start_wait), int(b2.start_streak)) == (64, 40)  # probes span requests
    assert int(hist.apply(b, sampled=False).start_wait) == 8
    h0, t0 = budget.init_stats(b2, 2, jnp.asarray([0.0, 1.0]), greedy=None)
    np.testing.assert_allclose(h0 / t0, [[0.9, 0.5, 0.5, 0.5], [0.2] * 4], rtol=1e-6)
    # a greedy program's temperature is a placeholder (1.0): the static flag decides
    h0, t0 = budget.init_stats(b2, 2, 1.0, greedy=True)
    np.testing.assert_allclose(h0 / t0, [[0.9, 0.5, 0.5, 0.5]] * 2, rtol=1e-6)
    # A newer row moves the estimate by its share of the evidence.
    hist.observe([[0.0, 0, 0, 0]], [[16.0, 0, 0, 0]], [False])
    assert hist.level[0, 0] == pytest.approx(0.45)


def test_history_learns_only_what_rows_tried_and_forgets_levels_left_untried(pair, small_pending):
    """Rows start from a history prior at every level but draft level 1 only (a forced
    one-level schedule): their own counts hold level 1 alone, so history keeps its deeper
    levels as real rows showed them instead of learning its own prior back (a level once low
    would confirm itself for good while the policy, trusting it, never drafted that deep).
    A level past the first that HISTORY_STALE finished rows in a row did not try is forgotten:
    fresh rows borrow the level above's estimate, so deep shapes get tried again."""
    cfg, dcfg, base, draft = pair
    hist = budget.History(4)
    hist.observe([[18.0, 9.0, 2.0, 1.0]], [[20.0, 18.0, 10.0, 5.0]], [False])
    b = budget.make_budget(SHAPES, costs=[1.0, 1.4, 1.8, 2.6], schedule=[1] * 64)
    start = hist.apply(b, sampled=False)
    res = speculative.generate(
        base, cfg, draft, dcfg, PROMPTS, tree_cfg=start, max_new_tokens=20
    )  # fmt: skip
    own = np.asarray(res.level_trials)
    assert (own[:, 0] >= 1).all() and (own[:, 1:] == 0).all()
    before = hist.level.copy()
    hist.observe(res.level_hits, res.level_trials, False)
    assert hist.level[0, 0] != before[0, 0]  # level 1 learnt
    np.testing.assert_array_equal(hist.level[0, 1:], before[0, 1:])  # the rest: as they were
    np.testing.assert_allclose(hist.apply(b, sampled=False).prior[0, 1:], [0.5, 0.2, 0.2])
    # the generation's rows count towards the age; one row short of HISTORY_STALE: remembered
    for _ in range(budget.HISTORY_STALE - len(PROMPTS) - 1):
        hist.observe([[5.0, 0, 0, 0]], [[10.0, 0, 0, 0]], [False])
    np.testing.assert_allclose(hist.apply(b, sampled=False).prior[0, 1:], [0.5, 0.2, 0.2])
    hist.observe([[5.0, 0, 0, 0]], [[10.0, 0, 0, 0]], [False])
    level1 = hist.level[0, 0]
    np.testing.assert_allclose(hist.apply(b, sampled=False).prior[0], [level1] * 4, rtol=1e-6)
    # level 1 itself is never forgotten (the probes refresh it)
    for _ in range(2 * budget.HISTORY_STALE):
        hist.observe([[0.0] * 4], [[0.0] * 4], [False])
    np.testing.assert_allclose(hist.apply(b, sampled=False).prior[0], [level1] * 4, rtol=1e-6)
    # a row that tries level 3 again brings it back
    hist.observe([[8.0, 4.0, 1.0, 0]], [[10.0, 8.0, 4.0, 0]], [False])
    assert hist.apply(b, sampled=False).prior[0, 2] < hist.level[0, 1]


def _history_reference(steps, n_levels: int, base: budget.Budget, sampled: bool):
    """`History` as whole-array arithmetic (what it computes in floats): per row an
    exponential mix of its rates at the levels it tried, ages, the calibration counts capped
    at CONF_MEMORY trials a bin, and the prior each level takes (the latest usable estimate at
    or above it; level 1 never ages out)."""
    level, age = np.full((2, n_levels), np.nan), np.zeros((2, n_levels))
    conf, wait = np.zeros((2, 2, budget.CONF_BINS)), [None, None]
    for hits, trials, flags, counts, probe in steps:
        for c in range(2):
            new = conf[c] + counts[flags == bool(c)].sum(0)
            conf[c] = new * np.minimum(1.0, budget.CONF_MEMORY / np.maximum(new[1], 1e-9))
        for row in range(len(hits)):
            c, t = int(flags[row]), trials[row]
            seen = t >= 1.0
            rate = hits[row] / np.maximum(t, 1e-9)
            alpha = t / (t + budget.HISTORY_MEMORY)
            mixed = np.where(np.isnan(level[c]), rate, (1 - alpha) * level[c] + alpha * rate)
            level[c] = np.where(seen, mixed, level[c])
            age[c] = np.where(seen, 0, age[c] + 1)
        if (flags == flags[0]).all():
            wait[int(flags[0])] = probe
    usable = ~np.isnan(level) & ((age < budget.HISTORY_STALE) | (np.arange(n_levels) == 0))
    source = np.maximum.accumulate(np.where(usable, np.arange(n_levels), -1), axis=1)
    learnt = np.take_along_axis(level, np.maximum(source, 0), axis=1)
    known = ~np.isnan(level[:, :1])
    prior = np.where(known, learnt, base.prior)
    weight = np.where(known[:, 0], budget.HISTORY_WEIGHT, base.prior_weight)
    centres = (np.arange(budget.CONF_BINS) + 0.5) / budget.CONF_BINS
    conf_prior = conf + budget.CONF_PRIOR_WEIGHT * np.stack([centres, np.ones_like(centres)])
    return prior, weight, conf_prior, wait[int(sampled)] or (budget.PROBE_EVERY, 0)


def test_history_matches_its_array_reference_over_random_requests():
    """Random batches of both classes (rows that drafted some levels, none, or all; stretches
    where most rows drafted none, so levels age out), probe waits and calibration counts: the
    floats `History` keeps give the prior, weights, calibration and start wait of the
    reference's array arithmetic."""
    rng = np.random.default_rng(7)
    base = budget.make_budget(SHAPES, costs=[1.0, 1.3, 1.8, 2.6])
    n = base.max_levels
    for _ in range(40):
        hist, steps = budget.History(n), []
        idle = rng.choice([0.1, 0.9])  # the chance a row tried no level (long untried streaks)
        for _ in range(int(rng.integers(1, 3 * budget.HISTORY_STALE))):
            rows = int(rng.integers(1, 5))
            depth = np.where(rng.random(rows) < idle, 0, rng.integers(1, n + 1, rows))
            tried = np.arange(n)[None, :] < depth[:, None]  # the levels each row drafted
            trials = rng.uniform(0, 6, (rows, n)) * tried
            hits = trials * rng.random((rows, n))
            mixed = rng.random() < 0.5  # a batch of both classes, else of one
            flags = rng.random(rows) < 0.5 if mixed else np.full(rows, rng.random() < 0.5)
            counts = rng.uniform(0, 40, (rows, 2, budget.CONF_BINS))
            counts[:, 0] *= rng.random((rows, budget.CONF_BINS))
            probe = (int(rng.integers(8, 400)), int(rng.integers(0, 100)))
            steps.append((hits, trials, flags, counts, probe))
            hist.observe(hits, trials, flags, probe_wait=probe[0], plain_streak=probe[1],
                         conf_counts=counts)  # fmt: skip
        for sampled in (False, True):
            prior, weight, conf_prior, start = _history_reference(steps, n, base, sampled)
            got = hist.apply(base, sampled=sampled)
            np.testing.assert_allclose(got.prior, prior, rtol=1e-6)
            np.testing.assert_allclose(got.prior_weight, weight)
            np.testing.assert_allclose(got.conf_prior, conf_prior, rtol=1e-6)
            assert (int(got.start_wait), int(got.start_streak)) == start
            assert got.prior.dtype == np.float32 and got.conf_prior.dtype == np.float32


def test_a_schedule_length_does_not_recompile():
    made = [budget.make_budget(SHAPES, schedule=s) for s in (None, [1] * 40, [2] * 64)]
    assert [b.schedule.shape for b in made] == [(64,)] * 3
    assert budget.make_budget(SHAPES, schedule=[1] * 65).schedule.shape == (128,)


@pytest.mark.parametrize("bad", [dict(costs=[1.0]), dict(costs=[1, 0, 1, 1]),
                                 dict(schedule=[4]), dict(schedule=[-2]), dict(probe_growth=0),
                                 dict(probe_every=0)])  # fmt: skip
def test_make_budget_refuses_bad_settings(bad):
    with pytest.raises(ValueError):
        budget.make_budget(SHAPES, **bad)


# ----------------------------------------------------------------------------- the engine


def _schedules(n: int = 40) -> list[list[int]]:
    rng = np.random.default_rng(0)
    return [
        [0] * 20 + [3] * 20,  # plain past the pending buffer's capacity, then drafting resumes
        [3, 0, 0, 1, 0, 2, 2, 0, 3] * 5,  # every kind of switch
        rng.integers(0, len(SHAPES), n).tolist(),
    ]


def test_forced_switches_stay_greedy_vanilla(pair, small_pending):
    cfg, dcfg, base, draft = pair
    want = vanilla.generate(base, cfg, PROMPTS, max_new_tokens=30).output_ids
    accepted = 0
    runs = [(schedule, "device") for schedule in _schedules()] + [(_schedules()[1], "host")]
    for schedule, loop in runs:
        b = budget.make_budget(SHAPES, schedule=schedule)
        res = speculative.generate(
            base, cfg, draft, dcfg, PROMPTS, tree_cfg=b, max_new_tokens=30, loop=loop
        )
        assert res.output_ids == want, (schedule, loop)
        for row, shapes, out in zip(res.accept_lengths, res.round_shapes, res.output_ids,
                                    strict=True):  # fmt: skip
            assert 1 + sum(a + 1 for a in row) == len(out)  # honest tau under switching
            for a, s in zip(row, shapes, strict=True):
                assert a <= budget.levels(SHAPES[s])  # a plain round accepts nothing
        # the rounds ran the forced shapes (rounds count per row: row 0 ran every round)
        assert res.round_shapes[0] == schedule[: len(res.round_shapes[0])]
        accepted += sum(a for row in res.accept_lengths for a in row)
    assert accepted > 30  # drafting rounds after plain ones accepted: the trunk caught up


def test_forced_switches_stay_seeded_vanilla(pair, small_pending):
    cfg, dcfg, base, draft = pair
    accepted = 0
    # two settings, two schedules, one compiled program set (knobs are traced)
    for (temperature, top_p, top_k), schedule in (((0.8, 0.9, 0), 1), ((1.0, 1.0, 5), 0)):
        knobs = dict(max_new_tokens=24, temperature=temperature, top_p=top_p, top_k=top_k, seed=7)
        want = vanilla.generate(base, cfg, PROMPTS, **knobs).output_ids
        b = budget.make_budget(SHAPES, schedule=_schedules()[schedule])
        res = speculative.generate(base, cfg, draft, dcfg, PROMPTS, tree_cfg=b, **knobs)
        assert res.output_ids == want, (temperature, top_p, top_k)
        accepted += sum(a for row in res.accept_lengths for a in row)
    assert accepted > 0  # draft tokens were accepted


CHAINS = budget.auto_shapes(TreeConfig(top_k=1, depth=4, total_tokens=6))


def test_chain_rounds_under_forced_switches_stay_vanilla(pair, small_pending):
    # A chain's round commits without moving cache entries (its path is its node order):
    # greedy still equals vanilla whatever the shapes around it. (Seeded sampling through a
    # chain: tests/test_speculative.py's seeded equality, whose trees include a chain; through
    # forced switches: the test above. Both together here cost another ~30 s compile.)
    cfg, dcfg, base, draft = pair
    assert [s and (s.top_k, s.depth) for s in CHAINS] == [None, (1, 0), (1, 3), (1, 4)]
    schedule = [3, 1, 0, 0, 2, 1, 1, 0, 3, 3] * 4
    accepted = 0
    for knobs in (dict(),):
        want = vanilla.generate(base, cfg, PROMPTS, max_new_tokens=30, **knobs).output_ids
        b = budget.make_budget(CHAINS, schedule=schedule)
        res = speculative.generate(
            base, cfg, draft, dcfg, PROMPTS, tree_cfg=b, max_new_tokens=30, **knobs
        )
        assert res.output_ids == want, knobs
        assert res.round_shapes[0] == schedule[: len(res.round_shapes[0])]
        accepted += sum(a for row in res.accept_lengths for a in row)
    assert accepted > 8  # multi-token rounds happened: the equality is not trivial


def _cache_copies(hlo: str, cache) -> int:
    """Copies in compiled HLO of buffers shaped like one of the base cache's K/V buffers."""
    shapes = {",".join(map(str, x.shape)) for x in jax.tree.leaves((cache.k, cache.v))}
    return sum(len(re.findall(rf"= f32\[{shape}\]\{{[^}}]*\}} copy\(", hlo)) for shape in shapes)


@pytest.mark.parametrize("shapes", [SHAPES, CHAINS], ids=["trees", "chains"])
def test_no_round_copies_the_base_cache(pair, shapes):
    # Each shape's segment (`run_segment(index=i)`, what the server's engine runs) updates the
    # cache in place: a copy of it per round would cost what the cache weighs, every round
    # (XLA put two around the depth-0 chain's commit before chains skipped that commit). The
    # unrolled layout, as the inference API holds the base (the stacked one, through `nn.scan`,
    # rewrites its cache in every forward).
    cfg, dcfg, base, draft = pair
    base = unstack_layers(base)
    b = speculative.prepare_budget(budget.make_budget(shapes), vocab_size=cfg.vocab_size)
    state, knobs, plan = prefilled(base, draft, cfg, dcfg, PROMPTS, b, max_new=24, eos_ids=[1])
    static = dict(cfg=cfg, dcfg=dcfg, greedy=True, shapes=plan)
    leaf = ",".join(map(str, jax.tree.leaves(state.cache.k)[0].shape))
    assert _cache_copies(f"%c = f32[{leaf}]{{3,2,1,0}} copy(%p)", state.cache) == 1
    for index in range(len(shapes)):
        hlo = speculative.run_segment.lower(
            state, base, draft, knobs, b, None, jnp.int32(8), index=index, **static
        ).compile().as_text()  # fmt: skip
        assert _cache_copies(hlo, state.cache) == 0, shapes[index]


def test_policy_backs_off_with_a_useless_draft_and_drafts_with_a_good_one(small_pending):
    # (the small pending buffer: the forced-switch tests' greedy program, compiled once)
    cfg = base_config("llama")
    dcfg = draft_config(cfg)
    costs = [1.0, 1.3, 1.5, 1.8]  # a deep tree pays for a draft that is always right
    runs = {}
    for name, make in (("aligned", aligned_pair), ("random", random_pair)):
        base, draft = make(cfg, dcfg)
        b = budget.make_budget(SHAPES, costs=costs)
        res = speculative.generate(base, cfg, draft, dcfg, PROMPTS, tree_cfg=b, max_new_tokens=40)
        assert res.output_ids == vanilla.generate(base, cfg, PROMPTS, max_new_tokens=40).output_ids
        runs[name] = [s for row in res.round_shapes for s in row]
    plain = {k: np.mean(np.asarray(v) == 0) for k, v in runs.items()}
    # after the first rounds: plain steps, broken by ever rarer 3-round probes
    assert plain["random"] > 0.6
    assert plain["aligned"] < 0.1
    # trees of 3-4 levels nearly always (the batch ends with its slowest row: a row whose
    # draft once missed at level 3 weighs the two alike)
    assert np.mean(np.asarray(runs["aligned"]) >= 2) > 0.8


def test_adaptive_generation_compiles_one_program_for_every_shape(pair, small_pending):
    cfg, dcfg, base, draft = pair
    b = budget.make_budget(SHAPES, schedule=[0, 1, 2, 3, 0, 3])
    run = dict(tree_cfg=b, max_new_tokens=20)
    jax.clear_caches()
    res = speculative.generate(base, cfg, draft, dcfg, PROMPTS, **run)
    assert res.round_shapes[0][:6] == [0, 1, 2, 3, 0, 3]  # every shape ran
    sizes = (speculative.prefill._cache_size(), speculative.run_segment._cache_size())
    assert sizes == (1, 1)  # the rounds of every shape: one program
    b2 = budget.make_budget(SHAPES, costs=[1, 2, 3, 4], schedule=[3, 2, 1, 0, 0, 1])
    hist = budget.History(b2.max_levels)  # a prior from history is traced too
    hist.observe(res.level_hits, res.level_trials, False, probe_wait=res.probe_wait)
    b2 = hist.apply(b2, sampled=False)
    assert float(b2.prior_weight[0]) > 0
    other = [[3, 4, 5], [6], list(range(40, 58)), [9]]  # the same length bucket
    speculative.generate(base, cfg, draft, dcfg, other, tree_cfg=b2, max_new_tokens=20, seed=2)
    assert (speculative.prefill._cache_size(), speculative.run_segment._cache_size()) == sizes


def test_round_costs_time_every_shape_from_the_prompts_length(pair, monkeypatch):
    # Rounds commit tokens (an aligned draft's several a round), so shapes timed one after
    # another on one state ran at ever longer caches, the last past a key window's edge and
    # priced high: each shape's rounds start from a prefill of their own.
    cfg, dcfg, base, draft = pair
    calls = []
    real = speculative.run_segment

    def spy(state, *args, **kwargs):
        shape, step, before = int(state.next_shape), int(state.step), np.asarray(state.cache.length)
        out = real(state, *args, **kwargs)  # donates `state`
        calls.append((shape, step, before, np.asarray(out.cache.length) - before, int(args[5])))
        return out

    monkeypatch.setattr(speculative, "run_segment", spy)
    speculative.measure_round_costs(
        base, cfg, draft, dcfg, budget.make_budget(CHAINS), batch=2, greedy=True, prompt_len=16,
        max_new=64, repeats=1, segment=4, short=1,
    )  # fmt: skip
    fresh = [(shape, length) for shape, step, length, _, _ in calls if step == 0]
    # two calls a shape and a pass (of 1 and of 4 rounds), each from a prefill of its own
    per_shape = collections.Counter(shape for shape, _ in fresh)
    assert sorted(per_shape) == list(range(len(CHAINS)))
    assert all(n >= 4 and n % 2 == 0 for n in per_shape.values())  # the warm-up pass and one
    assert all((length == 16).all() for _, length in fresh)
    # the deepest chain's segments commit more than a token a round: timed after the others
    # on one state, it would have started later still
    deep = [grew for shape, step, _, grew, limit in calls
            if step == 1 and shape == len(CHAINS) - 1 and limit == 4]  # fmt: skip
    assert deep and all((grew > 4).any() for grew in deep)


def test_round_costs_leave_out_what_a_call_costs_beyond_its_rounds(pair, monkeypatch):
    # A generation pays its call's dispatch and host read once, whatever the policy picks: a
    # round's price leaves the call's own cost out (one figure for every shape, from the two
    # call lengths' intercepts). Spread over the call's rounds instead, it priced cheap shapes
    # high against dear ones (plain decoding at 1/1.26 of a (1,0,2) round where generation
    # paid 1/1.37).
    cfg, dcfg, base, draft = pair
    b = budget.make_budget([None, TREE])
    kw = dict(batch=1, greedy=True, prompt_len=16, max_new=32, repeats=3, segment=6, short=2)
    real = speculative.run_segment
    delay = 0.06  # s a call: 10 ms a round if spread over the longer call's 6

    def slow_call(*args, **kwargs):
        time.sleep(delay)
        return real(*args, **kwargs)

    for _ in range(3):  # differences of timings: a loaded machine (CI) may need another try
        plain = speculative.measure_round_costs(base, cfg, draft, dcfg, b, **kw)
        with monkeypatch.context() as patch:
            patch.setattr(speculative, "run_segment", slow_call)
            slow = speculative.measure_round_costs(base, cfg, draft, dcfg, b, **kw)
        added = [(s - p) * 1e-3 for s, p in zip(slow[:2], plain[:2], strict=True)]
        if all(abs(a) < 0.25 * delay / kw["segment"] for a in added):
            break
    assert all(abs(a) < 0.25 * delay / kw["segment"] for a in added), (plain, slow)
    # ... and is the last figure's, what a call costs beyond its rounds (`Budget.probe_call`)
    assert slow[-1] - plain[-1] > 0.5 * delay * 1e3, (plain, slow)
    with pytest.raises(ValueError, match="short"):
        speculative.measure_round_costs(base, cfg, draft, dcfg, b, **{**kw, "short": 6})


def test_round_costs_are_measured_per_shape_and_cached(pair, tmp_path, monkeypatch):
    cfg, dcfg, base, draft = pair
    b = budget.make_budget([None, TREE])
    # The last figure: ms per slot of the catch-up the first tree round after the 17 plain ones
    # ran (the 128-slot program: about a round of this tiny pair, more than a tenth of one). It
    # is a difference of two one-call timings, which a loaded machine (CI runs tests in
    # parallel) can drive to 0 now and then (three single measurements in a row once did): the
    # median of three passes' catch-ups, up to five times.
    for _ in range(5):
        costs = speculative.measure_round_costs(
            base, cfg, draft, dcfg, b, batch=2, greedy=True, prompt_len=16, max_new=32,
            repeats=3, max_repeats=3, segment=16,
        )  # fmt: skip
        assert len(costs) == 4 and all(c > 0 for c in costs[:2]) and costs[3] >= 0
        if costs[1] / 1280 < costs[2] < costs[1]:
            break
    assert costs[1] / 1280 < costs[2] < costs[1]
    path = tmp_path / "costs.json"
    calls = []

    def measure():
        calls.append(1)
        return costs

    key = budget.cost_key("m", SHAPES, 2)
    assert budget.load_or_measure_costs(key, measure, path=path) == (costs, True)
    assert budget.load_or_measure_costs(key, measure, path=path) == (costs, False)
    assert len(calls) == 1
    assert budget.cost_key("m", SHAPES, 4) != key and budget.cost_key("n", SHAPES, 2) != key
    # nor costs of other kernels on this CPU (their choice of products, attention, threads)
    for name, value in [("GRIFFIN_CPU_MATMUL", "xla"), ("GRIFFIN_ATTENTION", "einsum"),
                        ("GRIFFIN_CPU_THREADS", "xla")]:  # fmt: skip
        with monkeypatch.context() as env:
            env.setenv(name, value)
            assert budget.cost_key("m", SHAPES, 2) != key, name
    assert budget.cost_key("m", SHAPES, 2) == key
    # costs measured by other code (another version of the rounds, of JAX) are not reused
    assert budget.code_digest() == budget.code_digest() and len(budget.code_digest()) == 16
    monkeypatch.setattr(budget, "code_digest", lambda: "another version")
    assert budget.cost_key("m", SHAPES, 2) != key
    path.write_text("{not json")  # a damaged cache is measured again and rewritten
    assert budget.load_or_measure_costs(key, measure, path=path) == (costs, True)
    assert json.loads(path.read_text())[key] == costs
    for bad in ([1.0, 0.0, 0.1, 0.0], [1.0, 2.0, -0.1, 0.0], [1.0, 2.0, 0.1, -1.0],
                [1.0, 2.0, float("nan"), 0.0], [1.0, 2.0], "x", []):  # fmt: skip
        path.write_text(json.dumps({key: bad}))
        assert budget.load_or_measure_costs(key, measure, path=path) == (costs, True), bad


def test_round_costs_weigh_shapes_within_a_pass_and_take_more_passes_while_unsure(
    pair, monkeypatch
):
    # A pass in which the whole machine ran slow scales every shape of it alike: the ratios
    # to the pass's first shape are kept, so a slow pass for one shape and a fast one for
    # another cannot skew their ratio as plain per-shape medians could.
    passes = [[1.0, 2.0, 0.1], [2.0, 4.0, 0.3], [1.1, 2.2, 0.2], [3.0, 6.0, 0.2]]
    got = speculative.pass_medians(passes)
    assert got[1] / got[0] == pytest.approx(2.0) and got[0] == pytest.approx(1.55)
    assert got[2] == pytest.approx(0.2)  # the catch-up: its own median
    skewed = [[1.0, 2.0, 0.1], [2.0, 2.6, 0.1], [1.0, 4.0, 0.1]]  # per-shape medians: 2.6x
    assert speculative.pass_medians(skewed)[1] / speculative.pass_medians(skewed)[0] == 2.0
    assert speculative.cost_spread(passes[:2]) == float("inf")  # unknown under 3 passes
    assert speculative.cost_spread(passes) == 0.0  # equal ratios in every pass
    noisy = [[1.0, r, 0.1] for r in (2.0, 2.4, 1.6, 2.2, 1.8)]
    assert speculative.cost_spread(noisy) > 0.05
    # measure_round_costs: `repeats` passes while the ratios agree, more (up to
    # `max_repeats`) while they do not; fewer than 3 repeats never add passes.
    cfg, dcfg, base, draft = pair
    for ratios, repeats, want in [
        ([2.0] * 12, 3, 3),
        ([2.0, 3.0, 2.5] * 4, 3, 7),
        ([2.0, 3.0], 1, 1),
    ]:
        timings = iter(ratios)

        def one_pass(fn, timings=timings, **kw):  # the pass's figures, not a real timing
            # 1- and 2-round calls of costs 1 and r a round, 0.5 ms a call, the catch-up
            r = next(timings)
            return type("Timed", (), {"result": [1.5, 0.5 + r, 2.5, 0.5 + 2 * r, 0.1]})()

        monkeypatch.setattr(speculative.steal, "timed", one_pass)
        got = speculative.measure_round_costs(
            base, cfg, draft, dcfg, budget.make_budget([None, TREE]), batch=1, greedy=True,
            prompt_len=8, max_new=16, repeats=repeats, max_repeats=7, segment=2,
            short=1,
        )  # fmt: skip
        assert len(ratios) - len(list(timings)) == want
        assert got[0] == pytest.approx(1.0) and got[-2:] == pytest.approx([0.1, 0.5])


def test_a_pending_prompt_trunk_catches_up_to_what_the_eager_prefill_writes():
    """`Shapes.prompt_pending`: prefill runs no draft, plain rounds queue behind the prompt,
    and the first catch-up leaves the trunk and level-1 inputs an eager prefill leaves
    followed by the same plain rounds."""
    cfg, dcfg = base_config("llama"), draft_config(base_config("llama"))
    base, draft = random_pair(cfg, dcfg)
    forced = budget.make_budget(SHAPES, schedule=[0] * 5)  # five plain rounds
    lengths = np.asarray([len(p) for p in PROMPTS])
    run = functools.partial(
        speculative.run_segment, base_params=base, draft_params=draft, budget=forced,
        limit=5, index=0, cfg=cfg, dcfg=dcfg, greedy=True,
    )  # fmt: skip
    states = {}
    for lazy in (False, True):
        state, knobs, shapes = prefilled(
            base, draft, cfg, dcfg, PROMPTS, forced, max_new=40, eos_ids=[-1],
            prompt_pending=lazy,
        )  # fmt: skip
        if lazy:
            assert shapes.pending == speculative.PENDING + shapes.prompt_bucket
            np.testing.assert_array_equal(state.trunk_len, 0)
            np.testing.assert_array_equal(state.pending_len, lengths)
        state = run(state, knobs=knobs, shapes=shapes)
        np.testing.assert_array_equal(state.pending_len, lengths * lazy + 5)
        states[lazy] = speculative._catch_up(
            state, base, draft, None, cfg=cfg, dcfg=dcfg, shapes=shapes
        )
    eager, lazy = states[False], states[True]
    np.testing.assert_array_equal(lazy.trunk_len, lengths + 5)
    np.testing.assert_array_equal(eager.trunk_len, lazy.trunk_len)
    np.testing.assert_array_equal(eager.out_tokens, lazy.out_tokens)
    assert_same_trunk(lazy, eager, lengths + 5, tol=1e-5)


def assert_same_trunk(got, want, counts, *, tol: float):
    """The draft trunk of two states agrees over each row's first `counts` entries, and so do
    their level-1 inputs (the log-probs within 10 tol)."""
    for row, n in enumerate(counts):
        for name in ("k", "v"):
            np.testing.assert_allclose(
                getattr(got.draft_cache, name)[row, :n], getattr(want.draft_cache, name)[row, :n],
                rtol=tol, atol=tol,
            )  # fmt: skip
    np.testing.assert_allclose(got.root_logprobs, want.root_logprobs, rtol=10 * tol, atol=10 * tol)
    np.testing.assert_allclose(got.root_feature, want.root_feature, rtol=tol, atol=tol)


@pytest.mark.parametrize("opening", ["plain", "drafting", "probe"])
def test_a_pending_prompt_prefill_runs_the_trunk_when_the_first_round_drafts(opening):
    """With `Shapes.prompt_pending` the prefill leaves the prompt's trunk to the first catch-up
    only when its first round decodes plainly or starts a probe (whose catch-up forwards only
    the prompt's latest positions); a drafting first round gets the trunk, the level-1 inputs
    and an empty pending buffer as an eager prefill leaves them."""
    cfg, dcfg = base_config("llama"), draft_config(base_config("llama"))
    base, draft = random_pair(cfg, dcfg)
    if opening == "probe":  # plain decoding is best, but a probe is due
        forced = budget.make_budget(SHAPES, [1.0, 50.0, 60.0, 70.0])
        forced = forced.replace(start_streak=forced.start_wait)
    else:
        forced = budget.make_budget(SHAPES, schedule=[0 if opening == "plain" else 2] * 5)
    first = {"plain": 0, "drafting": 2, "probe": 1}[opening]
    lengths = np.asarray([len(p) for p in PROMPTS])
    states = {
        lazy: prefilled(
            base, draft, cfg, dcfg, PROMPTS, forced, max_new=40, eos_ids=[-1],
            prompt_pending=lazy,
        )[0]
        for lazy in (False, True)
    }  # fmt: skip
    eager, lazy = states[False], states[True]
    assert int(lazy.next_shape) == int(eager.next_shape) == first
    if opening != "drafting":
        np.testing.assert_array_equal(lazy.trunk_len, 0)
        np.testing.assert_array_equal(lazy.pending_len, lengths)
        return
    np.testing.assert_array_equal(lazy.pending_len, 0)
    np.testing.assert_array_equal(lazy.trunk_len, eager.trunk_len)
    np.testing.assert_array_equal(lazy.trunk_len, lengths)
    assert_same_trunk(lazy, eager, lengths, tol=1e-6)


def test_catch_up_slots_are_the_fewest_sizes_that_hold_the_longest_row():
    """What a probe's catch-up is priced by (`budget.probe_cap`): the program `_catch_up` runs."""
    assert speculative.catch_up_sizes(512) == [16, 128, 256, 512]
    for most, want in ((0, 0), (1, 16), (16, 16), (17, 128), (128, 128), (200, 256), (511, 512)):
        assert int(speculative.catch_up_slots(most, 512)) == want, most
    assert int(speculative.catch_up_slots(jnp.int32(40), 128)) == 128


@pytest.mark.parametrize("probing", [False, True], ids=["resume", "probe"])
@pytest.mark.parametrize("pending", [[0, 5, 16, 30], [0, 5, 16, 3]])
def test_catch_up_forwards_exactly_the_pending_positions(monkeypatch, pending, probing):
    # [.., 30]: more than CATCH_UP_SHORT pending, the whole buffer is forwarded (a probe: only
    # that row's latest CATCH_UP_SHORT, the 14 before are skipped); [.., 3]: only the buffer's
    # first CATCH_UP_SHORT slots. Either way each row's trunk entries and level-1 inputs are
    # those of a forward over exactly its own forwarded positions, at their true RoPE
    # positions (after what earlier probes skipped).
    monkeypatch.setattr(speculative, "PENDING", 32)
    cfg, dcfg = base_config("llama"), draft_config(base_config("llama"))
    base, draft = random_pair(cfg, dcfg)
    b = budget.make_budget(SHAPES)
    state, _, shapes = prefilled(base, draft, cfg, dcfg, PROMPTS, b, max_new=40, eos_ids=[-1])
    assert shapes.pending == 32 > speculative.CATCH_UP_SHORT
    rng = np.random.default_rng(0)
    feats = jnp.asarray(rng.normal(size=state.pending_features.shape), jnp.float32)
    toks = jnp.asarray(rng.integers(0, cfg.vocab_size, state.pending_tokens.shape), jnp.int32)
    n = jnp.asarray(pending, jnp.int32)
    earlier = jnp.asarray([0, 3, 0, 2], jnp.int32)  # skipped by an earlier probe
    before = state.replace(  # n pending: committed past the trunk and what it left out
        pending_features=feats, pending_tokens=toks, trunk_skipped=earlier,
        cache=state.cache.replace(length=state.trunk_len + earlier + n),
    )  # fmt: skip
    np.testing.assert_array_equal(before.pending_len, n)
    after = speculative._catch_up(
        before, base, draft, None, cfg=cfg, dcfg=dcfg, shapes=shapes, probing=jnp.bool_(probing)
    )  # fmt: skip
    skip = np.maximum(np.asarray(pending) - speculative.CATCH_UP_SHORT, 0) * probing
    assert skip.any() == (probing and max(pending) > speculative.CATCH_UP_SHORT)
    np.testing.assert_array_equal(after.trunk_len, before.trunk_len + n - skip)
    np.testing.assert_array_equal(after.trunk_skipped, earlier + skip)
    assert not np.any(after.pending_len)
    step = speculative._draft_step(base, draft, None, cfg=cfg, dcfg=dcfg)
    for row, count in enumerate(pending):
        trunk = int(before.trunk_len[row])
        if count == 0:  # nothing pending: its level-1 inputs stay
            np.testing.assert_array_equal(after.root_logprobs[row], before.root_logprobs[row])
            continue
        first, count = int(skip[row]), count - int(skip[row])
        one = jax.tree.map(lambda x, r=row: x[r : r + 1], before.draft_cache)
        start = jnp.asarray([trunk], jnp.int32)
        position = trunk + int(earlier[row]) + first
        logits, next_feature, dcache = step(
            feats[row : row + 1, first : first + count], toks[row : row + 1, first : first + count],
            position + jnp.arange(count)[None], one, start,
            speculative.causal_mask(start, count, shapes.draft_capacity),
        )  # fmt: skip
        np.testing.assert_allclose(
            after.draft_cache.k[row, trunk : trunk + count], dcache.k[0, trunk : trunk + count],
            rtol=1e-5, atol=1e-5,
        )  # fmt: skip
        np.testing.assert_allclose(
            after.root_logprobs[row], jax.nn.log_softmax(logits[0, -1]), rtol=1e-4, atol=1e-4
        )
        np.testing.assert_allclose(
            after.root_feature[row], next_feature[0, -1], rtol=1e-5, atol=1e-5
        )


def test_a_probe_leaves_older_positions_out_of_the_trunk_at_their_true_positions(pair):
    """A probe starts with a catch-up over only each row's latest CATCH_UP_SHORT pending
    positions (here the prompt and 20 plain rounds): their trunk entries, and those its round
    appends, are what a full catch-up writes for the same positions (same RoPE positions),
    at slots lower by what was skipped; the tokens are the same (two drafting rounds: the
    second drafts from the first's trunk entries)."""
    cfg, dcfg, base, draft = pair
    plain = 20
    schedule = [0] * plain + [3] * 4
    lengths = np.asarray([len(p) for p in PROMPTS])
    states = {}
    for probing in (False, True):
        b = budget.make_budget(SHAPES, schedule=schedule, probe_every=1)
        b = b if probing else b.replace(start_wait=jnp.int32(2**30))  # a probe is due, or never
        state, knobs, shapes = prefilled(
            base, draft, cfg, dcfg, PROMPTS, b, max_new=40, eos_ids=[-1], prompt_pending=True
        )  # fmt: skip
        states[probing] = speculative.run_segment(
            state, base, draft, knobs, b, None, plain + 2, index=None, cfg=cfg, dcfg=dcfg,
            greedy=True, shapes=shapes,
        )  # fmt: skip
    full, probe = states[False], states[True]
    skip = np.maximum(lengths + plain - speculative.CATCH_UP_SHORT, 0)
    assert skip.min() > 0
    np.testing.assert_array_equal(full.trunk_skipped, 0)
    np.testing.assert_array_equal(probe.trunk_skipped, skip)
    np.testing.assert_array_equal(probe.out_tokens, full.out_tokens)
    np.testing.assert_array_equal(probe.accept_log, full.accept_log)
    accepted = np.asarray(full.accept_log[:, plain : plain + 2]).sum(1)
    assert accepted.max() > 0  # the drafting rounds appended accepted draft tokens too
    committed = accepted + 2
    np.testing.assert_array_equal(full.trunk_len, lengths + plain + committed)
    np.testing.assert_array_equal(probe.trunk_len + skip, full.trunk_len)
    for row, s in enumerate(skip):
        n = int(probe.trunk_len[row])
        for name in ("k", "v"):
            np.testing.assert_allclose(
                getattr(probe.draft_cache, name)[row, :n],
                getattr(full.draft_cache, name)[row, s : s + n], rtol=1e-5, atol=1e-5,
            )  # fmt: skip


def test_a_full_buffer_in_a_plain_streak_keeps_only_its_latest_positions(monkeypatch, pair):
    """A plain streak that fills the pending buffer forwards only its latest CATCH_UP_SHORT
    positions into the trunk (what a probe would forward), not the whole buffer; the output
    stays greedy vanilla."""
    monkeypatch.setattr(speculative, "PENDING", 32)
    cfg, dcfg, base, draft = pair
    rounds = 40
    b = budget.make_budget(SHAPES, schedule=[0] * rounds)
    state, knobs, shapes = prefilled(base, draft, cfg, dcfg, PROMPTS, b, max_new=60, eos_ids=[-1])
    lengths = np.asarray([len(p) for p in PROMPTS])
    np.testing.assert_array_equal(state.trunk_len, lengths)  # an eager prefill's trunk
    state = speculative.run_segment(
        state, base, draft, knobs, b, None, rounds, index=None, cfg=cfg, dcfg=dcfg,
        greedy=True, shapes=shapes,
    )  # fmt: skip
    short = speculative.CATCH_UP_SHORT
    # round 33 found the 32 slots full: 16 skipped, 16 forwarded, 8 pending since
    np.testing.assert_array_equal(state.trunk_skipped, 32 - short)
    np.testing.assert_array_equal(state.trunk_len, lengths + short)
    np.testing.assert_array_equal(state.pending_len, rounds - 32)
    np.testing.assert_array_equal(
        state.trunk_len + state.trunk_skipped + state.pending_len, state.cache.length
    )
    want = vanilla.generate(base, cfg, PROMPTS, max_new_tokens=rounds + 1).output_ids
    assert np.asarray(state.out_tokens)[:, : rounds + 1].tolist() == want


def _copied_shapes(hlo: str) -> list[tuple[int, ...]]:
    """The shapes of every `copy` instruction of a compiled program's text."""
    found = re.findall(r"= \w+\[([\d,]*)\]\{[^}]*\} copy\(", hlo)
    return [tuple(int(x) for x in dims.split(",") if x) for dims in found]


def test_rounds_update_the_caches_in_place(pair):
    """The all-shapes program and one shape's (the server's) copy none of the state's caches
    or its pending buffer: segments in turn rather than branches of a switch, and the catch-up
    as a loop of at most one trip rather than a conditional (each conditional copied every
    buffer it passed through, on every entry into a segment)."""
    cfg, dcfg, base, draft = pair
    base = unstack_layers(base)  # the one-device layout (a scan over stacked layers copies)
    b = budget.make_budget(SHAPES)
    state, knobs, shapes = prefilled(
        base, draft, cfg, dcfg, PROMPTS, b, max_new=40, eos_ids=[-1], prompt_pending=True
    )
    held = {
        tuple(x.shape)
        for x in jax.tree.leaves((state.cache, state.draft_cache, state.pending_features))
        if x.size >= 1024
    }
    assert len(held) >= 3  # base cache, draft cache, pending buffer (the sizes differ)
    for index in (None, 0, len(SHAPES) - 1):
        hlo = speculative.run_segment.lower(
            state, base, draft, knobs, b, None, 8, index=index, cfg=cfg, dcfg=dcfg,
            greedy=True, shapes=shapes,
        ).compile().as_text()  # fmt: skip
        assert "copy(" in hlo  # the pattern finds copies where there are some
        assert not [s for s in _copied_shapes(hlo) if s in held], index


def _choose_reference(b, hits, trials, active, streak, wait, step, current, *, remaining=None,
                      slots=0, first_level=None, first_known=None):  # fmt: skip
    """`budget.choose` as whole-array arithmetic over [B, S] (cumulative products and sums,
    argmax, gathers): what the unrolled per-shape version must pick."""
    p = np.asarray(budget.level_acceptance(hits, trials))
    reach = np.cumprod(p, axis=1)
    odd = 2.0 * np.arange(1, p.shape[1] + 1, dtype=np.float32) - 1.0
    zero = np.zeros_like(reach[:, :1])
    first = np.concatenate([zero, np.cumsum(reach, axis=1)], 1)
    second = np.concatenate([zero, np.cumsum(odd * reach, axis=1)], 1)
    idx = np.asarray([budget.levels(s) for s in b.shapes])
    mean = 1.0 + first[:, idx]
    var = np.maximum(second[:, idx] - first[:, idx] ** 2, 0.0)
    plain = np.asarray([s is None for s in b.shapes])
    cost = np.asarray(b.costs, np.float32)
    active = np.asarray(active)
    spread = slots != 0
    rounds = None
    if remaining is not None and (b.finish or spread):
        rounds = np.asarray(budget.finish_rounds(mean, var, remaining, active))
    if rounds is not None and spread:
        cost = cost + np.where(plain, 0.0, float(b.catch_up) * slots) / np.maximum(rounds, 1.0)
    if b.finish:
        gain = np.where(rounds > 0, 1.0 / np.maximum(rounds, 1e-9), 1.0)
    else:
        gain = np.sum(np.where(active[:, None], mean, 0), 0)
    score = gain / cost * np.where(plain, 1 + budget.PLAIN_MARGIN, 1.0)
    best = int(np.argmax(score))
    draft_score = score
    if first_level is not None and not b.finish:
        known = np.ones(len(first_level), bool) if first_known is None else first_known
        ratio = np.where(known, first_level / np.maximum(p[:, 0], 1e-6), 1.0)
        mean_now = 1.0 + (mean - 1.0) * ratio[:, None]
        draft_score = np.sum(np.where(active[:, None], mean_now, 0), 0) / cost
        drafting = int(np.argmax(np.where(plain, -np.inf, draft_score)))
        best = best if plain[best] else drafting
    keep = not plain[best] and not plain[current] and score[current] >= np.max(score * plain)
    if keep and draft_score[best] <= (1 + budget.HYSTERESIS) * draft_score[current]:
        best = current
    if (not plain[best] or streak < wait or not (~plain).any()) and streak >= 0:
        pick = best
    else:  # a probe: the drafting shape of the lowest cost
        pick = int(np.argmin(np.where(plain, np.inf, np.asarray(b.costs))))
    forced = int(b.schedule[min(step, len(b.schedule) - 1)]) if step < len(b.schedule) else -1
    return forced if forced >= 0 else pick


@pytest.mark.parametrize("finish", [False, True])
def test_choose_matches_its_array_reference_over_random_states(finish):
    rng = np.random.default_rng(7 + finish)
    choose = jax.jit(budget.choose, static_argnames=("catch_up_slots",))
    for trial in range(150):
        b_rows = int(rng.integers(1, 5))
        shapes = SHAPES if trial % 3 else SHAPES[1:]  # with and without plain decoding
        n_levels = max(budget.levels(s) for s in shapes)
        b = budget.make_budget(
            shapes, costs=rng.uniform(0.5, 3.0, len(shapes)).tolist(),
            schedule=[int(rng.integers(-1, len(shapes)))] * int(rng.integers(1, 4)),
            catch_up=float(rng.uniform(0.0, 0.05)),
        ).replace(finish=finish)  # fmt: skip
        trials = rng.uniform(0.0, 8.0, (b_rows, n_levels)).astype(np.float32)
        hits = (trials * rng.uniform(0.0, 1.0, trials.shape)).astype(np.float32)
        active = rng.uniform(size=b_rows) < 0.8
        active[0] = True
        streak, wait = int(rng.integers(-2, 12)), int(rng.integers(1, 10))
        step, current = int(rng.integers(0, 6)), int(rng.integers(0, len(shapes)))
        remaining = rng.integers(1, 90, b_rows).astype(np.int32)
        slots = int(rng.choice([0, 16]))
        first = rng.uniform(0.0, 1.0, b_rows).astype(np.float32) ** 2
        known = rng.uniform(size=b_rows) < 0.7
        got = choose(
            b, hits, trials, active, jnp.int32(streak), jnp.int32(wait), jnp.int32(step),
            jnp.int32(current), remaining=remaining, catch_up_slots=slots, first_level=first,
            first_known=known,
        )  # fmt: skip
        want = _choose_reference(
            b, hits, trials, active, streak, wait, step, current, remaining=remaining,
            slots=slots, first_level=first, first_known=known,
        )  # fmt: skip
        assert int(got) == want, (trial, shapes, streak, wait, step, current)


def test_conf_acceptance_picks_each_rows_bin_at_every_confidence():
    b = budget.make_budget(SHAPES)
    rng = np.random.default_rng(3)
    counts = rng.uniform(0.0, 9.0, (4, 2, budget.CONF_BINS)).astype(np.float32)
    sampled = np.array([False, True, False, True])
    prior = np.asarray(b.conf_prior)
    for conf in np.linspace(0.0, 1.0, 23):
        confs = np.full(4, conf, np.float32)
        j = min(int(np.floor(conf * budget.CONF_BINS)), budget.CONF_BINS - 1)
        want = [
            (counts[r, 0, j] + prior[int(sampled[r]), 0, j])
            / (counts[r, 1, j] + prior[int(sampled[r]), 1, j])
            for r in range(4)
        ]
        got = budget.conf_acceptance(b, confs, counts, sampled)
        np.testing.assert_allclose(got, want, rtol=1e-6)


def test_the_adaptive_program_holds_one_catch_up_for_every_shape(pair, monkeypatch):
    # Each segment starts with the catch-up its shape needs, one piece of the program for all
    # shapes (`speculative._segment_start`): a catch-up per shape's segment made the program
    # larger, and the host's launch of a program grows with its size. Counted as traced.
    cfg, dcfg, base, draft = pair
    b = speculative.prepare_budget(budget.make_budget(SHAPES), vocab_size=cfg.vocab_size)
    state, knobs, plan = prefilled(base, draft, cfg, dcfg, PROMPTS, b, max_new=24, eos_ids=[1])
    traced = []
    catch_up = speculative._catch_up
    monkeypatch.setattr(
        speculative, "_catch_up", lambda *a, **k: traced.append(1) or catch_up(*a, **k)
    )
    for index in (None, 0, 3):
        traced.clear()
        segment = functools.partial(
            speculative.run_segment.__wrapped__, index=index, cfg=cfg, dcfg=dcfg, greedy=True,
            shapes=plan,
        )  # fmt: skip
        # a program of its own, so that it is traced here whatever an earlier test compiled
        jax.jit(lambda *args, run=segment: run(*args)).lower(
            state, base, draft, knobs, b, None, jnp.int32(8)
        )
        assert len(traced) == 1, index
