"""Compact PyTorch reference of the GRIFFIN and EAGLE-2 drafts, written from the spec.

GRIFFIN follows GRIFFIN_SPEC sections 2.1-2.3 (the `Efc` fusion block, one decoder layer without
input norm and a 2H-wide MLP over the duplicated residual, split into two heads) and section 3
(the multi-stream training attention, literally: per-stream 0/1 masks built by loops, and both the
multiplicative "leaky" masking and exact masking). EAGLE-2: `fc` Linear over [emb, feat] with
bias, one Llama layer without input norm, no final norm. Attention is HF style (q/k/v/o Linears,
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
    def __init__(self, cfg: RefConfig):
        super().__init__()
        h, nh, nkv, d = (
            cfg.hidden_size,
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim,
        )
        self.nh, self.nkv, self.d = nh, nkv, d
        self.q_proj = nn.Linear(h, nh * d, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(h, nkv * d, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(h, nkv * d, bias=cfg.qkv_bias)
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
        if position_ids is None:
            position_ids = torch.arange(past, past + t)[None].expand(b, t)
        e = self.embed_tokens(ids).to(hidden.dtype)
        x = self.fuse(e, hidden)
        minval = torch.finfo(torch.float32).min
        rows = torch.arange(t)[:, None] + past
        cols = torch.arange(past + t)[None, :]
        bias = torch.where(cols <= rows, 0.0, minval)[None, None].repeat(b, 1, 1, 1)
        if tree_mask is not None:
            m = tree_mask.shape[-1]
            block = bias[:, :, -t:, -m:]
            bias[:, :, -t:, -m:] = torch.where(tree_mask == 0, minval, block)
        cos, sin = rope_cos_sin(position_ids, self.cfg.head_dim, self.cfg.rope_theta)
        out, kv = self.layers[0](x, cos, sin, bias, past_kv)
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


def make_ref_draft(kind: str, cfg: RefConfig, *, seed: int = 0, std: float = 0.2) -> _Draft:
    """A random reference draft with weights large enough that outputs are not near-trivial."""
    torch.manual_seed(seed)
    model = GriffinDraft(cfg) if kind == "griffin" else Eagle2Draft(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("layernorm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif name == "embed_tokens.weight":
                p.normal_(0.0, 1.0)
            else:
                p.normal_(0.0, std / math.sqrt(p.shape[-1]) * 4)
    return model.eval()
