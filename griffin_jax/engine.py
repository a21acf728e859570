"""Continuous batching of speculative decoding: request slots, admission between rounds.

`Engine` keeps one speculative state (`speculative.SpecState`) of `max_batch` rows. Busy rows are
packed at the front; a round runs the compiled program of the smallest batch bucket (1, 2, 4,
..., max_batch) that holds them, so one lone request decodes at batch-1 cost. Between rounds:
- a finished or cancelled request frees its row: the last busy row moves into it;
- a waiting request is admitted into the first free row: a batch-1 prefill (base, first token,
  draft trunk) is written into that row of every cache and buffer; no other row is touched.
Settings are per row and traced (temperature, top-p, top-k, seed, max_new_tokens, stop ids): a
greedy row and a sampled row share a round and nothing recompiles. Sampling is position-keyed
(`sampling.py`), so a request's tokens do not depend on what else is in the batch.

Attention reads only the occupied slots of the caches (`layers.gqa_attention`: the CPU kernel
reads up to the last attended slot, other paths pick one of a few windows inside each
program), so short requests do not pay for `max_model_len`. The
compiled programs are bounded: prefill per prompt-length bucket, the rounds per (batch bucket,
round shape, greedy or mixed), one row move. With several round shapes (the adaptive budget) a
shape first asked for is compiled in a background thread while the rounds run a compiled one
(`_RoundPrograms`), so the policy reaching for a new shape never stalls the rows. The engine
knows no HTTP; `inference/serve.py` is the web layer. It is driven by `step()` (one admission
pass and one segment of rounds), by a background thread (`start` / `stop`), or by
`run_until_idle`.

With a mesh (`data=1,model=N`: tensor parallel) the params are placed by the sharding rules
and every program pins the state as sharded decoding does (`sharding.constrain`: KV buffers
over the model axis, the rest replicated); rows are not split over devices, since a batch
bucket may be a single row.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import itertools
import logging
import pathlib
import threading
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from griffin_jax import budget as budget_lib
from griffin_jax import checks, sharding, speculative, vanilla
from griffin_jax.config import ModelConfig, TreeConfig
from griffin_jax.draft import DraftConfig

log = logging.getLogger(__name__)

# The serving loop's time per round beyond the measured device cost of the round's shape
# (`Engine.round_overhead_ms`) is a running mean: each segment's sample weighs this much.
OVERHEAD_WEIGHT = 0.1


class QueueFull(RuntimeError):
    """The waiting queue holds `max_queue` requests already."""


class EngineDead(RuntimeError):
    """The engine stopped or failed to start; nothing more is admitted."""


@dataclasses.dataclass(frozen=True)
class Request:
    """One generation: token ids in, up to `max_new_tokens` new ids out."""

    prompt: tuple[int, ...]
    max_new_tokens: int
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    stop_ids: tuple[int, ...] | None = None  # None = the model's EOS ids


@dataclasses.dataclass
class Update:
    """What a request's callback receives after a round that touched it."""

    tokens: list[int]  # new ids since the last update (a stop id included)
    finish_reason: str | None = None  # "stop" | "length" | "cancelled" | "error" | None
    rounds: int = 0  # verification rounds so far
    accepted: int = 0  # draft tokens accepted so far (emitted = 1 + rounds + accepted)
    error: str | None = None


Callback = Callable[[Update], None]


@dataclasses.dataclass
class _Slot:
    rid: int
    request: Request
    callback: Callback
    sent: int = 0  # tokens delivered
    cancelled: bool = False


@dataclasses.dataclass
class _Chunked:
    """A long prompt being prefilled a chunk per step (`Engine(prefill_chunk=...)`)."""

    slot: _Slot
    prefix: speculative.Prefix | None = None  # caches of the chunks written so far
    written: int = 0  # prompt tokens in them


def _buckets(max_batch: int) -> tuple[int, ...]:
    sizes = [1 << i for i in range(max_batch.bit_length()) if (1 << i) < max_batch]
    return (*sizes, max_batch)


# ----------------------------------------------------------------------------- row programs


def _map_rows(f, state: speculative.SpecState, *more: speculative.SpecState, scalars: int = 0):
    """Applies f(x, *ys, axis=batch axis) to every batched leaf of the state(s); the batch-wide
    scalars (the budget's streak, step and choice) are those of `(state, *more)[scalars]`."""
    axis = 0 if state.cache.per_layer else 1
    pick = (state, *more)[scalars]

    def kv(s):
        return (s.cache.k, s.cache.v)

    def strip(s):
        return s.replace(cache=s.cache.replace(k=None, v=None))

    k, v = jax.tree.map(lambda x, *ys: f(x, *ys, axis=axis), kv(state), *map(kv, more))
    rest = jax.tree.map(
        lambda x, *ys: x if x.ndim == 0 else f(x, *ys, axis=0), strip(state), *map(strip, more)
    )
    rest = rest.replace(
        plain_streak=pick.plain_streak, probe_wait=pick.probe_wait, step=pick.step,
        next_shape=pick.next_shape,
    )  # fmt: skip
    return rest.replace(cache=rest.cache.replace(k=k, v=v))


