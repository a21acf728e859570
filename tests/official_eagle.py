"""The official EAGLE release's generation loop (`eagle-llm` on PyPI) on this project's weights.

`eagle-llm` 1.2.1, the latest release on PyPI, is EAGLE-1: the authors' PyTorch code for a
static draft tree (`tree_choices`, default its 26-node `mc_sim_7b_63`), with its own copy of
transformers' Llama (`modeling_llama_kv`: preallocated K/V buffers, a tree mask) and the draft
of `cnets.Model`, the architecture the EAGLE-2 draft kept. GRIFFIN's and EAGLE-2's official
code is not released there; theirs grew out of this loop (the same `initialize_tree`,
`tree_decoding`, `evaluate_posterior`, `update_inference_inputs` steps, spec 5), with a
dynamic tree in place of the static one. Nothing of it is copied here: the benchmark installs
the release beside the project, outside the repository and its dependencies:

    pip install --no-deps --target runs/eagle_llm eagle-llm==1.2.1

and this module imports it from there, loads the base and an EAGLE-2 draft (this project's
safetensors, in f32) into its classes and drives `EaModel.eagenerate`. What it adapts at run
time, without touching the release's files: transformers 5 reads the config's RoPE into
`rope_scaling` as {"rope_theta", "rope_type": "default"}, where the release expects None for
plain RoPE; and the rotary modules' `inv_freq` buffers, which the release registers as weights
and the checkpoints lack, are recomputed after loading (transformers 5 leaves missing weights
uninitialised). Greedy only (`temperature 0`), batch 1, as the release's loop is.
"""

from __future__ import annotations

import importlib
import pathlib
import sys
from typing import Any

import torch


def import_release(folder: str | pathlib.Path):
    """The release's `eagle.model.ea_model` module, imported from `folder` (a `pip install
    --target` of eagle-llm). Raises FileNotFoundError naming the install command when absent."""
    folder = pathlib.Path(folder).resolve()
    if not (folder / "eagle" / "model" / "ea_model.py").is_file():
        raise FileNotFoundError(
            f"{folder} holds no eagle-llm release; install it there with "
            f"`pip install --no-deps --target {folder} eagle-llm==1.2.1`"
        )
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))
    return importlib.import_module("eagle.model.ea_model")


def _recompute_rope(module: torch.nn.Module) -> None:
    """Every rotary module's `inv_freq` and cos/sin tables, from its base and dim."""
    for mod in module.modules():
        if hasattr(mod, "inv_freq") and hasattr(mod, "_set_cos_sin_cache"):
            mod.inv_freq = 1.0 / (mod.base ** (torch.arange(0, mod.dim, 2).float() / mod.dim))
            mod._set_cos_sin_cache(mod.max_position_embeddings, device=mod.inv_freq.device,
                                   dtype=torch.float32)  # fmt: skip


def load(folder, base_dir, draft_dir) -> Any:
    """An `EaModel` of the release in f32: the HF base folder and an EAGLE-2 draft folder
    (config.json + model.safetensors in the published layout)."""
    from safetensors.torch import load_file
    from transformers import AutoConfig

    ea_model = import_release(folder)
    configs = importlib.import_module("eagle.model.configs")
    kv_llama = importlib.import_module("eagle.model.modeling_llama_kv")
    base_dir, draft_dir = pathlib.Path(base_dir), pathlib.Path(draft_dir)
    cfg = AutoConfig.from_pretrained(base_dir)
    if (cfg.rope_scaling or {}).get("rope_type", "default") != "default":
        raise ValueError(f"{base_dir}: the release runs plain RoPE only, not {cfg.rope_scaling}")
    cfg.rope_scaling = None
    base = kv_llama.LlamaForCausalLM.from_pretrained(base_dir, config=cfg, dtype=torch.float32)
    _recompute_rope(base)

    read = configs.EConfig.from_pretrained

    def plain_rope(path, **kwargs):
        c = read(path, **kwargs)
        c.rope_scaling = None
        return c

    ea_model.EConfig.from_pretrained = plain_rope  # the name EaModel.__init__ looks up
    try:
        model = ea_model.EaModel(base, str(base_dir), str(draft_dir / "config.json"))
    finally:
        ea_model.EConfig.from_pretrained = read
    weights = {k: v.float() for k, v in load_file(draft_dir / "model.safetensors").items()}
    model.ea_layer.load_state_dict(weights, strict=True)
    model.ea_layer.float()
    _recompute_rope(model.ea_layer)
    model.official_tree = model.ea_layer.tree  # the release's default, until `set_tree`
    return model.eval()


def static_tree(total_tokens: int, levels: int, top_k: int) -> list[list[int]]:
    """A static tree of `total_tokens` nodes (root included) for the release's `tree_choices`:
    the paths of ranks (each < top_k, at most `levels` long) of the smallest length + rank sum,
    ties to the shorter then the lexicographically smaller. A fixed rule (a path's prior falls
    by half per level and per rank), prefix- and sibling-closed like the release's trees."""
    paths: list[tuple[int, ...]] = []
    frontier: list[tuple[int, ...]] = [()]
    for _ in range(levels):
        frontier = [p + (r,) for p in frontier for r in range(top_k)]
        paths += frontier
    paths.sort(key=lambda p: (len(p) + sum(p), len(p), p))
    return [list(p) for p in paths[: total_tokens - 1]]


def set_tree(model, choices: list[list[int]]) -> None:
    """Drafts and verifies `choices`: the draft keeps its own buffers of the tree (built by
    `cnets.generate_tree_buffers`, set at load to the default tree), the verification takes
    the tree as `eagenerate`'s argument."""
    cnets = importlib.import_module("eagle.model.cnets")
    device = model.base_model.lm_head.weight.device
    model.ea_layer.tree = choices
    model.ea_layer.tree_buffer = cnets.generate_tree_buffers(choices, device)
    model.official_tree = choices


def generate(model, prompt: list[int], *, max_new_tokens: int, eos_id: int | None):
    """(new ids, accepted draft tokens per round) of the release's greedy loop on one prompt.

    The release stops once it has more than `max_new_tokens` new tokens (or its tokenizer's
    stop token appears): it is asked for max_new_tokens - 1, so it stops at the first round
    that reaches max_new_tokens, as this engine does, and its ids are cut there and after
    `eos_id` as this engine's are."""
    ea_model = sys.modules["eagle.model.ea_model"]
    accepts: list[int] = []
    posterior = ea_model.evaluate_posterior

    def counted(*args, **kwargs):
        best, accept_length, sample_p = posterior(*args, **kwargs)
        accepts.append(int(accept_length))
        return best, accept_length, sample_p

    ea_model.evaluate_posterior = counted
    try:
        ids = torch.tensor([prompt], dtype=torch.long)
        with torch.no_grad():
            out = model.eagenerate(ids, temperature=0.0, max_new_tokens=max_new_tokens - 1,
                                   tree_choices=model.official_tree)  # fmt: skip
    finally:
        ea_model.evaluate_posterior = posterior
    new = out[0, len(prompt) :].tolist()[:max_new_tokens]
    if eos_id is not None and eos_id in new:
        new = new[: new.index(eos_id) + 1]
    return new, accepts
