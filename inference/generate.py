"""`python -m inference.generate`: speculative (GRIFFIN / EAGLE-2) or vanilla generation.

Examples:
  python -m inference.generate --prompt "def fib(n):"                     # the default model pair
  python -m inference.generate --base llama-dir --draft griffin-dir --chat --prompt "Hi" --json
  python -m inference.generate --prompt-file prompts.txt --compare --temperature 1 --top-p 0.9
  python -m inference.generate --base llama-70b --draft griffin-70b --dtype bfloat16 \
      --mesh data=1,model=8 --prompt "Hi"          # sharded over 8 devices (griffin_jax.sharding)

Multi-host: run the same command on every host with `--distributed` (and, outside TPU pods /
SLURM / Open MPI, JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID set per host); the
mesh then spans every host's devices (see `griffin_jax.sharding`).

With `--json` the last stdout line is one JSON object (logs go to stderr). Otherwise the text
streams as rounds are accepted, then one stats line follows. Speeds are measured after a
warm-up run of the same shapes (compile excluded, prefill included).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time
from typing import Any

import jax
import numpy as np

from convert.load_hf import load_hf_config
from griffin_jax import checks, cli, sharding
from inference.api import (
    DEFAULT_MODEL_DIR,
    GenerationOutput,
    SpeculativeModel,
    read_tree_file,
    resolve_folders,
    resolve_tree,
    tree_flags,
)


class UsageError(checks.InputError):
    """Bad command-line input: reported in one line, exit status 2 (`griffin_jax.cli`)."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = cli.ArgumentParser(
        prog="python -m inference.generate",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--base", help="base model folder (HF layout) or hub id; default: the project's")
    p.add_argument("--draft", help="draft folder (published GRIFFIN/EAGLE-2 layout) or hub id")
    p.add_argument("--prompt", help="prompt text")
    p.add_argument("--prompt-file", type=pathlib.Path, help="one prompt per line (a batch)")
    p.add_argument("--chat", action="store_true", help="apply the tokenizer's chat template")
    p.add_argument("--system", help="system prompt for --chat")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument(
        "--total-tokens",
        type=int,
        default=None,
        help="tree nodes incl. the root; -1 = pick by timing this machine",
    )
    p.add_argument(
        "--tree",
        default=None,
        help="auto (the adaptive draft budget: each round plain decoding or a tree up to the "
        "draft's tree.json sizes, by acceptance and measured cost) or "
        "TOP_K,DEPTH,TOTAL_TOKENS[,DRAFT_VOCAB] (default: the draft's tree.json); the four "
        "flags below are its single-size aliases",
    )
    p.add_argument("--depth", type=int, default=None)
    p.add_argument("--tree-top-k", type=int, default=None)
    p.add_argument(
        "--draft-vocab", type=int, default=None,
        help="draft from the N most frequent tokens (0 = all; default: the tree file's)",
    )  # fmt: skip
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--vanilla", action="store_true", help="plain decoding with the base only")
    p.add_argument("--compare", action="store_true", help="run both, report the speedup")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    p.add_argument("--mesh", help="shard over a device mesh, e.g. data=1,model=8 (default: none)")
    cli.add_distributed_flags(p)
    return p.parse_args(argv)


def read_prompts(args: argparse.Namespace) -> list[str]:
    """--prompt, or --prompt-file's lines (one prompt each; a blank line is an error)."""
    if (args.prompt is None) == (args.prompt_file is None):
        raise UsageError("give exactly one of --prompt or --prompt-file")
    if args.prompt is not None:
        if not args.prompt.strip():
            raise UsageError("--prompt is empty")
        return [args.prompt]
    if not args.prompt_file.is_file():
        raise UsageError(f"no such prompt file: {args.prompt_file}")
    try:
        text = args.prompt_file.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise UsageError(f"{args.prompt_file} is not UTF-8 text ({err.reason})") from err
    prompts = text.splitlines()  # a final newline ends the last line; it adds no prompt
    if not prompts:
        raise UsageError(f"{args.prompt_file} is empty: write one prompt per line")
    for number, line in enumerate(prompts, start=1):
        if not line.strip():
            raise UsageError(
                f"{args.prompt_file}, line {number} is blank: write one prompt per line "
                "(output row i answers line i, so blank lines are not skipped)"
            )
    return prompts