@functools.partial(
    jax.jit,
    static_argnames=("cfg", "dcfg", "greedy", "shapes", "mesh"),
    donate_argnames=("state",),
)
def _admit(
    state, base_params, draft_params, tokens, lengths, knobs, seeds, budget, draft_head, row,
    prefix, *, cfg, dcfg, greedy, shapes, mesh,
):  # fmt: skip
    """A batch-1 prefill (of the prompt, or of its last part after `prefix`) written into row
    `row` of the engine state."""
    one = speculative.prefill(
        base_params, draft_params, tokens, lengths, knobs, seeds, budget, draft_head,
        cfg=cfg, dcfg=dcfg, greedy=greedy, shapes=shapes, mesh=mesh, prefix=prefix,
    )  # fmt: skip
    state = _map_rows(
        lambda x, y, axis: jax.lax.dynamic_update_slice_in_dim(x, y, row, axis), state, one,
    )  # fmt: skip
    # Into an empty batch (busy rows are packed: row 0), the row's first round is the shape its
    # own prefill chose, not the choice an empty batch last made (plain: nothing was running);
    # joining running rows it takes the batch's next choice, as they do.
    state = state.replace(next_shape=jnp.where(row == 0, one.next_shape, state.next_shape))
    return sharding.constrain(state, mesh)


@functools.partial(
    jax.jit, static_argnames=("cfg", "dcfg", "shapes", "mesh"), donate_argnames=("prefix",)
)
def _prefill_chunk(prefix, base_params, draft_params, tokens, next_tokens, *, cfg, dcfg, shapes,
                   mesh):  # fmt: skip
    """One chunk of a long prompt into a batch-1 prefix (`speculative.prefill_chunk`)."""
    return speculative.prefill_chunk(
        base_params, draft_params, prefix, tokens, next_tokens, cfg=cfg, dcfg=dcfg,
        shapes=shapes, mesh=mesh,
    )  # fmt: skip


@functools.partial(jax.jit, static_argnames=("mesh",), donate_argnames=("state",))
def _move_row(state, src, dst, *, mesh):
    """Row `src` copied into row `dst`; row `src` is then idle (done)."""

    def move(x, axis):
        return jax.lax.dynamic_update_slice_in_dim(
            x, jax.lax.dynamic_slice_in_dim(x, src, 1, axis), dst, axis
        )

    state = _map_rows(move, state)
    return sharding.constrain(state.replace(done=state.done.at[src].set(True)), mesh)


@functools.partial(
    jax.jit,
    static_argnames=("rows", "index", "cfg", "dcfg", "greedy", "shapes", "mesh"),
    donate_argnames=("state",),
)
def _segment(
    state, base_params, draft_params, knobs, budget, draft_head, limit,
    *, rows, index, cfg, dcfg, greedy, shapes, mesh,
):  # fmt: skip
    """Rounds of shape `index` over the first `rows` rows (`speculative.run_segment`)."""
    whole = rows == state.done.shape[0]
    sub = (
        state
        if whole
        else _map_rows(lambda x, axis: jax.lax.slice_in_dim(x, 0, rows, axis=axis), state)
    )
    sub = sub.replace(next_shape=jnp.int32(index))  # the host's pick may predate an admission
    sub = speculative.run_segment(
        sub, base_params, draft_params, knobs, budget, draft_head, limit,
        index=index, cfg=cfg, dcfg=dcfg, greedy=greedy, shapes=shapes, mesh=mesh,
    )  # fmt: skip
    if whole:
        return sub
    state = _map_rows(
        lambda x, y, axis: jax.lax.dynamic_update_slice_in_dim(x, y, 0, axis),
        state,
        sub,
        scalars=1,
    )
    return sharding.constrain(state, mesh)


def _abstract(tree):
    """What lowering needs of the arrays in `tree`: shape, dtype and, where the array is
    committed to devices, its sharding (an uncommitted array's sharding would make another
    program than the one a call with it compiles). The arrays themselves may be donated before
    a background compile reads them."""

    def spec(x):
        if not isinstance(x, jax.Array):
            return x
        sharding = x.sharding if x.committed else None
        weak = getattr(x, "weak_type", False)
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding, weak_type=weak)

    return jax.tree.map(spec, tree)


