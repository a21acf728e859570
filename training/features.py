"""Draft training data: token ids, loss masks and the base model's features, on disk or online.

Mirrors the reference's `ge_data/*.py` (spec 4.1): the base model teacher-forces each sequence
and its last-layer hidden states AFTER the final norm (the tensor `lm_head` reads) are stored
with the token ids and a loss mask. Inputs:

* conversations, ShareGPT-like (`{"conversations": [{"from": "human" | "gpt", "value": ...}]}`,
  one per JSONL line or a JSON list): rendered with the tokenizer's chat template; the mask
  covers the assistant turns (content plus the end-of-turn text), found from the character spans
  of each assistant turn (render every prefix with the template, diff the lengths) mapped to
  tokens through the fast tokenizer's offsets; with a template that marks `{% generation %}`,
  transformers' `return_assistant_tokens_mask` is used instead;
* plain text: `{"text": ...}` JSONL (the `training.corpus` files) or any other file read whole;
  the mask covers every token but the first; texts longer than `max_len` are cut into windows.

`python -m training.features --base DIR --data FILE... --out DIR` writes shards
`shard_00000.safetensors` ... (per shard, sequences concatenated: `ids` [N] uint16 or int32,
`hidden` [N, D], `mask` [N] uint8, `offsets` [S+1] int64) and `manifest.json`. Hidden states are
stored as float16 by default: the final RMSNorm bounds them (|f| <= max|norm weight| * sqrt(D),
far inside f16's range; an overflow is checked and reported), and f16 keeps 11 significant bits
where bf16 keeps 8, so the regression targets are 8x finer at the same size (`--hidden-dtype
bfloat16` for bases with huge norm weights, `float32` for exact tests). The total size is printed
before anything is written. A shard is written to a temporary name and renamed, and the manifest
is updated after each shard, so a killed run restarted with the same command continues after the
last complete shard (the manifest's fingerprint of the tokenized data and the base refuses a
resume against other inputs).

Sequences are grouped by length bucket (powers of two) and batched to a token budget, so the base
forward compiles once per bucket. `base_features` is the same forward as a pure function: the
trainer's `--online` mode calls it inside the train step, with no disk cache.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import pathlib
import sys
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from griffin_jax import cli
from griffin_jax import model as base_model
from griffin_jax.checks import InputError
from griffin_jax.config import ModelConfig
from griffin_jax.kv_cache import causal_mask, init_cache
from training import args as args_lib

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
HIDDEN_DTYPES = {"float16": np.float16, "bfloat16": jnp.bfloat16, "float32": np.float32}
_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bard": "assistant",
    "bing": "assistant",
    "system": "system",
}


@dataclasses.dataclass(frozen=True)
class Example:
    """One tokenized sequence: ids [n] int32 and its loss mask [n] uint8."""

    ids: np.ndarray
    mask: np.ndarray


# ---------------------------------------------------------------------------------------------
# Tokenization and masks


def chat_messages(record: dict[str, Any], *, system: str | None = None) -> list[dict[str, str]]:
    """ShareGPT `conversations` -> chat-template messages (roles user / assistant / system).

    As the reference: a conversation whose first turn is not from the human loses that turn.
    Raises ValueError when user and assistant turns do not alternate.
    """
    turns = [(_ROLES[t["from"].lower()], t["value"]) for t in record["conversations"]]
    messages: list[dict[str, str]] = []
    if turns and turns[0][0] == "system":
        messages.append({"role": "system", "content": turns[0][1]})
        turns = turns[1:]
    elif system is not None:
        messages.append({"role": "system", "content": system})
    if turns and turns[0][0] != "user":
        turns = turns[1:]
    for i, (role, content) in enumerate(turns):
        if role != ("user" if i % 2 == 0 else "assistant"):
            raise ValueError(f"turn {i} is {role!r}: roles must alternate user / assistant")
        messages.append({"role": role, "content": content})
    return messages


def _render(tokenizer, messages: list[dict[str, str]], *, generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=generation_prompt
    )


def chat_example(tokenizer, messages: list[dict[str, str]], *, max_len: int) -> Example:
    """Tokenizes a conversation with the chat template; the mask covers the assistant turns.

    Each assistant turn k spans, in the rendered text, from the end of
    render(messages[:k], add_generation_prompt=True) (its role header included before) to the end
    of render(messages[:k+1]) (its end-of-turn text included). A token is in the mask when its
    first character lies in such a span. Position 0 is always out (spec 4.1).
    """
    template = tokenizer.chat_template or ""
    if "{% generation %}" in template or "{%- generation %}" in template:
        out = tokenizer.apply_chat_template(
            messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
        ids = np.asarray(out["input_ids"], np.int32)
        mask = np.asarray(out["assistant_masks"], np.uint8)
    else:
        text = _render(tokenizer, messages, generation_prompt=False)
        spans = []
        for k, msg in enumerate(messages):
            if msg["role"] != "assistant":
                continue
            head = _render(tokenizer, messages[:k], generation_prompt=True)
            turn = _render(tokenizer, messages[: k + 1], generation_prompt=False)
            if not (text.startswith(head) and text.startswith(turn)):
                raise ValueError("the chat template does not render prefixes as text prefixes")
            spans.append((len(head), len(turn)))
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = np.asarray(enc["input_ids"], np.int32)
        starts = np.asarray([s for s, _ in enc["offset_mapping"]], np.int64)
        mask = np.zeros(len(ids), np.uint8)
        for lo, hi in spans:
            mask |= ((starts >= lo) & (starts < hi)).astype(np.uint8)
    ids, mask = ids[:max_len], mask[:max_len].copy()
    mask[:1] = 0
    return Example(ids, mask)


def text_examples(tokenizer, text: str, *, max_len: int) -> list[Example]:
    """Tokenizes plain text (special tokens as the tokenizer adds them, e.g. BOS), cut into
    windows of `max_len`; the mask covers every token but the first of each window."""
    # verbose=False: long texts are windowed below, so the model_max_length warning is noise.
    ids = np.asarray(tokenizer(text, verbose=False)["input_ids"], np.int32)
    out = []
    for start in range(0, len(ids), max_len):
        window = ids[start : start + max_len]
        if len(window) >= 2:
            mask = np.ones(len(window), np.uint8)
            mask[0] = 0
            out.append(Example(window, mask))
    return out


def iter_records(path: pathlib.Path) -> Iterator[dict[str, Any] | str]:
    """JSON records of a `.jsonl` / `.json` file, or the whole text of any other file.

    Invalid JSON or text that is not UTF-8 raises `InputError` naming the file (and line).
    """
    try:
        if path.suffix == ".jsonl":
            with open(path, encoding="utf-8") as f:
                for lineno, line in enumerate(f, 1):
                    if line.strip():
                        try:
                            yield json.loads(line)
                        except ValueError as err:
                            raise InputError(f"{path}:{lineno}: invalid JSON ({err})") from err
        elif path.suffix == ".json":
            with open(path, encoding="utf-8") as f:
                try:
                    data = json.load(f)
                except json.JSONDecodeError as err:
                    raise InputError(f"{path}: invalid JSON ({err})") from err
            yield from data if isinstance(data, list) else [data]
        else:
            yield path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise InputError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from err


def load_examples(
    paths: Sequence[str | os.PathLike],
    tokenizer,
    *,
    max_len: int,
    system: str | None = None,
    limit: int | None = None,
) -> tuple[list[Example], dict[str, int]]:
    """Tokenizes every input in order (deterministic: the shards and resumes depend on it).

    Returns:
      (examples, counts {"chat", "text", "skipped"}); sequences with fewer than 2 tokens or an
      empty mask are skipped, and so are conversations whose roles do not alternate.
    """
    examples: list[Example] = []
    counts = {"chat": 0, "text": 0, "skipped": 0}
    for path in map(pathlib.Path, paths):
        for record in iter_records(path):
            if limit is not None and len(examples) >= limit:
                return examples, counts
            if isinstance(record, dict) and "conversations" in record:
                try:
                    msgs = chat_messages(record, system=system)
                except (ValueError, KeyError):
                    counts["skipped"] += 1
                    continue
                if not any(m["role"] == "assistant" for m in msgs):
                    counts["skipped"] += 1
                    continue
                if not tokenizer.chat_template:
                    raise ValueError(
                        f"{path} holds conversations but the tokenizer has no chat template "
                        "(pass --chat-template FILE)"
                    )
                new = [chat_example(tokenizer, msgs, max_len=max_len)]
                kind = "chat"
            else:
                text = record.get("text") if isinstance(record, dict) else record
                if not isinstance(text, str):
                    raise InputError(
                        f'{path}: a record is neither a conversation ({{"conversations": '
                        f'[...]}}) nor text ({{"text": "..."}}): {str(record)[:60]}'
                    )
                new = text_examples(tokenizer, text, max_len=max_len)
                kind = "text"
            for ex in new:
                if len(ex.ids) >= 2 and ex.mask[: len(ex.ids) - 1].any():
                    examples.append(ex)
                    counts[kind] += 1
                else:
                    counts["skipped"] += 1
    return examples, counts


def load_tokenizer(folder: str | os.PathLike, *, chat_template: str | None = None):
    """`AutoTokenizer.from_pretrained(folder)` (fast), optionally with a chat template file."""
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(str(folder))
    if chat_template is not None:
        tok.chat_template = pathlib.Path(chat_template).read_text()
    return tok


# ---------------------------------------------------------------------------------------------
# The base forward


def bucket_length(n: int, *, min_bucket: int = 32, max_len: int | None = None) -> int:
    """The smallest power of two >= n (at least min_bucket), capped at max_len."""
    b = max(min_bucket, 1 << max(int(n) - 1, 0).bit_length())
    return b if max_len is None else max(min(b, max_len), int(n))


def base_outputs(
    params, tokens: jax.Array, *, cfg: ModelConfig, feature_layers: tuple[int, ...] = ()
) -> tuple[jax.Array, jax.Array]:
    """The base's logits and draft features for right-padded tokens (no cache: T slots).

    Causal, so the padding never changes the outputs of real positions. No gradient flows into
    the base.

    Args:
      params: base params.  tokens: [B, T] int32.
      feature_layers: `draft.feature_layers` (() = the final normed hidden state).
    Returns:
      logits [B, T, V] f32, features [B, T, D] (or [B, T, 3D] for EAGLE-3's three layers) in
      the params' dtype.
    """
    b, t = tokens.shape
    dtype = params["embed_tokens"]["embedding"].dtype
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    zero = jnp.zeros((b,), jnp.int32)
    logits, feats, _ = base_model.forward(
        params,
        tokens,
        positions,
        init_cache(cfg, b, t, dtype),
        write_idx=zero,
        mask=causal_mask(zero, t, t),
        cfg=cfg,
        feature_layers=feature_layers,
    )
    return jax.lax.stop_gradient(logits), jax.lax.stop_gradient(feats)


def base_features(params, tokens: jax.Array, *, cfg: ModelConfig) -> jax.Array:
    """The base's final normed hidden states [B, T, D] (`base_outputs`; XLA drops the unused
    logits)."""
    return base_outputs(params, tokens, cfg=cfg)[1]


_jit_base_features = jax.jit(base_features, static_argnames=("cfg",))


def plan_batches(
    lengths: Sequence[int], *, tokens_per_batch: int, min_bucket: int, max_len: int
) -> list[tuple[int, list[int]]]:
    """Groups sequence indices by length bucket into batches of <= tokens_per_batch tokens.

    Returns:
      [(bucket, [indices])], a fixed batch size per bucket (the last batch of a bucket is
      padded with dummy rows by the caller, so each bucket compiles once).
    """
    by_bucket: dict[int, list[int]] = {}
    for i, n in enumerate(lengths):
        by_bucket.setdefault(bucket_length(n, min_bucket=min_bucket, max_len=max_len), []).append(i)
    plan = []
    for bucket in sorted(by_bucket):
        rows = max(1, tokens_per_batch // bucket)
        idx = by_bucket[bucket]
        plan += [(bucket, idx[i : i + rows]) for i in range(0, len(idx), rows)]
    return plan


def compute_features(
    params,
    examples: Sequence[Example],
    *,
    cfg: ModelConfig,
    tokens_per_batch: int = 8192,
    min_bucket: int = 32,
    max_len: int = 2048,
    progress=None,
) -> list[np.ndarray]:
    """Runs the base over examples (bucketed, batched): hidden [n_i, D] f32 per example."""
    out: list[np.ndarray | None] = [None] * len(examples)
    plan = plan_batches(
        [len(e.ids) for e in examples],
        tokens_per_batch=tokens_per_batch,
        min_bucket=min_bucket,
        max_len=max_len,
    )
    for bucket, idx in plan:
        rows = max(1, tokens_per_batch // bucket)
        tokens = np.zeros((rows, bucket), np.int32)
        for r, i in enumerate(idx):
            tokens[r, : len(examples[i].ids)] = examples[i].ids
        hidden = np.asarray(
            _jit_base_features(params, jnp.asarray(tokens), cfg=cfg).astype(jnp.float32)
        )
        for r, i in enumerate(idx):
            out[i] = hidden[r, : len(examples[i].ids)]
            if progress is not None:
                progress.update(len(examples[i].ids))
    return out  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------
# Shards


def _fingerprint(examples: Sequence[Example], cfg: ModelConfig, extra: dict[str, Any]) -> str:
    h = hashlib.sha1()
    h.update(json.dumps({"cfg": repr(cfg), **extra}, sort_keys=True).encode())
    for ex in examples:
        h.update(np.int64(len(ex.ids)).tobytes())
        h.update(ex.ids.astype(np.int32).tobytes())
        h.update(ex.mask.astype(np.uint8).tobytes())
    return h.hexdigest()


def fingerprint(
    examples: Sequence[Example],
    *,
    cfg: ModelConfig,
    shard_size: int,
    hidden_dtype: str,
    max_len: int,
    meta: dict[str, Any] | None,
) -> str:
    """What a feature folder was made from: the tokenized data, the base config and the layout."""
    extra = {"shard_size": shard_size, "hidden_dtype": hidden_dtype, "max_len": max_len}
    return _fingerprint(examples, cfg, {**extra, **(meta or {})})


def check_resumable(out: pathlib.Path, fp: str) -> None:
    """A folder with a manifest continues only the run of the same fingerprint."""
    path = out / MANIFEST
    if not path.exists():
        return
    try:
        old = json.loads(path.read_text()).get("fingerprint")
    except (ValueError, AttributeError) as err:
        raise InputError(f"{path}: not a feature manifest ({err!r}); use another --out") from err
    if old != fp:
        raise InputError(
            f"{out} holds features of other data or another base (fingerprint mismatch); "
            "use another --out or delete it"
        )


def _shard_name(i: int) -> str:
    return f"shard_{i:05d}.safetensors"


def write_shard(
    path: pathlib.Path,
    examples: Sequence[Example],
    hidden: Sequence[np.ndarray],
    *,
    ids_dtype: Any,
    hidden_dtype: Any,
) -> None:
    """Writes one shard atomically (temporary name, then rename)."""
    from safetensors.numpy import save_file

    offsets = np.zeros(len(examples) + 1, np.int64)
    offsets[1:] = np.cumsum([len(e.ids) for e in examples])
    stored = np.concatenate(hidden).astype(hidden_dtype)
    if not np.all(np.isfinite(stored.astype(np.float32))):
        raise OverflowError(
            f"features overflow {np.dtype(hidden_dtype).name} (max |f| = "
            f"{np.abs(np.concatenate(hidden)).max():.4g}); use --hidden-dtype bfloat16"
        )
    tensors = {
        "ids": np.concatenate([e.ids for e in examples]).astype(ids_dtype),
        "mask": np.concatenate([e.mask for e in examples]).astype(np.uint8),
        "hidden": stored,
        "offsets": offsets,
    }
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp))
    os.replace(tmp, path)


def generate(
    params,
    examples: Sequence[Example],
    out_dir: str | os.PathLike,
    *,
    cfg: ModelConfig,
    shard_size: int = 1000,
    hidden_dtype: str = "float16",
    tokens_per_batch: int = 8192,
    min_bucket: int = 32,
    max_len: int = 2048,
    max_new_shards: int | None = None,
    meta: dict[str, Any] | None = None,
    log=print,
) -> dict[str, Any]:
    """Writes feature shards for `examples` (in order) under out_dir, resuming a killed run.

    Args:
      params: base params.  examples: tokenized sequences (see `load_examples`).
      shard_size: sequences per shard.  hidden_dtype: "float16" | "bfloat16" | "float32".
      max_new_shards: stop after writing this many shards (the rest on the next call).
      meta: extra manifest fields (sources, base folder, ...).
    Returns:
      The manifest (also written to out_dir/manifest.json); `complete` tells whether every
      shard is there.
    """
    from tqdm.auto import tqdm

    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ids_dtype = np.uint16 if cfg.vocab_size <= 65536 else np.int32
    h_dtype = HIDDEN_DTYPES[hidden_dtype]
    num_shards = -(-len(examples) // shard_size)
    fp = fingerprint(
        examples,
        cfg=cfg,
        shard_size=shard_size,
        hidden_dtype=hidden_dtype,
        max_len=max_len,
        meta=meta,
    )
    manifest_path = out / MANIFEST
    check_resumable(out, fp)
    manifest: dict[str, Any] = {
        "version": FORMAT_VERSION,
        "fingerprint": fp,
        "d_model": cfg.d_model,
        "vocab_size": cfg.vocab_size,
        "ids_dtype": np.dtype(ids_dtype).name,
        "hidden_dtype": hidden_dtype,
        "max_len": max_len,
        "shard_size": shard_size,
        "num_seqs": len(examples),
        "num_tokens": int(sum(len(e.ids) for e in examples)),
        "num_shards": num_shards,
        "shards": [],
        "complete": False,
        **(meta or {}),
    }
    if manifest_path.exists():
        old = json.loads(manifest_path.read_text())
        manifest["shards"] = [s for s in old["shards"] if (out / s["file"]).exists()]
    for stale in out.glob("*.tmp"):
        stale.unlink()
    done = len(manifest["shards"])
    per_token = cfg.d_model * np.dtype(h_dtype).itemsize + np.dtype(ids_dtype).itemsize + 1
    total_bytes = manifest["num_tokens"] * per_token
    todo_tokens = sum(len(e.ids) for e in examples[done * shard_size :])
    log(
        f"features: {len(examples):,} sequences, {manifest['num_tokens']:,} tokens, "
        f"{num_shards} shards, about {_size(total_bytes)} on disk "
        f"({hidden_dtype} hidden, D={cfg.d_model}); {done} shards already done, "
        f"{_size(todo_tokens * per_token)} to write"
    )
    written = 0
    with tqdm(total=todo_tokens, desc="features", unit="tok", dynamic_ncols=True) as bar:
        for shard in range(done, num_shards):
            if max_new_shards is not None and written >= max_new_shards:
                break
            part = examples[shard * shard_size : (shard + 1) * shard_size]
            hidden = compute_features(
                params,
                part,
                cfg=cfg,
                tokens_per_batch=tokens_per_batch,
                min_bucket=min_bucket,
                max_len=max_len,
                progress=bar,
            )
            name = _shard_name(shard)
            write_shard(out / name, part, hidden, ids_dtype=ids_dtype, hidden_dtype=h_dtype)
            manifest["shards"].append(
                {
                    "file": name,
                    "num_seqs": len(part),
                    "num_tokens": int(sum(len(e.ids) for e in part)),
                }
            )
            manifest["complete"] = len(manifest["shards"]) == num_shards
            _write_json(manifest_path, manifest)
            written += 1
    manifest["complete"] = len(manifest["shards"]) == num_shards
    _write_json(manifest_path, manifest)
    return manifest


def _size(num_bytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if num_bytes < 1024 or unit == "GiB":
            return f"{num_bytes:.1f} {unit}"
        num_bytes /= 1024
    return ""


def _write_json(path: pathlib.Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)


class FeatureStore:
    """Random access to a feature folder: `store[i] -> (ids int32 [n], hidden f32 [n, D], mask)`.

    Tensors are read lazily per sequence (safetensors slices), so a large dataset is never
    loaded whole.
    """

    def __init__(self, folder: str | os.PathLike, *, require_complete: bool = True) -> None:
        self.folder = pathlib.Path(folder)
        path = self.folder / MANIFEST
        try:
            self.manifest = json.loads(path.read_text())
            complete, shards = self.manifest["complete"], self.manifest["shards"]
        except (ValueError, KeyError, TypeError) as err:
            raise InputError(f"{path}: not a feature manifest ({err!r})") from err
        if require_complete and not complete:
            raise InputError(
                f"{self.folder}: feature generation is not complete (rerun training.features "
                "with the same arguments to finish it)"
            )
        for shard in shards:
            if not (self.folder / shard["file"]).is_file():
                raise InputError(f"{self.folder}: shard {shard['file']} of the manifest is missing")
        self._files: dict[str, Any] = {}
        index, lengths = [], []
        for shard in self.manifest["shards"]:
            offsets = self._open(shard["file"]).get_tensor("offsets")
            for j in range(len(offsets) - 1):
                index.append((shard["file"], int(offsets[j]), int(offsets[j + 1])))
                lengths.append(int(offsets[j + 1] - offsets[j]))
        self.index = index
        self.lengths = np.asarray(lengths, np.int64)
        self.d_model = int(self.manifest["d_model"])

    def _open(self, name: str):
        from safetensors import safe_open

        if name not in self._files:
            self._files[name] = safe_open(str(self.folder / name), framework="numpy")
        return self._files[name]

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        name, lo, hi = self.index[i]
        f = self._open(name)
        ids = f.get_slice("ids")[lo:hi].astype(np.int32)
        hidden = f.get_slice("hidden")[lo:hi].astype(np.float32)
        mask = f.get_slice("mask")[lo:hi]
        return ids, hidden, mask

    def example(self, i: int) -> Example:
        ids, _, mask = self[i]
        return Example(ids, mask)


# ---------------------------------------------------------------------------------------------
# CLI


def parse_args(argv: Iterable[str] | None = None) -> argparse.Namespace:
    p = cli.ArgumentParser(
        prog="python -m training.features",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--base", type=pathlib.Path, required=True, help="base model folder (HF)")
    p.add_argument("--tokenizer", type=pathlib.Path, default=None, help="default: --base")
    p.add_argument("--chat-template", default=None, help="a Jinja chat template file")
    p.add_argument("--system", default=None, help="system prompt for conversations without one")
    p.add_argument("--data", nargs="+", required=True, help="JSONL/JSON conversations or texts")
    p.add_argument("--out", type=pathlib.Path, required=True)
    p.add_argument("--max-len", type=int, default=2048)
    p.add_argument("--limit", type=int, default=None, help="use the first N sequences")
    p.add_argument("--shard-size", type=int, default=1000)
    p.add_argument("--hidden-dtype", choices=sorted(HIDDEN_DTYPES), default="float16")
    p.add_argument(
        "--dtype", default=None, help="base compute dtype, f32 | bf16 | f16 (default: checkpoint's)"
    )
    p.add_argument("--tokens-per-batch", type=int, default=8192)
    p.add_argument("--min-bucket", type=int, default=32)
    p.add_argument("--max-new-shards", type=int, default=None)
    args = p.parse_args(argv)
    for name, minimum in (
        ("max_len", 2),
        ("limit", 1),
        ("shard_size", 1),
        ("tokens_per_batch", 1),
        ("min_bucket", 1),
        ("max_new_shards", 1),
    ):
        args_lib.at_least(getattr(args, name), "--" + name.replace("_", "-"), minimum)
    if args.dtype is not None and args.dtype not in ("f32", "bf16", "f16", *HIDDEN_DTYPES):
        raise InputError(f"--dtype {args.dtype!r} is not one of f32, bf16, f16")
    return args


def check_inputs(args: argparse.Namespace) -> ModelConfig:
    """Checks the paths (before any model is loaded or anything written); returns the base's
    config from its config.json."""
    from convert.load_hf import load_hf_config

    args_lib.folder(args.base, "--base", needs=("config.json",), hint="a HF model folder")
    cfg = load_hf_config(args.base)
    args_lib.folder(args.tokenizer or args.base, "--tokenizer" if args.tokenizer else "--base")
    if args.chat_template is not None:
        cli.input_file(pathlib.Path(args.chat_template), "--chat-template")
    for path in args.data:
        cli.input_file(pathlib.Path(path), "--data")
    args_lib.out_folder(args.out)
    return cfg


def check_positions(examples: Sequence[Example], cfg: ModelConfig, *, flag: str) -> None:
    """Every sequence within the base's positions (RoPE past them was never trained)."""
    longest = max((len(e.ids) for e in examples), default=0)
    limit = cfg.max_position_embeddings
    if limit is not None and longest > limit:
        raise InputError(
            f"{flag} has sequences of {longest} tokens, past the base's {limit} positions "
            f"(max_position_embeddings); pass --max-len {limit} or less"
        )


