"""The CPU attention kernel (`cpu_kernels.attention`, `csrc/attention.cc`): a float64 softmax's
results over any mask, each query's row the same bit for bit whatever the other queries or the
buffer's size, never a slot past the last one a query may attend, and the forwards' choice of
it (`layers.attention_implementation`)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from spec_models import attention_reference as reference
from spec_models import base_config

from griffin_jax import cpu_kernels, layers
from griffin_jax import model as base_lib
from griffin_jax.kv_cache import causal_mask, init_cache
from griffin_jax.model import decode_layout
from griffin_jax.model import forward as base_forward

pytestmark = pytest.mark.skipif(
    not cpu_kernels.enabled(), reason="the CPU kernels' library does not build here"
)

attention = jax.jit(cpu_kernels.attention)


def tree_mask(rng, b: int, t: int, s: int, lengths) -> np.ndarray:
    """Row r sees its first lengths[r] slots, then a random subset of the T new ones before
    query i, and itself (a tree verification's shape of mask)."""
    mask = np.zeros((b, t, s), bool)
    for row in range(b):
        mask[row, :, : lengths[row]] = True
        for i in range(t):
            at = lengths[row]
            mask[row, i, at : at + i] = rng.random(i) < 0.5
            mask[row, i, at + i] = True
    return mask


def inputs(rng, b, t, n, kv, h, s):
    q = rng.standard_normal((b, t, n, h)).astype(np.float32)
    k = rng.standard_normal((b, s, kv, h)).astype(np.float32)
    v = rng.standard_normal((b, s, kv, h)).astype(np.float32)
    return q, k, v


@pytest.mark.parametrize(
    ("b", "t", "n", "kv", "h", "s"),
    [
        (1, 1, 8, 2, 32, 768),  # a decode of the default base's shapes
        (1, 60, 8, 2, 32, 512),  # a (10, 5, 60) verification (split between threads)
        (2, 9, 4, 4, 64, 100),  # no grouping; a row group of one query
        (3, 17, 6, 2, 48, 333),  # H not a multiple of 32; S not of 16
        (1, 3, 2, 1, 128, 40),
        (2, 100, 4, 2, 16, 130),  # a prefill's size
        (1, 520, 4, 2, 16, 2100),  # large enough to split between the pool's threads
    ],
)
def test_kernel_is_a_float64_softmax_over_the_visible_slots(b, t, n, kv, h, s):
    rng = np.random.default_rng(b * 1000 + t * 10 + h)
    q, k, v = inputs(rng, b, t, n, kv, h, s)
    lengths = rng.integers(1, s - t + 1, b)
    mask = tree_mask(rng, b, t, s, lengths)
    got = np.asarray(attention(q, k, v, jnp.asarray(mask)))
    np.testing.assert_allclose(got, reference(q, k, v, mask), rtol=2e-5, atol=2e-5)


def test_a_query_that_sees_nothing_gives_zeros_and_others_are_unchanged():
    rng = np.random.default_rng(1)
    q, k, v = inputs(rng, 2, 4, 4, 2, 16, 64)
    mask = tree_mask(rng, 2, 4, 64, [20, 30])
    mask[0, 2] = False
    mask[1] = False
    got = np.asarray(attention(q, k, v, jnp.asarray(mask)))
    assert not np.any(got[0, 2]) and not np.any(got[1])
    np.testing.assert_allclose(got, reference(q, k, v, mask), rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize(("t", "s", "lengths"), [(60, 400, [300, 250]), (520, 1600, [900, 10])])
def test_each_query_row_is_the_same_bits_alone_in_a_larger_buffer_and_in_any_batch(t, s, lengths):
    """What makes a verification row equal the decode of the same query: the row's output
    depends on its query, its mask row and the slots it sees, not on the other queries (how
    many share the call, how far they reach, which thread runs them) or the buffer's capacity."""
    rng = np.random.default_rng(2)
    b, n, kv, h = 2, 8, 2, 32
    q, k, v = inputs(rng, b, t, n, kv, h, s)
    mask = tree_mask(rng, b, t, s, lengths)
    together = np.asarray(attention(q, k, v, jnp.asarray(mask)))
    for i in (0, 1, 13, t - 1):
        alone = attention(q[:, i : i + 1], k, v, jnp.asarray(mask[:, i : i + 1]))
        np.testing.assert_array_equal(np.asarray(alone), together[:, i : i + 1])
    # The same slots in a buffer twice as long (the rest never attended), one row per call.
    wide = [np.concatenate([x, rng.standard_normal(x.shape).astype(np.float32)], 1) for x in (k, v)]
    wide_mask = np.concatenate([mask, np.zeros_like(mask)], 2)
    for row in range(b):
        one = attention(q[row : row + 1], wide[0][row : row + 1], wide[1][row : row + 1],
                        jnp.asarray(wide_mask[row : row + 1]))  # fmt: skip
        np.testing.assert_array_equal(np.asarray(one), together[row : row + 1])


def test_slots_past_the_last_attended_one_are_never_read():
    """NaN keys and values past each batch row's last visible slot (rows end at different
    slots; the queries of a row end at different slots too) leave the output finite."""
    rng = np.random.default_rng(3)
    b, t, s = 2, 12, 200
    q, k, v = inputs(rng, b, t, 4, 2, 32, s)
    lengths = [37, 120]
    mask = tree_mask(rng, b, t, s, lengths)
    for row, length in enumerate(lengths):
        k[row, length + t :] = np.nan
        v[row, length + t :] = np.nan
    got = np.asarray(attention(q, k, v, jnp.asarray(mask)))
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got, reference(q, k, v, mask), rtol=2e-5, atol=2e-5)


def test_bad_shapes_are_refused_before_the_call():
    q = jnp.ones((1, 2, 4, 32))
    kv = jnp.ones((1, 10, 2, 32))
    with pytest.raises(ValueError, match="mask"):
        cpu_kernels.attention(q, kv, kv, jnp.ones((1, 2, 9), bool))
    with pytest.raises(ValueError, match="against"):
        cpu_kernels.attention(q, kv[:, :, :, :16], kv[:, :, :, :16], jnp.ones((1, 2, 10), bool))
    with pytest.raises(ValueError, match="against"):
        cpu_kernels.attention(q, kv, kv[:, :5], jnp.ones((1, 2, 10), bool))


def test_the_forwards_take_the_kernel_for_f32_on_one_cpu_device(monkeypatch):
    q = jnp.zeros((1, 8, 4, 32))
    assert layers.attention_implementation(q) == "cpu"
    assert layers.attention_implementation(q[:, :1]) == "cpu"  # decodes too
    assert layers.attention_implementation(q.astype(jnp.bfloat16)) == "einsum"
    assert layers.attention_implementation(q[..., :24]) == "einsum"  # H not whole vectors
    assert layers.attention_implementation(q, backend="gpu") == "xla"
    monkeypatch.setenv("GRIFFIN_ATTENTION", "einsum")
    assert layers.attention_implementation(q) == "einsum"
    monkeypatch.setenv("GRIFFIN_ATTENTION", "cpu")
    assert layers.attention_implementation(q) == "cpu"
    assert layers.attention_implementation(q, backend="gpu") == "einsum"  # not a CPU
    kv = jnp.zeros((1, 16, 2, 32))
    mask = jnp.ones((1, 8, 16), bool)

    def traced():  # a new function each time: traced anew, the choice made anew
        return str(jax.make_jaxpr(lambda *a: layers.gqa_attention(*a))(q, kv, kv, mask))

    assert "griffin_attention" in traced()
    monkeypatch.setenv("GRIFFIN_ATTENTION", "einsum")
    assert "griffin_attention" not in traced()


def test_a_mask_over_a_prefix_of_the_buffer():
    """`gqa_attention`'s narrower mask (the first slots of a larger buffer) is padded, not the
    buffer sliced."""
    rng = np.random.default_rng(4)
    q, k, v = inputs(rng, 1, 3, 4, 2, 32, 64)
    mask = np.ones((1, 3, 40), bool)
    k[:, 40:] = v[:, 40:] = np.nan
    got = np.asarray(jax.jit(layers.gqa_attention)(q, k, v, jnp.asarray(mask)))
    np.testing.assert_allclose(got, reference(q, k[:, :40], v[:, :40], mask), rtol=2e-5, atol=2e-5)


def test_a_causal_forward_s_rows_equal_one_token_decodes_bit_for_bit():
    """The base's logits for T tokens in one causal forward equal T one-token decodes', bit for
    bit, on the CPU decode layout (packed products, this attention): verification and decoding
    agree wherever they see the same tokens."""
    cfg = base_config("llama", d_model=128, n_heads=4, n_kv_heads=2, head_dim=32, d_ff=192)
    params = base_lib.init_params(cfg, jax.random.key(0))
    params = decode_layout(jax.tree.map(lambda x: x * 3.0 if x.ndim >= 2 else x, params))
    rng = np.random.default_rng(5)
    b, t, cap = 2, 9, 48
    tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (b, t)), jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    zero = jnp.zeros((b,), jnp.int32)
    forward = jax.jit(base_forward, static_argnames=("cfg",))
    cache = init_cache(cfg, b, cap, per_layer=True)
    together, _, _ = forward(
        params, tokens, positions, cache, write_idx=zero, mask=causal_mask(zero, t, cap), cfg=cfg
    )
    for i in range(t):
        at = jnp.full((b,), i, jnp.int32)
        step, _, cache = forward(
            params, tokens[:, i : i + 1], positions[:, i : i + 1], cache, write_idx=at,
            mask=causal_mask(at, 1, cap), cfg=cfg,
        )  # fmt: skip
        np.testing.assert_array_equal(np.asarray(step[:, 0]), np.asarray(together[:, i]))
