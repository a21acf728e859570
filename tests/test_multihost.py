"""Two processes as one JAX program (`--distributed`), on loopback with CPU collectives (gloo):
2 processes x 2 simulated CPU devices give the same greedy ids over a 4-device mesh as one
process with 4 devices, through the CLI (`python -m inference.generate`); 20 steps of draft
training give the same losses and params as one process, and the 2-process run's checkpoint
resumes in one process (`python -m training.train`)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from spec_models import aligned_pair, base_config, draft_config
from test_generate_cli import TOKENIZER_FILES

from convert.export_draft import export_draft
from convert.export_hf import export_hf
from griffin_jax.cli import run as run_cli
from inference import generate
from inference.api import DEFAULT_MODEL_DIR

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny base (8 heads, 2 KV heads: shardable over model=4) and its GRIFFIN draft."""
    root = tmp_path_factory.mktemp("multihost")
    cfg = base_config(
        "llama", vocab_size=8192, n_heads=8, n_kv_heads=2, head_dim=8, eos_token_ids=(1,),
        bos_token_id=0, max_position_embeddings=256,
    )  # fmt: skip
    dcfg = draft_config(cfg, n_heads=8, n_kv_heads=8, head_dim=8)
    base, draft = aligned_pair(cfg, dcfg, noise=0.2)
    export_hf(base, cfg, root / "base")
    for name in TOKENIZER_FILES:
        shutil.copy(DEFAULT_MODEL_DIR / "base" / name, root / "base" / name)
    export_draft(draft, base["embed_tokens"]["embedding"], dcfg, root / "griffin", base_cfg=cfg)
    (root / "griffin" / "tree.json").write_text('{"total_tokens": 10, "depth": 3, "top_k": 3}')
    return root / "base", root / "griffin"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _generate(folders, devices: int, extra: list[str]) -> subprocess.Popen:
    base, draft = folders
    flags = os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={devices}"
    env = dict(os.environ, XLA_FLAGS=flags.strip(), JAX_PLATFORMS="cpu")
    argv = [sys.executable, "-m", "inference.generate", "--base", str(base), "--draft",
            str(draft), "--prompt", "def f(x):", "--max-new-tokens", "12", "--json",
            "--mesh", "data=1,model=4", *extra]  # fmt: skip
    return subprocess.Popen(
        argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def test_two_processes_generate_what_one_process_generates(folders):
    port = _free_port()
    procs = [
        _generate(
            folders,
            2,
            [
                "--distributed",
                "--coordinator",
                f"127.0.0.1:{port}",
                "--num-processes",
                "2",
                "--process-id",
                str(i),
            ],
        )  # fmt: skip
        for i in range(2)
    ]
    single = _generate(folders, 4, [])
    outs = [p.communicate(timeout=420) for p in [*procs, single]]
    for p, (_, err) in zip([*procs, single], outs, strict=True):
        assert p.returncode == 0, err[-3000:]
    # (gloo prints its connection lines on stdout; the JSON object is the last line)
    lead, alone = (json.loads(outs[i][0].strip().splitlines()[-1]) for i in (0, 2))
    assert not any(line.startswith("{") for line in outs[1][0].splitlines())  # process 0 reports
    assert "[process 1] 12 tokens" in outs[1][1]
    assert lead["output_ids"] == alone["output_ids"] and len(lead["output_ids"]) == 12
    assert sum(lead["accept_lengths"]) > 0  # multi-token rounds crossed the processes


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--coordinator", "127.0.0.1:1"], "--coordinator needs --distributed"),
        (["--distributed", "--num-processes", "0"], "--num-processes must be >= 1"),
        (["--distributed", "--num-processes", "2", "--process-id", "2"], "--process-id 2"),
    ],
)
def test_distributed_flags_are_checked_before_any_work(folders, capsys, flags, message):
    base, _ = folders
    argv = ["--base", str(base), "--vanilla", "--prompt", "hi", *flags]
    assert run_cli(generate.main, argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


@pytest.mark.parametrize("module", ["inference.benchmark", "training.train", "training.pretrain"])
def test_every_multi_host_entry_point_takes_the_cluster_flags(module, capsys):
    main = __import__(module, fromlist=["main"]).main
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert all(f in out for f in ("--distributed", "--coordinator", "--num-processes"))


# --- draft training: 2 processes x 2 devices == 1 process x 4 devices ----------------------------

TRAIN_STEPS = 20


@pytest.fixture(scope="module")
def train_root(tmp_path_factory) -> Path:
    from test_train import make_base_and_features

    return make_base_and_features(tmp_path_factory.mktemp("multihost_train"))


def _train(root: Path, out: str, devices: int, extra: list[str]) -> subprocess.Popen:
    from test_train import _argv

    flags = os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={devices}"
    env = dict(os.environ, XLA_FLAGS=flags.strip(), JAX_PLATFORMS="cpu")
    argv = _argv(
        root,
        out,
        "--steps",
        str(TRAIN_STEPS),
        "--ckpt-every",
        "10",
        "--eval-every",
        "0",
        "--export",
        str(root / out / "export"),
        "--export-dtype",
        "f32",
        *extra,
    )
    # (the shared flags' --ckpt-every 1000 comes first; argparse keeps the last one)  # fmt: skip
    return subprocess.Popen(
        [sys.executable, "-m", "training.train", *argv],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def _cluster(i: int, port: int) -> list[str]:
    return ["--distributed", "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
            "--process-id", str(i)]  # fmt: skip


def _wait(procs: list[subprocess.Popen]) -> list[str]:
    outs = [p.communicate(timeout=420) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
    return [err for _, err in outs]


def _losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def _exported(run: Path) -> dict:
    from safetensors.numpy import load_file

    return load_file(run / "export" / "model.safetensors")


def test_two_process_training_equals_one_process_and_resumes_in_one(train_root):
    """(b) 20 data-parallel steps over 4 devices, as 2 processes x 2 devices and as 1 process x
    4 devices: the same losses (rtol 1e-5) and final params (rtol 1e-4: the gradient all-reduce
    crosses processes through gloo in another order). (c) The 2-process run's step-10
    checkpoint, resumed by 1 process, reaches the same step-20 params."""
    port = _free_port()
    procs = [_train(train_root, "two", 2, _cluster(i, port)) for i in range(2)]
    procs.append(_train(train_root, "one", 4, []))
    errs = _wait(procs)
    assert "[process 1]" in errs[1]
    one, two = train_root / "one", train_root / "two"
    assert len(_losses(two)) == TRAIN_STEPS  # process 0 alone writes the metrics
    np.testing.assert_allclose(_losses(two), _losses(one), rtol=1e-5, atol=1e-6)
    want = _exported(one)
    got = _exported(two)
    assert got.keys() == want.keys()
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-4, atol=1e-6, err_msg=k)
    # The comparison can fail: training moved the params away from their start.
    assert _losses(one)[-1] < _losses(one)[0]

    # (c) The step-10 checkpoint of the 2-process run, resumed by one process.
    resumed = train_root / "resumed"
    shutil.copytree(two, resumed, ignore=shutil.ignore_patterns("export"))
    shutil.rmtree(resumed / "checkpoints" / str(TRAIN_STEPS))
    errs = _wait([_train(train_root, "resumed", 4, ["--resume"])])
    assert "resumed at step 10" in errs[0]
    got = _exported(resumed)
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-4, atol=1e-6, err_msg=k)
    np.testing.assert_allclose(_losses(resumed), _losses(one), rtol=1e-5, atol=1e-6)


# --- the adaptive budget's round costs: one set for all processes --------------------------------

COSTS_WORKER = """
import json, pathlib, sys
from griffin_jax import budget, sharding
port, pid, path = sys.argv[1], int(sys.argv[2]), pathlib.Path(sys.argv[3])
sharding.init_distributed(f"127.0.0.1:{port}", 2, pid)
calls = []
def measure():
    calls.append(1)
    return [10.0 + pid, 20.0 + pid, 1.0]
first = budget.load_or_measure_costs("k1", measure, path=path)
second = budget.load_or_measure_costs("k2", measure, path=path)
print(json.dumps({"first": first, "second": second, "calls": len(calls)}))
"""


def test_processes_use_process_zero_round_costs(tmp_path):
    """Each process has its own cost cache: process 1 holds an entry for k1 that process 0
    lacks (so both measure, as the measurement runs global programs, and keep process 0's
    figures), process 0 one for k2 that process 1 lacks (nobody measures; process 0's entry)."""
    files = [tmp_path / "costs0.json", tmp_path / "costs1.json"]
    files[0].write_text(json.dumps({"k2": [3.0, 4.0, 0.5]}))
    files[1].write_text(json.dumps({"k1": [7.0, 8.0, 0.5]}))
    port = _free_port()
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", COSTS_WORKER, str(port), str(i), str(files[i])],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
    got = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
    for report in got:
        assert report["first"] == [[10.0, 20.0, 1.0], True]
        assert report["second"] == [[3.0, 4.0, 0.5], False]
        assert report["calls"] == 1
    assert json.loads(files[1].read_text())["k1"] == [10.0, 20.0, 1.0]  # the shared figures kept
