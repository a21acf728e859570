"""Tests of the base-model corpus split, the held-out prompts and the byte-level BPE tokenizer.

None of them needs the built corpus, the python3.11-doc package or the network: the split and
the prompts use the running interpreter's standard library, and the tokenizer tests train a tiny
tokenizer on a small sample. The committed tokenizer test skips until it exists.
"""

import json
import pathlib
import warnings

import numpy as np
import pytest

from training import corpus, heldout_prompts, tokenizer

REPO = pathlib.Path(__file__).resolve().parents[1]
COMMITTED_TOKENIZER = REPO / "inference" / "default_model" / "base"
NON_ASCII = "naïve café — Grüße, 日本語, ∑ x², emoji 🙂\ttab\r\nCRLF\n"


def test_split_is_deterministic_and_about_three_percent():
    paths = [f"pkg{i // 100}/mod_{i}.py" for i in range(10_000)]
    first = [corpus.is_heldout(p) for p in paths]
    assert first == [corpus.is_heldout(p) for p in paths]
    assert 0.02 < sum(first) / len(paths) < 0.04
    # Pinned values: the split must not change silently (it defines what is held out).
    assert corpus.is_heldout("asyncio/base_events.py")
    assert corpus.is_heldout("cmd.py")
    assert not corpus.is_heldout("json/decoder.py")
    assert corpus.is_heldout("library/glob.html", source="docs")
    assert not corpus.is_heldout("asyncio/base_events.py", source="docs")


def test_heldout_stdlib_files_are_never_in_the_train_list():
    heldout = corpus.heldout_stdlib_files()
    train = corpus.stdlib_files(split="train")
    assert heldout, "no held-out stdlib file"
    assert len(train) > 10 * len(heldout)
    assert not set(heldout) & set(train)
    root = corpus.stdlib_root()
    for path in heldout:
        rel = path.relative_to(root)
        assert corpus.is_heldout(rel.as_posix())
        assert not {"test", "tests", "idlelib", "site-packages"} & set(rel.parts)


