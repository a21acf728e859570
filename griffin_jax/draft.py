"""The draft models: GRIFFIN's token-alignable draft, EAGLE-2 and EAGLE-3, behind one interface.

Mirrors the reference's `model/cnets_griffin_1.py` (inference and stage-1 training: causal and
tree attention with a KV cache) and `model/cnets_griffin_2.py` (stages >= 2: the multi-stream
training attention over `q_hidden_states`, spec section 3), and EAGLE-2's `model/cnets.py`.

GRIFFIN (spec 2.1): the fusion block `fc` (Linear 2D->D with bias over [embedding, feature], then
an ungated MLP over [N(v), N(e)] with one shared RMSNorm, plus the residual), then one Llama
decoder layer without input norm whose MLP emits 2D on top of the duplicated residual [a, a];
the first D are `token_feature` (the base lm_head gives the token logits), the last D are
`next_feature` (the predicted next base feature). EAGLE-2: `fc` is a single Linear 2D->D with
bias over [embedding, feature], then the same layer with an MLP of width D; its one output is
returned twice so the engine and the trainer never branch on the kind.

EAGLE-3 (SafeAILab/EAGLE `eagle/model/cnets.py`): its trunk features are the base's hidden states
entering layers 2, L//2 and L-3, concatenated (3T wide, `feature_layers`) and projected by `fc`
(3T -> D, no bias); tree levels feed the draft's own previous output (D wide) without `fc`. One
decoder layer (`midlayer`) normalises the token embedding (`input_layernorm`) and the feature
(`hidden_norm`), concatenates them [emb, feat] (2D) into q/k/v, adds the attention output to the
feature, then a post-attention norm and a SwiGLU MLP with its residual. The output is the next
feature; through the draft's own `norm` it is the token feature, for its own `lm_head` over a draft
vocabulary of V' tokens (`d2t`: draft index i is target id i + d2t[i]; `speculative.DraftHead`).

The token embedding is not part of the draft params: it is the base's [V, D] table, passed in
(spec 2.4 allows sharing it; the reference stores a frozen copy, which the exporter writes).
Params are linen's nested dict with HF-like names (`fc/fc/kernel`, `layers_0/self_attn/q_proj/
kernel`, ...); `convert/hf_keys.py` maps them to the published state-dict keys.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any, Literal

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from griffin_jax import cpu_kernels
from griffin_jax.config import _HARMLESS_KEYS, RopeConfig, UnsupportedConfigError
from griffin_jax.layers import (
    MASK_VALUE,
    Attention,
    Dense,
    RMSNorm,
    SwiGLU,
    apply_rope,
    compute_dtype,
    dense,
    rms_norm,
    rope_cos_sin,
    rows_at,
)

DraftKind = Literal["griffin", "eagle2", "eagle3"]
DRAFT_KINDS = ("griffin", "eagle2", "eagle3")
MaskMode = Literal["exact", "leaky_reference"]

# Draft config fields that never change the draft's numbers. Beyond the base model's harmless
# keys: `bias` (read by the reference loader, no effect), the sliding-window and layer-type fields
# of Qwen2 configs and the expert counts of Mixtral configs (the reference draft layer is always
# a dense full-attention Llama layer and never reads them), and tied embeddings (no lm_head).
_DRAFT_IGNORED_KEYS = _HARMLESS_KEYS | {
    "bias",
    "tie_word_embeddings",
    "sliding_window",
    "use_sliding_window",
    "max_window_layers",
    "layer_types",
    "num_local_experts",
    "num_experts_per_tok",
}
_DRAFT_READ_KEYS = frozenset(
    {
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "num_hidden_layers",
        "hidden_act",
        "rms_norm_eps",
        "rope_theta",
        "rope_scaling",
        "rope_parameters",
        "qkv_bias",
        "attention_bias",
        "mlp_bias",
    }
)
# EAGLE-3 only: the draft vocabulary and the base's hidden size when it differs from the draft's.
_EAGLE3_READ_KEYS = frozenset({"draft_vocab_size", "target_hidden_size"})


@dataclasses.dataclass(frozen=True, kw_only=True)
class DraftConfig:
    """Draft hyperparameters (from the draft's own config.json, not the base's)."""

    kind: DraftKind = "griffin"
    vocab_size: int  # V (must equal the base's: the embedding and lm_head are shared)
    d_model: int  # D (must equal the base's)
    d_ff: int  # F (the draft's intermediate size, not necessarily the base's)
    n_heads: int  # N
    n_kv_heads: int  # K
    head_dim: int  # H
    rope: RopeConfig = RopeConfig()
    rms_eps: float = 1e-6
    qkv_bias: bool = False  # Qwen2 drafts; the importer follows the checkpoint's keys
    max_position_embeddings: int = 2048
    # EAGLE-3 only (0 = not set): the draft lm_head's vocabulary V' (0 = vocab_size), and the
    # base's hidden size T when it differs from the draft's D (fc is then [3T, D] and the draft
    # keeps its own [V, D] embedding).
    draft_vocab_size: int = 0
    target_hidden_size: int = 0

    def __post_init__(self) -> None:
        if self.kind not in DRAFT_KINDS:
            raise ValueError(f"draft kind {self.kind!r} is not one of {', '.join(DRAFT_KINDS)}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}"
            )
        if self.kind != "eagle3" and (self.draft_vocab_size or self.target_hidden_size):
            raise ValueError(
                "draft_vocab_size and target_hidden_size are EAGLE-3 settings "
                f"(this draft is {self.kind})"
            )
        if not 0 <= self.draft_vocab_size <= self.vocab_size:
            raise ValueError(
                f"draft_vocab_size={self.draft_vocab_size} must be in [0 (the whole vocabulary), "
                f"vocab_size={self.vocab_size}]"
            )

    @property
    def out_dim(self) -> int:
        """Width of the decoder layer's output: 2D for GRIFFIN (two heads), else D."""
        return 2 * self.d_model if self.kind == "griffin" else self.d_model

    @property
    def draft_vocab(self) -> int:
        """V': the tokens an EAGLE-3 draft's own lm_head scores (the base vocabulary otherwise)."""
        return self.draft_vocab_size or self.vocab_size

    @property
    def target_dim(self) -> int:
        """T: the base's hidden size (the draft's own for GRIFFIN and EAGLE-2)."""
        return self.target_hidden_size or self.d_model

    @property
    def feature_dim(self) -> int:
        """Width of the base features the trunk reads: 3T for EAGLE-3, else D."""
        return 3 * self.target_dim if self.kind == "eagle3" else self.d_model

    @property
    def own_embedding(self) -> bool:
        """An EAGLE-3 draft narrower than its base embeds tokens with its own [V, D] table."""
        return self.kind == "eagle3" and self.target_dim != self.d_model

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any], *, kind: DraftKind) -> DraftConfig:
        """Reads a published draft `config.json` (transformers 4 or 5 layout), strictly.

        Args:
          hf: the parsed config. The kind is not in it (the checkpoint keys tell it).
          kind: "griffin", "eagle2" or "eagle3".
        Raises:
          UnsupportedConfigError: a field that would change the numbers is not implemented.
        """
        read = _DRAFT_READ_KEYS | (_EAGLE3_READ_KEYS if kind == "eagle3" else frozenset())
        for key in hf:
            if key not in _DRAFT_IGNORED_KEYS and key not in read:
                raise UnsupportedConfigError(
                    f"draft config field {key!r}={hf[key]!r} is not supported"
                )
        if int(hf.get("num_hidden_layers", 1)) != 1:
            raise UnsupportedConfigError(
                f"draft num_hidden_layers={hf['num_hidden_layers']} "
                "(the drafts have exactly 1 layer)"
            )
        if hf.get("hidden_act", "silu") != "silu":
            raise UnsupportedConfigError(
                f"draft hidden_act {hf['hidden_act']!r} is not supported (silu)"
            )
        if hf.get("mlp_bias"):
            raise UnsupportedConfigError("draft mlp_bias=true is not supported")
        n_heads = int(hf["num_attention_heads"])
        d_model = int(hf["hidden_size"])
        qkv_bias = hf.get("qkv_bias")
        if qkv_bias is None:
            qkv_bias = hf.get("attention_bias", False)
        return cls(
            kind=kind,
            vocab_size=int(hf["vocab_size"]),
            d_model=d_model,
            d_ff=int(hf["intermediate_size"]),
            n_heads=n_heads,
            n_kv_heads=int(hf.get("num_key_value_heads") or n_heads),
            head_dim=int(hf.get("head_dim") or d_model // n_heads),
            rope=RopeConfig.from_hf(hf, where="draft config"),
            rms_eps=float(hf.get("rms_norm_eps", 1e-6)),
            qkv_bias=bool(qkv_bias),
            max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
            **_eagle3_sizes(hf, kind=kind, vocab_size=int(hf["vocab_size"]), d_model=d_model),
        )

    def to_hf(self) -> dict[str, Any]:
        """The draft `config.json` dict in the transformers-4 layout of the published drafts.

        The fields are those the reference draft reads (spec 2.6); `head_dim` is written only when
        it differs from hidden_size // num_attention_heads (the reference cannot load that case).
        """
        scaling: dict[str, Any] | None = None
        if self.rope.kind == "linear":
            scaling = {"type": "linear", "factor": self.rope.factor}
        elif self.rope.kind == "llama3":
            scaling = {
                "rope_type": "llama3",
                "factor": self.rope.factor,
                "low_freq_factor": self.rope.low_freq_factor,
                "high_freq_factor": self.rope.high_freq_factor,
                "original_max_position_embeddings": self.rope.original_max_position,
            }
        out: dict[str, Any] = {
            "architectures": [
                "LlamaForCausalLMEagle3" if self.kind == "eagle3" else "LlamaForCausalLM"
            ],
            "model_type": "llama",
            "hidden_act": "silu",
            "hidden_size": self.d_model,
            "intermediate_size": self.d_ff,
            "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads,
            "num_hidden_layers": 1,
            "rms_norm_eps": self.rms_eps,
            "max_position_embeddings": self.max_position_embeddings,
            "rope_theta": self.rope.theta,
            "rope_scaling": scaling,
            "vocab_size": self.vocab_size,
            "pretraining_tp": 1,
            "tie_word_embeddings": False,
        }
        if self.head_dim != self.d_model // self.n_heads:
            out["head_dim"] = self.head_dim
        if self.qkv_bias:
            out["qkv_bias"] = True
        if self.kind == "eagle3":
            out["draft_vocab_size"] = self.draft_vocab
            if self.target_hidden_size:
                out["target_hidden_size"] = self.target_hidden_size
        return out


def _eagle3_sizes(hf: Mapping[str, Any], *, kind: str, vocab_size: int, d_model: int) -> dict:
    """DraftConfig's EAGLE-3 fields from a config dict (none for the other kinds)."""
    if kind != "eagle3":
        return {}
    draft_vocab = int(hf.get("draft_vocab_size") or vocab_size)
    if not 1 <= draft_vocab <= vocab_size:
        raise UnsupportedConfigError(
            f"draft_vocab_size={draft_vocab} must be in [1, vocab_size={vocab_size}]"
        )
    target = int(hf.get("target_hidden_size") or d_model)
    return dict(
        draft_vocab_size=0 if draft_vocab == vocab_size else draft_vocab,
        target_hidden_size=0 if target == d_model else target,
    )


def feature_layers(dcfg: DraftConfig, n_layers: int) -> tuple[int, ...]:
    """The base layers whose input hidden states the draft reads, in order (() = the final
    normed hidden state, GRIFFIN and EAGLE-2). EAGLE-3: layers 2, L//2 and L-3.

    Raises:
      ValueError: an EAGLE-3 draft on a base without three distinct such layers (L < 7).
    """
    if dcfg.kind != "eagle3":
        return ()
    layers = tuple(sorted({2, n_layers // 2, n_layers - 3}))
    if len(layers) != 3 or layers[0] < 0:
        raise ValueError(
            f"an EAGLE-3 draft reads the base's layers 2, L//2 and L-3: a base of {n_layers} "
            "layers has no three distinct ones (it needs at least 7)"
        )
    return layers


@flax.struct.dataclass
class DraftCache:
    """The single draft layer's KV buffers; lengths are the engine's."""

    k: jax.Array  # [B, S, K, H]
    v: jax.Array  # [B, S, K, H]

    @property
    def capacity(self) -> int:
        return self.k.shape[1]


def init_draft_cache(dcfg: DraftConfig, batch: int, capacity: int, dtype=jnp.float32) -> DraftCache:
    """An empty draft cache of `capacity` slots per row."""
    shape = (batch, capacity, dcfg.n_kv_heads, dcfg.head_dim)
    return DraftCache(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype))


class _FusionMLP(nn.Module):
    """GRIFFIN's ungated MLP `fc.mlp`: down(silu(up([N(v), N(e)]))), one shared norm N."""

    d_ff: int
    rms_eps: float
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, fused: jax.Array, emb: jax.Array) -> jax.Array:
        norm = RMSNorm(self.rms_eps, self.dtype, name="input_layernorm")
        h = jnp.concatenate([norm(fused), norm(emb)], axis=-1)  # [..., 2D], order [feat, emb]
        up = Dense(
            self.d_ff, use_bias=False, dtype=self.dtype, param_dtype=self.dtype, name="up_proj"
        )
        down = Dense(
            fused.shape[-1],
            use_bias=False,
            dtype=self.dtype,
            param_dtype=self.dtype,
            name="down_proj",
        )
        return down(jax.nn.silu(up(h)))


class _Fusion(nn.Module):
    """GRIFFIN's fusion block `fc` (the reference's `Efc`, the paper's TGF)."""

    d_ff: int
    rms_eps: float
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, emb: jax.Array, feat: jax.Array) -> jax.Array:
        d = feat.shape[-1]
        fc = Dense(d, use_bias=True, dtype=self.dtype, param_dtype=self.dtype, name="fc")
        u = fc(jnp.concatenate([emb, feat], axis=-1))  # [..., D], input order [emb, feat]
        v = RMSNorm(self.rms_eps, self.dtype, name="post_attention_layernorm")(u)
        # The residual is the un-normalised fc output.
        return u + _FusionMLP(self.d_ff, self.rms_eps, self.dtype, name="mlp")(v, emb)


class _DraftLayer(nn.Module):
    """The one decoder layer: no input norm; MLP of width `out_dim` over the repeated residual."""

    dcfg: DraftConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, positions, cache_k, cache_v, write_idx, mask, query_at=None):
        c = self.dcfg
        a, cache_k, cache_v = Attention.of(c, self.dtype)(
            x, positions, cache_k, cache_v, write_idx, mask, query_at
        )
        # No input norm: the attention input and the residual are both x.
        a = rows_at(x, query_at) + a
        h = RMSNorm(c.rms_eps, self.dtype, name="post_attention_layernorm")(a)
        m = SwiGLU(c.d_ff, c.out_dim, self.dtype, name="mlp")(h)
        return _repeat_residual(a, c) + m, cache_k, cache_v


