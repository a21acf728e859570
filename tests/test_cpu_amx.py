"""Products on AMX tiles (`cpu_kernels.pack` of bf16-valued kernels, `csrc/amx_matmul.cc`):
f32 products to f32 round-off (each input split exactly into three bf16 parts), rows
independent of their neighbours and of the threads, the layout round-tripping, the choice
between tiles and f32 panels, and speculative decoding on tiles equal to vanilla decoding on
them. Runs where the CPU has AMX; `test_cpu_matmul` covers the f32 panels everywhere."""

from __future__ import annotations

import concurrent.futures
import os
import subprocess
import sys

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

from griffin_jax import cpu_kernels, speculative, vanilla
from griffin_jax.config import TreeConfig
from griffin_jax.layers import fuse_projections, pack_kernels
from griffin_jax.model import decode_layout

pytestmark = pytest.mark.skipif(
    not (cpu_kernels.enabled() and cpu_kernels.tiles_ready()),
    reason="this CPU or process has no AMX tiles",
)


def bf16_valued(a: np.ndarray) -> np.ndarray:
    return np.asarray(jnp.asarray(a, jnp.float32).astype(jnp.bfloat16).astype(jnp.float32))


def tiled(w: np.ndarray) -> jax.Array:
    packed = cpu_kernels.pack(jnp.asarray(w))
    assert packed.dtype == jnp.bfloat16  # the AMX layout, not f32 panels
    return packed


@pytest.mark.parametrize("rows", [1, 2, 15, 16, 17, 60, 100])
@pytest.mark.parametrize(("k", "n"), [(64, 32), (256, 384), (256, 8192), (704, 256), (32, 96)])
def test_tile_product_is_the_f32_product(rows, k, n):
    rng = np.random.default_rng(rows * 1000 + k + n)
    w = bf16_valued(rng.standard_normal((k, n)))
    x = rng.standard_normal((rows, k)).astype(np.float32)
    got = np.asarray(jax.jit(cpu_kernels.matmul)(jnp.asarray(x), tiled(w)))
    want = x.astype(np.float64) @ w.astype(np.float64)
    # f32 sums of K products of O(1) terms, as `test_cpu_matmul` bounds the f32 panels'
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-6 * np.sqrt(k) * 4)


def test_every_bit_of_an_f32_input_reaches_the_sum():
    """Through an identity kernel each output is its input exactly: hi + mid + lo rebuild
    all 24 significant bits (two bf16 parts would keep 16, one part 8)."""
    rng = np.random.default_rng(5)
    x = (rng.standard_normal((20, 64)) * np.exp(rng.uniform(-20, 20, (20, 64)))).astype(np.float32)
    x[0, :3] = [1 + 2.0**-23, -(1 + 2.0**-22 + 2.0**-23), 3.0e-30]
    y = np.asarray(cpu_kernels.matmul(jnp.asarray(x), tiled(np.eye(64, dtype=np.float32))))
    np.testing.assert_array_equal(y, x)


def test_a_row_s_result_does_not_depend_on_the_rows_or_threads_beside_it():
    """A verification row equals the decode of the same token bit for bit: the same tile
    products over K whatever the row count, the row block, or how the chunks are split
    between threads (100 rows x 704 x 1,408 splits by columns; 60 x 256 x 256, one column
    group, by columns and row blocks; 300 rows, a prefill's, by row blocks alone)."""
    rng = np.random.default_rng(0)
    f = jax.jit(cpu_kernels.matmul)
    for k, n, rows in [(704, 1408, 100), (256, 256, 60), (256, 8192, 33), (704, 256, 300)]:
        w = tiled(bf16_valued(rng.standard_normal((k, n))))
        x = jnp.asarray(rng.standard_normal((rows, k)), jnp.float32)
        whole = np.asarray(f(x, w))
        for lo, hi in [(0, 1), (5, 6), (3, 11), (rows - 1, rows), (0, 17), (16, 32)]:
            np.testing.assert_array_equal(np.asarray(f(x[lo:hi], w)), whole[lo:hi])


