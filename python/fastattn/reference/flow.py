"""Flowformer's Flow-Attention (docs/flow.md), written plainly: the oracle for
:func:`fastattn.flow_attention` and the modules :class:`fastattn.nn.FlowAttention` /
:class:`~fastattn.nn.FlowAttentionCausal`. The causal form materialises the ``[B, H, T, D, Dv]``
prefix sum exactly as the original does (it is an oracle, not a kernel)."""

from __future__ import annotations

import torch
from torch import nn


def flow_attention(q, k, v, causal=False, eps=1e-6):
    """Flow-Attention on heads-last ``[B, T, H, D]`` tensors (values ``[B, Tk, H, Dv]``).

    ``phi = sigmoid``, no softmax scale. Non-causal allows ``Tq != Tk``; causal needs
    ``Tq == Tk``. Returns ``[B, Tq, H, Dv]`` in the inputs' dtype.
    """
    q, k, v = (x.transpose(1, 2) for x in (q, k, v))  # [B, H, T, D]
    sq, sk = torch.sigmoid(q), torch.sigmoid(k)
    n, m = q.shape[2], k.shape[2]
    if not causal:
        incoming = 1.0 / torch.einsum("bhnd,bhd->bhn", sq + eps, sk.sum(dim=2) + eps)
        outgoing = 1.0 / torch.einsum("bhmd,bhd->bhm", sk + eps, sq.sum(dim=2) + eps)
        sink = torch.einsum("bhnd,bhd->bhn", sq + eps, (sk * outgoing[..., None]).sum(dim=2) + eps)
        source = torch.einsum("bhmd,bhd->bhm", sk + eps, (sq * incoming[..., None]).sum(dim=2) + eps)
        source = source.clamp(-1.0, 1.0)
        allocation = torch.sigmoid(sink * (float(n) / float(m)))
        competition = torch.softmax(source, dim=-1) * float(m)
        kv = torch.einsum("bhmd,bhmv->bhdv", sk, v * competition[..., None])
        out = torch.einsum("bhnd,bhdv->bhnv", sq, kv) * (incoming * allocation)[..., None]
        return out.transpose(1, 2)

    if n != m:
        raise ValueError(f"causal flow attention needs as many queries as keys, got {n} and {m}")
    t = torch.arange(1, n + 1, dtype=q.dtype, device=q.device)  # 1-based positions
    incoming = 1.0 / torch.einsum("bhtd,bhtd->bht", sq + eps, sk.cumsum(dim=2) + eps)
    outgoing = 1.0 / torch.einsum("bhtd,bhtd->bht", sk + eps, sq.cumsum(dim=2) + eps)
    sink = torch.einsum(
        "bhtd,bhtd->bht", sq + eps, (sk * (t * outgoing)[..., None]).cumsum(dim=2) + eps
    ) / t
    source = torch.einsum(
        "bhtd,bhtd->bht", sk + eps, (sq * (t * incoming)[..., None]).cumsum(dim=2) + eps
    ) / t
    source = source.clamp(-1.0, 1.0)
    allocation = torch.sigmoid(sink)
    competition = torch.exp(source) / torch.exp(source).cumsum(dim=-1) * t
    kv = torch.einsum("bhtd,bhtv->bhtdv", sk, v * competition[..., None]).cumsum(dim=2)
    out = torch.einsum("bhtd,bhtdv->bhtv", sq, kv) * (incoming * allocation)[..., None]
    return out.transpose(1, 2)


class _Flow(nn.Module):
    causal = False

    def __init__(self, d_input, d_model, d_output, n_heads, drop_out=0.05, eps=1e-6):
        super().__init__()
        self.n_heads = n_heads
        self.query_projection = nn.Linear(d_input, d_model)
        self.key_projection = nn.Linear(d_input, d_model)
        self.value_projection = nn.Linear(d_input, d_model)
        self.out_projection = nn.Linear(d_model, d_output)
        self.dropout = nn.Dropout(drop_out)
        self.eps = eps

    def forward(self, queries, keys, values):
        """``queries [B, L, d_input]``, ``keys``/``values [B, S, d_input]`` → ``[B, L, d_output]``."""
        b, l, _ = queries.shape
        s = keys.shape[1]
        q = self.query_projection(queries).view(b, l, self.n_heads, -1)
        k = self.key_projection(keys).view(b, s, self.n_heads, -1)
        v = self.value_projection(values).view(b, s, self.n_heads, -1)
        x = flow_attention(q, k, v, causal=self.causal, eps=self.eps).reshape(b, l, -1)
        return self.dropout(self.out_projection(x))


class FlowAttention(_Flow):
    """Flowformer's ``Flow_Attention``: projections, non-causal Flow-Attention, output
    projection, dropout after it."""


class FlowAttentionCausal(_Flow):
    """Flowformer's ``Flow_Attention_Causal``."""

    causal = True
