"""`python -m inference.profile_round`: what one speculative round costs, piece by piece.

For each tree (`--tree K,D,M[,V]`, repeatable; default: the draft's tree.json), in one run on
the same prompts, with every piece compiled first and timed as the median of `--repeats` calls:

- `round_ms`: a whole round (`run_segment` of one round: draft -> verify -> accept -> commit ->
  trunk), chained on its donated state from a real prefill of each prompt;
- `verify_ms`: the base forward over the tree's M tokens alone (the same cache and masks);
- `trunk_ms` / `level_ms`: one draft forward over the A = depth + 2 path slots (the trunk update
  after acceptance: every slot's K/V, the outputs and lm_head at one, as the round runs it)
  and over the K nodes of one tree level (with its lm_head), alone;
- `decode_ms`: a one-token base decode at the same cache length (the unit of "decodes");
- `gemm_gflops`: the f32 matmul rate of this machine (a 1024^3 product), and from it
  `verify_floor_ms` = 2 x M x base parameters / that rate;
- `verify_products_ms` / `decode_products_ms`: the base's matrix products alone over M rows /
  one row (every layer's kernels and the lm_head, with the model's own weights, chained one
  after another with nothing between them but slices and an elementwise squash), and
  `products_vs_bound` = the former over max(`verify_floor_ms`, `decode_ms`): what the
  verification would cost relative to the goal's bound with its attention, norms and RoPE
  free; above 1.3, no change outside the products can bring the verification within 1.3x of
  that bound;
- `bookkeeping_ms` = round - verify - trunk - depth x level: what the round spends outside the
  model forwards (acceptance, commit, tree building and reranking, masks, copies);
- `hlo_ops`: instructions in the optimised HLO of the compiled round;
- `phases_ms`: the round split by phase from a profiler trace of `--repeats` more rounds
  (`jax.profiler`): each thunk XLA ran is charged to the named scope its HLO instruction came
  from (`PHASES`: verification, acceptance, statistics, stop check, commit, draft trunk, level
  1, each further tree level, reranking, catch-up, the budget's choice), time when several ran
  at once shared among them, and `(between ops)` the time inside the round when no thunk ran
  (the executor's own work between ops); `levels_ms` the wall time of each tree level after
  the first (one pass of the expansion loop), `thunks` how many ran in a round, and
  `traced_round_ms` the round's span under the profiler (tracing adds some overhead).

Each piece timed alone pays its own dispatch (the whole parameter pytree per call) and runs
without the round's fusion across pieces, so `bookkeeping_ms` is a lower estimate and reads
negative where the pieces' dispatches outweigh it (a deep chain's levels each pay one);
`phases_ms` measures the same pieces inside the round.

Example:
  python -m inference.profile_round --tree 1,6,8,1024 --tree 4,4,16 --tree 10,5,60 \\
      --bench runs/prompts/heldout_code/question.jsonl --num-questions 4 --out runs/profile.json
"""

from __future__ import annotations

import collections
import functools
import json
import pathlib
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from griffin_jax import checks, cli, cpu_kernels, speculative, vanilla
from griffin_jax import tree as tree_lib
from griffin_jax.config import TreeConfig
from griffin_jax.kv_cache import causal_mask
from griffin_jax.layers import FUSED_GATE_UP, FUSED_QKV, compute_dtype, dense, kernel_of
from griffin_jax.model import forward as base_forward
from griffin_jax.model import lm_head, unstack_layers
from inference.api import (
    DEFAULT_MODEL_DIR,
    SpeculativeModel,
    parse_tree,
    read_tree_file,
    resolve_tree,
)
from inference.benchmark import encode_checked, read_questions


def median_ms(fn: Callable[[Any], Any], carry: Any, repeats: int) -> float:
    """Median wall time in ms of `carry = fn(carry)` (compiled first; results blocked on).

    `fn` donates its carry (the caches), so every call updates them in place as a round does:
    timing a forward on a non-donated cache would add a copy of the whole cache per call.
    """
    # Two untimed calls: the first compiles, and when the carry's structure changes with it
    # (a `None` placeholder becoming an output) the second compiles for the settled one.
    carry = jax.block_until_ready(fn(fn(carry)))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        carry = jax.block_until_ready(fn(carry))
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


