"""Loads a HF checkpoint folder (config + weights) into a ModelConfig and our params tree.

Weights: `model.safetensors`, sharded safetensors with `model.safetensors.index.json`, or
`pytorch_model.bin` (sharded with `pytorch_model.bin.index.json`) through
`torch.load(weights_only=True, mmap=True)`. Sources may be f32, bf16 or f16.

Memory: tensors are streamed shard by shard and tensor by tensor into preallocated buffers of the
target dtype (`hf_keys.convert_state`), so the peak is one copy of the params plus one source
tensor, never two full copies. safetensors files are read through a memory map of their raw
bytes: the `safetensors` package's numpy reader cannot return bf16, and its flax reader would put
every tensor on the default device; the format (an 8-byte header size, a JSON header, raw
little-endian data) is simple enough to map directly, with ml_dtypes providing bf16.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import ml_dtypes
import numpy as np

from convert.hf_keys import CheckpointError, check_tree, convert_state, table_for
from griffin_jax.config import ModelConfig
from griffin_jax.model import abstract_params

__all__ = [
    "CheckpointError",
    "iter_checkpoint",
    "load_hf",
    "load_hf_config",
    "load_hf_params",
    "parse_dtype",
    "source_dtype",
]

# safetensors dtype codes <-> numpy dtypes (ml_dtypes for bf16).
SAFETENSORS_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}

_DTYPE_NAMES = {
    "f32": jnp.float32,
    "float32": jnp.float32,
    "bf16": jnp.bfloat16,
    "bfloat16": jnp.bfloat16,
    "f16": jnp.float16,
    "float16": jnp.float16,
}

TORCH_EXTRA_HINT = (
    "reading pytorch_model*.bin checkpoints needs PyTorch: install the extra with "
    "`pip install 'griffin-jax[torch]'` (or convert the checkpoint to safetensors)"
)


def parse_dtype(dtype: Any) -> np.dtype:
    """'f32' | 'bf16' | 'f16' (or the long names, or a dtype) -> numpy dtype."""
    if isinstance(dtype, str):
        if dtype not in _DTYPE_NAMES:
            raise ValueError(f"unknown dtype {dtype!r} (use one of {sorted(_DTYPE_NAMES)})")
        dtype = _DTYPE_NAMES[dtype]
    return np.dtype(dtype)


def _read_json(path: Path) -> dict[str, Any]:
    with open(path) as f:
        return json.load(f)


def load_hf_config(folder: str | Path) -> ModelConfig:
    """`config.json` (+ `generation_config.json`'s EOS ids, merged) -> ModelConfig."""
    folder = Path(folder)
    hf = _read_json(folder / "config.json")
    gen_path = folder / "generation_config.json"
    gen = _read_json(gen_path) if gen_path.exists() else None
    return ModelConfig.from_hf(hf, generation_config=gen)


def source_dtype(folder: str | Path) -> np.dtype:
    """The checkpoint's dtype from `config.json` (`dtype`, or transformers 4's `torch_dtype`)."""
    hf = _read_json(Path(folder) / "config.json")
    name = hf.get("dtype") or hf.get("torch_dtype") or "float32"
    return parse_dtype(name) if name in _DTYPE_NAMES else np.dtype(np.float32)


# ------------------------------------------------------------------------------------------
# Readers: each yields (key, numpy array) one tensor at a time.


def iter_safetensors(path: str | Path) -> Iterator[tuple[str, np.ndarray]]:
    """(key, memory-mapped array) for every tensor of one .safetensors file, in file order."""
    path = Path(path)
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise CheckpointError(f"{path}: not a safetensors file (truncated header)")
        (header_len,) = struct.unpack("<Q", raw)
        try:
            header = json.loads(f.read(header_len))
        except ValueError as e:
            raise CheckpointError(f"{path}: not a safetensors file ({e})") from e
    header.pop("__metadata__", None)
    if not header:
        return
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + header_len)
    items = sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0])
    for key, info in items:
        code = info["dtype"]
        if code not in SAFETENSORS_DTYPES:
            raise CheckpointError(f"{path}: {key!r} has unsupported dtype {code}")
        begin, end = info["data_offsets"]
        shape = tuple(info["shape"])
        yield key, data[begin:end].view(SAFETENSORS_DTYPES[code]).reshape(shape)


