"""Command-line checks of the training entry points that the shared ones do not cover.

`griffin_jax.cli` holds the parser whose usage errors are one line (`cli.ArgumentParser`) and the
file checks (`cli.input_file`, `cli.output_file`); `griffin_jax.checks` the integer check. Here:
integer bounds other than 1, open float ranges, input folders that must hold given files, and
output folders. Every check raises `checks.InputError` naming the flag, what is wrong and what to
do, before any model is loaded and before anything is written; `cli.run` prints it as one line,
exit status 2. Light on purpose (the corpus and tokenizer CLIs import it too).
"""

from __future__ import annotations

import pathlib
from collections.abc import Iterable

from griffin_jax import cli
from griffin_jax.checks import InputError, integer


def at_least(value: int | None, flag: str, minimum: int) -> None:
    """An integer flag >= minimum (None = unset, allowed)."""
    if value is not None:
        integer(value, name=flag, minimum=minimum)


def number(
    value: float | None,
    flag: str,
    *,
    minimum: float | None = None,
    above: float | None = None,
    below: float | None = None,
) -> None:
    """A finite float flag, >= minimum, > above, < below where given (None = unset, allowed)."""
    cli.finite(value, flag, low=minimum)
    if value is not None and above is not None and value <= above:
        raise InputError(f"{flag} must be > {above:g}, got {value:g}")
    if value is not None and below is not None and value >= below:
        raise InputError(f"{flag} must be < {below:g}, got {value:g}")


def folder(path: pathlib.Path, flag: str, *, needs: Iterable[str] = (), hint: str = "") -> None:
    """An existing folder holding the files `needs`; `hint` says where such a folder comes from."""
    hint = f" ({hint})" if hint else ""
    if not path.exists():
        raise InputError(f"{flag} {path}: no such folder{hint}")
    if not path.is_dir():
        raise InputError(f"{flag} {path} is a file, not a folder{hint}")
    for name in needs:
        if not (path / name).is_file():
            raise InputError(f"{flag} {path} has no {name}{hint}")


def out_folder(path: pathlib.Path, flag: str = "--out") -> None:
    """A folder to write into: it may not exist yet, but must not be a file (or under one)."""
    for p in (path, *path.parents):
        if p.exists():
            if not p.is_dir():
                where = "" if p == path else f": {p}"
                raise InputError(f"{flag} {path}{where} is a file; pass a folder")
            return
