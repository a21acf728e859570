"""Building blocks shared by the base model and the drafts, and the numerics contract.

Numerics (STYLE R7), each matching transformers' Llama code:
- RMSNorm in f32, cast back to the input dtype, then times the weight (`LlamaRMSNorm.forward`).
- RoPE angles in f32 at HIGHEST precision, cos/sin cast to the activation dtype, split-half
  rotation (`LlamaRotaryEmbedding`, `apply_rotary_pos_emb`).
- Attention scores accumulated and soft-maxed in f32 with a `finfo(f32).min` mask value (not
  -inf, so that a fully masked pad row gives a uniform row instead of NaN), probabilities cast
  back to the query dtype (`eager_attention_forward` in f32; SDPA's f32 accumulation in bf16).
  On a CPU f32 forwards run the project's kernel (`cpu_kernels.attention`: the same maths, a
  fully masked row gives 0), other CPU forwards and one-token decodes elsewhere the explicit
  einsums; forwards of several tokens on a GPU or TPU go through
  `jax.nn.dot_product_attention` (cuDNN's fused kernel on a GPU in bf16), equal within f32
  round-off (`attention_implementation`).
- Attention reads only the slots up to the last one the mask lets a query see: the CPU kernel
  finds it from the mask; the other paths read the smallest of a few key windows
  (`attention_spans`) that holds it, chosen on the device. The masked-out slots past it weigh
  exactly 0, so only the summation order differs from reading the whole buffer.
"""

from __future__ import annotations

import functools
import itertools
import os
from collections.abc import Sequence
from typing import Literal

import flax.linen as nn
import jax
import jax.numpy as jnp

from griffin_jax import cpu_kernels
from griffin_jax.config import RopeConfig

MASK_VALUE = float(jnp.finfo(jnp.float32).min)


class Dense(nn.Module):
    """`nn.Dense` (the same param names, initialisers and product) that also runs the decode
    layout's packed kernel (`pack_kernels`: `packed_kernel` in place of `kernel`)."""

    features: int
    use_bias: bool = True
    dtype: jnp.dtype | None = None
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.has_variable("params", cpu_kernels.PACKED):  # `pack_kernels`' layout
            p = {cpu_kernels.PACKED: self.get_variable("params", cpu_kernels.PACKED)}
        else:
            shape = (x.shape[-1], self.features)
            init = nn.initializers.lecun_normal()
            p = {"kernel": self.param("kernel", init, shape, self.param_dtype)}
        if self.use_bias:
            init = nn.initializers.zeros_init()
            p["bias"] = self.param("bias", init, (self.features,), self.param_dtype)
        return dense(p, x, dtype=self.dtype)


def dense(p, x: jax.Array, *, dtype: jnp.dtype | None = None) -> jax.Array:
    """x @ kernel (+ bias) for a Dense param dict, packed or not, as `nn.Dense` computes it
    (inputs promoted to one dtype, `dtype` when given)."""
    bias = p.get("bias")
    if cpu_kernels.PACKED in p:  # f32 products (of f32 kernels, packed), then nn.Dense's dtype
        packed = p[cpu_kernels.PACKED]
        out = dtype or jnp.result_type(x, packed, *([] if bias is None else [bias]))
        y = cpu_kernels.matmul(x, packed).astype(out)
        return y if bias is None else y + bias.astype(out)
    x, kernel, bias = nn.dtypes.promote_dtype(x, p["kernel"], bias, dtype=dtype)
    y = jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())))
    return y if bias is None else y + jnp.reshape(bias, (1,) * (y.ndim - 1) + (-1,))


class RMSNorm(nn.Module):
    """RMSNorm with an HF-named `weight` (matches LlamaRMSNorm.forward)."""

    eps: float
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        weight = self.param("weight", nn.initializers.ones, (x.shape[-1],), self.dtype)
        return rms_norm(x, weight, eps=self.eps)


def rms_norm(x: jax.Array, weight: jax.Array, *, eps: float) -> jax.Array:
    """x * rsqrt(mean(x^2) + eps) in f32, cast to x.dtype, then * weight."""
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return weight.astype(x.dtype) * normed.astype(x.dtype)


