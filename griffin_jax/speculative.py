"""The speculative decoding engine: prefill, then jitted rounds of draft tree -> verify -> accept
-> commit -> re-draft, with static shapes and no host sync inside a round.

Mirrors the reference's `eagenerate` loop (`model/ea_model_griffin.py`, `model/utils.py`: spec 5.1,
5.3-5.8) for any draft behind the one draft interface (GRIFFIN or EAGLE-2). Differences that are
deliberate:
- batch B >= 1 with right-padded prompts: each row accepts its own number of tokens, finished
  rows stop contributing (their cache lengths and trunk stop moving);
- exactly `max_new_tokens` at most (the reference overshoots), stop at any EOS id per row;
- sampling applies the logits processor in every branch of the acceptance (spec 5.5);
- one round = one jitted function of a donated state; the host loop reads back only the
  per-row `done` flags each round (and the new tokens when streaming).

A round, per row (the tree in the state was drafted at the end of the previous round):
1. verify: one base forward over the M tree tokens at slots length.., positions length + depth;
2. accept: greedy (longest path matching the base argmax) or lossless rejection sampling, plus
   the bonus token;
3. commit: the root and the accepted nodes' K/V move into place, length += accepted + 1;
4. re-draft: the draft trunk consumes (feature, next token) for the A path slots (entries past
   the accepted ones are garbage and never committed), then the next tree is built from the
   last accepted position with the bonus token as its root.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from griffin_jax import checks, sampling, sharding, vanilla
from griffin_jax import tree as tree_lib
from griffin_jax.config import ModelConfig, TreeConfig
from griffin_jax.draft import DraftCache, DraftConfig, draft_forward, init_draft_cache
from griffin_jax.kv_cache import KVCache, causal_mask, commit_path, init_cache
from griffin_jax.model import forward as base_forward
from griffin_jax.model import head_logits, is_unstacked, lm_head


@flax.struct.dataclass
class SpecState:
    """Everything a round reads and writes (donated between rounds)."""

    cache: KVCache  # base cache; length = committed tokens (the pending root is not in it)
    draft_cache: DraftCache
    trunk_len: jax.Array  # [B] int32 draft positions holding true-feature trunk entries
    tree: tree_lib.Tree  # the tree to verify next (root = the last emitted token)
    out_tokens: jax.Array  # [B, N_out] int32 new tokens (valid up to num_out)
    num_out: jax.Array  # [B] int32
    done: jax.Array  # [B] bool
    accept_log: jax.Array  # [B, R] int32 accepted draft tokens emitted per round (-1 = no round)
    rounds: jax.Array  # [B] int32 rounds while the row was active
    keys: jax.Array  # [B] row PRNG keys (a draw at sequence index i folds in i)


@flax.struct.dataclass
class Knobs:
    """Traced sampling settings (never static: a new value must not recompile)."""

    temperature: jax.Array  # [] f32
    top_p: jax.Array  # [] f32
    top_k: jax.Array  # [] int32
    max_new: jax.Array  # [] int32
    eos_ids: jax.Array  # [E] int32, -1 padded (vanilla.eos_array)


@dataclasses.dataclass(frozen=True)
class Shapes:
    """Static sizes of one compiled engine."""

    batch: int
    prompt_bucket: int
    capacity: int  # base cache slots
    draft_capacity: int
    out_size: int  # output buffer (>= max_new + A)


@dataclasses.dataclass
class SpecResult:
    output_ids: list[list[int]]  # new ids per row, stop token included
    accept_lengths: list[list[int]]  # accepted draft tokens per round, per row
    rounds: list[int]

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
        kernel = jnp.take(base_params["lm_head"]["kernel"], ids, axis=1)
    return DraftHead(token_ids=jnp.asarray(ids), kernel=kernel)


def _draft_logits(base_params, hidden, head: DraftHead | None, *, cfg: ModelConfig):
    if head is None:
        return lm_head(base_params, hidden, cfg=cfg)
    return head_logits(hidden, head.kernel)


def plan_shapes(prompt_lens: Sequence[int], max_new_tokens: int, tree_cfg: TreeConfig) -> Shapes:
    """Static sizes for a batch (the caller checks the position limit: `checks.generation`)."""
    longest = max(prompt_lens)
    bucket = vanilla.prompt_bucket(longest)
    out_size = -(-(max_new_tokens + tree_cfg.path_len) // 64) * 64
    needed = bucket + out_size + tree_cfg.total_tokens + tree_cfg.path_len
    capacity = -(-needed // 128) * 128
    draft_capacity = capacity + tree_cfg.path_len + tree_cfg.top_k * (tree_cfg.depth + 1)
    return Shapes(len(prompt_lens), bucket, capacity, draft_capacity, out_size)


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


def _root_inputs(step_out, last: jax.Array, head: DraftHead | None, *, base_params, cfg):
    """Level-1 inputs of the tree from the draft output at per-row index `last`."""
    token_feature, next_feature = step_out
    rows = jnp.arange(last.shape[0])
    logits = _draft_logits(base_params, token_feature[rows, last], head, cfg=cfg)  # [B, V']
    return jax.nn.log_softmax(logits, axis=-1), next_feature[rows, last]


def _build_tree(step, root_lp, root_feat, root, trunk_len, dcache, head, *, tree_cfg, shapes):
    # Path order does not matter to the keyed acceptance (sampling.accept_nodes), so sampling
    # skips the reference's lexicographic sort (which fixed its sibling-rejection order).
    return tree_lib.build_tree(
        step, root_lp, root_feat, root, trunk_len, dcache,
        top_k=tree_cfg.top_k, depth=tree_cfg.depth, total_tokens=tree_cfg.total_tokens,
        capacity=shapes.draft_capacity, lexicographic_paths=False,
        token_ids=None if head is None else head.token_ids,
    )  # fmt: skip


def _is_eos(tokens: jax.Array, eos_ids: jax.Array) -> jax.Array:
    return jnp.any(tokens[..., None] == eos_ids, axis=-1)


@functools.partial(jax.jit, static_argnames=("cfg", "dcfg", "tree_cfg", "greedy", "shapes", "mesh"))
def prefill(
    base_params,
    draft_params,
    tokens: jax.Array,
    lengths: jax.Array,
    knobs: Knobs,
    seeds: jax.Array,
    draft_head: DraftHead | None = None,
    *,
    cfg: ModelConfig,
    dcfg: DraftConfig,
    tree_cfg: TreeConfig,
    greedy: bool,
    shapes: Shapes,
    mesh: jax.sharding.Mesh | None = None,
) -> SpecState:
    """Base prefill, the first (root) token, the draft trunk over the prompt and the first tree.

    Args:
      tokens: [B, T] int32 right-padded prompts (T = the length bucket).
      lengths: [B] int32 true prompt lengths (>= 1).
      seeds: [B] uint32 sampling seeds (`sampling.row_keys`; unused when greedy).
      mesh: when given, the caches are created sharded and the state is pinned
        (`sharding.constrain`); the params arrive sharded.
    """
    b, t = tokens.shape
    dtype = base_params["embed_tokens"]["embedding"].dtype
    rows = jnp.arange(b)
    zero = jnp.zeros((b,), jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    with jax.named_scope("prefill/base"):
        cache = init_cache(cfg, b, shapes.capacity, dtype, per_layer=is_unstacked(base_params))
        cache = sharding.constrain(cache, mesh)
        logits, hidden, cache = base_forward(
            base_params, tokens, positions, cache,
            write_idx=zero, mask=causal_mask(zero, t, shapes.capacity), cfg=cfg,
        )  # fmt: skip
        cache = cache.replace(length=lengths)
    keys = sampling.row_keys(seeds)
    last = lengths - 1
    root = sampling.next_token(
        keys, lengths, logits[rows, last], greedy=greedy,
        temperature=knobs.temperature, top_p=knobs.top_p, top_k=knobs.top_k,
    )  # fmt: skip
    with jax.named_scope("prefill/draft_trunk"):
        # Draft position p pairs feature f_p with token x_{p+1}; the last pairs with the root.
        pair_tokens = jnp.concatenate([tokens[:, 1:], jnp.zeros((b, 1), jnp.int32)], axis=1)
        pair_tokens = pair_tokens.at[rows, last].set(root)
        dcache = sharding.constrain(init_draft_cache(dcfg, b, shapes.draft_capacity, dtype), mesh)
        step = _draft_step(base_params, draft_params, draft_head, cfg=cfg, dcfg=dcfg)
        token_feature, next_feature, dcache = draft_forward(
            draft_params, base_params["embed_tokens"]["embedding"], hidden, pair_tokens,
            positions, dcache, write_idx=zero, mask=causal_mask(zero, t, shapes.draft_capacity),
            dcfg=dcfg,
        )  # fmt: skip
        root_lp, root_feat = _root_inputs(
            (token_feature, next_feature), last, draft_head, base_params=base_params, cfg=cfg
        )
    tree, dcache = _build_tree(
        step, root_lp, root_feat, root, lengths, dcache, draft_head,
        tree_cfg=tree_cfg, shapes=shapes,
    )  # fmt: skip
    out_tokens = jnp.zeros((b, shapes.out_size), jnp.int32).at[:, 0].set(root)
    num_out = jnp.ones((b,), jnp.int32)
    done = _is_eos(root, knobs.eos_ids) | (knobs.max_new <= 1)
    state = SpecState(
        cache=cache,
        draft_cache=dcache,
        trunk_len=lengths,
        tree=tree,
        out_tokens=out_tokens,
        num_out=num_out,
        done=done,
        accept_log=jnp.full((b, shapes.out_size), -1, jnp.int32),
        rounds=jnp.zeros((b,), jnp.int32),
        keys=keys,
    )
    return sharding.constrain(state, mesh)


@functools.partial(
    jax.jit,
    static_argnames=("cfg", "dcfg", "tree_cfg", "greedy", "shapes", "mesh"),
    donate_argnames=("state",),
)
def spec_round(
    state: SpecState,
    base_params,
    draft_params,
    knobs: Knobs,
    draft_head: DraftHead | None = None,
    *,
    cfg: ModelConfig,
    dcfg: DraftConfig,
    tree_cfg: TreeConfig,
    greedy: bool,
    shapes: Shapes,
    mesh: jax.sharding.Mesh | None = None,
) -> SpecState:
    """One verify -> accept -> commit -> re-draft round (see the module docstring)."""
    tree = state.tree
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
        )  # fmt: skip
    with jax.named_scope("accept"):
        # The base's next token after every node (argmax, or the position-keyed draw), then
        # the walk down the tree along the children that match (sampling.py).
        node_targets = sampling.next_token(
            state.keys, positions + 1, logits, greedy=greedy,
            temperature=knobs.temperature, top_p=knobs.top_p, top_k=knobs.top_k,
        )  # fmt: skip
        acc = sampling.accept_nodes(
            tree.draft_tokens, node_targets, tree.retrieve_idx, tree.path_mask
        )
    accept_len = acc.accept_len
    best_nodes = tree.retrieve_idx[rows, acc.best_path]  # [B, A]
    path_tokens = tree.path_tokens()[rows, acc.best_path]  # [B, A] root first
    slot = jnp.arange(a_len)
    # Emitted this round: the accepted draft tokens, then the bonus; past it, filler.
    shifted = jnp.concatenate([path_tokens[:, 1:], jnp.zeros((b, 1), jnp.int32)], axis=1)
    emitted = jnp.where(slot[None, :] < accept_len[:, None], shifted, acc.bonus_token[:, None])
    with jax.named_scope("stop"):
        n_new = accept_len + 1
        eos_hit = _is_eos(emitted, knobs.eos_ids) & (slot[None, :] < n_new[:, None])
        upto_eos = jnp.where(jnp.any(eos_hit, axis=1), jnp.argmax(eos_hit, axis=1) + 1, n_new)
        n_emit = jnp.minimum(upto_eos, knobs.max_new - state.num_out)
        n_emit = jnp.where(active, n_emit, 0)
        out_tokens = jax.vmap(
            lambda buf, new, start: jax.lax.dynamic_update_slice_in_dim(buf, new, start, 0)
        )(state.out_tokens, emitted, state.num_out)
        num_out = state.num_out + n_emit
        done = state.done | (active & jnp.any(eos_hit, axis=1)) | (num_out >= knobs.max_new)
        # The round's accepted draft tokens as emitted (a stop token or max_new_tokens cut the
        # last round short), so tau = emitted tokens per verification forward.
        accept_log = state.accept_log.at[rows, state.rounds].set(
            jnp.where(active, n_emit - 1, state.accept_log[rows, state.rounds])
        )
    with jax.named_scope("commit"):
        n_commit = jnp.where(active, n_new, 0)
        cache = commit_path(cache, best_nodes, n_commit)
    with jax.named_scope("draft/trunk"):
        trunk = state.trunk_len
        features = jnp.take_along_axis(hidden, best_nodes[:, :, None], axis=1)  # [B, A, D]
        step = _draft_step(base_params, draft_params, draft_head, cfg=cfg, dcfg=dcfg)
        token_feature, next_feature, dcache = draft_forward(
            draft_params, base_params["embed_tokens"]["embedding"], features, emitted,
            trunk[:, None] + slot[None, :], state.draft_cache, write_idx=trunk,
            mask=causal_mask(trunk, a_len, shapes.draft_capacity), dcfg=dcfg,
        )  # fmt: skip
        new_trunk = trunk + n_commit
        root_lp, root_feat = _root_inputs(
            (token_feature, next_feature), accept_len, draft_head, base_params=base_params,
            cfg=cfg,
        )  # fmt: skip
    new_tree, dcache = _build_tree(
        step, root_lp, root_feat, acc.bonus_token, new_trunk, dcache, draft_head,
        tree_cfg=tree_cfg, shapes=shapes,
    )  # fmt: skip
    state = SpecState(
        cache=cache,
        draft_cache=dcache,
        trunk_len=new_trunk,
        tree=new_tree,
        out_tokens=out_tokens,
        num_out=num_out,
        done=done,
        accept_log=accept_log,
        rounds=state.rounds + active.astype(jnp.int32),
        keys=state.keys,
    )
    return sharding.constrain(state, mesh)


@functools.partial(jax.jit, static_argnames=("cfg", "dcfg", "tree_cfg", "greedy", "shapes", "mesh"))
def generate_device(
    base_params,
    draft_params,
    tokens,
    lengths,
    knobs: Knobs,
    seeds,
    draft_head: DraftHead | None = None,
    *,
    cfg,
    dcfg,
    tree_cfg,
    greedy,
    shapes,
    mesh=None,
) -> SpecState:
    """Prefill plus every round in one program (`lax.while_loop`): no host round trips."""
    static = dict(cfg=cfg, dcfg=dcfg, tree_cfg=tree_cfg, greedy=greedy, shapes=shapes, mesh=mesh)
    state = prefill(base_params, draft_params, tokens, lengths, knobs, seeds, draft_head, **static)

    def cond(carry):
        state, i = carry
        return jnp.any(~state.done) & (i < knobs.max_new)

    def body(carry):
        state, i = carry
        return spec_round(state, base_params, draft_params, knobs, draft_head, **static), i + 1

    return jax.lax.while_loop(cond, body, (state, jnp.int32(0)))[0]


def make_knobs(
    knobs: vanilla.SamplingKnobs, *, max_new_tokens: int, eos_ids: Sequence[int]
) -> Knobs:
    temperature, top_p, top_k = knobs.as_arrays()
    return Knobs(
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        max_new=jnp.int32(max_new_tokens),
        eos_ids=vanilla.eos_array(eos_ids),
    )


def generate(
    base_params,
    cfg: ModelConfig,
    draft_params,
    dcfg: DraftConfig,
    prompts: Sequence[Sequence[int]],
    *,
    tree_cfg: TreeConfig,
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
      tree_cfg: static tree sizes.  temperature: 0 = greedy.  top_p / top_k: 1.0 / 0 = off.
      eos_ids: stop ids (default: the base config's).  max_len: refuse prompts for which
        prompt + max_new_tokens exceeds it (default: the model's max_position_embeddings).
      on_round: called after every round with (out_tokens [B, N], num_out [B]) on the host, for
        streaming; it implies the host loop and costs one extra transfer per round.
      loop: "device" (prefill and all rounds in one `lax.while_loop` program; the default) or
        "host" (a Python loop over the jitted, donated `spec_round`, reading back `done`).
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
    checks.tree_sizes(
        top_k=tree_cfg.top_k, depth=tree_cfg.depth, total_tokens=tree_cfg.total_tokens,
        vocab_size=cfg.vocab_size if draft_head is None else draft_head.token_ids.shape[0],
    )  # fmt: skip
    tree_cfg = tree_cfg.trimmed()  # no level drafted that total_tokens then discards
    sampling_knobs = vanilla.SamplingKnobs(temperature, top_p, top_k)
    shapes = plan_shapes([len(p) for p in prompts], max_new_tokens, tree_cfg)
    tokens, lengths = vanilla.pad_prompts(prompts, [shapes.prompt_bucket])
    greedy = sampling_knobs.greedy
    knobs = make_knobs(
        sampling_knobs, max_new_tokens=max_new_tokens,
        eos_ids=cfg.eos_token_ids if eos_ids is None else eos_ids,
    )  # fmt: skip
    static = dict(cfg=cfg, dcfg=dcfg, tree_cfg=tree_cfg, greedy=greedy, shapes=shapes, mesh=mesh)
    seeds = jnp.asarray(vanilla.row_seeds(seed, len(prompts)))
    inputs = (jnp.asarray(tokens), jnp.asarray(lengths), knobs, seeds, draft_head)
    if mesh is not None:
        base_params = sharding.shard_params(base_params, mesh, head_dim=cfg.head_dim)
        draft_params = sharding.shard_params(draft_params, mesh, head_dim=dcfg.head_dim)
        tokens_in, lengths_in, rest = sharding.place_inputs(*inputs[:2], inputs[2:], mesh)
        inputs = (tokens_in, lengths_in, *rest)
        knobs, draft_head = inputs[2], inputs[4]  # placed: unplaced ones recompile the round
    if loop == "device" and on_round is None:
        state = generate_device(base_params, draft_params, *inputs, **static)
    else:
        state = prefill(base_params, draft_params, *inputs, **static)
        for _ in range(max_new_tokens):  # every round emits >= 1 token per active row
            if on_round is not None:
                on_round(np.asarray(state.out_tokens), np.asarray(state.num_out))
            if bool(np.all(np.asarray(state.done))):
                break
            state = spec_round(state, base_params, draft_params, knobs, draft_head, **static)
    out = np.asarray(state.out_tokens)
    num_out = np.asarray(state.num_out)
    log = np.asarray(state.accept_log)
    rounds = np.asarray(state.rounds)
    return SpecResult(
        output_ids=[out[i, : num_out[i]].tolist() for i in range(len(prompts))],
        accept_lengths=[log[i, : rounds[i]].tolist() for i in range(len(prompts))],
        rounds=rounds.tolist(),
    )
