"""Continuous batching (`griffin_jax/engine.py`): admission into free rows without touching the
others, outputs equal to each request decoded alone, bounded compiles, freeing, bad requests."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from griffin_jax import budget as budget_lib
from griffin_jax import engine as engine_lib
from griffin_jax import layers, vanilla
from griffin_jax.config import TreeConfig

TREE = TreeConfig(top_k=2, depth=3, total_tokens=8)
PROMPTS = [[5, 6, 7, 8, 9], [10, 11, 12], list(range(20, 34)), [40], [3, 4], [7] * 12]


def _engine(pair, **kw):
    """An engine on the tiny pair. 200 positions by default, as the warm-up test needs: engines
    of one size share their compiled programs (a size per test compiled ~20% more here)."""
    cfg, dcfg, base, draft = pair
    kw = dict(dict(tree=TREE, max_batch=4, max_model_len=200), **kw)
    return engine_lib.Engine(base, cfg, draft, dcfg, **kw)


class _Collect:
    def __init__(self):
        self.tokens: list[int] = []
        self.final: engine_lib.Update | None = None

    def __call__(self, update: engine_lib.Update):
        assert self.final is None, "an update after the last one"
        self.tokens += update.tokens
        if update.finish_reason is not None:
            self.final = update


def _alone(pair, request: engine_lib.Request) -> list[int]:
    """The request decoded alone by plain decoding: to 32 tokens, cut to its max_new_tokens
    (the same prefix whatever the limit; one compiled program for every limit)."""
    cfg, _, base, _ = pair
    assert request.max_new_tokens <= 32
    out = vanilla.generate(
        base, cfg, [list(request.prompt)], max_new_tokens=32,
        temperature=request.temperature, top_p=request.top_p, top_k=request.top_k,
        seed=request.seed,
    ).output_ids[0]  # fmt: skip
    return out[: request.max_new_tokens]


def _requests(seed_base: int = 0) -> list[engine_lib.Request]:
    return [
        engine_lib.Request(
            tuple(p),
            max_new_tokens=10 + 3 * i,
            temperature=(0.0, 0.8, 1.0)[i % 3],
            top_p=0.9 if i % 3 == 1 else 1.0,
            top_k=5 if i % 3 == 2 else 0,
            seed=seed_base + i,
        )  # fmt: skip
        for i, p in enumerate(PROMPTS)
    ]


def test_staggered_mixed_requests_equal_each_request_alone(pair):
    eng = _engine(pair)
    requests = _requests()
    got = [_Collect() for _ in requests]
    for request, sink in zip(requests, got, strict=True):  # one arrival per round
        eng.submit(request, sink)
        eng.step()
    eng.run_until_idle()
    assert eng.idle() and eng.busy == 0
    accepted = 0
    for request, sink in zip(requests, got, strict=True):
        assert sink.tokens == _alone(pair, request), request
        cfg = pair[0]
        stopped = sink.tokens[-1] in cfg.eos_token_ids
        assert sink.final.finish_reason == ("stop" if stopped else "length")
        assert 1 + sink.final.rounds + sink.final.accepted == len(sink.tokens)
        accepted += sink.final.accepted
    assert accepted > 10  # multi-token commits happened


@pytest.mark.parametrize("kind", ["griffin", "eagle3"])
def test_chunks_build_the_state_one_forward_builds(kind):
    """`prefill_chunk=16`: a 40-token prompt in chunks of 16, 16 and its last 8 gives the
    caches, trunk and first token one prefill gives (the draft trunk too, which outputs alone
    would not show: the base verifies every token). A random pair: the aligned base's
    attention adds nothing (its o_proj is zero), so it would not show a chunk reading the
    wrong slots. EAGLE-3: its trunk reads three base layers' inputs."""
    from spec_models import base_config, draft_config, random_pair

    cfg = base_config("llama", n_layers=8 if kind == "eagle3" else 2)
    dcfg = draft_config(cfg, kind)
    long_a = engine_lib.Request(tuple(range(50, 90)), max_new_tokens=20)  # 16 + 16 + 8
    states = []
    for chunk in (16, 0):
        eng = _engine((cfg, dcfg, *random_pair(cfg, dcfg)), prefill_chunk=chunk)
        slot = engine_lib._Slot(0, eng.check(long_a), print)
        if chunk:
            eng._chunked = engine_lib._Chunked(slot)
            while eng._chunked is not None:
                eng._prefill_next_chunk()
        else:
            eng._admit_one(slot)
        states.append(eng._state)
    chunked, whole = states
    n = len(long_a.prompt)

    def close(got, want):  # f32 round-off of other summation orders, at the values' scale
        # (the random 8-layer base's reach hundreds); a chunk reading the wrong slots differs
        # everywhere by far more
        want = np.asarray(want)
        np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4 * max(1.0, np.abs(want).max()))

    for name in ("root", "trunk_len", "num_out", "done"):
        np.testing.assert_array_equal(getattr(chunked, name)[0], getattr(whole, name)[0])
    for name in ("root_logprobs", "root_feature"):
        close(getattr(chunked, name)[0], getattr(whole, name)[0])
    pairs = zip(
        jax.tree.leaves(chunked.draft_cache), jax.tree.leaves(whole.draft_cache), strict=True
    )
    for a, b in pairs:
        close(a[0, :n], b[0, :n])
    axis = 0 if chunked.cache.per_layer else 1  # the base K/V of the prompt: the chunks' too
    for a, b in zip(
        (chunked.cache.k, chunked.cache.v), (whole.cache.k, whole.cache.v), strict=True
    ):
        for la, lb in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
            la, lb = np.take(np.asarray(la), 0, axis), np.take(np.asarray(lb), 0, axis)
            close(la[..., :n, :, :], lb[..., :n, :, :])
    assert int(chunked.cache.length[0]) == n


