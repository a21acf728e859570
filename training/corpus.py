"""Offline real-text corpus for the project's own small base model.

Two sources, both available without network access:

* ``stdlib``: the CPython standard-library ``.py`` files of the running interpreter
  (``sysconfig.get_paths()["stdlib"]``), minus ``site-packages``, every ``test``/``tests``
  directory (``test/``, ``ctypes/test/``, ``lib2to3/tests/``, ...), ``idlelib/``, files over
  400 KB and files that are not valid UTF-8. Text is kept byte-exact (no newline translation).
* ``docs``: the Python documentation of Debian's ``python3.11-doc`` package (Sphinx HTML under
  ``/usr/share/doc/python3.11/html``), reduced to plain text with the stdlib ``html.parser``: only
  the ``<div role="main">`` body is kept, and ``nav``/``script``/``style`` and headerlink anchors
  are dropped. Index/search pages are skipped. Without the package the corpus is stdlib-only and
  a warning is printed.

The train / held-out split is by FILE and deterministic on every machine: a file is held out when
``sha1(source + "/" + relpath)`` falls in the first ``HELDOUT_PER_10K`` of 10,000 buckets (3%),
where ``relpath`` is the POSIX path relative to the source root. It does not depend on the corpus
having been built, so tests can call :func:`heldout_stdlib_files` anywhere.

Output (``python -m training.corpus --out runs/corpus``): ``train.jsonl`` and ``heldout.jsonl``
(one document a line, ``{"source", "path", "text"}``, ordered by the path hash so sources are
mixed) and ``manifest.json`` (file and character counts per split and per source).
"""

from __future__ import annotations

import collections
import hashlib
import html.parser
import json
import pathlib
import re
import sys
import sysconfig
import warnings
from collections.abc import Iterator

from griffin_jax import cli
from griffin_jax.checks import InputError
from training import args as args_lib

HELDOUT_PER_10K = 300  # 3% of files are held out.
MAX_FILE_BYTES = 400 * 1024
DOCS_HTML_ROOT = pathlib.Path("/usr/share/doc/python3.11/html")

# Any directory component with one of these names excludes the file (covers test/, tests/,
# ctypes/test/, unittest/test/, tkinter/test/, distutils/tests/, lib2to3/tests/, idlelib/).
_STDLIB_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idlelib"})
# Sphinx pages with no prose of their own (generated indexes) or only machinery.
_DOCS_SKIP_DIRS = frozenset({"_static", "_sources", "_downloads", "_images"})
_DOCS_SKIP_FILES = re.compile(r"^(genindex.*|search|py-modindex)\.html$")


def _bucket(key: str) -> int:
    """Stable bucket in [0, 10000) of a key (sha1, independent of PYTHONHASHSEED)."""
    return int(hashlib.sha1(key.encode("utf-8")).hexdigest()[:8], 16) % 10_000


def is_heldout(relpath: str, *, source: str = "stdlib") -> bool:
    """Whether a file belongs to the held-out split.

    Args:
      relpath: POSIX path of the file relative to its source root, e.g. ``"json/decoder.py"``
        (stdlib) or ``"library/json.html"`` (docs).
      source: ``"stdlib"`` or ``"docs"``; part of the hashed key.

    Returns:
      True for the ~3% of files whose ``sha1(source + "/" + relpath)`` bucket is held out.
    """
    return _bucket(f"{source}/{relpath}") < HELDOUT_PER_10K


def stdlib_root() -> pathlib.Path:
    """Returns the standard-library directory of the running interpreter."""
    return pathlib.Path(sysconfig.get_paths()["stdlib"])


def _stdlib_candidates(root: pathlib.Path) -> Iterator[tuple[pathlib.Path, str]]:
    """Yields (path, relpath) of stdlib .py files outside skipped dirs, sorted, unfiltered."""
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if _STDLIB_SKIP_DIRS.intersection(rel.parts[:-1]) or not path.is_file():
            continue
        yield path, rel.as_posix()


def _read_text(path: pathlib.Path) -> str | None:
    """Returns the file's exact UTF-8 text, or None if too large or not UTF-8."""
    if path.stat().st_size > MAX_FILE_BYTES:
        return None
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        return None


def stdlib_files(*, split: str, root: pathlib.Path | None = None) -> list[pathlib.Path]:
    """Lists the corpus stdlib files of one split (same filters as the corpus).

    Args:
      split: ``"train"`` or ``"heldout"``.
      root: stdlib directory; defaults to the running interpreter's.

    Returns:
      Sorted absolute paths.
    """
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    want_heldout = split == "heldout"
    root = stdlib_root() if root is None else root
    return [
        path
        for path, rel in _stdlib_candidates(root)
        # Hash first: the held-out listing then reads only ~3% of the files.
        if is_heldout(rel, source="stdlib") == want_heldout and _read_text(path) is not None
    ]


