"""`python -m inference.benchmark`: tau, per-depth acceptance, tokens/s and speedup over vanilla.

Runs every question (first turn) of MT-bench-format files (`question.jsonl`: one object per line
with `turns`) at batch 1 (or `--batch N`: N prompts right-padded per call), for vanilla decoding
and for each draft given, at each temperature, all in one process on the same machine and on
one copy of the base's weights (`SpeculativeModel.with_draft`), and writes a JSON report plus
a PNG plot.

Conventions (README "Definitions"): every timed call runs after a warm-up of the same shapes
(prompt-length bucket, tree sizes), prefill included. tau = tokens committed per verification
forward (accepted draft tokens + the bonus), over all rounds. acceptance@d = the fraction of
rounds that accepted at least d draft tokens. speedup = (sum of new tokens / sum of seconds)
of speculative decoding over the same for vanilla decoding, on the same prompts. With
`--repeats R` the whole interleaved pass runs R times and tokens/s and speedup are the medians
over the passes (the per-pass figures are kept in the report): on a shared machine one pass can
be off by 10-30%.

Example:
  python -m inference.benchmark --bench runs/prompts/heldout_code/question.jsonl \\
      --bench ../shared/data/humaneval/question.jsonl --num-questions 20 \\
      --draft griffin=inference/default_model/griffin \\
      --draft eagle2=inference/default_model/eagle2 \\
      --temperature 0 --temperature 1 --out runs/bench/default.json
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import pathlib
import sys
import time
from typing import Any

import jax
import numpy as np

from convert.load_hf import load_hf_config
from griffin_jax import checks, cli, steal, vanilla
from inference.api import (
    DEFAULT_MODEL_DIR,
    SpeculativeModel,
    read_tree_file,
    resolve_tree,
    tree_flags,
    tree_spec,
)
from inference.generate import encode


def read_questions(path: pathlib.Path, limit: int | None) -> list[str]:
    """First turns of an MT-bench-format question file (one JSON object with `turns` a line)."""
    cli.input_file(path, "--bench")
    out = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                turns = json.loads(line)["turns"]
                if not isinstance(turns, list) or not turns or not isinstance(turns[0], str):
                    raise TypeError("turns")
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise checks.InputError(
                    f"{path}, line {number}: expected a JSON object with a non-empty list of "
                    f"strings `turns` (MT-bench format) ({type(err).__name__}: {err})"
                ) from err
            out.append(turns[0])
            if limit is not None and len(out) >= limit:
                break
    if not out:
        raise checks.InputError(f"{path} holds no questions")
    return out


def parse_drafts(specs: list[str]) -> dict[str, tuple[str, str | None]]:
    """--draft NAME=FOLDER[@TREE] values (repeatable) as {name: (folder, tree)}; folders must
    exist. TREE (`auto` or K,D,M[,V]) overrides --tree for that draft, so one run can time the
    same draft with several trees."""
    drafts: dict[str, tuple[str, str | None]] = {}
    for spec in specs:
        name, sep, rest = spec.partition("=")
        folder, at, tree = rest.partition("@")
        if not sep or not name or not folder or (at and not tree):
            raise checks.InputError(f"--draft {spec!r}: expected NAME=FOLDER[@TREE]")
        if name in drafts or name == "vanilla":
            raise checks.InputError(f"--draft {spec!r}: the name {name!r} is taken")
        if not pathlib.Path(folder, "config.json").is_file():
            raise checks.InputError(f"--draft {spec!r}: {folder} has no config.json")
        if tree:
            tree_spec(tree)  # checked now, before any model loads
        drafts[name] = (folder, tree or None)
    return drafts


def check_run_flags(args: argparse.Namespace, temperatures: list[float]) -> None:
    """The flags benchmark and tune_tree share, checked before any model loads."""
    for temperature in temperatures:
        checks.sampling(temperature, 1.0, 0)
    checks.max_new_tokens(args.max_new_tokens)
    cli.positive(args.num_questions, "--num-questions")
    cli.positive(args.repeats, "--repeats")
    if not (math.isfinite(args.max_steal) and 0 < args.max_steal <= 1):
        raise checks.InputError(f"--max-steal must be a share in (0, 1], got {args.max_steal}")
    if not (pathlib.Path(args.base) / "config.json").is_file():
        raise checks.InputError(f"--base {args.base} has no config.json (not a HF model folder)")


def add_steal_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--max-steal", type=float, default=steal.MAX_STEAL,
        help="time a call again while more than this share of the CPUs' time was stolen by "
        "the host (shared VMs; /proc/stat); 1 = never",
    )  # fmt: skip


def encode_checked(
    tokenizer, questions: list[str], cfg, max_new_tokens: int, *, chat: bool
) -> list[list[int]]:
    """Questions as token ids, each within the model's positions with max_new_tokens."""
    prompts = encode(tokenizer, questions, chat=chat, system=None)
    checks.position_limit(
        [len(p) for p in prompts], max_new_tokens, max_positions=cfg.max_position_embeddings,
        flag="--max-new-tokens",
    )  # fmt: skip
    return prompts


