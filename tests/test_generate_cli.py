"""`python -m inference.generate` and the `SpeculativeModel` API on a tiny exported model pair."""

from __future__ import annotations

import functools
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from spec_models import aligned_pair, base_config, draft_config

from convert.export_draft import export_draft
from convert.export_hf import export_hf
from griffin_jax import speculative
from griffin_jax.cli import run as run_cli
from inference import generate as cli
from inference.api import DEFAULT_MODEL_DIR, ModelLoadError, SpeculativeModel

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> tuple[pathlib.Path, pathlib.Path]:
    """A tiny base in HF layout with the project tokenizer, and a GRIFFIN draft for it."""
    root = tmp_path_factory.mktemp("pair")
    cfg = base_config(
        "llama", vocab_size=8192, eos_token_ids=(1,), bos_token_id=0, max_position_embeddings=256
    )
    dcfg = draft_config(cfg)
    base, draft = aligned_pair(cfg, dcfg, noise=0.2)
    export_hf(base, cfg, root / "base")
    for name in TOKENIZER_FILES:
        shutil.copy(DEFAULT_MODEL_DIR / "base" / name, root / "base" / name)
    export_draft(draft, base["embed_tokens"]["embedding"], dcfg, root / "griffin", base_cfg=cfg)
    (root / "griffin" / "tree.json").write_text(
        json.dumps({"total_tokens": 10, "depth": 3, "top_k": 3})
    )
    return root / "base", root / "griffin"


def _run(capsys, argv):
    code = run_cli(cli.main, argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_json_output_is_the_last_line_and_matches_vanilla(pair, capsys):
    base, draft = pair
    common = ["--base", str(base), "--prompt", "def f(x):", "--max-new-tokens", "12", "--json"]
    code, out, _ = _run(capsys, [*common, "--draft", str(draft)])
    assert code == 0
    spec = json.loads(out.strip().splitlines()[-1])
    code, out, _ = _run(capsys, [*common, "--vanilla"])
    assert code == 0
    plain = json.loads(out.strip().splitlines()[-1])
    assert spec["output_ids"] == plain["output_ids"]
    assert len(spec["output_ids"]) <= 12
    for key in ("text", "new_tokens", "rounds", "tau", "accept_lengths", "seconds",
                "tokens_per_s", "compile_seconds"):  # fmt: skip
        assert key in spec
    assert spec["tau"] >= 1.0
    assert spec["rounds"] == len(spec["accept_lengths"])


def test_compare_reports_speedup_and_batch_outputs(pair, capsys, tmp_path):
    base, draft = pair
    prompts = tmp_path / "p.txt"
    prompts.write_text("def a():\nclass B:\nimport os\n")
    argv = ["--base", str(base), "--draft", str(draft), "--prompt-file", str(prompts),
            "--max-new-tokens", "6", "--compare", "--json"]  # fmt: skip
    code, out, _ = _run(capsys, argv)
    assert code == 0
    res = json.loads(out.strip().splitlines()[-1])
    assert len(res["output_ids"]) == 3 and all(len(o) <= 6 for o in res["output_ids"])
    assert res["speedup"] > 0 and res["vanilla_tokens_per_s"] > 0


def test_streams_text_without_json(pair, capsys):
    base, draft = pair
    code, out, err = _run(capsys, ["--base", str(base), "--draft", str(draft), "--prompt",
                                   "x = 1", "--max-new-tokens", "8"])  # fmt: skip
    assert code == 0
    assert "tok/s" in err and "tau" in err
    assert out.strip()  # the completion text went to stdout


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--temperature", "-1"], "temperature"),
        (["--temperature", "nan"], "temperature must be finite"),
        (["--top-p", "0"], "top_p"),
        (["--top-p", "1.5"], "top_p"),
        (["--top-p", "nan"], "top_p must be finite"),
        (["--top-k", "-2"], "top_k"),
        (["--prompt", ""], "--prompt is empty"),
        (["--max-new-tokens", "0"], "max_new_tokens"),
        (["--draft", "/nonexistent/folder"], "no such model folder"),
        (["--total-tokens", "1"], "--total-tokens must be >= 2"),
        (["--total-tokens", "0"], "--total-tokens must be >= 2"),
        (["--total-tokens", "-5"], "--total-tokens must be >= 2"),
        (["--total-tokens", "10000"], "total_tokens=10000 must be in [2, 31]"),
        (["--tree-top-k", "0"], "top_k must be >= 1"),
        (["--depth", "-1"], "depth must be >= 0"),
        (["--draft-vocab", "-3"], "draft_vocab"),
        (["--max-new-tokens", "1000000000"], "lower --max-new-tokens to at most"),
        (["--max-new-tokens", "300"], "exceeds the model's 256 positions"),
        (["--prompt", "x " * 400], "shorten the prompt"),
        (["--vanilla"], "--draft and --vanilla exclude each other"),
        (["--tree", "Auto"], "expected TOP_K,DEPTH,TOTAL_TOKENS"),
        (["--tree", "1,2"], "expected TOP_K,DEPTH,TOTAL_TOKENS"),
        (["--tree", "2,1,40"], "total_tokens=40 must be in [2, 7]"),
        (["--tree", "1,2,4", "--depth", "3"], "--tree names every tree size"),
    ],
)
def test_bad_input_is_one_line_error(pair, capsys, monkeypatch, extra, message):
    """Caught before any weights load: loading raises AssertionError, which the CLI never hides."""

    def no_loading(*args, **kwargs):
        raise AssertionError("weights were loaded for a bad input")

    monkeypatch.setattr(SpeculativeModel, "from_pretrained", no_loading)
    base, draft = pair
    argv = ["--base", str(base), "--draft", str(draft), "--prompt", "hi", *extra]
    code, out, err = _run(capsys, argv)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("error:") and message in err, err
    assert "Traceback" not in err


