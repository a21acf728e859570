"""The speculative decoding engine: prefill, then jitted rounds of draft tree -> verify -> accept
-> commit -> re-draft, with static shapes and no host sync inside a round.

Mirrors the reference's `eagenerate` loop (`model/ea_model_griffin.py`, `model/utils.py`: spec 5.1,
5.3-5.8) for any draft behind the one draft interface (GRIFFIN or EAGLE-2). Differences that are
deliberate:
- batch B >= 1 with right-padded prompts: each row accepts its own number of tokens, finished
  rows stop contributing (their cache lengths and trunk stop moving);
- exactly `max_new_tokens` at most (the reference overshoots), stop at any EOS id per row;
- sampling applies the logits processor in every branch of the acceptance (spec 5.5);
- rounds run in one jitted device loop over a donated state (`run_segment`), one program for
  every round shape of the budget: the host reads back the `done` flags once per call (and
  the new tokens every round when streaming).

A round of a tree shape, per row (the state holds the draft's level-1 outputs for the root):
1. draft: the tree is built from the root (the last emitted token) and the trunk's outputs;
2. verify: one base forward over the M tree tokens at slots length.., positions length + depth;
3. accept: the walk down the tree along the children equal to the base's next token there
   (argmax, or the position-keyed draw), plus the bonus token;
4. commit: the root and the accepted nodes' K/V move into place, length += accepted + 1;
5. trunk: the draft consumes (feature, next token) for the A path slots (entries past the
   accepted ones are garbage and never committed) and leaves its level-1 outputs for the next
   root.
A plain round (shape `None` of the adaptive budget, `budget.py`) verifies the root alone: one
base decode step. Its (feature, token) pair waits in a pending buffer of Q slots, and the
draft trunk catches up over all of them in one forward when the policy resumes drafting. A
probe (`budget.py`: drafting rounds that refresh the statistics after a plain streak) starts
with a catch-up over only the latest CATCH_UP_SHORT pending positions, and so does a full
buffer: the earlier ones are left out of the draft trunk for good (`SpecState.trunk_skipped`;
the trunk's later entries keep their true RoPE positions), so a probe costs a few plain steps
rather than a draft forward over a whole prompt, and a long plain streak runs no draft forward
but a short one every Q rounds. The shape of each round is chosen on the device
(`budget.choose`), inside the round.
With plain rounds among the shapes, `generate` leaves the prompt's trunk pending too
(`Shapes.prompt_pending`) when the first round decodes plainly or probes: a batch that never
drafts never runs the draft at all; one whose first round drafts runs it in the prefill.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from griffin_jax import budget as budget_lib
from griffin_jax import checks, cpu_kernels, sampling, sharding, steal, vanilla
from griffin_jax import tree as tree_lib
from griffin_jax.config import ModelConfig, TreeConfig
from griffin_jax.draft import (
    DraftCache,
    DraftConfig,
    draft_forward,
    feature_layers,
    init_draft_cache,
)
from griffin_jax.kv_cache import KVCache, causal_mask, commit_path, init_cache
from griffin_jax.layers import kernel_of, plain_kernel, smallest_holding
from griffin_jax.model import forward as base_forward
from griffin_jax.model import head_logits, is_unstacked, lm_head

Shape = budget_lib.Shape
# Plain rounds the draft trunk may lag behind before a catch-up forward. Large, so that a long
# plain streak (the budget backing off) rarely stops for a catch-up (a trunk forward, and in
# the server's engine a host sync); 128 rounds cost 4% less per token than 16 here.
PENDING = 128
# A catch-up after at most this many plain rounds forwards only that many slots, and a probe's
# (or a full buffer's) catch-up forwards at most this many (the latest) pending positions.
CATCH_UP_SHORT = 16


def run_if(pred: jax.Array, fn: Callable, carry):
    """`fn(carry)` when `pred` (a traced bool), else `carry`: a loop of at most one trip.

    Not a `lax.cond`: XLA copies every buffer that passes through a conditional's branches
    (copy insertion gives its results buffers of their own), so a branch that updates a cache
    in place would first copy all of it; a while loop updates its carry in place."""
    return jax.lax.while_loop(
        lambda c: c[0], lambda c: (jnp.bool_(False), fn(c[1])), (jnp.asarray(pred), carry)
    )[1]


def switch_in_place(index: jax.Array, branches: Sequence[Callable], carry):
    """`lax.switch(index, branches, carry)` for branches that update large buffers of `carry`
    (each `run_if`, in turn: the caches stay in place; `index` outside the range runs none;
    one branch runs unconditionally, as in `lax.switch`)."""
    if len(branches) == 1:
        return branches[0](carry)
    for i, fn in enumerate(branches):
        carry = run_if(index == i, fn, carry)
    return carry


@flax.struct.dataclass
class SpecState:
    """Everything a round reads and writes (donated between rounds)."""

    cache: KVCache  # base cache; length = committed tokens (the pending root is not in it)
    draft_cache: DraftCache
    trunk_len: jax.Array  # [B] int32 draft cache slots holding true-feature trunk entries
    # [B] int32 positions a probe's (or a full buffer's) catch-up left out of the trunk: slot s
    # of the later entries (and of the tree levels) runs at RoPE position s + trunk_skipped
    trunk_skipped: jax.Array
    root: jax.Array  # [B] int32 the last emitted token (the next tree's root, not yet verified)
    root_logprobs: jax.Array  # [B, V'] f32 the draft's level-1 log-probs after the trunk
    root_feature: jax.Array  # [B, Dm] the draft's next-feature output there
    pending_features: jax.Array  # [B, Q, D] base features of plain rounds not yet in the trunk
    pending_tokens: jax.Array  # [B, Q] int32 the token paired with each (x_{p+1} for f_p)
    out_tokens: jax.Array  # [B, N_out] int32 new tokens (valid up to num_out)
    num_out: jax.Array  # [B] int32
    done: jax.Array  # [B] bool
    accept_log: jax.Array  # [B, R] int32 accepted draft tokens emitted per round (-1 = no round)
    shape_log: jax.Array  # [B, R] int32 the budget's shape index of each round (-1 = no round)
    rounds: jax.Array  # [B] int32 rounds while the row was active
    keys: jax.Array  # [B] row PRNG keys (a draw at sequence index i folds in i)
    hits: jax.Array  # [B, L] f32 decayed accepted-level counts (`budget.update_stats`)
    trials: jax.Array  # [B, L] f32 decayed tried-level counts
    # The same counts without the prior's pseudo-counts: what the row's own rounds showed
    # (`budget.History` learns from these, never from its own prior fed back).
    own_hits: jax.Array  # [B, L] f32
    own_trials: jax.Array  # [B, L] f32
    # [B, 2, CONF_BINS] f32 level-1 (hits, trials) per bin of the draft's confidence entering
    # the round (`budget.update_conf`; no prior in them)
    conf_counts: jax.Array
    plain_streak: jax.Array  # [] int32 plain rounds in a row (< 0: probe rounds left)
    probe_wait: jax.Array  # [] int32 the plain streak the next probe waits for
    step: jax.Array  # [] int32 rounds run (indexes `Budget.schedule`)
    next_shape: jax.Array  # [] int32 the budget's choice for the next round

    @property
    def pending_len(self) -> jax.Array:
        """[B] int32 positions waiting in the pending buffer for the draft trunk: the committed
        ones neither in the trunk nor left out of it. Derived, not carried: a plain round
        carrying a count of its own cost ~35 us more here (batch 1), ~5% of a plain step."""
        return self.cache.length - self.trunk_len - self.trunk_skipped


@flax.struct.dataclass
class Knobs:
    """Traced sampling settings (never static: a new value must not recompile)."""

    temperature: jax.Array  # [] or [B] f32
    top_p: jax.Array  # [] or [B] f32
    top_k: jax.Array  # [] or [B] int32
    max_new: jax.Array  # [] or [B] int32
    eos_ids: jax.Array  # [E] or [B, E] int32, -1 padded (vanilla.eos_array)


@flax.struct.dataclass
class Prefix:
    """A prompt's first tokens already in both caches (chunked prefill, `prefill_chunk`):
    `prefill` of the rest continues from here."""

    cache: KVCache  # base K/V of positions < start
    draft_cache: DraftCache  # draft trunk of positions < start (f_p paired with x_{p+1})
    start: jax.Array  # [B] int32 prompt tokens written


@dataclasses.dataclass(frozen=True)
class Shapes:
    """Static sizes of one compiled engine."""

    batch: int
    prompt_bucket: int
    capacity: int  # base cache slots
    draft_capacity: int
    out_size: int  # output buffer (>= max_new + A)
    pending: int = PENDING  # pending buffer slots (plain rounds, and the prompt if below)
    prompt_pending: bool = False  # prefill leaves the prompt's trunk in the pending buffer


@dataclasses.dataclass
class SpecResult:
    output_ids: list[list[int]]  # new ids per row, stop token included
    accept_lengths: list[list[int]]  # accepted draft tokens per round, per row
    rounds: list[int]
    round_shapes: list[list[int]] = dataclasses.field(default_factory=list)  # budget index
    # The rows' own counts at the end ([B, L], `SpecState.own_hits` / `own_trials`: no prior
    # in them), the policy's probe wait and plain streak: what `budget.History` learns from.
    level_hits: np.ndarray | None = None
    level_trials: np.ndarray | None = None
    conf_counts: np.ndarray | None = None  # [B, 2, CONF_BINS] (`SpecState.conf_counts`)
    probe_wait: int | None = None
    plain_streak: int = 0
    plain_program: bool = False  # the plain decoder's program ran the batch (`plain_throughout`)

    @property
    def new_tokens(self) -> int:
        return sum(len(o) for o in self.output_ids)

    @property
    def tau(self) -> float:
        """Tokens committed per verification forward (accepted + bonus), over all rounds."""
        lens = [a for row in self.accept_lengths for a in row]
        return float(np.mean(lens) + 1.0) if lens else 0.0


@flax.struct.dataclass
class DraftHead:
    """The base lm_head restricted to a token subset, for drafting only.

    On a small base the draft's lm_head (every tree level, V x D) is a large share of a round;
    drafting from the V' most frequent tokens cuts it V / V'-fold. Lossless: acceptance reads
    only the base's logits and the tree's tokens, so a token the draft cannot propose only
    costs acceptance, never correctness (EAGLE-3 drafts from a reduced vocabulary the same way).
    """

    token_ids: jax.Array  # [V'] int32, the columns' token ids
    kernel: jax.Array  # [D, V'] the base lm_head's columns for them


def resolve_head(draft_params, draft_head: DraftHead | None, dcfg: DraftConfig):
    """The head a round drafts through: EAGLE-3's own lm_head over its draft vocabulary (target
    id of draft index i: i + d2t[i]), else `draft_head` (None: the base lm_head)."""
    if dcfg.kind != "eagle3":
        return draft_head
    if draft_head is not None:
        raise ValueError(
            "an EAGLE-3 draft drafts from its own vocabulary (its lm_head and d2t): "
            "draft_head must be None"
        )
    kernel = kernel_of(draft_params["lm_head"])  # [D, V'], or packed (`cpu_kernels.pack`)
    _, width = cpu_kernels.kernel_shape(kernel)
    ids = jnp.arange(width, dtype=jnp.int32) + draft_params["d2t"].astype(jnp.int32)
    return DraftHead(token_ids=ids, kernel=kernel)


def draft_vocab_size(cfg: ModelConfig, dcfg: DraftConfig | None, head: DraftHead | None) -> int:
    """V': the width of the draft's level-1 log-probs (the tree's top-k must fit in it)."""
    if dcfg is not None and dcfg.kind == "eagle3":
        return dcfg.draft_vocab
    return cfg.vocab_size if head is None else int(head.token_ids.shape[0])


def make_draft_head(base_params, cfg: ModelConfig, token_ids: Sequence[int]) -> DraftHead:
    """A DraftHead over `token_ids` (e.g. the first V' of a frequency ranking)."""
    ids = np.asarray(token_ids, np.int32)
    if ids.ndim != 1 or len(ids) == 0 or len(set(ids.tolist())) != len(ids):
        raise ValueError("draft vocabulary: expected distinct token ids")
    if ids.min() < 0 or ids.max() >= cfg.vocab_size:
        raise ValueError(f"draft vocabulary: token ids must be in [0, {cfg.vocab_size})")
    if cfg.tie_embeddings:
        kernel = jnp.take(base_params["embed_tokens"]["embedding"], ids, axis=0).T
    else:
        head = base_params["lm_head"]
        kernel = jnp.take(plain_kernel(head), ids, axis=1)
        if cpu_kernels.PACKED in head and cpu_kernels.can_pack(kernel):  # the base's layout
            kernel = cpu_kernels.pack(kernel)
    return DraftHead(token_ids=jnp.asarray(ids), kernel=kernel)


def _draft_logits(base_params, hidden, head: DraftHead | None, *, cfg: ModelConfig):
    if head is None:
        return lm_head(base_params, hidden, cfg=cfg)
    return head_logits(hidden, head.kernel)


def plan_shapes(
    prompt_lens: Sequence[int],
    max_new_tokens: int,
    trees: TreeConfig | Sequence[Shape],
    *,
    prompt_bucket: int | None = None,
    prompt_pending: bool = False,
) -> Shapes:
    """Static sizes for a batch and every round shape (the caller checks the position limit:
    `checks.generation`).

    prompt_bucket: the cache slots reserved for the prompt (default: the length bucket of the
      longest prompt); the engine passes 0 with max_new_tokens = its whole model length.
    prompt_pending: prefill leaves the prompt's draft trunk to the first catch-up (the pending
      buffer grows by the prompt bucket); for budgets with plain rounds, not chunked prefill.
    """
    trees = (trees,) if isinstance(trees, TreeConfig) else tuple(trees)
    path_len = max(budget_lib.path_len(t) for t in trees)
    total = max(1 if t is None else t.total_tokens for t in trees)
    tree_slots = max(0 if t is None else t.top_k * (t.depth + 1) for t in trees)
    bucket = vanilla.prompt_bucket(max(prompt_lens)) if prompt_bucket is None else prompt_bucket
    out_size = -(-(max_new_tokens + path_len) // 64) * 64
    # A running row starts a round at length <= prompt + max_new - 2 and writes at most
    # `total` slots from there; a row that ended may write past that, clamped, into its own
    # garbage. path_len more is slack.
    needed = bucket + max_new_tokens + total + path_len
    capacity = -(-needed // 64) * 64
    pending = PENDING + bucket if prompt_pending else PENDING
    # A catch-up writes all `pending` slots from the trunk's end (those past a row's own are
    # garbage, overwritten later), so they must fit.
    draft_capacity = capacity + max(path_len, pending) + tree_slots
    return Shapes(
        len(prompt_lens), bucket, capacity, draft_capacity, out_size, pending=pending,
        prompt_pending=prompt_pending,
    )  # fmt: skip


def _draft_step(
    base_params, draft_params, head: DraftHead | None, *, cfg: ModelConfig, dcfg: DraftConfig
) -> Callable:
    """The tree builder's draft step: draft forward + the base lm_head (or `head`) for logits."""
    embedding = base_params["embed_tokens"]["embedding"]

    def step(features, tokens, positions, cache, write_idx, mask):
        token_feature, next_feature, cache = draft_forward(
            draft_params, embedding, features, tokens, positions, cache,
            write_idx=write_idx, mask=mask, dcfg=dcfg,
        )  # fmt: skip
        return _draft_logits(base_params, token_feature, head, cfg=cfg), next_feature, cache

    return step


def _trunk_forward(
    base_params, draft_params, head: DraftHead | None, features, tokens, positions, dcache, *,
    write_idx, mask, last: jax.Array, cfg: ModelConfig, dcfg: DraftConfig,
):  # fmt: skip
    """The draft trunk over T new (feature, token) pairs: (dcache, root_logprobs [B, V'],
    root_feature [B, D]), the next tree's level-1 inputs from the output at per-row index
    `last` [B]. Only that position runs past the K/V projections (`draft_forward`'s
    `outputs_at`), which halves the trunk over a prompt here (batch 4, 256 slots: 4.8 ms
    against 9.3) and spares a quarter of a one-row 8-token trunk (0.20 ms against 0.28)."""
    token_feature, next_feature, dcache = draft_forward(
        draft_params, base_params["embed_tokens"]["embedding"], features, tokens, positions,
        dcache, write_idx=write_idx, mask=mask, dcfg=dcfg, outputs_at=last[:, None],
    )  # fmt: skip
    logits = _draft_logits(base_params, token_feature[:, 0], head, cfg=cfg)  # [B, V']
    return dcache, jax.nn.log_softmax(logits, axis=-1), next_feature[:, 0]


def _build_tree(
    step, root_lp, root_feat, root, trunk_len, trunk_skipped, dcache, head, *, tree_cfg, shapes
):  # fmt: skip
    # Path order does not matter to the keyed acceptance (sampling.accept_nodes), so sampling
    # skips the reference's lexicographic sort (which fixed its sibling-rejection order).
    return tree_lib.build_tree(
        step, root_lp, root_feat, root, trunk_len, dcache, trunk_position=trunk_len + trunk_skipped,
        top_k=tree_cfg.top_k, depth=tree_cfg.depth, total_tokens=tree_cfg.total_tokens,
        capacity=shapes.draft_capacity, lexicographic_paths=False,
        token_ids=None if head is None else head.token_ids,
    )  # fmt: skip


def _is_eos(tokens: jax.Array, eos_ids: jax.Array) -> jax.Array:
    """tokens [B, ...] against stop ids [E] (every row) or [B, E] (per row)."""
    if eos_ids.ndim == 2:
        eos_ids = eos_ids.reshape(eos_ids.shape[:1] + (1,) * (tokens.ndim - 1) + eos_ids.shape[1:])
    return jnp.any(tokens[..., None] == eos_ids, axis=-1)


def _empty_prefix(base_params, batch: int, *, cfg, dcfg, shapes: Shapes, mesh) -> Prefix:
    """Empty base and draft caches of the full capacities: a prompt's first tokens go here."""
    dtype = base_params["embed_tokens"]["embedding"].dtype
    cache = init_cache(cfg, batch, shapes.capacity, dtype, per_layer=is_unstacked(base_params))
    dcache = init_draft_cache(dcfg, batch, shapes.draft_capacity, dtype)
    return Prefix(
        cache=sharding.constrain(cache, mesh),
        draft_cache=sharding.constrain(dcache, mesh),
        start=jnp.zeros((batch,), jnp.int32),
    )


def prefill_chunk(
    base_params,
    draft_params,
    prefix: Prefix | None,
    tokens: jax.Array,
    next_tokens: jax.Array,
    *,
    cfg: ModelConfig,
    dcfg: DraftConfig,
    shapes: Shapes,
    mesh: jax.sharding.Mesh | None = None,
) -> Prefix:
    """Chunked prefill: C more prompt tokens into the base cache and the draft trunk.

    Nothing is sampled; `prefill(..., prefix=...)` of the prompt's last part follows. The trunk
    pairs f_p with x_{p+1}, so the chunk's last position pairs with `next_tokens`, the prompt's
    token after the chunk. Attention reads the occupied slots only (`layers.gqa_attention`: the
    CPU kernel or the windows), so a chunk early in a long prompt does not pay for the whole
    cache.

    Args:
      prefix: what earlier chunks wrote (None: the prompt's first chunk).
      tokens: [B, C] int32 prompt tokens at positions start .. start + C - 1 (no padding).
      next_tokens: [B] int32 the prompt token at position start + C.
    """
    b, c = tokens.shape
    if prefix is None:
        prefix = _empty_prefix(base_params, b, cfg=cfg, dcfg=dcfg, shapes=shapes, mesh=mesh)
    start = prefix.start
    positions = start[:, None] + jnp.arange(c, dtype=jnp.int32)[None, :]
    _, hidden, cache = base_forward(
        base_params, tokens, positions, prefix.cache, write_idx=start,
        mask=causal_mask(start, c, shapes.capacity), cfg=cfg,
        feature_layers=feature_layers(dcfg, cfg.n_layers),
    )  # fmt: skip
    pair_tokens = jnp.concatenate([tokens[:, 1:], next_tokens[:, None]], axis=1)
    _, _, dcache = draft_forward(
        draft_params, base_params["embed_tokens"]["embedding"], hidden, pair_tokens, positions,
        prefix.draft_cache, write_idx=start, mask=causal_mask(start, c, shapes.draft_capacity),
        dcfg=dcfg,
    )  # fmt: skip
    prefix = Prefix(cache=cache, draft_cache=dcache, start=start + c)
    return sharding.constrain(prefix, mesh)


@functools.partial(jax.jit, static_argnames=("cfg", "dcfg", "greedy", "shapes", "mesh"))
def prefill(
    base_params,
    draft_params,
    tokens: jax.Array,
    lengths: jax.Array,
    knobs: Knobs,
    seeds: jax.Array,
    budget: budget_lib.Budget,
    draft_head: DraftHead | None = None,
    *,
    cfg: ModelConfig,
    dcfg: DraftConfig,
    greedy: bool | None,
    shapes: Shapes,
    mesh: jax.sharding.Mesh | None = None,
    prefix: Prefix | None = None,
) -> SpecState:
    """Base prefill, the first (root) token and the draft trunk over the prompt.

    The first round drafts its tree from the trunk's level-1 outputs kept in the state.

    Args:
      tokens: [B, T] int32 right-padded prompts (T = the length bucket); with `prefix`, the
        prompts' remaining tokens.
      lengths: [B] int32 true lengths of `tokens` (>= 1).
      seeds: [B] uint32 sampling seeds (`sampling.row_keys`; unused when greedy).
      budget: the round shapes (sizes the statistics; `budget.Budget`).
      greedy: True = argmax, False = sampling, None = per row by temperature
        (`sampling.next_token`); knobs may be scalars or one per row.
      mesh: when given, the caches are created sharded and the state is pinned
        (`sharding.constrain`); the params arrive sharded.
      prefix: the caches of the prompts' first tokens (`prefill_chunk`), or None.
    """
    b, t = tokens.shape
    draft_head = resolve_head(draft_params, draft_head, dcfg)
    rows = jnp.arange(b)
    prefix_given = prefix is not None
    if prefix is None:  # attention reads the slots < T only
        prefix = _empty_prefix(base_params, b, cfg=cfg, dcfg=dcfg, shapes=shapes, mesh=mesh)
        spans = (t, t)
    else:
        spans = (shapes.capacity, shapes.draft_capacity)
    start = prefix.start
    total = start + lengths  # prompt lengths
    positions = start[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
    last = lengths - 1
    with jax.named_scope("prefill/base"):
        logits, hidden, cache = base_forward(
            base_params, tokens, positions, prefix.cache,
            write_idx=start, mask=causal_mask(start, t, spans[0]), cfg=cfg,
            feature_layers=feature_layers(dcfg, cfg.n_layers), logits_at=last[:, None],
        )  # fmt: skip
        cache = cache.replace(length=total)
    keys = sampling.row_keys(seeds)
    root = sampling.next_token(
        keys, total, logits[:, 0], greedy=greedy,
        temperature=knobs.temperature, top_p=knobs.top_p, top_k=knobs.top_k,
    )  # fmt: skip
    # Draft position p pairs feature f_p with token x_{p+1}; the last pairs with the root.
    pair_tokens = jnp.concatenate([tokens[:, 1:], jnp.zeros((b, 1), jnp.int32)], axis=1)
    pair_tokens = pair_tokens.at[rows, last].set(root)

    def trunk(dcache):
        return _trunk_forward(
            base_params, draft_params, draft_head, hidden, pair_tokens, positions, dcache,
            write_idx=start, mask=causal_mask(start, t, spans[1]), last=last, cfg=cfg, dcfg=dcfg,
        )  # fmt: skip

    pending_features = jnp.zeros((b, shapes.pending, hidden.shape[-1]), hidden.dtype)
    pending_tokens = jnp.zeros((b, shapes.pending), jnp.int32)
    if shapes.prompt_pending and (prefix_given or t > shapes.pending):
        raise ValueError("prompt_pending: the whole prompt in one prefill, within the buffer")
    hits, trials = budget_lib.init_stats(budget, b, knobs.temperature, greedy=greedy)
    done = _is_eos(root, knobs.eos_ids) | (knobs.max_new <= 1)
    if shapes.prompt_pending:  # the first catch-up runs the trunk over the prompt ...
        dcache = prefix.draft_cache
        root_lp, root_feat = (
            jnp.zeros(x.shape, x.dtype) for x in jax.eval_shape(trunk, dcache)[1:]
        )  # fmt: skip
        pending_features = pending_features.at[:, :t].set(hidden)
        pending_tokens = pending_tokens.at[:, :t].set(pair_tokens)
        # ... unless the first round drafts: then this forward over the prompt's own T slots
        # runs it, where the catch-up's over a larger program size, attending over the whole
        # draft cache, cost ~1.5 ms more a batch-1 call here (~4% of a 96-token one). Not for
        # a probe, whose catch-up forwards only the prompt's latest positions (`_catch_up`).
        first = _first_choice(budget, knobs, ~done, lengths, greedy=greedy, shapes=shapes)
        eager = jnp.asarray([s is not None for s in budget.shapes])[first]
        eager &= ~budget_lib.probe_due(budget.start_streak, budget.start_wait)
        with jax.named_scope("prefill/draft_trunk"):
            dcache, root_lp, root_feat = run_if(
                eager, lambda carry: trunk(carry[0]), (dcache, root_lp, root_feat)
            )  # fmt: skip
        trunk_len = jnp.where(eager, total, start)  # the prompt pending, or not
    else:
        with jax.named_scope("prefill/draft_trunk"):
            dcache, root_lp, root_feat = trunk(prefix.draft_cache)
        trunk_len = total
    out_tokens = jnp.zeros((b, shapes.out_size), jnp.int32).at[:, 0].set(root)
    state = SpecState(
        cache=cache,
        draft_cache=dcache,
        trunk_len=trunk_len,
        trunk_skipped=jnp.zeros((b,), jnp.int32),
        root=root,
        root_logprobs=root_lp,
        root_feature=root_feat,
        pending_features=pending_features,
        pending_tokens=pending_tokens,
        out_tokens=out_tokens,
        num_out=jnp.ones((b,), jnp.int32),
        done=done,
        accept_log=jnp.full((b, shapes.out_size), -1, jnp.int32),
        shape_log=jnp.full((b, shapes.out_size), -1, jnp.int32),
        rounds=jnp.zeros((b,), jnp.int32),
        keys=keys,
        hits=hits,
        trials=trials,
        own_hits=jnp.zeros_like(hits),
        own_trials=jnp.zeros_like(trials),
        conf_counts=jnp.zeros((b, 2, budget_lib.CONF_BINS), jnp.float32),
        plain_streak=budget.start_streak,
        probe_wait=budget.start_wait,
        step=jnp.int32(0),
        next_shape=jnp.int32(0),
    )
    return sharding.constrain(_with_choice(state, budget, knobs, shapes, greedy), mesh)


def _emit(state: SpecState, emitted, n_new, knobs: Knobs, shape_index) -> SpecState:
    """Appends each running row's new tokens (cut at a stop id or max_new) and logs the round.

    emitted: [B, A] int32 (entries past n_new[b] are filler); n_new: [B] tokens committed.
    """
    b, a_len = emitted.shape
    rows = jnp.arange(b)
    slot = jnp.arange(a_len)
    active = ~state.done
    eos_hit = _is_eos(emitted, knobs.eos_ids) & (slot[None, :] < n_new[:, None])
    upto_eos = jnp.where(jnp.any(eos_hit, axis=1), jnp.argmax(eos_hit, axis=1) + 1, n_new)
    n_emit = jnp.where(active, jnp.minimum(upto_eos, knobs.max_new - state.num_out), 0)
    out_tokens = jax.vmap(
        lambda buf, new, start: jax.lax.dynamic_update_slice_in_dim(buf, new, start, 0)
    )(state.out_tokens, emitted, state.num_out)
    num_out = state.num_out + n_emit
    done = state.done | (active & jnp.any(eos_hit, axis=1)) | (num_out >= knobs.max_new)
    # The round's accepted draft tokens as emitted (a stop token or max_new_tokens cut the last
    # round short), so tau = emitted tokens per verification forward.
    at = (rows, state.rounds)
    accept_log = state.accept_log.at[at].set(jnp.where(active, n_emit - 1, state.accept_log[at]))
    shape_log = state.shape_log.at[at].set(jnp.where(active, shape_index, state.shape_log[at]))
    return state.replace(
        out_tokens=out_tokens,
        num_out=num_out,
        done=done,
        accept_log=accept_log,
        shape_log=shape_log,
        rounds=state.rounds + active.astype(jnp.int32),
        step=state.step + 1,
    )


def catch_up_sizes(pending: int) -> list[int]:
    """The slot counts a catch-up forward may take (ascending, the last = the whole buffer):
    CATCH_UP_SHORT, PENDING, then doubling (a pending prompt fills the buffer's tail part)."""
    sizes, q = {CATCH_UP_SHORT, PENDING, pending}, 2 * PENDING
    while q < pending:
        sizes.add(q)
        q *= 2
    return sorted(x for x in sizes if x <= pending)


def catch_up_slots(most: jax.Array | int, pending: int) -> jax.Array:
    """The slots the catch-up forward runs over (int32; 0 when nothing is pending): the
    fewest of `catch_up_sizes(pending)` that hold `most`, the longest row's pending count."""
    sizes = catch_up_sizes(pending)
    fewest = smallest_holding(most, sizes)
    return jnp.where(jnp.asarray(most) > 0, jnp.asarray(sizes, jnp.int32)[fewest], 0)


def probe_pending(pending_len: jax.Array, probing: jax.Array | bool) -> jax.Array:
    """[B] int32 the pending positions a catch-up forwards: all, or when it starts a probe
    (`probing`) at most the latest CATCH_UP_SHORT of each row's."""
    return jnp.where(probing, jnp.minimum(pending_len, CATCH_UP_SHORT), pending_len)


def _catch_up(
    state: SpecState, base_params, draft_params, draft_head, *, cfg, dcfg, shapes,
    probing: jax.Array | bool = False,
) -> SpecState:  # fmt: skip
    """Runs the draft trunk over the pending positions (plain rounds', and a lazily left
    prompt's): one forward of the fewest of `catch_up_sizes` slots that holds every row's
    (drafting resuming after a short plain streak: ~1 ms here instead of ~3.4 for 128 slots).

    probing (traced bool): the catch-up starts a probe (or empties a full buffer during a plain
    streak), which forwards only each row's latest CATCH_UP_SHORT pending positions
    (`probe_pending`); the earlier ones never enter the trunk (`SpecState.trunk_skipped`),
    the forwarded ones keep their true RoPE positions. A probe only measures whether drafting
    pays again; the whole prompt's catch-up (at batch 8 here ~0.2 s for 256-token prompts,
    ~25 plain steps) would make it the dearest round of a batch that does not draft.

    Rows with nothing pending keep their level-1 inputs; their writes past the trunk are
    garbage by contract and are overwritten before anything attends to them.
    """
    trunk = state.trunk_len
    n = probe_pending(state.pending_len, probing)
    skip = state.pending_len - n  # the oldest pending positions, left out
    skipped = state.trunk_skipped + skip

    def forward(q: int):
        def run(carry):
            at = jnp.minimum(skip[:, None] + jnp.arange(q)[None, :], shapes.pending - 1)
            return _trunk_forward(
                base_params, draft_params, draft_head,
                jnp.take_along_axis(state.pending_features, at[:, :, None], axis=1),
                jnp.take_along_axis(state.pending_tokens, at, axis=1),
                (trunk + skipped)[:, None] + jnp.arange(q)[None, :], carry[0],
                write_idx=trunk, mask=causal_mask(trunk, q, shapes.draft_capacity),
                last=jnp.maximum(n - 1, 0), cfg=cfg, dcfg=dcfg,
            )  # fmt: skip

        return run

    sizes = catch_up_sizes(shapes.pending)
    with jax.named_scope("draft/catch_up"):
        start = (state.draft_cache, state.root_logprobs, state.root_feature)
        fewest = smallest_holding(jnp.max(n), sizes)  # the program of `catch_up_slots`
        dcache, lp, feat = switch_in_place(fewest, [forward(q) for q in sizes], start)
    has = n > 0
    return state.replace(
        draft_cache=dcache,
        trunk_len=trunk + n,
        trunk_skipped=skipped,
        root_logprobs=jnp.where(has[:, None], lp, state.root_logprobs),
        root_feature=jnp.where(has[:, None], feat, state.root_feature),
    )


def _plain_round(state, base_params, draft_params, knobs, draft_head, shape_index, **static):
    """A plain decode step on the speculative state: verify the root alone, emit the next token.

    The draft trunk is not run: the step's (feature, token) pair waits in the pending buffer
    (flushed by `_catch_up` at the start of a segment: when drafting resumes, or only its
    latest CATCH_UP_SHORT positions when it is full).
    """
    cfg, greedy, shapes = static["cfg"], static["greedy"], static["shapes"]
    active = ~state.done
    cache = state.cache
    length = cache.length
    pending = state.pending_len  # the slot this round's (feature, token) pair takes
    layers = feature_layers(static["dcfg"], cfg.n_layers) if static["drafting"] else ()
    with jax.named_scope("verify"):
        logits, hidden, cache = base_forward(
            base_params, state.root[:, None], length[:, None], cache, write_idx=length,
            mask=causal_mask(length, 1, shapes.capacity), cfg=cfg, feature_layers=layers,
        )  # fmt: skip
    token = sampling.next_token(
        state.keys, length + 1, logits[:, 0], greedy=greedy,
        temperature=knobs.temperature, top_p=knobs.top_p, top_k=knobs.top_k,
    )  # fmt: skip
    state = _emit(state, token[:, None], jnp.ones_like(length), knobs, shape_index)
    step = active.astype(jnp.int32)
    state = state.replace(
        cache=cache.replace(length=length + step),
        root=jnp.where(active, token, state.root),
    )
    if not static["drafting"]:  # no shape drafts: the trunk never needs these positions
        return state
    rows = jnp.arange(token.shape[0])
    at = (rows, pending)  # the committed length's step makes it pending (`pending_len`)
    return state.replace(
        pending_features=state.pending_features.at[at].set(hidden[:, 0]),
        pending_tokens=state.pending_tokens.at[at].set(token),
    )


def _tree_round(state, base_params, draft_params, knobs, draft_head, shape_index, **static):
    """Draft a tree -> verify -> accept -> commit -> draft trunk (see the module docstring)."""
    cfg, dcfg, greedy, shapes = static["cfg"], static["dcfg"], static["greedy"], static["shapes"]
    tree_cfg = static["tree_cfg"]
    step = _draft_step(base_params, draft_params, draft_head, cfg=cfg, dcfg=dcfg)
    tree, dcache = _build_tree(
        step, state.root_logprobs, state.root_feature, state.root, state.trunk_len,
        state.trunk_skipped, state.draft_cache, draft_head, tree_cfg=tree_cfg, shapes=shapes,
    )  # fmt: skip
    b = tree.draft_tokens.shape[0]
    a_len = tree_cfg.path_len
    rows = jnp.arange(b)
    active = ~state.done
    cache = state.cache
    positions = tree_lib.verify_positions(tree, cache.length)  # [B, M]
    with jax.named_scope("verify"):
        logits, hidden, cache = base_forward(
            base_params, tree.draft_tokens, positions, cache, write_idx=cache.length,
            mask=tree_lib.verify_mask(tree, cache.length, shapes.capacity), cfg=cfg,
            feature_layers=feature_layers(dcfg, cfg.n_layers),
        )  # fmt: skip
    with jax.named_scope("accept"):
        # The base's next token after every node (argmax, or the position-keyed draw), then
        # the walk down the tree along the children that match (sampling.py).
        node_targets, logprobs = sampling.draws(
            state.keys, positions + 1, logits, greedy=greedy,
            temperature=knobs.temperature, top_p=knobs.top_p, top_k=knobs.top_k,
        )  # fmt: skip
        acc = sampling.accept_nodes(
            tree.draft_tokens, node_targets, tree.retrieve_idx, tree.path_mask
        )
    accept_len = acc.accept_len
    best_nodes = tree.retrieve_idx[rows, acc.best_path]  # [B, A]
    with jax.named_scope("stats"):
        chance = sampling.parent_draw_chance(
            tree.draft_tokens, tree.parents, node_targets, logprobs, knobs.temperature
        )
        level_hit, level_tried = budget_lib.reach_stats(
            chance, tree.tree_mask, tree.depths, tree_cfg.depth + 1, state.hits.shape[1]
        )
        hits, trials = budget_lib.update_stats(
            state.hits, state.trials, level_hit, level_tried, active
        )
        own_hits, own_trials = budget_lib.update_stats(
            state.own_hits, state.own_trials, level_hit, level_tried, active
        )
        conf_counts = budget_lib.update_conf(
            state.conf_counts, budget_lib.draft_confidence(state.root_logprobs),
            level_hit[:, 0], level_tried[:, 0], active,
        )  # fmt: skip
    path_tokens = tree.path_tokens()[rows, acc.best_path]  # [B, A] root first
    slot = jnp.arange(a_len)
    # Emitted this round: the accepted draft tokens, then the bonus; past it, filler.
    shifted = jnp.concatenate([path_tokens[:, 1:], jnp.zeros((b, 1), jnp.int32)], axis=1)
    emitted = jnp.where(slot[None, :] < accept_len[:, None], shifted, acc.bonus_token[:, None])
    n_new = accept_len + 1
    with jax.named_scope("stop"):
        state = _emit(state, emitted, n_new, knobs, shape_index)
    with jax.named_scope("commit"):
        n_commit = jnp.where(active, n_new, 0)
        if tree_cfg.top_k == 1:
            # A chain's nodes are its one path in depth order (`tree.build_tree`), so the
            # accepted entries already sit at length + a: nothing moves. Skipping the move
            # also spares the depth-0 round two copies of the whole cache that XLA put around
            # it (~8% of that round here).
            cache = cache.replace(length=cache.length + n_commit)
        else:
            cache = commit_path(cache, best_nodes, n_commit)
    with jax.named_scope("draft/trunk"):
        trunk = state.trunk_len
        features = jnp.take_along_axis(hidden, best_nodes[:, :, None], axis=1)  # [B, A, D]
        dcache, root_lp, root_feat = _trunk_forward(
            base_params, draft_params, draft_head, features, emitted,
            (trunk + state.trunk_skipped)[:, None] + slot[None, :], dcache, write_idx=trunk,
            mask=causal_mask(trunk, a_len, shapes.draft_capacity), last=accept_len, cfg=cfg,
            dcfg=dcfg,
        )  # fmt: skip
    return state.replace(
        cache=cache,
        draft_cache=dcache,
        trunk_len=trunk + n_commit,
        root=acc.bonus_token,
        root_logprobs=root_lp,
        root_feature=root_feat,
        hits=hits,
        trials=trials,
        own_hits=own_hits,
        own_trials=own_trials,
        conf_counts=conf_counts,
    )


@functools.partial(jax.jit, static_argnames=("cfg", "dcfg", "tree_cfg", "shapes"))
def draft_tree(
    state: SpecState,
    base_params,
    draft_params,
    draft_head: DraftHead | None = None,
    *,
    cfg: ModelConfig,
    dcfg: DraftConfig,
    tree_cfg: TreeConfig,
    shapes: Shapes,
) -> tree_lib.Tree:
    """The tree a round of `tree_cfg` would verify next from `state` (the state is unchanged;
    its trunk must have caught up: no pending plain rounds). For inspection and profiling."""
    draft_head = resolve_head(draft_params, draft_head, dcfg)
    step = _draft_step(base_params, draft_params, draft_head, cfg=cfg, dcfg=dcfg)
    tree, _ = _build_tree(
        step, state.root_logprobs, state.root_feature, state.root, state.trunk_len,
        state.trunk_skipped, state.draft_cache, draft_head, tree_cfg=tree_cfg, shapes=shapes,
    )  # fmt: skip
    return tree


def _with_choice(
    state: SpecState, budget: budget_lib.Budget, knobs: Knobs, shapes: Shapes, greedy,
    *, caught_up: bool = False,
) -> SpecState:  # fmt: skip
    """The state with the budget's choice for the next round. caught_up (static): nothing is
    pending for the draft trunk (after a drafting round: its catch-up ran before it), which
    spares the choice the pending count and the catch-up's price (a dozen fusions a round)."""
    index = _choice(
        budget, knobs, shapes, state.hits, state.trials, ~state.done, state.plain_streak,
        state.probe_wait, state.step, state.next_shape, state.num_out,
        None if caught_up else state.pending_len,
        first=_first_level(state, budget, knobs, greedy, caught_up=caught_up),
    )  # fmt: skip
    return state.replace(next_shape=index)


def _first_level(
    state: SpecState, budget: budget_lib.Budget, knobs: Knobs, greedy, *, caught_up: bool = False
):  # fmt: skip
    """([B] f32, [B] bool or None) the chance each row's next round accepts level 1, from the
    draft's confidence entering it (`budget.conf_acceptance`), and whether that is known: the
    row's trunk has caught up (a plain round's or a pending prompt's positions leave its
    level-1 outputs stale; None: every row's has). None where `budget.choose` would not read
    it: a fixed tree, or a fixed batch (`Budget.finish`)."""
    if len(budget.shapes) == 1 or budget.finish:
        return None
    sampled = budget_lib.sampled_rows(state.root.shape[0], knobs.temperature, greedy=greedy)
    level = budget_lib.conf_acceptance(
        budget, budget_lib.draft_confidence(state.root_logprobs), state.conf_counts, sampled
    )
    return level, None if caught_up else state.pending_len == 0


def _choice(
    budget, knobs, shapes, hits, trials, active, streak, wait, step, current, num_out, pending,
    first=None,
) -> jax.Array:  # fmt: skip
    """The budget's shape index for the next round (`budget.choose`), from the state's parts;
    `pending` [B] or None (nothing pending); `first`: `_first_level`'s pair, or None (fresh
    rows: their draft has not run)."""
    with jax.named_scope("budget"):
        slots = 0 if pending is None else catch_up_slots(jnp.max(pending), shapes.pending)
        level, known = (None, None) if first is None else first
        return budget_lib.choose(
            budget, hits, trials, active, streak, wait, step, current,
            remaining=knobs.max_new - num_out, catch_up_slots=slots, first_level=level,
            first_known=known,
        )  # fmt: skip


@functools.partial(jax.jit, static_argnames=("greedy", "shapes"))
def _opening_choice(budget, knobs: Knobs, lengths: jax.Array, *, greedy, shapes: Shapes):
    """The shape `prefill` first chooses for a fresh batch whose rows all run (each row's first
    token is not a stop token), the prompt's trunk still pending: int32 scalar. A drafting
    choice makes the prefill run the trunk, and its final choice may then draft deeper (no
    catch-up left to pay); a plain one is its final choice."""
    return _first_choice(
        budget, knobs, jnp.ones(lengths.shape, bool), lengths, greedy=greedy, shapes=shapes
    )


def _first_choice(budget, knobs: Knobs, active, lengths, *, greedy, shapes: Shapes):
    """The budget's choice for a fresh batch's first round (fresh statistics, the budget's
    start streak and wait), the prompts pending when `shapes.prompt_pending`."""
    hits, trials = budget_lib.init_stats(budget, lengths.shape[0], knobs.temperature,
                                         greedy=greedy)  # fmt: skip
    ones = jnp.ones(lengths.shape, jnp.int32)
    return _choice(
        budget, knobs, shapes, hits, trials, active, budget.start_streak, budget.start_wait,
        jnp.int32(0), jnp.int32(0), ones, lengths if shapes.prompt_pending else 0 * ones,
    )  # fmt: skip


def plain_throughout(
    budget: budget_lib.Budget, knobs: Knobs, lengths: np.ndarray, *, max_new_tokens: int,
    greedy: bool | None, shapes: Shapes,
) -> bool:  # fmt: skip
    """Whether the adaptive program would run every round of this batch as a plain decode step,
    so that the plain decoder's own program (`vanilla.generate`) can run it instead: the same
    tokens (greedy argmax, or the same position-keyed draws) in one program. Its plain rounds
    now cost what vanilla's steps do (`SpecState.pending_len`), so this spares the adaptive
    program's heavier launch: its prefill's policy work and a segment dispatch ~0.3 ms dearer
    than a fixed tree's here (batch 1); before the pending count was derived, ~3% of each
    plain step as well.

    True when the budget chooses plain decoding for the first round (`_opening_choice`) and
    nothing can change that before the batch ends: no probe falls due (the plain streak stays
    below the probe wait over the at most max_new_tokens - 1 rounds; a probe spans requests,
    `budget.History`), the pending buffer never fills (which starts a new plain segment whose
    first round weighs the rows again), and no schedule forces a shape. A plain round changes
    no statistics, so the program's later rounds keep the first one's choice (`keep_plain`).
    """
    shapes_ = budget.shapes
    if len(shapes_) < 2 or None not in shapes_:
        return False
    opening = functools.partial(
        _opening_choice, budget, knobs, lengths, greedy=greedy, shapes=shapes
    )  # fmt: skip
    if np.any(np.asarray(budget.schedule) >= 0):
        # A forced schedule is what `SpeculativeModel.warm_up` compiles the adaptive program
        # with: the opening choice compiles there too (not read, no host sync), so that a later
        # call that needs it compiles nothing.
        opening()
        return False
    # The opening choice is a device call and a host sync (~0.35 ms at batch 1 here): only
    # when nothing else rules the plain program out (while the policy drafts, the probe wait
    # is `probe_every` rounds: any longer call has a probe due).
    streak, wait = int(budget.start_streak), int(budget.start_wait)
    if streak < 0 or streak + max_new_tokens - 2 >= wait:  # inside a probe, or one falls due
        return False
    if shapes.prompt_pending and int(np.max(lengths)) + max_new_tokens - 1 >= shapes.pending:
        return False
    return shapes_[int(opening())] is None


def _plain_result(
    res: vanilla.VanillaResult, budget: budget_lib.Budget, n_rows: int
) -> SpecResult:  # fmt: skip
    """A SpecResult for a batch the plain decoder ran (`plain_throughout`): every round a plain
    step, no draft statistics, the plain streak grown by the batch's decode steps."""
    plain = budget.shapes.index(None)
    rounds = [max(len(ids) - 1, 0) for ids in res.output_ids]
    zeros = np.zeros((n_rows, budget.prior.shape[1]), np.float32)
    return SpecResult(
        output_ids=res.output_ids,
        accept_lengths=[[0] * r for r in rounds],
        rounds=rounds,
        round_shapes=[[plain] * r for r in rounds],
        level_hits=zeros,
        level_trials=zeros.copy(),
        probe_wait=int(budget.start_wait),
        plain_streak=int(budget.start_streak) + max(rounds, default=0),
        plain_program=True,
    )


@functools.partial(
    jax.jit,
    static_argnames=("index", "cfg", "dcfg", "greedy", "shapes", "mesh"),
    donate_argnames=("state",),
)
def run_segment(
    state: SpecState,
    base_params,
    draft_params,
    knobs: Knobs,
    budget: budget_lib.Budget,
    draft_head: DraftHead | None = None,
    limit: jax.Array | int = 1 << 30,
    *,
    index: int | None,
    cfg: ModelConfig,
    dcfg: DraftConfig,
    greedy: bool | None,
    shapes: Shapes,
    mesh: jax.sharding.Mesh | None = None,
) -> SpecState:
    """Rounds in one device loop, while some row runs and fewer than `limit` rounds ran.

    index None: rounds of whatever shape the budget chooses (`state.next_shape`), in one
      program for every shape: an outer loop runs each shape's segment in turn, and a segment
      runs its shape's rounds while the budget picks it (none when it picks another), so a
      change of shape costs no host round trip (a host-dispatched segment per change cost ~3 ms
      here, more than a plain step) and the rounds run as fast as in a program of their own.
      The segments follow one another rather than being branches of a `lax.switch`: XLA copies
      every buffer a conditional's branches pass through (`switch_in_place`), here the base and
      draft caches and the pending buffer on every entry into a segment (~13 ms an entry at
      batch 8 with 700-slot caches, this CPU).
    index i: rounds of shape i only, while the budget keeps choosing it (the server's engine
      dispatches its segments by `state.next_shape` from the host).

    Each pass of the outer loop starts with the draft trunk's catch-up the budget's pick needs
    (`_segment_start`), one piece of the program for every shape; a later segment of the same
    pass runs only where none is due. A catch-up in every shape's segment put its forwards (one
    per catch-up size) in the program once per shape, and the host's launch of a program grows
    with its size: an empty call of the batch-1 adaptive program (the default chain's four
    shapes) took 0.71-0.73 ms, now 0.63-0.64 (the fixed tree's 0.34-0.39).
    """
    draft_head = resolve_head(draft_params, draft_head, dcfg)
    run = functools.partial(
        _shape_segment, base_params=base_params, draft_params=draft_params, knobs=knobs,
        budget=budget, draft_head=draft_head, cfg=cfg, dcfg=dcfg, greedy=greedy, shapes=shapes,
    )  # fmt: skip
    start = functools.partial(
        _segment_start, base_params=base_params, draft_params=draft_params, budget=budget,
        draft_head=draft_head, cfg=cfg, dcfg=dcfg, shapes=shapes,
    )  # fmt: skip
    if index is not None:
        state, slots = start(state, limit, index=index)
        state, _ = run(state, limit, slots, index=index)
        return sharding.constrain(state, mesh)

    def cond(carry):
        s, n = carry
        return jnp.any(~s.done) & (n < limit)

    def body(carry):  # the catch-up the budget's pick starts with, then the shapes' segments
        s, n = carry
        s, slots = start(s, limit - n)
        ran_here = jnp.int32(0)
        for i, shape in enumerate(budget.shapes):  # each runs only while the budget picks it
            # After another segment of this pass, only where no catch-up is due: one is the
            # next pass's start.
            first = ran_here == 0
            due = _catch_up_due(s.pending_len, shape is None, shapes.pending)
            rounds_left = jnp.where(first | ~due, limit - n, 0)
            s, ran = run(s, rounds_left, jnp.where(first, slots, 0), index=i)
            ran_here, n = ran_here + ran, n + ran
        return s, n

    state, _ = jax.lax.while_loop(cond, body, (state, jnp.int32(0)))
    return sharding.constrain(state, mesh)


def _segment_start(
    state: SpecState, limit, *, index: int | None = None, base_params, draft_params, budget,
    draft_head, cfg, dcfg, shapes,
) -> tuple[SpecState, jax.Array | int]:  # fmt: skip
    """(state, slots): the draft trunk run over the pending plain-round positions that the
    budget's pick (`state.next_shape`; with `index`, only when it is that shape) needs before its
    segment's rounds: a tree round needs the trunk's level-1 outputs, a plain one room in the
    pending buffer. `slots`: the catch-up forward's size, a probe's price (`budget.probe_cap`).
    Nothing when no row runs or no round is left (`limit`)."""
    if all(s is None for s in budget.shapes):  # nothing ever drafts: no trunk to catch up
        return state, 0
    plain = budget_lib.plain_at(budget.shapes, state.next_shape)
    pending = state.pending_len
    # A full buffer after a plain streak keeps only what a probe would forward: the streak's
    # older positions would never reach the trunk through one.
    probing = plain | budget_lib.probe_due(state.plain_streak, state.probe_wait)
    slots = catch_up_slots(jnp.max(probe_pending(pending, probing)), shapes.pending)
    needs = _catch_up_due(pending, plain, shapes.pending) & jnp.any(~state.done) & (limit > 0)
    if index is not None:
        needs &= state.next_shape == index
    catch_up = functools.partial(
        _catch_up, base_params=base_params, draft_params=draft_params, draft_head=draft_head,
        cfg=cfg, dcfg=dcfg, shapes=shapes, probing=probing,
    )  # fmt: skip
    return run_if(needs, catch_up, state), slots


def _catch_up_due(pending: jax.Array, plain, size: int) -> jax.Array:
    """Whether a segment must start with the draft trunk's catch-up, from the rows' pending
    counts [B]: plain rounds (`plain`, a bool or a traced one) need room in the `size`-slot
    pending buffer, a drafting shape's rounds nothing pending."""
    return jnp.where(plain, jnp.any(pending >= size), jnp.any(pending > 0))


def _shape_segment(
    state: SpecState, limit, slots, *, index: int, base_params, draft_params, knobs, budget,
    draft_head, cfg, dcfg, greedy, shapes,
) -> tuple[SpecState, jax.Array]:  # fmt: skip
    """(state, rounds run): rounds of shape `index` while the budget keeps choosing it, some row
    runs, fewer than `limit` rounds ran and (plain rounds) the pending buffer has room; none
    when the budget picks another shape. Its catch-up ran before it (`_segment_start`, whose
    `slots` prices a probe it starts)."""
    shape = budget.shapes[index]
    drafting = any(s is not None for s in budget.shapes)
    static = dict(
        cfg=cfg, dcfg=dcfg, greedy=greedy, shapes=shapes, drafting=drafting,
    )  # fmt: skip
    # `slots` only prices a probe a drafting round starts (`next_probe` ignores it after a
    # plain round).
    body_fn = _plain_round if shape is None else functools.partial(_tree_round, tree_cfg=shape)

    def picked(s, n):  # the budget picks this shape, some row runs, rounds are left
        return jnp.any(~s.done) & (s.next_shape == index) & (n < limit)

    def cond(carry):
        s, n = carry
        go = picked(s, n)
        if shape is None and drafting:  # room in the pending buffer
            go &= ~_catch_up_due(s.pending_len, True, shapes.pending)
        return go

    def body(carry):
        s, n = carry
        with jax.named_scope("budget"):
            streak, wait = budget_lib.next_probe(
                s.plain_streak, s.probe_wait, drafted=shape is not None, budget=budget,
                catch_up_slots=slots,
            )  # fmt: skip
            if shape is not None and None in budget.shapes:  # a probe starts: stale levels go
                forget = functools.partial(
                    budget_lib.forget_untried, drafted=budget_lib.levels(shape),
                    probing=budget_lib.probe_due(s.plain_streak, s.probe_wait), active=~s.done,
                )  # fmt: skip
                hits, trials = forget(s.hits, s.trials)
                own_hits, own_trials = forget(s.own_hits, s.own_trials)
                s = s.replace(hits=hits, trials=trials, own_hits=own_hits, own_trials=own_trials)
        s = body_fn(s, base_params, draft_params, knobs, draft_head, index, **static)
        s = s.replace(plain_streak=streak, probe_wait=wait)
        if shape is not None:
            return _with_choice(s, budget, knobs, shapes, greedy, caught_up=True), n + 1
        # A plain round changes no statistics: the segment's first round weighs the rows (one
        # may have been admitted or finished), the later ones only watch for a probe.
        with jax.named_scope("budget"):
            nxt = jax.lax.cond(
                n == 0,
                lambda: _with_choice(s, budget, knobs, shapes, greedy).next_shape,
                lambda: budget_lib.keep_plain(
                    budget, s.plain_streak, s.probe_wait, s.step, s.next_shape
                ),
            )  # fmt: skip
        return s.replace(next_shape=nxt), n + 1

    # The shape's rounds run the CPU kernels' chunks where they were measured faster (the
    # rounds read `step`, so the setting comes first).
    state = state.replace(step=cpu_kernels.chunks_here(budget.chunks[index], state.step))
    return jax.lax.while_loop(cond, body, (state, jnp.int32(0)))


def make_knobs(
    knobs: vanilla.SamplingKnobs, *, max_new_tokens: int, eos_ids: Sequence[int]
) -> Knobs:
    temperature, top_p, top_k = knobs.as_arrays()
    return Knobs(
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        max_new=np.int32(max_new_tokens),
        eos_ids=vanilla.eos_array(eos_ids),
    )


def prepare_budget(tree: TreeConfig | budget_lib.Budget, *, vocab_size: int) -> budget_lib.Budget:
    """Checks every shape (`checks.tree_sizes`) and trims levels `total_tokens` discards."""
    budget = tree if isinstance(tree, budget_lib.Budget) else budget_lib.make_budget([tree])
    for shape in budget.shapes:
        if shape is not None:
            checks.tree_sizes(
                top_k=shape.top_k, depth=shape.depth, total_tokens=shape.total_tokens,
                vocab_size=vocab_size,
            )  # fmt: skip
    trimmed = tuple(None if s is None else s.trimmed() for s in budget.shapes)
    return budget.replace(shapes=trimmed)


def generate(
    base_params,
    cfg: ModelConfig,
    draft_params,
    dcfg: DraftConfig,
    prompts: Sequence[Sequence[int]],
    *,
    tree_cfg: TreeConfig | budget_lib.Budget,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int | Sequence[int] = 0,
    eos_ids: Sequence[int] | None = None,
    max_len: int | None = None,
    on_round: Callable[[np.ndarray, np.ndarray], None] | None = None,
    loop: str = "device",
    mesh: jax.sharding.Mesh | None = None,
    draft_head: DraftHead | None = None,
) -> SpecResult:
    """Speculative decoding of a batch of prompts (token id lists).

    Args:
      tree_cfg: one static tree, or a `budget.Budget` of round shapes the engine chooses among
        as it runs (the adaptive draft budget; `None` in it = plain decode steps).
      temperature: 0 = greedy.  top_p / top_k: 1.0 / 0 = off.
      eos_ids: stop ids (default: the base config's).  max_len: refuse prompts for which
        prompt + max_new_tokens exceeds it (default: the model's max_position_embeddings).
      on_round: called after every round with (out_tokens [B, N], num_out [B]) on the host, for
        streaming; it implies the host loop and costs one extra transfer per round.
      loop: "device" (every round in one device loop, one `run_segment` call; the default)
        or "host" (one round per `run_segment` call, reading back `done`). With the device
        loop and no on_round, a batch the adaptive budget would decode plainly throughout
        runs the plain decoder's program instead (`plain_throughout`; `SpecResult.plain_program`).
      mesh: run sharded on this mesh (`griffin_jax.sharding`): params not yet placed by the
        rules are placed (a no-op for loaded sharded params), tokens go over `data`.
      draft_head: draft from a token subset (`make_draft_head`); None = the whole vocabulary.
    Returns:
      SpecResult with the new ids per row (stop token included, at most max_new_tokens).
    """
    prompts = checks.generation(
        prompts, vocab_size=cfg.vocab_size,
        max_positions=cfg.max_position_embeddings if max_len is None else max_len,
        max_new=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed,
    )  # fmt: skip
    budget = prepare_budget(tree_cfg, vocab_size=draft_vocab_size(cfg, dcfg, draft_head))
    budget = budget.replace(finish=len(prompts) > 1)  # the batch ends with its slowest row
    sampling_knobs = vanilla.SamplingKnobs(temperature, top_p, top_k)
    shapes = plan_shapes(
        [len(p) for p in prompts], max_new_tokens, budget.shapes,
        prompt_pending=None in budget.shapes,  # the draft runs only once some round drafts
    )  # fmt: skip
    tokens, lengths = vanilla.pad_prompts(prompts, [shapes.prompt_bucket])
    greedy = sampling_knobs.greedy
    stop_ids = cfg.eos_token_ids if eos_ids is None else eos_ids
    knobs = make_knobs(sampling_knobs, max_new_tokens=max_new_tokens, eos_ids=stop_ids)
    static = dict(cfg=cfg, dcfg=dcfg, greedy=greedy, shapes=shapes, mesh=mesh)
    by_round = on_round is not None or loop == "host"  # these run the rounds one by one
    if not by_round and plain_throughout(
        budget, knobs, lengths, max_new_tokens=max_new_tokens, greedy=greedy, shapes=shapes
    ):
        res = vanilla.generate(
            base_params, cfg, prompts, max_new_tokens=max_new_tokens, temperature=temperature,
            top_p=top_p, top_k=top_k, seed=seed, eos_ids=stop_ids, mesh=mesh,
        )  # fmt: skip
        return _plain_result(res, budget, len(prompts))
    # Host arrays go to the programs as they are: the jitted call's own transfer is cheaper
    # than `jnp.asarray`'s Python path, which runs cold between calls (~0.1-0.3 ms each here).
    seeds = vanilla.row_seeds(seed, len(prompts))
    inputs = (tokens, lengths, knobs, seeds, budget, draft_head)
    if mesh is not None:
        base_params = sharding.shard_params(base_params, mesh, head_dim=cfg.head_dim)
        draft_params = sharding.shard_params(draft_params, mesh, head_dim=dcfg.head_dim)
        tokens_in, lengths_in, rest = sharding.place_inputs(*inputs[:2], inputs[2:], mesh)
        inputs = (tokens_in, lengths_in, *rest)
        # placed: unplaced ones recompile the round
        knobs, budget, draft_head = inputs[2], inputs[4], inputs[5]
    state = prefill(base_params, draft_params, *inputs, **static)
    limit = np.int32(1 if by_round else 1 << 30)
    if on_round is not None:
        on_round(*jax.device_get((state.out_tokens, state.num_out)))
    # The segment is dispatched behind the prefill without waiting for it (a segment whose
    # rows are all done runs no round), and each segment's results come back in one transfer:
    # a batch-1 call of the device loop has one host sync, as vanilla's has.
    try:
        for _ in range(max_new_tokens):  # a segment with a running row emits >= 1 token a row
            state = run_segment(
                state, base_params, draft_params, knobs, budget, draft_head, limit, index=None,
                **static,
            )  # fmt: skip
            fetched = jax.device_get((
                state.out_tokens, state.num_out, state.accept_log, state.shape_log, state.rounds,
                state.own_hits, state.own_trials, state.conf_counts, state.probe_wait,
                state.plain_streak, state.done,
            ))  # fmt: skip
            if on_round is not None:
                on_round(fetched[0], fetched[1])
            if np.all(fetched[-1]):
                break
    finally:  # the shapes' segments may have moved the kernels' threads (`Budget.chunks`)
        if cpu_kernels.enabled():
            cpu_kernels.restore_chunk_threads()
    out, num_out, log, shape_log, rounds, hits, trials, conf_counts, wait, streak, _ = fetched
    return SpecResult(
        output_ids=[out[i, : num_out[i]].tolist() for i in range(len(prompts))],
        accept_lengths=[log[i, : rounds[i]].tolist() for i in range(len(prompts))],
        rounds=rounds.tolist(),
        round_shapes=[shape_log[i, : rounds[i]].tolist() for i in range(len(prompts))],
        level_hits=np.asarray(hits),
        level_trials=np.asarray(trials),
        conf_counts=np.asarray(conf_counts),
        probe_wait=int(wait),
        plain_streak=int(streak),
    )


def measure_round_costs(
    base_params,
    cfg: ModelConfig,
    draft_params,
    dcfg: DraftConfig,
    budget: budget_lib.Budget,
    *,
    batch: int,
    greedy: bool,
    draft_head: DraftHead | None = None,
    prompt_len: int = 128,
    max_new: int = 256,
    repeats: int = 5,
    max_repeats: int = 15,
    spread: float = 0.015,
    segment: int = 20,
    short: int = 4,
    max_steal: float = steal.MAX_STEAL,
    choose_chunks: bool = False,
) -> list[float]:
    """Milliseconds per round of each of the budget's shapes, on this machine, at `batch` rows,
    then milliseconds per slot of the draft trunk's catch-up (`Budget.catch_up`; 0 without a
    plain shape) and the milliseconds a call of the program costs beyond its rounds
    (`Budget.probe_call`; >= 0): [S + 2] floats. With `choose_chunks` (`cpu_kernels.
    chunk_choice_applies`), every shape is timed with the CPU kernels' chunks on the library's
    helper threads and on XLA's pool, in the same passes, and shapes of a kind (plain,
    drafting) share the faster setting (`chunk_choice`): each shape's cost there, and then S
    more floats, each shape's setting (`Budget.chunks`: 0 the helpers, 1 XLA's pool).

    Runs the program `generate` runs (`run_segment` over every shape, each round forced to one
    shape through `Budget.schedule`) on a synthetic batch of `prompt_len`-token prompts with
    buffers sized for `max_new` new tokens. A round's cost is its time inside a call, without
    what the call costs beyond its rounds: each shape runs a call of `short` rounds and one of
    `segment` rounds, each ended by a host read and started after a first round of its own on
    a fresh prefill (at the prompt's length, whatever the shapes timed before committed); the
    two lengths give the call's own cost (dispatch, the segments' entries, the host read: ~2
    ms at batch 1 here, the price of ~2.5 plain rounds; one figure for all shapes, the median
    of every pass's and shape's intercept), and a round costs the longer call less that, over
    its rounds. A generation pays the call's cost once whatever the policy picks, so it is
    no round's: spread over 16-round calls it had priced a plain round ~15% high and a (1,0,2)
    round at 1.26 plain rounds where generation paid 1.37, and the policy drafted where plain
    decoding was faster (sampled out-of-corpus code, 0.93x vanilla). Shapes are interleaved
    over `repeats` passes; medians (`pass_medians`).
    The catch-up: the first drafting shape's first round on the state the plain shape's longer
    call left (`segment` + 1 plain rounds pending: the PENDING-slot program a probe after a
    plain streak runs) less a round of that shape alone, both one-round calls, over the
    catch-up's slots (the policy prices a catch-up of other sizes, such as a batch's lazily
    left prompt, by them).
    A pass during which more than `max_steal` of the CPUs' time was stolen (`steal.timed`) is
    run again. Sampling rounds are timed at temperature 1.

    At least `repeats` passes; more, up to `max_repeats`, while the shapes' cost ratios are
    uncertain by more than `spread` (`cost_spread`: ~1.5% by default). The costs are kept in
    the cost cache for every later run of this code on this machine, and one noisy start-up
    measurement once priced the default tree's round at 1.18x the 3-deep one's where the
    generations paid 1.27x, enough for the policy to run the slower shape throughout. Under 3
    `repeats`, and with several processes (all must run the same programs), the passes stay
    `repeats`.
    """
    if not 1 <= short < segment:
        raise ValueError(f"round costs: need 1 <= short ({short}) < segment ({segment})")
    budget = prepare_budget(budget, vocab_size=draft_vocab_size(cfg, dcfg, draft_head))
    budget = budget.replace(finish=batch > 1)  # as `generate` has it
    shapes = plan_shapes([prompt_len] * batch, max_new, budget.shapes)
    ids = (np.arange(batch * prompt_len).reshape(batch, prompt_len) * 7919) % cfg.vocab_size
    tokens, lengths = vanilla.pad_prompts(ids.tolist(), [shapes.prompt_bucket])
    sampling_knobs = vanilla.SamplingKnobs(0.0 if greedy else 1.0, 1.0, 0)
    knobs = make_knobs(sampling_knobs, max_new_tokens=2**30, eos_ids=[])  # rows never finish
    static = dict(cfg=cfg, dcfg=dcfg, greedy=greedy, shapes=shapes)
    inputs = (jnp.asarray(tokens), jnp.asarray(lengths), knobs,
              jnp.asarray(vanilla.row_seeds(0, batch)))  # fmt: skip
    # Each shape under each setting of the kernels' threads compared (`choose_chunks`), as
    # entries of their own: (shape index, `Budget.chunks` value).
    settings = (0, 1) if choose_chunks else (budget_lib.KEEP_CHUNKS,)
    entries = [(i, c) for i in range(len(budget.shapes)) for c in settings]
    # No probe is ever due (a probe's catch-up forwards fewer slots than are pending).
    forced = [
        budget.replace(
            schedule=jnp.full((shapes.out_size,), i, jnp.int32),
            start_wait=jnp.int32(2**30),
            chunks=jnp.full((len(budget.shapes),), c, jnp.int32),
        )  # fmt: skip
        for i, c in entries
    ]

    def timed(state, entry: int, n: int) -> tuple[SpecState, float]:
        index = entries[entry][0]
        step0 = int(state.step)
        state = state.replace(next_shape=jnp.int32(index))  # what the schedule says next
        t0 = time.perf_counter()
        state = run_segment(
            state, base_params, draft_params, knobs, forced[entry], draft_head,
            jnp.int32(n), index=None, **static,
        )  # fmt: skip
        step = int(jax.device_get(state.step))
        if step - step0 != n:  # one program runs them all while a row runs (rows never end)
            raise RuntimeError(f"measure_round_costs: shape {index} ran {step - step0} of {n}")
        return state, time.perf_counter() - t0

    kinds = [shape is None for shape in budget.shapes]
    # The catch-up is timed when there are both a plain and a drafting shape (the first
    # setting's entries).
    both = True in kinds and False in kinds
    plain = entries.index((kinds.index(True), settings[0])) if both else None

    def one_pass(flip: bool = False) -> list[float]:
        """[E shorter calls' ms, E longer calls' ms, catch-up ms per slot], E the entries. The
        settings of a shape run one after the other, in turns: first in one pass, last in the
        next (`flip`)."""
        ms = {short: [0.0] * len(entries), segment: [0.0] * len(entries)}
        catch_up = 0.0
        width = len(settings)
        order = [e for i in range(len(budget.shapes))
                 for e in range(i * width, (i + 1) * width)[:: -1 if flip else 1]]  # fmt: skip
        for entry in order:
            for n in (short, segment):
                # Every call from the prompt's length: rounds of a good draft commit several
                # tokens (this synthetic prompt's do: ~3.4 a round of the default chain), so
                # shapes timed one after another on one state ran at ever longer caches, the
                # last past a key window's edge (`layers.attention_spans`) and priced ~12% high.
                state = prefill(
                    base_params, draft_params, *inputs, forced[entry], draft_head, **static
                )  # fmt: skip
                state, _ = timed(state, entry, 1)  # the shape's first round, apart from the call
                state, seconds = timed(state, entry, n)
                ms[n][entry] = seconds * 1e3
            if entry == plain:  # `segment` + 1 plain rounds pending
                catch_up = catch_up_ms(state)
        return [*ms[short], *ms[segment], catch_up]

    def priced(raw: list[list[float]]) -> tuple[list[list[float]], float]:
        """(passes of [E round costs, catch-up], the call's ms) from `one_pass`'s timings. The
        call's cost beyond its rounds is one figure for every shape (its dispatch, segment
        entries and host read): the median over every pass and entry of the two call lengths'
        intercept. Each round then costs its longer call less that, over its rounds. A
        difference of the two calls per shape and pass swung +-15% here from one pass to the
        next (a 2-vCPU VM's jitter of a few ms a call, over the 16 rounds between): four such
        measurements put a (1,0,2) round at 1.18-1.43 plain rounds, four of these at
        1.30-1.34."""
        n = len(entries)
        table = np.asarray(raw, np.float64)
        t_short, t_long = table[:, :n], table[:, n : 2 * n]
        intercepts = (t_short * segment - t_long * short) / (segment - short)
        call = max(float(np.median(intercepts)), 0.0)
        rounds = np.maximum(t_long - call, 1e-9) / segment
        passes = [[*row, c] for row, c in zip(rounds.tolist(), table[:, -1], strict=True)]
        return passes, call

    def catch_up_ms(state: SpecState) -> float:
        """The first drafting shape's first round on the state the plain shape's rounds left,
        less a round of it alone, over the catch-up's slots."""
        slots = int(catch_up_slots(jnp.max(state.pending_len), shapes.pending))
        if not slots:
            return 0.0
        drafting = entries.index((kinds.index(False), settings[0]))
        state, first = timed(state, drafting, 1)
        state, alone = timed(state, drafting, 1)
        return max(first - alone, 0.0) * 1e3 / slots

    try:
        one_pass()  # compiles and warms up
        # A pass that met stolen CPU time (a shared VM's host running others) is run again;
        # not with several processes, which must run the same programs in step.
        if jax.process_count() > 1:
            max_steal = 1.0
        raw: list[list[float]] = []
        sturdy = repeats >= 3 and jax.process_count() == 1  # a spread needs 3 passes
        while len(raw) < repeats or (
            sturdy and len(raw) < max_repeats and cost_spread(priced(raw)[0]) > spread
        ):
            run = functools.partial(one_pass, len(raw) % 2 == 1)  # alternate the order
            raw.append(steal.timed(run, max_steal=max_steal).result)
    finally:  # the segments moved the kernels' threads as each entry said
        if choose_chunks:
            cpu_kernels.restore_chunk_threads()
    passes, call = priced(raw)
    *by_entry, catch_up = pass_medians(passes)
    if not choose_chunks:
        return [*by_entry, catch_up, call]
    pairs = np.asarray(by_entry).reshape(len(budget.shapes), len(settings))
    choice = chunk_choice(pairs, kinds)
    costs = pairs[np.arange(len(choice)), choice]
    return [*costs.tolist(), catch_up, call, *(float(settings[c]) for c in choice)]


CHUNK_MARGIN = 0.02  # XLA's pool is taken for a kind of round only when this much faster


def chunk_choice(costs: np.ndarray, plain: Sequence[bool]) -> np.ndarray:
    """[S] 0 (the library's helpers) or 1 (XLA's pool) per shape, from its measured costs
    [S, 2] under each (`measure_round_costs`) and whether it is the plain shape. Shapes of a
    kind share one setting, the faster for their summed costs, so a call's rounds switch threads
    only where they switch between plain decoding and drafting (with a setting per shape,
    (1,0,2) on the helpers and (1,3,5) on XLA's pool, out-of-corpus code at batch 1 changed
    threads at most of its ~100 changes of shape and ran 8% behind the fixed (1,3,5) tree);
    XLA's pool only where it is CHUNK_MARGIN faster (near a tie the helpers, the library's
    default, stay, rather than a choice that flips with the noise from one measurement to the
    next)."""
    costs = np.asarray(costs, np.float64)
    kinds = np.asarray(plain, bool)
    choice = np.zeros(len(kinds), np.int64)
    for kind in (kinds, ~kinds):
        if kind.any() and costs[kind, 1].sum() < (1 - CHUNK_MARGIN) * costs[kind, 0].sum():
            choice[kind] = 1
    return choice


def pass_medians(passes: list[list[float]]) -> list[float]:
    """Each shape's cost from passes of [S round costs, catch-up]: the median over passes of
    its ratio to the pass's first shape, times that shape's median (the catch-up: its plain
    median). The policy weighs shapes against each other: a pass in which the whole machine ran
    slow (a shared VM) moves every shape of it alike and leaves the ratios be, where plain
    medians could take two shapes from passes of different speeds."""
    table = np.asarray(passes, np.float64)
    first = np.median(table[:, 0])
    ratios = np.median(table[:, :-1] / table[:, :1], axis=0)
    return [*(float(r * first) for r in ratios), float(np.median(table[:, -1]))]


def cost_spread(passes: list[list[float]]) -> float:
    """How far the shapes' cost ratios of `passes` may be off: the largest over shapes of the
    ratios' median absolute deviation, scaled to a standard deviation, over the square root of
    the passes and the median (about the median's relative standard error); inf under 3 passes."""
    if len(passes) < 3:
        return float("inf")
    table = np.asarray(passes, np.float64)
    ratios = table[:, :-1] / table[:, :1]
    centre = np.median(ratios, axis=0)
    mad = np.median(np.abs(ratios - centre), axis=0) * 1.4826
    return float(np.max(mad / centre / np.sqrt(len(passes))))
