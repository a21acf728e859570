"""The drafts (griffin_jax/draft.py) against the PyTorch reference written from the spec.

T1/T3 parity (f32, HIGHEST matmuls, 1e-5): full-sequence, incremental with a cache, and
tree-masked forwards of the three drafts, with GQA and with q/k/v biases (EAGLE-3: 3D-wide base
features for the trunk, its own D-wide outputs for the tree levels, a reduced draft
vocabulary). T0: the multi-stream training masks against hand-written arrays, and what each
query attends to in both modes.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from torch_ref_draft import RefConfig, make_ref_draft

from convert.load_draft import draft_params_from_state
from griffin_jax import draft, speculative
from griffin_jax.config import RopeConfig
from griffin_jax.draft import DraftConfig, init_draft_cache, multi_stream_attention, stream_masks
from griffin_jax.kv_cache import causal_mask
from griffin_jax.model import head_logits

TOL = dict(atol=1e-5, rtol=1e-5)
# Jitted once per config: much faster on CPU than op-by-op dispatch.
draft_forward = jax.jit(draft.draft_forward, static_argnames=("dcfg",))
draft_forward_train = jax.jit(draft.draft_forward_train, static_argnames=("dcfg", "mask_mode"))

# (kind, num_key_value_heads, qkv_bias, rope_theta)
VARIANTS = [
    ("griffin", 4, False, 10_000.0),
    ("griffin", 2, True, 500_000.0),
    ("eagle2", 4, False, 10_000.0),
    ("eagle2", 1, True, 1_000_000.0),
    ("eagle3", 4, False, 10_000.0),
    ("eagle3", 2, True, 500_000.0),
]
EAGLE3_VOCAB = 48  # V' of the EAGLE-3 variants (of 128)


def _eagle3_buffers(ref, seed: int) -> None:
    """A random draft vocabulary: sorted target ids, d2t = target - index, t2d marking them."""
    rng = np.random.default_rng(seed)
    targets = np.sort(rng.choice(ref.cfg.vocab_size, ref.cfg.draft_vocab_size, replace=False))
    with torch.no_grad():
        ref.d2t.copy_(torch.from_numpy(targets - np.arange(len(targets))))
        ref.t2d.zero_()
        ref.t2d[torch.from_numpy(targets)] = True


def _build(kind: str, kv: int, bias: bool, theta: float, seed: int = 0):
    """(torch reference draft, DraftConfig, our params, base embedding as jax)."""
    vocab = EAGLE3_VOCAB if kind == "eagle3" else 0
    ref_cfg = RefConfig(
        num_key_value_heads=kv, qkv_bias=bias, rope_theta=theta, draft_vocab_size=vocab
    )
    ref = make_ref_draft(kind, ref_cfg, seed=seed)
    if kind == "eagle3":
        _eagle3_buffers(ref, seed)
    dcfg = DraftConfig(
        kind=kind,
        vocab_size=ref_cfg.vocab_size,
        d_model=ref_cfg.hidden_size,
        d_ff=ref_cfg.intermediate_size,
        n_heads=ref_cfg.num_attention_heads,
        n_kv_heads=kv,
        head_dim=ref_cfg.head_dim,
        rope=RopeConfig(theta=theta),
        rms_eps=ref_cfg.rms_norm_eps,
        qkv_bias=bias,
        draft_vocab_size=vocab,
    )
    state = {k: v.detach().numpy() for k, v in ref.state_dict().items()}
    params = draft_params_from_state(state, dcfg)
    embedding = jnp.asarray(state["embed_tokens.weight"])
    return ref, dcfg, params, embedding


def _inputs(b: int, t: int, d: int, vocab: int, seed: int):
    rng = np.random.default_rng(seed)
    feats = rng.normal(size=(b, t, d)).astype(np.float32)
    ids = rng.integers(0, vocab, size=(b, t)).astype(np.int64)
    return feats, ids


def _check(ours, theirs) -> None:
    for a, b in zip(ours, theirs, strict=True):
        b = b.detach().numpy()
        assert np.abs(b).mean() > 0.1  # not a trivially small output
        np.testing.assert_allclose(np.asarray(a), b, **TOL)


@pytest.mark.parametrize("kind,kv,bias,theta", VARIANTS)
def test_full_sequence_forward_matches_torch(kind, kv, bias, theta):
    ref, dcfg, params, embedding = _build(kind, kv, bias, theta)
    b, t, offset, capacity = 2, 12, 5, 16
    feats, ids = _inputs(b, t, dcfg.feature_dim, dcfg.vocab_size, seed=1)
    pos = np.broadcast_to(np.arange(offset, offset + t), (b, t))
    with torch.no_grad():
        want = ref(torch.from_numpy(feats), torch.from_numpy(ids), torch.from_numpy(pos.copy()))
    write_idx = jnp.zeros((b,), jnp.int32)
    tok, nxt, cache = draft_forward(
        params,
        embedding,
        jnp.asarray(feats),
        jnp.asarray(ids, jnp.int32),
        jnp.asarray(pos, jnp.int32),
        init_draft_cache(dcfg, b, capacity),
        write_idx=write_idx,
        mask=causal_mask(write_idx, t, capacity),
        dcfg=dcfg,
    )
    _check((tok, nxt), want[:2])
    # The cache holds the (RoPE'd) keys and values the reference returns.
    k_ref = want[2][0].transpose(1, 2).numpy()  # [B, T, K, H]
    np.testing.assert_allclose(np.asarray(cache.k[:, :t]), k_ref, **TOL)
    if kind == "eagle2":
        np.testing.assert_array_equal(np.asarray(tok), np.asarray(nxt))


@pytest.mark.parametrize("kind,kv,bias,theta", VARIANTS)
def test_incremental_forward_with_cache_matches_torch(kind, kv, bias, theta):
    ref, dcfg, params, embedding = _build(kind, kv, bias, theta)
    b, t0, t1, capacity = 2, 7, 3, 16
    feats, ids = _inputs(b, t0 + t1, dcfg.feature_dim, dcfg.vocab_size, seed=2)
    with torch.no_grad():
        _, _, past = ref(torch.from_numpy(feats[:, :t0]), torch.from_numpy(ids[:, :t0]))
        want = ref(torch.from_numpy(feats[:, t0:]), torch.from_numpy(ids[:, t0:]), past_kv=past)
        full = ref(torch.from_numpy(feats), torch.from_numpy(ids))
    cache = init_draft_cache(dcfg, b, capacity)
    pos = jnp.broadcast_to(jnp.arange(t0 + t1, dtype=jnp.int32), (b, t0 + t1))
    outs = []
    for start, stop in ((0, t0), (t0, t0 + t1)):
        write_idx = jnp.full((b,), start, jnp.int32)
        tok, nxt, cache = draft_forward(
            params,
            embedding,
            jnp.asarray(feats[:, start:stop]),
            jnp.asarray(ids[:, start:stop], jnp.int32),
            pos[:, start:stop],
            cache,
            write_idx=write_idx,
            mask=causal_mask(write_idx, stop - start, capacity),
            dcfg=dcfg,
        )
        outs.append((tok, nxt))
    _check(outs[1], want[:2])
    _check(outs[1], [x[:, t0:] for x in full[:2]])  # the cache changes nothing


@pytest.mark.parametrize("kind,kv,bias,theta", VARIANTS)
def test_outputs_at_some_positions_match_torch_there(kind, kv, bias, theta):
    """`outputs_at` (the trunk reads one output a row): the reference's outputs at those
    positions, every position's K/V as the full forward writes them, and the attention and
    MLP work of the other positions left out (the compiled forward's FLOPs)."""
    ref, dcfg, params, embedding = _build(kind, kv, bias, theta)
    b, t, capacity = 2, 12, 16
    feats, ids = _inputs(b, t, dcfg.feature_dim, dcfg.vocab_size, seed=5)
    with torch.no_grad():
        want = ref(torch.from_numpy(feats), torch.from_numpy(ids))
    at = np.asarray([[11, 3], [0, 7]], np.int32)  # per row, any order
    write_idx = jnp.zeros((b,), jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    args = (
        params, embedding, jnp.asarray(feats), jnp.asarray(ids, jnp.int32), positions,
        init_draft_cache(dcfg, b, capacity),
    )  # fmt: skip
    kw = dict(write_idx=write_idx, mask=causal_mask(write_idx, t, capacity), dcfg=dcfg)
    *outs, cache = draft_forward(*args, outputs_at=jnp.asarray(at), **kw)
    assert outs[0].shape[:2] == (b, 2)
    rows = np.arange(b)[:, None]
    _check(outs, [x[rows, at] for x in want[:2]])
    _, _, full_cache = draft_forward(*args, **kw)
    np.testing.assert_array_equal(np.asarray(cache.k), np.asarray(full_cache.k))
    np.testing.assert_array_equal(np.asarray(cache.v), np.asarray(full_cache.v))

    def flops(outputs_at) -> float:
        fn = jax.jit(functools.partial(draft.draft_forward, outputs_at=outputs_at, **kw))
        return fn.lower(*args).compile().cost_analysis()["flops"]

    one = jnp.asarray(at[:, :1])
    assert flops(one) < 0.75 * flops(None)


def _tree_cache_mask(prefix: int, tree_mask: np.ndarray, capacity: int) -> jnp.ndarray:
    """[B, T, S]: every trunk slot < prefix, plus tree slots prefix + j where tree_mask[b, t, j]."""
    b, t, m = tree_mask.shape
    mask = np.zeros((b, t, capacity), bool)
    mask[:, :, :prefix] = True
    mask[:, :, prefix : prefix + m] = tree_mask
    return jnp.asarray(mask)


@pytest.mark.parametrize("kind,kv,bias,theta", VARIANTS)
def test_tree_masked_forward_matches_torch(kind, kv, bias, theta):
    """A trunk, then two tree levels of K=3 nodes (as topK_genrate drafts them)."""
    ref, dcfg, params, embedding = _build(kind, kv, bias, theta)
    b, prefix, k_nodes, capacity = 2, 6, 3, 16
    trunk_feats, ids = _inputs(b, prefix, dcfg.feature_dim, dcfg.vocab_size, seed=3)
    # Tree levels read the draft's own outputs: D wide (EAGLE-3's trunk reads 3D base features).
    level_feats, level_ids = _inputs(b, 2 * k_nodes, dcfg.d_model, dcfg.vocab_size, seed=4)
    feats = np.concatenate([np.zeros((b, prefix, dcfg.d_model), np.float32), level_feats], 1)
    ids = np.concatenate([ids, level_ids], axis=1)
    level1 = np.eye(k_nodes, dtype=bool)
    parents = [0, 0, 2]  # the level-2 nodes' parents among the level-1 nodes
    level2 = np.concatenate([level1[parents], np.eye(k_nodes, dtype=bool)], axis=1)  # [3, 6]
    levels = [(prefix, level1), (prefix + k_nodes, level2)]

    with torch.no_grad():
        _, _, past = ref(torch.from_numpy(trunk_feats), torch.from_numpy(ids[:, :prefix]))
        want = []
        for depth, (start, tm) in enumerate(levels):
            sl = slice(start, start + k_nodes)
            pos = torch.full((b, k_nodes), prefix + depth)
            tmask = torch.from_numpy(np.broadcast_to(tm, (b, 1, *tm.shape)).astype(np.float32))
            tok, nxt, past = ref(
                torch.from_numpy(feats[:, sl]),
                torch.from_numpy(ids[:, sl]),
                pos,
                past_kv=past,
                tree_mask=tmask,
            )
            want.append((tok, nxt))

    cache = init_draft_cache(dcfg, b, capacity)
    write_idx = jnp.zeros((b,), jnp.int32)
    trunk_pos = jnp.broadcast_to(jnp.arange(prefix, dtype=jnp.int32), (b, prefix))
    _, _, cache = draft_forward(
        params,
        embedding,
        jnp.asarray(trunk_feats),
        jnp.asarray(ids[:, :prefix], jnp.int32),
        trunk_pos,
        cache,
        write_idx=write_idx,
        mask=causal_mask(write_idx, prefix, capacity),
        dcfg=dcfg,
    )
    for depth, (start, tm) in enumerate(levels):
        sl = slice(start, start + k_nodes)
        tok, nxt, cache = draft_forward(
            params,
            embedding,
            jnp.asarray(feats[:, sl]),
            jnp.asarray(ids[:, sl], jnp.int32),
            jnp.full((b, k_nodes), prefix + depth, jnp.int32),
            cache,
            write_idx=jnp.full((b,), start, jnp.int32),
            mask=_tree_cache_mask(prefix, np.broadcast_to(tm, (b, *tm.shape)), capacity),
            dcfg=dcfg,
        )
        _check((tok, nxt), want[depth])


def test_eagle3_drafts_the_reference_target_ids():
    """Top-k through our EAGLE-3 head (own lm_head over V' = 48, ids i + d2t[i]) equal the
    reference's `lm_head` top-k mapped by its d2t buffer."""
    ref, dcfg, params, embedding = _build("eagle3", 2, False, 10_000.0, seed=5)
    b, t, capacity, k = 2, 9, 16, 6
    feats, ids = _inputs(b, t, dcfg.feature_dim, dcfg.vocab_size, seed=6)
    write_idx = jnp.zeros((b,), jnp.int32)
    tok, _, _ = draft_forward(
        params, embedding, jnp.asarray(feats), jnp.asarray(ids, jnp.int32),
        jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t)),
        init_draft_cache(dcfg, b, capacity), write_idx=write_idx,
        mask=causal_mask(write_idx, t, capacity), dcfg=dcfg,
    )  # fmt: skip
    head = speculative.resolve_head(params, None, dcfg)
    logits = np.asarray(head_logits(tok, head.kernel))
    ours = np.asarray(head.token_ids)[np.argsort(-logits, axis=-1)[..., :k]]
    with torch.no_grad():
        ref_tok = ref(torch.from_numpy(feats), torch.from_numpy(ids))[0]
        want = ref.draft_tokens(ref_tok, k).numpy()
    np.testing.assert_array_equal(ours, want)
    assert not np.array_equal(ours, np.argsort(-logits, axis=-1)[..., :k])  # d2t mapped them
    with pytest.raises(ValueError, match="own vocabulary"):
        speculative.resolve_head(params, head, dcfg)