def test_tree_flag_sets_every_size(pair, capsys):
    base, draft = pair
    argv = ["--base", str(base), "--draft", str(draft), "--prompt", "def f(x):",
            "--tree", "2,1,4,0", "--max-new-tokens", "6", "--json"]  # fmt: skip
    code, out, err = _run(capsys, argv)
    assert code == 0
    assert "TreeConfig(top_k=2, depth=1, total_tokens=4, draft_vocab=0)" in err
    assert len(json.loads(out.strip().splitlines()[-1])["output_ids"]) <= 6


def test_tree_auto_runs_the_adaptive_budget(pair, capsys, tmp_path, monkeypatch):
    """--tree auto: greedy output equals vanilla, the JSON names each round's shape, and the
    measured round costs land in the cost cache (read back, not measured, the second time)."""
    monkeypatch.setenv("GRIFFIN_COST_CACHE", str(tmp_path / "costs.json"))
    # The measurement itself is tested in test_budget; here a short one keeps the test quick.
    measure = speculative.measure_round_costs
    short = dict(repeats=1, segment=4, short=1, prompt_len=16, max_new=32)
    monkeypatch.setattr(
        speculative, "measure_round_costs", lambda *a, **kw: measure(*a, **{**kw, **short})
    )
    base, draft = pair
    common = ["--base", str(base), "--prompt", "def f(x):", "--max-new-tokens", "12", "--json"]
    code, out, err = _run(capsys, [*common, "--draft", str(draft), "--tree", "auto"])
    assert code == 0 and "adaptive, up to TreeConfig(top_k=3, depth=3" in err
    spec = json.loads(out.strip().splitlines()[-1])
    code, out, _ = _run(capsys, [*common, "--vanilla"])
    assert spec["output_ids"] == json.loads(out.strip().splitlines()[-1])["output_ids"]
    assert len(spec["round_shapes"]) == spec["rounds"] == len(spec["accept_lengths"])
    assert set(spec["round_shapes"]) <= {"none", "3,0,4", "3,3,10"}
    (costs,) = json.loads((tmp_path / "costs.json").read_text()).values()
    # the three shapes, then the catch-up and the call
    assert len(costs) == 5 and all(c > 0 for c in costs[:3]) and min(costs[3:]) >= 0
    model = SpeculativeModel.from_pretrained(base, draft, tree="auto", load_tokenizer=False)
    model.round_costs(1, greedy=True)  # from the cache file: no new measurement
    assert model._costs[(1, True)] == costs
    first = model.generate([[5, 6, 7, 8]], max_new_tokens=12).output_ids
    assert model.history().level[0, 0] >= 0  # learnt from that generation (NaN before)
    # the prior it gives the next generation changes no token
    assert model.generate([[5, 6, 7, 8]], max_new_tokens=12).output_ids == first
    # tree.json may ask for it; explicit sizes name one fixed tree instead.
    auto_dir = tmp_path / "auto_draft"
    shutil.copytree(draft, auto_dir)
    stored = json.loads((auto_dir / "tree.json").read_text())
    (auto_dir / "tree.json").write_text(json.dumps({**stored, "auto": True}))
    assert SpeculativeModel.from_pretrained(base, auto_dir, load_tokenizer=False).adaptive
    fixed = SpeculativeModel.from_pretrained(base, auto_dir, depth=2, load_tokenizer=False)
    assert not fixed.adaptive and fixed.shapes == (fixed.tree_cfg,)
    (auto_dir / "tree.json").write_text(json.dumps({**stored, "auto": "yes"}))
    with pytest.raises(ModelLoadError, match="auto"):
        SpeculativeModel.from_pretrained(base, auto_dir, load_tokenizer=False)


