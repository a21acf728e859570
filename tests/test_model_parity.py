"""T2 model parity: save_pretrained -> convert/ -> our forward == transformers (torch, f32).

Every case checks logits (max abs diff <= 1e-4, identical top-1 on 2 x 64+ tokens) and the final
normed hidden state (HF `hidden_states[-1]`, the draft's feature), both for one full forward and
for a 64-token chunk run against a 16-token prefilled cache (positions 16..79).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from convert.load_hf import load_hf
from griffin_jax.kv_cache import causal_mask, init_cache
from griffin_jax.model import forward

BATCH, PREFIX, CHUNK = 2, 16, 64
TOTAL = PREFIX + CHUNK
CAPACITY = 96
ATOL = 1e-4

CASES = {
    "llama_mha": ("llama", dict(num_key_value_heads=4)),
    "llama_gqa_kv2": ("llama", dict(num_key_value_heads=2)),
    "llama_mqa_kv1": ("llama", dict(num_key_value_heads=1)),
    # original_max_position_embeddings=32 puts head_dim 16's wavelengths on all three branches
    # (kept, smoothed, scaled), so a wrong llama3 formula changes the logits.
    "llama3_rope": (
        "llama",
        dict(
            rope_parameters=dict(
                rope_type="llama3",
                rope_theta=10000.0,
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=32,
            )
        ),
    ),
    "llama_linear_rope": (
        "llama",
        dict(rope_parameters=dict(rope_type="linear", rope_theta=10000.0, factor=4.0)),
    ),
    "qwen2": ("qwen2", dict(rope_parameters=dict(rope_type="default", rope_theta=1e6))),
    "qwen2_tied": ("qwen2", dict(tie_word_embeddings=True)),
    "mixtral": ("mixtral", {}),
}

_forward = jax.jit(forward, static_argnames=("cfg",))


@pytest.fixture(params=list(CASES), ids=list(CASES))
def case(request, hf_checkpoint):
    family, overrides = CASES[request.param]
    folder, model = hf_checkpoint(family, **overrides)
    cfg, params = load_hf(folder, "f32")
    tokens = torch.randint(0, 128, (BATCH, TOTAL), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = model(tokens, output_hidden_states=True)
    ref_logits = out.logits.numpy()
    ref_hidden = out.hidden_states[-1].numpy()
    # Far from uniform, so top-1 agreement is a real check (levanter's caveat).
    assert ref_logits.std() > 1.0
    return cfg, params, tokens.numpy(), ref_logits, ref_hidden


def _run(cfg, params, cache, tokens, start):
    b, t = tokens.shape
    write_idx = jnp.full((b,), start, jnp.int32)
    positions = jnp.broadcast_to(start + jnp.arange(t, dtype=jnp.int32), (b, t))
    mask = causal_mask(write_idx, t, cache.capacity)
    return _forward(
        params, jnp.asarray(tokens), positions, cache, write_idx=write_idx, mask=mask, cfg=cfg
    )


def _assert_parity(logits, hidden, ref_logits, ref_hidden):
    logits, hidden = np.asarray(logits), np.asarray(hidden)
    assert logits.dtype == np.float32
    assert np.abs(logits - ref_logits).max() <= ATOL
    np.testing.assert_array_equal(logits.argmax(-1), ref_logits.argmax(-1))
    assert np.abs(hidden - ref_hidden).max() <= ATOL


def test_full_forward_matches_transformers(case):
    cfg, params, tokens, ref_logits, ref_hidden = case
    logits, hidden, _ = _run(cfg, params, init_cache(cfg, BATCH, CAPACITY), tokens, 0)
    _assert_parity(logits, hidden, ref_logits, ref_hidden)


def test_chunk_after_prefix_matches_transformers(case):
    cfg, params, tokens, ref_logits, ref_hidden = case
    cache = init_cache(cfg, BATCH, CAPACITY)
    _, _, cache = _run(cfg, params, cache, tokens[:, :PREFIX], 0)
    logits, hidden, _ = _run(cfg, params, cache, tokens[:, PREFIX:], PREFIX)
    _assert_parity(logits, hidden, ref_logits[:, PREFIX:], ref_hidden[:, PREFIX:])
