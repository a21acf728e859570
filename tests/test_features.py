"""training/features.py: chat-template masks, text masks, shard round trip, killed-run resume,
and the online mode (features computed in the train step) against stored features."""

from __future__ import annotations

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from griffin_jax import model as base_model
from griffin_jax.config import ModelConfig
from training import features

SPECIALS = ["<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
WORDS = "hello world how are you fine thanks and what is the answer it two plus equals four".split()
TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
# The same template with the assistant turns marked for transformers' assistant mask.
GEN_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>"
    "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}<|end|>{% endgeneration %}"
    "{% else %}{{ m['content'] }}<|end|>{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
CFG = ModelConfig(
    vocab_size=64,
    d_model=32,
    n_layers=2,
    n_heads=4,
    n_kv_heads=2,
    head_dim=8,
    d_ff=64,
    max_position_embeddings=256,
    bos_token_id=0,
    eos_token_ids=(1,),
)


def make_tokenizer(template: str = TEMPLATE):
    """A word-level fast tokenizer (specials first, then WORDS), no network."""
    import tokenizers
    import transformers
    from tokenizers import models, pre_tokenizers, processors

    vocab = {t: i for i, t in enumerate(SPECIALS + WORDS)}
    tok = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="</s>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    for s in SPECIALS:
        tok.add_special_tokens([tokenizers.AddedToken(s, special=True, normalized=False)])
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", chat_template=template
    )


CONV = {
    "conversations": [
        {"from": "human", "value": "hello how are you"},
        {"from": "gpt", "value": "fine thanks and you"},
        {"from": "human", "value": "what is two plus two"},
        {"from": "gpt", "value": "it equals four"},
    ]
}


def _ids(tok, words: str) -> list[int]:
    return tok.convert_tokens_to_ids(words.split())


def test_chat_mask_covers_exactly_the_assistant_turns():
    tok = make_tokenizer()
    ex = features.chat_example(tok, features.chat_messages(CONV), max_len=64)
    # <s> <|user|> hello how are you <|end|> <|assistant|> [fine thanks and you <|end|>]
    # <|user|> what is two plus two <|end|> <|assistant|> [it equals four <|end|>]
    want_ids = _ids(
        tok,
        "<s> <|user|> hello how are you <|end|> <|assistant|> fine thanks and you <|end|> "
        "<|user|> what is two plus two <|end|> <|assistant|> it equals four <|end|>",
    )
    want_mask = [0] * 8 + [1] * 5 + [0] * 8 + [1] * 4
    np.testing.assert_array_equal(ex.ids, want_ids)
    np.testing.assert_array_equal(ex.mask, want_mask)


def test_generation_tag_template_gives_the_same_mask():
    ex = features.chat_example(make_tokenizer(), features.chat_messages(CONV), max_len=64)
    gen = features.chat_example(
        make_tokenizer(GEN_TEMPLATE), features.chat_messages(CONV), max_len=64
    )
    np.testing.assert_array_equal(gen.ids, ex.ids)
    np.testing.assert_array_equal(gen.mask, ex.mask)


def test_chat_messages_drop_a_leading_assistant_turn_and_reject_non_alternating():
    conv = {"conversations": [{"from": "gpt", "value": "hi"}] + CONV["conversations"][:2]}
    assert [m["role"] for m in features.chat_messages(conv)] == ["user", "assistant"]
    bad = {"conversations": [CONV["conversations"][0], CONV["conversations"][2]]}
    with pytest.raises(ValueError, match="alternate"):
        features.chat_messages(bad)


def test_text_mask_is_all_but_the_first_token_of_each_window():
    tok = make_tokenizer()
    exs = features.text_examples(tok, " ".join(WORDS), max_len=8)  # BOS + 17 words = 18 tokens
    assert [len(e.ids) for e in exs] == [8, 8, 2]
    for e in exs:
        np.testing.assert_array_equal(e.mask, [0] + [1] * (len(e.ids) - 1))
    np.testing.assert_array_equal(np.concatenate([e.ids for e in exs]), [0, *range(6, 23)])
    assert features.text_examples(tok, "", max_len=8) == []  # BOS alone: nothing to learn


def _examples(n: int, seed: int = 0) -> list[features.Example]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        length = int(rng.integers(5, 40))
        mask = (rng.random(length) < 0.7).astype(np.uint8)
        mask[0] = 0
        out.append(features.Example(rng.integers(0, 64, length).astype(np.int32), mask))
    return out


@pytest.fixture(scope="module")
def base_params():
    return base_model.init_params(CFG, jax.random.key(0))


def _direct(params, ids: np.ndarray) -> np.ndarray:
    hidden = features.base_features(params, jnp.asarray(ids)[None], cfg=CFG)
    return np.asarray(hidden[0])