def test_vanilla_respects_the_position_limit(pair, capsys):
    base, _ = pair
    argv = ["--base", str(base), "--vanilla", "--prompt", "hi", "--max-new-tokens", "1000000000"]
    code, _, err = _run(capsys, argv)
    assert code == 2 and "256 positions" in err and err.count("\n") == 1


@pytest.mark.parametrize(
    "content,message",
    [
        ("a\n\nb\n", "line 2 is blank"),
        ("a\nb\n\n", "line 3 is blank"),
        ("  \na\n", "line 1 is blank"),
        ("", "is empty"),
    ],
)
def test_prompt_file_blank_lines_are_errors(pair, capsys, tmp_path, content, message):
    base, draft = pair
    prompts = tmp_path / "p.txt"
    prompts.write_text(content)
    argv = ["--base", str(base), "--draft", str(draft), "--prompt-file", str(prompts)]
    code, _, err = _run(capsys, argv)
    assert code == 2 and message in err and err.count("\n") == 1, err


def test_prompt_file_rows_match_lines(pair, capsys, tmp_path):
    """Row i answers line i; a final newline adds no prompt (and no blank-line error)."""
    base, _ = pair
    lines = ["def a():", "import os"]
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(lines) + "\n")
    argv = ["--base", str(base), "--vanilla", "--prompt-file", str(prompts),
            "--max-new-tokens", "4", "--json"]  # fmt: skip
    code, out, _ = _run(capsys, argv)
    assert code == 0
    batch = json.loads(out.strip().splitlines()[-1])["output_ids"]
    for line, ids in zip(lines, batch, strict=True):
        code, out, _ = _run(capsys, [*argv[:3], "--prompt", line, *argv[5:]])
        assert json.loads(out.strip().splitlines()[-1])["output_ids"] == ids


def test_debug_flag_shows_the_traceback(pair):
    base, draft = pair
    argv = ["--base", str(base), "--draft", str(draft), "--prompt", "hi", "--top-p", "2"]
    with pytest.raises(ValueError, match="top_p"):
        run_cli(cli.main, [*argv, "--debug"])


def test_depth_zero_is_one_drafted_level(pair):
    """depth 0 is honoured (not replaced by tree.json's 3): one level of top_k drafted tokens."""
    base, draft = pair
    model = SpeculativeModel.from_pretrained(base, draft, depth=0, total_tokens=4)
    assert (model.tree_cfg.depth, model.tree_cfg.top_k, model.tree_cfg.total_tokens) == (0, 3, 4)
    ids = [model.tokenizer("def g(y):")["input_ids"]]
    spec = model.generate(ids, max_new_tokens=10)
    assert spec.output_ids == model.vanilla_generate(ids, max_new_tokens=10).output_ids
    assert max(a for row in spec.accept_lengths for a in row) <= 1


@pytest.mark.parametrize(
    "prompts,message",
    [
        ([[5, 8192]], "token id 8192 at position 1 is outside the vocabulary"),
        ([[10**9]], "outside the vocabulary"),
        ([[-1, 4]], "token id -1 at position 0"),
        ([[1.0, 2.0]], "must be integers"),
        ([[True]], "must be integers"),
        ([[]], "prompt 0 is empty"),
        ([], "no prompts"),
        ("def f():", "encode text with the tokenizer first"),
        ([[5] * 250], "lower max_new_tokens to at most 6"),
    ],
)
@pytest.mark.parametrize("method", ["generate", "vanilla_generate"])
def test_api_refuses_bad_prompts(pair, prompts, message, method):
    base, draft = pair
    model = _api_model(base, draft)
    with pytest.raises(ValueError, match=re.escape(message)):
        getattr(model, method)(prompts, max_new_tokens=10)


@pytest.mark.parametrize(
    "knobs,message",
    [
        (dict(temperature=float("nan")), "temperature must be finite"),
        (dict(temperature=float("inf")), "temperature must be finite"),
        (dict(top_p=float("nan")), "top_p must be finite"),
        (dict(top_k=2.5), "top_k"),
        (dict(max_new_tokens=0), "max_new_tokens must be >= 1"),
        (dict(max_new_tokens=3.0), "max_new_tokens must be an integer"),
        (dict(seed=-1), "seed must be >= 0"),
    ],
)
def test_api_refuses_bad_settings(pair, knobs, message):
    base, draft = pair
    model = _api_model(base, draft)
    settings = dict(max_new_tokens=4) | knobs
    for method in (model.generate, model.vanilla_generate):
        with pytest.raises(ValueError, match=re.escape(message)):
            method([[5, 6]], **settings)


@functools.cache
def _api_model(base, draft):
    return SpeculativeModel.from_pretrained(base, draft, load_tokenizer=False)


