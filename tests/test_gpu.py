"""On an accelerator (`pytest -m gpu`; `make test` deselects these): bf16 greedy speculative ==
bf16 vanilla under the near-tie rule of `near_ties.py`, f32 on the device == f32 on the CPU,
f32 seeded speculative sampling == seeded vanilla sampling under forced shape switches and
under the adaptive budget priced on the device, no recompiles across rounds, sharded ==
unsharded when there are several devices."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from near_ties import assert_mostly_compared, compare_greedy
from spec_models import aligned_pair, base_config, draft_config, random_pair
from test_bf16 import BF16_TIE, PROMPTS, TREES, bf16_pair

from griffin_jax import budget, sharding, speculative, vanilla
from griffin_jax.config import TreeConfig
from griffin_jax.kv_cache import causal_mask, init_cache
from griffin_jax.model import forward, unstack_layers

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        jax.default_backend() == "cpu", reason="needs an accelerator (run with -m gpu there)"
    ),
]

# f32 on the device against f32 on the CPU, both at HIGHEST matmul precision (conftest): the
# same maths in another order. Stated tolerance: 1e-4 of the logits' scale.
F32_RTOL = 1e-4


def test_bf16_greedy_speculative_equals_vanilla_on_device():
    cfg, dcfg, base, draft = bf16_pair()
    base = unstack_layers(base)
    want = vanilla.generate(base, cfg, PROMPTS, max_new_tokens=32, eos_ids=[]).output_ids
    for tree in TREES:
        got = speculative.generate(
            base, cfg, draft, dcfg, PROMPTS, tree_cfg=tree, max_new_tokens=32, eos_ids=[]
        ).output_ids
        result = compare_greedy(base, cfg, PROMPTS, got, want, tol=BF16_TIE)
        assert_mostly_compared(result, len(PROMPTS))


def test_bf16_greedy_with_accepted_drafts_on_device():
    """A draft that agrees with the base: multi-token commits in bf16 on the device."""
    cfg = base_config("llama")
    dcfg = draft_config(cfg)
    base, draft = aligned_pair(cfg, dcfg, noise=0.3)
    base, draft = (jax.tree.map(lambda x: x.astype(jnp.bfloat16), t) for t in (base, draft))
    want = vanilla.generate(base, cfg, PROMPTS, max_new_tokens=32, eos_ids=[]).output_ids
    res = speculative.generate(
        base, cfg, draft, dcfg, PROMPTS, tree_cfg=TREES[0], max_new_tokens=32, eos_ids=[]
    )
    result = compare_greedy(base, cfg, PROMPTS, res.output_ids, want, tol=BF16_TIE)
    assert_mostly_compared(result, len(PROMPTS))
    assert sum(a for row in res.accept_lengths for a in row) > 20


def test_seeded_sampling_and_the_adaptive_budget_on_device():
    """f32 on the device (HIGHEST precision, conftest): seeded speculative sampling emits the
    tokens seeded vanilla sampling emits, and greedy the greedy ones, whichever shapes run:
    forced switches among plain decoding and two trees, then the policy on costs measured
    here. Near-tie odds as on the CPU (test_speculative: below 1e-3 for these draws)."""
    cfg = base_config("llama")
    dcfg = draft_config(cfg)
    base, draft = aligned_pair(cfg, dcfg, noise=0.3)
    tree = TreeConfig(top_k=2, depth=3, total_tokens=8)
    shapes = (None, TreeConfig(top_k=2, depth=0, total_tokens=3), tree)
    costs = speculative.measure_round_costs(
        base, cfg, draft, dcfg, budget.make_budget(shapes), batch=len(PROMPTS), greedy=False,
        prompt_len=16, max_new=64, repeats=1, segment=4, short=1,
    )  # fmt: skip
    assert len(costs) == len(shapes) + 2 and all(c > 0 for c in costs[:-2])
    budgets = [
        budget.make_budget(shapes, schedule=[2, 0, 0, 1, 0, 2, 2, 0, 1] * 5),
        budget.make_budget(shapes, costs=costs[:-2], catch_up=costs[-2], probe_call=costs[-1]),
    ]
    accepted = 0
    for knobs in (dict(temperature=0.8, top_p=0.9, top_k=0, seed=7),
                  dict(temperature=1.0, top_p=1.0, top_k=5, seed=3), {}):  # fmt: skip
        want = vanilla.generate(base, cfg, PROMPTS, max_new_tokens=24, **knobs).output_ids
        for b in budgets:
            res = speculative.generate(
                base, cfg, draft, dcfg, PROMPTS, tree_cfg=b, max_new_tokens=24, **knobs
            )
            assert res.output_ids == want, (knobs, b.schedule)
            accepted += sum(a for row in res.accept_lengths for a in row)
    assert accepted > 30  # multi-token rounds happened: the equality is not trivial


def _logits(params, cfg, ids, device):
    t = ids.shape[1]
    zero = jnp.zeros((ids.shape[0],), jnp.int32)
    with jax.default_device(device):
        logits, _, _ = forward(
            params, jnp.asarray(ids), jnp.broadcast_to(jnp.arange(t), ids.shape),
            init_cache(cfg, ids.shape[0], t, jnp.float32), write_idx=zero,
            mask=causal_mask(zero, t, t), cfg=cfg,
        )  # fmt: skip
    return np.asarray(logits)


def test_f32_device_equals_cpu():
    cfg = base_config("llama")
    base, _ = random_pair(cfg, draft_config(cfg))
    ids = np.arange(2 * 40).reshape(2, 40) % cfg.vocab_size
    cpu = jax.devices("cpu")[0]
    on_cpu = _logits(jax.device_put(base, cpu), cfg, ids, cpu)
    on_device = _logits(jax.device_put(base, jax.devices()[0]), cfg, ids, jax.devices()[0])
    scale = np.abs(on_cpu).max()
    assert np.abs(on_device - on_cpu).max() <= F32_RTOL * scale


def test_no_recompiles_across_rounds_on_device():
    cfg = base_config("llama", vocab_size=131)  # a config of its own: its own compiles
    dcfg = draft_config(cfg)
    base, draft = aligned_pair(cfg, dcfg, noise=0.3)
    kw = dict(tree_cfg=TREES[0], eos_ids=[])
    speculative.generate(base, cfg, draft, dcfg, [[1, 2, 3]], max_new_tokens=40, **kw)
    before = (speculative.run_segment._cache_size(), speculative.prefill._cache_size())
    # Same length bucket and max_new_tokens (the cache capacity and output buffer follow
    # both), other lengths and contents, more rounds: no compile.
    res = speculative.generate(base, cfg, draft, dcfg, [[7, 8, 9, 10, 11]], max_new_tokens=40, **kw)
    assert sum(res.rounds) > 5
    assert (speculative.run_segment._cache_size(), speculative.prefill._cache_size()) == before


@pytest.mark.skipif(jax.device_count() < 2, reason="one device: nothing to shard over")
def test_sharded_equals_unsharded_on_device():
    cfg = base_config("llama", n_heads=8, n_kv_heads=2)
    dcfg = draft_config(cfg, n_heads=8, n_kv_heads=8, head_dim=8)
    base, draft = aligned_pair(cfg, dcfg, noise=0.3)
    kw = dict(tree_cfg=TREES[0], max_new_tokens=24, eos_ids=[])
    want = speculative.generate(base, cfg, draft, dcfg, PROMPTS, **kw).output_ids
    mesh = sharding.make_mesh({"data": 1, "model": 2})
    got = speculative.generate(base, cfg, draft, dcfg, PROMPTS, mesh=mesh, **kw).output_ids
    assert got == want