def _repeat_residual(a: jax.Array, c: DraftConfig) -> jax.Array:
    """GRIFFIN's duplicated residual [a, a] (2D wide); EAGLE-2's plain a."""
    return jnp.concatenate([a] * (c.out_dim // c.d_model), axis=-1)  # [..., out_dim]


class _Eagle3Layer(nn.Module):
    """EAGLE-3's `midlayer`: attention over [N(emb), N(feat)] (2D), residual from the feature."""

    dcfg: DraftConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, emb, feat, positions, cache_k, cache_v, write_idx, mask, query_at=None):
        c = self.dcfg
        x = jnp.concatenate(
            [
                RMSNorm(c.rms_eps, self.dtype, name="input_layernorm")(emb),
                RMSNorm(c.rms_eps, self.dtype, name="hidden_norm")(feat),
            ],
            axis=-1,
        )  # [..., 2D], order [emb, feat]
        attn = Attention.of(c, self.dtype, out_dim=c.d_model)
        a, cache_k, cache_v = attn(x, positions, cache_k, cache_v, write_idx, mask, query_at)
        a = rows_at(feat, query_at) + a
        h = RMSNorm(c.rms_eps, self.dtype, name="post_attention_layernorm")(a)
        return a + SwiGLU(c.d_ff, c.d_model, self.dtype, name="mlp")(h), cache_k, cache_v


class DraftModel(nn.Module):
    """Fusion + one layer. `__call__` is the cached inference forward, returning
    (token_feature, next_feature, k, v); `fuse` is the fusion alone (GRIFFIN, EAGLE-2)."""

    dcfg: DraftConfig
    dtype: jnp.dtype = jnp.float32

    def setup(self) -> None:
        c = self.dcfg

        def dense(features: int, bias: bool) -> Dense:
            return Dense(features, use_bias=bias, dtype=self.dtype, param_dtype=self.dtype)

        if c.kind == "griffin":
            self.fc = _Fusion(c.d_ff, c.rms_eps, self.dtype)
            self.layers_0 = _DraftLayer(c, self.dtype)
        elif c.kind == "eagle2":
            self.fc = dense(c.d_model, True)
            self.layers_0 = _DraftLayer(c, self.dtype)
        else:
            self.fc = dense(c.d_model, False)  # [3T, D]
            self.midlayer = _Eagle3Layer(c, self.dtype)
            self.norm = RMSNorm(c.rms_eps, self.dtype)
            self.lm_head = dense(c.draft_vocab, False)  # [D, V']

    def fuse(self, emb: jax.Array, feat: jax.Array) -> jax.Array:
        """[..., D] embeddings and features -> the layer's input [..., D]."""
        if self.dcfg.kind == "griffin":
            return self.fc(emb, feat)
        return self.fc(jnp.concatenate([emb, feat], axis=-1))  # EAGLE-2: [emb, feat]

    def __call__(self, emb, feat, positions, cache_k, cache_v, write_idx, mask, query_at=None):
        c = self.dcfg
        if c.kind != "eagle3":
            out, k, v = self.layers_0(
                self.fuse(emb, feat), positions, cache_k, cache_v, write_idx, mask, query_at
            )
            return (*_split(out, c), k, v)
        if feat.shape[-1] == c.feature_dim:  # base features: project 3T -> D
            feat = self.fc(feat)
        elif feat.shape[-1] != c.d_model:
            raise ValueError(
                f"EAGLE-3 draft features must be {c.feature_dim} (base) or {c.d_model} (draft) "
                f"wide, got {feat.shape[-1]}"
            )
        out, k, v = self.midlayer(emb, feat, positions, cache_k, cache_v, write_idx, mask, query_at)
        return self.norm(out), out, k, v

    def init_all(self, emb, feat, positions, cache_k, cache_v, write_idx, mask):
        """`__call__`, also touching EAGLE-3's lm_head (not used by the forward) for `init`."""
        out = self(emb, feat, positions, cache_k, cache_v, write_idx, mask)
        if self.dcfg.kind == "eagle3":
            self.lm_head(out[0])
        return out


def _split(out: jax.Array, dcfg: DraftConfig) -> tuple[jax.Array, jax.Array]:
    """(token_feature, next_feature): GRIFFIN's two heads, or EAGLE-2's single output twice."""
    if dcfg.kind == "griffin":
        return out[..., : dcfg.d_model], out[..., dcfg.d_model :]
    return out, out


def param_dtype(params) -> jnp.dtype:
    """The draft params' float dtype (the d2t buffer of an EAGLE-3 draft is int32)."""
    return compute_dtype(params["fc"]["fc"] if "fc" in params["fc"] else params["fc"])


def draft_forward(
    params,
    embedding: jax.Array,
    features: jax.Array,
    tokens: jax.Array,
    positions: jax.Array,
    cache: DraftCache,
    *,
    write_idx: jax.Array,
    mask: jax.Array,
    dcfg: DraftConfig,
    dtype=None,
    outputs_at: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array, DraftCache]:
    """Runs the draft on T new (feature, token) pairs against its cache.

    Args:
      params: the draft params (HF-like nested dict, no embedding).
      embedding: [V, D] the base token embedding (shared, frozen; an EAGLE-3 draft narrower than
        its base has its own, `params["embed_tokens"]`).
      features: [B, T, Df] base features (Df = `dcfg.feature_dim`: the layers of
        `feature_layers`, concatenated, for EAGLE-3), or a previous `next_feature` [B, T, D].
      tokens: [B, T] int32, the token paired with each feature (x_{i+1} for f_i).
      positions: [B, T] int32 RoPE positions.
      cache: DraftCache; the new K/V are written at slots write_idx[b] .. write_idx[b]+T-1.
      write_idx: [B] int32.
      mask: [B, T, S] bool, True = may attend (causal prefix plus the tree mask; S = capacity).
      dtype: computation dtype (default: the params').
      outputs_at: [B, Q] int32 indices into T, or None (all T): the positions whose outputs
        are wanted. Every position's K/V is written either way; only these run the attention,
        the MLP and the heads (the draft is one layer, so no later layer needs the others'
        outputs). The trunk reads one output a row (the next tree's level-1 inputs): over a
        prompt or a catch-up that spares most of its work.
    Returns:
      token_feature [B, T or Q, D] (apply the base lm_head for logits), next_feature [B, T or
      Q, D] (the next draft input), and the cache with the new entries written.
    """
    dtype = dtype or param_dtype(params)
    if dcfg.own_embedding:
        embedding = params["embed_tokens"]["embedding"]
    emb = cpu_kernels.take_rows(embedding, tokens).astype(dtype)  # [B, T, D]
    token_feature, next_feature, k, v = DraftModel(dcfg, dtype).apply(
        {"params": module_params(params)},
        emb,
        features.astype(dtype),
        positions,
        cache.k,
        cache.v,
        write_idx,
        mask,
        outputs_at,
    )
    return token_feature, next_feature, DraftCache(k=k, v=v)


def module_params(params):
    """The params the Flax module owns (EAGLE-3's d2t buffer and own embedding are not)."""
    return {k: v for k, v in params.items() if k not in ("d2t", "embed_tokens")}


def stream_masks(num_streams: int, seq_len: int) -> np.ndarray:
    """The F boolean masks of the multi-stream training attention (spec 3).

    Query row r may attend stream 0 (base features) at columns c <= r - (F-1) (causal, delayed by
    F-1), and stream t >= 1 only at c = r - (F-1-t) (the last stream's diagonal is c = r).
    F = 1 gives the plain causal mask.

    Returns:
      [F, L, L] bool numpy array (static: it only depends on the shapes).
    """
    f = num_streams
    rows = np.arange(seq_len)[:, None]
    cols = np.arange(seq_len)[None, :]
    masks = [cols <= rows - (f - 1)]
    masks += [cols == rows - (f - 1 - t) for t in range(1, f)]
    return np.stack(masks)


def multi_stream_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    stream_mask: jax.Array,
    key_valid: jax.Array,
    *,
    mode: MaskMode = "exact",
) -> jax.Array:
    """Attention of one query stream over the keys/values of F streams.

    "exact": one softmax over the concatenated keys of all streams, disallowed and padded keys
    at `MASK_VALUE` (so rows sum to 1 and padding never leaks). "leaky_reference": the
    reference's multiplicative masking (cnets_griffin_2, from HASS), literally: per-stream scores
    are multiplied by the 0/1 masks and summed into one [T, S] score table, where disallowed
    columns hold 0 (not -inf); softmax over all S columns; the weights are masked again and
    applied per stream. `key_valid` is ignored there, as in the reference.

    Args:
      q: [B, T, N, H] queries (RoPE applied).
      k, v: [F, B, S, K, H] keys and values of every stream (RoPE applied to k).
      stream_mask: [F, T, S] bool, see `stream_masks`.
      key_valid: [B, S] bool, False at padded key positions.
    Returns:
      [B, T, N, H] in q.dtype.
    """
    b, t, n, h = q.shape
    kv = k.shape[3]
    qg = q.reshape(b, t, kv, n // kv, h)  # [B, T, K, G, H]
    scores = jnp.einsum("BTKGH,FBSKH->BKGTFS", qg, k).astype(jnp.float32) / jnp.sqrt(jnp.float32(h))
    allowed = jnp.swapaxes(stream_mask, 0, 1)[None, None, None]  # [1, 1, 1, T, F, S]
    if mode == "exact":
        allowed = allowed & key_valid[:, None, None, None, None, :]  # [B, 1, 1, T, F, S]
        scores = jnp.where(allowed, scores, MASK_VALUE)
        shape = scores.shape
        probs = jax.nn.softmax(scores.reshape(*shape[:4], -1), axis=-1).reshape(shape)
    elif mode == "leaky_reference":
        z = jnp.sum(jnp.where(allowed, scores, 0.0), axis=4)  # [B, K, G, T, S]
        weights = jax.nn.softmax(z, axis=-1)  # over all S columns, masked ones at score 0
        probs = jnp.where(allowed, weights[:, :, :, :, None, :], 0.0)  # [B, K, G, T, F, S]
    else:
        raise ValueError(f"mask_mode {mode!r} is not 'exact' or 'leaky_reference'")
    out = jnp.einsum("BKGTFS,FBSKH->BTKGH", probs.astype(q.dtype), v)
    return out.reshape(b, t, n, h)


def _dense(p: Mapping[str, jax.Array], x: jax.Array) -> jax.Array:
    """x @ kernel (+ bias) in x's dtype, for a param subtree (packed or not)."""
    return dense(p, x, dtype=x.dtype)


def draft_forward_train(
    params,
    embedding: jax.Array,
    features: jax.Array,
    streams: jax.Array | None,
    tokens: jax.Array,
    *,
    lengths: jax.Array,
    dcfg: DraftConfig,
    mask_mode: MaskMode = "exact",
    dtype=None,
) -> tuple[jax.Array, jax.Array]:
    """Cache-free training forward over F streams (spec 3; cnets_griffin_2 with q_hidden_states).

    Every stream goes through the fusion block with the same tokens; keys/values come from every
    stream (positions 0..L-1 for all), queries and the residual only from the last stream.

    Args:
      params: draft params.  embedding: [V, D] base embedding (frozen: no gradient flows to it).
      features: [B, L, D] base features (stream 0).
      streams: [F-1, B, L, D] earlier draft-feature streams, or None for F = 1.
      tokens: [B, L] int32.
      lengths: [B] int32 valid positions per row (right padding); used by the exact mode only.
      mask_mode: "exact" (default) or "leaky_reference" (reproduces the published training).
      dtype: computation dtype (default: the params').
    Returns:
      token_feature [B, L, D], next_feature [B, L, D] for the last stream's queries.
    """
    c = dcfg
    if c.kind == "eagle3":
        raise NotImplementedError(
            "EAGLE-3 drafts train with their own forward (training-time test)"
        )
    dtype = dtype or param_dtype(params)
    b, seq_len = tokens.shape
    emb = jax.lax.stop_gradient(jnp.take(embedding, tokens, axis=0)).astype(dtype)  # [B, L, D]
    all_feats = features[None] if streams is None else jnp.concatenate([features[None], streams])
    f = all_feats.shape[0]
    all_feats = all_feats.astype(dtype)  # [F, B, L, D]
    model = DraftModel(c, dtype)
    x = model.apply(
        {"params": params},
        jnp.broadcast_to(emb, all_feats.shape),
        all_feats,
        method=DraftModel.fuse,
    )  # [F, B, L, D]
    p_layer = params["layers_0"]
    p_attn = p_layer["self_attn"]
    positions = jnp.broadcast_to(jnp.arange(seq_len, dtype=jnp.int32), (b, seq_len))
    cos, sin = rope_cos_sin(positions, head_dim=c.head_dim, rope=c.rope, dtype=dtype)
    q = _dense(p_attn["q_proj"], x[-1]).reshape(b, seq_len, c.n_heads, c.head_dim)
    q = apply_rope(q, cos, sin)  # [B, L, N, H]
    kv_shape = (f * b, seq_len, c.n_kv_heads, c.head_dim)
    cos_f = jnp.tile(cos, (f, 1, 1))  # [F*B, L, H]
    sin_f = jnp.tile(sin, (f, 1, 1))
    k = apply_rope(_dense(p_attn["k_proj"], x).reshape(kv_shape), cos_f, sin_f)
    k = k.reshape(f, b, seq_len, c.n_kv_heads, c.head_dim)  # [F, B, L, K, H]
    v = _dense(p_attn["v_proj"], x).reshape(f, b, seq_len, c.n_kv_heads, c.head_dim)
    key_valid = jnp.arange(seq_len)[None, :] < lengths[:, None]  # [B, L]
    attn = multi_stream_attention(
        q, k, v, jnp.asarray(stream_masks(f, seq_len)), key_valid, mode=mask_mode
    )
    a = x[-1] + _dense(p_attn["o_proj"], attn.reshape(b, seq_len, c.n_heads * c.head_dim))
    h = rms_norm(a, p_layer["post_attention_layernorm"]["weight"], eps=c.rms_eps)
    m = SwiGLU(c.d_ff, c.out_dim, dtype).apply({"params": p_layer["mlp"]}, h)
    return _split(_repeat_residual(a, c) + m, c)


def ttt_attention(
    q: jax.Array,
    k0: jax.Array,
    v0: jax.Array,
    k_own: jax.Array,
    v_own: jax.Array,
    key_valid: jax.Array,
) -> jax.Array:
    """Attention of EAGLE-3's training-time-test step F - 1 (F = 1 + len(k_own)).

    Query row r attends step 0's keys (the trunk) causally, c <= r, and, for each later step t,
    that step's own key at c = r only: a tree node sees the trunk up to its root and its own
    ancestors. One exact softmax over the causal scores and the F - 1 diagonal ones, padded keys
    at `MASK_VALUE`. The diagonal scores are row-wise dot products, so a step costs one causal
    attention whatever F is (the official loop's `torch.sum(q * k_t)` terms).

    Args:
      q: [B, T, N, H] queries (RoPE applied).
      k0, v0: [B, T, K, H] step 0's keys (RoPE applied) and values.
      k_own, v_own: [F-1, B, T, K, H] later steps' keys and values (F - 1 may be 0).
      key_valid: [B, T] bool, False at padded positions.
    Returns:
      [B, T, N, H] in q.dtype.
    """
    b, t, n, h = q.shape
    kv = k0.shape[2]
    qg = q.reshape(b, t, kv, n // kv, h)  # [B, T, K, G, H]
    scale = jnp.sqrt(jnp.float32(h))
    trunk = jnp.einsum("BTKGH,BSKH->BKGTS", qg, k0).astype(jnp.float32) / scale
    causal = jnp.tril(jnp.ones((t, t), bool))[None] & key_valid[:, None, :]  # [B, T, S]
    trunk = jnp.where(causal[:, None, None], trunk, MASK_VALUE)
    own = jnp.einsum("BTKGH,FBTKH->BKGTF", qg, k_own).astype(jnp.float32) / scale
    own = jnp.where(key_valid[:, None, None, :, None], own, MASK_VALUE)
    probs = jax.nn.softmax(jnp.concatenate([trunk, own], axis=-1), axis=-1).astype(q.dtype)
    out = jnp.einsum("BKGTS,BSKH->BTKGH", probs[..., :t], v0)
    out = out + jnp.einsum("BKGTF,FBTKH->BTKGH", probs[..., t:], v_own)
    return out.reshape(b, t, n, h)


def eagle3_forward_train(
    params,
    embedding: jax.Array,
    features: jax.Array,
    tokens: jax.Array,
    *,
    lengths: jax.Array,
    steps: int,
    dcfg: DraftConfig,
    dtype=None,
) -> jax.Array:
    """EAGLE-3's training-time test (`eagle/traineagle3/cnets.py`): `steps` draft steps, each on
    the previous step's outputs, cache-free.

    Step s at row r pairs the draft's step-(s-1) output there (step 0: fc of the base features)
    with token x_{r+1+s}, at RoPE position r + s; it attends the keys of steps 0..s as
    `ttt_attention` says (exact softmax, padded keys excluded). So step s at row r is the draft's
    s-th free-running step from position r, as a chain of the tree drafts it.

    Args:
      params: EAGLE-3 draft params.  embedding: [V, D] the base embedding (frozen).
      features: [B, L, 3T] the base features f_r (`feature_layers`, concatenated).
      tokens: [B, L] int32 x_{r+1} (0 past the end).  lengths: [B] int32 true lengths.
      steps: the number of steps (the official training uses 7).
    Returns:
      [steps, B, L, D] token features (the draft's `norm` applied: `lm_head` gives logits).
    """
    c = dcfg
    if c.kind != "eagle3":
        raise ValueError(f"the training-time test trains EAGLE-3 drafts, not {c.kind}")
    dtype = dtype or param_dtype(params)
    if c.own_embedding:
        embedding = params["embed_tokens"]["embedding"]
    b, seq_len = tokens.shape
    mid = params["midlayer"]
    p_attn = mid["self_attn"]
    key_valid = jnp.arange(seq_len)[None, :] < lengths[:, None]  # [B, L]
    h = _dense(params["fc"], features.astype(dtype))  # [B, L, D]
    ks, vs, outs = [], [], []
    for s in range(steps):
        tok = jnp.pad(tokens[:, s:], ((0, 0), (0, s)))  # x_{r+1+s}, 0 past the end
        emb = jax.lax.stop_gradient(jnp.take(embedding, tok, axis=0)).astype(dtype)
        x = jnp.concatenate(
            [
                rms_norm(emb, mid["input_layernorm"]["weight"].astype(dtype), eps=c.rms_eps),
                rms_norm(h, mid["hidden_norm"]["weight"].astype(dtype), eps=c.rms_eps),
            ],
            axis=-1,
        )  # [B, L, 2D]
        positions = jnp.broadcast_to(jnp.arange(seq_len, dtype=jnp.int32) + s, (b, seq_len))
        cos, sin = rope_cos_sin(positions, head_dim=c.head_dim, rope=c.rope, dtype=dtype)
        kv_shape = (b, seq_len, c.n_kv_heads, c.head_dim)
        q = _dense(p_attn["q_proj"], x).reshape(b, seq_len, c.n_heads, c.head_dim)
        q = apply_rope(q, cos, sin)
        ks.append(apply_rope(_dense(p_attn["k_proj"], x).reshape(kv_shape), cos, sin))
        vs.append(_dense(p_attn["v_proj"], x).reshape(kv_shape))
        none = jnp.zeros((0, *ks[0].shape), ks[0].dtype)  # step 0 has no later steps
        k_own, v_own = (jnp.stack(ks[1:]), jnp.stack(vs[1:])) if s else (none, none)
        attn = ttt_attention(q, ks[0], vs[0], k_own, v_own, key_valid)
        a = h + _dense(p_attn["o_proj"], attn.reshape(b, seq_len, c.n_heads * c.head_dim))
        post = rms_norm(a, mid["post_attention_layernorm"]["weight"].astype(dtype), eps=c.rms_eps)
        h = a + SwiGLU(c.d_ff, c.d_model, dtype).apply({"params": mid["mlp"]}, post)
        outs.append(rms_norm(h, params["norm"]["weight"].astype(dtype), eps=c.rms_eps))
    return jnp.stack(outs)


def split_buffers(params) -> tuple[dict, dict]:
    """(trainable float params, buffers): EAGLE-3's int `d2t` is not differentiated."""
    buffers = {k: v for k, v in params.items() if k == "d2t"}
    return {k: v for k, v in params.items() if k != "d2t"}, buffers


def init_draft_params(dcfg: DraftConfig, key: jax.Array, dtype=jnp.float32):
    """Random draft params (Flax default initialisers) in the HF-like layout."""
    return _init(dcfg, dtype)(key)


@functools.lru_cache(maxsize=16)
def _init(dcfg: DraftConfig, dtype):
    def f(key):
        emb = jnp.zeros((1, 1, dcfg.d_model), dtype)
        feat = jnp.zeros((1, 1, dcfg.feature_dim), dtype)
        positions = jnp.zeros((1, 1), jnp.int32)
        kv = jnp.zeros((1, 1, dcfg.n_kv_heads, dcfg.head_dim), dtype)
        params = DraftModel(dcfg, dtype).init(
            key, emb, feat, positions, kv, kv, jnp.zeros((1,), jnp.int32),
            jnp.ones((1, 1, 1), bool), method=DraftModel.init_all,
        )["params"]  # fmt: skip
        if dcfg.kind == "eagle3":
            # The draft vocabulary: draft index i is target id i + d2t[i] (here the first V').
            params = {**params, "d2t": jnp.zeros((dcfg.draft_vocab,), jnp.int32)}
            if dcfg.own_embedding:
                table = jax.random.normal(
                    jax.random.fold_in(key, 1), (dcfg.vocab_size, dcfg.d_model)
                )
                params["embed_tokens"] = {"embedding": table.astype(dtype)}
        return params

    return jax.jit(f)


def abstract_draft_params(dcfg: DraftConfig, dtype=jnp.float32):
    """Shape/dtype tree of the draft params (what the converters check against)."""
    return jax.eval_shape(_init(dcfg, dtype), jax.random.key(0))
