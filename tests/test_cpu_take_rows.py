"""The embedding lookup on a CPU (`cpu_kernels.take_rows`, `csrc/take_rows.cc`): the rows
`jnp.take` gives (negative ids from the end, NaN rows outside [-V, V)), its gradient, and
`jnp.take` itself where the kernel does not run."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from griffin_jax import cpu_kernels

pytestmark = pytest.mark.skipif(
    not cpu_kernels.on_one_cpu(), reason="the CPU kernels' library does not run here"
)


def traced(table, ids) -> str:
    return str(jax.make_jaxpr(cpu_kernels.take_rows)(table, ids))


@pytest.mark.parametrize("ids_shape", [(1, 1), (2, 5), (7,), (0, 3), (3, 2, 4)])
def test_rows_are_jnp_take_s(ids_shape):
    rng = np.random.default_rng(len(ids_shape))
    table = jnp.asarray(rng.standard_normal((50, 24)), jnp.float32)
    ids = jnp.asarray(rng.integers(-60, 60, ids_shape), jnp.int32)  # some out of range
    assert "griffin_take_rows" in traced(table, ids)
    got = np.asarray(jax.jit(cpu_kernels.take_rows)(table, ids))
    np.testing.assert_array_equal(got, np.asarray(jnp.take(table, ids, axis=0)))
    assert got.shape == (*ids_shape, 24)


def test_gradient_and_where_jnp_take_runs():
    rng = np.random.default_rng(1)
    table = jnp.asarray(rng.standard_normal((9, 16)), jnp.float32)
    ids = jnp.asarray([[0, -1, 3, 3]], jnp.int32)

    def loss(take):
        return lambda t: jnp.sum(jnp.sin(take(t)))

    want = jax.grad(loss(lambda t: jnp.take(t, ids, axis=0)))(table)
    got = jax.grad(loss(lambda t: cpu_kernels.take_rows(t, ids)))(table)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert "griffin_take_rows" not in traced(table.astype(jnp.bfloat16), ids)  # f32 tables only
    np.testing.assert_array_equal(
        cpu_kernels.take_rows(table.astype(jnp.bfloat16), ids),
        jnp.take(table, ids, axis=0).astype(jnp.bfloat16),
    )