def run_methods(
    methods: dict[str, Any],
    prompts: list[list[int]],
    *,
    seed: int = 0,
    batch: int = 1,
    turn: int = 0,
    max_steal: float = steal.MAX_STEAL,
    warm_ups: dict[str, Any] | None = None,
    **knobs,
) -> dict[str, dict[str, Any]]:
    """Times every method on the prompts in batches of `batch`, interleaved batch by batch.

    Each method first warms up every (batch size, prompt-length bucket) shape (by its entry in
    `warm_ups`, e.g. `SpeculativeModel.warm_up`, else by a call of its own). The methods then
    take turns on each batch (right-padded; row b of batch i samples with seed + i * batch + b),
    so a drift in machine speed during the run hits them alike; which method goes first rotates
    from batch to batch (batch i starts with method number (turn + i) mod the count), so none
    always runs right after another's. Each method's seconds per batch are kept, in order.
    A call during which more than `max_steal` of the CPUs' time was stolen (a shared VM's
    host running other guests, `griffin_jax.steal`) is timed again, up to `steal.TRIES` runs,
    keeping the least stolen; `redone` counts the extra runs (an adaptive model learns from
    each run, as from any request). Not with several processes (`--distributed`), whose calls
    must stay in step.
    """
    if jax.process_count() > 1:  # every process must make the same calls, in step
        max_steal = 1.0
    chunks = [prompts[i : i + batch] for i in range(0, len(prompts), batch)]
    shapes = {}
    for chunk in chunks:
        shapes.setdefault((len(chunk), vanilla.prompt_bucket(max(map(len, chunk)))), chunk)
    for name, generate in methods.items():
        for chunk in shapes.values():
            (warm_ups or {}).get(name, generate)(chunk, seed=seed, **knobs)
    acc = {name: {"tokens": 0, "seconds": 0.0, "rounds": 0, "accepts": [], "shapes": [],
                  "batch_seconds": [], "steal": [], "redone": 0, "plain_program": 0}
           for name in methods}  # fmt: skip
    names = list(methods)
    for i, chunk in enumerate(chunks):
        start = (turn + i) % len(names)
        for name in names[start:] + names[:start]:
            run = steal.timed(
                functools.partial(methods[name], chunk, seed=seed + i * batch, **knobs),
                max_steal=max_steal,
            )
            res = run.result
            a = acc[name]
            a["steal"].append(run.steal)
            a["redone"] += run.runs - 1
            a["tokens"] += res.new_tokens
            a["seconds"] += res.seconds
            a["batch_seconds"].append(res.seconds)
            a["rounds"] += sum(res.rounds)
            a["plain_program"] += int(getattr(res, "plain_program", False))  # any result kind
            for row in res.accept_lengths:
                a["accepts"].extend(row)
            for row in res.round_shapes:
                a["shapes"].extend(row)
    out = {}
    for name, a in acc.items():
        row = {"new_tokens": a["tokens"], "seconds": a["seconds"], "rounds": a["rounds"],
               "tokens_per_s": a["tokens"] / a["seconds"],
               "batch_seconds": a["batch_seconds"], "redone": a["redone"],
               "max_steal_kept": max(a["steal"], default=0.0),
               "plain_program_calls": a["plain_program"]}  # fmt: skip
        if a["accepts"]:
            lens = np.asarray(a["accepts"])
            row["tau"] = float(lens.mean() + 1)
            row["accept_hist"] = np.bincount(lens).tolist()
            row["acceptance_at_depth"] = [
                float((lens >= d).mean()) for d in range(1, lens.max() + 2)
            ]
        if a["shapes"]:  # how often each round shape ran (one, for a fixed tree)
            names, counts = np.unique(a["shapes"], return_counts=True)
            row["round_shapes"] = {str(n): int(c) for n, c in zip(names, counts, strict=True)}
        out[name] = row
    return out


