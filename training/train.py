"""Trains a GRIFFIN (stages 1..j), EAGLE-2 or EAGLE-3 draft against a frozen base model.

Mirrors the reference's `train/main_griffin_1.py` (stage 1: one pass, 1.0 SmoothL1 + 0.1 soft CE)
and `train/main_griffin_2.py --forward_num_total j` (stage j >= 2: warm start from stage j-1, j
unrolled passes over the multi-stream attention, + 0.5 top-10 CE per pass, token-alignment masks
with `topk_train`, per-pass gradients summed), spec sections 3 and 4. EAGLE-2 drafts are trained
by the same loop with the stage-1 loss only (as EAGLE-2 does), for fair comparisons. EAGLE-3
drafts (`eagle/traineagle3`) train online on three base layers with the training-time test:
`--ttt-steps` (7) steps on their own outputs, each a soft cross-entropy against the base's
distribution over the draft vocabulary (`--draft-vocab-size` most frequent ids of a
`--vocab-ranking` from `python -m training.draft_vocab`), weighted 0.8^s.

Usage::

    # features on disk (training.features), stage 1, then stage 2 warm-started from stage 1
    python -m training.train --base BASE --features FEATS --draft-kind griffin --stage 1 \\
        --steps 20000 --out runs/griffin_s1
    python -m training.train --base BASE --features FEATS --draft-kind griffin --stage 2 \\
        --init runs/griffin_s1 --steps 20000 --out runs/griffin_s2 --export runs/griffin_draft
    # no feature cache: the base runs inside the train step
    python -m training.train --base BASE --online --corpus data.jsonl --draft-kind eagle2 ...
    # EAGLE-3 over the 2048 most frequent tokens
    python -m training.draft_vocab --tokens CORPUS --vocab-size 8192 --out runs/eagle3_vocab
    python -m training.train --base BASE --online --corpus data.jsonl --draft-kind eagle3 \
        --draft-vocab-size 2048 --vocab-ranking runs/eagle3_vocab/draft_vocab.safetensors ...
    # curves
    python -m training.train plot --metrics runs/griffin_s2/metrics.jsonl --out curves.png

Training state (params, AdamW state, step, RNG key) goes to orbax checkpoints under OUT/checkpoints
with the data position in their metadata; `--resume` continues a killed run from its newest
checkpoint that restores (a broken newer one is named in a warning and kept, moved aside to
`<step>.unrestorable` at the next save). Every flag, path and the run folder are
checked before the base is loaded; bad input is one `error:` line, exit status 2
(`griffin_jax.cli`). Batches and noise are pure functions of (seed, step), so a run killed and
resumed ends with the same params as an uninterrupted one. Batches are padded to power-of-two
length buckets, so the step compiles at most once per bucket. Data parallel over all local
devices (`training.common.data_mesh`: batch axis split, params replicated); multi-host: call with
`--distributed` on every host (the same command; `jax.distributed.initialize` reads the cluster
from the environment), and each host loads its slice of every global batch.

Evaluation (every `--eval-every` steps, on the last `--eval-frac` of the sequences): top-1/2/3
accuracy of the first pass under the loss mask against the base's next token, and the
per-depth acceptance estimate acc@1..5 of the reference's `getkacc` (free-running the draft on
its own features and argmax tokens), computed exactly from unrolled exact-mask passes (see
`losses.chain_acceptance`).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import pathlib
import sys
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from griffin_jax import cli, speculative
from griffin_jax import draft as draft_lib
from griffin_jax import model as base_model
from griffin_jax.checks import InputError
from griffin_jax.config import ModelConfig
from griffin_jax.draft import DraftConfig
from training import args as args_lib
from training import common, features, losses

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass(frozen=True, kw_only=True)
class StepConfig:
    """Static options of the train / eval steps (hashable: a jit static argument)."""

    stage: int = 1  # number of unrolled passes
    mask_mode: str = "exact"  # multi-stream attention of stages >= 2
    topk_train: int = losses.TOPK_TRAIN
    shifted_mask: bool = False
    align_mask: bool = True  # False: the ablation without token-alignment masks
    noise_std: float = losses.NOISE_STD
    online: bool = False
    dtype: str = "float32"  # draft compute dtype (params stay f32)
    eval_depth: int = 5
    ttt_steps: int = 7  # EAGLE-3: steps of the training-time test


# ---------------------------------------------------------------------------------------------
# Data


class SequenceData:
    """Training sequences from a feature folder or, online, from tokenized examples.

    `rows(indices)` gives ids [n] int32, mask [n] and, offline, hidden [n, D] f32 per sequence.
    """

    def __init__(
        self,
        *,
        store: features.FeatureStore | None = None,
        examples: Sequence[features.Example] | None = None,
    ) -> None:
        self.store, self.examples = store, examples
        if store is not None:
            self.lengths = store.lengths
        else:
            self.lengths = np.asarray([len(e.ids) for e in examples], np.int64)

    def __len__(self) -> int:
        return len(self.lengths)

    def row(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        if self.store is not None:
            ids, hidden, mask = self.store[i]
            return ids, mask, hidden
        ex = self.examples[i]
        return ex.ids, ex.mask, None


def split(n: int, eval_frac: float) -> tuple[np.ndarray, np.ndarray]:
    """Train = first (1 - eval_frac), eval = the rest, in file order (as the reference)."""
    n_eval = int(round(n * eval_frac)) if eval_frac > 0 else 0
    n_eval = min(max(n_eval, 1 if eval_frac > 0 else 0), n - 1)
    return np.arange(n - n_eval), np.arange(n - n_eval, n)


def epoch_plan(lengths: np.ndarray, *, seed: int, epoch: int, batch: int) -> np.ndarray:
    """[steps_per_epoch, batch] positions into the train set for one epoch.

    Shuffle, then sort by length inside windows of 64 batches (less padding), then shuffle the
    batches; a pure function of (lengths, seed, epoch). The last partial batch is dropped.
    """
    rng = np.random.default_rng([seed, epoch])
    n = len(lengths)
    perm = rng.permutation(n)[: n // batch * batch]
    window = 64 * batch
    parts = [perm[i : i + window] for i in range(0, len(perm), window)]
    perm = np.concatenate([p[np.argsort(lengths[p], kind="stable")] for p in parts])
    batches = perm.reshape(-1, batch)
    return batches[rng.permutation(len(batches))]


class BatchPlan:
    """The train-set positions of each step's batch: a pure function of (seed, step)."""

    def __init__(self, lengths: np.ndarray, *, seed: int, batch: int) -> None:
        self.lengths, self.seed, self.batch = np.asarray(lengths), seed, batch
        self.steps_per_epoch = len(lengths) // batch
        if self.steps_per_epoch == 0:
            raise ValueError(f"{len(lengths)} training sequences: fewer than one batch ({batch})")
        self._epoch, self._plan = -1, None

    def positions(self, step: int) -> np.ndarray:
        epoch = step // self.steps_per_epoch
        if epoch != self._epoch:
            self._plan = epoch_plan(self.lengths, seed=self.seed, epoch=epoch, batch=self.batch)
            self._epoch = epoch
        return self._plan[step % self.steps_per_epoch]


