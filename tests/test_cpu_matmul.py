"""The CPU decode layout's packed products (`griffin_jax.cpu_kernels`, `layers.pack_kernels`):
the same products as XLA's, rows independent of their neighbours, every path that reads a
kernel taking the packed form, and XLA's products wherever the library is not there."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from spec_models import (
    assert_draft_forwards_close,
    assert_forwards_close,
    base_config,
    draft_config,
    random_pair,
)

from griffin_jax import cpu_kernels, layers, sharding, speculative, vanilla
from griffin_jax.config import TreeConfig
from griffin_jax.layers import (
    Dense,
    fuse_projections,
    is_packed,
    pack_kernels,
    unfuse_projections,
    unpack_kernels,
)
from griffin_jax.model import decode_layout, unstack_layers

pytestmark = pytest.mark.skipif(
    not cpu_kernels.enabled(), reason="the packed-product library does not build here"
)


@pytest.mark.parametrize("rows", [1, 2, 7, 8, 9, 60, 100])
@pytest.mark.parametrize(("k", "n"), [(64, 32), (256, 384), (3, 8192), (704, 256)])
def test_packed_product_is_xla_s_product(rows, k, n):
    rng = np.random.default_rng(rows * 1000 + k)
    w = rng.standard_normal((k, n)).astype(np.float32)
    x = rng.standard_normal((rows, k)).astype(np.float32)
    got = jax.jit(cpu_kernels.matmul)(jnp.asarray(x), cpu_kernels.pack(jnp.asarray(w)))
    want = x.astype(np.float64) @ w.astype(np.float64)
    # f32 sums of K products of O(1) terms: round-off grows like sqrt(K) * eps * |terms|
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=2e-6 * np.sqrt(k) * 4)


def test_the_chunks_threads_change_at_run_time_and_keep_the_bits():
    """`cpu_kernels.set_chunk_threads` moves a split call's chunks between the library's
    helpers and XLA's pool for calls of an already compiled program; every setting gives the
    same bits (f32 panels, AMX tiles where this CPU has them, a 60-query attention)."""
    rng = np.random.default_rng(11)
    x = jnp.asarray(rng.standard_normal((60, 256)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((256, 1408)), jnp.float32)
    kernels = [cpu_kernels.pack(w), cpu_kernels.pack(w.astype(jnp.bfloat16).astype(jnp.float32))]
    q = jnp.asarray(rng.standard_normal((1, 60, 8, 32)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((1, 512, 2, 32)), jnp.float32) for _ in range(2))
    mask = jnp.asarray(np.arange(512)[None, None, :] < 300 + np.arange(60)[None, :, None])
    run = jax.jit(lambda x, a, b, q, k, v, m: (cpu_kernels.matmul(x, a), cpu_kernels.matmul(x, b),
                                               cpu_kernels.attention(q, k, v, m)))  # fmt: skip
    outs = []
    try:
        for choice in ("helpers", "xla", None, "xla", "helpers"):
            cpu_kernels.set_chunk_threads(choice)
            outs.append([np.asarray(o) for o in run(x, *kernels, q, k, v, mask)])
    finally:
        cpu_kernels.set_chunk_threads(None)
    for got in outs[1:]:
        for a, b in zip(got, outs[0], strict=True):
            np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(outs[0][0], np.asarray(x) @ np.asarray(w), rtol=1e-4, atol=1e-3)
    with pytest.raises(ValueError, match="chunk threads"):
        cpu_kernels.set_chunk_threads("pool")


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="one CPU: no helper threads")
def test_the_helpers_start_only_when_chunks_go_to_them():
    """A process whose split calls run on XLA's pool starts none of the library's helper
    threads; switching to the helpers starts one per CPU but the caller's."""
    script = (
        "import os, jax.numpy as jnp\n"
        "from griffin_jax import cpu_kernels\n"
        "x = jnp.ones((60, 256), jnp.float32)\n"
        "w = cpu_kernels.pack(jnp.ones((256, 1408), jnp.float32) * 0.5)\n"
        "def threads(choice):\n"
        "    cpu_kernels.set_chunk_threads(choice)\n"
        "    cpu_kernels.matmul(x, w).block_until_ready()\n"
        "    return len(os.listdir('/proc/self/task'))\n"
        "print(threads('xla'), threads('xla'), threads('helpers'), threads('xla'))\n"
    )
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("GRIFFIN_CPU_THREADS", None)
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    pool, again, helpers, back = map(int, done.stdout.split()[-4:])
    assert again == pool and back == helpers
    assert helpers - pool == len(os.sched_getaffinity(0)) - 1


def test_a_row_s_result_does_not_depend_on_the_rows_beside_it():
    """Each output is one sum over K in ascending order, so the decode of a token and its row
    in a verification of 60 agree bit for bit (XLA's matrix-vector and matrix products need
    not)."""
    rng = np.random.default_rng(0)
    w = cpu_kernels.pack(jnp.asarray(rng.standard_normal((256, 384)), jnp.float32))
    x = jnp.asarray(rng.standard_normal((60, 256)), jnp.float32)
    f = jax.jit(cpu_kernels.matmul)
    whole = np.asarray(f(x, w))
    for lo, hi in [(0, 1), (5, 6), (3, 11), (59, 60), (0, 17)]:
        np.testing.assert_array_equal(np.asarray(f(x[lo:hi], w)), whole[lo:hi])


