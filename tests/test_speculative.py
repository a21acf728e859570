"""The speculative engine: lossless greedy and sampling, stopping, batching, bookkeeping."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from spec_models import aligned_pair, base_config, draft_config, prefilled, random_pair

from griffin_jax import sampling, speculative, vanilla
from griffin_jax.config import TreeConfig
from griffin_jax.kv_cache import causal_mask, init_cache
from griffin_jax.model import forward

TREE = TreeConfig(top_k=3, depth=3, total_tokens=10)
PROMPTS = [[5, 6, 7, 8, 9], [10, 11, 12], list(range(20, 38)), [40]]


def _vanilla(base, cfg, prompts, n, **kw):
    return vanilla.generate(base, cfg, prompts, max_new_tokens=n, **kw).output_ids


@pytest.mark.parametrize(
    "family,kind",
    [
        ("llama", "griffin"), ("llama", "eagle2"), ("qwen2", "griffin"), ("mixtral", "griffin"),
        ("llama", "eagle3"),
    ],
)  # fmt: skip
@pytest.mark.parametrize("aligned", [False, True])
def test_greedy_equals_vanilla_batch(family, kind, aligned):
    # EAGLE-3 reads the inputs of layers 2, L//2 and L-3: a base of at least 7 layers.
    cfg = base_config(family, n_layers=8 if kind == "eagle3" else 2)
    dcfg = draft_config(cfg, kind)
    make = aligned_pair if aligned else random_pair
    base, draft = make(cfg, dcfg)
    res = speculative.generate(base, cfg, draft, dcfg, PROMPTS, tree_cfg=TREE, max_new_tokens=24)
    assert res.output_ids == _vanilla(base, cfg, PROMPTS, 24)
    accepted = [a for row in res.accept_lengths for a in row]
    if aligned and kind == "eagle3":  # the first drafted level is right (`eagle3_aligned`)
        assert res.tau > 1.9
    elif aligned:  # full-depth paths: every round accepts depth + 1 draft tokens until the end
        assert max(accepted) == TREE.depth + 1
        assert res.tau > 3.0
    for row, out in zip(res.accept_lengths, res.output_ids, strict=True):
        assert len(out) <= 24
        # one token from prefill, then the emitted accepted tokens + bonus of every round (the
        # last round counts only what it emitted: tau is honest)
        assert 1 + sum(a + 1 for a in row) == len(out)


@pytest.mark.parametrize("kind", ["griffin", "eagle2"])
def test_greedy_batch1_each_prompt(kind):
    cfg = base_config("llama", n_kv_heads=1)
    dcfg = draft_config(cfg, kind, n_kv_heads=2)
    base, draft = aligned_pair(cfg, dcfg, seed=3, noise=0.3)
    for prompt in PROMPTS[:2]:  # one length bucket: one compiled program
        res = speculative.generate(
            base, cfg, draft, dcfg, [prompt], tree_cfg=TREE, max_new_tokens=17
        )
        assert res.output_ids == _vanilla(base, cfg, [prompt], 17)
        assert len(res.output_ids[0]) == 17


def test_stops_at_eos_with_stop_token_included():
    cfg = base_config("llama")
    dcfg = draft_config(cfg)
    base, draft = aligned_pair(cfg, dcfg, seed=1)
    free = _vanilla(base, cfg, PROMPTS, 30, eos_ids=[-5])
    # Use a token that appears mid-way in row 0's free-running output as the EOS id.
    eos = free[0][7]
    spec = speculative.generate(
        base, cfg, draft, dcfg, PROMPTS, tree_cfg=TREE, max_new_tokens=30, eos_ids=[eos]
    )
    assert spec.output_ids == _vanilla(base, cfg, PROMPTS, 30, eos_ids=[eos])
    row0 = spec.output_ids[0]
    assert row0[-1] == eos and eos not in row0[:-1] and len(row0) <= 8
    for row, out in zip(spec.accept_lengths, spec.output_ids, strict=True):
        assert 1 + sum(a + 1 for a in row) == len(out)  # tokens past the stop do not count


@pytest.mark.parametrize("max_new", [1, 2, 7])
def test_never_more_than_max_new_tokens(max_new):
    cfg = base_config("llama")
    dcfg = draft_config(cfg)
    base, draft = aligned_pair(cfg, dcfg)
    spec = speculative.generate(
        base, cfg, draft, dcfg, PROMPTS, tree_cfg=TREE, max_new_tokens=max_new, eos_ids=[-5]
    )
    assert [len(o) for o in spec.output_ids] == [max_new] * len(PROMPTS)
    # tau counts emitted tokens only: accepted tokens past max_new_tokens are not counted
    assert [1 + sum(a + 1 for a in row) for row in spec.accept_lengths] == [max_new] * len(PROMPTS)
    assert spec.output_ids == _vanilla(base, cfg, PROMPTS, max_new, eos_ids=[-5])


@pytest.mark.parametrize("max_new", [33, 48])
def test_tight_cache_capacity_holds_every_write(max_new):
    # A full 16-token bucket: every round writes the whole tree (10 slots) from the row's
    # length, the last one from up to prompt + max_new - 2. 33 new tokens plan the tightest
    # capacity (64 = 16 + 33 + 10 + 5 slots); a plan without room for the tree would keep 64
    # slots up to 48 new tokens and clamp the last rounds' writes over committed entries (a
    # random pair: the base's attention reads them).
    cfg = base_config("llama")
    dcfg = draft_config(cfg)
    base, draft = random_pair(cfg, dcfg)
    prompts = [list(range(20, 36)), [5, 6, 7]]
    shapes = speculative.plan_shapes([len(p) for p in prompts], max_new, TREE)
    assert shapes.capacity == (64 if max_new == 33 else 128)
    spec = speculative.generate(
        base, cfg, draft, dcfg, prompts, tree_cfg=TREE, max_new_tokens=max_new, eos_ids=[-5]
    )
    assert spec.output_ids == _vanilla(base, cfg, prompts, max_new, eos_ids=[-5])


def test_host_loop_and_device_loop_agree_and_stream():
    cfg = base_config("llama")
    dcfg = draft_config(cfg)
    base, draft = aligned_pair(cfg, dcfg, noise=0.5)
    seen = []
    host = speculative.generate(
        base, cfg, draft, dcfg, PROMPTS, tree_cfg=TREE, max_new_tokens=20, loop="host",
        on_round=lambda out, n: seen.append(n.copy()),
    )  # fmt: skip
    device = speculative.generate(base, cfg, draft, dcfg, PROMPTS, tree_cfg=TREE, max_new_tokens=20)
    assert host.output_ids == device.output_ids
    assert host.accept_lengths == device.accept_lengths
    counts = np.stack(seen)  # non-decreasing per row, one entry per round + the final state
    assert np.all(np.diff(counts, axis=0) >= 0)
    assert len(seen) == max(host.rounds) + 1


def test_no_recompile_across_rounds_and_prompts_in_a_bucket():
    cfg = base_config("llama")
    dcfg = draft_config(cfg)
    base, draft = random_pair(cfg, dcfg)
    run = dict(tree_cfg=TREE, max_new_tokens=12, loop="host")
    speculative.generate(base, cfg, draft, dcfg, [[1, 2, 3]], **run)
    sizes = (speculative.prefill._cache_size(), speculative.run_segment._cache_size())
    speculative.generate(base, cfg, draft, dcfg, [[4, 5, 6, 7, 8, 9, 10]], **run)
    speculative.generate(base, cfg, draft, dcfg, [[11]], seed=3, **run)
    assert (speculative.prefill._cache_size(), speculative.run_segment._cache_size()) == sizes


def test_prompt_that_cannot_fit_is_refused():
    cfg = base_config("llama", max_position_embeddings=32)
    dcfg = draft_config(cfg)
    base, draft = random_pair(cfg, dcfg)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        speculative.generate(
            base, cfg, draft, dcfg, [list(range(30))], tree_cfg=TREE, max_new_tokens=8,
            max_len=cfg.max_position_embeddings,
        )  # fmt: skip


def _exact_two_token_probs(base, cfg, prompt, *, temperature, top_p, top_k):
    """p(t1, t2 | prompt) under the warped base distribution, by brute force over t1."""
    v = cfg.vocab_size

    @jax.jit  # one program per length (two), not op by op for each of the V + 1 calls
    def last_logits(ids):
        t = ids.shape[1]
        cache = init_cache(cfg, 1, t)
        zero = jnp.zeros((1,), jnp.int32)
        lg, _, _ = forward(
            base, ids, jnp.arange(t)[None], cache, write_idx=zero, mask=causal_mask(zero, t, t),
            cfg=cfg,
        )  # fmt: skip
        return lg[0, -1]

    def logits_after(seq):
        return last_logits(jnp.asarray([seq], jnp.int32))

    def warped(seq):
        lp = sampling.warp(logits_after(seq)[None], temperature, top_p, top_k)[0]
        return np.exp(np.asarray(lp, np.float64))

    p1 = warped(prompt)
    joint = np.zeros((v, v))
    for t1 in range(v):
        if p1[t1] > 0:
            joint[t1] = p1[t1] * warped(prompt + [t1])
    return joint


# Plain T = 1 and top-k warps of the whole-vocabulary draft are in tests/test_sampling_joint.py
# (the joint of four tokens) and in the seeded equality with vanilla sampling below.
@pytest.mark.slow
@pytest.mark.parametrize(
    "temperature,top_p,top_k,subset",
    [(0.7, 0.9, 0, None), (1.0, 1.0, 0, [6, 2, 7, 0]), (0.8, 1.0, 0, "eagle3")],
)  # fmt: skip
def test_sampling_preserves_the_warped_distribution(temperature, top_p, top_k, subset):
    """Chi-square on the first two new tokens (prefill root + the first round's first) over many
    rows (each its own seed: row b samples with seed + b).

    `subset`: the draft proposes only from these ids (a DraftHead); the output distribution
    must not change. "eagle3": an EAGLE-3 draft with its own 5-token vocabulary (d2t)."""
    kind = "eagle3" if subset == "eagle3" else "griffin"
    cfg = base_config(
        "llama", vocab_size=8, d_model=32, head_dim=8, d_ff=48, eos_token_ids=(),
        n_layers=7 if kind == "eagle3" else 2,
    )  # fmt: skip
    extra = dict(draft_vocab_size=5) if kind == "eagle3" else {}
    dcfg = draft_config(cfg, kind, d_ff=40, head_dim=8, **extra)
    base, draft = random_pair(cfg, dcfg, seed=2)
    base = jax.tree.map(lambda x: x / 3.0, base)  # soften: many tokens keep mass
    if kind == "eagle3":
        draft["d2t"] = jnp.asarray([0, 1, 1, 2, 3], jnp.int32)  # targets 0, 2, 3, 5, 7
        subset = None
    prompt = [1, 2, 3, 4]
    n = 4000
    tree = TreeConfig(top_k=3, depth=2, total_tokens=8)
    head = None if subset is None else speculative.make_draft_head(base, cfg, subset)
    res = speculative.generate(
        base, cfg, draft, dcfg, [prompt] * n, tree_cfg=tree, max_new_tokens=3,
        temperature=temperature, top_p=top_p, top_k=top_k, seed=11, eos_ids=[],
        draft_head=head,
    )  # fmt: skip
    counts = np.zeros((8, 8))
    for out in res.output_ids:
        counts[out[0], out[1]] += 1
    exact = _exact_two_token_probs(
        base, cfg, prompt, temperature=temperature, top_p=top_p, top_k=top_k
    )
    assert np.all(counts[exact == 0] == 0)  # never a token the warped base cannot produce
    expected = exact * n
    keep = expected >= 5
    chi2 = np.sum((counts[keep] - expected[keep]) ** 2 / expected[keep])
    rest = counts[~keep].sum(), expected[~keep].sum()
    if rest[1] >= 5:
        chi2 += (rest[0] - rest[1]) ** 2 / rest[1]
    dof = int(keep.sum()) + (rest[1] >= 5) - 1
    # 99.9% quantile of chi-square via the Wilson-Hilferty approximation.
    z = 3.09
    limit = dof * (1 - 2 / (9 * dof) + z * np.sqrt(2 / (9 * dof))) ** 3
    assert chi2 < limit, (chi2, limit, dof)
    # the draft was actually used: some first rounds emitted an accepted draft token as token 2
    assert sum(row[0] for row in res.accept_lengths) > 0
    if kind == "eagle3":  # ...and only tokens of its vocabulary were ever accepted
        accepted = {
            out[1] for out, row in zip(res.output_ids, res.accept_lengths, strict=True) if row[0]
        }
        assert accepted <= {0, 2, 3, 5, 7}


@pytest.mark.parametrize("family", ["llama", "qwen2"])  # qwen2: tied embeddings
def test_draft_head_logits_are_the_base_logits_of_its_tokens(family):
    cfg = base_config(family, tie_embeddings=family == "qwen2")
    base, _ = random_pair(cfg, draft_config(cfg))
    ids = np.random.default_rng(1).permutation(cfg.vocab_size)[:40]
    head = speculative.make_draft_head(base, cfg, ids)
    hidden = jax.random.normal(jax.random.key(0), (3, cfg.d_model))
    full = speculative._draft_logits(base, hidden, None, cfg=cfg)
    np.testing.assert_allclose(
        speculative._draft_logits(base, hidden, head, cfg=cfg), full[:, ids], rtol=1e-6
    )
    np.testing.assert_array_equal(np.asarray(head.token_ids), ids)


def test_draft_head_drafts_only_its_tokens_and_stays_lossless():
    cfg = base_config("llama")
    dcfg = draft_config(cfg)
    base, draft = random_pair(cfg, dcfg)
    subset = np.random.default_rng(0).permutation(cfg.vocab_size)[:40]
    head = speculative.make_draft_head(base, cfg, subset)
    res = speculative.generate(
        base, cfg, draft, dcfg, PROMPTS, tree_cfg=TREE, max_new_tokens=20, draft_head=head
    )
    assert res.output_ids == _vanilla(base, cfg, PROMPTS, 20)
    budget = speculative.prepare_budget(TREE, vocab_size=cfg.vocab_size)
    drafted = {}
    for name, h in (("subset", head), ("full", None)):
        state, _, shapes = prefilled(
            base, draft, cfg, dcfg, PROMPTS, budget, max_new=20, eos_ids=[], draft_head=h
        )
        tree = speculative.draft_tree(
            state, base, draft, h, cfg=cfg, dcfg=dcfg, tree_cfg=TREE, shapes=shapes
        )
        drafted[name] = np.asarray(tree.draft_tokens)[:, 1:]  # node 0: the base's root token
    assert np.isin(drafted["subset"], subset).all()
    # the same draft over the whole vocabulary proposes tokens outside the subset
    assert not np.isin(drafted["full"], subset).all()


def test_draft_head_refuses_bad_ids():
    cfg = base_config()
    base, _ = random_pair(cfg, draft_config(cfg))
    for ids in ([1, 1, 2], [0, cfg.vocab_size], []):
        with pytest.raises(ValueError, match="draft vocabulary"):
            speculative.make_draft_head(base, cfg, ids)


def test_sampling_same_seed_same_output():
    cfg = base_config("llama")
    dcfg = draft_config(cfg)
    base, draft = aligned_pair(cfg, dcfg, noise=0.3)
    kw = dict(tree_cfg=TREE, max_new_tokens=16, temperature=0.8, top_p=0.95, seed=5)
    a = speculative.generate(base, cfg, draft, dcfg, PROMPTS, **kw)
    b = speculative.generate(base, cfg, draft, dcfg, PROMPTS, **kw)
    assert a.output_ids == b.output_ids


# Seeded sampling: every token is drawn with the key of (row seed, sequence index), so speculative
# and vanilla decoding with the same seed emit the same tokens. Near-tie rule (as for greedy):
# equality is exact unless a draw's uniform lies within the f32 round-off between the two
# programs' cumulative masses (~1e-6) of a boundary between two tokens (`sampling.keyed_sample`):
# for these few hundred draws, odds below 1e-3.
SEEDED_TREES = [
    TREE,
    TreeConfig(top_k=1, depth=4, total_tokens=6),
    TreeConfig(top_k=3, depth=0, total_tokens=4),
]


@pytest.mark.parametrize("temperature,top_p,top_k", [(0.7, 0.9, 0), (1.0, 1.0, 5)])
def test_seeded_sampling_equals_seeded_vanilla(temperature, top_p, top_k):
    cfg = base_config("llama")
    dcfg = draft_config(cfg)
    base, draft = aligned_pair(cfg, dcfg, noise=0.3)
    knobs = dict(max_new_tokens=20, temperature=temperature, top_p=top_p, top_k=top_k)
    want = vanilla.generate(base, cfg, PROMPTS, seed=11, **knobs).output_ids
    accepted = 0
    for tree in SEEDED_TREES:
        batch = speculative.generate(
            base, cfg, draft, dcfg, PROMPTS, tree_cfg=tree, seed=11, **knobs
        )
        assert batch.output_ids == want, tree
        accepted += sum(a for row in batch.accept_lengths for a in row)
    # Alone (batch 1), row b is the same request with seed 11 + b (the rows of one length
    # bucket: one compiled program).
    for b, prompt in enumerate(PROMPTS):
        if len(prompt) > 16:
            continue
        alone = speculative.generate(
            base, cfg, draft, dcfg, [prompt], tree_cfg=SEEDED_TREES[1], seed=11 + b, **knobs
        )
        assert alone.output_ids == [want[b]]
    assert accepted > 20  # multi-token rounds happened: the equality is not trivial
    # Another seed samples something else.
    assert vanilla.generate(base, cfg, PROMPTS, seed=12, **knobs).output_ids != want


def test_levels_total_tokens_cannot_keep_are_not_drafted():
    """depth 6 with 4 nodes: at most 3 drafted levels survive, so only depth 2 is drafted."""
    deep = TreeConfig(top_k=2, depth=6, total_tokens=4)
    assert deep.trimmed() == TreeConfig(top_k=2, depth=2, total_tokens=4)
    assert TREE.trimmed() == TREE
    cfg = base_config("llama")
    dcfg = draft_config(cfg)
    base, draft = aligned_pair(cfg, dcfg, noise=0.3)
    a = speculative.generate(base, cfg, draft, dcfg, PROMPTS, tree_cfg=deep, max_new_tokens=12)
    b = speculative.generate(
        base, cfg, draft, dcfg, PROMPTS, tree_cfg=deep.trimmed(), max_new_tokens=12
    )
    assert (a.output_ids, a.accept_lengths) == (b.output_ids, b.accept_lengths)
    assert a.output_ids == _vanilla(base, cfg, PROMPTS, 12)