# The engine's named scopes (`jax.named_scope` in speculative.py, tree.py and budget.py) that
# split a round; an HLO instruction belongs to the innermost of these its op_name names.
PHASES = (
    "verify", "accept", "stats", "stop", "commit", "draft/trunk", "draft/level1",
    "draft/expand", "draft/rerank", "draft/catch_up", "budget",
)  # fmt: skip
BETWEEN_OPS = "(between ops)"
_COMPUTATION = re.compile(r"^(?:ENTRY )?%(\S+) \(")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%(\S+) = (.*)$")


def _scope_phase(op_name: str) -> str | None:
    path = f"/{op_name}/"
    found = [(path.rfind(f"/{p}/"), p) for p in PHASES if f"/{p}/" in path]
    return max(found)[1] if found else None


def hlo_phases(hlo_text: str) -> tuple[dict[str, str], set[str]]:
    """(instruction name -> phase, names of control-flow instructions) of a compiled program's
    optimised HLO text (`compiled.as_text()`).

    An instruction's phase is the innermost of `PHASES` in its op_name; failing that (XLA's
    own instructions carry no op_name), the phase most of a fusion's fused instructions
    name, then the one most instructions of its computation name, then its caller's (a loop
    body's instructions take their loop's). "other" when nothing names one. While,
    conditional and call instructions are containers: their thunks' time is their bodies'.
    """
    comp = None
    own: dict[str, tuple[str, str | None, list[str]]] = {}
    members: dict[str, list[str]] = collections.defaultdict(list)
    caller: dict[str, str] = {}
    containers = set()
    for line in hlo_text.splitlines():
        if m := _COMPUTATION.match(line):
            comp = m.group(1)
            continue
        if not (m := _INSTRUCTION.match(line)):
            continue
        name, rest = m.groups()
        op_name = re.search(r'op_name="([^"]*)"', rest)
        body = rest.split(", metadata=")[0]
        if re.search(r"(?<![\w-])(while|conditional|call)\(", body):  # not custom-call
            containers.add(name)
        called = re.findall(r"(?:calls|body|condition|to_apply)=%([\w.\-]+)", body)
        for group in re.findall(r"branch_computations=\{([^}]*)\}", body):
            called += [c.strip().lstrip("%") for c in group.split(",")]
        phase = _scope_phase(op_name.group(1)) if op_name else None
        own[name] = (comp, phase, called)
        members[comp].append(name)
        for c in called:
            caller.setdefault(c, name)

    def majority(names) -> str | None:
        votes = collections.Counter(own[n][1] for n in names if own[n][1] is not None)
        return votes.most_common(1)[0][0] if votes else None

    phases: dict[str, str] = {}

    def phase(name: str) -> str:
        if name not in phases:
            comp, p, called = own[name]
            p = p or majority(n for c in called for n in members.get(c, ()))
            p = p or majority(members[comp])
            phases[name] = "other"  # guards a cycle while the caller is looked up
            phases[name] = p or (phase(caller[comp]) if comp in caller else "other")
        return phases[name]

    for name in own:
        phase(name)
    return phases, containers


