"""Loads a HF checkpoint folder (config + weights) into a ModelConfig and our params tree.

Weights: `model.safetensors`, sharded safetensors with `model.safetensors.index.json`, or
`pytorch_model.bin` (sharded with `pytorch_model.bin.index.json`) through
`torch.load(weights_only=True, mmap=True)`. Sources may be f32, bf16 or f16.

Memory: tensors are streamed shard by shard and tensor by tensor into preallocated buffers of the
target dtype (`hf_keys.convert_state`), so the peak is one copy of the params plus one source
tensor, never two full copies. safetensors files are read as memory-mapped numpy views (see
`iter_safetensors`), so a sharded load reads only each device's slice.

Untrusted files: every read failure (a truncated or corrupt safetensors file, a `.bin` that is not
a plain tensor state dict, e.g. a pickle that would run code, invalid JSON) is a one-line
`CheckpointError` naming the file, and nothing is allocated from a size the file claims but does
not hold.
"""

from __future__ import annotations

import json
import math
import pickle
import struct
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import jax.numpy as jnp
import ml_dtypes
import numpy as np
from safetensors import SafetensorError, safe_open

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
    "read_json",
    "source_dtype",
]

T = TypeVar("T")

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


def read_json(path: str | Path) -> dict[str, Any]:
    """A JSON object file; invalid JSON or another top-level type raises `CheckpointError`."""
    path = Path(path)
    with open(path, "rb") as f:
        raw = f.read()
    try:
        value = json.loads(raw)
    except ValueError as e:  # JSONDecodeError (with its line and column) or bad UTF-8
        raise CheckpointError(f"{path}: invalid JSON ({e})") from e
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def config_from_json(path: str | Path, build: Callable[[], T]) -> T:
    """`build()` (a config's `from_hf` on `path`'s contents), its errors naming the file.

    A missing or mistyped field (KeyError, TypeError, ...) becomes a `CheckpointError`; a
    ValueError (e.g. `UnsupportedConfigError`) keeps its type and gains the file name.
    """
    try:
        return build()
    except KeyError as e:
        raise CheckpointError(f"{path}: missing field {e}") from e
    except (TypeError, ArithmeticError, AttributeError) as e:
        raise CheckpointError(f"{path}: invalid config ({e})") from e
    except ValueError as e:
        if str(path) not in str(e):
            e.args = (f"{path}: {e}", *e.args[1:])
        raise


def load_hf_config(folder: str | Path) -> ModelConfig:
    """`config.json` (+ `generation_config.json`'s EOS ids, merged) -> ModelConfig."""
    folder = Path(folder)
    path = folder / "config.json"
    hf = read_json(path)
    gen_path = folder / "generation_config.json"
    gen = read_json(gen_path) if gen_path.exists() else None
    return config_from_json(path, lambda: ModelConfig.from_hf(hf, generation_config=gen))


def source_dtype(folder: str | Path) -> np.dtype:
    """The checkpoint's dtype from `config.json` (`dtype`, or transformers 4's `torch_dtype`)."""
    hf = read_json(Path(folder) / "config.json")
    name = hf.get("dtype") or hf.get("torch_dtype") or "float32"
    if isinstance(name, str) and name in _DTYPE_NAMES:
        return parse_dtype(name)
    return np.dtype(np.float32)


# ------------------------------------------------------------------------------------------
# Readers: each yields (key, numpy array) one tensor at a time.


