"""The project's own CPU kernels: products against packed kernels (the decode layout's
matmuls there), grouped-query attention over a KV buffer, and a tree level's top-k.

XLA's CPU backend hands a product of a few rows (a decode, a tree verification, a draft
level) to a library that repacks the kernel on every call: for the default pair, 8 rows
of the base's products cost ~1.7x one row, and 60 rows ran at ~60% of the machine's GEMM rate
(README, "Where a round's time goes"). Weights do not change between calls, so the decode
layout stores each kernel packed once (`pack`: [K, N] -> [N / 32, K, 32], each panel of 32
columns contiguous) and `matmul` runs `csrc/packed_matmul.cc` on it as an XLA FFI call: every
weight read once, in order, the panels shared between threads.

Every output element is one f32 sum over K in ascending order, whatever the number of rows,
so a row's logits do not depend on how many rows share the product (a verification row
equals the decode of the same token bit for bit in these products).

On a CPU with AMX (Intel Sapphire Rapids and later; `tiles_ready`), a kernel whose values are
all bf16 numbers (a bf16 checkpoint read as f32: every committed one) is stored as bf16 tiles
instead (`pack`: [N / 16, K / 2, 32]) and runs `csrc/amx_matmul.cc`: each f32 input is split
exactly into three bf16 parts, so every tile product is exact and the sums are f32 ones, an
f32 product to f32 round-off at several times the vector units' rate, reading half the
weight bytes. Rows stay independent there too.

The kernels split large calls between the calling thread and the library's helper threads
(`csrc/chunks.h`), which poll for work for a moment after each call instead of sleeping, as
XLA's pool's threads do (`GRIFFIN_CPU_THREADS=xla` uses XLA's pool). Which is faster depends on
the work around the calls: a program sets it for a piece of itself with `chunks_here` (the
speculative rounds, each kind of round where `speculative.measure_round_costs` found it faster).

`attention` (`csrc/attention.cc`) is every f32 forward's attention on a CPU
(`layers.attention_implementation`): XLA's sliced and transposed the cache's keys and values
into fresh buffers in every layer before two small library products; this reads the buffer in
place up to the last slot a query may attend. A row's output is computed the same way whatever
the other rows, so a verification row equals the decode of the same query bit for bit here too.

The library is compiled from its sources with the machine's C++ compiler (`$CXX`, else `c++` /
`g++`) at first use, for this CPU (`-march=native`), into the user cache, keyed by the source,
the compiler, the XLA FFI headers and the CPU; where none compiles (no compiler), the decode
layout keeps plain kernels and XLA's products, with one warning. `GRIFFIN_CPU_MATMUL=xla`
keeps XLA's products on purpose (`bench_vanilla` / `profile_round` compare the two),
`GRIFFIN_CPU_MATMUL=packed` f32 panels where AMX tiles would be used, and
`GRIFFIN_CPU_MATMUL=amx` insists on tiles (an error on a CPU without AMX).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import pathlib
import platform
import shutil
import subprocess
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

from griffin_jax.cli import user_cache_dir

log = logging.getLogger(__name__)

PANEL = 32  # columns per packed panel
PACKED = "packed_kernel"  # a Dense param dict's packed kernel, in place of "kernel"
TARGET = "griffin_packed_matmul"  # the XLA FFI targets
ATTENTION_TARGET = "griffin_attention"
TOP_K_TARGET = "griffin_top_k_log_softmax"
ARGMAX_TARGET = "griffin_argmax"
TAKE_ROWS_TARGET = "griffin_take_rows"
AMX_TARGET = "griffin_amx_matmul"
CHUNKS_HERE_TARGET = "griffin_chunks_here"
_HANDLERS = {  # FFI target -> the library's handler symbol
    TARGET: "GriffinPackedMatmul",
    ATTENTION_TARGET: "GriffinAttention",
    TOP_K_TARGET: "GriffinTopKLogSoftmax",
    ARGMAX_TARGET: "GriffinArgmax",
    TAKE_ROWS_TARGET: "GriffinTakeRows",
    AMX_TARGET: "GriffinAmxMatmul",
    CHUNKS_HERE_TARGET: "GriffinChunksHere",
}
TILE = 16  # output columns per AMX tile
TILE_STEP = 32  # K values per AMX tile product
_CSRC = pathlib.Path(__file__).parent / "csrc"
SOURCES = tuple(
    _CSRC / n
    for n in ("packed_matmul.cc", "amx_matmul.cc", "attention.cc", "top_k.cc", "take_rows.cc")
)
HEADERS = tuple(_CSRC / n for n in ("chunks.h", "simd.h"))  # in the build's digest
FLAGS = ("-O3", "-march=native", "-ffp-contract=fast", "-std=c++17", "-shared", "-fPIC")


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return name
    return None


def _cpu_id() -> str:
    """What `-march=native` compiles for: the CPU's model and feature flags."""
    try:
        info = pathlib.Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    keep = [ln for ln in info.splitlines() if ln.startswith(("model name", "flags", "Features"))]
    return "\n".join(sorted(set(keep))) or platform.machine()


