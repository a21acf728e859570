"""`python -m inference.bench_serve`: the server under closed-loop load, speculative against
`--no-speculation`, in one run with the same settings.

For each mode the server (`python -m inference.serve` on 127.0.0.1) is started as a process of its
own, warmed up (`--warm-up greedy`, or `all` when sampling: every round and admission program
compiled before it serves; then a burst of requests per batch bucket), then C concurrent
clients (the official `openai` client, streaming) each send one request after another over the
prompts for `--seconds` seconds, for every C in `--concurrency`. Reported per (mode, C):
requests/s, output tokens/s, time to first token and inter-token latency (p50 / p99, seconds),
mean accepted length (tokens per verification round, from the server's metrics). Also one
request alone: the server's end-to-end time against `SpeculativeModel.generate` on the same
prompt (what HTTP and the serving loop cost).

Example:
  python -m inference.bench_serve --prompts runs/prompts/heldout_code/question.jsonl \\
      --concurrency 1 2 4 8 --seconds 60 --out docs/bench_serve.json
"""

from __future__ import annotations

import argparse
import json
import pathlib
import re
import statistics
import sys
import threading
import time
import urllib.request
from typing import Any

import numpy as np

from griffin_jax import cli
from griffin_jax import engine as engine_lib
from inference import serve
from inference.api import SpeculativeModel, tree_spec
from inference.benchmark import read_questions


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = cli.ArgumentParser(
        prog="python -m inference.bench_serve", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    p.add_argument("--base")
    p.add_argument("--draft")
    p.add_argument("--prompts", type=pathlib.Path,
                   default=pathlib.Path("runs/prompts/heldout_code/question.jsonl"),
                   help="MT-bench-format question file (first turns)")  # fmt: skip
    p.add_argument("--num-prompts", type=int, default=40)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--seconds", type=float, default=60.0, help="per (mode, concurrency)")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--max-model-len", type=int, default=1024)
    p.add_argument("--tree", default=None, help="as inference.serve --tree")
    p.add_argument("--out", type=pathlib.Path, default=pathlib.Path("runs/bench/serve.json"))
    p.add_argument(
        "--admission-stall", type=int, default=None, metavar="N",
        help="only measure what admitting an N-token prompt costs the rows already decoding "
        "(engine steps, no HTTP; prints JSON)",
    )  # fmt: skip
    p.add_argument("--chunked-prefill-size", type=int, default=256,
                   help="as inference.serve (0 = off)")  # fmt: skip
    return p.parse_args(argv)


def admission_stall(model, args) -> dict:
    """Step times (ms) of `max_batch - 1` decoding rows: typical, and the steps that admit an
    N-token prompt (one, or one per chunk with `--chunked-prefill-size`), after a warm-up of the
    same shapes."""
    eng = engine_lib.Engine(
        model.base_params, model.cfg, model.draft_params, model.dcfg, tree=model.tree_cfg,
        max_batch=args.max_batch, max_model_len=args.max_model_len,
        draft_head=model.draft_head(), prefill_chunk=args.chunked_prefill_size,
    )  # fmt: skip
    n = args.admission_stall
    long_prompt = tuple(range(3, 3 + n))
    short = [
        engine_lib.Request((5 + i, 6, 7, 8), max_new_tokens=400) for i in range(args.max_batch - 1)
    ]

    def measure() -> tuple[list[float], list[float]]:
        for r in short:
            eng.submit(r, lambda u: None)
        eng.step()
        typical = []
        for _ in range(6):
            t0 = time.perf_counter()
            eng.step()
            typical.append(1e3 * (time.perf_counter() - t0))
        first: list[engine_lib.Update] = []  # the long request's updates
        eng.submit(engine_lib.Request(long_prompt, max_new_tokens=4), first.append)
        admitting = []
        while not first:  # until the long prompt holds a row (its first token arrives)
            t0 = time.perf_counter()
            eng.step()
            admitting.append(1e3 * (time.perf_counter() - t0))
        for slot in list(eng._slots):
            eng.cancel(slot.rid)
        eng.run_until_idle()
        return typical, admitting

    measure()  # compiles every program both steps use
    typical, admitting = measure()
    return {
        "prompt_tokens": n, "decoding_rows": args.max_batch - 1,
        "chunked_prefill_size": args.chunked_prefill_size,
        "step_ms_median": statistics.median(typical), "admission_steps_ms": admitting,
        "admission_step_ms_max": max(admitting),
    }  # fmt: skip


