"""Tiny base/draft pairs for engine tests: random ones (low acceptance) and aligned ones.

The aligned construction makes a draft that always agrees with the base's greedy choice, so
trees get accepted to full depth: the base's attention and MLP outputs are zeroed (o_proj and
down_proj = 0), so its residual stream is the token embedding e and its greedy next token is
argmax(W_head . norm(e)) = argmax(W_head . e) (RMSNorm with unit weight only rescales e by a
positive number). The draft's fc picks the embedding half of [e, f] and its other outputs are
zeroed, so its token feature is e as well. `noise` > 0 perturbs the draft so that it agrees
only often.

EAGLE-3 (`eagle3_aligned`): its token embedding reaches the output only through attention, so
the draft's attention is made to attend to each query's own position (q = k = 5 N(emb): a token
scores its own key far above any other token's) and to carry N(emb) to the output (v picks the
embedding half, o_proj scales it up); `fc` is zero, so a trunk output is c N(e) and predicts
what the base predicts after e. Tree levels add the parent's output through the residual, so
only the first drafted level is reliably right (acceptance ~1 per round, not full depth).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from griffin_jax import draft as draft_lib
from griffin_jax import model as base_lib
from griffin_jax import speculative, vanilla
from griffin_jax.config import ModelConfig


def eagle3_aligned(cfg: ModelConfig, dcfg: draft_lib.DraftConfig, base, seed: int = 0):
    """An EAGLE-3 draft whose first drafted level matches the zeroed base (see the docstring)."""
    d = dcfg.d_model
    assert dcfg.kind == "eagle3" and dcfg.draft_vocab == cfg.vocab_size and d == cfg.d_model
    assert dcfg.n_heads * dcfg.head_dim == d and dcfg.n_kv_heads == dcfg.n_heads
    draft = draft_lib.init_draft_params(dcfg, jax.random.key(seed + 1))
    pick = np.zeros((2 * d, d), np.float32)
    pick[:d] = np.eye(d)  # [N(emb), N(feat)] -> N(emb)
    attn = {
        "q_proj": {"kernel": jnp.asarray(5.0 * pick)},
        "k_proj": {"kernel": jnp.asarray(5.0 * pick)},
        "v_proj": {"kernel": jnp.asarray(pick)},
        "o_proj": {"kernel": jnp.asarray(10.0 * np.eye(d, dtype=np.float32))},
    }
    mid = dict(draft["midlayer"], self_attn=attn)
    mid["mlp"] = dict(mid["mlp"], down_proj=_zeros_like_tree(mid["mlp"]["down_proj"]))
    head = base["embed_tokens"]["embedding"].T if cfg.tie_embeddings else base["lm_head"]["kernel"]
    return dict(
        draft,
        fc=_zeros_like_tree(draft["fc"]),
        midlayer=mid,
        norm={"weight": jnp.full((d,), 20.0)},  # a confident draft: sharper logits, same argmax
        lm_head={"kernel": head},
    )


def base_config(family: str = "llama", **overrides) -> ModelConfig:
    kw = dict(
        family=family, vocab_size=128, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2,
        head_dim=16, d_ff=96, eos_token_ids=(3,),
    )  # fmt: skip
    if family == "qwen2":
        kw["qkv_bias"] = True
    if family == "mixtral":
        kw.update(n_experts=4, n_experts_per_tok=2)
    kw.update(overrides)
    return ModelConfig(**kw)


def draft_config(cfg: ModelConfig, kind: str = "griffin", **overrides) -> draft_lib.DraftConfig:
    kw = dict(
        kind=kind, vocab_size=cfg.vocab_size, d_model=cfg.d_model, d_ff=80, n_heads=4,
        n_kv_heads=4, head_dim=cfg.d_model // 4, rope=cfg.rope, rms_eps=cfg.rms_eps,
    )  # fmt: skip
    kw.update(overrides)
    return draft_lib.DraftConfig(**kw)


def random_pair(cfg: ModelConfig, dcfg: draft_lib.DraftConfig, seed: int = 0):
    base = base_lib.init_params(cfg, jax.random.key(seed))
    base = jax.tree.map(lambda x: x * 3.0 if x.ndim >= 2 else x, base)  # sharper logits
    return base, draft_lib.init_draft_params(dcfg, jax.random.key(seed + 1))


def _zeros_like_tree(tree):
    return jax.tree.map(jnp.zeros_like, tree)


def aligned_pair(
    cfg: ModelConfig, dcfg: draft_lib.DraftConfig, seed: int = 0, *, noise: float = 0.0
):
    """A base whose greedy next token depends only on the current token, and a draft that knows
    it (see the module docstring). `noise` adds a random perturbation to the draft's fc."""
    base = base_lib.init_params(cfg, jax.random.key(seed))
    layers = dict(base["layers"])
    attn = dict(layers["self_attn"])
    attn["o_proj"] = _zeros_like_tree(attn["o_proj"])
    layers["self_attn"] = attn
    if cfg.n_experts:
        moe = dict(layers["block_sparse_moe"])
        moe["w2"] = jnp.zeros_like(moe["w2"])
        layers["block_sparse_moe"] = moe
    else:
        mlp = dict(layers["mlp"])
        mlp["down_proj"] = _zeros_like_tree(mlp["down_proj"])
        layers["mlp"] = mlp
    base = dict(base, layers=layers)
    base["norm"] = {"weight": jnp.ones_like(base["norm"]["weight"])}
    if dcfg.kind == "eagle3":
        return base, eagle3_aligned(cfg, dcfg, base, seed)

    draft = draft_lib.init_draft_params(dcfg, jax.random.key(seed + 1))
    d = cfg.d_model
    pick_emb = np.zeros((2 * d, d), np.float32)
    # concat order [embedding, feature]; the scale makes the draft confident (argmax unchanged),
    # so the best chain outscores side branches and trees reach full depth.
    pick_emb[:d] = 20.0 * np.eye(d)
    rng = np.random.default_rng(seed)
    pick_emb += noise * rng.standard_normal(pick_emb.shape).astype(np.float32)
    draft = jax.tree.map(lambda x: x, draft)
    if dcfg.kind == "griffin":
        fc = dict(draft["fc"])
        fc["fc"] = {"kernel": jnp.asarray(pick_emb), "bias": jnp.zeros((d,))}
        mlp = dict(fc["mlp"])
        mlp["down_proj"] = _zeros_like_tree(mlp["down_proj"])
        fc["mlp"] = mlp
        draft["fc"] = fc
    else:
        draft["fc"] = {"kernel": jnp.asarray(pick_emb), "bias": jnp.zeros((d,))}
    layer = dict(draft["layers_0"])
    attn = dict(layer["self_attn"])
    attn["o_proj"] = _zeros_like_tree(attn["o_proj"])
    layer["self_attn"] = attn
    mlp = dict(layer["mlp"])
    mlp["down_proj"] = _zeros_like_tree(mlp["down_proj"])
    layer["mlp"] = mlp
    draft["layers_0"] = layer
    return base, draft


