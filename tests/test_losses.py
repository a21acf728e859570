"""training/losses.py: dataset shift, noise, loss terms vs numpy, alignment masks vs hand-computed
arrays (stages 1-3, both offsets), summed per-pass gradients, and the getkacc counts."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from training import losses

V = 8  # vocab of the hand-made examples; head = identity, so token_feature IS the logits


def test_draft_inputs_pairs_f_i_with_next_token_and_masks_last_and_padding():
    ids = jnp.array([[5, 6, 7, 1, 2], [3, 4, 9, 0, 0]])
    hidden = jnp.arange(2 * 5 * 1, dtype=jnp.float32).reshape(2, 5, 1) + 1
    mask = jnp.ones((2, 5))
    inp = losses.draft_inputs(hidden, ids, mask, jnp.array([5, 3]))
    np.testing.assert_array_equal(inp.tokens, [[6, 7, 1, 2, 0], [4, 9, 0, 0, 0]])
    np.testing.assert_array_equal(inp.target[..., 0], [[2, 3, 4, 5, 0], [7, 8, 0, 0, 0]])
    np.testing.assert_array_equal(inp.features[..., 0], [[1, 2, 3, 4, 5], [6, 7, 8, 0, 0]])
    np.testing.assert_array_equal(inp.loss_mask, [[1, 1, 1, 1, 0], [1, 1, 0, 0, 0]])


def test_noise_is_scaled_by_each_rows_true_length_not_the_padded_length():
    key = jax.random.key(0)
    lengths = jnp.array([64, 16])
    short = losses.feature_noise(key, (2, 64, 512), lengths, std=0.2)
    longer_pad = losses.feature_noise(key, (2, 128, 512), lengths, std=0.2)
    for noise in (short, longer_pad):
        for row, n in enumerate((64, 16)):
            amp = 0.2 * 512 / n / 2  # (U - 0.5) * std * 512 / n lies in [-amp, amp)
            vals = np.asarray(noise[row, :n])
            assert np.abs(vals).max() <= amp and np.abs(vals).max() > 0.99 * amp
            assert abs(vals.mean()) < 0.02 * amp
            assert np.all(np.asarray(noise[row, n:]) == 0)  # padding untouched


def test_smooth_l1_vloss_matches_numpy():
    rng = np.random.default_rng(0)
    pred, target = rng.normal(size=(2, 5, 4)) * 2, rng.normal(size=(2, 5, 4))
    m = rng.integers(0, 2, size=(2, 5)).astype(np.float64)
    d = np.abs(pred - target)
    sl1 = np.where(d < 1, 0.5 * d**2, d - 0.5)
    want = (sl1.mean(-1) * m).sum() / (m.sum() + 1e-5)
    got = losses.vloss(jnp.asarray(pred), jnp.asarray(target), jnp.asarray(m))
    np.testing.assert_allclose(got, want, rtol=1e-5)


def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_ploss_and_topk_loss_match_numpy():
    rng = np.random.default_rng(1)
    logits, tlogits = rng.normal(size=(2, 4, 16)) * 3, rng.normal(size=(2, 4, 16)) * 3
    m = np.array([[0, 1, 1, 0], [1, 1, 1, 1]], np.float64)
    p = np.exp(_log_softmax(tlogits))
    logq = _log_softmax(logits)
    want_p = -(m * (p * logq).sum(-1)).sum() / (m.sum() + 1e-5)
    want_k = 0.0
    for b in range(2):
        for i in range(4):
            top = np.argsort(-p[b, i])[:10]
            want_k += -m[b, i] * (p[b, i, top] * logq[b, i, top]).sum()
    want_k /= m.sum() + 1e-5
    args = jnp.asarray(logits, jnp.float32), jnp.asarray(p, jnp.float32), jnp.asarray(m)
    np.testing.assert_allclose(losses.ploss(*args), want_p, rtol=1e-5)
    np.testing.assert_allclose(losses.topk_loss(*args, k=10), want_k, rtol=1e-5)


def test_ttt_loss_matches_a_loop_over_steps_in_numpy():
    """EAGLE-3's objective written position by position: step s at row r targets the base's
    distribution at r + s over the draft vocabulary, counted where the data mask at r + s holds
    and the base's argmax there is a draft token; steps weigh 0.8^s."""
    rng = np.random.default_rng(4)
    b, seq_len, d, vocab, steps = 2, 6, 5, 12, 3
    ids = np.array([7, 0, 3, 9, 4])  # target id of each draft index
    feats = rng.normal(size=(steps, b, seq_len, d))
    kernel = rng.normal(size=(d, len(ids)))
    target = rng.normal(size=(b, seq_len, vocab)) * 3
    target[0, 1, 11] = 50.0  # base argmax outside the draft vocabulary: never counted
    mask = np.array([[1, 1, 1, 1, 1, 0], [1, 1, 1, 0, 0, 0]], np.float64)
    want, want_top1 = 0.0, []
    for s in range(steps):
        num = den = hits = 0.0
        for row in range(b):
            for r in range(seq_len - s):
                tgt = target[row, r + s]
                m = mask[row, r + s] * (np.argmax(tgt) in ids)
                p = np.exp(_log_softmax(tgt[ids]))
                logits = feats[s, row, r] @ kernel
                num += -m * (p * _log_softmax(logits)).sum()
                den += m
                hits += m * (ids[np.argmax(logits)] == np.argmax(tgt))
        want += 0.8**s * num / (den + 1e-5)
        want_top1.append(hits / (den + 1e-5))
    total, metrics = losses.ttt_loss(
        jnp.asarray(feats, jnp.float32), jnp.asarray(kernel, jnp.float32),
        jnp.asarray(ids, jnp.int32), jnp.asarray(target, jnp.float32), jnp.asarray(mask),
    )  # fmt: skip
    np.testing.assert_allclose(total, want, rtol=1e-5)
    for s in range(steps):
        np.testing.assert_allclose(metrics[f"top1_{s + 1}"], want_top1[s], rtol=1e-5, atol=1e-6)


