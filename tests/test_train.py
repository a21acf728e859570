"""training/train.py end to end on a tiny random base: both drafts learn, stage 2 warm-starts from
stage 1 (published export), a killed + resumed run equals an uninterrupted one (also when its
newest checkpoint is broken: resume falls back to an older one), 8 simulated devices give the
1-device loss, and the exact-mask stage-3 passes equal the draft run step by step as inference
runs it."""

from __future__ import annotations

import functools
import json
import os
import pathlib
import shutil
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from griffin_jax import cli
from griffin_jax import draft as draft_lib
from griffin_jax import model as base_model
from griffin_jax.config import ModelConfig
from griffin_jax.draft import DraftConfig
from griffin_jax.kv_cache import causal_mask
from training import common, features, losses, train

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
    return make_base_and_features(tmp_path_factory.mktemp("train"))


def make_base_and_features(root: pathlib.Path) -> pathlib.Path:
    """A tiny base in HF layout (`root/base`) and f32 features of base-sampled data
    (`root/feats`)."""
    from convert.export_hf import export_hf

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
    argv = _argv(
        setup, "s2_from_export", "--stage", "2", "--steps", "1", "--lr", "0", "--warmup", "0"
    )
    argv += ["--mask-mode", "leaky_reference", "--eval-every", "0"]
    result = train.train(train.parse_args([*argv, "--init", str(setup / "griffin_export")]))
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(result["params"]), want)
    rec = _records(setup / "s2_from_export" / "metrics.jsonl")[-1]
    assert {"top1_1", "top1_2", "topk_loss2", "vloss2"} <= set(rec)
    # The same warm start from the stage-1 run folder (its latest orbax checkpoint).
    argv = _argv(
        setup, "s2_from_ckpt", "--stage", "2", "--steps", "1", "--lr", "0", "--warmup", "0"
    )
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


# --- resume past a broken newest checkpoint ----------------------------------------------------

_RESUME = ("--steps", "12", "--eval-every", "0", "--ckpt-every", "2")


def _data_files(step_dir: pathlib.Path) -> list[pathlib.Path]:
    files = [f for f in (step_dir / "state").rglob("*") if f.is_file() and f.parent.name == "d"]
    assert files, f"no array data files under {step_dir}"
    return files


def _truncate(ckpts: pathlib.Path) -> int:
    for f in _data_files(ckpts / "6"):
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    return 6


def _remove(ckpts: pathlib.Path) -> int:
    for f in _data_files(ckpts / "6"):
        f.unlink()
    return 6


def _garble(ckpts: pathlib.Path) -> int:
    (ckpts / "6" / "state" / "_METADATA").write_text('{"tree_metadata": {garbled')
    return 6


def _partial_copy(ckpts: pathlib.Path) -> int:
    shutil.rmtree(ckpts / "6" / "state")
    return 6


def _empty_newer(ckpts: pathlib.Path) -> int:
    (ckpts / "8").mkdir()
    return 8


# corruption -> (how, the reason the warning gives, the step resume falls back to)
CORRUPTIONS = {
    "empty_step_folder": (_empty_newer, "empty folder", 6),
    "truncated_data_file": (_truncate, "a data file is truncated", 4),
    "removed_data_file": (_remove, "a data file is missing", 4),
    "garbled_metadata_json": (_garble, "garbled JSON metadata", 4),
    "partial_copy": (_partial_copy, "incomplete: no 'state' item", 4),
}


@pytest.fixture(scope="module")
def stopped_at_6(setup: pathlib.Path) -> dict:
    """A run killed at step 6 (checkpoints 4 and 6), and the uninterrupted 12-step run."""
    train.train(train.parse_args(_argv(setup, "stopped6", *_RESUME, "--stop-at", "6")))
    assert common.saved_steps(setup / "stopped6" / "checkpoints") == [4, 6]
    full = train.train(train.parse_args(_argv(setup, "uninterrupted12", *_RESUME)))
    return {"root": setup, "params": jax.device_get(full["params"])}


