"""`python -m inference.bench_device --size tiny --quick` runs here (fields present and sane,
not timed), imports neither transformers nor torch, and the attention paths agree."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from spec_models import base_config, draft_config, random_pair

from griffin_jax import layers
from griffin_jax.kv_cache import causal_mask, init_cache, tree_mask_to_cache
from griffin_jax.model import forward
from inference import bench_device

ROOT = Path(__file__).resolve().parents[1]


def test_imports_neither_transformers_nor_torch():
    code = (
        "import sys, inference.bench_device; "
        "print([m for m in ('transformers', 'torch', 'tokenizers') if m in sys.modules])"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "[]"


def test_tiny_bench_runs_and_reports(tmp_path, capsys):
    out, png = tmp_path / "bench.json", tmp_path / "bench.png"
    argv = ["--size", "tiny", "--dtype", "float32", "--repeats", "1", "--tree", "4,4,16",
            "--quick", "--out", str(out), "--plot", str(png)]  # fmt: skip
    assert bench_device.main(argv) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report == json.loads(out.read_text())
    assert png.stat().st_size > 1000 and report["plot"] == str(png)
    assert report["errors"] == [] and report["skipped"] == []
    assert report["size"] == "tiny" and report["backend"] == "cpu"
    assert report["bandwidth"]["measured_bytes_per_s"]["best"] > 1e8
    assert report["weight_bytes"]["base"] > 0 and report["weight_bytes"]["draft"] > 0
    assert sorted(report["decode"]) == ["1", "8"]  # --quick
    for batch in ("1", "8"):
        row = report["decode"][batch]
        assert row["ms_per_token"] > 0 and row["roofline_ms"] > 0
    assert sorted(map(int, report["verify"])) == [1, 8, 64]
    assert all(v["ms"] > 0 for v in report["verify"].values())
    for label in ("full_vocab", "draft_vocab_512"):
        assert list(report["rounds"][label]["ms"]) == ["4,4,16"]  # --tree: the one asked
        assert all(ms > 0 for ms in report["rounds"][label]["ms"].values())
        assert report["draft_level_k10"][label]["ms"] > 0
    assert set(report["prefill"]) == {"512"}
    summary = report["summary"]
    assert summary["verify64_over_decode"] > 0
    assert summary["round_4,4,16_draft_vocab_512_decodes"] > 0


def test_bench_device_refuses_a_bad_size():
    proc = subprocess.run(
        [sys.executable, "-m", "inference.bench_device", "--size", "2b"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2 and "--size" in proc.stderr


def test_fused_attention_path_equals_einsum_path(monkeypatch):
    """Prefill and tree verification through `jax.nn.dot_product_attention` (the default for
    T > 1 on a GPU in f32 and on a TPU) give the explicit einsums' logits (every forward on a
    CPU) within f32 round-off; T = 1 is the einsum path everywhere."""
    cfg = base_config("llama", head_dim=24, d_model=96)
    base, _ = random_pair(cfg, draft_config(cfg))
    prompt = jnp.asarray([np.arange(20) % cfg.vocab_size, np.arange(5, 25) % cfg.vocab_size])
    lengths = jnp.asarray([20, 13], jnp.int32)
    width = 9
    rng = np.random.default_rng(0)
    tree = np.tril(rng.random((2, width, width)) < 0.5) | np.eye(width, dtype=bool)[None]
    tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (2, width)), jnp.int32)

    def run():
        cache = init_cache(cfg, 2, 40, jnp.float32)
        zero = jnp.zeros((2,), jnp.int32)
        logits, _, cache = forward(
            base, prompt, jnp.broadcast_to(jnp.arange(20), (2, 20)), cache, write_idx=zero,
            mask=causal_mask(zero, 20, 40), cfg=cfg,
        )  # fmt: skip
        positions = lengths[:, None] + jnp.arange(width)[None]
        mask = tree_mask_to_cache(lengths, jnp.asarray(tree), 40)
        verify, _, _ = forward(
            base, tokens, positions, cache, write_idx=lengths, mask=mask, cfg=cfg
        )
        return logits, verify

    def traced_anew():  # a new function object: traced (the implementation chosen) anew
        return jax.jit(lambda: run())()

    q = jnp.zeros((1, width, 4, 24))
    assert layers.attention_implementation(q) == "einsum"  # on this CPU
    for backend in ("gpu", "tpu"):  # f32
        assert layers.attention_implementation(q, backend=backend) == "xla"
        assert layers.attention_implementation(q[:, :1], backend=backend) == "einsum"
    assert layers.attention_implementation(q.astype(jnp.bfloat16), backend="gpu") == "cudnn"
    explicit = traced_anew()
    monkeypatch.setenv("GRIFFIN_ATTENTION", "xla")
    fused = traced_anew()
    for a, b in zip(fused, explicit, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * np.abs(b).max())
    assert layers.attention_implementation(q) == "xla"
    monkeypatch.setenv("GRIFFIN_ATTENTION", "flash")
    with pytest.raises(ValueError, match="GRIFFIN_ATTENTION"):
        layers.attention_implementation(q)
    assert jax.default_backend() == "cpu"