# ----------------------------------------------------------------------------------------------
# Multi-stream training attention (spec 3).

# Hand-written masks for L = 4: HAND[F][t] is stream t's [row, col] mask.
HAND = {
    1: [
        [[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]],
    ],
    2: [
        [[0, 0, 0, 0], [1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0]],  # base stream, delayed by 1
        [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]],  # itself: the diagonal
    ],
    3: [
        [[0, 0, 0, 0], [0, 0, 0, 0], [1, 0, 0, 0], [1, 1, 0, 0]],  # delayed by 2
        [[0, 0, 0, 0], [1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0]],  # stream 1 at c = r - 1
        [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]],  # stream 2 at c = r
    ],
}


@pytest.mark.parametrize("num_streams", [1, 2, 3])
def test_stream_masks_match_hand_written(num_streams):
    np.testing.assert_array_equal(stream_masks(num_streams, 4), np.array(HAND[num_streams], bool))


@pytest.mark.parametrize("mode", ["exact", "leaky_reference"])
@pytest.mark.parametrize("num_streams", [1, 2, 3])
def test_multi_stream_attention_attends_the_expected_entries(num_streams, mode):
    """Zero queries make every score 0; one-hot values read the attention weights back out.

    Exact: uniform 1/n over the n allowed (stream, column) entries of the row. Leaky: the
    softmax runs over all L columns at score 0, so each allowed entry gets 1/L and the row sums
    to n/L < 1.
    """
    f, seq_len, n_heads = num_streams, 4, 2
    head_dim = f * seq_len  # one value unit per (stream, column) entry
    hand = np.array(HAND[f], np.float32)  # [F, T, S]
    q = jnp.zeros((1, seq_len, n_heads, head_dim))
    k = jnp.asarray(np.random.default_rng(0).normal(size=(f, 1, seq_len, 1, head_dim)), jnp.float32)
    v = jnp.eye(f * seq_len).reshape(f, 1, seq_len, 1, f * seq_len)  # entry (t, c) -> unit t*L+c
    out = multi_stream_attention(
        q, k, v, jnp.asarray(stream_masks(f, seq_len)), jnp.ones((1, seq_len), bool), mode=mode
    )  # [1, T, N, F*L]
    weights = np.asarray(out[0, :, 0]).reshape(seq_len, f, seq_len)  # [T, F, S]
    allowed = hand.transpose(1, 0, 2)  # [T, F, S]
    if mode == "exact":
        want = allowed / allowed.sum(axis=(1, 2), keepdims=True)
    else:
        want = allowed / seq_len
    np.testing.assert_allclose(weights, want, atol=1e-6)
    np.testing.assert_allclose(np.asarray(out[0, :, 1]), np.asarray(out[0, :, 0]), atol=1e-6)


