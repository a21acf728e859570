"""The user-facing model object: a base model, optionally a draft, their tokenizer and tree sizes.

    model = SpeculativeModel.from_pretrained("path/to/llama", "path/to/griffin-draft",
                                             dtype="bfloat16", total_tokens=-1)
    ids = model.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    out = model.generate([ids], temperature=0.0, max_new_tokens=256)
    text = model.tokenizer.decode(out.output_ids[0])

This is the JAX form of the official `EaModel.from_pretrained(...)` / `eagenerate(...)`: folders
in HF layout for the base (`convert.load_hf`) and the published GRIFFIN / EAGLE-2 layout for the
draft (`convert.load_draft`); hub ids are fetched with huggingface_hub where the network allows.
`total_tokens=-1` picks the tree size by timing verification on this machine (`auto_total_tokens`).
`mesh="data=1,model=8"` (or a `jax.sharding.Mesh`) loads the base shard by shard onto the mesh and
runs the same engine sharded (`griffin_jax.sharding`).
"""

from __future__ import annotations

import dataclasses
import pathlib
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from convert.load_draft import load_draft
from convert.load_hf import (
    checkpoint_files,
    iter_safetensors,
    load_hf,
    load_hf_config,
    load_hf_params_sharded,
    read_json,
)
from griffin_jax import budget as budget_lib
from griffin_jax import checks, cpu_kernels, sharding, speculative, vanilla
from griffin_jax.config import ModelConfig, TreeConfig
from griffin_jax.draft import DraftConfig
from griffin_jax.kv_cache import causal_mask, init_cache
from griffin_jax.layers import fuse_projections, is_fused, is_packed, pack_kernels
from griffin_jax.model import (
    abstract_params,
    decode_layout,
    forward,
    is_unstacked,
    unstack_layers,
)

DEFAULT_MODEL_DIR = pathlib.Path(__file__).parent / "default_model"
TREE_FILE = "tree.json"
# A token-frequency ranking next to a draft (`training.draft_vocab`): tensor `token_ids`, most
# frequent first. `tree.json`'s `draft_vocab: N` drafts from its first N ids.
DRAFT_VOCAB_FILE = "draft_vocab.safetensors"

# total_tokens=-1 candidates and the reference's preference factors (spec 5.9): a bigger tree is
# taken only if its verify time grows less than its factor. CPU_CANDIDATES extend the rule to
# the small trees that pay off on CPUs; their factors are a first estimate of the relative tau
# gain of a bigger tree (to be replaced by the tau curve measured on the default pair).
GPU_CANDIDATES = ((40, 1.0), (48, 1.05), (50, 1.07), (56, 1.1), (60, 1.13))
CPU_CANDIDATES = ((8, 1.0), (12, 1.08), (16, 1.14), (24, 1.2), (32, 1.24))


class ModelLoadError(ValueError):
    """A model folder is missing or unusable."""


def resolve_path(path_or_id: str | pathlib.Path) -> pathlib.Path:
    """A local folder, or a hub id downloaded with huggingface_hub (network permitting)."""
    path = pathlib.Path(path_or_id)
    if path.is_dir():
        return path
    if path.exists():
        raise ModelLoadError(f"{path} is not a folder")
    if str(path_or_id).count("/") != 1 or str(path_or_id).startswith((".", "/")):
        raise ModelLoadError(f"no such model folder: {path_or_id}")
    try:
        from huggingface_hub import snapshot_download

        return pathlib.Path(snapshot_download(str(path_or_id)))
    except Exception as err:  # noqa: BLE001 (any hub failure is reported the same way)
        raise ModelLoadError(
            f"{path_or_id}: not a local folder and not downloadable ({err})"
        ) from err


