"""`inference.replay_rounds`: a chain's acceptance at every position replays the engine's rounds."""

from __future__ import annotations

import numpy as np
import pytest
from spec_models import aligned_pair, base_config, draft_config

from griffin_jax import speculative, vanilla
from griffin_jax.config import TreeConfig
from inference.replay_rounds import ceiling_ms, chain_acceptance, rounds_of, shape_changes

PROMPTS = [[5, 6, 7, 8, 9], list(range(20, 38))]
LEVELS = 4


@pytest.fixture(scope="module")
def noisy():
    """A pair whose draft agrees with the base's greedy choice often, not always."""
    cfg = base_config("llama")
    dcfg = draft_config(cfg)
    return cfg, dcfg, *aligned_pair(cfg, dcfg, noise=0.05)


def test_the_replay_accepts_what_the_engines_chain_rounds_accept(noisy):
    cfg, dcfg, base, draft = noisy
    n_new = 30
    seen = set()
    for prompt in PROMPTS:
        out = vanilla.generate(base, cfg, [prompt], max_new_tokens=n_new + LEVELS + 1)
        out = out.output_ids[0]
        accepted, conf = chain_acceptance(base, cfg, draft, dcfg, prompt, out, levels=LEVELS)
        assert accepted.shape == (n_new + 1,) and conf.shape == (n_new + 1, LEVELS)
        assert ((conf > 0) & (conf <= 1)).all()
        for depth in (0, LEVELS - 1):  # a one-level and the full chain
            tree = TreeConfig(top_k=1, depth=depth, total_tokens=depth + 2)
            res = speculative.generate(
                base, cfg, draft, dcfg, [prompt], tree_cfg=tree, max_new_tokens=n_new
            )
            assert res.output_ids[0] == out[:n_new]
            k = 0
            for a in res.accept_lengths[0]:
                if k + a + 2 < n_new:  # not the round max_new_tokens may have cut
                    assert a == min(int(accepted[k]), depth + 1)
                seen.add(a)
                k += a + 1
            assert len(res.accept_lengths[0]) == rounds_of(accepted, depth + 1, n_new)
    assert len(seen) >= 3  # the draft hits and misses: the check means something


def test_an_aligned_draft_accepts_every_level():
    cfg = base_config("llama")
    dcfg = draft_config(cfg)
    base, draft = aligned_pair(cfg, dcfg)
    out = vanilla.generate(base, cfg, [PROMPTS[0]], max_new_tokens=20).output_ids[0]
    accepted, _ = chain_acceptance(base, cfg, draft, dcfg, PROMPTS[0], out, levels=LEVELS)
    np.testing.assert_array_equal(accepted, LEVELS)


def test_the_ceiling_knows_each_rounds_outcome():
    accepted = np.asarray([0, 3, 0, 3, 3, 0, 0, 0, 3, 3, 0, 0])
    # plain steps only: 11 rounds of 1 ms; a 3-level chain throughout: rounds_of's count
    assert ceiling_ms(accepted, [0], [1.0], 12) == 11.0
    assert rounds_of(accepted, 3, 12) == 6  # roots 0, 1, 5, 6, 7, 8 (the last reaches 11)
    assert ceiling_ms(accepted, [3], [2.0], 12) == 12.0
    # both: the chain where it is accepted (roots 1 and 8), plain steps where it would miss
    assert ceiling_ms(accepted, [0, 3], [1.0, 2.0], 12) == 1 + 2 + 1 + 1 + 1 + 2


def test_shape_changes_count_the_boundaries_between_runs_of_one_shape():
    assert shape_changes([]) == 0
    assert shape_changes(["(1,3,5)"]) == 0
    assert shape_changes(["(1,3,5)", "(1,3,5)", "(1,6,8)", "(1,6,8)", "(1,3,5)", "none"]) == 3