def make_batch(
    data: SequenceData,
    indices: Sequence[int],
    *,
    max_len: int,
    min_bucket: int,
    rows: slice | None = None,
) -> dict[str, np.ndarray]:
    """Right-padded arrays for `indices` (None = an empty row), length padded to a bucket.

    Returns:
      {"ids": [B, T] int32, "mask": [B, T] f32, "lengths": [B] int32, and offline
      "hidden": [B, T, D] f32}; with `rows`, only those rows (this host's slice).
    """
    lens = [min(int(data.lengths[i]), max_len) if i is not None else 0 for i in indices]
    t = features.bucket_length(max(max(lens), 1), min_bucket=min_bucket, max_len=max_len)
    picked = list(enumerate(indices))[rows or slice(None)]
    b = len(picked)
    out = {
        "ids": np.zeros((b, t), np.int32),
        "mask": np.zeros((b, t), np.float32),
        "lengths": np.zeros((b,), np.int32),
    }
    if data.store is not None:
        out["hidden"] = np.zeros((b, t, data.store.d_model), np.float32)
    for r, (j, i) in enumerate(picked):
        if i is None:
            continue
        ids, mask, hidden = data.row(i)
        n = lens[j]
        out["ids"][r, :n], out["mask"][r, :n], out["lengths"][r] = ids[:n], mask[:n], n
        if hidden is not None:
            out["hidden"][r, :n] = hidden[:n]
    return out


def put_batch(batch: dict[str, np.ndarray], mesh: jax.sharding.Mesh) -> dict[str, jax.Array]:
    """Host rows -> a global batch sharded over `data` (single host: `common.shard_batch`)."""
    if jax.process_count() == 1:
        return common.shard_batch(batch, mesh)
    sharding = common.batch_sharded(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}


# ---------------------------------------------------------------------------------------------
# Steps


def _inputs(frozen, batch, *, base_cfg: ModelConfig, online: bool) -> losses.DraftInputs:
    if online:
        hidden = features.base_features(frozen, batch["ids"], cfg=base_cfg).astype(jnp.float32)
    else:
        hidden = batch["hidden"]
    return losses.draft_inputs(hidden, batch["ids"], batch["mask"], batch["lengths"])


def loss_fn(
    params,
    frozen,
    batch,
    key: jax.Array,
    *,
    base_cfg: ModelConfig,
    dcfg: DraftConfig,
    sc: StepConfig,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The stage objective on one batch (sum over the unrolled passes), and its metrics.

    Args:
      params: draft params (trained).  frozen: base params (at least embed_tokens and lm_head;
        all of them online).  batch: see `make_batch`.  key: the noise key of this step.
    """
    if dcfg.kind == "eagle3":
        return _eagle3_loss(params, frozen, batch, base_cfg=base_cfg, dcfg=dcfg, sc=sc)
    inputs = _inputs(frozen, batch, base_cfg=base_cfg, online=sc.online)
    if sc.noise_std:
        noise = losses.feature_noise(key, inputs.features.shape, inputs.lengths, std=sc.noise_std)
        inputs = dataclasses.replace(inputs, features=inputs.features + noise)
    head = functools.partial(base_model.lm_head, frozen, cfg=base_cfg)
    embedding = frozen["embed_tokens"]["embedding"]
    mode = sc.mask_mode if sc.stage > 1 else "exact"  # stage 1 = cnets_griffin_1: causal masks

    def run_pass(streams):
        return draft_lib.draft_forward_train(
            params,
            embedding,
            inputs.features,
            streams,
            inputs.tokens,
            lengths=inputs.lengths,
            dcfg=dcfg,
            mask_mode=mode,
            dtype=DTYPES[sc.dtype],
        )

    return losses.unrolled_loss(
        run_pass,
        head,
        inputs,
        head(inputs.target),
        num_passes=sc.stage,
        topk_train=sc.topk_train,
        shifted=sc.shifted_mask,
        align_mask=sc.align_mask,
    )


def _eagle3_run(params, frozen, batch, *, base_cfg, dcfg, sc: StepConfig, steps: int):
    """(training-time-test token features [S, B, L, D], the base's logits [B, L, V] (at r:
    predicting x_{r+1}), draft inputs): EAGLE-3 trains online on three base layers."""
    logits, feats = features.base_outputs(
        frozen, batch["ids"], cfg=base_cfg,
        feature_layers=draft_lib.feature_layers(dcfg, base_cfg.n_layers),
    )  # fmt: skip
    inputs = losses.draft_inputs(feats, batch["ids"], batch["mask"], batch["lengths"])
    token_features = draft_lib.eagle3_forward_train(
        params, frozen["embed_tokens"]["embedding"], inputs.features, inputs.tokens,
        lengths=inputs.lengths, steps=steps, dcfg=dcfg, dtype=DTYPES[sc.dtype],
    )  # fmt: skip
    return token_features, logits, inputs


def _eagle3_loss(params, frozen, batch, *, base_cfg, dcfg, sc: StepConfig):
    """EAGLE-3's objective (`losses.ttt_loss`) over `sc.ttt_steps` steps."""
    token_features, logits, inputs = _eagle3_run(
        params, frozen, batch, base_cfg=base_cfg, dcfg=dcfg, sc=sc, steps=sc.ttt_steps
    )
    head = speculative.resolve_head(params, None, dcfg)
    return losses.ttt_loss(  # draft position r predicts x_{r+2}: the base's logits at r + 1
        token_features, head.kernel, head.token_ids, losses.shift_left(logits), inputs.loss_mask
    )


