"""Pretrains the project's small Llama-architecture base model from scratch.

`python -m training.pretrain --tokens runs/corpus --out runs/pretrain ...` trains with next-token
cross-entropy on random windows of the tokenized corpus (`train_ids.npy`, written by
`training.tokenizer`), evaluates held-out loss (`heldout_ids.npy`, files never seen in training),
checkpoints with orbax and resumes with `--resume`. `--export DIR` writes the final params in HF
layout (config.json + bf16 model.safetensors) for `convert.load_hf` and transformers.

Batches are a pure function of (seed, step), so a resumed run sees exactly the batches an
uninterrupted run would.
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

from griffin_jax import model as base_model
from griffin_jax.config import ModelConfig, RopeConfig
from griffin_jax.kv_cache import causal_mask
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
        return new, {"loss": loss, "grad_norm": optax.global_norm(grads)}

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
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
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
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    train_ids = np.load(args.tokens / "train_ids.npy", mmap_mode="r")
    heldout_ids = np.load(args.tokens / "heldout_ids.npy", mmap_mode="r")
    tok_cfg = json.loads((args.tokenizer / "tokenizer.json").read_text())
    vocab = tok_cfg["model"]["vocab"]
    specials = {t["content"]: t["id"] for t in tok_cfg.get("added_tokens", [])}
    vocab_size = max(len(vocab), max(specials.values(), default=0) + 1)
    vocab_size = -(-vocab_size // 64) * 64  # pad the vocab to a multiple of 64
    cfg = model_config(args, vocab_size, bos=specials.get("<s>", 0), eos=specials.get("</s>", 1))
    (args.out / "config.json").write_text(json.dumps(cfg.to_hf(), indent=2))
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
    ckpt = common.Checkpointer(args.out / "checkpoints")
    start = 0
    if args.resume or args.export_only:
        if ckpt.latest_step() is not None:
            state, meta = ckpt.restore(jax.tree.map(_abstract, state))
            start = int(meta["step"])
            print(f"resumed at step {start}", file=sys.stderr)
        elif args.export_only:
            raise SystemExit("no checkpoint to export")
    if args.export_only:
        export(state["params"], cfg, args.export, args.tokenizer)
        return 0

    mesh = common.data_mesh()
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
    common.plot_metrics(
        args.out / "metrics.jsonl",
        args.out / "loss.png",
        keys=("loss", "heldout_loss"),
        title="base pretraining",
    )
    if args.export is not None and int(state["step"]) == args.steps:
        export(state["params"], cfg, args.export, args.tokenizer)
    return 0


def _abstract(x):
    return jax.ShapeDtypeStruct(x.shape, x.dtype)


if __name__ == "__main__":
    sys.exit(main())