def prefilled(
    base, draft, cfg, dcfg, prompts, budget, *, max_new: int, eos_ids, draft_head=None,
    prompt_pending: bool = False,
):  # fmt: skip
    """(state, knobs, shapes) of a greedy `speculative.generate` of `prompts` under `budget`
    (a `budget.Budget`), prefilled: for tests that drive rounds or the draft by hand."""
    shapes = speculative.plan_shapes(
        [len(p) for p in prompts], max_new, budget.shapes, prompt_pending=prompt_pending
    )
    tokens, lengths = vanilla.pad_prompts(prompts, [shapes.prompt_bucket])
    knobs = speculative.make_knobs(
        vanilla.SamplingKnobs(), max_new_tokens=max_new, eos_ids=list(eos_ids)
    )
    seeds = jnp.zeros(len(prompts), jnp.uint32)
    state = speculative.prefill(
        base, draft, jnp.asarray(tokens), jnp.asarray(lengths), knobs, seeds, budget, draft_head,
        cfg=cfg, dcfg=dcfg, greedy=True, shapes=shapes,
    )  # fmt: skip
    return state, knobs, shapes


def prefill_and_step(params, cfg: ModelConfig, tokens, cap: int):
    """A base forward over `tokens` [B, T] into an empty per-layer cache of `cap` slots, then a
    one-token step at position T (each row's first token again): (logits, hidden, step logits).
    For comparing two layouts of the same weights."""
    from griffin_jax.kv_cache import causal_mask, init_cache

    b, t = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    zero = jnp.zeros((b,), jnp.int32)
    cache = init_cache(cfg, b, cap, per_layer=True)
    logits, hidden, cache = _base_forward(
        params, tokens, positions, cache, write_idx=zero, mask=causal_mask(zero, t, cap), cfg=cfg
    )
    length = jnp.full((b,), t, jnp.int32)
    step, _, _ = _base_forward(
        params, tokens[:, :1], length[:, None], cache, write_idx=length,
        mask=causal_mask(length, 1, cap), cfg=cfg,
    )  # fmt: skip
    return logits, hidden, step