class _RoundPrograms:
    """Which round programs (`_segment`) this engine has compiled: one per (batch bucket,
    greedy or mixed, stop-id width, round shape), at first use.

    With one round shape a round waits for its program, as any first use does. With several
    (`--tree auto`, four shapes) only a (bucket, mode)'s first program is compiled in
    the round's way: a shape the policy asks for later is compiled in a background thread
    (`jit(...).lower(...).compile()`, which fills the jit cache the rounds call) while the
    rounds run the compiled shape nearest to it in drafted levels, and is used from the first
    round after it is ready. Every shape commits what the base would decode, so the substitute
    changes the speed of those rounds, never their tokens; what it saves is a compile stall
    (seconds on a CPU) each time the policy first reaches for another shape. Background
    compiles run one at a time.
    """

    def __init__(self, shapes: tuple[budget_lib.Shape, ...]):
        self.shapes = shapes
        self.background = len(shapes) > 1
        self._ready: set[tuple] = set()
        self._pending: set[tuple] = set()
        self._failed: set[tuple] = set()
        self._lock = threading.Lock()
        self._one_at_a_time = threading.Lock()
        self._idle = threading.Condition(self._lock)

    def __len__(self) -> int:
        return len(self._ready)

    @staticmethod
    def _rest(args: tuple, static: dict) -> tuple:
        """A program's key but for its round shape."""
        return (static["rows"], static["greedy"], args[3].eos_ids.shape)

    def pick(self, want: int, args: tuple, static: dict) -> int:
        """The shape index to run now for the policy's `want` (it, or a compiled substitute
        while `want` compiles in the background)."""
        rest = self._rest(args, static)
        key = (*rest, want)
        with self._lock:
            ready = [i for i in range(len(self.shapes)) if (*rest, i) in self._ready]
            if want in ready:
                return want
            retry = key in self._failed  # then compiled in the round: its error fails the round
            self._failed.discard(key)
            if self.background and ready and not retry:
                if key not in self._pending:
                    self._pending.add(key)
                    threading.Thread(
                        target=self._compile_later, args=(key, _abstract(args), static, want),
                        name="griffin-compile", daemon=True,
                    ).start()  # fmt: skip
                lv = budget_lib.levels(self.shapes[want])
                return min(ready, key=lambda i: abs(budget_lib.levels(self.shapes[i]) - lv))
            self._ready.add(key)  # compiled by the call the round makes now
        return want

    def compile_now(self, args: tuple, static: dict, index: int) -> bool:
        """Compiles one program ahead of its first round (`Engine.warm_up`); False if it was
        compiled already."""
        rest = self._rest(args, static)
        with self._lock:
            if (*rest, index) in self._ready:
                return False
        _segment.lower(*_abstract(args), index=index, **static).compile()
        with self._lock:
            self._ready.add((*rest, index))
        return True

    def _compile_later(self, key: tuple, args: tuple, static: dict, index: int) -> None:
        try:
            with self._one_at_a_time:
                program = _segment.lower(*args, index=index, **static).compile()
        except Exception as err:  # noqa: BLE001 - the round that next wants it compiles it
            log.error("background compile of round shape %s failed: %s: %s",
                      budget_lib.describe(self.shapes[index]), type(err).__name__, err)  # fmt: skip
            program = None
        with self._lock:
            self._pending.discard(key)
            (self._failed if program is None else self._ready).add(key)
            self._idle.notify_all()

    def compiling(self) -> bool:
        """Whether a background compile is queued or running."""
        with self._lock:
            return bool(self._pending)

    def wait(self, timeout: float | None = None) -> bool:
        """Blocks until no background compile is queued or running; False on timeout."""
        with self._lock:
            return self._idle.wait_for(lambda: not self._pending, timeout)


# ----------------------------------------------------------------------------- the engine


# XLA's CPU backend maps ~1,100-1,200 memory regions per compiled round program of the default
# pair (measured over the 4 round programs of --max-batch 8: 1,116 per program at a 200-token
# --max-model-len, 1,157 at 1,024, 1,192 at 2,048, the attention windows included); Linux caps
# a process at vm.max_map_count (65,530 by default), past which compiling fails with "Cannot
# allocate memory" and the process dies.
MAPS_PER_PROGRAM = 1200
MAPS_BASE = 8000  # the process before any program (interpreter, libraries, params)


def compile_room(programs: int, limit: int | None = None) -> str | None:
    """Why `programs` compiled programs may not fit in this process (None when they do, or
    off the CPU backend or off Linux, where the limit is not known). `limit` defaults to
    /proc/sys/vm/max_map_count."""
    if jax.default_backend() != "cpu":
        return None
    if limit is None:
        try:
            limit = int(pathlib.Path("/proc/sys/vm/max_map_count").read_text())
        except (OSError, ValueError):
            return None
    need = MAPS_BASE + programs * MAPS_PER_PROGRAM
    if need <= limit:
        return None
    return (
        f"{programs} compiled programs need ~{need:,} memory maps on the CPU backend, over "
        f"vm.max_map_count = {limit:,}: raise it (`sysctl -w vm.max_map_count={2 * need}`), "
        "or compile fewer programs (a fixed tree instead of auto, a smaller --max-batch or "
        "--max-model-len)"
    )


def check_prefill_chunk(size: int, name: str = "prefill_chunk") -> None:
    """Refuses a chunk size the engine cannot use: 0 (off) or at least 16 tokens."""
    if size != 0 and size < 16:
        raise checks.InputError(f"{name} must be 0 (off) or >= 16, got {size}")