def rope_cos_sin(
    positions: jax.Array, *, head_dim: int, rope: RopeConfig, dtype: jnp.dtype
) -> tuple[jax.Array, jax.Array]:
    """cos, sin tables for the given absolute positions.

    Args:
      positions: [B, T] int32.
    Returns:
      cos, sin: [B, T, H] in `dtype` (split-half layout: the H/2 angles repeated twice).
    """
    inv_freq = jnp.asarray(rope.inv_freq(head_dim), jnp.float32)  # [H/2]
    angles = jnp.einsum(
        "BT,h->BTh",
        positions.astype(jnp.float32),
        inv_freq,
        precision=jax.lax.Precision.HIGHEST,
    )
    angles = jnp.concatenate([angles, angles], axis=-1)  # [B, T, H]
    return jnp.cos(angles).astype(dtype), jnp.sin(angles).astype(dtype)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotates x [B, T, N, H] by cos/sin [B, T, H] (split-half, matches apply_rotary_pos_emb)."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[:, :, None, :] + rotated * sin[:, :, None, :]


def attention_implementation(
    q: jax.Array, *, backend: str | None = None, k: jax.Array | None = None
) -> Literal["cpu", "einsum", "xla", "cudnn"]:
    """Which attention a forward of these queries (and keys `k`, default: of q's dtype) uses,
    decided at trace time.

    - "cpu": the project's kernel (`cpu_kernels.attention`) for every f32 forward on a CPU
      backend with one device, decodes included: it reads the cache in place up to the last
      slot a query may attend and computes each query's row the same way whatever the other
      queries, so a verification row equals the decode of the same query bit for bit. (XLA's
      attention below sliced and transposed the keys and values into fresh buffers in every
      layer: in a profiler trace of the default base after 300 cached tokens, ~0.6 ms of a
      2.4 ms decode, and ~9 ms of a 14 ms verification of 60 tokens went to attention.)
    - "einsum": the explicit GQA einsums of `_attend` (scores accumulated and soft-maxed in
      f32, each KV head's queries as one [G*T, S] block): one-token decodes (T = 1) off a CPU
      (a decode reads the cache once, and nothing fused beats two small matmuls there) and
      CPU forwards the kernel does not take (bf16, a head dim not a multiple of 16, several
      devices, where the call would gather sharded operands); with the scores laid out per KV
      head, the products are plain batched matmuls and the softmax runs along their last axis,
      where `dot_product_attention`'s portable path transposes its probabilities for the second
      product (`python -m inference.bench_attention` times them; README "Where a round's time
      goes").
    - "cudnn": `jax.nn.dot_product_attention` on cuDNN's fused kernel, for prefill, tree
      verification and draft levels (T > 1) on a GPU in bf16/f16 with a head dim cuDNN takes
      (a multiple of 8, <= 128). The boolean mask reaches cuDNN as an additive bias.
    - "xla": `jax.nn.dot_product_attention`'s portable path for T > 1 on a GPU in f32 and on
      a TPU: the same maths as "einsum" with f32 logits; equal to it within f32 round-off
      (tested).

    `GRIFFIN_ATTENTION=cpu|einsum|xla|cudnn` forces one (`bench_device` and `bench_attention`
    compare them; "cpu" falls back to "einsum" where the kernel cannot take the inputs). It is
    read when a program is traced: set it before the first call (compiled programs keep their
    choice; `jax.clear_caches()` drops them).
    """
    forced = os.environ.get("GRIFFIN_ATTENTION", "")
    if forced and forced not in ("cpu", "einsum", "xla", "cudnn"):
        raise ValueError(f"GRIFFIN_ATTENTION={forced!r}: expected cpu, einsum, xla or cudnn")
    backend = backend or jax.default_backend()
    if forced in ("", "cpu") and backend == "cpu":
        keys = q if k is None else k
        if cpu_kernels.on_one_cpu(backend) and cpu_kernels.can_attend(q, keys):
            return "cpu"
        return "einsum"
    if forced:
        return "einsum" if forced == "cpu" else forced  # type: ignore[return-value]
    if q.shape[1] == 1:
        return "einsum"
    head_dim = q.shape[-1]
    if (
        backend == "gpu"
        and q.dtype in (jnp.bfloat16, jnp.float16)
        and head_dim % 8 == 0
        and head_dim <= 128
    ):
        return "cudnn"
    return "xla"


SMALLEST_WINDOW = 128  # slots of the narrowest key window (`attention_spans`)


