"""The one rule for float near-ties, shared by the CPU bf16 test and the `gpu` tests.

Greedy speculative decoding reads the base's logits from a verification forward over a tree of
M tokens; vanilla decoding reads them from one-token decodes. Both compute the same maths with
different shapes and kernels, so they round differently: in bf16 by ~1e-2 of a logit, in f32 by
~1e-6. Where the two best tokens are that close, either program may pick either one.

The rule: the two outputs are equal token for token, except that at the first position where
a row differs, the two tokens must be a near-tie of the reference: their logits in a
teacher-forced f32 forward of the same weights over the common prefix differ by at most `tol`.
After that position the row is not compared further (the prefixes differ). The caller also
bounds how many rows may end that way, so the rule cannot hide a real bug: a wrong mask, cache
slot or acceptance shows up as a difference at a position whose best token wins clearly.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from griffin_jax.config import ModelConfig
from griffin_jax.kv_cache import causal_mask, init_cache
from griffin_jax.model import forward


@dataclasses.dataclass
class Comparison:
    compared: int  # tokens compared (equal prefix lengths, summed over rows)
    total: int  # tokens in the reference outputs
    near_ties: list[tuple[int, int, float]]  # (row, position, |logit gap| in f32)


def next_logits_f32(params, cfg: ModelConfig, ids: Sequence[int]) -> np.ndarray:
    """The f32 next-token logits after `ids` (a teacher-forced forward of f32 weights)."""
    params32 = jax.tree.map(lambda x: x.astype(jnp.float32), params)
    t = len(ids)
    zero = jnp.zeros((1,), jnp.int32)
    with jax.default_device(jax.devices("cpu")[0]), jax.default_matmul_precision("highest"):
        logits, _, _ = forward(
            params32, jnp.asarray([list(ids)], jnp.int32), jnp.arange(t, dtype=jnp.int32)[None],
            init_cache(cfg, 1, t, jnp.float32, per_layer=isinstance(params["layers"], tuple)),
            write_idx=zero, mask=causal_mask(zero, t, t), cfg=cfg,
        )  # fmt: skip
    return np.asarray(logits[0, -1])


def compare_greedy(params, cfg: ModelConfig, prompts, got, want, *, tol: float) -> Comparison:
    """Applies the rule (module docstring) to every row; raises AssertionError where it fails."""
    compared, total, ties = 0, 0, []
    for row, (prompt, g, w) in enumerate(zip(prompts, got, want, strict=True)):
        total += len(w)
        diff = next((i for i, (a, b) in enumerate(zip(g, w, strict=False)) if a != b), None)
        if diff is None:
            assert len(g) == len(w), f"row {row}: {len(g)} tokens, reference {len(w)}"
            compared += len(w)
            continue
        logits = next_logits_f32(params, cfg, list(prompt) + list(w[:diff]))
        gap = float(abs(logits[g[diff]] - logits[w[diff]]))
        assert gap <= tol, (
            f"row {row}: token {diff} is {g[diff]}, reference {w[diff]}; their f32 logits "
            f"differ by {gap:.4g} > {tol} (not a near-tie)"
        )
        compared += diff
        ties.append((row, diff, gap))
    return Comparison(compared, total, ties)


def assert_mostly_compared(result: Comparison, rows: int) -> None:
    """The bound on the rule: at most half the rows end on a near-tie, and at least half of
    all tokens were compared (a real bug shows as a wide gap, long before either bound)."""
    assert len(result.near_ties) <= rows // 2, result
    assert result.compared >= 0.5 * result.total, result
