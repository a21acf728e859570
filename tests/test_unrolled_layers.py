"""The unrolled decode layout (`model.unstack_layers` + per-layer KV buffers) and the fused
projections (`layers.fuse_projections`) compute what the stored layout (stacked, `nn.scan`,
unfused) computes, through every engine path."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from spec_models import (
    aligned_pair,
    assert_draft_forwards_close,
    assert_forwards_close,
    base_config,
    draft_config,
    random_pair,
)

from convert.export_draft import export_draft
from convert.export_hf import export_hf
from griffin_jax import sharding, speculative, vanilla
from griffin_jax.config import TreeConfig
from griffin_jax.kv_cache import causal_mask, commit_path, init_cache, tree_mask_to_cache
from griffin_jax.layers import fuse_projections, is_fused, unfuse_projections
from griffin_jax.model import decode_layout, forward, is_unstacked, stack_layers, unstack_layers

# f32 round-off between two XLA programs of the same maths (fused differently): logits are
# O(5), so 5e-5 is ~1e-5 relative.
ATOL = 5e-5
_forward = jax.jit(forward, static_argnames=("cfg",))


def _stacked_view(cache):
    """A per-layer cache's buffers as [L, B, S, K, H] (for comparison)."""
    return np.stack(cache.k), np.stack(cache.v)


@pytest.mark.parametrize("family", ["llama", "qwen2", "mixtral"])
def test_prefill_tree_verify_and_commit_match_the_scanned_layout(family):
    cfg = base_config(family, tie_embeddings=family == "qwen2")
    stacked, _ = random_pair(cfg, draft_config(cfg))
    unrolled = unstack_layers(stacked)
    assert is_unstacked(unrolled) and not is_unstacked(stacked)
    assert len(unrolled["layers"]) == cfg.n_layers
    rng = np.random.default_rng(0)
    b, t, cap = 2, 9, 32
    tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (b, t)), jnp.int32)
    tree_tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (b, 4)), jnp.int32)
    tree_mask = jnp.asarray(np.tril(np.ones((4, 4), bool))[None].repeat(b, 0))
    length = jnp.array([t, t - 3], jnp.int32)
    zero = jnp.zeros((b,), jnp.int32)
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    outs = {}
    for name, params in (("stacked", stacked), ("unrolled", unrolled)):
        cache = init_cache(cfg, b, cap, per_layer=name == "unrolled")
        logits, hidden, cache = _forward(
            params, tokens, pos, cache, write_idx=zero, mask=causal_mask(zero, t, cap), cfg=cfg
        )
        v_logits, _, cache = _forward(
            params, tree_tokens, length[:, None] + jnp.arange(4)[None], cache,
            write_idx=length, mask=tree_mask_to_cache(length, tree_mask, cap), cfg=cfg,
        )  # fmt: skip
        cache = cache.replace(length=length)
        cache = commit_path(cache, jnp.array([[0, 2, 3], [0, 1, 0]]), jnp.array([3, 2]))
        outs[name] = (logits, hidden, v_logits, cache)
    (l0, h0, v0, c0), (l1, h1, v1, c1) = outs["stacked"], outs["unrolled"]
    np.testing.assert_allclose(l1, l0, atol=ATOL, rtol=0)
    np.testing.assert_allclose(h1, h0, atol=ATOL, rtol=0)
    np.testing.assert_allclose(v1, v0, atol=ATOL, rtol=0)
    k1, v1_ = _stacked_view(c1)
    np.testing.assert_allclose(k1, c0.k, atol=ATOL, rtol=0)
    np.testing.assert_allclose(v1_, c0.v, atol=ATOL, rtol=0)
    np.testing.assert_array_equal(c1.length, c0.length)
    assert c1.capacity == c0.capacity == cap


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_logits_at_computes_the_head_at_the_chosen_positions_only(family):
    """`forward(..., logits_at=...)` gives the full forward's logits at those positions (each
    row its own), in both layouts; the prefills (vanilla and speculative) compile no [B, T, V]
    logits, only each row's last."""
    # a vocabulary size no other dimension has, so a [.., V] buffer is recognisable in the HLO
    cfg = base_config(family, tie_embeddings=family == "qwen2", vocab_size=251)
    stacked, draft = random_pair(cfg, draft_config(cfg))
    rng = np.random.default_rng(1)
    b, t, cap = 2, 9, 32
    tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (b, t)), jnp.int32)
    zero = jnp.zeros((b,), jnp.int32)
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    at = jnp.array([[t - 1, 2, 0], [4, 4, t - 3]], jnp.int32)
    for params in (stacked, unstack_layers(stacked)):
        per_layer = is_unstacked(params)
        full, hidden, _ = _forward(
            params, tokens, pos, init_cache(cfg, b, cap, per_layer=per_layer), write_idx=zero,
            mask=causal_mask(zero, t, cap), cfg=cfg,
        )  # fmt: skip
        some, hidden_some, _ = _forward(
            params, tokens, pos, init_cache(cfg, b, cap, per_layer=per_layer), write_idx=zero,
            mask=causal_mask(zero, t, cap), cfg=cfg, logits_at=at,
        )  # fmt: skip
        assert some.shape == (b, 3, cfg.vocab_size)
        want = np.take_along_axis(np.asarray(full), np.asarray(at)[:, :, None], axis=1)
        np.testing.assert_allclose(some, want, atol=ATOL, rtol=0)
        np.testing.assert_array_equal(hidden_some, hidden)  # features for every position
    # The compiled prefills: no logits buffer of every prompt position.
    params = unstack_layers(stacked)
    t, v = 40, cfg.vocab_size
    tokens = jnp.ones((b, t), jnp.int32)
    lengths = jnp.array([t, 7], jnp.int32)
    whole = re.compile(rf"f32\[({b},{t},{v}|{b * t},{v}|{t},{v})\]")
    hlo = jax.jit(vanilla.prefill, static_argnames=("cfg",)).lower(
        params, tokens, lengths, init_cache(cfg, b, 64, per_layer=True), cfg=cfg
    ).compile().as_text()  # fmt: skip
    assert not whole.search(hlo) and f"f32[{b},{v}]" in hlo
    tree = TreeConfig(top_k=2, depth=2, total_tokens=5)
    budget = speculative.prepare_budget(tree, vocab_size=v)
    shapes = speculative.plan_shapes([t, 7], 8, budget.shapes)
    knobs = speculative.make_knobs(vanilla.SamplingKnobs(0.0, 1.0, 0), max_new_tokens=8, eos_ids=[])
    tokens = jnp.ones((b, shapes.prompt_bucket), jnp.int32)
    hlo = speculative.prefill.lower(
        params, draft, tokens, lengths, knobs, jnp.zeros((b,), jnp.uint32), budget,
        cfg=cfg, dcfg=draft_config(cfg), greedy=True, shapes=shapes,
    ).compile().as_text()  # fmt: skip
    whole = re.compile(rf"f32\[({b},{shapes.prompt_bucket},{v}|{b * shapes.prompt_bucket},{v})\]")
    assert not whole.search(hlo)


