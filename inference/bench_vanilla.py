"""`python -m inference.bench_vanilla`: our vanilla decoding vs transformers on the same weights.

Builds a random Llama (about 32M parameters by default) with transformers, saves it, loads the
same folder into JAX through `convert.load_hf`, checks both decode the same greedy tokens, then
times batch-1 greedy decoding of `--new-tokens` tokens after a warm-up, both in this one process,
prefill included. It also measures this machine's memory bandwidth (a large numpy copy) and
reports ms/token against the floor of reading every weight once per token. Ours runs in the
decode layout the inference API uses on one device (`model.decode_layout`); `--scan` times
the stored stacked layout (`nn.scan` over layers, unfused) as well. `--bf16-values` rounds the
random weights to bf16 numbers first (kept in f32 on both sides, as a bf16 checkpoint loads),
which on a CPU with AMX runs our products on AMX tiles (`griffin_jax.cpu_kernels`); the report
names the products ours ran (`products`).

Needs torch (the `test` or `torch` extra).
"""

from __future__ import annotations

import json
import pathlib
import sys
import tempfile
import time

import numpy as np

from griffin_jax import checks, cli


def copy_bandwidth(mb: int = 512, repeats: int = 5) -> float:
    """Bytes/s of a large array copy (read + write counted), the best of `repeats`."""
    src = np.ones(mb * 2**20 // 8, np.float64)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t0)
    return 2 * src.nbytes / best


MAX_POSITIONS = 2048


def main(argv: list[str] | None = None) -> int:
    p = cli.ArgumentParser(prog="python -m inference.bench_vanilla", description=__doc__)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--ffn", type=int, default=1408)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--scan", action="store_true", help="also time the scanned layout")
    p.add_argument(
        "--bf16-values", action="store_true", help="round the random weights to bf16 numbers"
    )
    args = p.parse_args(argv)
    for flag in ("hidden", "layers", "heads", "kv_heads", "ffn", "vocab", "prompt_len",
                 "new_tokens", "repeats"):  # fmt: skip
        cli.positive(getattr(args, flag), "--" + flag.replace("_", "-"))
    if args.hidden % args.heads or args.heads % args.kv_heads:
        raise checks.InputError(
            f"--hidden ({args.hidden}) must divide by --heads ({args.heads}), and --heads by "
            f"--kv-heads ({args.kv_heads})"
        )
    if args.prompt_len + args.new_tokens > MAX_POSITIONS:
        raise checks.InputError(
            f"--prompt-len + --new-tokens must be <= {MAX_POSITIONS} (the model's positions)"
        )

    import jax
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from convert.load_hf import load_hf
    from griffin_jax import vanilla
    from griffin_jax.model import decode_layout

    torch.manual_seed(0)
    hf_cfg = LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        intermediate_size=args.ffn, max_position_embeddings=MAX_POSITIONS, initializer_range=0.1,
        eos_token_id=None, bos_token_id=None, attn_implementation="eager",
    )  # fmt: skip
    hf = LlamaForCausalLM(hf_cfg).eval()
    if args.bf16_values:
        with torch.no_grad():
            for w in hf.parameters():
                w.copy_(w.to(torch.bfloat16).to(torch.float32))
    n_params = sum(t.numel() for t in hf.parameters())
    weight_bytes = 4 * n_params
    prompt = np.random.default_rng(0).integers(0, args.vocab, args.prompt_len).tolist()
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)
        cfg, stacked = load_hf(pathlib.Path(tmp), dtype="float32")
    unrolled = decode_layout(stacked)
    packed = [x.dtype.name for x in jax.tree.leaves(unrolled) if x.ndim == 3]
    products = "amx tiles" if "bfloat16" in packed else "f32 panels" if packed else "xla"

    def run_ours(params=unrolled):
        t0 = time.perf_counter()
        res = vanilla.generate(params, cfg, [prompt], max_new_tokens=args.new_tokens, eos_ids=[])
        return res.output_ids[0], time.perf_counter() - t0

    def run_hf():
        ids = torch.tensor([prompt])
        t0 = time.perf_counter()
        with torch.no_grad():
            out = hf.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.new_tokens,
                min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0,
            )  # fmt: skip
        return out[0, len(prompt) :].tolist(), time.perf_counter() - t0

    ours_ids, _ = run_ours()  # warm-up (compile)
    hf_ids, _ = run_hf()
    same = ours_ids == hf_ids
    ours_t = min(run_ours()[1] for _ in range(args.repeats))
    hf_t = min(run_hf()[1] for _ in range(args.repeats))
    scan_t = None
    if args.scan:
        same = same and run_ours(stacked)[0] == hf_ids
        scan_t = min(run_ours(stacked)[1] for _ in range(args.repeats))
    bandwidth = copy_bandwidth()
    floor_ms = 1e3 * weight_bytes / bandwidth
    report = {
        "machine": f"{cli.machine()}, torch threads {torch.get_num_threads()}",
        "params_M": n_params / 1e6,
        "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens,
        "same_greedy_tokens": same,
        "products": products,
        "ours_tokens_per_s": args.new_tokens / ours_t,
        "transformers_tokens_per_s": args.new_tokens / hf_t,
        "ratio": hf_t / ours_t,
        "ours_ms_per_token": 1e3 * ours_t / args.new_tokens,
        "scan_ms_per_token": None if scan_t is None else 1e3 * scan_t / args.new_tokens,
        "copy_bandwidth_GBps": bandwidth / 1e9,
        "floor_ms_per_token": floor_ms,
        "command": "python -m inference.bench_vanilla " + " ".join(argv or sys.argv[1:]),
    }
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
