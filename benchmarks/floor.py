"""The memory-traffic floor of the parameter statistics on paper-resunet, and how close the
recorder comes to it.

One recorded step's parameter statistics read the gradients (sums of squares), read the
weights and write them into the snapshot before the optimizer step (``take``), and read the
snapshot, the weights and the gradients after it (``delta``, whose sum of grad * update
gives ``param/grad_update_cos``): five reads and one write of N float32. This script
measures, on this machine:

1. bandwidth: a read, a write and a copy of a float32 tensor as large as all of
   paper-resunet's parameters, by torch (``torch.sum``, ``fill_``, ``copy_``) and by plain
   C loops, best of ``--repeats``;
2. the floor: those bytes at the faster read and write speeds;
3. the recorder's own clock: ``Recorder(model, opt, path, probes="param")`` on real training
   steps (crop 64, batch 2), the median ``stats`` seconds per recorded step of the run file's
   ``overhead`` columns, and gradflow's C kernels timed one by one;
4. a carried snapshot: if the next step is recorded too, ``delta`` could also write the new
   weights into the snapshot and sum their squares, so the next ``take`` is skipped (three
   streams instead of five). Timed with a small C file compiled here (separate passes and
   the fused one), and whether ``p._version`` could tell that weights changed between steps
   outside the optimizer.

    python benchmarks/floor.py                         # < 1 min on a quiet 2-core machine
    python benchmarks/floor.py --repeats 5 --steps 6   # quick
"""

from __future__ import annotations

import argparse
import ctypes
import importlib
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from harness.env import environment, print_header
from harness.report import format_table, write_json
from harness.workloads import Workload
from torch import nn

MB = 1e6