def median_of_passes(passes: list[dict[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Combines repeated `run_methods` passes: the first pass's counts (every pass decodes the
    same tokens), tokens/s as the median over passes, each draft's speedup as the median of
    its per-pass speedups over that pass's vanilla (both timed in the same pass), and every
    pass's seconds per batch (`batch_seconds[pass][batch]`); calls redone for stolen CPU
    time and calls the plain decoder's program ran (`SpeculativeModel.generate`) are summed over
    the passes."""
    out = {name: dict(row) for name, row in passes[0].items()}
    for name, row in out.items():
        runs = [p[name]["tokens_per_s"] for p in passes]
        row["tokens_per_s"] = float(np.median(runs))
        row["tokens_per_s_passes"] = runs
        row["batch_seconds"] = [p[name]["batch_seconds"] for p in passes]
        row["redone"] = sum(p[name]["redone"] for p in passes)
        row["plain_program_calls"] = sum(p[name]["plain_program_calls"] for p in passes)
        row["max_steal_kept"] = max(p[name]["max_steal_kept"] for p in passes)
        if name != "vanilla":
            ratios = [p[name]["tokens_per_s"] / p["vanilla"]["tokens_per_s"] for p in passes]
            row["speedup"] = float(np.median(ratios))
            row["speedup_passes"] = ratios
    return out


def plot(report: dict[str, Any], path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["results"]
    labels = [f"{r['bench']}\nT={r['temperature']:g}" for r in rows]
    drafts = sorted({d for r in rows for d in r["drafts"]})
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.8 / max(len(drafts), 1)
    x = np.arange(len(rows))
    for i, d in enumerate(drafts):
        taus = [r["drafts"].get(d, {}).get("tau", 0) for r in rows]
        speed = [r["drafts"].get(d, {}).get("speedup", 0) for r in rows]
        axes[0].bar(x + i * width, taus, width, label=d)
        axes[1].bar(x + i * width, speed, width, label=d)
    for ax, title in zip(
        axes, ("tau (tokens per verification)", "speedup over vanilla"), strict=True
    ):
        ax.set_xticks(x + width * (len(drafts) - 1) / 2, labels, fontsize=8)
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
        ax.legend()
    axes[1].axhline(1.0, color="k", lw=0.8)
    fig.suptitle(report["machine"])
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = cli.ArgumentParser(
        prog="python -m inference.benchmark",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--base", type=pathlib.Path, default=DEFAULT_MODEL_DIR / "base")
    p.add_argument(
        "--draft",
        action="append",
        default=[],
        help="NAME=FOLDER (repeatable); default: the default griffin and eagle2 drafts",
    )
    p.add_argument("--bench", action="append", type=pathlib.Path, default=[])
    p.add_argument("--num-questions", type=int, default=None)
    p.add_argument("--temperature", action="append", type=float, default=[])
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--total-tokens", type=int, default=None)
    p.add_argument("--tree", default=None, help="auto or TOP_K,DEPTH,TOTAL_TOKENS[,DRAFT_VOCAB]")
    p.add_argument("--depth", type=int, default=None)
    p.add_argument("--tree-top-k", type=int, default=None)
    p.add_argument("--draft-vocab", type=int, default=None, help="0 = all tokens")
    p.add_argument("--chat", action="store_true")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--mesh", default=None, help="shard over a device mesh, e.g. data=1,model=8")
    p.add_argument("--repeats", type=int, default=1, help="interleaved passes (median)")
    p.add_argument("--batch", type=int, default=1, help="prompts per call (right-padded)")
    add_steal_flag(p)
    p.add_argument("--out", type=pathlib.Path, default=pathlib.Path("runs/bench/report.json"))
    cli.add_distributed_flags(p)
    args = p.parse_args(argv)
    cli.positive(args.batch, "--batch")
    cli.start_distributed(args)

    drafts = parse_drafts(args.draft) or {
        name: (str(DEFAULT_MODEL_DIR / name), None)
        for name in ("griffin", "eagle2")
        if (DEFAULT_MODEL_DIR / name / "config.json").exists()
    }
    benches = args.bench or [pathlib.Path("runs/prompts/heldout_code/question.jsonl")]
    temperatures = args.temperature or [0.0, 1.0]
    check_run_flags(args, temperatures)
    cli.output_file(args.out, "--out")
    questions = {bench: read_questions(bench, args.num_questions) for bench in benches}
    tree_sizes = tree_flags(args)
    trees = {name: tree_spec(tree) if tree else tree_sizes for name, (_, tree) in drafts.items()}
    cfg = load_hf_config(args.base)
    for name, (folder, _) in drafts.items():
        stored = read_tree_file(pathlib.Path(folder))
        resolve_tree(stored, vocab_size=cfg.vocab_size, **trees[name])
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.base)
    prompts_of = {
        bench: encode_checked(tokenizer, qs, cfg, args.max_new_tokens, chat=args.chat)
        for bench, qs in questions.items()
    }
    base = SpeculativeModel.from_pretrained(
        args.base, dtype=args.dtype, with_draft=False, mesh=args.mesh, load_tokenizer=False
    )
    models = {}
    for name, (folder, _) in drafts.items():
        # every draft over the one base: all methods time the same weights (`with_draft`)
        m = base.with_draft(folder, **trees[name])
        models[name] = m
        mode = "adaptive over " if m.adaptive else ""
        print(f"{name}: {m.dcfg.kind} draft, tree {mode}{m.tree_cfg}", file=sys.stderr)
    report: dict[str, Any] = {"machine": cli.machine(), "base": str(args.base), "drafts": drafts,
                              "max_new_tokens": args.max_new_tokens, "batch": args.batch,
                              "results": [],
                              "trees": {n: {**vars(m.tree_cfg), "auto": m.adaptive}
                                        for n, m in models.items()},
                              "command": " ".join(sys.argv)}  # fmt: skip
    for bench, prompts in prompts_of.items():
        for temperature in temperatures:
            knobs = dict(temperature=temperature, max_new_tokens=args.max_new_tokens, seed=0)
            t0 = time.time()
            methods = {"vanilla": base.vanilla_generate}
            methods.update({name: m.generate for name, m in models.items()})
            warm_ups = {name: m.warm_up for name, m in models.items()}
            run = dict(batch=args.batch, max_steal=args.max_steal, warm_ups=warm_ups, **knobs)
            passes = [run_methods(methods, prompts, turn=p, **run) for p in range(args.repeats)]
            results = median_of_passes(passes)
            row: dict[str, Any] = {"bench": bench.parent.name, "temperature": temperature,
                                   "questions": len(prompts), "vanilla": results.pop("vanilla"),
                                   "drafts": results}  # fmt: skip
            report["results"].append(row)
            summary = ", ".join(
                f"{n}: tau {r['tau']:.2f} speedup {r['speedup']:.2f}x"
                for n, r in row["drafts"].items()
            )
            redone = sum(r["redone"] for r in (row["vanilla"], *row["drafts"].values()))
            print(f"{row['bench']} T={temperature:g}: vanilla "
                  f"{row['vanilla']['tokens_per_s']:.1f} tok/s; {summary} "
                  f"({time.time() - t0:.0f}s; {redone} calls timed again for stolen CPU "
                  f"time)", file=sys.stderr)  # fmt: skip
    # each draft's measured round costs per batch size and class, and after them, where it
    # chose them, each shape's threads (`SpeculativeModel.round_costs`)
    report["round_costs"] = {name: m.measured_costs() for name, m in models.items()}
    if jax.process_index() != 0:  # with --distributed, process 0 writes the report
        print(f"[process {jax.process_index()}] done", file=sys.stderr)
        return 0
    cli.write_report(args.out, report)
    plot(report, args.out.with_suffix(".png"))
    print(json.dumps({"report": str(args.out), "plot": str(args.out.with_suffix(".png"))}))
    return 0


if __name__ == "__main__":
    cli.use_compile_cache()
    sys.exit(cli.run(main))