def _write(path: pathlib.Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def test_build_corpus_filters_files_and_warns_without_docs(tmp_path):
    stdlib = tmp_path / "lib"
    _write(stdlib / "good.py", "x = 'é'\r\n".encode())
    _write(stdlib / "pkg" / "mod.py", b"y = 2\n")
    _write(stdlib / "test" / "test_x.py", b"z = 3\n")
    _write(stdlib / "pkg" / "tests" / "t.py", b"z = 3\n")
    _write(stdlib / "idlelib" / "i.py", b"z = 3\n")
    _write(stdlib / "site-packages" / "s.py", b"z = 3\n")
    _write(stdlib / "latin1.py", b"s = '\xe9'\n")
    _write(stdlib / "big.py", b"#" * (corpus.MAX_FILE_BYTES + 1))
    with pytest.warns(UserWarning, match="python3.11-doc"):
        manifest = corpus.build_corpus(
            tmp_path / "out", docs_root=tmp_path / "missing", stdlib=stdlib
        )
    docs = [
        d
        for split in ("train", "heldout")
        for d in corpus.read_jsonl(tmp_path / "out" / f"{split}.jsonl")
    ]
    assert sorted(d["path"] for d in docs) == ["stdlib/good.py", "stdlib/pkg/mod.py"]
    assert {d["path"]: d["text"] for d in docs}["stdlib/good.py"] == "x = 'é'\r\n"
    counts = manifest["splits"]
    assert sum(c["all"]["files"] for c in counts.values() if "all" in c) == 2
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["docs_root"] is None


def test_html_to_text_keeps_main_body_and_code():
    page = """<html><head><style>p {color: red}</style><script>var x = 1;</script></head>
    <body><nav>Navigation junk</nav><div class="related">Previous | Next</div>
    <div class="body" role="main"><section><h1>Title<a class="headerlink" href="#t">¶</a></h1>
    <p>Some   <code>inline</code>
    prose &amp; more.</p><div class="highlight"><pre><span>def f():</span>
    <span>    return 1</span>
</pre></div><ul><li>item</li></ul></section></div>
    <div class="footer">Copyright</div></body></html>"""
    text = corpus.html_to_text(page)
    assert "Title\n" in text and "¶" not in text
    assert "Some inline prose & more." in text
    assert "def f():\n        return 1\n" in text
    assert "* item" in text
    for junk in ("Navigation", "Previous", "Copyright", "color", "var x"):
        assert junk not in text


def _check_prompt(source: str, prompt: heldout_prompts.FunctionPrompt) -> None:
    start = source.index(prompt.prompt)
    assert source[start:].startswith(prompt.prompt + prompt.body)
    header_line = prompt.prompt.split("\n", 1)[0].lstrip()
    assert header_line.startswith(("def ", "async def "))
    last_line_start = prompt.prompt.rstrip(" \t").rstrip("\r\n")
    assert last_line_start.endswith(('"""', "'''", '"', "'"))
    indent = prompt.prompt[len(prompt.prompt.rstrip(" \t")) :]
    assert indent and prompt.prompt.endswith("\n" + indent)
    # The prompt ends exactly where the first body statement starts.
    assert prompt.body[:1].strip(), repr(prompt.body[:20])


def test_function_prompts_cut_right_after_the_docstring():
    source = (
        "import os\n\n"
        "class A:\n"
        "    @property\n"
        "    def f(self,\n"
        "          x: int = 1) -> int:\n"
        '        """Résumé ∑.\n\n        More.\n        """\n'
        "        return x\n\n"
        "def blank_after(x):\n"
        '    """Doc."""\n\n'
        "    return x\n\n"
        "def only_doc():\n"
        '    """Doc."""\n\n'
        "def comment_after(x):\n"
        '    """Doc."""  # note\n'
        "    return x\n\n"
        "async def g(y):\n"
        "    '''Single quotes.'''\n"
        "    await y\n"
    )
    found = heldout_prompts.function_prompts(source)
    assert [p.lineno for p in found] == [5, 25]
    assert found[0].prompt == (
        "    def f(self,\n"
        "          x: int = 1) -> int:\n"
        '        """Résumé ∑.\n\n        More.\n        """\n'
        "        "
    )
    assert found[0].body == "return x\n"
    assert found[1].prompt == "async def g(y):\n    '''Single quotes.'''\n    "
    for prompt in found:
        _check_prompt(source, prompt)


def test_heldout_prompts_cli_writes_mt_bench_lines(tmp_path, monkeypatch):
    files = [
        p
        for p in corpus.heldout_stdlib_files()
        if heldout_prompts.function_prompts(p.read_bytes().decode("utf-8"))
    ][:2]
    assert files, "no held-out stdlib file with a qualifying function"
    monkeypatch.setattr(heldout_prompts, "heldout_stdlib_files", lambda: files)
    out = tmp_path / "prompts" / "question.jsonl"
    heldout_prompts.main(["--out", str(out), "--n", "6", "--first-id", "100"])
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert 1 <= len(lines) <= 6
    assert [q["question_id"] for q in lines] == list(range(100, 100 + len(lines)))
    sources = [p.read_bytes().decode("utf-8") for p in files]
    for q in lines:
        assert set(q) == {"question_id", "category", "turns"}
        assert q["category"] == "heldout_code" and len(q["turns"]) == 1
        prompt = q["turns"][0]
        source = next(s for s in sources if prompt in s)
        end = source.index(prompt) + len(prompt)
        assert source[end - 1] in " \t" and source[end].strip(), "must stop at the body"
    again = tmp_path / "again.jsonl"
    heldout_prompts.main(["--out", str(again), "--n", "6", "--first-id", "100"])
    assert again.read_text() == out.read_text()


def _sample_texts() -> list[str]:
    source = pathlib.Path(corpus.__file__).read_text(encoding="utf-8")
    return [source, NON_ASCII * 3, "def f(x):\n    return x + 1\n" * 20]


@pytest.fixture(scope="module")
def tiny_tokenizer_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    tok = tokenizer.train_tokenizer(_sample_texts(), vocab_size=300)
    tokenizer.save_tokenizer(tok, out, model_max_length=128)
    return out


def _assert_round_trips(tok, texts) -> None:
    for text in texts:
        ids = tok(text)["input_ids"]
        assert ids[0] == tok.bos_token_id == tokenizer.BOS_ID
        assert tokenizer.EOS_ID not in ids
        assert tok.decode(ids, skip_special_tokens=True) == text


def test_tiny_tokenizer_loads_with_autotokenizer_and_round_trips(tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    assert tok.is_fast
    assert len(tok) == 300
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<s>", "</s>", "<pad>")
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 2)
    assert tok.model_max_length == 128
    _assert_round_trips(tok, [NON_ASCII, "  leading spaces", " . 's don't", "x" * 50, "a"])


def test_tokenize_corpus_writes_bos_doc_eos_streams(tiny_tokenizer_dir, tmp_path):
    texts = {"train": ["print('hi')\n", "naïve 🙂\n"], "heldout": ["x = 1\n"]}
    for split, split_texts in texts.items():
        with open(tmp_path / f"{split}.jsonl", "w", encoding="utf-8") as f:
            for i, text in enumerate(split_texts):
                f.write(
                    json.dumps({"source": "stdlib", "path": f"stdlib/{i}.py", "text": text}) + "\n"
                )
    counts = tokenizer.tokenize_corpus(tmp_path, tiny_tokenizer_dir, tmp_path / "ids")
    import tokenizers

    tok = tokenizers.Tokenizer.from_file(str(tiny_tokenizer_dir / "tokenizer.json"))
    for split, split_texts in texts.items():
        ids = np.load(tmp_path / "ids" / f"{split}_ids.npy")
        assert ids.dtype == np.uint16 and ids.size == counts[split]
        expected = []
        for text in split_texts:
            expected += [0] + tok.encode(text, add_special_tokens=False).ids + [1]
        np.testing.assert_array_equal(ids, np.array(expected, np.uint16))


@pytest.mark.skipif(
    not (COMMITTED_TOKENIZER / "tokenizer.json").exists(),
    reason="inference/default_model/base/tokenizer.json not built yet "
    "(python -m training.tokenizer --corpus runs/corpus --out inference/default_model/base)",
)
def test_committed_tokenizer_round_trips_heldout_stdlib_files():
    from transformers import AutoTokenizer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tok = AutoTokenizer.from_pretrained(COMMITTED_TOKENIZER)
    assert tok.is_fast and len(tok) <= 65536  # ids are stored as uint16.
    texts = [p.read_bytes().decode("utf-8") for p in corpus.heldout_stdlib_files()]
    _assert_round_trips(tok, [*texts, NON_ASCII])


def test_tokenizer_cli_trains_and_writes_the_id_streams(tmp_path):
    from griffin_jax import cli

    corpus_dir = tmp_path / "corpus"
    corpus_dir.mkdir()
    for split, texts in (("train", _sample_texts()), ("heldout", [NON_ASCII])):
        with open(corpus_dir / f"{split}.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps({"text": t}) + "\n" for t in texts)
    argv = ["--corpus", str(corpus_dir), "--out", str(tmp_path / "tok"), "--vocab-size", "300"]
    assert cli.run(tokenizer.main, [*argv, "--write-ids"]) == 0
    assert (tmp_path / "tok" / "tokenizer.json").is_file()
    ids = np.load(corpus_dir / "heldout_ids.npy")
    assert ids[0] == tokenizer.BOS_ID and ids[-1] == tokenizer.EOS_ID


def test_a_bad_corpus_line_is_named_by_file_and_line(tmp_path):
    from griffin_jax.checks import InputError

    path = tmp_path / "train.jsonl"
    path.write_text('{"text": "fine"}\n{"text": "cut sh\n')
    with pytest.raises(InputError, match=r"train.jsonl:2: invalid JSON"):
        list(corpus.read_jsonl(path))
    path.write_text('["not", "a", "document"]\n')
    with pytest.raises(InputError, match=r"train.jsonl:1: not a \{\"text\": ...\} document"):
        list(corpus.read_jsonl(path))
