"""Byte-level BPE tokenizer of the project's own base model, and corpus tokenization.

Trained with the ``tokenizers`` library on the train split of :mod:`training.corpus` only, in the
GPT-2 layout: ``ByteLevel(add_prefix_space=False)`` pre-tokenizer (so any text, code indentation
and non-ASCII included, round-trips exactly), ``ByteLevel`` decoder, and a
``TemplateProcessing("<s> $A")`` post-processor so encoding prepends BOS. The post-processor is
what adds BOS: transformers 5 drops ``add_bos_token`` from the config when ``tokenizer.json``
exists, so ``tok.add_bos_token`` reads False although BOS is added (pass
``add_special_tokens=False`` to encode without it). Special tokens take the first ids:

* ``<s>`` = 0 (BOS), ``</s>`` = 1 (EOS), ``<pad>`` = 2 (padding; never in the corpus ids).

No ``<unk>``: the 256 byte symbols are all in the initial alphabet, so nothing is unknown.

Saved so that ``transformers.AutoTokenizer.from_pretrained(folder)`` loads it as a fast tokenizer
(``tokenizer.json``, ``tokenizer_config.json`` with ``tokenizer_class: PreTrainedTokenizerFast``
and ``clean_up_tokenization_spaces: false``, ``special_tokens_map.json``).

:func:`tokenize_corpus` writes the flat uint16 id streams the pretraining script reads
(``train_ids.npy``, ``heldout_ids.npy``): every document is ``<s> ... </s>``, concatenated.

CLI::

    python -m training.tokenizer --corpus runs/corpus --out inference/default_model/base \\
        --vocab-size 8192 --write-ids
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import pathlib
import sys
import time
from collections.abc import Iterable, Iterator

import numpy as np
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from griffin_jax import cli
from griffin_jax.checks import InputError
from training import args as args_lib
from training.corpus import read_jsonl

BOS, EOS, PAD = "<s>", "</s>", "<pad>"
SPECIAL_TOKENS = (BOS, EOS, PAD)  # ids 0, 1, 2 in this order.
BOS_ID, EOS_ID, PAD_ID = 0, 1, 2
DEFAULT_MAX_TRAIN_CHARS = 30_000_000
DEFAULT_MODEL_MAX_LENGTH = 2048


def train_tokenizer(
    texts: Iterable[str], *, vocab_size: int, min_frequency: int = 2
) -> tokenizers.Tokenizer:
    """Trains the byte-level BPE.

    Args:
      texts: training documents.
      vocab_size: total vocabulary size, special tokens and the 256 byte symbols included
        (at most 65536 so ids fit uint16).
      min_frequency: minimum pair count for a merge.

    Returns:
      The trained tokenizer, with BOS post-processor and ByteLevel decoder.
    """
    if not len(SPECIAL_TOKENS) + 256 <= vocab_size <= 65536:
        raise ValueError(f"vocab_size must be in [259, 65536], got {vocab_size}")
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    for token, want in zip(SPECIAL_TOKENS, (BOS_ID, EOS_ID, PAD_ID), strict=True):
        assert tok.token_to_id(token) == want, (token, tok.token_to_id(token))
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS}:1 $B:1", special_tokens=[(BOS, BOS_ID)]
    )
    return tok


def save_tokenizer(
    tok: tokenizers.Tokenizer,
    out_dir: pathlib.Path,
    *,
    model_max_length: int = DEFAULT_MODEL_MAX_LENGTH,
) -> None:
    """Writes the files ``AutoTokenizer.from_pretrained`` needs.

    Args:
      tok: a tokenizer from :func:`train_tokenizer`.
      out_dir: output folder (created); only tokenizer files are written.
      model_max_length: the base model's context length, recorded for transformers.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    special = {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special,
        "model_max_length": model_max_length,
        # The clean-up strips spaces before punctuation (" ." -> "."), breaking round-trips;
        # transformers 5 already skips it for BPE, older versions need it off explicitly.
        "clean_up_tokenization_spaces": False,
        "padding_side": "right",
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")


def _train_texts(corpus_dir: pathlib.Path, *, max_chars: int) -> Iterator[str]:
    """Train-split documents up to max_chars (a prefix of the hash-ordered file)."""
    total = 0
    for doc in read_jsonl(corpus_dir / "train.jsonl"):
        if total >= max_chars:
            return
        total += len(doc["text"])
        yield doc["text"]


def _encode_docs(tok: tokenizers.Tokenizer, texts: Iterable[str]) -> np.ndarray:
    """``<s> doc </s>`` for every document, concatenated, as uint16."""
    chunks = []
    eos = np.array([EOS_ID], np.uint16)
    batch_iter = iter(texts)
    while batch := list(itertools.islice(batch_iter, 64)):
        for enc in tok.encode_batch(batch, add_special_tokens=True):  # prepends <s>.
            chunks += [np.asarray(enc.ids, np.uint16), eos]
    return np.concatenate(chunks) if chunks else np.zeros((0,), np.uint16)


