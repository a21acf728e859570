"""EAGLE-2 tree construction vs a PyTorch version of spec 5.2, on fixed per-node draft logits.

The fake draft below looks its logits up in a table indexed by a hash of what it can see:
the draft-cache entries its attention mask lets through (tokens weighted by their RoPE
positions) plus its input feature. A wrong mask, position, write slot or feature routing
therefore changes the logits, so matching the reference tests the plumbing too.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch_ref_tree

from griffin_jax import checks
from griffin_jax import tree as tree_lib

R = 97  # hash range = table rows
V = 32


def _write(buf, new, start):
    return jax.vmap(lambda c, n, s: jax.lax.dynamic_update_slice_in_dim(c, n, s, axis=0))(
        buf, new, start
    )


def fake_draft_step(table, weights, features, tokens, positions, cache, write_idx, mask):
    """Table-lookup draft: logits = table[(hash(visible) + 3 * feature) % R]."""
    tok_buf, pos_buf = cache
    tok_buf = _write(tok_buf, tokens, write_idx)
    pos_buf = _write(pos_buf, positions, write_idx)
    contrib = (tok_buf + 1) * weights[pos_buf]  # [B, S]
    h = jnp.sum(jnp.where(mask, contrib[:, None, :], 0), axis=-1) % R  # [B, K]
    idx = (h + 3 * features[..., 0].astype(jnp.int32)) % R
    return table[idx], h[..., None].astype(jnp.float32), (tok_buf, pos_buf)


class Case:
    """Random fixed-logit inputs for a batch of rows with their own trunk lengths."""

    def __init__(self, seed, *, batch, top_k, depth, total_tokens, ties):
        rng = np.random.default_rng(seed)
        self.k, self.d, self.m = top_k, depth, total_tokens
        self.trunk = rng.integers(1, 9, size=batch)
        self.capacity = int(self.trunk.max()) + top_k * depth + 3
        self.weights = rng.integers(1, R, size=self.capacity + depth + 2)
        self.table = self._logits(rng, (R, V), ties)
        self.root_logits = self._logits(rng, (batch, V), ties)
        self.root_logp = np.asarray(jax.nn.log_softmax(self.root_logits, axis=-1))
        self.root_feature = rng.integers(0, R, size=batch)
        self.root_token = rng.integers(0, V, size=batch)
        # Trunk tokens/positions, then garbage that the masks must hide.
        self.tok_buf = rng.integers(0, V, size=(batch, self.capacity))
        self.pos_buf = rng.integers(0, self.capacity, size=(batch, self.capacity))
        for b, p in enumerate(self.trunk):
            self.pos_buf[b, :p] = np.arange(p)

    @staticmethod
    def _logits(rng, shape, ties):
        if not ties:
            return rng.normal(size=shape).astype(np.float32) * 2
        # 1 or 3 equally likely tokens per row, the rest ~impossible: exact log-prob ties
        # within rows and exact parent/child score ties (log-prob 0) across levels.
        out = np.full(shape, -30.0, np.float32)
        flat = out.reshape(-1, shape[-1])
        for row in flat:
            n = rng.choice([1, 1, 3])
            row[rng.choice(shape[-1], size=n, replace=False)] = 0.0
        return out

    def run_jax(self, *, lexicographic, rows=None):
        rows = np.arange(len(self.trunk)) if rows is None else np.asarray(rows)
        step = functools.partial(
            fake_draft_step, jnp.asarray(self.table), jnp.asarray(self.weights)
        )
        cache = (
            jnp.asarray(self.tok_buf[rows], jnp.int32),
            jnp.asarray(self.pos_buf[rows], jnp.int32),
        )
        fn = jax.jit(
            functools.partial(
                tree_lib.build_tree,
                step,
                top_k=self.k,
                depth=self.d,
                total_tokens=self.m,
                capacity=self.capacity,
                lexicographic_paths=lexicographic,
            )
        )
        tree, _ = fn(
            jnp.asarray(self.root_logp[rows]),
            jnp.asarray(self.root_feature[rows, None], jnp.float32),
            jnp.asarray(self.root_token[rows], jnp.int32),
            jnp.asarray(self.trunk[rows], jnp.int32),
            cache,
        )
        return jax.tree.map(np.asarray, tree)

    def node_logits_fn(self, b):
        """What the draft computes for the node reached by `path` in row b."""
        p = int(self.trunk[b])
        trunk_sum = int(np.sum((self.tok_buf[b, :p] + 1) * self.weights[:p]))

        def h(path):
            if not path:
                return int(self.root_feature[b])
            s = trunk_sum + sum((t + 1) * int(self.weights[p + d]) for d, t in enumerate(path))
            return s % R

        def node_logits(path):
            return torch.from_numpy(self.table[(h(path) + 3 * h(path[:-1])) % R])

        return node_logits

    def run_ref(self, b, *, sampling):
        return torch_ref_tree.topk_generate(
            torch.tensor(self.root_logp[b]),
            int(self.root_token[b]),
            self.node_logits_fn(b),
            top_k=self.k,
            depth=self.d,
            total_tokens=self.m,
            sampling=sampling,
        )


def assert_matches_reference(tree, b, ref):
    np.testing.assert_array_equal(tree.draft_tokens[b], ref["draft_tokens"].numpy())
    np.testing.assert_array_equal(tree.parents[b], ref["parents"].numpy())
    np.testing.assert_array_equal(tree.tree_mask[b], ref["tree_mask"].numpy())
    np.testing.assert_array_equal(tree.depths[b], ref["positions"].numpy())
    ref_paths = ref["retrieve_indices"].numpy()
    n_leaves, width = ref_paths.shape
    valid = tree.path_valid[b]
    assert valid[:n_leaves].all() and not valid[n_leaves:].any()
    ours = np.where(tree.path_mask[b], tree.retrieve_idx[b], -1)
    np.testing.assert_array_equal(ours[:n_leaves, :width], ref_paths)
    assert (ours[:, width:] == -1).all()
    assert (tree.retrieve_idx[b] >= 0).all() and (
        tree.retrieve_idx[b] < tree.draft_tokens.shape[1]
    ).all()


SIZES = [(4, 3, 20), (3, 4, 12), (2, 2, 11), (10, 5, 60)]


@pytest.mark.parametrize("top_k,depth,total_tokens", SIZES)
@pytest.mark.parametrize("sampling", [False, True])
def test_tree_matches_torch_reference(top_k, depth, total_tokens, sampling):
    case = Case(
        top_k * 100 + depth,
        batch=3,
        top_k=top_k,
        depth=depth,
        total_tokens=total_tokens,
        ties=False,
    )
    tree = case.run_jax(lexicographic=sampling)
    for b in range(3):
        assert_matches_reference(tree, b, case.run_ref(b, sampling=sampling))


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("sampling", [False, True])
def test_tree_matches_torch_reference_under_ties(seed, sampling):
    case = Case(seed, batch=3, top_k=4, depth=4, total_tokens=30, ties=True)
    tree = case.run_jax(lexicographic=sampling)
    for b in range(3):
        assert_matches_reference(tree, b, case.run_ref(b, sampling=sampling))


@pytest.mark.parametrize("seed", range(4))
def test_parent_always_selected_under_ties(seed):
    # Every node's token path must be a chain of top-k picks of the draft along that very path:
    # a node attached to the wrong parent (spec 8.10) breaks the chain.
    case = Case(10 + seed, batch=2, top_k=3, depth=5, total_tokens=25, ties=True)
    tree = case.run_jax(lexicographic=False)
    for b in range(2):
        node_logits = case.node_logits_fn(b)
        parents, tokens, depths = tree.parents[b], tree.draft_tokens[b], tree.depths[b]
        for n in range(1, case.m):
            assert parents[n] < n and depths[n] == depths[parents[n]] + 1
            path, node = [], n
            while node != 0:
                path.append(int(tokens[node]))
                node = parents[node]
            path = path[::-1]
            logp = torch.tensor(case.root_logp[b])
            for j, tok in enumerate(path):
                if j:
                    logp = torch.log_softmax(node_logits(tuple(path[:j])), -1)
                kept = torch_ref_tree.stable_topk(logp, case.k)[1].tolist()
                assert tok in kept, (b, n, path)


@pytest.mark.parametrize("depth,total_tokens", [(0, 2), (2, 4), (5, 7), (6, 5)])
@pytest.mark.parametrize("ties", [False, True])
def test_a_chain_is_one_path_in_node_order(depth, total_tokens, ties):
    # The engine commits a top_k=1 tree without moving entries (`speculative._tree_round`):
    # that needs node i at depth i and the one path 0, 1, ..., M-1, ties or not.
    case = Case(depth * 10 + total_tokens, batch=3, top_k=1, depth=depth,
                total_tokens=total_tokens, ties=ties)  # fmt: skip
    for lexicographic in (False, True):
        tree = case.run_jax(lexicographic=lexicographic)
        m = total_tokens
        np.testing.assert_array_equal(tree.depths, np.tile(np.arange(m), (3, 1)))
        np.testing.assert_array_equal(tree.parents[:, 1:], np.tile(np.arange(m - 1), (3, 1)))
        assert tree.path_valid[:, 0].all() and not tree.path_valid[:, 1:].any()
        np.testing.assert_array_equal(tree.retrieve_idx[:, 0, :m], np.tile(np.arange(m), (3, 1)))
        assert tree.path_mask[:, 0, :m].all() and not tree.path_mask[:, 0, m:].any()


def test_batch_rows_are_independent():
    case = Case(7, batch=3, top_k=4, depth=3, total_tokens=20, ties=False)
    together = case.run_jax(lexicographic=True)
    for b in range(3):
        alone = case.run_jax(lexicographic=True, rows=[b])
        for name in ("draft_tokens", "parents", "tree_mask", "depths", "retrieve_idx", "path_mask"):
            np.testing.assert_array_equal(getattr(together, name)[b], getattr(alone, name)[0])


def test_verify_positions_and_mask():
    case = Case(3, batch=2, top_k=3, depth=2, total_tokens=8, ties=False)
    tree = case.run_jax(lexicographic=False)
    tree = jax.tree.map(jnp.asarray, tree)
    committed = jnp.array([5, 9], jnp.int32)
    pos = np.asarray(tree_lib.verify_positions(tree, committed))
    np.testing.assert_array_equal(pos, np.asarray(committed)[:, None] + np.asarray(tree.depths))
    mask = np.asarray(tree_lib.verify_mask(tree, committed, 24))
    for b, length in enumerate([5, 9]):
        assert mask[b, :, :length].all()
        np.testing.assert_array_equal(
            mask[b, :, length : length + 8], np.asarray(tree.tree_mask[b])
        )
        assert not mask[b, :, length + 8 :].any()


def test_tree_sizes_check():
    checks.tree_sizes(top_k=10, depth=5, total_tokens=60, vocab_size=100)
    checks.tree_sizes(top_k=3, depth=0, total_tokens=4, vocab_size=100)  # one drafted level
    with pytest.raises(ValueError, match="total_tokens"):
        checks.tree_sizes(top_k=2, depth=2, total_tokens=12, vocab_size=100)
    with pytest.raises(ValueError, match="total_tokens"):
        checks.tree_sizes(top_k=3, depth=0, total_tokens=5, vocab_size=100)
    with pytest.raises(ValueError, match="vocabulary"):
        checks.tree_sizes(top_k=20, depth=2, total_tokens=12, vocab_size=10)
    with pytest.raises(ValueError, match="top_k"):
        checks.tree_sizes(top_k=0, depth=2, total_tokens=12)
    with pytest.raises(ValueError, match="depth"):
        checks.tree_sizes(top_k=2, depth=-1, total_tokens=2)


def test_tree_levels_run_at_the_trunk_position():
    """Level i is written at slots P + K*i and runs at RoPE position `trunk_position` + i
    (P + i unless positions were left out of the trunk: `SpecState.trunk_skipped`)."""
    case = Case(0, batch=3, top_k=2, depth=3, total_tokens=7, ties=False)
    step = functools.partial(fake_draft_step, jnp.asarray(case.table), jnp.asarray(case.weights))
    trunk = jnp.asarray(case.trunk, jnp.int32)
    skipped = jnp.asarray([0, 5, 40], jnp.int32)
    _, (_, pos_buf) = tree_lib.build_tree(
        step, jnp.asarray(case.root_logp), jnp.asarray(case.root_feature[:, None], jnp.float32),
        jnp.asarray(case.root_token, jnp.int32), trunk,
        (jnp.asarray(case.tok_buf, jnp.int32), jnp.asarray(case.pos_buf, jnp.int32)),
        top_k=2, depth=3, total_tokens=7, capacity=case.capacity, lexicographic_paths=False,
        trunk_position=trunk + skipped,
    )  # fmt: skip
    for b, p in enumerate(case.trunk):
        want = np.repeat(p + int(skipped[b]) + np.arange(3), 2)
        np.testing.assert_array_equal(np.asarray(pos_buf)[b, p : p + 6], want)
        np.testing.assert_array_equal(np.asarray(pos_buf)[b, :p], np.arange(p))  # trunk kept