def test_topk_accuracy_against_the_base_argmax_under_the_mask():
    logits = jnp.array([[[0.0, 3, 2, 1], [3, 2, 1, 0], [0, 1, 2, 3]]])
    target = jnp.array([[2, 2, 1]])  # rank 2, rank 3, rank 3
    acc = losses.topk_accuracy(logits, target, jnp.array([[1.0, 1, 0]]))
    np.testing.assert_allclose([acc["top1"], acc["top2"], acc["top3"]], [0, 0.5, 1], atol=1e-4)


# --- token-alignment masks: hand-made passes -------------------------------------------------

TOKENS = np.array([[3, 1, 4, 1, 5, 0]])  # draft input tokens x_{i+1} (last = 0 by construction)
# a_s[i] wanted: is tokens[i+1] in the top-3 of pass s at i (the last column is always 0).
A = {
    1: [1, 1, 0, 1, 1],
    2: [1, 0, 1, 1, 1],
    3: [0, 1, 1, 1, 1],
}
M0 = np.array([[0, 1, 1, 1, 1, 0]], np.float32)


def _pass_logits(s: int) -> np.ndarray:
    """[1, 6, V] logits whose top-3 holds tokens[i+1] exactly where A[s][i] = 1."""
    out = np.zeros((1, 6, V), np.float32)
    for i in range(6):
        nxt = TOKENS[0, i + 1] if i < 5 else TOKENS[0, 0]  # the last column would wrap to ids[0]
        top = [6, 7, 2] if i == 5 or not A[s][i] else [nxt, 6, 7]
        assert i == 5 or (nxt in top) == bool(A[s][i])
        out[0, i, top] = [3.0, 2.0, 1.0]
    return out


