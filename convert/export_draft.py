"""Exports a draft (GRIFFIN, EAGLE-2, EAGLE-3) to the published PyTorch layout (`load_draft`'s
reverse).

Writes `config.json` in the transformers 4 layout of the published drafts (`DraftConfig.to_hf`,
the fields the reference reads, spec 2.6) and the weights under the published keys (spec 2.5,
the same `hf_keys` draft rows as the import), including the frozen `embed_tokens.weight` copy
that the reference's `load_state_dict(strict=True)` requires: it is the base embedding, which our
draft shares. EAGLE-3 adds its `d2t` (int64) and `t2d` (bool) buffers, as the official draft
`Model` registers them (and its own embedding when it has one). Formats: `model.safetensors`
(always; streamed, any of f32 / bf16 / f16) and, with the `griffin-jax[torch]` extra,
`pytorch_model.bin` (what the official loaders read first). Load -> export -> load gives back
identical tensors.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from convert.export_hf import write_safetensors
from convert.hf_keys import (
    DRAFT_EMBED_KEY,
    DRAFT_TABLES,
    EAGLE3_D2T_KEY,
    EAGLE3_T2D_KEY,
    CheckpointError,
    HFTensor,
    check_tree,
    export_state,
    identity,
)
from convert.load_hf import SAFETENSORS_DTYPES, TORCH_EXTRA_HINT, parse_dtype
from griffin_jax.config import ModelConfig
from griffin_jax.draft import DraftConfig, abstract_draft_params, module_params, param_dtype
from griffin_jax.layers import unfuse_projections

_TORCH_DTYPE_NAMES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}
_CODES = {dtype: code for code, dtype in SAFETENSORS_DTYPES.items()}


def draft_hf_tensors(params: Any, embedding: Any, dcfg: DraftConfig) -> list[HFTensor]:
    """The published state dict of a draft as lazily computed tensors (embedding first).

    Args:
      params: draft params (checked against `abstract_draft_params(dcfg)` shapes).
      embedding: [V, D] the base embedding, written as `embed_tokens.weight`.
      dcfg: the draft config.
    """
    check_tree(params, abstract_draft_params(dcfg, param_dtype(params)), source="draft params")
    if dcfg.own_embedding:
        embedding = params["embed_tokens"]["embedding"]
    want = (dcfg.vocab_size, dcfg.d_model)
    if tuple(embedding.shape) != want:
        raise CheckpointError(f"embedding has shape {tuple(embedding.shape)}, expected {want}")
    embed = HFTensor(key=DRAFT_EMBED_KEY, shape=want, leaf=embedding, index=(), transform=identity)
    tensors = [embed, *export_state(module_params(params), DRAFT_TABLES[dcfg.kind])]
    if dcfg.kind == "eagle3":
        d2t = np.asarray(params["d2t"], np.int64)
        t2d = np.zeros((dcfg.vocab_size,), bool)
        t2d[np.arange(len(d2t)) + d2t] = True
        for key, value in ((EAGLE3_D2T_KEY, d2t), (EAGLE3_T2D_KEY, t2d)):
            tensors.append(
                HFTensor(key=key, shape=value.shape, leaf=value, index=(), transform=identity,
                         fixed_dtype=value.dtype)
            )  # fmt: skip
    return tensors


def _to_torch(value: np.ndarray, torch: Any) -> Any:
    if value.dtype == SAFETENSORS_DTYPES["BF16"]:
        return torch.from_numpy(value.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(value)


def export_draft(
    params: Any,
    embedding: Any,
    dcfg: DraftConfig,
    folder: str | Path,
    *,
    dtype: Any = None,
    base_cfg: ModelConfig | None = None,
    formats: tuple[str, ...] = ("safetensors",),
) -> Path:
    """Writes a draft folder in the published layout.

    Args:
      params: draft params.  embedding: [V, D] the base embedding (shared by the draft).
      dcfg: the draft config.
      folder: output folder (created; files of the same names are overwritten).
      dtype: 'f32' | 'bf16' | 'f16' (or a dtype); default: the params' dtype.
      base_cfg: if given, its BOS / EOS / pad ids go into config.json (as in published drafts).
      formats: any of "safetensors" (`model.safetensors`) and "bin" (`pytorch_model.bin`, needs
        torch).
    Returns:
      The folder.
    Raises:
      ImportError: "bin" without PyTorch (names the `griffin-jax[torch]` extra).
    """
    unknown = set(formats) - {"safetensors", "bin"}
    if unknown or not formats:
        raise ValueError(f"formats {formats} must be a non-empty subset of ('safetensors', 'bin')")
    torch = None
    if "bin" in formats:
        try:
            import torch
        except ImportError as e:
            raise ImportError(TORCH_EXTRA_HINT.replace("reading", "writing")) from e
    if dtype is None:
        dtype = param_dtype(params)
    dtype = parse_dtype(dtype)
    code = _CODES.get(dtype)
    if code not in _TORCH_DTYPE_NAMES:
        raise ValueError(f"export dtype {dtype} is not one of f32, bf16, f16")
    params = unfuse_projections(params, dcfg)  # the fused decode layout in, the stored one out
    tensors = draft_hf_tensors(params, embedding, dcfg)

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    hf = dcfg.to_hf()
    hf["torch_dtype"] = _TORCH_DTYPE_NAMES[code]
    if base_cfg is not None:
        eos = base_cfg.eos_token_ids
        hf["bos_token_id"] = base_cfg.bos_token_id
        hf["eos_token_id"] = eos[0] if len(eos) == 1 else (list(eos) or None)
        hf["pad_token_id"] = base_cfg.pad_token_id
    with open(folder / "config.json", "w") as f:
        json.dump(hf, f, indent=2)
    if "safetensors" in formats:
        write_safetensors(folder / "model.safetensors", tensors, dtype)
    if torch is not None:
        state = {t.key: _to_torch(t.value(dtype), torch) for t in tensors}
        torch.save(state, folder / "pytorch_model.bin")
    return folder