def check_mesh(mesh: jax.sharding.Mesh | None) -> None:
    """Refuses a mesh the engine cannot run on: it shards the model only (tensor parallel),
    never the rows, since a batch bucket may be one row."""
    if mesh is not None and dict(mesh.shape).get("data", 1) != 1:
        raise checks.InputError(
            f"mesh {dict(mesh.shape)}: the engine shards the model only (tensor parallel); "
            "use data=1 and raise the batch size for more requests"
        )


class Engine:
    """Continuous batching over one base + draft pair (see the module docstring).

    Args:
      tree: one tree, a `budget.Budget` (the adaptive budget, same costs at every batch size),
        or a function batch -> Budget (costs measured per batch bucket). A budget of the plain
        shape alone (`speculate=False`) decodes without drafting: the baseline.
      max_batch: rows decoding together.
      max_model_len: prompt + new tokens of one request, at most (default: the base's
        max_position_embeddings).
      max_queue: waiting requests beyond which `submit` raises `QueueFull`.
      eos_ids: default stop ids (a request may give its own).
      rounds_per_step: verification rounds per `step`, at most (between admissions,
        deliveries and cancellations; a segment also ends early when every row is done).
      mesh: tensor parallel over this mesh (its `data` axis must be 1); params not yet placed
        by the sharding rules are placed here.
      prefill_chunk: a prompt longer than this many tokens is prefilled this many tokens per
        step, between the other rows' rounds, so its admission delays them by one chunk's
        forward per step instead of the whole prompt's (0: every prompt in one forward). One
        long prompt is prefilled at a time; requests queued behind it wait their turn.
    """

    def __init__(
        self,
        base_params,
        cfg: ModelConfig,
        draft_params,
        dcfg: DraftConfig,
        *,
        tree: TreeConfig | budget_lib.Budget | Callable[[int], budget_lib.Budget],
        max_batch: int = 8,
        max_model_len: int | None = None,
        max_queue: int = 256,
        eos_ids: Sequence[int] | None = None,
        draft_head: speculative.DraftHead | None = None,
        speculate: bool = True,
        rounds_per_step: int = 4,
        mesh: jax.sharding.Mesh | None = None,
        prefill_chunk: int = 0,
    ):
        if max_batch < 1 or max_queue < 0 or rounds_per_step < 1:
            raise ValueError(
                f"max_batch ({max_batch}) and rounds_per_step ({rounds_per_step}) must be >= 1, "
                f"max_queue ({max_queue}) >= 0"
            )
        check_prefill_chunk(prefill_chunk)
        self.prefill_chunk = int(prefill_chunk)
        self._chunked: _Chunked | None = None
        check_mesh(mesh)
        self.cfg, self.dcfg, self.mesh = cfg, dcfg, mesh
        if mesh is not None:
            base_params = sharding.shard_params(base_params, mesh, head_dim=cfg.head_dim)
            draft_params = sharding.shard_params(draft_params, mesh, head_dim=dcfg.head_dim)
            if draft_head is not None:
                draft_head = jax.device_put(draft_head, NamedSharding(mesh, P()))
        self.base_params, self.draft_params = base_params, draft_params
        self.draft_head = draft_head
        self.max_batch, self.max_queue, self.rounds_per_step = max_batch, max_queue, rounds_per_step
        limit = cfg.max_position_embeddings
        self.max_model_len = limit if max_model_len is None else int(max_model_len)
        if not 2 <= self.max_model_len <= limit:
            raise ValueError(
                f"max_model_len {self.max_model_len} must be in [2, {limit}] (the base's "
                "max_position_embeddings)"
            )
        self.eos_ids = tuple(cfg.eos_token_ids if eos_ids is None else eos_ids)
        vocab = speculative.draft_vocab_size(cfg, dcfg, draft_head)
        self.buckets = _buckets(max_batch)
        if not speculate:
            budgets = {b: budget_lib.make_budget([None]) for b in self.buckets}
        elif callable(tree) and not isinstance(tree, budget_lib.Budget):
            budgets = {b: tree(b) for b in self.buckets}
        else:
            budgets = dict.fromkeys(self.buckets, tree)
        # Every round here runs in the adaptive program: a probe adds no call of its own.
        self.budgets = {
            b: speculative.prepare_budget(t, vocab_size=vocab).replace(probe_call=np.float32(0))
            for b, t in budgets.items()
        }
        shapes_all = self.budgets[max_batch].shapes
        if any(self.budgets[b].shapes != shapes_all for b in self.buckets):
            raise ValueError("every batch bucket's budget must have the same round shapes")
        self.shapes = shapes_all
        self.speculate = any(s is not None for s in shapes_all)
        # Each bucket's measured device costs (ms a round of each shape), and what the serving
        # loop adds to every round on top of them, learnt as it runs (`_learn_overhead`).
        self._device_costs = {b: np.asarray(t.costs, np.float64) for b, t in self.budgets.items()}
        self.round_overhead_ms = dict.fromkeys(self.buckets, 0.0)
        # Verification rounds run so far, by round shape (`budget.describe`: "none" = plain).
        self.rounds_by_shape = dict.fromkeys(map(budget_lib.describe, shapes_all), 0)
        # A row holds prompt + new tokens <= max_model_len, plus what a round writes past them.
        self._shapes = speculative.plan_shapes(
            [1] * max_batch, self.max_model_len, shapes_all, prompt_bucket=0
        )
        self._e = len(self.eos_ids)  # stop-id slots per row (grown by a request that needs more)
        self._lock = threading.Condition()
        self._queue: collections.deque[_Slot] = collections.deque()
        self._slots: list[_Slot] = []  # busy rows, packed: row i holds _slots[i]
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.dead: str | None = None  # why the engine stopped serving, once it has
        self._programs = _RoundPrograms(shapes_all)
        # What finished requests taught the adaptive budget: a fresh row's prior.
        adaptive = len(shapes_all) > 1
        self.history = budget_lib.History.for_shapes(shapes_all) if adaptive else None
        self._reset_state()

    # ------------------------------------------------------------------ requests

    def check(self, request: Request) -> Request:
        """Validates a request (`ValueError` naming the field); returns it normalised."""
        prompt = checks.token_ids([list(request.prompt)], vocab_size=self.cfg.vocab_size)[0]
        checks.sampling(request.temperature, request.top_p, request.top_k)
        max_new = checks.max_new_tokens(request.max_new_tokens)
        checks.seeds(request.seed, 1)
        if len(prompt) + max_new > self.max_model_len:
            raise ValueError(
                f"prompt ({len(prompt)} tokens) + max_new_tokens ({max_new}) exceeds "
                f"max_model_len {self.max_model_len}"
            )
        stop = self.eos_ids if request.stop_ids is None else tuple(request.stop_ids)
        checks.token_ids([list(stop)] if stop else [[0]], vocab_size=self.cfg.vocab_size)
        return dataclasses.replace(request, prompt=tuple(prompt), stop_ids=stop)

    def submit(self, request: Request, callback: Callback) -> int:
        """Queues a request (checked first); returns its id. `callback` is called from the
        engine's thread with each `Update`, the last one with a finish_reason."""
        request = self.check(request)
        with self._lock:
            if self.dead is not None or self._stopping:
                raise EngineDead(self.dead or "the engine is stopping")
            if len(self._queue) >= self.max_queue:
                raise QueueFull(f"{len(self._queue)} requests are waiting (max_queue)")
            slot = _Slot(next(self._ids), request, callback)
            self._queue.append(slot)
            self._lock.notify_all()
        return slot.rid

    def cancel(self, rid: int) -> None:
        """Ends a request (the client went away): its row is freed at the next step."""
        with self._lock:
            for slot in self._open_slots():
                if slot.rid == rid:
                    slot.cancelled = True
            self._lock.notify_all()

    @property
    def queue_length(self) -> int:
        return len(self._queue)

    @property
    def busy(self) -> int:
        return len(self._slots)

    @property
    def round_programs(self) -> int:
        """Round programs compiled for this engine so far (see `_RoundPrograms`)."""
        return len(self._programs)

    def wait_for_compiles(self, timeout: float | None = None) -> bool:
        """Blocks until no round program is compiling in the background; False on timeout."""
        return self._programs.wait(timeout)

    def _warm_up_plan(self, sampled: bool) -> tuple[list[tuple], list[int]]:
        """(rows, greedy) of every round program set, and every prompt bucket."""
        modes = (True, None) if sampled else (True,)
        rounds = list(itertools.product(self.buckets, modes))
        longest = min(self.prefill_chunk or self.max_model_len, self.max_model_len - 1)
        buckets = {min(vanilla.prompt_bucket(t), self._shapes.capacity)
                   for t in range(1, longest + 1)}  # fmt: skip
        return rounds, sorted(buckets)

    def program_count(self, *, sampled: bool = True) -> int:
        """The programs `warm_up(sampled=...)` compiles: all that serving may ever compile
        (but for chunked prefill and extra stop ids)."""
        rounds, buckets = self._warm_up_plan(sampled)
        return len(rounds) * len(self.shapes) + len(buckets) + 1

    def warm_up(self, *, sampled: bool = True) -> int:
        """Compiles, before any request, the programs requests would otherwise compile at
        first use (each a stall of the running rows: seconds on a CPU): the rounds of every
        batch bucket x round shape, greedy and (with `sampled`) mixed; the
        admission prefill of every prompt bucket; the row move. Not the chunked-prefill
        programs, nor programs for more stop ids than the engine's default. Call it before
        `start`. Returns the number of programs compiled."""
        n = 0
        rounds, buckets = self._warm_up_plan(sampled)
        for rows, greedy in rounds:
            args, static = self._round_call(rows, greedy)
            for index in range(len(self.shapes)):
                n += self._programs.compile_now(args, static, index)
        for bucket in buckets:
            tokens = jnp.zeros((1, bucket), jnp.int32)
            args = (
                self._state, self.base_params, self.draft_params, tokens,
                jnp.ones((1,), jnp.int32), self._knobs(slice(0, 1)), jnp.zeros((1,), jnp.uint32),
                self.budgets[1], self.draft_head, jnp.int32(0), None,
            )  # fmt: skip
            _admit.lower(
                *_abstract(args), cfg=self.cfg, dcfg=self.dcfg, greedy=None, mesh=self.mesh,
                shapes=dataclasses.replace(self._shapes, batch=1, prompt_bucket=bucket),
            ).compile()  # fmt: skip
            n += 1
        row = jnp.int32(0)
        _move_row.lower(*_abstract((self._state, row, row)), mesh=self.mesh).compile()
        return n + 1

    def forget_history(self) -> None:
        """Forgets what finished requests taught the adaptive budget (`budget.History`), e.g.
        after a warm-up request whose made-up prompt says nothing of the draft's acceptance."""
        with self._lock:
            if self.history is not None:
                self.history = budget_lib.History.for_shapes(self.shapes)

    def idle(self) -> bool:
        return not self._queue and not self._slots and self._chunked is None

    def _open_slots(self) -> list[_Slot]:
        """Every request not yet ended: queued, being prefilled in chunks, decoding."""
        chunked = [] if self._chunked is None else [self._chunked.slot]
        return [*self._queue, *chunked, *self._slots]

    def _rows_taken(self) -> int:
        """Busy rows plus the one a long prompt being prefilled will take."""
        return len(self._slots) + (self._chunked is not None)

    # ------------------------------------------------------------------ the loop

    def step(self) -> None:
        """Frees ended rows, admits waiting requests, runs one segment of rounds, delivers."""
        begun = time.perf_counter()
        # The loop's time since the last step, if that step left rows decoding (else idle).
        between = 0.0 if self._step_ended is None else begun - self._step_ended
        with self._lock:
            self._free_cancelled()
            if self._chunked is not None and self._chunked.slot.cancelled:
                self._finish(self._chunked.slot, "cancelled")
                self._chunked = None
            admit = []
            while self._queue and self._rows_taken() + len(admit) < self.max_batch:
                slot = self._queue[0]
                long = 0 < self.prefill_chunk < len(slot.request.prompt)
                if long and self._chunked is not None and not slot.cancelled:
                    break  # one long prompt at a time, in arrival order
                self._queue.popleft()
                if slot.cancelled:
                    self._finish(slot, "cancelled")
                elif long:
                    self._chunked = _Chunked(slot)
                else:
                    admit.append(slot)
        try:
            admitting = bool(admit) or self._chunked is not None
            if self._chunked is not None:
                self._prefill_next_chunk()
            for slot in admit:
                self._admit_one(slot)
            if admitting:  # their device work is the admission's, not the rounds' (timed)
                jax.block_until_ready(self._state)
                if self._chunked is not None:
                    jax.block_until_ready(self._chunked.prefix)
                if admit:  # a row admitted into an empty batch brought its own choice (`_admit`)
                    self._next_shape = int(self._state.next_shape)
            started, ran = time.perf_counter(), None
            if any(not s.cancelled for s in self._slots) and not self._all_done():
                ran = self._run_rounds()
            rounds = self._deliver()
            if ran is not None:
                self.rounds_by_shape[budget_lib.describe(self.shapes[ran[1]])] += rounds
                self._learn_overhead(*ran, rounds, between + time.perf_counter() - started)
            # `_deliver` freed every row that ended: the rows left are decoding unless cancelled
            busy = any(not s.cancelled for s in self._slots)
            self._step_ended = time.perf_counter() if busy else None
        except Exception as err:  # a failed round fails its requests, the engine goes on
            log.error("round failed: %s: %s", type(err).__name__, err)
            failed = [*self._slots, *(s for s in admit if s not in self._slots)]
            if self._chunked is not None and self._chunked.slot not in failed:
                failed.append(self._chunked.slot)
            self._slots, self._chunked = [], None
            for slot in failed:
                self._finish(slot, "error", error=f"{type(err).__name__}: {err}")
            self._reset_state()

    def run_until_idle(self) -> None:
        while not self.idle():
            self.step()

    def start(self) -> None:
        """Runs `step` in a background thread until `stop`."""
        self._thread = threading.Thread(target=self._loop, name="griffin-engine", daemon=True)
        self._thread.start()

    def stop(self, *, drain: bool = True, timeout: float | None = None) -> None:
        """Stops admitting; finishes (drain) or cancels what is queued and running; joins."""
        with self._lock:
            self._stopping = True
            if not drain:
                for slot in self._open_slots():
                    slot.cancelled = True
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def _loop(self) -> None:
        try:
            while True:
                with self._lock:
                    while self.idle() and not self._stopping:
                        self._lock.wait()
                    if self.idle() and self._stopping:
                        return
                self.step()
        except BaseException as err:  # noqa: BLE001 - reported through `dead`
            self.dead = f"{type(err).__name__}: {err}"
            log.error("engine stopped: %s", self.dead)
            raise

    # ------------------------------------------------------------------ internals

    def _reset_state(self) -> None:
        """A fresh state of idle rows (at start, and after a failed round)."""
        b = self.max_batch
        self._host = dict(
            temperature=np.zeros(b, np.float32), top_p=np.ones(b, np.float32),
            top_k=np.zeros(b, np.int32), max_new=np.ones(b, np.int32),
            eos=np.full((b, self._e), -1, np.int32),
        )  # fmt: skip
        tokens = jnp.zeros((b, 16), jnp.int32)
        lengths = jnp.ones((b,), jnp.int32)
        knobs = self._knobs(slice(0, b))
        seeds = jnp.zeros((b,), jnp.uint32)
        shapes = dataclasses.replace(self._shapes, prompt_bucket=16)
        state = speculative.prefill(
            self.base_params, self.draft_params, tokens, lengths, knobs, seeds,
            self.budgets[b], self.draft_head, cfg=self.cfg, dcfg=self.dcfg, greedy=True,
            shapes=shapes, mesh=self.mesh,
        )  # fmt: skip
        self._state = state.replace(done=jnp.ones((b,), bool))
        self._next_shape = 0
        self._last_step = 0  # the state's round counter at the last delivery (fresh: 0)
        self._step_ended: float | None = None  # when the last step ended, if rows still ran

    def _knobs(self, rows: slice) -> speculative.Knobs:
        """The settings of rows `rows` (host arrays -> device)."""
        h = self._host
        return speculative.Knobs(
            temperature=jnp.asarray(h["temperature"][rows]),
            top_p=jnp.asarray(h["top_p"][rows]),
            top_k=jnp.asarray(h["top_k"][rows]),
            max_new=jnp.asarray(h["max_new"][rows]),
            eos_ids=jnp.asarray(h["eos"][rows]),
        )

    def _set_row(self, row: int, request: Request) -> None:
        h = self._host
        stop = request.stop_ids
        if len(stop) > h["eos"].shape[1]:  # more stop ids than any request before: widen
            pad = np.full((self.max_batch, len(stop) - h["eos"].shape[1]), -1, np.int32)
            h["eos"] = np.concatenate([h["eos"], pad], axis=1)
        h["temperature"][row] = request.temperature
        h["top_p"][row] = request.top_p
        h["top_k"][row] = request.top_k
        h["max_new"][row] = request.max_new_tokens
        h["eos"][row] = -1
        h["eos"][row, : len(stop)] = stop

    def _greedy(self, rows: int) -> bool | None:
        return True if not np.any(self._host["temperature"][:rows] > 0) else None

    def _prefill_next_chunk(self) -> None:
        """One chunk of the long prompt being prefilled; its last part admits it into a row."""
        ch = self._chunked
        prompt, c = ch.slot.request.prompt, self.prefill_chunk
        if len(prompt) - ch.written > c:
            tokens = jnp.asarray([prompt[ch.written : ch.written + c]], jnp.int32)
            ch.prefix = _prefill_chunk(
                ch.prefix, self.base_params, self.draft_params, tokens,
                jnp.asarray([prompt[ch.written + c]], jnp.int32), cfg=self.cfg, dcfg=self.dcfg,
                shapes=dataclasses.replace(self._shapes, batch=1, prompt_bucket=c),
                mesh=self.mesh,
            )  # fmt: skip
            ch.written += c
            return
        self._admit_one(ch.slot, prefix=ch.prefix, start=ch.written)
        self._chunked = None  # after: a failed admission fails this request too

    def _admit_one(
        self, slot: _Slot, prefix: speculative.Prefix | None = None, start: int = 0
    ) -> None:
        """Admits a request into the next free row: a batch-1 prefill of its prompt (or of the
        prompt's part from `start` on, after the chunks in `prefix`)."""
        row = len(self._slots)
        request = slot.request
        self._set_row(row, request)
        rest = request.prompt[start:]
        # Padded to a power of two, but never past the cache (a capacity that is not one).
        bucket = min(vanilla.prompt_bucket(len(rest)), self._shapes.capacity - start)
        tokens, lengths = vanilla.pad_prompts([list(rest)], [bucket])
        knobs = self._knobs(slice(row, row + 1))
        shapes = dataclasses.replace(self._shapes, batch=1, prompt_bucket=bucket)
        budget = self.budgets[1]
        if self.history is not None:
            budget = self.history.apply(budget, sampled=request.temperature > 0)
        self._state = _admit(
            self._state, self.base_params, self.draft_params, jnp.asarray(tokens),
            jnp.asarray(lengths), knobs, jnp.asarray(vanilla.row_seeds(request.seed, 1)),
            budget, self.draft_head, jnp.int32(row), prefix, cfg=self.cfg,
            dcfg=self.dcfg, greedy=None,  # one program for greedy and sampled requests
            shapes=shapes, mesh=self.mesh,
        )  # fmt: skip
        self._slots.append(slot)

    def _all_done(self) -> bool:
        return bool(np.all(np.asarray(self._state.done[: len(self._slots)])))

    def _round_call(self, rows: int, greedy: bool | None) -> tuple[tuple, dict]:
        """The arguments and static arguments of `_segment` over the first `rows` rows."""
        args = (
            self._state, self.base_params, self.draft_params, self._knobs(slice(0, rows)),
            self.budgets[rows], self.draft_head, jnp.int32(self.rounds_per_step),
        )  # fmt: skip
        static = dict(
            rows=rows, cfg=self.cfg, dcfg=self.dcfg, greedy=greedy, mesh=self.mesh,
            shapes=dataclasses.replace(self._shapes, batch=rows),
        )  # fmt: skip
        return args, static

    def _run_rounds(self) -> tuple[int, int]:
        """Dispatches one segment of rounds; returns its (batch bucket, round shape index)."""
        rows = next(b for b in self.buckets if b >= len(self._slots))
        want = self._next_shape if self._next_shape < len(self.shapes) else 0
        args, static = self._round_call(rows, self._greedy(rows))
        index = self._programs.pick(want, args, static)
        self._state = _segment(*args, index=index, **static)
        return rows, index

    def _learn_overhead(self, rows: int, index: int, rounds: int, seconds: float) -> None:
        """Updates what the serving loop adds to each round at batch bucket `rows` from one
        segment: `rounds` rounds of shape `index` took `seconds`: from their dispatch to the
        end of their delivery, plus the loop's time between the step before (which left rows
        decoding) and this one (the step's admissions are not counted, and finished before the
        dispatch: their prefills are priced per request, not per round).

        The measured costs price a round inside a long device loop; a server's rounds also pay
        the host's part of every segment (its dispatch, the read-back, handing the tokens to
        the web layer, waiting for the interpreter's lock between steps) and whatever else
        competes for the machine meanwhile. The adaptive
        budget prices every shape at its device cost plus this mean, so per round it charges
        each the same: the loop's time per token then falls with the tokens a round commits,
        which favours deeper trees as the loop's share grows. A segment's sample is the time
        per round beyond the shape's cost, clipped to [0, the bucket's dearest round] (a
        stall, a collection, is not a price); none is taken with one shape (nothing to choose)
        or while a round program compiles in the background.
        """
        costs = self._device_costs[rows]
        if len(self.shapes) == 1 or rounds <= 0 or self._programs.compiling():
            return
        sample = min(max(1e3 * seconds / rounds - costs[index], 0.0), float(costs.max()))
        mean = self.round_overhead_ms[rows]
        mean += OVERHEAD_WEIGHT * (sample - mean)
        self.round_overhead_ms[rows] = mean
        self.budgets[rows] = self.budgets[rows].replace(
            costs=jnp.asarray(costs + mean, jnp.float32)
        )

    def _deliver(self) -> int:
        """Hands each busy row's new tokens to its request and frees the rows that ended;
        returns the rounds run since the last delivery."""
        n = len(self._slots)
        if n == 0:
            return 0
        s = self._state
        out, num, done, rounds, nxt, step = jax.device_get(
            (s.out_tokens[:n], s.num_out[:n], s.done[:n], s.rounds[:n], s.next_shape, s.step)
        )
        self._next_shape = int(nxt)
        ran = int(step) - self._last_step
        self._last_step = int(step)
        ended = []
        for row, slot in enumerate(self._slots):
            new = out[row, slot.sent : num[row]].tolist()
            slot.sent = int(num[row])
            reason = None
            if done[row]:
                last = int(out[row, num[row] - 1])
                reason = "stop" if last in slot.request.stop_ids else "length"
                ended.append(row)
            accepted = int(num[row]) - 1 - int(rounds[row])
            if new or reason:
                self._call(slot, Update(new, reason, int(rounds[row]), accepted))
        with self._lock:
            if ended and self.history is not None:
                hits, trials, conf = jax.device_get(
                    (s.own_hits[:n], s.own_trials[:n], s.conf_counts[:n])
                )
                sampled = [self._slots[row].request.temperature > 0 for row in ended]
                self.history.observe(hits[ended], trials[ended], sampled, conf_counts=conf[ended])
            for row in sorted(ended, reverse=True):
                self._free(row)
        return ran

    def _free_cancelled(self) -> None:
        for row in sorted((i for i, s in enumerate(self._slots) if s.cancelled), reverse=True):
            slot = self._slots[row]
            self._free(row)
            self._finish(slot, "cancelled")

    def _free(self, row: int) -> None:
        """Frees a row (under the lock): the last busy row moves into it."""
        last = len(self._slots) - 1
        self._state = _move_row(self._state, jnp.int32(last), jnp.int32(row), mesh=self.mesh)
        for arr in self._host.values():
            arr[row] = arr[last]
        self._host["temperature"][last] = 0.0  # an idle row never asks for the sampling program
        self._slots[row] = self._slots[last]
        self._slots.pop()

    def _finish(self, slot: _Slot, reason: str, error: str | None = None) -> None:
        self._call(slot, Update([], reason, error=error))

    @staticmethod
    def _call(slot: _Slot, update: Update) -> None:
        try:
            slot.callback(update)
        except Exception as err:  # a broken callback ends its own request only
            log.error("request %d callback failed: %s", slot.rid, err)
            slot.cancelled = True