def _metrics(url: str) -> dict[str, float]:
    """Every sample of the server's metrics page (one fetch), by its name with labels."""
    with urllib.request.urlopen(url + "/metrics", timeout=30) as resp:
        text = resp.read().decode()
    return {m.group(1): float(m.group(2)) for m in re.finditer(r"^([^#\s]\S*) (\S+)$", text, re.M)}


def _by_label(metrics: dict[str, float], name: str, label: str) -> dict[str, float]:
    """The samples of `name` by the value of its one label `label`."""
    pattern = re.compile(rf'{re.escape(name)}\{{{label}="([^"]+)"\}}')
    return {m.group(1): v for key, v in metrics.items() if (m := pattern.fullmatch(key))}


def _one_request(client, prompt: str, args) -> dict:
    t0 = time.perf_counter()
    first, stamps, tokens = None, [], 0
    stream = client.completions.create(
        model=serve.DEFAULT_NAME, prompt=prompt, max_tokens=args.max_tokens,
        temperature=args.temperature, stream=True, stream_options={"include_usage": True},
    )  # fmt: skip
    for chunk in stream:
        now = time.perf_counter()
        if chunk.choices and chunk.choices[0].text:
            first = first or now
            stamps.append(now)
        if chunk.usage:
            tokens = chunk.usage.completion_tokens
    end = time.perf_counter()
    itl = (end - first) / max(tokens - 1, 1) if first else None
    return {"ttft": (first or end) - t0, "itl": itl, "tokens": tokens, "seconds": end - t0}


def _load(url: str, prompts: list[str], concurrency: int, seconds: float, args) -> dict:
    import openai

    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600)
    results: list[dict] = []
    lock = threading.Lock()
    stop_at = time.perf_counter() + seconds
    counter = iter(range(10**9))

    def worker():
        while True:  # at least one request each
            with lock:
                prompt = prompts[next(counter) % len(prompts)]
            r = _one_request(client, prompt, args)
            with lock:
                results.append(r)
            if time.perf_counter() >= stop_at:
                return

    before = _metrics(url)
    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    after = _metrics(url)

    def grown(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    rounds = grown("griffin_verification_rounds_total")
    gen = grown("griffin_generation_tokens_total")
    reqs = sum(grown(f'griffin_requests_total{{outcome="{o}"}}') for o in ("stop", "length"))
    shapes0 = _by_label(before, "griffin_rounds_by_shape_total", "shape")
    shapes = {
        k: v - shapes0.get(k, 0.0)
        for k, v in _by_label(after, "griffin_rounds_by_shape_total", "shape").items()
    }
    ttft = [r["ttft"] for r in results]
    itl = [r["itl"] for r in results if r["itl"] is not None]
    tokens = sum(r["tokens"] for r in results)

    def pct(xs, q):
        return float(np.percentile(xs, q)) if xs else None

    return {
        "concurrency": concurrency, "requests": len(results), "seconds": wall,
        "requests_per_s": len(results) / wall, "output_tokens_per_s": tokens / wall,
        "ttft_p50": pct(ttft, 50), "ttft_p99": pct(ttft, 99),
        "itl_p50": pct(itl, 50), "itl_p99": pct(itl, 99),
        # tokens per verification round: prefill emits each request's first token
        "mean_accepted_length": (gen - reqs) / rounds if rounds else None,
        # at the end of the point
        "round_overhead_ms": _by_label(after, "griffin_round_overhead_milliseconds", "batch"),
        "rounds_by_shape": {k: int(v) for k, v in shapes.items() if v},
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cli.input_file(args.prompts, "--prompts")
    prompts = read_questions(args.prompts, args.num_prompts)
    model = SpeculativeModel.from_pretrained(args.base, args.draft, **tree_spec(args.tree))
    if args.admission_stall is not None:
        cli.positive(args.admission_stall, "--admission-stall")
        print(json.dumps(admission_stall(model, args)))
        return 0
    report: dict[str, Any] = {
        "machine": cli.machine(),
        "settings": {k: str(v) for k, v in vars(args).items()},
        "tree": str(model.tree_cfg),
        "adaptive": model.adaptive,
        "runs": {},
    }
    for mode, speculate in (("speculative", True), ("no_speculation", False)):
        server = ServerProcess(args, speculate)
        try:
            warm(server.url, prompts, args)
            runs = []
            for c in args.concurrency:
                r = _load(server.url, prompts, c, args.seconds, args)
                runs.append(r)
                print(f"{mode} C={c}: {r['output_tokens_per_s']:.1f} tok/s, "
                      f"{r['requests_per_s']:.2f} req/s, tau {r['mean_accepted_length']}",
                      file=sys.stderr)  # fmt: skip
            report["runs"][mode] = runs
            if speculate:
                report["alone"] = alone(server.url, model, prompts[0], args)
        finally:
            server.close()
    spec_runs, base_runs = report["runs"]["speculative"], report["runs"]["no_speculation"]
    report["speedup"] = {
        str(s["concurrency"]): s["output_tokens_per_s"] / b["output_tokens_per_s"]
        for s, b in zip(spec_runs, base_runs, strict=True)
    }
    cli.write_report(args.out, report)
    plot(report, args.out.with_suffix(".png"))
    print(json.dumps({"speedup": report["speedup"], "alone": report.get("alone")}))
    return 0


class ServerProcess:
    """`python -m inference.serve` in its own process (the clients' Python never shares the
    engine's interpreter), on a free 127.0.0.1 port; stopped with SIGTERM."""

    def __init__(self, args, speculate: bool) -> None:
        import os
        import socket
        import subprocess

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        argv = [sys.executable, "-m", "inference.serve", "--port", str(port),
                "--max-batch", str(args.max_batch), "--max-model-len", str(args.max_model_len),
                "--log-level", "warning",
                "--warm-up", "greedy" if args.temperature == 0 else "all"]  # fmt: skip
        for flag, value in (("--base", args.base), ("--draft", args.draft), ("--tree", args.tree)):
            if value is not None:
                argv += [flag, str(value)]
        if not speculate:
            argv.append("--no-speculation")
        env = dict(os.environ)
        env.pop("GRIFFIN_API_KEY", None)
        self.proc = subprocess.Popen(argv, env=env)
        self.url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 3600  # the warm-up compiles every program (minutes on a CPU)
        while True:
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=5) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                pass
            if self.proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"the server did not start ({' '.join(argv)})")
            time.sleep(0.5)

    def close(self) -> None:
        import signal

        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(120)