def _import_torch():
    try:
        import torch
    except ImportError as e:
        raise ImportError(TORCH_EXTRA_HINT) from e
    return torch


def _torch_to_numpy(tensor: Any, torch: Any) -> np.ndarray:
    tensor = tensor.detach().cpu()
    if tensor.dtype == torch.bfloat16:
        # numpy has no bf16: reinterpret the bits as ml_dtypes.bfloat16 (no copy).
        return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return tensor.numpy()


def iter_torch_bin(path: str | Path) -> Iterator[tuple[str, np.ndarray]]:
    """(key, array) for every tensor of one pytorch_model*.bin (memory-mapped when possible)."""
    torch = _import_torch()
    try:
        state = torch.load(path, weights_only=True, map_location="cpu", mmap=True)
    except RuntimeError:
        # Files in the legacy (pre-zip) format cannot be memory-mapped.
        state = torch.load(path, weights_only=True, map_location="cpu")
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a state dict, got {type(state).__name__}")
    for key in list(state):
        yield key, _torch_to_numpy(state.pop(key), torch)


def checkpoint_files(folder: str | Path) -> list[Path]:
    """The weight files of a HF folder, safetensors preferred, shards in index order."""
    folder = Path(folder)
    for index_name, single, reader_ext in (
        ("model.safetensors.index.json", "model.safetensors", ".safetensors"),
        ("pytorch_model.bin.index.json", "pytorch_model.bin", ".bin"),
    ):
        index = folder / index_name
        if index.exists():
            weight_map = _read_json(index).get("weight_map")
            if not weight_map:
                raise CheckpointError(f"{index}: no weight_map")
            shards = sorted(set(weight_map.values()))
            missing = [s for s in shards if not (folder / s).exists()]
            if missing:
                raise CheckpointError(f"{index}: shard files {missing} are missing")
            bad = [s for s in shards if not s.endswith(reader_ext)]
            if bad:
                raise CheckpointError(f"{index}: unexpected shard names {bad}")
            return [folder / s for s in shards]
        if (folder / single).exists():
            return [folder / single]
    raise CheckpointError(
        f"{folder}: no weights found (expected model.safetensors, model.safetensors.index.json, "
        "pytorch_model.bin or pytorch_model.bin.index.json)"
    )


def iter_checkpoint(folder: str | Path) -> Iterator[tuple[str, np.ndarray]]:
    """(key, array) for every tensor of every weight file of a HF folder, file by file."""
    for path in checkpoint_files(folder):
        if path.suffix == ".safetensors":
            yield from iter_safetensors(path)
        else:
            yield from iter_torch_bin(path)


# ------------------------------------------------------------------------------------------


def load_hf_params(folder: str | Path, cfg: ModelConfig, dtype: Any = None) -> dict[str, Any]:
    """Loads a HF folder's weights into our params tree, strictly.

    Args:
      folder: a HF checkpoint folder.
      cfg: its config (`load_hf_config(folder)`).
      dtype: target dtype ('f32' | 'bf16' | 'f16' or a dtype); default: the checkpoint's
        (`config.json` `dtype` / `torch_dtype`, else f32).
    Returns:
      params (nested dict of jax arrays) matching `abstract_params(cfg, dtype)`.
    Raises:
      CheckpointError: unknown / missing / duplicate key, shape mismatch, tied lm_head that
        differs from the embedding.
      ImportError: a .bin checkpoint without PyTorch installed (names the `torch` extra).
    """
    dtype = source_dtype(folder) if dtype is None else parse_dtype(dtype)
    expected = abstract_params(cfg, dtype)
    params = convert_state(iter_checkpoint(folder), table_for(cfg), expected, source=str(folder))
    check_tree(params, expected, source=str(folder))
    return params


def load_hf(folder: str | Path, dtype: Any = None) -> tuple[ModelConfig, dict[str, Any]]:
    """`(load_hf_config(folder), load_hf_params(folder, cfg, dtype))`."""
    cfg = load_hf_config(folder)
    return cfg, load_hf_params(folder, cfg, dtype)


