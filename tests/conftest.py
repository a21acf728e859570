"""Shared test set-up (STYLE R8): CPU JAX by default, HIGHEST matmul precision for parity, and
factories for tiny random transformers models saved with `save_pretrained` (no network)."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import jax
import pytest

jax.config.update("jax_default_matmul_precision", "highest")

HF_DEFAULTS = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    # Large enough that logits are far from uniform and top-1 parity means something.
    initializer_range=0.2,
    max_position_embeddings=256,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)


@pytest.fixture(autouse=True, scope="session")
def _cost_cache(tmp_path_factory):
    """The adaptive budget's round-cost cache in a session folder, never the user's; and where
    the CPU kernels split their calls left to the process (below)."""
    os.environ["GRIFFIN_COST_CACHE"] = str(tmp_path_factory.mktemp("costs") / "costs.json")
    # The kernels' chunks on their helpers throughout, as the library has them by default: the
    # adaptive budget's measurement then times each shape once, not under both settings
    # (tests/test_chunk_choice.py times both, with the variable unset).
    os.environ.setdefault("GRIFFIN_CPU_THREADS", "helpers")


@pytest.fixture(autouse=True, scope="module")
def _free_compiled_programs():
    """Drops every compiled program at the end of a test file once the process holds more
    than 30,000 memory mappings. A worker runs dozens of files in one process, and every
    executable JAX keeps in its in-memory caches holds mappings of its JIT-compiled code:
    measured here, 16,000 after tests/test_engine.py alone (650 after clearing), so a worker
    reached Linux's default limit of 65,530 (`vm.max_map_count`) and died in XLA with a
    segmentation fault. The persistent compilation cache on disk still serves later files."""
    yield
    maps = Path("/proc/self/maps")
    if maps.exists():  # Linux
        with maps.open() as f:
            if sum(1 for _ in f) > 30_000:
                jax.clear_caches()


@pytest.fixture(scope="module")
def pair():
    """(cfg, dcfg, base, draft): a tiny Llama and a GRIFFIN draft that agrees with it often
    (`spec_models.aligned_pair`, noise 0.3), so rounds commit several tokens."""
    from spec_models import aligned_pair, base_config, draft_config

    cfg = base_config("llama")
    dcfg = draft_config(cfg)
    base, draft = aligned_pair(cfg, dcfg, noise=0.3)
    return cfg, dcfg, base, draft


@pytest.fixture(scope="module")
def eagle3_pair():
    """An 8-layer Llama and an EAGLE-3 draft whose first drafted level agrees with it."""
    from spec_models import aligned_pair, base_config, draft_config

    cfg = base_config("llama", n_layers=8)
    dcfg = draft_config(cfg, "eagle3")
    base, draft_params = aligned_pair(cfg, dcfg)
    return cfg, dcfg, base, draft_params


def pytest_configure(config: pytest.Config) -> None:
    # CPU unless the run selects the gpu marker (JAX reads this when its backend first starts).
    markexpr = config.getoption("markexpr", "") or ""
    if "gpu" not in markexpr or "not gpu" in markexpr:
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    if os.environ.get("JAX_PLATFORMS") == "cpu":
        _cpu_compile_flags()
    # One persistent XLA compilation cache for the whole run: the pytest-xdist workers and the
    # subprocesses the tests start (CLIs, the server, the 8-device checks) compile many of the
    # same programs; each is compiled once. A fresh folder per run (made by the first process,
    # inherited by the others through the environment), removed at the end.
    if "GRIFFIN_TEST_XLA_CACHE" not in os.environ:
        os.environ["GRIFFIN_TEST_XLA_CACHE"] = tempfile.mkdtemp(prefix="griffin-jax-xla-")
        config._griffin_owns_cache = True  # type: ignore[attr-defined]
    cache = os.environ["GRIFFIN_TEST_XLA_CACHE"]
    os.environ["JAX_COMPILATION_CACHE_DIR"] = cache
    jax.config.update("jax_compilation_cache_dir", cache)


def _cpu_compile_flags() -> None:
    """Compile time, not run time, dominates this suite. XLA's CPU backend optimisation level 0
    compiles about twice as fast, and its older elemental emitters instead of the fusion
    emitters ~1.6x faster again (measured on tests/test_engine.py's staggered-requests test:
    28 s -> 17 s). Every comparison in the tests is between programs compiled alike, or against
    a tolerance. Set before JAX starts its backend (the first array, after this hook), inherited
    by the subprocesses the tests start. CPU runs only: a gpu run compiles as users do (and
    on an H200 with jax 0.11.2, `pytest -m gpu` given the emitter flag exited at start-up with
    status 1 and no output; with that flag left out it ran)."""
    for flag in ("--xla_backend_optimization_level=0", "--xla_cpu_use_fusion_emitters=false"):
        if flag.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
            os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + flag).strip()


def pytest_unconfigure(config: pytest.Config) -> None:
    if getattr(config, "_griffin_owns_cache", False):
        shutil.rmtree(os.environ.pop("GRIFFIN_TEST_XLA_CACHE"), ignore_errors=True)


def build_hf_model(family: str, *, seed: int = 0, **overrides):
    """A tiny random transformers model (f32, eval mode) of `family`.

    Args:
      family: "llama" | "qwen2" | "mixtral".
      overrides: config fields replacing HF_DEFAULTS (e.g. num_key_value_heads=1,
        rope_parameters={...}, tie_word_embeddings=True).
    """
    import torch
    import transformers

    kwargs = dict(HF_DEFAULTS)
    if family == "mixtral":
        kwargs.update(num_local_experts=4, num_experts_per_tok=2)
    kwargs.update(overrides)
    config_cls, model_cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "mixtral": (transformers.MixtralConfig, transformers.MixtralForCausalLM),
    }[family]
    config = config_cls(**kwargs)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    return model_cls(config).eval()


@pytest.fixture
def hf_checkpoint(tmp_path: Path):
    """Factory: (family, **overrides) -> (folder, torch model) saved with save_pretrained."""
    counter = iter(range(1_000_000))

    def make(family: str, *, seed: int = 0, **overrides):
        model = build_hf_model(family, seed=seed, **overrides)
        folder = tmp_path / f"{family}_{next(counter)}"
        model.save_pretrained(folder)
        return folder, model

    return make
