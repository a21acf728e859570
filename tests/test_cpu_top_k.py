"""A draft tree level's children on a CPU (`cpu_kernels.top_log_probs`, `csrc/top_k.cc`): the
k largest log-probabilities of each row and their indices, as `jax.lax.top_k` of
`jax.nn.log_softmax` gives them (ties to the smaller index), and XLA's path where asked; and
greedy targets' argmax on the same library (`cpu_kernels.argmax` under `sampling.argmax`)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from griffin_jax import cpu_kernels

pytestmark = pytest.mark.skipif(
    not cpu_kernels.enabled(), reason="the CPU kernels' library does not build here"
)

top_log_probs = jax.jit(cpu_kernels.top_log_probs, static_argnums=1)


def xla(x, k):
    return jax.lax.top_k(jax.nn.log_softmax(x, axis=-1), k)


@pytest.mark.parametrize(
    ("shape", "k"),
    [((1, 10, 8192), 10), ((2, 4, 1024), 4), ((1, 1, 1024), 1), ((3, 1000), 7), ((5, 17), 17),
     ((2, 9), 3), ((1, 130), 64)],
)  # fmt: skip
def test_the_children_are_xla_s_top_k_of_log_softmax(shape, k):
    rng = np.random.default_rng(sum(shape) + k)
    x = jnp.asarray(rng.standard_normal(shape) * 4, jnp.float32)
    values, indices = top_log_probs(x, k)
    want_values, want_indices = xla(x, k)
    assert values.shape == indices.shape == (*shape[:-1], k) and indices.dtype == jnp.int32
    np.testing.assert_array_equal(indices, want_indices)
    np.testing.assert_allclose(values, want_values, rtol=0, atol=4e-6)


def test_ties_go_to_the_smaller_index_and_masked_logits_weigh_nothing():
    rng = np.random.default_rng(1)
    x = rng.integers(-3, 3, (4, 3, 515)).astype(np.float32)  # many equal logits
    x[0, 0, 100:] = -np.inf  # a masked part of a row
    for k in (1, 5, 16):
        values, indices = top_log_probs(jnp.asarray(x), k)
        want_values, want_indices = xla(jnp.asarray(x), k)
        np.testing.assert_array_equal(indices, want_indices)
        np.testing.assert_allclose(values, want_values, rtol=0, atol=4e-6)


def test_xla_s_path_on_request(monkeypatch):
    x = jnp.ones((2, 64))

    def traced():  # a new function each time: traced anew
        return str(jax.make_jaxpr(lambda a: cpu_kernels.top_log_probs(a, 3))(x))

    assert "griffin_top_k_log_softmax" in traced()
    monkeypatch.setenv("GRIFFIN_TOP_K", "xla")
    assert "griffin_top_k_log_softmax" not in traced()
    monkeypatch.setenv("GRIFFIN_TOP_K", "fast")
    with pytest.raises(ValueError, match="GRIFFIN_TOP_K"):
        traced()


@pytest.mark.parametrize("shape", [(1, 5, 8192), (3, 17), (2, 1), (4, 1024), (7, 8191), (0, 9)])
def test_argmax_is_the_first_index_of_the_maximum(shape, monkeypatch):
    """`sampling.argmax` on the kernel: numpy's argmax (first maximum) on random rows with
    ties, rows of equal values, and rows whose maximum is -inf; the XLA form agrees."""
    from griffin_jax import sampling

    rng = np.random.default_rng(sum(shape))
    x = np.round(rng.standard_normal(shape) * 2).astype(np.float32)  # many ties
    if x.size:
        x.reshape(-1, shape[-1])[0] = 1.5  # all equal: index 0
        x.reshape(-1, shape[-1])[-1] = -np.inf
    f = jax.jit(sampling.argmax)
    assert "griffin_argmax" in str(jax.make_jaxpr(sampling.argmax)(jnp.asarray(x)))
    got = np.asarray(f(jnp.asarray(x)))
    assert got.dtype == np.int32 and got.shape == shape[:-1]
    np.testing.assert_array_equal(got, np.argmax(x, axis=-1))
    monkeypatch.setenv("GRIFFIN_TOP_K", "xla")  # XLA's form: the same indices
    np.testing.assert_array_equal(got, np.asarray(sampling.argmax(jnp.asarray(x))))


def test_argmax_of_nan_rows_stays_in_range_and_xla_s_form_on_request(monkeypatch):
    from griffin_jax import sampling

    x = np.zeros((3, 40), np.float32)
    x[0] = np.nan
    x[1, 7], x[1, 30] = np.nan, 2.0  # NaNs never win over numbers on the kernel
    x[2, 33] = 1.0
    got = np.asarray(sampling.argmax(jnp.asarray(x)))
    assert got.tolist() == [39, 30, 33]
    monkeypatch.setenv("GRIFFIN_TOP_K", "xla")
    assert "griffin_argmax" not in str(jax.make_jaxpr(sampling.argmax)(jnp.asarray(x)))
    assert np.asarray(sampling.argmax(jnp.asarray(x)))[2] == 33
    monkeypatch.delenv("GRIFFIN_TOP_K")
    bf16 = jnp.asarray(x[2:], jnp.bfloat16)  # f32 logits only: XLA's form for others
    assert "griffin_argmax" not in str(jax.make_jaxpr(sampling.argmax)(bf16))
    assert sampling.argmax(bf16).tolist() == [33]