def smallest_holding(n: jax.Array | int, sizes: Sequence[int]) -> jax.Array:
    """The index in ascending `sizes` of the smallest that holds `n` (int32; the last when
    none does). Comparisons, not `jnp.searchsorted`: XLA shares them between the layers of a
    forward, where a search was computed once a layer."""
    return sum(((jnp.asarray(n) > s).astype(jnp.int32) for s in sizes[:-1]), jnp.int32(0))


def attention_spans(capacity: int) -> tuple[int, ...]:
    """The key windows an attention over `capacity` slots may read (ascending, last = capacity).

    128, 256, 512, ... up to 3/4 of the capacity, then the capacity: a forward reads the
    smallest window that holds every slot a query may attend, so its attention costs what the
    occupied prefix costs, not the whole buffer (at most 2x the occupied slots, past 128). Each
    window is a branch of every attention in a compiled program, so the set stays small (a
    doubling, not finer steps), and a buffer of fewer than 256 slots has one window: there the
    choice (a conditional in each layer, ~10 small ops) cost more than the slots it skipped
    (batch-1 plain decode steps on a 192-slot cache ran 2-3% slower than on a 160-slot cache
    without windows, this CPU).
    """
    if capacity < 2 * SMALLEST_WINDOW:
        return (capacity,)
    spans, size = [], SMALLEST_WINDOW
    while 4 * size <= 3 * capacity:
        spans.append(size)
        size *= 2
    return (*spans, capacity)


def gqa_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """Grouped-query attention over explicit keys, reading only the occupied prefix.

    Args:
      q: [B, T, N, H] queries (RoPE applied).
      k, v: [B, S', K, H] keys / values (N % K == 0); only the first S are read.
      mask: [B, T, S] bool, True = may attend (S <= S': a window over the first slots). Every
        query must see at least one slot (a fully masked row is undefined on cuDNN).
    Returns:
      [B, T, N, H] in q.dtype.

    The slots past the last one any query may attend are skipped: the smallest of the
    `attention_spans` windows at least T wide that holds them is read (a `lax.switch` on a
    value of the mask, so no recompilation); their softmax weight is exactly 0, so the result
    is the whole buffer's up to the summation order.
    """
    span = mask.shape[-1]
    if attention_implementation(q, k=k) == "cpu":  # reads the buffer in place, to the last slot
        if span < k.shape[1]:
            mask = jnp.pad(mask, ((0, 0), (0, 0), (0, k.shape[1] - span)))
        return cpu_kernels.attention(q, k, v, mask).astype(q.dtype)
    if span < k.shape[1]:
        k, v = k[:, :span], v[:, :span]
    # A window narrower than the queries is rarely the one (T new slots are written): fewer
    # branches, and a prefill over its own T slots reads them without a conditional.
    spans = tuple(s for s in attention_spans(span) if s >= q.shape[1] or s == span)
    if len(spans) == 1:
        return _attend(q, k, v, mask)
    slots = jnp.arange(1, span + 1, dtype=jnp.int32)
    live = jnp.max(jnp.where(jnp.any(mask, axis=(0, 1)), slots, 0))  # last attended slot + 1
    branch = smallest_holding(live, spans)  # the smallest window >= live
    return jax.lax.switch(
        branch,
        [functools.partial(_attend_window, size=size) for size in spans],
        q,
        k,
        v,
        mask,
    )


def _attend_window(q, k, v, mask, *, size: int) -> jax.Array:
    return _attend(q, k[:, :size], v[:, :size], mask[..., :size])