def test_concurrent_callers_each_get_their_own_product():
    """Two threads calling products at once (one holds the helper threads, the other runs its
    chunks alone) get the same results as calls one at a time."""
    rng = np.random.default_rng(2)
    w = tiled(bf16_valued(rng.standard_normal((256, 1408))))
    xs = [jnp.asarray(rng.standard_normal((r, 256)), jnp.float32) for r in (1, 8, 60, 3) * 4]
    f = jax.jit(cpu_kernels.matmul)
    want = [np.asarray(f(x, w)) for x in xs]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        for _ in range(5):
            got = list(pool.map(lambda x: np.asarray(f(x, w)), xs))
            for a, b in zip(got, want, strict=True):
                np.testing.assert_array_equal(a, b)


def test_layout_round_trip_and_what_is_tiled():
    rng = np.random.default_rng(1)
    w = bf16_valued(rng.standard_normal((64, 96)))
    packed = tiled(w)
    assert packed.shape == (6, 32, 32)  # [N / 16, K / 2, 32]
    assert cpu_kernels.kernel_shape(packed) == (64, 96)
    np.testing.assert_array_equal(cpu_kernels.unpack(packed), w)
    # tile t, pair p holds rows 2p and 2p + 1 of columns 16t .. 16t + 15, interleaved
    as_f32 = np.asarray(packed.astype(jnp.float32))
    np.testing.assert_array_equal(as_f32[2, 5, 0::2], w[10, 32:48])
    np.testing.assert_array_equal(as_f32[2, 5, 1::2], w[11, 32:48])
    stacked = np.stack([w, 2 * w])  # leading axes: stacked layers
    np.testing.assert_array_equal(
        cpu_kernels.unpack(cpu_kernels.pack(jnp.asarray(stacked))), stacked
    )
    # f32 panels where a value is not a bf16 number, or K is not whole 32-value steps
    off = w.copy()
    off[3, 7] = np.nextafter(off[3, 7], np.float32(9))
    assert not cpu_kernels.bf16_valued(jnp.asarray(off))
    assert cpu_kernels.pack(jnp.asarray(off)).dtype == jnp.float32
    assert cpu_kernels.pack(jnp.asarray(w[:48])).dtype == jnp.float32  # K = 48
    assert not cpu_kernels.can_tile(jnp.asarray(w, jnp.bfloat16))  # f32 kernels only
    x = jnp.asarray(rng.standard_normal((2, 5, 64)), jnp.float32)  # leading axes of x
    np.testing.assert_allclose(
        cpu_kernels.matmul(x, packed), np.asarray(x) @ w, rtol=1e-5, atol=1e-5
    )
    with pytest.raises(ValueError, match="K = 64"):
        cpu_kernels.matmul(x[..., :32], packed)


