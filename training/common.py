"""Pieces shared by base pretraining (`training.pretrain`) and the draft trainer (`training.train`).

One place for: the optax optimizer recipe (AdamW, linear warmup then decay, clipping), orbax
checkpoints that resume (params, optimizer state, step, data position, RNG; past a broken newest
step, see `Checkpointer`), metrics to JSONL
plus a progress bar, loss-curve plots, and data parallelism over local devices with
`jax.sharding` (the batch axis is split over a 1-D `data` mesh; params are replicated).

Multi-host: call `griffin_jax.sharding.init_distributed()` first on every host (the trainers'
`--distributed`); `jax.devices()` then spans all
hosts and `data_mesh()` covers them. Each host feeds its own slice of the global batch
(`host_batch_slice`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import pathlib
import re
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from griffin_jax import cli
from griffin_jax.checks import InputError

# ---------------------------------------------------------------------------------------------
# Optimizer


@dataclasses.dataclass(frozen=True, kw_only=True)
class OptimConfig:
    """AdamW with linear warmup, then linear (or cosine) decay; clipping by value or norm.

    Defaults follow the GRIFFIN reference (spec 4.7): betas (0.9, 0.95), weight decay 0.01
    applied to every parameter (norms and biases too, as PyTorch's AdamW does there), clipping by
    value at 0.5.
    """

    lr: float = 5e-5
    warmup_steps: int = 2000
    total_steps: int = 800_000
    end_lr_frac: float = 0.0
    schedule: str = "linear"  # linear | cosine
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.01
    clip_value: float | None = 0.5
    clip_norm: float | None = None


def make_schedule(cfg: OptimConfig) -> optax.Schedule:
    warmup = optax.linear_schedule(0.0, cfg.lr, max(cfg.warmup_steps, 1))
    decay_steps = max(cfg.total_steps - cfg.warmup_steps, 1)
    if cfg.schedule == "cosine":
        decay = optax.cosine_decay_schedule(cfg.lr, decay_steps, alpha=cfg.end_lr_frac)
    else:
        decay = optax.linear_schedule(cfg.lr, cfg.lr * cfg.end_lr_frac, decay_steps)
    return optax.join_schedules([warmup, decay], [cfg.warmup_steps])


def make_optimizer(cfg: OptimConfig) -> optax.GradientTransformation:
    parts = []
    if cfg.clip_value is not None:
        parts.append(optax.clip(cfg.clip_value))
    if cfg.clip_norm is not None:
        parts.append(optax.clip_by_global_norm(cfg.clip_norm))
    parts.append(
        optax.adamw(
            make_schedule(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay
        )
    )
    return optax.chain(*parts)


# ---------------------------------------------------------------------------------------------
# Checkpoints


class CheckpointError(InputError):
    """No checkpoint restores (or one cannot be saved): one line naming the steps and why."""


def saved_steps(directory: str | os.PathLike) -> list[int]:
    """The step folders under a checkpoint directory, ascending, without creating anything.

    orbax names a finished step `<step>` (its in-progress saves carry a `.orbax-checkpoint-tmp`
    suffix, and set-aside folders a `.unrestorable` one, so neither counts).
    """
    path = pathlib.Path(directory)
    if not path.is_dir():
        return []
    return sorted(int(p.name) for p in path.iterdir() if p.name.isdigit() and p.is_dir())


@contextlib.contextmanager
def _quiet_absl():
    """orbax logs (through absl) a line per odd step folder; the warnings here say it once."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def _unrestorable_reason(path: pathlib.Path, err: Exception) -> str:
    """A few words on why a step folder did not restore (orbax's messages are pages long)."""
    if path.is_dir() and not any(path.iterdir()):
        return "empty folder"
    text = str(err).strip()
    if item := re.search(r'Item "(\w+)" was not found', text):
        return f"incomplete: no {item.group(1)!r} item"
    if isinstance(err, json.JSONDecodeError):
        return "garbled JSON metadata"
    # tensorstore status codes, at the start of its messages.
    for code, why in (
        ("NOT_FOUND", "a data file is missing"),
        ("OUT_OF_RANGE", "a data file is truncated"),
        ("DATA_LOSS", "a data file is corrupt"),
    ):
        if text.startswith(code):
            return why
    first = text.splitlines()[0][:120] if text else ""
    return f"{type(err).__name__}: {first}" if first else type(err).__name__


class Checkpointer:
    """Orbax `CheckpointManager` over a train state pytree plus a small JSON of metadata.

    The state pytree holds params, optimizer state, step and RNG key (as raw key data); the JSON
    holds the data position and anything else the loop needs to resume exactly.

    Resuming falls back from an unrestorable newest step (an empty folder, a partial copy, a
    truncated or garbled file) to the newest one that restores, with a one-line warning; nothing
    is deleted. Saving moves any step folder at or past the new step aside
    (`<step>.unrestorable`), since orbax silently skips a save at or below its latest step.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        max_to_keep: int = 2,
        warn: Callable[[str], None] | None = None,
    ) -> None:
        self.directory = pathlib.Path(directory).absolute()
        self.warn = warn or _print_warning
        self.skipped: dict[int, str] = {}  # step -> why it did not restore
        with _quiet_absl():
            self.manager = ocp.CheckpointManager(
                self.directory,
                options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
            )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, meta: Mapping[str, Any]) -> None:
        stale = [s for s in self.manager.all_steps() if s >= step]
        if stale:
            if jax.process_index() == 0:
                for s in stale:
                    self._set_aside(s, step)
            if jax.process_count() > 1:  # every host must see the renames before it saves
                multihost_utils.sync_global_devices("griffin_jax checkpoint set-aside")
            with _quiet_absl():
                self.manager.reload()
        saved = self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(dict(meta))
            ),
        )
        self.manager.wait_until_finished()
        if not saved:
            raise CheckpointError(f"orbax did not save step {step} in {self.directory}")

    def _set_aside(self, old: int, step: int) -> None:
        src = self.directory / str(old)
        why = self.skipped.get(old)
        suffix = "unrestorable" if why else "replaced"
        dst, n = src.with_name(f"{old}.{suffix}"), 1
        while dst.exists():
            dst, n = src.with_name(f"{old}.{suffix}.{n}"), n + 1
        os.rename(src, dst)
        self.warn(
            f"warning: moved checkpoint {old} ({why or 'not restored'}) aside to {dst.name} "
            f"to save step {step}"
        )

    def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict]:
        """Restores (state, meta) of `step`, or of the newest step that restores.

        `abstract_state` gives structure, shapes and shardings. Each newer step that fails is
        named in one warning line (and remembered in `skipped`); when none restores,
        `CheckpointError` lists them all.
        """
        steps = sorted(self.manager.all_steps(), reverse=True) if step is None else [step]
        if not steps:
            raise CheckpointError(f"no checkpoint in {self.directory}")
        skipped = []
        for s in steps:
            try:
                with _quiet_absl():
                    out = self.manager.restore(
                        s,
                        args=ocp.args.Composite(
                            state=ocp.args.StandardRestore(abstract_state),
                            meta=ocp.args.JsonRestore(),
                        ),
                    )
            except Exception as err:  # any unreadable step: fall back to an older one
                cli.drop_closed_loop_reports()
                self.skipped[s] = _unrestorable_reason(self.directory / str(s), err)
                skipped.append(f"{s} ({self.skipped[s]})")
                continue
            if skipped:
                self.warn(
                    f"warning: skipped unrestorable checkpoint {', '.join(skipped)} in "
                    f"{self.directory}; restored step {s} (nothing deleted)"
                )
            return out["state"], dict(out["meta"])
        raise CheckpointError(
            f"no checkpoint in {self.directory} restores: {', '.join(skipped)}; move the broken "
            "step folders away (nothing was deleted)"
        )

    def close(self) -> None:
        self.manager.close()


def _print_warning(message: str) -> None:
    """One line on stderr, on its own line even while a progress bar is drawn."""
    from tqdm.auto import tqdm

    tqdm.write(message, file=sys.stderr)


def key_to_data(key: jax.Array) -> jax.Array:
    """A typed PRNG key as uint32 data (storable by orbax)."""
    return jax.random.key_data(key)


def data_to_key(data: jax.Array) -> jax.Array:
    return jax.random.wrap_key_data(jnp.asarray(data, jnp.uint32))


# ---------------------------------------------------------------------------------------------
# Metrics and progress


def is_lead() -> bool:
    """Whether this process writes a run's files (metrics, exports): process 0 of a
    `--distributed` run, or the only process. Checkpoints are written by every process."""
    return jax.process_index() == 0


class MetricsLog:
    """Appends one JSON object per record to a JSONL file and shows a tqdm progress bar.

    In a `--distributed` run only process 0 writes the file; the others show their bar with
    their process id.
    """

    def __init__(
        self, path: str | os.PathLike, *, total: int, initial: int = 0, desc: str = "train"
    ):
        from tqdm.auto import tqdm

        self.path = pathlib.Path(path)
        self._file = None
        if is_lead():
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "a")  # noqa: SIM115 (kept open for the run)
        else:
            desc = f"[process {jax.process_index()}] {desc}"
        self.bar = tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True)
        self._t0 = time.time()

    def log(self, record: Mapping[str, Any], *, advance: int = 0, show: Iterable[str] = ()) -> None:
        rec = {k: _to_py(v) for k, v in record.items()}
        rec.setdefault("time", time.time() - self._t0)
        if self._file is not None:
            self._file.write(json.dumps(rec) + "\n")
            self._file.flush()
        if advance:
            self.bar.update(advance)
        shown = {k: rec[k] for k in show if k in rec}
        if shown:
            self.bar.set_postfix(
                {k: f"{v:.4g}" if isinstance(v, float) else v for k, v in shown.items()}
            )

    def close(self) -> None:
        self.bar.close()
        if self._file is not None:
            self._file.close()


def _to_py(v: Any) -> Any:
    if isinstance(v, (jax.Array, np.ndarray, np.generic)):
        return np.asarray(v).item() if np.asarray(v).size == 1 else np.asarray(v).tolist()
    return v


def trim_metrics(path: str | os.PathLike, step: int) -> None:
    """Drops records past `step` (logged by a killed run after the checkpoint it resumes from).
    Process 0 alone, as it alone writes them."""
    path = pathlib.Path(path)
    if is_lead() and path.exists():
        kept = []
        for line in path.read_text().splitlines():
            try:
                if json.loads(line)["step"] <= step:
                    kept.append(line)
            except (ValueError, KeyError, TypeError):  # a line cut short by the kill
                continue
        path.write_text("".join(line + "\n" for line in kept))


def read_metrics(path: str | os.PathLike) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_metrics(
    path: str | os.PathLike,
    out_png: str | os.PathLike,
    *,
    keys: Iterable[str],
    x: str = "step",
    title: str = "",
    logy: Iterable[str] = (),
) -> None:
    """Draws one panel per key (records lacking the key are skipped) to a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = read_metrics(path)
    keys = list(keys)
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 3.6), squeeze=False)
    for ax, key in zip(axes[0], keys, strict=True):
        pts = [(r[x], r[key]) for r in recs if key in r and x in r]
        if pts:
            xs, ys = zip(*pts, strict=True)
            ax.plot(xs, ys)
        ax.set_xlabel(x)
        ax.set_title(key)
        if key in set(logy):
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# Data parallel