@functools.lru_cache(maxsize=8)
def make_optimizer(opt: common.OptimConfig) -> optax.GradientTransformation:
    """`common.make_optimizer`, one object per config, so the jitted steps (which take it as a
    static argument) are compiled once per process however many runs it makes."""
    return common.make_optimizer(opt)


@functools.partial(
    jax.jit, static_argnames=("tx", "base_cfg", "dcfg", "sc"), donate_argnames=("state",)
)
def train_step(state, frozen, batch, *, tx, base_cfg, dcfg, sc: StepConfig):
    """One optimizer step: (state, frozen base, batch) -> (state, scalar metrics).

    state = {params, opt_state, step, rng (key data)}; the noise key is fold_in(rng, step), so
    the step is a pure function of the state and the batch.
    """
    key = jax.random.fold_in(common.data_to_key(state["rng"]), state["step"])
    trainable, buffers = draft_lib.split_buffers(state["params"])  # EAGLE-3's d2t is fixed

    def objective(p):
        return loss_fn({**p, **buffers}, frozen, batch, key, base_cfg=base_cfg, dcfg=dcfg, sc=sc)

    (loss, metrics), grads = jax.value_and_grad(objective, has_aux=True)(trainable)
    updates, opt_state = tx.update(grads, state["opt_state"], trainable)
    new = {
        "params": {**optax.apply_updates(trainable, updates), **buffers},
        "opt_state": opt_state,
        "step": state["step"] + 1,
        "rng": state["rng"],
    }
    metrics = {k: v for k, v in metrics.items() if not k.startswith("mask")}
    metrics.update(loss=loss, grad_norm=optax.tree.norm(grads))
    return new, metrics


@functools.partial(jax.jit, static_argnames=("base_cfg", "dcfg", "sc"))
def eval_sums(params, frozen, batch, *, base_cfg, dcfg, sc: StepConfig) -> dict[str, jax.Array]:
    """Sums over one eval batch: first-pass top-1/2/3 hits and mask, getkacc hits / totals.

    No noise, exact masks (inference numerics). Pass k+1 of the unrolled forward at position r
    is the draft's k-th free-running step from position r - k (see `losses.chain_acceptance`).
    """
    if dcfg.kind == "eagle3":
        return _eagle3_eval_sums(params, frozen, batch, base_cfg=base_cfg, dcfg=dcfg, sc=sc)
    inputs = _inputs(frozen, batch, base_cfg=base_cfg, online=sc.online)
    head = functools.partial(base_model.lm_head, frozen, cfg=base_cfg)
    embedding = frozen["embed_tokens"]["embedding"]
    target_logits = head(inputs.target)
    target_token = jnp.argmax(target_logits, axis=-1)  # [B, L]
    target_p = jax.nn.softmax(target_logits, axis=-1)
    m0 = inputs.loss_mask
    out: dict[str, jax.Array] = {"mask": jnp.sum(m0)}
    streams, correct = None, []
    for k in range(sc.eval_depth):
        token_feature, next_feature = draft_lib.draft_forward_train(
            params,
            embedding,
            inputs.features,
            streams,
            inputs.tokens,
            lengths=inputs.lengths,
            dcfg=dcfg,
            mask_mode="exact",
            dtype=DTYPES[sc.dtype],
        )
        logits = head(token_feature)
        if k == 0:
            for n in (1, 2, 3):
                out[f"top{n}"] = jnp.sum(m0 * losses.in_topk(logits, target_token, n))
            out["vloss"] = losses.vloss(next_feature, inputs.target, m0) * jnp.sum(m0)
            out["ploss"] = losses.ploss(logits, target_p, m0) * jnp.sum(m0)
        correct.append(jnp.argmax(logits, axis=-1) == target_token)
        if k + 1 < sc.eval_depth:
            new = losses.next_stream(next_feature, inputs.features, streams)[None]
            streams = new if streams is None else jnp.concatenate([streams, new])
    start_ok = (m0 > 0) & (jnp.argmax(head(inputs.features), axis=-1) == inputs.tokens)
    out["acc_hits"], out["acc_totals"] = losses.chain_acceptance(jnp.stack(correct), start_ok)
    return out


