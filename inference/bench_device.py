"""`python -m inference.bench_device`: what decoding costs on this accelerator, in one run.

Builds in-process, with random weights, a Llama-3-8B-shaped base (32 layers, hidden 4096, 32
query / 8 KV heads, MLP 14336, vocab 128256) and a GRIFFIN draft of the published shape for it
(hidden 4096, MLP 11008, 32 / 32 heads: spec 2.6), bf16 by default, and measures:

- `bandwidth`: device memory bandwidth from a large elementwise copy (bytes read + written per
  second), and the nominal figure when the device kind is known;
- `decode`: vanilla decode ms/token at batch 1, 8 and 32 (the slope between two generations of
  different lengths on one compiled program, so prefill and dispatch cancel), against the
  roofline = (weight bytes + the KV bytes a step reads) / measured bandwidth;
- `verify`: one base forward over 1, 2, 4, ..., 128 new tokens against a 512-token context;
- `draft_level`: one draft forward over K = 10 tree nodes with its lm_head (whole vocabulary,
  and the 32k draft vocabulary);
- `rounds`: whole speculative rounds (`run_segment`, as `generate` runs them) for the trees
  (1, 6, 8), (4, 4, 16), (10, 5, 60) (top_k, depth, total_tokens), in ms and in decodes, with
  the whole vocabulary and with a 32k draft vocabulary;
- `prefill`: tokens/s at 512 and 2048 tokens; `peak_memory_bytes`; and each section's compile
  time (its first call less a timed call).

Random weights give random acceptance: rounds are timed as shapes (what a round costs), not
as tau. `--size 1b` (Llama-3.2-1B shape) and `--size tiny` (a few MB: runs anywhere in about
a minute; `make test` runs it once, with `--quick`) keep the same sections; `--quick` times
each at fewer sizes (verification widths 1, 8, 64; decode batches 1, 8; prefill 512).
Sections run in order of importance and stop at `--budget-s`, so a short lease always gets a
JSON: skipped ones say so. Prints one JSON object (the last stdout line) and writes a PNG
plot (`--plot`).

Imports jax, flax, numpy and the project's `griffin_jax` only (no network, no transformers);
matplotlib for the plot, if installed. On a machine with its own JAX:
    pip install --no-deps --no-build-isolation -e .
    python -m inference.bench_device --size 8b --out bench.json
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import pathlib
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from griffin_jax import cli, speculative, vanilla
from griffin_jax.config import ModelConfig, RopeConfig, TreeConfig
from griffin_jax.draft import DraftConfig, init_draft_cache, init_draft_params
from griffin_jax.kv_cache import causal_mask, init_cache
from griffin_jax.layers import fuse_projections
from griffin_jax.model import decode_layout, init_params
from griffin_jax.model import forward as base_forward

TREES = ((1, 6, 8), (4, 4, 16), (10, 5, 60))
VERIFY_WIDTHS = (1, 2, 4, 8, 16, 32, 64, 128)
DECODE_BATCHES = (1, 8, 32)
PREFILL_LENGTHS = (512, 2048)
# `--quick`: every section, at fewer sizes (a check that the script runs on a new machine)
QUICK = dict(verify=(1, 8, 64), decode=(1, 8), prefill=(512,))
CONTEXT = 512  # committed tokens the verification and draft forwards attend over

# Nominal HBM bandwidth (bytes/s) by device kind, from the vendors' datasheets.
NOMINAL_BANDWIDTH = {
    "H200": 4.8e12,
    "H100 PCIe": 2.0e12,
    "H100": 3.35e12,
    "A100-SXM4-80GB": 2.039e12,
    "A100-SXM4-40GB": 1.555e12,
    "A100-PCIE-40GB": 1.555e12,
    "A100 80GB PCIe": 1.935e12,
    "L4": 0.3e12,
    "TPU v4": 1.2e12,
    "TPU v5 lite": 0.819e12,
    "TPU v5p": 2.765e12,
    "TPU v6 lite": 1.64e12,
}


def _sizes(size: str) -> tuple[ModelConfig, DraftConfig, int]:
    """(base config, draft config, draft vocabulary) of a named size."""
    if size == "8b":  # meta-llama/Meta-Llama-3-8B; GRIFFIN's llama_3_instruct_8B draft
        rope = RopeConfig(theta=500_000.0)
        cfg = ModelConfig(vocab_size=128256, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8,
                          head_dim=128, d_ff=14336, rope=rope, rms_eps=1e-5,
                          max_position_embeddings=8192)  # fmt: skip
        dcfg = DraftConfig(vocab_size=128256, d_model=4096, d_ff=11008, n_heads=32, n_kv_heads=32,
                           head_dim=128, rope=rope, rms_eps=1e-5)  # fmt: skip
        return cfg, dcfg, 32000
    if size == "1b":  # meta-llama/Llama-3.2-1B (tied embeddings); a draft of the same rules
        rope = RopeConfig(theta=500_000.0)
        cfg = ModelConfig(vocab_size=128256, d_model=2048, n_layers=16, n_heads=32, n_kv_heads=8,
                          head_dim=64, d_ff=8192, rope=rope, rms_eps=1e-5, tie_embeddings=True,
                          max_position_embeddings=8192)  # fmt: skip
        dcfg = DraftConfig(vocab_size=128256, d_model=2048, d_ff=5504, n_heads=32, n_kv_heads=32,
                           head_dim=64, rope=rope, rms_eps=1e-5)  # fmt: skip
        return cfg, dcfg, 32000
    if size == "tiny":
        cfg = ModelConfig(vocab_size=2048, d_model=128, n_layers=2, n_heads=4, n_kv_heads=2,
                          head_dim=32, d_ff=256, max_position_embeddings=4096)  # fmt: skip
        dcfg = DraftConfig(vocab_size=2048, d_model=128, d_ff=256, n_heads=4, n_kv_heads=4,
                           head_dim=32)  # fmt: skip
        return cfg, dcfg, 512
    raise ValueError(f"--size {size!r}: expected 8b, 1b or tiny")


def _nbytes(tree: Any) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def _kv_bytes_per_token(cfg: ModelConfig, dtype) -> int:
    """K and V bytes of one cached token over all layers."""
    return 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * jnp.dtype(dtype).itemsize


def _median_ms(fn: Callable[[Any], Any], carry: Any, repeats: int) -> tuple[float, float, Any]:
    """(ms per call of `carry = fn(carry)`, seconds of the first call, the last carry).

    After the first (compiling) call, `repeats` calls are chained without waiting between
    them, so the host's dispatch of one call overlaps the device's work on the previous one
    (as in a decode loop): the figure is device time per call when dispatch is the faster.
    Median of three such runs.
    """
    t0 = time.perf_counter()
    carry = jax.block_until_ready(fn(carry))
    first = time.perf_counter() - t0
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(repeats):
            carry = fn(carry)
        carry = jax.block_until_ready(carry)
        times.append((time.perf_counter() - t0) / repeats)
    return 1e3 * statistics.median(times), first, carry


def _compile_s(first_s: float, ms: float, calls: int = 1) -> float:
    """A section's compile time: its first call less what `calls` timed calls take."""
    return max(first_s - calls * ms / 1e3, 0.0)


