"""The accelerator path's own behaviour: parameter reductions replayed as CUDA graphs equal
eager ones (a moved parameter makes a new capture), and the device path's non-finite counts,
run on the CPU. Its numbers against the float64 oracle: tests/kernels/test_contract.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from gradflow.kernels.device import Replayed
from gradflow.probes import Snapshot

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@needs_cuda
def test_cuda_graph_replays_equal_eager_reductions() -> None:
    # Each phase runs eagerly once, then replays a captured graph; a parameter whose
    # storage moves (p.data = ...) makes a new capture.
    torch.manual_seed(0)
    params = [nn.Parameter(torch.randn(s, device="cuda")) for s in (300, 7, 0, 1000)]
    graphed = Snapshot(params, torch.device("cuda"), graphs=True)
    eager = Snapshot(params, torch.device("cuda"), graphs=False)
    for step in range(4):
        grads = [torch.randn_like(p) if i != 1 or step % 2 else None for i, p in enumerate(params)]
        if step == 2:
            grads[0][3] = float("nan")  # type: ignore[index]
        results = []
        for snap in (graphed, eager):
            g_sq, bad = snap.grad_reductions(grads)
            w_sq = snap.take()
            results.append([t.clone() for t in (g_sq, bad, w_sq)])
        with torch.no_grad():
            for p in params:
                p.mul_(0.9).add_(0.01)
        if step == 1:
            params[3].data = params[3].data.clone()
        for snap, res in zip((graphed, eager), results, strict=True):
            res += [t.clone() for t in snap.delta(grads)]
        for a, b in zip(*results, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=0, equal_nan=True)
    phases = graphed._phases.values()
    assert all(isinstance(phase, Replayed) and phase.graph is not None for phase in phases)


def test_device_path_nonfinite_counts_match_numpy(monkeypatch: pytest.MonkeyPatch) -> None:
    # The counting path used on accelerators (no host branch), checked here on the CPU.
    monkeypatch.setattr("gradflow.probes.snapshot.param_kernels", lambda sizes: None)
    params = [
        nn.Parameter(torch.randn(3, 4)),
        nn.Parameter(torch.randn(5)),
        nn.Parameter(torch.randn(2, 2)),
        nn.Parameter(torch.randn(600)),
    ]
    g0, g2, g3 = torch.randn(3, 4), torch.randn(2, 2), torch.randn(600)
    g0[0, 1] = float("nan")
    g0[2, 3] = float("inf")
    g2[1, 1] = -float("inf")
    grads = [g0, None, g2, g3]
    snap = Snapshot(params, torch.device("cpu"))
    g_sq, counts = (t.numpy() for t in snap.grad_reductions(grads))
    want = [0 if g is None else int((~np.isfinite(g.numpy())).sum()) for g in grads]
    assert counts.tolist() == want == [2, 0, 1, 0]
    assert np.isnan(g_sq[0]) and g_sq[1] == 0 and np.isinf(g_sq[2])
    np.testing.assert_allclose(g_sq[3], float((g3.double() ** 2).sum()), rtol=1e-6)
    w_sq = snap.take()  # the buffer holds the weights again
    np.testing.assert_allclose(
        w_sq.numpy(), [float((p.detach() ** 2).sum()) for p in params], rtol=1e-6
    )
