"""bf16 on CPU: greedy speculative decoding equals greedy vanilla decoding under the near-tie
rule of `near_ties.py` (the same rule the `gpu` tests apply on an accelerator)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from near_ties import assert_mostly_compared, compare_greedy
from spec_models import base_config, draft_config, random_pair

from griffin_jax import speculative, vanilla
from griffin_jax.config import TreeConfig
from griffin_jax.model import unstack_layers

# A bf16 logit carries ~3 significant digits; the tiny model's logits are O(10), so two
# programs' roundings differ by up to ~0.1 at the top tokens. Half a unit is generous and
# still far below the gap of a clear winner.
BF16_TIE = 0.5
PROMPTS = [[5, 6, 7, 8, 9], [10, 11, 12], list(range(20, 38)), [40]]
TREES = [
    TreeConfig(top_k=3, depth=3, total_tokens=10),
    TreeConfig(top_k=1, depth=4, total_tokens=6),
]


def bf16_pair(family: str = "llama"):
    cfg = base_config(family)
    dcfg = draft_config(cfg)
    base, draft = random_pair(cfg, dcfg)
    cast = lambda tree: jax.tree.map(lambda x: x.astype(jnp.bfloat16), tree)  # noqa: E731
    return cfg, dcfg, cast(base), cast(draft)


def test_bf16_greedy_speculative_equals_vanilla():
    """The unrolled decode layout that inference runs (`unstack_layers`)."""
    cfg, dcfg, base, draft = bf16_pair()
    base = unstack_layers(base)
    want = vanilla.generate(base, cfg, PROMPTS, max_new_tokens=16, eos_ids=[]).output_ids
    for tree in TREES[:1]:  # the gpu tests run both
        got = speculative.generate(
            base, cfg, draft, dcfg, PROMPTS, tree_cfg=tree, max_new_tokens=16, eos_ids=[]
        ).output_ids
        result = compare_greedy(base, cfg, PROMPTS, got, want, tol=BF16_TIE)
        assert_mostly_compared(result, len(PROMPTS))