def test_packed_on_request_and_amx_insisted_on(monkeypatch):
    w = jnp.asarray(bf16_valued(np.ones((64, 64))))
    monkeypatch.setenv("GRIFFIN_CPU_MATMUL", "packed")
    assert not cpu_kernels.tiles_ready() and cpu_kernels.pack(w).dtype == jnp.float32
    monkeypatch.setenv("GRIFFIN_CPU_MATMUL", "amx")
    assert cpu_kernels.tiles_ready() and cpu_kernels.pack(w).dtype == jnp.bfloat16
    monkeypatch.setattr(cpu_kernels, "_tiles_granted", lambda: False)  # a CPU without AMX
    with pytest.raises(RuntimeError, match="no AMX tiles"):
        cpu_kernels.tiles_ready()
    monkeypatch.delenv("GRIFFIN_CPU_MATMUL")
    assert not cpu_kernels.tiles_ready() and cpu_kernels.pack(w).dtype == jnp.float32
    with pytest.raises(RuntimeError, match="AMX"):  # tiles packed elsewhere do not run here
        cpu_kernels.matmul(jnp.ones((1, 64)), jnp.ones((4, 32, 32), jnp.bfloat16))


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_tiled_layout_computes_what_the_plain_one_computes(family):
    """Base and draft forwards (GRIFFIN, EAGLE-3) on tiled kernels equal the plain decode
    layout's within f32 round-off: the tiles are f32 products, and a tiled model computes in
    f32 although its kernels are stored as bf16."""
    cfg = base_config(family, tie_embeddings=family == "qwen2")
    stacked, _ = jax.tree.map(bf16_valued, random_pair(cfg, draft_config(cfg)))
    plain, tiles = decode_layout(stacked, pack=False), decode_layout(stacked, pack=True)
    assert jnp.dtype(jnp.bfloat16) in {leaf.dtype for leaf in jax.tree.leaves(tiles)}
    rng = np.random.default_rng(3)
    b, t, cap = 2, 7, 16
    tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (b, t)), jnp.int32)
    assert_forwards_close(plain, tiles, cfg, tokens, cap, rtol=1e-5, atol=5e-5)
    for kind in ("griffin", "eagle3"):
        dcfg = draft_config(cfg, kind, d_ff=96)
        _, draft = jax.tree.map(bf16_valued, random_pair(cfg, dcfg))
        draft = fuse_projections(draft)
        tiled_draft = pack_kernels(draft)
        assert jnp.dtype(jnp.bfloat16) in {leaf.dtype for leaf in jax.tree.leaves(tiled_draft)}
        feats = jnp.asarray(rng.standard_normal((b, t, dcfg.feature_dim)), jnp.float32)
        emb = stacked["embed_tokens"]["embedding"]
        assert_draft_forwards_close(
            draft, tiled_draft, dcfg, emb, feats, tokens, cap, rtol=1e-5, atol=5e-5
        )


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_speculative_on_tiles_equals_vanilla_on_them(temperature):
    """A pair with bf16-valued weights (as every committed checkpoint's): the decode layout
    tiles its kernels, and greedy and seeded speculative decoding emit vanilla's tokens on
    the same params."""
    cfg = base_config("llama")
    dcfg = draft_config(cfg, d_ff=96)
    base, draft = jax.tree.map(bf16_valued, aligned_pair(cfg, dcfg, noise=0.3))
    base, draft = decode_layout(base), pack_kernels(fuse_projections(draft))
    kernels = [base["layers"][0]["mlp"], base["lm_head"], draft["fc"]]
    assert any(leaf.dtype == jnp.bfloat16 for leaf in jax.tree.leaves(kernels)), (
        "the pair's kernels were not tiled"
    )
    prompts = [[5, 9, 2, 7, 11, 4], [30, 31, 32]]
    kw = dict(max_new_tokens=24, temperature=temperature, top_p=0.9, seed=7)
    want = vanilla.generate(base, cfg, prompts, **kw).output_ids
    for tree in (
        TreeConfig(top_k=3, depth=3, total_tokens=10),
        TreeConfig(top_k=1, depth=4, total_tokens=6),
    ):
        got = speculative.generate(base, cfg, draft, dcfg, prompts, tree_cfg=tree, **kw)
        assert got.output_ids == want


def test_xla_s_pool_gives_the_same_products():
    """`GRIFFIN_CPU_THREADS=xla` (chunks on XLA's pool instead of the library's helpers, read
    once per process) computes the same bits."""
    script = (
        "import numpy as np, jax.numpy as jnp\n"
        "from griffin_jax import cpu_kernels\n"
        "rng = np.random.default_rng(4)\n"
        "w = jnp.asarray(rng.standard_normal((256, 1408)), jnp.float32)\n"
        "w = w.astype(jnp.bfloat16).astype(jnp.float32)\n"
        "x = jnp.asarray(rng.standard_normal((60, 256)), jnp.float32)\n"
        "y = cpu_kernels.matmul(x, cpu_kernels.pack(w))\n"
        "print(np.asarray(y).tobytes().hex()[:4000], np.asarray(y).sum())\n"
    )
    outs = []
    for threads in ("", "xla"):
        env = {**os.environ, "GRIFFIN_CPU_THREADS": threads, "JAX_PLATFORMS": "cpu"}
        done = subprocess.run(
            [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
        )
        assert done.returncode == 0, done.stderr[-2000:]
        outs.append(done.stdout.split()[-2:])
    assert outs[0] == outs[1]