def test_shards_round_trip(tmp_path: pathlib.Path, base_params):
    exs = _examples(7)
    manifest = features.generate(
        base_params, exs, tmp_path, cfg=CFG, shard_size=3, hidden_dtype="float32", log=print
    )
    assert (
        manifest["complete"] and manifest["num_shards"] == 3 and manifest["ids_dtype"] == "uint16"
    )
    store = features.FeatureStore(tmp_path)
    assert len(store) == 7
    for i in (0, 4, 6):  # bucketed and batched features equal an unpadded forward
        ids, hidden, mask = store[i]
        np.testing.assert_array_equal(ids, exs[i].ids)
        np.testing.assert_array_equal(mask, exs[i].mask)
        np.testing.assert_allclose(hidden, _direct(base_params, exs[i].ids), atol=1e-5, rtol=1e-5)
    half = tmp_path / "f16"
    features.generate(base_params, exs[:2], half, cfg=CFG, shard_size=3, log=print)
    _, hidden16, _ = features.FeatureStore(half)[1]
    np.testing.assert_allclose(hidden16, _direct(base_params, exs[1].ids), rtol=2e-3, atol=2e-3)


def test_killed_run_resumes_after_the_last_complete_shard(tmp_path: pathlib.Path, base_params):
    exs = _examples(8, seed=1)
    kwargs = dict(cfg=CFG, shard_size=3, hidden_dtype="float32", log=print)
    whole = features.generate(base_params, exs, tmp_path / "whole", **kwargs)
    part = tmp_path / "part"
    first = features.generate(base_params, exs, part, max_new_shards=1, **kwargs)
    assert not first["complete"] and len(first["shards"]) == 1
    (part / "shard_00001.safetensors.tmp").write_bytes(b"half-written")  # killed mid-write
    resumed = features.generate(base_params, exs, part, **kwargs)
    assert resumed["complete"] and not list(part.glob("*.tmp"))
    assert resumed["shards"] == whole["shards"]
    for shard in whole["shards"]:
        a = (tmp_path / "whole" / shard["file"]).read_bytes()
        assert a == (part / shard["file"]).read_bytes()
    with pytest.raises(ValueError, match="fingerprint"):
        features.generate(base_params, exs[:5], part, **kwargs)


def test_cli_tokenizes_chat_and_text_inputs(tmp_path: pathlib.Path, base_params):
    from convert.export_hf import export_hf

    base = tmp_path / "base"
    export_hf(base_params, CFG, base)
    make_tokenizer().save_pretrained(base)
    chat = tmp_path / "chat.jsonl"
    chat.write_text(json.dumps(CONV) + "\n" + json.dumps(CONV) + "\n")
    text = tmp_path / "words.txt"
    text.write_text(" ".join(WORDS))
    out = tmp_path / "feats"
    argv = ["--base", str(base), "--data", str(chat), str(text), "--out", str(out)]
    assert features.main([*argv, "--shard-size", "2", "--hidden-dtype", "float32"]) == 0
    store = features.FeatureStore(out)
    assert len(store) == 3 and store.manifest["complete"]
    ids, hidden, mask = store[0]
    assert mask.sum() == 9  # the two assistant turns
    np.testing.assert_allclose(hidden, _direct(base_params, ids), atol=1e-5, rtol=1e-5)
    ids, _, mask = store[2]
    assert len(ids) == 18 and mask.sum() == 17  # plain text: all but the first token


def test_online_features_give_the_stored_features_loss(tmp_path: pathlib.Path, base_params):
    from griffin_jax.draft import DraftConfig, init_draft_params
    from training import train

    exs = _examples(4, seed=2)
    features.generate(
        base_params, exs, tmp_path, cfg=CFG, shard_size=4, hidden_dtype="float32", log=print
    )
    data = train.SequenceData(store=features.FeatureStore(tmp_path))
    batch = train.make_batch(data, range(4), max_len=64, min_bucket=16)
    dcfg = DraftConfig(vocab_size=64, d_model=32, d_ff=64, n_heads=4, n_kv_heads=2, head_dim=8)
    draft = init_draft_params(dcfg, jax.random.key(3))
    loss_fn = jax.jit(train.loss_fn, static_argnames=("base_cfg", "dcfg", "sc"))
    results = {}
    for online in (False, True):
        b = {k: v for k, v in batch.items() if not (online and k == "hidden")}
        sc = train.StepConfig(online=online)
        loss, _ = loss_fn(draft, base_params, b, jax.random.key(4), base_cfg=CFG, dcfg=dcfg, sc=sc)
        results[online] = float(loss)
    assert results[False] > 0
    np.testing.assert_allclose(results[True], results[False], rtol=1e-5)


def test_batches_are_padded_to_power_of_two_buckets():
    from training import train

    buckets = [features.bucket_length(n, min_bucket=16, max_len=48) for n in (1, 16, 17, 33, 48)]
    assert buckets == [16, 16, 32, 48, 48]
    data = train.SequenceData(examples=_examples(6, seed=5))
    lengths = [len(e.ids) for e in data.examples]
    batch = train.make_batch(data, [0, 1, None], max_len=64, min_bucket=16)
    assert batch["ids"].shape[1] == features.bucket_length(max(lengths[:2]), min_bucket=16)
    np.testing.assert_array_equal(batch["lengths"], [lengths[0], lengths[1], 0])
    assert batch["mask"][2].sum() == 0 and "hidden" not in batch
    plan = train.BatchPlan(np.asarray(lengths), seed=0, batch=2)
    again = train.BatchPlan(np.asarray(lengths), seed=0, batch=2)
    steps = [plan.positions(s).tolist() for s in range(7)]
    assert steps == [again.positions(s).tolist() for s in reversed(range(7))][::-1]
    assert sorted(sum(steps[:3], [])) == list(range(6))  # one epoch = a permutation
