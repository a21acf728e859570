"""Pretrains the project's small Llama-architecture base model from scratch.

`python -m training.pretrain --tokens runs/corpus --out runs/pretrain ...` trains with next-token
cross-entropy on random windows of the tokenized corpus (`train_ids.npy`, written by
`training.tokenizer`), evaluates held-out loss (`heldout_ids.npy`, files never seen in training),
checkpoints with orbax and resumes with `--resume`. `--export DIR` writes the final params in HF
layout (config.json + bf16 model.safetensors) for `convert.load_hf` and transformers.

Batches are a pure function of (seed, step), so a resumed run sees exactly the batches an
uninterrupted run would. `--resume` starts from the newest checkpoint that restores (see
`common.Checkpointer`). Flags, token files and the run folder are checked before the model is
built; bad input is one `error:` line, exit status 2 (`griffin_jax.cli`).
"""

from __future__ import annotations

import argparse
import functools
import json
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from griffin_jax import cli
from griffin_jax import model as base_model
from griffin_jax.checks import InputError
from griffin_jax.config import ModelConfig, RopeConfig
from griffin_jax.kv_cache import causal_mask
from training import args as args_lib
from training import common


def model_config(args: argparse.Namespace, vocab_size: int, *, bos: int, eos: int) -> ModelConfig:
    return ModelConfig(
        family="llama",
        vocab_size=vocab_size,
        d_model=args.d_model,
        n_layers=args.n_layers,
        n_heads=args.n_heads,
        n_kv_heads=args.n_kv_heads,
        head_dim=args.d_model // args.n_heads,
        d_ff=args.d_ff,
        rope=RopeConfig(theta=10_000.0),
        rms_eps=1e-5,
        max_position_embeddings=args.max_position,
        eos_token_ids=(eos,),
        bos_token_id=bos,
    )


def sample_batch(ids: np.ndarray, *, seed: int, step: int, batch: int, seq_len: int) -> np.ndarray:
    """`batch` random windows of seq_len + 1 tokens; a pure function of (seed, step)."""
    rng = np.random.default_rng([seed, step])
    starts = rng.integers(0, len(ids) - seq_len - 1, size=batch)
    return np.stack([ids[s : s + seq_len + 1] for s in starts]).astype(np.int32)


def lm_loss(params, window: jax.Array, *, cfg: ModelConfig, remat: bool) -> jax.Array:
    """Mean next-token cross-entropy over a [B, T+1] window (no cache: a T-slot buffer)."""
    tokens, targets = window[:, :-1], window[:, 1:]
    b, t = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    kv = jnp.zeros((cfg.n_layers, b, t, cfg.n_kv_heads, cfg.head_dim), jnp.float32)
    zero = jnp.zeros((b,), jnp.int32)
    logits, _, _, _ = base_model.Transformer(cfg, jnp.float32, remat=remat).apply(
        {"params": params}, tokens, positions, kv, kv, zero, causal_mask(zero, t, t)
    )
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()


def make_train_step(cfg: ModelConfig, tx: optax.GradientTransformation, *, remat: bool):
    @functools.partial(jax.jit, donate_argnames=("state",))
    def train_step(state, window):
        loss, grads = jax.value_and_grad(lm_loss)(state["params"], window, cfg=cfg, remat=remat)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        new = {"params": params, "opt_state": opt_state, "step": state["step"] + 1}
        return new, {"loss": loss, "grad_norm": optax.tree.norm(grads)}

    return train_step


def evaluate(params, windows: np.ndarray, *, cfg: ModelConfig, batch: int) -> float:
    """Mean held-out next-token loss over fixed windows."""
    loss_fn = jax.jit(functools.partial(lm_loss, cfg=cfg, remat=False))
    losses = [float(loss_fn(params, windows[i : i + batch])) for i in range(0, len(windows), batch)]
    return float(np.mean(losses))


