"""Engine-level losslessness of sampling over several tokens: the joint of the first 4 new tokens.

test_sampling.py checks the acceptance rule alone and test_speculative.py the engine's first two
tokens; here the first NEW = 4 tokens of `speculative.generate` (the prefill root, then up to
D + 1 = 3 draft tokens accepted in round 1 plus the bonus, or later rounds' tokens) must follow
exactly the joint distribution of sampling the warped base one token at a time. The draft agrees
with the base often (aligned_pair, see spec_models), so round 1 accepts 1, 2 and 3 draft tokens
in many rows, with a chain and with a tree of 3 children per node (siblings to reject or skip).
The exact joint p(x1) p(x2|x1) p(x3|x1,x2) p(x4|x1..x3) comes from base forwards on all 8^3
prefixes, warped in float64 on the host; the empirical joint over many identical rows of one
generate call (rows sample independently) is compared with a chi-square test.
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from spec_models import aligned_pair, base_config, draft_config

from griffin_jax import sampling, speculative
from griffin_jax.config import TreeConfig
from griffin_jax.kv_cache import causal_mask, init_cache
from griffin_jax.model import forward, init_params

V = 8
NEW = 4  # new tokens compared
PROMPT = [1, 2, 3, 4]
N_ROWS = 4000
CHAIN = TreeConfig(top_k=1, depth=2, total_tokens=4)
BUSHY = TreeConfig(top_k=3, depth=2, total_tokens=8)


@pytest.fixture(scope="module")
def models():
    """(cfg, dcfg, base, draft, logits): logits[d] [V]*d + [V] after PROMPT + each d-prefix."""
    cfg = base_config("llama", vocab_size=V, d_model=32, head_dim=8, d_ff=48, eos_token_ids=())
    dcfg = draft_config(cfg, d_ff=40, head_dim=8)
    base, draft = aligned_pair(cfg, dcfg, seed=2)
    # Give back 5% of the attention and MLP outputs aligned_pair zeroes, so that the next token
    # depends on the whole context, not just the last token (the draft still agrees often), and
    # sharpen the head (shared with the draft) so that deep acceptances are common.
    full = init_params(cfg, jax.random.key(2))["layers"]
    layers = dict(base["layers"])
    layers["self_attn"] = dict(layers["self_attn"], o_proj=_scaled(full["self_attn"]["o_proj"]))
    layers["mlp"] = dict(layers["mlp"], down_proj=_scaled(full["mlp"]["down_proj"]))
    base = dict(base, layers=layers, lm_head=_scaled(base["lm_head"], 3.0))
    # Every prefix of 0..NEW-1 tokens after PROMPT, right-padded to one length (causal: the
    # padding never changes the logits at a prefix's last position).
    prefixes = [p for d in range(NEW) for p in itertools.product(range(V), repeat=d)]
    n, t = len(prefixes), len(PROMPT) + NEW - 1
    seqs = np.array([PROMPT + list(p) + [0] * (NEW - 1 - len(p)) for p in prefixes])
    zero = jnp.zeros((n,), jnp.int32)
    out, _, _ = forward(
        base, jnp.asarray(seqs), jnp.broadcast_to(jnp.arange(t), (n, t)), init_cache(cfg, n, t),
        write_idx=zero, mask=causal_mask(zero, t, t), cfg=cfg,
    )  # fmt: skip
    last = np.asarray(out)[np.arange(n), [len(PROMPT) + len(p) - 1 for p in prefixes]]
    chunks = np.split(last, np.cumsum([V**d for d in range(NEW - 1)]))
    logits = [c.reshape((V,) * d + (V,)) for d, c in enumerate(chunks)]
    return cfg, dcfg, base, draft, logits


def _scaled(tree, factor: float = 0.05):
    return jax.tree.map(lambda x: factor * x, tree)


def _warp64(logits: np.ndarray, temperature: float, top_p: float, top_k: int) -> np.ndarray:
    """HF's temperature -> top-k -> top-p warping in float64 -> probabilities [..., V]."""

    def softmax(s):
        e = np.exp(s - s.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)

    s = logits.astype(np.float64) / temperature
    if top_k:
        s = np.where(s < -np.sort(-s, axis=-1)[..., top_k - 1 : top_k], -np.inf, s)
    if top_p < 1.0:
        order = np.argsort(s, axis=-1)  # ascending, as HF
        drop = np.cumsum(np.take_along_axis(softmax(s), order, -1), -1) <= 1.0 - top_p
        drop[..., -1] = False
        remove = np.zeros(s.shape, bool)
        np.put_along_axis(remove, order, drop, axis=-1)
        s = np.where(remove, -np.inf, s)
    return softmax(s)


