"""Converts a HF checkpoint folder to an orbax params checkpoint (and back).

    python -m convert.convert_checkpoint --hf FOLDER --out DIR [--dtype f32|bf16|f16]
    python -m convert.convert_checkpoint --to-hf DIR --out FOLDER [--dtype f32|bf16|f16]

A converted directory holds `config.json` (`ModelConfig.to_hf()` plus the params' `dtype`) and
`params/` (an orbax `StandardCheckpointer` checkpoint of the HF-named params tree).
`load_converted(DIR)` restores both without touching the HF names again, which is the fast
path for repeated runs; the reverse mode writes a HF folder through `export_hf`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import orbax.checkpoint as ocp

from convert.export_hf import export_hf
from convert.hf_keys import check_tree
from convert.load_hf import load_hf, parse_dtype
from griffin_jax.config import ModelConfig
from griffin_jax.model import abstract_params

CONFIG_FILE = "config.json"
PARAMS_DIR = "params"


def save_converted(out_dir: str | Path, cfg: ModelConfig, params: Any) -> Path:
    """Writes `config.json` and the orbax `params/` checkpoint into `out_dir`."""
    out_dir = Path(out_dir).absolute()
    out_dir.mkdir(parents=True, exist_ok=True)
    hf = cfg.to_hf()
    hf["dtype"] = np.dtype(params["embed_tokens"]["embedding"].dtype).name
    with open(out_dir / CONFIG_FILE, "w") as f:
        json.dump(hf, f, indent=2)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(out_dir / PARAMS_DIR, params, force=True)
    checkpointer.wait_until_finished()
    return out_dir


def load_converted(out_dir: str | Path) -> tuple[ModelConfig, Any]:
    """Restores `(cfg, params)` written by `save_converted` (checked against abstract_params)."""
    out_dir = Path(out_dir).absolute()
    with open(out_dir / CONFIG_FILE) as f:
        hf = json.load(f)
    dtype = parse_dtype(hf.get("dtype", "float32"))
    cfg = ModelConfig.from_hf(hf)
    expected = abstract_params(cfg, dtype)
    params = ocp.StandardCheckpointer().restore(out_dir / PARAMS_DIR, expected)
    check_tree(params, expected, source=str(out_dir))
    return cfg, params


def convert(hf_folder: str | Path, out_dir: str | Path, *, dtype: Any = None) -> Path:
    """HF folder -> converted directory (orbax params + config)."""
    cfg, params = load_hf(hf_folder, dtype)
    return save_converted(out_dir, cfg, params)


def to_hf(converted_dir: str | Path, hf_folder: str | Path, *, dtype: Any = None) -> Path:
    """Converted directory -> HF folder (config.json + model.safetensors)."""
    cfg, params = load_converted(converted_dir)
    return export_hf(params, cfg, hf_folder, dtype=dtype)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--hf", metavar="FOLDER", help="HF checkpoint folder to convert")
    source.add_argument("--to-hf", metavar="DIR", help="converted directory to export to HF")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument(
        "--dtype",
        choices=("f32", "bf16", "f16"),
        default=None,
        help="target dtype (default: the source's)",
    )
    args = parser.parse_args(argv)
    if args.hf:
        out = convert(args.hf, args.out, dtype=args.dtype)
        print(f"converted {args.hf} -> {out}")
    else:
        out = to_hf(args.to_hf, args.out, dtype=args.dtype)
        print(f"exported {args.to_hf} -> {out}")


if __name__ == "__main__":
    main()