def test_draft_that_does_not_fit_the_base_is_refused(pair, capsys, tmp_path):
    base, _ = pair
    cfg = base_config("llama", vocab_size=8192, d_model=32, head_dim=8)
    dcfg = draft_config(cfg, head_dim=8)
    other_base, other_draft = aligned_pair(cfg, dcfg)
    export_draft(other_draft, other_base["embed_tokens"]["embedding"], dcfg, tmp_path / "d")
    code, _, err = _run(capsys, ["--base", str(base), "--draft", str(tmp_path / "d"),
                                 "--prompt", "hi"])  # fmt: skip
    assert code == 2 and "hidden" in err and "64" in err and "32" in err


def test_api_generate_equals_vanilla_generate(pair):
    base, draft = pair
    model = SpeculativeModel.from_pretrained(base, draft)
    assert model.tree_cfg.total_tokens == 10 and model.tree_cfg.depth == 3
    ids = [model.tokenizer("def g(y):")["input_ids"], model.tokenizer("import")["input_ids"]]
    spec = model.generate(ids, max_new_tokens=10)
    plain = model.vanilla_generate(ids, max_new_tokens=10)
    assert spec.output_ids == plain.output_ids
    assert spec.tau > 1.0  # the aligned draft is accepted


def test_with_draft_shares_the_base_and_loads_the_draft_as_from_pretrained_does(pair):
    base, draft = pair
    plain = SpeculativeModel.from_pretrained(base, with_draft=False)
    alone = SpeculativeModel.from_pretrained(base, draft, depth=2)
    shared = plain.with_draft(draft, depth=2)
    # the same arrays, not a copy: one base in memory for every draft over it
    assert shared.base_params is plain.base_params and shared.tokenizer is plain.tokenizer
    assert shared.dcfg == alone.dcfg and shared.tree_cfg == alone.tree_cfg
    assert not shared.adaptive and not plain.has_draft  # the draft went to the new model only
    loaded = jax.tree_util.tree_leaves_with_path(alone.draft_params)
    got = dict(jax.tree_util.tree_leaves_with_path(shared.draft_params))
    assert len(got) == len(loaded)  # the same layout (fused, packed where the base is)
    for path, leaf in loaded:
        np.testing.assert_array_equal(np.asarray(got[path]), np.asarray(leaf))
    ids = [plain.tokenizer("def g(y):")["input_ids"]]
    assert shared.generate(ids, max_new_tokens=8).output_ids == (
        alone.generate(ids, max_new_tokens=8).output_ids
    )
    assert plain.with_draft(draft, tree="auto").adaptive
    with pytest.raises(ModelLoadError, match="no such model folder"):
        plain.with_draft(base.parent / "missing")
    # the draft takes the base's dtype
    half = SpeculativeModel.from_pretrained(
        base, with_draft=False, dtype="bfloat16", load_tokenizer=False
    ).with_draft(draft)
    leaves = jax.tree_util.tree_leaves(half.draft_params)
    floats = {x.dtype for x in leaves if jax.numpy.issubdtype(x.dtype, jax.numpy.floating)}
    assert floats == {np.dtype(jax.numpy.bfloat16)}


def test_api_auto_tree_size_picks_a_candidate(pair):
    base, draft = pair
    model = SpeculativeModel.from_pretrained(base, draft, total_tokens=-1, load_tokenizer=False)
    assert 2 <= model.tree_cfg.total_tokens <= 1 + 3 + 3 * 3 * 3


def test_missing_model_folder_is_refused(tmp_path):
    with pytest.raises(ModelLoadError, match="no such model folder"):
        SpeculativeModel.from_pretrained(tmp_path / "missing")
    jax.clear_caches()


def test_benchmark_reports_medians_over_repeated_passes(pair, tmp_path, capsys):
    from inference import benchmark

    base, draft = pair
    questions = tmp_path / "bench" / "question.jsonl"
    questions.parent.mkdir()
    questions.write_text(
        "".join(json.dumps({"turns": [t]}) + "\n" for t in ("def a(x):", "import os\n", "x = 1"))
    )
    out = tmp_path / "report.json"
    argv = ["--base", str(base), "--draft", f"g={draft}", "--bench", str(questions),
            "--temperature", "0", "--max-new-tokens", "8", "--repeats", "3",
            "--out", str(out)]  # fmt: skip
    assert benchmark.main(argv) == 0
    capsys.readouterr()
    (row,) = json.loads(out.read_text())["results"]
    g, v = row["drafts"]["g"], row["vanilla"]
    assert len(g["speedup_passes"]) == 3 and len(v["tokens_per_s_passes"]) == 3
    assert g["speedup"] == sorted(g["speedup_passes"])[1]
    assert v["tokens_per_s"] == sorted(v["tokens_per_s_passes"])[1]
    assert g["new_tokens"] == v["new_tokens"]  # greedy: both decode the same tokens
    assert g["tau"] >= 1.0 and g["acceptance_at_depth"][0] <= 1.0
    assert [len(b) for b in g["batch_seconds"]] == [3] * 3  # per pass, per batch of one
    assert 0 <= v["max_steal_kept"] < 1 and v["redone"] >= 0
    assert out.with_suffix(".png").exists()
    # a fixed tree with the kernels' threads left to the process (conftest) measures no costs
    assert json.loads(out.read_text())["round_costs"] == {"g": {}}