def test_batch_dims_layout_round_trip_and_what_packs():
    rng = np.random.default_rng(1)
    w = jnp.asarray(rng.standard_normal((48, 96)), jnp.float32)
    packed = cpu_kernels.pack(w)
    assert packed.shape == (3, 48, 32)
    assert cpu_kernels.kernel_shape(packed) == cpu_kernels.kernel_shape(w) == (48, 96)
    np.testing.assert_array_equal(cpu_kernels.unpack(packed), w)
    x = jnp.asarray(rng.standard_normal((2, 5, 48)), jnp.float32)
    np.testing.assert_allclose(cpu_kernels.matmul(x, packed), x @ w, rtol=1e-5, atol=1e-5)
    under_vmap = jax.vmap(cpu_kernels.matmul, in_axes=(0, None))(x, packed)
    np.testing.assert_allclose(under_vmap, x @ w, rtol=1e-5, atol=1e-5)
    assert cpu_kernels.can_pack(w)
    assert not cpu_kernels.can_pack(w[:, :80])  # not whole panels
    assert not cpu_kernels.can_pack(w.astype(jnp.bfloat16))  # f32 only
    assert not cpu_kernels.can_pack(jnp.zeros((2, 48, 96)))  # kernels are 2-D
    with pytest.raises(ValueError, match="K = 48"):
        cpu_kernels.matmul(x[..., :40], packed)


def test_dense_runs_a_packed_kernel_as_nn_dense_runs_the_plain_one():
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.standard_normal((3, 4, 64)), jnp.float32)
    module = Dense(96, use_bias=True)
    params = module.init(jax.random.key(0), x)["params"]
    params = {**params, "bias": jnp.asarray(rng.standard_normal(96), jnp.float32)}
    plain = module.apply({"params": params}, x)
    packed = module.apply({"params": pack_kernels(params)}, x)
    assert sorted(pack_kernels(params)) == ["bias", cpu_kernels.PACKED]
    np.testing.assert_allclose(packed, plain, rtol=1e-5, atol=1e-5)
    import flax.linen as nn

    reference = nn.Dense(96, use_bias=True).apply({"params": params}, x)
    np.testing.assert_array_equal(plain, reference)  # the plain path is nn.Dense's product


@pytest.mark.parametrize("family", ["llama", "qwen2", "mixtral"])
def test_packed_decode_layout_computes_what_the_stored_one_computes(family):
    """Base forward (prefill, then a decode step) and draft forwards (GRIFFIN, EAGLE-3) on
    packed kernels equal the plain decode layout within f32 round-off; the layout round-trips
    to the stored one exactly; widths that are not whole panels (the draft's d_ff of 80) stay
    plain beside packed ones."""
    cfg = base_config(family, tie_embeddings=family == "qwen2")
    stacked, _ = random_pair(cfg, draft_config(cfg))
    plain = decode_layout(stacked, pack=False)
    packed = decode_layout(stacked, pack=True)
    assert is_packed(packed) and not is_packed(plain)
    qkv = packed["layers"][0]["self_attn"]["qkv_proj"]
    assert cpu_kernels.PACKED in qkv and "kernel" not in qkv
    assert (cpu_kernels.PACKED in packed.get("lm_head", {})) == (not cfg.tie_embeddings)
    back = unfuse_projections(packed, cfg)
    jax.tree.map(np.testing.assert_array_equal, back, unstack_layers(stacked))
    jax.tree.map(np.testing.assert_array_equal, unpack_kernels(packed), plain)

    rng = np.random.default_rng(3)
    b, t, cap = 2, 7, 16
    tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (b, t)), jnp.int32)
    assert_forwards_close(plain, packed, cfg, tokens, cap, rtol=1e-5, atol=5e-5)

    for kind in ("griffin", "eagle3"):
        dcfg = draft_config(cfg, kind)
        _, draft = random_pair(cfg, dcfg)
        draft = fuse_projections(draft)
        packed_draft = pack_kernels(draft)
        up = packed_draft["fc"]["mlp"]["up_proj"] if kind == "griffin" else None
        if up is not None:
            assert "kernel" in up  # 80 columns: not whole panels, stays plain
        feats = jnp.asarray(rng.standard_normal((b, t, dcfg.feature_dim)), jnp.float32)
        emb = stacked["embed_tokens"]["embedding"]
        assert_draft_forwards_close(
            draft, packed_draft, dcfg, emb, feats, tokens, cap, rtol=1e-5, atol=5e-5
        )


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_speculative_on_packed_kernels_equals_vanilla_on_them(pair, temperature):
    """Greedy and seeded sampling on the packed layout, a draft vocabulary cut from the packed
    lm_head included: the speculative tokens are vanilla decoding's on the same params."""
    cfg, dcfg, base, draft = pair
    base, draft = decode_layout(base), pack_kernels(fuse_projections(draft))
    assert is_packed(base) and is_packed(draft)
    prompts = [[5, 9, 2, 7, 11, 4], [30, 31, 32]]
    kw = dict(max_new_tokens=24, temperature=temperature, top_p=0.9, seed=7)
    want = vanilla.generate(base, cfg, prompts, **kw).output_ids
    head = speculative.make_draft_head(base, cfg, list(range(0, cfg.vocab_size, 2))[:64])
    assert head.kernel.ndim == 3  # packed as the base's lm_head is
    for tree, draft_head in [(TreeConfig(top_k=3, depth=3, total_tokens=10), None),
                             (TreeConfig(top_k=1, depth=4, total_tokens=6), head)]:  # fmt: skip
        got = speculative.generate(
            base, cfg, draft, dcfg, prompts, tree_cfg=tree, draft_head=draft_head, **kw
        )
        assert got.output_ids == want


