"""The EAGLE-2 dynamic draft tree with static shapes: expand, rerank, tree mask, depths, paths.

Mirrors the reference's `topK_genrate` (`cnets_griffin_1.py`, GRIFFIN spec 5.2) after its trunk
update: the engine runs the draft on the new trunk features and hands over the level-1 inputs.
Sizes are static (STYLE R5.4): K = top_k, D = depth, M = total_tokens (the root plus M - 1
drafted nodes, as the reference's `total_token`), candidates C = K + D*K^2, paths P = M - 1 (an
upper bound on the leaves), path length A = D + 2 (the root plus drafted tokens, which reach
depth D + 1).

Deliberate differences from the reference:
- Ties are broken towards the smaller flat candidate index (lax.top_k's rule). A child's score
  is its parent's plus a log-prob <= 0 and its flat index is larger, so every selected node's
  parent is selected too (spec 8.10); the reference's torch.topk gives no such guarantee.
- retrieve_idx is padded to [P, A] with index 0 plus a mask instead of -1 (never gather -1).
- Batch B >= 1, each row with its own trunk length.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from griffin_jax import cpu_kernels
from griffin_jax.checks import num_candidates
from griffin_jax.kv_cache import tree_mask_to_cache

# draft_step(features [B,K,Dm], tokens [B,K], positions [B,K], cache, write_idx [B],
#            mask [B,K,S]) -> (token_logits [B,K,V] f32, next_features [B,K,Dm], cache)
DraftStep = Callable[
    [jax.Array, jax.Array, jax.Array, Any, jax.Array, jax.Array],
    tuple[jax.Array, jax.Array, Any],
]


@flax.struct.dataclass
class Tree:
    """A drafted tree of M nodes per row (node 0 is the root); all arrays static-shaped."""

    draft_tokens: jax.Array  # [B, M] int32, root first
    parents: jax.Array  # [B, M] int32 node index of the parent; parents[:, 0] = 0 (the root)
    tree_mask: jax.Array  # [B, M, M] bool: node i sees node j iff j is i or an ancestor of i
    depths: jax.Array  # [B, M] int32, root 0, at most D + 1
    retrieve_idx: jax.Array  # [B, P, A] int32 root-to-leaf node indices, padding = 0
    path_mask: jax.Array  # [B, P, A] bool: real entries (row p is a path iff [:, p, 0])

    @property
    def path_valid(self) -> jax.Array:
        """[B, P] bool: which rows of retrieve_idx are real paths."""
        return self.path_mask[:, :, 0]

    def path_tokens(self) -> jax.Array:
        """[B, P, A] int32 tokens along each path (padding entries hold the root token)."""
        b, p, a = self.retrieve_idx.shape
        flat = jnp.take_along_axis(self.draft_tokens, self.retrieve_idx.reshape(b, p * a), axis=1)
        return flat.reshape(b, p, a)


def draft_cache_slots(*, top_k: int, depth: int) -> int:
    """Draft-cache slots one tree needs after the trunk (K per level, D levels are written)."""
    return top_k * depth


def build_tree(
    draft_step: DraftStep,
    root_logprobs: jax.Array,
    root_feature: jax.Array,
    root_token: jax.Array,
    trunk_len: jax.Array,
    draft_cache: Any,
    *,
    top_k: int,
    depth: int,
    total_tokens: int,
    capacity: int,
    lexicographic_paths: bool,
    token_ids: jax.Array | None = None,
    trunk_position: jax.Array | None = None,
) -> tuple[Tree, Any]:
    """Drafts an EAGLE-2 tree (spec 5.2 steps 2-8) with static shapes.

    Args:
      draft_step: one draft forward on the K current nodes (see `DraftStep`); it must write its
        K new entries at draft-cache slots write_idx[b] .. write_idx[b]+K-1.
      root_logprobs: [B, V] f32 draft log-probs of the last trunk position (level 1).
      root_feature: [B, Dm] the draft's next-feature output at that position.
      root_token: [B] int32 the root (the last committed / bonus token).
      trunk_len: [B] int32 draft trunk length P (cache slots < P are the trunk; level i, 0-based,
        is written at slots P + K*i and runs at RoPE position `trunk_position` + i, spec 8.5
        and section 9).
      draft_cache: the draft's cache pytree (opaque here; only draft_step touches it).
      top_k, depth, total_tokens: K, D, M (static).
      capacity: S, the draft cache's slot count (static; the masks are [B, K, S]). The caller
        checks P + K*D <= S on the host.
      lexicographic_paths: sampling mode: sort paths lexicographically by node index with
        padding last (the reference's order, which sets the sibling order for rejection).
        Otherwise paths are in ascending leaf order (greedy mode).
      token_ids: [V'] int32 when the draft's logits cover a token subset (`DraftHead`): the
        logit columns' token ids. None: the columns are the token ids.
      trunk_position: [B] int32 the RoPE position of slot P (default P; more when positions
        were left out of the trunk: `speculative.SpecState.trunk_skipped`).
    Returns:
      (Tree, draft_cache with the tree levels written; only its trunk is meaningful later).
    """
    k, d, m = top_k, depth, total_tokens
    b = root_logprobs.shape[0]
    trunk_position = trunk_len if trunk_position is None else trunk_position
    n_cand = num_candidates(k, d)
    eye = jnp.eye(k, dtype=bool)

    def ids(columns: jax.Array) -> jax.Array:
        columns = columns.astype(jnp.int32)
        return columns if token_ids is None else jnp.take(token_ids, columns)

    with jax.named_scope("draft/level1"):
        scores1, tokens1 = jax.lax.top_k(root_logprobs.astype(jnp.float32), k)  # [B, K]
        tokens1 = ids(tokens1)
        scores = jnp.zeros((b, n_cand), jnp.float32).at[:, :k].set(scores1)
        tokens = jnp.zeros((b, n_cand), jnp.int32).at[:, :k].set(tokens1)
        # parents_flat[j]: 1 + flat candidate index of the parent of candidate block j (the
        # reference's PARENTS list); 0 = the root. Block 0 is level 1.
        parents_flat = jnp.zeros((b, 1 + d * k), jnp.int32)
        feats = jnp.broadcast_to(root_feature[:, None, :], (b, k, root_feature.shape[-1]))
        # Running visibility of the current K nodes over tree levels 0..D (K columns each).
        level_mask = jnp.zeros((b, k, k * (d + 1)), bool).at[:, :, :k].set(eye)
        state = (
            feats,
            tokens1,
            scores1,
            jnp.broadcast_to(jnp.arange(k, dtype=jnp.int32), (b, k)),
            level_mask,
            scores,
            tokens,
            parents_flat,
            draft_cache,
        )

    def expand(i, state):
        feats, in_tok, s_prev, sel, level_mask, scores, tokens, parents_flat, cache = state
        with jax.named_scope("draft/expand"):
            positions = jnp.broadcast_to((trunk_position + i)[:, None], (b, k))
            mask = tree_mask_to_cache(trunk_len, level_mask, capacity)  # [B, K, S]
            logits, next_feats, cache = draft_step(
                feats, in_tok, positions, cache, trunk_len + k * i, mask
            )
            offset = jnp.where(i == 0, 0, k + (i - 1) * k * k)
            parents_flat = jax.lax.dynamic_update_slice_in_dim(
                parents_flat, sel + offset + 1, 1 + i * k, axis=1
            )
            child_lp, child_tok = cpu_kernels.top_log_probs(logits, k)  # [B, K, K]
            cum = (child_lp + s_prev[:, :, None]).reshape(b, k * k)  # [B, K*K]
            child_tok = ids(child_tok.reshape(b, k * k))
            s_next, sel_next = jax.lax.top_k(cum, k)  # [B, K] ties -> smaller index
            row = sel_next // k  # parent row among the current K
            feats = jnp.take_along_axis(next_feats, row[:, :, None], axis=1)  # [B, K, Dm]
            in_tok = jnp.take_along_axis(child_tok, sel_next, axis=1)
            start = k + i * k * k
            scores = jax.lax.dynamic_update_slice_in_dim(scores, cum, start, axis=1)
            tokens = jax.lax.dynamic_update_slice_in_dim(tokens, child_tok, start, axis=1)
            level_mask = jnp.take_along_axis(level_mask, row[:, :, None], axis=1)
            level_mask = jax.lax.dynamic_update_slice_in_dim(
                level_mask, jnp.broadcast_to(eye, (b, k, k)), k * (i + 1), axis=2
            )
        return (
            feats,
            in_tok,
            s_next,
            sel_next.astype(jnp.int32),
            level_mask,
            scores,
            tokens,
            parents_flat,
            cache,
        )

    if d > 0:  # depth 0: level 1 only (the loop body would not even trace with no levels)
        state = jax.lax.fori_loop(0, d, expand, state)
    scores, tokens, parents_flat, draft_cache = state[5], state[6], state[7], state[8]

    with jax.named_scope("draft/rerank"):
        rerank = functools.partial(
            _rerank, top_k=k, depth=d, total_tokens=m, lexicographic=lexicographic_paths
        )
        tree = jax.vmap(rerank)(scores, tokens, parents_flat, root_token.astype(jnp.int32))
    return tree, draft_cache


def _rerank(
    scores: jax.Array,
    tokens: jax.Array,
    parents_flat: jax.Array,
    root_token: jax.Array,
    *,
    top_k: int,
    depth: int,
    total_tokens: int,
    lexicographic: bool,
) -> Tree:
    """One row: global top-(M-1) of the candidates, parents, tree mask, depths, paths."""
    k, m = top_k, total_tokens
    a = depth + 2
    _, top_idx = jax.lax.top_k(scores, m - 1)  # ties -> smaller flat index
    sel = jnp.sort(top_idx)  # [M-1] ascending: parents precede children
    draft_tokens = jnp.concatenate([root_token[None], tokens[sel]])  # [M]
    parent_flat = parents_flat[sel // k]  # [M-1] 1 + flat index of the parent, 0 = root
    parent_node = jnp.searchsorted(sel, parent_flat - 1) + 1  # position of the parent in sel
    parent_node = jnp.where(parent_flat == 0, 0, parent_node).astype(jnp.int32)
    parents = jnp.concatenate([jnp.zeros((1,), jnp.int32), parent_node])  # [M]

    # Ancestor mask: start from "self + root"; each step ORs in the parent's row, so after
    # D + 1 steps (the maximum depth) every row holds all its ancestors.
    tree_mask = jnp.eye(m, dtype=bool).at[:, 0].set(True)
    for _ in range(depth + 1):
        tree_mask = tree_mask | tree_mask[parents]
    depths = jnp.sum(tree_mask, axis=-1).astype(jnp.int32) - 1

    # anc[n, j] = ancestor of n at depth j (n itself at j = depths[n]); exactly one match.
    at_depth = depths[None, :, None] == jnp.arange(a)[None, None, :]  # [1, M, A]
    anc = jnp.argmax(tree_mask[:, :, None] & at_depth, axis=1).astype(jnp.int32)  # [M, A]
    anc_valid = jnp.arange(a)[None, :] <= depths[:, None]  # [M, A]
    is_parent = jnp.zeros((m,), bool).at[parents[1:]].set(True)
    is_leaf = ~is_parent & (jnp.arange(m) > 0)

    node = jnp.arange(m, dtype=jnp.int32)
    if lexicographic:
        # Rows sorted as the reference's `sorted(..., key=custom_sort)` with -1 -> +inf;
        # non-leaves last.
        keys = [jnp.where(anc_valid[:, j], anc[:, j], m) for j in range(a)]
        order = jax.lax.sort([(~is_leaf).astype(jnp.int32), *keys, node], num_keys=a + 1)[-1]
    else:
        order = jnp.argsort(jnp.where(is_leaf, node, m + node), stable=True)
    order = order[: m - 1]  # P = M - 1 >= the number of leaves
    row_valid = is_leaf[order]  # [P]
    path_mask = anc_valid[order] & row_valid[:, None]  # [P, A]
    retrieve_idx = jnp.where(path_mask, anc[order], 0)
    return Tree(
        draft_tokens=draft_tokens,
        parents=parents,
        tree_mask=tree_mask,
        depths=depths,
        retrieve_idx=retrieve_idx,
        path_mask=path_mask,
    )


def verify_positions(tree: Tree, committed_len: jax.Array) -> jax.Array:
    """Base RoPE positions of the tree nodes: committed length + depth (spec 5.3). [B, M]."""
    return committed_len[:, None] + tree.depths


def verify_mask(tree: Tree, committed_len: jax.Array, capacity: int) -> jax.Array:
    """Base attention mask [B, M, S] for the tree written at slots committed_len .. +M-1."""
    return tree_mask_to_cache(committed_len, tree.tree_mask, capacity)