def _eagle3_eval_sums(params, frozen, batch, *, base_cfg, dcfg, sc: StepConfig):
    """`eval_sums` for EAGLE-3: step k of the training-time test at row r is the draft's k-th
    free-running step from r (shifted right by k to `chain_acceptance`'s convention); top-n
    and the soft cross-entropy are step 0's over the data mask (a base token outside the draft
    vocabulary is a miss); no feature regression (vloss 0)."""
    token_features, logits_base, inputs = _eagle3_run(
        params, frozen, batch, base_cfg=base_cfg, dcfg=dcfg, sc=sc, steps=sc.eval_depth
    )
    head = speculative.resolve_head(params, None, dcfg)
    m0 = inputs.loss_mask
    out: dict[str, jax.Array] = {"mask": jnp.sum(m0), "vloss": jnp.zeros((), jnp.float32)}
    target, correct = losses.shift_left(logits_base), []
    for k in range(sc.eval_depth):
        if k:
            target = losses.shift_left(target)
        logits = base_model.head_logits(token_features[k], head.kernel)
        base_token = jnp.argmax(target, axis=-1)
        if k == 0:
            _, top = jax.lax.top_k(logits, min(3, logits.shape[-1]))
            top_ids = jnp.take(head.token_ids, top)  # [B, L, 3] target ids
            for n in (1, 2, 3):
                hit = jnp.any(top_ids[..., :n] == base_token[..., None], axis=-1)
                out[f"top{n}"] = jnp.sum(m0 * hit)
            target_p = jax.nn.softmax(jnp.take(target, head.token_ids, axis=-1), axis=-1)
            out["ploss"] = losses.ploss(logits, target_p, m0) * jnp.sum(m0)
        hit = jnp.take(head.token_ids, jnp.argmax(logits, axis=-1)) == base_token
        for _ in range(k):
            hit = losses.shift_right(hit)
        correct.append(hit)
    # The base's own next token at r (its logits there, unshifted) must be the data's x_{r+1}.
    start_ok = (m0 > 0) & (jnp.argmax(logits_base, axis=-1) == inputs.tokens)
    out["acc_hits"], out["acc_totals"] = losses.chain_acceptance(jnp.stack(correct), start_ok)
    return out


def evaluate(eval_fn, params, frozen, batches) -> dict[str, float]:
    """Aggregates `eval_sums` over fixed batches into accuracies and acc@1..depth."""
    total: dict[str, np.ndarray] = {}
    for batch in batches:
        for k, v in eval_fn(params, frozen, batch).items():
            total[k] = total.get(k, 0) + np.asarray(v, np.float64)
    denom = total["mask"] + 1e-5
    rec = {f"eval_{k}": float(total[k] / denom) for k in ("top1", "top2", "top3", "vloss", "ploss")}
    for d, (h, t) in enumerate(zip(total["acc_hits"], total["acc_totals"], strict=True), 1):
        rec[f"eval_acc@{d}"] = float(h / t) if t else 0.0
    return rec


# ---------------------------------------------------------------------------------------------
# Set-up


