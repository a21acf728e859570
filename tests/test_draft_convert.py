"""Draft checkpoint import (convert/load_draft.py) and export (convert/export_draft.py).

Folders are written from the PyTorch reference draft (tests/torch_ref_draft.py) in the published
layout: a transformers-4 `config.json` plus `pytorch_model.bin` or `model.safetensors`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import safetensors.torch
import torch
from flax import traverse_util
from torch_ref_draft import RefConfig, make_ref_draft

from convert.export_draft import export_draft
from convert.load_draft import CheckpointError, draft_params_from_state, load_draft
from griffin_jax import draft
from griffin_jax.config import ModelConfig
from griffin_jax.kv_cache import causal_mask

BASE = ModelConfig(
    family="llama",
    vocab_size=128,
    d_model=64,
    n_layers=2,
    n_heads=4,
    n_kv_heads=2,
    head_dim=16,
    d_ff=96,
)
draft_forward = jax.jit(draft.draft_forward, static_argnames=("dcfg",))


def _published_config(cfg: RefConfig) -> dict:
    """A draft config.json as published (transformers 4 layout, HF token ids, extra fields)."""
    out = {
        "architectures": ["LlamaForCausalLM"],
        "bos_token_id": 1,
        "eos_token_id": 2,
        "hidden_act": "silu",
        "hidden_size": cfg.hidden_size,
        "initializer_range": 0.02,
        "intermediate_size": cfg.intermediate_size,
        "max_position_embeddings": 2048,
        "model_type": "llama",
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "num_hidden_layers": 1,
        "pad_token_id": 0,
        "pretraining_tp": 1,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_scaling": None,
        "rope_theta": cfg.rope_theta,
        "tie_word_embeddings": False,
        "torch_dtype": "float16",
        "transformers_version": "4.28.1",
        "use_cache": True,
        "vocab_size": cfg.vocab_size,
    }
    if cfg.qkv_bias:
        out.update(qkv_bias=True, bias=False)
    return out


def _write_folder(folder: Path, config: dict, state: dict, fmt: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    if fmt == "bin":
        torch.save(state, folder / "pytorch_model.bin")
    else:
        safetensors.torch.save_file(
            {k: v.contiguous() for k, v in state.items()}, folder / "model.safetensors"
        )
    return folder


def _ref(kind: str, *, kv: int = 2, bias: bool = False, seed: int = 0):
    cfg = RefConfig(num_key_value_heads=kv, qkv_bias=bias, rope_theta=500_000.0)
    return cfg, make_ref_draft(kind, cfg, seed=seed)


def _outputs_match(ref, dcfg, params, embedding) -> None:
    """Our forward with the loaded params equals the reference's (f32, 1e-5)."""
    rng = np.random.default_rng(0)
    b, t = 2, 8
    feats = rng.normal(size=(b, t, dcfg.d_model)).astype(np.float32)
    ids = rng.integers(0, dcfg.vocab_size, size=(b, t))
    with torch.no_grad():
        want = ref(torch.from_numpy(feats), torch.from_numpy(ids))
    write_idx = jnp.zeros((b,), jnp.int32)
    got = draft_forward(
        params,
        jnp.asarray(embedding),
        jnp.asarray(feats),
        jnp.asarray(ids, jnp.int32),
        jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t)),
        draft.init_draft_cache(dcfg, b, t),
        write_idx=write_idx,
        mask=causal_mask(write_idx, t, t),
        dcfg=dcfg,
    )
    for a, w in zip(got[:2], want[:2], strict=True):
        np.testing.assert_allclose(np.asarray(a), w.numpy(), atol=1e-5, rtol=1e-5)


def _flat(params) -> dict:
    return traverse_util.flatten_dict(jax.tree_util.tree_map(np.asarray, params), sep="/")


