"""The adaptive draft budget: how much to speculate, decided round by round on the device.

The engine compiles a small set of round shapes (`speculative.spec_round`): draft trees of
several depths and `None`, a plain decode step on the same state (the draft trunk catches up
lazily, in one forward, when drafting resumes). Before every round `choose` picks the shape
that maximises the expected committed tokens per millisecond over the batch's running rows:

    rate(s) = sum over running rows of E_row[tokens | s]  /  cost(s)

- cost(s): the measured time of one round of shape s at this batch size
  (`speculative.measure_round_costs`, or read from the cache file of `load_or_measure_costs`,
  keyed by machine, model, shapes, batch and the code's version).
  The policy never uses this machine's constants: on a GPU verification is nearly free and
  deep trees win; on a CPU it is compute-bound and shallow trees or plain decoding win. The
  server's engine adds to every shape's cost what its loop spends per round beyond it,
  learnt as it serves (`Engine.round_overhead_ms`: the host's part of each few-round segment,
  the web layer's work competing for the machine), which favours shapes that commit more a
  round as that share grows.
- E_row[tokens | s] = 1 + sum_{i <= L_s} prod_{j <= i} p_j: the bonus plus the expected
  accepted draft tokens of a tree with L_s drafted levels, from the row's per-level acceptance
  p_j (the chance the accepted path reaches level j once it reached j - 1), kept as
  exponentially decayed hit / trial counts (`reach_stats`: for a sampled row the chances the
  base's distribution gave the walk, not the draws' 0/1 luck). A level never tried borrows the
  estimate of the level above it; a fresh row starts from what earlier requests of its kind
  (greedy or sampled) showed (`History`), else from an optimistic prior so that it drafts.
- Level 1 of the next round is better known than that: the draft has already run the trunk
  and holds its level-1 distribution, and the probability of its top token predicts whether
  the base accepts it (on held-out code here: 48% accepted below 0.2, 88% at 0.4-0.6, 99% above
  0.6; the draft is underconfident). So the drafting shapes are weighed with p_1 taken from a
  calibration of that confidence (`conf_acceptance`: CONF_BINS bins, each the level-1 hits over
  trials the rounds entering it with that confidence showed, `update_conf`, over earlier
  requests' (`History`), over the bin's centre), which scales every level's reach; whether to
  draft at all stays the running estimates' call (after plain rounds the draft's outputs are
  stale, and a probe, not one confident round, is what brings drafting back). Replaying the
  greedy chain's acceptance at every position of 80 held-out, 40 out-of-corpus and 80 prose
  prompts, this picked shapes that cost 3.0%, 0.1% and 0.4% less time than the running
  estimates alone (measured round costs, History carried over the prompts).
- A drafting shape must beat plain decoding by PLAIN_MARGIN to run (near a tie speculation
  can only lose), and another drafting shape must beat the current one by HYSTERESIS.
- Resuming drafting first runs the draft trunk over the positions queued while it did not
  (the catch-up, measured per slot): a drafting shape pays it once, spread over the rounds
  the batch has left under that shape.
- While plain decoding is chosen no statistics arrive, so after a streak of plain rounds a probe
  runs PROBE_ROUNDS rounds of the cheapest drafting shape to refresh them. Its first round
  forgets what the running rows' statistics held of the levels it does not draft (stale since
  drafting stopped: `forget_untried`), so they borrow the fresh estimate of the level above:
  when the probe finds the draft good again the policy drafts deep on its own and the deeper
  levels get trials as it goes; a poor draft is rarely tried past level 1 whatever the depth,
  so a deeper probe would learn little more at several times the cost (a batch-8 round of the
  default tree costs ~3.6 plain steps here, of the one-level chain ~1.4). The streak a probe
  waits for starts at `probe_every` and grows `probe_growth`-fold (PROBE_GROWTH) after every
  probe that does not bring drafting back (exponential backoff), up to the wait at which the
  probes cost at most PROBE_SHARE of the plain rounds between them (from the measured costs:
  the probe's rounds and the draft trunk's catch-up that starts it, over at most the latest
  16 pending positions of a row, `probe_cap`); each round the policy chooses to draft on its
  own shrinks it `probe_growth`-fold, down to `probe_every`: a real return to drafting brings
  it back within a few rounds, while a probe whose rounds went well by luck (a sampled row's,
  near the break-even) and a round or two of drafting after it leave it long. Reset at once,
  it had sent the next probes 8, 32, 128 plain rounds later, each a call of the adaptive
  program where the plain decoder's would run: six 96-token calls in a row at T=1 on held-out
  code, up to ~10 ms a call dearer than vanilla (the measurement log's "Where the kernels split
  their calls"). The backoff's ramp is what a poor draft pays while the policy learns: with a
  doubling wait 5 probes came before the cap (~350 plain steps here), 6-11% of the time of a
  500-step stretch at batch 8 (a probe there is ~4 plain steps of rounds, more with the
  trunk's catch-up); growing 4-fold, 3.

A batch the policy would decode plainly throughout (plain decoding chosen for its first round,
no probe falling due before it ends) runs the plain decoder's own program instead of this one
(`speculative.plain_throughout`): the same tokens and the same record, without the adaptive
program's heavier launch.

Correctness does not depend on the choice: every shape commits exactly what the base would
decode (greedy argmax or the position-keyed draw, `sampling.py`), so greedy output equals
vanilla greedy and seeded sampling equals seeded vanilla sampling whatever is chosen (tested
with forced schedules, `Budget.schedule`).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
import pathlib
import platform
from collections.abc import Callable, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from griffin_jax import cli, cpu_kernels
from griffin_jax.config import TreeConfig

PRIOR = 0.8  # level-1 acceptance assumed before any round of a row was drafted
PRIOR_WEIGHT = 1.0  # pseudo-trials behind each level's prior
DECAY = 0.97  # per drafting round: statistics follow the text over ~30 drafting rounds
PROBE_EVERY = 8  # plain rounds in a row before drafting rounds refresh the statistics
PROBE_ROUNDS = 3  # drafting rounds of such a probe (one round's luck is too little to go on)
PROBE_SHARE = 0.01  # probes that keep failing cost at most this share of the plain rounds' time
PROBE_GROWTH = 4  # each probe that does not bring drafting back multiplies the wait by this
HYSTERESIS = 0.05  # another drafting shape must promise this much more tokens per ms to be
# switched to
PLAIN_MARGIN = 0.05  # a drafting shape must promise this much more tokens per ms than plain
# decoding to run (see `choose`)
HISTORY_WEIGHT = 8.0  # pseudo-trials behind a fresh row's prior learnt from earlier requests
HISTORY_MEMORY = 16.0  # a finished row with this many trials at a level moves history halfway
HISTORY_STALE = 16  # finished rows of a class that did not try a level before history forgets it
CONF_BINS = 10  # bins of the draft's level-1 confidence (its top probability), [0, 1] in tenths
CONF_PRIOR_WEIGHT = 2.0  # pseudo-trials behind each bin's prior (acceptance = the bin's centre)
CONF_MEMORY = 256.0  # trials per bin history keeps (older ones fade as new ones arrive)
KEEP_CHUNKS = -2  # `Budget.chunks`: a shape's rounds leave the kernels' threads as they are
ROWS_ADDED = 8  # up to this many rows, the policy's sums over rows are unrolled additions

Shape = TreeConfig | None  # None: a plain decode step (no draft)


def levels(shape: Shape) -> int:
    """Drafted levels of a shape (depth + 1; 0 for a plain decode step)."""
    return 0 if shape is None else shape.depth + 1


def path_len(shape: Shape) -> int:
    """Tokens a round of this shape can commit (root plus drafted levels)."""
    return 1 if shape is None else shape.path_len


def describe(shape: Shape) -> str:
    if shape is None:
        return "none"
    v = f",{shape.draft_vocab}" if shape.draft_vocab else ""
    return f"{shape.top_k},{shape.depth},{shape.total_tokens}{v}"


@functools.cache  # read on every generation (`SpeculativeModel.shapes`)
def auto_shapes(tree: TreeConfig) -> tuple[Shape, ...]:
    """The shapes `--tree auto` chooses among: plain decoding and shallower trees up to `tree`.

    Depths 0, 3 and the full depth of the (trimmed) stored tree, each keeping the stored
    top_k, draft vocabulary and at most its total_tokens (a chain stays a chain). Depth 0 is
    the cheapest probe; a depth-1 tree beat both neighbours only in a narrow band of
    acceptance (by a few percent at best, on the CPU's costs) and cost a fifth more programs.
    """
    tree = tree.trimmed()
    shapes: list[Shape] = [None]
    for d in sorted({0, 3, tree.depth}):
        if d > tree.depth:
            continue
        m = min(tree.total_tokens, 1 + tree.top_k * (d + 1))
        shapes.append(dataclasses.replace(tree, depth=d, total_tokens=max(m, 2)).trimmed())
    return tuple(dict.fromkeys(shapes))  # ordered, without repeats


@flax.struct.dataclass
class Budget:
    """Round shapes (static) and what the policy reads at run time (traced: no recompiles).

    shapes: the compiled round shapes (`None` = plain decode step); a one-shape budget is a
      fixed tree. costs: [S] f32 ms per round of each shape at the batch size run.
    catch_up: [] f32 ms per slot of the draft trunk's catch-up forward at that batch size
      (what resuming drafting after plain rounds adds; 0: not measured, `probe_cap` then
      counts a catch-up as one round of the probe's shape).
    probe_call: [] f32 ms a probe adds to a call beyond its rounds: a batch that would decode
      plainly throughout runs the plain decoder's program (`speculative.plain_throughout`), one
      with a probe due runs the adaptive program, whose call costs that much more (its dispatch,
      segments and host read: the last figure of `speculative.measure_round_costs`). 0 where
      every round runs in the adaptive program anyway (the server's engine).
    schedule: [R] int32 forced shape index per round (-1 = the policy's choice); for tests and
      for measuring one shape inside the adaptive program.
    prior, prior_weight, start_wait, start_streak: what earlier requests taught
      (`History.apply`).
    conf_prior: the level-1 acceptance of each bin of the draft's confidence, as hit and
      trial pseudo-counts per class (the bin's centre at CONF_PRIOR_WEIGHT trials,
      plus what earlier requests showed: `History.apply`).
    finish: the rows end together (`speculative.generate`'s fixed batch): the policy weighs a
      shape by when the slowest row would finish under it, not by the batch's token rate (a
      server refills a finished row, so the rate is what counts there).
    """

    shapes: tuple[Shape, ...] = flax.struct.field(pytree_node=False)
    costs: jax.Array
    catch_up: jax.Array
    probe_call: jax.Array
    schedule: jax.Array
    prior: jax.Array  # [2, L] f32 level acceptance a fresh row starts from (greedy, sampled)
    prior_weight: jax.Array  # [2] f32 pseudo-trials behind it (0 = no history: PRIOR)
    start_wait: jax.Array  # [] int32 the probe wait a fresh batch starts with
    start_streak: jax.Array  # [] int32 and the plain streak (probes span short requests)
    # [2, 2, CONF_BINS] f32 pseudo-counts behind each confidence bin's level-1 acceptance:
    # (greedy, sampled) x (hits, trials) (`conf_acceptance`)
    conf_prior: jax.Array
    # [S] int32 where each shape's rounds run the CPU kernels' chunks: 0 the library's helper
    # threads, 1 XLA's pool, KEEP_CHUNKS where the process has them (`cpu_kernels.chunks_here`)
    chunks: jax.Array
    probe_every: int = flax.struct.field(pytree_node=False, default=PROBE_EVERY)
    probe_growth: int = flax.struct.field(pytree_node=False, default=PROBE_GROWTH)
    finish: bool = flax.struct.field(pytree_node=False, default=False)

    @property
    def max_levels(self) -> int:
        return max(levels(s) for s in self.shapes)


def make_budget(
    shapes: Sequence[Shape],
    costs: Sequence[float] | None = None,
    schedule: Sequence[int] | None = None,
    *,
    probe_every: int = PROBE_EVERY,
    probe_growth: int = PROBE_GROWTH,
    catch_up: float = 0.0,
    probe_call: float = 0.0,
    chunks: Sequence[int] | None = None,
) -> Budget:
    """A Budget; `costs` default to equal costs (then the deepest tree always wins).
    `catch_up`: ms per catch-up slot (`Budget.catch_up`), `probe_call`: ms a probe adds to a
    call (`Budget.probe_call`): the last two figures of `speculative.measure_round_costs`.
    `chunks`: per shape, where its rounds run the CPU kernels' chunks (`Budget.chunks`;
    default: where the process has them)."""
    shapes = tuple(shapes)
    if not shapes:
        raise ValueError("a budget needs at least one round shape")
    if costs is None:
        costs = [1.0] * len(shapes)
    if len(costs) != len(shapes) or not all(np.isfinite(c) and c > 0 for c in costs):
        raise ValueError(f"costs: expected {len(shapes)} positive finite values, got {costs}")
    if not (np.isfinite(catch_up) and catch_up >= 0):
        raise ValueError(f"catch_up: expected a finite value >= 0 (ms per slot), got {catch_up}")
    if not (np.isfinite(probe_call) and probe_call >= 0):
        raise ValueError(f"probe_call: expected a finite value >= 0 (ms), got {probe_call}")
    if not (isinstance(probe_every, int) and probe_every >= 1):
        raise ValueError(f"probe_every: a positive number of rounds expected, got {probe_every}")
    if not (isinstance(probe_growth, int) and probe_growth >= 1):
        raise ValueError(f"probe_growth: a positive integer factor expected, got {probe_growth}")
    chunks = [KEEP_CHUNKS] * len(shapes) if chunks is None else list(chunks)
    if len(chunks) != len(shapes) or not set(chunks) <= {KEEP_CHUNKS, 0, 1}:
        raise ValueError(f"chunks: {len(shapes)} of {KEEP_CHUNKS} (keep), 0 or 1, got {chunks}")
    sched = np.asarray([-1] if schedule is None else list(schedule), np.int32)
    if sched.ndim != 1 or len(sched) == 0 or sched.min() < -1 or sched.max() >= len(shapes):
        raise ValueError(f"schedule: shape indices in [-1, {len(shapes)}) expected")
    # Padded with -1 (the policy) to a power of two >= 64: a schedule's length is a traced
    # array's shape, and a new length must not recompile the rounds.
    padded = np.full(max(64, 1 << (len(sched) - 1).bit_length()), -1, np.int32)
    padded[: len(sched)] = sched
    n_levels = max(max(levels(s) for s in shapes), 1)
    # Host (numpy) arrays: a call's jit transfers them with its other arguments, where a jnp
    # array each was a dispatch of its own (~5% of a batch-1 generation's host time here).
    return Budget(
        shapes=shapes,
        costs=np.asarray(costs, np.float32),
        catch_up=np.float32(catch_up),
        probe_call=np.float32(probe_call),
        schedule=padded,
        prior=np.full((2, n_levels), PRIOR, np.float32),
        prior_weight=np.zeros((2,), np.float32),
        start_wait=np.int32(probe_every),
        start_streak=np.int32(0),
        conf_prior=conf_pseudo_counts(np.zeros((2, 2, CONF_BINS))),
        chunks=np.asarray(chunks, np.int32),
        probe_every=probe_every,
        probe_growth=probe_growth,
    )


# ----------------------------------------------------------------------------- statistics


def init_stats(
    budget: Budget, batch: int, temperature: jax.Array | float, *, greedy: bool | None
):  # fmt: skip
    """(hits, trials): [B, L] f32 decayed counts per drafted level, for fresh rows: the
    budget's prior as pseudo-counts (none without history), the greedy or the sampled one by
    the static `greedy`, or per row by its temperature (scalar or [B]) when it is None (a
    greedy program's temperature is a placeholder)."""
    sampled = sampled_rows(batch, temperature, greedy=greedy).astype(jnp.int32)
    weight = budget.prior_weight[sampled][:, None]  # [B, 1]
    trials = jnp.broadcast_to(weight, (batch, budget.prior.shape[1]))
    return budget.prior[sampled] * weight, trials


def sampled_rows(batch: int, temperature: jax.Array | float, *, greedy: bool | None) -> jax.Array:
    """[B] bool each row's class (sampled, else greedy): by the static `greedy`, or per row by
    its temperature (scalar or [B]) when it is None (a greedy program's temperature is a
    placeholder)."""
    if greedy is None:
        return jnp.broadcast_to(jnp.asarray(temperature) > 0, (batch,))
    return jnp.full((batch,), not greedy)


def reach_stats(
    chance: jax.Array, tree_mask: jax.Array, depths: jax.Array, drafted: int, n_levels: int
) -> tuple[jax.Array, jax.Array]:
    """(hit, tried): [B, n_levels] what a drafting round of `drafted` levels says of each level:
    tried_i = the chance the walk down the tree reached level i - 1, hit_i = that it reached i.

    A node is reached with the product of `sampling.parent_draw_chance` over its path, and
    siblings exclude each other (one draw per node), so level i is reached with the sum over
    its nodes. For greedy rows these are the 0/1 outcomes of the round (as counting accepted
    levels); for sampled rows their expectation over the draws, the same ratio estimate
    hit / tried of "the chance to go on from level i - 1 to i" without the draws' luck in it.

    Args:
      chance: [B, M] (`sampling.parent_draw_chance`).  tree_mask: [B, M, M] bool, ancestor or
        self (`tree.Tree`).  depths: [B, M] int32 (root 0).
    """
    m = chance.shape[1]
    on_path = tree_mask & (jnp.arange(m) >= 1)[None, None, :]  # the root's chance means nothing
    reach = jnp.prod(jnp.where(on_path, chance[:, None, :], 1.0), axis=-1)  # [B, M]
    level = jax.nn.one_hot(depths, n_levels + 1, dtype=jnp.float32)  # [B, M, L + 1]
    at_level = jnp.einsum("bm,bml->bl", reach, level).at[:, 0].set(1.0)  # [B, L + 1]
    upto = (jnp.arange(1, n_levels + 1) <= drafted).astype(jnp.float32)[None, :]
    return at_level[:, 1:] * upto, at_level[:, :-1] * upto


def update_stats(
    hits: jax.Array,
    trials: jax.Array,
    hit: jax.Array,
    tried: jax.Array,
    active: jax.Array,
) -> tuple[jax.Array, jax.Array]:
    """Counts after a drafting round that tried levels `tried` [B, L] with outcomes `hit`
    [B, L] (`reach_stats`). Rows not running keep their counts."""
    keep = ~active[:, None]
    return (
        jnp.where(keep, hits, DECAY * hits + hit),
        jnp.where(keep, trials, DECAY * trials + tried),
    )


def conf_pseudo_counts(learnt) -> np.ndarray:
    """[2, 2, CONF_BINS] f32 `Budget.conf_prior`: counts learnt from earlier requests
    ((greedy, sampled) x (hits, trials) per bin; an array or nested lists) over each bin's
    centre at CONF_PRIOR_WEIGHT trials. In floats, one array made at the end: `History.apply`
    runs it between requests, where numpy's broadcasting arithmetic ran cold (~0.2 ms)."""
    w = CONF_PRIOR_WEIGHT
    return np.array(
        [[[w * (j + 0.5) / CONF_BINS + x for j, x in enumerate(hits)], [w + x for x in trials]]
         for hits, trials in np.asarray(learnt, np.float64).tolist()],
        np.float32,
    )  # fmt: skip


def draft_confidence(root_logprobs: jax.Array) -> jax.Array:
    """[B] the draft's level-1 confidence: the probability of its top token (log-probs
    [B, V'] of the trunk's last output, `SpecState.root_logprobs`)."""
    return jnp.exp(jnp.max(root_logprobs.astype(jnp.float32), axis=-1))


def conf_bin(conf: jax.Array) -> jax.Array:
    """[B] int32 the confidence bin of each row."""
    return jnp.clip(jnp.floor(conf * CONF_BINS), 0, CONF_BINS - 1).astype(jnp.int32)


def _in_bin(conf: jax.Array) -> jax.Array:
    """[B, 1, CONF_BINS] bool: each row's confidence bin, against the counts' [B, 2, bins]."""
    return conf_bin(conf)[:, None, None] == jnp.arange(CONF_BINS)[None, None, :]


def update_conf(
    conf_counts: jax.Array, conf: jax.Array, hit: jax.Array, tried: jax.Array,
    active: jax.Array,
) -> jax.Array:  # fmt: skip
    """Per-row counts [B, 2, CONF_BINS] (level-1 hits, trials) after a drafting round: the bin
    of the confidence `conf` [B] the round drafted level 1 with gains the level's outcome
    (`reach_stats`' column 0: `hit` [B] of `tried` [B]). Rows not running keep theirs. No
    decay: how well the draft's confidence predicts acceptance is the draft's and the text
    kind's, not the passage's."""
    outcome = jnp.stack([hit, tried], axis=1)[:, :, None]  # [B, 2, 1]
    return conf_counts + jnp.where(_in_bin(conf) & active[:, None, None], outcome, 0.0)


def conf_acceptance(
    budget: Budget, conf: jax.Array, conf_counts: jax.Array, sampled: jax.Array
) -> jax.Array:
    """[B] the chance level 1 is accepted in a round the draft enters with confidence `conf`
    [B]: the row's own counts in that bin ([B, 2, CONF_BINS], `update_conf`) over the class's
    prior (`Budget.conf_prior`; `sampled` [B] bool picks the class). The bin is picked by
    selects, one per bin, which XLA fuses with the rest of the policy's arithmetic (`choose`)."""
    prior = jnp.where(sampled[:, None, None], budget.conf_prior[1], budget.conf_prior[0])
    counts = conf_counts + prior  # [B, 2, bins]
    in_bin = conf_bin(conf)
    hits, trials = (_select([counts[:, i, j] for j in range(CONF_BINS)], in_bin) for i in (0, 1))
    return hits / jnp.maximum(trials, 1e-9)


def level_acceptance(hits: jax.Array, trials: jax.Array) -> jax.Array:
    """[B, L] per-level acceptance estimates (each level's prior is the level above's estimate)."""
    return jnp.stack(_level_columns(hits, trials), axis=1)


def _level_columns(hits: jax.Array, trials: jax.Array) -> list[jax.Array]:
    """`level_acceptance` as L columns [B], unrolled over the few levels. One reciprocal of
    the trials for every level, then products and sums: XLA repeats cheap elementwise work in
    each user, not a division, so a chain of L divisions with several users each was L thunks."""
    inv = 1.0 / (trials + PRIOR_WEIGHT)  # [B, L]
    p = jnp.full(hits.shape[:1], PRIOR, jnp.float32)
    columns = []
    for i in range(hits.shape[1]):
        p = (hits[:, i] + PRIOR_WEIGHT * p) * inv[:, i]
        columns.append(p)
    return columns


def expected_tokens(hits: jax.Array, trials: jax.Array, shapes: Sequence[Shape]) -> jax.Array:
    """[B, S] expected committed tokens of one round of each shape, per row."""
    return round_tokens(hits, trials, shapes)[0]


def round_tokens(
    hits: jax.Array, trials: jax.Array, shapes: Sequence[Shape]
) -> tuple[jax.Array, jax.Array]:
    """([B, S], [B, S]) the mean and the variance of the tokens one round of each shape
    commits, per row, from the rows' counts (`level_acceptance`)."""
    return tokens_from_acceptance(level_acceptance(hits, trials), shapes)


def tokens_from_acceptance(p: jax.Array, shapes: Sequence[Shape]) -> tuple[jax.Array, jax.Array]:
    """([B, S], [B, S]) the mean and the variance of the tokens one round of each shape
    commits, from per-level acceptance p [B, L]: 1 + A, A the accepted levels,
    P(A >= i) = reach_i, so E[A] = sum_i reach_i and E[A^2] = sum_i (2i - 1) reach_i."""
    means, variances = _shape_tokens([p[:, i] for i in range(p.shape[1])], shapes)
    return jnp.stack(means, axis=1), jnp.stack(variances, axis=1)


def _shape_tokens(
    columns: Sequence[jax.Array], shapes: Sequence[Shape]
) -> tuple[list[jax.Array], list[jax.Array]]:  # fmt: skip
    """`tokens_from_acceptance` from the L acceptance columns [B], as S columns [B] each.
    Running sums over the few levels, not `jnp.cumprod` / `jnp.cumsum` (each a reduce-window
    XLA runs as a thunk of its own) and a gather of the shapes' columns: elementwise work that
    XLA fuses."""
    zero = jnp.zeros_like(columns[0])
    reach, first, second = None, [zero], [zero]
    for i, p in enumerate(columns):
        reach = p if reach is None else reach * p  # P(path reaches level i + 1)
        first.append(first[-1] + reach)
        second.append(second[-1] + (2.0 * i + 1.0) * reach)
    means, variances = [], []
    for shape in shapes:
        mean, square = first[levels(shape)], second[levels(shape)]
        means.append(1.0 + mean)
        variances.append(jnp.maximum(square - mean * mean, 0.0))
    return means, variances


def _first_max(values: Sequence[jax.Array]) -> jax.Array:
    """int32 index of the first largest of a few scalars (`jnp.argmax` of their stack, as
    compares and selects XLA fuses with their arithmetic: its argmax is a reduction over
    value-index pairs, a thunk of its own)."""
    best, top = jnp.int32(0), values[0]
    for i, value in enumerate(values[1:], 1):
        better = value > top
        best, top = jnp.where(better, jnp.int32(i), best), jnp.where(better, value, top)
    return best


def _row_sums(columns: Sequence[jax.Array], active: jax.Array) -> list[jax.Array]:
    """The running rows' sum of each column [B]: for a few rows, additions of the rows'
    entries, which XLA fuses with the rest of the policy's arithmetic (a stack of the columns
    and its reduction were thunks of their own after every round); else one reduction over
    the stacked columns."""
    if active.shape[0] <= ROWS_ADDED:
        rows = range(active.shape[0])
        return [functools.reduce(jnp.add, [jnp.where(active[r], c[r], 0.0) for r in rows])
                for c in columns]  # fmt: skip
    total = jnp.sum(jnp.where(active[:, None], jnp.stack(columns, axis=1), 0.0), axis=0)
    return [total[i] for i in range(len(columns))]


def _select(values: Sequence[jax.Array], index: jax.Array) -> jax.Array:
    """values[index] for a traced index into a few values of one shape (selects, not a
    gather: see `_first_max`); the first value for an index out of range."""
    out = values[0]
    for i, value in enumerate(values[1:], 1):
        out = jnp.where(index == i, value, out)
    return out


def plain_at(shapes: Sequence[Shape], index: jax.Array) -> jax.Array:
    """Whether shapes[index] is plain decoding (bool scalar; a traced index, by `_select`)."""
    return _select([jnp.bool_(s is None) for s in shapes], index)


@functools.cache
def expected_max_normal(k: int) -> float:
    """E[max of k independent standard normals] (0 for k <= 1), by quadrature."""
    if k <= 1:
        return 0.0
    x = np.linspace(-8.0, 8.0, 4001)
    cdf = 0.5 * (1.0 + np.vectorize(math.erf)(x / math.sqrt(2.0)))
    pdf = np.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi)
    return float(np.sum(x * k * pdf * cdf ** (k - 1)) * (x[1] - x[0]))


def finish_rounds(
    mean: jax.Array, var: jax.Array, remaining: jax.Array, active: jax.Array
) -> jax.Array:
    """[S] the rounds a fixed batch needs to finish under each shape: the slowest running
    row's (max over rows). A row with r tokens to go at a mean m and variance v per round
    needs (r + E[overshoot]) / m rounds (Wald; the last round's tokens past r are lost, on
    average (v + m^2) / 2m - 1/2 of them), give or take sqrt(r v / m^3) (the renewal count's
    spread); the last of K such rows lands ~ E[max of K normals] of those spreads past its
    mean, K counting the rows that can be last (within 3 spreads of the latest mean: a row
    nearly done does not compete). Deeper trees commit more per round but vary more, so a
    large batch waits longer for its unlucky row (within ~5% of a simulation,
    `tests/test_budget.py`).

    Args:
      mean, var: [B, S] (`round_tokens`).  remaining: [B] tokens each row has to go.
      active: [B] bool running rows.
    """
    b = mean.shape[0]
    table = jnp.asarray([expected_max_normal(k) for k in range(b + 1)], jnp.float32)
    r = jnp.maximum(remaining, 1).astype(mean.dtype)[:, None]
    overshoot = (var + mean * mean) / (2.0 * mean) - 0.5
    centre = jnp.where(active[:, None], (r + overshoot) / mean, 0.0)  # [B, S]
    spread = jnp.sqrt(r * var / mean**3)
    last = jnp.max(centre, axis=0)  # [S]
    contenders = jnp.sum(active[:, None] & (centre + 3.0 * spread >= last), axis=0)
    rounds = centre + table[contenders][None, :] * spread
    return jnp.max(jnp.where(active[:, None], rounds, 0.0), axis=0)


def choose(
    budget: Budget,
    hits: jax.Array,
    trials: jax.Array,
    active: jax.Array,
    plain_streak: jax.Array,
    probe_wait: jax.Array,
    round_index: jax.Array,
    current: jax.Array,
    remaining: jax.Array | None = None,
    catch_up_slots: jax.Array | int = 0,
    first_level: jax.Array | None = None,
    first_known: jax.Array | None = None,
) -> jax.Array:
    """The shape index of the next round (int32 scalar; see the module docstring).

    The rate of a shape: the running rows' expected tokens per ms; with `budget.finish`, the
    share of the batch's remaining rounds (`finish_rounds`: its slowest row's, from the
    `remaining` tokens [B], the mean and the spread of each row's tokens per round) one
    round does, per ms: a fixed batch lasts as long as its slowest row, and tokens the others
    draft meanwhile do not shorten it.

    Resuming drafting first runs the draft trunk's catch-up over the positions plain rounds
    (and a lazily left prompt) queued: `catch_up_slots` slots of the catch-up forward, priced
    at `Budget.catch_up` a slot. A drafting shape pays it once, spread over the rounds the
    batch has left under that shape (`finish_rounds`, when `remaining` is given): a batch of
    long prompts with a draft near break-even does not pay a prompt's catch-up for a few
    percent over the rest of a short run (at batch 8 on this CPU a 256-token prompt's catch-up
    costs ~5 plain steps).

    Drafting runs only while it promises PLAIN_MARGIN more than plain decoding, whether the
    last round drafted or not: a drafting shape's rate is an estimate (a sampled row's
    chances, costs measured on other prompts), plain decoding's is known. Near a tie the
    policy decodes plainly, where speculation would at best win a few percent and at worst
    lose them (a symmetric hysteresis kept a row drafting at a break-even acceptance for tens
    of rounds). Among drafting shapes the current one is kept unless another's rate beats it
    by HYSTERESIS (in the server's engine a change of shape costs a host round trip).

    `first_level` [B]: the chance the next round's level 1 is accepted, from the confidence
    the draft enters it with (`conf_acceptance`), where `first_known` [B] (the row's trunk
    caught up, so its level-1 outputs are this round's). Without `budget.finish` the drafting
    shapes are weighed with it in place of the row's running level-1 estimate; whether to draft
    at all stays the running estimates' call (after plain rounds the draft's outputs are stale).
    A fixed batch (`budget.finish`) weighs its remaining rounds, which one round's confidence
    says little of: it ignores them.
    """
    if len(budget.shapes) == 1:
        return jnp.int32(0)
    # Per shape, a column [B] or a scalar each, in unrolled arithmetic XLA fuses into a few
    # thunks (`_level_columns`, `_shape_tokens`, `_row_sums`, `_first_max`, `_select`): this
    # runs after every drafting round. In a (1,3,5) round of the default chain's batch-1
    # adaptive program it is 4 thunks (12 before the level estimates' one reciprocal and the
    # row sums' additions; 2 in the fixed tree's program), a held-out call 0.3-0.7 ms shorter
    # for those two (median of paired calls, ~20 rounds).
    p = _level_columns(hits, trials)
    mean, var = _shape_tokens(p, budget.shapes)
    plain = [s is None for s in budget.shapes]
    cost = [budget.costs[i] for i in range(len(plain))]
    # The rounds left matter to a fixed batch, and to spread a catch-up over (none when the
    # caller knows nothing is pending: a static 0, after a drafting round).
    spread = not (isinstance(catch_up_slots, int) and catch_up_slots == 0)
    needed = remaining is not None and (budget.finish or spread)
    if needed:
        left = finish_rounds(jnp.stack(mean, 1), jnp.stack(var, 1), remaining, active)  # [S]
        rounds = [left[i] for i in range(len(plain))]
    if needed and spread:  # the catch-up, spread over the rounds left under each shape
        charge = budget.catch_up * jnp.asarray(catch_up_slots, jnp.float32)
        cost = [
            c if plain[i] else c + charge / jnp.maximum(rounds[i], 1.0) for i, c in enumerate(cost)
        ]
    if budget.finish:  # the share of the batch's remaining rounds one round does
        # (none running: any)
        gain = [jnp.where(r > 0, 1.0 / jnp.maximum(r, 1e-9), 1.0) for r in rounds]
    else:
        gain = _row_sums(mean, active)
    # Reciprocals of the costs, so that what follows is products and sums XLA fuses into fewer
    # thunks (each division with several users is one of its own).
    per_ms = [1.0 / c for c in cost]
    score = [
        g * r * (1 + PLAIN_MARGIN if plain[i] else 1.0)
        for i, (g, r) in enumerate(zip(gain, per_ms, strict=True))
    ]
    best = _first_max(score)
    is_plain = functools.partial(plain_at, budget.shapes)
    draft_score = score
    if first_level is not None and not budget.finish:
        known = jnp.ones(first_level.shape, bool) if first_known is None else first_known
        # Every level's reach is level 1's chance times the rest, so the accepted draft tokens
        # scale with level 1's chance (one product where a second cumulative sum was ~5
        # fusions more a round, each a few us here).
        ratio = jnp.where(known, first_level * (1.0 / jnp.maximum(p[0], 1e-6)), 1.0)
        now = _row_sums([1.0 + (m - 1.0) * ratio for m in mean], active)
        draft_score = [x * r for x, r in zip(now, per_ms, strict=True)]
        drafting = _first_max(
            [-jnp.inf if x else d for x, d in zip(plain, draft_score, strict=True)]
        )
        best = jnp.where(is_plain(best), best, drafting)
    plain_best = functools.reduce(
        jnp.maximum, [sc for x, sc in zip(plain, score, strict=True) if x], 0.0
    )
    keep = (~is_plain(best)) & (~is_plain(current)) & (_select(score, current) >= plain_best)
    keep &= _select(draft_score, best) <= (1 + HYSTERESIS) * _select(draft_score, current)
    best = jnp.where(keep, current, best)
    return _probe_or_forced(budget, best, plain_streak, probe_wait, round_index)


def keep_plain(
    budget: Budget, plain_streak: jax.Array, probe_wait: jax.Array, round_index: jax.Array,
    current: jax.Array,
) -> jax.Array:  # fmt: skip
    """`choose` after a plain round that followed a plain round: no statistics changed since
    the last choice kept `current`, so only a due probe or the schedule can change it. Spares
    plain rounds the policy's arithmetic (tens of small ops). A row that finished meanwhile is
    weighed at the next full choice (the next segment, or a probe)."""
    if len(budget.shapes) == 1:
        return jnp.int32(0)
    return _probe_or_forced(budget, current, plain_streak, probe_wait, round_index)


def _probe_or_forced(budget, best, plain_streak, probe_wait, round_index) -> jax.Array:
    """The policy's `best` unless a probe is due (or running), or the schedule forces one."""
    probe = plain_at(budget.shapes, best) & probe_due(plain_streak, probe_wait)
    probe &= any(s is not None for s in budget.shapes)
    probe |= plain_streak < 0  # inside a probe (`next_probe`)
    pick = jnp.where(probe, probe_shape(budget), best)
    forced = budget.schedule[jnp.minimum(round_index, budget.schedule.shape[0] - 1)]
    forced = jnp.where(round_index < budget.schedule.shape[0], forced, -1)
    return jnp.where(forced >= 0, forced, pick).astype(jnp.int32)


def probe_due(plain_streak: jax.Array, probe_wait: jax.Array) -> jax.Array:
    """Whether the plain streak reached the probe wait: the next round probes, and a drafting
    round now starts a probe (`next_probe`, `forget_untried`)."""
    return plain_streak >= probe_wait


def probe_shape(budget: Budget) -> jax.Array:
    """The shape a probe runs: the drafting shape of the lowest measured cost (int32 scalar)."""
    costs = [-budget.costs[i] if s is not None else -jnp.inf for i, s in enumerate(budget.shapes)]
    return _first_max(costs)


def forget_untried(
    hits: jax.Array, trials: jax.Array, drafted: int, *, probing: jax.Array, active: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """The counts before a round of `drafted` levels: when the round starts a probe
    (`probing`, a scalar bool: `probe_due`), running rows forget the levels past `drafted`
    (their counts date from before the plain streak), which then borrow the estimate of the
    level above (`level_acceptance`) that the probe refreshes. Finished rows keep theirs for
    `History`."""
    stale = probing & active[:, None] & (jnp.arange(hits.shape[1]) >= drafted)[None, :]
    return jnp.where(stale, 0.0, hits), jnp.where(stale, 0.0, trials)


def probe_cap(budget: Budget, catch_up_slots: jax.Array | int = 0) -> jax.Array:
    """The longest wait between probes (int32 scalar, >= `probe_every`): the plain rounds over
    which a probe costs PROBE_SHARE of their time. A probe is PROBE_ROUNDS rounds of its shape
    and what resuming drafting adds: the draft trunk's catch-up over the latest of the
    positions the plain rounds (and a batch's lazily left prompt) queued (a probe forwards at
    most `speculative.CATCH_UP_SHORT` a row), `catch_up_slots` slots of the catch-up forward
    that started it, priced at `Budget.catch_up`; unmeasured, one more round of the probe's
    shape. And `Budget.probe_call`: a call with a probe due runs the adaptive program where
    one without would run the plain decoder's (at batch 1 here ~2 ms a call, ~2.5 plain
    rounds; sampled calls of 96 tokens with a probe ran 5-20% slower than vanilla's, those
    without at its speed). The server's engine adds two host syncs, not counted."""
    if None not in budget.shapes:  # nothing to probe from
        return jnp.int32(budget.probe_every)
    plain = budget.costs[budget.shapes.index(None)]
    probe = budget.costs[probe_shape(budget)]
    catch_up = jnp.where(budget.catch_up > 0, budget.catch_up * catch_up_slots, probe)
    rounds = (PROBE_ROUNDS * probe + catch_up + budget.probe_call) / (PROBE_SHARE * plain)
    return jnp.maximum(jnp.ceil(rounds).astype(jnp.int32), budget.probe_every)


def next_probe(
    plain_streak: jax.Array, probe_wait: jax.Array, *, drafted: bool, budget: Budget,
    catch_up_slots: jax.Array | int = 0,
) -> tuple[jax.Array, jax.Array]:  # fmt: skip
    """(plain_streak, probe_wait) after a round.

    The streak: +1 after a plain round; after a drafting round 0, or -(PROBE_ROUNDS - 1) when
    that round started a probe (negative: probe rounds left). The wait: `probe_growth` times
    longer (up to `probe_cap`) when a probe starts, `probe_growth` times shorter (down to
    `probe_every`) for each round the policy drafted on its own (so drafting that comes back
    brings it down within a few rounds, a lucky round or two leave it long, and a probe that
    brings nothing back leaves it longer). `catch_up_slots`: the size of the catch-up forward
    the round's segment started with (`probe_cap`).
    """
    if not drafted:
        return plain_streak + 1, probe_wait
    started = probe_due(plain_streak, probe_wait)
    streak = jnp.where(
        started, -(PROBE_ROUNDS - 1), jnp.where(plain_streak < 0, plain_streak + 1, 0)
    ).astype(jnp.int32)
    own = (plain_streak >= 0) & ~started
    wait = jnp.where(
        started,
        jnp.minimum(budget.probe_growth * probe_wait, probe_cap(budget, catch_up_slots)),
        jnp.where(
            own, jnp.maximum(probe_wait // budget.probe_growth, budget.probe_every), probe_wait
        ),
    ).astype(jnp.int32)
    return streak, wait


# ----------------------------------------------------------------------------- history


class History:
    """What earlier requests taught the policy, kept on the host per class of row (greedy,
    sampled): each level's acceptance, and the probe wait and plain streak a batch ended with.

    A fresh row otherwise starts from PRIOR, which a short request never outlives: a 96-token
    greedy request on code is ~20 rounds, and a few early misses send it to plain decoding
    where a row with a longer memory would go on drafting; a sampled request whose draft
    rarely matches pays drafting rounds and probes before the policy backs off. With history
    a fresh row's counts start as HISTORY_WEIGHT pseudo-trials at the last requests' rates,
    and a batch starts with the probe wait and the plain streak the previous one of its class
    ended with: the probes' schedule runs across requests, so requests shorter than the wait
    still get probed now and then (else a kind of request that once backed off would never
    draft again). Output never depends on it (every shape commits the base's tokens).

    It learns from what rows tried themselves (`SpecState.own_hits` / `own_trials`), never
    from the prior it gave them: a level a row never drafted would otherwise report its
    prior back as an observation, and an estimate once low (a warm-up prompt's misses, a few
    bad requests) would confirm itself for good while the policy, trusting it, never drafted
    that deep again. And it forgets a level past the first that HISTORY_STALE finished rows of
    a class in a row did not try (`age`): fresh rows then borrow the level above's estimate,
    as `level_acceptance` does, so the policy tries the deeper shapes again now and then and
    learns what they do today (level 1 stays: the probes refresh it).

    Its state is plain Python lists and its arithmetic plain floats: it runs on the host between
    one request's device work and the next's, where numpy's small-array calls ran ~10x slower
    than warm: after a batch-1 call here an `observe` took ~0.45 ms and a budget ~0.7 ms in
    arrays, ~0.1 and ~0.15 ms in floats, time every request pays.
    """

    def __init__(self, n_levels: int):
        n = max(n_levels, 1)
        self._level = [[math.nan] * n for _ in range(2)]  # per class (greedy, sampled), level
        self._age = [[0] * n for _ in range(2)]  # finished rows since a level was tried
        self.wait: list[tuple[int, int] | None] = [None, None]
        # level-1 (hits, trials) per bin of the draft's confidence, per class (`conf_acceptance`)
        self._conf = [[[0.0] * CONF_BINS for _ in range(2)] for _ in range(2)]

    @property
    def level(self) -> np.ndarray:
        """[2, L] each class's acceptance estimate per level (NaN: not seen yet)."""
        return np.array(self._level)

    @property
    def age(self) -> np.ndarray:
        """[2, L] finished rows of each class since each level was last tried."""
        return np.array(self._age, np.int64)

    @property
    def conf(self) -> np.ndarray:
        """[2, 2, CONF_BINS] each class's level-1 (hits, trials) per confidence bin."""
        return np.array(self._conf)

    @classmethod
    def for_shapes(cls, shapes: Sequence[Shape]) -> History:
        """An empty history for a budget of these round shapes (their deepest levels)."""
        return cls(max(levels(s) for s in shapes))

    def observe(
        self, hits, trials, sampled, *, probe_wait: int | None = None, plain_streak: int = 0,
        conf_counts=None,
    ) -> None:  # fmt: skip
        """Learns from finished rows' own counts ([B, L], no prior in them: `SpecState.own_hits`
        / `own_trials`; `sampled` [B] bool: their class), their level-1 counts per confidence
        bin ([B, 2, CONF_BINS], `SpecState.conf_counts`; each bin keeps at most CONF_MEMORY
        trials, the older ones scaled down) and, for a batch of one class, the probe wait and
        plain streak it ended with."""
        hits, trials = np.asarray(hits).tolist(), np.asarray(trials).tolist()  # floats
        flags = sampled if isinstance(sampled, bool) else np.asarray(sampled, bool)
        classes = [int(flags)] * len(hits) if np.ndim(flags) == 0 else [int(f) for f in flags]
        if len(classes) != len(hits):
            raise ValueError(f"sampled: {len(classes)} flags for {len(hits)} rows")
        if conf_counts is not None:
            counts = np.asarray(conf_counts).tolist()  # [B][2][bins]
            for c, conf in enumerate(self._conf):
                rows = [counts[r] for r in range(len(hits)) if classes[r] == c]
                for k in range(2):
                    conf[k] = [x + sum(row[k][j] for row in rows) for j, x in enumerate(conf[k])]
                scale = [min(1.0, CONF_MEMORY / max(t, 1e-9)) for t in conf[1]]
                conf[:] = [[x * f for x, f in zip(part, scale, strict=True)] for part in conf]
        n = min(len(hits[0]) if hits else 0, len(self._level[0]))
        for row, c in enumerate(classes):
            level, age = self._level[c], self._age[c]
            for i in range(n):
                t = trials[row][i]
                if t < 1.0:  # not seen: the estimate stays, the level ages
                    age[i] += 1
                    continue
                rate, old = hits[row][i] / t, level[i]
                mixed = old + t / (t + HISTORY_MEMORY) * (rate - old)  # its share of the evidence
                level[i] = rate if math.isnan(old) else mixed
                age[i] = 0
        if probe_wait is not None and classes and len(set(classes)) == 1:
            self.wait[classes[0]] = (int(probe_wait), max(int(plain_streak), 0))

    def apply(self, budget: Budget, *, sampled: bool) -> Budget:
        """The budget with this history as its prior (a level not yet seen, or not tried by
        the last HISTORY_STALE rows of the class, borrows the one above, as
        `level_acceptance` does), its confidence calibration over the bins' centres, and
        start wait."""
        prior = np.asarray(budget.prior).tolist()
        weight = np.asarray(budget.prior_weight).tolist()
        width = len(prior[0])
        n = min(width, len(self._level[0]))
        for c in range(2):
            level, age = self._level[c], self._age[c]
            if math.isnan(level[0]):
                continue
            last, row = PRIOR, []
            for i in range(width):
                # level 1 is never forgotten: the probes, whose schedule spans requests,
                # refresh it; forgetting it would send every class back to drafting
                if i < n and not math.isnan(level[i]) and (i == 0 or age[i] < HISTORY_STALE):
                    last = level[i]
                row.append(last)
            prior[c], weight[c] = row, HISTORY_WEIGHT
        wait, streak = self.wait[int(sampled)] or (budget.probe_every, 0)
        return budget.replace(
            prior=np.array(prior, np.float32),
            prior_weight=np.array(weight, np.float32),
            start_wait=np.int32(wait),
            start_streak=np.int32(streak),
            conf_prior=conf_pseudo_counts(self._conf),
        )


# ----------------------------------------------------------------------------- costs


def cache_path() -> pathlib.Path:
    """The cost cache file (outside the package): $GRIFFIN_COST_CACHE, else the user cache."""
    if os.environ.get("GRIFFIN_COST_CACHE"):
        return pathlib.Path(os.environ["GRIFFIN_COST_CACHE"])
    return cli.user_cache_dir() / "round_costs.json"


def cost_key(model: str, shapes: Sequence[Shape], batch: int) -> str:
    """Cache key: this machine (platform, device kind and count, CPU count; on a CPU its model
    and the project's kernels in use, `cpu_kernels.configuration`), model, shapes, batch, and
    the code that runs the rounds (`code_digest`): costs measured before a change of the
    rounds' programs, of the kernels or of JAX would misprice the shapes until measured
    again."""
    dev = jax.devices()[0]
    machine = f"{platform.machine()}|{dev.platform}|{dev.device_kind}|{jax.device_count()}"
    machine += f"|cpus={os.cpu_count()}"
    if dev.platform == "cpu":
        machine += f"|{cpu_kernels.configuration()}"
    parts = [machine, model, ";".join(describe(s) for s in shapes), f"b={batch}", code_digest()]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:24]


@functools.cache
def code_digest() -> str:
    """A digest of this package's sources (the CPU kernels' too) and the JAX and jaxlib
    versions."""
    import jaxlib

    h = hashlib.sha256(f"jax={jax.__version__}|jaxlib={jaxlib.__version__}".encode())
    here = pathlib.Path(__file__).parent
    for path in sorted([*here.glob("*.py"), *here.glob("csrc/*")]):
        h.update(path.name.encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:16]


def round_costs_valid(entry: list[float], shapes: int | None = None) -> bool:
    """Whether `entry` is `speculative.measure_round_costs`' list: round costs > 0, then the
    catch-up's ms per slot and a probe's ms a call, >= 0; with `shapes` given, exactly that
    many round costs, or that many and then as many `Budget.chunks` settings (0 or 1: its
    `choose_chunks`)."""
    costs = entry
    if shapes is not None:
        if len(entry) == 2 * shapes + 2 and set(entry[shapes + 2 :]) <= {0.0, 1.0}:
            costs = entry[: shapes + 2]
        elif len(entry) != shapes + 2:
            return False
    return (
        len(costs) >= 3
        and all(np.isfinite(c) and c > 0 for c in costs[:-2])
        and all(0 <= c < np.inf for c in costs[-2:])
    )


def load_or_measure_costs(
    key: str,
    measure: Callable[[], list[float]],
    *,
    path: pathlib.Path | None = None,
    check: Callable[[list[float]], bool] = round_costs_valid,
) -> tuple[list[float], bool]:
    """(costs, measured_now): read from the cache file, else measured and written there.
    `costs`: what `measure` returns, `speculative.measure_round_costs`'s list (ms per round of
    each shape, then ms per catch-up slot and ms a probe adds to a call, and where it chose
    them each shape's `Budget.chunks`); a cached entry is used only where it passes `check`.

    An unreadable or malformed cache file is replaced (it only holds measurements); a cache
    that cannot be written is skipped. With several processes (`jax.distributed`) process 0's
    cache decides for all: every process measures when it has no entry (the measurement runs
    the global programs, which need every process) and all use process 0's figures (one
    program must see one set of costs, whatever each host's cache file or clock said).
    """
    path = cache_path() if path is None else path
    try:
        table = json.loads(path.read_text())
    except (OSError, ValueError):
        table = {}
    if not isinstance(table, dict):
        table = {}
    entry = table.get(key)
    costs = None
    if isinstance(entry, list) and all(
        isinstance(c, (int, float)) and not isinstance(c, bool) for c in entry
    ):
        if check([float(c) for c in entry]):
            costs = [float(c) for c in entry]
    costs = from_process_zero(costs)
    if costs is not None:
        return costs, False
    costs = from_process_zero([float(c) for c in measure()])
    table[key] = costs
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(table, indent=1))
        tmp.replace(path)
    except OSError:
        pass
    return costs, True


def from_process_zero(costs: list[float] | None) -> list[float] | None:
    """Process 0's `costs` (None where it has none) on every process; itself with one process."""
    if jax.process_count() == 1:
        return costs
    from jax.experimental import multihost_utils

    count = 0 if costs is None else len(costs)
    count = int(multihost_utils.broadcast_one_to_all(np.int32(count)))
    if count == 0:
        return None
    mine = np.zeros(count, np.float32) if costs is None or len(costs) != count else costs
    return [float(c) for c in multihost_utils.broadcast_one_to_all(np.asarray(mine, np.float32))]