def _run(num_passes: int, *, shifted: bool, align_mask: bool = True):
    features = jnp.zeros((1, 6, V))
    inputs = losses.DraftInputs(
        features=features,
        tokens=jnp.asarray(TOKENS),
        target=features,
        loss_mask=jnp.asarray(M0),
        lengths=jnp.array([6]),
    )

    def run_pass(streams):
        s = 1 if streams is None else streams.shape[0] + 1
        logits = jnp.asarray(_pass_logits(s))
        return logits, logits

    _, metrics = losses.unrolled_loss(
        run_pass,
        lambda h: h,
        inputs,
        jnp.zeros((1, 6, V)),
        num_passes=num_passes,
        shifted=shifted,
        align_mask=align_mask,
    )
    return [np.asarray(metrics[f"mask{s}"]) for s in range(1, num_passes + 1)]


@pytest.mark.parametrize(
    "num_passes, shifted, expected",
    [
        (1, False, [[0, 1, 1, 1, 1, 0]]),
        (2, False, [[0, 1, 1, 1, 1, 0], [0, 1, 0, 1, 1, 0]]),
        (3, False, [[0, 1, 1, 1, 1, 0], [0, 1, 0, 1, 1, 0], [0, 0, 1, 0, 1, 0]]),
        (2, True, [[0, 1, 1, 1, 1, 0], [0, 1, 1, 0, 1, 0]]),
        (3, True, [[0, 1, 1, 1, 1, 0], [0, 1, 1, 0, 1, 0], [0, 0, 0, 1, 0, 0]]),
    ],
)
def test_alignment_masks_match_hand_computed(num_passes, shifted, expected):
    # C1 = a1 = [1,1,0,1,1,0]; C2 = shift_right(C1) * a2 = [0,1,1,0,1,0] * [1,0,1,1,1,0]
    # = [0,0,1,0,1,0]. Reference pass s+1 mask = C_s * M0; shifted = shift_right(C_s) * M0.
    masks = _run(num_passes, shifted=shifted)
    for got, want in zip(masks, expected, strict=True):
        np.testing.assert_array_equal(got[0], want)


def test_ablation_without_alignment_masks_trains_every_pass_on_the_base_mask():
    masks = _run(3, shifted=False, align_mask=False)
    for got in masks:
        np.testing.assert_array_equal(got[0], M0[0])
    assert not np.array_equal(_run(3, shifted=False)[2][0], M0[0])  # the masks do bite here


def test_alignment_does_not_wrap_around():
    # Position L-1 would compare with tokens[0] under the reference's roll: here it is 0.
    tokens = jnp.array([[2, 0, 0]])
    logits = jnp.zeros((1, 3, 4)).at[:, :, 3].set(1.0)  # top-1 = 3 at positions 0, 1
    logits = logits.at[0, 2, 2].set(5.0)  # tokens[0] is the top-1 at the last column
    np.testing.assert_array_equal(losses.alignment(logits, tokens, k=1), [[0, 0, 0]])
    np.testing.assert_array_equal(losses.shift_right(jnp.array([[1, 2, 3]])), [[0, 1, 2]])


def test_next_stream_shifts_regress_and_seeds_position_0():
    feats = jnp.arange(4.0).reshape(1, 4, 1) + 100
    r1 = jnp.arange(4.0).reshape(1, 4, 1)
    s1 = losses.next_stream(r1, feats, None)
    np.testing.assert_array_equal(s1[0, :, 0], [100, 0, 1, 2])
    s2 = losses.next_stream(r1 + 10, feats, s1[None])
    np.testing.assert_array_equal(s2[0, :, 0], [100, 10, 11, 12])  # new[0] = Q[-1][0]


def _toy_problem(seed=0, length=7):
    rng = np.random.default_rng(seed)
    d = 6
    inputs = losses.DraftInputs(
        features=jnp.asarray(rng.normal(size=(2, length, d)), jnp.float32),
        tokens=jnp.asarray(rng.integers(0, d, size=(2, length)), jnp.int32),
        target=jnp.asarray(rng.normal(size=(2, length, d)), jnp.float32),
        loss_mask=jnp.asarray(rng.integers(0, 2, size=(2, length)), jnp.float32),
        lengths=jnp.array([length, length]),
    )
    w = {
        "a": jnp.asarray(rng.normal(size=(d, d)), jnp.float32),
        "b": jnp.asarray(rng.normal(size=(d, d)), jnp.float32) * 0.3,
    }
    target_logits = jnp.asarray(rng.normal(size=(2, length, d)) * 2, jnp.float32)
    return inputs, w, target_logits