def resolve_folders(
    base_model_path: str | pathlib.Path | None,
    draft_model_path: str | pathlib.Path | None,
    with_draft: bool = True,
) -> tuple[pathlib.Path, pathlib.Path | None]:
    """(base folder, draft folder or None) as `from_pretrained` reads its two paths."""
    if base_model_path is None:
        base_model_path = DEFAULT_MODEL_DIR / "base"
        if draft_model_path is None:
            draft_model_path = DEFAULT_MODEL_DIR / "griffin"
    base_dir = resolve_path(base_model_path)
    if not (base_dir / "config.json").exists():
        raise ModelLoadError(f"{base_dir} has no config.json (not a HF model folder)")
    if not with_draft or draft_model_path is None:
        return base_dir, None
    return base_dir, resolve_path(draft_model_path)


def _dtype(name: str | Any) -> Any:
    aliases = {"f32": "float32", "fp32": "float32", "bf16": "bfloat16", "f16": "float16",
               "fp16": "float16"}  # fmt: skip
    return jnp.dtype(aliases.get(str(name), str(name)))


@dataclasses.dataclass
class GenerationOutput:
    output_ids: list[list[int]]  # new ids per row, stop token included
    rounds: list[int]  # base verification forwards per row (vanilla: decode steps)
    accept_lengths: list[list[int]]  # accepted draft tokens per round per row ([] for vanilla)
    seconds: float  # wall time, prefill included
    round_shapes: list[list[str]] = dataclasses.field(default_factory=list)  # tree per round
    plain_program: bool = False  # the plain decoder's program ran it (the budget chose no draft)

    @property
    def new_tokens(self) -> int:
        return sum(len(o) for o in self.output_ids)

    @property
    def tau(self) -> float:
        """Tokens committed per verification forward (accepted + bonus); 1.0 for vanilla."""
        lens = [a for row in self.accept_lengths for a in row]
        return float(np.mean(lens) + 1.0) if lens else 1.0

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0


