"""`python -m inference.bench_threads`: where the CPU kernels should split their large calls, for
vanilla and for speculative decoding, timed call by call in one process.

The project's kernels (`griffin_jax.cpu_kernels`) split a large product or attention between
the calling thread and either the library's helper threads (the default) or XLA's intra-op
pool (`GRIFFIN_CPU_THREADS=xla`). Each output element is the same sum either way, so the
choice only moves speed, and `cpu_kernels.set_chunk_threads` switches it between calls of the
same compiled programs. Timing two processes one after the other on a shared VM mixes the
choice with the machine's drift (+-5% between runs here); this script alternates the two
settings call by call (the order of the four (method, setting) pairs shuffled for every batch),
so both meet the same machine, and reports each method's per-call change on XLA's pool
against the helpers, paired by call. Every call's new tokens must be equal across the four
(greedy, or seeded sampling: speculative decoding emits vanilla's tokens), which is checked.
With `--tree auto` the policy's round costs are measured (or read from the cost cache) on the
default setting, in the warm-up. The per-shape choice of `Budget.chunks` is off here (as with
`GRIFFIN_CPU_THREADS` given): every call runs where the script sets it.

Example:
  python -m inference.bench_threads --bench runs/prompts/heldout_code/question.jsonl \\
      --num-questions 8 --batch 1 --tree 1,3,5,1024 --passes 6 --out runs/bench/threads.json
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import random
import sys
import time
from typing import Any

import numpy as np

from griffin_jax import checks, cli, cpu_kernels
from inference.api import DEFAULT_MODEL_DIR, SpeculativeModel, tree_spec
from inference.benchmark import encode_checked, read_questions

SETTINGS = ("helpers", "xla")


def paired(times: dict[str, list[list[float]]]) -> dict[str, float]:
    """Each setting's ms a call (the mean over batches of the median over passes) and XLA's
    pool's relative change against the helpers, call by call (median, mean, standard error)."""
    helpers, pool = (np.asarray(times[s], np.float64) for s in SETTINGS)
    change = (pool - helpers) / helpers
    return {
        "helpers_ms": float(np.mean(np.median(helpers, axis=1)) * 1e3),
        "xla_ms": float(np.mean(np.median(pool, axis=1)) * 1e3),
        "xla_change_median": float(np.median(change)),
        "xla_change_mean": float(change.mean()),
        "xla_change_stderr": float(change.std() / np.sqrt(change.size)),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--base", type=pathlib.Path, default=DEFAULT_MODEL_DIR / "base")
    p.add_argument("--draft", type=pathlib.Path, default=DEFAULT_MODEL_DIR / "griffin")
    p.add_argument("--tree", default="1,3,5,1024", help="auto or TOP_K,DEPTH,TOTAL_TOKENS[,V]")
    p.add_argument("--bench", type=pathlib.Path,
                   default=pathlib.Path("runs/prompts/heldout_code/question.jsonl"))  # fmt: skip
    p.add_argument("--num-questions", type=int, default=8, help="batches of --batch prompts")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--passes", type=int, default=6)
    p.add_argument("--out", type=pathlib.Path, default=pathlib.Path("runs/bench/threads.json"))
    args = p.parse_args(argv)
    for value, flag in [(args.num_questions, "--num-questions"), (args.batch, "--batch"),
                        (args.passes, "--passes")]:  # fmt: skip
        cli.positive(value, flag)
    checks.sampling(args.temperature, 1.0, 0)
    checks.max_new_tokens(args.max_new_tokens)
    cli.output_file(args.out, "--out")
    if cpu_kernels.library() is None:
        raise checks.InputError("the project's CPU kernels did not build here: nothing to split")
    # The models' segments would set each shape's measured threads (`Budget.chunks`); with the
    # variable given they keep the process's, which `call` sets (helpers unless said).
    os.environ.setdefault("GRIFFIN_CPU_THREADS", "helpers")
    from transformers import AutoTokenizer

    questions = read_questions(args.bench, args.num_questions * args.batch)
    base = SpeculativeModel.from_pretrained(args.base, with_draft=False, load_tokenizer=False)
    model = base.with_draft(args.draft, **tree_spec(args.tree))
    tokenizer = AutoTokenizer.from_pretrained(args.base)
    prompts = encode_checked(tokenizer, questions, base.cfg, args.max_new_tokens, chat=False)
    batches = [prompts[i : i + args.batch] for i in range(0, len(prompts), args.batch)]
    knobs = dict(temperature=args.temperature, max_new_tokens=args.max_new_tokens, seed=0)
    methods = {"vanilla": base.vanilla_generate, "speculative": model.generate}

    def call(method: str, setting: str, batch: list[list[int]]) -> tuple[list, float]:
        cpu_kernels.set_chunk_threads(setting)
        t0 = time.perf_counter()
        out = methods[method](batch, **knobs).output_ids
        return out, time.perf_counter() - t0

    try:
        for batch in batches:  # compiles every program the calls run, under both settings
            model.warm_up(batch, **knobs)
            for setting in SETTINGS:
                for method in methods:
                    call(method, setting, batch)
        times = {m: {s: [[] for _ in batches] for s in SETTINGS} for m in methods}
        rng = random.Random(0)
        for _ in range(args.passes):
            for i, batch in enumerate(batches):
                pairs = [(m, s) for m in methods for s in SETTINGS]
                rng.shuffle(pairs)
                outs = []
                for method, setting in pairs:
                    out, seconds = call(method, setting, batch)
                    times[method][setting][i].append(seconds)
                    outs.append(out)
                if any(o != outs[0] for o in outs):
                    raise RuntimeError(f"batch {i}: the new tokens differ between the calls")
    finally:
        cpu_kernels.set_chunk_threads(None)
    results = {m: paired(times[m]) for m in methods}
    report: dict[str, Any] = {
        "machine": cli.machine(), "base": str(args.base), "draft": str(args.draft),
        "tree": args.tree, "batch": args.batch, "temperature": args.temperature,
        "max_new_tokens": args.max_new_tokens, "batches": len(batches), "passes": args.passes,
        "results": results, "times": times, "command": " ".join(sys.argv),
    }  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    for method, r in results.items():
        print(
            f"batch {args.batch} T={args.temperature:g} tree {args.tree} {method}: helpers "
            f"{r['helpers_ms']:.2f} ms, xla {r['xla_ms']:.2f} ms a call; xla vs helpers "
            f"{100 * r['xla_change_median']:+.1f}% (mean {100 * r['xla_change_mean']:+.1f} "
            f"+- {100 * r['xla_change_stderr']:.1f}%)",
            file=sys.stderr,
        )
    print(json.dumps({m: {k: round(v, 4) for k, v in r.items()} for m, r in results.items()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
