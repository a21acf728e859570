"""Compact PyTorch reference of the GRIFFIN, EAGLE-2 and EAGLE-3 drafts, written from the spec.

GRIFFIN follows GRIFFIN_SPEC sections 2.1-2.3 (the `Efc` fusion block, one decoder layer without
input norm and a 2H-wide MLP over the duplicated residual, split into two heads) and section 3
(the multi-stream training attention, literally: per-stream 0/1 masks built by loops, and both the
multiplicative "leaky" masking and exact masking). EAGLE-2: `fc` Linear over [emb, feat] with
bias, one Llama layer without input norm, no final norm. EAGLE-3 (SafeAILab/EAGLE
`eagle/model/cnets.py`: `Model` with `LlamaDecoderLayeremb`): `fc` Linear 3T -> H without bias
over the base features (skipped when the input is already H wide: tree levels), a `midlayer`
whose q/k/v read [input_layernorm(emb), hidden_norm(feat)] (2H) with the residual from the
feature, then post-attention norm + SwiGLU; `norm` + `lm_head` (H -> V') give the token logits;
the `d2t` / `t2d` buffers map the draft vocabulary. Attention is HF style (q/k/v/o Linears,
rotate-half RoPE, repeated KV heads, an additive fp32 mask with `finfo(f32).min`, a
`past_key_value` tuple and an optional tree mask over the bottom-right block).

Module and parameter names follow the published state dict (spec 2.5), so
`state_dict()` has exactly the published keys and `load_state_dict(strict=True)` checks them.
Test-only code: not imported by the package.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn


@dataclasses.dataclass
class RefConfig:
    vocab_size: int = 128
    hidden_size: int = 64
    intermediate_size: int = 96
    num_attention_heads: int = 4
    num_key_value_heads: int = 4
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10_000.0
    qkv_bias: bool = False
    draft_vocab_size: int = 0  # EAGLE-3 (0 = vocab_size)
    target_hidden_size: int = 0  # EAGLE-3 (0 = hidden_size)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope_cos_sin(position_ids: torch.Tensor, head_dim: int, theta: float):
    """cos, sin [B, 1, T, d] for explicit position ids [B, T]."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    freqs = position_ids[..., None].double() * inv_freq  # [B, T, d/2]
    emb = torch.cat((freqs, freqs), dim=-1).float()
    return emb.cos()[:, None], emb.sin()[:, None]