class SpeculativeModel:
    """A base model (+ optional draft) ready to generate; see the module docstring."""

    def __init__(
        self,
        base_params: Any,
        cfg: ModelConfig,
        *,
        draft_params: Any = None,
        dcfg: DraftConfig | None = None,
        tree_cfg: TreeConfig | None = None,
        tokenizer: Any = None,
        mesh: jax.sharding.Mesh | None = None,
    ) -> None:
        self.base_params, self.cfg = base_params, cfg
        self.draft_params, self.dcfg = draft_params, dcfg
        self.tree_cfg = tree_cfg or TreeConfig()
        self.tokenizer = tokenizer
        self.mesh = mesh
        self.vocab_ranking: np.ndarray | None = None  # token ids, most frequent first
        self._draft_heads: dict[int, speculative.DraftHead] = {}
        # The adaptive draft budget (`tree="auto"`): rounds choose among `budget.auto_shapes(
        # tree_cfg)` by measured cost per batch size (`round_costs`).
        self.adaptive = False
        self._costs: dict[tuple[int, bool], list[float]] = {}
        self._budgets: dict[tuple, budget_lib.Budget] = {}  # `budget`'s, per shapes and costs
        self._history: dict[tuple[budget_lib.Shape, ...], budget_lib.History] = {}

    @classmethod
    def from_pretrained(
        cls,
        base_model_path: str | pathlib.Path | None = None,
        draft_model_path: str | pathlib.Path | None = None,
        *,
        dtype: str | Any = "float32",
        total_tokens: int | None = None,
        depth: int | None = None,
        top_k: int | None = None,
        load_tokenizer: bool = True,
        with_draft: bool = True,
        mesh: str | jax.sharding.Mesh | None = None,
        unroll_layers: bool = True,
        draft_vocab: int | None = None,
        tree: str | None = None,
    ) -> SpeculativeModel:
        """Loads a base (HF layout) and a draft (published GRIFFIN / EAGLE-2 / EAGLE-3 layout).

        Args:
          base_model_path: folder or hub id; None = the project's default model.
          draft_model_path: folder or hub id; None with a None base = the default GRIFFIN draft;
            None with an explicit base = no draft (vanilla only).
          dtype: computation and parameter dtype ("float32", "bfloat16", ...).
          total_tokens: tree nodes including the root; -1 = choose by timing verification on
            this machine; None = the tree file next to the draft, else the reference's 60.
          depth, top_k: tree depth and branching (None = the tree file's, else 5 and 10).
          load_tokenizer: also load the base folder's tokenizer (transformers).
          with_draft: False loads the base alone (vanilla decoding only).
          mesh: "data=1,model=8" or a Mesh: the base is read slice by slice onto its devices
            (safetensors; a .bin base and the draft go through host memory), and generation
            runs sharded. None: one device, as before.
          unroll_layers: hold the base in the unrolled decode layout (`model.unstack_layers`:
            per-layer weights and KV buffers, ~15% faster decoding on CPU, one compiled copy of
            the layer per depth), on one device with each layer's q/k/v and gate/up products
            fused, the draft's too (`layers.fuse_projections`), and on a CPU the f32 kernels
            packed for `cpu_kernels` (`layers.pack_kernels`); False keeps the stored layout
            (stacked layers, `nn.scan`, unfused, XLA's products).
          draft_vocab: draft from the N most frequent tokens of the ranking stored next to the
            draft (`draft_vocab.safetensors`); 0 = the whole vocabulary; None = the tree file's
            setting (else 0). Lossless either way.
          tree: "auto" = the adaptive draft budget (`griffin_jax.budget`): every round picks
            plain decoding or a tree up to the sizes above, by running acceptance and the
            round costs measured on this machine. None: the tree file's `"auto"` setting
            (ignored when explicit sizes are given), else one fixed tree.
        """
        base_dir, draft_dir = resolve_folders(base_model_path, draft_model_path, with_draft)
        if isinstance(mesh, str):
            mesh = sharding.make_mesh(mesh)
        if mesh is None:
            cfg, params = load_hf(base_dir, dtype=_dtype(dtype))
        else:
            cfg, params = _load_base_sharded(base_dir, _dtype(dtype), mesh)
        if unroll_layers and mesh is not None:  # fused kernels cannot be sharded by heads
            params = unstack_layers(params, free_stacked=True)
            params = sharding.shard_params(params, mesh, head_dim=cfg.head_dim)
        elif unroll_layers:
            params = decode_layout(params, free=True)
        tokenizer = None
        if load_tokenizer:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(base_dir)
        model = cls(params, cfg, tokenizer=tokenizer, mesh=mesh)
        if draft_dir is not None:
            model._load_draft(
                draft_dir, dtype=_dtype(dtype), tree=tree, top_k=top_k, depth=depth,
                total_tokens=total_tokens, draft_vocab=draft_vocab,
            )  # fmt: skip
        return model

    def with_draft(
        self,
        draft_model_path: str | pathlib.Path,
        *,
        total_tokens: int | None = None,
        depth: int | None = None,
        top_k: int | None = None,
        draft_vocab: int | None = None,
        tree: str | None = None,
    ) -> SpeculativeModel:
        """A model with this one's base (the same parameter arrays, config, tokenizer and
        mesh: nothing of the base is loaded or copied again) and the draft at
        `draft_model_path`, sized as `from_pretrained`'s arguments of the same names say.
        Several drafts or tree settings over one base then share its memory, and a benchmark
        that alternates them times every method on the same weights (with a copy each, calls
        reading another copy than the call before paid for it unequally: the adaptive program
        read 1.047x the fixed one's time there, 1.010x on one copy)."""
        model = type(self)(self.base_params, self.cfg, tokenizer=self.tokenizer, mesh=self.mesh)
        dtype = self.base_params["embed_tokens"]["embedding"].dtype  # the base's compute dtype
        model._load_draft(
            resolve_path(draft_model_path), dtype=dtype, tree=tree, top_k=top_k, depth=depth,
            total_tokens=total_tokens, draft_vocab=draft_vocab,
        )  # fmt: skip
        return model

    def _load_draft(
        self, draft_dir: pathlib.Path, *, dtype: Any, tree: str | None, **sizes: int | None
    ) -> None:
        """Loads the draft at `draft_dir` for this model's base, in the base's layout (fused,
        and packed for `cpu_kernels` where the base is; sharded on its mesh), and resolves
        the tree from `sizes` (`from_pretrained`'s top_k, depth, total_tokens, draft_vocab)
        over the draft's tree file."""
        if self.mesh is None:
            self.dcfg, draft = load_draft(draft_dir, self.cfg, dtype=dtype)
            if is_fused(self.base_params):  # the base's decode layout: fused, packed where it is
                draft = fuse_projections(draft, free_parts=True)
                if is_packed(self.base_params):
                    draft = pack_kernels(draft, free_parts=True)
            self.draft_params = draft
        else:
            with sharding.host_device():
                self.dcfg, draft = load_draft(draft_dir, self.cfg, dtype=dtype)
            self.draft_params = sharding.shard_params(draft, self.mesh, head_dim=self.dcfg.head_dim)
        stored = read_tree_file(draft_dir)
        self.vocab_ranking = _read_vocab_ranking(draft_dir)
        self.tree_cfg = resolved = resolve_tree(
            stored, vocab_size=self.dcfg.draft_vocab, tree=tree, **sizes
        )
        self.adaptive = resolve_auto(
            stored, tree, sizes_given=any(v is not None for v in sizes.values())
        )
        if resolved.total_tokens == -1:
            self.tree_cfg = dataclasses.replace(
                resolved, total_tokens=self.auto_total_tokens(resolved)
            )
        self.draft_head()  # validates the draft vocabulary setting now

    def draft_head(self) -> speculative.DraftHead | None:
        """The lm_head restricted to `tree_cfg.draft_vocab` tokens (None: the whole vocabulary).

        Built once per size from `vocab_ranking` (see `speculative.DraftHead`). An EAGLE-3 draft
        always drafts from its own vocabulary (`speculative.resolve_head`): None."""
        size = self.tree_cfg.draft_vocab
        if self.dcfg is not None and self.dcfg.kind == "eagle3":
            if size:
                raise ValueError(
                    f"draft_vocab={size}: an EAGLE-3 draft drafts from its own vocabulary of "
                    f"{self.dcfg.draft_vocab} tokens (its lm_head); leave draft_vocab at 0"
                )
            return None
        if not size or size >= self.cfg.vocab_size:
            return None
        if self.vocab_ranking is None:
            raise ModelLoadError(
                f"draft_vocab={size} needs a token ranking ({DRAFT_VOCAB_FILE} next to the "
                "draft; write one with `python -m training.draft_vocab`)"
            )
        if not self.tree_cfg.top_k <= size <= len(self.vocab_ranking):
            raise ValueError(
                f"draft_vocab={size} must be in [top_k={self.tree_cfg.top_k}, "
                f"{len(self.vocab_ranking)}] (the ranking's length)"
            )
        if size not in self._draft_heads:
            head = speculative.make_draft_head(
                self.base_params, self.cfg, self.vocab_ranking[:size]
            )
            if self.mesh is not None:
                replicated = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
                head = jax.device_put(head, replicated)
            self._draft_heads[size] = head
        return self._draft_heads[size]

    @property
    def has_draft(self) -> bool:
        return self.draft_params is not None

    @property
    def shapes(self) -> tuple[budget_lib.Shape, ...]:
        """The round shapes generation uses: the adaptive set, or the one fixed tree."""
        return budget_lib.auto_shapes(self.tree_cfg) if self.adaptive else (self.tree_cfg,)

    def round_costs(self, batch: int, *, greedy: bool) -> list[float]:
        """ms per round of each of `shapes` at `batch` rows on this machine, then ms per slot
        of the draft trunk's catch-up and ms a probe adds to a call, and where the CPU kernels'
        threads are this process's to choose (`cpu_kernels.chunk_choice_applies`) each shape's
        (`Budget.chunks`): measured once (`speculative.measure_round_costs`) and kept in the
        cost cache file (`budget.cache_path()`, keyed by machine, model, shapes, batch and code
        version)."""
        key = (batch, greedy)
        if key not in self._costs:
            dtype = self.base_params["embed_tokens"]["embedding"].dtype
            layout = "unrolled" if is_unstacked(self.base_params) else "stacked"
            layout += "+fused" if is_fused(self.base_params) else ""
            layout += "+packed" if is_packed(self.base_params) else ""
            model = f"{self.cfg}|{self.dcfg}|{jnp.dtype(dtype).name}|{layout}|greedy={greedy}"
            mesh = "" if self.mesh is None else str(dict(self.mesh.shape))
            # where each shape runs the CPU kernels' chunks, chosen with the costs (one device)
            choose = self.mesh is None and cpu_kernels.chunk_choice_applies()
            model += "|chunks=chosen" if choose else ""
            file_key = budget_lib.cost_key(model + mesh, self.shapes, batch)

            def measure() -> list[float]:
                mode = "greedy" if greedy else "sampled"
                what = "the adaptive draft budget" if self.adaptive else "the tree"
                where = ", and where the CPU kernels split their calls" if choose else ""
                print(
                    f"measuring the round costs of {what}{where} ({mode}, batch {batch}): "
                    f"once on this machine, kept in {budget_lib.cache_path()}",
                    file=sys.stderr,
                )
                return speculative.measure_round_costs(
                    self.base_params, self.cfg, self.draft_params, self.dcfg,
                    budget_lib.make_budget(self.shapes), batch=batch, greedy=greedy,
                    draft_head=self.draft_head(), choose_chunks=choose,
                )  # fmt: skip

            n = len(self.shapes)
            self._costs[key], _ = budget_lib.load_or_measure_costs(
                file_key, measure,
                check=lambda e: budget_lib.round_costs_valid(e, n) and (len(e) > n + 2) == choose,
            )  # fmt: skip
        return self._costs[key]

    def measured_costs(self) -> dict[str, list[float]]:
        """The `round_costs` this model has used, by batch size and class (a report's)."""
        return {
            f"batch {batch}, {'greedy' if greedy else 'sampled'}": costs
            for (batch, greedy), costs in sorted(self._costs.items())
        }

    def budget(self, batch: int, *, greedy: bool) -> budget_lib.Budget | TreeConfig:
        """What `speculative.generate` gets as `tree_cfg` for a batch of this size: a fixed
        tree, or a budget of round shapes with their measured costs and, where the CPU kernels
        run here (`cpu_kernels.chunk_choice_applies`), each shape's threads (`Budget.chunks`,
        measured with the costs; a fixed tree then gets its own, as a one-shape budget)."""
        if not self.adaptive and (self.mesh is not None or not cpu_kernels.chunk_choice_applies()):
            return self.tree_cfg
        figures = tuple(self.round_costs(batch, greedy=greedy))
        key = (self.shapes, figures)
        if key not in self._budgets:  # built once per set of costs
            n = len(self.shapes)
            *costs, catch_up, call = figures[: n + 2]
            chunks = [int(c) for c in figures[n + 2 :]] or None  # measured with the costs
            self._budgets[key] = budget_lib.make_budget(
                self.shapes, costs, catch_up=catch_up, probe_call=call, chunks=chunks
            )
        if not self.adaptive:  # one shape: its costs choose nothing, its threads are kept
            return self._budgets[key]
        return self.history().apply(self._budgets[key], sampled=not greedy)

    def history(self) -> budget_lib.History:
        """What the adaptive budget learnt from this model's earlier generations (its prior
        for fresh rows, `budget.History`), per set of round shapes."""
        shapes = self.shapes
        if shapes not in self._history:
            self._history[shapes] = budget_lib.History.for_shapes(shapes)
        return self._history[shapes]

    def generate(
        self,
        input_ids: Sequence[Sequence[int]],
        *,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        max_new_tokens: int = 512,
        seed: int | Sequence[int] = 0,
        eos_ids: Sequence[int] | None = None,
        on_round: Callable[[np.ndarray, np.ndarray], None] | None = None,
    ) -> GenerationOutput:
        """Speculative decoding of a batch of token-id lists (new ids + round statistics)."""
        if not self.has_draft:
            raise ValueError(
                "this model has no draft: pass draft_model_path, or use vanilla_generate"
            )
        t0 = time.perf_counter()  # the policy's host work is part of the call
        tree = self.budget(len(input_ids), greedy=temperature == 0)
        res = self._speculative(
            input_ids, tree, max_new_tokens=max_new_tokens, temperature=temperature,
            top_p=top_p, top_k=top_k, seed=seed, eos_ids=eos_ids, on_round=on_round,
        )  # fmt: skip
        if self.adaptive:
            self.history().observe(
                res.level_hits, res.level_trials, temperature > 0, probe_wait=res.probe_wait,
                plain_streak=res.plain_streak, conf_counts=res.conf_counts,
            )  # fmt: skip
        names = [budget_lib.describe(s) for s in self.shapes]
        return GenerationOutput(
            res.output_ids, res.rounds, res.accept_lengths, time.perf_counter() - t0,
            round_shapes=[[names[i] for i in row] for row in res.round_shapes],
            plain_program=res.plain_program,
        )  # fmt: skip

    def _speculative(self, input_ids, tree, **knobs) -> speculative.SpecResult:
        """`speculative.generate` with this model's params, mesh and draft head."""
        return speculative.generate(
            self.base_params, self.cfg, self.draft_params, self.dcfg, input_ids, tree_cfg=tree,
            mesh=self.mesh, draft_head=self.draft_head(), **knobs,
        )  # fmt: skip

    def warm_up(self, input_ids: Sequence[Sequence[int]], **knobs: Any) -> None:
        """Compiles every program a `generate` call of this shape may run (`knobs`: generate's
        keywords), so that a later call compiles nothing, then makes that call once (the
        adaptive budget learns from it as from any). With the adaptive budget a call runs either
        the speculative program or, for a batch the budget would decode plainly throughout, the
        plain decoder's (`speculative.plain_throughout`), and which one depends on what earlier
        calls taught the budget: both are compiled first, the speculative one by a call whose
        forced schedule (plain rounds) the budget does not learn from."""
        if self.adaptive and self.has_draft:
            tree = self.budget(len(input_ids), greedy=knobs.get("temperature", 0.0) == 0)
            self._speculative(input_ids, tree.replace(schedule=np.zeros_like(tree.schedule)),
                              **knobs)  # fmt: skip
            self.vanilla_generate(input_ids, **knobs)
        (self.generate if self.has_draft else self.vanilla_generate)(input_ids, **knobs)

    def vanilla_generate(
        self,
        input_ids: Sequence[Sequence[int]],
        *,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        max_new_tokens: int = 512,
        seed: int | Sequence[int] = 0,
        eos_ids: Sequence[int] | None = None,
        on_round: Callable[[np.ndarray, np.ndarray], None] | None = None,
    ) -> GenerationOutput:
        """Plain autoregressive decoding with the base alone (the same signature)."""
        del on_round  # the device loop does not stream
        t0 = time.perf_counter()
        res = vanilla.generate(
            self.base_params, self.cfg, input_ids, max_new_tokens=max_new_tokens,
            temperature=temperature, top_p=top_p, top_k=top_k, seed=seed, eos_ids=eos_ids,
            mesh=self.mesh,
        )  # fmt: skip
        steps = [max(len(o) - 1, 0) for o in res.output_ids]
        return GenerationOutput(
            res.output_ids, steps, [[] for _ in res.output_ids], time.perf_counter() - t0
        )

    def auto_total_tokens(self, tree: TreeConfig, *, repeats: int = 20) -> int:
        """The reference's `total_token=-1` rule (spec 5.9) on this machine.

        Times `repeats` base forwards over each candidate tree size, divides by the
        candidate's preference factor and takes the minimum. GPU/TPU backends use the reference's
        candidates (40..60); the CPU uses small trees (8..32), where a verify of 32 tokens
        already costs ~3x a one-token decode.
        """
        on_cpu = jax.default_backend() == "cpu"
        candidates = CPU_CANDIDATES if on_cpu else GPU_CANDIDATES
        limit = 1 + tree.top_k + tree.depth * tree.top_k * tree.top_k
        best, best_cost = None, float("inf")
        prefix = 64
        for size, factor in candidates:
            if size > limit:
                continue
            cost = _time_verify(self.base_params, self.cfg, size, prefix, repeats) / factor
            if cost < best_cost:
                best, best_cost = size, cost
        return best or min(limit, candidates[0][0])


