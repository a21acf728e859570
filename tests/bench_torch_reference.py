"""`python tests/bench_torch_reference.py`: this engine against the PyTorch version of the
reference's generation loop (`torch_ref_generate.py`: written from the spec in the reference's
structure, transformers' Llama as the base) on the same weights and prompts.

Greedy, batch 1, f32, one process: every method first runs each prompt-length bucket once
(untimed: compiles), then the methods take turns prompt by prompt (`inference.benchmark.
run_methods`: the first method rotates, a call that met stolen CPU time is timed again), for
`--repeats` passes; tokens/s are medians over the passes, prefill included on both sides.
Methods: this engine's vanilla decoding, transformers' greedy loop over a `DynamicCache`
(`transformers vanilla`), and for each `--tree K,D,M[,V]` this engine and the PyTorch loop
(`engine K,D,M[,V]`, `torch K,D,M`; the engine drafts over the whole vocabulary, as the
reference does, unless V names its draft vocabulary: lossless, another tree). Greedy outputs
are compared token for token (`same_output`: rows whose new ids equal this engine's vanilla
output). The PyTorch loop is not GRIFFIN's official code, which is not published where this
project can install from: a transcription of its algorithm, so the ratio says what the same
algorithm costs in each stack.

With `--eagle-llm DIR` (`pip install --no-deps --target DIR eagle-llm==1.2.1`: the official
EAGLE release, EAGLE-1's static-tree loop, `official_eagle.py`) the authors' own code runs too,
on an EAGLE-2 draft (`--eagle-draft`, default the project's): `official 26 (mc_sim_7b_63)`, the
release's default tree, and for each `--official-tree K,D,M[,V]` the release on a static tree
of M nodes and at most D + 1 levels (`official_eagle.static_tree`) against this engine on the
same draft with the dynamic tree (K, D, M) (`engine eagle2 K,D,M[,V]`, over the draft
vocabulary V if given; `over_official`: the ratio of their tokens/s, the median of the
passes' ratios).

Run from the repository root (needs the prompt files; see README "The default model"):
  python tests/bench_torch_reference.py --bench runs/prompts/heldout_code/question.jsonl \\
      --num-questions 8 --tree 10,5,60 --tree 1,6,8 --max-new-tokens 96 --repeats 2 \\
      --out docs/bench_torch_reference.json
and against the official release (README "Against the official EAGLE release" has the run
on three prompt sets):
  python tests/bench_torch_reference.py --bench runs/prompts/heldout_code/question.jsonl \\
      --num-questions 8 --tree 10,5,60 --max-new-tokens 96 --repeats 2 \\
      --eagle-llm runs/eagle_llm --official-tree 10,5,60 --official-tree 10,5,60,1024 \\
      --official-tree 4,4,26 --out docs/bench_official_eagle.json
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import official_eagle  # noqa: E402
import torch  # noqa: E402
import torch_ref_generate  # noqa: E402

from griffin_jax import cli  # noqa: E402
from griffin_jax.checks import InputError  # noqa: E402
from inference.api import (  # noqa: E402
    DEFAULT_MODEL_DIR,
    GenerationOutput,
    SpeculativeModel,
    parse_tree,
)
from inference.benchmark import (  # noqa: E402
    add_steal_flag,
    encode_checked,
    median_of_passes,
    read_questions,
    run_methods,
)


def _name(tree) -> str:
    """ "K,D,M" or "K,D,M,V" (a draft vocabulary given)."""
    return ",".join(map(str, tree if len(tree) == 3 or tree[3] else tree[:3]))


def prompt_by_prompt(run_one, setup=None):
    """A `run_methods` method from `run_one(prompt, max_new_tokens) -> (new ids, accepted draft
    tokens per round)`, greedy, on each prompt of a batch, one after another; `setup()` runs
    first, untimed."""

    def generate(prompts, *, seed, **knobs):
        del seed  # greedy
        if setup is not None:
            setup()
        t0 = time.perf_counter()
        outs, accepts = [], []
        for prompt in prompts:
            new, acc = run_one(prompt, knobs["max_new_tokens"])
            outs.append(new)
            accepts.append(acc)
        return GenerationOutput(outs, [len(a) for a in accepts], accepts, time.perf_counter() - t0)

    return generate


def torch_method(tbase, tdraft, tree, eos_id):
    """The PyTorch loop (`torch_ref_generate.generate`) at the tree (K, D, M)."""
    k, d, m = tree
    return prompt_by_prompt(
        lambda prompt, n: torch_ref_generate.generate(
            tbase, tdraft, prompt, max_new_tokens=n, top_k=k, depth=d, total=m, eos_id=eos_id
        )
    )


def official_method(model, choices, eos_id):
    """The official release's greedy loop (`official_eagle.generate`) on the static tree
    `choices`."""
    return prompt_by_prompt(
        lambda prompt, n: official_eagle.generate(model, prompt, max_new_tokens=n, eos_id=eos_id),
        setup=lambda: official_eagle.set_tree(model, choices),
    )


def transformers_vanilla(tbase, eos_id):
    """A `run_methods` method: `torch_ref_generate.vanilla_generate` on each prompt."""

    def generate(prompts, *, seed, **knobs):
        del seed
        t0 = time.perf_counter()
        outs = [torch_ref_generate.vanilla_generate(
                    tbase, p, max_new_tokens=knobs["max_new_tokens"], eos_id=eos_id)
                for p in prompts]  # fmt: skip
        return GenerationOutput(outs, [len(o) for o in outs], [[] for _ in outs],
                                time.perf_counter() - t0)  # fmt: skip

    return generate


def main(argv: list[str] | None = None) -> int:
    p = cli.ArgumentParser(prog="python tests/bench_torch_reference.py", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--base", type=pathlib.Path, default=DEFAULT_MODEL_DIR / "base")
    p.add_argument("--draft", type=pathlib.Path, default=DEFAULT_MODEL_DIR / "griffin")
    p.add_argument("--bench", action="append", type=pathlib.Path, default=[])
    p.add_argument("--num-questions", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--tree", action="append", default=[], help="TOP_K,DEPTH,TOTAL_TOKENS[,VOCAB]")
    p.add_argument("--repeats", type=int, default=1, help="interleaved passes (median)")
    p.add_argument(
        "--eagle-llm",
        type=pathlib.Path,
        default=None,
        help="folder of the official eagle-llm release (pip install --target)",
    )
    p.add_argument("--eagle-draft", type=pathlib.Path, default=DEFAULT_MODEL_DIR / "eagle2")
    p.add_argument("--official-tree", action="append", default=[], help="TOP_K,DEPTH,TOTAL_TOKENS")
    add_steal_flag(p)
    p.add_argument("--out", type=pathlib.Path, default=None, help="JSON report")
    args = p.parse_args(argv)
    cli.positive(args.repeats, "--repeats")
    cli.output_file(args.out, "--out")
    trees = [parse_tree(t) for t in args.tree] or [(10, 5, 60, 0)]
    official_trees = [parse_tree(t) for t in args.official_tree]
    if official_trees and args.eagle_llm is None:
        raise InputError("--official-tree needs --eagle-llm (the official release folder)")
    static = {}  # the release's method is named by its tree's node count
    for k, d, m, _ in official_trees:
        if static.setdefault(m, (k, d)) != (k, d):
            raise InputError(f"--official-tree: two trees of {m} nodes with other K or D")
    benches = args.bench or [pathlib.Path("runs/prompts/heldout_code/question.jsonl")]
    questions = {b: read_questions(b, args.num_questions) for b in benches}
    torch.set_num_threads(os.cpu_count() or 1)

    vanilla = SpeculativeModel.from_pretrained(args.base, with_draft=False)
    cfg = vanilla.cfg
    eos_id = cfg.eos_token_ids[0] if cfg.eos_token_ids else None
    tbase, tdraft = torch_ref_generate.load_pair(args.base, args.draft)
    methods = {"vanilla": vanilla.vanilla_generate,
               "transformers vanilla": transformers_vanilla(tbase, eos_id)}  # fmt: skip
    for tree in trees:
        k, d, m, v = tree
        engine = SpeculativeModel.from_pretrained(
            args.base, args.draft, load_tokenizer=False, top_k=k, depth=d, total_tokens=m,
            draft_vocab=v,
        )  # fmt: skip
        methods[f"engine {_name(tree)}"] = engine.generate
        methods[f"torch {_name(tree[:3])}"] = torch_method(tbase, tdraft, tree[:3], eos_id)
    if args.eagle_llm is not None:
        official = official_eagle.load(args.eagle_llm, args.base, args.eagle_draft)
        release = sys.modules["eagle.model.ea_model"]
        methods["official 26 (mc_sim_7b_63)"] = official_method(
            official, release.mc_sim_7b_63, eos_id
        )
        for tree in official_trees:
            k, d, m, v = tree
            engine = SpeculativeModel.from_pretrained(
                args.base, args.eagle_draft, load_tokenizer=False, top_k=k, depth=d,
                total_tokens=m, draft_vocab=v,
            )  # fmt: skip
            methods[f"engine eagle2 {_name(tree)}"] = engine.generate
            choices = official_eagle.static_tree(m, d + 1, k)
            methods[f"official {m}"] = official_method(official, choices, eos_id)
    report = {"machine": cli.machine(),
              "command": " ".join(sys.argv), "max_new_tokens": args.max_new_tokens,
              "results": []}  # fmt: skip
    for bench, qs in questions.items():
        prompts = encode_checked(vanilla.tokenizer, qs, cfg, args.max_new_tokens, chat=False)
        got = {name: [method([q], seed=0, max_new_tokens=args.max_new_tokens).output_ids[0]
                      for q in prompts]
               for name, method in methods.items()}  # fmt: skip
        same = {name: sum(g == w for g, w in zip(ids, got["vanilla"], strict=True))
                for name, ids in got.items()}  # fmt: skip
        passes = [run_methods(methods, prompts, turn=i, max_steal=args.max_steal,
                              max_new_tokens=args.max_new_tokens)
                  for i in range(args.repeats)]  # fmt: skip
        rows = median_of_passes(passes)
        for name, row in rows.items():
            row["same_output"] = same[name]
        for tree in trees:
            mine, theirs = f"engine {_name(tree)}", f"torch {_name(tree[:3])}"
            ratios = [q[mine]["tokens_per_s"] / q[theirs]["tokens_per_s"] for q in passes]
            rows[mine]["over_torch"] = float(np.median(ratios))
            rows[mine]["over_torch_passes"] = ratios
        for tree in official_trees:
            mine, theirs = f"engine eagle2 {_name(tree)}", f"official {tree[2]}"
            ratios = [q[mine]["tokens_per_s"] / q[theirs]["tokens_per_s"] for q in passes]
            rows[mine]["over_official"] = float(np.median(ratios))
            rows[mine]["over_official_passes"] = ratios
        report["results"].append({"bench": bench.parent.name, "questions": len(prompts),
                                  "methods": rows})  # fmt: skip
        line = "; ".join(
            f"{n}: {r['tokens_per_s']:.1f} tok/s, tau {r.get('tau', 1.0):.2f}"
            + (f", {r['over_torch']:.2f}x torch" if "over_torch" in r else "")
            + (f", {r['over_official']:.2f}x official" if "over_official" in r else "")
            + f", same {r['same_output']}/{len(prompts)}"
            for n, r in rows.items()
        )
        print(f"{bench.parent.name}: {line}", file=sys.stderr)
    if args.out:
        cli.write_report(args.out, report)
    print(json.dumps({r["bench"]: {n: round(m["tokens_per_s"], 1) for n, m in r["methods"].items()}
                      for r in report["results"]}))  # fmt: skip
    return 0


if __name__ == "__main__":
    cli.use_compile_cache()
    sys.exit(cli.run(main))
