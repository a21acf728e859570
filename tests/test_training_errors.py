"""Bad input to the training entry points: one line on stderr, exit status 2, no model loaded.

Every `python -m training.*` entry point runs through `griffin_jax.cli.run`. One table row per
bad flag value, file or flag combination: `cli.run(module.main, argv)` must return 2 with exactly
one `error:` line naming the problem, before the entry point's work starts (the model load, the
tokenizer training, ... are replaced by a sentinel that raises) and with nothing on disk changed.
Each table's good argv is shown to reach that work, so every row fails on its own flag. Last, a
pretraining run resumes past a broken newest checkpoint.
"""

from __future__ import annotations

import json
import pathlib
import shutil

import numpy as np
import pytest

from griffin_jax import cli
from griffin_jax.config import ModelConfig
from training import common, corpus, draft_vocab, features, heldout_prompts, pretrain, tokenizer
from training import train as train_cli

BASE = ModelConfig(
    vocab_size=320,
    d_model=32,
    n_layers=1,
    n_heads=4,
    n_kv_heads=2,
    head_dim=8,
    d_ff=64,
    max_position_embeddings=256,
)
TEXTS = ["def f(x):\n    return x + 1\n" * 8, "import os\nprint(os.getcwd())\n" * 8, "a = 1\n" * 30]
NUM_SEQS, SEQ = 12, 16


class WorkStarted(Exception):
    """Raised where an entry point's real work (a model load, training, writing) would start."""


def _write_features(folder: pathlib.Path, *, d_model: int, complete: bool = True) -> None:
    rng = np.random.default_rng(0)
    examples = [
        features.Example(rng.integers(0, 300, SEQ).astype(np.int32), np.ones(SEQ, np.uint8))
        for _ in range(NUM_SEQS)
    ]
    hidden = [rng.normal(size=(SEQ, d_model)).astype(np.float32) for _ in examples]
    folder.mkdir()
    features.write_shard(
        folder / "shard_00000.safetensors",
        examples,
        hidden,
        ids_dtype=np.uint16,
        hidden_dtype=np.float32,
    )
    shard = {"file": "shard_00000.safetensors", "num_seqs": NUM_SEQS}
    manifest = {"complete": complete, "shards": [shard], "d_model": d_model}
    (folder / features.MANIFEST).write_text(json.dumps(manifest))


def _ids(folder: pathlib.Path, train, heldout=None) -> None:
    folder.mkdir()
    np.save(folder / "train_ids.npy", np.asarray(train, np.uint16))
    if heldout is not None:
        np.save(folder / "heldout_ids.npy", np.asarray(heldout, np.uint16))


