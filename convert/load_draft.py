"""Loads a published draft folder (GRIFFIN, EAGLE-2, EAGLE-3) into a DraftConfig and our params.

A draft folder is `config.json` (transformers 4 layout, as every published draft, or transformers
5 layout) plus `pytorch_model.bin` (read with `torch.load(weights_only=True)`; needs the
`griffin-jax[torch]` extra) or `model.safetensors`. Mirrors the reference's
`load_state_dict(strict=True)` on an unwrapped module (spec 2.5):

- a `module.` prefix (accelerate's multi-GPU save) is stripped;
- the kind comes from the keys (`midlayer.*`: EAGLE-3, `fc.fc.weight`: GRIFFIN, `fc.weight`:
  EAGLE-2), and q/k/v biases from the keys too (spec 8.3: the reference cannot round-trip Qwen2
  biases; here the checkpoint decides, whatever the config's `qkv_bias` says);
- unknown, missing, duplicate or mis-shaped keys raise `CheckpointError` naming the key and both
  shapes (the shared strict converter `hf_keys.convert_state` with the draft tables);
- the draft must share the base's hidden size and vocabulary (the embedding and lm_head are the
  base's); its stored `embed_tokens.weight` is checked for shape and, optionally, for values
  against the base embedding, then dropped: the draft forward takes the base embedding.
- EAGLE-3: the embedding is optional (the official code loads it from the base), except for a
  draft narrower than its base (`target_hidden_size`), which keeps its own. The `d2t` buffer
  (draft index i -> target id i + d2t[i]) is kept as the int32 param `d2t`; it may be absent
  only when the draft vocabulary is the whole vocabulary. Every target id must be in range and
  distinct, and `t2d`, when present, must mark exactly those ids.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from convert.hf_keys import (
    DRAFT_EMBED_KEY,
    DRAFT_TABLES,
    DRAFT_WRAPPER_PREFIX,
    EAGLE3_D2T_KEY,
    EAGLE3_T2D_KEY,
    CheckpointError,
    check_tree,
    convert_state,
    draft_layout,
)
from convert.load_hf import config_from_json, iter_checkpoint, parse_dtype, read_json
from griffin_jax.config import ModelConfig
from griffin_jax.draft import DraftConfig, abstract_draft_params, feature_layers

__all__ = [
    "CheckpointError",
    "check_draft_matches_base",
    "draft_params_from_state",
    "load_draft",
    "read_draft_state",
]


def _strip_prefix(key: str) -> str:
    return key[len(DRAFT_WRAPPER_PREFIX) :] if key.startswith(DRAFT_WRAPPER_PREFIX) else key


def read_draft_state(folder: str | Path) -> dict[str, np.ndarray]:
    """All tensors of a draft folder as {key: array}, the `module.` prefix stripped.

    safetensors tensors stay memory-mapped; a .bin goes through torch.load(weights_only=True).
    """
    state: dict[str, np.ndarray] = {}
    for key, array in iter_checkpoint(folder):
        name = _strip_prefix(key)
        if name in state:
            raise CheckpointError(f"{folder}: duplicate key {name!r} (after stripping 'module.')")
        state[name] = array
    return state


def check_draft_matches_base(dcfg: DraftConfig, base_cfg: ModelConfig, *, source: str) -> None:
    """The draft reads the base's features and shares its vocabulary (and, but for a narrower
    EAGLE-3 draft, its embedding): hidden sizes and vocabularies must agree."""
    if dcfg.target_dim != base_cfg.d_model:
        name = "target_hidden_size" if dcfg.target_hidden_size else "hidden_size"
        raise CheckpointError(
            f"{source}: draft {name} {dcfg.target_dim} does not match the base hidden_size "
            f"{base_cfg.d_model}"
        )
    try:
        feature_layers(dcfg, base_cfg.n_layers)
    except ValueError as e:
        raise CheckpointError(f"{source}: {e}") from None
    if dcfg.vocab_size != base_cfg.vocab_size:
        raise CheckpointError(
            f"{source}: draft vocab_size {dcfg.vocab_size} does not match the base vocab_size "
            f"{base_cfg.vocab_size}"
        )


def _check_embedding(
    stored: Any,
    dcfg: DraftConfig,
    base_embedding: Any | None,
    *,
    rtol: float,
    source: str,
) -> None:
    if stored is None:
        raise CheckpointError(f"{source}: missing key {DRAFT_EMBED_KEY!r}")
    want = (dcfg.vocab_size, dcfg.d_model)
    if tuple(stored.shape) != want:
        raise CheckpointError(
            f"{source}: {DRAFT_EMBED_KEY!r} has shape {tuple(stored.shape)}, expected {want} "
            "(the base vocab_size, hidden_size)"
        )
    if base_embedding is None:
        return
    stored32 = np.asarray(stored, np.float32)
    base32 = np.asarray(base_embedding, np.float32)
    # The stored copy may be in another dtype than the base (fp16 vs bf16): compare to rounding.
    err = float(np.max(np.abs(stored32 - base32)))
    scale = float(np.max(np.abs(base32))) or 1.0
    if err > rtol * scale:
        raise CheckpointError(
            f"{source}: {DRAFT_EMBED_KEY!r} differs from the base embedding (max abs difference "
            f"{err:.3g}, allowed {rtol * scale:.3g}): was this draft trained for this base?"
        )


def _eagle3_d2t(d2t: Any, t2d: Any, dcfg: DraftConfig, *, source: str) -> np.ndarray:
    """The checked d2t [V'] (int32) of an EAGLE-3 state dict."""
    v, vd = dcfg.vocab_size, dcfg.draft_vocab
    if d2t is None:
        if vd != v:
            raise CheckpointError(
                f"{source}: missing key {EAGLE3_D2T_KEY!r} (draft_vocab_size={vd} < vocab_size={v} "
                "needs the draft-to-target map)"
            )
        d2t = np.zeros((vd,), np.int64)
    d2t = np.asarray(d2t)
    if not np.issubdtype(d2t.dtype, np.integer) or d2t.shape != (vd,):
        raise CheckpointError(
            f"{source}: {EAGLE3_D2T_KEY!r} is {d2t.dtype}{list(d2t.shape)}, expected an integer "
            f"tensor [{vd}] (draft_vocab_size)"
        )
    targets = np.arange(vd, dtype=np.int64) + d2t.astype(np.int64)
    if targets.min(initial=0) < 0 or targets.max(initial=0) >= v:
        raise CheckpointError(
            f"{source}: {EAGLE3_D2T_KEY!r} maps draft ids outside the target vocabulary [0, {v})"
        )
    if len(np.unique(targets)) != vd:
        raise CheckpointError(f"{source}: {EAGLE3_D2T_KEY!r} maps two draft ids to one target id")
    if t2d is not None:
        t2d = np.asarray(t2d)
        want = np.zeros((v,), bool)
        want[targets] = True
        if t2d.shape != (v,) or not np.array_equal(t2d.astype(bool), want):
            raise CheckpointError(
                f"{source}: {EAGLE3_T2D_KEY!r} ({t2d.dtype}{list(t2d.shape)}) does not mark "
                f"exactly the {vd} target ids of {EAGLE3_D2T_KEY!r}"
            )
    return d2t.astype(np.int32)


def draft_params_from_state(
    state: Mapping[str, Any] | Iterable[tuple[str, Any]],
    dcfg: DraftConfig,
    *,
    dtype: Any = None,
    base_embedding: Any | None = None,
    embedding_rtol: float = 1e-2,
    source: str = "draft state dict",
) -> dict[str, Any]:
    """Converts a draft state dict (published layout) into our draft params, strictly.

    Args:
      state: {key: array} or (key, array) pairs; numpy-like arrays (torch tensors on CPU work
        for f32/f16). A `module.` prefix is stripped.
      dcfg: the draft config; its kind and qkv_bias must match the keys (see `load_draft`).
      dtype: target dtype ('f32' | 'bf16' | 'f16' or a dtype); default: the stored fc weight's.
      base_embedding: [V, D] if given, the stored `embed_tokens.weight` must equal it up to
        `embedding_rtol` times its largest magnitude.
      source: named in error messages.
    Returns:
      params matching `abstract_draft_params(dcfg, dtype)`.
    Raises:
      CheckpointError: unknown / missing / duplicate / mis-shaped key (naming the key and both
        shapes), or an embedding that does not fit the config (or the base).
    """
    items = state.items() if isinstance(state, Mapping) else state
    tensors: dict[str, Any] = {}
    for key, array in items:
        name = _strip_prefix(key)
        if name in tensors:
            raise CheckpointError(f"{source}: duplicate key {name!r}")
        tensors[name] = array if isinstance(array, np.ndarray) else np.asarray(array)
    kind, qkv_bias = draft_layout(tensors, source=source)
    if (kind, qkv_bias) != (dcfg.kind, dcfg.qkv_bias):
        raise CheckpointError(
            f"{source}: the keys describe a {kind} draft with qkv_bias={qkv_bias}, the config a "
            f"{dcfg.kind} draft with qkv_bias={dcfg.qkv_bias}"
        )
    embedding = tensors.pop(DRAFT_EMBED_KEY, None)
    extra: dict[str, Any] = {}
    if kind == "eagle3":
        extra["d2t"] = _eagle3_d2t(
            tensors.pop(EAGLE3_D2T_KEY, None), tensors.pop(EAGLE3_T2D_KEY, None), dcfg,
            source=source,
        )  # fmt: skip
    if dcfg.own_embedding:  # the draft's own table, a param
        _check_embedding(embedding, dcfg, None, rtol=embedding_rtol, source=source)
        extra["embed_tokens"] = {"embedding": embedding}
    elif kind != "eagle3" or embedding is not None:  # a copy of the base's, dropped
        _check_embedding(embedding, dcfg, base_embedding, rtol=embedding_rtol, source=source)
    table = DRAFT_TABLES[kind]
    if dtype is None:
        dtype = tensors[table.rows[0].hf].dtype  # the fc weight: the checkpoint's own dtype
    dtype = parse_dtype(dtype)
    expected = abstract_draft_params(dcfg, dtype)
    module = {k: v for k, v in expected.items() if k not in extra}
    params = convert_state(tensors.items(), table, module, source=source)
    if "d2t" in extra:
        params["d2t"] = jnp.asarray(extra["d2t"])
    if "embed_tokens" in extra:
        params["embed_tokens"] = {"embedding": jnp.asarray(np.asarray(embedding).astype(dtype))}
    check_tree(params, expected, source=source)
    return params


def load_draft(
    folder: str | Path,
    base_cfg: ModelConfig,
    *,
    dtype: Any = None,
    base_embedding: Any | None = None,
    embedding_rtol: float = 1e-2,
) -> tuple[DraftConfig, dict[str, Any]]:
    """Loads a draft folder for a given base model.

    Args:
      folder: `config.json` + `pytorch_model.bin` or `model.safetensors`.
      base_cfg: the base model's config (hidden size and vocab must match the draft's).
      dtype: target dtype ('f32' | 'bf16' | 'f16' or a dtype); default: the checkpoint's.
      base_embedding: [V, D] the base embedding, to check the stored copy against (optional).
      embedding_rtol: tolerance of that check, relative to the embedding's largest magnitude
        (the stored copy may be rounded to another half-precision format).
    Returns:
      (DraftConfig with the kind and qkv_bias of the checkpoint, params).
    Raises:
      CheckpointError: see `draft_params_from_state`; a draft/base mismatch names both numbers;
        an unreadable file (invalid JSON, a corrupt safetensors, a refused .bin) names the file.
      UnsupportedConfigError: a draft config field this port does not implement.
      ImportError: a .bin checkpoint without PyTorch (names the `griffin-jax[torch]` extra).
    """
    folder = Path(folder)
    config_path = folder / "config.json"
    hf = read_json(config_path)
    state = read_draft_state(folder)
    kind, qkv_bias = draft_layout(state, source=str(folder))
    # The keys decide the biases (spec 8.3), whatever the config's `qkv_bias` says.
    dcfg = config_from_json(config_path, lambda: DraftConfig.from_hf(hf, kind=kind))
    dcfg = dataclasses.replace(dcfg, qkv_bias=qkv_bias)
    check_draft_matches_base(dcfg, base_cfg, source=str(folder))
    params = draft_params_from_state(
        state,
        dcfg,
        dtype=dtype,
        base_embedding=base_embedding,
        embedding_rtol=embedding_rtol,
        source=str(folder),
    )
    return dcfg, params