def _train_inputs(dcfg, b: int, seq_len: int, num_streams: int, seed: int):
    rng = np.random.default_rng(seed)
    feats = rng.normal(size=(b, seq_len, dcfg.d_model)).astype(np.float32)
    streams = rng.normal(size=(num_streams - 1, b, seq_len, dcfg.d_model)).astype(np.float32)
    ids = rng.integers(0, dcfg.vocab_size, size=(b, seq_len)).astype(np.int64)
    return feats, (streams if num_streams > 1 else None), ids


@pytest.mark.parametrize("mode", ["exact", "leaky_reference"])
@pytest.mark.parametrize("num_streams", [1, 2, 3])
@pytest.mark.parametrize("kind,kv,bias,theta", [VARIANTS[1], VARIANTS[3]])
def test_training_forward_matches_torch(kind, kv, bias, theta, num_streams, mode):
    ref, dcfg, params, embedding = _build(kind, kv, bias, theta)
    b, seq_len = 2, 10
    lengths = np.array([10, 7])
    feats, streams, ids = _train_inputs(dcfg, b, seq_len, num_streams, seed=4)
    attn_mask = torch.from_numpy((np.arange(seq_len)[None] < lengths[:, None]).astype(np.float32))
    with torch.no_grad():
        want = ref.forward_train(
            torch.from_numpy(feats),
            torch.from_numpy(ids),
            None if streams is None else torch.from_numpy(streams),
            attention_mask=attn_mask,
            leaky=mode == "leaky_reference",
        )
    got = draft_forward_train(
        params,
        embedding,
        jnp.asarray(feats),
        None if streams is None else jnp.asarray(streams),
        jnp.asarray(ids, jnp.int32),
        lengths=jnp.asarray(lengths, jnp.int32),
        dcfg=dcfg,
        mask_mode=mode,
    )
    _check(got, want)


