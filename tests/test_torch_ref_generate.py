"""The PyTorch version of the reference's generation loop (`torch_ref_generate.py`, written from
the spec, transformers' Llama as the base) against this engine on the same exported weights:
its greedy output equals greedy vanilla decoding in either framework, and it accepts, round by
round, the draft tokens this engine's tree accepts. That checks the benchmark baseline
(`bench_torch_reference.py`) and, independently of the tree-only references, this engine's tree,
verification and commit end to end."""

from __future__ import annotations

import json
import shutil

import bench_torch_reference
import numpy as np
import pytest
import torch
import torch_ref_generate
from spec_models import aligned_pair, base_config, draft_config, random_pair
from test_generate_cli import TOKENIZER_FILES

from convert.export_draft import export_draft
from convert.export_hf import export_hf
from inference.api import DEFAULT_MODEL_DIR, SpeculativeModel

PROMPTS = [[5, 9, 2, 44, 17, 8, 31], [70, 3, 12], list(range(20, 52))]
TREES = [(3, 2, 8), (1, 3, 5)]  # (top_k, depth, total_tokens)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """{kind: (base folder, draft folder)}: a pair whose draft knows the base (many tokens
    accepted; the base's attention output is zero) and a random pair (its attention live)."""
    root = tmp_path_factory.mktemp("torch_ref_generate")
    cfg = base_config("llama", vocab_size=8192, eos_token_ids=())  # the default tokenizer's
    dcfg = draft_config(cfg)
    out = {}
    for kind, (base, draft) in {
        "aligned": aligned_pair(cfg, dcfg, noise=0.3), "random": random_pair(cfg, dcfg)
    }.items():  # fmt: skip
        export_hf(base, cfg, root / kind / "base")
        for name in TOKENIZER_FILES:  # for the benchmark script's prompts
            shutil.copy(DEFAULT_MODEL_DIR / "base" / name, root / kind / "base" / name)
        export_draft(draft, base["embed_tokens"]["embedding"], dcfg, root / kind / "draft",
                     base_cfg=cfg)  # fmt: skip
        out[kind] = (root / kind / "base", root / kind / "draft")
    return out


@pytest.mark.parametrize("kind", ["aligned", "random"])
def test_reference_loop_equals_vanilla_and_accepts_what_the_engine_accepts(folders, kind):
    base_dir, draft_dir = folders[kind]
    tbase, tdraft = torch_ref_generate.load_pair(base_dir, draft_dir)
    n = 24
    accepted = 0
    for top_k, depth, total in TREES:
        model = SpeculativeModel.from_pretrained(
            base_dir, draft_dir, load_tokenizer=False, top_k=top_k, depth=depth,
            total_tokens=total, draft_vocab=0, unroll_layers=False,
        )  # fmt: skip
        ours = model.generate(PROMPTS, max_new_tokens=n)
        want = model.vanilla_generate(PROMPTS, max_new_tokens=n).output_ids
        assert ours.output_ids == want
        for row, prompt in enumerate(PROMPTS):
            new, accepts = torch_ref_generate.generate(
                tbase, tdraft, prompt, max_new_tokens=n, top_k=top_k, depth=depth, total=total
            )
            assert (
                new
                == want[row]
                == torch_ref_generate.vanilla_generate(tbase, prompt, max_new_tokens=n)
            )
            # A reference round emits its root and the accepted tokens (the bonus is the next
            # root); this engine's round emits the accepted tokens and the bonus (the first root
            # comes out of the prefill). So the rounds agree but for the cut at max_new_tokens:
            # the reference may need one more round for the last token, and the two count a
            # last round cut short differently.
            mine = ours.accept_lengths[row]
            assert accepts[: len(mine) - 1] == mine[:-1]
            assert len(accepts) - len(mine) in (0, 1)
            accepted += sum(accepts)
    if kind == "aligned":
        assert accepted > 2 * len(PROMPTS) * len(TREES)  # multi-token rounds: not trivial