def warm(url: str, prompts: list[str], args) -> None:
    """Compiles every batch bucket (bursts of 1, 2, 4, ... concurrent requests)."""
    size = 1
    while size <= args.max_batch:
        _load(url, prompts, size, 0.0, args)
        size *= 2


def alone(url: str, model, prompt: str, args) -> dict:
    import openai

    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600)
    ids = model.tokenizer(prompt)["input_ids"]
    kw = dict(max_new_tokens=args.max_tokens, temperature=args.temperature)
    model.generate([ids], **kw)  # warm-up
    server_s, api_s = [], []
    for _ in range(5):
        t0 = time.perf_counter()
        out = client.completions.create(
            model=serve.DEFAULT_NAME, prompt=prompt, max_tokens=args.max_tokens,
            temperature=args.temperature,
        )  # fmt: skip
        server_s.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        res = model.generate([ids], **kw)
        api_s.append(time.perf_counter() - t0)
    return {"server_seconds": statistics.median(server_s), "generate_seconds":
            statistics.median(api_s), "server_tokens": out.usage.completion_tokens,
            "generate_tokens": res.new_tokens}  # fmt: skip


def plot(report: dict, path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for mode, runs in report["runs"].items():
        cs = [r["concurrency"] for r in runs]
        axes[0].plot(cs, [r["output_tokens_per_s"] for r in runs], marker="o", label=mode)
        axes[1].plot(cs, [r["itl_p50"] for r in runs], marker="o", label=mode)
    axes[0].set(xlabel="concurrent clients", ylabel="output tokens/s", xscale="log", xticks=cs)
    axes[1].set(xlabel="concurrent clients", ylabel="inter-token latency p50 (s)",
                xscale="log", xticks=cs)  # fmt: skip
    for ax in axes:
        ax.minorticks_off()
        ax.legend()
        ax.set_xticklabels([str(c) for c in cs])
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    raise SystemExit(cli.run(main))
