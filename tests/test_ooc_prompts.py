"""inference.ooc_prompts: the extraction rule on small sources, then the CLI on jinja2 (--n 5):
MT-bench format, byte-identical reruns, every prompt an exact dedented source prefix ending right
after its docstring, and one-line errors (exit status 2) for bad flags."""

from __future__ import annotations

import ast
import dataclasses
import importlib.metadata
import importlib.util
import json
import pathlib

import pytest

from griffin_jax import cli
from inference import benchmark, ooc_prompts

SOURCE = '''\
import os


def top(path, mode="r"):
    """Open `path` and return its first line, stripped of surrounding whitespace.

    Returns an empty string for an empty file.
    """
    with open(path, mode) as f:
        line = f.readline()
    text = line.strip()
    return text


def short(x):
    """Too short a body: one statement after the docstring."""
    return x


def tail_comment(x):
    """Something after the closing quotes disqualifies the function here."""  # note
    a = x
    b = a
    return b


def blank_after(x):
    """A blank line between the docstring and the body disqualifies it."""

    a = x
    b = a
    return b


class Box:
    """A class."""

    def method(
        self, value: int, *, scale: float = 1.0
    ) -> float:
        """Scale `value` by `scale`, then add the stored offset to the result."""
        y = value * scale
        y += self.offset
        return y

    @staticmethod
    def decorated(a, b):
        """Decorators are not part of the prompt, but the function still qualifies."""
        c = a + b
        c *= 2
        return c
'''


def test_function_prompts_rule():
    found = ooc_prompts.function_prompts(SOURCE, package="pkg", relpath="m.py")
    assert [p.qualname for p in found] == ["top", "Box.method", "Box.decorated"]
    top, method, decorated = found
    assert top.key == "pkg/m.py:top" and top.lineno == 4
    assert top.prompt.startswith('def top(path, mode="r"):\n    """Open')
    assert top.prompt.endswith('empty file.\n    """\n    ')
    # The method is dedented by its def line's indentation, header lines and docstring alike.
    assert method.prompt == (
        "def method(\n    self, value: int, *, scale: float = 1.0\n) -> float:\n"
        '    """Scale `value` by `scale`, then add the stored offset to the result."""\n    '
    )
    assert decorated.prompt.startswith("def decorated(a, b):\n") and "@" not in decorated.prompt
    # Over 1200 characters, or a docstring over 20 lines, disqualifies `top`.
    assert ooc_prompts.function_prompts(SOURCE.replace("stripped", "x" * 1200)) == [
        dataclasses.replace(p, package="", relpath="") for p in found[1:]
    ]
    long_doc = SOURCE.replace("    Returns an empty", "    line\n" * 17 + "    Returns an empty")
    assert [p.qualname for p in ooc_prompts.function_prompts(long_doc)] == [
        "Box.method",
        "Box.decorated",
    ]
    assert ooc_prompts.function_prompts("def broken(:\n") == []
    assert ooc_prompts.function_prompts(SOURCE.replace("\n", "\r\n")) == []


def test_round_robin_spreads_and_skips_repeats():
    def fp(package, name, prompt):
        return ooc_prompts.FunctionPrompt(
            package=package, relpath="f.py", qualname=name, lineno=1, prompt=prompt
        )

    a = [fp("a", "1", "p1"), fp("a", "2", "p2"), fp("a", "3", "p3")]
    b = [fp("b", "1", "p1"), fp("b", "2", "q2")]
    chosen = ooc_prompts.round_robin([a, b], 4)
    assert [(p.package, p.qualname) for p in chosen] == [
        ("a", "1"),
        ("b", "2"),
        ("a", "2"),
        ("a", "3"),
    ]
    assert len(ooc_prompts.round_robin([a, b], 10)) == 4


def _run(tmp_path: pathlib.Path, name: str, *extra: str) -> pathlib.Path:
    out = tmp_path / name / "question.jsonl"
    assert cli.run(ooc_prompts.main, ["--out", str(out), "--n", "5", *extra]) == 0
    return out


def test_cli_jinja2(tmp_path, capsys):
    out = _run(tmp_path, "a", "--packages", "jinja2")
    again = _run(tmp_path, "b", "--packages", "jinja2")
    meta_path = out.with_name("question.jsonl.meta.json")
    assert out.read_bytes() == again.read_bytes()
    assert meta_path.read_bytes() == again.with_name("question.jsonl.meta.json").read_bytes()
    assert "wrote 5 prompts" in capsys.readouterr().out

    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["question_id"] for r in rows] == [1, 2, 3, 4, 5]
    assert all(set(r) == {"question_id", "category", "turns"} for r in rows)
    assert all(r["category"] == "ooc_code" and len(r["turns"]) == 1 for r in rows)
    assert benchmark.read_questions(out, None) == [r["turns"][0] for r in rows]

    meta = json.loads(meta_path.read_text())
    assert meta["count"] == 5 and meta["packages"]["jinja2"]["selected"] == 5
    assert meta["versions"]["jinja2"] == importlib.metadata.version("jinja2")
    assert meta["rule"] == ooc_prompts.RULE
    root = pathlib.Path(importlib.util.find_spec("jinja2").submodule_search_locations[0])
    for row, q in zip(rows, meta["questions"], strict=True):
        prompt = row["turns"][0]
        assert 100 <= len(prompt) <= 1200
        # Ends right after the docstring: with a `pass` appended the body is [docstring, pass],
        # the pass on the line after the closing quotes, at the prompt's last-line indentation.
        head = prompt.rsplit("\n", 1)[0]
        assert head.endswith(('"""', "'''")), prompt
        (fn,) = ast.parse(prompt + "pass\n").body
        assert isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef)
        doc, stmt = fn.body
        assert isinstance(stmt, ast.Pass) and ast.get_docstring(fn, clean=False) is not None
        assert stmt.lineno == doc.end_lineno + 1
        assert stmt.col_offset == len(prompt.rsplit("\n", 1)[1]) > 0
        # An exact source prefix once re-indented by the def line's indentation.
        relpath, qualname = q["source"].removeprefix("jinja2/").split(":")
        assert fn.name == qualname.split(".")[-1]
        src = (root / relpath).read_text(encoding="utf-8").split("\n")[q["line"] - 1 :]
        indent = src[0][: len(src[0]) - len(src[0].lstrip())]
        *lines, body_indent = prompt.split("\n")
        for i, line in enumerate(lines):
            assert src[i] == indent + line if line else not src[i].strip(), (i, line)
        first_stmt = src[len(lines)]
        assert (
            first_stmt.startswith(indent + body_indent)
            and not first_stmt[len(indent + body_indent)].isspace()
        )


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--n", "0"], "--n must be an integer >= 1"),
        (["--n", "x"], "--n"),
        (["--packages", "no_such_package_xyz"], "no installed package named no_such_package_xyz"),
        (["--packages", "json"], "standard library"),
        (["--packages", "jinja2.ext"], "not a top-level package name"),
    ],
)
def test_cli_bad_flags(tmp_path, capsys, argv, message):
    out = tmp_path / "q.jsonl"
    assert cli.run(ooc_prompts.main, ["--out", str(out), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and message in err and "\n" not in err
    assert not out.exists()


def test_cli_unwritable_out(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    for out in (tmp_path, blocker / "q.jsonl"):
        assert cli.run(ooc_prompts.main, ["--out", str(out), "--packages", "jinja2"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: --out") and "\n" not in err