def heldout_stdlib_files(*, root: pathlib.Path | None = None) -> list[pathlib.Path]:
    """Lists the held-out stdlib ``.py`` files of the running interpreter.

    Needs neither the built corpus nor the docs package.

    Args:
      root: stdlib directory; defaults to the running interpreter's.

    Returns:
      Sorted absolute paths.
    """
    return stdlib_files(split="heldout", root=root)


class _SphinxText(html.parser.HTMLParser):
    """Plain text of the ``role="main"`` body of a Sphinx page."""

    _BLOCK = frozenset(
        "p div section pre h1 h2 h3 h4 h5 h6 li dt dd dl ul ol table tr blockquote "
        "br hr figure figcaption caption".split()
    )
    _SKIP = frozenset({"script", "style", "nav"})

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self._main_divs = 0  # div nesting depth inside the main body (0 = outside).
        self._skip: list[str] = []  # open tags whose content is dropped.
        self._pre = 0
        self._line_start = True

    def _newline(self, count: int = 1) -> None:
        self.parts.append("\n" * count)
        self._line_start = True

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attr = dict(attrs)
        if not self._main_divs:
            if tag == "div" and attr.get("role") == "main":
                self._main_divs = 1
            return
        if tag == "div":
            self._main_divs += 1
        if self._skip or tag in self._SKIP or "headerlink" in (attr.get("class") or ""):
            if tag not in ("br", "hr", "img"):
                self._skip.append(tag)
            return
        if tag == "pre":
            self._pre += 1
        if tag in self._BLOCK:
            self._newline(2 if tag in ("p", "pre", "h1", "h2", "h3", "h4", "section") else 1)
        if tag == "li":
            self.parts.append("* ")
            self._line_start = False

    def handle_endtag(self, tag: str) -> None:
        if not self._main_divs:
            return
        if tag == "div":
            self._main_divs -= 1
        if self._skip:
            if tag == self._skip[-1]:
                self._skip.pop()
            return
        if tag == "pre":
            self._pre = max(0, self._pre - 1)
        if tag in self._BLOCK:
            self._newline()

    def handle_data(self, data: str) -> None:
        if not self._main_divs or self._skip:
            return
        if self._pre:
            self.parts.append(data)
            self._line_start = data.endswith("\n")
            return
        text = re.sub(r"\s+", " ", data)
        if self._line_start:
            text = text.lstrip()
        if text:
            self.parts.append(text)
            self._line_start = False

    def text(self) -> str:
        """Joined text with trailing spaces and runs of blank lines removed."""
        joined = "".join(self.parts)
        joined = re.sub(r"[ \t]+\n", "\n", joined)
        joined = re.sub(r"\n{3,}", "\n\n", joined)
        return joined.strip() + "\n"


def html_to_text(html_source: str) -> str:
    """Converts a Sphinx HTML page to plain text.

    Args:
      html_source: the page's HTML.

    Returns:
      Text of the main body (empty string if the page has no ``role="main"`` div).
    """
    parser = _SphinxText()
    parser.feed(html_source)
    parser.close()
    text = parser.text()
    return "" if text == "\n" else text


def _docs_pages(root: pathlib.Path) -> Iterator[tuple[pathlib.Path, str]]:
    """Yields (path, relpath) of the prose HTML pages of the docs, sorted."""
    for path in sorted(root.rglob("*.html")):
        rel = path.relative_to(root)
        if _DOCS_SKIP_DIRS.intersection(rel.parts[:-1]) or _DOCS_SKIP_FILES.match(rel.name):
            continue
        yield path, rel.as_posix()


def iter_documents(
    *, docs_root: pathlib.Path | None = DOCS_HTML_ROOT, stdlib: pathlib.Path | None = None
) -> Iterator[dict[str, str]]:
    """Yields every corpus document with its split.

    Args:
      docs_root: Sphinx HTML root of the docs; None skips the docs.
      stdlib: stdlib directory; defaults to the running interpreter's.

    Yields:
      ``{"source", "path", "text", "split"}``; ``path`` is ``source/relpath``.
    """
    stdlib = stdlib_root() if stdlib is None else stdlib
    for path, rel in _stdlib_candidates(stdlib):
        text = _read_text(path)
        if text is None or not text.strip():
            continue
        split = "heldout" if is_heldout(rel, source="stdlib") else "train"
        yield {"source": "stdlib", "path": f"stdlib/{rel}", "text": text, "split": split}
    if docs_root is None:
        return
    for path, rel in _docs_pages(docs_root):
        text = html_to_text(path.read_text(encoding="utf-8", errors="replace"))
        if not text.strip():
            continue
        split = "heldout" if is_heldout(rel, source="docs") else "train"
        yield {"source": "docs", "path": f"docs/{rel}", "text": text, "split": split}


