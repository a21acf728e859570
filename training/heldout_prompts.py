"""Held-out code-completion prompts in MT-bench question format.

Each prompt is a function of a held-out standard-library file (:func:`training.corpus.
heldout_stdlib_files`, never seen in training), cut right after its docstring: the ``def`` line(s)
with the signature, exactly as in the source (indentation of the ``def`` line included,
decorators excluded), the docstring, the newline after the closing quotes and the indentation of
the first body statement. The model then continues with the body. Only functions whose first
body statement sits on the line right after the docstring qualify, so the prompt is always an
exact prefix of ``source[def_line_start:]`` and the true continuation starts with code.

Output lines follow ``data/mt_bench/question.jsonl`` (as read by GRIFFIN's ``gen_ea_answer``):
``{"question_id": int, "category": "heldout_code", "turns": [prompt]}``.

Selection is deterministic: candidates in (file, line) order, each file's candidates shuffled by a
seeded RNG, then taken round-robin across files so the prompts spread over the held-out files.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import pathlib
import random
import sys
from collections.abc import Sequence

from griffin_jax import cli
from training import args as args_lib
from training.corpus import heldout_stdlib_files, stdlib_root

CATEGORY = "heldout_code"


@dataclasses.dataclass(frozen=True, kw_only=True)
class FunctionPrompt:
    """One candidate prompt: where it comes from, the prompt and the true body."""

    relpath: str  # relative to the stdlib root
    lineno: int  # 1-based line of the def keyword
    prompt: str
    body: str  # the source from the end of the prompt to the end of the function


def _indent(line: str) -> str:
    """Leading whitespace of a line."""
    return line[: len(line) - len(line.lstrip(" \t"))]


def function_prompts(
    source: str, *, relpath: str = "", max_prompt_chars: int = 1500
) -> list[FunctionPrompt]:
    """Extracts header-plus-docstring prompts from one Python file.

    Args:
      source: the file's text.
      relpath: label stored in the results.
      max_prompt_chars: longer prompts are skipped.

    Returns:
      Prompts in source order, one per qualifying (async) function or method.
    """
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return []
    # Split on "\n" only, like ast's line numbers (str.splitlines also breaks at \f and \v);
    # each line keeps its end so offsets are exact, "\r\n" included.
    lines = source.split("\n")
    lines = [line + "\n" for line in lines[:-1]] + [lines[-1]]
    offsets = [0]
    for line in lines:
        offsets.append(offsets[-1] + len(line))
    results = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        if ast.get_docstring(node, clean=False) is None or len(node.body) < 2:
            continue
        doc, first_stmt = node.body[0], node.body[1]
        doc_end_line = lines[doc.end_lineno - 1]
        # end_col_offset counts UTF-8 bytes. Anything but the newline after the closing quotes
        # (spaces, a `;`, a comment) disqualifies the function, so the prompt ends right there.
        tail = doc_end_line.encode("utf-8")[doc.end_col_offset :].decode("utf-8")
        if tail.rstrip("\r\n") or first_stmt.lineno != doc.end_lineno + 1:
            continue
        body_indent = _indent(lines[first_stmt.lineno - 1])
        if not body_indent or len(body_indent) <= len(_indent(lines[node.lineno - 1])):
            continue
        start = offsets[node.lineno - 1]
        prompt = source[start : offsets[first_stmt.lineno - 1] + len(body_indent)]
        if len(prompt) > max_prompt_chars:
            continue
        body_end = offsets[node.end_lineno]  # end of the function's last line.
        results.append(
            FunctionPrompt(
                relpath=relpath,
                lineno=node.lineno,
                prompt=prompt,
                body=source[start + len(prompt) : body_end],
            )
        )
    return sorted(results, key=lambda p: p.lineno)


def select_prompts(
    files: Sequence[pathlib.Path],
    *,
    n: int,
    seed: int = 0,
    root: pathlib.Path | None = None,
    max_prompt_chars: int = 1500,
) -> list[FunctionPrompt]:
    """Picks ``n`` prompts deterministically, spread round-robin over ``files``.

    Args:
      files: Python files to draw from.
      n: number of prompts (fewer if the files do not have enough).
      seed: RNG seed of the per-file shuffles.
      root: labels are paths relative to this folder; defaults to the stdlib root.
      max_prompt_chars: longer prompts are skipped.

    Returns:
      The selected prompts, sorted by (relpath, lineno).
    """
    root = stdlib_root() if root is None else root
    rng = random.Random(seed)
    per_file = []
    for path in sorted(files):
        relpath = path.relative_to(root).as_posix() if path.is_relative_to(root) else path.name
        found = function_prompts(
            path.read_bytes().decode("utf-8"), relpath=relpath, max_prompt_chars=max_prompt_chars
        )
        rng.shuffle(found)
        if found:
            per_file.append(found)
    chosen: list[FunctionPrompt] = []
    for rank in range(max((len(f) for f in per_file), default=0)):
        for found in per_file:
            if rank < len(found) and len(chosen) < n:
                chosen.append(found[rank])
    return sorted(chosen, key=lambda p: (p.relpath, p.lineno))


def to_question_lines(prompts: Sequence[FunctionPrompt], *, first_id: int = 1) -> list[str]:
    """Formats prompts as MT-bench ``question.jsonl`` lines.

    Args:
      prompts: the selected prompts.
      first_id: question_id of the first prompt; the others follow consecutively.

    Returns:
      One JSON string per prompt (no trailing newline).
    """
    return [
        json.dumps(
            {"question_id": first_id + i, "category": CATEGORY, "turns": [p.prompt]},
            ensure_ascii=False,
        )
        for i, p in enumerate(prompts)
    ]


def main(argv: list[str] | None = None) -> None:
    """CLI: writes the held-out prompt file."""
    parser = cli.ArgumentParser(
        prog="python -m training.heldout_prompts", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--out", type=pathlib.Path, default=pathlib.Path("runs/prompts/heldout_code/question.jsonl")
    )
    parser.add_argument("--n", type=int, default=80)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--first-id", type=int, default=1)
    parser.add_argument("--max-prompt-chars", type=int, default=1500)
    args = parser.parse_args(argv)
    args_lib.at_least(args.n, "--n", 1)
    args_lib.at_least(args.first_id, "--first-id", 0)
    args_lib.at_least(args.max_prompt_chars, "--max-prompt-chars", 1)
    cli.output_file(args.out, "--out")
    files = heldout_stdlib_files()
    prompts = select_prompts(
        files, n=args.n, seed=args.seed, max_prompt_chars=args.max_prompt_chars
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        "".join(line + "\n" for line in to_question_lines(prompts, first_id=args.first_id))
    )
    n_files = len({p.relpath for p in prompts})
    print(
        f"wrote {len(prompts)} prompts from {n_files} of {len(files)} held-out files to {args.out}"
    )
    if len(prompts) < args.n:
        print(f"warning: only {len(prompts)} qualifying functions (asked for {args.n})")


if __name__ == "__main__":
    sys.exit(cli.run(main))