def _attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """`gqa_attention` over exactly mask.shape[-1] == k.shape[1] slots."""
    b, t, n, h = q.shape
    kv = k.shape[2]
    impl = attention_implementation(q, k=k)
    if impl not in ("einsum", "cpu"):  # "cpu" where `gqa_attention` could not take the kernel
        return jax.nn.dot_product_attention(
            q, k, v, mask=mask[:, None], implementation=impl
        ).astype(q.dtype)
    g, s = n // kv, k.shape[1]
    # Each KV head's G query heads x T queries as one block of rows: both products are batched
    # matmuls over (B, K) and the softmax runs along the scores' last axis.
    qg = q.reshape(b, t, kv, g, h).transpose(0, 2, 3, 1, 4).reshape(b, kv, g * t, h)
    # Scores accumulate in f32 (as SDPA / flash kernels and `dot_product_attention` do): bf16
    # scores of a long context would round by ~1e-2 before the softmax.
    scores = jnp.einsum("BKQH,BSKH->BKQS", qg, k, preferred_element_type=jnp.float32)
    scores = scores / jnp.sqrt(jnp.float32(h))
    visible = jnp.broadcast_to(mask[:, None, None], (b, kv, g, t, s)).reshape(b, kv, g * t, s)
    scores = jnp.where(visible, scores, MASK_VALUE)
    # The softmax's normalisation comes after the second product, as flash kernels do: it
    # divides the [.., H] outputs instead of the [.., S] weights (a verification of 60 tokens'
    # attention took 15% less here, a 256-token prefill's 11%).
    weights = jnp.exp(scores - jnp.max(scores, axis=-1, keepdims=True))
    total = jnp.sum(weights, axis=-1, keepdims=True)
    out = jnp.einsum(
        "BKQS,BSKH->BKQH", weights.astype(q.dtype), v, preferred_element_type=jnp.float32
    )  # [B, K, G*T, H]
    out = (out / total).astype(q.dtype)
    return out.reshape(b, kv, g, t, h).transpose(0, 3, 1, 2, 4).reshape(b, t, n, h)


# The one-device decode layout's fused projections (`fuse_projections`).
FUSED_QKV = "qkv_proj"
FUSED_GATE_UP = "gate_up_proj"
_FUSED = {FUSED_QKV: ("q_proj", "k_proj", "v_proj"), FUSED_GATE_UP: ("gate_proj", "up_proj")}


def fuse_projections(params, *, free_parts: bool = False):
    """The fused decode layout: every attention's q/k/v kernels (and biases) concatenated
    along the output axis into one `qkv_proj`, every SwiGLU's gate/up into one `gate_up_proj`.

    One product where there were three (two): the same weights, each output column the same
    dot product, fewer ops per layer (README, "Fused projections", for what it saves). The
    modules detect the layout by the names present. A one-device layout: the sharding rules
    split q and k/v by heads, which a concatenated kernel does not keep apart
    (`sharding.param_shardings` refuses it); the stored layout is the unfused one
    (`unfuse_projections`). Works on either layer layout (stacked leaves concatenate along
    their last axis); a no-op on params already fused. With `free_parts` (the caller owns
    `params` and will not use it again) each part's device buffer is freed once its fused array
    exists: the peak extra memory is one layer's projections, not a second copy of them all.
    """

    def fuse(out: dict) -> dict:
        for fused, parts in _FUSED.items():
            if all(isinstance(out.get(p), dict) for p in parts):
                pieces = [out.pop(p) for p in parts]
                out[fused] = {
                    name: jnp.concatenate([piece[name] for piece in pieces], axis=-1)
                    for name in pieces[0]
                }
                for leaf in (x for piece in pieces for x in piece.values()):
                    if free_parts and isinstance(leaf, jax.Array):
                        leaf.delete()
        return out

    return _each_dict(params, fuse)


def unfuse_projections(params, cfg):
    """The stored (unfused, unpacked) projections from either layout; `cfg` is the base's or
    the draft's config (its head counts, head dim and d_ff give the parts' widths)."""
    return _unfuse(unpack_kernels(params), cfg)


def _unfuse(params, cfg):
    h = cfg.head_dim
    widths = {
        FUSED_QKV: (cfg.n_heads * h, cfg.n_kv_heads * h),  # then the rest (v)
        FUSED_GATE_UP: (cfg.d_ff,),
    }

    def unfuse(out: dict) -> dict:
        for fused, parts in _FUSED.items():
            if isinstance(out.get(fused), dict):
                cuts = list(itertools.accumulate(widths[fused]))
                split = {name: jnp.split(x, cuts, axis=-1) for name, x in out.pop(fused).items()}
                for i, part in enumerate(parts):
                    out[part] = {name: pieces[i] for name, pieces in split.items()}
        return out

    return _each_dict(params, unfuse)


def _each_dict(params, fn):
    """`params` rebuilt bottom-up with `fn` applied to every dict (its values already
    rebuilt; `fn` may change the fresh dict it gets and returns it). Tuples and lists keep
    their type; leaves stay as they are. The walk behind the decode layout's transforms."""
    if isinstance(params, (tuple, list)):
        return type(params)(_each_dict(p, fn) for p in params)
    if not isinstance(params, dict):
        return params
    return fn({k: _each_dict(v, fn) for k, v in params.items()})