def _assert_same_params(a, b) -> None:
    fa, fb = _flat(a), _flat(b)
    assert fa.keys() == fb.keys()
    for key in fa:
        assert fa[key].dtype == fb[key].dtype, key
        np.testing.assert_array_equal(fa[key], fb[key], err_msg=key)


@pytest.mark.parametrize("prefix", ["", "module."])
@pytest.mark.parametrize("fmt", ["bin", "safetensors"])
@pytest.mark.parametrize("kind,bias", [("griffin", False), ("griffin", True), ("eagle2", True)])
def test_load_reference_checkpoint(tmp_path, kind, bias, fmt, prefix):
    cfg, ref = _ref(kind, bias=bias)
    state = {prefix + k: v for k, v in ref.state_dict().items()}
    folder = _write_folder(tmp_path / "draft", _published_config(cfg), state, fmt)
    embedding = ref.embed_tokens.weight.detach().numpy()
    dcfg, params = load_draft(folder, BASE, base_embedding=embedding)
    assert (dcfg.kind, dcfg.qkv_bias, dcfg.n_kv_heads, dcfg.d_ff) == (kind, bias, 2, 96)
    assert dcfg.rope.theta == 500_000.0
    _outputs_match(ref, dcfg, params, embedding)


def test_load_transformers5_layout_config(tmp_path):
    cfg, ref = _ref("griffin")
    hf = _published_config(cfg)
    for key in ("rope_theta", "rope_scaling", "torch_dtype", "transformers_version"):
        del hf[key]
    hf.update(
        rope_parameters={"rope_theta": cfg.rope_theta, "rope_type": "default"},
        dtype="float32",
        transformers_version="5.0.0",
        head_dim=cfg.head_dim,
        attention_bias=False,
        mlp_bias=False,
    )
    folder = _write_folder(tmp_path / "draft", hf, ref.state_dict(), "safetensors")
    dcfg, params = load_draft(folder, BASE)
    assert dcfg.rope.theta == cfg.rope_theta
    _outputs_match(ref, dcfg, params, ref.embed_tokens.weight.detach().numpy())


@pytest.mark.parametrize("bias", [False, True])
def test_qkv_bias_follows_the_checkpoint_keys(tmp_path, bias):
    cfg, ref = _ref("griffin", bias=bias)
    hf = _published_config(cfg)
    hf["qkv_bias"] = not bias  # the config disagrees with the keys: the keys win
    folder = _write_folder(tmp_path / "draft", hf, ref.state_dict(), "safetensors")
    dcfg, params = load_draft(folder, BASE)
    assert dcfg.qkv_bias is bias
    assert ("bias" in params["layers_0"]["self_attn"]["q_proj"]) is bias


def _bad_folder(tmp_path, edit, *, config_edit=None):
    cfg, ref = _ref("griffin")
    state = dict(ref.state_dict())
    edit(state)
    hf = _published_config(cfg)
    if config_edit:
        config_edit(hf)
    return _write_folder(tmp_path / "bad", hf, state, "safetensors")


def _drop(key):
    def edit(state):
        del state[key]

    return edit


def _reshape(key, shape):
    def edit(state):
        state[key] = torch.zeros(shape)

    return edit


def _add(key, shape):
    def edit(state):
        state[key] = torch.zeros(shape)

    return edit


@pytest.mark.parametrize(
    "edit,message",
    [
        (_drop("layers.0.mlp.up_proj.weight"), r"missing keys 'layers\.0\.mlp\.up_proj\.weight'"),
        (_drop("embed_tokens.weight"), r"missing key 'embed_tokens\.weight'"),
        (
            _reshape("fc.fc.bias", (63,)),
            r"'fc\.fc\.bias' has shape \(63,\), expected \(64,\)",
        ),
        (
            _reshape("layers.0.mlp.down_proj.weight", (64, 96)),
            r"'layers\.0\.mlp\.down_proj\.weight' has shape \(64, 96\), expected \(128, 96\)",
        ),
        (
            _reshape("embed_tokens.weight", (100, 64)),
            r"'embed_tokens\.weight' has shape \(100, 64\), expected \(128, 64\)",
        ),
        (
            _add("layers.0.input_layernorm.weight", (64,)),
            r"unexpected key 'layers\.0\.input_layernorm\.weight'",
        ),
        (_add("fc.weight", (64, 128)), r"found both"),
        (_drop("fc.fc.weight"), r"found none"),
        (_drop("layers.0.self_attn.k_proj.weight"), r"'layers\.0\.self_attn\.k_proj\.weight'"),
    ],
)
def test_bad_checkpoint_names_the_key(tmp_path, edit, message):
    folder = _bad_folder(tmp_path, edit)
    with pytest.raises(CheckpointError, match=message):
        load_draft(folder, BASE)