def _time_verify(params, cfg: ModelConfig, size: int, prefix: int, repeats: int) -> float:
    """Seconds per base forward of `size` tokens after a `prefix`-token cache (compiled once)."""
    capacity = prefix + size
    dtype = params["embed_tokens"]["embedding"].dtype
    cache = init_cache(cfg, 1, capacity, dtype, per_layer=is_unstacked(params))
    tokens = jnp.zeros((1, size), jnp.int32)
    positions = prefix + jnp.arange(size, dtype=jnp.int32)[None]
    start = jnp.full((1,), prefix, jnp.int32)
    mask = causal_mask(start, size, capacity)

    @jax.jit
    def run(params, cache):
        return forward(params, tokens, positions, cache, write_idx=start, mask=mask, cfg=cfg)[0]

    run(params, cache).block_until_ready()
    t0 = time.perf_counter()
    for _ in range(repeats):
        out = run(params, cache)
    out.block_until_ready()
    return (time.perf_counter() - t0) / repeats


TREE_KEYS = ("top_k", "depth", "total_tokens", "draft_vocab", "auto")


def read_tree_file(folder: pathlib.Path) -> dict:
    """The draft's stored tree settings (`tree.json` next to it or one folder up), or {}."""
    for candidate in (folder / TREE_FILE, folder.parent / TREE_FILE):
        if candidate.exists():
            stored = read_json(candidate)
            if not isinstance(stored, dict) or set(stored) - set(TREE_KEYS):
                raise ModelLoadError(
                    f"{candidate}: expected an object with keys among {', '.join(TREE_KEYS)}"
                )
            if not isinstance(stored.get("auto", False), bool):
                raise ModelLoadError(f'{candidate}: "auto" must be true or false')
            return stored
    return {}


