"""Device meshes and the sharding rules of the base model, the draft and their KV caches.

JAX's own sharding (`jax.sharding.Mesh` + `NamedSharding`, GSPMD inside the existing jits), no
hand-written collectives: the params and the decode state are placed with `NamedSharding`s, the
jitted engine (`speculative.prefill`, `spec_round`, `generate_device`, `vanilla.*`) is called
unchanged, and `jax.lax.with_sharding_constraint` pins the caches (and the rest of the state)
where they are created and returned, so one speculative round stays one jitted program with no
host round trip added. Megatron-style tensor parallelism over the `model` axis (as in
jax-llm-examples and maxtext's logical-axis rules):

- attention: q/k/v projections split by heads (column-parallel), o_proj by heads (row-parallel);
- MLP: gate/up split over the hidden F (column), down over F (row); the same for the draft's
  fusion MLP, and the draft's `fc` Linear [2D, D] is split over its 2D input (row-parallel);
- Mixtral experts: the E axis over `expert` if the mesh has one, else over `model` (then F stays
  whole); the router [D, E] is replicated (every shard needs all E logits);
- embedding [V, D] and lm_head [D, V]: over the vocabulary;
- norms and biases of replicated outputs: replicated;
- KV caches [L, B, S, K, H] (draft: [B, S, K, H]): B over `data`, K over `model`.

Fallback (explicit, per dimension): a rule dimension whose number of units (heads for the
attention dims, else elements) is not a multiple of the mesh axis size is replicated along that
axis instead; `plan_params` reports every such case. In particular, a model with fewer KV heads
than the `model` axis (Llama GQA with K=2 on model=8) keeps k_proj/v_proj and the KV cache
replicated along `model`: each model shard holds all K heads and computes them redundantly
(what vLLM/TGI do for TP > K). Splitting head_dim instead would need an all-reduce inside every
attention score, for a cache that is small exactly when K is small.

Multi-host (one process per host; every host runs the same command):
- call `init_distributed()` (the CLI's `--distributed`, with `--coordinator HOST:PORT
  --num-processes N --process-id I` or `JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES`,
  `JAX_PROCESS_ID`; 0 on the coordinator) before any other JAX call. Without them
  `jax.distributed.initialize` auto-detects Cloud TPU pods, SLURM, Open MPI and mpi4py;
- every host needs the code, the same Python environment, and the checkpoint at the same path
  (a shared filesystem or a copy): each host reads only the slices its own devices hold
  (`convert.load_hf.load_hf_params_sharded`, `restore_params`);
- the mesh spans all hosts' devices (`jax.devices()` is global); put `model` last so a model
  shard group is one host's devices (fast links) and `data` across hosts;
- every host gets the full output: the engine state other than the caches is replicated, so the
  host reads it without a gather. Tested with 2 processes x 2 CPU devices on loopback
  (`tests/test_multihost.py`: greedy generation over `data=1,model=4` equals one process).
"""

from __future__ import annotations

import contextlib
import math
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AbstractMesh, AxisType, Mesh, NamedSharding, PartitionSpec

from griffin_jax import layers

AXES = ("data", "model", "expert")

# (regex searched in the "/"-joined param path, logical names of the TRAILING dims). Right-aligned,
# so the base's stacked [L, ...] leaves and the draft's unstacked ones share rows. First match
# wins; a param that matches no row is an error (new params need an explicit rule).
PARAM_RULES: tuple[tuple[str, tuple[str | None, ...]], ...] = (
    (r"embed_tokens/embedding$", ("vocab", None)),  # [V, D]
    (r"lm_head/kernel$", (None, "vocab")),  # [D, V]
    (r"self_attn/q_proj/kernel$", (None, "heads")),  # [D, N*H]
    (r"self_attn/[kv]_proj/kernel$", (None, "kv_heads")),  # [D, K*H]
    (r"self_attn/q_proj/bias$", ("heads",)),  # [N*H]
    (r"self_attn/[kv]_proj/bias$", ("kv_heads",)),  # [K*H]
    (r"self_attn/o_proj/kernel$", ("heads", None)),  # [N*H, D]
    (r"block_sparse_moe/gate/kernel$", (None, None)),  # [D, E] router
    (r"block_sparse_moe/w[13]$", ("experts", None, "ff")),  # [E, D, F]
    (r"block_sparse_moe/w2$", ("experts", "ff", None)),  # [E, F, D]
    (r"mlp/(gate|up)_proj/kernel$", (None, "ff")),  # [D, F] (draft fusion MLP: [2D, F])
    (r"mlp/down_proj/kernel$", ("ff", None)),  # [F, D] (GRIFFIN draft layer: [F, 2D])
    (r"fc/(fc/)?kernel$", ("ff", None)),  # draft fc [2D, D]: row-parallel over the input
    (r"(norm|layernorm)/weight$", ()),
    (r"fc/(fc/)?bias$", ()),
    (r"^d2t$", ()),  # EAGLE-3's draft-to-target id offsets [V'] (int32)
)

