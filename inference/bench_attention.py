"""`python -m inference.bench_attention`: the base forward under each attention implementation.

A forward of W new tokens after P cached slots, on a cache of C slots (one device, the decode
layout the inference API uses, batch 1, the default model unless `--base`), compiled once per
implementation of `griffin_jax.layers.attention_implementation` named in `--implementations`
(each traced with `GRIFFIN_ATTENTION` set to it), then the programs take turns call by call
(`--repeats` calls each, donated caches, medians). The logits of each are compared with the
first's. The cache's slots hold zeros: the attention's cost does not depend on their values,
and the window a forward reads (`layers.attention_spans`) follows from P + W as in generation.

  python -m inference.bench_attention --widths 1 2 8 60 --context 100:256 --context 200:512 \\
      --context 900:2048 --out docs/bench_attention.json

compares the CPU kernel with XLA's einsums by default (`--implementations cpu einsum`).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from griffin_jax import checks, cli
from griffin_jax.kv_cache import causal_mask, init_cache
from griffin_jax.model import forward
from inference.api import DEFAULT_MODEL_DIR, SpeculativeModel

IMPLEMENTATIONS = ("cpu", "einsum", "xla", "cudnn")


def _context(text: str) -> tuple[int, int]:
    """ "P:C" -> (cached slots, capacity), P < C."""
    parts = text.split(":")
    if len(parts) != 2 or not all(p.isdigit() for p in parts):
        raise checks.InputError(f"--context: CACHED:CAPACITY expected, got {text!r}")
    cached, capacity = map(int, parts)
    cli.positive(capacity, "--context capacity")
    return cached, capacity


def time_forwards(model, implementations, width, cached, capacity, repeats) -> dict:
    """{implementation: median ms} of the forward and the largest logit difference from the
    first implementation's."""
    cfg, params = model.cfg, model.base_params
    length = jnp.asarray([cached], jnp.int32)
    tokens = jnp.full((1, width), 5, jnp.int32)
    positions = length[:, None] + jnp.arange(width)[None]
    mask = causal_mask(length, width, capacity)
    runs = {}
    for name in implementations:
        os.environ["GRIFFIN_ATTENTION"] = name  # read when the forward is traced

        @functools.partial(jax.jit, donate_argnums=0)
        def step(cache, params, tokens, positions, at, mask):
            logits, _, cache = forward(params, tokens, positions, cache, write_idx=at,
                                       mask=mask, cfg=cfg)  # fmt: skip
            return cache, logits

        cache = init_cache(cfg, 1, capacity, jnp.float32, per_layer=True)
        cache, logits = step(cache, params, tokens, positions, length, mask)  # traced here
        runs[name] = [step, cache, np.asarray(logits), []]
    del os.environ["GRIFFIN_ATTENTION"]
    for _ in range(repeats):
        for run in runs.values():
            step, cache = run[0], run[1]
            t0 = time.perf_counter()
            cache, logits = step(cache, params, tokens, positions, length, mask)
            jax.block_until_ready(logits)
            run[3].append(time.perf_counter() - t0)
            run[1] = cache
    first = runs[implementations[0]][2]
    return {
        "ms": {n: float(np.median(r[3])) * 1e3 for n, r in runs.items()},
        "max_logit_diff": {n: float(np.abs(r[2] - first).max()) for n, r in runs.items()},
    }


def main(argv: list[str] | None = None) -> int:
    p = cli.ArgumentParser(prog="python -m inference.bench_attention", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--base", type=pathlib.Path, default=DEFAULT_MODEL_DIR / "base")
    p.add_argument("--widths", type=int, nargs="+", default=[1, 2, 8, 60],
                   help="new tokens per forward")  # fmt: skip
    p.add_argument("--context", action="append", default=[], help="CACHED:CAPACITY slots")
    p.add_argument("--implementations", nargs="+", default=["cpu", "einsum"],
                   choices=IMPLEMENTATIONS)  # fmt: skip
    p.add_argument("--repeats", type=int, default=60)
    p.add_argument("--out", type=pathlib.Path, default=None, help="JSON report")
    args = p.parse_args(argv)
    widths, implementations = args.widths, args.implementations
    for width in widths:
        cli.positive(width, "--widths")
    contexts = [_context(c) for c in args.context] or [(200, 512)]
    cli.positive(args.repeats, "--repeats")
    cli.output_file(args.out, "--out")
    for cached, capacity in contexts:
        if cached + max(widths) > capacity:
            raise checks.InputError(
                f"--context {cached}:{capacity}: {cached} cached + {max(widths)} new slots "
                "exceed the capacity"
            )
    model = SpeculativeModel.from_pretrained(args.base, with_draft=False, load_tokenizer=False)
    report = {"machine": cli.machine(), "backend": jax.default_backend(),
              "command": " ".join(sys.argv), "rows": []}  # fmt: skip
    for cached, capacity in contexts:
        for width in widths:
            row = time_forwards(model, implementations, width, cached, capacity, args.repeats)
            row.update(width=width, cached=cached, capacity=capacity)
            report["rows"].append(row)
            times = ", ".join(f"{n} {ms:.3f}" for n, ms in row["ms"].items())
            print(f"W={width} after {cached} of {capacity} slots: {times} ms", file=sys.stderr)
    if args.out:
        cli.write_report(args.out, report)
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