def tokenize_corpus(
    corpus_dir: pathlib.Path, tokenizer_dir: pathlib.Path, out_path: pathlib.Path | None = None
) -> dict[str, int]:
    """Writes the flat uint16 token-id streams of both splits.

    Each document becomes ``<s> ids </s>``; documents are concatenated in corpus order (the
    hash order of :mod:`training.corpus`).

    Args:
      corpus_dir: folder with ``train.jsonl`` and ``heldout.jsonl``.
      tokenizer_dir: folder with ``tokenizer.json``.
      out_path: output folder for ``train_ids.npy``, ``heldout_ids.npy`` and
        ``ids_manifest.json`` (tokenizer hash, special ids, counts); defaults to ``corpus_dir``.

    Returns:
      ``{"train": n_tokens, "heldout": n_tokens}``.
    """
    out_path = corpus_dir if out_path is None else out_path
    out_path.mkdir(parents=True, exist_ok=True)
    tok = tokenizers.Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    if tok.get_vocab_size() > 65536:
        raise ValueError("vocabulary too large for uint16 ids")
    counts = {}
    for split in ("train", "heldout"):
        texts = (d["text"] for d in read_jsonl(corpus_dir / f"{split}.jsonl"))
        ids = _encode_docs(tok, texts)
        np.save(out_path / f"{split}_ids.npy", ids)
        counts[split] = int(ids.size)
    # Records which tokenizer made the ids, so a stale stream is detectable.
    record = {
        "tokenizer": str(tokenizer_dir),
        "tokenizer_sha1": hashlib.sha1((tokenizer_dir / "tokenizer.json").read_bytes()).hexdigest(),
        "vocab_size": tok.get_vocab_size(),
        "bos_id": BOS_ID,
        "eos_id": EOS_ID,
        "layout": "<s> document </s>, concatenated in corpus order",
        "tokens": counts,
    }
    (out_path / "ids_manifest.json").write_text(json.dumps(record, indent=2) + "\n")
    return counts


def tokens_per_char(tok: tokenizers.Tokenizer, texts: list[str]) -> float:
    """Tokens (without specials) per character over ``texts``."""
    n_tokens = sum(len(e.ids) for e in tok.encode_batch(texts, add_special_tokens=False))
    return n_tokens / max(1, sum(len(t) for t in texts))


def check_args(args: argparse.Namespace) -> None:
    """The flags and the corpus files, before anything is trained or written."""
    if not len(SPECIAL_TOKENS) + 256 <= args.vocab_size <= 65536:
        raise InputError(
            f"--vocab-size must be in [259, 65536] (uint16 ids), got {args.vocab_size}"
        )
    args_lib.at_least(args.max_train_chars, "--max-train-chars", 1)
    args_lib.at_least(args.model_max_length, "--model-max-length", 1)
    made_by = "written by python -m training.corpus"
    args_lib.folder(args.corpus, "--corpus", needs=("train.jsonl", "heldout.jsonl"), hint=made_by)
    args_lib.out_folder(args.out)
    if args.ids_only:
        args_lib.folder(args.out, "--out", needs=("tokenizer.json",), hint="--ids-only reuses it")
    for split in ("train", "heldout"):  # read whole: a bad line fails here, not mid-training
        path = args.corpus / f"{split}.jsonl"
        if sum(1 for _ in read_jsonl(path)) == 0:
            raise InputError(f"{path} holds no document: rebuild the corpus")


def main(argv: list[str] | None = None) -> None:
    """CLI: trains and saves the tokenizer, optionally tokenizes the corpus."""
    parser = cli.ArgumentParser(
        prog="python -m training.tokenizer", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--corpus", type=pathlib.Path, default=pathlib.Path("runs/corpus"))
    parser.add_argument(
        "--out", type=pathlib.Path, default=pathlib.Path("inference/default_model/base")
    )
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--max-train-chars", type=int, default=DEFAULT_MAX_TRAIN_CHARS)
    parser.add_argument("--model-max-length", type=int, default=DEFAULT_MODEL_MAX_LENGTH)
    parser.add_argument(
        "--write-ids",
        action="store_true",
        help="also write <corpus>/train_ids.npy and heldout_ids.npy",
    )
    parser.add_argument(
        "--ids-only",
        action="store_true",
        help="skip training; tokenize the corpus with the tokenizer already in --out",
    )
    args = parser.parse_args(argv)
    check_args(args)
    if not args.ids_only:
        start = time.perf_counter()
        tok = train_tokenizer(
            _train_texts(args.corpus, max_chars=args.max_train_chars),
            vocab_size=args.vocab_size,
        )
        save_tokenizer(tok, args.out, model_max_length=args.model_max_length)
        print(f"trained in {time.perf_counter() - start:.1f}s; saved to {args.out}")
    tok = tokenizers.Tokenizer.from_file(str(args.out / "tokenizer.json"))
    heldout = [d["text"] for d in read_jsonl(args.corpus / "heldout.jsonl")]
    bad = [t for t in heldout if tok.decode(tok.encode(t).ids, skip_special_tokens=True) != t]
    print(
        f"vocab_size={tok.get_vocab_size()} bos={BOS}:{tok.token_to_id(BOS)} "
        f"eos={EOS}:{tok.token_to_id(EOS)} pad={PAD}:{tok.token_to_id(PAD)}"
    )
    print(f"heldout tokens/char={tokens_per_char(tok, heldout):.4f}")
    print(f"heldout round-trip failures: {len(bad)} of {len(heldout)} documents")
    if args.write_ids or args.ids_only:
        counts = tokenize_corpus(args.corpus, args.out)
        for split, n in counts.items():
            print(f"{split}_ids.npy: {n:,} tokens")


if __name__ == "__main__":
    sys.exit(cli.run(main))
