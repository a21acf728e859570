"""Weight import/export (convert/): formats, dtypes, strictness, round trips."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import safetensors.torch
import torch
import transformers
from flax import traverse_util

from convert.convert_checkpoint import load_converted, main
from convert.export_hf import export_hf
from convert.hf_keys import CheckpointError
from convert.load_hf import load_hf
from griffin_jax import cli

TORCH_DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}
NP_DTYPES = {"f32": np.float32, "bf16": ml_dtypes.bfloat16, "f16": np.float16}


def _flat(params):
    return traverse_util.flatten_dict(params, sep="/")


def assert_trees_equal(a, b):
    fa, fb = _flat(a), _flat(b)
    assert sorted(fa) == sorted(fb)
    for path in fa:
        x, y = np.asarray(fa[path]), np.asarray(fb[path])
        assert x.dtype == y.dtype, path
        np.testing.assert_array_equal(x, y, err_msg=path)


def _np(t: torch.Tensor) -> np.ndarray:
    return t.float().numpy()


def _rewrite(folder, edit):
    """Applies `edit(dict of tensors)` to a folder's model.safetensors."""
    path = folder / "model.safetensors"
    tensors = safetensors.torch.load_file(path)
    edit(tensors)
    safetensors.torch.save_file(tensors, path, metadata={"format": "pt"})


# ---------------------------------------------------------------- formats and dtypes


@pytest.mark.parametrize("dtype", ["f32", "bf16", "f16"])
def test_safetensors_loads_exact_values_in_source_dtype(hf_checkpoint, dtype):
    folder, model = hf_checkpoint("mixtral")
    model.to(TORCH_DTYPES[dtype]).save_pretrained(folder)
    cfg, params = load_hf(folder)
    assert params["embed_tokens"]["embedding"].dtype == NP_DTYPES[dtype]
    files = safetensors.torch.load_file(folder / "model.safetensors")
    f32 = {k: v.float().numpy() for k, v in files.items()}
    got = {p: np.asarray(v, np.float32) for p, v in _flat(params).items()}
    np.testing.assert_array_equal(got["embed_tokens/embedding"], f32["model.embed_tokens.weight"])
    np.testing.assert_array_equal(got["norm/weight"], f32["model.norm.weight"])
    np.testing.assert_array_equal(got["lm_head/kernel"], f32["lm_head.weight"].T)
    np.testing.assert_array_equal(
        got["layers/self_attn/k_proj/kernel"][1], f32["model.layers.1.self_attn.k_proj.weight"].T
    )
    np.testing.assert_array_equal(
        got["layers/block_sparse_moe/w2"][1, 3],
        f32["model.layers.1.block_sparse_moe.experts.3.w2.weight"].T,
    )
    np.testing.assert_array_equal(
        got["layers/block_sparse_moe/gate/kernel"][0],
        f32["model.layers.0.block_sparse_moe.gate.weight"].T,
    )


def test_bf16_source_into_f32_target(hf_checkpoint):
    folder, model = hf_checkpoint("qwen2")
    model.to(torch.bfloat16).save_pretrained(folder)
    _, params = load_hf(folder, "f32")
    bias = params["layers"]["self_attn"]["q_proj"]["bias"]
    assert bias.dtype == np.float32
    np.testing.assert_array_equal(bias[0], _np(model.model.layers[0].self_attn.q_proj.bias.data))


def test_sharded_safetensors_with_index(hf_checkpoint, tmp_path):
    folder, model = hf_checkpoint("llama")
    sharded = tmp_path / "sharded"
    model.save_pretrained(sharded, max_shard_size="40KB")
    assert (sharded / "model.safetensors.index.json").exists()
    assert len(list(sharded.glob("model-*.safetensors"))) > 1
    assert_trees_equal(load_hf(sharded)[1], load_hf(folder)[1])