def test_benchmark_batches_and_seeded_sampling_match_vanilla(pair, tmp_path, capsys):
    """--batch 2: right-padded batches; seeded sampling emits vanilla's tokens (same counts)."""
    from inference import benchmark

    base, draft = pair
    questions = tmp_path / "bench" / "question.jsonl"
    questions.parent.mkdir()
    texts = ("def a(x):", "import os\n", "x = 1")
    questions.write_text("".join(json.dumps({"turns": [t]}) + "\n" for t in texts))
    out = tmp_path / "report.json"
    argv = ["--base", str(base), "--draft", f"g={draft}", "--bench", str(questions),
            "--temperature", "1", "--max-new-tokens", "8", "--batch", "2",
            "--out", str(out)]  # fmt: skip
    assert run_cli(benchmark.main, argv) == 0
    capsys.readouterr()
    report = json.loads(out.read_text())
    assert report["batch"] == 2 and len(report["results"]) == 1
    for row in report["results"]:
        g, v = row["drafts"]["g"], row["vanilla"]
        assert g["new_tokens"] == v["new_tokens"], row["temperature"]
        assert v["rounds"] == v["new_tokens"] - 3  # one decode per token after the first


def test_benchmark_rotates_which_method_goes_first(monkeypatch):
    """Batch i of a pass starts with method (turn + i) mod n; seconds are kept per batch."""
    from types import SimpleNamespace

    from inference import benchmark

    calls = []

    def method(name, seconds):
        def generate(chunk, seed, **knobs):
            calls.append((name, len(chunk), seed))
            return SimpleNamespace(new_tokens=2 * len(chunk), seconds=seconds, rounds=[1],
                                   accept_lengths=[], round_shapes=[])  # fmt: skip

        return generate

    methods = {n: method(n, s) for n, s in (("vanilla", 1.0), ("a", 2.0), ("b", 4.0))}
    prompts = [[1, 2]] * 7
    out = benchmark.run_methods(methods, prompts, batch=2, turn=1, seed=5, max_steal=1.0)
    timed = calls[3 * 2 :]  # after each method's warm-up of the two shapes (2 rows, 1 row)
    firsts = [timed[3 * i][0] for i in range(4)]
    assert firsts == ["a", "b", "vanilla", "a"]
    assert [c[1:] for c in timed[9:]] == [(1, 11)] * 3  # the last, one-row batch, its own seed
    assert out["b"]["batch_seconds"] == [4.0] * 4 and out["b"]["tokens_per_s"] == 14 / 16

    # with several processes no call is redone (their calls must stay in step)
    limits = []
    real = benchmark.steal.timed

    def spy(fn, *, max_steal):
        limits.append(max_steal)
        return real(fn, max_steal=max_steal)

    monkeypatch.setattr(benchmark.steal, "timed", spy)
    benchmark.run_methods(methods, prompts, batch=4, max_steal=0.05)
    assert limits and set(limits) == {0.05}
    limits.clear()
    monkeypatch.setattr(benchmark.jax, "process_count", lambda: 2)
    benchmark.run_methods(methods, prompts, batch=4, max_steal=0.05)
    assert limits and set(limits) == {1.0}


