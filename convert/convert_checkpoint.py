"""Converts a HF checkpoint folder to an orbax params checkpoint (and back).

    python -m convert.convert_checkpoint --hf FOLDER --out DIR [--dtype f32|bf16|f16] [--force]
    python -m convert.convert_checkpoint --to-hf DIR --out FOLDER [--dtype f32|bf16|f16] [--force]

A converted directory holds `config.json` (`ModelConfig.to_hf()` plus the params' `dtype`) and
`params/` (an orbax `StandardCheckpointer` checkpoint of the HF-named params tree).
`load_converted(DIR)` restores both without touching the HF names again, which is the fast
path for repeated runs; the reverse mode writes a HF folder through `export_hf`.

The CLI refuses an existing non-empty `--out` unless `--force`, and writes into a temporary
sibling folder renamed into place at the end, so an error (a bad checkpoint, a full disk) leaves
the disk as it was. Errors are one line on stderr with exit status 2 (`griffin_jax.cli`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import secrets
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import orbax.checkpoint as ocp

from convert.export_hf import export_hf
from convert.hf_keys import CheckpointError, check_tree
from convert.load_hf import config_from_json, load_hf, parse_dtype, read_json
from griffin_jax import cli
from griffin_jax.checks import InputError
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
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(out_dir / PARAMS_DIR, params, force=True)
        checkpointer.wait_until_finished()
    return out_dir


def _restore_params(params_dir: Path, expected: Any) -> Any:
    """The orbax params (orbax returns the stored shapes: the caller checks them)."""
    if not params_dir.is_dir():
        raise CheckpointError(f"{params_dir}: missing (not a converted directory)")
    cli.drop_closed_loop_reports()
    try:
        with ocp.StandardCheckpointer() as checkpointer:
            return checkpointer.restore(params_dir, expected)
    except Exception as e:  # orbax / tensorstore raise many types for one meaning
        detail = cli.one_line(e).split(" [tensorstore_spec=")[0]
        raise CheckpointError(
            f"{params_dir}: cannot restore the orbax checkpoint ({detail})"
        ) from e


def load_converted(out_dir: str | Path) -> tuple[ModelConfig, Any]:
    """Restores `(cfg, params)` written by `save_converted` (checked against abstract_params).

    Raises:
      CheckpointError: invalid config.json, or params that are missing, unreadable or do not
        match the config (names the file or folder).
    """
    out_dir = Path(out_dir).absolute()
    config_path = out_dir / CONFIG_FILE
    hf = read_json(config_path)
    dtype = config_from_json(config_path, lambda: parse_dtype(str(hf.get("dtype", "float32"))))
    cfg = config_from_json(config_path, lambda: ModelConfig.from_hf(hf))
    expected = abstract_params(cfg, dtype)
    params = _restore_params(out_dir / PARAMS_DIR, expected)
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


def check_output(out: str | Path, source: str | Path, *, force: bool) -> None:
    """Refuses an `out` that exists (unless `force`), is a file, or is or holds `source`."""
    out, source = Path(out).absolute(), Path(source).absolute()
    if not source.exists():
        raise InputError(f"{source}: no such folder")
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} exists and is not a folder")
    if out.resolve() == source.resolve() or out.resolve() in source.resolve().parents:
        raise InputError(f"--out {out} would replace the source {source}")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise InputError(f"--out {out} already exists; pass --force to replace it")


@contextlib.contextmanager
def staged_folder(out: str | Path, *, force: bool) -> Iterator[Path]:
    """Yields an empty temporary sibling of `out`, renamed to `out` when the block succeeds.

    On an error the temporary folder (and any parent folders made for it) is removed and an
    existing `out` is untouched; with `force` an existing `out` is replaced at the very end.
    """
    out = Path(out).absolute()
    missing = [p for p in (out.parent, *out.parent.parents) if not p.exists()]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{secrets.token_hex(4)}.tmp")
    tmp.mkdir()  # (not tempfile.mkdtemp: its 0700 mode would become the output's)
    try:
        yield tmp
        old = None
        if out.exists():
            if not force and (not out.is_dir() or any(out.iterdir())):
                raise InputError(f"--out {out} appeared while writing; pass --force to replace it")
            old = out.with_name(f".{out.name}.{secrets.token_hex(4)}.old")
            out.rename(old)
        try:
            tmp.rename(out)
        except BaseException:
            if old is not None:
                old.rename(out)
            raise
        if old is not None:
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if missing:
            shutil.rmtree(missing[-1], ignore_errors=True)  # the topmost folder made here
        raise


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--hf", metavar="FOLDER", help="HF checkpoint folder to convert")
    source.add_argument("--to-hf", metavar="DIR", help="converted directory to export to HF")
    parser.add_argument("--out", required=True, help="output directory (must not exist)")
    parser.add_argument(
        "--dtype",
        choices=("f32", "bf16", "f16"),
        default=None,
        help="target dtype (default: the source's)",
    )
    parser.add_argument(
        "--force", action="store_true", help="replace an existing --out (its contents are lost)"
    )
    args = parser.parse_args(argv)
    src = args.hf or args.to_hf
    check_output(args.out, src, force=args.force)
    with staged_folder(args.out, force=args.force) as tmp:
        if args.hf:
            convert(src, tmp, dtype=args.dtype)
        else:
            to_hf(src, tmp, dtype=args.dtype)
    verb = "converted" if args.hf else "exported"
    print(f"{verb} {src} -> {Path(args.out).absolute()}")
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
