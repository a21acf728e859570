"""Logits warping vs transformers, greedy acceptance (T0 exact), and lossless sampling acceptance.

Losslessness is tested the way it is defined: on a tiny vocabulary, the token emitted at each
depth (accepted draft token or bonus) must follow the warped target distribution of the node it
continues from, whatever the draft proposed (chi-square over tens of thousands of rounds drawn in
one vmapped batch, fixed seeds). Position-keyed draws must depend on (seed, position) only.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch_ref_tree
from transformers.generation.logits_process import (
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from griffin_jax import sampling

# ----------------------------------------------------------------------------- warp


@pytest.mark.parametrize(
    "temperature,top_p,top_k",
    [(1.0, 1.0, 0), (0.7, 1.0, 0), (1.0, 0.9, 0), (1.3, 1.0, 5), (0.6, 0.75, 20), (1.0, 0.3, 3)],
)
@pytest.mark.parametrize("shape,scale", [((16, 64), 3.0), ((4, 1000), 8.0)])
def test_warp_matches_transformers(temperature, top_p, top_k, shape, scale):
    rng = np.random.default_rng(0)
    logits = (rng.normal(size=shape) * scale).astype(np.float32)
    logits[0, :8] = logits[0].max()  # ties at the top (HF keeps all ties with the k-th)
    scores = torch.tensor(logits)
    scores = TemperatureLogitsWarper(temperature)(None, scores)
    if top_k:
        scores = TopKLogitsWarper(top_k)(None, scores)
    if top_p < 1.0:
        scores = TopPLogitsWarper(top_p)(None, scores)
    want = torch.log_softmax(scores, dim=-1).numpy()
    got = np.asarray(sampling.warp(jnp.asarray(logits), temperature, top_p, top_k))
    if top_p < 1.0:
        # HF's unstable sort drops an arbitrary subset of tokens tied at the top-p boundary; we
        # keep ties together (test_warp_top_p_keeps_exact_ties_together). Compare untied rows.
        got, want = got[1:], want[1:]
    np.testing.assert_array_equal(np.isneginf(got), np.isneginf(want))
    finite = np.isfinite(want)
    np.testing.assert_allclose(got[finite], want[finite], atol=1e-5, rtol=1e-5)


def test_warp_top_p_keeps_exact_ties_together():
    # Four tokens of probability 0.2 and one of 0.2 - eps: top_p 0.5 drops the smallest
    # (mass ~0.2 <= 0.5) but not a strict subset of the tied four (they would need 0.6 > 0.5).
    logits = jnp.log(jnp.array([0.2, 0.2, 0.2, 0.2, 0.19999]))
    kept = np.isfinite(np.asarray(sampling.warp(logits, 1.0, 0.5, 0)))
    np.testing.assert_array_equal(kept, [True, True, True, True, False])
    # The most likely token always stays, even when its mass alone is below 1 - top_p.
    kept = np.isfinite(np.asarray(sampling.warp(jnp.zeros(8), 1.0, 1e-6, 0)))
    assert kept.all()


def test_warp_knobs_are_traced_per_row():
    logits = jnp.asarray(np.random.default_rng(1).normal(size=(3, 16)), jnp.float32)
    warp = jax.jit(sampling.warp)
    out = warp(logits, jnp.array([1.0, 0.5, 2.0]), jnp.array([1.0, 0.8, 1.0]), jnp.array([0, 0, 4]))
    for row, (t, p, k) in enumerate([(1.0, 1.0, 0), (0.5, 0.8, 0), (2.0, 1.0, 4)]):
        np.testing.assert_allclose(out[row], sampling.warp(logits[row], t, p, k), atol=1e-6)
    assert warp._cache_size() == 1
    warp(logits, 0.9, 0.5, 2)  # new values (scalars now), same compile per input structure
    warp(logits, jnp.array([0.3, 0.4, 0.5]), jnp.array([0.5, 0.6, 0.7]), jnp.array([1, 2, 3]))
    assert warp._cache_size() == 2


# ----------------------------------------------------------------------------- greedy acceptance


def _onehot_logits(argmax: np.ndarray, v: int = 10) -> np.ndarray:
    out = np.zeros(argmax.shape + (v,), np.float32)
    np.put_along_axis(out, argmax[..., None], 1.0, axis=-1)
    return out


def test_greedy_accept_hand_made():
    # 4 paths, A = 4 (root + 3). Row 3 is padding (its tokens would match perfectly).
    candidates = np.array(
        [
            [[7, 1, 2, 3], [7, 1, 5, 0], [7, 4, 6, 8], [7, 1, 2, 3]],  # row 0
            [[7, 9, 0, 0], [7, 1, 2, 0], [7, 1, 2, 0], [7, 0, 0, 0]],  # row 1
        ]
    )
    path_mask = np.array(
        [
            [[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 1, 1], [0, 0, 0, 0]],
            [[1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 0], [0, 0, 0, 0]],
        ],
        bool,
    )
    # Target argmax at each path position (what should follow it).
    argmax = np.array(
        [
            [[1, 2, 9, 4], [1, 5, 3, 3], [4, 6, 8, 2], [1, 2, 3, 4]],
            [[1, 2, 3, 3], [1, 2, 6, 6], [1, 2, 8, 8], [1, 2, 3, 4]],
        ]
    )
    got = sampling.greedy_accept(
        jnp.asarray(candidates), jnp.asarray(_onehot_logits(argmax)), jnp.asarray(path_mask)
    )
    # Row 0: path 0 runs 2 (1, 2; 3 != 9), path 1 runs 2 (1, 5; then padding), path 2 runs 3
    # (4, 6, 8): best 2, bonus = argmax after the 3rd token = 2.
    # Row 1: path 0 runs 0, paths 1 and 2 run 2: first maximum = path 1, bonus 6.
    np.testing.assert_array_equal(got.best_path, [2, 1])
    np.testing.assert_array_equal(got.accept_len, [3, 2])
    np.testing.assert_array_equal(got.bonus_token, [2, 6])


def test_greedy_accept_nothing_matches():
    candidates = np.array([[[5, 1, 2], [5, 3, 0]]])
    path_mask = np.array([[[1, 1, 1], [1, 1, 0]]], bool)
    argmax = np.array([[[8, 0, 0], [8, 0, 0]]])
    got = sampling.greedy_accept(
        jnp.asarray(candidates), jnp.asarray(_onehot_logits(argmax)), jnp.asarray(path_mask)
    )
    assert (int(got.best_path[0]), int(got.accept_len[0]), int(got.bonus_token[0])) == (0, 0, 8)


def test_greedy_accept_nodes_equals_per_path():
    rng = np.random.default_rng(3)
    tree = _random_tree(rng, m=12, v=6)
    logits = rng.normal(size=(1, 12, 6)).astype(np.float32)
    draft = tree["tokens"][None].copy()
    # Make the target agree with the draft along some edges so runs are non-trivial.
    for n in range(1, 12):
        if rng.random() < 0.6:
            logits[0, tree["parents"][n], draft[0, n]] += 10.0
    retrieve, mask = tree["retrieve"][None], tree["mask"][None]
    by_node = sampling.accept_nodes(
        jnp.asarray(draft), jnp.argmax(jnp.asarray(logits), -1), jnp.asarray(retrieve),
        jnp.asarray(mask),
    )  # fmt: skip
    per_path = sampling.greedy_accept(
        jnp.asarray(np.take_along_axis(draft[:, None, :], retrieve, axis=2)),
        jnp.asarray(logits[0][retrieve[0]][None]),
        jnp.asarray(mask),
    )
    for a, b in zip(by_node, per_path, strict=True):
        np.testing.assert_array_equal(a, b)
    assert int(by_node.accept_len[0]) >= 1


# ----------------------------------------------------------------------------- sampling acceptance


def _random_tree(rng, *, m: int, v: int):
    """A random tree (distinct sibling tokens) with lexicographically sorted padded paths."""
    parents = np.zeros(m, np.int64)
    tokens = np.zeros(m, np.int64)
    tokens[0] = rng.integers(v)
    used: dict[int, set] = {}
    for n in range(1, m):
        while True:
            p = int(rng.integers(n))
            free = sorted(set(range(v)) - used.setdefault(p, set()))
            if free:
                break
        parents[n] = p
        tokens[n] = rng.choice(free)
        used[p].add(int(tokens[n]))
    depth = np.zeros(m, np.int64)
    for n in range(1, m):
        depth[n] = depth[parents[n]] + 1
    leaves = [n for n in range(1, m) if n not in set(parents[1:].tolist())]
    rows = []
    for leaf in leaves:
        path = [leaf]
        while path[-1]:
            path.append(int(parents[path[-1]]))
        rows.append(path[::-1])
    a = int(depth.max()) + 1
    rows = sorted(torch_ref_tree.pad_rows(rows, a), key=lambda r: [x if x >= 0 else m for x in r])
    rows = np.array(rows + [[-1] * a] * (m - 1 - len(rows)))  # pad to P = M - 1 rows
    mask = rows >= 0
    return {
        "parents": parents,
        "tokens": tokens,
        "retrieve": np.where(mask, rows, 0),
        "mask": mask,
        "rows": rows,
    }


# (temperature, top_p, top_k) settings; top-k/top-p ones make some draft children impossible.
SETTINGS = [(1.0, 1.0, 0), (0.7, 1.0, 0), (1.0, 0.8, 0), (1.3, 1.0, 3), (0.8, 0.9, 4)]


def _chi2_pvalue(counts: np.ndarray, probs: np.ndarray) -> float:
    n = counts.sum()
    assert n > 500, n
    support = probs > 0
    assert counts[~support].sum() == 0, "sampled a token the warped distribution excludes"
    expected = n * probs[support]
    stat = float(np.sum((counts[support] - expected) ** 2 / expected))
    dof = int(support.sum()) - 1
    return float(jax.scipy.stats.chi2.sf(stat, dof)) if dof > 0 else 1.0


# A fixed tree over V = 8: root(0) -> 1 (tok 2), 2 (tok 5), 3 (tok 0); 1 -> 4 (tok 3),
# 5 (tok 6); 4 -> 6 (tok 1). Lexicographic paths: [0,1,4,6], [0,1,5], [0,2], [0,3].
_TREE_TOKENS = np.array([4, 2, 5, 0, 3, 6, 1])
_TREE_PATHS = np.array([[0, 1, 4, 6], [0, 1, 5, -1], [0, 2, -1, -1], [0, 3, -1, -1]])


@pytest.mark.parametrize("temperature,top_p,top_k", SETTINGS)
def test_sampling_acceptance_is_lossless(temperature, top_p, top_k):
    v, n_rounds = 8, 40_000
    rng = np.random.default_rng(5)
    node_logits = rng.normal(size=(7, v)).astype(np.float32)
    # Make the path 2 -> 3 -> 1 likely enough that every depth gets many samples.
    node_logits[0, 2] += 2.5
    node_logits[1, 3] += 2.5
    node_logits[4, 1] += 2.5
    mask = _TREE_PATHS >= 0
    retrieve = np.where(mask, _TREE_PATHS, 0)

    # One batch row per round, each with its own seed; node n draws at position 10 + depth.
    def batch(x):
        return jnp.broadcast_to(jnp.asarray(x), (n_rounds,) + x.shape)

    depths = np.array([0, 1, 1, 1, 2, 2, 3])

    @jax.jit
    def accept(seeds, tokens, logits, retrieve, mask):
        targets = sampling.next_token(
            sampling.row_keys(seeds), 11 + jnp.broadcast_to(depths, tokens.shape), logits,
            greedy=False, temperature=temperature, top_p=top_p, top_k=top_k,
        )  # fmt: skip
        return sampling.accept_nodes(tokens, targets, retrieve, mask)

    out = accept(
        jnp.arange(n_rounds, dtype=jnp.uint32) + 1234,
        batch(_TREE_TOKENS),
        batch(node_logits),
        batch(retrieve),
        batch(mask),
    )
    best, accept_len, bonus = (np.asarray(x) for x in out)
    path_tokens = _TREE_TOKENS[retrieve]  # [P, A]
    # Emitted tokens after the root: accepted draft tokens along the best path, then the bonus.
    emitted = np.full((n_rounds, 4), -1)
    for depth in range(1, 4):
        on_path = accept_len >= depth
        emitted[on_path, depth - 1] = path_tokens[best[on_path], depth]
        emitted[accept_len == depth - 1, depth - 1] = bonus[accept_len == depth - 1]
    emitted[accept_len == 3, 3] = bonus[accept_len == 3]

    target = np.exp(np.asarray(sampling.warp(jnp.asarray(node_logits), temperature, top_p, top_k)))
    # Token at depth j, given the prefix reached node `node` (root, 2, 2->3, 2->3->1).
    for depth, (prefix, node) in enumerate([((), 0), ((2,), 1), ((2, 3), 4), ((2, 3, 1), 6)]):
        reached = np.all(emitted[:, : len(prefix)] == np.array(prefix, int), axis=1)
        counts = np.bincount(emitted[reached, depth], minlength=v)
        pvalue = _chi2_pvalue(counts, target[node])
        assert pvalue > 1e-3, (depth, counts, target[node])


def test_keyed_draws_depend_on_seed_and_position_only():
    """The same (seed, position, distribution) gives the same token in any row or tensor shape;
    another position or seed gives an independent draw."""
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=(64,)) * 0.3, jnp.float32)  # near-flat over 64 tokens
    seeds = jnp.asarray([7, 3, 7], jnp.uint32)
    keys = sampling.row_keys(seeds)
    positions = jnp.asarray([[5, 6, 7, 8]] * 3)
    grid = sampling.next_token(
        keys, positions, jnp.broadcast_to(logits, (3, 4, 64)), greedy=False, temperature=1.0
    )
    np.testing.assert_array_equal(grid[0], grid[2])  # rows 0 and 2 share seed 7
    assert not np.array_equal(grid[0], grid[1])
    assert len(set(np.asarray(grid[0]).tolist())) > 1  # positions draw independently
    # One token at a time (as vanilla decoding draws them) gives the same tokens.
    for j in range(4):
        one = sampling.next_token(
            keys, positions[:, j], jnp.broadcast_to(logits, (3, 64)), greedy=False,
            temperature=jnp.ones(3),
        )  # fmt: skip
        np.testing.assert_array_equal(one, grid[:, j])


def test_keyed_sample_draws_the_distribution_across_blocks():
    """The two-stage inverse-CDF draw over a vocabulary of many blocks (padded to a whole
    number of them), with excluded tokens in a block of their own and inside others."""
    v, n = 300, 120_000
    assert sampling._block_size(v) < v  # several blocks, the last one padded
    rng = np.random.default_rng(11)
    logits = rng.normal(size=(v,)).astype(np.float32) * 1.5
    logits[40:56] = -np.inf  # a whole excluded block (block size 16 here)
    logits[[3, 77, 299]] = -np.inf
    logits[120] += 4.0  # one block holds much of the mass
    logprobs = jax.nn.log_softmax(jnp.asarray(logits))
    draws = jax.jit(
        lambda lp: sampling.keyed_sample(
            sampling.row_keys(jnp.asarray([9], jnp.uint32)), jnp.arange(n)[None], lp
        )
    )(jnp.broadcast_to(logprobs, (1, n, v)))
    counts = np.bincount(np.asarray(draws).ravel(), minlength=v)
    assert counts.shape == (v,)  # never an index past the vocabulary
    assert _chi2_pvalue(counts, np.exp(np.asarray(logprobs, np.float64))) > 1e-3


def test_keyed_sample_never_draws_an_excluded_token_at_the_edges():
    """u at the ends of [0, 1): the first and the last token of positive mass, never a masked
    one beside them (nor padding past the vocabulary)."""
    logits = np.full((50,), -np.inf, np.float32)
    logits[[7, 33]] = 0.0
    logprobs = jax.nn.log_softmax(jnp.asarray(logits))
    out = sampling.keyed_sample(
        sampling.row_keys(jnp.arange(400, dtype=jnp.uint32)),
        jnp.broadcast_to(jnp.arange(8), (400, 8)),
        jnp.broadcast_to(logprobs, (400, 8, 50)),
    )
    assert set(np.unique(np.asarray(out)).tolist()) == {7, 33}
    weights = jnp.asarray(np.exp(np.asarray(logprobs)).reshape(1, 50))
    for u, want in [(0.0, 7), (0.4999, 7), (0.5001, 33), (np.nextafter(1, 0), 33), (1.0, 33)]:
        # u = 1 is past the contract: what a u that rounded up to the total would pick.
        assert int(sampling._inverse_cdf(weights, jnp.asarray([u], jnp.float32))[0]) == want


def test_argmax_is_the_first_maximum():
    rng = np.random.default_rng(2)
    x = rng.integers(-3, 3, size=(5, 4, 33)).astype(np.float32)  # many exact ties
    x[0, 0] = -np.inf
    x[0, 1, 5] = np.inf
    got = np.asarray(sampling.argmax(jnp.asarray(x)))
    np.testing.assert_array_equal(got, np.argmax(x, axis=-1))
    assert got.dtype == np.int32