def trace_phases(
    fn: Callable[[Any], Any],
    carry: Any,
    repeats: int,
    hlo_text: str,
    module: str,
    *,
    loop_passes: int = 0,
) -> tuple[Any, dict]:
    """(carry, the round split by phase): `repeats` calls of `carry = fn(carry)` under the
    profiler; medians over the calls (module docstring, `phases_ms`).

    `module` is the compiled program's name in the trace (`jit_<function>`), `loop_passes` the
    passes of the tree's expansion loop a call makes (its depth). Within a call,
    time is swept from its first thunk's start to its last one's end and each instant shared
    among the thunks running then, so the phases add up to the call's span on the device.
    """
    from jax.profiler import ProfileData

    phases, containers = hlo_phases(hlo_text)
    with tempfile.TemporaryDirectory() as folder:
        with jax.profiler.trace(folder):
            for _ in range(repeats):
                carry = jax.block_until_ready(fn(carry))
        data = ProfileData.from_file(str(next(pathlib.Path(folder).rglob("*.xplane.pb"))))
    calls: dict[int, list[tuple[float, float, str]]] = collections.defaultdict(list)
    for plane in data.planes:
        for line in plane.lines:
            for event in line.events:
                stats = dict(event.stats)
                name = stats.get("hlo_op")
                if stats.get("hlo_module") != module or name in containers:
                    continue
                if name not in phases or event.duration_ns <= 0:
                    continue
                calls[stats["run_id"]].append((event.start_ns, event.end_ns, name))
    per_call = []
    for events in calls.values():
        events.sort()
        edges = sorted(
            [(t0, 1, phases[n]) for t0, _, n in events]
            + [(t1, -1, phases[n]) for _, t1, n in events]
        )
        ms: dict[str, float] = collections.defaultdict(float)
        running: collections.Counter = collections.Counter()
        last = edges[0][0]
        for t, step, phase in edges:
            n = sum(running.values())
            if n:
                for p, c in running.items():
                    ms[p] += (t - last) * c / n / 1e6
            else:
                ms[BETWEEN_OPS] += (t - last) / 1e6
            running[phase] += step
            last = t
        # A tree level's wall time: from one pass of the expansion loop to the next, the passes
        # marked by the earliest thunk that runs once a pass (`loop_passes` times a call).
        expand = [(t0, t1, n) for t0, t1, n in events if phases[n] == "draft/expand"]
        count = collections.Counter(n for _, _, n in expand)
        marks = [n for _, _, n in expand if count[n] == loop_passes]
        starts = [t0 for t0, _, n in expand if marks and n == marks[0]]
        bounds = starts + [max(t1 for _, t1, _ in expand)] if starts else []
        levels = [(b - a) / 1e6 for a, b in zip(bounds, bounds[1:], strict=False)]
        span = (edges[-1][0] - edges[0][0]) / 1e6
        per_call.append(dict(ms=ms, levels=levels, span=span, thunks=len(events)))
    out = {
        "phases_ms": median_phases([c["ms"] for c in per_call]),
        "traced_round_ms": statistics.median(c["span"] for c in per_call),
        "thunks": statistics.median(c["thunks"] for c in per_call),
    }
    if all(len(c["levels"]) == loop_passes > 0 for c in per_call):
        out["levels_ms"] = median_lists([c["levels"] for c in per_call])
    return carry, out


def median_lists(lists: list[list[float]]) -> list[float]:
    """Element-wise medians of equally long lists."""
    return [statistics.median(column) for column in zip(*lists, strict=True)]


def median_phases(splits: list[dict[str, float]]) -> dict[str, float]:
    """Each phase's median over splits (0 where a split lacks it), in the order of `PHASES`."""
    names = sorted({p for split in splits for p in split}, key=lambda p: (*PHASES, p).index(p))
    return {p: statistics.median(split.get(p, 0.0) for split in splits) for p in names}


def gemm_gflops(repeats: int, n: int = 1024) -> float:
    """This machine's f32 matmul rate (GFLOP/s) on an n x n x n product."""
    a = jnp.ones((n, n), jnp.float32)
    matmul = jax.jit(lambda x: x @ a)
    return 2 * n**3 / median_ms(matmul, a, repeats) / 1e6


def count_params(params: Any) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))


# A layer's projections in the order its forward runs them (either layout).
_PRODUCT_ORDER = (
    ("self_attn", (FUSED_QKV, "q_proj", "k_proj", "v_proj", "o_proj")),
    ("mlp", (FUSED_GATE_UP, "gate_proj", "up_proj", "down_proj")),
)


