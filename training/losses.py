"""GRIFFIN's training objective: dataset shift, feature noise, loss terms, token-alignment masks.

Mirrors the reference's `CustomDataset` / `AddUniformNoise` (spec 4.2, 4.3), the loss of
`train/main_griffin_1.py` (stage 1: SmoothL1 on the next feature + 0.1 x soft cross-entropy,
spec 4.4-4.5) and the unrolled loop of `train/main_griffin_2.py` (stages j >= 2: j passes over
multi-stream attention, the top-10 term, the `topk_train` alignment masks, spec 4.6), plus
`getkacc` (the free-running acceptance estimate) as array arithmetic. EAGLE-3's objective
(`eagle/traineagle3`: soft cross-entropy of every training-time-test step against the base's
distribution over the draft vocabulary, weighted 0.8^s) is `ttt_loss`.

Everything here is a pure jnp function of padded [B, L, ...] arrays with per-row true lengths
(right padding). Two deliberate departures from the reference, both spec 8.2 / 8.6:
- every shift is non-wrapping with zero fill (the reference's `roll` wraps the last column into
  position 0 and compares the last position with `ids[0]`);
- padded positions never enter a loss, an accuracy or an alignment statistic.
The gradient of a stage-j step is the gradient of the SUM of the per-pass losses (the reference
backpropagates each pass separately into the same .grad buffers, spec 8.13); streams are
detached, so the sum's gradient equals that accumulation exactly.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp

# Spec 4.4 / 4.7.
STAGE1_WEIGHTS = (1.0, 0.1, 0.0)  # (vloss, ploss, topk_loss)
STAGE2_WEIGHTS = (1.0, 0.1, 0.5)
TOPK_LOSS_K = 10
TOPK_TRAIN = 3
NOISE_STD = 0.2
MASK_EPS = 1e-5


@dataclasses.dataclass(frozen=True)
class DraftInputs:
    """A batch in draft coordinates (spec 4.2): position i sees (f_i, x_{i+1}), targets f_{i+1}."""

    features: jax.Array  # [B, L, D] f_i (zero past the true length)
    tokens: jax.Array  # [B, L] int32 x_{i+1}; 0 at the last position and in the padding
    target: jax.Array  # [B, L, D] f_{i+1}; zero at the last position and in the padding
    loss_mask: jax.Array  # [B, L] f32 mask[i]; forced 0 at the last position and in the padding
    lengths: jax.Array  # [B] int32 true lengths


jax.tree_util.register_dataclass(
    DraftInputs,
    data_fields=["features", "tokens", "target", "loss_mask", "lengths"],
    meta_fields=[],
)


def shift_left(x: jax.Array) -> jax.Array:
    """y[:, i] = x[:, i+1], y[:, L-1] = 0 (axis 1; no wrap-around)."""
    pad = jnp.zeros_like(x[:, :1])
    return jnp.concatenate([x[:, 1:], pad], axis=1)


def shift_right(x: jax.Array) -> jax.Array:
    """y[:, i] = x[:, i-1], y[:, 0] = 0 (axis 1; no wrap-around)."""
    pad = jnp.zeros_like(x[:, :1])
    return jnp.concatenate([pad, x[:, :-1]], axis=1)


def draft_inputs(
    hidden: jax.Array, ids: jax.Array, mask: jax.Array, lengths: jax.Array
) -> DraftInputs:
    """Pairs f_i with x_{i+1} and targets f_{i+1} (the reference's `CustomDataset`, spec 4.2).

    Args:
      hidden: [B, L, D] base features f_0..f_{n-1} (right padded; any values in the padding).
      ids: [B, L] int32 tokens x_0..x_{n-1} (right padded).
      mask: [B, L] data loss mask (assistant tokens, or all but the first).
      lengths: [B] int32 true lengths n.
    Returns:
      DraftInputs with the last position (i = n-1) and the padding out of the loss.
    """
    pos = jnp.arange(ids.shape[1])[None, :]  # [1, L]
    valid = pos < lengths[:, None]  # [B, L]
    has_next = pos < lengths[:, None] - 1  # i + 1 < n
    features = jnp.where(valid[..., None], hidden, 0).astype(hidden.dtype)
    tokens = jnp.where(has_next, shift_left(ids), 0).astype(jnp.int32)
    target = jnp.where(has_next[..., None], shift_left(hidden), 0).astype(hidden.dtype)
    loss_mask = jnp.where(has_next, mask, 0).astype(jnp.float32)
    return DraftInputs(features, tokens, target, loss_mask, lengths.astype(jnp.int32))


def feature_noise(
    key: jax.Array, shape: tuple[int, int, int], lengths: jax.Array, *, std: float = NOISE_STD
) -> jax.Array:
    """EAGLE's uniform feature noise (U[0,1) - 0.5) * std * 512 / L, L = each row's TRUE length.

    The reference noises one unpadded [1, L, D] sequence at a time, so L is its own length, not
    the padded batch length (spec 4.3, 8.4). Zero in the padding.

    Args:
      key: PRNG key.  shape: (B, L, D).  lengths: [B] int32.
    Returns:
      [B, L, D] f32.
    """
    u = jax.random.uniform(key, shape, jnp.float32)
    scale = std * 512.0 / jnp.maximum(lengths, 1).astype(jnp.float32)  # [B]
    valid = jnp.arange(shape[1])[None, :] < lengths[:, None]  # [B, L]
    return jnp.where(valid[..., None], (u - 0.5) * scale[:, None, None], 0.0)


def _masked_mean(per_pos: jax.Array, mask: jax.Array) -> jax.Array:
    """sum(mask * per_pos) / (sum(mask) + 1e-5), the reference's normalisation."""
    return jnp.sum(mask * per_pos) / (jnp.sum(mask) + MASK_EPS)


def smooth_l1(pred: jax.Array, target: jax.Array) -> jax.Array:
    """Elementwise SmoothL1 with beta = 1 (torch's `SmoothL1Loss(reduction="none")`), f32."""
    d = jnp.abs(pred.astype(jnp.float32) - target.astype(jnp.float32))
    return jnp.where(d < 1.0, 0.5 * d * d, d - 0.5)


def vloss(next_feature: jax.Array, target: jax.Array, mask: jax.Array) -> jax.Array:
    """Feature regression: sum_{b,i} m * mean_D SmoothL1(next_feature, target) / (sum m + 1e-5).

    Args:
      next_feature, target: [B, L, D].  mask: [B, L].
    Returns:
      scalar f32.
    """
    return _masked_mean(jnp.mean(smooth_l1(next_feature, target), axis=-1), mask)


def ploss(logits: jax.Array, target_p: jax.Array, mask: jax.Array) -> jax.Array:
    """Soft cross-entropy -sum m * sum_V target_p * log_softmax(logits) / (sum m + 1e-5).

    Args:
      logits: [B, L, V] draft token logits (base lm_head on token_feature).
      target_p: [B, L, V] softmax of the base lm_head on the target feature (no gradient).
      mask: [B, L].
    """
    logq = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return _masked_mean(-jnp.sum(target_p * logq, axis=-1), mask)


def topk_loss(
    logits: jax.Array, target_p: jax.Array, mask: jax.Array, *, k: int = TOPK_LOSS_K
) -> jax.Array:
    """`ploss` with the inner sum restricted to the top-k tokens of target_p (not renormalised).

    k is capped at V (tiny test vocabularies).
    """
    logq = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    top_p, top_idx = jax.lax.top_k(target_p, min(k, target_p.shape[-1]))  # [B, L, k]
    top_logq = jnp.take_along_axis(logq, top_idx, axis=-1)  # [B, L, k]
    return _masked_mean(-jnp.sum(top_p * top_logq, axis=-1), mask)


def in_topk(logits: jax.Array, token: jax.Array, k: int) -> jax.Array:
    """Whether `token` is among the top-k of `logits` ([B, L, V], [B, L] -> [B, L] bool)."""
    _, idx = jax.lax.top_k(logits, min(k, logits.shape[-1]))  # [B, L, k]
    return jnp.any(idx == token[..., None], axis=-1)


def alignment(logits: jax.Array, tokens: jax.Array, *, k: int = TOPK_TRAIN) -> jax.Array:
    """a[i] = 1 if the pass's top-k at i holds tokens[i+1] (= x_{i+2}, position i's target token).

    Args:
      logits: [B, L, V] a pass's draft logits.  tokens: [B, L] draft input tokens (x_{i+1}).
    Returns:
      [B, L] f32; 0 at the last column (the reference wraps to tokens[0] there, spec 8.2).
    """
    hit = in_topk(logits, shift_left(tokens), k)
    last = jnp.arange(tokens.shape[1])[None, :] == tokens.shape[1] - 1
    return jnp.where(last, 0.0, hit.astype(jnp.float32))


def accumulate_alignment(prev: jax.Array | None, a: jax.Array) -> jax.Array:
    """C_1 = a_1; C_s = shift_right(C_{s-1}) * a_s (spec 4.6, zero fill instead of roll).

    So C_s[i] = prod_{t=1..s} a_t[i - (s - t)].
    """
    return a if prev is None else shift_right(prev) * a


def pass_mask(acc: jax.Array, base_mask: jax.Array, *, shifted: bool = False) -> jax.Array:
    """The loss mask of the next pass: C_s * M0 (reference), or shift_right(C_s) * M0.

    The shifted variant checks the tokens the next pass actually consumes as input (the
    "inference-consistent" reading of spec 4.6); the published models used the reference form.
    """
    return (shift_right(acc) if shifted else acc) * base_mask


def next_stream(
    next_feature: jax.Array, features: jax.Array, streams: jax.Array | None
) -> jax.Array:
    """The stream pass s+1 adds: new[i] = r_s[i-1], new[0] = features[0] (s = 1) or Q[-1][0].

    Detached: no gradient flows through the streams (reference `.detach()`).

    Args:
      next_feature: [B, L, D] r_s, pass s's predicted next features.
      features: [B, L, D] the (noised) input features.
      streams: [s-1, B, L, D] or None.
    Returns:
      [B, L, D].
    """
    first = features[:, :1] if streams is None else streams[-1][:, :1]  # [B, 1, D]
    new = jnp.concatenate([first.astype(next_feature.dtype), next_feature[:, :-1]], axis=1)
    return jax.lax.stop_gradient(new)


def topk_accuracy(
    logits: jax.Array, target_token: jax.Array, mask: jax.Array, ks: tuple[int, ...] = (1, 2, 3)
) -> dict[str, jax.Array]:
    """Masked top-k accuracy against the base's next token (argmax of the target logits).

    Returns:
      {"top{k}": scalar f32} for each k (sum(mask * hit) / (sum(mask) + 1e-5)).
    """
    return {f"top{k}": _masked_mean(in_topk(logits, target_token, k), mask) for k in ks}


PassFn = Callable[[jax.Array | None], tuple[jax.Array, jax.Array]]
HeadFn = Callable[[jax.Array], jax.Array]


def unrolled_loss(
    run_pass: PassFn,
    head: HeadFn,
    inputs: DraftInputs,
    target_logits: jax.Array,
    *,
    num_passes: int,
    weights: tuple[float, float, float] | None = None,
    topk_train: int = TOPK_TRAIN,
    shifted: bool = False,
    align_mask: bool = True,
    topk_k: int = TOPK_LOSS_K,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The stage-j objective: j unrolled passes, per-pass losses summed (spec 4.5, 4.6).

    Args:
      run_pass: streams ([s-1, B, L, D] or None) -> (token_feature, next_feature) [B, L, D];
        the draft's multi-stream training forward over `inputs.features` / `inputs.tokens`.
      head: hidden [B, L, D] -> logits [B, L, V] (the frozen base lm_head).
      inputs: the batch in draft coordinates (features already noised).
      target_logits: [B, L, V] head(inputs.target) (gradient stopped here).
      num_passes: j (1 for stage 1 and for EAGLE-2).
      weights: (vloss, ploss, topk) weights; default stage-1 weights for j = 1, else stage-2.
      topk_train: k of the alignment test.  shifted: the shifted mask variant.
      align_mask: False disables token alignment (every pass trains under the base mask: the
        paper's ablation).
    Returns:
      (sum over passes of the weighted loss, metrics: per pass `vloss{s}`, `ploss{s}`,
      `topk_loss{s}`, `top1_{s}`..`top3_{s}` (under that pass's mask), `mask{s}` [B, L]).
    """
    if weights is None:
        weights = STAGE1_WEIGHTS if num_passes == 1 else STAGE2_WEIGHTS
    w_v, w_p, w_k = weights
    target_logits = jax.lax.stop_gradient(target_logits.astype(jnp.float32))
    target_p = jax.nn.softmax(target_logits, axis=-1)
    target_token = jnp.argmax(target_logits, axis=-1)  # [B, L]
    base_mask = inputs.loss_mask
    mask = base_mask
    streams = None
    acc = None
    total = jnp.zeros((), jnp.float32)
    metrics: dict[str, jax.Array] = {}
    for s in range(1, num_passes + 1):
        token_feature, next_feature = run_pass(streams)
        logits = head(token_feature).astype(jnp.float32)  # [B, L, V]
        v = vloss(next_feature, inputs.target, mask)
        p = ploss(logits, target_p, mask)
        loss = w_v * v + w_p * p
        metrics[f"vloss{s}"], metrics[f"ploss{s}"] = v, p
        if w_k:
            t = topk_loss(logits, target_p, mask, k=topk_k)
            loss = loss + w_k * t
            metrics[f"topk_loss{s}"] = t
        total = total + loss
        for name, value in topk_accuracy(logits, target_token, mask).items():
            metrics[f"{name}_{s}"] = value
        metrics[f"mask{s}"] = mask
        if s == num_passes:
            break
        new = next_stream(next_feature, inputs.features, streams)[None]  # [1, B, L, D]
        streams = new if streams is None else jnp.concatenate([streams, new])
        a = jax.lax.stop_gradient(alignment(logits, inputs.tokens, k=topk_train))
        acc = accumulate_alignment(acc, a)
        mask = pass_mask(acc, base_mask, shifted=shifted) if align_mask else base_mask
    return total, metrics


def chain_acceptance(correct: jax.Array, start_ok: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The reference's `getkacc` counts, vectorised over chain starts.

    A chain starts at every position p; step k drafts position p + k. Step k is reached when
    `start_ok` holds at p..p+k and steps 0..k-1 were correct; a wrong step also counts as a miss
    at every later depth (the reference's `total[kk] += 1`). When the data continuation is the
    base's greedy path (what `start_ok` checks), free-running the draft on its own features and
    argmax tokens is exactly pass k+1 of the multi-stream forward at position p + k (exact mask
    mode), so `correct[k]` comes from the unrolled passes.

    Args:
      correct: [K, B, L] bool: pass k+1's argmax at position r equals the base's next token.
      start_ok: [B, L] bool: loss mask and the base's argmax at f_r equals the data token x_{r+1}.
    Returns:
      (hits [K], totals [K]) f32; acc@k = hits[k-1] / totals[k-1].
    """
    ok = start_ok.astype(jnp.float32)
    reach = ok  # [B, L] reach[r]: the chain that started at r - k reached step k
    hits, totals, misses = [], [], jnp.zeros((), jnp.float32)
    for k in range(correct.shape[0]):
        cor = correct[k].astype(jnp.float32)
        hits.append(jnp.sum(reach * cor))
        totals.append(jnp.sum(reach) + misses)
        misses = misses + jnp.sum(reach * (1.0 - cor))
        reach = shift_right(reach * cor) * ok
    return jnp.stack(hits), jnp.stack(totals)


TTT_DECAY = 0.8  # EAGLE-3: step s of the training-time test weighs 0.8^s


def ttt_loss(
    token_features: jax.Array,
    kernel: jax.Array,
    token_ids: jax.Array,
    target_logits: jax.Array,
    loss_mask: jax.Array,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """EAGLE-3's objective over the steps of `draft.eagle3_forward_train`.

    Step s at row r predicts x_{r+2+s}: its target is the base's distribution there
    (`target_logits` shifted left by s), restricted to the draft vocabulary and renormalised;
    positions count when the data's loss mask (shifted alike) holds and the base's argmax is in
    the draft vocabulary (as `eagle/traineagle3`). Each step's soft cross-entropy is normalised
    by its mask (`_masked_mean`; the official code averages over every position, padding
    included), and the total is sum_s 0.8^s loss_s.

    Args:
      token_features: [S, B, L, D] the draft's normed outputs.  kernel: [D, V'] its lm_head.
      token_ids: [V'] int32 target id of each draft index (i + d2t[i]).
      target_logits: [B, L, V] the base's logits predicting x_{r+2} (its logits at r + 1).
      loss_mask: [B, L] the data mask of draft position r (0 past the end).
    Returns:
      (total, metrics per step s = 1..S: `ploss{s}`, `top1_{s}` (draft argmax = base argmax,
      over the step's mask), `mask{s}`).
    """
    vocab = target_logits.shape[-1]
    in_vocab = jnp.zeros((vocab,), bool).at[token_ids].set(True)
    total = jnp.zeros((), jnp.float32)
    metrics: dict[str, jax.Array] = {}
    # Computed once and shifted per step (a shifted-in zero row is masked out).
    base_token = jnp.argmax(target_logits, axis=-1)  # [B, L]
    restricted = jnp.take(target_logits, token_ids, axis=-1).astype(jnp.float32)
    target_p = jax.lax.stop_gradient(jax.nn.softmax(restricted, axis=-1))  # [B, L, V']
    data_mask = loss_mask
    for s in range(token_features.shape[0]):
        if s:
            base_token, data_mask = shift_left(base_token), shift_left(data_mask)
            target_p = shift_left(target_p)
        mask = data_mask * in_vocab[base_token]
        logits = jnp.einsum(
            "BLD,DV->BLV", token_features[s], kernel.astype(token_features.dtype),
            preferred_element_type=jnp.float32,
        )  # fmt: skip
        loss = ploss(logits, target_p, mask)
        total = total + TTT_DECAY**s * loss
        hit = jnp.take(token_ids, jnp.argmax(logits, axis=-1)) == base_token
        metrics[f"ploss{s + 1}"] = loss
        metrics[f"top1_{s + 1}"] = _masked_mean(hit.astype(jnp.float32), mask)
        metrics[f"mask{s + 1}"] = mask
    return total, metrics
