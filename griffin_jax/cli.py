"""How every `python -m ...` entry point reports bad input: one line, exit status 2.

`run(main)` calls an entry point's `main(argv)`. A `ValueError` (every input check here raises
one: `checks.InputError`, `ModelLoadError`, `CheckpointError`, `UnsupportedConfigError`,
`CacheCapacityError`, ...) or an `OSError` (a missing or unwritable file) becomes one line on
stderr, `error: <message>`, and exit status 2; Ctrl-C exits 130. `--debug` anywhere on the
command line re-raises instead, with the traceback.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import platform
import sys
from collections.abc import Callable, Sequence

from griffin_jax.checks import InputError

DEBUG_FLAG = "--debug"
USAGE_STATUS = 2
# Where `use_compile_cache` keeps compiled programs: a folder, or "off".
COMPILE_CACHE_ENV = "GRIFFIN_COMPILE_CACHE"
COMPILE_CACHE_MAX_BYTES = 4 << 30


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors (an unknown flag, `--steps abc`) are one-line `InputError`s too."""

    def error(self, message: str):  # type: ignore[override]
        raise InputError(f"{message} (see {self.prog} --help)")


def positive(value: object, flag: str) -> None:
    """`flag`'s value must be an integer >= 1."""
    if value is not None and (not isinstance(value, int) or value < 1):
        raise InputError(f"{flag} must be an integer >= 1, got {value}")


def finite(value: float | None, flag: str, *, low: float | None = None) -> None:
    """`flag`'s value must be finite (and >= `low`)."""
    if value is not None and (not math.isfinite(value) or (low is not None and value < low)):
        bound = "" if low is None else f" and >= {low:g}"
        raise InputError(f"{flag} must be finite{bound}, got {value}")


def input_file(path: pathlib.Path | None, flag: str) -> None:
    """`flag` must name an existing file."""
    if path is not None and not path.is_file():
        what = "a folder, not a file" if path.is_dir() else "no such file"
        raise InputError(f"{flag} {path}: {what}")


def output_file(path: pathlib.Path | None, flag: str) -> None:
    """`flag` can be written: not a folder, and no file stands where its folders would go."""
    if path is None:
        return
    if path.is_dir():
        raise InputError(f"{flag} {path} is a folder; give a file path")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise InputError(f"{flag} {path}: {parent} is a file, not a folder")
            break


def write_report(path: pathlib.Path, report: object) -> None:
    """Writes an entry point's JSON report (`--out`, checked by `output_file`) to `path`,
    making its folders."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1))


def drop_closed_loop_reports() -> None:
    """Silences one benign report, from the first failed orbax restore on (process-wide).

    A failed orbax restore abandons tensorstore reads whose completion callbacks may still reach
    the asyncio loop orbax has closed; Python would print each as a multi-line "Exception
    ignored ... Event loop is closed" report on stderr, after the one-line error. Only that exact
    RuntimeError is dropped; other unraisable exceptions still reach the previous hook.
    """
    previous = sys.unraisablehook
    if getattr(previous, "drops_closed_loop_reports", False):
        return

    def hook(unraisable) -> None:
        err = unraisable.exc_value
        if not (isinstance(err, RuntimeError) and str(err) == "Event loop is closed"):
            previous(unraisable)

    hook.drops_closed_loop_reports = True
    sys.unraisablehook = hook


def one_line(err: BaseException) -> str:
    """The error's message on one line (continuation lines joined with '; ')."""
    text = str(err).strip() or type(err).__name__
    if isinstance(err, OSError) and err.filename is not None and str(err.filename) not in text:
        text = f"{text}: {err.filename}"
    return "; ".join(line.strip() for line in text.splitlines() if line.strip())