def _jsonl(path: pathlib.Path, records: list) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> pathlib.Path:
    """Small real inputs for every entry point, and broken variants of them."""
    root = tmp_path_factory.mktemp("world")
    tok = tokenizer.train_tokenizer(TEXTS, vocab_size=300)
    tokenizer.save_tokenizer(tok, root / "base", model_max_length=256)
    (root / "base" / "config.json").write_text(json.dumps(BASE.to_hf()))
    _write_features(root / "feats", d_model=BASE.d_model)
    _write_features(root / "feats16", d_model=16)
    _write_features(root / "feats_incomplete", d_model=BASE.d_model, complete=False)
    (root / "feats_garbled").mkdir()
    (root / "feats_garbled" / features.MANIFEST).write_text("{not json")
    _jsonl(root / "text.jsonl", [{"text": t} for t in TEXTS])
    _jsonl(root / "long.jsonl", [{"text": TEXTS[0] * 40}])
    (root / "empty.jsonl").write_text("")
    (root / "garbled.jsonl").write_text('{"text": "ok"}\n{not json\n')
    _jsonl(root / "notext.jsonl", [{"title": "no text field"}])
    (root / "binary.txt").write_bytes(b"\xff\xfe\x00binary")
    rng = np.random.default_rng(1)
    _ids(root / "tokens", rng.integers(0, 300, 4000), rng.integers(0, 300, 600))
    _ids(root / "tokens_train_only", rng.integers(0, 300, 4000))
    _ids(root / "tokens_short", np.arange(10), np.arange(10))
    _ids(root / "tokens_oov", np.r_[rng.integers(0, 300, 4000), 5000], np.arange(600))
    _ids(root / "tokens_empty", [], [])
    _ids(root / "tokens_garbage", [], np.arange(600))
    (root / "tokens_garbage" / "train_ids.npy").write_bytes(b"not an npy file")
    for name, train_docs, heldout_docs in (
        ("corpus", TEXTS, TEXTS[:1]),
        ("corpus_empty", [], TEXTS[:1]),
        ("corpus_no_heldout", TEXTS, None),
    ):
        (root / name).mkdir()
        _jsonl(root / name / "train.jsonl", [{"text": t} for t in train_docs])
        if heldout_docs is not None:
            _jsonl(root / name / "heldout.jsonl", [{"text": t} for t in heldout_docs])
    shutil.copytree(root / "corpus", root / "corpus_garbled")
    (root / "corpus_garbled" / "train.jsonl").write_text('{"text": "a"}\n{"text": \n')
    (root / "afile").write_text("a plain file\n")
    (root / "empty_dir").mkdir()
    # A stage-1 EAGLE-2 run folder, a draft run and a pretraining run with other configs.
    (root / "run_eagle" / "checkpoints" / "5").mkdir(parents=True)
    eagle = train_cli.draft_config(train_cli.parse_args(_argv(TRAIN, {})), BASE)
    (root / "run_eagle" / "draft_config.json").write_text(
        json.dumps({**eagle.to_hf(), "kind": "eagle2"})
    )
    (root / "done_train" / "checkpoints" / "3").mkdir(parents=True)
    other = {**eagle.to_hf(), "kind": "griffin", "intermediate_size": 999}
    (root / "done_train" / "draft_config.json").write_text(json.dumps(other))
    (root / "done_pre" / "checkpoints" / "10").mkdir(parents=True)
    (root / "done_pre" / "config.json").write_text(json.dumps({**BASE.to_hf(), "vocab_size": 64}))
    (root / "feats_other").mkdir()
    (root / "feats_other" / features.MANIFEST).write_text(json.dumps({"fingerprint": "other"}))
    return root


@pytest.fixture(autouse=True)
def no_work(monkeypatch):
    """Every entry point's work raises `WorkStarted` (no model is loaded, nothing trained)."""
    import convert.load_draft
    import convert.load_hf
    import griffin_jax.model

    def started(*args, **kwargs):
        raise WorkStarted

    for module, name in (
        (convert.load_hf, "load_hf"),
        (convert.load_hf, "load_hf_params"),
        (convert.load_draft, "load_draft"),
        (griffin_jax.model, "init_params"),
        (corpus, "build_corpus"),
        (tokenizer, "train_tokenizer"),
        (heldout_prompts, "heldout_stdlib_files"),
        (draft_vocab, "write_ranking"),
    ):
        monkeypatch.setattr(module, name, started)


def _argv(good: dict, overrides: dict, root: pathlib.Path | str = "") -> list[str]:
    """argv from a flag table: a value None drops the flag, True leaves it bare."""
    argv = []
    for flag, value in {**good, **overrides}.items():
        if value is None:
            continue
        argv.append(flag)
        if value is not True:
            argv.append(str(value).replace("{root}", str(root)))
    return argv