def main(argv: Iterable[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = check_inputs(args)
    tok = load_tokenizer(args.tokenizer or args.base, chat_template=args.chat_template)
    examples, counts = load_examples(
        args.data, tok, max_len=args.max_len, system=args.system, limit=args.limit
    )
    if not examples:
        raise InputError(f"--data holds no usable sequence ({counts['skipped']} skipped)")
    check_positions(examples, cfg, flag="--data")
    layout = dict(shard_size=args.shard_size, hidden_dtype=args.hidden_dtype, max_len=args.max_len)
    meta = {"base": str(args.base), "data": [str(d) for d in args.data]}
    check_resumable(args.out, fingerprint(examples, cfg=cfg, meta=meta, **layout))
    print(f"tokenized: {counts}", file=sys.stderr)
    from convert.load_hf import load_hf

    cfg, params = load_hf(args.base, args.dtype)
    manifest = generate(
        params,
        examples,
        args.out,
        cfg=cfg,
        tokens_per_batch=args.tokens_per_batch,
        min_bucket=args.min_bucket,
        max_new_shards=args.max_new_shards,
        meta=meta,
        log=lambda msg: print(msg, file=sys.stderr),
        **layout,
    )
    state = "complete" if manifest["complete"] else "incomplete (rerun to continue)"
    print(f"{len(manifest['shards'])}/{manifest['num_shards']} shards: {state}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