def run(main: Callable[[list[str] | None], int | None], argv: Sequence[str] | None = None) -> int:
    """Runs `main(argv)` (argv defaults to sys.argv[1:]) and returns its exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = DEBUG_FLAG in args
    args = [a for a in args if a != DEBUG_FLAG]
    try:
        return int(main(args) or 0)
    except KeyboardInterrupt:
        if debug:
            raise
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError) as err:
        if debug:
            raise
        print(f"error: {one_line(err)} (--debug shows the traceback)", file=sys.stderr)
        return USAGE_STATUS


def machine() -> str:
    """This machine in one line, for benchmark reports: CPU model, architecture and count, the
    JAX backend with its devices, the JAX version, and the host name."""
    import jax

    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next(
                (line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu
            )
    except OSError:
        pass
    dev = jax.devices()[0]
    return (
        f"{cpu or 'unknown CPU'} ({platform.machine()}, {os.cpu_count()} CPUs), "
        f"{dev.platform} x{jax.device_count()} ({dev.device_kind}), jax {jax.__version__}, "
        f"{platform.node()}"
    )


def user_cache_dir() -> pathlib.Path:
    """The project's folder in the user cache ($XDG_CACHE_HOME, else ~/.cache): compiled
    programs (`use_compile_cache`) and measured round costs (`budget.cache_path`)."""
    root = os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache"
    return pathlib.Path(root) / "griffin_jax"


def use_compile_cache() -> pathlib.Path | None:
    """Keeps compiled XLA programs on disk across runs (JAX's persistent compilation cache).

    For the serving and generation entry points, whose start is mostly compiling: the second
    run of the same model and shapes loads its programs instead (`python -m inference.generate
    --tree auto` on the default pair here: ~21 s of compiling -> ~6 s, the rest tracing).
    The folder is $GRIFFIN_COMPILE_CACHE ("off" disables it), else `griffin_jax/xla` in the
    user cache; JAX_COMPILATION_CACHE_DIR, when set, is JAX's own choice and wins. Every
    program is kept however fast it compiled (most of a round's are small); the folder is
    trimmed to the least recently used 4 GiB. XLA checks that a stored CPU program suits this
    machine's CPU before loading it, and compiles anew otherwise. Call it before the first
    compile. Returns the folder in use, or None when off.
    """
    import jax

    setting = os.environ.get(COMPILE_CACHE_ENV, "")
    if setting.lower() in ("off", "0", "false", "no"):
        jax.config.update("jax_enable_compilation_cache", False)
        return None
    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        folder = pathlib.Path(os.environ["JAX_COMPILATION_CACHE_DIR"])
    elif setting:
        folder = pathlib.Path(setting).expanduser()
    else:
        folder = user_cache_dir() / "xla"
    jax.config.update("jax_compilation_cache_dir", str(folder))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    jax.config.update("jax_compilation_cache_max_size", COMPILE_CACHE_MAX_BYTES)
    return folder


def add_distributed_flags(p: argparse.ArgumentParser) -> None:
    """`--distributed` and its explicit cluster description (`sharding.init_distributed`)."""
    p.add_argument(
        "--distributed",
        action="store_true",
        help="one of N processes of one JAX program (jax.distributed.initialize)",
    )
    p.add_argument(
        "--coordinator",
        default=None,
        metavar="HOST:PORT",
        help="with --distributed: process 0's address (default: the environment)",
    )
    p.add_argument(
        "--num-processes",
        type=int,
        default=None,
        help="with --distributed: N (default: the environment)",
    )
    p.add_argument(
        "--process-id",
        type=int,
        default=None,
        help="with --distributed: this process, 0..N-1 (default: the environment)",
    )


def start_distributed(args: argparse.Namespace) -> None:
    """Calls `sharding.init_distributed` when `--distributed` was given (checked flags first)."""
    given = [
        f for f in ("coordinator", "num_processes", "process_id") if getattr(args, f) is not None
    ]
    if not args.distributed:
        if given:
            raise InputError(f"--{given[0].replace('_', '-')} needs --distributed")
        return
    if args.num_processes is not None and args.num_processes < 1:
        raise InputError(f"--num-processes must be >= 1, got {args.num_processes}")
    if args.process_id is not None and not (
        0 <= args.process_id < (args.num_processes or args.process_id + 1)
    ):
        raise InputError(f"--process-id {args.process_id} is not in [0, --num-processes)")
    from griffin_jax import sharding

    sharding.init_distributed(args.coordinator, args.num_processes, args.process_id)