@pytest.mark.parametrize("kind", ["griffin", "eagle2"])
def test_single_stream_exact_training_equals_inference_forward(kind):
    _, dcfg, params, embedding = _build(kind, 2, False, 10_000.0)
    b, seq_len = 2, 9
    feats, _, ids = _train_inputs(dcfg, b, seq_len, 1, seed=5)
    train = draft_forward_train(
        params,
        embedding,
        jnp.asarray(feats),
        None,
        jnp.asarray(ids, jnp.int32),
        lengths=jnp.full((b,), seq_len, jnp.int32),
        dcfg=dcfg,
    )
    write_idx = jnp.zeros((b,), jnp.int32)
    infer = draft_forward(
        params,
        embedding,
        jnp.asarray(feats),
        jnp.asarray(ids, jnp.int32),
        jnp.broadcast_to(jnp.arange(seq_len, dtype=jnp.int32), (b, seq_len)),
        init_draft_cache(dcfg, b, seq_len),
        write_idx=write_idx,
        mask=causal_mask(write_idx, seq_len, seq_len),
        dcfg=dcfg,
    )
    for a, c in zip(train, infer[:2], strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(c), **TOL)


def _train(params, embedding, dcfg, feats, streams, ids, lengths, mode):
    return draft_forward_train(
        params,
        embedding,
        jnp.asarray(feats),
        jnp.asarray(streams),
        jnp.asarray(ids, jnp.int32),
        lengths=jnp.asarray(lengths, jnp.int32),
        dcfg=dcfg,
        mask_mode=mode,
    )


