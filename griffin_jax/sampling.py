"""Logits processing, token sampling, and the speculative acceptance rules (greedy and sampling).

Mirrors transformers' `TemperatureLogitsWarper`, `TopKLogitsWarper` and `TopPLogitsWarper`
(applied in that order, as `GenerationMixin` does; the GRIFFIN/EAGLE reference's
`prepare_logits_processor` applies top-p before top-k, which only matters when both are set), and
the acceptance of the reference's `evaluate_posterior` (GRIFFIN spec 5.4 and 5.5) in an
equivalent, position-keyed form.

Position-keyed sampling: the token at absolute sequence index i of a row is drawn with the key
`fold_in(key(seed), i)` of that row's seed, in vanilla and speculative decoding alike. The draft
tree's tokens are deterministic top-k picks, so the reference's sibling-by-sibling rejection with
renormalisation (q = 1) accepts child c of a node with probability p(c), and emits a bonus from
the residual otherwise: the same distribution as drawing one token x ~ p at the node and
following the child equal to x, or emitting x as the bonus when no child matches. Drawing that x
with the position's key makes speculative sampling emit exactly the tokens vanilla sampling with
the same seed emits, whatever the tree, the batch or the draft (up to float round-off between
the two programs' logits: a draw whose uniform lies within round-off of a boundary of the
cumulative distribution may flip, as a greedy near-tie may). Greedy acceptance is the same walk
with x the argmax.

A draw is an inverse-CDF lookup in two stages (`keyed_sample`): two uniforms from the position's
key, the first picks a block of the vocabulary by the blocks' masses, the second a token inside
that block by its mass there. That is the exact distribution (the chain rule over blocks) at the
cost of two random numbers per draw; the Gumbel-max trick needs one per vocabulary entry, which
on a CPU cost more than a small model's decode step.

Conventions:
- Sampling knobs (temperature, top-p, top-k) are traced values (scalars or one per row), never
  static: changing them never recompiles. `top_k = 0` and `top_p = 1.0` switch a filter off.
- Temperature 0 (greedy) is a **static** choice of the caller (`greedy: bool`, STYLE R5.2):
  greedy paths never call `warp`, which requires temperature > 0. `greedy=None` mixes both per
  row (a server batch): rows with temperature 0 take the argmax, the others draw.
- Acceptance works on padded, static-shape paths: `candidates [B, P, A]` (root first), a validity
  mask `path_mask [B, P, A]` (row p is a real path iff `path_mask[:, p, 0]`), and the target
  (base) logits either per path `[B, P, A, V]` or per tree node `[B, M, V]` with the paths given
  as node indices `retrieve_idx [B, P, A]` (the `*_nodes` variants; they never materialise the
  per-path logits). Masked entries may hold any in-range value; nothing gathers with -1.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from griffin_jax import cpu_kernels


class Acceptance(NamedTuple):
    """What a verification round accepted, per row."""

    best_path: jax.Array  # [B] int32: the chosen path (row of candidates / retrieve_idx)
    accept_len: jax.Array  # [B] int32: accepted draft tokens on it (root excluded)
    bonus_token: jax.Array  # [B] int32: the token sampled (or argmax) after them


# ----------------------------------------------------------------------------- logits processing


def warp(
    logits: jax.Array,
    temperature: jax.Array | float,
    top_p: jax.Array | float,
    top_k: jax.Array | int,
) -> jax.Array:
    """Temperature, then top-k, then top-p; returns log-probabilities (masked entries = -inf).

    Matches transformers' TemperatureLogitsWarper -> TopKLogitsWarper -> TopPLogitsWarper (with
    min_tokens_to_keep = 1) followed by log_softmax. All knobs are traced.

    No sort: XLA's CPU sort of a 32k vocabulary costs milliseconds, more than a small model's
    decode step. Both thresholds are found exactly by bisection over the order-preserving
    integer keys of the floats (32 masked reductions each), and each filter is skipped under
    `lax.cond` when it is off. One deliberate difference from HF: tokens whose probabilities
    tie exactly at the top-p boundary are kept or dropped together, where HF's unstable sort
    drops an arbitrary subset of them.

    Args:
      logits: [..., V] (any float dtype; computed in f32).
      temperature: scalar or [...] broadcastable to logits.shape[:-1]; must be > 0.
      top_p: scalar or [...]; 1.0 = off. Drops the least likely tokens whose total probability
        (counting up from the least likely) stays <= 1 - top_p; the most likely always stays.
      top_k: scalar or [...] int; 0 = off. Keeps the top_k largest logits (and all ties with
        the k-th, as HF's `scores < kth` does).
    Returns:
      [..., V] f32 log-probabilities of the warped distribution.
    """
    logits = logits.astype(jnp.float32)
    batch_shape = logits.shape[:-1]
    temperature = jnp.broadcast_to(jnp.asarray(temperature, jnp.float32), batch_shape)[..., None]
    top_p = jnp.broadcast_to(jnp.asarray(top_p, jnp.float32), batch_shape)[..., None]
    top_k = jnp.broadcast_to(jnp.asarray(top_k, jnp.int32), batch_shape)[..., None]
    scores = logits / temperature
    # Skip a filter that is off everywhere (a real branch for scalar knobs, a select under vmap).
    scores = jax.lax.cond(jnp.any(top_k > 0), _top_k_filter, _unchanged, scores, top_k)
    scores = jax.lax.cond(jnp.any(top_p < 1.0), _top_p_filter, _unchanged, scores, top_p)
    return jax.nn.log_softmax(scores, axis=-1)


def _unchanged(scores: jax.Array, _: jax.Array) -> jax.Array:
    return scores


def _ordered_key(x: jax.Array) -> jax.Array:
    """f32 -> uint32 with the same order (-0.0 just below +0.0)."""
    bits = jax.lax.bitcast_convert_type(x, jnp.int32)
    signed = jnp.where(bits < 0, bits ^ jnp.int32(0x7FFFFFFF), bits)
    return jax.lax.bitcast_convert_type(signed, jnp.uint32) ^ jnp.uint32(0x80000000)


def _top_k_filter(scores: jax.Array, top_k: jax.Array) -> jax.Array:
    """TopKLogitsWarper: -inf where score < the k-th largest (k = 0 rows untouched)."""
    keys = _ordered_key(scores)
    k = jnp.clip(top_k, 1, scores.shape[-1])

    # Largest key t with count(keys >= t) >= k, i.e. the k-th largest score's key.
    def body(_, lo_hi):
        lo, hi = lo_hi
        gap = hi - lo
        mid = lo + gap // 2 + gap % 2
        ok = jnp.sum(keys >= mid, axis=-1, keepdims=True) >= k
        return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid - 1)

    lo = jnp.zeros(k.shape, jnp.uint32)
    hi = jnp.full(k.shape, 0xFFFFFFFF, jnp.uint32)
    kth, _ = jax.lax.fori_loop(0, 32, body, (lo, hi))
    return jnp.where((top_k > 0) & (keys < kth), -jnp.inf, scores)


def _top_p_filter(scores: jax.Array, top_p: jax.Array) -> jax.Array:
    """TopPLogitsWarper: -inf on the largest low-probability set of mass <= 1 - top_p."""
    probs = jax.nn.softmax(scores, axis=-1)
    keys = jax.lax.bitcast_convert_type(probs, jnp.int32)  # probs >= 0: int order = float order
    budget = 1.0 - top_p

    # Largest key t with sum(probs[keys <= t]) <= budget (HF: ascending cumsum <= 1 - top_p).
    def body(_, lo_hi):
        lo, hi = lo_hi
        mid = lo + (hi - lo + 1) // 2
        ok = jnp.sum(jnp.where(keys <= mid, probs, 0.0), axis=-1, keepdims=True) <= budget
        return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid - 1)

    lo = jnp.full(top_p.shape, -1, jnp.int32)
    hi = jnp.full(top_p.shape, 0x7F800000, jnp.int32)
    cut, _ = jax.lax.fori_loop(0, 32, body, (lo, hi))
    is_max = scores >= jnp.max(scores, axis=-1, keepdims=True)
    return jnp.where((top_p < 1.0) & (keys <= cut) & ~is_max, -jnp.inf, scores)


def row_keys(seeds: jax.Array) -> jax.Array:
    """[B] PRNG keys, one per row, from [B] integer seeds (traced)."""
    return jax.vmap(jax.random.key)(seeds)


def argmax(x: jax.Array) -> jax.Array:
    """int32 index of the first maximum over the last axis (`jnp.argmax`'s answer for finite
    inputs). On one CPU device, one pass of the project's kernel (`cpu_kernels.argmax`);
    elsewhere a max and a min over an index, two plain reductions that vectorize, where XLA's
    CPU argmax (a reduction over value-index pairs) runs at half the speed."""
    if (kernel := cpu_kernels.argmax(x)) is not None:
        return kernel
    top = jnp.max(x, axis=-1, keepdims=True)
    index = jax.lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1)
    first = jnp.min(jnp.where(x == top, index, x.shape[-1]), axis=-1)
    return jnp.minimum(first, x.shape[-1] - 1)  # a NaN row: some index, never out of range


def _block_size(vocab: int) -> int:
    """A power of two near sqrt(vocab), at least 16: the two lookup stages cost alike."""
    return max(16, 1 << round(math.log2(max(vocab, 1)) / 2))


def _inverse_cdf(weights: jax.Array, u: jax.Array) -> jax.Array:
    """Index of the first entry of positive weight whose cumulative weight exceeds u x total
    ([..., N] weights >= 0, [...] u in [0, 1)); the last positive entry if round-off leaves
    none. Never an entry of weight 0."""
    cum = jnp.cumsum(weights, axis=-1)
    index = jax.lax.broadcasted_iota(jnp.int32, weights.shape, weights.ndim - 1)
    above = (cum > (u * cum[..., -1])[..., None]) & (weights > 0)
    first = jnp.min(jnp.where(above, index, weights.shape[-1]), axis=-1)
    return jnp.minimum(first, jnp.max(jnp.where(weights > 0, index, 0), axis=-1))


def keyed_sample(keys: jax.Array, positions: jax.Array, logprobs: jax.Array) -> jax.Array:
    """Tokens drawn from `logprobs` [B, ..., V], each with its row key folded with its position.

    Two inverse-CDF stages (module docstring): a block of the vocabulary by the blocks' masses,
    then a token in it by its mass there. Each stage resolves its own masses to f32's 2^-24
    of the total it searches, so a token's chance is off by at most ~2^-24 of its block's mass.

    Args:
      keys: [B] row keys (`row_keys`).
      positions: [B, ...] int32 absolute sequence index of each token drawn.
      logprobs: [B, ..., V] (masked entries -inf; at least one finite).
    Returns:
      [B, ...] int32.
    """
    vocab = logprobs.shape[-1]
    block = _block_size(vocab)
    n_blocks = -(-vocab // block)

    def row_uniforms(key, pos):  # [..., 2]: the position's key, two uniforms
        flat = jax.vmap(lambda q: jax.random.uniform(jax.random.fold_in(key, q), (2,)))
        return flat(pos.reshape(-1)).reshape(pos.shape + (2,))

    uniforms = jax.vmap(row_uniforms)(keys, positions)
    probs = jnp.exp(logprobs.astype(jnp.float32))
    probs = jnp.pad(probs, [(0, 0)] * (probs.ndim - 1) + [(0, n_blocks * block - vocab)])
    probs = probs.reshape(probs.shape[:-1] + (n_blocks, block))
    chosen = _inverse_cdf(jnp.sum(probs, axis=-1), uniforms[..., 0])  # [B, ...]
    inside = jnp.take_along_axis(probs, chosen[..., None, None], axis=-2)[..., 0, :]
    return chosen * block + _inverse_cdf(inside, uniforms[..., 1])


def next_token(
    keys: jax.Array,
    positions: jax.Array,
    logits: jax.Array,
    *,
    greedy: bool | None,
    temperature: jax.Array | float = 1.0,
    top_p: jax.Array | float = 1.0,
    top_k: jax.Array | int = 0,
) -> jax.Array:
    """Argmax (static `greedy`) or a position-keyed draw from the warped distribution.

    Args:
      keys: [B] row keys.  positions: [B, ...] sequence index of each token to draw.
      logits: [B, ..., V].  temperature / top_p / top_k: scalars or [B] (see `warp`).
      greedy: True = argmax, False = draw, None = per row (argmax where temperature is 0).
    Returns:
      [B, ...] int32.
    """
    return draws(
        keys, positions, logits, greedy=greedy, temperature=temperature, top_p=top_p,
        top_k=top_k,
    )[0]  # fmt: skip


def draws(
    keys: jax.Array,
    positions: jax.Array,
    logits: jax.Array,
    *,
    greedy: bool | None,
    temperature: jax.Array | float = 1.0,
    top_p: jax.Array | float = 1.0,
    top_k: jax.Array | int = 0,
) -> tuple[jax.Array, jax.Array | None]:
    """`next_token`, and the warped log-probs it drew from ([B, ..., V]; None when greedy is
    True; a greedy row of a mixed batch holds its temperature-1 log-probs, which no draw
    read)."""
    top = argmax(logits)
    if greedy:
        return top, None
    extra = (1,) * (logits.ndim - 2)  # per-row knobs broadcast over the token axes
    knobs = [jnp.asarray(x) for x in (temperature, top_p, top_k)]
    knobs = [x.reshape(x.shape + extra) if x.ndim == 1 else x for x in knobs]
    if greedy is None:
        hot = knobs[0] > 0
        knobs[0] = jnp.where(hot, knobs[0], 1.0)  # warp divides by it
        logprobs = warp(logits, *knobs)
        drawn = keyed_sample(keys, positions, logprobs)
        return jnp.where(jnp.broadcast_to(hot, top.shape), drawn, top), logprobs
    logprobs = warp(logits, *knobs)
    return keyed_sample(keys, positions, logprobs), logprobs


def parent_draw_chance(
    draft_tokens: jax.Array,
    parents: jax.Array,
    node_targets: jax.Array,
    logprobs: jax.Array | None,
    temperature: jax.Array | float,
) -> jax.Array:
    """[B, M] f32: the chance that the base's token after node parents[n] is draft_tokens[n],
    i.e. that the walk goes on from the parent to node n once it reached the parent.

    Greedy rows (temperature 0, or `logprobs` None): 1 where the parent's target (argmax) is
    the node's token, else 0, what the round saw. Sampled rows: the warped probability itself,
    the expectation of that 0/1 outcome over the draw (no draw's luck in it). Entry 0 (the
    root) means nothing.

    Args:
      draft_tokens, parents: [B, M] int32 (`tree.Tree`).  node_targets: [B, M] int32 the base's
        token after each node.  logprobs: [B, M, V] warped log-probs at each node (`draws`).
      temperature: scalar or [B].
    """
    at_parent = jnp.take_along_axis(node_targets, parents, axis=1)
    seen = (at_parent == draft_tokens).astype(jnp.float32)
    if logprobs is None:
        return seen
    chance = jnp.exp(jax.vmap(lambda lp, p, t: lp[p, t])(logprobs, parents, draft_tokens))
    hot = jnp.asarray(temperature) > 0
    hot = hot[:, None] if hot.ndim == 1 else hot
    return jnp.where(hot, chance, seen)


# ----------------------------------------------------------------------------- acceptance


def _accept_from_targets(
    candidates: jax.Array, targets: jax.Array, path_mask: jax.Array
) -> Acceptance:
    """The longest run of path tokens equal to the target token at their parent.

    candidates, targets: [B, P, A] (targets[..., j] = the base's token after position j).
    """
    match = (candidates[:, :, 1:] == targets[:, :, :-1]) & path_mask[:, :, 1:]  # [B, P, A-1]
    run = jnp.sum(jnp.cumprod(match.astype(jnp.int32), axis=-1), axis=-1)  # [B, P]
    run = jnp.where(path_mask[:, :, 0], run, -1)  # padded rows never win
    best = jnp.argmax(run, axis=-1).astype(jnp.int32)  # first maximum, like torch.argmax
    accept_len = jnp.take_along_axis(run, best[:, None], axis=1)[:, 0]
    best_targets = jnp.take_along_axis(targets, best[:, None, None], axis=1)[:, 0]  # [B, A]
    bonus = jnp.take_along_axis(best_targets, accept_len[:, None], axis=1)[:, 0]
    return Acceptance(best, accept_len.astype(jnp.int32), bonus.astype(jnp.int32))


def greedy_accept(
    candidates: jax.Array, target_logits: jax.Array, path_mask: jax.Array
) -> Acceptance:
    """Greedy acceptance (spec 5.4): the longest run of draft tokens equal to the base argmax.

    Args:
      candidates: [B, P, A] int32 tokens of each padded path, root first.
      target_logits: [B, P, A, V] base logits at each path position.
      path_mask: [B, P, A] bool validity (row p exists iff path_mask[:, p, 0]; row 0 must).
    Returns:
      Acceptance: best_path = first path with the longest run, accept_len = that run,
      bonus_token = argmax of the base logits right after it.
    """
    target_argmax = argmax(target_logits)  # [B, P, A]
    return _accept_from_targets(candidates, target_argmax, path_mask)


def accept_nodes(
    draft_tokens: jax.Array,
    node_targets: jax.Array,
    retrieve_idx: jax.Array,
    path_mask: jax.Array,
) -> Acceptance:
    """Acceptance on per-node target tokens: follow the child equal to its parent's target.

    With `node_targets` the base argmax per node this is greedy acceptance (spec 5.4); with
    position-keyed draws from the warped base distribution (`next_token`) it is lossless
    sampling acceptance (see the module docstring). Siblings hold distinct tokens, so the
    accepted prefix is unique; the bonus is the target token after it.

    Args:
      draft_tokens: [B, M] int32 tree tokens (root first).
      node_targets: [B, M] int32 the base's next token after each tree node.
      retrieve_idx: [B, P, A] int32 node indices of each path (padding in range).
      path_mask: [B, P, A] bool.
    """
    candidates = _gather_paths(draft_tokens, retrieve_idx)
    targets = _gather_paths(node_targets, retrieve_idx)
    return _accept_from_targets(candidates, targets, path_mask)


def _gather_paths(per_node: jax.Array, retrieve_idx: jax.Array) -> jax.Array:
    """[B, M] values -> [B, P, A] values along the paths."""
    b, p, a = retrieve_idx.shape
    flat = jnp.take_along_axis(per_node, retrieve_idx.reshape(b, p * a), axis=1)
    return flat.reshape(b, p, a)
