"""`python -m inference.replay_rounds`: how good `--tree auto`'s choices are, apart from its time.

For a chain draft (top_k 1) every round shape is a prefix of the deepest chain, so a greedy round
of L drafted levels whose root is the k-th new token accepts min(A_k, L), where A_k is what the
deepest chain accepts from there. This tool computes A_k at every position of each prompt's
greedy output (`chain_acceptance`: the base's features over the prompt and the output, the
draft's trunk over them, then the chain from every position at once, batched over positions),
with the draft's top-token probability at each level, and from them:

- `calibration`: per level and per tenth of the draft's confidence, how often the base accepted
  the drafted token (rounds that reached the level): what `budget.conf_acceptance` learns;
- per round shape, the rounds a fixed tree of that shape needs for the prompts and their time at
  the per-round prices given (`--costs`, ms of `none`, (1,0,2), (1,3,5), ... as `auto_shapes`
  lists them; default: the model's measured start-up costs);
- `auto`: the rounds `SpeculativeModel.generate` with `tree="auto"` ran on the same prompts (its
  last of `--passes` passes, history carried over as in a server), priced the same way, and
  whether each of them accepted what the replay says (`mismatched_rounds`), and how often the
  shape changed between two rounds of a prompt (`changes`, priced at `--change-cost` ms each:
  what leaving one shape's loop for another's costs, which the per-round prices leave out);
- `ceiling`: the least time any choice of shapes could take knowing every A_k (a dynamic
  program over positions).

Prices per round, not the programs' time: a fixed tree's program and the adaptive one spend
different time outside their rounds, which `inference.benchmark` measures. Greedy only.

Example:
  python -m inference.replay_rounds --bench runs/prompts/heldout_code/question.jsonl \\
      --num-questions 40 --costs 0.685,0.893,1.342,1.697 --out runs/replay/heldout.json
"""

from __future__ import annotations

import argparse
import functools
import json
import pathlib
import sys
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from griffin_jax import budget as budget_lib
from griffin_jax import checks, cli, speculative, vanilla
from griffin_jax.config import TreeConfig
from griffin_jax.draft import draft_forward, feature_layers
from griffin_jax.kv_cache import causal_mask
from griffin_jax.model import forward as base_forward
from inference.api import DEFAULT_MODEL_DIR, SpeculativeModel
from inference.benchmark import encode_checked, read_questions


@functools.partial(jax.jit, static_argnames=("cfg", "dcfg", "levels"))
def _chain_from_every_position(base_params, draft_params, head, seq, *, cfg, dcfg, levels: int):
    """(tokens [N, levels], top probabilities [N, levels]) the greedy chain drafts with its root
    at sequence index j + 1, for j < N = len(seq) - levels (a root needs one trunk position)."""
    n = seq.shape[1]
    count = n - levels
    pos = jnp.arange(n, dtype=jnp.int32)[None]
    zero = jnp.zeros((1,), jnp.int32)
    chain = TreeConfig(top_k=1, depth=levels - 1, total_tokens=levels + 1)
    shapes = speculative.plan_shapes([n], levels + 1, chain)
    empty = speculative._empty_prefix(base_params, 1, cfg=cfg, dcfg=dcfg, shapes=shapes, mesh=None)
    _, hidden, _ = base_forward(
        base_params, seq, pos, empty.cache, write_idx=zero, mask=causal_mask(zero, n, n),
        cfg=cfg, feature_layers=feature_layers(dcfg, cfg.n_layers), logits_at=zero[:, None],
    )  # fmt: skip
    # Draft position p pairs feature f_p with token x_{p+1}; the trunk of a root at index r
    # holds the pairs p < r, its level-1 inputs are the outputs at p = r - 1.
    pairs = jnp.concatenate([seq[:, 1:], jnp.zeros((1, 1), jnp.int32)], axis=1)
    dcache = empty.draft_cache
    token_feature, next_feature, dcache = draft_forward(
        draft_params, base_params["embed_tokens"]["embedding"], hidden, pairs, pos, dcache,
        write_idx=zero, mask=causal_mask(zero, n, dcache.k.shape[1]), dcfg=dcfg,
    )  # fmt: skip
    roots = 1 + jnp.arange(count, dtype=jnp.int32)  # sequence index of each root
    lp = jax.nn.log_softmax(
        speculative._draft_logits(base_params, token_feature[0, roots - 1], head, cfg=cfg), -1
    )
    feat = next_feature[0, roots - 1][:, None]
    cache = jax.tree.map(lambda x: jnp.repeat(x, count, axis=0), dcache)
    step = speculative._draft_step(base_params, draft_params, head, cfg=cfg, dcfg=dcfg)
    slot = jnp.arange(cache.k.shape[1])[None, None, :]
    tokens, probs = [], []
    for i in range(levels):
        column = jnp.argmax(lp, -1)
        probs.append(budget_lib.draft_confidence(lp))
        tok = (column if head is None else head.token_ids[column]).astype(jnp.int32)
        tokens.append(tok)
        if i == levels - 1:
            break
        at = roots + i  # level i + 1's node: slot and position just past the trunk
        mask = slot <= at[:, None, None]  # the trunk, the chain above and itself
        logits, feat, cache = step(feat, tok[:, None], at[:, None], cache, at, mask)
        lp = jax.nn.log_softmax(logits[:, 0], -1)
    return jnp.stack(tokens, 1), jnp.stack(probs, 1)