@pytest.mark.parametrize(
    "module,extra,message",
    [
        ("benchmark", ["--draft", "nameless"], "expected NAME=FOLDER"),
        ("benchmark", ["--draft", "g=/nonexistent"], "has no config.json"),
        ("benchmark", ["--batch", "0"], "--batch must be an integer >= 1"),
        ("benchmark", ["--temperature", "nan"], "temperature must be finite"),
        ("benchmark", ["--repeats", "0"], "--repeats must be an integer >= 1"),
        ("benchmark", ["--max-steal", "0"], "--max-steal must be a share"),
        ("benchmark", ["--num-questions", "-1"], "--num-questions must be an integer >= 1"),
        ("benchmark", ["--total-tokens", "1000"], "total_tokens=1000"),
        ("benchmark", ["--max-new-tokens", "5000"], "lower --max-new-tokens"),
        ("benchmark", ["--bench", "BAD"], "expected a JSON object"),
        ("benchmark", ["--bench", "/nonexistent.jsonl"], "no such file"),
        ("benchmark", ["--out", "FILE/report.json"], "is a file, not a folder"),
        ("tune_tree", ["--tree", "1,2"], "expected TOP_K,DEPTH,TOTAL_TOKENS"),
        ("tune_tree", ["--tree", "0,2,3"], "top_k must be >= 1"),
        ("tune_tree", ["--tree", "2,1,40"], "total_tokens=40"),
        ("tune_tree", ["--temperature", "-1"], "temperature must be >= 0"),
        ("tune_tree", ["--draft", "/nonexistent"], "has no config.json"),
        ("bench_vanilla", ["--heads", "3"], "must divide by --heads"),
        ("bench_vanilla", ["--new-tokens", "0"], "--new-tokens must be an integer >= 1"),
        ("bench_attention", ["--context", "600:512"], "exceed the capacity"),
        ("bench_attention", ["--context", "600"], "CACHED:CAPACITY expected"),
        ("bench_attention", ["--widths", "0"], "--widths must be an integer >= 1"),
        ("bench_attention", ["--implementations", "flash"], "invalid choice"),
        ("memory_plan", ["--devices", "1,x"], "expected positive integers"),
        ("memory_plan", ["--batch", "abc"], "invalid int value"),
    ],
)
def test_inference_entry_points_refuse_bad_flags(
    pair, capsys, monkeypatch, tmp_path, module, extra, message
):
    """One line, status 2, before any model is loaded."""
    import importlib

    def no_loading(*args, **kwargs):
        raise AssertionError("weights were loaded for a bad input")

    monkeypatch.setattr(SpeculativeModel, "from_pretrained", no_loading)
    base, draft = pair
    good = tmp_path / "q.jsonl"
    good.write_text(json.dumps({"turns": ["def f():"]}) + "\n")
    (tmp_path / "bad.jsonl").write_text('{"turns": 3}\n')
    (tmp_path / "FILE").write_text("")
    extra = [
        {"BAD": str(tmp_path / "bad.jsonl"), "FILE/report.json": str(tmp_path / "FILE/r.json")}.get(
            x, x
        )
        for x in extra
    ]
    common = {
        "benchmark": ["--base", str(base), "--draft", f"g={draft}", "--bench", str(good)],
        "tune_tree": ["--base", str(base), "--draft", str(draft), "--bench", str(good)],
    }.get(module, [])
    if module == "benchmark" and any(x.startswith("g=") or x == "nameless" for x in extra):
        common = common[:2] + common[4:]
    if module == "benchmark" and "--bench" in extra:
        common = common[:4]
    mod = importlib.import_module(f"inference.{module}")
    code = run_cli(mod.main, [*common, *extra])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and message in err, err


def test_bench_attention_times_both_implementations(pair, tmp_path, capsys):
    from inference import bench_attention

    base, _ = pair
    out = tmp_path / "attention.json"
    argv = ["--base", str(base), "--widths", "1", "3", "--context", "10:64", "--context",
            "150:256", "--repeats", "2", "--out", str(out)]  # fmt: skip
    assert run_cli(bench_attention.main, argv) == 0
    capsys.readouterr()
    rows = json.loads(out.read_text())["rows"]
    assert [(r["width"], r["cached"], r["capacity"]) for r in rows] == [
        (1, 10, 64), (3, 10, 64), (1, 150, 256), (3, 150, 256)
    ]  # fmt: skip
    for row in rows:
        assert set(row["ms"]) == {"cpu", "einsum"} and min(row["ms"].values()) > 0
        assert row["max_logit_diff"]["cpu"] == 0 and row["max_logit_diff"]["einsum"] < 1e-4
    assert "GRIFFIN_ATTENTION" not in os.environ


def test_profile_round_reports_every_piece(pair, tmp_path, capsys):
    from inference import profile_round

    base, draft = pair
    questions = tmp_path / "q.jsonl"
    questions.write_text(json.dumps({"turns": ["def f(x):"]}) + "\n")
    out = tmp_path / "profile.json"
    argv = ["--base", str(base), "--draft", str(draft), "--bench", str(questions),
            "--num-questions", "1", "--repeats", "2", "--tree", "2,2,5",
            "--out", str(out)]  # fmt: skip
    assert run_cli(profile_round.main, argv) == 0
    capsys.readouterr()
    report = json.loads(out.read_text())
    assert report["gemm_gflops"] > 0 and report["base_params"] > 0
    assert [(r["top_k"], r["depth"], r["total_tokens"]) for r in report["trees"]] == [(2, 2, 5)]
    for row in report["trees"]:
        for key in ("round_ms", "verify_ms", "decode_ms", "trunk_ms", "level_ms"):
            assert row[key] > 0, key
        assert row["hlo_ops"] > 100 and row["decodes_per_round"] > 0
        assert row["draft_ms"] == row["trunk_ms"] + row["depth"] * row["level_ms"]
        assert row["verify_products_ms"] > 0 and row["decode_products_ms"] > 0
        bound = max(row["verify_floor_ms"], row["decode_ms"])
        assert row["products_vs_bound"] == pytest.approx(row["verify_products_ms"] / bound)
        phases = row["phases_ms"]
        for phase in ("verify", "accept", "commit", "draft/trunk", "draft/expand", "draft/rerank"):
            assert phases[phase] > 0, phase
        assert set(phases) <= {*profile_round.PHASES, profile_round.BETWEEN_OPS, "other"}
        # Each call's phases add up to its span; the medians over calls nearly so.
        assert sum(phases.values()) == pytest.approx(row["traced_round_ms"], rel=0.3)
        assert len(row["levels_ms"]) == row["depth"] and min(row["levels_ms"]) > 0
        assert row["thunks"] > 100


