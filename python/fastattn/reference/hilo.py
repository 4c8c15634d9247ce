"""HiLo attention (LITv2, docs/hilo.md), written plainly: the oracle for fastattn's HiLo module.
Parameter names and shapes are LITv2's, so a LITv2 state_dict loads."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _softmax_attention(q, k, v, scale):
    """q ``[..., Nq, d]``, k/v ``[..., Nk, d]``."""
    return torch.softmax(q @ k.transpose(-2, -1) * scale, dim=-1) @ v


class HiLo(nn.Module):
    """``HiLo(dim, num_heads=8, qkv_bias=False, qk_scale=None, attn_drop=0.0, proj_drop=0.0,
    window_size=2, alpha=0.5)``; ``forward(x [B, H*W, C], H, W)``. Dropout arguments are
    accepted and unused, as in LITv2."""

    def __init__(self, dim, num_heads=8, qkv_bias=False, qk_scale=None, attn_drop=0.0, proj_drop=0.0,
                 window_size=2, alpha=0.5):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        self.dim = dim
        self.ws = window_size
        hd = dim // num_heads
        self.head_dim = hd
        self.l_heads = int(num_heads * alpha)
        self.h_heads = num_heads - self.l_heads
        if window_size == 1:
            self.l_heads, self.h_heads = num_heads, 0
        self.l_dim = self.l_heads * hd
        self.h_dim = self.h_heads * hd
        self.scale = qk_scale or hd**-0.5
        if self.l_heads > 0:
            self.l_q = nn.Linear(dim, self.l_dim, bias=qkv_bias)
            self.l_kv = nn.Linear(dim, 2 * self.l_dim, bias=qkv_bias)
            self.l_proj = nn.Linear(self.l_dim, self.l_dim)
        if self.h_heads > 0:
            self.h_qkv = nn.Linear(dim, 3 * self.h_dim, bias=qkv_bias)
            self.h_proj = nn.Linear(self.h_dim, self.h_dim)

    def hifi(self, x):
        """x ``[B, Hp, Wp, C]`` (padded) → ``[B, Hp, Wp, h_dim]``: attention inside each
        non-overlapping ws×ws window, tokens row-major within the window."""
        b, hp, wp, _ = x.shape
        ws, nh, hd = self.ws, self.h_heads, self.head_dim
        qkv = self.h_qkv(x)  # [B, Hp, Wp, 3*h_dim], channel t*h_dim + h*hd + c
        qkv = qkv.reshape(b, hp // ws, ws, wp // ws, ws, 3, nh, hd)
        qkv = qkv.permute(5, 0, 1, 3, 6, 2, 4, 7)  # [3, B, gh, gw, heads, ws, ws, hd]
        qkv = qkv.reshape(3, b, hp // ws, wp // ws, nh, ws * ws, hd)
        out = _softmax_attention(qkv[0], qkv[1], qkv[2], self.scale)  # [B, gh, gw, heads, ws², hd]
        out = out.reshape(b, hp // ws, wp // ws, nh, ws, ws, hd).permute(0, 1, 4, 2, 5, 3, 6)
        return self.h_proj(out.reshape(b, hp, wp, self.h_dim))

    def lofi(self, x):
        """x ``[B, Hp, Wp, C]`` → ``[B, Hp, Wp, l_dim]``: every token attends to the ws×ws
        average-pooled input map."""
        b, hp, wp, c = x.shape
        nh, hd = self.l_heads, self.head_dim
        q = self.l_q(x).reshape(b, hp * wp, nh, hd).transpose(1, 2)
        pooled = x
        if self.ws > 1:
            pooled = F.avg_pool2d(x.permute(0, 3, 1, 2), self.ws, self.ws).permute(0, 2, 3, 1)
        kv = self.l_kv(pooled.reshape(b, -1, c)).reshape(b, -1, 2, nh, hd)
        k, v = kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)
        out = _softmax_attention(q, k, v, self.scale).transpose(1, 2)
        return self.l_proj(out.reshape(b, hp, wp, self.l_dim))

    def forward(self, x, H, W):
        b, n, c = x.shape
        if n != H * W:
            raise ValueError(f"x has {n} tokens but H*W = {H * W}")
        x = x.reshape(b, H, W, c)
        pad_h, pad_w = (self.ws - H % self.ws) % self.ws, (self.ws - W % self.ws) % self.ws
        if pad_h or pad_w:
            x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))  # zeros at the bottom and right
        outs = []
        if self.h_heads > 0:
            outs.append(self.hifi(x)[:, :H, :W])
        if self.l_heads > 0:
            outs.append(self.lofi(x)[:, :H, :W])
        return torch.cat(outs, dim=-1).reshape(b, n, -1)
