"""Vanilla decoding vs transformers `generate` (greedy, token for token), stopping, sampling."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from convert.load_hf import load_hf
from griffin_jax import vanilla
from griffin_jax.kv_cache import CacheCapacityError

PROMPTS = [[1, 5, 9, 20, 3], [1, 77], [1, 4, 4, 8, 15, 16, 23, 42, 99, 100, 7], [1, 60, 61]]


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    from conftest import build_hf_model

    model = build_hf_model("llama", seed=1)
    folder = tmp_path_factory.mktemp("vanilla") / "llama"
    model.save_pretrained(folder)
    cfg, params = load_hf(folder)
    return model, cfg, params


def hf_greedy(model, prompt, max_new_tokens, eos_id):
    out = model.generate(
        torch.tensor([prompt]),
        attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=eos_id,
        pad_token_id=0,
    )
    return out[0, len(prompt) :].tolist()


@pytest.mark.parametrize("loop", ["device", "host"])
def test_greedy_matches_transformers_batch1(llama, loop):
    model, cfg, params = llama
    prompt = PROMPTS[2]
    want = hf_greedy(model, prompt, 24, eos_id=None)
    got = vanilla.generate(params, cfg, [prompt], max_new_tokens=24, eos_ids=[], loop=loop)
    assert got.output_ids == [want]
    assert len(want) == 24


def test_greedy_matches_transformers_batch4_through_eos_and_max_new_tokens(llama):
    model, cfg, params = llama
    free = vanilla.generate(params, cfg, PROMPTS, max_new_tokens=20, eos_ids=[])
    # An EOS id that row 0 emits at step 4 (and maybe other rows elsewhere).
    eos = free.output_ids[0][4]
    got = vanilla.generate(params, cfg, PROMPTS, max_new_tokens=20, eos_ids=[eos])
    assert got.output_ids[0] == free.output_ids[0][: free.output_ids[0].index(eos) + 1]
    for prompt, ours in zip(PROMPTS, got.output_ids, strict=True):
        assert ours == hf_greedy(model, prompt, 20, eos_id=eos)
        assert len(ours) <= 20
        assert eos not in ours[:-1]
    assert any(len(o) == 20 for o in got.output_ids)  # some row stopped by max_new_tokens
    assert got.new_tokens == sum(len(o) for o in got.output_ids)


def test_max_new_tokens_is_exact_and_eos_set(llama):
    _, cfg, params = llama
    free = vanilla.generate(params, cfg, PROMPTS[:2], max_new_tokens=9, eos_ids=[])
    assert [len(o) for o in free.output_ids] == [9, 9]
    # Two stop ids: each row stops at the first of either.
    stops = {free.output_ids[0][6], free.output_ids[1][2]}
    got = vanilla.generate(params, cfg, PROMPTS[:2], max_new_tokens=9, eos_ids=sorted(stops))
    for full, ours in zip(free.output_ids, got.output_ids, strict=True):
        cut = min(i for i, t in enumerate(full) if t in stops)
        assert ours == full[: cut + 1]


def test_sampling_same_seed_same_output(llama):
    _, cfg, params = llama
    kwargs = dict(max_new_tokens=16, temperature=1.0, top_p=0.95, top_k=50, eos_ids=[])
    a = vanilla.generate(params, cfg, PROMPTS, seed=3, **kwargs)
    b = vanilla.generate(params, cfg, PROMPTS, seed=3, **kwargs)
    c = vanilla.generate(params, cfg, PROMPTS, seed=4, **kwargs)
    assert a.output_ids == b.output_ids
    assert a.output_ids != c.output_ids
    host = vanilla.generate(params, cfg, PROMPTS, seed=3, loop="host", **kwargs)
    assert host.output_ids == a.output_ids


def test_sampling_top_k_1_is_greedy(llama):
    _, cfg, params = llama
    greedy = vanilla.generate(params, cfg, PROMPTS, max_new_tokens=12, eos_ids=[])
    top1 = vanilla.generate(
        params, cfg, PROMPTS, max_new_tokens=12, temperature=0.8, top_k=1, eos_ids=[], seed=9
    )
    assert top1.output_ids == greedy.output_ids


def test_bad_inputs_raise_clear_errors(llama):
    _, cfg, params = llama
    with pytest.raises(CacheCapacityError, match="needs"):
        vanilla.generate(params, cfg, [PROMPTS[2]], max_new_tokens=30, capacity=32)
    with pytest.raises(ValueError, match="largest bucket"):
        vanilla.generate(params, cfg, [list(range(40))], max_new_tokens=4, buckets=(16, 32))
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        vanilla.generate(params, cfg, [[1, 2], []], max_new_tokens=4)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        vanilla.generate(params, cfg, [[1, cfg.vocab_size]], max_new_tokens=4)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        vanilla.generate(params, cfg, [[1, 2]], max_new_tokens=cfg.max_position_embeddings)
    with pytest.raises(ValueError, match="temperature"):
        vanilla.generate(params, cfg, [[1, 2]], max_new_tokens=4, temperature=-1.0)
    with pytest.raises(ValueError, match="top_p"):
        vanilla.generate(params, cfg, [[1, 2]], max_new_tokens=4, top_p=0.0)


def test_prompt_buckets():
    assert vanilla.prompt_bucket(1) == 16
    assert vanilla.prompt_bucket(16) == 16
    assert vanilla.prompt_bucket(17) == 32
    assert vanilla.prompt_bucket(100, (128, 256)) == 128
    tokens, lengths = vanilla.pad_prompts([[5, 6, 7], [8]])
    assert tokens.shape == (2, 16)
    np.testing.assert_array_equal(lengths, [3, 1])
    np.testing.assert_array_equal(tokens[0, :4], [5, 6, 7, 0])
