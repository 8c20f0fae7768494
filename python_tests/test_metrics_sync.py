"""Metric sync under torch.distributed: 2 CPU processes (gloo) each see half the data; after
sync() every rank computes the metrics of the whole data set."""
from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from unlearn_fast.evaluation import metrics as em


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        g = torch.Generator().manual_seed(0)
        p, q, X, Y = (torch.randn(40, 6, generator=g), torch.randn(40, 6, generator=g),
                      torch.randn(40, 5, generator=g), torch.randn(40, 3, generator=g))
        groups = torch.arange(40) % 3
        sl = slice(rank * 20, (rank + 1) * 20)
        js = em.JSDivergence(num_groups=3)
        js.update(p[sl], q[sl], groups[sl])
        js.sync()
        cka = em.LinearCKA.for_features(["x"])
        cka.update_features([X[sl]], [Y[sl]])
        cka.sync()
        out[rank] = (js.compute(), cka.compute()["cka"])
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_sync_two_processes():
    g = torch.Generator().manual_seed(0)
    p, q, X, Y = (torch.randn(40, 6, generator=g), torch.randn(40, 6, generator=g),
                  torch.randn(40, 5, generator=g), torch.randn(40, 3, generator=g))
    full = em.JSDivergence(num_groups=3)
    full.update(p, q, torch.arange(40) % 3)
    want_cka = em.linear_cka(X, Y)
    with mp.Manager() as mgr:
        out = mgr.dict()
        mp.spawn(_worker, args=(2, _free_port(), out), nprocs=2, join=True)
        res = dict(out)
    for rank in (0, 1):
        torch.testing.assert_close(res[rank][0], full.compute(), rtol=1e-12, atol=1e-12)
        assert abs(float(res[rank][1][0]) - want_cka) < 1e-12