def build_corpus(
    out_dir: pathlib.Path,
    *,
    docs_root: pathlib.Path | None = DOCS_HTML_ROOT,
    stdlib: pathlib.Path | None = None,
) -> dict[str, object]:
    """Writes ``train.jsonl``, ``heldout.jsonl`` and ``manifest.json`` into ``out_dir``.

    Args:
      out_dir: output folder (created).
      docs_root: Sphinx HTML root of the docs; None (or a missing folder) gives a stdlib-only
        corpus, with a warning in the latter case.
      stdlib: stdlib directory; defaults to the running interpreter's.

    Returns:
      The manifest: per split and per source, ``files`` and ``chars``.
    """
    if docs_root is not None and not docs_root.is_dir():
        warnings.warn(
            f"{docs_root} not found (apt-get install python3.11-doc); building a stdlib-only "
            "corpus",
            stacklevel=2,
        )
        docs_root = None
    stdlib = stdlib_root() if stdlib is None else stdlib
    docs = {"train": [], "heldout": []}
    for doc in iter_documents(docs_root=docs_root, stdlib=stdlib):
        docs[doc.pop("split")].append(doc)
    out_dir.mkdir(parents=True, exist_ok=True)
    counts: dict[str, dict[str, dict[str, int]]] = {}
    for split, split_docs in docs.items():
        # Hash order interleaves sources and directories, so any prefix of the stream is mixed.
        split_docs.sort(key=lambda d: hashlib.sha1(d["path"].encode("utf-8")).hexdigest())
        per_source: dict[str, collections.Counter[str]] = collections.defaultdict(
            collections.Counter
        )
        with open(out_dir / f"{split}.jsonl", "w", encoding="utf-8") as f:
            for doc in split_docs:
                f.write(json.dumps(doc, ensure_ascii=False) + "\n")
                for key in (doc["source"], "all"):
                    per_source[key]["files"] += 1
                    per_source[key]["chars"] += len(doc["text"])
        counts[split] = {k: dict(v) for k, v in sorted(per_source.items())}
    manifest = {
        "python": sys.version.split()[0],
        "stdlib_root": str(stdlib),
        "docs_root": None if docs_root is None else str(docs_root),
        "heldout_per_10k": HELDOUT_PER_10K,
        "splits": counts,
    }
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def read_jsonl(path: pathlib.Path) -> Iterator[dict[str, str]]:
    """Yields the documents of a corpus ``.jsonl`` file (a bad line raises `InputError`)."""
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            try:
                doc = json.loads(line)
            except ValueError as err:
                raise InputError(f"{path}:{lineno}: invalid JSON ({err})") from err
            if not isinstance(doc, dict) or not isinstance(doc.get("text"), str):
                raise InputError(f'{path}:{lineno}: not a {{"text": ...}} document')
            yield doc


def main(argv: list[str] | None = None) -> None:
    """CLI: builds the corpus and prints its sizes."""
    parser = cli.ArgumentParser(
        prog="python -m training.corpus", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("runs/corpus"))
    parser.add_argument(
        "--docs-root", type=pathlib.Path, default=None, help=f"default: {DOCS_HTML_ROOT}"
    )
    parser.add_argument("--no-docs", action="store_true", help="stdlib source only")
    parser.add_argument(
        "--tokenizer", type=pathlib.Path, default=None, help="also report token counts"
    )
    args = parser.parse_args(argv)
    if args.no_docs and args.docs_root is not None:
        raise InputError("--no-docs and --docs-root exclude each other")
    if args.docs_root is not None:  # given explicitly: it must be there (the default may not)
        args_lib.folder(args.docs_root, "--docs-root", hint="Sphinx HTML of the Python docs")
    if args.tokenizer is not None:
        args_lib.folder(args.tokenizer, "--tokenizer", needs=("tokenizer.json",))
    args_lib.out_folder(args.out)
    docs_root = None if args.no_docs else (args.docs_root or DOCS_HTML_ROOT)
    manifest = build_corpus(args.out, docs_root=docs_root)
    for split, per_source in manifest["splits"].items():
        for source, c in per_source.items():
            print(f"{split:8s} {source:7s} files={c['files']:6d} chars={c['chars']:,}")
    if args.tokenizer is not None:
        import tokenizers  # Only needed for this optional report.

        tok = tokenizers.Tokenizer.from_file(str(args.tokenizer / "tokenizer.json"))
        for split in ("train", "heldout"):
            texts = [d["text"] for d in read_jsonl(args.out / f"{split}.jsonl")]
            n_tokens = sum(len(e.ids) for e in tok.encode_batch(texts, add_special_tokens=False))
            n_chars = sum(len(t) for t in texts)
            print(f"{split:8s} tokens={n_tokens:,} tokens/char={n_tokens / n_chars:.4f}")
    print(f"wrote {args.out}/train.jsonl, heldout.jsonl, manifest.json")


if __name__ == "__main__":
    sys.exit(cli.run(main))
