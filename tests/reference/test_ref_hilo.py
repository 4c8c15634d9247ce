"""The HiLo reference: LITv2's head split and parameter names, the window_size=1 case as
plain multi-head self-attention, and an explicit loop over windows and pooled tokens."""

import pytest
import torch
import torch.nn.functional as F

from fastattn.reference import HiLo

D64 = torch.float64


def test_head_split_and_parameter_names():
    m = HiLo(384, num_heads=12, qkv_bias=True, alpha=0.9)
    assert (m.l_heads, m.h_heads, m.head_dim) == (10, 2, 32)  # int(12 * 0.9) == 10
    shapes = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    assert shapes == {
        "h_qkv.weight": (192, 384), "h_qkv.bias": (192,),
        "h_proj.weight": (64, 64), "h_proj.bias": (64,),
        "l_q.weight": (320, 384), "l_q.bias": (320,),
        "l_kv.weight": (640, 384), "l_kv.bias": (640,),
        "l_proj.weight": (320, 320), "l_proj.bias": (320,),
    }
    assert not any(k.startswith("h_") for k in HiLo(64, 4, window_size=1).state_dict())
    assert not any(k.startswith("l_") for k in HiLo(64, 4, alpha=0.0).state_dict())


def test_window_size_one_is_plain_mhsa():
    torch.manual_seed(1)
    m = HiLo(24, num_heads=3, qkv_bias=True, window_size=1).double()
    x = torch.randn(2, 5 * 7, 24, dtype=D64)
    q = m.l_q(x).view(2, 35, 3, 8).transpose(1, 2)
    k, v = m.l_kv(x).view(2, 35, 2, 3, 8).permute(2, 0, 3, 1, 4)
    want = m.l_proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(2, 35, 24))
    torch.testing.assert_close(m(x, 5, 7), want)


def _loop_hilo(m, x, H, W):
    """Token-by-token HiLo from docs/hilo.md, with explicit padding, windows and pooling."""
    b, _, c = x.shape
    ws, hd = m.ws, m.head_dim
    hp, wp = -(-H // ws) * ws, -(-W // ws) * ws
    grid = torch.zeros(b, hp, wp, c, dtype=x.dtype)
    grid[:, :H, :W] = x.view(b, H, W, c)
    out = []
    if m.h_heads:
        qkv = m.h_qkv(grid)
        hi = torch.zeros(b, hp, wp, m.h_dim, dtype=x.dtype)
        for y in range(hp):
            for xx in range(wp):
                y0, x0 = y // ws * ws, xx // ws * ws
                toks = [(y0 + a, x0 + bb) for a in range(ws) for bb in range(ws)]
                for h in range(m.h_heads):
                    def part(t, pos):
                        return qkv[:, pos[0], pos[1], t * m.h_dim + h * hd : t * m.h_dim + (h + 1) * hd]
                    s = torch.stack([(part(0, (y, xx)) * part(1, p)).sum(-1) for p in toks], -1) * m.scale
                    p = torch.softmax(s, -1)
                    hi[:, y, xx, h * hd : (h + 1) * hd] = sum(p[:, i, None] * part(2, t) for i, t in enumerate(toks))
        out.append(m.h_proj(hi)[:, :H, :W])
    if m.l_heads:
        pooled = torch.stack(
            [grid[:, y : y + ws, xx : xx + ws].mean(dim=(1, 2)) for y in range(0, hp, ws) for xx in range(0, wp, ws)], 1
        )
        kv = m.l_kv(pooled)
        q = m.l_q(grid)
        lo = torch.zeros(b, hp, wp, m.l_dim, dtype=x.dtype)
        for h in range(m.l_heads):
            kh = kv[..., h * hd : (h + 1) * hd]
            vh = kv[..., m.l_dim + h * hd : m.l_dim + (h + 1) * hd]
            s = torch.einsum("byxd,bnd->byxn", q[..., h * hd : (h + 1) * hd], kh) * m.scale
            lo[..., h * hd : (h + 1) * hd] = torch.einsum("byxn,bnd->byxd", torch.softmax(s, -1), vh)
        out.append(m.l_proj(lo)[:, :H, :W])
    return torch.cat(out, -1).reshape(b, H * W, -1)


@pytest.mark.parametrize("H,W,ws,alpha", [(4, 6, 2, 0.5), (5, 7, 2, 0.5), (6, 6, 3, 0.75), (7, 5, 3, 0.0), (4, 4, 2, 1.0)])
def test_matches_explicit_loop(H, W, ws, alpha):
    torch.manual_seed(2)
    m = HiLo(16, num_heads=4, qkv_bias=True, window_size=ws, alpha=alpha).double()
    x = torch.randn(2, H * W, 16, dtype=D64)
    got = m(x, H, W)
    assert got.shape == (2, H * W, 16)
    torch.testing.assert_close(got, _loop_hilo(m, x, H, W))
