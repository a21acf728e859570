"""Sharding: mesh parsing, the rule table and its fallbacks, sharded loading, sharded decoding.

The multi-device checks run once, in a subprocess started with
`XLA_FLAGS=--xla_force_host_platform_device_count=8` (pytest's process already imported JAX
with one CPU device), and write their measurements to a JSON file; each test below asserts on
one part of it. Running this file as a script performs those checks (`_device_checks`).
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from griffin_jax import sharding
from griffin_jax.config import TreeConfig

TREE = TreeConfig(top_k=3, depth=3, total_tokens=10)
PROMPTS = [[5, 6, 7, 8, 9], [10, 11, 12]]
NEW_TOKENS = 12

# name -> (base config overrides, draft overrides, mesh, pair, loop)
PARITY_CASES = {
    # MHA, everything divisible by model=8 (heads, kv heads, d_ff 96, vocab 128).
    "llama_mha_model8": (
        dict(family="llama", n_heads=8, n_kv_heads=8, head_dim=8),
        dict(n_heads=8, n_kv_heads=8, head_dim=8),
        "data=1,model=8",
        "random",
        "device",
    ),
    # Mixtral with 4 heads and 2 kv heads (< model=8: attention and KV cache replicated along
    # model) and 8 experts over model; the sharded run uses the unrolled decode layout
    # (per-layer params and KV buffers), the unsharded reference the stacked one.
    "mixtral_heads4_model8": (
        dict(family="mixtral", n_heads=4, n_kv_heads=2, n_experts=8),
        dict(),
        "data=1,model=8",
        "random",
        "device",
    ),
    # GQA: batch over data=2, 2 kv heads < model=4 (k/v and the KV cache replicated along
    # model), through the host loop (jitted, donated rounds).
    "llama_gqa_data2_model4_host": (
        dict(family="llama", n_heads=8, n_kv_heads=2, head_dim=8),
        dict(n_heads=8, n_kv_heads=2, head_dim=8),
        "data=2,model=4",
        "aligned",
        "host",
    ),
}


# ----------------------------------------------------------------------------- in-process


@pytest.mark.parametrize(
    "text,want",
    [
        ("data=1,model=8", {"data": 1, "model": 8}),
        ("model=4", {"model": 4}),
        (" expert=2 , model=4 ", {"expert": 2, "model": 4}),
    ],
)
def test_parse_mesh(text, want):
    got = sharding.parse_mesh(text)
    assert got == want and list(got) == list(want)


@pytest.mark.parametrize(
    "text,match",
    [
        ("", "empty"),
        ("model", "AXIS=SIZE"),
        ("tensor=8", "unknown mesh axis"),
        ("model=2,model=4", "twice"),
        ("model=x", "not an integer"),
        ("model=0", ">= 1"),
    ],
)
def test_parse_mesh_errors(text, match):
    with pytest.raises(ValueError, match=match):
        sharding.parse_mesh(text)


def test_make_mesh_uses_fewer_devices_and_refuses_too_many():
    mesh = sharding.make_mesh("data=1,model=1")
    assert mesh.devices.shape == (1, 1) and mesh.axis_names == ("data", "model")
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
    with pytest.raises(ValueError, match="needs 2 devices"):
        sharding.make_mesh("model=2", devices=jax.devices()[:1])


def _abstract(family="llama", **overrides):
    from spec_models import base_config

    from griffin_jax.model import abstract_params

    cfg = base_config(family, **overrides)
    return cfg, abstract_params(cfg)


def test_rules_shard_heads_ff_vocab_experts():
    mesh = sharding.abstract_mesh("data=1,model=8")
    cfg, params = _abstract("mixtral", n_heads=8, n_kv_heads=8, head_dim=8, n_experts=8)
    plan = sharding.plan_params(params, mesh, head_dim=cfg.head_dim)
    want = {
        "embed_tokens/embedding": P("model", None),
        "lm_head/kernel": P(None, "model"),
        "layers/self_attn/q_proj/kernel": P(None, None, "model"),
        "layers/self_attn/k_proj/kernel": P(None, None, "model"),
        "layers/self_attn/o_proj/kernel": P(None, "model", None),
        "layers/block_sparse_moe/gate/kernel": P(None, None, None),
        # experts over model, so F stays whole (model is taken)
        "layers/block_sparse_moe/w1": P(None, "model", None, None),
        "layers/block_sparse_moe/w2": P(None, "model", None, None),
        "layers/input_layernorm/weight": P(None, None),
        "norm/weight": P(None),
    }
    for path, spec in want.items():
        assert plan[path] == (spec, []), path
    # An `expert` axis takes the experts and leaves F to `model`.
    mesh = sharding.abstract_mesh("expert=2,model=4")
    plan = sharding.plan_params(params, mesh, head_dim=cfg.head_dim)
    assert plan["layers/block_sparse_moe/w1"][0] == P(None, "expert", None, "model")
    assert plan["layers/block_sparse_moe/w2"][0] == P(None, "expert", "model", None)


def test_rules_fall_back_to_replication_when_not_divisible():
    mesh = sharding.abstract_mesh("data=1,model=8")
    # 4 heads and 2 kv heads on model=8; d_ff 96 and vocab 128 still divide.
    cfg, params = _abstract("llama", n_heads=4, n_kv_heads=2, head_dim=16)
    plan = sharding.plan_params(params, mesh, head_dim=cfg.head_dim)
    spec, notes = plan["layers/self_attn/q_proj/kernel"]
    assert spec == P(None, None, None) and "4 units" in notes[0] and "model=8" in notes[0]
    spec, notes = plan["layers/self_attn/k_proj/kernel"]
    # K*H = 32 divides by 8 as elements, but heads are never split: replicated.
    assert spec == P(None, None, None) and "2 units" in notes[0]
    assert plan["layers/mlp/gate_proj/kernel"] == (P(None, None, "model"), [])
    # Elements that do not divide (d_ff 100 on model=8).
    cfg, params = _abstract("llama", d_ff=100)
    spec, notes = sharding.plan_params(params, mesh, head_dim=cfg.head_dim)[
        "layers/mlp/down_proj/kernel"
    ]
    assert spec == P(None, None, None) and "100 units" in notes[0]


def test_kv_cache_spec_replicates_kv_heads_below_model_axis():
    mesh = sharding.abstract_mesh("data=2,model=4")
    assert sharding.kv_spec((2, 4, 64, 8, 16), mesh) == P(None, "data", None, "model", None)
    assert sharding.kv_spec((2, 4, 64, 2, 16), mesh) == P(None, "data", None, None, None)
    assert sharding.kv_spec((3, 64, 4, 16), mesh) == P(None, None, "model", None)  # B=3 odd


def test_every_param_of_every_family_and_draft_has_a_rule():
    from spec_models import base_config, draft_config

    from griffin_jax.draft import abstract_draft_params
    from griffin_jax.model import abstract_params

    mesh = sharding.abstract_mesh("data=1,model=8")
    for family in ("llama", "qwen2", "mixtral"):
        cfg = base_config(family)
        sharding.plan_params(abstract_params(cfg), mesh, head_dim=cfg.head_dim)
        for kind in ("griffin", "eagle2", "eagle3"):
            dcfg = draft_config(cfg, kind)
            plan = sharding.plan_params(abstract_draft_params(dcfg), mesh, head_dim=dcfg.head_dim)
            layer = "midlayer" if kind == "eagle3" else "layers_0"
            assert plan[f"{layer}/mlp/down_proj/kernel"][0] == P("model", None)
        assert plan["d2t"][0] == P(None) and plan["lm_head/kernel"][0] == P(None, "model")
    with pytest.raises(KeyError, match="no sharding rule"):
        sharding.spec_for("layers/new_thing/kernel", (2, 3), mesh, head_dim=1)


def test_sharded_safetensors_loader_matches_and_is_strict(tmp_path):
    from spec_models import base_config

    from convert.export_hf import export_hf, write_safetensors
    from convert.hf_keys import CheckpointError, export_state, table_for
    from convert.load_hf import load_hf_params, load_hf_params_sharded
    from griffin_jax.model import abstract_params, init_params

    cfg = base_config("qwen2")
    params = init_params(cfg, jax.random.key(0))
    folder = export_hf(params, cfg, tmp_path / "hf")
    mesh = sharding.make_mesh("model=1")
    shardings = sharding.param_shardings(abstract_params(cfg), mesh, head_dim=cfg.head_dim)
    got = load_hf_params_sharded(folder, cfg, shardings)
    jax.tree.map(np.testing.assert_array_equal, got, load_hf_params(folder, cfg))
    # A missing tensor is named.
    tensors = [t for t in export_state(params, table_for(cfg)) if "layers.1.mlp.up" not in t.key]
    write_safetensors(folder / "model.safetensors", tensors, np.float32)
    with pytest.raises(CheckpointError, match="missing keys.*layers.1.mlp.up_proj"):
        load_hf_params_sharded(folder, cfg, shardings)


def test_cli_rejects_a_bad_mesh(capsys):
    from griffin_jax.cli import run
    from inference.generate import main

    assert run(main, ["--vanilla", "--prompt", "hi", "--mesh", "model=x"]) == 2
    assert "not an integer" in capsys.readouterr().err


def test_memory_plan_real_configs(capsys):
    from inference import memory_plan

    one = memory_plan.plan("Llama-3-70B", devices=1, batch=1, context=4096, dtype=jnp.bfloat16)
    eight = memory_plan.plan("Llama-3-70B", devices=8, batch=1, context=4096, dtype=jnp.bfloat16)
    assert 70.5e9 < one["n_params"] < 70.6e9 and 1.92e9 < one["n_draft_params"] < 1.94e9
    assert one["params"] == 2 * one["n_params"]
    # Only the norms stay whole: 1/8 per device to 0.1%; 8 kv heads split over 8 exactly.
    assert eight["params"] == pytest.approx(one["params"] / 8, rel=1e-3)
    assert eight["kv_cache"] * 8 == one["kv_cache"] and not eight["fallbacks"]
    # [L, B, S, K, H] x (k, v) x bf16 with S = 4096 + 60 + 7 rounded up to 128.
    assert one["kv_cache"] == 2 * 80 * 4224 * 8 * 128 * 2
    mixtral = memory_plan.plan("Mixtral-8x7B", devices=8, batch=1, context=4096, dtype=jnp.float32)
    assert 46.6e9 < mixtral["n_params"] < 46.8e9
    assert memory_plan.main(["--markdown", "--devices", "1,8"]) == 0
    table = capsys.readouterr().out
    assert "| Llama-3-70B | data=1,model=1 | 131.4 GiB |" in table and table.count("| no |") == 2


# ----------------------------------------------------------------------------- 8 devices


@pytest.fixture(scope="module")
def device_results(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("sharding") / "results.json"
    flags = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    env = dict(os.environ, XLA_FLAGS=flags.strip())
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run(
        [sys.executable, __file__, str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("case", list(PARITY_CASES))
def test_sharded_greedy_equals_unsharded(device_results, case):
    r = device_results["parity"][case]
    assert r["sharded"] == r["unsharded"]
    assert all(len(row) == NEW_TOKENS for row in r["sharded"])


def test_sharded_caches_have_the_expected_specs(device_results):
    specs = {case: r["cache_spec"] for case, r in device_results["parity"].items()}
    # [L, B, S, K, H]: K over model when it divides, else replicated; B over data.
    assert specs["llama_mha_model8"] == [None, None, None, "model", None]
    assert specs["llama_gqa_data2_model4_host"] == [None, "data", None, None, None]
    # Mixtral: 2 kv heads on model=8 -> replicated (its experts are still sharded); one
    # layer's buffer [B, S, K, H] of the unrolled layout.
    assert specs["mixtral_heads4_model8"] == [None, None, None, None]
    draft = {case: r["draft_cache_spec"] for case, r in device_results["parity"].items()}
    assert draft["llama_mha_model8"] == [None, None, "model", None]  # [B, S, K, H]


def test_sharded_engine_compiles_once(device_results):
    for case, r in device_results["parity"].items():
        # Two programs per generate, either loop: prefill, and the segment of rounds (the host
        # loop runs it one round at a time); a second call with the same inputs compiles
        # nothing.
        if r["loop"] == "host":
            assert r["rounds"] > 2
        assert r["compiles"] == {"prefill": 1, "run_segment": 1}, case
        assert r["extra_compiles"] == 0, case


@pytest.mark.parametrize("which", ["llama_mha", "mixtral_e8", "mixtral_expert_axis", "draft"])
def test_per_device_param_bytes_are_an_eighth(device_results, which):
    r = device_results["bytes"][which]
    # Every sharded leaf: exactly 1/8 on every device.
    assert r["sharded_leaf_ratios"] and all(x == 0.125 for x in r["sharded_leaf_ratios"])
    # The whole tree: 1/8 plus the small replicated leaves (norms, router, biases).
    assert 0.125 <= r["max_device_fraction"] < 0.14


@pytest.mark.parametrize("source", ["safetensors_llama", "safetensors_mixtral_bf16", "orbax"])
def test_sharded_loading(device_results, source):
    r = device_results["loading"][source]
    assert r["leaves"] > 5
    assert r["shardings_match"] and r["values_equal"]
    # What a device holds is what the plan (and the memory plan) says: ~1/8, more where the
    # orbax case's 2 kv heads keep k/v replicated.
    assert r["max_device_fraction"] == pytest.approx(r["planned_fraction"], rel=1e-6)
    assert r["max_device_fraction"] < (0.2 if source == "orbax" else 0.14)


def test_from_pretrained_with_a_4_of_8_mesh_loads_sharded_and_decodes_like_one_device(
    device_results,
):
    r = device_results["api"]
    assert r["q_proj_spec"] == [None, "model"] and r["q_proj_devices"] == 4
    assert r["sharded"] == r["unsharded"]


def test_tensor_parallel_engine_serves_what_one_device_decodes(device_results):
    """The serving engine over `data=1,model=4` with an EAGLE-3 draft: staggered greedy and
    seeded sampled requests
    give the ids of plain decoding of each request alone on one device, multi-token rounds
    happen, the KV cache spans 4 devices; a data axis > 1 is refused."""
    r = device_results["engine"]
    assert r["ids"] == r["alone"]
    assert all(len(ids) == 12 for ids in r["ids"])
    assert r["accepted"] > 0 and r["kv_devices"] == 4
    assert "data=1" in r["data_axis_error"]


def test_server_mesh_flag_shards_the_engine(device_results):
    r = device_results["serve"]
    assert r["ids"] == r["alone"] and all(len(ids) == 12 for ids in r["ids"])
    assert r["q_proj_devices"] == 2
    assert "--mesh data=2,model=2" in r["data_axis_error"] and "data=1" in r["data_axis_error"]


# ----------------------------------------------------------------------------- subprocess


def _tree_specs_match(tree, shardings) -> bool:
    return all(
        a.sharding.is_equivalent_to(s, a.ndim)
        for a, s in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings), strict=True)
    )


def _bytes_report(tree, mesh, head_dim) -> dict:
    ratios = []
    plan = sharding.plan_params(tree, mesh, head_dim=head_dim)
    for (spec, _), leaf in zip(plan.values(), jax.tree.leaves(tree), strict=True):
        if any(a is not None for a in spec):
            per_dev = {s.device: s.data.nbytes for s in leaf.addressable_shards}
            ratios.append(max(per_dev.values()) / leaf.nbytes)
            assert min(per_dev.values()) == max(per_dev.values())
    total = sum(leaf.nbytes for leaf in jax.tree.leaves(tree))
    return {
        "sharded_leaf_ratios": ratios,
        "max_device_fraction": max(sharding.device_bytes(tree).values()) / total,
    }


ENGINE_JITS = ("prefill", "run_segment")


def _parity(case: str) -> dict:
    from compile_log import compiles
    from spec_models import aligned_pair, base_config, draft_config, random_pair

    from griffin_jax import speculative, vanilla
    from griffin_jax.model import unstack_layers

    base_kw, draft_kw, mesh_text, pair, loop = PARITY_CASES[case]
    cfg = base_config(**base_kw)
    dcfg = draft_config(cfg, **draft_kw)
    base, draft = (
        aligned_pair(cfg, dcfg, noise=0.3) if pair == "aligned" else random_pair(cfg, dcfg)
    )
    mesh = sharding.make_mesh(mesh_text)
    kw = dict(tree_cfg=TREE, max_new_tokens=NEW_TOKENS, eos_ids=[-1], loop=loop)
    # The reference: plain greedy decoding on one device (what unsharded speculative decoding
    # equals, tests/test_speculative.py), a smaller program to compile than the engine's.
    unsharded = vanilla.generate(base, cfg, PROMPTS, max_new_tokens=NEW_TOKENS, eos_ids=[-1])
    if cfg.family == "mixtral":
        base = unstack_layers(base)
    with compiles() as compiled:
        out = speculative.generate(base, cfg, draft, dcfg, PROMPTS, mesh=mesh, **kw)
    report = {
        "unsharded": unsharded.output_ids,
        "sharded": out.output_ids,
        "loop": loop,
        "rounds": max(out.rounds),
        "compiles": {n: compiled.count(n) for n in ENGINE_JITS},
    }
    # The same call by hand, to read the state's shardings (a compile-cache hit).
    shapes = speculative.plan_shapes([len(p) for p in PROMPTS], NEW_TOKENS, TREE)
    tokens, lengths = vanilla.pad_prompts(PROMPTS, [shapes.prompt_bucket])
    knobs = speculative.make_knobs(vanilla.SamplingKnobs(), max_new_tokens=NEW_TOKENS, eos_ids=[-1])
    seeds = jnp.asarray(vanilla.row_seeds(0, len(PROMPTS)))
    budget = speculative.prepare_budget(TREE, vocab_size=cfg.vocab_size)
    budget = budget.replace(finish=len(PROMPTS) > 1)  # as generate has it
    tokens, lengths, (knobs, seeds, budget) = sharding.place_inputs(
        jnp.asarray(tokens), jnp.asarray(lengths), (knobs, seeds, budget), mesh
    )
    base = sharding.shard_params(base, mesh, head_dim=cfg.head_dim)
    draft = sharding.shard_params(draft, mesh, head_dim=dcfg.head_dim)
    static = dict(cfg=cfg, dcfg=dcfg, greedy=True, shapes=shapes, mesh=mesh)
    with compiles() as compiled:  # as generate
        state = speculative.prefill(
            base, draft, tokens, lengths, knobs, seeds, budget, None, **static
        )
    report["extra_compiles"] = sum(compiled.count(n) for n in ENGINE_JITS)
    k = state.cache.k[0] if state.cache.per_layer else state.cache.k
    report["cache_spec"] = list(k.sharding.spec) + [None] * (k.ndim - len(k.sharding.spec))
    dspec = state.draft_cache.k.sharding.spec
    report["draft_cache_spec"] = list(dspec) + [None] * (4 - len(dspec))
    return report


def _bytes_checks() -> dict:
    from spec_models import base_config, draft_config, random_pair

    out = {}
    wide = dict(n_heads=8, n_kv_heads=8, head_dim=8)  # everything divides by 8
    mesh = sharding.make_mesh("data=1,model=8")
    for name, family in (("llama_mha", "llama"), ("mixtral_e8", "mixtral")):
        cfg = base_config(family, n_experts=8 if family == "mixtral" else 0, **wide)
        base, draft = random_pair(cfg, draft_config(cfg, **wide))
        out[name] = _bytes_report(sharding.shard_params(base, mesh, head_dim=8), mesh, 8)
        if family == "llama":
            out["draft"] = _bytes_report(sharding.shard_params(draft, mesh, head_dim=8), mesh, 8)
    # expert=2 x model=4: the expert weights split 8 ways (E over expert, F over model).
    experts = {k: v for k, v in base["layers"]["block_sparse_moe"].items() if k != "gate"}
    m = sharding.make_mesh("expert=2,model=4")
    tree = {"layers": {"block_sparse_moe": experts}}
    out["mixtral_expert_axis"] = _bytes_report(sharding.shard_params(tree, m, head_dim=8), m, 8)
    return out


def _loading_checks(tmp: Path) -> dict:
    from spec_models import base_config

    from convert.convert_checkpoint import save_converted
    from convert.export_hf import export_hf
    from convert.load_hf import load_hf_params_sharded
    from griffin_jax.model import abstract_params, init_params

    mesh = sharding.make_mesh("data=1,model=8")
    out = {}
    for name, kw, dtype in (
        ("safetensors_llama", dict(family="llama", n_heads=8, n_kv_heads=8, head_dim=8), None),
        (
            "safetensors_mixtral_bf16",
            dict(family="mixtral", n_heads=8, n_kv_heads=8, head_dim=8, n_experts=8),
            jnp.bfloat16,
        ),
        ("orbax", dict(family="llama", n_heads=8, n_kv_heads=2, head_dim=8), None),
    ):
        cfg = base_config(**kw)
        params = init_params(cfg, jax.random.key(1))
        want = jax.tree.map(functools.partial(jnp.asarray, dtype=dtype), params)
        abstract = abstract_params(cfg, dtype or jnp.float32)
        shardings = sharding.param_shardings(abstract, mesh, head_dim=cfg.head_dim)
        if name == "orbax":
            folder = save_converted(tmp / name, cfg, params)
            got = sharding.restore_params(folder / "params", abstract, mesh, head_dim=cfg.head_dim)
        else:
            folder = export_hf(params, cfg, tmp / name)
            got = load_hf_params_sharded(folder, cfg, shardings, dtype=dtype)
        equal = jax.tree.map(
            lambda a, b: bool(np.array_equal(np.asarray(a), np.asarray(b))), got, want
        )
        total = sum(x.nbytes for x in jax.tree.leaves(got))
        out[name] = {
            "leaves": len(jax.tree.leaves(got)),
            "shardings_match": _tree_specs_match(got, shardings),
            "values_equal": all(jax.tree.leaves(equal)),
            "max_device_fraction": max(sharding.device_bytes(got).values()) / total,
            "planned_fraction": sharding.per_device_nbytes(abstract, mesh, head_dim=cfg.head_dim)
            / total,
        }
    return out


def _api_checks(tmp: Path) -> dict:
    from spec_models import base_config

    from convert.export_hf import export_hf
    from griffin_jax.model import init_params
    from inference.api import SpeculativeModel

    cfg = base_config("llama", n_heads=8, n_kv_heads=8, head_dim=8)
    folder = export_hf(init_params(cfg, jax.random.key(2)), cfg, tmp / "api")
    kw = dict(with_draft=False, load_tokenizer=False)
    one = SpeculativeModel.from_pretrained(folder, **kw)
    many = SpeculativeModel.from_pretrained(folder, mesh="model=4", **kw)  # 4 of 8 devices
    gen = dict(max_new_tokens=NEW_TOKENS, eos_ids=[-1])
    q = many.base_params["layers"][0]["self_attn"]["q_proj"]["kernel"]  # unrolled layout
    return {
        "q_proj_spec": list(q.sharding.spec),
        "q_proj_devices": len(q.sharding.device_set),
        "sharded": many.vanilla_generate(PROMPTS, **gen).output_ids,
        "unsharded": one.vanilla_generate(PROMPTS, **gen).output_ids,
    }


def _engine_checks() -> dict:
    """Continuous batching over `model=4` with an EAGLE-3 draft (the server's checks below run
    a GRIFFIN one): staggered greedy and seeded sampled requests (aligned pair: multi-token
    rounds) against plain decoding of each request alone on one device (the engine's
    invariant), and the state's KV sharding."""
    from spec_models import aligned_pair, base_config, draft_config

    from griffin_jax import engine as engine_lib
    from griffin_jax import vanilla

    cfg = base_config("llama", n_heads=8, n_kv_heads=4, head_dim=8, n_layers=8)
    dcfg = draft_config(cfg, "eagle3", n_heads=8, n_kv_heads=8, head_dim=8)
    base, draft = aligned_pair(cfg, dcfg)
    requests = [
        engine_lib.Request(tuple(p), max_new_tokens=12, temperature=(0.0, 0.9)[i % 2],
                           top_p=0.9, seed=i, stop_ids=())
        for i, p in enumerate([*PROMPTS, [3, 4, 5, 6, 7, 8, 9]])
    ]  # fmt: skip
    mesh = sharding.make_mesh("data=1,model=4")
    eng = engine_lib.Engine(base, cfg, draft, dcfg, tree=TREE, max_batch=2, max_model_len=64,
                            mesh=mesh)  # fmt: skip
    got = [[] for _ in requests]
    accepted = [0]

    def sink(i, update):
        got[i].extend(update.tokens)
        if update.finish_reason is not None:
            accepted[0] += update.accepted

    for i, request in enumerate(requests):  # one arrival per step
        eng.submit(request, functools.partial(sink, i))
        eng.step()
    eng.run_until_idle()
    alone = [
        vanilla.generate(base, cfg, [list(r.prompt)], max_new_tokens=12, temperature=r.temperature,
                         top_p=r.top_p, seed=r.seed, eos_ids=[-1]).output_ids[0]
        for r in requests
    ]  # fmt: skip
    k = eng._state.cache.k[0] if eng._state.cache.per_layer else eng._state.cache.k
    out = {"ids": got, "alone": alone, "accepted": accepted[0],
           "kv_devices": len(k.sharding.device_set)}  # fmt: skip
    try:
        mesh = sharding.make_mesh("data=2,model=2")
        engine_lib.Engine(base, cfg, draft, dcfg, tree=TREE, max_batch=4, mesh=mesh)
    except ValueError as err:
        out["data_axis_error"] = str(err)
    return out


