"""Runs the accelerator path's fused Triton kernel on CPU tensors, by Triton's interpreter
(which must be chosen before Triton is first imported, hence a process of its own).

    TRITON_INTERPRET=1 python fused_interpreted.py inputs.pt rows.pt [entries per launch]

``inputs.pt``: a list of tensors; ``rows.pt``: their ``[sum, sum_sq, nonzero, nonfinite]``
columns as the probe logs them (one call each, 3 programs per launch; a tensor longer than
the entries per launch takes several launches, as beyond 2**30 entries on a GPU).
"""

import sys

import torch

from gradflow.kernels import triton as fused
from gradflow.kernels.device import DeviceRows, reduce_into

inputs = torch.load(sys.argv[1])
if len(sys.argv) > 3:
    fused.LIMIT = int(sys.argv[3])
rows = DeviceRows(
    torch.device("cpu"), 4, lambda x, rows, index: fused.launch(x, rows, index, programs=3)
)
for x in inputs:
    reduce_into(x, rows)
torch.save(rows.tensor().view(-1, 4), sys.argv[2])
