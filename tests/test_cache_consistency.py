"""T3 cache consistency: every way of filling the KV cache gives what one causal forward gives.

- prefill + k one-token decodes == one full forward;
- tree verification (tree tokens at slots length.., positions length + depth, mask from
  `tree_mask_to_cache`) == each root-to-leaf branch run as its own causal forward;
- `commit_path` leaves the same cache as feeding the accepted tokens one by one;
- a right-padded batch of different lengths == each row run alone, unpadded.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from griffin_jax.config import ModelConfig
from griffin_jax.kv_cache import causal_mask, commit_path, init_cache, tree_mask_to_cache
from griffin_jax.model import forward, init_params

CFG = ModelConfig(
    family="llama",
    vocab_size=128,
    d_model=64,
    n_layers=2,
    n_heads=4,
    n_kv_heads=2,
    head_dim=16,
    d_ff=96,
)
CAPACITY = 32
ATOL = 2e-5

# A 7-node tree: 0 is the root; parents 0<-1, 0<-2, 1<-3, 1<-4, 2<-5, 3<-6.
TREE_MASK = np.array(
    [
        [1, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0],
        [1, 0, 1, 0, 0, 0, 0],
        [1, 1, 0, 1, 0, 0, 0],
        [1, 1, 0, 0, 1, 0, 0],
        [1, 0, 1, 0, 0, 1, 0],
        [1, 1, 0, 1, 0, 0, 1],
    ],
    bool,
)
DEPTH = np.array([0, 1, 1, 2, 2, 2, 3], np.int32)
BRANCHES = ([0, 1, 4], [0, 2, 5], [0, 1, 3, 6])  # root-to-leaf paths

_forward = jax.jit(forward, static_argnames=("cfg",))


@pytest.fixture(scope="module")
def params():
    return init_params(CFG, jax.random.key(0))


def _tokens(seed: int, shape: tuple[int, ...]) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, CFG.vocab_size, shape).astype(np.int32)


def _causal(params, cache, tokens, start):
    """Runs tokens [B, T] written at per-row slots `start` [B], positions start.., causal mask."""
    tokens = jnp.asarray(tokens)
    b, t = tokens.shape
    start = jnp.asarray(start, jnp.int32)
    positions = start[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
    mask = causal_mask(start, t, cache.capacity)
    return _forward(params, tokens, positions, cache, write_idx=start, mask=mask, cfg=CFG)


def _alone(params, tokens_1d, pad_to):
    """Logits [T, V] of one row run alone from position 0 (right-padded to `pad_to`)."""
    t = len(tokens_1d)
    padded = np.zeros((1, pad_to), np.int32)
    padded[0, :t] = tokens_1d
    logits, _, _ = _causal(params, init_cache(CFG, 1, CAPACITY), padded, [0])
    return np.asarray(logits[0, :t])


def test_prefill_then_decodes_match_full_forward(params):
    tokens = _tokens(0, (2, 24))
    full_logits, full_hidden, full_cache = _causal(
        params, init_cache(CFG, 2, CAPACITY), tokens, [0, 0]
    )
    logits, _, cache = _causal(params, init_cache(CFG, 2, CAPACITY), tokens[:, :16], [0, 0])
    np.testing.assert_allclose(logits, full_logits[:, :16], atol=ATOL, rtol=0)
    for i in range(16, 24):
        logits, hidden, cache = _causal(params, cache, tokens[:, i : i + 1], [i, i])
        np.testing.assert_allclose(logits[:, 0], full_logits[:, i], atol=ATOL, rtol=0)
        np.testing.assert_allclose(hidden[:, 0], full_hidden[:, i], atol=ATOL, rtol=0)
    np.testing.assert_allclose(cache.k[:, :, :24], full_cache.k[:, :, :24], atol=ATOL, rtol=0)
    np.testing.assert_allclose(cache.v[:, :, :24], full_cache.v[:, :, :24], atol=ATOL, rtol=0)
    assert int(jnp.max(cache.length)) == 0  # forwards never move lengths


def _prefill_and_verify(params):
    """Right-padded prompts of lengths 10 and 13, then the 7-node tree verified against them."""
    lengths = np.array([10, 13], np.int32)
    prompts = _tokens(1, (2, 13))
    prompts[0, 10:] = 0  # right padding: garbage K/V past length[0], overwritten by the tree
    cache = init_cache(CFG, 2, CAPACITY)
    _, _, cache = _causal(params, cache, prompts, [0, 0])
    cache = cache.replace(length=jnp.asarray(lengths))
    tree_tokens = _tokens(2, (2, 7))
    tree_mask = jnp.asarray(np.broadcast_to(TREE_MASK, (2, 7, 7)))
    positions = jnp.asarray(lengths[:, None] + DEPTH[None, :])
    mask = tree_mask_to_cache(cache.length, tree_mask, CAPACITY)
    logits, hidden, cache = _forward(
        params,
        jnp.asarray(tree_tokens),
        positions,
        cache,
        write_idx=cache.length,
        mask=mask,
        cfg=CFG,
    )
    return prompts, lengths, tree_tokens, np.asarray(logits), cache


def test_tree_verification_matches_each_branch(params):
    prompts, lengths, tree_tokens, tree_logits, _ = _prefill_and_verify(params)
    for b in range(2):
        for branch in BRANCHES:
            sequence = np.concatenate([prompts[b, : lengths[b]], tree_tokens[b, branch]])
            alone = _alone(params, sequence, pad_to=20)
            np.testing.assert_allclose(
                tree_logits[b, branch], alone[lengths[b] :], atol=ATOL, rtol=0
            )


def test_commit_path_matches_sequential_cache(params):
    prompts, lengths, tree_tokens, _, tree_cache = _prefill_and_verify(params)
    # Row 0 accepts the deepest branch whole; row 1 keeps the root and node 2 of [0, 2, 5].
    src_idx = np.array([[0, 1, 3, 6], [0, 2, 5, 0]], np.int32)
    num_accepted = np.array([4, 2], np.int32)
    committed = commit_path(tree_cache, jnp.asarray(src_idx), jnp.asarray(num_accepted))
    np.testing.assert_array_equal(committed.length, lengths + num_accepted)

    sequential = init_cache(CFG, 2, CAPACITY)
    _, _, sequential = _causal(params, sequential, prompts, [0, 0])
    accepted = np.take_along_axis(tree_tokens, src_idx, axis=1)  # [B, A]
    for a in range(src_idx.shape[1]):
        # Rows past their num_accepted write beyond the compared slots.
        _, _, sequential = _causal(params, sequential, accepted[:, a : a + 1], lengths + a)
    for b in range(2):
        n = lengths[b] + num_accepted[b]
        np.testing.assert_allclose(committed.k[:, b, :n], sequential.k[:, b, :n], atol=ATOL, rtol=0)
        np.testing.assert_allclose(committed.v[:, b, :n], sequential.v[:, b, :n], atol=ATOL, rtol=0)


def test_right_padded_batch_matches_unpadded_rows(params):
    lengths = np.array([5, 12, 9], np.int32)
    prompts = _tokens(3, (3, 12))
    for b, n in enumerate(lengths):
        prompts[b, n:] = 0
    cache = init_cache(CFG, 3, CAPACITY)
    logits, _, cache = _causal(params, cache, prompts, [0, 0, 0])
    next_tokens = _tokens(4, (3, 1))
    step_logits, _, _ = _causal(params, cache, next_tokens, lengths)
    for b, n in enumerate(lengths):
        alone = _alone(params, np.concatenate([prompts[b, :n], next_tokens[b]]), pad_to=n + 1)
        np.testing.assert_allclose(logits[b, :n], alone[:n], atol=ATOL, rtol=0)
        np.testing.assert_allclose(step_logits[b, 0], alone[n], atol=ATOL, rtol=0)