@pytest.mark.parametrize("num_streams", [2, 3])
def test_exact_mode_ignores_padding(num_streams):
    """Padded positions' contents and the amount of padding leave valid outputs unchanged."""
    _, dcfg, params, embedding = _build("griffin", 2, False, 10_000.0)
    b, seq_len, valid = 2, 10, 6
    lengths = np.array([valid, seq_len])
    feats, streams, ids = _train_inputs(dcfg, b, seq_len, num_streams, seed=6)
    base = _train(params, embedding, dcfg, feats, streams, ids, lengths, "exact")

    rng = np.random.default_rng(7)
    feats2, streams2, ids2 = feats.copy(), streams.copy(), ids.copy()
    feats2[0, valid:] = rng.normal(size=feats2[0, valid:].shape)
    streams2[:, 0, valid:] = rng.normal(size=streams2[:, 0, valid:].shape)
    ids2[0, valid:] = rng.integers(0, dcfg.vocab_size, size=seq_len - valid)
    changed = _train(params, embedding, dcfg, feats2, streams2, ids2, lengths, "exact")
    for a, c in zip(base, changed, strict=True):
        np.testing.assert_array_equal(np.asarray(a)[0, :valid], np.asarray(c)[0, :valid])
        np.testing.assert_array_equal(np.asarray(a)[1], np.asarray(c)[1])

    # Less padding: row 0 alone, cut at its length, gives the same valid outputs...
    cut = _train(
        params,
        embedding,
        dcfg,
        feats[:1, :valid],
        streams[:, :1, :valid],
        ids[:1, :valid],
        lengths[:1],
        "exact",
    )
    for a, c in zip(base, cut, strict=True):
        np.testing.assert_allclose(np.asarray(a)[0, :valid], np.asarray(c)[0], **TOL)
    # ...which the leaky reference does not: every padded column adds exp(0) to the denominator.
    leaky = _train(params, embedding, dcfg, feats, streams, ids, lengths, "leaky_reference")
    leaky_cut = _train(
        params,
        embedding,
        dcfg,
        feats[:1, :valid],
        streams[:, :1, :valid],
        ids[:1, :valid],
        lengths[:1],
        "leaky_reference",
    )
    assert np.abs(np.asarray(leaky[0])[0, :valid] - np.asarray(leaky_cut[0])[0]).max() > 1e-3