def test_xla_products_on_request_and_where_the_library_cannot_build(monkeypatch, caplog):
    cfg = base_config("llama")
    stacked, _ = random_pair(cfg, draft_config(cfg))
    monkeypatch.setenv("GRIFFIN_CPU_MATMUL", "xla")
    assert not cpu_kernels.enabled() and not is_packed(decode_layout(stacked))
    monkeypatch.setenv("GRIFFIN_CPU_MATMUL", "fast")
    with pytest.raises(ValueError, match="GRIFFIN_CPU_MATMUL"):
        cpu_kernels.enabled()
    monkeypatch.delenv("GRIFFIN_CPU_MATMUL")
    # No compiler: one warning, XLA's products, nothing packed.
    monkeypatch.setattr(cpu_kernels, "_compiler", lambda: None)
    cpu_kernels.library.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="griffin_jax.cpu_kernels"):
            assert not cpu_kernels.enabled()
        assert "no C++ compiler" in caplog.text
        assert not is_packed(decode_layout(stacked))
        with pytest.raises(RuntimeError, match="compiled library"):
            cpu_kernels.matmul(jnp.ones((1, 64)), jnp.ones((2, 64, 32)))
        q = jnp.ones((1, 3, 4, 32))  # attention: XLA's einsums
        assert layers.attention_implementation(q) == "einsum"
        with pytest.raises(RuntimeError, match="compiled library"):
            cpu_kernels.attention(q, q[:, :, :2], q[:, :, :2], jnp.ones((1, 3, 3), bool))
        logits = jnp.arange(8.0)[None]  # a tree level's children: XLA's top_k
        assert cpu_kernels.top_log_probs(logits, 2)[1].tolist() == [[7, 6]]
    finally:
        monkeypatch.undo()
        cpu_kernels.library.cache_clear()
        assert cpu_kernels.enabled()  # built again from the cache, registered again


def test_a_failed_build_names_the_compiler_s_error(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("GRIFFIN_CPU_MATMUL_DIR", str(tmp_path))
    monkeypatch.setattr(cpu_kernels, "FLAGS", (*cpu_kernels.FLAGS, "-DGRIFFIN_NO_SUCH_FLAG=("))
    monkeypatch.setattr(cpu_kernels, "SOURCES", (tmp_path / "broken.cc",))
    (tmp_path / "broken.cc").write_text("this is not C++\n")
    cpu_kernels.library.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="griffin_jax.cpu_kernels"):
            assert cpu_kernels.library() is None
        assert "CPU kernels are unavailable" in caplog.text and "broken.cc" in caplog.text
        assert not list(tmp_path.glob("*.so"))
    finally:
        monkeypatch.undo()
        cpu_kernels.library.cache_clear()
        assert cpu_kernels.enabled()


def test_packed_kernels_are_not_sharded():
    cfg = base_config("llama")
    stacked, _ = random_pair(cfg, draft_config(cfg))
    packed = pack_kernels(unstack_layers(stacked))  # unfused, packed
    with pytest.raises(ValueError, match="packed kernels"):
        sharding.param_shardings(packed, sharding.make_mesh("data=1"), head_dim=cfg.head_dim)


def test_the_default_pair_decodes_the_same_tokens_on_both_products():
    """The committed model, greedy: packed and XLA products give the same 48 tokens."""
    from inference.api import DEFAULT_MODEL_DIR, SpeculativeModel

    model = SpeculativeModel.from_pretrained(
        DEFAULT_MODEL_DIR / "base", DEFAULT_MODEL_DIR / "griffin", load_tokenizer=False
    )
    assert is_packed(model.base_params) and is_packed(model.draft_params)
    prompts = [[0, 300, 301, 17, 480, 52, 9, 77], [0, 1200, 44, 45, 46]]
    packed = model.generate(prompts, max_new_tokens=48).output_ids
    model.base_params = unpack_kernels(model.base_params)
    model.draft_params = unpack_kernels(model.draft_params)
    assert model.generate(prompts, max_new_tokens=48).output_ids == packed
