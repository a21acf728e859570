"""EAGLE-3 drafts: the base's feature layers against transformers, strict import of folders in
the published layout (SafeAILab/EAGLE `eagle/model/cnets.py`'s `Model` state dict, made here by
the PyTorch reference in tests/torch_ref_draft.py), export loadable with `strict=True` into that
reference, the API on exported folders, and training.

Parity of the draft forward and of its draft-vocabulary token ids is in tests/test_draft.py;
greedy and sampling exactness of speculative decoding in tests/test_speculative.py; continuous
batching over a tensor-parallel mesh in tests/test_sharding.py.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.torch
import torch
from spec_models import base_config, draft_config
from torch_ref_draft import RefConfig, make_ref_draft

from convert.export_draft import export_draft
from convert.export_hf import export_hf
from convert.load_draft import CheckpointError, draft_params_from_state, load_draft
from convert.load_hf import load_hf
from griffin_jax import draft, speculative, vanilla
from griffin_jax.config import ModelConfig, UnsupportedConfigError
from griffin_jax.kv_cache import causal_mask, init_cache
from griffin_jax.model import forward, is_unstacked, unstack_layers
from inference.api import SpeculativeModel

BASE = ModelConfig(
    family="llama", vocab_size=128, d_model=64, n_layers=8, n_heads=4, n_kv_heads=2,
    head_dim=16, d_ff=96,
)  # fmt: skip
DRAFT_VOCAB = 40
draft_forward = jax.jit(draft.draft_forward, static_argnames=("dcfg",))


# ------------------------------------------------------------------------------------------
# The base's features: the inputs of layers 2, L//2 and L-3.


@pytest.mark.parametrize("family", ["llama", "qwen2", "mixtral"])
def test_feature_layers_are_the_transformers_hidden_states(family, hf_checkpoint):
    folder, model = hf_checkpoint(family, num_hidden_layers=9)
    cfg, params = load_hf(folder, "f32")
    dcfg = draft_config(cfg, "eagle3")
    layers = draft.feature_layers(dcfg, cfg.n_layers)
    assert layers == (2, 4, 6)
    b, t = 2, 12
    tokens = torch.randint(0, 128, (b, t), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out = model(tokens, output_hidden_states=True)
    # hidden_states[i] is the input of layer i (0: the embeddings).
    want = np.concatenate([out.hidden_states[i].numpy() for i in layers], axis=-1)
    zero = jnp.zeros((b,), jnp.int32)
    layouts = (params, unstack_layers(params)) if family == "llama" else (params,)
    for p in layouts:  # stacked (scan) and unrolled layers
        logits, feats, _ = forward(
            p, jnp.asarray(tokens.numpy()), jnp.broadcast_to(jnp.arange(t), (b, t)),
            init_cache(cfg, b, t, per_layer=is_unstacked(p)), write_idx=zero,
            mask=causal_mask(zero, t, t), cfg=cfg, feature_layers=layers,
        )  # fmt: skip
        assert feats.shape == (b, t, 3 * cfg.d_model)
        np.testing.assert_allclose(np.asarray(feats), want, atol=1e-4, rtol=1e-4)
        np.testing.assert_allclose(np.asarray(logits), out.logits.numpy(), atol=1e-4)


def test_a_base_without_three_distinct_feature_layers_is_refused():
    dcfg = draft_config(base_config(n_layers=8), "eagle3")
    assert draft.feature_layers(dcfg, 7) == (2, 3, 4)
    with pytest.raises(ValueError, match="at least 7"):
        draft.feature_layers(dcfg, 6)
    assert draft.feature_layers(draft_config(base_config()), 2) == ()


# ------------------------------------------------------------------------------------------
# The training-time test.


def test_training_time_test_matches_the_reference():
    """7 steps, GQA, one padded row: our `eagle3_forward_train` == the reference's loop (1e-5)
    at every valid position of every step."""
    cfg, ref = _ref(bias=False, seed=2)
    dcfg = draft.DraftConfig.from_hf(_config(cfg), kind="eagle3")
    state = {k: v.detach().numpy() for k, v in ref.state_dict().items()}
    params = draft_params_from_state(state, dcfg)
    rng = np.random.default_rng(1)
    b, seq_len, steps = 2, 11, 7
    feats = rng.normal(size=(b, seq_len, dcfg.feature_dim)).astype(np.float32)
    ids = rng.integers(1, 128, size=(b, seq_len))
    lengths = np.array([seq_len, 8])
    ids[1, 8:] = 0
    valid = (np.arange(seq_len)[None, :] < lengths[:, None]).astype(np.int64)
    with torch.no_grad():
        want = ref.forward_ttt(
            torch.from_numpy(feats), torch.from_numpy(ids), steps, torch.from_numpy(valid)
        ).numpy()
    got = jax.jit(draft.eagle3_forward_train, static_argnames=("steps", "dcfg"))(
        params, jnp.asarray(state["embed_tokens.weight"]), jnp.asarray(feats),
        jnp.asarray(ids, jnp.int32), lengths=jnp.asarray(lengths, jnp.int32), steps=steps,
        dcfg=dcfg,
    )  # fmt: skip
    assert got.shape == (steps, b, seq_len, dcfg.d_model)
    got = np.asarray(got) * valid[None, :, :, None]
    np.testing.assert_allclose(got, want * valid[None, :, :, None], atol=1e-5, rtol=1e-5)
    # Step 0 is the inference forward over the trunk.
    tok, _, _ = draft_forward(
        params, jnp.asarray(state["embed_tokens.weight"]), jnp.asarray(feats[:1]),
        jnp.asarray(ids[:1], jnp.int32), jnp.arange(seq_len)[None],
        draft.init_draft_cache(dcfg, 1, seq_len), write_idx=jnp.zeros((1,), jnp.int32),
        mask=causal_mask(jnp.zeros((1,), jnp.int32), seq_len, seq_len), dcfg=dcfg,
    )  # fmt: skip
    np.testing.assert_allclose(np.asarray(tok[0]), got[0, 0], atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------
# Import and export of the published layout.


def _ref(*, bias: bool = False, draft_vocab: int = DRAFT_VOCAB, target: int = 0, seed: int = 0):
    cfg = RefConfig(
        num_key_value_heads=2, qkv_bias=bias, rope_theta=500_000.0,
        draft_vocab_size=draft_vocab, target_hidden_size=target,
    )  # fmt: skip
    ref = make_ref_draft("eagle3", cfg, seed=seed)
    rng = np.random.default_rng(seed)
    targets = np.sort(rng.choice(cfg.vocab_size, draft_vocab or cfg.vocab_size, replace=False))
    with torch.no_grad():
        ref.d2t.copy_(torch.from_numpy(targets - np.arange(len(targets))))
        ref.t2d[torch.from_numpy(targets)] = True
    return cfg, ref


def _config(cfg: RefConfig) -> dict:
    """A published EAGLE-3 config.json (transformers 4 layout)."""
    out = {
        "architectures": ["LlamaForCausalLMEagle3"], "bos_token_id": 1, "eos_token_id": 2,
        "hidden_act": "silu", "hidden_size": cfg.hidden_size, "initializer_range": 0.02,
        "intermediate_size": cfg.intermediate_size, "max_position_embeddings": 2048,
        "model_type": "llama", "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads, "num_hidden_layers": 1,
        "pad_token_id": 0, "rms_norm_eps": cfg.rms_norm_eps, "rope_scaling": None,
        "rope_theta": cfg.rope_theta, "tie_word_embeddings": False, "torch_dtype": "float16",
        "transformers_version": "4.28.1", "use_cache": True, "vocab_size": cfg.vocab_size,
        "draft_vocab_size": cfg.draft_vocab_size or cfg.vocab_size,
    }  # fmt: skip
    if cfg.target_hidden_size:
        out["target_hidden_size"] = cfg.target_hidden_size
    return out


def _write(folder: Path, config: dict, state: dict, fmt: str = "safetensors") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    if fmt == "bin":
        torch.save(state, folder / "pytorch_model.bin")
    else:
        tensors = {k: v.contiguous() for k, v in state.items()}
        safetensors.torch.save_file(tensors, folder / "model.safetensors")
    return folder


def _outputs_match(ref, dcfg, params, embedding) -> None:
    """Trunk (3T-wide features) then one level (D-wide): ours == the reference (f32, 1e-5), and
    the drafted target ids too."""
    rng = np.random.default_rng(0)
    b, t = 2, 8
    feats = rng.normal(size=(b, t, dcfg.feature_dim)).astype(np.float32)
    ids = rng.integers(0, dcfg.vocab_size, size=(b, t))
    with torch.no_grad():
        want = ref(torch.from_numpy(feats), torch.from_numpy(ids))
        want_ids = ref.draft_tokens(want[0], 4).numpy()
    write_idx = jnp.zeros((b,), jnp.int32)
    tok, nxt, _ = draft_forward(
        params, jnp.asarray(embedding), jnp.asarray(feats), jnp.asarray(ids, jnp.int32),
        jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t)),
        draft.init_draft_cache(dcfg, b, t), write_idx=write_idx,
        mask=causal_mask(write_idx, t, t), dcfg=dcfg,
    )  # fmt: skip
    for a, w in zip((tok, nxt), want[:2], strict=True):
        np.testing.assert_allclose(np.asarray(a), w.numpy(), atol=1e-5, rtol=1e-5)
    head = speculative.resolve_head(params, None, dcfg)
    logits = np.asarray(tok) @ np.asarray(head.kernel)
    got_ids = np.asarray(head.token_ids)[np.argsort(-logits, axis=-1)[..., :4]]
    np.testing.assert_array_equal(got_ids, want_ids)


@pytest.mark.parametrize(
    "fmt,bias,with_embedding,prefix",
    [("safetensors", False, False, ""), ("bin", True, True, "module.")],
)
def test_load_published_folder(tmp_path, fmt, bias, with_embedding, prefix):
    cfg, ref = _ref(bias=bias)
    state = {prefix + k: v for k, v in ref.state_dict().items()}
    if not with_embedding:  # the official loader takes the embedding from the base
        del state[prefix + "embed_tokens.weight"]
    folder = _write(tmp_path / "eagle3", _config(cfg), state, fmt)
    embedding = ref.embed_tokens.weight.detach().numpy()
    dcfg, params = load_draft(folder, BASE, base_embedding=embedding)
    assert (dcfg.kind, dcfg.qkv_bias, dcfg.draft_vocab, dcfg.feature_dim) == (
        "eagle3", bias, DRAFT_VOCAB, 3 * 64,
    )  # fmt: skip
    assert "embed_tokens" not in params and params["d2t"].dtype == jnp.int32
    _outputs_match(ref, dcfg, params, embedding)


def test_full_vocabulary_draft_may_omit_its_buffers(tmp_path):
    cfg, ref = _ref(draft_vocab=0)
    state = {k: v for k, v in ref.state_dict().items() if k not in ("d2t", "t2d")}
    dcfg, params = load_draft(_write(tmp_path / "d", _config(cfg), state), BASE)
    assert dcfg.draft_vocab == 128 and not np.asarray(params["d2t"]).any()


def test_narrower_draft_keeps_its_own_embedding(tmp_path):
    """`target_hidden_size`: fc reads 3 x 96 base features; the draft embeds with its own
    [V, 64] table (the base's is [V, 96])."""
    cfg, ref = _ref(target=96)
    folder = _write(tmp_path / "d", _config(cfg), ref.state_dict())
    wide = dataclasses.replace(BASE, d_model=96, head_dim=24)
    dcfg, params = load_draft(folder, wide)
    assert dcfg.own_embedding and dcfg.feature_dim == 288
    assert params["embed_tokens"]["embedding"].shape == (128, 64)
    _outputs_match(ref, dcfg, params, np.zeros((128, 96), np.float32))  # base's unused
    out = export_draft(params, jnp.zeros((128, 96)), dcfg, tmp_path / "out")
    fresh = make_ref_draft("eagle3", cfg, seed=9)
    fresh.load_state_dict(safetensors.torch.load_file(out / "model.safetensors"), strict=True)
    _outputs_match(fresh, dcfg, params, np.zeros((128, 96), np.float32))
    with pytest.raises(CheckpointError, match="target_hidden_size 96 does not match the base"):
        load_draft(folder, BASE)


def _edit_state(edit):
    cfg, ref = _ref()
    state = dict(ref.state_dict())
    edit(state)
    return cfg, state


def _set(key, value):
    return lambda s: s.__setitem__(key, value)


BAD = [
    (lambda s: s.pop("d2t"), "missing key 'd2t'"),
    (lambda s: s.pop("midlayer.hidden_norm.weight"), "missing keys 'midlayer.hidden_norm.weight'"),
    (
        _set("fc.weight", torch.zeros(64, 128)),
        r"'fc.weight' has shape \(64, 128\), expected \(64, 192\)",
    ),
    (_set("d2t", -torch.arange(DRAFT_VOCAB)), "maps two draft ids to one"),  # all to id 0
    (_set("d2t", torch.full((DRAFT_VOCAB,), 127)), "outside the target vocabulary"),
    (_set("d2t", torch.zeros(DRAFT_VOCAB)), "expected an integer tensor"),
    (_set("t2d", torch.ones(128, dtype=torch.bool)), "'t2d'.*does not mark exactly"),
    (_set("layers.0.mlp.up_proj.weight", torch.zeros(96, 64)), "unexpected key"),
    (_set("embed_tokens.weight", torch.zeros(128, 32)), "'embed_tokens.weight' has shape"),
]


@pytest.mark.parametrize("edit,message", BAD)
def test_bad_checkpoint_names_the_key(tmp_path, edit, message):
    cfg, state = _edit_state(edit)
    with pytest.raises(CheckpointError, match=message):
        load_draft(_write(tmp_path / "d", _config(cfg), state), BASE)


def test_bad_configs_and_bases_are_refused(tmp_path):
    cfg, ref = _ref()
    config = _config(cfg)
    folder = _write(tmp_path / "d", dict(config, draft_vocab_size=200), ref.state_dict())
    with pytest.raises(UnsupportedConfigError, match="draft_vocab_size=200"):
        load_draft(folder, BASE)
    folder = _write(tmp_path / "e", config, ref.state_dict())
    with pytest.raises(CheckpointError, match="at least 7"):
        load_draft(folder, dataclasses.replace(BASE, n_layers=4))
    # An EAGLE-3 field in a GRIFFIN draft's config is refused, not ignored.
    with pytest.raises(UnsupportedConfigError, match="draft_vocab_size"):
        draft.DraftConfig.from_hf(config, kind="griffin")


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_export_loads_strictly_into_the_reference_and_round_trips(tmp_path, fmt):
    cfg, ref = _ref(bias=True)
    src = _write(tmp_path / "src", _config(cfg), ref.state_dict())
    embedding = ref.embed_tokens.weight.detach().numpy()
    dcfg, params = load_draft(src, BASE)
    out = export_draft(params, jnp.asarray(embedding), dcfg, tmp_path / "out", formats=(fmt,))
    if fmt == "bin":
        state = torch.load(out / "pytorch_model.bin", weights_only=True)
    else:
        state = safetensors.torch.load_file(out / "model.safetensors")
    assert state["d2t"].dtype == torch.int64 and state["t2d"].dtype == torch.bool
    fresh = make_ref_draft("eagle3", cfg, seed=5)
    fresh.load_state_dict(state, strict=True)
    for key, value in ref.state_dict().items():
        torch.testing.assert_close(fresh.state_dict()[key], value, rtol=0, atol=0)
    config = json.loads((out / "config.json").read_text())
    assert config["draft_vocab_size"] == DRAFT_VOCAB
    dcfg2, params2 = load_draft(out, BASE, base_embedding=embedding)
    assert dcfg2 == dcfg
    flat = jax.tree_util.tree_leaves_with_path(params)
    flat2 = dict(jax.tree_util.tree_leaves_with_path(params2))
    for path, leaf in flat:
        np.testing.assert_array_equal(np.asarray(leaf), np.asarray(flat2[path]))


# ------------------------------------------------------------------------------------------
# The engine with an EAGLE-3 draft.


def test_api_loads_and_runs_an_exported_eagle3_folder(tmp_path, eagle3_pair):
    """export_hf + export_draft -> `SpeculativeModel.from_pretrained` -> greedy == vanilla; the
    draft vocabulary setting of GRIFFIN drafts is refused for an EAGLE-3 draft."""
    cfg, dcfg, base, draft_params = eagle3_pair
    export_hf(base, cfg, tmp_path / "base")
    export_draft(draft_params, base["embed_tokens"]["embedding"], dcfg, tmp_path / "eagle3")
    (tmp_path / "eagle3" / "tree.json").write_text(
        json.dumps({"top_k": 3, "depth": 3, "total_tokens": 10})
    )
    model = SpeculativeModel.from_pretrained(
        tmp_path / "base", tmp_path / "eagle3", load_tokenizer=False, unroll_layers=False
    )
    assert model.dcfg.kind == "eagle3" and model.draft_head() is None
    prompts = [[5, 6, 7, 8, 9], [10, 11, 12]]
    out = model.generate(prompts, max_new_tokens=16)
    assert out.output_ids == vanilla.generate(base, cfg, prompts, max_new_tokens=16).output_ids
    assert out.tau > 1.5
    with pytest.raises(ValueError, match="own vocabulary"):
        SpeculativeModel.from_pretrained(
            tmp_path / "base", tmp_path / "eagle3", load_tokenizer=False, draft_vocab=64
        )


# ------------------------------------------------------------------------------------------
# Training (`python -m training.train --draft-kind eagle3`).

TRAIN_BASE = ModelConfig(
    family="llama", vocab_size=320, d_model=32, n_layers=8, n_heads=4, n_kv_heads=2,
    head_dim=8, d_ff=64, max_position_embeddings=256,
)  # fmt: skip


@pytest.fixture(scope="module")
def train_world(tmp_path_factory) -> Path:
    """An 8-layer tiny base with its own small tokenizer, a text corpus and a token ranking."""
    from training import draft_vocab, tokenizer

    root = tmp_path_factory.mktemp("eagle3_train")
    texts = [f"def f{i}(x):\n    return x * {i} + {i % 3}\n" * 6 for i in range(24)]
    tok = tokenizer.train_tokenizer(texts, vocab_size=300)
    export_hf(base_model_init(TRAIN_BASE), TRAIN_BASE, root / "base")
    tokenizer.save_tokenizer(tok, root / "base", model_max_length=256)
    (root / "text.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    ids = np.concatenate([tok.encode(t).ids for t in texts])
    draft_vocab.write_ranking(draft_vocab.rank_tokens(ids, TRAIN_BASE.vocab_size), root / "vocab")
    return root


def base_model_init(cfg: ModelConfig):
    from griffin_jax.model import init_params

    return jax.tree.map(
        lambda x: x * 3.0 if x.ndim >= 2 else x, init_params(cfg, jax.random.key(0))
    )


def _train_argv(root: Path, out: str, *extra: str) -> list[str]:
    return [
        "--base", str(root / "base"), "--online", "--corpus", str(root / "text.jsonl"),
        "--draft-kind", "eagle3", "--draft-vocab-size", "48",
        "--vocab-ranking", str(root / "vocab" / "draft_vocab.safetensors"), "--ttt-steps", "2",
        "--out", str(root / out), "--batch", "4", "--lr", "3e-3", "--warmup", "2",
        "--schedule-steps", "1000", "--max-len", "64", "--min-bucket", "64",
        "--eval-frac", "0.2", "--eval-batches", "1", "--eval-depth", "3", "--log-every", "1",
        "--ckpt-every", "1000", "--steps", "12", *extra,
    ]  # fmt: skip


def test_eagle3_trains_resumes_and_exports(train_world):
    """Loss falls; a run stopped at step 6 and resumed ends equal to an uninterrupted one; the
    export loads with its draft vocabulary (the ranking's 48 most frequent ids)."""
    from training import draft_vocab, train

    root = train_world
    full = train.train(train.parse_args(_train_argv(root, "full", "--export", str(root / "x"))))
    recs = [json.loads(x) for x in (root / "full" / "metrics.jsonl").read_text().splitlines()]
    loss = [r["loss"] for r in recs]
    assert np.mean(loss[-3:]) < 0.95 * np.mean(loss[:3])
    assert {"ploss2", "top1_2", "eval_acc@3"} <= recs[-1].keys()
    first = train.train(train.parse_args(_train_argv(root, "killed", "--stop-at", "6")))
    assert first["step"] == 6
    resumed = train.train(train.parse_args(_train_argv(root, "killed", "--resume")))
    jax.tree.map(
        np.testing.assert_array_equal,
        jax.device_get(full["params"]),
        jax.device_get(resumed["params"]),
    )
    dcfg, params = load_draft(root / "x", TRAIN_BASE)
    assert dcfg.kind == "eagle3" and dcfg.draft_vocab == 48
    ranking = draft_vocab.read_ranking(root / "vocab" / "draft_vocab.safetensors")
    want = draft_vocab.draft_to_target(ranking, 48)
    np.testing.assert_array_equal(np.asarray(params["d2t"]), want)
    targets = set((np.arange(48) + want).tolist())
    assert targets == set(ranking[:48].tolist())