def load_hf_params_sharded(
    folder: str | Path, cfg: ModelConfig, shardings: Any, dtype: Any = None
) -> dict[str, Any]:
    """`load_hf_params` straight onto a mesh: each device reads only its slice of each tensor.

    Every leaf is built with `jax.make_array_from_callback`; the callback slices the
    memory-mapped safetensors tensors (transposed views, so only the shard's bytes are read and
    cast), so neither a device nor the host ever holds a whole tensor beyond one shard (a
    replicated leaf is read once per device). On a multi-host mesh each process reads only its
    own devices' slices. Strict like `load_hf_params` (same table, same errors).

    Args:
      folder: a HF folder with safetensors weights (`.bin` raises: convert it, or load it with
        `load_hf_params` and place it with `griffin_jax.sharding.shard_params`).
      cfg: its config.
      shardings: a tree of `jax.sharding.Sharding` with the structure of
        `abstract_params(cfg, dtype)` (`griffin_jax.sharding.param_shardings`).
      dtype: target dtype; default: the checkpoint's.
    Returns:
      params whose leaves are global jax.Arrays with the given shardings.
    """
    import itertools

    import jax
    from flax import traverse_util

    from convert.hf_keys import _is_float

    dtype = source_dtype(folder) if dtype is None else parse_dtype(dtype)
    leaves = traverse_util.flatten_dict(abstract_params(cfg, dtype), sep="/")
    placements = traverse_util.flatten_dict(shardings, sep="/")
    table = table_for(cfg)
    rows = {row.ours: row for row in table.rows if row.ours in leaves}
    tensors: dict[str, np.ndarray] = {}
    for path in checkpoint_files(folder):
        if path.suffix != ".safetensors":
            raise CheckpointError(
                f"{path}: sharded loading reads safetensors only; convert the checkpoint or use "
                "load_hf_params + griffin_jax.sharding.shard_params"
            )
        for key, array in iter_safetensors(path):
            if key in tensors:
                raise CheckpointError(f"{folder}: duplicate key {key!r}")
            tensors[key] = array
    sources: dict[str, dict[tuple[int, ...], np.ndarray]] = {p: {} for p in rows}
    for key, array in tensors.items():
        if table.skipped(key):
            continue
        found = table.match(key)
        if found is None:
            raise CheckpointError(
                f"{folder}: unexpected key {key!r} (not in the {table.name} table)"
            )
        row, index = found
        if not _is_float(array.dtype):
            raise CheckpointError(f"{folder}: {key!r} has dtype {array.dtype}, expected a float")
        if row.ours not in leaves:  # a tied lm_head: must equal the embedding
            tied = tensors.get(rows[row.tied_to].hf) if row.tied_to in rows else None
            if (
                tied is None
                or tied.shape != array.shape
                or not np.array_equal(array.astype(dtype), tied.astype(dtype))
            ):
                raise CheckpointError(f"{folder}: {key!r} is not the tied {row.tied_to!r}")
            continue
        shape = leaves[row.ours].shape
        if any(i >= n for i, n in zip(index, shape, strict=False)):
            raise CheckpointError(f"{folder}: {key!r} index {index} out of range for {shape}")
        want = row.transform.hf_shape(shape[len(index) :])
        if tuple(array.shape) != want:
            raise CheckpointError(
                f"{folder}: {key!r} has shape {tuple(array.shape)}, expected {want} "
                f"({row.transform.name} into {row.ours!r} {tuple(shape)})"
            )
        sources[row.ours][index] = array
    missing = [
        rows[p].hf_key(idx)
        for p in rows
        for idx in np.ndindex(*leaves[p].shape[: len(rows[p].index_names)])
        if idx not in sources[p]
    ]
    if missing:
        raise CheckpointError(f"{folder}: missing keys {missing[:8]} ({len(missing)} in all)")

    def build(path: str) -> jax.Array:
        row, leaf, src = rows[path], leaves[path], sources[path]
        n_idx = len(row.index_names)

        def read(index: tuple[slice, ...]) -> np.ndarray:
            ranges = [range(*s.indices(n)) for s, n in zip(index, leaf.shape, strict=True)]
            lead, rest = ranges[:n_idx], index[n_idx:]
            out = np.empty(tuple(len(r) for r in ranges), dtype)  # this device's shard
            for local, idx in zip(
                itertools.product(*(range(len(r)) for r in lead)),
                itertools.product(*lead),
                strict=True,
            ):
                out[local] = row.transform.to_ours(src[idx])[rest]  # reads the slice, casts
            return out

        return jax.make_array_from_callback(leaf.shape, placements[path], read)

    return traverse_util.unflatten_dict({p: build(p) for p in rows}, sep="/")
