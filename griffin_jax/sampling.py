"""Logits processing, token sampling, and the speculative acceptance rules (greedy and sampling).

Mirrors transformers' `TemperatureLogitsWarper`, `TopKLogitsWarper` and `TopPLogitsWarper`
(applied in that order, as `GenerationMixin` does; the GRIFFIN/EAGLE reference's
`prepare_logits_processor` applies top-p before top-k, which only matters when both are set), and
the reference's `evaluate_posterior` (GRIFFIN spec 5.4 and 5.5).

Conventions:
- Sampling knobs (temperature, top-p, top-k) are traced values (scalars or one per row), never
  static: changing them never recompiles. `top_k = 0` and `top_p = 1.0` switch a filter off.
- Temperature 0 (greedy) is a **static** choice of the caller (`greedy: bool`, STYLE R5.2):
  greedy paths never call `warp`, which requires temperature > 0.
- Acceptance works on padded, static-shape paths: `candidates [B, P, A]` (root first), a validity
  mask `path_mask [B, P, A]` (row p is a real path iff `path_mask[:, p, 0]`), and the target
  (base) logits either per path `[B, P, A, V]` or per tree node `[B, M, V]` with the paths given
  as node indices `retrieve_idx [B, P, A]` (the `*_nodes` variants; they never materialise the
  per-path logits). Masked entries may hold any in-range value; nothing gathers with -1.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


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


def sample(key: jax.Array, logprobs: jax.Array) -> jax.Array:
    """One token per row from log-probabilities [..., V] -> [...] int32."""
    return jax.random.categorical(key, logprobs, axis=-1).astype(jnp.int32)


def next_token(
    key: jax.Array,
    logits: jax.Array,
    *,
    greedy: bool,
    temperature: jax.Array | float = 1.0,
    top_p: jax.Array | float = 1.0,
    top_k: jax.Array | int = 0,
) -> jax.Array:
    """Argmax (static `greedy`) or a sample from the warped distribution; logits [..., V]."""
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return sample(key, warp(logits, temperature, top_p, top_k))


# ----------------------------------------------------------------------------- greedy acceptance


def _greedy_from_argmax(
    candidates: jax.Array, target_argmax: jax.Array, path_mask: jax.Array
) -> Acceptance:
    """Spec 5.4 on precomputed target argmaxes [B, P, A]."""
    match = (candidates[:, :, 1:] == target_argmax[:, :, :-1]) & path_mask[:, :, 1:]  # [B,P,A-1]
    run = jnp.sum(jnp.cumprod(match.astype(jnp.int32), axis=-1), axis=-1)  # [B, P]
    run = jnp.where(path_mask[:, :, 0], run, -1)  # padded rows never win
    best = jnp.argmax(run, axis=-1).astype(jnp.int32)  # first maximum, like torch.argmax
    accept_len = jnp.take_along_axis(run, best[:, None], axis=1)[:, 0]
    best_argmax = jnp.take_along_axis(target_argmax, best[:, None, None], axis=1)[:, 0]  # [B, A]
    bonus = jnp.take_along_axis(best_argmax, accept_len[:, None], axis=1)[:, 0]
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
    target_argmax = jnp.argmax(target_logits, axis=-1).astype(jnp.int32)  # [B, P, A]
    return _greedy_from_argmax(candidates, target_argmax, path_mask)


def greedy_accept_nodes(
    draft_tokens: jax.Array,
    target_logits: jax.Array,
    retrieve_idx: jax.Array,
    path_mask: jax.Array,
) -> Acceptance:
    """`greedy_accept` on per-node logits: argmax once per tree node, then gather per path.

    Args:
      draft_tokens: [B, M] int32 tree tokens (root first).
      target_logits: [B, M, V] base logits of the verified tree nodes.
      retrieve_idx: [B, P, A] int32 node indices of each path (padding in range).
      path_mask: [B, P, A] bool.
    """
    node_argmax = jnp.argmax(target_logits, axis=-1).astype(jnp.int32)  # [B, M]
    candidates = _gather_paths(draft_tokens, retrieve_idx)
    return _greedy_from_argmax(candidates, _gather_paths(node_argmax, retrieve_idx), path_mask)


def _gather_paths(per_node: jax.Array, retrieve_idx: jax.Array) -> jax.Array:
    """[B, M] values -> [B, P, A] values along the paths."""
    b, p, a = retrieve_idx.shape
    flat = jnp.take_along_axis(per_node, retrieve_idx.reshape(b, p * a), axis=1)
    return flat.reshape(b, p, a)


# ----------------------------------------------------------------------------- sampling acceptance


def _rejection_row(
    uniforms: jax.Array,
    candidates: jax.Array,
    path_mask: jax.Array,
    node_logits: jax.Array,
    path_nodes: jax.Array,
    temperature: jax.Array,
    top_p: jax.Array,
    top_k: jax.Array,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Spec 5.5 for one row, vectorised over siblings; returns (best, accept_len, bonus_probs).

    Shapes: uniforms [A, P], candidates / path_mask / path_nodes [P, A], node_logits [N, V].

    At depth i the alive paths (those whose first i tokens are the accepted prefix) all pass
    through one node, whose warped distribution is p. Its distinct children c_1..c_n, in path
    order, are tried one after the other: c_j is accepted iff u_j < p(c_j) / (1 - sum_{k<j}
    p(c_k)), which is the reference's "zero the rejected sibling and renormalise" in closed form
    (an exclusive cumsum instead of a Python loop). If all are rejected, the bonus distribution
    is the residual p with the tried children removed; if the node has no children, it is p
    itself (the reference forgets the processor here, spec 8.11; we warp in every branch). The
    draft probability q is 1 (draft tokens are deterministic top-k picks), which keeps the
    output distribution exactly the warped target.
    """
    num_paths, a = candidates.shape
    # One extra, always-masked column: at depth A there are no children, so every row
    # terminates inside the loop and the bonus distribution is set in one place.
    candidates = jnp.pad(candidates, ((0, 0), (0, 1)))
    path_mask = jnp.pad(path_mask, ((0, 0), (0, 1)))
    earlier = jnp.tril(jnp.ones((num_paths, num_paths), bool), k=-1)  # [r, r'] = r' < r

    def level(i, state):
        active, accepted, best, alive, bonus_probs = state
        node = path_nodes[best, i - 1]
        p = jnp.exp(warp(node_logits[node], temperature, top_p, top_k))  # [V]
        has_child = alive & path_mask[:, i]  # [P]
        child = jnp.where(has_child, candidates[:, i], 0)  # [P]
        same = (child[:, None] == child[None, :]) & has_child[:, None] & has_child[None, :]
        first = has_child & ~jnp.any(same & earlier, axis=1)  # first path reaching each child
        p_child = jnp.where(first, p[child], 0.0)  # [P]
        total = jnp.sum(p)
        before = jnp.cumsum(p_child) - p_child  # mass of the siblings tried earlier
        ratio = p_child / jnp.maximum(total - before, 1e-30)
        # u < ratio (not <=): with u drawn from [0, 1) a zero-probability child is never taken.
        take = first & (uniforms[i - 1] < ratio)
        any_take = jnp.any(take)
        chosen = jnp.argmax(take).astype(jnp.int32)
        tried = jnp.zeros(p.shape, bool).at[child].max(first)  # [V]
        residual = jnp.where(tried, 0.0, p)
        mass = jnp.sum(residual)
        residual = jnp.where(mass > 0, residual / jnp.maximum(mass, 1e-30), p)
        step = active & any_take
        stop = active & ~any_take
        return (
            step,
            accepted + step.astype(jnp.int32),
            jnp.where(step, chosen, best),
            jnp.where(step, has_child & (child == child[chosen]), alive),
            jnp.where(stop, residual, bonus_probs),
        )

    init = (
        jnp.array(True),
        jnp.array(0, jnp.int32),
        jnp.array(0, jnp.int32),
        path_mask[:, 0],
        jnp.zeros(node_logits.shape[-1], jnp.float32),
    )
    _, accepted, best, _, bonus_probs = jax.lax.fori_loop(1, a + 1, level, init)
    return best, accepted, bonus_probs


