"""Fuzzing the checkpoint readers (convert/): corrupt files fail as one-line errors naming the file.

Every case (a truncation, or random bytes written over a safetensors header, a shard index, a
`.bin`, an orbax checkpoint's metadata or data) must end in a successful load or a one-line
`ValueError` (`CheckpointError`) whose message names the file: never another exception type, a
hang (a watchdog kills the run after CASE_SECONDS) or an allocation beyond the file's size
(tracemalloc's peak: numpy and Python report their allocations to it; orbax's tensorstore
allocates outside its view, so there a success is bounded by `load_converted`'s shape check).
Bytes flipped inside tensor payloads carry no checksum and may load. Seeds are fixed, so a
failure reproduces.
"""

from __future__ import annotations

import contextlib
import copy
import faulthandler
import json
import random
import shutil
import struct
import time
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

from convert.convert_checkpoint import load_converted, save_converted
from convert.load_hf import iter_checkpoint, iter_safetensors, iter_torch_bin
from griffin_jax.config import ModelConfig
from griffin_jax.model import abstract_params

CASE_SECONDS = 20  # a case running longer is a hang: the watchdog ends the run with a traceback
SLACK = 1 << 20  # bytes a case may allocate beyond the file's size (parsed headers, objects)
JSON_BYTES = b'0123456789{}[],:" .-eEFBIU'  # edits that keep the header looking like JSON

TENSORS = {
    "model.embed_tokens.weight": np.arange(64, dtype=np.float32).reshape(16, 4),
    "model.norm.weight": np.ones(4, ml_dtypes.bfloat16),
    "lm_head.weight": np.full((16, 4), 0.5, np.float16),
    "empty": np.zeros((0, 3), np.float32),
}


@contextlib.contextmanager
def _watchdog() -> Iterator[None]:
    faulthandler.dump_traceback_later(CASE_SECONDS, exit=True)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()


def _run_case(load: Callable[[], None], where: Path, what: str, budget: int | None) -> bool:
    """True if `load()` succeeds, False on an acceptable error; fails the test otherwise."""
    if budget is not None:
        tracemalloc.reset_peak()
    try:
        with _watchdog():
            load()
        loaded = True
    except ValueError as e:
        message = str(e)
        assert "\n" not in message and str(where) in message, f"{what}: {message!r}"
        loaded = False
    except Exception as e:
        pytest.fail(f"{what}: {type(e).__name__}: {e}")
    if budget is not None:
        peak = tracemalloc.get_traced_memory()[1]
        assert peak <= budget, f"{what}: allocated {peak} bytes (budget {budget})"
    return loaded


@contextlib.contextmanager
def _tracing() -> Iterator[None]:
    tracemalloc.start()
    try:
        yield
    finally:
        tracemalloc.stop()


def _touch_all(pairs: Iterator[tuple[str, np.ndarray]]) -> None:
    """Reads every byte of every tensor without copying it."""
    for _, array in pairs:
        int(np.ascontiguousarray(array).view(np.uint8).sum())


def _edits(rng: random.Random, raw: bytes, lo: int, hi: int, n: int) -> Iterator[bytes]:
    """`n` copies of `raw` with 1-3 bytes in [lo, hi) overwritten (JSON-ish or random bytes)."""
    for i in range(n):
        data = bytearray(raw)
        for _ in range(rng.randint(1, 3)):
            data[rng.randrange(lo, hi)] = rng.choice(JSON_BYTES) if i % 2 else rng.randrange(256)
        yield bytes(data)


def _header_end(raw: bytes) -> int:
    return 8 + struct.unpack("<Q", raw[:8])[0]


def _crafted(raw: bytes) -> list[tuple[str, bytes]]:
    """Hand-made headers that random edits rarely reach, over the original data."""
    end = _header_end(raw)
    header, data = json.loads(raw[8:end]), raw[end:]

    def edit(key: str, **fields) -> bytes:
        h = copy.deepcopy(header)
        h[key].update(fields)
        text = json.dumps(h).encode()
        return struct.pack("<Q", len(text)) + text + data

    first, begin = "model.embed_tokens.weight", header["model.embed_tokens.weight"]["data_offsets"]
    return [
        ("header length 2**62", struct.pack("<Q", 2**62) + raw[8:]),
        ("header length 2**64-1", struct.pack("<Q", 2**64 - 1) + raw[8:]),
        ("header length = file", struct.pack("<Q", len(raw)) + raw[8:]),
        ("header length 0", struct.pack("<Q", 0) + raw[8:]),
        ("unsupported dtype", edit("model.norm.weight", dtype="U16")),
        ("offsets past the end", edit(first, data_offsets=[begin[0], 10**12])),
        ("overlapping offsets", edit("lm_head.weight", data_offsets=begin)),
        ("negative offset", edit(first, data_offsets=[-1, begin[1]])),
        ("empty tensor, huge shape", edit("empty", shape=[0, 2**63])),
        ("shape overflows", edit(first, shape=[2**32, 2**32, 2**32])),
        ("shape/offset mismatch", edit(first, shape=[17, 4])),
        ("header is a list", struct.pack("<Q", 2) + b"[]" + data),
    ]