def heldout_windows(ids: np.ndarray, *, seq_len: int, count: int) -> np.ndarray:
    stride = max((len(ids) - seq_len - 1) // count, 1)
    starts = [i * stride for i in range(count) if i * stride + seq_len + 1 <= len(ids)]
    return np.stack([ids[s : s + seq_len + 1] for s in starts]).astype(np.int32)


def export(params, cfg: ModelConfig, out_dir: pathlib.Path, tokenizer_dir: pathlib.Path | None):
    """HF layout (bf16 safetensors) + tokenizer files, loadable by transformers and convert/."""
    from convert.export_hf import export_hf

    out_dir.mkdir(parents=True, exist_ok=True)
    export_hf(params, cfg, out_dir, dtype="bfloat16")
    if tokenizer_dir is not None and tokenizer_dir.resolve() != out_dir.resolve():
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            src = tokenizer_dir / name
            if src.exists():
                (out_dir / name).write_bytes(src.read_bytes())


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = cli.ArgumentParser(
        prog="python -m training.pretrain",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--tokens",
        type=pathlib.Path,
        default=pathlib.Path("runs/corpus"),
        help="folder with train_ids.npy and heldout_ids.npy",
    )
    p.add_argument(
        "--tokenizer", type=pathlib.Path, default=pathlib.Path("inference/default_model/base")
    )
    p.add_argument("--out", type=pathlib.Path, default=pathlib.Path("runs/pretrain"))
    p.add_argument(
        "--export",
        type=pathlib.Path,
        default=None,
        help="write the final model in HF layout here (e.g. inference/default_model/base)",
    )
    p.add_argument(
        "--export-only", action="store_true", help="export the latest checkpoint and exit"
    )
    p.add_argument("--resume", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--n-layers", type=int, default=12)
    p.add_argument("--n-heads", type=int, default=8)
    p.add_argument("--n-kv-heads", type=int, default=2)
    p.add_argument("--d-ff", type=int, default=704)
    p.add_argument("--max-position", type=int, default=2048)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--remat", action="store_true")
    p.add_argument("--eval-every", type=int, default=200)
    p.add_argument("--eval-windows", type=int, default=64)
    p.add_argument("--ckpt-every", type=int, default=100)
    p.add_argument(
        "--max-minutes",
        type=float,
        default=None,
        help="stop (checkpointed) after this much wall time; --resume continues",
    )
    cli.add_distributed_flags(p)
    args = p.parse_args(argv)
    check_args(args)
    return args


def check_args(args: argparse.Namespace) -> None:
    """The flag values on their own (no files): ranges, shapes that fit, flags that pair."""
    for flag, minimum in (
        ("seed", 0),
        ("d_model", 1),
        ("n_layers", 1),
        ("n_heads", 1),
        ("n_kv_heads", 1),
        ("d_ff", 1),
        ("max_position", 1),
        ("seq_len", 1),
        ("batch", 1),
        ("steps", 1),
        ("warmup", 0),
        ("eval_every", 1),
        ("eval_windows", 1),
        ("ckpt_every", 1),
    ):
        args_lib.at_least(getattr(args, flag), "--" + flag.replace("_", "-"), minimum)
    args_lib.number(args.lr, "--lr", above=0)
    args_lib.number(args.weight_decay, "--weight-decay", minimum=0)
    args_lib.number(args.max_minutes, "--max-minutes", above=0)
    if args.d_model % args.n_heads or (args.d_model // args.n_heads) % 2:
        raise InputError(
            f"--d-model {args.d_model} / --n-heads {args.n_heads} must give an even whole head "
            "dimension (split-half RoPE)"
        )
    if args.n_heads % args.n_kv_heads:
        raise InputError(
            f"--n-heads {args.n_heads} must be a multiple of --n-kv-heads {args.n_kv_heads}"
        )
    if args.seq_len > args.max_position:
        raise InputError(
            f"--seq-len {args.seq_len} exceeds --max-position {args.max_position}: raise "
            "--max-position or lower --seq-len"
        )
    if args.warmup > args.steps:
        raise InputError(
            f"--warmup {args.warmup} exceeds --steps {args.steps}: the learning rate would never "
            "reach --lr; lower --warmup"
        )
    if args.export_only and args.export is None:
        raise InputError("--export-only needs --export DIR (where to write the model)")


def _token_stream(path: pathlib.Path, *, vocab_size: int, need: int, seq_len: int) -> np.ndarray:
    """A 1-D integer id array (memory-mapped) with at least `need` ids, all in the vocabulary."""
    try:
        ids = np.load(path, mmap_mode="r")
    except ValueError as err:
        raise InputError(f"{path} is not a .npy token array ({err})") from err
    if ids.ndim != 1 or ids.dtype.kind not in "iu":
        raise InputError(f"{path} must hold a 1-D integer id array, got {ids.dtype} {ids.shape}")
    if len(ids) < need:
        raise InputError(
            f"{path} holds {len(ids)} tokens: --seq-len {seq_len} needs at least {need}; "
            "lower --seq-len or add text to the corpus"
        )
    if ids.max() >= vocab_size:
        raise InputError(
            f"{path} holds token id {int(ids.max())}, outside the tokenizer's {vocab_size} ids "
            "(retokenize with this --tokenizer)"
        )
    return ids


def load_inputs(args: argparse.Namespace) -> tuple[np.ndarray, np.ndarray, ModelConfig]:
    """Checks every path, the token streams and the checkpoints against the flags, and builds
    the model config; loads no model and writes nothing.

    Returns:
      (train ids, held-out ids, the model config).
    """
    made_by = "written by python -m training.tokenizer --write-ids"
    args_lib.folder(
        args.tokens, "--tokens", needs=("train_ids.npy", "heldout_ids.npy"), hint=made_by
    )
    made_by = "written by python -m training.tokenizer"
    args_lib.folder(args.tokenizer, "--tokenizer", needs=("tokenizer.json",), hint=made_by)
    args_lib.out_folder(args.out)
    if args.export is not None:
        args_lib.out_folder(args.export, "--export")
    try:
        tok_cfg = json.loads((args.tokenizer / "tokenizer.json").read_text())
        vocab = tok_cfg["model"]["vocab"]
        specials = {t["content"]: t["id"] for t in tok_cfg.get("added_tokens", [])}
    except (ValueError, KeyError, TypeError) as err:
        raise InputError(f"{args.tokenizer / 'tokenizer.json'}: not a tokenizer ({err!r})") from err
    vocab_size = max(len(vocab), max(specials.values(), default=0) + 1)
    vocab_size = -(-vocab_size // 64) * 64  # pad the vocab to a multiple of 64
    cfg = model_config(args, vocab_size, bos=specials.get("<s>", 0), eos=specials.get("</s>", 1))
    train_ids, heldout_ids = (
        _token_stream(
            args.tokens / f"{split}_ids.npy", vocab_size=vocab_size, need=need, seq_len=args.seq_len
        )
        for split, need in (("train", args.seq_len + 2), ("heldout", args.seq_len + 1))
    )
    ckpt_dir = args.out / "checkpoints"
    steps = common.saved_steps(ckpt_dir)
    flag = "--export-only" if args.export_only else "--resume"
    if (args.resume or args.export_only) and not steps:
        raise InputError(f"{flag}: no checkpoint in {ckpt_dir} (start a new run without {flag})")
    if steps and not (args.resume or args.export_only):
        raise InputError(
            f"--out {args.out} already holds checkpoints (up to step {steps[-1]}): pass --resume "
            "to continue that run, or another --out"
        )
    saved = args.out / "config.json"
    if steps and saved.is_file() and _read_config(saved) != cfg.to_hf():
        raise InputError(
            f"{flag}: {saved} differs from the model these flags build; pass the model flags "
            "(--d-model, --n-layers, ...) and --tokenizer of that run"
        )
    if args.batch % jax.device_count():
        raise InputError(
            f"--batch {args.batch} must be a multiple of the {jax.device_count()} devices"
        )
    return train_ids, heldout_ids, cfg


def _read_config(path: pathlib.Path) -> dict:
    try:
        return json.loads(path.read_text())
    except ValueError as err:
        raise InputError(f"{path}: invalid JSON ({err})") from err


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cli.start_distributed(args)
    train_ids, heldout_ids, cfg = load_inputs(args)
    print(f"model: {cfg}", file=sys.stderr)

    opt = common.OptimConfig(
        lr=args.lr,
        warmup_steps=args.warmup,
        total_steps=args.steps,
        end_lr_frac=0.1,
        schedule="cosine",
        weight_decay=args.weight_decay,
        clip_value=None,
        clip_norm=1.0,
    )
    tx = common.make_optimizer(opt)
    params = base_model.init_params(cfg, jax.random.key(args.seed))
    n_params = sum(x.size for x in jax.tree.leaves(params))
    print(
        f"parameters: {n_params / 1e6:.2f}M; train tokens available: {len(train_ids):,}",
        file=sys.stderr,
    )
    state = {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32)}
    args.out.mkdir(parents=True, exist_ok=True)
    ckpt = common.Checkpointer(args.out / "checkpoints")
    start = 0
    mesh = common.data_mesh()
    if args.resume or args.export_only:
        try:
            state, meta = ckpt.restore(common.abstract_state(state, mesh))
            start = int(meta["step"])
            if meta.get("seed", args.seed) != args.seed:
                raise InputError(
                    f"--resume: the checkpoint was trained with --seed {meta['seed']}; pass it"
                )
            if start > args.steps and not args.export_only:
                raise InputError(
                    f"--steps {args.steps} is below the checkpoint's step {start}: raise --steps"
                )
        except BaseException:  # stop orbax's threads before the error reaches the CLI
            ckpt.close()
            raise
        print(f"resumed at step {start}", file=sys.stderr)
    if args.export_only:
        ckpt.close()
        if common.is_lead():
            export(state["params"], cfg, args.export, args.tokenizer)
        return 0
    if common.is_lead():
        (args.out / "config.json").write_text(json.dumps(cfg.to_hf(), indent=2))
    common.trim_metrics(args.out / "metrics.jsonl", start)

    state = jax.device_put(state, common.replicated(mesh))
    train_step = make_train_step(cfg, tx, remat=args.remat)
    windows = heldout_windows(heldout_ids, seq_len=args.seq_len, count=args.eval_windows)
    log = common.MetricsLog(
        args.out / "metrics.jsonl", total=args.steps, initial=start, desc="pretrain"
    )
    t0 = time.time()
    tokens_per_step = args.batch * args.seq_len
    step = start
    for step in range(start, args.steps):
        window = sample_batch(
            train_ids, seed=args.seed, step=step, batch=args.batch, seq_len=args.seq_len
        )
        ts = time.time()
        state, metrics = train_step(state, common.shard_batch(window, mesh))
        loss = float(metrics["loss"])
        rec = {
            "step": step + 1,
            "loss": loss,
            "grad_norm": metrics["grad_norm"],
            "lr": float(common.make_schedule(opt)(step)),
            "tokens_per_s": tokens_per_step / (time.time() - ts),
        }
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            rec["heldout_loss"] = evaluate(state["params"], windows, cfg=cfg, batch=args.batch)
            rec["heldout_ppl"] = float(np.exp(rec["heldout_loss"]))
        log.log(rec, advance=1, show=("loss", "heldout_loss", "tokens_per_s"))
        out_of_time = args.max_minutes is not None and time.time() - t0 > 60 * args.max_minutes
        if (step + 1) % args.ckpt_every == 0 or step + 1 == args.steps or out_of_time:
            ckpt.save(step + 1, state, {"step": step + 1, "seed": args.seed})
        if out_of_time:
            print(f"stopping at step {step + 1} (time budget); --resume continues", file=sys.stderr)
            break
    log.close()
    ckpt.close()
    if not common.is_lead():  # with --distributed, process 0 writes the plot and the export
        return 0
    common.plot_metrics(
        args.out / "metrics.jsonl",
        args.out / "loss.png",
        keys=("loss", "heldout_loss"),
        title="base pretraining",
    )
    if args.export is not None and int(state["step"]) == args.steps:
        export(state["params"], cfg, args.export, args.tokenizer)
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
