"""ModelConfig.from_hf / to_hf: both transformers layouts, rope scaling, strict refusals, EOS."""

from __future__ import annotations

import json

import pytest

from convert.load_hf import load_hf_config
from griffin_jax.config import ModelConfig, RopeConfig, UnsupportedConfigError

# A Llama-3.1-style config.json as transformers 4 wrote it (rope_theta, rope_scaling, torch_dtype).
LLAMA_T4 = {
    "architectures": ["LlamaForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 128000,
    "eos_token_id": 128001,
    "hidden_act": "silu",
    "hidden_size": 64,
    "initializer_range": 0.02,
    "intermediate_size": 96,
    "max_position_embeddings": 131072,
    "mlp_bias": False,
    "model_type": "llama",
    "num_attention_heads": 4,
    "num_hidden_layers": 2,
    "num_key_value_heads": 2,
    "pretraining_tp": 1,
    "rms_norm_eps": 1e-05,
    "rope_scaling": {
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    },
    "rope_theta": 500000.0,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.43.0.dev0",
    "use_cache": True,
    "vocab_size": 128,
}

# The same model as transformers 5's save_pretrained writes it (rope_parameters, dtype).
LLAMA_T5 = {
    **{k: v for k, v in LLAMA_T4.items() if k not in ("rope_scaling", "rope_theta", "torch_dtype")},
    "dtype": "bfloat16",
    "head_dim": 16,
    "rope_parameters": {
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
        "rope_theta": 500000.0,
    },
    "transformers_version": "5.24.0",
}

QWEN2_T5 = {
    "architectures": ["Qwen2ForCausalLM"],
    "attention_dropout": 0.0,
    "bos_token_id": None,
    "dtype": "float32",
    "eos_token_id": None,
    "hidden_act": "silu",
    "hidden_size": 64,
    "intermediate_size": 96,
    "layer_types": ["full_attention", "full_attention"],
    "max_position_embeddings": 32768,
    "max_window_layers": 28,
    "model_type": "qwen2",
    "num_attention_heads": 4,
    "num_hidden_layers": 2,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-06,
    "rope_parameters": {"rope_theta": 1000000.0, "rope_type": "default"},
    "sliding_window": None,
    "tie_word_embeddings": True,
    "use_cache": True,
    "use_sliding_window": False,
    "vocab_size": 128,
}

LLAMA3_ROPE = RopeConfig(
    theta=500000.0,
    kind="llama3",
    factor=8.0,
    low_freq_factor=1.0,
    high_freq_factor=4.0,
    original_max_position=8192,
)


@pytest.mark.parametrize("hf", [LLAMA_T4, LLAMA_T5], ids=["transformers4", "transformers5"])
def test_llama_both_layouts(hf):
    cfg = ModelConfig.from_hf(hf)
    assert cfg == ModelConfig(
        family="llama",
        vocab_size=128,
        d_model=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        head_dim=16,
        d_ff=96,
        rope=LLAMA3_ROPE,
        rms_eps=1e-5,
        max_position_embeddings=131072,
        eos_token_ids=(128001,),
        bos_token_id=128000,
    )


def test_linear_rope_scaling_accepted():
    hf = {**LLAMA_T4, "rope_scaling": {"type": "linear", "factor": 2.0}, "rope_theta": 10000.0}
    assert ModelConfig.from_hf(hf).rope == RopeConfig(theta=10000.0, kind="linear", factor=2.0)


def test_qwen2_layout():
    cfg = ModelConfig.from_hf(QWEN2_T5)
    assert (cfg.family, cfg.qkv_bias, cfg.tie_embeddings, cfg.rope.theta) == (
        "qwen2",
        True,
        True,
        1e6,
    )
    assert cfg.eos_token_ids == ()


def test_mixtral_null_head_dim(hf_checkpoint):
    folder, _ = hf_checkpoint("mixtral")
    hf = json.loads((folder / "config.json").read_text())
    assert hf["head_dim"] is None  # transformers 5 writes an explicit null
    cfg = ModelConfig.from_hf(hf)
    assert (cfg.head_dim, cfg.n_experts, cfg.n_experts_per_tok) == (16, 4, 2)


@pytest.mark.parametrize("family", ["llama", "qwen2", "mixtral"])
def test_saved_config_round_trips(hf_checkpoint, family):
    folder, _ = hf_checkpoint(family)
    cfg = load_hf_config(folder)
    assert ModelConfig.from_hf(cfg.to_hf()) == cfg


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}}, "yarn"),
        (
            {"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}},
            "dynamic",
        ),
        ({"attention_bias": True}, "attention_bias"),
        ({"some_new_scale": 0.5}, "some_new_scale"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"mlp_bias": True}, "mlp_bias"),
    ],
)
def test_llama_refuses(change, field):
    with pytest.raises(UnsupportedConfigError, match=field):
        ModelConfig.from_hf({**LLAMA_T5, **change})


@pytest.mark.parametrize(
    ("hf", "change"),
    [
        (QWEN2_T5, {"use_sliding_window": True, "sliding_window": 4096}),
        (QWEN2_T5, {"layer_types": ["sliding_attention", "full_attention"]}),
    ],
)
def test_active_sliding_window_refused(hf, change):
    with pytest.raises(UnsupportedConfigError, match="sliding"):
        ModelConfig.from_hf({**hf, **change})


def test_mixtral_sliding_window_refused(hf_checkpoint):
    folder, _ = hf_checkpoint("mixtral")
    hf = json.loads((folder / "config.json").read_text())
    ModelConfig.from_hf(hf)
    with pytest.raises(UnsupportedConfigError, match="sliding_window"):
        ModelConfig.from_hf({**hf, "sliding_window": 4096})


def test_qwen2_inactive_sliding_window_accepted():
    # Published Qwen2 configs carry a sliding_window size with use_sliding_window=false.
    cfg = ModelConfig.from_hf({**QWEN2_T5, "sliding_window": 131072})
    assert cfg.family == "qwen2"


def test_eos_union_with_generation_config(tmp_path):
    # Llama-3-Instruct: <|eot_id|> (128009) lives only in generation_config.json.
    (tmp_path / "config.json").write_text(json.dumps(LLAMA_T5))
    (tmp_path / "generation_config.json").write_text(
        json.dumps({"bos_token_id": 128000, "eos_token_id": [128001, 128009]})
    )
    assert load_hf_config(tmp_path).eos_token_ids == (128001, 128009)
    (tmp_path / "generation_config.json").unlink()
    assert load_hf_config(tmp_path).eos_token_ids == (128001,)