def test_layouts_must_match():
    cfg = base_config()
    stacked, _ = random_pair(cfg, draft_config(cfg))
    tokens = jnp.zeros((1, 2), jnp.int32)
    zero = jnp.zeros((1,), jnp.int32)
    with pytest.raises(ValueError, match="per_layer=True"):
        forward(
            unstack_layers(stacked), tokens, tokens, init_cache(cfg, 1, 8),
            write_idx=zero, mask=causal_mask(zero, 2, 8), cfg=cfg,
        )  # fmt: skip


def test_stack_round_trip_export_and_freeing(tmp_path):
    cfg = base_config("mixtral")
    stacked, _ = random_pair(cfg, draft_config(cfg))
    back = stack_layers(unstack_layers(stacked))
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), back, stacked)
    export_hf(stacked, cfg, tmp_path / "a", dtype="f32")
    export_hf(unstack_layers(stacked), cfg, tmp_path / "b", dtype="f32")
    a = (tmp_path / "a" / "model.safetensors").read_bytes()
    assert a == (tmp_path / "b" / "model.safetensors").read_bytes()
    owned = jax.tree.map(jnp.copy, stacked)
    leaf = owned["layers"]["mlp" if "mlp" in owned["layers"] else "block_sparse_moe"]
    first = jax.tree.leaves(leaf)[0]
    unrolled = unstack_layers(owned, free_stacked=True)
    assert first.is_deleted()
    assert unstack_layers(unrolled) is unrolled


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_vanilla_decoding_is_the_same_in_both_layouts(temperature):
    cfg = base_config()
    stacked, _ = random_pair(cfg, draft_config(cfg))
    prompts = [[5, 6, 7], list(range(10, 27))]
    kw = dict(max_new_tokens=12, temperature=temperature, seed=3)
    a = vanilla.generate(stacked, cfg, prompts, **kw).output_ids
    assert vanilla.generate(unstack_layers(stacked), cfg, prompts, **kw).output_ids == a