def test_safetensors_truncations_and_header_edits(tmp_path):
    good = tmp_path / "good.safetensors"
    save_file(TENSORS, good, metadata={"format": "pt"})
    raw = good.read_bytes()
    end = _header_end(raw)
    rng = random.Random(0)
    cuts = [(f"truncated to {n}", raw[:n]) for n in range(0, end + 16, 3)]
    cuts += [(f"truncated to {n}", raw[:n]) for n in rng.sample(range(end, len(raw)), 12)]
    edits = [(f"header edit {i}", d) for i, d in enumerate(_edits(rng, raw, 0, end, 200))]
    payload = [(f"data edit {i}", d) for i, d in enumerate(_edits(rng, raw, end, len(raw), 8))]
    cases = cuts + _crafted(raw) + edits + payload
    path = tmp_path / "case.safetensors"
    outcomes = []
    start = time.perf_counter()
    with _tracing():
        for what, data in cases:
            path.write_bytes(data)
            load = lambda: _touch_all(iter_safetensors(path))  # noqa: E731
            outcomes.append(_run_case(load, path, what, len(data) + SLACK))
    assert not any(outcomes[: len(cuts) + len(_crafted(raw))]), "every cut or crafted header fails"
    assert all(outcomes[-len(payload) :]), "payload bytes carry no checksum: those edits load"
    assert time.perf_counter() - start < 60


def test_shard_index_edits(tmp_path):
    folder = tmp_path / "sharded"
    folder.mkdir()
    keys = sorted(TENSORS)
    weight_map = {}
    for i, part in enumerate((keys[::2], keys[1::2])):
        name = f"model-0000{i + 1}-of-00002.safetensors"
        save_file({k: TENSORS[k] for k in part}, folder / name)
        weight_map.update(dict.fromkeys(part, name))
    index = folder / "model.safetensors.index.json"
    raw = json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}).encode()
    rng = random.Random(1)
    cases = [(f"truncated to {n}", raw[:n]) for n in rng.sample(range(len(raw)), 20)]
    cases += [(f"index edit {i}", d) for i, d in enumerate(_edits(rng, raw, 0, len(raw), 100))]
    with _tracing():
        for what, data in cases:
            index.write_bytes(data)
            load = lambda: _touch_all(iter_checkpoint(folder))  # noqa: E731
            size = sum(p.stat().st_size for p in folder.iterdir())
            _run_case(load, folder, what, size + SLACK)


def test_torch_bin_truncations_and_edits(tmp_path):
    good = tmp_path / "good.bin"
    torch.save({k: torch.from_numpy(v.astype(np.float32)) for k, v in TENSORS.items()}, good)
    raw = good.read_bytes()
    pkl = raw.index(b"data.pkl") + len(b"data.pkl")  # the pickle follows its zip entry's name
    rng = random.Random(2)
    cases = [(f"truncated to {n}", raw[:n]) for n in sorted(rng.sample(range(len(raw)), 30))]
    cases += [(f"pickle edit {i}", d) for i, d in enumerate(_edits(rng, raw, pkl, pkl + 300, 60))]
    cases += [(f"edit {i}", d) for i, d in enumerate(_edits(rng, raw, 0, len(raw), 30))]
    path = tmp_path / "case.bin"
    with _tracing():
        for what, data in cases:
            path.write_bytes(data)
            load = lambda: _touch_all(iter_torch_bin(path))  # noqa: E731
            _run_case(load, path, what, len(data) + SLACK)


def test_orbax_metadata_and_data_edits(tmp_path):
    cfg = ModelConfig(
        family="llama", vocab_size=16, d_model=8, n_layers=1, n_heads=2, n_kv_heads=1,
        head_dim=4, d_ff=8,
    )  # fmt: skip
    rng = np.random.default_rng(3)
    params = jax.tree.map(
        lambda s: rng.standard_normal(s.shape).astype(s.dtype), abstract_params(cfg, np.float32)
    )
    good = save_converted(tmp_path / "good", cfg, params)
    files = sorted(p.relative_to(good) for p in good.rglob("*") if p.is_file())
    data_files = [f for f in files if f.parent.name == "d"]
    assert data_files, files
    pick = random.Random(4)
    cases = []
    for rel in files:
        raw = (good / rel).read_bytes()
        cases += [(rel, f"truncated to {n}", raw[:n]) for n in pick.sample(range(len(raw)), 2)]
        n_edits = 2 if rel in data_files else 5
        cases += [
            (rel, f"edit {i}", d) for i, d in enumerate(_edits(pick, raw, 0, len(raw), n_edits))
        ]
    start = time.perf_counter()
    for i, (rel, what, data) in enumerate(cases):
        case = tmp_path / f"case{i}"
        shutil.copytree(good, case)
        (case / rel).write_bytes(data)
        _run_case(lambda: load_converted(case), case, f"{rel} {what}", None)  # noqa: B023
        shutil.rmtree(case)
    assert time.perf_counter() - start < 60