def test_reference_tree_follows_the_spec_on_a_hand_checkable_case():
    """topk_genrate's flattening and reranking (spec 5.2 steps 4-7) on a draft whose level-1
    scores and children are fixed: the retrieve rows are root-to-leaf paths, parents precede
    children and the mask is each node's ancestors."""

    class Fixed(torch.nn.Module):  # draft outputs that depend only on the input token
        def forward(self, hidden, ids, position_ids=None, past_kv=None, tree_mask=None):
            feat = torch.nn.functional.one_hot(ids, 6).float()
            return feat, feat, (torch.zeros(1, 1, 1, 1), torch.zeros(1, 1, 1, 1))

    table = torch.tensor(np.log(np.array([
        [0.1, 0.5, 0.25, 0.1, 0.03, 0.02],  # after token 0
        [0.1, 0.1, 0.1, 0.6, 0.05, 0.05],  # after 1
        [0.1, 0.1, 0.1, 0.1, 0.5, 0.1],  # after 2
        [0.2, 0.2, 0.2, 0.2, 0.1, 0.1],
        [0.2, 0.2, 0.2, 0.2, 0.1, 0.1],
        [0.2, 0.2, 0.2, 0.2, 0.1, 0.1],
    ])), dtype=torch.float32)  # fmt: skip

    def head(feat):
        return feat @ table

    tree, _ = torch_ref_generate.topk_genrate(
        Fixed(), head, torch.zeros(1, 1, 6), torch.tensor([[0, 0]]), None,
        top_k=2, depth=1, total=4,
    )  # fmt: skip
    # Level 1 after root 0: tokens 1 (0.5), 2 (0.25); level 2 (path products): 1->3 (0.3),
    # 1->0 (0.05), 2->4 (0.125), 2->0 (0.025), of which 1->3 and 2->4 are expanded. total 4
    # keeps the three best drafted nodes, in flat order: 1, 2, 1->3.
    assert tree["draft_tokens"].tolist() == [0, 1, 2, 3]
    assert tree["positions"].tolist() == [0, 1, 1, 2]
    assert tree["retrieve_indices"].tolist() == [[0, 2, -1], [0, 1, 3]]
    mask = [[1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0], [1, 1, 0, 1]]
    assert tree["tree_mask"].int().tolist() == mask


def test_the_benchmark_script_runs_and_reports(folders, tmp_path, capsys):
    """`bench_torch_reference.py` end to end on a tiny pair: every method's output compared
    with vanilla's, the engine/PyTorch ratio per pass, the report written."""
    base_dir, draft_dir = folders["aligned"]
    bench = tmp_path / "prompts" / "question.jsonl"
    bench.parent.mkdir()
    bench.write_text(json.dumps({"turns": ["def add(a, b):"]}) + "\n")
    out = tmp_path / "report.json"
    argv = [
        "--base",
        str(base_dir),
        "--draft",
        str(draft_dir),
        "--bench",
        str(bench),
        "--num-questions",
        "1",
        "--max-new-tokens",
        "8",
        "--tree",
        "2,2,6",
        "--out",
        str(out),
    ]
    assert bench_torch_reference.main(argv) == 0
    methods = json.loads(out.read_text())["results"][0]["methods"]
    assert set(methods) == {"vanilla", "transformers vanilla", "engine 2,2,6", "torch 2,2,6"}
    assert all(m["same_output"] == 1 and m["new_tokens"] == 8 for m in methods.values())
    assert methods["engine 2,2,6"]["over_torch"] > 0
    assert "engine 2,2,6" in json.loads(capsys.readouterr().out.splitlines()[-1])["prompts"]


def test_commit_leaves_the_cache_a_prefill_of_the_accepted_path(folders):
    """Spec 5.6 in the PyTorch loop, directly (greedy outputs barely depend on it where the
    draft rarely matches): after verifying a tree and committing a root-to-leaf path whose
    nodes are not contiguous in the tree, every layer's K/V equal a prefill of prompt + path."""
    from transformers import DynamicCache

    tbase, tdraft = torch_ref_generate.load_pair(*folders["random"])
    prompt = PROMPTS[0]
    ids = torch.tensor([prompt])
    with torch.no_grad():
        cache = DynamicCache()
        features = tbase.model(input_ids=ids, cache=cache, use_cache=True).last_hidden_state
        root = tbase.lm_head(features[0, -1]).argmax().view(1, 1)
        tree, _ = torch_ref_generate.topk_genrate(
            tdraft, tbase.lm_head, features, torch.cat([ids, root], 1), None,
            top_k=3, depth=2, total=8,
        )  # fmt: skip
        torch_ref_generate.verify(tbase, tree, cache, len(prompt))
        paths = [row[row >= 0] for row in tree["retrieve_indices"]]
        path = max(paths, key=len)
        assert len(path) == 4 and path.tolist() != list(range(4))  # the copy moves entries
        torch_ref_generate.commit(cache, path + len(prompt), len(prompt))
        want = DynamicCache()
        full = prompt + tree["draft_tokens"][path].tolist()
        tbase.model(input_ids=torch.tensor([full]), cache=want, use_cache=True)
    for got, ref in zip(cache.layers, want.layers, strict=True):
        assert got.keys.shape == ref.keys.shape
        torch.testing.assert_close(got.keys, ref.keys, atol=1e-4, rtol=1e-4)  # f32 round-off
        torch.testing.assert_close(got.values, ref.values, atol=1e-4, rtol=1e-4)  # f32 round-off