@pytest.mark.parametrize("family", ["llama", "mixtral"])
def test_speculative_on_unrolled_base_equals_scanned_vanilla(family):
    """Llama in the API's one-device layout (unrolled and fused, the draft fused too), Mixtral
    unrolled only (its experts have no gate/up pair to fuse)."""
    cfg = base_config(family)
    dcfg = draft_config(cfg)
    base, draft = aligned_pair(cfg, dcfg)
    prompts = [[5, 6, 7, 8, 9], [10, 11, 12], list(range(20, 38))]
    tree = TreeConfig(top_k=3, depth=3, total_tokens=10)
    unrolled = unstack_layers(base)
    if family == "llama":
        unrolled, draft = fuse_projections(unrolled), fuse_projections(draft)
        assert is_fused(unrolled) and is_fused(draft)
    res = speculative.generate(
        unrolled, cfg, draft, dcfg, prompts, tree_cfg=tree, max_new_tokens=20
    )
    assert res.output_ids == vanilla.generate(base, cfg, prompts, max_new_tokens=20).output_ids
    assert res.tau > 3.0  # the draft really drafts: full-depth paths get accepted


@pytest.mark.parametrize("family", ["llama", "qwen2", "mixtral"])
def test_fused_projections_compute_what_the_stored_ones_compute(family):
    """Base (prefill, then a decode step on its cache) and draft (GRIFFIN, EAGLE-3) forwards
    with q/k/v and gate/up fused equal the stored layout's within f32 round-off; the layout
    round-trips exactly; what has no q/k/v or gate/up pair (Mixtral's experts, GRIFFIN's
    ungated fusion MLP) stays as it is."""
    cfg = base_config(family, tie_embeddings=family == "qwen2")
    stacked, draft = random_pair(cfg, draft_config(cfg))
    unrolled = unstack_layers(stacked)
    fused = fuse_projections(unrolled)
    attn, mlp = fused["layers"][0]["self_attn"], fused["layers"][0].get("mlp")
    assert sorted(attn) == ["o_proj", "qkv_proj"]
    assert sorted(attn["qkv_proj"]) == (["bias", "kernel"] if family == "qwen2" else ["kernel"])
    assert (mlp is None) == (family == "mixtral")
    if mlp is not None:
        assert sorted(mlp) == ["down_proj", "gate_up_proj"]
    assert fuse_projections(fused)["layers"][0]["self_attn"].keys() == attn.keys()
    back = unfuse_projections(fused, cfg)
    assert jax.tree.structure(back) == jax.tree.structure(unrolled)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), back, unrolled)

    rng = np.random.default_rng(1)
    b, t, cap = 2, 7, 16
    tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (b, t)), jnp.int32)
    assert_forwards_close(unrolled, fused, cfg, tokens, cap, atol=ATOL)

    for kind in ("griffin", "eagle3"):
        dcfg = draft_config(cfg, kind)
        _, draft = random_pair(cfg, dcfg)
        fused_draft = fuse_projections(draft)
        assert is_fused(fused_draft) and not is_fused(draft)
        feats = jnp.asarray(rng.standard_normal((b, t, dcfg.feature_dim)), jnp.float32)
        emb = stacked["embed_tokens"]["embedding"]
        assert_draft_forwards_close(draft, fused_draft, dcfg, emb, feats, tokens, cap, atol=ATOL)


def test_fused_layout_exports_the_stored_one_frees_its_parts_and_is_not_sharded(tmp_path):
    cfg = base_config("qwen2")
    stacked, draft = random_pair(cfg, draft_config(cfg))
    fused = decode_layout(stacked)  # the API's one-device layout
    export_hf(stacked, cfg, tmp_path / "a", dtype="f32")
    export_hf(fused, cfg, tmp_path / "b", dtype="f32")
    name = "model.safetensors"
    assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    dcfg = draft_config(cfg)
    emb = stacked["embed_tokens"]["embedding"]
    export_draft(draft, emb, dcfg, tmp_path / "c")
    export_draft(fuse_projections(draft), emb, dcfg, tmp_path / "d")
    assert (tmp_path / "c" / name).read_bytes() == (tmp_path / "d" / name).read_bytes()

    owned = jax.tree.map(jnp.copy, unstack_layers(stacked))
    part = owned["layers"][0]["self_attn"]["k_proj"]["kernel"]
    fuse_projections(owned, free_parts=True)
    assert part.is_deleted()

    mesh = sharding.make_mesh("data=1")
    with pytest.raises(ValueError, match="fused q/k/v or gate/up"):
        sharding.param_shardings(fused, mesh, head_dim=cfg.head_dim)