def forward_kernels(params) -> list[dict]:
    """Every layer's projections (Dense param dicts: a kernel, plain or packed) of unrolled
    base params, in the forward's order."""
    return [
        layer[block][name]
        for layer in params["layers"]
        for block, names in _PRODUCT_ORDER
        for name in names
        if name in layer[block]
    ]


def products_ms(model: SpeculativeModel, rows: int, repeats: int) -> float:
    """The base forward's matrix products alone over `rows` rows: each layer's kernels in the
    order its forward runs them, then the lm_head, each fed the previous product's output cut
    or zero-padded to its input width (so they run one after another, as in the forward) and
    squashed into (0, 2) (`1 + tanh`: a bare chain of products decays into subnormal floats,
    whose arithmetic is many times slower on x86)."""
    params = unstack_layers(model.base_params)
    kernels = forward_kernels(params)
    key = "embed_tokens" if model.cfg.tie_embeddings else "lm_head"
    head = {key: params[key]}  # what `lm_head` reads

    @jax.jit
    def chain(x, kernels, head):
        for p in kernels:
            width, _ = cpu_kernels.kernel_shape(kernel_of(p))
            missing = width - x.shape[1]
            x = x[:, :width] if missing <= 0 else jnp.pad(x, ((0, 0), (0, missing)))
            x = 1 + jnp.tanh(dense({k: v for k, v in p.items() if k != "bias"}, x))
        return lm_head(head, x[:, : model.cfg.d_model], cfg=model.cfg)

    x = jnp.ones((rows, model.cfg.d_model), compute_dtype(kernels[0]))
    return median_ms(lambda _: chain(x, kernels, head), None, repeats)