def _build(compiler: str) -> pathlib.Path:
    """The compiled library's path, compiling it first where the cache has none."""
    include = jax.ffi.include_dir()
    version = subprocess.run(
        [compiler, "--version"], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    digest = hashlib.sha256(
        "\0".join(
            [
                *(src.read_text() for src in (*SOURCES, *HEADERS)),
                version,
                " ".join(FLAGS),
                _cpu_id(),
                jax.__version__,
            ]
        ).encode()
    ).hexdigest()[:16]
    folder = pathlib.Path(os.environ.get("GRIFFIN_CPU_MATMUL_DIR") or user_cache_dir() / "cpu")
    path = folder / f"griffin_kernels-{digest}.so"
    if path.exists():
        return path
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder) as tmp:  # concurrent builders: atomic rename
        out = pathlib.Path(tmp) / path.name
        cmd = [compiler, *FLAGS, "-w", "-I", include, *map(str, SOURCES), "-o", str(out)]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
        os.replace(out, path)
    return path


@functools.cache
def library() -> ctypes.CDLL | None:
    """The kernels' library, built and registered with XLA (None where it cannot be: no
    compiler or a failed build, logged once)."""
    compiler = _compiler()
    if compiler is None:
        log.warning(
            "no C++ compiler found ($CXX, c++, g++, clang++): CPU products and attention use XLA's"
        )
        return None
    try:
        lib = ctypes.cdll.LoadLibrary(str(_build(compiler)))
    except (OSError, RuntimeError, subprocess.SubprocessError) as err:
        log.warning("the project's CPU kernels are unavailable, using XLA's: %s", err)
        return None
    for target, symbol in _HANDLERS.items():
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
    return lib


CHUNK_THREADS = {None: -1, "helpers": 0, "xla": 1}


def set_chunk_threads(choice: str | None) -> None:
    """Where the kernels split their large calls from now on, for every program of this
    process, compiled or not: "helpers" (the library's own threads), "xla" (XLA's intra-op
    pool, as `GRIFFIN_CPU_THREADS=xla`) or None (as that variable says). Each output element
    is the same sum either way, so only the speed changes (`inference.bench_threads` times
    both, call by call in one process). A no-op without the library."""
    if choice not in CHUNK_THREADS:
        raise ValueError(f"chunk threads: expected one of {list(CHUNK_THREADS)}, got {choice!r}")
    lib = library()
    if lib is not None:
        lib.GriffinSetChunkThreads(CHUNK_THREADS[choice])
    _chunk_setting[0] = choice


_chunk_setting: list[str | None] = [None]  # the last `set_chunk_threads` choice


def restore_chunk_threads() -> None:
    """Puts back the last `set_chunk_threads` setting (None: as `GRIFFIN_CPU_THREADS` says)
    after programs that set their own (`chunks_here`)."""
    set_chunk_threads(_chunk_setting[0])


def chunk_threads_now() -> int | None:
    """The setting the kernels read now (`CHUNK_THREADS`' values), None without the library."""
    lib = library()
    return None if lib is None else int(lib.GriffinChunkThreadsNow())