def check_args(args: argparse.Namespace) -> None:
    """Every check that needs no model (run before anything is loaded)."""
    checks.sampling(args.temperature, args.top_p, args.top_k)
    checks.max_new_tokens(args.max_new_tokens)
    if args.vanilla and args.compare:
        raise UsageError("--vanilla and --compare exclude each other")
    if args.draft and not args.base:
        raise UsageError("--draft needs --base (the draft's embedding and lm_head are the base's)")
    if args.draft and args.vanilla:
        raise UsageError("--draft and --vanilla exclude each other")
    if args.base is not None and args.draft is None and not args.vanilla:
        raise UsageError("--base without --draft: pass --draft FOLDER or --vanilla")
    tree_flags(args)
    if args.total_tokens is not None and args.total_tokens < 2 and args.total_tokens != -1:
        raise UsageError(
            f"--total-tokens must be >= 2 (tree nodes counting the root) or -1 (pick by "
            f"timing), got {args.total_tokens}"
        )


def encode(
    tokenizer: Any, prompts: list[str], *, chat: bool, system: str | None
) -> list[list[int]]:
    if not chat:
        if system:
            raise UsageError("--system needs --chat")
        return [tokenizer(p)["input_ids"] for p in prompts]
    if not getattr(tokenizer, "chat_template", None):
        raise UsageError("--chat: this tokenizer has no chat template")
    out = []
    for p in prompts:
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": p}
        ]
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        out.append(list(ids))
    return out