# The fused pass next to the two it would replace, written like gradflow's kernels (float
# block sums, max |d| as an integer maximum on the bits of |d|); compiled with -march=native,
# all three the same way, so their times compare with each other.
C_SOURCE = r"""
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <string.h>
#ifdef __AVX__
#include <immintrin.h>
#endif

#define BLOCK 4096

/* The plain passes the floor is made of: a read (sum), a write and a copy; the stores
   bypass the caches where AVX is there, as gradflow's snapshot copy does. */
static double read_sum(const float *w, long n) {
    double q = 0.0;
    for (long i0 = 0; i0 < n; i0 += BLOCK) {
        long i1 = i0 + BLOCK < n ? i0 + BLOCK : n;
        float b = 0.0f;
        for (long i = i0; i < i1; ++i)
            b += w[i];
        q += b;
    }
    return q;
}

static void write_copy(const float *w, float *s, long n) {
    long i = 0;
#ifdef __AVX__
    for (; i < n && ((uintptr_t)(s + i) & 31); ++i)
        s[i] = w ? w[i] : 1.0f;
    __m256 one = _mm256_set1_ps(1.0f);
    for (; i + 8 <= n; i += 8)
        _mm256_stream_ps(s + i, w ? _mm256_loadu_ps(w + i) : one);
    _mm_sfence();
#endif
    for (; i < n; ++i)
        s[i] = w ? w[i] : 1.0f;
}

/* before = after, sum of squares of after (today's take). */
static void take(const float *w, float *s, long n, double *out) {
    double q = 0.0;
    for (long i0 = 0; i0 < n; i0 += BLOCK) {
        long i1 = i0 + BLOCK < n ? i0 + BLOCK : n;
        float b = 0.0f;
        for (long i = i0; i < i1; ++i) {
            float v = w[i];
            s[i] = v;
            b += v * v;
        }
        q += b;
    }
    out[0] = q;
}

/* d = s - w: sum d^2, sum |d|, max |d| (today's delta; reads only). */
static void delta(const float *w, float *s, long n, double *out, int carry) {
    double q = 0.0, a = 0.0, q2 = 0.0;
    unsigned m = 0;
    for (long i0 = 0; i0 < n; i0 += BLOCK) {
        long i1 = i0 + BLOCK < n ? i0 + BLOCK : n;
        float bq = 0.0f, ba = 0.0f, bw = 0.0f;
        if (carry)
            for (long i = i0; i < i1; ++i) {
                float v = w[i], d = s[i] - v, ad = fabsf(d);
                unsigned b;
                memcpy(&b, &ad, sizeof b);
                bq += d * d;
                ba += ad;
                m = b > m ? b : m;
                s[i] = v;
                bw += v * v;
            }
        else
            for (long i = i0; i < i1; ++i) {
                float d = s[i] - w[i], ad = fabsf(d);
                unsigned b;
                memcpy(&b, &ad, sizeof b);
                bq += d * d;
                ba += ad;
                m = b > m ? b : m;
            }
        q += bq;
        a += ba;
        q2 += bw;
    }
    float fm;
    memcpy(&fm, &m, sizeof fm);
    out[0] = q;
    out[1] = a;
    out[2] = fm;
    out[3] = q2;
}

struct part {
    int op;
    const float *w;
    float *s;
    long n;
    double out[4];
};

static void *run_part(void *p) {
    struct part *j = p;
    if (j->op == 0)
        take(j->w, j->s, j->n, j->out);
    else if (j->op <= 2)
        delta(j->w, j->s, j->n, j->out, j->op == 2);
    else if (j->op == 3)
        j->out[0] = read_sum(j->w, j->n);
    else
        write_copy(j->op == 5 ? j->w : 0, j->s, j->n);
    return 0;
}

/* op 0 take, 1 delta, 2 delta carrying the snapshot, 3 read w, 4 write s, 5 copy w to s;
   n split into `parts` threads. Returns the sum of the parts' first results. */
double floor_pass(int op, const float *w, float *s, long n, int parts) {
    struct part jobs[16];
    pthread_t threads[16];
    if (parts > 16)
        parts = 16;
    long step = (n / parts + 15) & ~15L;
    for (int i = 0; i < parts; ++i) {
        long a = i * step < n ? i * step : n, b = (i + 1) * step < n ? (i + 1) * step : n;
        struct part j = {op, w + a, s + a, b - a, {0, 0, 0, 0}};
        jobs[i] = j;
        if (i > 0)
            pthread_create(&threads[i], 0, run_part, &jobs[i]);
    }
    run_part(&jobs[0]);
    for (int i = 1; i < parts; ++i)
        pthread_join(threads[i], 0);
    double total = 0.0;
    for (int i = 0; i < parts; ++i)
        total += jobs[i].out[0];
    return total;
}
"""
C_FLAGS = [
    "-O3",
    "-march=native",
    "-fno-math-errno",
    "-fassociative-math",
    "-fno-signed-zeros",
    "-fno-trapping-math",
    "-pthread",
    "-shared",
    "-fPIC",
]
TAKE, DELTA, CARRIED, READ, WRITE, COPY = range(6)


EVICT_MB = 128


