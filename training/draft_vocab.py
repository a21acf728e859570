"""`python -m training.draft_vocab`: the token-frequency ranking a draft can propose from.

Counts token ids in a corpus's `train_ids.npy` (`training.tokenizer --write-ids`) and writes
`draft_vocab.safetensors` (one int32 tensor `token_ids`: every id of the vocabulary, most
frequent first, ties by smaller id) into a draft folder. With `draft_vocab: N` in the folder's
`tree.json` (or `--draft-vocab N` on the command line), the engine drafts from the first N ids
only (`griffin_jax.speculative.DraftHead`): the draft's lm_head shrinks V / N-fold and output is
unchanged, since the base verifies every token.

    python -m training.draft_vocab --tokens runs/corpus --out inference/default_model/griffin
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

import numpy as np

from griffin_jax import cli
from griffin_jax.checks import InputError
from training import args as args_lib

FILE = "draft_vocab.safetensors"


def rank_tokens(ids: np.ndarray, vocab_size: int) -> np.ndarray:
    """All ids of a vocabulary, most frequent in `ids` first (a stable sort: ties by id)."""
    counts = np.bincount(np.asarray(ids, np.int64).ravel(), minlength=vocab_size)
    if len(counts) > vocab_size:
        raise InputError(
            f"token id {len(counts) - 1} is outside the vocabulary ({vocab_size}): pass the "
            "draft's --vocab-size or the tokens of its tokenizer"
        )
    return np.argsort(-counts, kind="stable").astype(np.int32)


def read_ranking(path: pathlib.Path) -> np.ndarray:
    """The `token_ids` ranking of a `draft_vocab.safetensors` file (InputError naming it)."""
    from convert.load_hf import iter_safetensors

    try:
        tensors = dict(iter_safetensors(path))
    except ValueError as err:
        raise InputError(f"{path}: not a readable safetensors file ({err})") from err
    ids = tensors.get("token_ids")
    if ids is None or ids.ndim != 1 or ids.dtype.kind not in "iu":
        raise InputError(f"{path}: expected one 1-D integer tensor `token_ids`")
    return np.asarray(ids, np.int32)


def draft_to_target(ranking: np.ndarray, size: int) -> np.ndarray:
    """EAGLE-3's `d2t` for a draft vocabulary of the `size` most frequent ids of `ranking`:
    those ids in increasing order, draft index i -> target id i + d2t[i] (as the official
    training builds it from token counts)."""
    if not 1 <= size <= len(ranking):
        raise InputError(f"a draft vocabulary of {size} ids from a ranking of {len(ranking)}")
    used = np.sort(np.asarray(ranking[:size], np.int64))
    if len(np.unique(used)) != size or used[0] < 0:
        raise InputError("the token ranking repeats an id or holds a negative one")
    return (used - np.arange(size)).astype(np.int32)


def coverage(ids: np.ndarray, ranking: np.ndarray, sizes) -> dict[int, float]:
    """Fraction of the tokens in `ids` that fall in the first n ranked ids, for each n."""
    counts = np.bincount(np.asarray(ids, np.int64).ravel(), minlength=len(ranking))
    cum = np.cumsum(counts[ranking]) / counts.sum()
    return {int(n): float(cum[min(n, len(cum)) - 1]) for n in sizes}


def write_ranking(ranking: np.ndarray, folder: pathlib.Path) -> pathlib.Path:
    from safetensors.numpy import save_file

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / FILE
    save_file({"token_ids": np.ascontiguousarray(ranking, np.int32)}, path)
    return path


def main(argv: list[str] | None = None) -> int:
    p = cli.ArgumentParser(
        prog="python -m training.draft_vocab",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--tokens", type=pathlib.Path, required=True, help="folder with train_ids.npy")
    p.add_argument("--vocab-size", type=int, default=None, help="default: the draft's config")
    p.add_argument("--out", type=pathlib.Path, required=True, help="the draft folder")
    args = p.parse_args(argv)
    args_lib.at_least(args.vocab_size, "--vocab-size", 1)
    made_by = "written by python -m training.tokenizer --write-ids"
    args_lib.folder(args.tokens, "--tokens", needs=("train_ids.npy",), hint=made_by)
    args_lib.out_folder(args.out)
    vocab = args.vocab_size
    if vocab is None:
        hint = "or pass --vocab-size"
        args_lib.folder(args.out, "--out", needs=("config.json",), hint=hint)
        try:
            vocab = json.loads((args.out / "config.json").read_text())["vocab_size"]
        except (ValueError, KeyError, TypeError) as err:
            raise InputError(
                f"{args.out / 'config.json'}: no vocab_size ({err!r}); {hint}"
            ) from err
        args_lib.at_least(vocab, f"{args.out / 'config.json'} vocab_size", 1)
    ids = _token_ids(args.tokens / "train_ids.npy")
    ranking = rank_tokens(ids, vocab)
    heldout = args.tokens / "heldout_ids.npy"
    sample = _token_ids(heldout) if heldout.exists() else ids
    cover = coverage(sample, ranking, (512, 1024, 2048, 4096))
    path = write_ranking(ranking, args.out)
    print(json.dumps({"wrote": str(path), "tokens": int(ids.size), "coverage": cover}))
    return 0


def _token_ids(path: pathlib.Path) -> np.ndarray:
    """A non-empty 1-D array of non-negative integer ids."""
    try:
        ids = np.load(path, allow_pickle=False)
    except ValueError as err:
        raise InputError(f"{path} is not a .npy token array ({err})") from err
    if ids.ndim != 1 or ids.dtype.kind not in "iu" or ids.size == 0 or ids.min() < 0:
        raise InputError(
            f"{path} must hold a non-empty 1-D array of token ids >= 0, got {ids.dtype} {ids.shape}"
        )
    return ids


if __name__ == "__main__":
    sys.exit(cli.run(main))
