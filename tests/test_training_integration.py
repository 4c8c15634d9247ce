"""A small model built from fastattn's modules (neighborhood, HiLo, linear and flow attention) in
the settings training and deployment put it in: DistributedDataParallel with gloo across two
processes, torch.export, and CPU autocast to bfloat16."""

from __future__ import annotations

import os
import socket
import tempfile

import pytest
import torch
from torch import nn

import fastattn

C, HEADS, STEPS = 32, 4, 3


class TinyModel(nn.Module):
    """``[B, 6, 7, C]`` maps → 3 logits: a neighborhood layer on the map, HiLo on its tokens
    (7 columns: the padded form), then linear and causal flow attention."""

    def __init__(self):
        super().__init__()
        self.na = fastattn.nn.NeighborhoodAttention2D(C, HEADS, kernel_size=3, dilation=(1, 2))
        self.hilo = fastattn.nn.HiLo(C, HEADS, qkv_bias=True, window_size=2, alpha=0.5)
        self.lin = fastattn.nn.LinearAttention(C, HEADS)
        self.flow = fastattn.nn.FlowAttentionCausal(C, C, C, HEADS, drop_out=0.0)
        self.head = nn.Linear(C, 3)

    def forward(self, x):
        b, h, w, c = x.shape
        x = x + self.na(x)
        s = x.reshape(b, h * w, c)
        s = s + self.hilo(s, h, w)
        s = s + self.lin(s)[0]
        s = s + self.flow(s, s, s)
        return self.head(s.mean(1))


def _data(batch=4):
    g = torch.Generator().manual_seed(1)
    return torch.randn(batch, 6, 7, C, generator=g), torch.randint(0, 3, (batch,), generator=g)


def _train(model, x, y, steps=STEPS):
    """SGD steps; returns the first step's gradients."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    first = None
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        if first is None:
            first = [p.grad.detach().clone() for p in model.parameters()]
        opt.step()
    return first


def _ddp_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    os.environ["FASTATTN_NUM_THREADS"] = "1"
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                         world_size=world)
    try:
        torch.manual_seed(0)
        model = nn.parallel.DistributedDataParallel(TinyModel())
        x, y = _data()
        shard = slice(rank * len(x) // world, (rank + 1) * len(x) // world)
        grads = _train(model, x[shard], y[shard])
        torch.save({"grads": grads, "params": [p.detach() for p in model.module.parameters()]},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built")
def test_ddp_two_processes_match_one_process_on_the_whole_batch():
    torch.manual_seed(0)
    single = TinyModel()
    x, y = _data()
    want_grads = _train(single, x, y)
    with tempfile.TemporaryDirectory() as out:
        torch.multiprocessing.start_processes(_ddp_worker, args=(2, _free_port(), out), nprocs=2,
                                              start_method="spawn", join=True)
        ranks = [torch.load(os.path.join(out, f"rank{r}.pt")) for r in range(2)]
    for r in ranks:
        # DDP averages the two half-batch gradients: the whole batch's mean-loss gradient
        for g, w in zip(r["grads"], want_grads):
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)
        for p, w in zip(r["params"], single.parameters()):
            torch.testing.assert_close(p, w.detach(), rtol=1e-4, atol=1e-6)
    # the ranks agree exactly: the same averaged gradients applied to the same weights
    for a, b in zip(ranks[0]["params"], ranks[1]["params"]):
        assert torch.equal(a, b)


def test_export_keeps_the_fastattn_ops_and_the_numbers():
    torch.manual_seed(0)
    model = TinyModel().eval()
    x, _ = _data(2)
    ep = torch.export.export(model, (x,))
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    for op in ("fastattn.na_fwd", "fastattn.hilo_fwd", "fastattn.linear_attention_fwd",
               "fastattn.flow_attention_fwd"):
        assert any(t.startswith(op) for t in targets), (op, targets)
    with torch.no_grad():
        torch.testing.assert_close(ep.module()(x), model(x), atol=0, rtol=0)


def test_bfloat16_autocast_forward_and_backward():
    torch.manual_seed(0)
    model = TinyModel()
    x, y = _data(2)
    want = model(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = model(x)
        loss = nn.functional.cross_entropy(got, y)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, rtol=0.1, atol=0.1)
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.dtype == torch.float32, name
        assert torch.isfinite(p.grad).all(), name