def test_reports_name_the_machine():
    from griffin_jax import cli

    line = cli.machine()
    assert f"{os.cpu_count()} CPUs" in line and f"jax {jax.__version__}" in line
    assert f"{jax.default_backend()} x{jax.device_count()}" in line


@pytest.mark.parametrize("layout", ["stored", "decode"])
def test_the_products_chain_runs_every_layer_kernel(pair, layout):
    from griffin_jax import cpu_kernels
    from griffin_jax.layers import is_fused, kernel_of, unfuse_projections
    from griffin_jax.model import decode_layout, unstack_layers
    from inference import profile_round
    from inference.api import SpeculativeModel

    base, _ = pair
    model = SpeculativeModel.from_pretrained(base)
    stored = unfuse_projections(model.base_params, model.cfg)
    params = decode_layout(stored) if layout == "decode" else unstack_layers(stored)
    assert is_fused(params) == (layout == "decode")
    projections = profile_round.forward_kernels(params)
    kernels = [kernel_of(p) for p in projections]
    every = [
        leaf
        for path, leaf in jax.tree_util.tree_leaves_with_path(params["layers"])
        if jax.tree_util.keystr(path).endswith(("['kernel']", "['packed_kernel']"))
    ]
    assert len(kernels) == len(every) > 0
    assert sum(k.size for k in kernels) == sum(k.size for k in every)
    # Each layer's products run in its forward's order: attention in, attention out, MLP in, out.
    d = params["embed_tokens"]["embedding"].shape[1]
    per_layer = len(kernels) // len(params["layers"])
    shapes = [cpu_kernels.kernel_shape(k) for k in kernels]
    assert shapes[0][0] == d and shapes[per_layer - 1][1] == d


def test_round_phases_follow_the_named_scopes():
    import jax.numpy as jnp

    from griffin_jax import cpu_kernels
    from inference import profile_round

    w = jnp.eye(64) * 0.5
    packed = cpu_kernels.pack(w) if cpu_kernels.enabled() else None

    def f(x):
        with jax.named_scope("verify"):
            x = jnp.tanh(x @ w)
            if packed is not None:  # a custom call (the packed products): a thunk, no container
                x = cpu_kernels.matmul(x, packed)

        def level(i, x):
            with jax.named_scope("draft/expand"):
                return jnp.sin(x @ w) + i

        x = jax.lax.fori_loop(0, 3, level, x)
        with jax.named_scope("accept"):
            return jnp.sort(x, axis=-1)

    run = jax.jit(f)
    x = jnp.linspace(0, 1, 8 * 64).reshape(8, 64)
    text = run.lower(x).compile().as_text()
    phases, containers = profile_round.hlo_phases(text)
    assert any(" while(" in line and f"%{name} " in line
               for name in containers for line in text.splitlines())  # fmt: skip
    assert {"verify", "draft/expand", "accept"} <= set(phases.values())
    calls = [ln.split(" = ")[0].split()[-1].lstrip("%") for ln in text.splitlines()
             if "custom-call(" in ln]  # fmt: skip
    assert (len(calls) > 0) == (packed is not None)
    assert all(phases[c] == "verify" and c not in containers for c in calls)
    _, out = profile_round.trace_phases(run, x, 4, text, "jit_f", loop_passes=3)
    for phase in ("verify", "draft/expand", "accept"):
        assert out["phases_ms"][phase] > 0, phase
    assert not {"stats", "commit"} & set(out["phases_ms"])  # nothing named them
    assert len(out["levels_ms"]) == 3 and min(out["levels_ms"]) > 0


