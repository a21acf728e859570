"""The base model's KV cache pytree and the attention masks built against it.

`KVCache(k, v: [L, B, S, K, H], length: [B])`, or with `k`, `v` tuples of L per-layer buffers
[B, S, K, H] for the unrolled decode layout (`model.unstack_layers`; `per_layer=True`).
Forwards write new entries at caller-given slots
and never move `length`: the engine owns lengths (its rounds advance them, through
`commit_path` when accepted entries must move).
Rows past `length` are garbage by contract and are always masked.

Mirrors the reference's `model/kv_cache.py` (preallocated buffers plus a length counter) and
`update_inference_inputs` (the in-place commit of the accepted path).
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from griffin_jax.config import ModelConfig


class CacheCapacityError(ValueError):
    """A write would go past the cache's capacity."""


@flax.struct.dataclass
class KVCache:
    k: jax.Array | tuple[jax.Array, ...]  # [L, B, S, K, H], or L x [B, S, K, H]
    v: jax.Array | tuple[jax.Array, ...]
    length: jax.Array  # [B] int32: committed entries per row

    @property
    def per_layer(self) -> bool:
        return isinstance(self.k, (tuple, list))

    @property
    def capacity(self) -> int:
        return self.k[0].shape[1] if self.per_layer else self.k.shape[2]


def init_cache(
    cfg: ModelConfig, batch: int, capacity: int, dtype=jnp.float32, *, per_layer: bool = False
) -> KVCache:
    """An empty cache of `capacity` slots per row (stacked, or L per-layer buffers)."""
    length = jnp.zeros((batch,), jnp.int32)
    if per_layer:
        shape = (batch, capacity, cfg.n_kv_heads, cfg.head_dim)
        k = tuple(jnp.zeros(shape, dtype) for _ in range(cfg.n_layers))
        v = tuple(jnp.zeros(shape, dtype) for _ in range(cfg.n_layers))
        return KVCache(k=k, v=v, length=length)
    shape = (cfg.n_layers, batch, capacity, cfg.n_kv_heads, cfg.head_dim)
    return KVCache(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype), length=length)


def check_capacity(capacity: int, needed: int, *, what: str = "sequence") -> None:
    """Host-side check: `dynamic_update_slice` would silently clamp an overflowing write."""
    if needed > capacity:
        raise CacheCapacityError(
            f"{what} needs {needed} cache slots but the cache holds {capacity}; "
            "pass a larger capacity= (vanilla.generate) or shorten the prompt / max_new_tokens"
        )


def causal_mask(write_idx: jax.Array, num_new: int, capacity: int) -> jax.Array:
    """Mask for T new tokens written contiguously at `write_idx` after a committed prefix.

    Query t of row b sees slot s iff s <= write_idx[b] + t (the prefix, earlier new tokens and
    itself). Serves prefill (write_idx = 0), decode (T = 1) and chain verification.

    Returns:
      [B, T, S] bool.
    """
    slots = jnp.arange(capacity)[None, None, :]  # [1, 1, S]
    last = write_idx[:, None, None] + jnp.arange(num_new)[None, :, None]  # [B, T, 1]
    return slots <= last


def tree_mask_to_cache(length: jax.Array, tree_mask: jax.Array, capacity: int) -> jax.Array:
    """Mask for M tree tokens written at slots length .. length+M-1.

    Node i sees every committed slot (< length[b]) and the tree slots length[b] + j where
    tree_mask[b, i, j] (its ancestors and itself).

    Args:
      length: [B] int32 committed lengths.
      tree_mask: [B, M, M] bool.
    Returns:
      [B, M, S] bool.
    """
    m = tree_mask.shape[-1]
    slots = jnp.arange(capacity)  # [S]
    rel = slots[None, :] - length[:, None]  # [B, S]
    in_tree = (rel >= 0) & (rel < m)
    rel_c = jnp.clip(rel, 0, m - 1)
    tree_part = jnp.take_along_axis(
        tree_mask, jnp.broadcast_to(rel_c[:, None, :], tree_mask.shape[:2] + (capacity,)), axis=2
    )  # [B, M, S]
    return (rel < 0)[:, None, :] | (in_tree[:, None, :] & tree_part)


def commit_path(cache: KVCache, src_idx: jax.Array, num_accepted: jax.Array) -> KVCache:
    """Moves the accepted path's entries into place and advances `length`.

    The tree was written at slots length .. length+M-1. Path entry a (a < num_accepted[b]) is at
    tree slot src_idx[b, a]; it is copied to slot length[b] + a. Entries past num_accepted are
    garbage by contract. Gather first, then write, so overlapping slots never alias.

    Args:
      src_idx: [B, A] int32 tree-node indices of the path (root first), valid where
        a < num_accepted[b] (padding must still be in range).
      num_accepted: [B] int32 entries to keep (root + accepted draft tokens); 0 for a
        finished row leaves it untouched.
    """

    def rows(buf):  # [B, S, ...]: row b gets buf[b, length + idx] at slots length..
        def one(row, length, idx):
            return jax.lax.dynamic_update_slice_in_dim(row, row[length + idx], length, axis=0)

        return jax.vmap(one)(buf, cache.length, src_idx)

    def layer(buf):  # a stacked [L, B, S, K, H] buffer or one layer's [B, S, K, H]
        return jax.vmap(rows)(buf) if buf.ndim == 5 else rows(buf)

    return KVCache(
        k=jax.tree.map(layer, cache.k),
        v=jax.tree.map(layer, cache.v),
        length=cache.length + num_accepted,
    )
