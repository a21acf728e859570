"""Attention reads the smallest key window holding every attended slot (`layers.attention_spans`).

The reference is a float64 numpy softmax over the attended slots only. Slots past the expected
window hold NaN keys and values: reading a larger window than the smallest one that holds the
last attended slot turns the output NaN, reading a smaller one drops an attended slot (whose
value is made large, so the output moves far past round-off). The windows are the einsum
path's (`GRIFFIN_ATTENTION=einsum`: GPU/TPU forwards, bf16 on a CPU); the numeric tests run the
CPU kernel too (`cpu_kernels.attention`), which reads each KV head's buffer up to the last slot
its queries may attend, so it too must never touch the NaN slots.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from spec_models import attention_reference as reference

from griffin_jax import layers

CAPACITY, N, KV, H = 448, 4, 2, 16


@pytest.fixture(params=["einsum", "cpu"])
def implementation(request, monkeypatch):
    monkeypatch.setenv("GRIFFIN_ATTENTION", request.param)
    return request.param


@pytest.fixture
def einsum(monkeypatch):
    monkeypatch.setenv("GRIFFIN_ATTENTION", "einsum")


def test_windows_double_and_end_at_the_capacity():
    assert layers.attention_spans(96) == (96,)
    assert layers.attention_spans(128) == (128,)
    assert layers.attention_spans(200) == (200,)  # under 256 slots: one window
    assert layers.attention_spans(256) == (128, 256)
    assert layers.attention_spans(CAPACITY) == (128, 256, CAPACITY)
    assert layers.attention_spans(1024) == (128, 256, 512, 1024)
    assert layers.attention_spans(1100) == (128, 256, 512, 1100)


@pytest.mark.parametrize("queries", [1, 3])
@pytest.mark.parametrize("last", [1, 127, 128, 129, 255, 256, 257, CAPACITY])
def test_attention_reads_exactly_the_smallest_window_holding_the_attended_slots(
    queries, last, implementation
):
    rng = np.random.default_rng(last * 10 + queries)
    window = next(s for s in layers.attention_spans(CAPACITY) if s >= last)
    q = rng.normal(size=(2, queries, N, H)).astype(np.float32)
    k = rng.normal(size=(2, CAPACITY, KV, H)).astype(np.float32)
    v = rng.normal(size=(2, CAPACITY, KV, H)).astype(np.float32)
    v[:, last - 1] *= 100.0  # dropping the last attended slot moves the output far
    k[:, window:] = np.nan
    v[:, window:] = np.nan
    mask = rng.random((2, queries, CAPACITY)) < 0.5
    mask[:, :, 0] = True  # every query sees a slot
    mask[:, :, last:] = False
    mask[0, :, last - 1] = True  # row 0 attends the last slot; row 1 ends earlier
    mask[1, :, max(last - 9, 1) :] = False
    out = jax.jit(layers.gqa_attention)(q, k, v, jnp.asarray(mask))
    np.testing.assert_allclose(np.asarray(out), reference(q, k, v, mask), rtol=2e-5, atol=2e-4)


def test_a_whole_window_mask_reads_the_whole_buffer(implementation):
    rng = np.random.default_rng(0)
    q = rng.normal(size=(1, 2, N, H)).astype(np.float32)
    k = rng.normal(size=(1, CAPACITY, KV, H)).astype(np.float32)
    v = rng.normal(size=(1, CAPACITY, KV, H)).astype(np.float32)
    mask = np.ones((1, 2, 300), bool)  # a mask over the first 300 slots of a larger buffer
    out = jax.jit(layers.gqa_attention)(q, k, v, jnp.asarray(mask))
    np.testing.assert_allclose(np.asarray(out), reference(q, k, v, mask), rtol=2e-5, atol=2e-5)


def test_only_windows_as_wide_as_the_queries_are_branches(einsum):
    q1, q300 = jnp.zeros((1, 1, N, H)), jnp.zeros((1, 300, N, H))
    kv = jnp.zeros((1, 300, KV, H))
    decode = jax.make_jaxpr(layers.gqa_attention)(q1, kv, kv, jnp.ones((1, 1, 300), bool))
    prefill = jax.make_jaxpr(layers.gqa_attention)(q300, kv, kv, jnp.ones((1, 300, 300), bool))
    assert "cond[" in str(decode)  # windows 128 and 300
    assert "cond[" not in str(prefill)  # a prefill over its own 300 slots reads them all


def test_a_buffer_under_256_slots_has_no_window_choice(einsum):
    q1, kv = jnp.zeros((1, 1, N, H)), jnp.zeros((1, 200, KV, H))
    decode = jax.make_jaxpr(layers.gqa_attention)(q1, kv, kv, jnp.ones((1, 1, 200), bool))
    assert "cond[" not in str(decode)