def _exact_joint(logits, temperature, top_p, top_k) -> np.ndarray:
    """[V]*NEW: p(x1) p(x2|x1) ... p(x_NEW|x1..x_NEW-1) of the warped base, float64."""
    joint = np.ones(())
    for lg in logits:
        probs = _warp64(lg, temperature, top_p, top_k)
        # The engine warps in f32: the same tokens must survive top-k / top-p (no boundary case).
        kept = np.isfinite(np.asarray(sampling.warp(jnp.asarray(lg), temperature, top_p, top_k)))
        np.testing.assert_array_equal(probs > 0, kept)
        joint = joint[..., None] * probs
    np.testing.assert_allclose(joint.sum(), 1.0, atol=1e-9)
    return joint


def _chi2_pvalue(counts: np.ndarray, probs: np.ndarray) -> float:
    """Pearson chi-square goodness of fit; the smallest cells pooled so that each expects >= 5."""
    assert counts[probs == 0].sum() == 0, "sampled a continuation the warped base cannot produce"
    order = np.argsort(probs[probs > 0])
    exp = (counts.sum() * probs[probs > 0])[order]
    obs = counts[probs > 0][order]
    if exp[0] < 5:
        pool = max(np.sum(exp < 5), np.searchsorted(np.cumsum(exp), 5) + 1)
        obs = np.append(obs[:pool].sum(), obs[pool:])
        exp = np.append(exp[:pool].sum(), exp[pool:])
    stat = float(np.sum((obs - exp) ** 2 / exp))
    return float(jax.scipy.stats.chi2.sf(stat, len(obs) - 1))


@pytest.mark.slow  # two engine compiles (chain, tree): about 30 s each on two busy CPU cores
@pytest.mark.parametrize(
    "tree,temperature,top_p,top_k",
    [(CHAIN, 1.0, 1.0, 0), (BUSHY, 1.0, 1.0, 0), (BUSHY, 1.0, 0.8, 0), (CHAIN, 0.8, 1.0, 3)],
    ids=["chain", "tree", "tree-top_p", "chain-top_k"],
)
def test_joint_of_first_new_tokens_is_the_warped_base_joint(
    models, tree, temperature, top_p, top_k
):
    cfg, dcfg, base, draft, logits = models
    # One token more than compared, so that round 1 may emit all of its D + 1 draft tokens.
    res = speculative.generate(
        base, cfg, draft, dcfg, [PROMPT] * N_ROWS, tree_cfg=tree, max_new_tokens=NEW + 1,
        temperature=temperature, top_p=top_p, top_k=top_k, seed=7, eos_ids=[],
    )  # fmt: skip
    # Round 1 verifies the prefill tree: deep acceptances must be common, or this tests little.
    first = np.array([row[0] for row in res.accept_lengths])
    accepted = [float(np.mean(first >= a)) for a in (1, 2, 3)]
    assert accepted[0] > 0.5 and accepted[1] > 0.2 and accepted[2] > 0.05, accepted
    out = np.array([o[:NEW] for o in res.output_ids])
    counts = np.bincount(np.ravel_multi_index(out.T, (V,) * NEW), minlength=V**NEW)
    exact = _exact_joint(logits, temperature, top_p, top_k)
    pvalue = _chi2_pvalue(counts, exact.ravel())
    assert pvalue > 1e-3, pvalue