def data_mesh(num_devices: int | None = None) -> jax.sharding.Mesh:
    """A 1-D mesh named `data` over the first `num_devices` devices (all by default)."""
    devices = jax.devices()[: num_devices or len(jax.devices())]
    return jax.sharding.Mesh(np.asarray(devices), ("data",))


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def abstract_state(state: Any, mesh: jax.sharding.Mesh) -> Any:
    """Shapes and dtypes of `state`, replicated over `mesh`: what `Checkpointer.restore` reads
    into. The sharding is this run's, not the saved one, so a checkpoint written by N processes
    restores in a run of any other size."""
    sharding = replicated(mesh)
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), state)


def batch_sharded(mesh: jax.sharding.Mesh) -> NamedSharding:
    return NamedSharding(mesh, P("data"))


def shard_batch(batch: Any, mesh: jax.sharding.Mesh) -> Any:
    """Places a host batch (leading axis = global batch) split over the `data` axis."""
    sharding = batch_sharded(mesh)
    return jax.tree.map(lambda x: jax.device_put(x, sharding), batch)


def host_batch_slice(global_batch: int) -> slice:
    """The rows of the global batch this host loads (multi-host data parallel)."""
    per_host = global_batch // jax.process_count()
    start = jax.process_index() * per_host
    return slice(start, start + per_host)