def test_tune_tree_writes_the_fastest_tree(pair, tmp_path, capsys):
    import numpy as np

    from inference import tune_tree
    from training import draft_vocab

    base, draft = pair
    folder = tmp_path / "draft"
    shutil.copytree(draft, folder)
    stored = json.loads((folder / "tree.json").read_text())
    (folder / "tree.json").write_text(json.dumps({**stored, "auto": True}))
    ids = np.random.default_rng(0).integers(0, 8192, 50_000)
    draft_vocab.write_ranking(draft_vocab.rank_tokens(ids, 8192), folder)
    questions = tmp_path / "q.jsonl"
    questions.write_text("".join(json.dumps({"turns": [t]}) + "\n" for t in ("def a(x):", "x = 1")))
    argv = ["--base", str(base), "--draft", str(folder), "--bench", str(questions),
            "--tree", "2,2,5", "--tree", "3,3,10,4096", "--max-new-tokens", "8",
            "--repeats", "2", "--write", "--out", str(tmp_path / "t.json")]  # fmt: skip
    assert tune_tree.main(argv) == 0
    capsys.readouterr()
    report = json.loads((tmp_path / "t.json").read_text())
    best = max(report["trees"], key=lambda r: r["speedup"])
    keys = ("top_k", "depth", "total_tokens", "draft_vocab")
    assert report["best"] == {k: best[k] for k in keys}
    # the new sizes, and the adaptive setting kept
    assert json.loads((folder / "tree.json").read_text()) == {**report["best"], "auto": True}
    assert all(len(r["speedup_passes"]) == 2 for r in report["trees"])
    # each candidate timed as one fixed tree, not as the adaptive budget's largest shape
    assert [list(r["round_shapes"]) for r in report["trees"]] == [["2,2,5"], ["3,3,10,4096"]]
    assert [r["draft_vocab"] for r in report["trees"]] == [0, 4096]


def test_api_draft_vocab_from_the_ranking_file(pair, tmp_path):
    import numpy as np

    from training import draft_vocab

    base, draft = pair
    folder = tmp_path / "draft"
    shutil.copytree(draft, folder)
    with pytest.raises(ModelLoadError, match="draft_vocab.safetensors"):
        SpeculativeModel.from_pretrained(base, folder, draft_vocab=1024)
    ids = np.random.default_rng(1).integers(0, 4096, 20_000)  # ids >= 4096 never occur
    draft_vocab.write_ranking(draft_vocab.rank_tokens(ids, 8192), folder)
    tree = json.loads((folder / "tree.json").read_text())
    (folder / "tree.json").write_text(json.dumps({**tree, "draft_vocab": 4096}))
    model = SpeculativeModel.from_pretrained(base, folder)  # the tree file's setting
    assert model.tree_cfg.draft_vocab == 4096
    head = model.draft_head()
    assert sorted(np.asarray(head.token_ids).tolist()) == list(range(4096))
    prompt = model.tokenizer("def f(x):")["input_ids"]
    spec = model.generate([prompt], max_new_tokens=12)
    assert spec.output_ids == model.vanilla_generate([prompt], max_new_tokens=12).output_ids
    assert SpeculativeModel.from_pretrained(base, folder, draft_vocab=0).draft_head() is None


# A process that compiles one small program through the entry points' compile cache and prints
# the folder in use and its hits and misses of that cache.
COMPILE_CACHE_PROBE = """
import jax, jax.numpy as jnp
from griffin_jax import cli
events = []
jax.monitoring.register_event_listener(lambda name, **kw: events.append(name))
folder = cli.use_compile_cache()
jax.jit(lambda x: jnp.sin(x) @ x.T)(jnp.ones((8, 8))).block_until_ready()
hits = events.count("/jax/compilation_cache/cache_hits")
misses = events.count("/jax/compilation_cache/cache_misses")
print(folder, hits, misses)
"""


@pytest.mark.parametrize("setting", ["folder", "off", "jax"])
def test_entry_points_keep_compiled_programs_across_runs(tmp_path, setting):
    """`cli.use_compile_cache`: the second process loads the first one's program from the
    folder ($GRIFFIN_COMPILE_CACHE); "off" keeps nothing; JAX_COMPILATION_CACHE_DIR wins."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION_CACHE")}
    folder = tmp_path / "xla"
    unused = tmp_path / "unused"
    env["GRIFFIN_COMPILE_CACHE"] = str({"folder": folder, "off": "off", "jax": unused}[setting])
    if setting == "jax":
        env["JAX_COMPILATION_CACHE_DIR"] = str(folder)
    runs = []
    for _ in range(2):
        out = subprocess.run(
            [sys.executable, "-c", COMPILE_CACHE_PROBE], env=env, capture_output=True,
            text=True, timeout=120, check=True,
        )  # fmt: skip
        runs.append(out.stdout.split())
    if setting == "off":
        assert runs == [["None", "0", "0"]] * 2 and not folder.exists()
        return
    (name, hits, misses), again = runs
    assert name == str(folder) and hits == "0" and int(misses) >= 1
    assert again == [str(folder), misses, "0"]  # every program the first run compiled
    assert any(folder.iterdir())
    assert not unused.exists()
