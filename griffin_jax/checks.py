"""The one set of input checks shared by the Python API, the CLIs and (later) the server.

Every check raises `InputError` (a `ValueError`) with one line that says what is wrong and what
to do; the CLIs print that line and exit with status 2 (`griffin_jax.cli`). They run on the host
before anything is compiled or, where they need no model, before a model is loaded.

- `token_ids`: prompts are non-empty lists of Python/NumPy integers inside the vocabulary (an id
  >= V would be clamped by the embedding gather and -1 would read the last row; floats and
  bools are refused rather than truncated).
- `sampling`: finite temperature >= 0, top_p in (0, 1], integer top_k >= 0.
- `max_new_tokens`: an integer >= 1.
- `position_limit`: the longest prompt plus max_new_tokens within the model's
  `max_position_embeddings` (RoPE positions past it were never trained: degenerate output).
- `tree_sizes`: the static tree sizes with the reference's meanings (`depth` 0 is one level).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import numpy as np


class InputError(ValueError):
    """Bad input from a user: the message is one line saying what is wrong and what to do."""


def _is_int(value: object) -> bool:
    return isinstance(value, (numbers.Integral, np.integer)) and not isinstance(
        value, (bool, np.bool_)
    )


def integer(value: object, *, name: str, minimum: int | None = None) -> int:
    """`value` as an int (refusing floats, bools and strings), optionally >= `minimum`."""
    if not _is_int(value):
        raise InputError(f"{name} must be an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise InputError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def token_ids(prompts: object, *, vocab_size: int) -> list[list[int]]:
    """Validated prompts: a non-empty sequence of non-empty integer id lists in [0, V).

    Returns plain Python lists (a NumPy or JAX array is accepted too).
    """
    if isinstance(prompts, (str, bytes)) or not hasattr(prompts, "__len__"):
        raise InputError(
            f"prompts must be a list of token-id lists, got {type(prompts).__name__} "
            "(encode text with the tokenizer first)"
        )
    if len(prompts) == 0:
        raise InputError("no prompts: pass at least one token-id list")
    out = []
    for row, prompt in enumerate(prompts):
        if isinstance(prompt, (str, bytes)) or not hasattr(prompt, "__len__"):
            raise InputError(
                f"prompt {row} must be a list of token ids, got {type(prompt).__name__}"
            )
        ids = np.asarray(prompt)
        if ids.ndim != 1:
            raise InputError(
                f"prompt {row} must be a flat list of token ids, got shape {ids.shape}"
            )
        if ids.size == 0:
            raise InputError(f"prompt {row} is empty: every prompt needs at least one token")
        elements = prompt if isinstance(prompt, (list, tuple)) else ids.tolist()
        if ids.dtype.kind not in "iu" or not all(map(_is_int, elements)):
            bad = next((t for t in elements if not _is_int(t)), ids.dtype)
            raise InputError(f"prompt {row}: token ids must be integers, got {bad!r}")
        ids = ids.astype(np.int64)
        if ids.min() < 0 or ids.max() >= vocab_size:
            pos = int(np.argmax((ids < 0) | (ids >= vocab_size)))
            raise InputError(
                f"prompt {row}: token id {int(ids[pos])} at position {pos} is outside the "
                f"vocabulary [0, {vocab_size})"
            )
        out.append(ids.tolist())
    return out


def sampling(temperature: float, top_p: float, top_k: int) -> None:
    """Finite sampling settings: temperature >= 0 (0 = greedy), top_p in (0, 1], top_k >= 0."""
    for name, value in (("temperature", temperature), ("top_p", top_p)):
        if isinstance(value, bool) or not isinstance(value, (numbers.Real, np.floating)):
            raise InputError(f"{name} must be a number, got {value!r}")
        if not math.isfinite(value):
            raise InputError(f"{name} must be finite, got {value}")
    if temperature < 0:
        raise InputError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if not 0 < top_p <= 1:
        raise InputError(f"top_p must be in (0, 1] (1 = off), got {top_p}")
    integer(top_k, name="top_k (0 = off)", minimum=0)


def max_new_tokens(value: object) -> int:
    return integer(value, name="max_new_tokens", minimum=1)


def position_limit(
    prompt_lens: Sequence[int], max_new: int, *, max_positions: int | None, flag: str = ""
) -> None:
    """The longest prompt plus `max_new` new tokens must fit the model's positions.

    `flag` names the CLI option to lower (e.g. "--max-new-tokens") in the message.
    """
    if max_positions is None:
        return
    longest = max(prompt_lens)
    what = flag or "max_new_tokens"
    if longest >= max_positions:
        raise InputError(
            f"a prompt of {longest} tokens leaves no room for new tokens: the model has "
            f"{max_positions} positions (max_position_embeddings); shorten the prompt"
        )
    if longest + max_new > max_positions:
        raise InputError(
            f"prompt ({longest} tokens) + {what} ({max_new}) exceeds the model's "
            f"{max_positions} positions (max_position_embeddings); lower {what} to at most "
            f"{max_positions - longest}"
        )


def num_candidates(top_k: int, depth: int) -> int:
    """Drafted candidates of a tree: K at level 1 plus depth expansions of K nodes x K children."""
    return top_k + depth * top_k * top_k


def tree_sizes(
    *, top_k: object, depth: object, total_tokens: object, vocab_size: int | None = None
) -> None:
    """The static tree sizes with the reference's meanings.

    top_k >= 1 children per node; depth >= 0 expansions (0 = one level of drafted tokens);
    total_tokens in [2, 1 + K + depth*K^2] nodes counting the root; top_k within the (draft)
    vocabulary when `vocab_size` is given.
    """
    k = integer(top_k, name="tree top_k", minimum=1)
    d = integer(depth, name="tree depth", minimum=0)
    m = integer(total_tokens, name="tree total_tokens", minimum=2)
    if vocab_size is not None and k > vocab_size:
        raise InputError(f"tree top_k={k} exceeds the draft's vocabulary ({vocab_size} tokens)")
    most = 1 + num_candidates(k, d)
    if m > most:
        raise InputError(
            f"tree total_tokens={m} must be in [2, {most}] for top_k={k}, depth={d} "
            "(it counts the root; raise depth or top_k, or lower total_tokens)"
        )


SEED_LIMIT = 2**32


def seeds(seed: object, batch: int) -> None:
    """An integer seed (row b samples with seed + b) or one integer seed per row, in [0, 2**32)."""
    if isinstance(seed, (list, tuple, np.ndarray)):
        if len(seed) != batch:
            raise InputError(f"seed: got {len(seed)} per-row seeds for {batch} prompts")
        values = [integer(s, name="seed", minimum=0) for s in seed]
    else:
        values = [integer(seed, name="seed", minimum=0) + batch - 1]
    if max(values) >= SEED_LIMIT:
        raise InputError(f"seed must be < 2**32 (row b uses seed + b), got {max(values)}")


def generation(
    prompts: object,
    *,
    vocab_size: int,
    max_positions: int | None,
    max_new: object,
    temperature: float,
    top_p: float,
    top_k: int,
    seed: object = 0,
) -> list[list[int]]:
    """Every check of one generation request (both engines call it); returns the prompts."""
    sampling(temperature, top_p, top_k)
    max_new = max_new_tokens(max_new)
    ids = token_ids(prompts, vocab_size=vocab_size)
    seeds(seed, len(ids))
    position_limit([len(p) for p in ids], max_new, max_positions=max_positions)
    return ids