# Logical name -> mesh axes to try, in order (the first one present, unused by an earlier dim of
# the same param, and dividing the dim wins).
LOGICAL_AXES: Mapping[str, tuple[str, ...]] = {
    "vocab": ("model",),
    "heads": ("model",),
    "kv_heads": ("model",),
    "ff": ("model",),
    "experts": ("expert", "model"),
    "batch": ("data",),
}
_HEAD_UNITS = ("heads", "kv_heads")

MeshLike = Mesh | AbstractMesh


# ----------------------------------------------------------------------------- meshes


def parse_mesh(text: str) -> dict[str, int]:
    """`"data=1,model=8"` -> {"data": 1, "model": 8} (axis order kept: the mesh's order).

    Axes: `data` (batch), `model` (tensor parallel), `expert` (Mixtral experts).
    Raises:
      ValueError: empty text, an entry without `=`, an unknown or repeated axis, a size that is
        not a positive integer.
    """
    if not text or not text.strip():
        raise ValueError("empty mesh spec: expected e.g. 'data=1,model=8'")
    out: dict[str, int] = {}
    for entry in text.split(","):
        name, sep, size = entry.strip().partition("=")
        name = name.strip()
        if not sep:
            raise ValueError(f"mesh entry {entry.strip()!r} is not AXIS=SIZE (e.g. 'model=8')")
        if name not in AXES:
            raise ValueError(f"unknown mesh axis {name!r} (use {', '.join(AXES)})")
        if name in out:
            raise ValueError(f"mesh axis {name!r} given twice")
        try:
            n = int(size.strip())
        except ValueError:
            raise ValueError(
                f"mesh axis {name!r} size {size.strip()!r} is not an integer"
            ) from None
        if n < 1:
            raise ValueError(f"mesh axis {name!r} size must be >= 1, got {n}")
        out[name] = n
    return out


