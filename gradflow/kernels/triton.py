"""Layer-output reductions on CUDA GPUs in one Triton kernel per layer call.

By torch operations, ``[sum, sum of squares, nonzero, non-finite]`` of a layer output
take five kernel launches and a temporary; in a host-bound training step each launch costs
the host 10-30 us, hundreds of times per step. This kernel reads the output once and adds
the four sums (float32 per lane over a program's blocks of 2048 entries, of the entries
less the lane's first finite one; float64 across lanes and programs) into a zeroed float64
row with atomics: one launch, no host sync. It is opt-in: ``GRADFLOW_TRITON=1`` turns it
on, where Triton is installed (PyTorch's CUDA wheels bring it) and where it agrees with
torch operations on a check input at first use; elsewhere :func:`reducer` returns
``None`` and the probes use torch operations. It stays off by default until a GPU run of
``benchmarks/gpu.py`` shows it faster than torch operations.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any

import torch

BLOCK = 2048
WARPS = 8  # 8 entries per thread per accumulator
# Entries per launch: offsets stay int32 (a larger tensor takes several launches into its row).
LIMIT = 2**30
# Programs per launch, per streaming multiprocessor: each loops over its share of blocks,
# so the atomics per launch stay few whatever the tensor's size.
PROGRAMS_PER_SM = 4

Launch = Callable[[torch.Tensor, torch.Tensor, int], None]


@functools.cache
def _kernel() -> Any:
    """The jitted kernel, or ``None`` without Triton."""
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None

    # Sizes and row indices vary per call: not specialised (one compiled variant per dtype
    # and pointer alignment, not three per value class, each a compile at first use).
    @triton.jit(do_not_specialize=["n", "row"])
    def activation_sums(x_ptr, n, rows_ptr, row, BLOCK: tl.constexpr, F64: tl.constexpr):
        acc = tl.float64 if F64 else tl.float32
        # Each lane sums y = x - x0, x0 its first finite entry, and rebuilds x's sums in
        # float64 (sum = S + c x0, sum_sq = Q + 2 x0 S + c x0^2): var = sum_sq / n - mean^2
        # then cancels in float64, not in the float32 partial sums.
        first = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        x0 = tl.load(x_ptr + first, mask=first < n, other=0.0).to(acc)
        x0 = tl.where((x0 == x0) & (tl.abs(x0) != float("inf")), x0, 0.0)
        total = tl.zeros([BLOCK], acc)
        squares = tl.zeros([BLOCK], acc)
        count = tl.zeros([BLOCK], tl.int32)
        nonzero = tl.zeros([BLOCK], tl.int32)
        bad = tl.zeros([BLOCK], tl.int32)
        for start in range(tl.program_id(0) * BLOCK, n, tl.num_programs(0) * BLOCK):
            offsets = start + tl.arange(0, BLOCK)
            inside = offsets < n
            # Entries past n read as 0: neither nonzero nor non-finite, and add no y.
            x = tl.load(x_ptr + offsets, mask=inside, other=0.0).to(acc)
            y = tl.where(inside, x - x0, 0.0)
            total += y
            squares += y * y
            count += inside.to(tl.int32)
            nonzero += (x != 0).to(tl.int32)
            bad += ((x != x) | (tl.abs(x) == float("inf"))).to(tl.int32)
        s = total.to(tl.float64)
        q = squares.to(tl.float64)
        shift = x0.to(tl.float64)
        c = count.to(tl.float64)
        finite = (s == s) & (q == q) & (tl.abs(s) != float("inf")) & (tl.abs(q) != float("inf"))
        # A lane with NaN or Inf entries: y's sums are x's
        q = tl.where(finite, q + 2.0 * shift * s + c * shift * shift, q)
        s = s + c * shift
        out_ptr = rows_ptr + row * 4
        tl.atomic_add(out_ptr, tl.sum(s, 0))
        tl.atomic_add(out_ptr + 1, tl.sum(q, 0))
        tl.atomic_add(out_ptr + 2, tl.sum(nonzero, 0).to(tl.float64))
        tl.atomic_add(out_ptr + 3, tl.sum(bad, 0).to(tl.float64))

    return activation_sums


def launch(x: torch.Tensor, rows: torch.Tensor, index: int, programs: int) -> None:
    """Add ``[sum, sum of squares, nonzero, non-finite]`` of ``x`` (any floating dtype and
    layout) into ``rows[index]`` (float64 [R, 4], zeroed before), in at most ``programs``
    programs. Needs Triton; runs on the CPU under ``TRITON_INTERPRET=1``."""
    if not (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)):
        x = x.detach().contiguous()  # a strided view: reduced from a dense copy
    n = x.numel()
    if n > LIMIT:
        flat = x.detach().reshape(-1)
        for start in range(0, n, LIMIT):
            launch(flat[start : start + LIMIT], rows, index, programs)
        return
    if n == 0:
        return
    grid = (min(-(-n // BLOCK), programs),)
    _kernel()[grid](x, n, rows, index, BLOCK=BLOCK, F64=x.dtype == torch.float64, num_warps=WARPS)


def _agrees(run: Launch, device: torch.device) -> bool:
    """Whether the kernel gives torch's numbers on ``device`` (NaN, Inf, zeros, fp16 and
    a tensor of several blocks)."""
    gen = torch.Generator().manual_seed(0)
    big = torch.randn(3 * BLOCK + 5, generator=gen).relu()
    odd = torch.tensor([1.5, 0.0, float("nan"), -float("inf"), float("inf"), -2.0])
    inputs = [big, odd, big.half()]
    rows = torch.zeros(len(inputs), 4, dtype=torch.float64, device=device)
    for i, x in enumerate(inputs):
        run(x.to(device), rows, i)
    got = rows.cpu()
    for x, row in zip(inputs, got, strict=True):
        a = x.double()
        finite = torch.isfinite(a)
        want = [a.sum(), (a * a).sum(), (a != 0).sum(), (~finite).sum()]
        if finite.all():
            if not torch.allclose(row, torch.stack(want).double(), rtol=1e-5, atol=1e-3):
                return False
        elif row[:2].isfinite().any() or row[2:].tolist() != [float(want[2]), float(want[3])]:
            return False
    return True


@functools.cache
def reducer(device: torch.device) -> Launch | None:
    """``run(x, rows, index)`` for CUDA tensors on ``device``, or ``None`` where the kernel
    is off (``GRADFLOW_TRITON`` is not ``1``) or unavailable (no Triton, not CUDA, or a
    failed check)."""
    if device.type != "cuda" or os.environ.get("GRADFLOW_TRITON", "0") != "1":
        return None
    if _kernel() is None:
        return None
    programs = PROGRAMS_PER_SM * torch.cuda.get_device_properties(device).multi_processor_count

    def run(x: torch.Tensor, rows: torch.Tensor, index: int) -> None:
        if x.device.index == torch.cuda.current_device():
            launch(x, rows, index, programs)
        else:
            with torch.cuda.device(x.device):
                launch(x, rows, index, programs)

    try:
        ok = _agrees(run, device)
    except Exception:  # a compiler or driver that cannot build it: torch operations then
        return None
    return run if ok else None