def _toy_pass(w, inputs, streams, fixed_streams=None):
    """A stand-in draft: each pass mixes the input features and the latest stream."""
    s = fixed_streams if fixed_streams is not None else streams
    x = inputs.features if s is None else inputs.features + s[-1]
    h = jnp.tanh(x @ w["a"])
    return h, h @ w["b"]


def test_stage_gradient_is_the_sum_of_per_pass_gradients():
    inputs, w, target_logits = _toy_problem()

    def total(w):
        return losses.unrolled_loss(
            lambda st: _toy_pass(w, inputs, st), lambda h: h, inputs, target_logits, num_passes=3
        )

    _, metrics = total(w)
    g_total = jax.grad(lambda w: total(w)[0])(w)
    # Rebuild each pass's streams and mask with the weights frozen, then differentiate each
    # pass's loss alone (the reference's per-pass backward) and add the gradients.
    streams, g_sum = None, jax.tree.map(jnp.zeros_like, w)
    target_p = jax.nn.softmax(target_logits, -1)
    for s in range(1, 4):
        mask = metrics[f"mask{s}"]

        def pass_loss(w, streams=streams, mask=mask):
            tf, nf = _toy_pass(w, inputs, streams)
            return (
                losses.vloss(nf, inputs.target, mask)
                + 0.1 * losses.ploss(tf, target_p, mask)
                + 0.5 * losses.topk_loss(tf, target_p, mask)
            )

        g_sum = jax.tree.map(jnp.add, g_sum, jax.grad(pass_loss)(w))
        _, nf = _toy_pass(w, inputs, streams)
        new = losses.next_stream(nf, inputs.features, streams)[None]
        streams = new if streams is None else jnp.concatenate([streams, new])
    for k in w:
        np.testing.assert_allclose(g_total[k], g_sum[k], rtol=1e-5, atol=1e-6)


def test_padding_never_enters_the_loss():
    inputs, w, target_logits = _toy_problem(length=6)
    lengths = jnp.array([6, 4])
    hidden = inputs.features
    ids = inputs.tokens

    def loss_with_padding(fill):
        h = hidden.at[1, 4:].set(fill)
        i = ids.at[1, 4:].set(3)
        inp = losses.draft_inputs(h, i, jnp.ones((2, 6)), lengths)
        tl = target_logits.at[1, 3:].set(fill)
        run = lambda st: _toy_pass(w, inp, st)  # noqa: E731
        return losses.unrolled_loss(run, lambda x: x, inp, tl, num_passes=3)

    base, metrics = loss_with_padding(0.0)
    other, _ = loss_with_padding(7.0)
    np.testing.assert_allclose(base, other, rtol=1e-6)
    for s in (1, 2, 3):
        assert np.all(np.asarray(metrics[f"mask{s}"])[1, 3:] == 0)  # last real position and pad


def _getkacc_reference(correct: np.ndarray, start_ok: np.ndarray):
    """The reference's getkacc loop, in terms of per-step correctness (numpy)."""
    depth, b, length = correct.shape
    total, hit = np.zeros(depth), np.zeros(depth)
    for row in range(b):
        for p in range(length):
            for k in range(depth):
                r = p + k
                if r >= length or not start_ok[row, r]:
                    break
                total[k] += 1
                if correct[k, row, r]:
                    hit[k] += 1
                else:
                    total[k + 1 :] += 1
                    break
    return hit, total


def test_chain_acceptance_matches_the_getkacc_loop():
    rng = np.random.default_rng(3)
    correct = rng.random((5, 3, 40)) < 0.7
    start_ok = rng.random((3, 40)) < 0.8
    hits, totals = losses.chain_acceptance(jnp.asarray(correct), jnp.asarray(start_ok))
    want_h, want_t = _getkacc_reference(correct, start_ok)
    np.testing.assert_array_equal(hits, want_h)
    np.testing.assert_array_equal(totals, want_t)