def parse_tree(text: str) -> tuple[int, int, int, int]:
    """ "K,D,M" or "K,D,M,V" (top_k, depth, total_tokens, draft vocabulary; V 0 = all tokens)."""
    try:
        values = [int(x) for x in text.split(",")]
    except ValueError:
        values = []
    if len(values) not in (3, 4):
        raise checks.InputError(f"--tree {text!r}: expected TOP_K,DEPTH,TOTAL_TOKENS[,VOCAB]")
    k, d, m, v = (values + [0])[:4]
    checks.tree_sizes(top_k=k, depth=d, total_tokens=m, vocab_size=v or None)
    checks.integer(v, name="--tree's draft vocabulary (0 = all)", minimum=0)
    return k, d, m, v


def tree_flags(args: Any) -> dict[str, Any]:
    """The tree settings a command line gives (`from_pretrained`'s keywords; None = not given).

    `--tree K,D,M[,V]` names every size; `--tree-top-k`, `--depth`, `--total-tokens` and
    `--draft-vocab` are its single-size aliases (`--total-tokens -1` picks M by timing).
    `--tree auto` is the adaptive draft budget over the draft's stored tree (`tree="auto"`).
    """
    flags = dict(
        top_k=args.tree_top_k, depth=args.depth, total_tokens=args.total_tokens,
        draft_vocab=args.draft_vocab,
    )  # fmt: skip
    return {**flags, **tree_spec(args.tree, flags)}