def test_partial_qkv_bias_is_missing_keys(tmp_path):
    def edit(state):
        state["layers.0.self_attn.q_proj.bias"] = torch.zeros(64)

    with pytest.raises(CheckpointError, match=r"'layers\.0\.self_attn\.k_proj\.bias'"):
        load_draft(_bad_folder(tmp_path, edit), BASE)


def test_draft_for_another_base_is_refused(tmp_path):
    cfg, ref = _ref("griffin")
    folder = _write_folder(tmp_path / "d", _published_config(cfg), ref.state_dict(), "safetensors")
    wide = dataclasses.replace(BASE, d_model=32, head_dim=8)
    with pytest.raises(
        CheckpointError, match=r"hidden_size 64 does not match the base hidden_size 32"
    ):
        load_draft(folder, wide)
    big_vocab = dataclasses.replace(BASE, vocab_size=256)
    with pytest.raises(
        CheckpointError, match=r"vocab_size 128 does not match the base vocab_size 256"
    ):
        load_draft(folder, big_vocab)
    other = np.asarray(ref.embed_tokens.weight.detach()) + 0.5
    with pytest.raises(CheckpointError, match="differs from the base embedding"):
        load_draft(folder, BASE, base_embedding=other)


def test_bin_without_torch_names_the_extra(tmp_path, monkeypatch):
    cfg, ref = _ref("eagle2")
    folder = _write_folder(tmp_path / "d", _published_config(cfg), ref.state_dict(), "bin")
    dcfg, params = load_draft(folder, BASE)
    embedding = ref.embed_tokens.weight.detach().numpy()
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(ImportError, match=r"griffin-jax\[torch\]"):
        load_draft(folder, BASE)
    with pytest.raises(ImportError, match=r"griffin-jax\[torch\]"):
        export_draft(params, embedding, dcfg, tmp_path / "out", formats=("bin",))


@pytest.mark.parametrize("kind,bias", [("griffin", True), ("eagle2", False)])
def test_import_export_import_is_exact(tmp_path, kind, bias):
    cfg, ref = _ref(kind, bias=bias)
    src = _write_folder(tmp_path / "src", _published_config(cfg), ref.state_dict(), "bin")
    embedding = ref.embed_tokens.weight.detach().numpy()
    dcfg, params = load_draft(src, BASE)
    out = export_draft(
        params, embedding, dcfg, tmp_path / "out", base_cfg=BASE, formats=("safetensors", "bin")
    )
    dcfg2, params2 = load_draft(out, BASE, base_embedding=embedding)  # reads the safetensors
    assert dcfg2 == dcfg
    _assert_same_params(params, params2)
    (out / "model.safetensors").unlink()
    _, params3 = load_draft(out, BASE)  # now the .bin
    _assert_same_params(params, params3)
    # The exported embedding is the base embedding, bit for bit.
    exported = torch.load(out / "pytorch_model.bin", weights_only=True)
    np.testing.assert_array_equal(exported["embed_tokens.weight"].numpy(), embedding)
    hf = json.loads((out / "config.json").read_text())
    assert (hf["num_hidden_layers"], hf["bos_token_id"], hf["torch_dtype"]) == (1, None, "float32")


