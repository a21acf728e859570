"""The base language model: embed -> scan(decoder layers) -> norm -> (logits, hidden).

One Flax module serves Llama (Llama-2/3, Vicuna), Qwen2 (q/k/v biases, tied embeddings) and
Mixtral (top-2 routed experts); the family is a config switch (STYLE R1). Mirrors transformers'
`LlamaForCausalLM`, `Qwen2ForCausalLM` and `MixtralForCausalLM`, and the reference's
`modeling_llama_kv.py` (explicit position ids, a preallocated cache and a tree mask).

Parameters are linen's nested dict with HF names; per-layer parameters are stacked on a leading
L axis (`layers/...`) and run with `nn.scan`, so compile time does not grow with depth. That is
the one stored format (converters, trainer, sharding, orbax).

Decoding can also run the layers unrolled (`unstack_layers`: the same dict with `layers` a tuple
of L per-layer dicts, and a KV cache of L per-layer buffers, `init_cache(per_layer=True)`).
Under `scan` every step copies each layer's weights and cache out of the stacked arrays (a
dynamic slice feeding a matmul is materialised on CPU); unrolled, each weight is its own buffer
and is read in place. On the 2-core dev CPU that took a batch-1 decode of a 32M-parameter Llama
from 3.69 to 3.06 ms/token (the memory-bandwidth floor is ~3.1). `forward` picks the path from
the params' layout; the inference API unstacks once at load, and on one device also fuses each
layer's q/k/v and gate/up kernels (`layers.fuse_projections`) and, on a CPU, stores the f32
kernels packed for `cpu_kernels`'s products (`layers.pack_kernels`).
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from griffin_jax import cpu_kernels
from griffin_jax.config import ModelConfig
from griffin_jax.kv_cache import KVCache
from griffin_jax.layers import (
    Attention,
    Dense,
    RMSNorm,
    SwiGLU,
    fuse_projections,
    kernel_of,
    pack_kernels,
    rms_norm,
    rows_at,
)  # fmt: skip


class SparseMoE(nn.Module):
    """Mixtral's block-sparse MoE (matches MixtralSparseMoeBlock + MixtralTopKRouter).

    Router: softmax(f32) over E experts, top-k, renormalised. Experts are computed densely and
    weighted by the (mostly zero) routing weights: static shapes, and at decode time every
    expert's weights are read anyway once a few tokens route differently.
    """

    cfg: ModelConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.cfg
        e, d, f = cfg.n_experts, cfg.d_model, cfg.d_ff
        router = Dense(e, use_bias=False, dtype=self.dtype, param_dtype=self.dtype, name="gate")
        logits = router(x).astype(jnp.float32)  # [B, T, E]
        probs = jax.nn.softmax(logits, axis=-1)
        top_p, top_i = jax.lax.top_k(probs, cfg.n_experts_per_tok)  # [B, T, k]
        top_p = top_p / jnp.sum(top_p, axis=-1, keepdims=True)
        weights = jnp.sum(jax.nn.one_hot(top_i, e, dtype=jnp.float32) * top_p[..., None], axis=-2)
        init = nn.initializers.lecun_normal()
        w1 = self.param("w1", init, (e, d, f), self.dtype)  # gate, [E, D, F]
        w3 = self.param("w3", init, (e, d, f), self.dtype)  # up, [E, D, F]
        w2 = self.param("w2", init, (e, f, d), self.dtype)  # down, [E, F, D]
        h = jax.nn.silu(jnp.einsum("BTD,EDF->BTEF", x, w1)) * jnp.einsum("BTD,EDF->BTEF", x, w3)
        out = jnp.einsum("BTEF,EFD->BTED", h, w2)  # [B, T, E, D]
        return jnp.einsum("BTED,BTE->BTD", out, weights.astype(out.dtype))


def head_logits(hidden: jax.Array, kernel: jax.Array) -> jax.Array:
    """hidden [..., D] @ kernel [D, V] -> f32 logits (the lm_head product, any kernel; a
    packed one (`cpu_kernels.pack`, 3-D) runs `cpu_kernels.matmul`)."""
    if kernel.ndim == 3:
        return cpu_kernels.matmul(hidden, kernel)
    # f32 accumulation and output even for bf16 activations.
    return jnp.einsum(
        "...D,DV->...V", hidden, kernel.astype(hidden.dtype), preferred_element_type=jnp.float32
    )


class LMHead(nn.Module):
    """`lm_head` with an HF-named `kernel` [D, V]; returns f32 logits."""

    vocab_size: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, hidden: jax.Array) -> jax.Array:
        if self.has_variable("params", cpu_kernels.PACKED):  # `pack_kernels`' layout
            return head_logits(hidden, self.get_variable("params", cpu_kernels.PACKED))
        init = nn.initializers.lecun_normal()
        kernel = self.param("kernel", init, (hidden.shape[-1], self.vocab_size), self.dtype)
        return head_logits(hidden, kernel)


class DecoderLayer(nn.Module):
    """One pre-norm decoder layer (matches LlamaDecoderLayer / MixtralDecoderLayer)."""

    cfg: ModelConfig
    dtype: jnp.dtype = jnp.float32
    emit_input: bool = False  # also return the layer's input (scanned out: EAGLE-3 features)

    @nn.compact
    def __call__(self, x, cache_kv, positions, write_idx, mask):
        cfg = self.cfg
        x_in = x
        cache_k, cache_v = cache_kv
        h = RMSNorm(cfg.rms_eps, self.dtype, name="input_layernorm")(x)
        a, cache_k, cache_v = Attention.of(cfg, self.dtype)(
            h, positions, cache_k, cache_v, write_idx, mask
        )
        x = x + a
        h = RMSNorm(cfg.rms_eps, self.dtype, name="post_attention_layernorm")(x)
        if cfg.n_experts:
            m = SparseMoE(cfg, self.dtype, name="block_sparse_moe")(h)
        else:
            m = SwiGLU(cfg.d_ff, cfg.d_model, self.dtype, name="mlp")(h)
        if self.emit_input:
            return x + m, ((cache_k, cache_v), x_in)
        return x + m, (cache_k, cache_v)


class Transformer(nn.Module):
    """The base LM. `__call__` returns (logits f32 [B,T,V], features, k, v): the features are
    the final normed hidden [B,T,D], or with `feature_layers` the inputs of those layers
    concatenated [B,T,nD] (what an EAGLE-3 draft reads)."""

    cfg: ModelConfig
    dtype: jnp.dtype = jnp.float32
    remat: bool = False
    feature_layers: tuple[int, ...] = ()

    def setup(self) -> None:
        cfg = self.cfg
        self.embed_tokens = nn.Embed(
            cfg.vocab_size, cfg.d_model, dtype=self.dtype, param_dtype=self.dtype
        )
        layer = nn.remat(DecoderLayer) if self.remat else DecoderLayer
        self.layers = nn.scan(
            layer,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast),
            length=cfg.n_layers,
        )(cfg, self.dtype, bool(self.feature_layers))
        self.norm = RMSNorm(cfg.rms_eps, self.dtype)
        if not cfg.tie_embeddings:
            self.lm_head = LMHead(cfg.vocab_size, self.dtype)

    def __call__(self, tokens, positions, cache_k, cache_v, write_idx, mask, logits_at=None):
        x = self.embed_tokens(tokens)
        x, out = self.layers(x, (cache_k, cache_v), positions, write_idx, mask)
        hidden = self.norm(x)
        logits = self.head(rows_at(hidden, logits_at))
        if not self.feature_layers:
            cache_k, cache_v = out
            return logits, hidden, cache_k, cache_v
        (cache_k, cache_v), inputs = out  # inputs: [L, B, T, D]
        features = jnp.concatenate([inputs[i] for i in self.feature_layers], axis=-1)
        return logits, features, cache_k, cache_v

    def head(self, hidden: jax.Array) -> jax.Array:
        """Token logits (f32) from final normed hidden states."""
        if self.cfg.tie_embeddings:
            return head_logits(hidden, self.embed_tokens.embedding.T)
        return self.lm_head(hidden)


def is_unstacked(params) -> bool:
    """Whether `params["layers"]` is the per-layer tuple of the unrolled decode layout."""
    return isinstance(params["layers"], (tuple, list))


def unstack_layers(params, *, free_stacked: bool = False):
    """The unrolled decode layout: `layers` becomes a tuple of L per-layer dicts.

    Leaf by leaf, so with `free_stacked` (the caller owns `params` and will not use it again)
    the stacked leaf's device buffer is freed as soon as its L slices exist: the peak extra
    memory is one stacked leaf, not a second copy of the model. Sharded leaves keep their
    sharding on the remaining axes. A no-op on params already unstacked.
    """
    if is_unstacked(params):
        return params
    flat, treedef = jax.tree.flatten(params["layers"])
    n = flat[0].shape[0]
    per_leaf = []
    for leaf in flat:
        per_leaf.append([leaf[i] for i in range(n)])
        if free_stacked and isinstance(leaf, jax.Array):
            leaf.delete()
    layers = tuple(jax.tree.unflatten(treedef, [p[i] for p in per_leaf]) for i in range(n))
    return {**params, "layers": layers}


def decode_layout(params, *, free: bool = False, pack: bool | None = None):
    """The one-device decode layout the inference API runs: the layers unrolled
    (`unstack_layers`), each layer's q/k/v and gate/up kernels fused
    (`layers.fuse_projections`) and, on a CPU, the f32 kernels packed for
    `cpu_kernels.matmul` (`layers.pack_kernels`; `pack` None = `cpu_kernels.enabled()`). With
    `free` the caller gives `params` up: each replaced buffer is freed as soon as its successor
    exists."""
    out = fuse_projections(unstack_layers(params, free_stacked=free), free_parts=free)
    if pack is None:
        pack = cpu_kernels.enabled()
    return pack_kernels(out, free_parts=free) if pack else out


def stack_layers(params):
    """The stored layout from either layout (the inverse of `unstack_layers`)."""
    if not is_unstacked(params):
        return params
    layers = jax.tree.map(lambda *xs: jnp.stack(xs), *params["layers"])
    return {**params, "layers": layers}


def _forward_unrolled(
    params, tokens, positions, cache, write_idx, mask, cfg, dtype, feature_layers=(),
    logits_at=None,
):  # fmt: skip
    """`Transformer.__call__` with the layers unrolled over per-layer params and caches."""
    x = embed(params, tokens).astype(dtype)
    layer = DecoderLayer(cfg, dtype)
    ks, vs, inputs = [], [], []
    for i, (lp, ck, cv) in enumerate(zip(params["layers"], cache.k, cache.v, strict=True)):
        if i in feature_layers:
            inputs.append(x)
        x, (k, v) = layer.apply({"params": lp}, x, (ck, cv), positions, write_idx, mask)
        ks.append(k)
        vs.append(v)
    hidden = rms_norm(x, params["norm"]["weight"].astype(dtype), eps=cfg.rms_eps)
    features = jnp.concatenate(inputs, axis=-1) if feature_layers else hidden
    logits = lm_head(params, rows_at(hidden, logits_at), cfg=cfg)
    return logits, features, tuple(ks), tuple(vs)


def lm_head(params, hidden: jax.Array, *, cfg: ModelConfig) -> jax.Array:
    """Base lm_head on hidden [..., D] -> f32 logits [..., V] (no module needed)."""
    if cfg.tie_embeddings:
        return head_logits(hidden, params["embed_tokens"]["embedding"].T)
    w = kernel_of(params["lm_head"])
    return head_logits(hidden, w)


def embed(params, tokens: jax.Array) -> jax.Array:
    """Base token embedding lookup [B, T] -> [B, T, D] (the drafts share it)."""
    return cpu_kernels.take_rows(params["embed_tokens"]["embedding"], tokens)


def forward(
    params,
    tokens: jax.Array,
    positions: jax.Array,
    cache: KVCache,
    *,
    write_idx: jax.Array,
    mask: jax.Array,
    cfg: ModelConfig,
    dtype=None,
    feature_layers: tuple[int, ...] = (),
    logits_at: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array, KVCache]:
    """Runs the base model on T new tokens against the cache.

    Args:
      params: the base params (HF-named nested dict).
      tokens: [B, T] int32.  positions: [B, T] int32 absolute RoPE positions.
      cache: KVCache; the new K/V are written at slots write_idx[b] .. write_idx[b]+T-1.
        `cache.length` is left unchanged (the engine owns lengths). Stacked params need a
        stacked cache, unstacked params (`unstack_layers`) a per-layer one.
      write_idx: [B] int32.
      mask: [B, T, S] bool, True = may attend (S = cache capacity).
      feature_layers: the layers whose inputs make the draft's features (`draft.feature_layers`;
        () = the final normed hidden state, GRIFFIN and EAGLE-2).
      logits_at: [B, P] int32 positions in 0..T-1 whose logits to compute (a prefill needs
        only each row's last: the lm_head over every prompt token would cost T x V x D
        multiply-adds and a [B, T, V] f32 buffer, 1 GB for a 2,048-token prompt of a
        128k-token vocabulary); None = all T.
    Returns:
      logits [B, T, V] f32 ([B, P, V] with `logits_at`), the draft's input features (hidden
      [B, T, D], the final normed state; or the inputs of `feature_layers` concatenated,
      [B, T, 3D] for EAGLE-3), and the cache with the new entries written.
    """
    dtype = dtype or params["embed_tokens"]["embedding"].dtype
    if is_unstacked(params) != cache.per_layer:
        raise ValueError(
            "params and KV cache layouts differ: unstacked params need "
            "init_cache(..., per_layer=True), stacked params a stacked cache"
        )
    if is_unstacked(params):
        out = _forward_unrolled(
            params, tokens, positions, cache, write_idx, mask, cfg, dtype, feature_layers,
            logits_at,
        )  # fmt: skip
    else:
        out = Transformer(cfg, dtype, feature_layers=feature_layers).apply(
            {"params": params}, tokens, positions, cache.k, cache.v, write_idx, mask, logits_at
        )
    logits, hidden, k, v = out
    return logits, hidden, KVCache(k=k, v=v, length=cache.length)


def init_params(cfg: ModelConfig, key: jax.Array, dtype=jnp.float32):
    """Random params (Flax default initialisers) in the HF-named layout."""
    return _init(cfg, dtype)(key)


@functools.lru_cache(maxsize=16)
def _init(cfg: ModelConfig, dtype):
    def f(key):
        tokens = jnp.zeros((1, 1), jnp.int32)
        kv = jnp.zeros((cfg.n_layers, 1, 1, cfg.n_kv_heads, cfg.head_dim), dtype)
        return Transformer(cfg, dtype).init(
            key, tokens, tokens, kv, kv, jnp.zeros((1,), jnp.int32), jnp.ones((1, 1, 1), bool)
        )["params"]

    return jax.jit(f)


def abstract_params(cfg: ModelConfig, dtype=jnp.float32):
    """Shape/dtype tree of the params (what converters check against), without allocating."""
    return jax.eval_shape(_init(cfg, dtype), jax.random.key(0))
