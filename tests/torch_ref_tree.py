"""A small PyTorch version of the reference's tree construction and sampling acceptance.

Written from GRIFFIN_SPEC.md 5.2 (`topK_genrate`) and 5.5 (`evaluate_posterior` with a logits
processor), batch 1, with Python loops, as the reference does. The draft forward is replaced by
a callable `node_logits(path)` that returns the draft logits of the tree node reached by `path`
(the drafted tokens from level 1 down to that node): on fixed per-node logits this is exactly
what the reference computes, since a node's draft output depends only on its ancestors.

Deliberate choices, following the spec's fixes:
- top-k selections break ties towards the smaller index (spec 8.10), via a stable sort.
- the bonus distribution is warped in every branch (spec 8.11).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch


def stable_topk(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """torch.topk along the last dim with ties broken towards the smaller index.

    `torch.topk` (what the reference calls) orders tied values arbitrarily; where the k + 1
    largest values of every row are distinct its selection and order are the stable one's, so
    the full stable sort (~45x slower over 8,192 logits here, which would slow the PyTorch side
    of `bench_torch_reference.py` by ~15%) runs only when they are not."""
    n = min(k + 1, x.shape[-1])
    values, idx = torch.topk(x, n, dim=-1)
    if n == 1 or bool((values[..., 1:] < values[..., :-1]).all()):
        return values[..., :k], idx[..., :k]
    idx = torch.sort(-x, dim=-1, stable=True).indices[..., :k]
    return torch.gather(x, -1, idx), idx


def topk_generate(
    root_logp: torch.Tensor,
    root_token: int,
    node_logits: Callable[[tuple[int, ...]], torch.Tensor],
    *,
    top_k: int,
    depth: int,
    total_tokens: int,
    sampling: bool,
) -> dict:
    """Spec 5.2 steps 2-8 on fixed per-node logits.

    Args:
      root_logp: [V] draft log-probs of the last trunk position (level 1).
      root_token: the root token.
      node_logits: path of drafted tokens (level 1 first) -> [V] draft logits of that node.
      top_k, depth, total_tokens: K, D and the user-facing total (counts the root).
      sampling: sort retrieve_indices lexicographically (-1 as +inf), as with a processor.
    Returns:
      dict with draft_tokens [T+1], parents [T+1] (root's is 0), tree_mask [T+1, T+1] bool,
      positions [T+1], retrieve_indices [leaves, max_depth+1] (-1 padded).
    """
    k, d = top_k, depth
    scores_list, tokens_list, parents_list = [], [], []

    # 2. Level 1.
    s_prev, tok1 = stable_topk(root_logp, k)
    scores_list.append(s_prev)
    tokens_list.append(tok1)
    parents_list.append(torch.zeros(1, dtype=torch.long))
    cur_paths = [(int(x),) for x in tok1]
    sel = torch.arange(k)

    # 3. Levels.
    for i in range(d):
        offset = 0 if i == 0 else k + (i - 1) * k * k
        parents_list.append(sel + offset + 1)
        logp = torch.stack(
            [torch.log_softmax(node_logits(p).float(), dim=-1) for p in cur_paths]
        )  # [K, V]
        lp, tok = stable_topk(logp, k)  # [K, K]
        cu = lp + s_prev[:, None]
        s_prev, sel = stable_topk(cu.flatten(), k)
        flat_tok = tok.flatten()
        cur_paths = [cur_paths[int(s) // k] + (int(flat_tok[s]),) for s in sel]
        scores_list.append(cu.flatten())
        tokens_list.append(flat_tok)

    return rerank(
        scores_list, tokens_list, parents_list, root_token, top_k=k,
        total_tokens=total_tokens, sampling=sampling,
    )  # fmt: skip


def rerank(
    scores_list: Sequence[torch.Tensor],
    tokens_list: Sequence[torch.Tensor],
    parents_list: Sequence[torch.Tensor],
    root_token: int,
    *,
    top_k: int,
    total_tokens: int,
    sampling: bool,
) -> dict:
    """Spec 5.2 steps 4-7: the levels' score, token and parent blocks (level 1 first) -> the
    tree (`topk_generate`'s dict)."""
    k, t = top_k, total_tokens - 1
    # 4-5. Flatten and rerank.
    scores = torch.cat(scores_list)
    tokens = torch.cat(tokens_list)
    parents_all = torch.cat(parents_list)
    sel_all = torch.sort(stable_topk(scores, t)[1]).values
    draft_tokens = torch.cat([torch.as_tensor(root_token).view(1), tokens[sel_all]])
    draft_parents = parents_all[sel_all // k]
    mask_index = torch.searchsorted(sel_all, draft_parents - 1, right=False)
    mask_index[draft_parents == 0] = -1
    mask_index = mask_index + 1

    # 6. Tree mask and positions.
    tree_mask = torch.eye(t + 1).bool()
    tree_mask[:, 0] = True
    for n in range(t):
        tree_mask[n + 1] |= tree_mask[mask_index[n]]
    positions = tree_mask.sum(dim=1) - 1

    # 7. retrieve_indices.
    max_depth = int(positions.max())
    noleaf = set(mask_index.tolist())
    rows = []
    for n in range(1, t + 1):
        if n in noleaf:
            continue
        path = [n]
        while path[-1] != 0:
            path.append(int(mask_index[path[-1] - 1]))
        path = path[::-1]
        rows.append(path + [-1] * (max_depth + 1 - len(path)))
    if sampling:
        rows = sorted(rows, key=lambda r: [x if x >= 0 else total_tokens + 5 for x in r])
    return {
        "draft_tokens": draft_tokens,
        "parents": torch.cat([torch.zeros(1, dtype=torch.long), mask_index]),
        "tree_mask": tree_mask,
        "positions": positions,
        "retrieve_indices": torch.tensor(rows, dtype=torch.long),
    }


def pad_rows(rows: Sequence[Sequence[int]], width: int, fill: int = -1) -> list[list[int]]:
    """Right-pads integer rows to `width`."""
    return [list(r) + [fill] * (width - len(r)) for r in rows]
