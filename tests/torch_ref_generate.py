"""A PyTorch version of the reference's speculative generation loop, greedy, batch 1.

Written from GRIFFIN_SPEC.md 5.1-5.8 in the reference's structure: Python control flow around
eager PyTorch forwards, one host round trip per decision. The base is transformers'
`LlamaForCausalLM` (the model the reference modifies): the tree goes in as a custom 4D mask with
explicit position ids, and its `DynamicCache` is committed as `update_inference_inputs` does (the
accepted entries copied down to the committed length, the rest cut). The draft is
`torch_ref_draft.GriffinDraft` with the reference's trunk-only `stable_kv`; `topk_genrate` is
spec 5.2 (levels of K nodes over the draft's cache and the global top-K here; the reranking,
tree mask and `retrieve_indices` are `torch_ref_tree.rerank`'s, the tree tests' own). Used by
`test_torch_ref_generate.py` (its greedy output equals vanilla greedy decoding, and this
engine's) and by `bench_torch_reference.py` (tokens/s against this engine on the same weights).
Test-only code: not imported by the package.
"""

from __future__ import annotations

import json
import pathlib

import torch
import torch.nn.functional as F
from torch_ref_draft import GriffinDraft, RefConfig
from torch_ref_tree import rerank, stable_topk


def topk_genrate(draft, lm_head, hidden, ids_with_root, stable_kv, *, top_k, depth, total):
    """Spec 5.2. hidden [1, n, H]: the features not yet in the trunk; ids_with_root [1, L].
    Returns (the tree as `torch_ref_tree.rerank` gives it, the new stable_kv)."""
    k = top_k
    ids = ids_with_root[:, 1:]
    p = ids.shape[1]
    kv_len = 0 if stable_kv is None else stable_kv[0].shape[2]
    tok_feat, next_feat, stable_kv = draft(hidden, ids[:, kv_len:], past_kv=stable_kv)
    logp = F.log_softmax(lm_head(tok_feat[0, -1]), dim=-1)
    s_prev, tok = stable_topk(logp, k)
    scores, tokens, parents = [s_prev], [tok], [torch.zeros(1, dtype=torch.long)]
    in_feat = next_feat[:, -1:].expand(1, k, next_feat.shape[-1])
    in_tok = tok[None]
    eye = torch.eye(k, dtype=torch.bool)[None, None]
    tree_mask, sel, past = eye, torch.arange(k), stable_kv
    for i in range(depth):
        pos = torch.full((1, k), p + i, dtype=torch.long)
        tf, nf, past = draft(in_feat, in_tok, position_ids=pos, past_kv=past, tree_mask=tree_mask)
        offset = 0 if i == 0 else k + (i - 1) * k * k
        parents.append(sel + offset + 1)
        lp, tk = stable_topk(F.log_softmax(lm_head(tf[0]), dim=-1), k)  # [K, K]
        cu = (lp + s_prev[:, None]).flatten()
        s_prev, sel = stable_topk(cu, k)
        rows = sel // k
        in_feat, in_tok = nf[:, rows], tk.flatten()[sel][None]
        scores.append(cu)
        tokens.append(tk.flatten())
        tree_mask = torch.cat([tree_mask[:, :, rows, :], eye], dim=-1)
    tree = rerank(
        scores, tokens, parents, ids_with_root[0, -1], top_k=k, total_tokens=total,
        sampling=False,
    )  # fmt: skip
    return tree, stable_kv


def verify(base, tree: dict, cache, seq_len: int):
    """Spec 5.3: the base over the tree's tokens after the committed `seq_len` entries.
    Returns (logits [T + 1, V], post-norm features [T + 1, H])."""
    n = tree["draft_tokens"].shape[0]
    mask = torch.ones(1, 1, n, seq_len + n, dtype=torch.bool)
    mask[0, 0, :, seq_len:] = tree["tree_mask"]
    out = base.model(
        input_ids=tree["draft_tokens"][None], position_ids=(tree["positions"] + seq_len)[None],
        attention_mask=mask, cache=cache, use_cache=True,
    )  # fmt: skip
    h = out.last_hidden_state[0]
    return base.lm_head(h), h


def commit(cache, sel_pos: torch.Tensor, seq_len: int) -> None:
    """Spec 5.6: each layer's entries at sel_pos copied to seq_len.., the rest of the tree cut."""
    end = seq_len + sel_pos.shape[0]
    for layer in cache.layers:
        layer.keys[:, :, seq_len:end] = layer.keys[:, :, sel_pos]
        layer.values[:, :, seq_len:end] = layer.values[:, :, sel_pos]
    cache.crop(end - cache.layers[0].keys.shape[-2])  # a count to remove (<= 0)