def test_long_prompts_are_prefilled_in_chunks_between_the_other_rows_rounds(pair):
    """`prefill_chunk=16`: two long prompts (admitted one after the other, a chunk per step)
    among short ones, greedy and sampled: each equals the request alone; a row already decoding
    keeps decoding while a long prompt is prefilled; a long prompt cancelled mid-way ends
    "cancelled" and leaves no row taken."""
    long_a = engine_lib.Request(tuple(range(50, 90)), max_new_tokens=20)  # 16 + 16 + 8
    eng = _engine(pair, prefill_chunk=16, rounds_per_step=1)
    long_b = engine_lib.Request(tuple(range(60, 97)), max_new_tokens=12, temperature=0.9, seed=3)
    first = engine_lib.Request(tuple(PROMPTS[0]), max_new_tokens=32)
    requests = [first, _requests()[1], long_a, long_b, _requests()[3]]
    got = [_Collect() for _ in requests]
    eng.submit(requests[0], got[0])
    eng.step()
    for request, sink in zip(requests[1:], got[1:], strict=True):
        eng.submit(request, sink)
    emitted = [len(got[0].tokens)]
    for _ in range(2):  # the short request is admitted, long_a's two chunks are written
        eng.step()
        emitted.append(len(got[0].tokens))
        assert eng.busy == 2 and eng._chunked.slot.request.prompt == long_a.prompt
    eng.step()  # its last 8 tokens: admitted; long_b waits for the next step
    emitted.append(len(got[0].tokens))
    assert eng.busy == 3 and eng._chunked is None
    assert emitted[0] < emitted[1] < emitted[2] < emitted[3]  # the first row went on decoding
    eng.run_until_idle()
    for request, sink in zip(requests, got, strict=True):
        assert sink.tokens == _alone(pair, request), request
    cancelled = _Collect()
    rid = eng.submit(long_a, cancelled)
    eng.step()
    eng.cancel(rid)
    eng.step()
    assert cancelled.final.finish_reason == "cancelled" and eng.idle() and eng.busy == 0
    with pytest.raises(ValueError, match="prefill_chunk"):
        _engine(pair, prefill_chunk=8)


def test_a_prompt_whose_padded_length_exceeds_the_cache_is_admitted(pair):
    """max_model_len 140 gives a 192-slot cache; a 130-token prompt pads to 192, not 256."""
    eng = _engine(pair, max_model_len=140, max_batch=1)
    request = engine_lib.Request(tuple((i * 7) % 100 + 3 for i in range(130)), max_new_tokens=8)
    sink = _Collect()
    eng.submit(request, sink)
    eng.run_until_idle()
    assert sink.final.error is None and sink.tokens == _alone(pair, request)