def _listing(root: pathlib.Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


TRAIN = {
    "--base": "{root}/base",
    "--features": "{root}/feats",
    "--out": "{root}/new_out",
    "--steps": 10,
    "--batch": 4,
    "--eval-frac": 0.25,
    "--warmup": 2,
    "--schedule-steps": 100,
}
ONLINE = {"--features": None, "--online": True, "--corpus": "{root}/text.jsonl", "--max-len": 64}
PRETRAIN = {
    "--tokens": "{root}/tokens",
    "--tokenizer": "{root}/base",
    "--out": "{root}/new_out",
    "--d-model": 32,
    "--n-layers": 1,
    "--n-heads": 4,
    "--n-kv-heads": 2,
    "--d-ff": 64,
    "--max-position": 64,
    "--seq-len": 16,
    "--batch": 2,
    "--steps": 10,
    "--warmup": 2,
    "--eval-windows": 2,
}
FEATURES = {
    "--base": "{root}/base",
    "--data": "{root}/text.jsonl",
    "--out": "{root}/new_out",
    "--max-len": 64,
}
CORPUS = {"--out": "{root}/new_out", "--no-docs": True}
TOKENIZER = {"--corpus": "{root}/corpus", "--out": "{root}/new_out", "--vocab-size": 300}
PROMPTS = {"--out": "{root}/new_out/question.jsonl"}
DRAFT_VOCAB = {"--tokens": "{root}/tokens", "--out": "{root}/new_out", "--vocab-size": 320}

ENTRY_POINTS = {
    "train": (train_cli, TRAIN),
    "pretrain": (pretrain, PRETRAIN),
    "features": (features, FEATURES),
    "corpus": (corpus, CORPUS),
    "tokenizer": (tokenizer, TOKENIZER),
    "heldout_prompts": (heldout_prompts, PROMPTS),
    "draft_vocab": (draft_vocab, DRAFT_VOCAB),
}

# (entry point, flags changed from its good argv, a fragment of the one error line)
CASES = {
    "train": {
        "steps_zero": ({"--steps": 0}, "--steps must be >= 1, got 0"),
        "steps_negative": ({"--steps": -3}, "--steps must be >= 1"),
        "steps_not_a_number": ({"--steps": "ten"}, "invalid int value: 'ten'"),
        "steps_missing": ({"--steps": None}, "required: --steps"),
        "unknown_flag": ({"--bogus": True}, "unrecognized arguments: --bogus"),
        "batch_zero": ({"--batch": 0}, "--batch must be >= 1"),
        "batch_larger_than_the_data": ({"--batch": 16}, "fewer than one --batch 16"),
        "lr_nan": ({"--lr": "nan"}, "--lr must be finite and >= 0, got nan"),
        "lr_negative": ({"--lr": -1e-3}, "--lr must be finite and >= 0, got -0.001"),
        "warmup_past_steps": ({"--warmup": 20}, "--warmup 20 exceeds --steps 10"),
        "warmup_past_schedule": (
            {"--steps": 500, "--warmup": 200},
            "--warmup 200 exceeds --schedule-steps 100",
        ),
        "warmup_negative": ({"--warmup": -1}, "--warmup must be >= 0"),
        "schedule_steps_zero": ({"--schedule-steps": 0}, "--schedule-steps must be >= 1"),
        "weight_decay_negative": (
            {"--weight-decay": -0.1},
            "--weight-decay must be finite and >= 0",
        ),
        "clip_value_zero": ({"--clip-value": 0}, "--clip-value must be > 0"),
        "noise_std_negative": ({"--noise-std": -0.1}, "--noise-std must be finite and >= 0"),
        "noise_std_inf": ({"--noise-std": "inf"}, "--noise-std must be finite and >= 0, got inf"),
        "seed_negative": ({"--seed": -1}, "--seed must be >= 0"),
        "devices_zero": ({"--devices": 0}, "--devices must be >= 1"),
        "devices_too_many": ({"--devices": 4096}, "--devices 4096: only"),
        "devices_not_a_number": ({"--devices": "all"}, "invalid int value: 'all'"),
        "stage_zero": ({"--stage": 0}, "--stage must be >= 1"),
        "eagle2_stage_2": ({"--draft-kind": "eagle2", "--stage": 2}, "EAGLE-2"),
        "draft_kind_unknown": ({"--draft-kind": "medusa"}, "invalid choice: 'medusa'"),
        "eagle3_offline": ({"--draft-kind": "eagle3"}, "EAGLE-3 drafts train --online"),
        "eagle3_stage_2": ({**ONLINE, "--draft-kind": "eagle3", "--stage": 2}, "--ttt-steps"),
        "eagle3_one_layer_base": (
            {**ONLINE, "--draft-kind": "eagle3"},
            "a base of 1 layers has no three distinct ones",
        ),
        "draft_vocab_for_griffin": (
            {"--draft-vocab-size": 64},
            "only apply to --draft-kind eagle3",
        ),
        "draft_vocab_without_ranking": (
            {**ONLINE, "--draft-kind": "eagle3", "--draft-vocab-size": 64},
            "needs --vocab-ranking",
        ),
        "vocab_ranking_missing": (
            {
                **ONLINE,
                "--draft-kind": "eagle3",
                "--draft-vocab-size": 64,
                "--vocab-ranking": "{root}/nope.safetensors",
            },
            "no such file",
        ),  # fmt: skip
        "ttt_steps_zero": ({"--ttt-steps": 0}, "--ttt-steps must be >= 1"),
        "draft_heads_not_dividing": ({"--draft-heads": 3}, "--draft-heads"),
        "draft_kv_heads_not_dividing": ({"--draft-kv-heads": 3}, "--draft-kv-heads"),
        "draft_d_ff_zero": ({"--draft-d-ff": 0}, "--draft-d-ff must be >= 1"),
        "topk_train_zero": ({"--topk-train": 0}, "--topk-train must be >= 1"),
        "mask_mode_unknown": ({"--mask-mode": "causal"}, "invalid choice: 'causal'"),
        "init_missing": ({"--init": "{root}/nope"}, "nope: no such folder"),
        "init_is_a_file": ({"--init": "{root}/afile"}, "is a file, not a folder"),
        "init_not_a_draft": ({"--init": "{root}/empty_dir"}, "neither a draft folder"),
        "init_other_kind": ({"--init": "{root}/run_eagle"}, "holds a eagle2 draft"),
        "init_with_draft_shape": (
            {"--init": "{root}/run_eagle", "--draft-heads": 2},
            "--draft-heads cannot change the draft",
        ),
        "resume_without_checkpoint": ({"--resume": True}, "--resume: no checkpoint"),
        "resume_other_draft": (
            {"--out": "{root}/done_train", "--resume": True},
            "differs from the draft these flags build",
        ),
        "out_holds_checkpoints": ({"--out": "{root}/done_train"}, "already holds checkpoints"),
        "out_is_a_file": ({"--out": "{root}/afile"}, "is a file; pass a folder"),
        "out_under_a_file": ({"--out": "{root}/afile/run"}, "is a file; pass a folder"),
        "out_missing": ({"--out": None}, "required: --out"),
        "export_is_a_file": ({"--export": "{root}/afile"}, "--export"),
        "export_dtype_unknown": ({"--export-dtype": "f64"}, "--export-dtype 'f64'"),
        "base_dtype_unknown": ({"--base-dtype": "int8"}, "--base-dtype 'int8'"),
        "base_missing": ({"--base": "{root}/nope"}, "--base"),
        "base_without_config": ({"--base": "{root}/empty_dir"}, "has no config.json"),
        "features_missing": ({"--features": "{root}/nope"}, "--features"),
        "features_not_a_feature_folder": ({"--features": "{root}/empty_dir"}, "manifest.json"),
        "features_of_another_base": ({"--features": "{root}/feats16"}, "hidden size 16"),
        "features_incomplete": ({"--features": "{root}/feats_incomplete"}, "not complete"),
        "features_garbled_manifest": (
            {"--features": "{root}/feats_garbled"},
            "not a feature manifest",
        ),
        "no_data_source": ({"--features": None}, "give --features"),
        "features_and_online": ({"--online": True}, "exclude each other"),
        "online_without_corpus": ({**ONLINE, "--corpus": None}, "--online needs --corpus"),
        "corpus_without_online": ({"--corpus": "{root}/text.jsonl"}, "only apply with --online"),
        "tokenizer_without_online": ({"--tokenizer": "{root}/base"}, "only apply with --online"),
        "corpus_missing": ({**ONLINE, "--corpus": "{root}/nope.jsonl"}, "no such file"),
        "corpus_is_a_folder": ({**ONLINE, "--corpus": "{root}/empty_dir"}, "a folder, not a file"),
        "corpus_empty": ({**ONLINE, "--corpus": "{root}/empty.jsonl"}, "no usable training"),
        "corpus_garbled": ({**ONLINE, "--corpus": "{root}/garbled.jsonl"}, ":2: invalid JSON"),
        "chat_template_missing": ({**ONLINE, "--chat-template": "{root}/nope.j2"}, "no such"),
        "max_len_past_the_base": (
            {**ONLINE, "--corpus": "{root}/long.jsonl", "--max-len": 1024},
            "past the base's 256 positions",
        ),
        "max_len_one": ({"--max-len": 1}, "--max-len must be >= 2"),
        "limit_zero": ({**ONLINE, "--limit": 0}, "--limit must be >= 1"),
        "eval_frac_one": ({"--eval-frac": 1}, "--eval-frac must be < 1"),
        "eval_without_heldout": ({"--eval-frac": 0}, "--eval-every needs held-out"),
        "eval_depth_zero": ({"--eval-depth": 0}, "--eval-depth must be >= 1"),
        "ckpt_every_zero": ({"--ckpt-every": 0}, "--ckpt-every must be >= 1"),
        "log_every_zero": ({"--log-every": 0}, "--log-every must be >= 1"),
        "stop_at_zero": ({"--stop-at": 0}, "--stop-at must be >= 1"),
        "max_minutes_zero": ({"--max-minutes": 0}, "--max-minutes must be > 0"),
    },
    "pretrain": {
        "steps_zero": ({"--steps": 0}, "--steps must be >= 1"),
        "batch_zero": ({"--batch": 0}, "--batch must be >= 1"),
        "lr_nan": ({"--lr": "nan"}, "--lr must be finite, got nan"),
        "lr_zero": ({"--lr": 0}, "--lr must be > 0"),
        "warmup_past_steps": ({"--warmup": 20}, "--warmup 20 exceeds --steps 10"),
        "seed_negative": ({"--seed": -1}, "--seed must be >= 0"),
        "heads_not_dividing": ({"--d-model": 30}, "--d-model 30 / --n-heads 4"),
        "odd_head_dim": ({"--d-model": 12}, "even whole head dimension"),
        "kv_heads_not_dividing": ({"--n-kv-heads": 3}, "multiple of --n-kv-heads 3"),
        "layers_zero": ({"--n-layers": 0}, "--n-layers must be >= 1"),
        "seq_len_past_positions": ({"--seq-len": 100}, "--seq-len 100 exceeds --max-position"),
        "eval_every_zero": ({"--eval-every": 0}, "--eval-every must be >= 1"),
        "ckpt_every_zero": ({"--ckpt-every": 0}, "--ckpt-every must be >= 1"),
        "max_minutes_negative": ({"--max-minutes": -1}, "--max-minutes must be > 0"),
        "weight_decay_nan": ({"--weight-decay": "nan"}, "--weight-decay must be finite"),
        "tokens_missing": ({"--tokens": "{root}/nope"}, "nope: no such folder"),
        "tokens_is_a_file": ({"--tokens": "{root}/afile"}, "is a file, not a folder"),
        "tokens_without_heldout": (
            {"--tokens": "{root}/tokens_train_only"},
            "has no heldout_ids.npy",
        ),
        "tokens_too_short": ({"--tokens": "{root}/tokens_short"}, "holds 10 tokens"),
        "tokens_outside_vocab": ({"--tokens": "{root}/tokens_oov"}, "token id 5000, outside"),
        "tokens_not_npy": ({"--tokens": "{root}/tokens_garbage"}, "not a .npy token array"),
        "tokenizer_missing": ({"--tokenizer": "{root}/nope"}, "--tokenizer"),
        "tokenizer_without_json": ({"--tokenizer": "{root}/empty_dir"}, "has no tokenizer.json"),
        "out_is_a_file": ({"--out": "{root}/afile"}, "is a file; pass a folder"),
        "export_is_a_file": ({"--export": "{root}/afile"}, "--export"),
        "export_only_without_export": ({"--export-only": True}, "--export-only needs --export"),
        "export_only_without_checkpoint": (
            {"--export-only": True, "--export": "{root}/new_export"},
            "--export-only: no checkpoint",
        ),
        "resume_without_checkpoint": ({"--resume": True}, "--resume: no checkpoint"),
        "out_holds_checkpoints": ({"--out": "{root}/done_pre"}, "already holds checkpoints"),
        "resume_other_model": (
            {"--out": "{root}/done_pre", "--resume": True},
            "differs from the model these flags build",
        ),
        "unknown_flag": ({"--layers": 2}, "unrecognized arguments: --layers 2"),
    },
    "features": {
        "base_missing": ({"--base": "{root}/nope"}, "--base"),
        "base_without_config": ({"--base": "{root}/empty_dir"}, "has no config.json"),
        "data_missing_flag": ({"--data": None}, "required: --data"),
        "data_missing": ({"--data": "{root}/nope.jsonl"}, "no such file"),
        "data_is_a_folder": ({"--data": "{root}/empty_dir"}, "a folder, not a file"),
        "data_empty": ({"--data": "{root}/empty.jsonl"}, "holds no usable sequence"),
        "data_garbled": ({"--data": "{root}/garbled.jsonl"}, "garbled.jsonl:2: invalid JSON"),
        "data_without_text": ({"--data": "{root}/notext.jsonl"}, "neither a conversation"),
        "data_not_utf8": ({"--data": "{root}/binary.txt"}, "not UTF-8 text"),
        "out_is_a_file": ({"--out": "{root}/afile"}, "is a file; pass a folder"),
        "out_holds_other_features": ({"--out": "{root}/feats_other"}, "fingerprint mismatch"),
        "max_len_one": ({"--max-len": 1}, "--max-len must be >= 2"),
        "max_len_past_the_base": (
            {"--data": "{root}/long.jsonl", "--max-len": 1024},
            "past the base's 256 positions",
        ),
        "limit_zero": ({"--limit": 0}, "--limit must be >= 1"),
        "shard_size_zero": ({"--shard-size": 0}, "--shard-size must be >= 1"),
        "tokens_per_batch_zero": ({"--tokens-per-batch": 0}, "--tokens-per-batch must be >= 1"),
        "min_bucket_zero": ({"--min-bucket": 0}, "--min-bucket must be >= 1"),
        "max_new_shards_zero": ({"--max-new-shards": 0}, "--max-new-shards must be >= 1"),
        "dtype_unknown": ({"--dtype": "f64"}, "--dtype 'f64'"),
        "hidden_dtype_unknown": ({"--hidden-dtype": "int8"}, "invalid choice: 'int8'"),
        "tokenizer_missing": ({"--tokenizer": "{root}/nope"}, "--tokenizer"),
        "chat_template_missing": ({"--chat-template": "{root}/nope.j2"}, "no such file"),
    },
    "corpus": {
        "out_is_a_file": ({"--out": "{root}/afile"}, "is a file; pass a folder"),
        "out_under_a_file": ({"--out": "{root}/afile/corpus"}, "is a file; pass a folder"),
        "docs_root_missing": ({"--no-docs": None, "--docs-root": "{root}/nope"}, "--docs-root"),
        "docs_root_is_a_file": (
            {"--no-docs": None, "--docs-root": "{root}/afile"},
            "is a file, not a folder",
        ),
        "no_docs_with_docs_root": ({"--docs-root": "{root}/empty_dir"}, "exclude each other"),
        "tokenizer_missing": ({"--tokenizer": "{root}/nope"}, "--tokenizer"),
        "tokenizer_without_json": ({"--tokenizer": "{root}/empty_dir"}, "has no tokenizer.json"),
        "unknown_flag": ({"--bogus": True}, "unrecognized arguments: --bogus"),
    },
    "tokenizer": {
        "vocab_too_small": ({"--vocab-size": 100}, "--vocab-size must be in [259, 65536]"),
        "vocab_too_large": ({"--vocab-size": 70000}, "--vocab-size must be in [259, 65536]"),
        "vocab_not_a_number": ({"--vocab-size": "8k"}, "invalid int value: '8k'"),
        "max_train_chars_zero": ({"--max-train-chars": 0}, "--max-train-chars must be >= 1"),
        "model_max_length_zero": ({"--model-max-length": 0}, "--model-max-length must be >= 1"),
        "corpus_missing": ({"--corpus": "{root}/nope"}, "--corpus"),
        "corpus_without_heldout": (
            {"--corpus": "{root}/corpus_no_heldout"},
            "has no heldout.jsonl",
        ),
        "corpus_empty": ({"--corpus": "{root}/corpus_empty"}, "holds no document"),
        "corpus_garbled": ({"--corpus": "{root}/corpus_garbled"}, "train.jsonl:2: invalid JSON"),
        "out_is_a_file": ({"--out": "{root}/afile"}, "is a file; pass a folder"),
        "ids_only_without_tokenizer": ({"--ids-only": True}, "--ids-only reuses it"),
    },
    "heldout_prompts": {
        "n_zero": ({"--n": 0}, "--n must be >= 1"),
        "n_negative": ({"--n": -5}, "--n must be >= 1"),
        "first_id_negative": ({"--first-id": -1}, "--first-id must be >= 0"),
        "max_prompt_chars_zero": ({"--max-prompt-chars": 0}, "--max-prompt-chars must be >= 1"),
        "out_is_a_folder": ({"--out": "{root}/empty_dir"}, "is a folder; give a file path"),
        "out_under_a_file": ({"--out": "{root}/afile/q.jsonl"}, "afile is a file, not a folder"),
    },
    "draft_vocab": {
        "tokens_missing": ({"--tokens": "{root}/nope"}, "--tokens"),
        "tokens_without_ids": ({"--tokens": "{root}/empty_dir"}, "has no train_ids.npy"),
        "tokens_empty": ({"--tokens": "{root}/tokens_empty"}, "non-empty 1-D array"),
        "tokens_not_npy": ({"--tokens": "{root}/tokens_garbage"}, "not a .npy token array"),
        "vocab_zero": ({"--vocab-size": 0}, "--vocab-size must be >= 1"),
        "ids_outside_vocab": ({"--vocab-size": 10}, "outside the vocabulary (10)"),
        "no_vocab_size_nor_config": (
            {"--vocab-size": None, "--out": "{root}/empty_dir"},
            "has no config.json",
        ),
        "out_is_a_file": ({"--out": "{root}/afile"}, "is a file; pass a folder"),
        "out_missing": ({"--out": None}, "required: --out"),
    },
}
TABLE = [
    pytest.param(entry, overrides, fragment, id=f"{entry}-{case}")
    for entry, cases in CASES.items()
    for case, (overrides, fragment) in cases.items()
]


@pytest.mark.parametrize("entry,overrides,fragment", TABLE)
def test_bad_input_is_one_error_line_before_any_work(world, capsys, entry, overrides, fragment):
    module, good = ENTRY_POINTS[entry]
    before = _listing(world)
    code = cli.run(module.main, _argv(good, overrides, world))
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith("error: "), err
    assert fragment.replace("{root}", str(world)) in err, err
    assert _listing(world) == before  # nothing written, moved or deleted


@pytest.mark.parametrize(
    "argv,fragment",
    [
        (["plot", "--metrics", "{root}/nope.jsonl", "--out", "{root}/c.png"], "no such file"),
        (["plot", "--metrics", "{root}/text.jsonl", "--out", "{root}/empty_dir"], "is a folder"),
        (["plot", "--out", "{root}/c.png"], "required: --metrics"),
    ],
)
def test_bad_plot_input_is_one_error_line(world, capsys, argv, fragment):
    before = _listing(world)
    argv = [a.replace("{root}", str(world)) for a in argv]
    assert cli.run(train_cli.main, argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and fragment in err, err
    assert _listing(world) == before


@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS))
def test_good_input_reaches_the_work(world, tmp_path, entry):
    """The tables' good argv passes every check: each row above fails on its own flag."""
    module, good = ENTRY_POINTS[entry]
    out = tmp_path / ("new/question.jsonl" if entry == "heldout_prompts" else "new")
    with pytest.raises(WorkStarted):
        cli.run(module.main, _argv(good, {"--out": out}, world))
    online = {**ONLINE, "--out": tmp_path / "online"}
    if entry == "train":  # the other data source too
        with pytest.raises(WorkStarted):
            cli.run(module.main, _argv(good, online, world))