def profile_prompt(model: SpeculativeModel, prompt: list[int], repeats: int) -> dict:
    """Every piece of one round of `model.tree_cfg` after a real prefill of `prompt`."""
    tree, cfg, dcfg, head = model.tree_cfg, model.cfg, model.dcfg, model.draft_head()
    base, draft = model.base_params, model.draft_params
    static = dict(cfg=cfg, dcfg=dcfg, greedy=True)
    budget = speculative.prepare_budget(tree, vocab_size=cfg.vocab_size)
    # Room for the prefill plus the timed rounds of up to A tokens each (the traced rounds
    # start again from a fresh prefill).
    shapes = speculative.plan_shapes([len(prompt)], (repeats + 2) * tree.path_len, tree)
    tokens, lengths = vanilla.pad_prompts([prompt], [shapes.prompt_bucket])
    knobs = speculative.make_knobs(vanilla.SamplingKnobs(), max_new_tokens=10**6, eos_ids=[-1])
    inputs = (jnp.asarray(tokens), jnp.asarray(lengths), knobs, jnp.zeros(1, jnp.uint32), budget)
    state = speculative.prefill(base, draft, *inputs, head, shapes=shapes, **static)
    one = jnp.int32(1)
    compiled = speculative.run_segment.lower(
        state, base, draft, knobs, budget, head, one, index=None, shapes=shapes, **static
    ).compile()
    out = {"hlo_ops": sum(" = " in line for line in compiled.as_text().splitlines())}

    def one_round(state):
        return speculative.run_segment(
            state, base, draft, knobs, budget, head, one, index=None, shapes=shapes, **static
        )

    out["round_ms"] = median_ms(one_round, state, repeats)
    state = speculative.prefill(base, draft, *inputs, head, shapes=shapes, **static)
    _, traced = trace_phases(
        one_round, state, repeats, compiled.as_text(), "jit_run_segment", loop_passes=tree.depth
    )
    out.update(traced)
    # The pieces alone, on copies of a fresh state's caches (the round donated the original).
    state = speculative.prefill(base, draft, *inputs, head, shapes=shapes, **static)
    t = speculative.draft_tree(
        state, base, draft, head, cfg=cfg, dcfg=dcfg, tree_cfg=tree, shapes=shapes
    )
    length = state.cache.length
    positions = tree_lib.verify_positions(t, length)
    # Weights and inputs go in as arguments, as in the round: arrays a jitted function closes
    # over are compile-time constants, which XLA may fold or lay out ahead of time (a zero
    # feature made a draft level ~30% cheaper than the same forward on real features).

    @functools.partial(jax.jit, donate_argnums=0)
    def base_forward_at(carry, params, tokens, pos, at, mask):
        logits, _, cache = base_forward(
            params, tokens, pos, carry[0], write_idx=at, mask=mask, cfg=cfg
        )
        return cache, logits  # logits kept: nothing is pruned

    for name, width in (("verify_ms", tree.total_tokens), ("decode_ms", 1)):
        mask = (
            tree_lib.verify_mask(t, length, shapes.capacity)
            if width == tree.total_tokens
            else causal_mask(length, width, shapes.capacity)
        )
        fn = functools.partial(
            base_forward_at, params=base, tokens=t.draft_tokens[:, :width],
            pos=positions[:, :width], at=length, mask=mask,
        )  # fmt: skip
        out[name] = median_ms(fn, (jax.tree.map(jnp.copy, state.cache), None), repeats)

    trunk = state.trunk_len

    @functools.partial(jax.jit, donate_argnums=0)
    def draft_forward_at(carry, params, feats, tokens, pos, at, mask):
        step = speculative._draft_step(*params, cfg=cfg, dcfg=dcfg)
        logits, next_feature, dcache = step(feats, tokens, pos, carry[0], at, mask)
        return dcache, (logits, next_feature)  # outputs kept: nothing is pruned

    @functools.partial(jax.jit, donate_argnums=0)
    def trunk_forward_at(carry, params, feats, tokens, pos, at, mask):
        # As the round runs it: the K/V of every slot, the outputs at the last one only.
        dcache, logprobs, feature = speculative._trunk_forward(
            *params, feats, tokens, pos, carry[0], write_idx=at, mask=mask,
            last=jnp.full(at.shape, tokens.shape[1] - 1), cfg=cfg, dcfg=dcfg,
        )  # fmt: skip
        return dcache, (logprobs, feature)

    for name, width, forward in (
        ("trunk_ms", tree.path_len, trunk_forward_at), ("level_ms", tree.top_k, draft_forward_at)
    ):  # fmt: skip
        # The round's root feature stands in for the input features (real values, not zeros).
        feats = jnp.broadcast_to(state.root_feature[:, None], (1, width, dcfg.d_model))
        fn = functools.partial(
            forward, params=(base, draft, head), feats=feats,
            tokens=t.draft_tokens[:, :width], pos=trunk[:, None] + jnp.arange(width)[None],
            at=trunk, mask=causal_mask(trunk, width, shapes.draft_capacity),
        )  # fmt: skip
        out[name] = median_ms(fn, (jax.tree.map(jnp.copy, state.draft_cache), None), repeats)
    return out


def profile_tree(model: SpeculativeModel, tree: TreeConfig, prompts, repeats: int) -> dict:
    """Medians over prompts of `profile_prompt`, and the derived figures (module docstring)."""
    model.tree_cfg = tree = tree.trimmed()
    rows = [profile_prompt(model, prompt, repeats) for prompt in prompts]
    split = ("phases_ms", "levels_ms")
    out = {key: statistics.median(row[key] for row in rows) for key in rows[0] if key not in split}
    out["phases_ms"] = median_phases([row["phases_ms"] for row in rows])
    if all("levels_ms" in row for row in rows) and len({len(r["levels_ms"]) for r in rows}) == 1:
        out["levels_ms"] = median_lists([row["levels_ms"] for row in rows])
    out["hlo_ops"] = int(out["hlo_ops"])
    out["draft_ms"] = out["trunk_ms"] + tree.depth * out["level_ms"]
    out["bookkeeping_ms"] = out["round_ms"] - out["verify_ms"] - out["draft_ms"]
    out["decodes_per_round"] = out["round_ms"] / out["decode_ms"]
    out["bookkeeping_decodes"] = out["bookkeeping_ms"] / out["decode_ms"]
    return out