def measure_bandwidth(nbytes: int, repeats: int) -> dict:
    """Device memory bandwidth (bytes/s) over `nbytes` of bf16: an elementwise op (read once,
    written once, the buffer donated) and a reduction (read once); `best` is the larger."""
    x = jnp.zeros((nbytes // 2,), jnp.bfloat16)
    bump = jax.jit(lambda a: a + jnp.bfloat16(1), donate_argnums=0)
    ms, _, x = _median_ms(bump, x, repeats)
    read_write = 2 * x.size * 2 / (ms / 1e3)
    total = jax.jit(lambda a: (a, jnp.sum(a, dtype=jnp.float32)), donate_argnums=0)
    ms, _, x = _median_ms(lambda a: total(a)[0], x, repeats)
    read = x.size * 2 / (ms / 1e3)
    return {"read_write": read_write, "read": read, "best": max(read_write, read)}


def random_models(cfg: ModelConfig, dcfg: DraftConfig, dtype, seed: int = 0):
    """Random base and draft params on the default device, in the one-device decode layout the
    inference API uses (unrolled layers, fused projections)."""
    base = decode_layout(init_params(cfg, jax.random.key(seed), dtype), free=True)
    draft = init_draft_params(dcfg, jax.random.key(seed + 1), dtype)
    draft = fuse_projections(draft, free_parts=True)
    return jax.block_until_ready((base, draft))


def measure_decode(base, cfg, batch: int, repeats: int) -> dict:
    """Vanilla decode ms/token at `batch`: the slope between 65 and 128 new tokens of one
    compiled program (prompts of 128 tokens), from the fastest of at least 3 interleaved runs
    of each (the fastest, not the median: on a shared machine a slow outlier on the short side
    can turn a small model's slope negative); while the slope is not positive, up to 12 runs
    of each, as noise then swamps it."""
    prompt = (np.arange(128) * 31 % cfg.vocab_size).tolist()
    prompts = [prompt] * batch
    short, long = 65, 128  # one output bucket (128): one program

    def run(n: int) -> float:
        t0 = time.perf_counter()
        vanilla.generate(base, cfg, prompts, max_new_tokens=n, eos_ids=[], capacity=256)
        return time.perf_counter() - t0

    t0 = time.perf_counter()
    run(short)
    first = time.perf_counter() - t0
    shorts, longs = [], []
    while len(shorts) < max(repeats, 3) or (min(longs) <= min(shorts) and len(shorts) < 12):
        shorts.append(run(short))  # interleaved
        longs.append(run(long))
    ms = 1e3 * (min(longs) - min(shorts)) / (long - short)
    return {"ms_per_token": ms, "compile_s": max(first - statistics.median(shorts), 0.0),
            "context": 128 + (short + long) // 2}  # fmt: skip


def _context_cache(base, cfg, batch: int, capacity: int, dtype):
    """A per-layer cache holding CONTEXT committed (random-prompt) tokens per row."""
    cache = init_cache(cfg, batch, capacity, dtype, per_layer=True)
    return cache.replace(length=jnp.full((batch,), CONTEXT, jnp.int32))


@functools.partial(jax.jit, donate_argnums=0, static_argnames=("cfg", "width"))
def _forward_at(cache, base, *, cfg: ModelConfig, width: int):
    """A base forward of `width` new tokens at the committed length: (cache, logits)."""
    b = cache.length.shape[0]
    length = cache.length
    tokens = jnp.broadcast_to(jnp.arange(width, dtype=jnp.int32) % cfg.vocab_size, (b, width))
    positions = length[:, None] + jnp.arange(width, dtype=jnp.int32)[None]
    logits, _, cache = base_forward(
        base, tokens, positions, cache, write_idx=length,
        mask=causal_mask(length, width, cache.capacity), cfg=cfg,
    )  # fmt: skip
    return cache, logits


def measure_verify(base, cfg, dtype, widths, repeats: int) -> dict:
    """ms of one base forward over W new tokens after CONTEXT committed ones, per W."""
    out = {}
    capacity = CONTEXT + max(widths)
    for width in widths:
        cache = _context_cache(base, cfg, 1, capacity, dtype)
        fn = functools.partial(_forward_at, base=base, cfg=cfg, width=width)
        ms, first, _ = _median_ms(lambda c, fn=fn: fn(c)[0], cache, repeats)
        out[str(width)] = {"ms": ms, "compile_s": _compile_s(first, ms)}
    return out


def measure_prefill(base, cfg, dtype, lengths, repeats: int) -> dict:
    """Tokens/s of a batch-1 prefill of T tokens into an empty cache of T slots."""
    out = {}
    for t in lengths:
        cache = init_cache(cfg, 1, t, dtype, per_layer=True)
        cache = cache.replace(length=jnp.zeros((1,), jnp.int32))
        fn = functools.partial(_forward_at, base=base, cfg=cfg, width=t)
        ms, first, _ = _median_ms(lambda c, fn=fn: fn(c)[0], cache, repeats)
        out[str(t)] = {"ms": ms, "tokens_per_s": t / (ms / 1e3), "compile_s": _compile_s(first, ms)}
    return out


def measure_draft_level(base, draft, cfg, dcfg, dtype, head, nodes: int, repeats: int) -> dict:
    """ms of one tree level: a draft forward over `nodes` tokens plus its lm_head."""

    @functools.partial(jax.jit, donate_argnums=0)
    def level(dcache, base, draft, head):
        step = speculative._draft_step(base, draft, head, cfg=cfg, dcfg=dcfg)
        trunk = jnp.full((1,), CONTEXT, jnp.int32)
        feats = jnp.zeros((1, nodes, dcfg.d_model), dtype)
        tokens = jnp.arange(nodes, dtype=jnp.int32)[None]
        positions = trunk[:, None] + jnp.arange(nodes)[None]
        mask = causal_mask(trunk, nodes, dcache.capacity)
        logits, next_feature, dcache = step(feats, tokens, positions, dcache, trunk, mask)
        return dcache, (jax.lax.top_k(logits, nodes), next_feature)

    dcache = init_draft_cache(dcfg, 1, CONTEXT + 64, dtype)
    ms, first, _ = _median_ms(lambda c: level(c, base, draft, head)[0], dcache, repeats)
    return {"ms": ms, "compile_s": _compile_s(first, ms)}


def measure_rounds(base, draft, cfg, dcfg, head, draft_vocab: int, repeats: int, sizes) -> dict:
    """ms per round of each tree (`speculative.measure_round_costs`: `run_segment` programs
    on a batch-1 128-token prompt, the marginal time of a round in 16-round calls, medians of
    interleaved passes)."""
    trees = [TreeConfig(top_k=k, depth=d, total_tokens=m, draft_vocab=draft_vocab)
             for k, d, m in sizes]  # fmt: skip
    t0 = time.perf_counter()
    costs = speculative.measure_round_costs(
        base, cfg, draft, dcfg, speculative.budget_lib.make_budget(trees), batch=1,
        greedy=True, draft_head=head, repeats=repeats, segment=16,
    )  # fmt: skip
    return {
        "ms": {f"{k},{d},{m}": c for (k, d, m), c in zip(sizes, costs[:-2], strict=True)},
        "seconds": time.perf_counter() - t0,
    }


@dataclasses.dataclass
class Sections:
    """Runs named sections in order until the time budget is spent; errors are recorded."""

    budget_s: float
    report: dict
    t0: float = dataclasses.field(default_factory=time.perf_counter)

    def run(self, name: str, fn: Callable[[], Any]) -> Any:
        elapsed = time.perf_counter() - self.t0
        if elapsed > self.budget_s:
            self.report["skipped"].append(f"{name}: time budget spent ({elapsed:.0f} s)")
            return None
        try:
            value = fn()
        except Exception as err:  # noqa: BLE001 (one section failing must not lose the rest)
            self.report["errors"].append(f"{name}: {type(err).__name__}: {err}"[:500])
            print(f"[bench_device] {name} failed: {err}", file=sys.stderr)
            return None
        print(f"[bench_device] {name} done at {time.perf_counter() - self.t0:.0f} s",
              file=sys.stderr)  # fmt: skip
        return value


def run(args: argparse.Namespace) -> dict:
    if args.attention:
        os.environ["GRIFFIN_ATTENTION"] = args.attention
    dtype = jnp.dtype(args.dtype)
    cfg, dcfg, draft_vocab = _sizes(args.size)
    device = jax.devices()[0]
    big = args.size != "tiny"
    repeats = args.repeats or (5 if big else 2)
    verify_widths, decode_batches, prefill_lengths = (
        (QUICK["verify"], QUICK["decode"], QUICK["prefill"])
        if args.quick
        else (VERIFY_WIDTHS, DECODE_BATCHES, PREFILL_LENGTHS)
    )
    report: dict[str, Any] = {
        "size": args.size, "dtype": str(dtype), "backend": jax.default_backend(),
        "device_kind": device.device_kind, "device_count": jax.device_count(),
        "jax": jax.__version__, "attention": args.attention or "auto",
        "skipped": [], "errors": [], "command": " ".join(sys.argv),
    }  # fmt: skip
    sec = Sections(args.budget_s, report)

    measured = sec.run("bandwidth", lambda: measure_bandwidth(2 << 30 if big else 64 << 20, 10))
    nominal = next((v for k, v in NOMINAL_BANDWIDTH.items() if k in device.device_kind), None)
    report["bandwidth"] = {"measured_bytes_per_s": measured, "nominal_bytes_per_s": nominal}
    bandwidth = measured["best"] if measured else None

    t0 = time.perf_counter()
    base, draft = random_models(cfg, dcfg, dtype)
    report["init_s"] = time.perf_counter() - t0
    weight_bytes = _nbytes(base)
    report["weight_bytes"] = {"base": weight_bytes, "draft": _nbytes(draft)}
    head = speculative.make_draft_head(base, cfg, range(draft_vocab))
    kv_token = _kv_bytes_per_token(cfg, dtype)

    decode: dict[str, Any] = {}
    report["decode"] = decode

    def decode_at(batch: int) -> None:
        row = measure_decode(base, cfg, batch, repeats)
        read = weight_bytes + batch * row["context"] * kv_token
        row["bytes_per_step"] = read
        if bandwidth:
            row["roofline_ms"] = 1e3 * read / bandwidth
            row["fraction_of_roofline"] = row["roofline_ms"] / row["ms_per_token"]
        if nominal:
            row["fraction_of_nominal_roofline"] = 1e3 * read / nominal / row["ms_per_token"]
        decode[str(batch)] = row

    sec.run("decode batch 1", lambda: decode_at(1))
    report["verify"] = sec.run(
        "verify", lambda: measure_verify(base, cfg, dtype, verify_widths, repeats)
    )
    rounds: dict[str, Any] = {}
    report["rounds"] = rounds
    for label, h, v in (("full_vocab", None, 0), (f"draft_vocab_{draft_vocab}", head, draft_vocab)):
        rounds[label] = sec.run(
            f"rounds {label}",
            lambda h=h, v=v: measure_rounds(
                base, draft, cfg, dcfg, h, v, 3 if big else 1, args.tree or TREES
            ),
        )
    levels = {}
    for label, h in (("full_vocab", None), (f"draft_vocab_{draft_vocab}", head)):
        levels[label] = sec.run(
            f"draft level {label}",
            lambda h=h: measure_draft_level(base, draft, cfg, dcfg, dtype, h, 10, repeats),
        )
    report["draft_level_k10"] = levels
    for batch in decode_batches[1:]:
        sec.run(f"decode batch {batch}", lambda b=batch: decode_at(b))
    report["prefill"] = sec.run(
        "prefill", lambda: measure_prefill(base, cfg, dtype, prefill_lengths, repeats)
    )
    if report["backend"] == "gpu" and not args.attention:
        # The implementation is chosen when a program is traced: the compiled programs are
        # dropped so that these are traced (and compiled) anew with the einsums.
        jax.clear_caches()
        os.environ["GRIFFIN_ATTENTION"] = "einsum"
        report["verify_einsum_attention"] = sec.run(
            "verify (einsum attention)",
            lambda: measure_verify(base, cfg, dtype, (64, 128), repeats),
        )
        del os.environ["GRIFFIN_ATTENTION"]
        jax.clear_caches()
    stats = device.memory_stats() or {}
    report["peak_memory_bytes"] = stats.get("peak_bytes_in_use")
    report["total_s"] = time.perf_counter() - sec.t0
    report["summary"] = summary(report)
    return report


def summary(report: dict) -> dict:
    """The figures the README reads, each with its goal."""
    out: dict[str, Any] = {}
    d1 = (report.get("decode") or {}).get("1")
    verify = report.get("verify") or {}
    if d1 and "fraction_of_roofline" in d1:
        out["decode_b1_fraction_of_roofline"] = d1["fraction_of_roofline"]  # goal >= 0.7
    if d1 and "64" in verify:
        out["verify64_over_decode"] = verify["64"]["ms"] / d1["ms_per_token"]  # goal <= 1.5
    for label, row in (report.get("rounds") or {}).items():
        if not row:
            continue
        for tree, ms in row["ms"].items():
            if d1:
                out[f"round_{tree}_{label}_decodes"] = ms / d1["ms_per_token"]
            if tree == "10,5,60" and "64" in verify:  # goal <= 1.5 with the draft vocabulary
                out[f"round_10,5,60_{label}_over_verify64"] = ms / verify["64"]["ms"]
    return out


def plot(report: dict, path: pathlib.Path) -> None:
    """Verification ms against tree tokens, and decode ms/token against batch with its
    roofline."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    verify = report.get("verify") or {}
    decode = report.get("decode") or {}
    if verify:
        widths = sorted(int(w) for w in verify)
        a.plot(widths, [verify[str(w)]["ms"] for w in widths], "o-", label="verify forward")
        if "1" in decode:
            a.axhline(decode["1"]["ms_per_token"], color="gray", ls="--", label="1-token decode")
        a.set_xscale("log", base=2)
        a.set_xlabel("tree tokens verified")
        a.set_ylabel("ms")
        a.legend()
    if decode:
        batches = sorted(int(x) for x in decode)
        b.plot(batches, [decode[str(x)]["ms_per_token"] for x in batches], "o-", label="decode")
        if all("roofline_ms" in decode[str(x)] for x in batches):
            b.plot(batches, [decode[str(x)]["roofline_ms"] for x in batches], "k--",
                   label="bandwidth roofline")  # fmt: skip
        b.set_xscale("log", base=2)
        b.set_xlabel("batch")
        b.set_ylabel("ms per step")
        b.legend()
    fig.suptitle(f"{report['size']} {report['dtype']} on {report['device_kind']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def _tree(text: str) -> tuple[int, int, int]:
    try:
        k, d, m = (int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected TOP_K,DEPTH,TOTAL_TOKENS") from None
    if k < 1 or d < 0 or m < 2:
        raise argparse.ArgumentTypeError(f"{text!r}: top_k >= 1, depth >= 0, total_tokens >= 2")
    return k, d, m


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m inference.bench_device", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--size", choices=("8b", "1b", "tiny"), default="8b")
    p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16")
    p.add_argument("--repeats", type=int, default=0, help="timed calls per figure (0: auto)")
    p.add_argument("--budget-s", type=float, default=420.0,
                   help="start no new section after this many seconds")  # fmt: skip
    p.add_argument("--attention", choices=("einsum", "xla", "cudnn"), default=None,
                   help="force one attention implementation (default: per backend)")  # fmt: skip
    p.add_argument("--tree", type=_tree, action="append", default=[],
                   help="TOP_K,DEPTH,TOTAL_TOKENS of a round to time (repeatable; default: "
                   "1,6,8 4,4,16 10,5,60)")  # fmt: skip
    p.add_argument(
        "--quick",
        action="store_true",
        help="fewer sizes per section: verify 1, 8, 64; decode batch 1, 8; prefill 512",
    )
    p.add_argument("--out", type=pathlib.Path, default=None, help="also write the JSON here")
    p.add_argument("--plot", type=pathlib.Path, default=pathlib.Path("bench_device.png"))
    args = p.parse_args(argv)
    if args.repeats < 0:
        p.error("--repeats must be >= 0")
    report = run(args)
    try:
        plot(report, args.plot)
        report["plot"] = str(args.plot)
    except Exception as err:  # noqa: BLE001 (no plot is no reason to lose the figures)
        report["errors"].append(f"plot: {type(err).__name__}: {err}"[:500])
    if args.out:
        cli.write_report(args.out, report)
    print(json.dumps(report, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