def tree_spec(text: str | None, aliases: dict[str, int | None] | None = None) -> dict[str, Any]:
    """`--tree TEXT` as `from_pretrained` keywords: {} (not given), {"tree": "auto"} or the four
    sizes (refused next to any single-size alias that was given)."""
    if text is None:
        return {}
    if text == "auto":
        return {"tree": "auto"}
    if aliases and any(v is not None for v in aliases.values()):
        raise checks.InputError(
            "--tree names every tree size: drop --tree-top-k/--depth/--total-tokens/--draft-vocab"
        )
    return dict(zip(TREE_KEYS[:4], parse_tree(text), strict=True))


def resolve_tree(
    stored: dict,
    *,
    top_k: int | None = None,
    depth: int | None = None,
    total_tokens: int | None = None,
    draft_vocab: int | None = None,
    vocab_size: int | None = None,
    tree: str | None = None,
) -> TreeConfig:
    """The tree to use: each given size, else the stored one, else the reference's default.

    None means "not given" (0 is a value: depth 0 is one drafted level, a top_k of 0 is refused).
    `total_tokens=-1` is kept for the caller to resolve by timing (`auto_total_tokens`).
    `tree="auto"` is checked here; whether the budget is adaptive is `resolve_auto`'s answer.
    """
    if tree not in (None, "auto"):
        raise checks.InputError(f'tree: expected "auto" or None, got {tree!r}')
    given = dict(top_k=top_k, depth=depth, total_tokens=total_tokens, draft_vocab=draft_vocab)
    default = TreeConfig()
    sizes = {
        key: value if value is not None else stored.get(key, getattr(default, key))
        for key, value in given.items()
    }
    draft_vocab = checks.integer(sizes["draft_vocab"], name="draft_vocab (0 = all)", minimum=0)
    auto = sizes["total_tokens"] == -1
    checks.tree_sizes(
        top_k=sizes["top_k"], depth=sizes["depth"],
        total_tokens=2 if auto else sizes["total_tokens"],
        vocab_size=draft_vocab or vocab_size,
    )  # fmt: skip
    return TreeConfig(**sizes)