def chain_acceptance(
    base_params, cfg, draft_params, dcfg, prompt: Sequence[int], output: Sequence[int], *,
    levels: int, head: speculative.DraftHead | None = None,
) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """(A [N] int, confidence [N, levels]) for the roots output[k], k < N = len(output) - levels:
    A_k, the drafted tokens of a `levels`-level greedy chain from there that match output[k+1:]
    (what a greedy round accepts), and the draft's top probability at each level.
    `output`: the base's greedy continuation of `prompt`."""
    if len(output) <= levels:
        raise ValueError(f"the output needs more than {levels} tokens, got {len(output)}")
    seq = list(prompt) + list(output)
    bucket = vanilla.prompt_bucket(len(seq))  # right-padded: one program per length bucket
    padded = jnp.asarray([seq + [0] * (bucket - len(seq))], jnp.int32)
    tokens, probs = _chain_from_every_position(
        base_params, draft_params, head, padded, cfg=cfg, dcfg=dcfg, levels=levels
    )
    first = len(prompt) - 1  # the row of the root at sequence index len(prompt)
    count = len(output) - levels
    tokens, probs = tokens[first : first + count], probs[first : first + count]
    tokens = np.asarray(tokens)
    n = tokens.shape[0]
    truth = np.stack([np.asarray(output[k + 1 : k + 1 + levels]) for k in range(n)])
    match = tokens == truth
    accepted = np.where(match.all(1), levels, np.argmin(match, 1))
    return accepted, np.asarray(probs)


def rounds_of(accepted: np.ndarray, levels: int, tokens: int) -> int:
    """Rounds a fixed chain of `levels` levels needs for `tokens` new tokens (the first comes
    from the prefill)."""
    k, rounds = 0, 0
    while k < tokens - 1:
        k += min(int(accepted[k]), levels) + 1
        rounds += 1
    return rounds


def ceiling_ms(accepted: np.ndarray, levels: Sequence[int], costs: Sequence[float], tokens: int):
    """The least time (ms) rounds of these shapes (drafted levels, ms a round) need for `tokens`
    new tokens when each round's outcome is known: a dynamic program over the root's index."""
    best = np.zeros(tokens)
    for k in range(tokens - 2, -1, -1):
        best[k] = min(
            c + best[min(k + min(int(accepted[k]), lv) + 1 if lv else k + 1, tokens - 1)]
            for lv, c in zip(levels, costs, strict=True)
        )
    return float(best[0])


def calibration(accepted: np.ndarray, conf: np.ndarray) -> list[list[dict]]:
    """Per level, per confidence bin (`budget.conf_bin`'s): rounds that reached the level and
    the share accepted."""
    bins = budget_lib.CONF_BINS
    out = []
    for level in range(conf.shape[1]):
        reached = accepted >= level
        which = np.asarray(budget_lib.conf_bin(jnp.asarray(conf[reached, level])))
        hit = accepted[reached] >= level + 1
        out.append([
            {"bin": b / bins, "rounds": int(np.sum(which == b)),
             "accepted": float(np.mean(hit[which == b])) if np.any(which == b) else None}
            for b in range(bins)
        ])  # fmt: skip
    return out


def shape_changes(shapes: Sequence[str]) -> int:
    """How often consecutive rounds of one prompt ran different shapes."""
    return sum(a != b for a, b in zip(shapes, shapes[1:], strict=False))


