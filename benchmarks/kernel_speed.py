"""What the C kernels save: one recorded step's reductions with them and with torch operations.

For each model: one forward and backward pass of a fixed random batch, then, interleaved
and repeated, the reductions a recorded step makes on the CPU, timed as the best of
``--repeat`` rounds (robust on a busy machine):

- layer outputs ``[sum, sum of squares, zeros, non-finite]`` and output-gradient sums of
  squares, through :class:`gradflow.kernels.host.HostReducer` with the kernels and without;
- parameter statistics (gradients, weights with their snapshot copy, update), through
  :class:`gradflow.probes.Snapshot` with the kernels and with its torch path.

Run: ``python benchmarks/kernel_speed.py`` (``--models paper-resunet:64 fig3b-long-9:96``).
"""

from __future__ import annotations

from collections.abc import Callable
from unittest import mock

import torch
from harness.env import add_threads_option, environment, print_header, script_parser, set_threads
from harness.report import format_table
from harness.timing import interleaved_best

from gradflow.em.models import create_model
from gradflow.kernels import cpu as native
from gradflow.kernels.host import HostReducer, HostRows
from gradflow.probes import Snapshot


def workload(name: str, crop: int) -> dict[str, list[torch.Tensor]]:
    """The tensors one recorded step reduces: outputs, output gradients, parameters, grads."""
    torch.manual_seed(0)
    model = create_model(name)
    outputs: list[torch.Tensor] = []
    leaves = [m for m in model.modules() if not list(m.children())]
    hooks = [m.register_forward_hook(lambda m, i, o: outputs.append(o)) for m in leaves]
    out = model(torch.randn(4, 1, crop, crop))
    for o in outputs:
        o.retain_grad()
    out.square().mean().backward()
    for h in hooks:
        h.remove()
    params: list[torch.Tensor] = list(model.parameters())
    return {
        "outputs": [o.detach() for o in outputs],
        "output_grads": [o.grad for o in outputs if o.grad is not None],
        "params": params,
        "grads": [p.grad for p in params if p.grad is not None],
    }


def timings(tensors: dict[str, list[torch.Tensor]], repeat: int) -> dict[str, float]:
    """Best seconds per phase and backend."""
    params = tensors["params"]

    def host(native: bool) -> Callable[[], None]:
        outputs, squares = HostReducer(native=native), HostReducer(True, native=native)

        def run() -> None:
            rows, grad_rows = HostRows(4), HostRows(1)
            for x in tensors["outputs"]:
                outputs(x, rows)
            for g in tensors["output_grads"]:
                squares(g, grad_rows)

        return run

    def param(snapshot: Snapshot) -> Callable[[], None]:
        def run() -> None:
            snapshot.grad_reductions(tensors["grads"])
            snapshot.take()
            snapshot.delta(tensors["grads"])

        return run

    cpu = torch.device("cpu")
    with mock.patch("gradflow.probes.snapshot.param_kernels", lambda sizes: None):
        torch_snapshot = Snapshot(params, cpu)
    cases = {
        "outputs C": host(native=True),
        "outputs torch": host(native=False),
        "params C": param(Snapshot(params, cpu)),
        "params torch": param(torch_snapshot),
    }
    return interleaved_best(cases, repeat)


def main() -> None:
    parser = script_parser(__doc__, json_help=None)
    parser.add_argument("--models", nargs="+", default=["fig3b-long-9:96", "paper-resunet:64"])
    parser.add_argument("--repeat", type=int, default=12)
    add_threads_option(parser, 1)
    args = parser.parse_args()
    set_threads(args)
    print_header("C kernels against torch operations, one recorded step", environment())
    print(f"kernels: {native.cpu_backend()}, torch threads: {args.threads}, best of {args.repeat}")
    rows = []
    for spec in args.models:
        name, crop = spec.split(":")
        tensors = workload(name, int(crop))
        t = timings(tensors, args.repeat)
        with_c = t["outputs C"] + t["params C"]
        with_torch = t["outputs torch"] + t["params torch"]
        n_params = sum(p.numel() for p in tensors["params"])
        rows.append(
            [
                f"{name} {crop}x{crop}",
                f"{n_params / 1e6:.2f} M",
                len(tensors["outputs"]),
                *(f"{1e3 * t[k]:.1f}" for k in ("outputs C", "outputs torch")),
                *(f"{1e3 * t[k]:.1f}" for k in ("params C", "params torch")),
                f"{with_torch / with_c:.1f}x",
            ]
        )
    headers = ["model", "params", "outputs", "out C ms", "out torch ms"]
    headers += ["param C ms", "param torch ms", "torch / C"]
    print(format_table(headers, rows))


if __name__ == "__main__":
    main()