def resolve_auto(stored: dict, tree: str | None, sizes_given: bool) -> bool:
    """Whether to run the adaptive draft budget: `tree="auto"`, else the tree file's `"auto"`
    unless explicit sizes were given (they name one fixed tree)."""
    if tree == "auto":
        return True
    return bool(stored.get("auto", False)) and not sizes_given


def _read_vocab_ranking(folder: pathlib.Path) -> np.ndarray | None:
    path = folder / DRAFT_VOCAB_FILE
    if not path.exists():
        return None
    tensors = dict(iter_safetensors(path))
    if "token_ids" not in tensors or tensors["token_ids"].ndim != 1:
        raise ModelLoadError(f"{path}: expected one 1-D tensor `token_ids`")
    return tensors["token_ids"].astype(np.int32)


def _load_base_sharded(folder: pathlib.Path, dtype: Any, mesh: jax.sharding.Mesh):
    """(cfg, params) placed by `sharding`'s rules: safetensors slice by slice onto each device;
    a .bin checkpoint is read into host memory first, then spread."""
    cfg = load_hf_config(folder)
    if all(f.suffix == ".safetensors" for f in checkpoint_files(folder)):
        abstract = abstract_params(cfg, dtype)
        shardings = sharding.param_shardings(abstract, mesh, head_dim=cfg.head_dim)
        return cfg, load_hf_params_sharded(folder, cfg, shardings, dtype)
    with sharding.host_device():
        cfg, params = load_hf(folder, dtype=dtype)
    return cfg, sharding.shard_params(params, mesh, head_dim=cfg.head_dim)