@pytest.mark.parametrize("shards", [1, 2])
def test_pytorch_model_bin(hf_checkpoint, tmp_path, shards):
    folder, _ = hf_checkpoint("mixtral")
    state = safetensors.torch.load_file(folder / "model.safetensors")  # per-expert keys
    binary = tmp_path / "bin"
    binary.mkdir()
    shutil.copy(folder / "config.json", binary / "config.json")
    if shards == 1:
        torch.save(state, binary / "pytorch_model.bin")
    else:
        keys = sorted(state)
        weight_map = {}
        for i, part in enumerate((keys[::2], keys[1::2])):
            name = f"pytorch_model-0000{i + 1}-of-00002.bin"
            torch.save({k: state[k] for k in part}, binary / name)
            weight_map.update(dict.fromkeys(part, name))
        (binary / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    assert_trees_equal(load_hf(binary)[1], load_hf(folder)[1])


def test_bin_without_torch_names_the_extra(hf_checkpoint, tmp_path, monkeypatch):
    folder, model = hf_checkpoint("llama")
    binary = tmp_path / "bin"
    binary.mkdir()
    shutil.copy(folder / "config.json", binary / "config.json")
    torch.save(model.state_dict(), binary / "pytorch_model.bin")
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError
    with pytest.raises(ImportError, match=r"griffin-jax\[torch\]"):
        load_hf(binary)


def test_no_weights_is_an_error(hf_checkpoint):
    folder, _ = hf_checkpoint("llama")
    (folder / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no weights found"):
        load_hf(folder)


# ---------------------------------------------------------------- strictness


def test_missing_key(hf_checkpoint):
    folder, _ = hf_checkpoint("llama")
    _rewrite(folder, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(
        CheckpointError, match=r"missing keys 'model\.layers\.1\.mlp\.up_proj\.weight'"
    ):
        load_hf(folder)


def test_missing_expert(hf_checkpoint):
    folder, _ = hf_checkpoint("mixtral")
    _rewrite(folder, lambda t: t.pop("model.layers.0.block_sparse_moe.experts.2.w3.weight"))
    with pytest.raises(
        CheckpointError, match=r"model\.layers\.0\.block_sparse_moe\.experts\.2\.w3"
    ):
        load_hf(folder)


@pytest.mark.parametrize(
    "key",
    [
        "model.layers.0.mlp.extra_proj.weight",
        "model.layers.2.input_layernorm.weight",  # layer index past n_layers
        "model.layers.0.self_attn.q_proj.bias",  # llama has no q/k/v bias
    ],
)
def test_unexpected_key(hf_checkpoint, key):
    folder, _ = hf_checkpoint("llama")

    def add(tensors):
        tensors[key] = torch.zeros(64)

    _rewrite(folder, add)
    with pytest.raises(CheckpointError, match="unexpected key '" + key.replace(".", r"\.")):
        load_hf(folder)


def test_wrong_shape_names_key_and_both_shapes(hf_checkpoint):
    folder, _ = hf_checkpoint("llama")

    def shrink(tensors):
        tensors["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(16, 64)

    _rewrite(folder, shrink)
    with pytest.raises(CheckpointError) as err:
        load_hf(folder)
    message = str(err.value)
    assert "model.layers.0.self_attn.k_proj.weight" in message
    assert "(16, 64)" in message and "(32, 64)" in message


def test_duplicate_key_across_shards(hf_checkpoint, tmp_path):
    _, model = hf_checkpoint("llama")
    sharded = tmp_path / "sharded"
    model.save_pretrained(sharded, max_shard_size="40KB")
    shards = sorted(sharded.glob("model-*.safetensors"))
    first = safetensors.torch.load_file(shards[0])
    second = safetensors.torch.load_file(shards[1])
    key = sorted(first)[0]
    second[key] = first[key]
    safetensors.torch.save_file(second, shards[1], metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="duplicate key '" + key.replace(".", r"\.")):
        load_hf(sharded)


def test_rope_buffer_is_skipped(hf_checkpoint):
    folder, _ = hf_checkpoint("llama")

    def add(tensors):
        tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)

    _rewrite(folder, add)
    load_hf(folder)


def test_tied_lm_head_must_equal_embedding(hf_checkpoint):
    folder, _ = hf_checkpoint("qwen2", tie_word_embeddings=True)

    def add_equal(tensors):
        tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()

    def perturb(tensors):
        tensors["lm_head.weight"] = tensors["lm_head.weight"] + 1e-3

    _rewrite(folder, add_equal)
    _, params = load_hf(folder)
    assert "lm_head" not in params
    _rewrite(folder, perturb)
    with pytest.raises(CheckpointError, match=r"'lm_head\.weight' differs"):
        load_hf(folder)


def test_untied_lm_head_missing(hf_checkpoint):
    folder, _ = hf_checkpoint("llama")
    _rewrite(folder, lambda t: t.pop("lm_head.weight"))
    with pytest.raises(CheckpointError, match=r"missing keys 'lm_head\.weight'"):
        load_hf(folder)


# ---------------------------------------------------------------- round trips


@pytest.mark.parametrize(
    ("family", "overrides"),
    [("llama", {}), ("qwen2", {"tie_word_embeddings": True}), ("mixtral", {})],
    ids=["llama", "qwen2_tied", "mixtral"],
)
def test_export_round_trip_exact(hf_checkpoint, tmp_path, family, overrides):
    folder, model = hf_checkpoint(family, **overrides)
    cfg, params = load_hf(folder)
    out = export_hf(params, cfg, tmp_path / "exported")
    # Same key set as transformers' own save_pretrained, and identical tensors back.
    written = safetensors.torch.load_file(out / "model.safetensors")
    original = safetensors.torch.load_file(folder / "model.safetensors")
    assert sorted(written) == sorted(original)
    for key, value in original.items():
        assert torch.equal(written[key], value), key
    cfg2, params2 = load_hf(out)
    assert cfg2 == cfg
    assert_trees_equal(params2, params)
    # transformers loads the export and computes the same logits.
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(
        out, attn_implementation="eager"
    ).eval()
    tokens = torch.randint(0, 128, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(tokens).logits, model(tokens).logits, atol=0, rtol=0)


def test_export_bf16_loads_in_transformers(hf_checkpoint, tmp_path):
    folder, _ = hf_checkpoint("llama")
    cfg, params = load_hf(folder)
    out = export_hf(params, cfg, tmp_path / "bf16", dtype="bf16")
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert reloaded.dtype == torch.bfloat16
    q = reloaded.model.layers[1].self_attn.q_proj.weight.detach()
    expected = np.asarray(params["layers"]["self_attn"]["q_proj"]["kernel"][1]).T
    np.testing.assert_array_equal(_np(q), expected.astype(ml_dtypes.bfloat16).astype(np.float32))
    _, params_bf16 = load_hf(out)
    assert params_bf16["norm"]["weight"].dtype == ml_dtypes.bfloat16


@pytest.mark.parametrize("dtype", [None, "bf16"])
def test_orbax_convert_round_trip(hf_checkpoint, tmp_path, dtype):
    folder, _ = hf_checkpoint("qwen2")
    converted = tmp_path / "converted"
    main(["--hf", str(folder), "--out", str(converted)] + (["--dtype", dtype] if dtype else []))
    cfg, params = load_converted(converted)
    ref_cfg, ref_params = load_hf(folder, dtype)
    assert cfg == ref_cfg
    assert_trees_equal(params, ref_params)
    back = tmp_path / "back"
    main(["--to-hf", str(converted), "--out", str(back)])
    cfg3, params3 = load_hf(back)
    assert cfg3 == ref_cfg
    assert_trees_equal(params3, ref_params)


# ---------------------------------------------------------------- untrusted files, the CLI


class _RunsCode:
    """Unpickling this runs a shell command (torch.load(weights_only=True) must refuse it)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _set_header_len(path, value):
    raw = path.read_bytes()
    path.write_bytes(struct.pack("<Q", value) + raw[8:])


def test_huge_safetensors_header_is_a_one_line_error(hf_checkpoint):
    folder, _ = hf_checkpoint("llama")
    path = folder / "model.safetensors"
    _set_header_len(path, 2**62)
    with pytest.raises(CheckpointError, match="header too large") as err:
        load_hf(folder)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_truncated_safetensors_names_the_file_and_the_tensor(hf_checkpoint):
    folder, _ = hf_checkpoint("llama")
    path = folder / "model.safetensors"
    with safetensors.safe_open(path, "np") as f:
        last = f.offset_keys()[-1]
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(CheckpointError) as err:
        load_hf(folder)
    assert str(path) in str(err.value) and repr(last) in str(err.value)


def test_code_running_bin_is_refused(hf_checkpoint, tmp_path):
    folder, _ = hf_checkpoint("llama")
    (folder / "model.safetensors").unlink()
    marker = tmp_path / "ran"
    torch.save({"model.norm.weight": _RunsCode(marker)}, folder / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="refused by torch.load") as err:
        load_hf(folder)
    assert str(folder / "pytorch_model.bin") in str(err.value) and "\n" not in str(err.value)
    assert not marker.exists()


@pytest.mark.parametrize(
    "name", ["config.json", "generation_config.json", "model.safetensors.index.json"]
)
def test_invalid_json_names_the_file_and_position(hf_checkpoint, name):
    folder, _ = hf_checkpoint("llama")
    (folder / name).write_text('{"vocab_size": 128,,}')
    with pytest.raises(CheckpointError, match=r"invalid JSON \(.*line 1 column 20") as err:
        load_hf(folder)
    assert str(folder / name) in str(err.value)


def _drop_key(folder):
    _rewrite(folder, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))


def _bad_shape(folder):
    _rewrite(folder, lambda t: t.update({"model.norm.weight": torch.zeros(3)}))


def _evil_bin(folder):
    (folder / "model.safetensors").unlink()
    torch.save({"x": _RunsCode(folder / "ran")}, folder / "pytorch_model.bin")


@pytest.mark.parametrize(
    "corrupt,out_name,force,message",
    [
        (_drop_key, "new", False, "missing keys 'model.layers.1.mlp.up_proj.weight'"),
        (_bad_shape, "new", False, "'model.norm.weight' has shape (3,)"),
        (_evil_bin, "new", False, "refused by torch.load"),
        (None, "existing", False, "already exists; pass --force"),
        (_drop_key, "existing", True, "missing keys"),  # --force: still untouched on error
        (None, "file/out", False, "File exists"),  # the parent is a file: unwritable
    ],
    ids=["missing_key", "bad_shape", "code_running_bin", "exists", "exists_force", "unwritable"],
)
def test_cli_errors_are_one_line_and_change_nothing(
    hf_checkpoint, tmp_path, capsys, corrupt, out_name, force, message
):
    folder, _ = hf_checkpoint("llama")
    if corrupt:
        corrupt(folder)
    work = tmp_path / "work"
    (work / "existing").mkdir(parents=True)
    (work / "existing" / "model.safetensors").write_bytes(b"bf16 weights")
    (work / "file").write_bytes(b"a file")
    before = sorted(str(p) for p in work.rglob("*"))
    capsys.readouterr()  # drop the fixture's progress bars
    argv = ["--hf", str(folder), "--out", str(work / out_name)] + (["--force"] if force else [])
    assert cli.run(main, argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    assert sorted(str(p) for p in work.rglob("*")) == before  # no output, no temporary folder
    assert (work / "existing" / "model.safetensors").read_bytes() == b"bf16 weights"
    assert not (folder / "ran").exists()


def test_cli_force_replaces_the_output(hf_checkpoint, tmp_path, capsys):
    folder, _ = hf_checkpoint("llama")
    out = tmp_path / "work" / "out"
    out.mkdir(parents=True)
    (out / "stale.txt").write_text("old")
    assert cli.run(main, ["--hf", str(folder), "--out", str(out), "--force"]) == 0
    assert not (out / "stale.txt").exists() and (out / "params").is_dir()
    assert [p.name for p in out.parent.iterdir()] == ["out"]  # no temporary folders left
    assert load_converted(out)[0] == load_hf(folder)[0]


def test_cli_module_exits_2_with_one_line(hf_checkpoint, tmp_path):
    folder, _ = hf_checkpoint("llama")
    _drop_key(folder)
    out = tmp_path / "out"
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "convert.convert_checkpoint",
            "--hf",
            str(folder),
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        cwd=Path(__file__).parent.parent,
    )
    assert run.returncode == 2, run.stderr
    assert run.stderr.count("\n") == 1 and "missing keys" in run.stderr, run.stderr
    assert not out.exists()


def test_cli_to_hf_corrupt_orbax_is_one_line(hf_checkpoint, tmp_path, capsys):
    folder, _ = hf_checkpoint("llama")
    converted = tmp_path / "converted"
    assert cli.run(main, ["--hf", str(folder), "--out", str(converted)]) == 0
    data = next((converted / "params" / "d").iterdir())
    data.write_bytes(data.read_bytes()[:100])
    capsys.readouterr()
    assert cli.run(main, ["--to-hf", str(converted), "--out", str(tmp_path / "back")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot restore the orbax checkpoint" in err, err
    assert str(converted / "params") in err and not (tmp_path / "back").exists()