class Attention(nn.Module):
    def __init__(self, cfg: RefConfig, in_dim: int | None = None):
        super().__init__()
        h, nh, nkv, d = (
            cfg.hidden_size,
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim,
        )
        self.nh, self.nkv, self.d = nh, nkv, d
        in_dim = in_dim or h
        self.q_proj = nn.Linear(in_dim, nh * d, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(in_dim, nkv * d, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(in_dim, nkv * d, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(nh * d, h, bias=False)

    def heads(self, x, proj, n, cos=None, sin=None):
        b, t, _ = x.shape
        y = proj(x).view(b, t, n, self.d).transpose(1, 2)  # [B, n, T, d]
        return y if cos is None else y * cos + rotate_half(y) * sin

    def repeat(self, kv: torch.Tensor) -> torch.Tensor:
        return kv.repeat_interleave(self.nh // self.nkv, dim=1)

    def forward(self, x, cos, sin, attn_bias, past_kv=None):
        """x [B, T, H]; attn_bias [B, 1, T, S] additive; returns (out, (k, v) incl. the past)."""
        b, t, _ = x.shape
        q = self.heads(x, self.q_proj, self.nh, cos, sin)
        k = self.heads(x, self.k_proj, self.nkv, cos, sin)
        v = self.heads(x, self.v_proj, self.nkv)
        if past_kv is not None:
            k = torch.cat([past_kv[0], k], dim=2)
            v = torch.cat([past_kv[1], v], dim=2)
        scores = q @ self.repeat(k).transpose(2, 3) / math.sqrt(self.d) + attn_bias
        probs = F.softmax(scores.float(), dim=-1).to(q.dtype)
        out = (probs @ self.repeat(v)).transpose(1, 2).reshape(b, t, self.nh * self.d)
        return self.o_proj(out), (k, v)


class MLP(nn.Module):
    def __init__(self, cfg: RefConfig, out_dim: int):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, out_dim, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """Layer 0: no input_layernorm; MLP of width out_dim over the repeated residual."""

    def __init__(self, cfg: RefConfig, out_dim: int):
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg, out_dim)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.repeats = out_dim // cfg.hidden_size

    def post_attention(self, a):
        return torch.cat([a] * self.repeats, dim=-1) + self.mlp(self.post_attention_layernorm(a))

    def forward(self, x, cos, sin, attn_bias, past_kv=None):
        attn, kv = self.self_attn(x, cos, sin, attn_bias, past_kv)
        return self.post_attention(x + attn), kv


class EMLP(nn.Module):
    """GRIFFIN fc.mlp: down(silu(up([N(v), N(e)]))), no gate, one shared norm."""

    def __init__(self, cfg: RefConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.up_proj = nn.Linear(2 * cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, v, e):
        h = torch.cat([self.input_layernorm(v), self.input_layernorm(e)], dim=-1)
        return self.down_proj(F.silu(self.up_proj(h)))


class Efc(nn.Module):
    """GRIFFIN fusion block: u = fc([e, feat]); u + mlp(N(u), e)."""

    def __init__(self, cfg: RefConfig):
        super().__init__()
        self.fc = nn.Linear(2 * cfg.hidden_size, cfg.hidden_size, bias=True)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = EMLP(cfg)

    def forward(self, e, feat):
        u = self.fc(torch.cat([e, feat], dim=-1))
        return u + self.mlp(self.post_attention_layernorm(u), e)


def ref_stream_masks(num_streams: int, seq_len: int) -> torch.Tensor:
    """Spec 3's allowed (stream, row, col) triples, by explicit loops: [F, L, L] bool."""
    f = num_streams
    m = torch.zeros(f, seq_len, seq_len, dtype=torch.bool)
    for r in range(seq_len):
        for c in range(seq_len):
            if c <= r - (f - 1):
                m[0, r, c] = True
            for t in range(1, f):
                if c == r - (f - 1 - t):
                    m[t, r, c] = True
    return m


def _attention_inputs(cfg: RefConfig, b: int, t: int, past: int, position_ids, tree_mask):
    """(cos, sin, additive mask [B, 1, T, past + T]) of an inference forward."""
    if position_ids is None:
        position_ids = torch.arange(past, past + t)[None].expand(b, t)
    minval = torch.finfo(torch.float32).min
    rows = torch.arange(t)[:, None] + past
    cols = torch.arange(past + t)[None, :]
    bias = torch.where(cols <= rows, 0.0, minval)[None, None].repeat(b, 1, 1, 1)
    if tree_mask is not None:
        m = tree_mask.shape[-1]
        block = bias[:, :, -t:, -m:]
        bias[:, :, -t:, -m:] = torch.where(tree_mask == 0, minval, block)
    cos, sin = rope_cos_sin(position_ids, cfg.head_dim, cfg.rope_theta)
    return cos, sin, bias


class _Draft(nn.Module):
    def __init__(self, cfg: RefConfig, out_dim: int):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList([DecoderLayer(cfg, out_dim)])

    def fuse(self, e, feat):
        raise NotImplementedError

    def split(self, out):
        raise NotImplementedError

    def forward(self, hidden, ids, position_ids=None, past_kv=None, tree_mask=None):
        """Inference forward (cnets_griffin_1 style).

        hidden [B, T, H]; ids [B, T]; past_kv = (k, v) [B, nkv, P, d] or None; tree_mask
        [B, 1, T, M] (1 = visible) applied to the bottom-right T x M block of the mask.
        Returns (token_feature, next_feature, (k, v)).
        """
        b, t, _ = hidden.shape
        past = 0 if past_kv is None else past_kv[0].shape[2]
        cos, sin, bias = _attention_inputs(self.cfg, b, t, past, position_ids, tree_mask)
        e = self.embed_tokens(ids).to(hidden.dtype)
        out, kv = self.layers[0](self.fuse(e, hidden), cos, sin, bias, past_kv)
        return (*self.split(out), kv)

    def forward_train(self, hidden, ids, q_hidden_states=None, attention_mask=None, leaky=True):
        """Multi-stream training forward (cnets_griffin_2 style, spec 3), no cache.

        hidden [B, L, H] (stream 0); q_hidden_states [F-1, B, L, H] or None; attention_mask
        [B, L] (1 = valid), used by the exact mode only. Returns (token_feature, next_feature).
        """
        b, seq_len, _ = hidden.shape
        streams = [hidden] + ([] if q_hidden_states is None else list(q_hidden_states))
        f = len(streams)
        e = self.embed_tokens(ids).to(hidden.dtype)
        xs = [self.fuse(e, s) for s in streams]
        attn = self.layers[0].self_attn
        pos = torch.arange(seq_len)[None].expand(b, seq_len)
        cos, sin = rope_cos_sin(pos, self.cfg.head_dim, self.cfg.rope_theta)
        q = attn.heads(xs[-1], attn.q_proj, attn.nh, cos, sin)  # [B, nh, L, d]
        ks = [attn.repeat(attn.heads(x, attn.k_proj, attn.nkv, cos, sin)) for x in xs]
        vs = [attn.repeat(attn.heads(x, attn.v_proj, attn.nkv)) for x in xs]
        scores = [q @ k.transpose(2, 3) / math.sqrt(attn.d) for k in ks]  # F x [B, nh, L, L]
        masks = ref_stream_masks(f, seq_len).float()  # [F, L, L]
        if leaky:
            z = sum(masks[i] * scores[i] for i in range(f))
            w = F.softmax(z.float(), dim=-1).to(q.dtype)
            out = sum((masks[i] * w) @ vs[i] for i in range(f))
        else:
            valid = torch.ones(b, seq_len) if attention_mask is None else attention_mask.float()
            allowed = masks[None, None] * valid[:, None, None, None, :]  # [B, 1, F, L, L]
            minval = torch.finfo(torch.float32).min
            cat = torch.cat(
                [torch.where(allowed[:, :, i] > 0, scores[i], minval) for i in range(f)], dim=-1
            )  # [B, nh, L, F*L]
            w = F.softmax(cat.float(), dim=-1).to(q.dtype)
            out = w @ torch.cat(vs, dim=2)
        out = out.transpose(1, 2).reshape(b, seq_len, attn.nh * attn.d)
        a = xs[-1] + attn.o_proj(out)
        return self.split(self.layers[0].post_attention(a))


class GriffinDraft(_Draft):
    def __init__(self, cfg: RefConfig):
        super().__init__(cfg, 2 * cfg.hidden_size)
        self.fc = Efc(cfg)

    def fuse(self, e, feat):
        return self.fc(e, feat)

    def split(self, out):
        h = self.cfg.hidden_size
        return out[..., :h], out[..., h:]


class Eagle2Draft(_Draft):
    def __init__(self, cfg: RefConfig):
        super().__init__(cfg, cfg.hidden_size)
        self.fc = nn.Linear(2 * cfg.hidden_size, cfg.hidden_size, bias=True)

    def fuse(self, e, feat):
        return self.fc(torch.cat([e, feat], dim=-1))

    def split(self, out):
        return out, out


class Eagle3Layer(nn.Module):
    """EAGLE-3's `midlayer` (`LlamaDecoderLayeremb`)."""

    def __init__(self, cfg: RefConfig):
        super().__init__()
        self.self_attn = Attention(cfg, in_dim=2 * cfg.hidden_size)
        self.mlp = MLP(cfg, cfg.hidden_size)
        self.hidden_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, emb, hidden, cos, sin, attn_bias, past_kv=None):
        x = torch.cat((self.input_layernorm(emb), self.hidden_norm(hidden)), dim=-1)
        attn, kv = self.self_attn(x, cos, sin, attn_bias, past_kv)
        h = hidden + attn
        return h + self.mlp(self.post_attention_layernorm(h)), kv


class Eagle3Draft(nn.Module):
    """EAGLE-3's draft `Model`: state dict `embed_tokens`, `fc`, `midlayer.*`, `norm`,
    `lm_head`, `d2t`, `t2d`."""

    def __init__(self, cfg: RefConfig):
        super().__init__()
        self.cfg = cfg
        h = cfg.hidden_size
        draft_vocab = cfg.draft_vocab_size or cfg.vocab_size
        self.embed_tokens = nn.Embedding(cfg.vocab_size, h)
        self.lm_head = nn.Linear(h, draft_vocab, bias=False)
        self.midlayer = Eagle3Layer(cfg)
        self.fc = nn.Linear(3 * (cfg.target_hidden_size or h), h, bias=False)
        self.norm = RMSNorm(h, cfg.rms_norm_eps)
        self.register_buffer("d2t", torch.zeros(draft_vocab, dtype=torch.long))
        self.register_buffer("t2d", torch.zeros(cfg.vocab_size, dtype=torch.bool))

    def forward(self, hidden, ids, position_ids=None, past_kv=None, tree_mask=None):
        """As `_Draft.forward`; hidden is [B, T, 3T] base features or [B, T, H] draft outputs.
        Returns (token_feature = norm(out), next_feature = out, (k, v))."""
        b, t, _ = hidden.shape
        past = 0 if past_kv is None else past_kv[0].shape[2]
        cos, sin, bias = _attention_inputs(self.cfg, b, t, past, position_ids, tree_mask)
        e = self.embed_tokens(ids).to(hidden.dtype)
        if hidden.shape[-1] != e.shape[-1]:
            hidden = self.fc(hidden)
        out, kv = self.midlayer(e, hidden, cos, sin, bias, past_kv)
        return self.norm(out), out, kv

    def forward_ttt(self, hidden, ids, steps: int, attention_mask=None):
        """The training-time test of `eagle/traineagle3/cnets.py`, literally: per step, the ids
        shift left by one (zero fill), RoPE positions advance by one, keys/values go into a
        growing list; scores are step 0's keys under the causal (+ padding) mask, then each later
        step's key at the query's own row (an elementwise product), softmaxed together.

        hidden [B, L, 3T]; ids [B, L] (x_{r+1}); attention_mask [B, L] (1 = valid) or None.
        Returns the normed outputs of every step, [steps, B, L, H].
        """
        b, seq_len, _ = hidden.shape
        attn = self.midlayer.self_attn
        minval = torch.finfo(torch.float32).min
        rows = torch.arange(seq_len)[:, None]
        cols = torch.arange(seq_len)[None, :]
        bias = torch.where(cols <= rows, 0.0, minval)[None, None].repeat(b, 1, 1, 1)
        if attention_mask is not None:
            bias = bias.masked_fill(attention_mask[:, None, None, :] == 0, minval)
        h = self.fc(hidden)
        cache_k, cache_v, outs = [], [], []
        for s in range(steps):
            emb = self.embed_tokens(ids).to(h.dtype)
            x = torch.cat((self.midlayer.input_layernorm(emb), self.midlayer.hidden_norm(h)), -1)
            pos = torch.arange(seq_len)[None].expand(b, seq_len) + s
            cos, sin = rope_cos_sin(pos, self.cfg.head_dim, self.cfg.rope_theta)
            q = attn.heads(x, attn.q_proj, attn.nh, cos, sin)  # [B, nh, L, d]
            cache_k.append(attn.repeat(attn.heads(x, attn.k_proj, attn.nkv, cos, sin)))
            cache_v.append(attn.repeat(attn.heads(x, attn.v_proj, attn.nkv)))
            scores = [q @ cache_k[0].transpose(2, 3) / math.sqrt(attn.d) + bias]
            for i in range(1, len(cache_k)):
                scores.append(((q * cache_k[i]).sum(-1) / math.sqrt(attn.d))[..., None])
            w = F.softmax(torch.cat(scores, dim=-1).float(), dim=-1).to(q.dtype)
            out = w[..., :seq_len] @ cache_v[0]
            for i in range(1, len(cache_k)):
                out = out + w[..., seq_len + i - 1 : seq_len + i] * cache_v[i]
            out = attn.o_proj(out.transpose(1, 2).reshape(b, seq_len, attn.nh * attn.d))
            a = h + out
            h = a + self.midlayer.mlp(self.midlayer.post_attention_layernorm(a))
            outs.append(self.norm(h))
            ids = torch.cat((ids[:, 1:], torch.zeros_like(ids[:, :1])), dim=1)
        return torch.stack(outs)

    def draft_tokens(self, token_feature, k: int):
        """The top-k target token ids of the draft's logits (topK_genrate: i + d2t[i])."""
        top = torch.topk(self.lm_head(token_feature), k, dim=-1).indices
        return top + self.d2t[top]


def make_ref_draft(kind: str, cfg: RefConfig, *, seed: int = 0, std: float = 0.2) -> nn.Module:
    """A random reference draft with weights large enough that outputs are not near-trivial."""
    torch.manual_seed(seed)
    model = {"griffin": GriffinDraft, "eagle2": Eagle2Draft, "eagle3": Eagle3Draft}[kind](cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif name == "embed_tokens.weight":
                p.normal_(0.0, 1.0)
            else:
                p.normal_(0.0, std / math.sqrt(p.shape[-1]) * 4)
    return model.eval()
