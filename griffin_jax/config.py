"""Static configuration: base models, drafts and draft trees.

Configs are frozen, hashable dataclasses so they can be `static_argnames` of jitted functions.
`ModelConfig.from_hf` reads a HF `config.json` dict (transformers 4 or 5 layout) and refuses any
field that would change the numbers but is not implemented, in the spirit of penzai's strict
import: a silently ignored `rope_scaling` or `sliding_window` gives wrong logits, not an error.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, Literal


class UnsupportedConfigError(ValueError):
    """A config field has a value this port does not implement."""


# Keys that never change the numbers of a forward pass (metadata, training-only, HF plumbing).
_HARMLESS_KEYS = frozenset(
    {
        "architectures",
        "model_type",
        "transformers_version",
        "torch_dtype",
        "dtype",
        "use_cache",
        "initializer_range",
        "bos_token_id",
        "eos_token_id",
        "pad_token_id",
        "attention_dropout",
        "hidden_dropout",
        "max_position_embeddings",
        "pretraining_tp",
        "output_router_logits",
        "router_aux_loss_coef",
        "router_jitter_noise",  # only active in training mode in transformers
        "max_window_layers",  # only read when use_sliding_window is true
        "_name_or_path",
        "_attn_implementation_autoset",
        "tokenizer_class",
        "return_dict",
        "output_attentions",
        "output_hidden_states",
        "id2label",
        "label2id",
        "problem_type",
        "chunk_size_feed_forward",
        "is_encoder_decoder",
        "is_decoder",
        "add_cross_attention",
        "tie_encoder_decoder",
        "bad_words_ids",
        "decoder_start_token_id",
        "sep_token_id",
        "prefix",
        "task_specific_params",
        "finetuning_task",
        "num_labels",
        "model_max_length",
    }
)

# Keys that this port reads (numbers depend on them).
_READ_KEYS = frozenset(
    {
        "vocab_size",
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "intermediate_size",
        "hidden_act",
        "rms_norm_eps",
        "rope_theta",
        "rope_scaling",
        "rope_parameters",
        "tie_word_embeddings",
        "attention_bias",
        "mlp_bias",
        "sliding_window",
        "use_sliding_window",
        "layer_types",
        "num_local_experts",
        "num_experts_per_tok",
    }
)

_ROPE_TYPES = ("default", "linear", "llama3")


@dataclasses.dataclass(frozen=True, kw_only=True)
class RopeConfig:
    """Rotary embedding parameters (split-half convention, as HF)."""

    theta: float = 10_000.0
    kind: Literal["default", "linear", "llama3"] = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any], *, where: str = "config") -> RopeConfig:
        """Reads `rope_parameters` (transformers 5) or `rope_theta` + `rope_scaling` (4)."""
        params = dict(hf.get("rope_parameters") or {})
        if "rope_theta" in hf and "rope_theta" not in params:
            params["rope_theta"] = hf["rope_theta"]
        scaling = hf.get("rope_scaling")
        if scaling:
            params.update(scaling)
        theta = float(params.pop("rope_theta", 10_000.0))
        kind = params.pop("rope_type", None) or params.pop("type", None) or "default"
        params.pop("type", None)
        if kind not in _ROPE_TYPES:
            raise UnsupportedConfigError(
                f"{where}: rope type {kind!r} is not supported "
                f"(supported: {', '.join(_ROPE_TYPES)})"
            )
        if params.get("partial_rotary_factor", 1.0) != 1.0:
            raise UnsupportedConfigError(f"{where}: partial_rotary_factor != 1 is not supported")
        params.pop("partial_rotary_factor", None)
        if kind == "default":
            for key in ("factor",):
                if key in params and params[key] not in (None, 1.0):
                    raise UnsupportedConfigError(
                        f"{where}: rope {key}={params[key]} with type default"
                    )
            return cls(theta=theta)
        allowed = (
            {"factor"}
            if kind == "linear"
            else {
                "factor",
                "low_freq_factor",
                "high_freq_factor",
                "original_max_position_embeddings",
            }
        )
        unknown = set(params) - allowed
        if unknown:
            raise UnsupportedConfigError(
                f"{where}: rope type {kind!r} fields {sorted(unknown)} are not supported"
            )
        if kind == "linear":
            return cls(theta=theta, kind="linear", factor=float(params["factor"]))
        return cls(
            theta=theta,
            kind="llama3",
            factor=float(params["factor"]),
            low_freq_factor=float(params["low_freq_factor"]),
            high_freq_factor=float(params["high_freq_factor"]),
            original_max_position=int(params["original_max_position_embeddings"]),
        )

    def inv_freq(self, head_dim: int) -> list[float]:
        """Inverse frequencies [H/2] in float64 (matches transformers' rope init functions)."""
        base = [1.0 / (self.theta ** (2 * j / head_dim)) for j in range(head_dim // 2)]
        if self.kind == "default":
            return base
        if self.kind == "linear":
            return [f / self.factor for f in base]
        low_wavelen = self.original_max_position / self.low_freq_factor
        high_wavelen = self.original_max_position / self.high_freq_factor
        out = []
        for f in base:
            wavelen = 2 * math.pi / f
            if wavelen < high_wavelen:
                out.append(f)
            elif wavelen > low_wavelen:
                out.append(f / self.factor)
            else:
                smooth = (self.original_max_position / wavelen - self.low_freq_factor) / (
                    self.high_freq_factor - self.low_freq_factor
                )
                out.append((1 - smooth) * f / self.factor + smooth * f)
        return out


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Base-model hyperparameters; letters are the einsum legend (STYLE R4)."""

    family: Literal["llama", "qwen2", "mixtral"] = "llama"
    vocab_size: int  # V
    d_model: int  # D
    n_layers: int  # L
    n_heads: int  # N
    n_kv_heads: int  # K (N % K == 0)
    head_dim: int  # H
    d_ff: int  # F
    n_experts: int = 0  # E (0 = dense MLP)
    n_experts_per_tok: int = 2
    qkv_bias: bool = False  # Qwen2
    rope: RopeConfig = RopeConfig()
    rms_eps: float = 1e-6
    tie_embeddings: bool = False
    max_position_embeddings: int = 4096
    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None
    pad_token_id: int | None = None

    def __post_init__(self) -> None:
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}"
            )

    @property
    def n_groups(self) -> int:  # G
        return self.n_heads // self.n_kv_heads

    @classmethod
    def from_hf(
        cls, hf: Mapping[str, Any], *, generation_config: Mapping[str, Any] | None = None
    ) -> ModelConfig:
        """Builds a config from a HF `config.json` dict, refusing unimplemented fields.

        Args:
          hf: the parsed `config.json`.
          generation_config: the parsed `generation_config.json`, if any; its EOS ids are merged
            with the config's (Llama-3-Instruct keeps `<|eot_id|>` only there).
        """
        family = hf.get("model_type")
        if family not in ("llama", "qwen2", "mixtral"):
            raise UnsupportedConfigError(
                f"model_type {family!r} is not supported (llama, qwen2, mixtral)"
            )
        for key in hf:
            if key not in _HARMLESS_KEYS and key not in _READ_KEYS:
                raise UnsupportedConfigError(f"config field {key!r}={hf[key]!r} is not supported")
        if hf.get("hidden_act", "silu") != "silu":
            raise UnsupportedConfigError(f"hidden_act {hf['hidden_act']!r} is not supported (silu)")
        if hf.get("mlp_bias"):
            raise UnsupportedConfigError("mlp_bias=true is not supported")
        if family in ("llama", "mixtral") and hf.get("attention_bias"):
            raise UnsupportedConfigError(f"attention_bias=true is not supported for {family}")
        if family == "qwen2" and hf.get("attention_bias") is False:
            raise UnsupportedConfigError("qwen2 without q/k/v bias (attention_bias=false)")
        sliding = hf.get("use_sliding_window", family == "mixtral")
        if family == "mixtral":
            sliding = hf.get("sliding_window") is not None
        layer_types = hf.get("layer_types") or []
        if sliding or any(t != "full_attention" for t in layer_types):
            raise UnsupportedConfigError(
                "sliding-window attention is not supported "
                f"(sliding_window={hf.get('sliding_window')!r}, "
                f"use_sliding_window={hf.get('use_sliding_window')!r})"
            )
        n_heads = int(hf["num_attention_heads"])
        d_model = int(hf["hidden_size"])
        head_dim = hf.get("head_dim") or d_model // n_heads
        eos: list[int] = []
        for source in (hf, generation_config or {}):
            ids = source.get("eos_token_id")
            for i in [ids] if isinstance(ids, int) else (ids or []):
                if i not in eos:
                    eos.append(int(i))
        return cls(
            family=family,
            vocab_size=int(hf["vocab_size"]),
            d_model=d_model,
            n_layers=int(hf["num_hidden_layers"]),
            n_heads=n_heads,
            n_kv_heads=int(hf.get("num_key_value_heads") or n_heads),
            head_dim=int(head_dim),
            d_ff=int(hf["intermediate_size"]),
            n_experts=int(hf.get("num_local_experts", 0)) if family == "mixtral" else 0,
            n_experts_per_tok=int(hf.get("num_experts_per_tok", 2)),
            qkv_bias=family == "qwen2",
            rope=RopeConfig.from_hf(hf),
            rms_eps=float(hf.get("rms_norm_eps", 1e-6)),
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
            eos_token_ids=tuple(eos),
            bos_token_id=hf.get("bos_token_id"),
            pad_token_id=hf.get("pad_token_id"),
        )

    def to_hf(self) -> dict[str, Any]:
        """The HF `config.json` dict (transformers 5 layout) for this config."""
        rope: dict[str, Any] = {"rope_theta": self.rope.theta, "rope_type": self.rope.kind}
        if self.rope.kind != "default":
            rope["factor"] = self.rope.factor
        if self.rope.kind == "llama3":
            rope.update(
                low_freq_factor=self.rope.low_freq_factor,
                high_freq_factor=self.rope.high_freq_factor,
                original_max_position_embeddings=self.rope.original_max_position,
            )
        out: dict[str, Any] = {
            "architectures": [
                {
                    "llama": "LlamaForCausalLM",
                    "qwen2": "Qwen2ForCausalLM",
                    "mixtral": "MixtralForCausalLM",
                }[self.family]
            ],
            "model_type": self.family,
            "vocab_size": self.vocab_size,
            "hidden_size": self.d_model,
            "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads,
            "head_dim": self.head_dim,
            "intermediate_size": self.d_ff,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_eps,
            "rope_parameters": rope,
            "tie_word_embeddings": self.tie_embeddings,
            "max_position_embeddings": self.max_position_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_ids)
            if len(self.eos_token_ids) != 1
            else self.eos_token_ids[0],
            "pad_token_id": self.pad_token_id,
        }
        if self.family == "llama":
            out["attention_bias"] = False
            out["mlp_bias"] = False
        if self.family == "qwen2":
            out["use_sliding_window"] = False
            out["sliding_window"] = None
        if self.family == "mixtral":
            out["num_local_experts"] = self.n_experts
            out["num_experts_per_tok"] = self.n_experts_per_tok
            out["sliding_window"] = None
        return out


@dataclasses.dataclass(frozen=True, kw_only=True)
class TreeConfig:
    """Static draft-tree sizes with the reference's meanings (they fix every shape).

    top_k: children expanded per node and nodes kept per level (K).
    depth: expansion steps (D); drafted tokens reach depth D + 1.
    total_tokens: tree nodes including the root (M); M - 1 drafted nodes (60 = 59 drafted).
    draft_vocab: the draft proposes only from this many most frequent tokens (0 = the whole
      vocabulary; see `speculative.DraftHead`). Lossless either way: the base verifies.
    """

    top_k: int = 10
    depth: int = 5
    total_tokens: int = 60
    draft_vocab: int = 0

    @property
    def path_len(self) -> int:  # A: the root plus up to D + 1 drafted tokens
        return self.depth + 2

    def trimmed(self) -> TreeConfig:
        """The same tree without levels that `total_tokens` could never keep.

        M - 1 drafted nodes reach at most depth M - 1 (a chain), so expansions past
        D = M - 2 would be drafted and then discarded by the reranking: they are dropped.
        """
        return dataclasses.replace(self, depth=min(self.depth, max(self.total_tokens - 2, 0)))