def interleaved_ms(fns: dict[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
    """Best ms of each function over ``repeats``, the functions called in turn in every
    repeat (one warm-up round first), each after writing a ``EVICT_MB`` buffer (untimed).
    The best, not the median: what the machine can do, in the repeat least disturbed by
    other processes; the buffer: data comes from memory, as it does after an optimizer step
    and a forward and backward pass, not from a cache warm from the previous call."""
    scratch = torch.empty(EVICT_MB * 2**20 // 4)
    times: dict[str, list[float]] = {k: [] for k in fns}
    for i in range(repeats + 1):
        for name, fn in fns.items():
            scratch.fill_(float(i))
            start = time.perf_counter()
            fn()
            if i:
                times[name].append(time.perf_counter() - start)
    return {k: 1e3 * min(v) for k, v in times.items()}


def param_kernels_module() -> Any:
    """The module with ``param_kernels``: gradflow.native, or gradflow.kernels.cpu."""
    for name in ("gradflow.kernels.cpu", "gradflow.native"):
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        if hasattr(module, "param_kernels"):
            return module
    return None


def build_model(workload: Workload) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    from gradflow.em.models import create_model

    torch.manual_seed(workload.seed)
    gen = torch.Generator().manual_seed(workload.seed + 1)
    shape = (workload.batch, 1, workload.crop, workload.crop)
    x = torch.randn(shape, generator=gen)
    y = (torch.rand(shape, generator=gen) < 0.3).float()
    model = create_model(workload.model)
    model.train()
    return model, x, y


# -- 1 and 2: bandwidth and the floor -------------------------------------------------------------
def bandwidth(n: int, repeats: int, lib: ctypes.CDLL | None) -> dict[str, float]:
    """GB/s of a read, a write and a copy of ``n`` float32 (copy: bytes read + written), by
    torch and by plain C loops; ``read_gbs`` etc. are the faster of the two."""
    src = torch.randn(n)
    dst = torch.empty(n)
    dst.copy_(src)
    passes: dict[str, Callable[[], Any]] = {
        "torch read": lambda: torch.sum(src),
        "torch write": lambda: dst.fill_(1.0),
        "torch copy": lambda: dst.copy_(src),
    }
    if lib is not None:
        parts = torch.get_num_threads()
        for name, op in (("read", READ), ("write", WRITE), ("copy", COPY)):
            passes[f"C {name}"] = c_call(lib, op, src, dst, parts)
    ms = interleaved_ms(passes, repeats)
    out: dict[str, float] = {}
    for name, t in ms.items():
        kind = name.split()[1]
        gbs = (2 if kind == "copy" else 1) * 4 * n / t / MB
        out[f"{name.replace(' ', '_')}_ms"] = t
        out[f"{name.replace(' ', '_')}_gbs"] = gbs
        out[f"{kind}_gbs"] = max(gbs, out.get(f"{kind}_gbs", 0.0))
    return out


def c_call(
    lib: ctypes.CDLL, op: int, w: torch.Tensor, s: torch.Tensor, parts: int
) -> Callable[[], float]:
    """One snippet pass over ``w`` and ``s`` (same length, float32, contiguous)."""
    return lambda: lib.floor_pass(op, w.data_ptr(), s.data_ptr(), w.numel(), parts)


def floor(n: int, bw: dict[str, float], reads: int, writes: int) -> dict[str, float]:
    """ms to read ``reads`` and write ``writes`` times ``n`` float32 at the measured speeds."""
    read_b, write_b = 4 * n * reads, 4 * n * writes
    return {
        "read_mb": read_b / MB,
        "write_mb": write_b / MB,
        "ms": read_b / bw["read_gbs"] / MB + write_b / bw["write_gbs"] / MB,
    }


# -- 3: the recorder's clock and the kernels ------------------------------------------------------
def recorder_clock(workload: Workload, steps: int, warmup: int) -> dict[str, Any]:
    """Record ``warmup + steps`` training steps with parameter statistics; the run file's
    overhead columns (ms per recorded step) of the last ``steps`` steps."""
    from gradflow import Recorder

    model, x, y = build_model(workload)
    opt = torch.optim.RMSprop(model.parameters(), lr=workload.lr)
    loss_fn = nn.BCEWithLogitsLoss()
    with tempfile.TemporaryDirectory(prefix="gradflow-floor-") as tmp:
        path = Path(tmp) / "run.h5"
        rec = Recorder(model, opt, path, probes="param", overwrite=True)
        step_s = []
        for _ in range(warmup + steps):
            start = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(x), y)
            loss.backward()
            opt.step()
            rec.log(loss=loss)
            step_s.append(time.perf_counter() - start)
        rec.close()
        with h5py.File(path, "r") as f:
            columns = [str(c) for c in f["overhead"].attrs["columns"]]
            rows = np.asarray(f["overhead"][warmup:], dtype=np.float64)
            backend = f.attrs.get("kernel_backend")
    out: dict[str, Any] = {
        f"{c}_ms": 1e3 * float(np.median(rows[:, i])) for i, c in enumerate(columns)
    }
    out["stats_ms_all"] = [round(1e3 * v, 3) for v in rows[:, columns.index("stats")]]
    out["step_ms"] = 1e3 * statistics.median(step_s[warmup:])
    out["kernel_backend"] = None if backend is None else str(backend)
    out["steps"] = len(rows)
    return out


def gradflow_passes(params: Sequence[torch.Tensor]) -> dict[str, Callable[[], Any]] | None:
    """gradflow's three parameter passes over tensors shaped like ``params`` (own copies),
    or None where this process has no C kernels."""
    module = param_kernels_module()
    kernels = module.param_kernels([p.numel() for p in params]) if module else None
    if kernels is None:
        return None
    weights = [p.detach().clone().contiguous() for p in params]
    grads = [torch.randn_like(w) for w in weights]
    flat = torch.empty(sum(w.numel() for w in weights))
    views = list(flat.split([w.numel() for w in weights]))
    return {
        "grad squares": lambda: kernels.squares(grads),
        "take (copy_squares)": lambda: kernels.copy_squares(weights, views),
        "delta": lambda: kernels.delta(views, weights, grads),
    }


# -- 4: the carried snapshot ----------------------------------------------------------------------
def compile_snippet() -> ctypes.CDLL | None:
    """The C file above, compiled with ``cc`` in a temporary directory (a loaded library
    stays mapped after its file is deleted); None without a C compiler."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        return None
    with tempfile.TemporaryDirectory(prefix="gradflow-floor-c-") as tmp:
        source, library = Path(tmp) / "floor.c", Path(tmp) / "floor.so"
        source.write_text(C_SOURCE)
        subprocess.run([compiler, *C_FLAGS, str(source), "-o", str(library)], check=True)
        lib = ctypes.CDLL(str(library))
    lib.floor_pass.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_long]
    lib.floor_pass.argtypes.append(ctypes.c_int)
    lib.floor_pass.restype = ctypes.c_double
    return lib


def carried_times(
    n: int,
    repeats: int,
    lib: ctypes.CDLL,
    passes: dict[str, Callable[[], Any]] | None,
    block: int = 5,
) -> dict[str, float]:
    """ms per step of today's take + delta (the C file's and gradflow's) and of the carried
    pass, over ``n`` float32 split into as many threads as torch uses. Each is timed over
    ``block`` steps in a row: dirty cache lines a pass leaves are written back during the
    next one, so single passes would charge each other's writes."""
    w = torch.randn(n)
    s = w.clone()
    parts = torch.get_num_threads()
    take, delta, carried = (c_call(lib, op, w, s, parts) for op in (TAKE, DELTA, CARRIED))

    def repeat(*fns: Callable[[], Any]) -> Callable[[], None]:
        def run() -> None:
            for _ in range(block):
                for fn in fns:
                    fn()

        return run

    # Every pass leaves s equal to w or only reads it: all of them see the same data.
    blocks = {"C take + delta": repeat(take, delta), "C carried": repeat(carried)}
    if passes is not None:
        blocks["gradflow take + delta"] = repeat(passes["take (copy_squares)"], passes["delta"])
    return {k: v / block for k, v in interleaved_ms(blocks, repeats).items()}


def version_table() -> list[dict[str, Any]]:
    """Whether each way of changing weights moves ``p._version`` (or ``p.data_ptr()``)."""
    layer = nn.Linear(4, 4)
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    x = torch.randn(2, 4)
    saved = {k: v.clone() for k, v in layer.state_dict().items()}
    p = layer.weight

    def forward_backward() -> None:
        opt.zero_grad(set_to_none=True)
        layer(x).square().sum().backward()

    def no_grad_mul() -> None:
        with torch.no_grad():
            p.mul_(2)

    def no_grad_copy_ema() -> None:
        with torch.no_grad():
            p.copy_(0.5 * p + 0.5 * torch.randn_like(p))

    def assign_data() -> None:
        p.data = p.data * 2

    def vector_to_parameters() -> None:
        vec = nn.utils.parameters_to_vector(layer.parameters()) * 2
        nn.utils.vector_to_parameters(vec, layer.parameters())

    cases: list[tuple[str, Callable[[], Any]]] = [
        ("forward + backward + zero_grad", forward_backward),
        ("optimizer.step()", opt.step),
        ("p.data.mul_(2)", lambda: p.data.mul_(2)),
        ("p.data.clamp_(-0.01, 0.01)", lambda: p.data.clamp_(-0.01, 0.01)),
        ("with torch.no_grad(): p.mul_(2)", no_grad_mul),
        ("with torch.no_grad(): p.copy_(ema)", no_grad_copy_ema),
        ("p.detach().mul_(2)", lambda: p.detach().mul_(2)),
        ("p.data = p.data * 2", assign_data),
        ("load_state_dict(saved)", lambda: layer.load_state_dict(saved)),
        ("nn.utils.vector_to_parameters", vector_to_parameters),
    ]
    forward_backward()
    rows = []
    for label, change in cases:
        version, pointer, before = p._version, p.data_ptr(), p.detach().clone()
        change()
        rows.append(
            {
                "change": label,
                "values_changed": not torch.equal(before, p.detach()),
                "version_before": version,
                "version_after": p._version,
                "data_ptr_changed": p.data_ptr() != pointer,
            }
        )
    return rows


# -- the report -----------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default="paper-resunet")
    p.add_argument("--crop", type=int, default=64)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--repeats", type=int, default=30, help="repeats per microbenchmark")
    p.add_argument("--steps", type=int, default=20, help="recorded steps that are measured")
    p.add_argument("--warmup", type=int, default=3, help="recorded steps not measured first")
    p.add_argument("--json", help="write all results to this JSON file")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    workload = Workload(model=args.model, crop=args.crop, batch=args.batch)
    env = environment()
    print_header("gradflow parameter statistics: the memory-traffic floor", env)
    import gradflow

    print(f"command {' '.join(sys.argv)}")
    print(f"gradflow {gradflow.__file__}")
    model, _, _ = build_model(workload)
    params = [p for p in model.parameters() if p.requires_grad]
    n = sum(p.numel() for p in params)
    print(
        f"model   {workload.model}: {n / 1e6:.2f} M parameters in {len(params)} tensors, "
        f"{4 * n / MB:.1f} MB of float32"
    )
    print()

    lib = compile_snippet()
    bw = bandwidth(n, args.repeats, lib)
    today = floor(n, bw, reads=5, writes=1)
    carried_floor = floor(n, bw, reads=4, writes=1)
    print(
        f"1. bandwidth, {4 * n / MB:.1f} MB float32, best of {args.repeats}, interleaved, "
        f"{torch.get_num_threads()} threads, each call after writing {EVICT_MB} MB elsewhere"
    )
    what = {
        "torch read": "torch.sum(src)",
        "torch write": "dst.fill_(1.0)",
        "torch copy": "dst.copy_(src), read + write",
        "C read": "sum loop",
        "C write": "store loop, streaming stores",
        "C copy": "copy loop, streaming stores, read + write",
    }
    rows = [
        [f"{name}: {what[name]}", f"{bw[key + '_ms']:.2f}", f"{bw[key + '_gbs']:.1f}"]
        for name in what
        if (key := name.replace(" ", "_")) + "_ms" in bw
    ]
    print(format_table(["pass", "ms", "GB/s"], rows))
    print(
        f"   the floor below uses the faster of each: read {bw['read_gbs']:.1f}, write "
        f"{bw['write_gbs']:.1f}, copy {bw['copy_gbs']:.1f} GB/s"
    )
    print()
    print(
        "2. the floor of one recorded step's parameter statistics: read the gradients, "
        "read W + write the snapshot (take), read the snapshot, W and the gradients (delta)"
    )
    print(
        f"   {today['read_mb']:.0f} MB read + {today['write_mb']:.0f} MB written "
        f"= {today['ms']:.2f} ms at the measured read and write speeds"
    )
    today["take_as_copy_ms"] = floor(n, bw, reads=4, writes=0)["ms"] + 8 * n / bw["copy_gbs"] / MB
    print(f"   (with take at the copy speed instead: {today['take_as_copy_ms']:.2f} ms)")
    print()

    clock = recorder_clock(workload, args.steps, args.warmup)
    passes = gradflow_passes(params)
    kernels = interleaved_ms(passes, args.repeats) if passes else None
    print(
        f"3. the recorder's own clock, {workload.describe()}, probes='param', "
        f"{clock['steps']} recorded steps after {args.warmup}, "
        f"{clock['kernel_backend']} kernels"
    )
    print(
        f"   per recorded step (median ms): stats {clock['stats_ms']:.2f}, hooks "
        f"{clock['hooks_ms']:.2f}, copy {clock['copy_ms']:.2f}, writer "
        f"{clock['writer_ms']:.2f}; training step with recording {clock['step_ms']:.0f}"
    )
    print(
        f"   stats / floor = {clock['stats_ms']:.2f} / {today['ms']:.2f} = "
        f"{clock['stats_ms'] / today['ms']:.2f}x"
    )
    if kernels is None:
        print("   gradflow's parameter kernels: unavailable (no C kernels in this process)")
    else:
        streams = {"grad squares": (1, 0), "take (copy_squares)": (1, 1), "delta": (3, 0)}
        rows = []
        for name, ms in kernels.items():
            r, w = streams[name]
            pass_floor = floor(n, bw, r, w)["ms"]
            moved = 4 * n * (r + w) / MB
            rows.append(
                [
                    name,
                    f"{ms:.2f}",
                    f"{moved:.0f}",
                    f"{moved / ms:.1f}",
                    f"{pass_floor:.2f}",
                    f"{ms / pass_floor:.2f}x",
                ]
            )
        total = sum(kernels.values())
        rows.append(
            [
                "sum of the three",
                f"{total:.2f}",
                "",
                "",
                f"{today['ms']:.2f}",
                f"{total / today['ms']:.2f}x",
            ]
        )
        print(f"   gradflow's parameter kernels alone (best of {args.repeats}, interleaved):")
        print(
            "   "
            + format_table(
                ["kernel", "ms", "MB moved", "GB/s", "floor ms", "/ floor"], rows
            ).replace("\n", "\n   ")
        )
    print()

    carried = carried_times(n, args.repeats, lib, passes) if lib is not None else None
    print(
        "4. carrying the snapshot: delta also writes W into the snapshot and sums W^2, the "
        "next step's take is skipped"
    )
    saving: dict[str, float] = {"floor_ms": today["ms"] - carried_floor["ms"]}
    if carried is None:
        print("   no C compiler: not measured")
    else:
        saving["same_code_ms"] = carried["C take + delta"] - carried["C carried"]
        theirs = carried.get("gradflow take + delta")
        if theirs is not None:
            saving["gradflow_ms"] = theirs - carried["C carried"]
        print(
            f"   ms per step, blocks of 5 steps, best of {args.repeats}; one C file "
            f"(-march=native, {torch.get_num_threads()} threads): take + delta "
            f"{carried['C take + delta']:.2f} -> carried {carried['C carried']:.2f}"
            + (
                ""
                if theirs is None
                else f"; gradflow's take + delta (which also reads the gradients) {theirs:.2f}"
            )
        )
        print(
            f"   saving per recorded step: {saving['same_code_ms']:.2f} ms against the same "
            f"code's two passes"
            + (
                f", {saving['gradflow_ms']:.2f} ms against gradflow's"
                if "gradflow_ms" in saving
                else ""
            )
            + f"; floor {today['ms']:.2f} -> {carried_floor['ms']:.2f} ms "
            f"(one read of {4 * n / MB:.0f} MB less)"
        )
        print(
            f"   as a fraction of the recorder's stats clock ({clock['stats_ms']:.2f} ms): "
            f"{saving['same_code_ms'] / clock['stats_ms']:.0%}"
            + (
                f" (against gradflow's passes {saving['gradflow_ms'] / clock['stats_ms']:.0%})"
                if "gradflow_ms" in saving
                else ""
            )
        )
    print()
    versions = version_table()
    print("   weights changed between steps outside the optimizer: does p._version see it?")
    rows = [
        [
            v["change"],
            "yes" if v["values_changed"] else "no",
            f"{v['version_before']} -> {v['version_after']}",
            "yes" if v["data_ptr_changed"] else "no",
        ]
        for v in versions
    ]
    headers = ["change to p (an nn.Linear weight)", "values changed", "p._version", "data_ptr"]
    print("   " + format_table(headers, rows).replace("\n", "\n   "))
    unseen = [
        v["change"]
        for v in versions
        if v["values_changed"]
        and v["version_before"] == v["version_after"]
        and not v["data_ptr_changed"]
    ]
    print(
        f"   changed values that neither p._version nor data_ptr() shows: "
        f"{', '.join(unseen) or 'none'}"
    )
    write_json(
        args.json,
        {
            "environment": env,
            "workload": workload,
            "parameters": n,
            "bandwidth": bw,
            "floor": today,
            "floor_carried": carried_floor,
            "recorder": clock,
            "kernels_ms": kernels,
            "carried_ms": carried,
            "saving_ms": saving,
            "versions": versions,
        },
    )


if __name__ == "__main__":
    main()