@torch.no_grad()
def generate(base, draft, prompt, *, max_new_tokens, top_k, depth, total, eos_id=None):
    """Greedy speculative decoding (spec 5.1): (new ids, at most max_new_tokens, ending at the
    first eos; accepted draft tokens per round, as emitted)."""
    from transformers import DynamicCache

    lm_head = base.lm_head
    ids = torch.tensor([prompt], dtype=torch.long)
    cache = DynamicCache()
    out = base.model(input_ids=ids, cache=cache, use_cache=True)
    features = out.last_hidden_state
    root = lm_head(features[0, -1]).argmax()
    tree, stable = topk_genrate(
        draft, lm_head, features, torch.cat([ids, root.view(1, 1)], 1), None,
        top_k=top_k, depth=depth, total=total,
    )  # fmt: skip
    seq, new, accepts = list(prompt), [], []
    while True:
        seq_len = len(seq)
        logits, h = verify(base, tree, cache, seq_len)
        retrieve = tree["retrieve_indices"]
        logits = logits[retrieve]
        cand = torch.cat([tree["draft_tokens"], torch.tensor([-1])])[retrieve]
        match = cand[:, 1:] == logits[:, :-1].argmax(-1)
        lengths = torch.cumprod(match.long(), dim=1).sum(1)
        a = int(lengths.max())
        best = int(torch.argmax(lengths))  # the first maximum
        bonus = logits[best, a].argmax()
        path = retrieve[best, : a + 1]
        commit(cache, path + seq_len, seq_len)
        accepted = [int(x) for x in cand[best, : a + 1]]
        seq += accepted
        # What the round emits: cut at max_new_tokens and after a stop token (the reference
        # emits the whole round and truncates afterwards); counted as emitted, as this engine
        # counts a round's accepted tokens.
        emitted = accepted[: max_new_tokens - len(new)]
        if eos_id is not None and eos_id in emitted:
            emitted = emitted[: emitted.index(eos_id) + 1]
        new += emitted
        accepts.append(len(emitted) - 1)
        if len(emitted) < len(accepted) or len(new) >= max_new_tokens:
            break
        ids = torch.tensor([seq + [int(bonus)]], dtype=torch.long)
        tree, stable = topk_genrate(
            draft, lm_head, h[path][None], ids, stable, top_k=top_k, depth=depth, total=total
        )
    return new, accepts


@torch.no_grad()
def vanilla_generate(base, prompt, *, max_new_tokens, eos_id=None):
    """transformers' model in a plain greedy loop over its `DynamicCache`: the new ids, at most
    max_new_tokens, ending at the first eos."""
    from transformers import DynamicCache

    cache, ids, new = DynamicCache(), torch.tensor([prompt]), []
    while len(new) < max_new_tokens:
        logits = base(input_ids=ids, cache=cache, use_cache=True).logits
        new.append(int(logits[0, -1].argmax()))
        if new[-1] == eos_id:
            break
        ids = torch.tensor([[new[-1]]])
    return new


def load_pair(base_dir: str | pathlib.Path, draft_dir: str | pathlib.Path):
    """(base, draft) in f32 from an HF base folder and a GRIFFIN draft folder (published layout,
    safetensors; `embed_tokens.weight` taken from the base when the draft has none)."""
    from safetensors.torch import load_file
    from transformers import LlamaForCausalLM

    base = LlamaForCausalLM.from_pretrained(
        base_dir, dtype=torch.float32, attn_implementation="sdpa"
    ).eval()
    draft_dir = pathlib.Path(draft_dir)
    c = json.loads((draft_dir / "config.json").read_text())
    cfg = RefConfig(
        vocab_size=c["vocab_size"], hidden_size=c["hidden_size"],
        intermediate_size=c["intermediate_size"], num_attention_heads=c["num_attention_heads"],
        num_key_value_heads=c.get("num_key_value_heads", c["num_attention_heads"]),
        rms_norm_eps=c["rms_norm_eps"], rope_theta=c.get("rope_theta", 10_000.0),
    )  # fmt: skip
    state = {k: v.float() for k, v in load_file(draft_dir / "model.safetensors").items()}
    state.setdefault("embed_tokens.weight", base.model.embed_tokens.weight.detach().clone())
    draft = GriffinDraft(cfg)
    draft.load_state_dict(state, strict=True)
    return base, draft.eval()