def draft_from_start(params, dcfg, embedding, features, tokens, cap: int):
    """A draft forward over `tokens` [B, T] and `features` into an empty cache of `cap` slots."""
    from griffin_jax.kv_cache import causal_mask

    b, t = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    zero = jnp.zeros((b,), jnp.int32)
    cache = draft_lib.init_draft_cache(dcfg, b, cap)
    return draft_lib.draft_forward(
        params, embedding, features, tokens, positions, cache, write_idx=zero,
        mask=causal_mask(zero, t, cap), dcfg=dcfg,
    )  # fmt: skip


def assert_forwards_close(a, b, cfg: ModelConfig, tokens, cap: int, **tol) -> None:
    """Two layouts of one base compute the same `prefill_and_step` outputs, within `tol`
    (`np.testing.assert_allclose`'s rtol / atol)."""
    got = [prefill_and_step(params, cfg, tokens, cap) for params in (a, b)]
    for x, y in zip(*got, strict=True):
        np.testing.assert_allclose(x, y, **tol)


def assert_draft_forwards_close(a, b, dcfg, embedding, features, tokens, cap: int, **tol) -> None:
    """Two layouts of one draft compute the same `draft_from_start` outputs, in the same dtypes,
    within `tol`."""
    got = [draft_from_start(p, dcfg, embedding, features, tokens, cap) for p in (a, b)]
    assert jax.tree.structure(got[0]) == jax.tree.structure(got[1])
    for x, y in zip(jax.tree.leaves(got[0]), jax.tree.leaves(got[1]), strict=True):
        assert x.dtype == y.dtype
        np.testing.assert_allclose(x, y, **tol)


_base_forward = jax.jit(base_lib.forward, static_argnames=("cfg",))


def attention_reference(q, k, v, mask) -> np.ndarray:
    """float64 softmax attention of q [B, T, N, H] over k, v [B, S, K, H], each query over the
    slots its mask row [B, T, S] lets it see (0 where it sees none)."""
    b, t, n, h = q.shape
    group = n // k.shape[2]
    out = np.zeros((b, t, n, h))
    for row in range(b):
        for i in range(t):
            seen = np.flatnonzero(mask[row, i])
            if not len(seen):
                continue
            for head in range(n):
                keys = k[row, seen, head // group].astype(np.float64)
                scores = keys @ q[row, i, head].astype(np.float64) / np.sqrt(h)
                weights = np.exp(scores - scores.max())
                out[row, i, head] = weights @ v[row, seen, head // group] / weights.sum()
    return out