def _listing(root: pathlib.Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_size for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
def test_resume_falls_back_past_a_broken_newest_checkpoint(stopped_at_6, capsys, corruption):
    corrupt, words, fallback = CORRUPTIONS[corruption]
    root = stopped_at_6["root"]
    out = root / f"broken_{corruption}"
    shutil.copytree(root / "stopped6", out)
    broken = corrupt(out / "checkpoints")
    before = _listing(out / "checkpoints" / str(broken))
    capsys.readouterr()
    resumed = train.train(train.parse_args(_argv(root, out.name, *_RESUME, "--resume")))
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if "warning" in line]
    assert len(warnings) == 2, err  # the skipped step at resume, then its set-aside at a save
    assert f"checkpoint {broken} ({words})" in warnings[0], warnings[0]
    assert f"restored step {fallback}" in warnings[0] and f"resumed at step {fallback}" in err
    assert f"aside to {broken}.unrestorable" in warnings[1]
    # Nothing deleted: the broken folder is kept, as it was, beside the new checkpoints.
    assert _listing(out / "checkpoints" / f"{broken}.unrestorable") == before
    assert common.saved_steps(out / "checkpoints") == [10, 12]
    # The run went on as the uninterrupted one did.
    assert resumed["step"] == 12
    full = _records(root / "uninterrupted12" / "metrics.jsonl")
    recs = _records(out / "metrics.jsonl")
    assert [(r["step"], r["loss"]) for r in recs] == [(r["step"], r["loss"]) for r in full]
    jax.tree.map(
        np.testing.assert_array_equal, jax.device_get(resumed["params"]), stopped_at_6["params"]
    )
    # The checkpoints written after the fallback restore, with no warning.
    again = train.train(train.parse_args(_argv(root, out.name, *_RESUME, "--resume")))
    assert again["step"] == 12 and "warning" not in capsys.readouterr().err


def test_resume_with_no_restorable_checkpoint_is_one_error_line(stopped_at_6, capsys):
    root = stopped_at_6["root"]
    out = root / "all_broken"
    shutil.copytree(root / "stopped6", out)
    _garble(out / "checkpoints")
    (out / "checkpoints" / "4" / "state" / "_METADATA").write_text("not json")
    before = _listing(out)
    capsys.readouterr()
    code = cli.run(train.main, _argv(root, out.name, *_RESUME, "--resume"))
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: no checkpoint in"), err
    assert "6 (garbled JSON metadata), 4 (garbled JSON metadata)" in err
    assert _listing(out) == before


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
    argv = _argv(setup, "unused", "--steps", "3", "--warmup", "2", "--eval-every", "0")
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


# --- exact training equals inference, over three passes -----------------------------------------


@functools.partial(jax.jit, static_argnames=("dcfg", "num_passes", "mask_mode"))
def _stage_passes(params, embedding, w_head, inputs, *, dcfg, num_passes: int, mask_mode: str):
    """Each pass's (token_feature, next_feature) [B, L, D], from the trainer's unrolled loop."""
    outputs = []

    def run_pass(streams):
        out = draft_lib.draft_forward_train(
            params,
            embedding,
            inputs.features,
            streams,
            inputs.tokens,
            lengths=inputs.lengths,
            dcfg=dcfg,
            mask_mode=mask_mode,
        )
        outputs.append(out)
        return out

    def head(hidden: jax.Array) -> jax.Array:
        return hidden @ w_head

    losses.unrolled_loss(run_pass, head, inputs, head(inputs.target), num_passes=num_passes)
    return outputs