def main(argv: list[str] | None = None) -> int:
    p = cli.ArgumentParser(
        prog="python -m inference.replay_rounds", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    p.add_argument("--base", type=pathlib.Path, default=DEFAULT_MODEL_DIR / "base")
    p.add_argument("--draft", type=pathlib.Path, default=DEFAULT_MODEL_DIR / "griffin")
    p.add_argument("--bench", type=pathlib.Path, required=True)
    p.add_argument("--num-questions", type=int, default=None)
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--passes", type=int, default=2, help="auto's passes (history warms up)")
    p.add_argument("--costs", default=None, help="ms a round of each auto shape, comma-separated")
    p.add_argument("--change-cost", type=float, default=0.0, help="ms a shape change adds")
    p.add_argument("--out", type=pathlib.Path, default=pathlib.Path("runs/replay/report.json"))
    args = p.parse_args(argv)
    cli.positive(args.num_questions, "--num-questions")
    cli.positive(args.passes, "--passes")
    if not (np.isfinite(args.change_cost) and args.change_cost >= 0):
        raise checks.InputError(f"--change-cost must be >= 0 (ms), got {args.change_cost}")
    if args.max_new_tokens < 2:
        raise checks.InputError(f"--max-new-tokens must be >= 2, got {args.max_new_tokens}")
    cli.output_file(args.out, "--out")
    model = SpeculativeModel.from_pretrained(args.base, args.draft, tree="auto")
    shapes = model.shapes
    if any(s is not None and s.top_k != 1 for s in shapes):
        raise checks.InputError("replay_rounds replays chains: the draft's tree needs top_k 1")
    levels = [budget_lib.levels(s) for s in shapes]
    deepest = max(levels)
    if args.costs is None:
        costs = model.round_costs(1, greedy=True)[: len(shapes)]
    else:
        costs = [float(c) for c in args.costs.split(",")]
        if len(costs) != len(shapes) or min(costs) <= 0:
            raise checks.InputError(f"--costs: {len(shapes)} positive values expected")
    n_new = args.max_new_tokens
    questions = read_questions(args.bench, args.num_questions)
    prompts = encode_checked(model.tokenizer, questions, model.cfg, n_new + deepest + 1,
                             chat=False)  # fmt: skip
    traces = []
    for prompt in prompts:
        out = model.vanilla_generate([prompt], max_new_tokens=n_new + deepest + 1).output_ids[0]
        if len(out) < n_new + deepest + 1:  # a stop token came first: left out
            continue
        traces.append((prompt, out, *chain_acceptance(
            model.base_params, model.cfg, model.draft_params, model.dcfg, prompt, out,
            levels=deepest, head=model.draft_head(),
        )))  # fmt: skip
    print(
        f"{len(traces)} of {len(prompts)} prompts ran {n_new + deepest + 1} tokens", file=sys.stderr
    )
    names = [budget_lib.describe(s) for s in shapes]
    fixed = {}
    for name, lv, c in zip(names, levels, costs, strict=True):
        if lv:
            rounds = sum(rounds_of(t[2], lv, n_new) for t in traces)
            fixed[name] = {"rounds": rounds, "ms": rounds * c}
    auto_rounds, mismatched, changes = {}, 0, 0
    for _ in range(args.passes):
        auto_rounds, mismatched, changes = dict.fromkeys(names, 0), 0, 0
        for prompt, _, accepted, _ in traces:
            res = model.generate([prompt], max_new_tokens=n_new)
            changes += shape_changes(res.round_shapes[0])
            k = 0
            for shape, a in zip(res.round_shapes[0], res.accept_lengths[0], strict=True):
                auto_rounds[shape] += 1
                cut = k + a + 2 >= n_new  # the round that reached max_new_tokens: maybe cut
                lv = levels[names.index(shape)]
                mismatched += not cut and a != (min(int(accepted[k]), lv) if lv else 0)
                k += a + 1
    auto_ms = sum(auto_rounds[n] * c for n, c in zip(names, costs, strict=True))
    auto_ms += changes * args.change_cost
    ceiling = sum(ceiling_ms(t[2], levels, costs, n_new) for t in traces)
    all_a = np.concatenate([t[2] for t in traces])
    all_conf = np.concatenate([t[3] for t in traces])
    report = {
        "bench": str(args.bench), "prompts": len(traces), "max_new_tokens": n_new,
        "shapes": names, "costs_ms": costs, "fixed": fixed,
        "auto": {"rounds": auto_rounds, "ms": auto_ms, "mismatched_rounds": mismatched,
                 "changes": changes, "change_cost_ms": args.change_cost},
        "ceiling_ms": ceiling, "calibration": calibration(all_a, all_conf),
        "command": " ".join(sys.argv),
    }  # fmt: skip
    best = min(v["ms"] for v in fixed.values())
    for name, v in fixed.items():
        print(f"fixed {name}: {v['rounds']} rounds, {v['ms']:.1f} ms ({best / v['ms']:.3f})")
    print(f"auto: {auto_rounds}, {changes} changes of shape, {auto_ms:.1f} ms "
          f"({best / auto_ms:.3f}), {mismatched} rounds off the replay")  # fmt: skip
    print(f"ceiling: {ceiling:.1f} ms ({best / ceiling:.3f})")
    cli.write_report(args.out, report)
    print(json.dumps({"report": str(args.out)}))
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
