"""THE map between HF checkpoint names and our parameter tree (STYLE R6).

This is the only file that knows HF parameter names. Each family has one `KeyTable` of rows
`(hf key template, our path, transform)`:

- The template is a HF key in which `{layer}` / `{expert}` stand for integers; each placeholder
  indexes one leading axis of our stacked array, in order of appearance
  (`model.layers.{layer}.block_sparse_moe.experts.{expert}.w1.weight` [F, D] fills
  `layers/block_sparse_moe/w1` [L, E, D, F] at `[layer, expert]`). A template compiles to an
  anchored regex for import and is formatted back for export, so the two directions cannot drift.
- Transforms are small named functions that check the HF shape (derived from the target
  slice's shape) before transposing (jax-llm-examples' `convert_weight`). Split-half RoPE is the
  HF convention, so there is no q/k permute and no folded scale: a transpose is all it takes.

`convert_state` is the strict, streaming converter every loader shares (the base loader in
`load_hf.py`, the draft loader in `load_draft.py` with its own table): it fills preallocated
target-dtype buffers one tensor at a time and raises `CheckpointError` on an unknown, missing or
duplicate key, a shape mismatch, a non-float tensor, or a tied `lm_head` that differs from the
embedding. `export_state` walks the same rows backwards.

Mixtral: transformers 5 keeps experts fused in memory (`mlp.experts.gate_up_proj`) but its
`save_pretrained` writes, and its loader reads, the per-expert keys of the published
checkpoints (`block_sparse_moe.experts.{j}.w1/w2/w3.weight`); those are what the table maps.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import string
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import traverse_util

from griffin_jax.config import ModelConfig

_SEP = "/"
_MAX_LISTED = 8  # keys listed in a "missing" error before it says "... and N more"


class CheckpointError(ValueError):
    """A checkpoint does not match the expected parameter tree (key, shape or dtype)."""


# ------------------------------------------------------------------------------------------
# Transforms: HF tensor <-> our slice, with the HF shape checked first.


def _same_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(shape)


def _reversed_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(reversed(shape))


def _identity(x: np.ndarray) -> np.ndarray:
    return x


def _transpose_2d(x: np.ndarray) -> np.ndarray:
    return x.T


@dataclasses.dataclass(frozen=True)
class Transform:
    """A named HF <-> ours tensor mapping.

    Attributes:
      name: for error messages.
      hf_shape: our slice shape -> the HF tensor shape it must come from.
      to_ours: HF tensor -> our slice.  to_hf: our slice -> HF tensor.
    """

    name: str
    hf_shape: Callable[[tuple[int, ...]], tuple[int, ...]]
    to_ours: Callable[[np.ndarray], np.ndarray]
    to_hf: Callable[[np.ndarray], np.ndarray]


# Norm weights, biases, embeddings: stored as is.
identity = Transform("identity", _same_shape, _identity, _identity)
# torch Linear weight [out, in] <-> Flax Dense kernel [in, out].
linear_in_out = Transform("linear_in_out", _reversed_shape, _transpose_2d, _transpose_2d)


# ------------------------------------------------------------------------------------------
# Rows and tables.


@dataclasses.dataclass(frozen=True)
class Row:
    """One HF key family -> one leaf of our tree.

    Attributes:
      hf: HF key template; `{name}` placeholders (digits) index the leading axes of `ours`.
      ours: "/"-joined path of the leaf in our params.
      transform: how a HF tensor becomes one slice of the leaf.
      tied_to: for a leaf that a tied config omits (`lm_head`): when `ours` is not in the
        expected tree, the HF tensor may still be present but must equal this leaf exactly.
    """

    hf: str
    ours: str
    transform: Transform
    tied_to: str | None = None

    @functools.cached_property
    def index_names(self) -> tuple[str, ...]:
        return tuple(name for _, name, _, _ in string.Formatter().parse(self.hf) if name)

    @functools.cached_property
    def regex(self) -> re.Pattern[str]:
        parts = []
        for literal, name, _, _ in string.Formatter().parse(self.hf):
            parts.append(re.escape(literal))
            if name:
                parts.append(rf"(?P<{name}>\d+)")
        return re.compile("".join(parts))

    def hf_key(self, index: tuple[int, ...]) -> str:
        return self.hf.format(**dict(zip(self.index_names, index, strict=True)))


@dataclasses.dataclass(frozen=True)
class KeyTable:
    """All rows of one checkpoint layout, plus the HF keys that may be dropped."""

    name: str
    rows: tuple[Row, ...]
    skip: tuple[str, ...] = ()  # regexes (full match) of keys that carry no parameters

    def match(self, key: str) -> tuple[Row, tuple[int, ...]] | None:
        """The row mapping `key` and the stacked index it names, or None."""
        for row in self.rows:
            m = row.regex.fullmatch(key)
            if m:
                return row, tuple(int(m.group(n)) for n in row.index_names)
        return None

    def skipped(self, key: str) -> bool:
        return any(re.fullmatch(p, key) for p in self.skip)


def _attention_rows(prefix: str, *, bias: bool) -> tuple[Row, ...]:
    rows = [
        Row(f"{prefix}.self_attn.{p}.weight", f"layers/self_attn/{p}/kernel", linear_in_out)
        for p in ("q_proj", "k_proj", "v_proj", "o_proj")
    ]
    if bias:
        rows += [
            Row(f"{prefix}.self_attn.{p}.bias", f"layers/self_attn/{p}/bias", identity)
            for p in ("q_proj", "k_proj", "v_proj")
        ]
    rows += [
        Row(f"{prefix}.input_layernorm.weight", "layers/input_layernorm/weight", identity),
        Row(
            f"{prefix}.post_attention_layernorm.weight",
            "layers/post_attention_layernorm/weight",
            identity,
        ),
    ]
    return tuple(rows)


_LAYER = "model.layers.{layer}"
_DENSE_MLP = tuple(
    Row(f"{_LAYER}.mlp.{p}.weight", f"layers/mlp/{p}/kernel", linear_in_out)
    for p in ("gate_proj", "up_proj", "down_proj")
)
_MOE = (
    Row(
        f"{_LAYER}.block_sparse_moe.gate.weight",
        "layers/block_sparse_moe/gate/kernel",
        linear_in_out,
    ),
    *(
        Row(
            f"{_LAYER}.block_sparse_moe.experts.{{expert}}.{w}.weight",
            f"layers/block_sparse_moe/{w}",
            linear_in_out,
        )
        for w in ("w1", "w2", "w3")
    ),
)
_ENDS = (
    Row("model.embed_tokens.weight", "embed_tokens/embedding", identity),
    Row("model.norm.weight", "norm/weight", identity),
    # A tied config has no lm_head leaf; the HF key may still be present (older saves).
    Row("lm_head.weight", "lm_head/kernel", linear_in_out, tied_to="embed_tokens/embedding"),
)
# Non-persistent RoPE buffers that some older checkpoints still carry.
_ROPE_BUFFERS = (
    r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq",
    r"model\.rotary_emb\.inv_freq",
)

LLAMA = KeyTable("llama", _ENDS + _attention_rows(_LAYER, bias=False) + _DENSE_MLP, _ROPE_BUFFERS)
QWEN2 = KeyTable("qwen2", _ENDS + _attention_rows(_LAYER, bias=True) + _DENSE_MLP, _ROPE_BUFFERS)
MIXTRAL = KeyTable("mixtral", _ENDS + _attention_rows(_LAYER, bias=False) + _MOE, _ROPE_BUFFERS)
TABLES: Mapping[str, KeyTable] = {"llama": LLAMA, "qwen2": QWEN2, "mixtral": MIXTRAL}


def table_for(cfg: ModelConfig) -> KeyTable:
    """The name table of a base-model family."""
    return TABLES[cfg.family]


# Draft heads (GRIFFIN spec 2.5; EAGLE-2): flat state dicts with one unstacked layer `layers.0`
# (no input_layernorm) and no final norm. The embedding is the base's, shared and not a draft
# param: `load_draft` checks `DRAFT_EMBED_KEY` against the base and `export_draft` writes it,
# outside the tables. q/k/v bias rows are used only when the checkpoint has them (Qwen2 drafts).
DRAFT_EMBED_KEY = "embed_tokens.weight"
DRAFT_WRAPPER_PREFIX = "module."  # accelerate's multi-GPU `save_state`
_GRIFFIN_MARKER = "fc.fc.weight"
_EAGLE2_MARKER = "fc.weight"
_DRAFT_BIAS_KEYS = tuple(f"layers.0.self_attn.{p}_proj.bias" for p in "qkv")


def _draft_layer_rows(hf: str, ours: str, norms: tuple[str, ...]) -> tuple[Row, ...]:
    """The one decoder layer of a draft: attention (q/k/v biases used only when present), the
    SwiGLU MLP and its norms, under the HF prefix `hf` and our path `ours`."""
    return (
        *(
            Row(f"{hf}.self_attn.{p}.weight", f"{ours}/self_attn/{p}/kernel", linear_in_out)
            for p in ("q_proj", "k_proj", "v_proj", "o_proj")
        ),
        *(
            Row(f"{hf}.self_attn.{p}.bias", f"{ours}/self_attn/{p}/bias", identity)
            for p in ("q_proj", "k_proj", "v_proj")
        ),
        *(
            Row(f"{hf}.mlp.{p}.weight", f"{ours}/mlp/{p}/kernel", linear_in_out)
            for p in ("gate_proj", "up_proj", "down_proj")
        ),
        *(Row(f"{hf}.{n}.weight", f"{ours}/{n}/weight", identity) for n in norms),
    )


_DRAFT_LAYER = _draft_layer_rows("layers.0", "layers_0", ("post_attention_layernorm",))
_DRAFT_SKIP = (r"layers\.0\.self_attn\.rotary_emb\.inv_freq",)
GRIFFIN_DRAFT = KeyTable(
    "griffin draft",
    (
        Row("fc.fc.weight", "fc/fc/kernel", linear_in_out),
        Row("fc.fc.bias", "fc/fc/bias", identity),
        Row("fc.post_attention_layernorm.weight", "fc/post_attention_layernorm/weight", identity),
        Row("fc.mlp.input_layernorm.weight", "fc/mlp/input_layernorm/weight", identity),
        Row("fc.mlp.up_proj.weight", "fc/mlp/up_proj/kernel", linear_in_out),
        Row("fc.mlp.down_proj.weight", "fc/mlp/down_proj/kernel", linear_in_out),
        *_DRAFT_LAYER,
    ),
    _DRAFT_SKIP,
)
EAGLE2_DRAFT = KeyTable(
    "eagle2 draft",
    (
        Row("fc.weight", "fc/kernel", linear_in_out),
        Row("fc.bias", "fc/bias", identity),
        *_DRAFT_LAYER,
    ),
    _DRAFT_SKIP,
)
# EAGLE-3 (SafeAILab/EAGLE `eagle/model/cnets.py`): `fc` without bias over 3 base layers, the
# `midlayer`, its own final `norm` and `lm_head` over the draft vocabulary. Its `d2t` / `t2d`
# buffers (int64 / bool) are not params rows: `load_draft` checks them and keeps `d2t`.
_EAGLE3_MARKER = "midlayer.self_attn.q_proj.weight"
_EAGLE3_BIAS_KEYS = tuple(f"midlayer.self_attn.{p}_proj.bias" for p in "qkv")
EAGLE3_D2T_KEY, EAGLE3_T2D_KEY = "d2t", "t2d"
EAGLE3_DRAFT = KeyTable(
    "eagle3 draft",
    (
        Row("fc.weight", "fc/kernel", linear_in_out),
        *_draft_layer_rows(
            "midlayer", "midlayer", ("hidden_norm", "input_layernorm", "post_attention_layernorm")
        ),
        Row("norm.weight", "norm/weight", identity),
        Row("lm_head.weight", "lm_head/kernel", linear_in_out),
    ),
    (r"midlayer\.self_attn\.rotary_emb\.inv_freq",),
)
DRAFT_TABLES: Mapping[str, KeyTable] = {
    "griffin": GRIFFIN_DRAFT,
    "eagle2": EAGLE2_DRAFT,
    "eagle3": EAGLE3_DRAFT,
}


def draft_layout(keys: Iterable[str], *, source: str = "checkpoint") -> tuple[str, bool]:
    """(kind, qkv_bias) of a draft state dict, from its keys (wrapper prefix stripped).

    EAGLE-3 has `midlayer.self_attn.q_proj.weight`; otherwise GRIFFIN has `fc.fc.weight` (the
    fusion block), EAGLE-2 `fc.weight`. q/k/v biases are present iff any of the layer's
    `self_attn.{q,k,v}_proj.bias` is (a partial set then fails as missing keys).
    """
    keys = set(keys)
    if _EAGLE3_MARKER in keys:
        return "eagle3", any(k in keys for k in _EAGLE3_BIAS_KEYS)
    griffin, eagle2 = _GRIFFIN_MARKER in keys, _EAGLE2_MARKER in keys
    if griffin == eagle2:
        raise CheckpointError(
            f"{source}: cannot tell the draft kind: expected exactly one of {_GRIFFIN_MARKER!r} "
            f"(GRIFFIN), {_EAGLE2_MARKER!r} (EAGLE-2) and {_EAGLE3_MARKER!r} (EAGLE-3), found "
            f"{'both of the first two' if griffin else 'none'}"
        )
    return ("griffin" if griffin else "eagle2"), any(k in keys for k in _DRAFT_BIAS_KEYS)


# ------------------------------------------------------------------------------------------
# Conversion.


def _is_float(dtype: np.dtype) -> bool:
    return np.issubdtype(dtype, np.floating) or dtype == np.dtype(ml_dtypes.bfloat16)


def _leaf_rows(table: KeyTable, leaves: Mapping[str, Any]) -> dict[str, Row]:
    out: dict[str, Row] = {}
    for row in table.rows:
        if row.ours in leaves:
            out[row.ours] = row
    return out


def convert_state(
    tensors: Iterable[tuple[str, Any]],
    table: KeyTable,
    expected: Any,
    dtype: Any = None,
    *,
    source: str = "checkpoint",
) -> dict[str, Any]:
    """Converts HF tensors, one at a time, into our params tree; strict.

    Args:
      tensors: (HF key, array) pairs; arrays are numpy-like (memory maps welcome: each is read
        once, cast straight into its slot of the target buffer, and dropped).
      table: the name table (`table_for(cfg)`, or a draft table).
      expected: the abstract params tree (`jax.ShapeDtypeStruct` leaves, e.g.
        `griffin_jax.model.abstract_params(cfg, dtype)`): fixes every leaf's shape and dtype.
      dtype: overrides the leaves' dtype when given.
      source: named in error messages (the folder or file).
    Returns:
      The params tree (nested dict of jax arrays) with the structure of `expected`.
    Raises:
      CheckpointError: unknown, missing or duplicate key; shape mismatch; non-float tensor;
        a tied lm_head that differs from the embedding.
    """
    leaves = traverse_util.flatten_dict(expected, sep=_SEP)
    leaf_rows = _leaf_rows(table, leaves)
    no_row = sorted(set(leaves) - set(leaf_rows))
    if no_row:
        raise CheckpointError(f"the {table.name} table has no row for params {no_row}")
    target = {p: np.dtype(dtype or leaf.dtype) for p, leaf in leaves.items()}
    buffers: dict[str, np.ndarray] = {}
    filled: dict[str, np.ndarray] = {}
    tied: list[tuple[str, str, np.ndarray]] = []
    seen: set[str] = set()

    for key, array in tensors:
        if table.skipped(key):
            continue
        if key in seen:
            raise CheckpointError(f"{source}: duplicate key {key!r}")
        seen.add(key)
        found = table.match(key)
        if found is None:
            raise CheckpointError(
                f"{source}: unexpected key {key!r} (not in the {table.name} table)"
            )
        row, index = found
        array = np.asarray(array)
        if not _is_float(array.dtype):
            raise CheckpointError(f"{source}: {key!r} has dtype {array.dtype}, expected a float")
        if row.ours not in leaves:
            if row.tied_to is None or row.tied_to not in leaves:
                raise CheckpointError(
                    f"{source}: unexpected key {key!r} (this config has no {row.ours!r})"
                )
            leaf = leaves[row.tied_to]
            want = identity.hf_shape(leaf.shape)
            if array.shape != want:
                raise CheckpointError(
                    f"{source}: {key!r} has shape {tuple(array.shape)}, expected {want} "
                    f"(tied to {row.tied_to!r})"
                )
            tied.append((key, row.tied_to, array.astype(target[row.tied_to])))
            continue
        leaf = leaves[row.ours]
        n_idx = len(index)
        if any(i >= n for i, n in zip(index, leaf.shape[:n_idx], strict=True)):
            raise CheckpointError(
                f"{source}: unexpected key {key!r}: index {index} out of range for "
                f"{row.ours!r} with leading shape {tuple(leaf.shape[:n_idx])}"
            )
        want = row.transform.hf_shape(leaf.shape[n_idx:])
        if tuple(array.shape) != want:
            raise CheckpointError(
                f"{source}: {key!r} has shape {tuple(array.shape)}, expected {want} "
                f"({row.transform.name} into {row.ours!r} {tuple(leaf.shape)})"
            )
        if row.ours not in buffers:
            buffers[row.ours] = np.empty(leaf.shape, target[row.ours])
            filled[row.ours] = np.zeros(leaf.shape[:n_idx], bool)
        if filled[row.ours][index]:
            raise CheckpointError(
                f"{source}: duplicate entry for {row.ours!r}{list(index)} ({key!r})"
            )
        buffers[row.ours][index] = row.transform.to_ours(array).astype(target[row.ours])
        filled[row.ours][index] = True

    missing: list[str] = []
    for path, row in leaf_rows.items():
        done = filled.get(path)
        n_idx = len(row.index_names)
        if done is None:
            done = np.zeros(leaves[path].shape[:n_idx], bool)
        missing += [row.hf_key(tuple(int(i) for i in idx)) for idx in np.argwhere(~done)]
    if missing:
        listed = ", ".join(repr(k) for k in missing[:_MAX_LISTED])
        more = f" and {len(missing) - _MAX_LISTED} more" if len(missing) > _MAX_LISTED else ""
        raise CheckpointError(f"{source}: missing keys {listed}{more}")
    for key, path, value in tied:
        if not np.array_equal(value, buffers[path]):
            raise CheckpointError(
                f"{source}: {key!r} differs from {path!r} although the config ties them "
                "(tie_word_embeddings=true)"
            )
    del tied

    flat = {}
    for path in list(buffers):
        # Leaf by leaf, so the host buffers are released as the arrays are made.
        flat[path] = jnp.asarray(buffers.pop(path))
    return traverse_util.unflatten_dict(flat, sep=_SEP)


@dataclasses.dataclass(frozen=True)
class HFTensor:
    """One HF tensor to export, computed on demand (`value()`), so writers can stream."""

    key: str
    shape: tuple[int, ...]
    leaf: Any
    index: tuple[int, ...]
    transform: Transform
    fixed_dtype: Any = None  # written in this dtype whatever the export's (integer buffers)

    def value(self, dtype: Any = None) -> np.ndarray:
        dtype = self.fixed_dtype if self.fixed_dtype is not None else dtype
        x = self.transform.to_hf(np.asarray(self.leaf[self.index]))
        return np.ascontiguousarray(x if dtype is None else x.astype(dtype))


def export_state(params: Any, table: KeyTable) -> Iterator[HFTensor]:
    """The HF tensors of a params tree, in table order (a tied lm_head is not written).

    Args:
      params: our params tree (jax or numpy leaves).
      table: the name table.
    Yields:
      HFTensor per HF key.
    """
    leaves = traverse_util.flatten_dict(params, sep=_SEP)
    leaf_rows = _leaf_rows(table, leaves)
    unmapped = sorted(set(leaves) - set(leaf_rows))
    if unmapped:
        raise CheckpointError(f"the {table.name} table has no row for params {unmapped}")
    for path, row in leaf_rows.items():
        leaf = leaves[path]
        n_idx = len(row.index_names)
        for index in np.ndindex(*leaf.shape[:n_idx]):
            yield HFTensor(
                key=row.hf_key(index),
                shape=row.transform.hf_shape(tuple(leaf.shape[n_idx:])),
                leaf=leaf,
                index=index,
                transform=row.transform,
            )


def check_tree(params: Any, expected: Any, *, source: str = "params") -> None:
    """Raises CheckpointError unless `params` has exactly `expected`'s paths, shapes, dtypes."""
    got = traverse_util.flatten_dict(params, sep=_SEP)
    want = traverse_util.flatten_dict(expected, sep=_SEP)
    if set(got) != set(want):
        raise CheckpointError(
            f"{source}: params {sorted(set(got) - set(want))} unexpected, "
            f"{sorted(set(want) - set(got))} missing"
        )
    for path, leaf in want.items():
        g = got[path]
        if tuple(g.shape) != tuple(leaf.shape) or np.dtype(g.dtype) != np.dtype(leaf.dtype):
            raise CheckpointError(
                f"{source}: {path!r} is {g.dtype}{list(g.shape)}, expected "
                f"{np.dtype(leaf.dtype)}{list(leaf.shape)}"
            )
