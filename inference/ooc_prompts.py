"""Out-of-corpus code-completion prompts from installed third-party packages, MT-bench format.

The base model and the draft saw the CPython standard library; these prompts come from the Python
sources of third-party packages the project's own dependencies install, so they measure
acceptance on code outside that corpus. Each prompt is one function cut right after its
docstring: the ``def`` line(s) exactly as in the source (decorators excluded), the docstring, the
newline after its closing quotes and the indentation of the first body statement, all dedented by
the ``def`` line's indentation (a method reads like a top-level function). The model continues
with the body. Output lines: ``{"question_id": int, "category": "ooc_code", "turns": [prompt]}``
(``inference.benchmark.read_questions`` reads ``turns[0]``); ``FILE.meta.json`` beside it records
the package versions, the rule, per-package counts and each question's source.

The selection is a fixed rule, never chosen by results:

1. Packages: ``--packages`` in the given order, else ``DEFAULT_PACKAGES`` in that order, keeping
   those installed (located with ``importlib.util.find_spec``; nothing is imported).
2. Files: every ``*.py`` under the package folder(s), in sorted relative-path order, skipping
   folders named ``tests``/``test``/``__pycache__``, files named ``test_*``, ``*_test.py`` or
   ``conftest.py``, files that are not UTF-8, hold a carriage return, or fail ``ast.parse`` with
   this Python.
3. Functions: module-level functions and methods of module-level classes (async too) whose
   docstring spans 1-20 lines, with nothing after its closing quotes on that line, followed on
   the very next line by the first of at least 3 further body statements; every non-blank line of
   the prompt indented at least as much as the ``def`` line; dedented prompt 100-1200 characters.
4. Order: per package, by ``sha1("package/relpath:qualname")`` (lowest first; ties by line).
5. Choice: round-robin over the packages (rank 0 of each package in package order, then rank 1,
   ...), skipping a prompt identical to one already taken, until ``--n`` are taken. Questions
   are numbered from 1 in that order, so the first k of the file are spread over the packages too.

The same installed versions and Python give byte-identical output.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import pathlib
import platform
import sys
from collections.abc import Iterator, Sequence

from griffin_jax import cli
from griffin_jax.checks import InputError

CATEGORY = "ooc_code"
# Installed by the project's dependencies (pyproject.toml). transformers is left out: ~2,900
# files, most of them generated near-copies of one modelling template, would dominate the walk.
DEFAULT_PACKAGES = (
    "numpy",
    "jax",
    "flax",
    "optax",
    "orbax",
    "matplotlib",
    "jinja2",
    "tqdm",
    "safetensors",
    "tokenizers",
)
SKIP_DIRS = frozenset({"tests", "test", "__pycache__"})
DOC_LINES = (1, 20)
MIN_BODY_STATEMENTS = 3
PROMPT_CHARS = (100, 1200)
RULE = (
    "packages in the given order (default DEFAULT_PACKAGES, those installed); their *.py files "
    "in sorted relative-path order, skipping tests/test/__pycache__ folders, test_*, *_test.py, "
    "conftest.py, non-UTF-8 files, files with a carriage return and files ast.parse rejects; "
    "module-level functions and methods of module-level classes with a docstring of "
    f"{DOC_LINES[0]}-{DOC_LINES[1]} lines, nothing after its closing quotes, the first of >= "
    f"{MIN_BODY_STATEMENTS} further body statements on the next line, the prompt (def line(s) + "
    "docstring + newline + body indentation, dedented by the def line's indentation) "
    f"{PROMPT_CHARS[0]}-{PROMPT_CHARS[1]} characters; per package ordered by "
    "sha1('package/relpath:qualname') lowest first (ties by line); taken round-robin over the "
    "packages in order, skipping prompts identical to one already taken, until n are taken"
)


@dataclasses.dataclass(frozen=True, kw_only=True)
class FunctionPrompt:
    """One qualifying function: where it is and its prompt."""

    package: str
    relpath: str  # relative to the package folder, '/'-separated
    qualname: str  # "func" or "Class.method"
    lineno: int  # 1-based line of the def keyword
    prompt: str

    @property
    def key(self) -> str:
        return f"{self.package}/{self.relpath}:{self.qualname}"

    @property
    def rank(self) -> tuple[str, int]:
        return hashlib.sha1(self.key.encode("utf-8")).hexdigest(), self.lineno


def _indent(line: str) -> str:
    """Leading spaces and tabs of a line."""
    return line[: len(line) - len(line.lstrip(" \t"))]


def _functions(tree: ast.Module) -> Iterator[tuple[str, ast.FunctionDef | ast.AsyncFunctionDef]]:
    """(qualname, node) of module-level functions and methods of module-level classes."""
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            yield node.name, node
        elif isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, ast.FunctionDef | ast.AsyncFunctionDef):
                    yield f"{node.name}.{item.name}", item


def _prompt(node: ast.FunctionDef | ast.AsyncFunctionDef, lines: list[str]) -> str | None:
    """The dedented header-plus-docstring prompt of `node`, or None if it does not qualify."""
    if ast.get_docstring(node, clean=False) is None:
        return None
    doc, rest = node.body[0], node.body[1:]
    if len(rest) < MIN_BODY_STATEMENTS:
        return None
    if not DOC_LINES[0] <= doc.end_lineno - doc.lineno + 1 <= DOC_LINES[1]:
        return None
    # end_col_offset counts UTF-8 bytes; anything after the closing quotes (`;`, a comment,
    # trailing spaces) disqualifies, so the prompt ends right after them.
    if lines[doc.end_lineno - 1].encode("utf-8")[doc.end_col_offset :]:
        return None
    if rest[0].lineno != doc.end_lineno + 1:
        return None
    def_indent = _indent(lines[node.lineno - 1])
    body_indent = _indent(lines[rest[0].lineno - 1])
    if len(body_indent) <= len(def_indent) or not body_indent.startswith(def_indent):
        return None
    out = []
    for line in lines[node.lineno - 1 : doc.end_lineno]:
        if line.startswith(def_indent):
            out.append(line[len(def_indent) :])
        elif not line.strip():
            out.append("")
        else:
            return None  # e.g. a docstring line left of the def: no clean dedent.
    out.append(body_indent[len(def_indent) :])
    prompt = "\n".join(out)
    return prompt if PROMPT_CHARS[0] <= len(prompt) <= PROMPT_CHARS[1] else None


def function_prompts(source: str, *, package: str = "", relpath: str = "") -> list[FunctionPrompt]:
    """The qualifying functions of one file's source, in source order (rule step 3).

    Args:
      source: the file's text.
      package: package label stored in the results.
      relpath: path label stored in the results.

    Returns:
      One prompt per qualifying function; [] if the source has a carriage return or fails to
      parse.
    """
    if "\r" in source:
        return []
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError, RecursionError):
        return []
    lines = source.split("\n")  # ast counts lines at "\n" only (not at \f or \v).
    found = []
    for qualname, node in _functions(tree):
        prompt = _prompt(node, lines)
        if prompt is not None:
            found.append(
                FunctionPrompt(
                    package=package,
                    relpath=relpath,
                    qualname=qualname,
                    lineno=node.lineno,
                    prompt=prompt,
                )
            )
    return sorted(found, key=lambda p: p.lineno)


def _skip_file(name: str) -> bool:
    return (
        not name.endswith(".py")
        or name.startswith("test_")
        or name.endswith("_test.py")
        or name == "conftest.py"
    )


def package_files(package: str) -> list[tuple[str, pathlib.Path]]:
    """(relpath, path) of an installed package's Python sources in sorted relpath order.

    Args:
      package: a top-level import name (located with find_spec, never imported).

    Returns:
      The files the rule walks (step 2 without the parse), [] if the package is not installed.
    """
    spec = _find_spec(package)
    if spec is None:
        return []
    if spec.submodule_search_locations is None:  # a single-module distribution
        path = pathlib.Path(spec.origin or "")
        return [(path.name, path)] if path.suffix == ".py" and path.is_file() else []
    files = {}
    for location in sorted(spec.submodule_search_locations):
        root = pathlib.Path(location)
        for folder, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS)
            for name in filenames:
                if not _skip_file(name):
                    path = pathlib.Path(folder, name)
                    files.setdefault(path.relative_to(root).as_posix(), path)
    return sorted(files.items())


def _find_spec(package: str):
    try:
        return importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None


def package_prompts(package: str) -> tuple[list[FunctionPrompt], int]:
    """All qualifying functions of a package in rule order (steps 2-4) and its file count."""
    files = package_files(package)
    found = []
    for relpath, path in files:
        try:
            source = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            continue
        found.extend(function_prompts(source, package=package, relpath=relpath))
    return sorted(found, key=lambda p: p.rank), len(files)


def round_robin(per_package: Sequence[Sequence[FunctionPrompt]], n: int) -> list[FunctionPrompt]:
    """Takes up to n prompts round-robin over the ranked lists, skipping repeated prompt texts."""
    chosen: list[FunctionPrompt] = []
    seen: set[str] = set()
    cursors = [0] * len(per_package)
    while len(chosen) < n and any(c < len(p) for c, p in zip(cursors, per_package, strict=True)):
        for i, ranked in enumerate(per_package):
            while cursors[i] < len(ranked) and ranked[cursors[i]].prompt in seen:
                cursors[i] += 1
            if cursors[i] < len(ranked) and len(chosen) < n:
                chosen.append(ranked[cursors[i]])
                seen.add(ranked[cursors[i]].prompt)
                cursors[i] += 1
    return chosen


@functools.cache
def _distributions() -> dict[str, list[str]]:
    return importlib.metadata.packages_distributions()


def package_version(package: str) -> tuple[str, str]:
    """(distribution name(s), version(s)) that install top-level `package`; 'unknown' if none."""
    dists = sorted(set(_distributions().get(package) or []))
    versions = []
    for dist in dists:
        try:
            versions.append(importlib.metadata.version(dist))
        except importlib.metadata.PackageNotFoundError:
            versions.append("unknown")
    return ", ".join(dists) or "unknown", ", ".join(versions) or "unknown"


def parse_packages(text: str | None) -> list[str]:
    """--packages as a list of installed third-party top-level packages (default: installed
    DEFAULT_PACKAGES)."""
    if text is None:
        return [p for p in DEFAULT_PACKAGES if _find_spec(p) is not None]
    names = []
    for name in (s.strip() for s in text.split(",")):
        if not name.isidentifier():
            raise InputError(
                f"--packages: {name!r} is not a top-level package name "
                "(comma-separated import names, e.g. numpy,jinja2)"
            )
        if name in sys.stdlib_module_names:
            raise InputError(
                f"--packages: {name} is part of the standard library; give a third-party package"
            )
        if _find_spec(name) is None:
            raise InputError(f"--packages: no installed package named {name}")
        if name not in names:
            names.append(name)
    return names


def question_lines(prompts: Sequence[FunctionPrompt]) -> str:
    """MT-bench question.jsonl text, question_id from 1."""
    return "".join(
        json.dumps(
            {"question_id": i, "category": CATEGORY, "turns": [p.prompt]}, ensure_ascii=False
        )
        + "\n"
        for i, p in enumerate(prompts, start=1)
    )


def main(argv: list[str] | None = None) -> None:
    """CLI: writes the out-of-corpus prompt file and its meta sidecar."""
    parser = cli.ArgumentParser(
        prog="python -m inference.ooc_prompts", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--out", type=pathlib.Path, required=True, help="question.jsonl to write")
    parser.add_argument("--n", type=int, default=40, help="number of prompts (default 40)")
    parser.add_argument(
        "--packages",
        default=None,
        help="comma-separated top-level packages, in round-robin order "
        f"(default: the installed ones of {','.join(DEFAULT_PACKAGES)})",
    )
    args = parser.parse_args(argv)
    cli.positive(args.n, "--n")
    meta_path = args.out.with_name(args.out.name + ".meta.json")
    cli.output_file(args.out, "--out")
    cli.output_file(meta_path, "--out (meta sidecar)")
    packages = parse_packages(args.packages)
    if not packages:
        raise InputError(f"none of {', '.join(DEFAULT_PACKAGES)} is installed; pass --packages")

    per_package, stats = [], {}
    for package in packages:
        ranked, n_files = package_prompts(package)
        per_package.append(ranked)
        stats[package] = {"files": n_files, "candidates": len(ranked)}
    chosen = round_robin(per_package, args.n)
    for package in packages:
        stats[package]["selected"] = sum(p.package == package for p in chosen)

    dists = {p: package_version(p) for p in packages}
    meta = {
        "category": CATEGORY,
        "n": args.n,
        "count": len(chosen),
        "rule": RULE,
        "python": platform.python_version(),
        "versions": {p: dist[1] for p, dist in dists.items()},
        "distributions": {p: dist[0] for p, dist in dists.items()},
        "packages": stats,
        "questions": [
            {"question_id": i, "source": p.key, "line": p.lineno}
            for i, p in enumerate(chosen, start=1)
        ],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(question_lines(chosen), encoding="utf-8")
    meta_path.write_text(json.dumps(meta, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    counts = ", ".join(f"{p} {s['selected']}/{s['candidates']}" for p, s in stats.items())
    print(f"wrote {len(chosen)} prompts to {args.out} (selected/candidates: {counts})")
    if len(chosen) < args.n:
        print(f"warning: only {len(chosen)} qualifying functions (asked for {args.n})")


if __name__ == "__main__":
    sys.exit(cli.run(main))