def test_bf16_export_round_trips_exactly(tmp_path):
    cfg, ref = _ref("griffin", bias=True)
    src = _write_folder(tmp_path / "src", _published_config(cfg), ref.state_dict(), "safetensors")
    embedding = ref.embed_tokens.weight.detach().numpy()
    dcfg, params = load_draft(src, BASE)
    a = export_draft(
        params, embedding, dcfg, tmp_path / "a", dtype="bf16", formats=("safetensors", "bin")
    )
    dcfg_a, params_a = load_draft(a, BASE)
    cast = jax.tree_util.tree_map(lambda x: np.asarray(x).astype(ml_dtypes.bfloat16), params)
    _assert_same_params(params_a, cast)
    assert json.loads((a / "config.json").read_text())["torch_dtype"] == "bfloat16"
    b = export_draft(params_a, embedding, dcfg_a, tmp_path / "b", formats=("safetensors",))
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    bin_state = torch.load(a / "pytorch_model.bin", weights_only=True)
    assert all(v.dtype == torch.bfloat16 for v in bin_state.values())


@pytest.mark.parametrize("fmt", ["bin", "safetensors"])
@pytest.mark.parametrize("kind,bias", [("griffin", True), ("eagle2", False)])
def test_export_loads_strictly_into_the_reference(tmp_path, kind, bias, fmt):
    cfg, ref = _ref(kind, bias=bias)
    embedding = ref.embed_tokens.weight.detach().numpy()
    state = {k: v.detach().numpy() for k, v in ref.state_dict().items()}
    dcfg = draft.DraftConfig.from_hf(_published_config(cfg), kind=kind)
    params = draft_params_from_state(state, dcfg)
    out = export_draft(params, embedding, dcfg, tmp_path / "out", formats=(fmt,))
    if fmt == "bin":
        exported = torch.load(out / "pytorch_model.bin", weights_only=True)
    else:
        exported = safetensors.torch.load_file(out / "model.safetensors")
    fresh = make_ref_draft(kind, cfg, seed=1)
    fresh.load_state_dict(exported, strict=True)
    for key, value in ref.state_dict().items():
        torch.testing.assert_close(fresh.state_dict()[key], value, rtol=0, atol=0)


# ---------------------------------------------------------------- untrusted files


class _RunsCode:
    """Unpickling this runs a shell command (torch.load(weights_only=True) must refuse it)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_invalid_config_json_names_the_file(tmp_path):
    cfg, ref = _ref("griffin")
    folder = _write_folder(tmp_path / "d", _published_config(cfg), ref.state_dict(), "safetensors")
    (folder / "config.json").write_text('{"hidden_size": 64\n "vocab_size": 128}')
    with pytest.raises(CheckpointError, match=r"invalid JSON \(.*line 2 column 2") as err:
        load_draft(folder, BASE)
    assert str(folder / "config.json") in str(err.value)


def test_code_running_bin_is_refused(tmp_path):
    cfg, _ = _ref("griffin")
    marker = tmp_path / "ran"
    state = {"fc.fc.weight": _RunsCode(marker)}
    folder = _write_folder(tmp_path / "d", _published_config(cfg), state, "bin")
    with pytest.raises(CheckpointError, match="refused by torch.load") as err:
        load_draft(folder, BASE)
    assert str(folder / "pytorch_model.bin") in str(err.value) and "\n" not in str(err.value)
    assert not marker.exists()


def test_truncated_safetensors_names_the_file_and_the_tensor(tmp_path):
    cfg, ref = _ref("eagle2")
    folder = _write_folder(tmp_path / "d", _published_config(cfg), ref.state_dict(), "safetensors")
    path = folder / "model.safetensors"
    with safetensors.safe_open(path, "np") as f:
        last = f.offset_keys()[-1]
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match="truncated") as err:
        load_draft(folder, BASE)
    assert str(path) in str(err.value) and repr(last) in str(err.value)