def test_debug_flag_shows_the_traceback(world):
    with pytest.raises(ValueError, match="--steps must be >= 1"):
        cli.run(train_cli.main, _argv(TRAIN, {"--steps": 0, "--debug": True}, world))


# --- pretraining resumes past a broken newest checkpoint -----------------------------------------


def test_pretrain_resume_falls_back_past_an_empty_step_folder(world, tmp_path, capsys, monkeypatch):
    monkeypatch.undo()  # the real model this time
    out = tmp_path / "pre"
    argv = _argv(PRETRAIN, {"--out": out, "--ckpt-every": 2, "--eval-every": 100}, world)
    assert cli.run(pretrain.main, [*argv, "--steps", "4"]) == 0
    assert common.saved_steps(out / "checkpoints") == [2, 4]
    (out / "checkpoints" / "6").mkdir()  # e.g. a copy interrupted before any file
    capsys.readouterr()
    assert cli.run(pretrain.main, [*argv, "--steps", "8", "--resume"]) == 0
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if "warning" in line]
    assert len(warnings) == 2 and "checkpoint 6 (empty folder)" in warnings[0], err
    assert "restored step 4" in warnings[0] and "resumed at step 4" in err
    assert "aside to 6.unrestorable" in warnings[1]
    assert common.saved_steps(out / "checkpoints") == [6, 8]
    assert (out / "checkpoints" / "6.unrestorable").is_dir()
    steps = [r["step"] for r in common.read_metrics(out / "metrics.jsonl")]
    assert steps == list(range(1, 9))