def test_admission_writes_only_its_row(pair):
    eng = _engine(pair)
    first = _Collect()
    eng.submit(engine_lib.Request((5, 6, 7), max_new_tokens=40), first)
    eng.step()
    eng.step()
    snapshot = lambda s: jax.tree.map(np.asarray, s.replace(keys=jax.random.key_data(s.keys)))  # noqa: E731
    before = snapshot(eng._state)
    request = eng.check(engine_lib.Request((9, 8, 7, 6), max_new_tokens=5))
    eng._admit_one(engine_lib._Slot(99, request, print))
    after = snapshot(eng._state)
    axis = 0 if eng._state.cache.per_layer else 1

    def row(x, r, ax=0):
        return np.take(x, r, axis=ax) if x.ndim else x

    for name in ("cache", "draft_cache", "trunk_len", "root", "root_logprobs", "out_tokens",
                 "num_out", "done", "hits", "trials", "pending_len", "rounds", "keys"):  # fmt: skip
        b, a = getattr(before, name), getattr(after, name)
        for lb, la in zip(jax.tree.leaves(b), jax.tree.leaves(a), strict=True):
            ax = axis if name == "cache" and lb.ndim == 5 else 0
            np.testing.assert_array_equal(row(lb, 0, ax), row(la, 0, ax), err_msg=name)
    assert after.cache.length[1] == 4 and after.num_out[1] == 1 and not after.done[1]


def test_programs_are_bounded_and_a_lone_request_runs_at_batch_one(pair):
    eng = _engine(pair)
    programs = (engine_lib._admit, engine_lib._segment, engine_lib._move_row)

    def sizes():
        return (*(f._cache_size() for f in programs), eng.round_programs)

    for request in _requests():
        eng.submit(request, _Collect())
    eng.run_until_idle()
    warm = sizes()
    rows = []
    real = eng._run_rounds

    def spy():
        rows.append(next(b for b in eng.buckets if b >= eng.busy))
        real()

    eng._run_rounds = spy
    for request in _requests(seed_base=50):  # other seeds and settings, same buckets
        eng.submit(request, _Collect())
    eng.run_until_idle()
    now = sizes()
    # No admission or move program for the same prompt buckets; a round program only for a
    # (batch bucket, greedy or mixed, shape) the first wave's finishing order never ran (it
    # depends on the sampled tokens): never a second one for knob values or seeds.
    assert (now[0], now[2]) == (warm[0], warm[2])
    assert now[1] - warm[1] == now[3] - warm[3]
    assert 4 in rows  # the full batch ran together
    rows.clear()
    eng.submit(_requests()[0], _Collect())
    eng.run_until_idle()
    assert rows and set(rows) == {1}  # a lone request runs the batch-1 program


def test_warm_up_compiles_every_program_requests_use(pair):
    """After `warm_up`, mixed greedy and sampled requests of short and long prompts, in every
    batch bucket, reading both attention windows, compile nothing."""
    from compile_log import compiles

    eng = _engine(pair, max_model_len=200)
    assert len(layers.attention_spans(eng._shapes.capacity)) == 2  # 128 slots, all of them
    assert eng.warm_up() == eng.program_count() > 0
    requests = [
        *_requests(),
        engine_lib.Request(tuple(i % 120 + 3 for i in range(150)), max_new_tokens=20),
    ]
    got = [_Collect() for _ in requests]
    with compiles() as compiled:
        for request, sink in zip(requests, got, strict=True):
            eng.submit(request, sink)
            eng.step()
        eng.run_until_idle()
    assert not {"_segment", "_admit", "_move_row"} & set(compiled), compiled
    for request, sink in zip(requests, got, strict=True):
        assert sink.tokens == _alone(pair, request)


def test_no_speculation_decodes_plainly(pair):
    eng = _engine(pair, speculate=False)
    requests = _requests()[:3]
    got = [_Collect() for _ in requests]
    for request, sink in zip(requests, got, strict=True):
        eng.submit(request, sink)
    eng.run_until_idle()
    assert eng.shapes == (None,)
    for request, sink in zip(requests, got, strict=True):
        assert sink.tokens == _alone(pair, request)
        assert sink.final.accepted == 0 and sink.final.rounds == len(sink.tokens) - 1