def rejection_sample(
    uniforms: jax.Array,
    candidates: jax.Array,
    path_mask: jax.Array,
    node_logits: jax.Array,
    path_nodes: jax.Array,
    *,
    temperature: jax.Array | float,
    top_p: jax.Array | float = 1.0,
    top_k: jax.Array | int = 0,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Sampling acceptance with caller-given uniforms (testing / golden comparisons).

    Args:
      uniforms: [B, A, P] f32 in [0, 1): uniforms[b, i-1, r] tests path r's child at depth i.
      candidates: [B, P, A] int32 path tokens (root first).
      path_mask: [B, P, A] bool.
      node_logits: [B, N, V] target logits of the N distinct positions.
      path_nodes: [B, P, A] int32 index into N of each path position.
      temperature, top_p, top_k: scalars or [B].
    Returns:
      best_path [B], accept_len [B], bonus_probs [B, V] (the distribution the bonus is drawn from).
    """
    b = candidates.shape[0]
    knobs = [
        jnp.broadcast_to(jnp.asarray(x, dt), (b,))
        for x, dt in ((temperature, jnp.float32), (top_p, jnp.float32), (top_k, jnp.int32))
    ]
    return jax.vmap(_rejection_row)(
        uniforms, candidates, path_mask, node_logits, path_nodes, *knobs
    )


def _sample_accept(key, candidates, path_mask, node_logits, path_nodes, temperature, top_p, top_k):
    b, p, a = candidates.shape
    key_u, key_bonus = jax.random.split(key)
    uniforms = jax.random.uniform(key_u, (b, a, p), jnp.float32)
    best, accept_len, bonus_probs = rejection_sample(
        uniforms,
        candidates,
        path_mask,
        node_logits,
        path_nodes,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
    )
    logprobs = jnp.where(bonus_probs > 0, jnp.log(jnp.maximum(bonus_probs, 1e-38)), -jnp.inf)
    return Acceptance(best, accept_len, sample(key_bonus, logprobs))


def sample_accept(
    key: jax.Array,
    candidates: jax.Array,
    target_logits: jax.Array,
    path_mask: jax.Array,
    *,
    temperature: jax.Array | float,
    top_p: jax.Array | float = 1.0,
    top_k: jax.Array | int = 0,
) -> Acceptance:
    """Lossless sampling acceptance (spec 5.5): recursive rejection over siblings, q = 1.

    The token sequence it emits (accepted draft tokens, then the bonus) is distributed exactly
    as sampling from `warp(target_logits)` one token at a time. Siblings are tried in path
    order, so the caller's path order (the reference sorts paths lexicographically in sampling
    mode, see tree.py) fixes which uniform tests which child.

    Args:
      key: PRNG key (uniforms and the bonus draw are split from it).
      candidates: [B, P, A] int32 path tokens (root first).
      target_logits: [B, P, A, V] base logits at each path position.
      path_mask: [B, P, A] bool (row 0 must be valid).
      temperature: > 0, scalar or [B]; top_p, top_k: scalars or [B] (1.0 / 0 = off).
    Returns:
      Acceptance(best_path, accept_len, bonus_token).
    """
    b, p, a, v = target_logits.shape
    node_logits = target_logits.reshape(b, p * a, v)
    path_nodes = jnp.broadcast_to(jnp.arange(p * a, dtype=jnp.int32).reshape(p, a), (b, p, a))
    return _sample_accept(
        key, candidates, path_mask, node_logits, path_nodes, temperature, top_p, top_k
    )


def sample_accept_nodes(
    key: jax.Array,
    draft_tokens: jax.Array,
    target_logits: jax.Array,
    retrieve_idx: jax.Array,
    path_mask: jax.Array,
    *,
    temperature: jax.Array | float,
    top_p: jax.Array | float = 1.0,
    top_k: jax.Array | int = 0,
) -> Acceptance:
    """`sample_accept` on per-node logits [B, M, V] and node-index paths [B, P, A].

    Only the A nodes visited along the accepted prefix are warped, never all M.
    """
    candidates = _gather_paths(draft_tokens, retrieve_idx)
    return _sample_accept(
        key, candidates, path_mask, target_logits, retrieve_idx, temperature, top_p, top_k
    )