def draft_config(args: argparse.Namespace, base_cfg: ModelConfig) -> DraftConfig:
    """A new draft's config: the base's sizes unless overridden (the reference's draft configs
    copy the base's hidden size, vocab, heads, norm eps and RoPE)."""
    n_heads = args.draft_heads or base_cfg.n_heads
    n_kv_heads = args.draft_kv_heads or (base_cfg.n_kv_heads if not args.draft_heads else n_heads)
    if base_cfg.d_model % n_heads or (base_cfg.d_model // n_heads) % 2:
        raise InputError(
            f"the base's hidden size {base_cfg.d_model} / {n_heads} draft heads must give an even "
            "whole head dimension (split-half RoPE); pick another --draft-heads"
        )
    if n_heads % n_kv_heads:
        raise InputError(
            f"{n_heads} draft heads are not a multiple of {n_kv_heads} KV heads; pick another "
            "--draft-kv-heads"
        )
    return DraftConfig(
        kind=args.draft_kind,
        vocab_size=base_cfg.vocab_size,
        d_model=base_cfg.d_model,
        d_ff=args.draft_d_ff or base_cfg.d_ff,
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        head_dim=base_cfg.d_model // n_heads,
        rope=base_cfg.rope,
        rms_eps=base_cfg.rms_eps,
        qkv_bias=args.draft_qkv_bias,
        max_position_embeddings=base_cfg.max_position_embeddings,
        draft_vocab_size=_draft_vocab_size(args, base_cfg),
    )


def _draft_vocab_size(args: argparse.Namespace, base_cfg: ModelConfig) -> int:
    """EAGLE-3's `draft_vocab_size` field (0: the whole vocabulary)."""
    n = getattr(args, "draft_vocab_size", None)
    if n is None or n == base_cfg.vocab_size:
        return 0
    if n > base_cfg.vocab_size:
        raise InputError(
            f"--draft-vocab-size {n} exceeds the base vocabulary ({base_cfg.vocab_size})"
        )
    return n


def init_draft(
    args: argparse.Namespace, base_cfg: ModelConfig, base_params, tx
) -> tuple[DraftConfig, Any]:
    """Fresh params, or a warm start (`--init`): a published-layout draft folder
    (`convert.load_draft`) or a previous run's output folder (its latest checkpoint that
    restores). `check_inputs` has vetted the folder."""
    init = args.init
    if init is None:
        dcfg = draft_config(args, base_cfg)
        key = jax.random.fold_in(jax.random.key(args.seed), 1)
        params = draft_lib.init_draft_params(dcfg, key, jnp.float32)
        if dcfg.kind == "eagle3" and dcfg.draft_vocab_size:
            from training.draft_vocab import draft_to_target, read_ranking

            ranking = read_ranking(args.vocab_ranking)
            params["d2t"] = jnp.asarray(draft_to_target(ranking, dcfg.draft_vocab_size))
        return dcfg, params
    if (init / "config.json").exists():
        from convert.load_draft import load_draft

        embedding = np.asarray(base_params["embed_tokens"]["embedding"], np.float32)
        dcfg, params = load_draft(init, base_cfg, dtype="float32", base_embedding=embedding)
        params = jax.tree.map(  # f32 training copies (EAGLE-3's d2t stays int32)
            lambda x: jnp.asarray(x, jnp.float32) if jnp.issubdtype(x.dtype, jnp.floating) else x,
            params,
        )
    else:
        dcfg = _run_draft_config(init)
        params = draft_lib.init_draft_params(dcfg, jax.random.key(0), jnp.float32)
        abstract = common.abstract_state(_fresh_state(params, tx, seed=0), common.data_mesh())
        ckpt = common.Checkpointer(init / "checkpoints")
        try:
            state, _ = ckpt.restore(abstract)
        finally:
            ckpt.close()
        params = state["params"]
    if dcfg.kind != args.draft_kind:
        raise InputError(
            f"--init {init} holds a {dcfg.kind} draft, not {args.draft_kind} (--draft-kind)"
        )
    return dcfg, params


def _run_draft_config(run: pathlib.Path) -> DraftConfig:
    """The draft config a training run wrote (`draft_config.json`)."""
    path = run / "draft_config.json"
    try:
        hf = json.loads(path.read_text())
        return DraftConfig.from_hf(hf, kind=hf.pop("kind"))
    except (ValueError, KeyError, TypeError) as err:
        raise InputError(f"{path}: not a draft config ({err!r})") from err


def _fresh_state(params, tx, *, seed: int) -> dict[str, Any]:
    return {
        "params": params,
        "opt_state": tx.init(draft_lib.split_buffers(params)[0]),
        "step": jnp.zeros((), jnp.int32),
        "rng": common.key_to_data(jax.random.fold_in(jax.random.key(seed), 2)),
    }


def load_data(args: argparse.Namespace, base_cfg: ModelConfig) -> SequenceData:
    """The training sequences (tokenized online, or a feature folder); no model is loaded."""
    if args.online:
        tok = features.load_tokenizer(args.tokenizer or args.base, chat_template=args.chat_template)
        examples, counts = features.load_examples(
            args.corpus, tok, max_len=args.max_len, system=args.system, limit=args.limit
        )
        features.check_positions(examples, base_cfg, flag="--corpus")
        data, source = SequenceData(examples=examples), f"--corpus ({counts})"
    else:
        store = features.FeatureStore(args.features)
        if store.d_model != base_cfg.d_model:
            raise InputError(
                f"--features {args.features} were made by a base of hidden size {store.d_model}, "
                f"--base has {base_cfg.d_model}: pass the base that made them"
            )
        data, source = SequenceData(store=store), f"--features {args.features}"
    if len(data) == 0:
        raise InputError(f"{source} holds no usable training sequence")
    if args.online:
        print(f"online data: {counts}", file=sys.stderr)
    return data


# ---------------------------------------------------------------------------------------------
# Command line

_DTYPE_NAMES = ("f32", "bf16", "f16", "float32", "bfloat16", "float16")
_ONLINE_ONLY = ("corpus", "tokenizer", "chat_template", "system", "limit")
_DRAFT_SHAPE = (
    "draft_d_ff", "draft_heads", "draft_kv_heads", "draft_qkv_bias", "draft_vocab_size",
    "vocab_ranking",
)  # fmt: skip


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = cli.ArgumentParser(
        prog="python -m training.train",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--base", type=pathlib.Path, required=True, help="base model folder (HF)")
    p.add_argument("--base-dtype", default=None, help="base dtype (default: the checkpoint's)")
    data = p.add_argument_group("data")
    data.add_argument("--features", type=pathlib.Path, default=None)
    data.add_argument("--online", action="store_true", help="compute features in the step")
    data.add_argument("--corpus", nargs="*", default=[], help="online inputs (JSONL/JSON/text)")
    data.add_argument("--tokenizer", type=pathlib.Path, default=None)
    data.add_argument("--chat-template", default=None)
    data.add_argument("--system", default=None)
    data.add_argument("--limit", type=int, default=None)
    data.add_argument("--max-len", type=int, default=2048)
    data.add_argument("--min-bucket", type=int, default=64)
    data.add_argument("--eval-frac", type=float, default=0.05)
    draft = p.add_argument_group("draft")
    draft.add_argument("--draft-kind", choices=draft_lib.DRAFT_KINDS, default="griffin")
    draft.add_argument("--stage", type=int, default=1, help="unrolled passes (GRIFFIN stage j)")
    draft.add_argument("--init", type=pathlib.Path, default=None, help="warm start (stage j-1)")
    draft.add_argument("--draft-d-ff", type=int, default=None)
    draft.add_argument("--draft-heads", type=int, default=None)
    draft.add_argument("--draft-kv-heads", type=int, default=None)
    draft.add_argument("--draft-qkv-bias", action="store_true")
    draft.add_argument(
        "--draft-vocab-size", type=int, default=None,
        help="EAGLE-3: its lm_head's vocabulary, the most frequent ids of --vocab-ranking "
        "(default: the whole vocabulary)",
    )  # fmt: skip
    draft.add_argument(
        "--vocab-ranking", type=pathlib.Path, default=None,
        help="EAGLE-3: draft_vocab.safetensors from python -m training.draft_vocab",
    )  # fmt: skip
    draft.add_argument("--ttt-steps", type=int, default=7, help="EAGLE-3: training-time test")
    loss = p.add_argument_group("loss")
    loss.add_argument("--mask-mode", choices=("exact", "leaky_reference"), default="exact")
    loss.add_argument("--topk-train", type=int, default=losses.TOPK_TRAIN)
    loss.add_argument("--shifted-mask", action="store_true", help="inference-consistent offset")
    loss.add_argument(
        "--no-align-mask",
        dest="align_mask",
        action="store_false",
        help="ablation: stages >= 2 train every position (no token-alignment masks)",
    )
    loss.add_argument("--noise-std", type=float, default=losses.NOISE_STD)
    opt = p.add_argument_group("optimization")
    opt.add_argument("--steps", type=int, required=True)
    opt.add_argument("--batch", type=int, default=4, help="global batch (sequences)")
    opt.add_argument("--lr", type=float, default=None, help="default 5e-5 (stage 1), 3e-5")
    opt.add_argument("--warmup", type=int, default=2000)
    opt.add_argument("--schedule-steps", type=int, default=800_000, help="lr reaches 0 here")
    opt.add_argument("--weight-decay", type=float, default=0.01)
    opt.add_argument("--clip-value", type=float, default=0.5)
    opt.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    opt.add_argument("--seed", type=int, default=0)
    run = p.add_argument_group("run")
    run.add_argument("--out", type=pathlib.Path, required=True)
    run.add_argument("--resume", action="store_true")
    run.add_argument("--export", type=pathlib.Path, default=None, help="published-layout draft")
    run.add_argument("--export-dtype", default=None, help="f32 | bf16 | f16 (default: f32)")
    run.add_argument("--eval-every", type=int, default=1000)
    run.add_argument("--eval-batches", type=int, default=10)
    run.add_argument("--eval-depth", type=int, default=5)
    run.add_argument("--ckpt-every", type=int, default=1000)
    run.add_argument("--log-every", type=int, default=10)
    run.add_argument("--devices", type=int, default=None, help="default: all local devices")
    run.add_argument("--stop-at", type=int, default=None, help="checkpoint and stop at this step")
    run.add_argument("--max-minutes", type=float, default=None)
    cli.add_distributed_flags(run)
    args = p.parse_args(argv)
    check_args(args)
    if args.lr is None:
        args.lr = 5e-5 if args.stage == 1 else 3e-5
    return args


def check_args(args: argparse.Namespace) -> None:
    """The flag values on their own (no files): ranges and the flags that go together."""
    for name, minimum in (
        ("limit", 1),
        ("max_len", 2),
        ("min_bucket", 1),
        ("stage", 1),
        ("draft_d_ff", 1),
        ("draft_heads", 1),
        ("draft_kv_heads", 1),
        ("topk_train", 1),
        ("steps", 1),
        ("batch", 1),
        ("warmup", 0),
        ("schedule_steps", 1),
        ("seed", 0),
        ("eval_every", 0),
        ("eval_batches", 1),
        ("eval_depth", 1),
        ("draft_vocab_size", 1),
        ("ttt_steps", 1),
        ("ckpt_every", 1),
        ("log_every", 1),
        ("devices", 1),
        ("stop_at", 1),
    ):
        args_lib.at_least(getattr(args, name), _flag(name), minimum)
    args_lib.number(args.eval_frac, "--eval-frac", minimum=0, below=1)
    args_lib.number(args.noise_std, "--noise-std", minimum=0)
    args_lib.number(args.lr, "--lr", minimum=0)
    args_lib.number(args.weight_decay, "--weight-decay", minimum=0)
    args_lib.number(args.clip_value, "--clip-value", above=0)
    args_lib.number(args.max_minutes, "--max-minutes", above=0)
    for name in ("base_dtype", "export_dtype"):
        value = getattr(args, name)
        if value is not None and value not in _DTYPE_NAMES:
            raise InputError(f"{_flag(name)} {value!r} is not one of {', '.join(_DTYPE_NAMES)}")
    if args.draft_kind == "eagle2" and args.stage != 1:
        raise InputError("EAGLE-2 drafts are trained with the stage-1 loss only (--stage 1)")
    if args.draft_kind == "eagle3":
        if args.stage != 1:
            raise InputError("EAGLE-3 drafts unroll --ttt-steps steps, not stages (--stage 1)")
        if not args.online:
            raise InputError(
                "EAGLE-3 drafts train --online: feature folders hold the final hidden state, "
                "not the three layers EAGLE-3 reads"
            )
    else:
        given = [
            _flag(n) for n in ("draft_vocab_size", "vocab_ranking") if getattr(args, n) is not None
        ]
        if given:
            raise InputError(f"{', '.join(given)} only apply to --draft-kind eagle3")
    if args.draft_vocab_size is not None and args.vocab_ranking is None:
        raise InputError(
            "--draft-vocab-size needs --vocab-ranking (python -m training.draft_vocab)"
        )
    if args.warmup > args.steps:
        raise InputError(
            f"--warmup {args.warmup} exceeds --steps {args.steps}: the learning rate would never "
            "reach --lr; lower --warmup"
        )
    if args.warmup > args.schedule_steps:
        raise InputError(
            f"--warmup {args.warmup} exceeds --schedule-steps {args.schedule_steps} (where the lr "
            "reaches 0); lower --warmup or raise --schedule-steps"
        )
    if args.online and args.features is not None:
        raise InputError("--features and --online exclude each other: pick one data source")
    if args.online and not args.corpus:
        raise InputError("--online needs --corpus FILE... (JSONL/JSON conversations or texts)")
    if not args.online:
        if args.features is None:
            raise InputError(
                "give --features DIR (from python -m training.features) or --online --corpus "
                "FILE..."
            )
        given = [_flag(n) for n in _ONLINE_ONLY if getattr(args, n) not in (None, [])]
        if given:
            raise InputError(f"{', '.join(given)} only apply with --online (they tokenize text)")
    if args.init is not None:
        given = [_flag(n) for n in _DRAFT_SHAPE if getattr(args, n) not in (None, False)]
        if given:
            raise InputError(f"{', '.join(given)} cannot change the draft --init {args.init} holds")
    if args.eval_every and args.eval_frac == 0:
        raise InputError(
            "--eval-every needs held-out sequences: --eval-frac > 0 (or --eval-every 0)"
        )


def check_inputs(args: argparse.Namespace) -> ModelConfig:
    """Checks every path and the run folder against the flags, before any model is loaded and
    before anything is written; returns the base's config (read from its config.json)."""
    from convert.load_hf import load_hf_config

    args_lib.folder(args.base, "--base", needs=("config.json",), hint="a HF model folder")
    base_cfg = load_hf_config(args.base)
    if args.online:
        for path in args.corpus:
            cli.input_file(pathlib.Path(path), "--corpus")
        args_lib.folder(args.tokenizer or args.base, "--tokenizer" if args.tokenizer else "--base")
        if args.chat_template is not None:
            cli.input_file(pathlib.Path(args.chat_template), "--chat-template")
    else:
        made_by = "written by python -m training.features"
        args_lib.folder(args.features, "--features", needs=(features.MANIFEST,), hint=made_by)
    planned = None if args.init is not None else draft_config(args, base_cfg)
    if args.vocab_ranking is not None:
        cli.input_file(args.vocab_ranking, "--vocab-ranking")
        from training.draft_vocab import read_ranking

        if len(read_ranking(args.vocab_ranking)) != base_cfg.vocab_size:
            raise InputError(
                f"--vocab-ranking {args.vocab_ranking} ranks a vocabulary other than the base's "
                f"({base_cfg.vocab_size} ids)"
            )
    if args.init is not None:
        args_lib.folder(args.init, "--init")
        if not (args.init / "config.json").is_file():
            if not (args.init / "draft_config.json").is_file():
                raise InputError(
                    f"--init {args.init} is neither a draft folder (config.json) nor a training "
                    "run (draft_config.json and checkpoints/)"
                )
            if not common.saved_steps(args.init / "checkpoints"):
                raise InputError(
                    f"--init {args.init}: no checkpoint in {args.init / 'checkpoints'}"
                )
            planned = _run_draft_config(args.init)
            if planned.kind != args.draft_kind:
                raise InputError(
                    f"--init {args.init} holds a {planned.kind} draft, not {args.draft_kind} "
                    "(--draft-kind)"
                )
    args_lib.out_folder(args.out)
    ckpt_dir = args.out / "checkpoints"
    steps = common.saved_steps(ckpt_dir)
    if args.resume and not steps:
        raise InputError(f"--resume: no checkpoint in {ckpt_dir} (start without --resume)")
    if steps and not args.resume:
        raise InputError(
            f"--out {args.out} already holds checkpoints (up to step {steps[-1]}): pass --resume "
            "to continue that run, or another --out"
        )
    saved = args.out / "draft_config.json"
    if args.resume and planned is not None and saved.is_file():
        if _run_draft_config(args.out) != planned:
            raise InputError(
                f"--resume: {saved} differs from the draft these flags build; pass the draft "
                "flags (--draft-kind, --draft-*, --init) of that run"
            )
    if planned is not None and planned.kind == "eagle3":
        try:
            draft_lib.feature_layers(planned, base_cfg.n_layers)
        except ValueError as err:
            raise InputError(f"--base {args.base}: {err}") from None
    if args.export is not None:
        args_lib.out_folder(args.export, "--export")
    available = jax.device_count()
    if args.devices is not None and args.devices > available:
        raise InputError(f"--devices {args.devices}: only {available} devices are visible")
    devices = args.devices or available
    if args.batch % devices:
        raise InputError(f"--batch {args.batch} must be a multiple of the {devices} devices")
    return base_cfg


def train(args: argparse.Namespace) -> dict[str, Any]:
    """Runs (or resumes) training; returns the final state's params and the last metrics.

    Every input is checked (`check_args` in `parse_args`, `check_inputs`, the data) before the
    base is loaded and before anything is written.
    """
    from convert.load_hf import load_hf

    cli.start_distributed(args)
    base_cfg = check_inputs(args)
    data = load_data(args, base_cfg)
    train_idx, eval_idx = split(len(data), args.eval_frac)
    if len(train_idx) < args.batch:
        raise InputError(
            f"{len(train_idx)} training sequences (after --eval-frac {args.eval_frac}) are fewer "
            f"than one --batch {args.batch}: lower --batch or add data"
        )
    plan = BatchPlan(data.lengths[train_idx], seed=args.seed, batch=args.batch)
    base_cfg, base_params = load_hf(args.base, args.base_dtype)
    if args.online:
        frozen = base_params
    else:  # the embedding and lm_head are all the step needs; f32 as the reference's head
        frozen = {k: base_params[k] for k in ("embed_tokens", "lm_head") if k in base_params}
        frozen = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), frozen)

    opt = common.OptimConfig(
        lr=args.lr,
        warmup_steps=args.warmup,
        total_steps=max(args.schedule_steps, args.warmup + 1),
        weight_decay=args.weight_decay,
        clip_value=args.clip_value,
    )
    tx = make_optimizer(opt)
    schedule = common.make_schedule(opt)
    dcfg, params = init_draft(args, base_cfg, base_params, tx)
    if args.stage > 1 and args.init is None and not args.resume:
        print(
            f"stage {args.stage} without --init: random start (the reference warm-starts "
            f"from stage {args.stage - 1})",
            file=sys.stderr,
        )
    sc = StepConfig(
        stage=args.stage,
        mask_mode=args.mask_mode,
        topk_train=args.topk_train,
        shifted_mask=args.shifted_mask,
        align_mask=args.align_mask,
        noise_std=args.noise_std,
        online=args.online,
        dtype=args.dtype,
        eval_depth=args.eval_depth,
        ttt_steps=args.ttt_steps,
    )
    state = _fresh_state(params, tx, seed=args.seed)
    out: pathlib.Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    ckpt = common.Checkpointer(out / "checkpoints")
    start = 0
    metrics_path = out / "metrics.jsonl"
    mesh = common.data_mesh(args.devices)
    if args.resume:
        try:
            state, meta = ckpt.restore(common.abstract_state(state, mesh))
            if meta["seed"] != args.seed or meta["stage"] != args.stage:
                raise InputError(
                    f"--resume: the checkpoint was trained with --seed {meta['seed']} --stage "
                    f"{meta['stage']}; pass the same"
                )
            start = int(meta["data_position"])
            if min(args.steps, args.stop_at or args.steps) < start:
                raise InputError(
                    f"--resume: the checkpoint is at step {start}, past --steps / --stop-at; "
                    "raise them"
                )
        except BaseException:  # stop orbax's threads before the error reaches the CLI
            ckpt.close()
            raise
        print(f"resumed at step {start}", file=sys.stderr)
    if common.is_lead():
        (out / "draft_config.json").write_text(
            json.dumps({"kind": dcfg.kind, **dcfg.to_hf()}, indent=2)
        )
    common.trim_metrics(metrics_path, start)

    state = jax.device_put(state, common.replicated(mesh))
    frozen = jax.device_put(frozen, common.replicated(mesh))
    step_fn = functools.partial(train_step, tx=tx, base_cfg=base_cfg, dcfg=dcfg, sc=sc)
    eval_fn = functools.partial(eval_sums, base_cfg=base_cfg, dcfg=dcfg, sc=sc)
    host_rows = common.host_batch_slice(args.batch) if jax.process_count() > 1 else None
    eval_batches = []
    for i in range(0, min(len(eval_idx), args.eval_batches * args.batch), args.batch):
        idx = list(eval_idx[i : i + args.batch])
        idx += [None] * (args.batch - len(idx))
        b = make_batch(data, idx, max_len=args.max_len, min_bucket=args.min_bucket, rows=host_rows)
        eval_batches.append(put_batch(b, mesh))

    meta = {"seed": args.seed, "stage": args.stage, "kind": dcfg.kind}
    log = common.MetricsLog(metrics_path, total=args.steps, initial=start, desc="train")
    last = args.steps if args.stop_at is None else min(args.stop_at, args.steps)
    t0 = t_log = time.time()
    tokens_since_log = 0
    rec: dict[str, Any] = {}
    for step in range(start, last):
        pos = plan.positions(step)
        host = make_batch(
            data,
            [int(i) for i in train_idx[pos]],
            max_len=args.max_len,
            min_bucket=args.min_bucket,
            rows=host_rows,
        )
        state, metrics = step_fn(state, frozen, put_batch(host, mesh))
        tokens_since_log += int(host["lengths"].sum())
        done = step + 1
        evaluating = args.eval_every and (done % args.eval_every == 0 or done == last)
        if done % args.log_every == 0 or done == last or evaluating:
            rec = {k: float(v) for k, v in jax.device_get(metrics).items()}  # waits for the step
            now = time.time()
            rec.update(
                step=done,
                lr=float(schedule(step)),
                tokens_per_s=tokens_since_log * jax.process_count() / (now - t_log),
            )
            tokens_since_log, t_log = 0, now
            if evaluating and eval_batches:
                rec.update(evaluate(eval_fn, state["params"], frozen, eval_batches))
                t_log = time.time()  # evaluation time is not training throughput
            log.log(rec, advance=0, show=("loss", "top1_1", "eval_acc@1", "tokens_per_s"))
        log.bar.update(1)
        out_of_time = args.max_minutes is not None and time.time() - t0 > 60 * args.max_minutes
        if done % args.ckpt_every == 0 or done == last or out_of_time:
            ckpt.save(done, state, {**meta, "step": done, "data_position": done})
        if out_of_time:
            print(f"stopping at step {done} (time budget); --resume continues", file=sys.stderr)
            break
    log.close()
    ckpt.close()
    finished = int(state["step"]) == args.steps
    if finished and args.export is not None and common.is_lead():
        from convert.export_draft import export_draft

        export_draft(
            jax.device_get(state["params"]),
            np.asarray(base_params["embed_tokens"]["embedding"]),
            dcfg,
            args.export,
            dtype=args.export_dtype,
            base_cfg=base_cfg,
        )
        print(f"exported the draft to {args.export}", file=sys.stderr)
    return {"params": state["params"], "step": int(state["step"]), "metrics": rec, "dcfg": dcfg}


PLOT_KEYS = ("loss", "top1_1", "eval_top1", "eval_acc@1", "eval_acc@3")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["plot"]:
        p = cli.ArgumentParser(prog="python -m training.train plot")
        p.add_argument("--metrics", type=pathlib.Path, required=True)
        p.add_argument("--out", type=pathlib.Path, required=True, help="a .png file")
        p.add_argument("--keys", nargs="+", default=list(PLOT_KEYS))
        a = p.parse_args(argv[1:])
        cli.input_file(a.metrics, "--metrics")
        cli.output_file(a.out, "--out")
        common.plot_metrics(a.metrics, a.out, keys=a.keys, title=str(a.metrics.parent.name))
        return 0
    train(parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
