"""`python -m inference.tune_tree`: measure the best (total_tokens, depth, top_k) on this machine.

For each candidate tree it runs speculative decoding over the same prompts (batch 1, after a
warm-up of each shape, prefill included) and compares new tokens per second with vanilla
decoding measured in the same run, the methods taking turns prompt by prompt. The fastest
tree is printed and, with `--write`, stored as `tree.json` next to the draft, where
`SpeculativeModel.from_pretrained` (and so `python -m inference.generate`) picks it up as the
default (with `"auto": true` kept there, as the largest shape of the adaptive budget).
"""

from __future__ import annotations

import json
import pathlib
import sys

from griffin_jax import checks, cli
from griffin_jax.config import TreeConfig
from inference.api import (
    DEFAULT_MODEL_DIR,
    TREE_FILE,
    SpeculativeModel,
    parse_tree,
    read_tree_file,
)
from inference.benchmark import (
    add_steal_flag,
    check_run_flags,
    encode_checked,
    median_of_passes,
    read_questions,
    run_methods,
)

DEFAULT_TREES = ((4, 3, 12, 0), (4, 4, 16, 0), (6, 4, 24, 0), (8, 4, 32, 0), (10, 5, 60, 0))


def main(argv: list[str] | None = None) -> int:
    p = cli.ArgumentParser(prog="python -m inference.tune_tree", description=__doc__)
    p.add_argument("--base", type=pathlib.Path, default=DEFAULT_MODEL_DIR / "base")
    p.add_argument("--draft", type=pathlib.Path, default=DEFAULT_MODEL_DIR / "griffin")
    p.add_argument("--bench", type=pathlib.Path,
                   default=pathlib.Path("runs/prompts/heldout_code/question.jsonl"))  # fmt: skip
    p.add_argument("--num-questions", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--tree", action="append", type=str, default=[],
                   help="TOP_K,DEPTH,TOTAL_TOKENS[,DRAFT_VOCAB] (repeatable)")  # fmt: skip
    p.add_argument("--repeats", type=int, default=1, help="interleaved passes (median)")
    add_steal_flag(p)
    p.add_argument("--write", action="store_true", help="store the best as tree.json")
    p.add_argument("--out", type=pathlib.Path, default=None, help="JSON report")
    args = p.parse_args(argv)
    tree_sizes = [parse_tree(t) for t in args.tree] or list(DEFAULT_TREES)
    check_run_flags(args, [args.temperature])
    if not (args.draft / "config.json").is_file():
        raise checks.InputError(f"--draft {args.draft} has no config.json (not a draft folder)")
    cli.output_file(args.out, "--out")
    questions = read_questions(args.bench, args.num_questions)

    model = SpeculativeModel.from_pretrained(args.base, args.draft)
    model.adaptive = False  # each candidate is timed as one fixed tree
    prompts = encode_checked(model.tokenizer, questions, model.cfg, args.max_new_tokens, chat=False)
    knobs = dict(temperature=args.temperature, max_new_tokens=args.max_new_tokens)
    trees = {f"{k},{d},{m},{v}": TreeConfig(top_k=k, depth=d, total_tokens=m, draft_vocab=v)
             for k, d, m, v in tree_sizes}  # fmt: skip

    def with_tree(tree: TreeConfig):
        def run(prompts, **kw):
            model.tree_cfg = tree
            return model.generate(prompts, **kw)

        return run

    methods = {"vanilla": model.vanilla_generate}
    methods.update({name: with_tree(tree) for name, tree in trees.items()})
    results = median_of_passes(
        [
            run_methods(methods, prompts, turn=p, max_steal=args.max_steal, **knobs)
            for p in range(args.repeats)
        ]
    )
    vanilla = results.pop("vanilla")
    rows = []
    for name, res in results.items():
        tree = trees[name]
        res.update(top_k=tree.top_k, depth=tree.depth, total_tokens=tree.total_tokens,
                   draft_vocab=tree.draft_vocab)  # fmt: skip
        rows.append(res)
        line = (
            f"top_k={tree.top_k} depth={tree.depth} total_tokens={tree.total_tokens} "
            f"draft_vocab={tree.draft_vocab or 'all'}: "
            f"tau {res['tau']:.2f}, {res['tokens_per_s']:.1f} tok/s, speedup {res['speedup']:.2f}x"
        )
        print(line, file=sys.stderr)
    best = max(rows, key=lambda r: r["speedup"])
    tree = {key: best[key] for key in ("top_k", "depth", "total_tokens", "draft_vocab")}
    report = {"vanilla": vanilla, "trees": rows, "best": tree, "command": " ".join(sys.argv)}
    if args.out:
        cli.write_report(args.out, report)
    if args.write:  # the sizes change; whether the budget is adaptive (`"auto"`) stays
        stored = read_tree_file(args.draft)
        kept = {"auto": stored["auto"]} if "auto" in stored else {}
        (args.draft / TREE_FILE).write_text(json.dumps({**tree, **kept}, indent=1) + "\n")
    print(json.dumps({"best": tree, "vanilla_tokens_per_s": vanilla["tokens_per_s"],
                      "best_speedup": best["speedup"], "best_tau": best["tau"]}))  # fmt: skip
    return 0


if __name__ == "__main__":
    cli.use_compile_cache()
    sys.exit(cli.run(main))