def test_cancel_frees_the_row_and_stop_ids_end_a_request(pair):
    eng = _engine(pair)
    long, other = _Collect(), _Collect()
    rid = eng.submit(engine_lib.Request((5, 6, 7), max_new_tokens=80), long)
    eng.submit(engine_lib.Request((8, 9), max_new_tokens=30), other)
    eng.step()
    assert eng.busy == 2
    eng.cancel(rid)
    eng.step()
    assert long.final.finish_reason == "cancelled" and eng.busy == 1
    eng.run_until_idle()
    want = _alone(pair, engine_lib.Request((8, 9), max_new_tokens=30))
    assert other.tokens == want  # the moved row decoded on as if alone
    # a request's own stop id: the output ends at its first occurrence, reason "stop"
    stop = want[5]
    sink = _Collect()
    eng.submit(engine_lib.Request((8, 9), max_new_tokens=30, stop_ids=(stop,)), sink)
    eng.run_until_idle()
    assert sink.tokens == want[: want.index(stop) + 1] and sink.final.finish_reason == "stop"


def test_bad_requests_are_refused_and_a_full_queue_raises(pair):
    eng = _engine(pair, max_queue=1, max_model_len=96)
    bad = [
        engine_lib.Request((), max_new_tokens=4),
        engine_lib.Request((5, 10**6), max_new_tokens=4),
        engine_lib.Request((5,), max_new_tokens=0),
        engine_lib.Request((5,), max_new_tokens=96),  # prompt + new > max_model_len
        engine_lib.Request((5,), max_new_tokens=4, temperature=-1.0),
        engine_lib.Request((5,), max_new_tokens=4, stop_ids=(10**6,)),
    ]
    for request in bad:
        with pytest.raises(ValueError):
            eng.submit(request, _Collect())
    assert eng.idle()
    eng.submit(engine_lib.Request((5,), max_new_tokens=4), _Collect())
    with pytest.raises(engine_lib.QueueFull):
        eng.submit(engine_lib.Request((6,), max_new_tokens=4), _Collect())
    with pytest.raises(ValueError):
        _engine(pair, max_model_len=10**6)


@pytest.mark.parametrize("kind", ["griffin", "eagle3"])
def test_a_budget_per_batch_bucket_switches_shapes_losslessly(kind, request):
    """`--tree auto`'s engine: shapes switch round by round (a forced schedule, then the
    policy) without changing a token; a shape first asked for compiles in the background while
    a compiled one runs, and once compiled nothing compiles again. GRIFFIN and EAGLE-3."""
    from compile_log import compiles

    pair = request.getfixturevalue("pair" if kind == "griffin" else "eagle3_pair")

    seen = []

    def budget_for(batch: int) -> budget_lib.Budget:  # what `--tree auto` builds per bucket
        seen.append(batch)
        return budget_lib.make_budget([None, TREE], schedule=[0, 1, 1, 0, 1, 0, 0, 1] * 4)

    eng = _engine(pair, tree=budget_for, max_batch=2)
    requests = [_requests()[0], _requests()[3]]  # greedy: one program set per bucket

    def wave():
        got = [_Collect() for _ in requests]
        for request, sink in zip(requests, got, strict=True):
            eng.submit(request, sink)
        eng.run_until_idle()
        for request, sink in zip(requests, got, strict=True):
            assert sink.tokens == _alone(pair, request)
        return got

    wave()  # the tree compiles in the background: plain rounds stand in meanwhile
    assert seen == [1, 2] and eng.shapes == (None, TREE)
    assert eng.history.level[0, 0] >= 0  # the finished rows taught the next rows' prior
    assert eng.wait_for_compiles(timeout=600)
    programs = eng.round_programs
    with compiles() as compiled:
        got = wave()  # past the schedule: the policy's choice (equal costs: the tree)
    assert "_segment" not in compiled and "_admit" not in compiled
    assert eng.round_programs == programs
    assert sum(s.final.accepted for s in got) > 0  # tree rounds ran
    # every round was counted under the shape it ran
    assert eng.rounds_by_shape[budget_lib.describe(TREE)] > 0
    assert set(eng.rounds_by_shape) == {"none", budget_lib.describe(TREE)}
    eng.forget_history()  # what a warm-up's made-up request taught goes
    assert np.isnan(eng.history.level).all()