def main(argv: list[str] | None = None) -> int:
    p = cli.ArgumentParser(prog="python -m inference.profile_round", description=__doc__)
    p.add_argument("--base", type=pathlib.Path, default=DEFAULT_MODEL_DIR / "base")
    p.add_argument("--draft", type=pathlib.Path, default=DEFAULT_MODEL_DIR / "griffin")
    p.add_argument("--bench", type=pathlib.Path,
                   default=pathlib.Path("runs/prompts/heldout_code/question.jsonl"))  # fmt: skip
    p.add_argument("--num-questions", type=int, default=4)
    p.add_argument("--tree", action="append", default=[], help="TOP_K,DEPTH,TOTAL_TOKENS[,VOCAB]")
    p.add_argument("--repeats", type=int, default=20, help="timed calls per piece and prompt")
    p.add_argument("--out", type=pathlib.Path, default=None, help="JSON report")
    args = p.parse_args(argv)
    cli.positive(args.num_questions, "--num-questions")
    cli.positive(args.repeats, "--repeats")
    cli.output_file(args.out, "--out")
    for flag, folder in (("--base", args.base), ("--draft", args.draft)):
        if not (folder / "config.json").is_file():
            raise checks.InputError(f"{flag} {folder} has no config.json")
    sizes = [parse_tree(t) for t in args.tree]
    if not sizes:  # the draft's own tree
        stored = resolve_tree(read_tree_file(args.draft))
        sizes = [(stored.top_k, stored.depth, stored.total_tokens, stored.draft_vocab)]
    questions = read_questions(args.bench, args.num_questions)

    model = SpeculativeModel.from_pretrained(args.base, args.draft)
    prompts = encode_checked(model.tokenizer, questions, model.cfg, 1, chat=False)
    gflops = gemm_gflops(args.repeats)
    n_params = count_params(model.base_params)
    report: dict[str, Any] = {"machine": cli.machine(),
                              "gemm_gflops": gflops, "base_params": n_params, "trees": [],
                              "command": " ".join(sys.argv)}  # fmt: skip
    products = {1: products_ms(model, 1, args.repeats)}
    for k, d, m, v in sizes:
        tree = TreeConfig(top_k=k, depth=d, total_tokens=m, draft_vocab=v)
        row = profile_tree(model, tree, prompts, args.repeats)
        floor = 2 * tree.total_tokens * n_params / (gflops * 1e9) * 1e3
        if m not in products:
            products[m] = products_ms(model, m, args.repeats)
        bound = max(floor, row["decode_ms"])
        row.update(top_k=k, depth=d, total_tokens=m, draft_vocab=v, verify_floor_ms=floor,
                   verify_vs_bound=row["verify_ms"] / bound, verify_products_ms=products[m],
                   decode_products_ms=products[1],
                   products_vs_bound=products[m] / bound)  # fmt: skip
        report["trees"].append(row)
        print(
            f"({k}, {d}, {m}, V{v or 'all'}): round {row['round_ms']:.2f} ms = "
            f"{row['decodes_per_round']:.2f} decodes; verify {row['verify_ms']:.2f} "
            f"(floor {floor:.2f}, products alone {products[m]:.2f}), draft "
            f"{row['draft_ms']:.2f}, bookkeeping "
            f"{row['bookkeeping_ms']:.2f} ms = {row['bookkeeping_decodes']:.2f} decodes; "
            f"{row['hlo_ops']} HLO ops",
            file=sys.stderr,
        )
        phases = ", ".join(f"{p} {ms:.2f}" for p, ms in row["phases_ms"].items() if ms >= 0.005)
        print(f"  traced round {row['traced_round_ms']:.2f} ms, {row['thunks']:.0f} thunks: "
              f"{phases}", file=sys.stderr)  # fmt: skip
    if args.out:
        cli.write_report(args.out, report)
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