def chunk_choice_applies() -> bool:
    """Whether where the chunks run is this process's to choose, shape by shape
    (`speculative.measure_round_costs(choose_chunks=True)`): the kernels in use here
    (`enabled`), more than one CPU to split over, and `GRIFFIN_CPU_THREADS` unset (a setting
    the user gave is kept)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return not os.environ.get("GRIFFIN_CPU_THREADS") and (cpus or 1) > 1 and enabled()


def chunks_here(choice: jax.Array, x: jax.Array) -> jax.Array:
    """x (int32), after setting where the kernels' chunks go from here on to `choice` (an int32
    scalar: -2 leaves it, else as `CHUNK_THREADS`' values), inside a program: whatever reads
    the result runs after it (a piece of a program, such as a round shape's segment, runs its
    kernels where it was measured faster: `Budget.chunks`). The setting outlasts the program:
    its caller puts it back (`restore_chunk_threads`). x itself where the library is not in
    use. Not marked as having side effects: the result is read, so it runs, and a side effect
    made XLA run the call apart from the thunks around it (~0.4 ms a call here, ~1.6 ms more a
    batch-1 call of the adaptive program)."""
    if not enabled():
        return x
    call = jax.ffi.ffi_call(CHUNKS_HERE_TARGET, jax.ShapeDtypeStruct(x.shape, jnp.int32))
    return call(jnp.asarray(choice, jnp.int32), x)


def _matmul_choice() -> str:
    choice = os.environ.get("GRIFFIN_CPU_MATMUL", "")
    if choice not in ("", "amx", "packed", "xla"):
        raise ValueError(f"GRIFFIN_CPU_MATMUL={choice!r}: expected amx, packed or xla")
    return choice


def enabled() -> bool:
    """Whether the decode layout packs kernels here: on a CPU backend, unless
    `GRIFFIN_CPU_MATMUL=xla`, once the library builds."""
    return _matmul_choice() != "xla" and jax.default_backend() == "cpu" and library() is not None


@functools.cache
def _tiles_granted() -> bool:
    lib = library()
    return lib is not None and lib.GriffinAmxReady() == 1


def tiles_ready() -> bool:
    """Whether `pack` stores bf16-valued kernels as AMX tiles here: `enabled`, the CPU has
    AMX-TILE and AMX-BF16 and Linux grants this process the tile data, unless
    `GRIFFIN_CPU_MATMUL=packed` (f32 panels throughout). `GRIFFIN_CPU_MATMUL=amx` insists:
    a CPU without AMX is then an error."""
    choice = _matmul_choice()
    if choice in ("packed", "xla") or not enabled():
        return False
    if choice == "amx" and not _tiles_granted():
        raise RuntimeError("GRIFFIN_CPU_MATMUL=amx: this CPU or process has no AMX tiles")
    return _tiles_granted()


def configuration() -> str:
    """What sets the kernels' speed here, for caches of measured costs: the CPU (`_cpu_id`),
    the choices of `GRIFFIN_CPU_MATMUL`, `GRIFFIN_ATTENTION`, `GRIFFIN_TOP_K` and
    `GRIFFIN_CPU_THREADS`, and whether the library built and AMX tiles run (a digest)."""
    names = ("GRIFFIN_CPU_MATMUL", "GRIFFIN_ATTENTION", "GRIFFIN_TOP_K", "GRIFFIN_CPU_THREADS")
    choices = "|".join(f"{n}={os.environ.get(n, '')}" for n in names)
    built = library() is not None
    state = f"{_cpu_id()}|{choices}|built={built}|tiles={built and _tiles_granted()}"
    return hashlib.sha256(state.encode()).hexdigest()[:12]


def can_pack(kernel) -> bool:
    """A 2-D f32 kernel whose output width is a whole number of panels."""
    return (
        getattr(kernel, "ndim", 0) == 2
        and kernel.dtype == jnp.float32
        and kernel.shape[1] % PANEL == 0
        and kernel.shape[1] > 0
    )


def bf16_valued(kernel) -> bool:
    """Whether every value of a concrete f32 array is a bf16 number (its low 16 bits 0): the
    weights of a bf16 checkpoint, read as f32."""
    if isinstance(kernel, jax.core.Tracer) or kernel.dtype != jnp.float32:
        return False
    bits = np.asarray(kernel).view(np.uint32)
    return not np.any(bits & np.uint32(0xFFFF))


def can_tile(kernel) -> bool:
    """A `can_pack` kernel `pack` may store as AMX tiles: K a multiple of 32 and bf16 values."""
    return can_pack(kernel) and kernel.shape[0] % TILE_STEP == 0 and bf16_valued(kernel)


def kernel_shape(kernel: jax.Array) -> tuple[int, int]:
    """(K, N) of a kernel, plain [K, N], packed [N / 32, K, 32] or tiled [N / 16, K / 2, 32]."""
    if kernel.ndim == 3:
        p, k, _ = kernel.shape
        return (2 * k, p * TILE) if kernel.dtype == jnp.bfloat16 else (k, p * PANEL)
    k, n = kernel.shape
    return k, n


def pack(kernel: jax.Array) -> jax.Array:
    """A `can_pack` kernel [..., K, N] (leading axes: stacked layers) in the layout `matmul`
    runs: where `tiles_ready` and `can_tile`, bf16 AMX tiles [..., N / 16, K / 2, 32] (tile t,
    pair p: rows 2p and 2p + 1 of columns 16t .. 16t + 15, interleaved); else f32 panels
    [..., N / 32, K, 32]."""
    *lead, k, n = kernel.shape
    if tiles_ready() and can_tile(kernel):
        pairs = jnp.reshape(kernel, (*lead, k // 2, 2, n // TILE, TILE))
        tiles = jnp.moveaxis(pairs, -2, -4)  # [..., N / 16, K / 2, 2, 16]
        return jnp.reshape(
            jnp.swapaxes(tiles, -1, -2), (*lead, n // TILE, k // 2, 2 * TILE)
        ).astype(jnp.bfloat16)
    return jnp.swapaxes(jnp.reshape(kernel, (*lead, k, n // PANEL, PANEL)), -3, -2)


def unpack(packed: jax.Array) -> jax.Array:
    """A packed kernel (`pack`, either layout) -> f32 [..., K, N]."""
    if packed.dtype == jnp.bfloat16:
        *lead, t, k2, _ = packed.shape
        parts = jnp.reshape(packed.astype(jnp.float32), (*lead, t, k2, TILE, 2))
        n = len(lead)  # [..., t, p, n, j] -> [..., p, j, t, n]
        order = (*range(n), n + 1, n + 3, n, n + 2)
        return jnp.reshape(jnp.transpose(parts, order), (*lead, 2 * k2, t * TILE))
    *lead, p, k, _ = packed.shape
    return jnp.reshape(jnp.swapaxes(packed, -3, -2), (*lead, k, p * PANEL))


def matmul(x: jax.Array, packed: jax.Array) -> jax.Array:
    """x [..., K] @ a packed kernel (`pack`) -> f32 [..., N] (the decode layout's product on
    a CPU): `csrc/amx_matmul.cc` for tiles, `csrc/packed_matmul.cc` for panels."""
    if library() is None:
        raise RuntimeError("packed CPU products need the compiled library (cpu_kernels.enabled)")
    k, n = kernel_shape(packed)
    if x.shape[-1] != k:
        raise ValueError(f"x [..., {x.shape[-1]}] against a packed kernel of K = {k}")
    tiled = packed.dtype == jnp.bfloat16
    if tiled and not _tiles_granted():
        raise RuntimeError("an AMX-tiled kernel needs a CPU and process with AMX (tiles_ready)")
    lead = x.shape[:-1]
    rows = jnp.reshape(x.astype(jnp.float32), (-1, k))
    call = jax.ffi.ffi_call(
        AMX_TARGET if tiled else TARGET,
        jax.ShapeDtypeStruct((rows.shape[0], n), jnp.float32),
        vmap_method="sequential",  # under vmap: one call per element (the forwards do not vmap)
    )
    out = call(rows, packed if tiled else packed.astype(jnp.float32))
    return jnp.reshape(out, (*lead, n))


def on_one_cpu(backend: str | None = None) -> bool:
    """Whether the kernels below run here: a CPU backend (`backend`, default JAX's) with one
    device (a call would gather sharded operands) and the library built."""
    backend = backend or jax.default_backend()
    return backend == "cpu" and jax.device_count() == 1 and library() is not None


def can_attend(q: jax.Array, k: jax.Array) -> bool:
    """Whether `attention` takes these: f32 queries and keys and a head dim of whole 16-float
    vectors (where `on_one_cpu`)."""
    return q.dtype == jnp.float32 and k.dtype == jnp.float32 and q.shape[-1] % 16 == 0


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """Grouped-query attention on a CPU (`csrc/attention.cc`; `can_attend` inputs).

    Args:
      q: [B, T, N, H] f32 queries (RoPE applied).
      k, v: [B, S, K, H] f32 keys / values (N % K == 0): the whole buffer, read in place up to
        the last slot any of a KV head's queries may attend.
      mask: [B, T, S] bool, True = may attend.
    Returns:
      [B, T, N, H] f32: softmax(q k^T / sqrt(H)) v over each query's visible slots (scores and
      sums in f32; 0 for a query that may attend nothing).
    """
    if library() is None:
        raise RuntimeError("CPU attention needs the compiled library (cpu_kernels.on_one_cpu)")
    b, t, n, h = q.shape
    if k.shape[0] != b or k.shape[3] != h or n % k.shape[2] or v.shape != k.shape:
        raise ValueError(f"q {q.shape} against k {k.shape}, v {v.shape}")
    if mask.shape != (b, t, k.shape[1]):
        raise ValueError(f"mask {mask.shape}: expected {(b, t, k.shape[1])}")
    call = jax.ffi.ffi_call(
        ATTENTION_TARGET,
        jax.ShapeDtypeStruct(q.shape, jnp.float32),
        vmap_method="sequential",
    )
    return call(q, k, v, mask.astype(jnp.bool_), scale=np.float32(1.0 / np.sqrt(h)))


def take_rows(table: jax.Array, ids: jax.Array) -> jax.Array:
    """`jnp.take(table, ids, axis=0)` (an embedding lookup: ids [...] -> [..., D]). On one CPU
    device with the library built and an f32 table, a copy of the rows on the calling thread
    (`csrc/take_rows.cc`: XLA split a few-row lookup between its pool's threads and waited
    for one to wake); elsewhere `jnp.take`. The same values either way, NaN rows for ids
    outside [-V, V); differentiable in `table` as `jnp.take` is (its tangent is `jnp.take`'s)."""
    if table.dtype != jnp.float32 or table.ndim != 2 or not on_one_cpu():
        return jnp.take(table, ids, axis=0)
    return _take_rows(table, ids.astype(jnp.int32))


@jax.custom_jvp
def _take_rows(table: jax.Array, ids: jax.Array) -> jax.Array:
    flat = jnp.reshape(ids, (-1,))
    call = jax.ffi.ffi_call(
        TAKE_ROWS_TARGET,
        jax.ShapeDtypeStruct((flat.shape[0], table.shape[1]), jnp.float32),
        vmap_method="sequential",
    )
    return jnp.reshape(call(table, flat), (*ids.shape, table.shape[1]))


@_take_rows.defjvp
def _take_rows_jvp(primals, tangents):
    table, ids = primals
    return _take_rows(table, ids), jnp.take(tangents[0], ids, axis=0)


def _selects_here(logits: jax.Array) -> bool:
    """Whether `top_log_probs` / `argmax` run their kernels: f32 logits on one CPU device with
    the library built, unless `GRIFFIN_TOP_K=xla`."""
    choice = os.environ.get("GRIFFIN_TOP_K", "")
    if choice not in ("", "cpu", "xla"):
        raise ValueError(f"GRIFFIN_TOP_K={choice!r}: expected cpu or xla")
    return choice != "xla" and logits.dtype == jnp.float32 and on_one_cpu()


def argmax(logits: jax.Array) -> jax.Array | None:
    """int32 [...]: the first index of each row's maximum over the last axis of f32 logits
    (`csrc/top_k.cc`'s "griffin_argmax"; NaNs never win, a row of NaNs gives V - 1), or None
    where the kernel does not run here (`_selects_here`): the caller computes it with XLA."""
    if not _selects_here(logits) or logits.shape[-1] < 1:
        return None
    *lead, v = logits.shape
    rows = jnp.reshape(logits, (-1, v))
    call = jax.ffi.ffi_call(
        ARGMAX_TARGET,
        jax.ShapeDtypeStruct((rows.shape[0],), jnp.int32),
        vmap_method="sequential",
    )
    return jnp.reshape(call(rows), lead)


def top_log_probs(logits: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """The k largest of `jax.nn.log_softmax(logits)` along the last axis and their indices
    (descending, ties to the smaller index, as `jax.lax.top_k`): a draft tree level's children.

    On one CPU device with the library built (`GRIFFIN_TOP_K=xla` declines it), one kernel
    (`csrc/top_k.cc`): the row's max, its sum of e^(x - max) and the k largest in three passes,
    the values (x - max) - log(sum) as `log_softmax` orders them. Its e^x is not XLA's, so a
    value may differ from XLA's by an ulp or so, and two logits that XLA's log-probabilities
    round to one value keep their logits' order here. Elsewhere XLA's `log_softmax` and
    `top_k`.
    """
    logits = logits.astype(jnp.float32)
    if not _selects_here(logits) or logits.shape[-1] < k:
        return jax.lax.top_k(jax.nn.log_softmax(logits, axis=-1), k)
    *lead, v = logits.shape
    rows = jnp.reshape(logits, (-1, v))
    call = jax.ffi.ffi_call(
        TOP_K_TARGET,
        (
            jax.ShapeDtypeStruct((rows.shape[0], k), jnp.float32),
            jax.ShapeDtypeStruct((rows.shape[0], k), jnp.int32),
        ),
        vmap_method="sequential",
    )
    values, indices = call(rows, k=np.int64(k))
    return jnp.reshape(values, (*lead, k)), jnp.reshape(indices, (*lead, k))
