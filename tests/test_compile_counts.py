"""Bounded compiles (STYLE R5.6): none per token, one per prompt-length bucket.

Each test builds its own config (a unique static argument), so compiles made by other tests in
the same process cannot hide or add to the counts.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from griffin_jax import sampling, tree, vanilla
from griffin_jax.config import ModelConfig
from griffin_jax.model import init_params


def _tiny(vocab: int) -> tuple[ModelConfig, dict]:
    cfg = ModelConfig(
        vocab_size=vocab, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=48
    )
    return cfg, init_params(cfg, jax.random.key(0))


def test_vanilla_device_loop_compiles_once_per_bucket():
    cfg, params = _tiny(97)
    fn = vanilla.generate_device_jit
    before = fn._cache_size()
    # Same bucket (16), different lengths, batch contents, max_new_tokens (same output capacity),
    # sampling knobs and seeds: one compile.
    vanilla.generate(params, cfg, [[1, 2, 3]], max_new_tokens=10, temperature=0.7, seed=1)
    assert fn._cache_size() == before + 1
    vanilla.generate(
        params, cfg, [list(range(1, 15))], max_new_tokens=14, temperature=1.2, top_p=0.5
    )
    vanilla.generate(params, cfg, [[9] * 16], max_new_tokens=3, temperature=0.3, top_k=5, seed=7)
    assert fn._cache_size() == before + 1
    # A new bucket compiles once more.
    vanilla.generate(params, cfg, [list(range(1, 20))], max_new_tokens=10, temperature=0.7)
    assert fn._cache_size() == before + 2


def test_vanilla_host_loop_one_compile_across_decode_steps():
    cfg, params = _tiny(89)
    step, start = vanilla.decode_step_jit, vanilla.start_jit
    before = (step._cache_size(), start._cache_size())
    out = vanilla.generate(
        params, cfg, [[1, 2, 3], [4, 5]], max_new_tokens=40, eos_ids=[], loop="host"
    )
    assert out.decode_steps == 39
    out = vanilla.generate(
        params, cfg, [[7, 8, 9, 10], [11]], max_new_tokens=33, eos_ids=[], loop="host"
    )
    assert out.decode_steps == 32
    assert (step._cache_size(), start._cache_size()) == (before[0] + 1, before[1] + 1)


def test_sampling_acceptance_compiles_once_across_knobs():
    @jax.jit
    def accept(seeds, tokens, logits, retrieve, mask, temperature, top_p, top_k):
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        targets = sampling.next_token(
            sampling.row_keys(seeds), positions, logits, greedy=False,
            temperature=temperature, top_p=top_p, top_k=top_k,
        )  # fmt: skip
        return sampling.accept_nodes(tokens, targets, retrieve, mask)

    rng = np.random.default_rng(0)
    args = (
        jnp.asarray(rng.integers(0, 8, size=(2, 5)), jnp.int32),
        jnp.asarray(rng.normal(size=(2, 5, 11)), jnp.float32),
        jnp.zeros((2, 4, 3), jnp.int32),
        jnp.ones((2, 4, 3), bool),
    )
    for i, (t, p, k) in enumerate([(1.0, 1.0, 0), (0.5, 0.9, 3), (2.0, 0.3, 1)]):
        accept(jnp.full((2,), i, jnp.uint32), *args, jnp.float32(t), jnp.float32(p), jnp.int32(k))
    assert accept._cache_size() == 1


def test_build_tree_compiles_once_across_trunk_lengths():
    def draft_step(features, tokens, positions, cache, write_idx, mask):
        logits = jnp.sin(tokens[..., None] * jnp.arange(16) + positions[..., None])
        return logits, features, cache

    build = jax.jit(
        tree.build_tree,
        static_argnums=(0,),
        static_argnames=("top_k", "depth", "total_tokens", "capacity", "lexicographic_paths"),
    )
    before = build._cache_size()
    for trunk in (3, 9, 17):
        build(
            draft_step,
            jax.nn.log_softmax(jnp.arange(16.0))[None],
            jnp.zeros((1, 4)),
            jnp.array([1]),
            jnp.array([trunk]),
            jnp.zeros(()),
            top_k=3,
            depth=3,
            total_tokens=12,
            capacity=40,
            lexicographic_paths=False,
        )
    assert build._cache_size() == before + 1
