"""`python -m inference.memory_plan`: per-device memory of Llama-3-70B and Mixtral-8x7B + GRIFFIN.

    python -m inference.memory_plan                       # batch 1, context 4096, bf16
    python -m inference.memory_plan --batch 8 --context 8192 --markdown

No weights and no devices: the parameter and cache trees come from `jax.eval_shape` on the real
configs (written inline below from the published HF `config.json`s, and the GRIFFIN draft
configs of spec 2.6), and each leaf's per-device share comes from the same sharding rules the
engine uses (`griffin_jax.sharding`, on an `AbstractMesh` of `data=1,model=n`). Rows:

- params: the base model per device;
- KV cache: the base cache [L, B, S, K, H] (k and v) with S = the engine's capacity for
  `--context` tokens (the context plus the tree's M + A slots, rounded up to 128);
- draft: the GRIFFIN draft's params (its embedding and lm_head are the base's) plus its cache;
- fits: the total within `--device-gb` GiB less `--headroom` (default 80 GiB less 10%, left for
  activations, the verify logits [B, M, V] f32 and XLA's workspace, which are not counted).
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from griffin_jax import cli, sharding
from griffin_jax.config import ModelConfig, TreeConfig
from griffin_jax.draft import DraftConfig, abstract_draft_params, init_draft_cache
from griffin_jax.kv_cache import init_cache
from griffin_jax.model import abstract_params

GIB = 1 << 30

# Published HF configs (meta-llama/Meta-Llama-3-70B-Instruct, mistralai/Mixtral-8x7B-v0.1).
LLAMA3_70B = {
    "model_type": "llama",
    "hidden_size": 8192,
    "intermediate_size": 28672,
    "num_hidden_layers": 80,
    "num_attention_heads": 64,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "max_position_embeddings": 8192,
    "tie_word_embeddings": False,
    "hidden_act": "silu",
    "bos_token_id": 128000,
    "eos_token_id": [128001, 128009],
}
MIXTRAL_8X7B = {
    "model_type": "mixtral",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "num_local_experts": 8,
    "num_experts_per_tok": 2,
    "vocab_size": 32000,
    "rms_norm_eps": 1e-5,
    "rope_theta": 1e6,
    "max_position_embeddings": 32768,
    "tie_word_embeddings": False,
    "hidden_act": "silu",
    "bos_token_id": 1,
    "eos_token_id": 2,
}
# GRIFFIN drafts (spec 2.6): one Llama layer at the base's width.
LLAMA3_70B_DRAFT = {
    "hidden_size": 8192,
    "intermediate_size": 28672,
    "num_attention_heads": 64,
    "num_key_value_heads": 8,
    "num_hidden_layers": 1,
    "vocab_size": 128256,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "max_position_embeddings": 8192,
}
MIXTRAL_8X7B_DRAFT = {
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "num_hidden_layers": 1,
    "vocab_size": 32000,
    "rms_norm_eps": 1e-5,
    "rope_theta": 1e6,
    "max_position_embeddings": 32768,
}
MODELS = {
    "Llama-3-70B": (LLAMA3_70B, LLAMA3_70B_DRAFT),
    "Mixtral-8x7B": (MIXTRAL_8X7B, MIXTRAL_8X7B_DRAFT),
}
DTYPES = {"bf16": jnp.bfloat16, "f16": jnp.float16, "f32": jnp.float32}


def cache_capacity(context: int, tree: TreeConfig) -> int:
    """Base cache slots for `context` tokens: plus the tree's M + A slots, rounded to 128."""
    return -(-(context + tree.total_tokens + tree.path_len) // 128) * 128


def _kv_bytes(cache: Any, mesh: Any) -> int:
    return sum(
        sharding.shard_nbytes(a.shape, a.dtype, sharding.kv_spec(a.shape, mesh), mesh)
        for a in (cache.k, cache.v)
    )


def plan(
    name: str,
    *,
    devices: int,
    batch: int,
    context: int,
    dtype: Any,
    tree: TreeConfig | None = None,
) -> dict[str, Any]:
    """Per-device bytes of one model on a `data=1,model=devices` mesh (default tree: 60 nodes)."""
    tree = tree or TreeConfig()
    base_hf, draft_hf = MODELS[name]
    cfg = ModelConfig.from_hf(base_hf)
    dcfg = DraftConfig.from_hf(draft_hf, kind="griffin")
    mesh = sharding.abstract_mesh({"data": 1, "model": devices})
    capacity = cache_capacity(context, tree)
    draft_capacity = capacity + tree.path_len + tree.top_k * (tree.depth + 1)
    base_params = abstract_params(cfg, dtype)
    draft_params = abstract_draft_params(dcfg, dtype)
    cache = jax.eval_shape(lambda: init_cache(cfg, batch, capacity, dtype))
    dcache = jax.eval_shape(lambda: init_draft_cache(dcfg, batch, draft_capacity, dtype))
    fallbacks = [
        f"{path}: {'; '.join(notes)}"
        for tree_, head_dim in ((base_params, cfg.head_dim), (draft_params, dcfg.head_dim))
        for path, (_, notes) in sharding.plan_params(tree_, mesh, head_dim=head_dim).items()
        if notes
    ]
    row = {
        "model": name,
        "devices": devices,
        "n_params": sum(x.size for x in jax.tree.leaves(base_params)),
        "n_draft_params": sum(x.size for x in jax.tree.leaves(draft_params)),
        "params": sharding.per_device_nbytes(base_params, mesh, head_dim=cfg.head_dim),
        "kv_cache": _kv_bytes(cache, mesh),
        "draft": sharding.per_device_nbytes(draft_params, mesh, head_dim=dcfg.head_dim)
        + _kv_bytes(dcache, mesh),
        "fallbacks": fallbacks,
    }
    row["total"] = row["params"] + row["kv_cache"] + row["draft"]
    return row


def markdown(rows: Sequence[dict[str, Any]], *, budget: float, device_gb: float) -> str:
    lines = [
        f"| model | mesh | params / device | KV cache / device | GRIFFIN draft / device | "
        f"total / device | fits {device_gb:g} GiB (-{100 * (1 - budget / device_gb):.0f}%) |",
        "|---|---|---:|---:|---:|---:|:---:|",
    ]
    for r in rows:
        fits = "yes" if r["total"] <= budget * GIB else "no"
        lines.append(
            f"| {r['model']} | data=1,model={r['devices']} | {r['params'] / GIB:.1f} GiB | "
            f"{r['kv_cache'] / GIB:.2f} GiB | {r['draft'] / GIB:.2f} GiB | "
            f"{r['total'] / GIB:.1f} GiB | {fits} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = cli.ArgumentParser(
        prog="python -m inference.memory_plan",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--context", type=int, default=4096, help="tokens per row (prompt + output)")
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    p.add_argument("--devices", default="1,2,4,8", help="model-axis sizes to plan for")
    p.add_argument("--device-gb", type=float, default=80.0, help="memory per device, GiB")
    p.add_argument("--headroom", type=float, default=0.1, help="fraction kept free")
    p.add_argument("--markdown", action="store_true", help="print a Markdown table only")
    args = p.parse_args(argv)
    if args.batch < 1 or args.context < 1 or not 0 <= args.headroom < 1:
        p.error("--batch and --context must be >= 1, --headroom in [0, 1)")
    try:
        devices = [int(n) for n in args.devices.split(",")]
    except ValueError:
        devices = []
    if not devices or min(devices) < 1:
        p.error(f"--devices {args.devices!r}: expected positive integers like 1,2,4,8")
    if not (args.device_gb > 0 and math.isfinite(args.device_gb)):
        p.error(f"--device-gb must be a positive number, got {args.device_gb}")
    budget = args.device_gb * (1 - args.headroom)
    rows = [
        plan(name, devices=n, batch=args.batch, context=args.context, dtype=DTYPES[args.dtype])
        for name in MODELS
        for n in devices
    ]
    if args.markdown:
        print(markdown(rows, budget=budget, device_gb=args.device_gb))
        return 0
    print(
        f"batch {args.batch}, context {args.context}, {args.dtype}; budget {budget:.1f} GiB of "
        f"{args.device_gb:g} GiB per device"
    )
    for r in rows:
        fits = "fits" if r["total"] <= budget * GIB else "does not fit"
        print(
            f"{r['model']:13s} model={r['devices']}: params {r['params'] / GIB:6.1f} GiB "
            f"({r['n_params'] / 1e9:.1f}B), KV cache {r['kv_cache'] / GIB:5.2f} GiB, draft "
            f"{r['draft'] / GIB:5.2f} GiB ({r['n_draft_params'] / 1e9:.2f}B), total "
            f"{r['total'] / GIB:6.1f} GiB: {fits}"
        )
        for note in r["fallbacks"]:
            print(f"    replicated: {note}")
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
