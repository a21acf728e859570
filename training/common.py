"""Pieces shared by base pretraining (`training.pretrain`) and the draft trainer (`training.train`).

One place for: the optax optimizer recipe (AdamW, linear warmup then decay, clipping), orbax
checkpoints that resume (params, optimizer state, step, data position, RNG), metrics to JSONL
plus a progress bar, loss-curve plots, and data parallelism over local devices with
`jax.sharding` (the batch axis is split over a 1-D `data` mesh; params are replicated).

Multi-host: call `init_distributed()` first on every host (it wraps
`jax.distributed.initialize`, which reads the coordinator address, process count and id from the
standard cluster environment variables or from its arguments); `jax.devices()` then spans all
hosts and `data_mesh()` covers them. Each host feeds its own slice of the global batch
(`host_batch_slice`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import time
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

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


class Checkpointer:
    """Orbax `CheckpointManager` over a train state pytree plus a small JSON of metadata.

    The state pytree holds params, optimizer state, step and RNG key (as raw key data); the JSON
    holds the data position and anything else the loop needs to resume exactly.
    """

    def __init__(self, directory: str | os.PathLike, *, max_to_keep: int = 2) -> None:
        self.directory = pathlib.Path(directory).absolute()
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, meta: Mapping[str, Any]) -> None:
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(dict(meta))
            ),
        )
        self.manager.wait_until_finished()

    def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict]:
        """Restores (state, meta); `abstract_state` gives structure, shapes and shardings."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        out = self.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()
            ),
        )
        return out["state"], dict(out["meta"])

    def close(self) -> None:
        self.manager.close()


def key_to_data(key: jax.Array) -> jax.Array:
    """A typed PRNG key as uint32 data (storable by orbax)."""
    return jax.random.key_data(key)


def data_to_key(data: jax.Array) -> jax.Array:
    return jax.random.wrap_key_data(jnp.asarray(data, jnp.uint32))


# ---------------------------------------------------------------------------------------------
# Metrics and progress


class MetricsLog:
    """Appends one JSON object per record to a JSONL file and shows a tqdm progress bar."""

    def __init__(
        self, path: str | os.PathLike, *, total: int, initial: int = 0, desc: str = "train"
    ):
        from tqdm.auto import tqdm

        self.path = pathlib.Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a")  # noqa: SIM115 (kept open for the run)
        self.bar = tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True)
        self._t0 = time.time()

    def log(self, record: Mapping[str, Any], *, advance: int = 0, show: Iterable[str] = ()) -> None:
        rec = {k: _to_py(v) for k, v in record.items()}
        rec.setdefault("time", time.time() - self._t0)
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
        self._file.close()


def _to_py(v: Any) -> Any:
    if isinstance(v, (jax.Array, np.ndarray, np.generic)):
        return np.asarray(v).item() if np.asarray(v).size == 1 else np.asarray(v).tolist()
    return v


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


def init_distributed(**kwargs: Any) -> None:
    """Multi-host set-up: one process per host, the same command on each (see module doc)."""
    jax.distributed.initialize(**kwargs)


def data_mesh(num_devices: int | None = None) -> jax.sharding.Mesh:
    """A 1-D mesh named `data` over the first `num_devices` devices (all by default)."""
    devices = jax.devices()[: num_devices or len(jax.devices())]
    return jax.sharding.Mesh(np.asarray(devices), ("data",))


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


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