def test_the_server_s_warm_up_request_teaches_the_budget_nothing(pair):
    """`serve.warm_up` runs a made-up prompt through the engine: its rows draft and finish, and
    what they showed is forgotten (it would be the prior of every real request otherwise)."""
    from inference import serve

    eng = _engine(pair, tree=budget_lib.make_budget([None, TREE]), max_batch=1)
    serve.warm_up(eng, "greedy")  # every program first: the request's rounds draft
    assert eng.rounds_by_shape[budget_lib.describe(TREE)] > 0
    assert np.isnan(eng.history.level).all()


def test_a_request_into_an_empty_batch_starts_with_its_own_choice(pair):
    """A lone request's first round is the shape its prefill chose (the tree, at equal costs),
    not the plain step an empty batch last chose: no request starts with a wasted plain round."""
    eng = _engine(pair, tree=budget_lib.make_budget([None, TREE]), max_batch=1)
    eng.warm_up(sampled=False)
    for request in (_requests()[0], _requests()[3]):
        sink = _Collect()
        eng.submit(request, sink)
        eng.run_until_idle()
        assert sink.tokens == _alone(pair, request)
    assert eng.rounds_by_shape == {"none": 0, budget_lib.describe(TREE): eng._last_step}


def test_compile_room_names_the_map_limit():
    assert engine_lib.compile_room(10, limit=65530) is None
    problem = engine_lib.compile_room(200, limit=65530)
    assert "vm.max_map_count = 65,530" in problem and "200 compiled programs" in problem


def test_the_serving_loop_s_time_per_round_is_learnt_and_priced(pair):
    """The engine learns what its loop adds to each round beyond the shapes' device costs (here
    a slow consumer of the tokens) and prices every shape with it: plain decoding, cheapest a
    round, stops being the best buy. Outputs stay those of each request alone, and the new
    prices recompile nothing."""
    from compile_log import compiles

    costs = [1.0, 4.0]  # ms a round: plain, the tree
    eng = _engine(pair, tree=budget_lib.make_budget([None, TREE], costs=costs), max_batch=1)
    fixed = _engine(pair, tree=TREE, max_batch=1)

    class Slow(_Collect):
        def __call__(self, update):
            time.sleep(0.02)  # per delivery: ~5 ms a round of a 4-round segment
            super().__call__(update)

    def wave(engine, requests, sink=_Collect):
        got = [sink() for _ in requests]
        for request, out in zip(requests, got, strict=True):
            engine.submit(request, out)
            engine.run_until_idle()  # one at a time: batch bucket 1
        for request, out in zip(requests, got, strict=True):
            assert out.tokens == _alone(pair, request)

    greedy = [r for r in _requests() if r.temperature == 0]
    wave(eng, greedy[:1])  # compiles (no samples while a shape compiles in the background)
    assert eng.wait_for_compiles(timeout=600)
    with compiles() as compiled:
        wave(eng, greedy, sink=Slow)
    assert "_segment" not in compiled
    learnt = eng.round_overhead_ms[1]
    assert 0.5 < learnt <= max(costs)
    np.testing.assert_allclose(np.asarray(eng.budgets[1].costs), np.add(costs, learnt), rtol=1e-6)

    def choice(budget):  # a fresh row at its prior, plain decoding running
        levels = budget.max_levels
        zeros = jnp.zeros((1, levels), jnp.float32)
        return int(budget_lib.choose(
            budget, zeros, zeros, jnp.ones((1,), bool), jnp.int32(0), jnp.int32(1 << 20),
            jnp.int32(1 << 20), jnp.int32(0),
        ))  # fmt: skip

    assert choice(budget_lib.make_budget([None, TREE], costs=costs)) == 0
    assert choice(eng.budgets[1]) == 1
    wave(fixed, greedy[:1], sink=Slow)  # one shape: nothing to choose, nothing learnt
    assert fixed.round_overhead_ms[1] == 0
