"""Exports our params + ModelConfig as a HF checkpoint folder (the reverse of `load_hf.py`).

Writes `config.json` (transformers 5 layout, `ModelConfig.to_hf`), `generation_config.json`
(BOS / EOS / pad ids) and `model.safetensors` in a chosen dtype (f32, bf16, f16), so that
`transformers.AutoModelForCausalLM.from_pretrained(folder)` loads it. Names come from the same
`hf_keys` rows as the import, so load -> export -> load gives back identical tensors. A tied
config writes no `lm_head.weight`, as transformers 5's `save_pretrained` does.

The safetensors file is written tensor by tensor (header first, from the known shapes), so the
export never holds a second full copy of the params.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from convert.hf_keys import HFTensor, KeyTable, export_state, table_for
from convert.load_hf import SAFETENSORS_DTYPES, parse_dtype
from griffin_jax.config import ModelConfig
from griffin_jax.layers import unfuse_projections
from griffin_jax.model import stack_layers

_CODES = {dtype: code for code, dtype in SAFETENSORS_DTYPES.items()}
_HF_DTYPE_NAMES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}


def write_safetensors(
    path: str | Path, tensors: Iterable[HFTensor], dtype: Any, *, metadata: dict | None = None
) -> None:
    """Streams HF tensors into one .safetensors file, all cast to `dtype`.

    Args:
      path: the output file.
      tensors: HFTensor (key, shape, value()) items; values are computed one at a time.
      dtype: numpy dtype of every tensor (f32, bf16 via ml_dtypes, f16).
      metadata: the `__metadata__` strings; transformers wants {"format": "pt"}.
    """
    dtype = np.dtype(dtype)
    code = _CODES[dtype]
    tensors = list(tensors)
    header: dict[str, Any] = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for t in tensors:
        if t.key in header:
            raise ValueError(f"duplicate export key {t.key!r}")
        own = dtype if t.fixed_dtype is None else np.dtype(t.fixed_dtype)
        size = int(np.prod(t.shape, dtype=np.int64)) * own.itemsize
        header[t.key] = {
            "dtype": code if t.fixed_dtype is None else _CODES[own],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for t in tensors:
            value = t.value(dtype)
            if tuple(value.shape) != tuple(t.shape):
                raise ValueError(f"{t.key}: produced shape {value.shape}, declared {t.shape}")
            f.write(value.tobytes())  # native order: little-endian on every JAX platform


def export_hf(
    params: Any,
    cfg: ModelConfig,
    folder: str | Path,
    *,
    dtype: Any = None,
    table: KeyTable | None = None,
) -> Path:
    """Writes a HF checkpoint folder loadable by `AutoModelForCausalLM.from_pretrained`.

    Args:
      params: our params tree (any float dtype).
      cfg: the model config.
      folder: output folder (created; existing files of the same name are overwritten).
      dtype: 'f32' | 'bf16' | 'f16' (or a dtype); default: the params' embedding dtype.
      table: override the family's name table.
    Returns:
      The folder.
    """
    # any decode layout in (unrolled layers, fused projections, packed kernels), the stored one out
    params = unfuse_projections(stack_layers(params), cfg)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if dtype is None:
        dtype = np.dtype(params["embed_tokens"]["embedding"].dtype)
    dtype = parse_dtype(dtype)
    code = _CODES[dtype]
    if code not in _HF_DTYPE_NAMES:
        raise ValueError(f"export dtype {dtype} is not one of f32, bf16, f16")
    hf = cfg.to_hf()
    hf["dtype"] = _HF_DTYPE_NAMES[code]
    with open(folder / "config.json", "w") as f:
        json.dump(hf, f, indent=2)
    gen = {
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": list(cfg.eos_token_ids)
        if len(cfg.eos_token_ids) != 1
        else cfg.eos_token_ids[0],
        "pad_token_id": cfg.pad_token_id,
    }
    with open(folder / "generation_config.json", "w") as f:
        json.dump({k: v for k, v in gen.items() if v not in (None, [])}, f, indent=2)
    write_safetensors(
        folder / "model.safetensors", export_state(params, table or table_for(cfg)), dtype
    )
    return folder