def make_mesh(spec: str | Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh over the first prod(sizes) of `devices` (default: all of `jax.devices()`).

    The axes are `Auto` (GSPMD propagation), not the `Explicit` default of `jax.make_mesh` in
    this JAX, so the engine's jitted code needs no sharding-in-types annotations.

    Args:
      spec: "data=1,model=8" or {"data": 1, "model": 8}.
      devices: the devices to use; a mesh may use fewer than are present.
    Raises:
      ValueError: a bad spec, or more devices asked for than available.
    """
    sizes = parse_mesh(spec) if isinstance(spec, str) else dict(spec)
    bad = [a for a in sizes if a not in AXES]
    if bad:
        raise ValueError(f"unknown mesh axes {bad} (use {', '.join(AXES)})")
    devices = list(jax.devices() if devices is None else devices)
    n = math.prod(sizes.values())
    if n > len(devices):
        raise ValueError(f"mesh {sizes} needs {n} devices, only {len(devices)} available")
    grid = np.asarray(devices[:n], dtype=object).reshape(tuple(sizes.values()))
    return Mesh(grid, tuple(sizes), axis_types=(AxisType.Auto,) * len(sizes))


def abstract_mesh(spec: str | Mapping[str, int]) -> AbstractMesh:
    """A device-free mesh of the given sizes (for planning: `plan_params`, the memory plan)."""
    sizes = parse_mesh(spec) if isinstance(spec, str) else dict(spec)
    return AbstractMesh(
        tuple(sizes.values()), tuple(sizes), axis_types=(AxisType.Auto,) * len(sizes)
    )


def init_distributed(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> None:
    """Makes this process one of N in one JAX program (the project's one multi-host start-up;
    the CLIs' `--distributed`). Call before any other JAX call.

    Args fall back to `JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES`, `JAX_PROCESS_ID`; with
    none of them JAX auto-detects the cluster (Cloud TPU, SLURM, Open MPI). CPU collectives go
    over gloo, so CPU-only processes (tests on loopback) can run sharded programs together.
    """
    env = os.environ
    coordinator = coordinator or env.get("JAX_COORDINATOR_ADDRESS")
    if num_processes is None and "JAX_NUM_PROCESSES" in env:
        num_processes = int(env["JAX_NUM_PROCESSES"])
    if process_id is None and "JAX_PROCESS_ID" in env:
        process_id = int(env["JAX_PROCESS_ID"])
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=coordinator, num_processes=num_processes, process_id=process_id
    )


# ----------------------------------------------------------------------------- params


def _path_str(path: Sequence[Any]) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def _axis_size(mesh: MeshLike, axis: str) -> int:
    return int(dict(mesh.shape).get(axis, 0))


def spec_for(
    path: str, shape: Sequence[int], mesh: MeshLike, *, head_dim: int
) -> tuple[PartitionSpec, list[str]]:
    """The PartitionSpec of one param, and notes on every dimension that fell back.

    Args:
      path: "/"-joined param path (e.g. "layers/self_attn/q_proj/kernel").
      shape: the param's shape.
      head_dim: H of this model (heads are never split: a head dim counts N*H / H units).
    Returns:
      (spec, fallbacks): `fallbacks` lists "dim i (logical, n units) not divisible by axis=size"
      for each dimension replicated because its size does not divide.
    Raises:
      KeyError: no rule matches `path`.
    """
    rule = next(((p, lg) for p, lg in PARAM_RULES if re.search(p, path)), None)
    if rule is None:
        raise KeyError(f"no sharding rule for param {path!r}: add one to PARAM_RULES")
    pattern, logical = rule
    if len(logical) > len(shape):
        raise ValueError(f"rule {pattern!r} has {len(logical)} dims, {path!r} is {shape}")
    logical = (None,) * (len(shape) - len(logical)) + tuple(logical)
    return _resolve(logical, shape, mesh, head_dim=head_dim)


def _resolve(
    logical: Sequence[str | None], shape: Sequence[int], mesh: MeshLike, *, head_dim: int = 1
) -> tuple[PartitionSpec, list[str]]:
    used: set[str] = set()
    out: list[str | None] = []
    notes: list[str] = []
    for dim, (name, size) in enumerate(zip(logical, shape, strict=True)):
        chosen = None
        for axis in LOGICAL_AXES.get(name, ()) if name else ():
            n = _axis_size(mesh, axis)
            if n <= 1 or axis in used:
                continue
            unit = head_dim if name in _HEAD_UNITS else 1
            units = size // unit if size % unit == 0 else 0
            if units and units % n == 0:
                chosen = axis
                break
            notes.append(f"dim {dim} ({name}, {units or size} units) not divisible by {axis}={n}")
        if chosen:
            used.add(chosen)
        out.append(chosen)
    return PartitionSpec(*out), notes


def plan_params(
    params: Any, mesh: MeshLike, *, head_dim: int
) -> dict[str, tuple[PartitionSpec, list[str]]]:
    """{path: (spec, fallback notes)} for a params tree (arrays or ShapeDtypeStructs)."""
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    return {
        _path_str(p): spec_for(_path_str(p), leaf.shape, mesh, head_dim=head_dim)
        for p, leaf in flat
    }


def param_shardings(params: Any, mesh: Mesh, *, head_dim: int) -> Any:
    """A tree of NamedShardings with the structure of `params` (arrays or abstract).

    Raises:
      ValueError: fused projections or packed kernels (`layers.fuse_projections`,
        `pack_kernels`: the one-device decode layout).
    """
    if layers.is_fused(params) or layers.is_packed(params):
        raise ValueError(
            "params with fused q/k/v or gate/up projections or packed kernels "
            "(layers.fuse_projections / pack_kernels, the one-device decode layout) cannot be "
            "sharded by heads: shard the stored layout (layers.unpack_kernels, "
            "unfuse_projections)"
        )

    def one(path, leaf):
        spec, _ = spec_for(_path_str(path), leaf.shape, mesh, head_dim=head_dim)
        return NamedSharding(mesh, spec)

    return jax.tree_util.tree_map_with_path(one, params)


def shard_params(params: Any, mesh: Mesh, *, head_dim: int) -> Any:
    """Places params by the rules (a no-op for leaves already placed so).

    For loading, prefer `convert.load_hf.load_hf_params_sharded` / `restore_params`: this one
    transfers from wherever the params are now (host numpy arrays go shard by shard).
    """
    return jax.device_put(params, param_shardings(params, mesh, head_dim=head_dim))


def restore_params(path: str | os.PathLike, abstract: Any, mesh: Mesh, *, head_dim: int) -> Any:
    """Restores an orbax params checkpoint (`convert.convert_checkpoint`'s `params/`) sharded.

    Each device's shard is read straight onto it: the restore target's abstract arrays carry
    the rules' shardings (`ocp.args.StandardRestore`), so no device holds the whole model.

    Args:
      path: the checkpoint directory (`<converted dir>/params`).
      abstract: the abstract params (`griffin_jax.model.abstract_params(cfg, dtype)`).
    """
    import orbax.checkpoint as ocp

    shardings = param_shardings(abstract, mesh, head_dim=head_dim)
    target = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
    )
    with ocp.Checkpointer(ocp.StandardCheckpointHandler()) as checkpointer:
        return checkpointer.restore(os.path.abspath(path), args=ocp.args.StandardRestore(target))


@contextlib.contextmanager
def host_device() -> Iterator[None]:
    """Makes new arrays land in host (CPU) memory rather than on accelerator 0.

    For loaders that build whole arrays (`load_draft`, `.bin` checkpoints) before
    `shard_params` spreads them: the host holds the copy, no accelerator does. A no-op where
    JAX has no CPU backend.
    """
    try:
        cpu = jax.local_devices(backend="cpu")[0]
    except (RuntimeError, ValueError):  # no CPU backend in this process (JAX_PLATFORMS)
        yield
        return
    with jax.default_device(cpu):
        yield


def device_bytes(tree: Any) -> dict[jax.Device, int]:
    """Bytes each device holds of a tree of (sharded) arrays."""
    out: dict[jax.Device, int] = {}
    for leaf in jax.tree.leaves(tree):
        for shard in leaf.addressable_shards:
            out[shard.device] = out.get(shard.device, 0) + shard.data.nbytes
    return out


def per_device_nbytes(params: Any, mesh: MeshLike, *, head_dim: int) -> int:
    """Bytes one device holds of `params` (abstract or not) under the rules (planning)."""
    total = 0
    for spec, leaf in zip(
        (s for s, _ in plan_params(params, mesh, head_dim=head_dim).values()),
        jax.tree.leaves(params),
        strict=True,
    ):
        total += shard_nbytes(leaf.shape, leaf.dtype, spec, mesh)
    return total


def shard_nbytes(shape: Sequence[int], dtype: Any, spec: PartitionSpec, mesh: MeshLike) -> int:
    """Bytes of one device's shard of an array of `shape` placed with `spec` on `mesh`."""
    parts = math.prod(_axis_size(mesh, a) for a in spec if a is not None)
    return math.prod(shape) * np.dtype(dtype).itemsize // parts


# ----------------------------------------------------------------------------- state


def kv_spec(shape: Sequence[int], mesh: MeshLike) -> PartitionSpec:
    """KV buffer [L, B, S, K, H] or [B, S, K, H]: B over data, K over model where they divide.

    K < (or not a multiple of) the model axis: replicated along K (see the module docstring).
    """
    logical = (None,) * (len(shape) - 4) + ("batch", None, "kv_heads", None)
    return _resolve(logical, shape, mesh)[0]


def batch_spec(shape: Sequence[int], mesh: MeshLike) -> PartitionSpec:
    """Leading batch dim over `data` where it divides, everything else whole."""
    return _resolve(("batch",) + (None,) * (len(shape) - 1), shape, mesh)[0]


def _is_kv(path: Sequence[Any], leaf: Any) -> bool:
    # `.k` / `.v` of a cache, or one layer's buffer of a per-layer cache (`.k[i]`)
    names = [str(getattr(p, "name", getattr(p, "key", ""))) for p in path[-2:]]
    return bool(names) and bool({"k", "v"} & set(names)) and leaf.ndim >= 4


def constrain(tree: Any, mesh: Mesh | None) -> Any:
    """Pins a decode state (inside a jit): KV buffers by `kv_spec`, everything else replicated.

    Every `k` / `v` leaf of ndim >= 4 (`KVCache`, `DraftCache`) is a KV buffer. The rest of
    the state (tree, tokens, lengths, flags: a few KB) is replicated, so every host of a
    multi-host mesh can read it and each round compiles to the same in/out shardings. PRNG
    keys are left to propagation. `mesh=None` returns the tree unchanged.
    """
    if mesh is None:
        return tree

    def one(path, leaf):
        if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            return leaf
        spec = kv_spec(leaf.shape, mesh) if _is_kv(path, leaf) else PartitionSpec()
        return jax.lax.with_sharding_constraint(leaf, NamedSharding(mesh, spec))

    return jax.tree_util.tree_map_with_path(one, tree)


def place_inputs(tokens: Any, lengths: Any, rest: Any, mesh: Mesh) -> tuple[Any, Any, Any]:
    """Host inputs onto the mesh: tokens [B, T] and lengths [B] over data, `rest` replicated."""

    def batch(x):
        return jax.device_put(x, NamedSharding(mesh, batch_spec(np.shape(x), mesh)))

    rest = jax.device_put(rest, NamedSharding(mesh, PartitionSpec()))
    return batch(tokens), batch(lengths), rest
