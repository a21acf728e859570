"""`official_eagle.py`: the static tree rule (always), and the official EAGLE release on this
project's exported weights (where the release is installed: `GRIFFIN_EAGLE_LLM`, default
`runs/eagle_llm`; see that module's docstring; skipped elsewhere, as in `make test`)."""

from __future__ import annotations

import json
import os
import pathlib
import shutil

import bench_torch_reference
import official_eagle
import pytest
from spec_models import aligned_pair, base_config, draft_config
from test_generate_cli import TOKENIZER_FILES

from convert.export_draft import export_draft
from convert.export_hf import export_hf
from inference.api import DEFAULT_MODEL_DIR, SpeculativeModel

ROOT = pathlib.Path(__file__).resolve().parents[1]
RELEASE = pathlib.Path(os.environ.get("GRIFFIN_EAGLE_LLM", ROOT / "runs" / "eagle_llm"))
needs_release = pytest.mark.skipif(
    not (RELEASE / "eagle" / "model" / "ea_model.py").is_file(),
    reason=f"the official eagle-llm release is not installed at {RELEASE} "
    f"(pip install --no-deps --target {RELEASE} eagle-llm==1.2.1)",
)
PROMPTS = [[5, 9, 2, 44, 17, 8, 31], [70, 3, 12], list(range(20, 52))]


def test_static_tree_is_the_smallest_length_plus_rank_sum_paths():
    tree = official_eagle.static_tree(26, 5, 4)
    assert tree[:7] == [[0], [1], [0, 0], [2], [0, 1], [1, 0], [0, 0, 0]]
    assert len(tree) == 25 and len({tuple(p) for p in tree}) == 25
    keys = [(len(p) + sum(p), len(p), p) for p in tree]
    assert keys == sorted(keys)
    # Nothing left out ranks before the last path taken.
    every = [[a] for a in range(4)] + [[a, b] for a in range(4) for b in range(4)]
    left = [p for p in every if p not in tree]
    assert min((len(p) + sum(p), len(p), p) for p in left) > keys[-1]
    for path in tree:  # prefix- and sibling-closed, within the bounds
        assert len(path) <= 5 and max(path) < 4
        assert path[:-1] == [] or path[:-1] in tree
        assert path[-1] == 0 or path[:-1] + [path[-1] - 1] in tree
    deep = official_eagle.static_tree(60, 6, 10)  # length + rank sum <= 6: 5 levels deep
    assert len(deep) == 59 and max(map(len, deep)) == 5 and [0] * 5 in deep and [5] in deep


def test_a_missing_release_is_named_with_its_install_command(tmp_path):
    with pytest.raises(FileNotFoundError, match="pip install --no-deps --target"):
        official_eagle.import_release(tmp_path)


@pytest.fixture(scope="module")
def eagle2_pair(tmp_path_factory):
    """(base folder, EAGLE-2 draft folder, GRIFFIN draft folder): drafts that know their base,
    with noise (the benchmark script's PyTorch loop takes the GRIFFIN one)."""
    root = tmp_path_factory.mktemp("official_eagle")
    # The default tokenizer's vocabulary and stop token (the release stops at its tokenizer's).
    cfg = base_config("llama", vocab_size=8192, eos_token_ids=(1,))
    for kind in ("eagle2", "griffin"):
        dcfg = draft_config(cfg, kind=kind)
        base, draft = aligned_pair(cfg, dcfg, noise=0.3)  # the same base (seed 0)
        export_draft(draft, base["embed_tokens"]["embedding"], dcfg, root / kind, base_cfg=cfg)
    export_hf(base, cfg, root / "base")
    for name in TOKENIZER_FILES:  # the release loads the base folder's tokenizer
        shutil.copy(DEFAULT_MODEL_DIR / "base" / name, root / "base" / name)
    return root / "base", root / "eagle2", root / "griffin"


@needs_release
def test_the_release_decodes_what_vanilla_decodes_and_uses_the_draft(eagle2_pair):
    base_dir, draft_dir, _ = eagle2_pair
    model = official_eagle.load(RELEASE, base_dir, draft_dir)
    vanilla = SpeculativeModel.from_pretrained(base_dir, with_draft=False, load_tokenizer=False)
    want = vanilla.vanilla_generate(PROMPTS, max_new_tokens=20).output_ids
    trees = [None, official_eagle.static_tree(8, 3, 2), official_eagle.static_tree(20, 5, 4)]
    for choices in trees:  # None: the release's default tree, as loaded
        if choices is not None:
            official_eagle.set_tree(model, choices)
        accepted = 0
        for prompt, ids in zip(PROMPTS, want, strict=True):
            new, accepts = official_eagle.generate(model, prompt, max_new_tokens=20, eos_id=1)
            assert new == ids
            # The prefill's token, then accepted + bonus a round (the last may overshoot).
            assert 1 + sum(a + 1 for a in accepts) >= len(new)
            accepted += sum(accepts)
        assert accepted > 0  # the draft's guesses were taken


@needs_release
def test_the_benchmark_script_runs_the_release(eagle2_pair, tmp_path):
    base_dir, draft_dir, griffin_dir = eagle2_pair
    bench = tmp_path / "prompts" / "question.jsonl"
    bench.parent.mkdir()
    bench.write_text(json.dumps({"turns": ["def add(a, b):"]}) + "\n")
    out = tmp_path / "report.json"
    argv = ["--base", str(base_dir), "--draft", str(griffin_dir), "--eagle-draft", str(draft_dir),
            "--bench", str(bench), "--num-questions", "1", "--max-new-tokens", "8",
            "--tree", "2,2,6", "--eagle-llm", str(RELEASE), "--official-tree", "2,2,6",
            "--out", str(out)]  # fmt: skip
    assert bench_torch_reference.main(argv) == 0
    methods = json.loads(out.read_text())["results"][0]["methods"]
    assert {"official 26 (mc_sim_7b_63)", "official 6", "engine eagle2 2,2,6"} <= set(methods)
    assert all(m["same_output"] == 1 and m["new_tokens"] == 8 for m in methods.values())
    assert methods["engine eagle2 2,2,6"]["over_official"] > 0


def test_official_trees_need_the_release_and_distinct_sizes():
    with pytest.raises(ValueError, match="--official-tree needs --eagle-llm"):
        bench_torch_reference.main(["--official-tree", "2,2,6"])
    argv = ["--eagle-llm", "runs/none", "--official-tree", "2,2,6", "--official-tree", "3,1,6"]
    with pytest.raises(ValueError, match="two trees of 6 nodes"):
        bench_torch_reference.main(argv)