def _any_dict(params, test) -> bool:
    """Whether `test` holds for any dict in `params` (nested dicts, tuples and lists)."""
    if isinstance(params, dict):
        return test(params) or any(_any_dict(v, test) for v in params.values())
    if isinstance(params, (tuple, list)):
        return any(_any_dict(p, test) for p in params)
    return False


def kernel_of(p) -> jax.Array:
    """A Dense param dict's kernel as stored: [K, N], or packed (`cpu_kernels.pack`)."""
    return p["kernel"] if "kernel" in p else p[cpu_kernels.PACKED]


def compute_dtype(p) -> jnp.dtype:
    """The dtype a Dense param dict's product computes in: its kernel's, f32 for a packed one
    (`pack_kernels` packs f32 kernels only, and AMX tiles store them as bf16)."""
    return p["kernel"].dtype if "kernel" in p else jnp.dtype(jnp.float32)


def pack_kernels(params, *, free_parts: bool = False):
    """The CPU decode layout's kernels: every Dense kernel `cpu_kernels.can_pack` takes (2-D,
    f32, a whole number of 32-column panels; the lm_head's too) stored packed under
    `packed_kernel` (`cpu_kernels.pack`: f32 panels, or AMX tiles for bf16-valued kernels on
    a CPU with AMX), which `Dense`, `dense` and `model.head_logits` run
    with `cpu_kernels.matmul`. A one-device layout, as `fuse_projections`' is (the sharding
    rules refuse it); `unpack_kernels` gives the stored one back. With `free_parts` each plain
    kernel's buffer is freed once its packed copy exists."""

    def pack(out: dict) -> dict:
        kernel = out.get("kernel")
        if kernel is not None and cpu_kernels.can_pack(kernel):
            out[cpu_kernels.PACKED] = cpu_kernels.pack(out.pop("kernel"))
            if free_parts and isinstance(kernel, jax.Array):
                kernel.delete()
        return out

    return _each_dict(params, pack)


def unpack_kernels(params):
    """The inverse of `pack_kernels` (a no-op on plain kernels)."""

    def unpack(out: dict) -> dict:
        if cpu_kernels.PACKED in out:
            out["kernel"] = cpu_kernels.unpack(out.pop(cpu_kernels.PACKED))
        return out

    return _each_dict(params, unpack)


def plain_kernel(p) -> jax.Array:
    """A Dense param dict's kernel as [K, N], unpacking a packed one."""
    return p["kernel"] if "kernel" in p else cpu_kernels.unpack(p[cpu_kernels.PACKED])


def is_packed(params) -> bool:
    """Whether any kernel in `params` is packed (`pack_kernels`)."""
    return _any_dict(params, lambda d: cpu_kernels.PACKED in d)


def is_fused(params) -> bool:
    """Whether any projection in `params` is in the fused layout (`fuse_projections`)."""
    return _any_dict(params, lambda d: any(k in _FUSED for k in d))


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)); `out_dim` lets the GRIFFIN draft emit 2H."""

    d_ff: int
    out_dim: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        def dense(features: int, name: str) -> Dense:
            return Dense(
                features, use_bias=False, dtype=self.dtype, param_dtype=self.dtype, name=name
            )

        if self.has_variable("params", FUSED_GATE_UP):  # `fuse_projections`' layout
            gate, up = jnp.split(dense(2 * self.d_ff, FUSED_GATE_UP)(x), 2, axis=-1)
        else:
            gate, up = dense(self.d_ff, "gate_proj")(x), dense(self.d_ff, "up_proj")(x)
        return dense(self.out_dim, "down_proj")(jax.nn.silu(gate) * up)


def rows_at(x: jax.Array, at: jax.Array | None) -> jax.Array:
    """x [B, T, ...] at positions at [B, Q] of each row: [B, Q, ...] (x itself when None). The
    base's logits at a prefill's last positions, the draft's queries where its trunk is read."""
    if at is None:
        return x
    at = at.astype(jnp.int32).reshape(at.shape + (1,) * (x.ndim - 2))
    return jnp.take_along_axis(x, at, axis=1)