def _safetensors_error(path: Path, err: Exception) -> CheckpointError:
    """The library's error, plus the tensor a truncated file cuts (the library does not say)."""
    hint = ""
    try:  # best effort: parse the header ourselves, bounded by the file size
        size = path.stat().st_size
        with open(path, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            if header_len > size - 8:
                hint = f"; the header claims {header_len} bytes, the file holds {size}"
            else:
                header = json.loads(f.read(header_len))
                header.pop("__metadata__", None)
                for key, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"]):
                    if info["data_offsets"][1] > size - 8 - header_len:
                        hint = (
                            f"; tensor {key!r} needs data bytes {info['data_offsets']}, the file "
                            f"holds {size - 8 - header_len} (truncated?)"
                        )
                        break
    except Exception:  # the hint is optional; the library's message stands
        pass
    return CheckpointError(f"{path}: not a valid safetensors file ({err}{hint})")


def iter_safetensors(path: str | Path) -> Iterator[tuple[str, np.ndarray]]:
    """(key, memory-mapped array) for every tensor of one .safetensors file, in file order.

    The `safetensors` library parses and validates the header (size, JSON, dtypes, shapes, and
    offsets that tile the data exactly up to the end of the file); errors become a
    `CheckpointError` naming the file (and the first cut tensor of a truncated file). The arrays
    themselves are our own read-only `np.memmap` views rather than the library's `get_tensor`,
    which copies each tensor, and its `get_slice`, which is no array (no `.T`, no `astype`): the
    sharded loader reads transposed slices of every tensor per device, and the draft loader
    holds all tensors at once, both at no memory cost this way. The views' offsets are the
    running sums of the library-validated sizes in file order, checked to end at the file's end.
    """
    path = Path(path)
    try:
        with safe_open(path, framework="numpy") as f:
            entries = [
                (key, f.get_slice(key).get_dtype(), tuple(f.get_slice(key).get_shape()))
                for key in f.offset_keys()
            ]
    except SafetensorError as e:
        raise _safetensors_error(path, e) from e
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
    start, data_size = 8 + header_len, path.stat().st_size - 8 - header_len
    layout, offset = [], 0
    for key, code, shape in entries:
        if code not in SAFETENSORS_DTYPES:
            raise CheckpointError(f"{path}: tensor {key!r} has unsupported dtype {code}")
        dtype = SAFETENSORS_DTYPES[code]
        nbytes = math.prod(shape) * dtype.itemsize  # Python ints: no overflow
        layout.append((key, dtype, shape, offset, offset + nbytes))
        offset += nbytes
    if offset != data_size:
        raise CheckpointError(
            f"{path}: the tensors cover {offset} data bytes, the file holds {data_size}"
        )
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=start) if data_size else None
    for key, dtype, shape, begin, end in layout:
        if begin < end:
            yield key, data[begin:end].view(dtype).reshape(shape)
            continue
        try:
            empty = np.zeros(shape, dtype)
        except ValueError as e:  # numpy refuses some empty shapes, e.g. (0, 2**63)
            raise CheckpointError(f"{path}: tensor {key!r} has shape {shape}: {e}") from e
        yield key, empty


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


_TORCH_BOILERPLATE = (
    "Weights only load failed",
    "(1)",
    "(2)",
    "Please file an issue",
    "Check the documentation",
)


def _torch_load_error(path: Path, err: Exception) -> CheckpointError:
    """torch.load's multi-paragraph message cut to its informative sentence."""
    text = str(err).split("WeightsUnpickler error:", 1)[-1]
    lines = [line.strip() for line in text.splitlines()]
    lines = [line for line in lines if line and not line.startswith(_TORCH_BOILERPLATE)]
    detail = (lines or [type(err).__name__])[0].split(". ")[0].rstrip(".")
    if isinstance(err, pickle.UnpicklingError):  # weights_only refused it (e.g. code to run)
        return CheckpointError(
            f"{path}: refused by torch.load(weights_only=True), not a plain tensor state dict "
            f"({detail})"
        )
    return CheckpointError(f"{path}: cannot read ({type(err).__name__}: {detail})")


def iter_torch_bin(path: str | Path) -> Iterator[tuple[str, np.ndarray]]:
    """(key, array) for every tensor of one pytorch_model*.bin (memory-mapped when possible).

    Only `torch.load(weights_only=True)` reads it, so a pickle that would run code is refused;
    every failure is a `CheckpointError` naming the file.
    """
    path = Path(path)
    torch = _import_torch()
    with open(path, "rb") as f:
        zipped = f.read(4) == b"PK\x03\x04"  # files in the legacy (pre-zip) format cannot be mapped
    try:
        with warnings.catch_warnings():  # e.g. a pickle protocol note: the error says enough
            warnings.simplefilter("ignore")
            state = torch.load(path, weights_only=True, map_location="cpu", mmap=zipped)
    except Exception as e:  # torch raises many types for one meaning
        raise _torch_load_error(path, e) from e
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a state dict, got {type(state).__name__}")
    for key in list(state):
        value = state.pop(key)
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise CheckpointError(
                f"{path}: expected a state dict of tensors, got {key!r}: {type(value).__name__}"
            )
        try:
            array = _torch_to_numpy(value, torch)
        except (TypeError, RuntimeError) as e:  # a dtype or layout numpy cannot hold
            raise CheckpointError(f"{path}: tensor {key!r}: {e}") from e
        yield key, array


def checkpoint_files(folder: str | Path) -> list[Path]:
    """The weight files of a HF folder, safetensors preferred, shards in index order."""
    folder = Path(folder)
    for index_name, single, reader_ext in (
        ("model.safetensors.index.json", "model.safetensors", ".safetensors"),
        ("pytorch_model.bin.index.json", "pytorch_model.bin", ".bin"),
    ):
        index = folder / index_name
        if index.exists():
            weight_map = read_json(index).get("weight_map")
            if not weight_map or not isinstance(weight_map, dict):
                raise CheckpointError(f"{index}: no weight_map")
            shards = sorted({s for s in weight_map.values() if isinstance(s, str)})
            bad = [s for s in weight_map.values() if not isinstance(s, str)]
            bad += [s for s in shards if not s.endswith(reader_ext) or Path(s).name != s]
            if bad:
                raise CheckpointError(f"{index}: unexpected shard names {bad[:8]}")
            missing = [s for s in shards if not (folder / s).is_file()]
            if missing:
                raise CheckpointError(f"{index}: shard files {missing} are missing")
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