def test_training_gradients_skip_the_embedding_and_reach_every_param():
    _, dcfg, params, embedding = _build("griffin", 2, True, 10_000.0)
    feats, streams, ids = _train_inputs(dcfg, 1, 6, 2, seed=8)

    def loss(p, emb):
        tok, nxt = _train(p, emb, dcfg, feats, streams, ids, np.array([6]), "exact")
        return jnp.sum(tok**2) + jnp.sum(nxt**2)

    g_params, g_emb = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, embedding)
    assert not np.any(np.asarray(g_emb))
    for path, g in jax.tree_util.tree_leaves_with_path(g_params):
        assert np.any(np.asarray(g)), jax.tree_util.keystr(path)


def test_draft_config_from_hf_layouts_and_strictness():
    t4 = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "qwen2",
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_attention_heads": 4,
        "num_hidden_layers": 1,
        "rms_norm_eps": 1e-5,
        "rope_theta": 1_000_000.0,
        "rope_scaling": None,
        "max_position_embeddings": 2048,
        "vocab_size": 128,
        "qkv_bias": True,
        "bias": False,
        "torch_dtype": "float16",
        "transformers_version": "4.36.2",
        "sliding_window": 4096,
        "use_sliding_window": False,
        "pretraining_tp": 1,
    }
    dcfg = DraftConfig.from_hf(t4, kind="griffin")
    assert (dcfg.n_kv_heads, dcfg.head_dim, dcfg.rope.theta, dcfg.qkv_bias) == (4, 16, 1e6, True)
    t5 = {k: v for k, v in t4.items() if k not in ("rope_theta", "rope_scaling", "torch_dtype")}
    t5.update(rope_parameters={"rope_theta": 1_000_000.0, "rope_type": "default"}, dtype="bfloat16")
    assert DraftConfig.from_hf(t5, kind="griffin") == dcfg
    assert DraftConfig.from_hf(dcfg.to_hf(), kind="griffin") == dcfg
    assert dataclasses.replace(dcfg, kind="eagle2").out_dim == 64 and dcfg.out_dim == 128
    with pytest.raises(ValueError, match="num_hidden_layers=2"):
        DraftConfig.from_hf({**t4, "num_hidden_layers": 2}, kind="griffin")
    with pytest.raises(ValueError, match="'foo'"):
        DraftConfig.from_hf({**t4, "foo": 1}, kind="griffin")