def write_rows(cache: jax.Array, new: jax.Array, start: jax.Array) -> jax.Array:
    """Writes new[b] into cache[b, start[b]:start[b]+T] for every row b.

    Args:
      cache: [B, S, ...]; new: [B, T, ...]; start: [B] int32.
    Capacity is the caller's to check on the host: `dynamic_update_slice` clamps the start.
    """

    def one(c, n, s):
        return jax.lax.dynamic_update_slice_in_dim(c, n.astype(c.dtype), s, axis=0)

    return jax.vmap(one)(cache, new, start)


class Attention(nn.Module):
    """Llama attention: q/k/v/o projections, RoPE, GQA against a per-layer KV buffer.

    The T new keys/values are written into `cache_k/cache_v` at slot `write_idx[b]` of each row,
    then every query attends over the whole buffer under `mask`. The same module serves prefill,
    decode, tree verification, the draft, and cache-free training (a buffer of exactly T slots
    written at 0). The caller owns lengths: this never decides what is committed.
    """

    n_heads: int
    n_kv_heads: int
    head_dim: int
    rope: RopeConfig
    qkv_bias: bool = False
    dtype: jnp.dtype = jnp.float32
    out_dim: int = 0  # o_proj width (0 = the input's: EAGLE-3's layer reads 2D, writes D)

    @classmethod
    def of(cls, cfg, dtype: jnp.dtype, *, out_dim: int = 0) -> Attention:
        """`self_attn` of a base or draft config (n_heads, n_kv_heads, head_dim, rope,
        qkv_bias), built inside the parent's compact method."""
        return cls(
            n_heads=cfg.n_heads,
            n_kv_heads=cfg.n_kv_heads,
            head_dim=cfg.head_dim,
            rope=cfg.rope,
            qkv_bias=cfg.qkv_bias,
            dtype=dtype,
            out_dim=out_dim,
            name="self_attn",
        )

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        positions: jax.Array,
        cache_k: jax.Array,
        cache_v: jax.Array,
        write_idx: jax.Array,
        mask: jax.Array,
        query_at: jax.Array | None = None,
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Runs attention.

        Args:
          x: [B, T, D] input.  positions: [B, T] int32 RoPE positions.
          cache_k, cache_v: [B, S, K, H] this layer's buffers.
          write_idx: [B] int32 first slot the T new entries go to.
          mask: [B, T, S] bool, True = may attend (after the write).
          query_at: [B, Q] int32 indices into T, or None (all T): only these positions query
            (all T keys/values are written). A one-layer draft whose caller reads one output
            a row (its trunk) skips the other T - Q positions' attention and what follows.
        Returns:
          (output [B, T or Q, D], cache_k, cache_v) with the new entries written.
        """
        b, t, d = x.shape
        n, kv, h = self.n_heads, self.n_kv_heads, self.head_dim

        def proj(features: int, bias: bool, name: str) -> Dense:
            return Dense(
                features, use_bias=bias, dtype=self.dtype, param_dtype=self.dtype, name=name
            )

        if self.has_variable("params", FUSED_QKV):  # `fuse_projections`' layout
            qkv = proj((n + 2 * kv) * h, self.qkv_bias, FUSED_QKV)(x)
            q, k, v = jnp.split(qkv, [n * h, (n + kv) * h], axis=-1)
        else:
            q = proj(n * h, self.qkv_bias, "q_proj")(x)
            k = proj(kv * h, self.qkv_bias, "k_proj")(x)
            v = proj(kv * h, self.qkv_bias, "v_proj")(x)
        q = q.reshape(b, t, n, h)  # [B, T, N, H]
        k = k.reshape(b, t, kv, h)  # [B, T, K, H]
        v = v.reshape(b, t, kv, h)  # [B, T, K, H]
        cos, sin = rope_cos_sin(positions, head_dim=h, rope=self.rope, dtype=x.dtype)
        q = apply_rope(q, cos, sin)
        k = apply_rope(k, cos, sin)
        cache_k = write_rows(cache_k, k, write_idx)
        cache_v = write_rows(cache_v, v, write_idx)
        q, mask = rows_at(q, query_at), rows_at(mask, query_at)  # [B, Q, N, H], [B, Q, S]
        out = gqa_attention(q, cache_k.astype(q.dtype), cache_v.astype(q.dtype), mask)
        o_proj = proj(self.out_dim or d, False, "o_proj")
        return o_proj(out.reshape(b, q.shape[1], n * h)), cache_k, cache_v