def _inference_passes(params, embedding, dcfg, inputs, *, num_passes: int):
    """Pass k+1 at position r as inference computes it: the draft's cache holds the base
    features f_0..f_{r-k} (one prefill, whose rows past r-k are masked), then k single-token
    steps at positions r-k+1..r, each feeding the previous step's next_feature with the token."""
    b, seq_len = inputs.tokens.shape
    forward = jax.jit(draft_lib.draft_forward, static_argnames=("dcfg",))
    zero = jnp.zeros((b,), jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(seq_len, dtype=jnp.int32), (b, seq_len))
    tok, nxt, cache = forward(
        params,
        embedding,
        inputs.features,
        inputs.tokens,
        positions,
        draft_lib.init_draft_cache(dcfg, b, seq_len),
        write_idx=zero,
        mask=causal_mask(zero, seq_len, seq_len),
        dcfg=dcfg,
    )
    passes = [(np.asarray(tok), np.asarray(nxt))]
    for k in range(1, num_passes):
        tok_k, nxt_k = np.zeros_like(passes[0][0]), np.zeros_like(passes[0][1])
        for r in range(k, seq_len):
            feature, step_cache = nxt[:, r - k], cache
            for q in range(r - k + 1, r + 1):
                at = jnp.full((b,), q, jnp.int32)
                tok_q, nxt_q, step_cache = forward(
                    params,
                    embedding,
                    feature[:, None],
                    inputs.tokens[:, q : q + 1],
                    at[:, None],
                    step_cache,
                    write_idx=at,
                    mask=causal_mask(at, 1, seq_len),
                    dcfg=dcfg,
                )
                feature = nxt_q[:, 0]
            tok_k[:, r], nxt_k[:, r] = tok_q[:, 0], nxt_q[:, 0]
        passes.append((tok_k, nxt_k))
    return passes


def test_exact_stage3_passes_equal_the_draft_run_step_by_step():
    """Stage 3 (`--mask-mode exact`): pass k+1 at position r >= k of the multi-stream training
    forward equals the draft's k-th free-running step from r - k at inference, for k = 0, 1, 2
    (pass 1 is the plain causal forward; the one-pass case is test_draft's)."""
    dcfg = DraftConfig(
        vocab_size=CFG.vocab_size,
        d_model=CFG.d_model,
        d_ff=CFG.d_ff,
        n_heads=CFG.n_heads,
        n_kv_heads=CFG.n_kv_heads,
        head_dim=CFG.head_dim,
    )
    rng = np.random.default_rng(0)
    params = jax.tree.map(  # random normal params: no compile of the Flax init
        lambda a: jnp.asarray(rng.normal(size=a.shape) * 0.1, a.dtype),
        draft_lib.abstract_draft_params(dcfg),
    )
    embedding = jnp.asarray(rng.normal(size=(CFG.vocab_size, CFG.d_model)), jnp.float32)
    w_head = jnp.asarray(rng.normal(size=(CFG.d_model, CFG.vocab_size)), jnp.float32)
    b, seq_len = 2, 10
    lengths = jnp.array([seq_len, 7], jnp.int32)
    inputs = losses.draft_inputs(
        jnp.asarray(rng.normal(size=(b, seq_len, CFG.d_model)) * 2, jnp.float32),
        jnp.asarray(rng.integers(0, CFG.vocab_size, size=(b, seq_len)), jnp.int32),
        jnp.ones((b, seq_len)),
        lengths,
    )
    stage3 = functools.partial(_stage_passes, params, embedding, w_head, inputs, dcfg=dcfg)
    got = jax.device_get(stage3(num_passes=3, mask_mode="exact"))
    want = _inference_passes(params, embedding, dcfg, inputs, num_passes=3)
    for k in range(3):
        for row, n in enumerate(np.asarray(lengths)):
            for a, c in zip(got[k], want[k], strict=True):
                np.testing.assert_allclose(a[row, k:n], c[row, k:n], atol=1e-5, rtol=1e-5)
    # The passes are not one computation thrice (pass 3 is not pass 1 re-read), and the leaky
    # reference masking, which training with `leaky_reference` uses, does not pass this check.
    assert np.abs(got[2][1][:, 2:7] - got[0][1][:, 2:7]).max() > 0.1
    leaky = jax.device_get(stage3(num_passes=3, mask_mode="leaky_reference"))
    assert np.abs(leaky[2][1][:, 2:7] - want[2][1][:, 2:7]).max() > 1e-3
