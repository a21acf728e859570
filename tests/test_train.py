"""training/train.py end to end on a tiny random base: both drafts learn, stage 2 warm-starts from
stage 1 (published export), a killed + resumed run equals an uninterrupted one, and 8 simulated
devices give the 1-device loss."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from griffin_jax import model as base_model
from griffin_jax.config import ModelConfig
from training import features, train

CFG = ModelConfig(
    vocab_size=64,
    d_model=32,
    n_layers=2,
    n_heads=4,
    n_kv_heads=2,
    head_dim=8,
    d_ff=64,
    max_position_embeddings=256,
)
SEQ, NUM_SEQS = 32, 72


def _sample_from_base(params, key: jax.Array) -> np.ndarray:
    """[NUM_SEQS, SEQ] tokens sampled from the base at temperature 0.5 (learnable data whose
    continuations often are the base's greedy ones, so acc@k is measured on many chains)."""
    # The feature generator's jitted forward at the shape it will use (one compile for both).
    sample = jax.jit(
        lambda p, h, k: jax.random.categorical(k, base_model.lm_head(p, h, cfg=CFG) / 0.5)
    )
    tokens = np.zeros((NUM_SEQS, SEQ), np.int32)
    tokens[:, 0] = np.random.default_rng(0).integers(0, CFG.vocab_size, NUM_SEQS)
    for t in range(1, SEQ):
        hidden = features._jit_base_features(params, jnp.asarray(tokens), cfg=CFG)
        tokens[:, t] = np.asarray(sample(params, hidden[:, t - 1], jax.random.fold_in(key, t)))
    return tokens


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> pathlib.Path:
    """A tiny base in HF layout (`base/`) and f32 features of base-sampled data (`feats/`)."""
    from convert.export_hf import export_hf

    root = tmp_path_factory.mktemp("train")
    params = base_model.init_params(CFG, jax.random.key(0))
    export_hf(params, CFG, root / "base")
    tokens = _sample_from_base(params, jax.random.key(1))
    mask = np.r_[0, np.ones(SEQ - 1)].astype(np.uint8)
    examples = [features.Example(row, mask) for row in tokens]
    features.generate(
        params,
        examples,
        root / "feats",
        cfg=CFG,
        shard_size=32,
        hidden_dtype="float32",
        max_len=SEQ,
        min_bucket=SEQ,
        tokens_per_batch=NUM_SEQS * SEQ,
        log=lambda _: None,
    )
    return root


def _argv(root: pathlib.Path, out: str, *extra: str) -> list[str]:
    return [
        "--base", str(root / "base"), "--features", str(root / "feats"), "--out", str(root / out),
        "--batch", "8", "--lr", "3e-3", "--warmup", "10", "--schedule-steps", "1000",
        "--max-len", str(SEQ), "--min-bucket", str(SEQ), "--eval-frac", "0.12",
        "--eval-batches", "1", "--log-every", "1", "--ckpt-every", "1000", *extra,
    ]  # fmt: skip


def _records(path: pathlib.Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("kind", ["griffin", "eagle2"])
def test_training_lowers_loss_and_raises_top1(setup: pathlib.Path, kind: str):
    steps = 100
    # Evaluation (a separate compile) and the export only for GRIFFIN, to save test time.
    if kind == "griffin":
        extra = ["--export", str(setup / "griffin_export"), "--eval-every", str(steps)]
    else:
        extra = ["--eval-every", "0"]
    argv = _argv(setup, f"{kind}_s1", "--draft-kind", kind, "--steps", str(steps), *extra)
    result = train.train(train.parse_args([*argv, "--eval-depth", "3"]))
    recs = _records(setup / f"{kind}_s1" / "metrics.jsonl")
    assert [r["step"] for r in recs] == list(range(1, steps + 1))

    def mean(key, part):
        return float(np.mean([r[key] for r in part]))

    assert mean("loss", recs[-10:]) < 0.6 * mean("loss", recs[:10])
    assert mean("top1_1", recs[-10:]) > mean("top1_1", recs[:10]) + 0.15
    assert result["step"] == steps
    if kind == "griffin":
        last = recs[-1]
        assert last["eval_top1"] > 0.1 and last["eval_top3"] >= last["eval_top1"]
        assert 0 < last["eval_acc@1"] <= 1 and {"eval_acc@2", "eval_acc@3"} <= set(last)
        png = setup / "curves.png"
        metrics = setup / "griffin_s1" / "metrics.jsonl"
        assert train.main(["plot", "--metrics", str(metrics), "--out", str(png)]) == 0
        assert png.stat().st_size > 1000


def test_stage2_warm_starts_from_the_stage1_export(setup: pathlib.Path):
    if not (setup / "griffin_export" / "config.json").exists():
        pytest.skip("needs the griffin stage-1 run of test_training_lowers_loss_and_raises_top1")
    from convert.load_draft import load_draft

    _, want = load_draft(setup / "griffin_export", CFG)
    argv = _argv(setup, "s2_from_export", "--stage", "2", "--steps", "1", "--lr", "0")
    argv += ["--mask-mode", "leaky_reference", "--eval-every", "0"]
    result = train.train(train.parse_args([*argv, "--init", str(setup / "griffin_export")]))
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(result["params"]), want)
    rec = _records(setup / "s2_from_export" / "metrics.jsonl")[-1]
    assert {"top1_1", "top1_2", "topk_loss2", "vloss2"} <= set(rec)
    # The same warm start from the stage-1 run folder (its latest orbax checkpoint).
    argv = _argv(setup, "s2_from_ckpt", "--stage", "2", "--steps", "1", "--lr", "0")
    argv += ["--mask-mode", "leaky_reference", "--eval-every", "0"]
    result = train.train(train.parse_args([*argv, "--init", str(setup / "griffin_s1")]))
    jax.tree.map(np.testing.assert_allclose, jax.device_get(result["params"]), want)


def test_killed_and_resumed_run_equals_an_uninterrupted_one(setup: pathlib.Path):
    # Stage 1 shares its compiled step with the griffin run above; stage 2 runs in the test below.
    common = ["--steps", "12", "--eval-every", "0"]
    full = train.train(train.parse_args(_argv(setup, "full", *common)))
    first = train.train(train.parse_args(_argv(setup, "killed", *common, "--stop-at", "6")))
    assert first["step"] == 6
    resumed = train.train(train.parse_args(_argv(setup, "killed", *common, "--resume")))
    assert resumed["step"] == 12
    jax.tree.map(
        np.testing.assert_array_equal,
        jax.device_get(full["params"]),
        jax.device_get(resumed["params"]),
    )
    losses_full = [r["loss"] for r in _records(setup / "full" / "metrics.jsonl")]
    losses_resumed = [r["loss"] for r in _records(setup / "killed" / "metrics.jsonl")]
    assert losses_full == losses_resumed
    # A different seed would diverge: the comparison above can fail.
    other = train.train(train.parse_args(_argv(setup, "seed1", *common, "--seed", "1")))
    diff = jax.tree.map(lambda a, b: float(np.abs(a - b).max()), full["params"], other["params"])
    assert max(jax.tree.leaves(diff)) > 0


_DP_SCRIPT = textwrap.dedent(
    """
    import os, sys, json
    os.environ["XLA_FLAGS"] = ("--xla_force_host_platform_device_count=8 "
                               "--xla_backend_optimization_level=0")
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax
    jax.config.update("jax_default_matmul_precision", "highest")
    import numpy as np
    from training import train
    assert len(jax.devices()) == 8
    argv = json.loads(sys.argv[1])
    out = {}
    for n in (1, 8):
        run = sys.argv[2] + str(n)
        r = train.train(train.parse_args(argv + ["--out", run, "--devices", str(n)]))
        recs = [json.loads(l) for l in open(run + "/metrics.jsonl")]
        leaves = jax.tree.leaves(r["params"])
        out[n] = {"loss": [x["loss"] for x in recs],
                  "params": [np.asarray(x).ravel().tolist()[:64] for x in leaves]}
    print("RESULT" + json.dumps(out))
    """
)


def test_eight_devices_give_the_one_device_loss(setup: pathlib.Path):
    argv = _argv(setup, "unused", "--steps", "3", "--eval-every", "0")
    argv = argv[: argv.index("--out")] + argv[argv.index("--out") + 2 :]
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    proc = subprocess.run(
        [sys.executable, "-c", _DP_SCRIPT, json.dumps(argv), str(setup / "dp")],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT"))
    res = json.loads(line[len("RESULT") :])
    np.testing.assert_allclose(res["8"]["loss"], res["1"]["loss"], rtol=1e-5, atol=1e-6)
    for a, b in zip(res["8"]["params"], res["1"]["params"], strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