class Streamer:
    """Prints newly accepted text of row 0 without ever splitting a multi-byte character."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.printed = 0

    def __call__(self, out_tokens: np.ndarray, num_out: np.ndarray) -> None:
        text = self.tokenizer.decode(out_tokens[0, : num_out[0]].tolist(), skip_special_tokens=True)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for its next bytes
            return
        if len(text) > self.printed:
            sys.stdout.write(text[self.printed :])
            sys.stdout.flush()
            self.printed = len(text)


COMPARE_PASSES = 2  # --compare: timed runs per side after the first


def timed(run, on_round=None, warm=None) -> tuple[GenerationOutput, float]:
    """Runs once to compile (same shapes and the same loop kind; by `warm`, taking the same
    callback, when given), then again for the measurement.

    Returns the measured result and the compile estimate (first wall time minus the second).
    """
    t0 = time.perf_counter()
    (warm or run)(_ignore_round if on_round is not None else None)
    first = time.perf_counter() - t0
    result = run(on_round)
    return result, max(first - result.seconds, 0.0)


def _ignore_round(out_tokens: np.ndarray, num_out: np.ndarray) -> None:
    del out_tokens, num_out


def load(args: argparse.Namespace, prompts: list[str]) -> tuple[SpeculativeModel, list[list[int]]]:
    """Checks everything it can from the config, tree file and tokenizer, then loads weights."""
    cli.start_distributed(args)
    mesh = sharding.make_mesh(args.mesh) if args.mesh else None
    if args.base is None and not (DEFAULT_MODEL_DIR / "griffin" / "config.json").exists():
        if not (DEFAULT_MODEL_DIR / "base" / "config.json").exists():
            raise UsageError(
                "the default model pair is not installed yet: pass --base FOLDER "
                "(HF layout) and --draft FOLDER (GRIFFIN/EAGLE-2 layout), or --vanilla"
            )
        if not args.vanilla:
            raise UsageError("the default draft is not installed yet: pass --vanilla")
    base_dir, draft_dir = resolve_folders(args.base, args.draft, with_draft=not args.vanilla)
    cfg = load_hf_config(base_dir)
    tree = tree_flags(args)
    if draft_dir is not None:
        resolve_tree(read_tree_file(draft_dir), vocab_size=cfg.vocab_size, **tree)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    input_ids = encode(tokenizer, prompts, chat=args.chat, system=args.system)
    checks.token_ids(input_ids, vocab_size=cfg.vocab_size)
    checks.position_limit(
        [len(ids) for ids in input_ids], args.max_new_tokens,
        max_positions=cfg.max_position_embeddings, flag="--max-new-tokens",
    )  # fmt: skip
    model = SpeculativeModel.from_pretrained(
        base_dir, draft_dir, dtype=args.dtype, with_draft=draft_dir is not None, mesh=mesh,
        load_tokenizer=False, **tree,
    )  # fmt: skip
    model.tokenizer = tokenizer
    return model, input_ids


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    check_args(args)
    prompts = read_prompts(args)
    model, input_ids = load(args, prompts)

    knobs = dict(
        temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
        max_new_tokens=args.max_new_tokens, seed=args.seed,
    )  # fmt: skip
    log = sys.stderr
    if model.has_draft:
        mode = "adaptive, up to " if model.adaptive else ""
        print(f"tree: {mode}{model.tree_cfg}", file=log)
    runner = model.vanilla_generate if args.vanilla else model.generate
    # Streaming reads tokens back every round (the host loop); --compare times the device loop.
    lead = jax.process_index() == 0  # with --distributed, process 0 reports
    stream = lead and not args.json and not args.compare and len(prompts) == 1
    streamer = Streamer(model.tokenizer) if stream else None
    warm = None if args.vanilla else lambda cb: model.warm_up(input_ids, on_round=cb, **knobs)
    result, compile_s = timed(
        lambda cb: runner(input_ids, on_round=cb, **knobs), streamer, warm=warm
    )
    if stream:
        streamer(np.asarray([result.output_ids[0]]), np.asarray([len(result.output_ids[0])]))
        print()
    summary: dict[str, Any] = {
        "output_ids": result.output_ids[0] if len(prompts) == 1 else result.output_ids,
        "text": _texts(model, result, single=len(prompts) == 1),
        "new_tokens": result.new_tokens,
        "rounds": result.rounds[0] if len(prompts) == 1 else result.rounds,
        "tau": result.tau,
        "accept_lengths": result.accept_lengths[0] if len(prompts) == 1 else result.accept_lengths,
        "seconds": result.seconds,
        "tokens_per_s": result.tokens_per_s,
        "compile_seconds": compile_s,
        "mode": "vanilla" if args.vanilla else "speculative",
    }
    if model.has_draft and model.adaptive and not args.vanilla:
        summary["round_shapes"] = (
            result.round_shapes[0] if len(prompts) == 1 else result.round_shapes
        )
    if args.compare:
        # Both compiled; then COMPARE_PASSES more runs taking turns, and each side's fastest run
        # (one run of a short generation is at the mercy of whatever else the machine does).
        base_result, _ = timed(lambda cb: model.vanilla_generate(input_ids, **knobs))
        spec_s, base_s = [result.seconds], [base_result.seconds]
        for _ in range(COMPARE_PASSES):
            spec_s.append(runner(input_ids, **knobs).seconds)
            base_s.append(model.vanilla_generate(input_ids, **knobs).seconds)
        summary["seconds"] = min(spec_s)
        summary["tokens_per_s"] = result.new_tokens / min(spec_s)
        summary["vanilla_tokens_per_s"] = base_result.new_tokens / min(base_s)
        summary["speedup"] = summary["tokens_per_s"] / max(summary["vanilla_tokens_per_s"], 1e-9)
    if not lead:
        print(f"[process {jax.process_index()}] {result.new_tokens} tokens", file=log)
        return 0
    if args.json:
        print(json.dumps(summary))
    else:
        if not stream:
            for text in summary["text"] if isinstance(summary["text"], list) else [summary["text"]]:
                print(text)
                print("-" * 40)
        stats = (
            f"[{summary['mode']}] {result.new_tokens} tokens in {summary['seconds']:.2f}s "
            f"({summary['tokens_per_s']:.1f} tok/s), tau {result.tau:.2f}, "
            f"compile {compile_s:.1f}s"
        )
        if args.compare:
            stats += (
                f", vanilla {summary['vanilla_tokens_per_s']:.1f} tok/s, "
                f"speedup {summary['speedup']:.2f}x"
            )
        print(stats, file=log)
    return 0


def _texts(model: SpeculativeModel, result: GenerationOutput, *, single: bool) -> Any:
    texts = [model.tokenizer.decode(ids, skip_special_tokens=True) for ids in result.output_ids]
    return texts[0] if single else texts


if __name__ == "__main__":
    cli.use_compile_cache()
    sys.exit(cli.run(main))
