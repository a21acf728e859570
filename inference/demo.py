"""`make demo`: the main job of the project on this machine, in under five minutes.

With the default model pair installed (`inference/default_model/base` + `griffin`), it completes a
Python code prompt with GRIFFIN speculative decoding and with vanilla decoding, both timed after a
warm-up, and prints the completion, tau, tokens/s and the speedup. With only the base installed,
it runs vanilla generation on it and says the drafts are missing. With neither, it builds a small
randomly initialised Llama in-process and runs vanilla generation on it, and says so.
"""

from __future__ import annotations

import sys
import time

import jax

from griffin_jax import cli
from inference.api import DEFAULT_MODEL_DIR
from inference.generate import main as generate_main

# A function header and docstring, cut where the body starts (like the held-out prompts).
PROMPT = '''def count_words(text):
    """Return a dict mapping each word of text to how many times it occurs."""
    '''


def _random_llama_demo() -> int:
    from griffin_jax import model as base_model
    from griffin_jax import vanilla
    from griffin_jax.config import ModelConfig

    print(
        "The default model pair is not installed yet: running vanilla generation on a small\n"
        "randomly initialised Llama built in-process (its output is noise by design).\n",
        file=sys.stderr,
    )
    cfg = ModelConfig(
        vocab_size=512, d_model=128, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=32, d_ff=256
    )
    params = base_model.init_params(cfg, jax.random.key(0))
    prompt = [[1, 2, 3, 4, 5, 6, 7, 8]]
    vanilla.generate(params, cfg, prompt, max_new_tokens=64)  # compile
    t0 = time.perf_counter()
    res = vanilla.generate(params, cfg, prompt, max_new_tokens=64, eos_ids=[])
    dt = time.perf_counter() - t0
    print(f"new ids: {res.output_ids[0]}")
    print(f"[vanilla, random 4-layer Llama] {res.new_tokens} tokens in {dt:.3f}s "
          f"({res.new_tokens / dt:.0f} tok/s)")  # fmt: skip
    return 0


def main() -> int:
    cli.use_compile_cache()
    has_base = (DEFAULT_MODEL_DIR / "base" / "config.json").exists()
    has_draft = (DEFAULT_MODEL_DIR / "griffin" / "config.json").exists()
    if not has_base:
        return _random_llama_demo()
    print(f"prompt:\n{PROMPT}", file=sys.stderr)
    if not has_draft:
        print(
            "The default drafts are not trained yet: vanilla generation with the default base.\n",
            file=sys.stderr,
        )
        return cli.run(generate_main, ["--prompt", PROMPT, "--vanilla", "--max-new-tokens", "96"])
    return cli.run(generate_main, ["--prompt", PROMPT, "--compare", "--max-new-tokens", "96"])


if __name__ == "__main__":
    sys.exit(main())