def _serve_checks(tmp: Path) -> dict:
    """`python -m inference.serve --mesh`: the server's engine built from the flags over
    `data=1,model=2`; greedy ids against plain decoding on one device; a data axis refused."""
    import shutil

    from spec_models import aligned_pair, base_config, draft_config

    from convert.export_draft import export_draft
    from convert.export_hf import export_hf
    from griffin_jax import engine as engine_lib
    from griffin_jax import vanilla
    from inference import serve
    from inference.api import DEFAULT_MODEL_DIR

    cfg = base_config("llama", vocab_size=8192, n_heads=8, n_kv_heads=2, head_dim=8)
    dcfg = draft_config(cfg, n_heads=8, n_kv_heads=8, head_dim=8)
    base, draft = aligned_pair(cfg, dcfg, noise=0.3)
    export_hf(base, cfg, tmp / "serve_base")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(DEFAULT_MODEL_DIR / "base" / name, tmp / "serve_base" / name)
    export_draft(draft, base["embed_tokens"]["embedding"], dcfg, tmp / "serve_draft", base_cfg=cfg)
    (tmp / "serve_draft" / "tree.json").write_text('{"total_tokens": 8, "depth": 3, "top_k": 2}')
    flags = ["--base", str(tmp / "serve_base"), "--draft", str(tmp / "serve_draft"),
             "--max-batch", "1", "--max-model-len", "64"]  # fmt: skip
    prompts = [(5, 6, 7, 8), (9, 10)]
    eng, _ = serve.build(serve.parse_args(flags + ["--mesh", "data=1,model=2"]))
    got = [[], []]
    for i, prompt in enumerate(prompts):
        request = engine_lib.Request(prompt, max_new_tokens=12, stop_ids=())
        eng.submit(request, lambda update, i=i, got=got: got[i].extend(update.tokens))
    eng.run_until_idle()
    q = eng.base_params["layers"][0]["self_attn"]["q_proj"]["kernel"]
    alone = vanilla.generate(base, cfg, [list(p) for p in prompts], max_new_tokens=12,
                             eos_ids=[-1]).output_ids  # fmt: skip
    out = {"ids": got, "alone": alone, "q_proj_devices": len(q.sharding.device_set)}
    try:
        serve.build(serve.parse_args(flags + ["--mesh", "data=2,model=2"]))
    except ValueError as err:
        out["data_axis_error"] = str(err)
    return out


def _device_checks(out_path: Path) -> None:
    jax.config.update("jax_default_matmul_precision", "highest")
    assert jax.device_count() == 8, jax.devices()
    tmp = out_path.parent
    results = {
        "parity": {case: _parity(case) for case in PARITY_CASES},
        "bytes": _bytes_checks(),
        "loading": _loading_checks(tmp),
        "api": _api_checks(tmp),
        "engine": _engine_checks(),
        "serve": _serve_checks(tmp),
    }
    out_path.write_text(json.dumps(results))


if __name__ == "__main__":
    _device_checks(Path(sys.argv[1]))
